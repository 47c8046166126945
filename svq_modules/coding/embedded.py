"""The embedded section of self-contained chunks: a layer's part of the model, for a receiver without it.

Per layer, in global node ids (layout in ``docs/bitstream.md``): the internal
nodes the layer splits (id, both children, 16-bit branch probability) and the
centers of the layer's nodes (layer 0 also the root's). :func:`embed_section`
writes it; :func:`codec_from_embedded` validates the sections of a stream and
rebuilds exactly the :class:`~.tables.CodecTables` the model gives (groups,
symbol numbers, entropy model) plus the centers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

from ..tree import scan_to_marked
from .chunk import BitstreamError, Chunk, ChunkHeader
from .tables import PROB_ONE, CodecTables

__all__ = ["EMBED_HEAD", "EMBED_NODE_BYTES", "EMBED_NUMPY", "codec_from_embedded", "embed_section"]

#: numpy dtype of the embedded centers of each embed type
EMBED_NUMPY: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
#: split nodes E, layer nodes G (u32 each)
EMBED_HEAD = struct.Struct("<II")
#: per split node: u32 id, u32 left, u32 right, u16 probability
EMBED_NODE_BYTES = 14


def embed_section(codec: CodecTables, centers: np.ndarray, layer: int, embed: str) -> bytes:
    """Self-contained data of one layer: split nodes (id, children, probability) and layer-node centers.

    Args:
        codec: model tables (:func:`~.tables.codec_tables`).
        centers: ``[M, D]`` float node centers of the model.
        embed: ``"float16"`` or ``"float32"``.
    """
    opened = np.flatnonzero(codec.opened_layer == layer)
    members = codec.members[layer]
    rows = members if layer > 0 else np.concatenate([[codec.root], members]).astype(np.intp)
    return b"".join(
        [
            EMBED_HEAD.pack(opened.shape[0], members.shape[0]),
            opened.astype("<u4").tobytes(),
            codec.left[opened].astype("<u4").tobytes(),
            codec.right[opened].astype("<u4").tobytes(),
            codec.q_right[opened].astype("<u2").tobytes(),
            centers[rows].astype(EMBED_NUMPY[embed]).tobytes(),
        ]
    )


def _read_section(c: Chunk, layer: int, num_leaves: int, dim: int, what: str):
    """Arrays of one embedded section after its length checks: ``node, left, right, q [E]``, ``centers [rows, D]``, ``G``."""
    if c.header.embed is None:
        raise BitstreamError(f"{what} carries no embedded model data: decoding without the model needs a self-contained stream")
    dtype = EMBED_NUMPY[c.header.embed]
    M = 2 * num_leaves - 1
    emb = c.embed
    if len(emb) < EMBED_HEAD.size:
        raise BitstreamError(f"{what}: embedded section of {len(emb)} bytes is too short")
    E, G = EMBED_HEAD.unpack_from(emb, 0)
    if E >= M or G > M:
        raise BitstreamError(f"{what}: embedded section claims {E} split nodes / {G} layer nodes in a {M}-node tree")
    rows = G + (1 if layer == 0 else 0)
    expected = EMBED_HEAD.size + EMBED_NODE_BYTES * E + rows * dim * dtype.itemsize
    if len(emb) != expected:
        raise BitstreamError(f"{what}: embedded section has {len(emb)} bytes, expected {expected}")
    o = EMBED_HEAD.size
    node = np.frombuffer(emb, dtype="<u4", count=E, offset=o).astype(np.intp)
    lch = np.frombuffer(emb, dtype="<u4", count=E, offset=o + 4 * E).astype(np.intp)
    rch = np.frombuffer(emb, dtype="<u4", count=E, offset=o + 8 * E).astype(np.intp)
    q = np.frombuffer(emb, dtype="<u2", count=E, offset=o + 12 * E).astype(np.int64)
    cen = np.frombuffer(emb, dtype=dtype, count=rows * dim, offset=o + 14 * E).reshape(rows, dim)
    return node, lch, rch, q, cen, G


class _Tree:
    """The part of the tree the sections of layers ``0..l-1`` gave, grown one layer at a time."""

    def __init__(self, num_leaves: int, dim: int) -> None:
        K, M = num_leaves, 2 * num_leaves - 1
        self.K, self.M = K, M
        self.left = np.full(M, -1, dtype=np.intp)
        self.right = np.full(M, -1, dtype=np.intp)
        self.parent = np.full(M, -1, dtype=np.int64)
        self.q_right = np.zeros(M, dtype=np.int64)
        self.opened_layer = np.full(M, -1, dtype=np.int64)
        self.centers = np.full((M, dim), np.nan, dtype=np.float32)
        self.prev = np.zeros(M, dtype=bool)  # nodes of the previous layer (the root before layer 0)
        self.prev[M - 1] = True
        self.group_start: list[np.ndarray] = []
        self.group_size: list[np.ndarray] = []
        self.members: list[np.ndarray] = []
        self.is_member: list[np.ndarray] = []

    def add_layer(self, layer: int, node, lch, rch, q, cen, G: int, what: str) -> None:
        """Check one layer's split nodes against the tree so far, attach them, derive the layer's groups."""
        K, M = self.K, self.M
        ch = np.concatenate([lch, rch])
        if node.size:
            if (node < K).any() or (node >= M).any() or (np.diff(node) <= 0).any():
                raise BitstreamError(f"{what}: embedded split nodes are not ascending internal node ids")
            if (self.opened_layer[node] >= 0).any():
                raise BitstreamError(f"{what}: embedded node split twice")
            if (lch >= node).any() or (rch >= node).any() or (lch == rch).any():
                raise BitstreamError(f"{what}: embedded children must be two nodes with smaller ids than their parent")
            if np.unique(ch).size != ch.size or (self.parent[ch] >= 0).any():
                raise BitstreamError(f"{what}: embedded node with two parents")
            if (q < 1).any() or (q >= PROB_ONE).any():
                raise BitstreamError(f"{what}: embedded branch probability out of range")
        self.left[node], self.right[node], self.q_right[node] = lch, rch, q
        self.parent[lch], self.parent[rch] = node, node
        self.opened_layer[node] = layer
        opened = self.opened_layer == layer
        top = node[~self.prev[node]]
        if top.size and ((self.parent[top] < 0).any() or not opened[self.parent[top]].all()):
            raise BitstreamError(f"{what}: embedded subtree does not hang below a node of the previous layer")
        mem = ch[~opened[ch]]
        if mem.size != G:
            raise BitstreamError(f"{what}: embedded section lists {G} layer nodes but its subtrees have {mem.size}")
        anc, found, _ = scan_to_marked(torch.from_numpy(self.parent), torch.from_numpy(self.prev))
        anc, found = anc.numpy().astype(np.intp), found.numpy()
        grp = anc[mem]
        if mem.size and not found[mem].all():
            raise BitstreamError(f"{what}: embedded layer node not below a node of the previous layer")
        order = np.lexsort((mem, grp))  # groups by node id of the previous-layer node, symbols by node id
        mem, grp = mem[order], grp[order]
        start = np.zeros(M, dtype=np.intp)
        start[grp] = np.searchsorted(grp, grp)
        self.group_start.append(start)
        self.group_size.append(np.bincount(grp, minlength=M).astype(np.intp))
        self.members.append(mem)
        flag = np.zeros(M, dtype=bool)
        flag[mem] = True
        self.is_member.append(flag)
        if layer == 0:
            self.centers[M - 1] = cen[0]
            cen = cen[1:]
        self.centers[mem] = cen
        self.prev = flag


def codec_from_embedded(chunks: Sequence[Chunk], first: ChunkHeader) -> CodecTables:
    """Codec tables (and float32 centers, NaN for nodes not sent) rebuilt from the embedded sections of a stream.

    Args:
        chunks: parsed chunks, layers ``0..n-1`` of one stream (already checked by
            :func:`~.chunk.check_sequence`).
        first: layer 0's header.

    Raises:
        BitstreamError: a chunk without embedded section, or a section that does
            not describe a valid layer of a valid tree.
    """
    K, D = first.num_leaves, first.dim
    tree = _Tree(K, D)
    for layer, c in enumerate(chunks):
        what = f"chunk {layer}"
        tree.add_layer(layer, *_read_section(c, layer, K, D, what), what)
    return CodecTables(
        num_leaves=K,
        dim=D,
        model_layers=first.model_layers,
        left=tree.left,
        right=tree.right,
        q_right=tree.q_right,
        opened_layer=tree.opened_layer,
        group_start=tree.group_start,
        group_size=tree.group_size,
        members=tree.members,
        is_member=tree.is_member,
        centers=torch.from_numpy(tree.centers),
        fingerprint=None,
    )

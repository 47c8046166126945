"""Per-layer byte streams for scalable VQ: fixed-length or entropy-coded, robust against corrupt input.

A stream is a list of *chunks*, one per layer: ``chunks[l]`` carries the layer-``l``
symbols of every vector that sends one. A receiver decodes any prefix
``chunks[:n]``. A gap, a wrong order, a duplicated layer, a chunk of another
model or of another stream, and any corrupted byte raise :class:`BitstreamError`
(a ``ValueError``) instead of giving a wrong picture. The byte layout is written
down in ``docs/bitstream.md``.

The decoder knows, from the previous layers, the node ``p`` every vector sits on,
hence whether it sends a symbol in layer ``l`` and its group size ``g``. Payload
codings of a layer:

* ``"raw"``: each active vector's symbol in ``ceil(log2 g)`` bits, MSB first, in
  vector order, zero-padded to a whole byte.
* ``"entropy"`` (default): the symbol is coded as its path of left/right
  decisions from ``p`` down to its layer-``l`` node. The probability of going
  right at node ``u`` is ``count(right) / count(u)`` from the tree's node counts,
  quantized to 16 bits (:func:`branch_prob_q16`), so encoder, decoder and a
  self-contained receiver use bit-identical models and no probabilities are sent.
  Decisions are grouped in *steps* of ``k`` tree levels (``k`` is stored in the
  chunk, 1..8, by default ``min(3, deepest path of the layer)``): one step is one
  categorical symbol over the ``2**k`` ways down ``k`` levels (a path that reaches
  the layer node early is padded with "left" decisions of probability 1, the
  other patterns have probability 0), whose probability is the product of the
  branch probabilities on the way, i.e. exactly the binary path model
  (``k = 1`` is plain binary coding with Bernoulli decisions). Symbols go in
  *depth-major* order through constriction's ANS coder: all first steps of the
  layer in vector order, then the second steps of the vectors still descending,
  and so on; both sides loop only over steps, never over vectors or clusters.
  The cost of a symbol is ``log2 P(p) - log2 P(node)`` under the quantized
  probabilities (cf. :func:`svq_modules.layers.node_log2_prob`).

Self-contained mode (``embed_centers="float16" | "float32"``): each chunk also
carries what a receiver *without the model* needs for its layer, in global node
ids: the internal nodes the layer opens (id, both children, 16-bit branch
probability) and the centers of the layer's nodes (layer 0 also the root's).
From these the receiver rebuilds the groups, the symbol numbering (rank of the
node id inside its group) and the entropy model exactly as the model gives them.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy
from ..layers import LayerTables
from ..tree import node_depth, scan_to_marked

__all__ = [
    "BitstreamError",
    "ChunkHeader",
    "Decoded",
    "CODINGS",
    "EMBED_DTYPES",
    "FORMAT_VERSION",
    "MAGIC",
    "PROB_BITS",
    "MAX_STEP",
    "branch_prob_q16",
    "compress_layers",
    "decompress_layers",
    "model_fingerprint",
    "read_header",
]

MAGIC = b"SVQL"
FORMAT_VERSION = 1
CODINGS = ("raw", "entropy")
EMBED_DTYPES: dict[str | None, int] = {None: 0, "float16": 1, "float32": 2}
_EMBED_NAMES = {v: k for k, v in EMBED_DTYPES.items()}
_EMBED_NUMPY = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
# branch probabilities are q / 2**PROB_BITS with q in [1, 2**PROB_BITS - 1]
PROB_BITS = 16
_PROB_ONE = 1 << PROB_BITS
# tree levels per entropy-coded step: 1..MAX_STEP in a chunk, AUTO_STEP at most by default
MAX_STEP = 8
_AUTO_STEP = 3
# rows per constriction call (bounds the [rows, 2**k] probability block in memory)
_BLOCK_ROWS = 1 << 18

# magic, version, coding, embed, ndim, layer, stream_layers, model_layers, step,
# fingerprint, num_vectors, num_symbols, dim, num_leaves, link, reserved, embed_len, payload_len
_HEADER = struct.Struct("<4sBBBBHHHH8sQQIIIIQQ")
_CRC = struct.Struct("<I")
_DIM = struct.Struct("<Q")
_MIN_CHUNK = _HEADER.size + _CRC.size
_MAX_NDIM = 32
_MAX_VECTORS = 1 << 48
_MAX_LAYERS = 0xFFFF
_EMBED_HEAD = struct.Struct("<II")  # opened internal nodes E, layer nodes G
_EMBED_NODE_BYTES = 14  # u32 id, u32 left, u32 right, u16 probability
_FP_DOMAIN = b"svq-modules/bitstream/fingerprint/v1"


class BitstreamError(ValueError):
    """A chunk or ``.svq`` file is corrupt, truncated, out of order, or belongs to another model or stream."""


class ChunkHeader(NamedTuple):
    """Parsed header of one layer chunk (see ``docs/bitstream.md``)."""

    version: int
    coding: str  # "raw" | "entropy"
    embed: str | None  # None | "float16" | "float32"
    step: int  # entropy coding: tree levels per coded step (1..8); raw: 0
    layer: int
    stream_layers: int  # layers the sender produced (the stream is layers 0..stream_layers-1)
    model_layers: int  # L of the model
    fingerprint: bytes  # 8 bytes, see model_fingerprint
    num_vectors: int  # N
    num_symbols: int  # vectors that send a symbol in this layer
    dim: int  # D
    num_leaves: int  # K
    link: int  # CRC32 of the previous layer's chunk (0 for layer 0)
    batch_shape: tuple[int, ...] | None  # layer 0 only
    crc: int  # this chunk's CRC32
    embed_len: int
    payload_len: int


class Decoded(NamedTuple):
    """Result of :func:`decompress_layers`.

    Attributes:
        nodes: ``[n, N]`` int64, tree node of every vector after each decoded layer.
        centers: ``[M, D]`` float center of every node: the model's, or for a
            self-contained stream decoded without the model the embedded centers
            (float32; NaN rows for nodes not sent).
        batch_shape: shape of the indices the stream was made from.
        stream_layers: number of layers the sender produced.
    """

    nodes: Tensor
    centers: Tensor
    batch_shape: tuple[int, ...]
    stream_layers: int

    @property
    def num_layers(self) -> int:
        """Decoded layers n."""
        return self.nodes.shape[0]

    def reconstruction(self, num_layers: int | None = None) -> Tensor:
        """``[*batch_shape, D]`` reconstruction after the first ``num_layers`` decoded layers (default all)."""
        n = self.num_layers if num_layers is None else num_layers
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_layers:
            raise ValueError(f"num_layers must be an int in [1, {self.num_layers}], got {num_layers!r}")
        rows = self.nodes[n - 1].to(self.centers.device)
        return self.centers[rows].reshape(*self.batch_shape, self.centers.shape[1])


# ---------------------------------------------------------------------------------------------
# model tables


def branch_prob_q16(hierarchy: Hierarchy) -> Tensor:
    """Quantized probability of the *right* child of every node: ``[M]`` int64 in ``[1, 65535]`` (0 at leaves).

    ``round(65536 * count(right) / (count(left) + count(right)))`` from the counts
    rounded to float32 (so it depends neither on the module's float dtype nor on
    its device); 32768 where a node holds no data.
    """
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    q = torch.zeros(num_nodes, dtype=torch.int64)
    if num_leaves == 1:
        return q
    count = _np(hierarchy.count).astype(np.float32).astype(np.float64)
    children = _np(hierarchy.children).astype(np.intp)
    c_left, c_right = count[children[:, 0]], count[children[:, 1]]
    total = c_left + c_right
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = np.isfinite(total) & (total > 0) & (c_left >= 0) & (c_right >= 0)
        p = np.where(ok, c_right / np.where(ok, total, 1.0), 0.5)
    q[num_leaves:] = torch.from_numpy(np.clip(np.round(p * _PROB_ONE), 1, _PROB_ONE - 1).astype(np.int64))
    return q


def _np(t: Tensor) -> np.ndarray:
    """A CPU numpy view/copy of a tensor (numpy does the dtype conversions: much cheaper than torch's on busy CPUs)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _canonical_bytes(t: Tensor) -> bytes:
    a = _np(t)
    if t.is_floating_point():
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    return np.ascontiguousarray(a, dtype="<i8").tobytes()


def model_fingerprint(hierarchy: Hierarchy, tables: LayerTables) -> bytes:
    """8-byte fingerprint of a model: BLAKE2b-64 over every hierarchy and layer-table field.

    Each field contributes its name, shape and bytes in a canonical form
    (integers as little-endian int64, floats as little-endian float32), so the
    fingerprint survives ``state_dict`` reloading, ``.to(device)`` and float64
    copies of a float32 model.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(_FP_DOMAIN)
    for prefix, obj in (("tree.", hierarchy), ("layers.", tables)):
        for name, t in obj.as_dict().items():
            h.update(f"{prefix}{name}:{list(t.shape)};".encode())
            h.update(_canonical_bytes(t))
    return h.digest()


def _ceil_log2(g: np.ndarray) -> np.ndarray:
    """``ceil(log2 g)`` elementwise (0 for g <= 1), exact for int64: intp array."""
    g = np.asarray(g, dtype=np.int64)
    out = np.zeros(g.shape, dtype=np.intp)
    m = g > 1
    if m.any():
        v = g[m] - 1
        bits = np.zeros(v.shape, dtype=np.intp)
        for s in (32, 16, 8, 4, 2, 1):
            big = v >= (np.int64(1) << s)
            bits += big * s
            v = np.where(big, v >> s, v)
        out[m] = bits + (v > 0)
    return out


@dataclass
class _Codec:
    """Numpy tables the coders walk on (global node ids; layers ``0..len(members)-1`` known)."""

    num_leaves: int
    dim: int
    model_layers: int
    left: np.ndarray  # [M] intp, -1 at leaves / unknown nodes
    right: np.ndarray  # [M] intp
    q_right: np.ndarray  # [M] int64, 16-bit probability of the right child (0 where unknown)
    opened_layer: np.ndarray  # [M] int64, layer that splits each internal node (-1: none / unknown)
    group_start: list[np.ndarray]  # per layer [M] intp
    group_size: list[np.ndarray]  # per layer [M] intp
    members: list[np.ndarray]  # per layer [G_l] intp, the layer's new nodes ordered by (group, symbol)
    is_member: list[np.ndarray]  # per layer [M] bool
    centers: Tensor | None  # [M, D]; None in cached model codecs (the caller's hierarchy gives them)
    fingerprint: bytes | None
    _steps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _widths: dict[int, np.ndarray] = field(default_factory=dict)
    # encoder-only, model codecs: leaf tables and tree facts
    leaf_node: np.ndarray | None = None  # [L, K] intp
    leaf_symbol: np.ndarray | None = None  # [L, K] int64
    low: np.ndarray | None = None  # [M] int64, see _dfs_low
    depth: np.ndarray | None = None  # [M] int64
    _leaf_steps: dict[tuple[int, int], tuple[list[np.ndarray], list[np.ndarray], np.ndarray]] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.left.shape[0]

    @property
    def root(self) -> int:
        return self.num_nodes - 1

    def width(self, layer: int) -> np.ndarray:
        """Raw bits of a layer-``layer`` symbol sent from each node: ``ceil(log2 g)``, ``[M]`` intp."""
        if layer not in self._widths:
            self._widths[layer] = _ceil_log2(self.group_size[layer])
        return self._widths[layer]

    def step_tables(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Outcomes of a ``k``-level step from every node: ``dest [M, 2**k]`` intp (-1 = impossible), ``prob [M, 2**k]`` float32.

        Column ``j`` is the pattern of ``k`` decisions (MSB first, 1 = right)
        taken from node ``u`` inside the subtree ``u``'s layer opens; a walk that
        reaches a node the layer does not open stops there and only all-left
        padding is possible. ``prob`` is the product of the 16-bit branch
        probabilities on the way (computed in float64 in a fixed order, so the
        decoder and a self-contained receiver get bit-identical rows).
        """
        if k not in self._steps:
            M, C = self.num_nodes, 1 << k
            own = self.opened_layer
            cur = np.repeat(np.arange(M, dtype=np.intp)[:, None], C, axis=1)
            prob = np.ones((M, C), dtype=np.float64)
            valid = np.ones((M, C), dtype=bool)
            p_right = self.q_right.astype(np.float64) / _PROB_ONE
            cols = np.arange(C)
            for level in range(k):
                bit = ((cols >> (k - 1 - level)) & 1).astype(bool)[None, :]
                moving = (self.opened_layer[cur] == own[:, None]) & (own[:, None] >= 0)
                valid &= ~(~moving & bit)
                pr = p_right[cur]
                prob = np.where(moving, prob * np.where(bit, pr, 1.0 - pr), prob)
                cur = np.where(moving, np.where(bit, self.right[cur], self.left[cur]), cur)
            dest = np.where(valid & (own[:, None] >= 0), cur, -1)
            self._steps[k] = (dest, np.where(dest >= 0, prob, 0.0).astype(np.float32))
        return self._steps[k]


def _check_model(hierarchy: Hierarchy, tables: LayerTables) -> None:
    if not isinstance(hierarchy, Hierarchy):
        raise ValueError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
    if not isinstance(tables, LayerTables):
        raise ValueError(f"tables must be LayerTables, got {type(tables).__name__}")
    if tables.num_leaves != hierarchy.num_leaves or tables.group_size.shape[1] != hierarchy.num_nodes:
        raise ValueError(
            f"tables are for {tables.num_leaves} leaves / {tables.group_size.shape[1]} nodes but the hierarchy "
            f"has {hierarchy.num_leaves} / {hierarchy.num_nodes}"
        )
    if not 1 <= tables.num_layers <= _MAX_LAYERS:
        raise ValueError(f"tables have {tables.num_layers} layers; the format supports 1..{_MAX_LAYERS}")
    if hierarchy.dim >= 1 << 32 or hierarchy.num_leaves >= 1 << 31:
        raise ValueError("dimension or codebook size too large for the format")


def _opened_layer(hierarchy: Hierarchy, tables: LayerTables) -> np.ndarray:
    """Layer that splits each internal node: ``[M]`` int64, -1 for leaves (and nodes no layer opens)."""
    parent = hierarchy.parent.detach().cpu().long()
    K, M = hierarchy.num_leaves, hierarchy.num_nodes
    internal = torch.arange(M) >= K
    leaf_node = tables.leaf_node.detach().cpu().long()
    out = torch.full((M,), -1, dtype=torch.long)
    prev = torch.zeros(M, dtype=torch.bool)
    prev[M - 1] = True
    _, below_prev, _ = scan_to_marked(parent, prev)
    for layer in range(tables.num_layers):
        cur = torch.zeros(M, dtype=torch.bool)
        cur[leaf_node[layer]] = True
        _, below_cur, _ = scan_to_marked(parent, cur)
        out[internal & below_prev & ~below_cur] = layer
        prev, below_prev = cur, below_cur
    return out.numpy()


_CACHE: OrderedDict[bytes, _Codec] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def _prepare(hierarchy: Hierarchy, tables: LayerTables) -> _Codec:
    """Codec tables of a model (CPU numpy), cached by model fingerprint.

    The cached tables are derived from the fingerprinted content only; the
    centers always come from the ``hierarchy`` given to this call.
    """
    _check_model(hierarchy, tables)
    fp = model_fingerprint(hierarchy, tables)
    with _CACHE_LOCK:
        codec = _CACHE.get(fp)
        if codec is not None:
            _CACHE.move_to_end(fp)
    if codec is None:
        codec = _build_codec(hierarchy, tables, fp)
        with _CACHE_LOCK:
            _CACHE[fp] = codec
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return codec


def _build_codec(hierarchy: Hierarchy, tables: LayerTables, fp: bytes) -> _Codec:
    K, M = hierarchy.num_leaves, hierarchy.num_nodes
    children = hierarchy.children.detach().cpu().long().numpy().astype(np.intp)
    left = np.full(M, -1, dtype=np.intp)
    right = np.full(M, -1, dtype=np.intp)
    left[K:], right[K:] = children[:, 0], children[:, 1]
    gs = tables.group_start.detach().cpu().long().numpy().astype(np.intp)
    gz = tables.group_size.detach().cpu().long().numpy().astype(np.intp)
    mem = tables.members.detach().cpu().long().numpy().astype(np.intp)
    members, is_member = [], []
    for layer in range(tables.num_layers):
        m = mem[layer][mem[layer] >= 0]
        members.append(m)
        flag = np.zeros(M, dtype=bool)
        flag[m] = True
        is_member.append(flag)
    return _Codec(
        num_leaves=K,
        dim=hierarchy.dim,
        model_layers=tables.num_layers,
        left=left,
        right=right,
        q_right=branch_prob_q16(hierarchy).numpy(),
        opened_layer=_opened_layer(hierarchy, tables),
        group_start=list(gs),
        group_size=list(gz),
        members=members,
        is_member=is_member,
        centers=None,
        fingerprint=fp,
        leaf_node=tables.leaf_node.detach().cpu().long().numpy().astype(np.intp),
        leaf_symbol=tables.leaf_symbol.detach().cpu().long().numpy(),
        low=_dfs_low(hierarchy),
        depth=node_depth(hierarchy.parent.detach().cpu().long()).numpy() if K > 1 else np.zeros(1, dtype=np.int64),
    )


def _dfs_low(hierarchy: Hierarchy) -> np.ndarray:
    """Rank of each node's first leaf in left-to-right leaf order: ``[M]`` int64.

    For ``v`` below ``u``: ``v`` is in the right subtree of ``u`` iff
    ``low[v] >= low[right(u)]``, which is how the encoder picks each decision.
    """
    K = hierarchy.num_leaves
    parent = hierarchy.parent.detach().cpu().long()
    if K == 1:
        return np.zeros(1, dtype=np.int64)
    children = hierarchy.children.detach().cpu().long()
    size = hierarchy.size.detach().cpu().to(torch.float64)
    step = torch.zeros(parent.shape[0], dtype=torch.float64)
    step[children[:, 1]] = size[children[:, 0]]  # a right child starts after its left sibling's leaves
    _, _, low = scan_to_marked(parent, parent < 0, step, torch.add, 0.0)
    return low.round().long().numpy()


# ---------------------------------------------------------------------------------------------
# payload coders


def _categorical():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def _pack_raw(symbols: np.ndarray, widths: np.ndarray) -> bytes:
    """``symbols [S]`` int64 in ``widths [S]`` bits each -> MSB-first bit string, zero-padded to bytes."""
    if symbols.size == 0:
        return b""
    maxw, minw = int(widths.max()), int(widths.min())
    if maxw == 0:
        return b""
    if maxw == minw:  # one width for the whole layer: a [S, w] bit matrix
        shifts = np.arange(maxw - 1, -1, -1, dtype=np.int64)
        bits = ((symbols[:, None] >> shifts) & 1).astype(np.uint8)
        return np.packbits(bits.reshape(-1)).tobytes()
    start = np.cumsum(widths) - widths
    bits = np.zeros(int(widths.sum()), dtype=np.uint8)
    for j in range(maxw):  # j-th bit (MSB first) of every symbol at least j+1 bits wide
        sel = np.flatnonzero(widths > j)
        bits[start[sel] + j] = (symbols[sel] >> (widths[sel] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def _unpack_raw(payload: memoryview, widths: np.ndarray, what: str) -> np.ndarray:
    """Inverse of :func:`_pack_raw`: ``[S]`` int64 symbols; checks the length and the zero padding."""
    total = int(widths.sum())
    expected = (total + 7) // 8
    if len(payload) != expected:
        raise BitstreamError(f"{what}: raw payload has {len(payload)} bytes, expected {expected} ({total} symbol bits)")
    if total == 0:
        return np.zeros(widths.shape[0], dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if bits[total:].any():
        raise BitstreamError(f"{what}: nonzero padding bits after the last raw symbol")
    maxw, minw = int(widths.max()), int(widths.min())
    if maxw == minw:
        mat = bits[:total].reshape(-1, maxw)
        symbols = mat[:, 0].astype(np.int64)
        for j in range(1, maxw):
            symbols = (symbols << 1) | mat[:, j]
        return symbols
    start = np.cumsum(widths) - widths
    symbols = np.zeros(widths.shape[0], dtype=np.int64)
    for j in range(maxw):
        sel = np.flatnonzero(widths > j)
        symbols[sel] = (symbols[sel] << 1) | bits[start[sel] + j]
    return symbols


def _start_of_leaf(codec: _Codec, layer: int) -> np.ndarray:
    """Node each leaf's vectors sit on before layer ``layer``: ``[K]`` intp."""
    if layer == 0:
        return np.full(codec.num_leaves, codec.root, dtype=np.intp)
    return codec.leaf_node[layer - 1]


def _auto_step(codec: _Codec, layer: int) -> int:
    """``min(3, deepest path of the layer)``, at least 1."""
    sends = codec.leaf_symbol[layer] >= 0
    if not sends.any():
        return 1
    start, target = _start_of_leaf(codec, layer)[sends], codec.leaf_node[layer][sends]
    deepest = int((codec.depth[target] - codec.depth[start]).max())
    return max(1, min(_AUTO_STEP, deepest))


def _leaf_steps(codec: _Codec, layer: int, k: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Step symbols of every leaf's vectors in a layer (cached).

    Returns:
        ``symbol[s] [K]`` int32 (the ``k``-bit decision pattern of step ``s``),
        ``node[s] [K]`` intp (node step ``s`` starts from), ``steps [K]`` intp.
    """
    key = (layer, k)
    if key in codec._leaf_steps:
        return codec._leaf_steps[key]
    K = codec.num_leaves
    is_member, low = codec.is_member[layer], codec.low
    lv = np.flatnonzero(codec.leaf_symbol[layer] >= 0)
    cur, tgt = _start_of_leaf(codec, layer)[lv], low[codec.leaf_node[layer][lv]]
    symbols, nodes = [], []
    steps = np.zeros(K, dtype=np.intp)
    while lv.size:
        if len(symbols) > codec.num_nodes:
            raise RuntimeError("layer tables are inconsistent: a path does not reach its layer node")
        node_s = np.full(K, -1, dtype=np.intp)
        node_s[lv] = cur
        code = np.zeros(lv.size, dtype=np.int64)
        for _ in range(k):
            moving = ~is_member[cur]
            r = np.where(moving, codec.right[cur], cur)
            bit = moving & (tgt >= low[r])
            code = (code << 1) | bit
            cur = np.where(moving, np.where(bit, r, codec.left[cur]), cur)
        sym_s = np.zeros(K, dtype=np.int32)
        sym_s[lv] = code
        symbols.append(sym_s)
        nodes.append(node_s)
        steps[lv] += 1
        keep = ~is_member[cur]
        lv, cur, tgt = lv[keep], cur[keep], tgt[keep]
    codec._leaf_steps[key] = (symbols, nodes, steps)
    return codec._leaf_steps[key]


def _encode_steps(
    codec: _Codec, k: int, leaves: np.ndarray, symbols: list[np.ndarray], nodes: list[np.ndarray], steps: np.ndarray
) -> bytes:
    """ANS-code the steps of the active vectors (``leaves [S]`` = their codewords, in vector order)."""
    import constriction

    if leaves.size == 0:
        return b""
    _, prob = codec.step_tables(k)
    model = _categorical()
    selections = [leaves]
    for s in range(1, len(symbols)):
        prev = selections[-1]
        selections.append(prev[steps[prev] > s])
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: push the last step's last block first so that the decoder pops in order
    for s in reversed(range(len(symbols))):
        sel = selections[s]
        for b in reversed(range(0, sel.size, _BLOCK_ROWS)):
            blk = sel[b : b + _BLOCK_ROWS]
            coder.encode_reverse(symbols[s][blk], model, np.take(prob, nodes[s][blk], axis=0))
    return coder.get_compressed().astype("<u4", copy=False).tobytes()


def _decode_steps(codec: _Codec, layer: int, k: int, start: np.ndarray, payload: memoryview, what: str) -> np.ndarray:
    """Inverse of :func:`_encode_steps`: the layer node reached from every start node, ``[S]`` intp."""
    import constriction

    if len(payload) % 4:
        raise BitstreamError(f"{what}: entropy payload has {len(payload)} bytes, not whole 32-bit words")
    out = np.empty(start.shape[0], dtype=np.intp)
    if start.size == 0:
        if len(payload):
            raise BitstreamError(f"{what}: {len(payload)} payload bytes but no vector sends a symbol in this layer")
        return out
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
    except Exception as e:  # e.g. a trailing zero word
        raise BitstreamError(f"{what}: invalid entropy-coded payload ({e})") from None
    dest_tab, prob = codec.step_tables(k)
    dest_flat = dest_tab.reshape(-1)
    cols = dest_tab.shape[1]
    model = _categorical()
    is_member = codec.is_member[layer]
    if not (codec.opened_layer[start] == layer).all():
        raise BitstreamError(f"{what}: a vector's group is not split by this layer (inconsistent model data)")
    cur, pos = start, np.arange(start.shape[0])
    rounds = 0
    while cur.size:
        rounds += 1
        if rounds > codec.num_nodes:
            raise BitstreamError(f"{what}: decoded path longer than the tree is deep")
        try:
            parts = [
                coder.decode(model, np.take(prob, cur[b : b + _BLOCK_ROWS], axis=0)) for b in range(0, cur.size, _BLOCK_ROWS)
            ]
        except Exception as e:
            raise BitstreamError(f"{what}: entropy decoder failed ({e})") from None
        j = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if int(j.max()) >= cols or int(j.min()) < 0:
            raise BitstreamError(f"{what}: entropy decoder returned an out-of-range step symbol")
        nxt = dest_flat[cur * cols + j]
        if int(nxt.min()) < 0:
            raise BitstreamError(f"{what}: decoded an impossible path (corrupt entropy-coded data)")
        done = is_member[nxt]
        if done.all():
            out[pos] = nxt
            break
        out[pos[done]] = nxt[done]
        keep = ~done
        cur, pos = nxt[keep], pos[keep]
    if not coder.is_empty():
        raise BitstreamError(f"{what}: entropy-coded payload not consumed exactly (corrupt or truncated data)")
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _flatten_indices(indices: Tensor | np.ndarray, num_leaves: int) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(indices, np.ndarray):
        indices = torch.from_numpy(indices)
    if not torch.is_tensor(indices):
        raise ValueError(f"indices must be an integer tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() > _MAX_NDIM:
        raise ValueError(f"indices have {indices.dim()} dimensions; the format supports at most {_MAX_NDIM}")
    shape = tuple(int(s) for s in indices.shape)
    flat = indices.detach().reshape(-1).cpu().long().numpy().astype(np.intp, copy=False)
    if flat.size >= _MAX_VECTORS:
        raise ValueError(f"{flat.size} vectors: the format supports fewer than 2**48")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= num_leaves):
        raise ValueError(
            f"indices out of range: values in [{int(flat.min())}, {int(flat.max())}] but the codebook has {num_leaves} codes"
        )
    return flat, shape


def _embed_section(codec: _Codec, centers: np.ndarray, layer: int, dtype: np.dtype) -> bytes:
    """Self-contained data of one layer: split nodes (id, children, probability) and layer-node centers."""
    opened = np.flatnonzero(codec.opened_layer == layer)
    members = codec.members[layer]
    rows = members if layer > 0 else np.concatenate([[codec.root], members]).astype(np.intp)
    centers = centers[rows].astype(dtype)
    return b"".join(
        [
            _EMBED_HEAD.pack(opened.shape[0], members.shape[0]),
            opened.astype("<u4").tobytes(),
            codec.left[opened].astype("<u4").tobytes(),
            codec.right[opened].astype("<u4").tobytes(),
            codec.q_right[opened].astype("<u2").tobytes(),
            centers.tobytes(),
        ]
    )


def compress_layers(
    hierarchy: Hierarchy,
    tables: LayerTables,
    indices: Tensor | np.ndarray,
    *,
    coding: str = "entropy",
    num_layers: int | None = None,
    embed_centers: str | None = None,
    entropy_step: int | None = None,
) -> list[bytes]:
    """Per-layer chunks of codeword indices.

    Args:
        hierarchy: the model's merge tree.
        tables: its layer tables (``L`` layers).
        indices: ``[*batch]`` int codeword indices (``N`` elements); the batch
            shape is stored in chunk 0 and given back by the decoder.
        coding: ``"entropy"`` (default) or ``"raw"``.
        num_layers: produce layers ``0..num_layers-1`` (default all ``L``).
        embed_centers: ``None``, ``"float16"`` or ``"float32"``: self-contained
            chunks that also carry their layer's tree structure and node centers.
        entropy_step: tree levels per entropy-coded step, 1..8 (default
            ``min(3, deepest path of the layer)``); 1 = one Bernoulli decision per step.

    Returns:
        ``num_layers`` chunks; ``chunks[l]`` holds layer ``l``.

    Raises:
        ValueError: invalid arguments (out-of-range indices, unknown coding ...).
    """
    if coding not in CODINGS:
        raise ValueError(f"unknown coding {coding!r}; expected one of {CODINGS}")
    if embed_centers not in EMBED_DTYPES:
        raise ValueError(f"embed_centers must be one of {list(EMBED_DTYPES)}, got {embed_centers!r}")
    if entropy_step is not None and (
        isinstance(entropy_step, bool) or not isinstance(entropy_step, int) or not 1 <= entropy_step <= MAX_STEP
    ):
        raise ValueError(f"entropy_step must be None or an int in [1, {MAX_STEP}], got {entropy_step!r}")
    codec = _prepare(hierarchy, tables)
    L = tables.num_layers
    if num_layers is None:
        num_layers = L
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= L:
        raise ValueError(f"num_layers must be an int in [1, {L}], got {num_layers!r}")
    idx, shape = _flatten_indices(indices, codec.num_leaves)
    n = idx.shape[0]
    embed_code = EMBED_DTYPES[embed_centers]
    centers = _np(hierarchy.center) if embed_code else None

    chunks: list[bytes] = []
    link = 0
    for layer in range(num_layers):
        sym = codec.leaf_symbol[layer][idx]
        active = np.flatnonzero(sym >= 0)
        act_leaves = idx[active] if active.size < n else idx
        step = 0
        if coding == "raw":
            widths = codec.width(layer)[_start_of_leaf(codec, layer)[act_leaves]]
            payload = _pack_raw(sym[active] if active.size < n else sym, widths)
        else:
            step = entropy_step or _auto_step(codec, layer)
            symbols, nodes, steps = _leaf_steps(codec, layer, step)
            payload = _encode_steps(codec, step, act_leaves, symbols, nodes, steps)
        embed = _embed_section(codec, centers, layer, _EMBED_NUMPY[embed_code]) if embed_code else b""
        dims = b"".join(_DIM.pack(s) for s in shape) if layer == 0 else b""
        head = _HEADER.pack(
            MAGIC, FORMAT_VERSION, CODINGS.index(coding), embed_code, len(shape) if layer == 0 else 0,
            layer, num_layers, L, step, codec.fingerprint, n, active.size, hierarchy.dim,
            codec.num_leaves, link, 0, len(embed), len(payload),
        )  # fmt: skip
        body = b"".join([head, dims, embed, payload])
        link = zlib.crc32(body)
        chunks.append(body + _CRC.pack(link))
    return chunks


# ---------------------------------------------------------------------------------------------
# reading


class _Chunk(NamedTuple):
    header: ChunkHeader
    embed: memoryview
    payload: memoryview


def _as_bytes(data: Any, what: str) -> memoryview:
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, memoryview):
        try:
            return data if data.format == "B" and data.ndim == 1 else data.cast("B")
        except TypeError as e:
            raise BitstreamError(f"{what}: unsupported memoryview ({e})") from None
    raise BitstreamError(f"{what} must be bytes, got {type(data).__name__}")


def _parse(chunk: Any, what: str) -> _Chunk:
    """Check one chunk on its own: magic, CRC, header fields, lengths."""
    data = _as_bytes(chunk, what)
    if len(data) == 0:
        raise BitstreamError(f"{what} is empty (0 bytes)")
    if bytes(data[:4]) != MAGIC[: len(data[:4])]:
        raise BitstreamError(f"{what}: bad magic {bytes(data[:4])!r}, not a ScalableVQ layer chunk (expected {MAGIC!r})")
    if len(data) < _MIN_CHUNK:
        raise BitstreamError(f"{what}: truncated: {len(data)} bytes, shorter than the {_MIN_CHUNK}-byte header and CRC")
    (crc,) = _CRC.unpack_from(data, len(data) - 4)
    actual = zlib.crc32(data[:-4])
    if crc != actual:
        raise BitstreamError(
            f"{what}: CRC32 mismatch (stored {crc:#010x}, computed {actual:#010x}): corrupt or truncated chunk"
        )
    (
        _magic, version, coding, embed, ndim, layer, stream_layers, model_layers, step,
        fingerprint, num_vectors, num_symbols, dim, num_leaves, link, reserved, embed_len, payload_len,
    ) = _HEADER.unpack_from(data, 0)  # fmt: skip
    if version != FORMAT_VERSION:
        raise BitstreamError(f"{what}: unsupported format version {version} (this reader supports {FORMAT_VERSION})")
    if coding >= len(CODINGS):
        raise BitstreamError(f"{what}: unknown coding {coding} (expected 0 = raw or 1 = entropy)")
    if embed not in _EMBED_NAMES:
        raise BitstreamError(f"{what}: unknown embedded-center type {embed} (expected 0, 1 = float16 or 2 = float32)")
    if (coding == 0 and step != 0) or (coding == 1 and not 1 <= step <= MAX_STEP):
        raise BitstreamError(f"{what}: invalid entropy step {step} for coding {CODINGS[coding]!r}")
    if reserved:
        raise BitstreamError(f"{what}: reserved header field is {reserved}, expected 0")
    if not 1 <= stream_layers <= model_layers:
        raise BitstreamError(f"{what}: stream of {stream_layers} layers for a model of {model_layers}")
    if layer >= stream_layers:
        raise BitstreamError(f"{what}: layer index {layer} outside the stream's {stream_layers} layers")
    if layer > 0 and ndim:
        raise BitstreamError(f"{what}: layer {layer} carries a batch shape (only layer 0 does)")
    if ndim > _MAX_NDIM:
        raise BitstreamError(f"{what}: batch shape has {ndim} dimensions (at most {_MAX_NDIM})")
    if num_vectors >= _MAX_VECTORS:
        raise BitstreamError(f"{what}: implausible number of vectors {num_vectors}")
    if num_symbols > num_vectors:
        raise BitstreamError(f"{what}: {num_symbols} symbols for {num_vectors} vectors")
    if dim < 1 or not 1 <= num_leaves < 1 << 31:
        raise BitstreamError(f"{what}: invalid dimension {dim} or codebook size {num_leaves}")
    if layer == 0 and link != 0:
        raise BitstreamError(f"{what}: layer 0 links to a previous chunk ({link:#010x})")
    if (embed == 0) != (embed_len == 0):
        raise BitstreamError(f"{what}: embedded-center type {embed} but {embed_len} embedded bytes")
    expected = _HEADER.size + _DIM.size * ndim + embed_len + payload_len + _CRC.size
    if expected != len(data):
        raise BitstreamError(
            f"{what}: length {len(data)} bytes does not match its header (header {_HEADER.size} + shape "
            f"{_DIM.size * ndim} + embedded {embed_len} + payload {payload_len} + CRC 4 = {expected})"
        )
    offset = _HEADER.size
    shape = None
    if layer == 0:
        shape = tuple(_DIM.unpack_from(data, offset + _DIM.size * i)[0] for i in range(ndim))
        if math.prod(shape) != num_vectors:
            raise BitstreamError(f"{what}: batch shape {list(shape)} does not hold {num_vectors} vectors")
        offset += _DIM.size * ndim
    header = ChunkHeader(
        version=version,
        coding=CODINGS[coding],
        embed=_EMBED_NAMES[embed],
        step=step,
        layer=layer,
        stream_layers=stream_layers,
        model_layers=model_layers,
        fingerprint=bytes(fingerprint),
        num_vectors=num_vectors,
        num_symbols=num_symbols,
        dim=dim,
        num_leaves=num_leaves,
        link=link,
        batch_shape=shape,
        crc=crc,
        embed_len=embed_len,
        payload_len=payload_len,
    )
    return _Chunk(header, data[offset : offset + embed_len], data[offset + embed_len : offset + embed_len + payload_len])


def read_header(chunk: bytes) -> ChunkHeader:
    """Parse and check one chunk on its own (magic, CRC, field ranges, lengths).

    Raises:
        BitstreamError: not a valid layer chunk.
    """
    return _parse(chunk, "chunk").header


def _check_sequence(chunks: list[_Chunk]) -> ChunkHeader:
    """Chunks ``0..n-1`` must be layers ``0..n-1`` of one stream."""
    first = chunks[0].header
    prev_crc = 0
    for i, c in enumerate(chunks):
        h = c.header
        if h.layer != i:
            kind = "duplicated layer" if h.layer < i else "gap or wrong order"
            raise BitstreamError(f"chunk {i} is layer {h.layer}, expected layer {i} ({kind})")
        for name in ("fingerprint", "num_vectors", "dim", "num_leaves", "model_layers", "stream_layers"):
            if getattr(h, name) != getattr(first, name):
                raise BitstreamError(
                    f"chunk {i}: {name} {getattr(h, name)!r} differs from layer 0's {getattr(first, name)!r} "
                    "(chunks of different streams or models)"
                )
        if i > 0 and h.link != prev_crc:
            raise BitstreamError(
                f"chunk {i} does not continue the given layer {i - 1} (it links to CRC {h.link:#010x}, "
                f"the previous chunk has {prev_crc:#010x}): chunks of different streams"
            )
        prev_crc = h.crc
    return first


def _local_codec(chunks: list[_Chunk], first: ChunkHeader) -> _Codec:
    """Codec tables rebuilt from the embedded sections of a self-contained stream."""
    K, D = first.num_leaves, first.dim
    M = 2 * K - 1
    root = M - 1
    left = np.full(M, -1, dtype=np.intp)
    right = np.full(M, -1, dtype=np.intp)
    parent = np.full(M, -1, dtype=np.int64)
    q_right = np.zeros(M, dtype=np.int64)
    opened_layer = np.full(M, -1, dtype=np.int64)
    centers = np.full((M, D), np.nan, dtype=np.float32)
    prev = np.zeros(M, dtype=bool)
    prev[root] = True
    group_start, group_size, members_l, is_member_l = [], [], [], []
    for layer, c in enumerate(chunks):
        what = f"chunk {layer}"
        if c.header.embed is None:
            raise BitstreamError(
                f"{what} carries no embedded model data: decoding without the model needs a self-contained stream"
            )
        dtype = _EMBED_NUMPY[EMBED_DTYPES[c.header.embed]]
        emb = c.embed
        if len(emb) < _EMBED_HEAD.size:
            raise BitstreamError(f"{what}: embedded section of {len(emb)} bytes is too short")
        E, G = _EMBED_HEAD.unpack_from(emb, 0)
        if E >= M or G > M:
            raise BitstreamError(f"{what}: embedded section claims {E} split nodes / {G} layer nodes in a {M}-node tree")
        rows = G + (1 if layer == 0 else 0)
        expected = _EMBED_HEAD.size + _EMBED_NODE_BYTES * E + rows * D * dtype.itemsize
        if len(emb) != expected:
            raise BitstreamError(f"{what}: embedded section has {len(emb)} bytes, expected {expected}")
        o = _EMBED_HEAD.size
        node = np.frombuffer(emb, dtype="<u4", count=E, offset=o).astype(np.intp)
        lch = np.frombuffer(emb, dtype="<u4", count=E, offset=o + 4 * E).astype(np.intp)
        rch = np.frombuffer(emb, dtype="<u4", count=E, offset=o + 8 * E).astype(np.intp)
        q = np.frombuffer(emb, dtype="<u2", count=E, offset=o + 12 * E).astype(np.int64)
        cen = np.frombuffer(emb, dtype=dtype, count=rows * D, offset=o + 14 * E).reshape(rows, D)
        ch = np.concatenate([lch, rch])
        if E:
            if (node < K).any() or (node >= M).any() or (np.diff(node) <= 0).any():
                raise BitstreamError(f"{what}: embedded split nodes are not ascending internal node ids")
            if (opened_layer[node] >= 0).any():
                raise BitstreamError(f"{what}: embedded node split twice")
            if (lch >= node).any() or (rch >= node).any() or (lch == rch).any():
                raise BitstreamError(f"{what}: embedded children must be two nodes with smaller ids than their parent")
            if np.unique(ch).size != ch.size or (parent[ch] >= 0).any():
                raise BitstreamError(f"{what}: embedded node with two parents")
            if (q < 1).any() or (q >= _PROB_ONE).any():
                raise BitstreamError(f"{what}: embedded branch probability out of range")
        left[node], right[node], q_right[node] = lch, rch, q
        parent[lch], parent[rch] = node, node
        opened_layer[node] = layer
        opened = opened_layer == layer
        top = node[~prev[node]]
        if top.size and ((parent[top] < 0).any() or not opened[parent[top]].all()):
            raise BitstreamError(f"{what}: embedded subtree does not hang below a node of the previous layer")
        mem = ch[~opened[ch]]
        if mem.size != G:
            raise BitstreamError(f"{what}: embedded section lists {G} layer nodes but its subtrees have {mem.size}")
        anc, found, _ = scan_to_marked(torch.from_numpy(parent), torch.from_numpy(prev))
        anc, found = anc.numpy().astype(np.intp), found.numpy()
        grp = anc[mem]
        if mem.size and not found[mem].all():
            raise BitstreamError(f"{what}: embedded layer node not below a node of the previous layer")
        order = np.lexsort((mem, grp))
        mem, grp = mem[order], grp[order]
        start = np.zeros(M, dtype=np.intp)
        start[grp] = np.searchsorted(grp, grp)
        group_start.append(start)
        group_size.append(np.bincount(grp, minlength=M).astype(np.intp))
        members_l.append(mem)
        flag = np.zeros(M, dtype=bool)
        flag[mem] = True
        is_member_l.append(flag)
        if layer == 0:
            centers[root] = cen[0]
            cen = cen[1:]
        centers[mem] = cen
        prev = flag
    return _Codec(
        num_leaves=K,
        dim=D,
        model_layers=first.model_layers,
        left=left,
        right=right,
        q_right=q_right,
        opened_layer=opened_layer,
        group_start=group_start,
        group_size=group_size,
        members=members_l,
        is_member=is_member_l,
        centers=torch.from_numpy(centers),
        fingerprint=None,
    )


def decompress_layers(
    hierarchy: Hierarchy | None,
    tables: LayerTables | None,
    chunks: Sequence[bytes],
    *,
    num_layers: int | None = None,
) -> Decoded:
    """Decode a prefix of layers.

    Args:
        hierarchy, tables: the model the stream was made with; or both ``None``
            to decode a self-contained stream (made with ``embed_centers``).
        chunks: ``chunks[i]`` = layer ``i``, for ``i = 0..n-1`` (bytes-like).
        num_layers: decode only the first ``num_layers`` chunks (default all given).

    Returns:
        :class:`Decoded`; its ``nodes [n, N]`` equal
        ``decode_codes(tables, encode_indices(tables, idx)[:n])``.

    Raises:
        BitstreamError: no chunks, a corrupt or truncated chunk, a gap, wrong
            order or duplicate, chunks of another model or stream, invalid symbols.
    """
    if (hierarchy is None) != (tables is None):
        raise ValueError("give both hierarchy and tables, or neither (self-contained stream)")
    if isinstance(chunks, (bytes, bytearray, memoryview, str)):
        raise BitstreamError("chunks must be a sequence of per-layer byte strings, not a single bytes object")
    try:
        chunk_list = list(chunks)
    except TypeError:
        raise BitstreamError(f"chunks must be a sequence of bytes, got {type(chunks).__name__}") from None
    if not chunk_list:
        raise BitstreamError("no chunks given: need at least layer 0")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if num_layers > len(chunk_list):
            raise BitstreamError(f"num_layers={num_layers} but only {len(chunk_list)} chunks given")
        chunk_list = chunk_list[:num_layers]
    parsed = [_parse(c, f"chunk {i}") for i, c in enumerate(chunk_list)]
    first = _check_sequence(parsed)
    try:
        return _decode(hierarchy, tables, parsed, first)
    except (MemoryError, OverflowError) as e:
        raise BitstreamError(f"stream too large to decode ({type(e).__name__}: {e})") from None


def _decode(hierarchy: Hierarchy | None, tables: LayerTables | None, parsed: list[_Chunk], first: ChunkHeader) -> Decoded:
    if hierarchy is not None:
        codec = _prepare(hierarchy, tables)
        if first.fingerprint != codec.fingerprint:
            raise BitstreamError(
                f"model fingerprint mismatch: the stream was made with model {first.fingerprint.hex()}, "
                f"this model is {codec.fingerprint.hex()}"
            )
        if (first.num_leaves, first.dim, first.model_layers) != (codec.num_leaves, codec.dim, codec.model_layers):
            raise BitstreamError(
                f"stream is for K={first.num_leaves}, D={first.dim}, L={first.model_layers}; "
                f"the model has K={codec.num_leaves}, D={codec.dim}, L={codec.model_layers}"
            )
    else:
        codec = _local_codec(parsed, first)
    n = first.num_vectors
    nodes = np.empty((len(parsed), n), dtype=np.intp)
    state = np.full(n, codec.root, dtype=np.intp)
    for layer, c in enumerate(parsed):
        what = f"chunk {layer}"
        g = codec.group_size[layer][state]
        active = np.flatnonzero(g > 0)
        if active.size != c.header.num_symbols:
            raise BitstreamError(
                f"{what}: header says {c.header.num_symbols} symbols but {active.size} vectors send one in layer {layer}"
            )
        start = state[active]
        if c.header.coding == "raw":
            ga = g[active]
            sym = _unpack_raw(c.payload, codec.width(layer)[start], what)
            bad = sym >= ga
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise BitstreamError(
                    f"{what}: invalid symbol {int(sym[i])} of vector {int(active[i])}: its group has {int(ga[i])} nodes"
                )
            new = codec.members[layer][codec.group_start[layer][start] + sym]
        else:
            new = _decode_steps(codec, layer, c.header.step, start, c.payload, what)
        nodes[layer] = state
        nodes[layer, active] = new
        state = nodes[layer]
    return Decoded(
        nodes=torch.from_numpy(nodes.astype(np.int64, copy=False)),
        centers=hierarchy.center.detach() if hierarchy is not None else codec.centers,
        batch_shape=first.batch_shape if first.batch_shape is not None else (),
        stream_layers=first.stream_layers,
    )

"""Model tables of the coders: what the encoder and decoder derive from ``(Hierarchy, LayerTables)``.

* :func:`fingerprint_tensors` / :func:`model_fingerprint`: the 8-byte model
  fingerprint written in every chunk (and the one tensor-fingerprint function
  of the package);
* :func:`branch_prob_q16`: the 16-bit branch probabilities of the entropy coder;
* :class:`CodecTables`: numpy tables the payload coders walk on, built once per
  model by :func:`codec_tables` and cached by fingerprint (a receiver without
  the model builds the same tables from the embedded sections, see
  :mod:`.embedded`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy
from ..layers import LayerTables, check_tables
from ..tree import node_depth, scan_to_marked
from ..validation import check_int
from .chunk import MAX_LAYERS

__all__ = [
    "AUTO_STEP",
    "FINGERPRINT_DOMAIN",
    "PROB_BITS",
    "PROB_ONE",
    "CodecTables",
    "branch_prob_q16",
    "ceil_log2",
    "check_model",
    "codec_tables",
    "fingerprint_tensors",
    "model_fingerprint",
    "to_numpy",
]

#: branch probabilities are q / 2**PROB_BITS with q in [1, 2**PROB_BITS - 1]
PROB_BITS = 16
PROB_ONE = 1 << PROB_BITS
#: default tree levels per entropy-coded step: min(AUTO_STEP, deepest path of the layer)
AUTO_STEP = 3
#: domain string of :func:`model_fingerprint` (it carries the fingerprint's version)
FINGERPRINT_DOMAIN = b"svq-modules/bitstream/fingerprint/v1"


def to_numpy(t: Tensor) -> np.ndarray:
    """A CPU numpy view/copy of a tensor (numpy does the dtype conversions: much cheaper than torch's on busy CPUs)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def fingerprint_tensors(tensors: Mapping[str, Tensor], domain: bytes, *, digest_size: int = 8) -> bytes:
    """BLAKE2b digest of named tensors in a canonical form, independent of device and float dtype.

    Hashes ``domain``, then for each ``name, t`` in the mapping's order the text
    ``f"{name}:{list(t.shape)};"`` and the tensor's values: floating point
    (float16/bfloat16/float32/float64) as little-endian float32, integers and
    bools as little-endian int64. So the digest is the same on every device,
    after ``state_dict`` reloading and for a float64 copy of float32 tensors;
    a change of a name, a shape or a value (after rounding to float32) changes
    it, up to a ``2**(-8 * digest_size)`` chance of collision.

    Args:
        tensors: name -> tensor, e.g. a ``state_dict()`` (its order counts).
        domain: bytes naming what is fingerprinted and the version of that
            choice, e.g. :data:`FINGERPRINT_DOMAIN`.
        digest_size: bytes of the digest, 1..64.

    Returns:
        ``digest_size`` bytes.
    """
    if not isinstance(domain, (bytes, bytearray)):
        raise ValueError(f"domain must be bytes, got {type(domain).__name__}")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
    h = hashlib.blake2b(digest_size=check_int(digest_size, "digest_size", min=1, max=64))
    h.update(domain)
    for name, t in tensors.items():
        if not torch.is_tensor(t) or t.is_complex():
            raise ValueError(f"tensors[{name!r}] must be a real or integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        h.update(f"{name}:{list(t.shape)};".encode())
        a = to_numpy(t)
        h.update(np.ascontiguousarray(a, dtype="<f4" if t.is_floating_point() else "<i8").tobytes())
    return h.digest()


def model_fingerprint(hierarchy: Hierarchy, tables: LayerTables) -> bytes:
    """8-byte fingerprint of a model: :func:`fingerprint_tensors` of every hierarchy and layer-table field.

    The fields are named ``tree.<field>`` (``Hierarchy.as_dict()`` order) then
    ``layers.<field>`` (``LayerTables.as_dict()`` order), under
    :data:`FINGERPRINT_DOMAIN`. It survives ``state_dict`` reloading,
    ``.to(device)`` and float64 copies of a float32 model.
    """
    named = {f"tree.{k}": v for k, v in hierarchy.as_dict().items()}
    named.update({f"layers.{k}": v for k, v in tables.as_dict().items()})
    return fingerprint_tensors(named, FINGERPRINT_DOMAIN)


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
    count = to_numpy(hierarchy.count).astype(np.float32).astype(np.float64)
    children = to_numpy(hierarchy.children).astype(np.intp)
    c_left, c_right = count[children[:, 0]], count[children[:, 1]]
    total = c_left + c_right
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = np.isfinite(total) & (total > 0) & (c_left >= 0) & (c_right >= 0)
        p = np.where(ok, c_right / np.where(ok, total, 1.0), 0.5)
    q[num_leaves:] = torch.from_numpy(np.clip(np.round(p * PROB_ONE), 1, PROB_ONE - 1).astype(np.int64))
    return q


def ceil_log2(g: np.ndarray) -> np.ndarray:
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
class CodecTables:
    """Numpy tables the coders walk on (global node ids; layers ``0..len(members)-1`` known).

    Built from a model by :func:`codec_tables` (then ``centers`` is None and
    the encoder-only fields are set) or from embedded sections by
    :func:`svq_modules.coding.embedded.codec_from_embedded` (decoder only).
    """

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
    centers: Tensor | None  # [M, D]; None in model tables (the caller's hierarchy gives them)
    fingerprint: bytes | None
    # encoder-only (model tables): leaf tables and tree facts
    leaf_node: np.ndarray | None = None  # [L, K] intp
    leaf_symbol: np.ndarray | None = None  # [L, K] int64
    low: np.ndarray | None = None  # [M] int64, see _dfs_low
    depth: np.ndarray | None = None  # [M] int64
    _steps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _widths: dict[int, np.ndarray] = field(default_factory=dict)
    _member_weights: dict[int, np.ndarray] = field(default_factory=dict)
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
            self._widths[layer] = ceil_log2(self.group_size[layer])
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
            p_right = self.q_right.astype(np.float64) / PROB_ONE
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

    def member_weight(self, layer: int) -> np.ndarray:
        """Weight of every member of the layer's groups: ``[G_l]`` int64 in ``[1, 2**16]``, aligned with ``members[layer]``.

        ``round(2**16 * p)`` of the member's path probability ``p`` from its
        group's node: the product of the 16-bit branch probabilities on the
        way, in float64 from the member upwards (a fixed order, so a receiver
        with embedded tables gets the same weights). Used by context coding
        (:mod:`.context`).
        """
        if layer not in self._member_weights:
            members, size, first = self.members[layer], self.group_size[layer], self.group_start[layer]
            groups = np.flatnonzero(size > 0)
            owner = np.empty(members.size, dtype=np.intp)
            owner[_ranges(first[groups], size[groups])] = np.repeat(groups, size[groups])
            internal = np.flatnonzero(self.left >= 0)
            parent = np.full(self.num_nodes, -1, dtype=np.intp)
            parent[self.left[internal]], parent[self.right[internal]] = internal, internal
            is_right = np.zeros(self.num_nodes, dtype=bool)
            is_right[self.right[internal]] = True
            p_right = self.q_right.astype(np.float64) / PROB_ONE
            prob, cur = np.ones(members.size), members.copy()
            moving = np.flatnonzero(cur != owner)
            while moving.size:  # one round per tree level, vectorized over the members
                up = parent[cur[moving]]
                if int(up.min(initial=0)) < 0:
                    node = int(members[moving[np.argmin(up)]])
                    raise ValueError(f"inconsistent model tables: layer {layer} member node {node} is not below "
                                     f"its group's node")
                pr = p_right[up]
                prob[moving] *= np.where(is_right[cur[moving]], pr, 1.0 - pr)
                cur[moving] = up
                moving = moving[cur[moving] != owner[moving]]
            self._member_weights[layer] = np.clip(np.round(prob * PROB_ONE), 1, PROB_ONE).astype(np.int64)
        return self._member_weights[layer]

    # ------------------------------------------------------------------ encoder side (model tables only)

    def _need_model(self) -> None:
        if self.leaf_node is None:
            raise RuntimeError("these codec tables were rebuilt from embedded sections: they can decode, not encode")

    def start_of_leaf(self, layer: int) -> np.ndarray:
        """Node each leaf's vectors sit on before layer ``layer``: ``[K]`` intp."""
        self._need_model()
        if layer == 0:
            return np.full(self.num_leaves, self.root, dtype=np.intp)
        return self.leaf_node[layer - 1]

    def auto_step(self, layer: int) -> int:
        """Default entropy step of a layer: ``min(AUTO_STEP, deepest path of the layer)``, at least 1."""
        self._need_model()
        sends = self.leaf_symbol[layer] >= 0
        if not sends.any():
            return 1
        start, target = self.start_of_leaf(layer)[sends], self.leaf_node[layer][sends]
        deepest = int((self.depth[target] - self.depth[start]).max())
        return max(1, min(AUTO_STEP, deepest))

    def leaf_steps(self, layer: int, k: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Step symbols of every leaf's vectors in a layer (cached per ``(layer, k)``).

        Returns:
            ``symbol[s] [K]`` int32 (the ``k``-bit decision pattern of step ``s``),
            ``node[s] [K]`` intp (node step ``s`` starts from), ``steps [K]`` intp.
        """
        key = (layer, k)
        if key in self._leaf_steps:
            return self._leaf_steps[key]
        self._need_model()
        K = self.num_leaves
        is_member, low = self.is_member[layer], self.low
        lv = np.flatnonzero(self.leaf_symbol[layer] >= 0)
        cur, tgt = self.start_of_leaf(layer)[lv], low[self.leaf_node[layer][lv]]
        symbols, nodes = [], []
        steps = np.zeros(K, dtype=np.intp)
        while lv.size:  # one round per step (tree depth), vectorized over leaves
            if len(symbols) > self.num_nodes:
                raise RuntimeError("layer tables are inconsistent: a path does not reach its layer node")
            node_s = np.full(K, -1, dtype=np.intp)
            node_s[lv] = cur
            code = np.zeros(lv.size, dtype=np.int64)
            for _ in range(k):
                moving = ~is_member[cur]
                r = np.where(moving, self.right[cur], cur)
                bit = moving & (tgt >= low[r])
                code = (code << 1) | bit
                cur = np.where(moving, np.where(bit, r, self.left[cur]), cur)
            sym_s = np.zeros(K, dtype=np.int32)
            sym_s[lv] = code
            symbols.append(sym_s)
            nodes.append(node_s)
            steps[lv] += 1
            keep = ~is_member[cur]
            lv, cur, tgt = lv[keep], cur[keep], tgt[keep]
        self._leaf_steps[key] = (symbols, nodes, steps)
        return self._leaf_steps[key]


def _ranges(first: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``concat(arange(f, f + s) for f, s in zip(first, size))`` without a Python loop: intp."""
    total = int(size.sum())
    offset = np.repeat(np.cumsum(size) - size, size)
    return np.repeat(first, size) + np.arange(total) - offset


def check_model(hierarchy: Hierarchy, tables: LayerTables) -> None:
    """Types and sizes of a model the format can carry; one-line ``ValueError`` otherwise."""
    check_tables(hierarchy, tables)
    if not 1 <= tables.num_layers <= MAX_LAYERS:
        raise ValueError(f"tables have {tables.num_layers} layers; the format supports 1..{MAX_LAYERS}")
    if hierarchy.dim >= 1 << 32 or hierarchy.num_leaves >= 1 << 31:
        raise ValueError(
            f"dimension {hierarchy.dim} or codebook size {hierarchy.num_leaves} too large for the format (< 2**32, < 2**31)"
        )


_CACHE: OrderedDict[bytes, CodecTables] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def codec_tables(hierarchy: Hierarchy, tables: LayerTables) -> CodecTables:
    """Codec tables of a model (CPU numpy), cached by model fingerprint (the 4 most recent models).

    The cached tables are derived from the fingerprinted content only, so an
    in-place change of the model gives new tables; the centers always come from
    the ``hierarchy`` of the caller.
    """
    check_model(hierarchy, tables)
    fp = model_fingerprint(hierarchy, tables)
    with _CACHE_LOCK:
        codec = _CACHE.get(fp)
        if codec is not None:
            _CACHE.move_to_end(fp)
    if codec is None:
        codec = _build(hierarchy, tables, fp)
        with _CACHE_LOCK:
            _CACHE[fp] = codec
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return codec


def _build(hierarchy: Hierarchy, tables: LayerTables, fp: bytes) -> CodecTables:
    K, M = hierarchy.num_leaves, hierarchy.num_nodes
    children = to_numpy(hierarchy.children).astype(np.intp)
    left = np.full(M, -1, dtype=np.intp)
    right = np.full(M, -1, dtype=np.intp)
    left[K:], right[K:] = children[:, 0], children[:, 1]
    gs = to_numpy(tables.group_start).astype(np.intp)
    gz = to_numpy(tables.group_size).astype(np.intp)
    mem = to_numpy(tables.members).astype(np.intp)
    members = [mem[layer][mem[layer] >= 0] for layer in range(tables.num_layers)]
    is_member = []
    for m in members:
        flag = np.zeros(M, dtype=bool)
        flag[m] = True
        is_member.append(flag)
    parent = hierarchy.parent.detach().cpu().long()
    return CodecTables(
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
        leaf_node=to_numpy(tables.leaf_node).astype(np.intp),
        leaf_symbol=to_numpy(tables.leaf_symbol).astype(np.int64),
        low=_dfs_low(hierarchy),
        depth=node_depth(parent).numpy() if K > 1 else np.zeros(1, dtype=np.int64),
    )


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

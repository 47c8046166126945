"""Context coding of a layer: each symbol under its group's probabilities, sharpened by its decoded neighbours.

For indices laid out on a grid ``[*batch, H, W]`` (the latents of an image, a
feature map) neighbouring vectors often fall in the same cell. A vector's
symbol in layer ``l`` is, as in raw coding, the number of its layer-``l`` node
in the group of the node ``p`` it sits on before the layer; here it is coded
under

    P(c) ~ w(c) * (a if c == left else 1) * (b if c == top else 1)

* ``w(c)`` (:meth:`~svq_modules.coding.tables.CodecTables.member_weight`): the
  model's probability of member ``c`` of ``p``'s group, the product of the
  16-bit branch probabilities on its path (the data counts the model learned
  in training), quantized to 16 bits;
* ``left`` / ``top``: the symbol the vector on the left / above sent in this
  layer, when it sits on the same node ``p`` (else there is none);
* ``a``, ``b``: the layer's neighbour factors in eighths (1..255; 8 = no
  effect), chosen by the encoder for the indices it codes (the best of a grid
  of values by the model's code length) and sent as the payload's first two
  bytes.

The decoder needs a vector's left and upper neighbours first, so the symbols
are coded by anti-diagonal ``i + j`` of the grid (every batch item at once):
the decoder works in ``H + W - 1`` vectorized rounds, never per vector; a
grid of more than :data:`MAX_DIAGONALS` anti-diagonals (a long, thin one) is
not context coded (:func:`context_fits`). Every
probability is computed from integers in float64 (exact sums, one rounded
division), so both sides get bit-identical rows.

*Adaptive* context coding (``coding="adaptive"``) also learns from the image
itself: a symbol's row mixes the model above with how often each symbol
followed the same context (node ``p``, ``left``, ``top``) earlier in the layer,

    P(c) ~ n(c) * 2**16 + beta * q(c)

* ``q(c)``: the row above quantized to 16 bits (``round(2**16 P(c))``, at least
  1 for each member);
* ``n(c)``: how many vectors on earlier anti-diagonals of the layer had this
  context and sent ``c`` (the decoder counts them as it goes, one diagonal
  at a time);
* ``beta``: how much the model counts against the image's own counts, chosen
  by the encoder from :data:`_BETAS` and sent as the payload's third byte.

On the default run's images this codes the layers in about a quarter fewer
bits than the static rows (``bench/bench_codec.py``). The counts are a dense
table per layer (:func:`adaptive_fits`); a layer whose table would be larger
is context coded without adaptation. The byte layout is in ``docs/bitstream.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .chunk import BitstreamError
from .payload import categorical_model
from .tables import CodecTables

__all__ = [
    "FACTOR_ONE",
    "MAX_ADAPTIVE_ENTRIES",
    "MAX_DIAGONALS",
    "adaptive_fits",
    "context_fits",
    "decode_context",
    "encode_context",
    "encode_grid_layer",
    "grid_of",
]

#: neighbour factors are n / FACTOR_ONE with n in 1..255
FACTOR_ONE = 8
#: the factors the encoder tries per neighbour (in eighths)
_FACTORS = np.array([4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 255], dtype=np.int64)
#: symbols the encoder's choice of factors looks at, at most (evenly spaced in coding order)
_FIT_SYMBOLS = 1 << 16
#: entries of a [rows, group size] probability block (rows per constriction call = this / group size)
_BLOCK_ENTRIES = 1 << 22
#: anti-diagonals a context-coded grid may have at most, H + W - 1 (the decoder's rounds)
MAX_DIAGONALS = 8192
#: the adaptation strengths ``beta`` the adaptive encoder tries (the model's row counts as ``beta`` symbols)
_BETAS = (1, 2, 4, 8, 16, 32, 64)
#: entries of a layer's table of adaptive counts at most (nodes with a group x (G + 1)**2 contexts x G symbols)
MAX_ADAPTIVE_ENTRIES = 1 << 22
#: scale of the quantized model row and of a count in adaptive rows
_PRIOR_ONE = 1 << 16


def grid_of(batch_shape: Sequence[int]) -> tuple[int, int]:
    """``(H, W)``: the last two dimensions of a batch shape, the grid whose neighbours context coding uses.

    Raises:
        ValueError: fewer than two dimensions.
    """
    if len(batch_shape) < 2:
        raise ValueError(
            f"context coding needs indices laid out on a grid [..., H, W] (2 or more dimensions), got shape {list(batch_shape)}"
        )
    return int(batch_shape[-2]), int(batch_shape[-1])


def context_fits(batch_shape: Sequence[int]) -> bool:
    """Whether indices of this shape can be context coded: a grid (see :func:`grid_of`) of at most
    :data:`MAX_DIAGONALS` anti-diagonals (a longer, thinner grid would cost the decoder one round per diagonal)."""
    h, w = grid_of(batch_shape)
    return h + w - 1 <= MAX_DIAGONALS


def _coding_order(active: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active vectors in coding order (by anti-diagonal, then vector order), where each diagonal starts, and
    each one's anti-diagonal ``i + j`` (in that order)."""
    h, w = grid
    diagonal = (active // w) % h + active % w
    order = np.argsort(diagonal, kind="stable")
    starts = np.flatnonzero(np.diff(diagonal[order])) + 1
    return active[order], starts, diagonal[order]


def _neighbour_symbols(
    symbol: np.ndarray, node: np.ndarray, pos: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Left and upper neighbours' symbols of the vectors ``pos`` where they sit on the same node (else -1).

    Args:
        symbol: ``[N]`` int64 layer symbol of every vector (-1: none or not decoded yet).
        node: ``[N]`` intp node every vector sits on before the layer.
        pos: ``[S]`` intp vectors asked about.
    """
    h, w = grid
    out = []
    for ok, step in (((pos % w) > 0, 1), (((pos // w) % h) > 0, w)):
        nb = np.where(ok, pos - step, 0)
        out.append(np.where(ok & (node[nb] == node[pos]), symbol[nb], -1))
    return out[0], out[1]


def _row_blocks(codec: CodecTables, layer: int) -> tuple[int, int]:
    """``(width, block)``: the widest group of ``layer`` (entries per probability row) and the
    vectors coded per call, so that a call's rows hold about ``_BLOCK_ENTRIES`` entries."""
    width = int(codec.group_size[layer].max())
    return width, max(1, _BLOCK_ENTRIES // width)


def _rows(
    codec: CodecTables, layer: int, start: np.ndarray, left: np.ndarray, top: np.ndarray, factors: tuple[int, int],
    width: int,
) -> np.ndarray:
    """``[S, width]`` float64 symbol probabilities of vectors on nodes ``start`` with neighbour symbols ``left`` /
    ``top``; ``width``: the layer's largest group (one width per layer: the same rows on both sides)."""
    weight = codec.member_weight(layer)
    size, first = codec.group_size[layer][start], codec.group_start[layer][start]
    cols = np.arange(width)
    valid = cols < size[:, None]
    w = np.where(valid, weight[np.minimum(first[:, None] + cols, weight.size - 1)], 0).astype(np.float64)
    w *= np.where(cols == left[:, None], float(factors[0]), float(FACTOR_ONE))
    w *= np.where(cols == top[:, None], float(factors[1]), float(FACTOR_ONE))
    return w / w.sum(1, keepdims=True)


def _table_entries(codec: CodecTables, layer: int) -> int:
    """Entries of ``layer``'s table of adaptive counts: one row of ``G`` symbols per node with a group and left /
    upper neighbour symbol (``G`` the layer's largest group)."""
    width = int(codec.group_size[layer].max())
    return int((codec.group_size[layer] > 0).sum()) * (width + 1) ** 2 * width


def adaptive_fits(codec: CodecTables, layer: int) -> bool:
    """Whether ``layer`` can be coded adaptively: its table of counts has at most :data:`MAX_ADAPTIVE_ENTRIES`
    entries."""
    return _table_entries(codec, layer) <= MAX_ADAPTIVE_ENTRIES


def _group_ranks(codec: CodecTables, layer: int) -> np.ndarray:
    """``[M]`` int64 rank of every node among the layer's nodes with a group (the first axis of its counts)."""
    return np.cumsum(codec.group_size[layer] > 0) - 1


def _context_ids(rank: np.ndarray, start: np.ndarray, left: np.ndarray, top: np.ndarray, width: int) -> np.ndarray:
    """``[S]`` int64 context of each vector for the adaptive counts: its node's rank (:func:`_group_ranks`),
    then its left and upper neighbour symbols (-1: none)."""
    return (rank[start].astype(np.int64) * (width + 1) + left + 1) * (width + 1) + top + 1


def _quantized(rows: np.ndarray) -> np.ndarray:
    """The model's ``rows`` as int64 in 16 bits: ``round(2**16 p)`` (half to even), at least 1 where ``p > 0``."""
    return np.where(rows > 0, np.maximum(np.round(rows * _PRIOR_ONE), 1.0), 0.0).astype(np.int64)


def _adaptive_rows(rows: np.ndarray, counts: np.ndarray, beta: int) -> np.ndarray:
    """``[S, width]`` float64 rows mixing the model's ``rows`` (:func:`_quantized`) with the image's ``counts``
    (int64, same shape); integers below 2**53 until the one division."""
    num = (counts * _PRIOR_ONE + beta * _quantized(rows)).astype(np.float64)
    return num / num.sum(1, keepdims=True)


class _EarlierCounts:
    """Encoder side of the adaptive counts: for vectors in coding order, how often each symbol followed their
    context on earlier anti-diagonals (what the decoder's table holds when it reaches them)."""

    def __init__(self, ctx: np.ndarray, symbol: np.ndarray, diagonal: np.ndarray, width: int) -> None:
        self.span, self.width = int(diagonal.max()) + 1, width
        self.seen = np.sort((ctx * width + symbol) * self.span + diagonal)

    def __call__(self, ctx: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
        """``[S, width]`` int64 counts of the vectors with contexts ``ctx`` on anti-diagonals ``diagonal``."""
        key = (ctx[:, None] * self.width + np.arange(self.width)) * self.span
        return np.searchsorted(self.seen, key + diagonal[:, None]) - np.searchsorted(self.seen, key)


def _choose_beta(rows: np.ndarray, counts: np.ndarray, symbol: np.ndarray) -> int:
    """The :data:`_BETAS` value giving ``symbol`` (coded under ``rows`` and ``counts``) the shortest code
    (:func:`_adaptive_rows`' probability of each symbol, without building its rows per value)."""
    at = np.arange(symbol.size)
    q = _quantized(rows)
    q_sym, q_all = q[at, symbol].astype(np.float64), q.sum(1).astype(np.float64)
    n_sym, n_all = counts[at, symbol] * float(_PRIOR_ONE), counts.sum(1) * float(_PRIOR_ONE)
    bits = [-np.log2((n_sym + beta * q_sym) / (n_all + beta * q_all)).sum() for beta in _BETAS]
    return int(_BETAS[int(np.argmin(bits))])


def _choose_factors(
    codec: CodecTables, layer: int, start: np.ndarray, symbol: np.ndarray, left: np.ndarray, top: np.ndarray
) -> tuple[int, int]:
    """The pair of :data:`_FACTORS` giving these symbols the shortest code (at most :data:`_FIT_SYMBOLS` looked at)."""
    if symbol.size > _FIT_SYMBOLS:
        pick = np.linspace(0, symbol.size - 1, _FIT_SYMBOLS).astype(np.intp)
        start, symbol, left, top = start[pick], symbol[pick], left[pick], top[pick]
    weight = codec.member_weight(layer).astype(np.float64)
    first, size = codec.group_start[layer][start], codec.group_size[layer][start]
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    total = cum[first + size] - cum[first]  # the group's weight, no neighbour
    w_left = np.where(left >= 0, weight[first + np.maximum(left, 0)], 0.0)
    w_top = np.where(top >= 0, weight[first + np.maximum(top, 0)], 0.0)
    both = (left >= 0) & (left == top)
    hits_left, hits_top = float((symbol == left).sum()), float((symbol == top).sum())
    f = _FACTORS / FACTOR_ONE
    best, best_bits = (FACTOR_ONE, FACTOR_ONE), math.inf
    for i, a in enumerate(f):  # code length up to a constant: sum log2 Z - hits * log2(factor)
        z = total + (a - 1) * w_left + (f[:, None] - 1) * (w_top + both * (a - 1) * w_left)
        bits = np.log2(z).sum(1) - hits_left * math.log2(a) - hits_top * np.log2(f)
        j = int(np.argmin(bits))
        if bits[j] < best_bits - 1e-9:
            best, best_bits = (int(_FACTORS[i]), int(_FACTORS[j])), float(bits[j])
    return best


class _LayerSymbols(NamedTuple):
    """What both context encoders of a layer need, in coding order: the vectors, their anti-diagonals, their left /
    upper neighbours' symbols, the nodes they sit on, their symbols, and the neighbour factors chosen for them."""

    order: np.ndarray
    diagonal: np.ndarray
    left: np.ndarray
    top: np.ndarray
    start: np.ndarray
    symbol: np.ndarray
    factors: tuple[int, int]


def _layer_symbols(codec: CodecTables, layer: int, leaves: np.ndarray, grid: tuple[int, int]) -> _LayerSymbols | None:
    """The :class:`_LayerSymbols` of ``leaves`` (``[N]`` intp, vector order) in ``layer``; None when no vector sends
    a symbol."""
    symbol = codec.leaf_symbol[layer][leaves]
    node = codec.start_of_leaf(layer)[leaves]
    active = np.flatnonzero(symbol >= 0)
    if active.size == 0:
        return None
    order, _, diagonal = _coding_order(active, grid)
    left, top = _neighbour_symbols(symbol, node, order, grid)
    start, sym = node[order], symbol[order]
    return _LayerSymbols(order, diagonal, left, top, start, sym, _choose_factors(codec, layer, start, sym, left, top))


def _payload(codec: CodecTables, layer: int, s: _LayerSymbols, adaptive: bool) -> bytes:
    """The context-coded (``adaptive``: adaptive) payload of a layer's :class:`_LayerSymbols`."""
    import constriction

    width, block = _row_blocks(codec, layer)
    header = bytes(s.factors)
    if adaptive:
        ctx = _context_ids(_group_ranks(codec, layer), s.start, s.left, s.top, width)
        earlier = _EarlierCounts(ctx, s.symbol, s.diagonal, width)
        fit = np.linspace(0, s.symbol.size - 1, min(s.symbol.size, _FIT_SYMBOLS)).astype(np.intp)
        beta = _choose_beta(_rows(codec, layer, s.start[fit], s.left[fit], s.top[fit], s.factors, width),
                            earlier(ctx[fit], s.diagonal[fit]), s.symbol[fit])
        header += bytes([beta])
    model, coder = categorical_model(), constriction.stream.stack.AnsCoder()
    for b in reversed(range(0, s.order.size, block)):  # ANS is a stack: the last block first
        at = slice(b, b + block)
        rows = _rows(codec, layer, s.start[at], s.left[at], s.top[at], s.factors, width)
        if adaptive:
            rows = _adaptive_rows(rows, earlier(ctx[at], s.diagonal[at]), beta)
        coder.encode_reverse(s.symbol[at].astype(np.int32), model, rows)
    return header + coder.get_compressed().astype("<u4", copy=False).tobytes()


def encode_context(codec: CodecTables, layer: int, leaves: np.ndarray, batch_shape: Sequence[int], *,
                   adaptive: bool = False) -> bytes:
    """Context-coded payload of a layer: two factor bytes (adaptive: and ``beta``), then the ANS words (empty when
    no vector sends a symbol).

    Args:
        leaves: ``[N]`` intp codeword of every vector (all of them, in vector order).
        batch_shape: shape of the indices (at least 2 dimensions: ``[..., H, W]``).
        adaptive: also adapt to the counts of this layer's earlier symbols (the layer must
            :func:`fit <adaptive_fits>`).
    """
    s = _layer_symbols(codec, layer, leaves, grid_of(batch_shape))
    return b"" if s is None else _payload(codec, layer, s, adaptive)


def encode_grid_layer(codec: CodecTables, layer: int, leaves: np.ndarray, batch_shape: Sequence[int],
                      adaptive: bool) -> tuple[str, bytes]:
    """``(coding, payload)`` of a layer: context coded, or with ``adaptive`` the smaller of that and the adaptive
    payload where the layer :func:`fits <adaptive_fits>` (a tie: context); one preparation for both.
    Arguments as for :func:`encode_context`."""
    s = _layer_symbols(codec, layer, leaves, grid_of(batch_shape))
    if s is None:
        return "context", b""
    payload = _payload(codec, layer, s, adaptive=False)
    if adaptive and adaptive_fits(codec, layer):
        candidate = _payload(codec, layer, s, adaptive=True)
        if len(candidate) < len(payload):
            return "adaptive", candidate
    return "context", payload


def decode_context(
    codec: CodecTables,
    layer: int,
    state: np.ndarray,
    active: np.ndarray,
    batch_shape: Sequence[int],
    payload: memoryview,
    what: str,
    *,
    adaptive: bool = False,
) -> np.ndarray:
    """Inverse of :func:`encode_context`: the layer node of every active vector, ``[S]`` intp (in ``active``'s order).

    Args:
        state: ``[N]`` intp node every vector sits on before the layer.
        active: ``[S]`` intp vectors that send a symbol (ascending).
        batch_shape: the stream's batch shape.
        adaptive: the payload is adaptive (a third header byte, ``beta``).

    Raises:
        BitstreamError: a payload that is not whole, invalid factors, an invalid
            symbol, or a coder that does not end exactly in its initial state.
    """
    import constriction

    try:
        fits, grid = context_fits(batch_shape), grid_of(batch_shape)
    except ValueError as e:
        raise BitstreamError(f"{what}: {e}") from None
    if not fits:
        raise BitstreamError(f"{what}: a context-coded layer of a {grid[0]}x{grid[1]} grid: more than "
                             f"{MAX_DIAGONALS} anti-diagonals")
    if adaptive and not adaptive_fits(codec, layer):
        raise BitstreamError(f"{what}: an adaptive layer whose table of counts would exceed "
                             f"{MAX_ADAPTIVE_ENTRIES} entries (the encoder codes such a layer without adaptation)")
    if active.size == 0:
        if len(payload):
            raise BitstreamError(f"{what}: {len(payload)} payload bytes but no vector sends a symbol in this layer")
        return np.empty(0, dtype=np.intp)
    head = 3 if adaptive else 2
    if len(payload) < head or (len(payload) - head) % 4:
        raise BitstreamError(f"{what}: context payload has {len(payload)} bytes, not {head} header bytes "
                             f"({'neighbour factors and beta' if adaptive else 'neighbour factors'}) and 32-bit words")
    factors = (int(payload[0]), int(payload[1]))
    beta = int(payload[2]) if adaptive else 0
    if min(factors) == 0 or (adaptive and beta == 0):
        raise BitstreamError(f"{what}: neighbour factors{' and beta' if adaptive else ''} {list(payload[:head])} "
                             f"(each must be 1..255)")
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload[head:], dtype="<u4").astype(np.uint32))
    except Exception as e:  # e.g. a trailing zero word
        raise BitstreamError(f"{what}: invalid context-coded payload ({e})") from None
    model = categorical_model()
    symbol = np.full(state.shape[0], -1, dtype=np.int64)
    order, starts, _ = _coding_order(active, grid)
    width, block = _row_blocks(codec, layer)
    if adaptive:
        rank = _group_ranks(codec, layer)
        counts = np.zeros(_table_entries(codec, layer), dtype=np.int64)
    for diagonal in np.split(order, starts):  # one round per anti-diagonal: its neighbours are all decoded
        seen = []
        for b in range(0, diagonal.size, block):
            pos = diagonal[b : b + block]
            left, top = _neighbour_symbols(symbol, state, pos, grid)
            start = state[pos]
            rows = _rows(codec, layer, start, left, top, factors, width)
            if adaptive:
                key = _context_ids(rank, start, left, top, width) * width
                rows = _adaptive_rows(rows, counts[key[:, None] + np.arange(width)], beta)
            try:
                sym = coder.decode(model, rows)
            except Exception as e:
                raise BitstreamError(f"{what}: context decoder failed ({e})") from None
            size = codec.group_size[layer][start]
            bad = (sym < 0) | (sym >= size)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise BitstreamError(
                    f"{what}: invalid symbol {int(sym[i])} of vector {int(pos[i])}: its group has {int(size[i])} nodes"
                )
            symbol[pos] = sym
            if adaptive:
                seen.append(key + sym)
        if adaptive:  # the diagonal's symbols count from the next diagonal on (as the encoder counts them)
            np.add.at(counts, np.concatenate(seen), 1)
    if not coder.is_empty():
        raise BitstreamError(f"{what}: context-coded payload not consumed exactly (corrupt or truncated data)")
    start = state[active]
    return codec.members[layer][codec.group_start[layer][start] + symbol[active]]

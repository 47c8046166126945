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
division), so both sides get bit-identical rows. The byte layout is in
``docs/bitstream.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .chunk import BitstreamError
from .payload import categorical_model
from .tables import CodecTables

__all__ = ["FACTOR_ONE", "MAX_DIAGONALS", "context_fits", "decode_context", "encode_context", "grid_of"]

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


def _coding_order(active: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Active vectors in coding order (by anti-diagonal, then vector order) and where each diagonal starts."""
    h, w = grid
    diagonal = (active // w) % h + active % w
    order = np.argsort(diagonal, kind="stable")
    starts = np.flatnonzero(np.diff(diagonal[order])) + 1
    return active[order], starts


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


def encode_context(codec: CodecTables, layer: int, leaves: np.ndarray, batch_shape: Sequence[int]) -> bytes:
    """Context-coded payload of a layer: two factor bytes, then the ANS words (empty when no vector sends a symbol).

    Args:
        leaves: ``[N]`` intp codeword of every vector (all of them, in vector order).
        batch_shape: shape of the indices (at least 2 dimensions: ``[..., H, W]``).
    """
    import constriction

    grid = grid_of(batch_shape)
    symbol = codec.leaf_symbol[layer][leaves]
    node = codec.start_of_leaf(layer)[leaves]
    active = np.flatnonzero(symbol >= 0)
    if active.size == 0:
        return b""
    order, _ = _coding_order(active, grid)
    left, top = _neighbour_symbols(symbol, node, order, grid)
    start, sym = node[order], symbol[order]
    factors = _choose_factors(codec, layer, start, sym, left, top)
    model, coder = categorical_model(), constriction.stream.stack.AnsCoder()
    width, block = _row_blocks(codec, layer)
    for b in reversed(range(0, order.size, block)):  # ANS is a stack: the last block first
        s = slice(b, b + block)
        rows = _rows(codec, layer, start[s], left[s], top[s], factors, width)
        coder.encode_reverse(sym[s].astype(np.int32), model, rows)
    return bytes(factors) + coder.get_compressed().astype("<u4", copy=False).tobytes()


def decode_context(
    codec: CodecTables,
    layer: int,
    state: np.ndarray,
    active: np.ndarray,
    batch_shape: Sequence[int],
    payload: memoryview,
    what: str,
) -> np.ndarray:
    """Inverse of :func:`encode_context`: the layer node of every active vector, ``[S]`` intp (in ``active``'s order).

    Args:
        state: ``[N]`` intp node every vector sits on before the layer.
        active: ``[S]`` intp vectors that send a symbol (ascending).
        batch_shape: the stream's batch shape.

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
    if active.size == 0:
        if len(payload):
            raise BitstreamError(f"{what}: {len(payload)} payload bytes but no vector sends a symbol in this layer")
        return np.empty(0, dtype=np.intp)
    if len(payload) < 2 or (len(payload) - 2) % 4:
        raise BitstreamError(f"{what}: context payload has {len(payload)} bytes, not 2 factor bytes and 32-bit words")
    factors = (int(payload[0]), int(payload[1]))
    if min(factors) == 0:
        raise BitstreamError(f"{what}: neighbour factors {list(factors)} (each must be 1..255)")
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload[2:], dtype="<u4").astype(np.uint32))
    except Exception as e:  # e.g. a trailing zero word
        raise BitstreamError(f"{what}: invalid context-coded payload ({e})") from None
    model = categorical_model()
    symbol = np.full(state.shape[0], -1, dtype=np.int64)
    order, starts = _coding_order(active, grid)
    width, block = _row_blocks(codec, layer)
    for diagonal in np.split(order, starts):  # one round per anti-diagonal: its neighbours are all decoded
        for b in range(0, diagonal.size, block):
            pos = diagonal[b : b + block]
            left, top = _neighbour_symbols(symbol, state, pos, grid)
            start = state[pos]
            try:
                sym = coder.decode(model, _rows(codec, layer, start, left, top, factors, width))
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
    if not coder.is_empty():
        raise BitstreamError(f"{what}: context-coded payload not consumed exactly (corrupt or truncated data)")
    start = state[active]
    return codec.members[layer][codec.group_start[layer][start] + symbol[active]]

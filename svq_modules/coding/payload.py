"""Payload coders of one layer: raw bit packing and entropy coding of the grouped tree path.

Before layer ``l`` every vector sits on a node ``p`` (the root before layer 0);
the vectors whose node is split in layer ``l`` are *active* and send a symbol.

* raw (``coding = 0``): each active vector's symbol (its node's number in the
  group of ``p``) in ``ceil(log2 g)`` bits, MSB first, in vector order,
  zero-padded to a whole byte;
* entropy (``coding = 1``): the path of left/right decisions from ``p`` down to
  the layer node, grouped in steps of ``k`` levels, each step one categorical
  symbol under the model's branch probabilities, through constriction's ANS
  coder in depth-major order (all first steps, then all second steps ...).

Both sides loop over steps and bit positions only, never over vectors or
clusters. The exact layout is in ``docs/bitstream.md``.
"""

from __future__ import annotations

import numpy as np

from .chunk import BitstreamError
from .tables import CodecTables

__all__ = [
    "BLOCK_ROWS",
    "categorical_model",
    "decode_entropy",
    "decode_raw",
    "encode_entropy",
    "encode_raw",
    "pack_raw",
    "raw_payload_size",
    "unpack_raw",
]

#: rows per constriction call (bounds the [rows, 2**k] probability block in memory)
BLOCK_ROWS = 1 << 18


def categorical_model():
    """The model of every ANS coder of the format: constriction's categorical with leaky quantization (``perfect=False``)."""
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


# ---------------------------------------------------------------------------------------------- raw


def pack_raw(symbols: np.ndarray, widths: np.ndarray) -> bytes:
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


def unpack_raw(payload: memoryview, widths: np.ndarray, what: str) -> np.ndarray:
    """Inverse of :func:`pack_raw`: ``[S]`` int64 symbols; checks the length and the zero padding."""
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


def _raw_widths(codec: CodecTables, layer: int, leaves: np.ndarray) -> np.ndarray:
    return codec.width(layer)[codec.start_of_leaf(layer)[leaves]]


def raw_payload_size(codec: CodecTables, layer: int, leaves: np.ndarray) -> int:
    """Bytes of the raw payload of a layer whose active vectors have codewords ``leaves [S]`` (no packing)."""
    return (int(_raw_widths(codec, layer, leaves).sum()) + 7) // 8


def encode_raw(codec: CodecTables, layer: int, leaves: np.ndarray) -> bytes:
    """Raw payload of a layer; ``leaves [S]`` intp = codewords of its active vectors in vector order."""
    return pack_raw(codec.leaf_symbol[layer][leaves], _raw_widths(codec, layer, leaves))


def decode_raw(
    codec: CodecTables, layer: int, start: np.ndarray, active: np.ndarray, payload: memoryview, what: str
) -> np.ndarray:
    """Inverse of :func:`encode_raw`: the layer node of every active vector, ``[S]`` intp.

    Args:
        start: ``[S]`` intp node each active vector sits on before the layer.
        active: ``[S]`` vector index of each (for error messages).
    """
    g = codec.group_size[layer][start]
    sym = unpack_raw(payload, codec.width(layer)[start], what)
    bad = sym >= g
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BitstreamError(
            f"{what}: invalid symbol {int(sym[i])} of vector {int(active[i])}: its group has {int(g[i])} nodes"
        )
    return codec.members[layer][codec.group_start[layer][start] + sym]


# ---------------------------------------------------------------------------------------------- entropy


def encode_entropy(codec: CodecTables, layer: int, k: int, leaves: np.ndarray) -> bytes:
    """ANS-coded payload of a layer in steps of ``k`` levels; ``leaves [S]`` = codewords of the active vectors."""
    import constriction

    if leaves.size == 0:
        return b""
    symbols, nodes, steps = codec.leaf_steps(layer, k)
    _, prob = codec.step_tables(k)
    model = categorical_model()
    selections = [leaves]
    for s in range(1, len(symbols)):
        prev = selections[-1]
        selections.append(prev[steps[prev] > s])
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: push the last step's last block first so that the decoder pops in order
    for s in reversed(range(len(symbols))):
        sel = selections[s]
        for b in reversed(range(0, sel.size, BLOCK_ROWS)):
            blk = sel[b : b + BLOCK_ROWS]
            coder.encode_reverse(symbols[s][blk], model, np.take(prob, nodes[s][blk], axis=0))
    return coder.get_compressed().astype("<u4", copy=False).tobytes()


def decode_entropy(codec: CodecTables, layer: int, k: int, start: np.ndarray, payload: memoryview, what: str) -> np.ndarray:
    """Inverse of :func:`encode_entropy`: the layer node reached from every start node ``start [S]``, ``[S]`` intp.

    Requires possible paths only and the coder to end exactly in its initial state.
    """
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
    model = categorical_model()
    is_member = codec.is_member[layer]
    if not (codec.opened_layer[start] == layer).all():
        raise BitstreamError(f"{what}: a vector's group is not split by this layer (inconsistent model data)")
    cur, pos = start, np.arange(start.shape[0])
    rounds = 0
    while cur.size:  # one round per step, vectorized over the vectors still descending
        rounds += 1
        if rounds > codec.num_nodes:
            raise BitstreamError(f"{what}: decoded path longer than the tree is deep")
        try:
            parts = [
                coder.decode(model, np.take(prob, cur[b : b + BLOCK_ROWS], axis=0)) for b in range(0, cur.size, BLOCK_ROWS)
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

"""Tests of the per-layer bitstream (issue 6): round trips, corrupt input, container, atomic files, CLI.

Small models (K <= 64): the whole file runs in well under a minute on 2 cores
(the fuzz tests take most of it). On these small models raw coding often beats
entropy coding, so tests of the entropy decoder switch the raw fallback off
(fixture ``entropy_only``).
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mixtures import make_model

from svq_modules.coding import (
    CODINGS,
    MAGIC,
    BitstreamError,
    branch_prob_q16,
    compress_layers,
    decompress_layers,
    model_fingerprint,
    read_header,
)
from svq_modules.coding.container import atomic_write, pack_container, read_container, unpack_container, write_container
from svq_modules.coding.payload import pack_raw
from svq_modules.hierarchy import build_hierarchy
from svq_modules.layers import (
    build_layers,
    decode_codes,
    encode_indices,
    node_log2_prob,
    reconstruct,
    symbol_bits,
)

# header layout (docs/bitstream.md): name -> (offset, struct format)
FIELDS = {
    "magic": (0, "4s"),
    "version": (4, "B"),
    "coding": (5, "B"),
    "embed": (6, "B"),
    "ndim": (7, "B"),
    "layer": (8, "H"),
    "stream_layers": (10, "H"),
    "model_layers": (12, "H"),
    "step": (14, "H"),
    "fingerprint": (16, "8s"),
    "num_vectors": (24, "Q"),
    "num_symbols": (32, "Q"),
    "dim": (40, "I"),
    "num_leaves": (44, "I"),
    "link": (48, "I"),
    "reserved": (52, "I"),
    "embed_len": (56, "Q"),
    "payload_len": (64, "Q"),
}
HEADER_SIZE = 72


def rebuild(chunk: bytes, fix_crc: bool = True, **fields) -> bytes:
    """Chunk with header fields replaced (and its CRC recomputed)."""
    data = bytearray(chunk)
    for name, value in fields.items():
        off, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, data, off, value)
    if fix_crc:
        struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])))
    return bytes(data)


def field_value(chunk: bytes, name: str):
    off, fmt = FIELDS[name]
    return struct.unpack_from("<" + fmt, chunk, off)[0]


def _payload(chunk: bytes) -> bytes:
    """The payload of a chunk (between its sections and its CRC)."""
    return chunk[-4 - read_header(chunk).payload_len : -4]


def with_section(chunk: bytes, embed: bytes | None = None, payload: bytes | None = None) -> bytes:
    """Chunk with its embedded section and/or payload replaced, lengths and CRC fixed."""
    h = read_header(chunk)
    start = HEADER_SIZE + 8 * len(h.batch_shape or ())
    old_embed = chunk[start : start + h.embed_len]
    old_payload = chunk[start + h.embed_len : start + h.embed_len + h.payload_len]
    embed = old_embed if embed is None else embed
    payload = old_payload if payload is None else payload
    head = bytearray(chunk[:start])
    struct.pack_into("<Q", head, 56, len(embed))
    struct.pack_into("<Q", head, 64, len(payload))
    body = bytes(head) + embed + payload
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(scope="module")
def model():
    return make_model(0)


@pytest.fixture
def entropy_only(monkeypatch):
    """Make ``coding="entropy"`` keep every layer entropy-coded (no fallback to raw).

    On these small models raw coding is often smaller, so without this most
    chunks would be raw and the entropy decoder's checks would go untested.
    """
    import svq_modules.coding.stream as stream

    monkeypatch.setattr(stream, "raw_payload_size", lambda *args: 1 << 62)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("coding", ["raw", "entropy", "entropy-only"])
@pytest.mark.parametrize("embed", [None, "float16", "float32"])
@pytest.mark.parametrize("cut", ["greedy", "depth"])
def test_every_prefix_round_trips_exactly(coding, embed, cut, request):
    x, h, t, idx = make_model(1, cut=cut)
    codes = encode_indices(t, idx)
    ref = decode_codes(t, codes)
    if coding == "entropy-only":
        request.getfixturevalue("entropy_only")
    chunks = compress_layers(h, t, idx, coding=coding.removesuffix("-only"), embed_centers=embed)
    assert len(chunks) == t.num_layers
    if coding != "entropy":
        assert {read_header(c).coding for c in chunks} == {coding.removesuffix("-only")}
    for n in range(1, t.num_layers + 1):
        out = decompress_layers(h, t, chunks[:n])
        assert torch.equal(out.nodes, ref[:n])
        assert torch.equal(out.reconstruction(), reconstruct(h, t, idx, n))
        for m in range(1, n + 1):
            assert torch.equal(out.reconstruction(m), reconstruct(h, t, idx, m))
        assert torch.equal(decompress_layers(h, t, chunks, num_layers=n).nodes, ref[:n])
        hdr = read_header(chunks[n - 1])
        assert hdr.num_symbols == int((codes[n - 1] >= 0).sum())
        if embed is not None:  # a receiver without the model decodes the same nodes
            alone = decompress_layers(None, None, chunks[:n])
            assert torch.equal(alone.nodes, ref[:n])
            dtype = torch.float16 if embed == "float16" else torch.float32
            expected = h.center.to(dtype).float()[ref[n - 1]]
            assert torch.equal(alone.reconstruction(), expected)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8])
def test_entropy_step_sizes_round_trip(model, step, entropy_only):
    _, h, t, idx = model
    ref = decode_codes(t, encode_indices(t, idx))
    chunks = compress_layers(h, t, idx, entropy_step=step)
    assert all(read_header(c).coding == "entropy" and read_header(c).step == step for c in chunks)
    assert torch.equal(decompress_layers(h, t, chunks).nodes, ref)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(0,), (), (5,), (2, 3, 4)])
def test_small_codebooks_and_batch_shapes(k, shape):
    g = torch.Generator().manual_seed(k)
    codebook = torch.randn(k, 2, generator=g)
    h = build_hierarchy(codebook, torch.rand(k, generator=g) * 10 + 0.5, None)
    t = build_layers(h, [1, 1])
    idx = torch.randint(0, k, shape, generator=g)
    ref = decode_codes(t, encode_indices(t, idx.reshape(-1)))
    for coding in ("raw", "entropy"):
        chunks = compress_layers(h, t, idx, coding=coding, embed_centers="float32")
        for n in range(1, len(chunks) + 1):
            out = decompress_layers(h, t, chunks[:n])
            assert out.batch_shape == shape
            assert torch.equal(out.nodes, ref[:n])
            assert out.reconstruction().shape == (*shape, 2)
            assert torch.equal(decompress_layers(None, None, chunks[:n]).reconstruction(), out.reconstruction())


def test_output_is_deterministic_and_partial_streams_match(model):
    _, h, t, idx = model
    a = compress_layers(h, t, idx)
    assert a == compress_layers(h, t, idx)
    # a stream of the first 2 layers decodes like the first 2 chunks of the full stream
    short = compress_layers(h, t, idx, num_layers=2)
    assert len(short) == 2 and read_header(short[0]).stream_layers == 2
    assert torch.equal(decompress_layers(h, t, short).nodes, decompress_layers(h, t, a[:2]).nodes)


def test_raw_payload_size_is_exactly_the_symbol_bits(model):
    _, h, t, idx = model
    bits = symbol_bits(t)[:, idx].sum(1)
    for layer, c in enumerate(compress_layers(h, t, idx, coding="raw")):
        assert read_header(c).payload_len == math.ceil(int(bits[layer]) / 8)


def test_entropy_coding_is_within_one_percent_of_the_ideal_rate(entropy_only):
    x, h, t, idx = make_model(3, n=20000, k=64, bits=(3, 2, 2))
    chunks = compress_layers(h, t, idx)
    assert all(read_header(c).coding == "entropy" for c in chunks)
    # ideal cost under the coder's (16-bit) probabilities and under the float model of layers.py
    q = branch_prob_q16(h).double() / 65536
    step = torch.zeros(h.num_nodes, dtype=torch.float64)
    step[h.children[:, 1]] = torch.log2(q[h.num_leaves :])
    step[h.children[:, 0]] = torch.log2(1 - q[h.num_leaves :])
    logp_q = torch.zeros(h.num_nodes, dtype=torch.float64)
    for node in range(h.num_nodes - 2, -1, -1):  # parents have larger ids
        logp_q[node] = logp_q[h.parent[node]] + step[node]
    logp = node_log2_prob(h)
    prev = torch.cat([torch.full_like(t.leaf_node[:1], h.root), t.leaf_node[:-1]])
    for layer, c in enumerate(chunks):
        p, v = prev[layer, idx], t.leaf_node[layer, idx]
        ideal_q = float((logp_q[p] - logp_q[v]).sum())
        ideal = float((logp[p] - logp[v]).sum())
        bits = 8 * read_header(c).payload_len
        assert bits <= ideal_q * 1.01 + 64, (layer, bits, ideal_q)
        assert bits <= ideal * 1.01 + 64, (layer, bits, ideal)
        assert bits >= ideal_q * 0.99 - 64  # sanity: no free lunch


def test_fingerprint_is_stable_across_reload_and_dtype(model):
    _, h, t, idx = model
    fp = model_fingerprint(h, t)
    assert len(fp) == 8
    h64 = h.to(torch.float64)
    assert model_fingerprint(h64, t) == fp
    chunks = compress_layers(h, t, idx)
    assert torch.equal(decompress_layers(h64, t, chunks).nodes, decompress_layers(h, t, chunks).nodes)
    other = make_model(5)
    assert model_fingerprint(other[1], other[2]) != fp


def test_fingerprint_after_state_dict_reload():
    from svq_modules.nn import ScalableVQ

    torch.manual_seed(0)
    x, h, t, idx = make_model(2, n=600)
    vq = ScalableVQ.from_codebook(h.center[: h.num_leaves].clone(), x=x, bits=[2, 1, 1])
    fresh = ScalableVQ(3, 32, bits=[2, 1, 1])
    fresh.load_state_dict(vq.state_dict())
    assert model_fingerprint(fresh.hierarchy, fresh.tables) == model_fingerprint(vq.hierarchy, vq.tables)
    idx = vq.quantize(x)
    chunks = compress_layers(vq.hierarchy, vq.tables, idx)
    out = decompress_layers(fresh.hierarchy, fresh.tables, chunks)
    assert torch.equal(out.reconstruction(), vq.decode(vq.encode(x)))


@pytest.mark.cuda
def test_fingerprint_and_decoding_on_cuda(model):
    _, h, t, idx = model
    hc, tc = h.to("cuda"), t.to("cuda")
    assert model_fingerprint(hc, tc) == model_fingerprint(h, t)
    chunks = compress_layers(hc, tc, idx.cuda())
    assert chunks == compress_layers(h, t, idx)
    out = decompress_layers(hc, tc, chunks)
    assert out.reconstruction().device.type == "cuda"


def test_in_place_model_change_is_detected(model):
    _, h0, t0, idx = model
    h = type(h0)(**{k: v.clone() for k, v in h0.as_dict().items()})
    chunks = compress_layers(h, t0, idx)
    decompress_layers(h, t0, chunks)  # warm the codec cache
    h.center.add_(1.0)
    with pytest.raises(BitstreamError, match="fingerprint mismatch"):
        decompress_layers(h, t0, chunks)


def test_bad_arguments_raise_value_error(model):
    _, h, t, idx = model
    with pytest.raises(ValueError, match="coding"):
        compress_layers(h, t, idx, coding="zip")
    with pytest.raises(ValueError, match="embed_centers"):
        compress_layers(h, t, idx, embed_centers="float64")
    with pytest.raises(ValueError, match="out of range"):
        compress_layers(h, t, idx + 100)
    with pytest.raises(ValueError, match="num_layers"):
        compress_layers(h, t, idx, num_layers=t.num_layers + 1)
    with pytest.raises(ValueError, match="entropy_step"):
        compress_layers(h, t, idx, entropy_step=9)
    with pytest.raises(ValueError, match="both"):
        decompress_layers(h, None, compress_layers(h, t, idx))


# ------------------------------------------------------------------------------------ corrupt input


def test_errors_name_what_is_wrong(model, entropy_only):
    _, h, t, idx = model
    chunks = compress_layers(h, t, idx)
    other = make_model(7)
    other_chunks = compress_layers(other[1], other[2], other[3])
    same_model_other_data = compress_layers(h, t, idx.flip(0))
    cases = [
        ([], "no chunks"),
        ([b""], "empty"),
        ([b"JUNKJUNK"], "bad magic"),
        ([chunks[0][:50]], "truncated"),
        ([chunks[0][:-1]], "CRC32 mismatch"),
        ([chunks[0], chunks[2]], "expected layer 1"),
        ([chunks[0], chunks[1], chunks[1]], "duplicated"),
        ([chunks[1], chunks[0]], "expected layer 0"),
        (other_chunks, "fingerprint mismatch"),
        ([chunks[0], same_model_other_data[1]], "different streams"),
        ([rebuild(chunks[0], version=2)], "format version"),
        ([rebuild(chunks[0], num_symbols=1)], "symbols"),
        ([rebuild(chunks[0], coding=7)], "unknown coding"),
        ([rebuild(chunks[0], step=0)], "entropy step"),
        ([chunks[0], rebuild(chunks[1], num_vectors=500)], "num_vectors"),
        (chunks[0], "sequence"),
        ([chunks[0], 5], "must be bytes"),
    ]
    for bad, message in cases:
        with pytest.raises(BitstreamError, match=message):
            decompress_layers(h, t, bad)
    with pytest.raises(BitstreamError, match="self-contained"):
        decompress_layers(None, None, chunks)


def test_invalid_raw_symbol_is_rejected():
    # find a layer with a group whose size is not a power of two: the raw code 2**w - 1 is then invalid
    _, h, t, idx = make_model(4, k=40, bits=(2, 2))
    chunks = compress_layers(h, t, idx, coding="raw")
    codes = encode_indices(t, idx)
    prev = torch.cat([torch.full_like(t.leaf_node[:1], h.root), t.leaf_node[:-1]])[:, idx]
    g = t.group_size.gather(1, prev)
    width = torch.ceil(torch.log2(g.clamp_min(1).double())).long()
    found = False
    for layer in range(t.num_layers):
        act = codes[layer] >= 0
        odd = act & (g[layer] < (1 << width[layer])) & (g[layer] > 1)
        if odd.any():
            sym = codes[layer][act].numpy().copy()
            i = int(odd[act].nonzero()[0])
            sym[i] = (1 << int(width[layer][act][i])) - 1
            payload = pack_raw(sym, width[layer][act].numpy())
            bad = with_section(chunks[layer], payload=payload)
            stream = chunks[:layer] + [bad]
            with pytest.raises(BitstreamError, match="invalid symbol"):
                decompress_layers(h, t, stream)
            found = True
            break
    assert found


def test_crafted_payloads_and_embedded_sections_are_rejected(model, entropy_only):
    _, h, t, idx = model
    chunks = compress_layers(h, t, idx, embed_centers="float32")
    assert all(read_header(c).coding == "entropy" for c in chunks)
    rng = np.random.default_rng(0)
    for layer in range(t.num_layers):
        hdr = read_header(chunks[layer])
        for _trial in range(5):  # random words of the right count: never a silent decode
            words = rng.integers(1, 2**32, size=max(1, hdr.payload_len // 4), dtype=np.uint64).astype("<u4")
            bad = with_section(chunks[layer], payload=words.tobytes())
            with pytest.raises(BitstreamError):
                decompress_layers(h, t, chunks[:layer] + [bad])
        with pytest.raises(BitstreamError, match="whole 32-bit words"):
            decompress_layers(h, t, chunks[:layer] + [with_section(chunks[layer], payload=b"\x01\x02\x03")])
    # embedded section checks of a model-less decode
    c1 = chunks[1]
    hdr = read_header(c1)
    start = HEADER_SIZE
    embed = bytearray(c1[start : start + hdr.embed_len])
    e_count = struct.unpack_from("<I", embed, 0)[0]
    assert e_count > 0
    bad_cases = {
        "not ascending internal": lambda b: struct.pack_into("<I", b, 8, 0),  # first split node := a leaf
        "smaller ids": lambda b: struct.pack_into("<I", b, 8 + 4 * e_count, 2 * h.num_leaves - 2),  # child := root
        "probability": lambda b: struct.pack_into("<H", b, 8 + 12 * e_count, 0),
        "embedded section has": lambda b: b.extend(b"\0\0\0\0"),
    }
    for message, change in bad_cases.items():
        b = bytearray(embed)
        change(b)
        with pytest.raises(BitstreamError, match=message):
            decompress_layers(None, None, [chunks[0], with_section(c1, embed=bytes(b))])


def _mutations(rng: random.Random, chunks: list[bytes], other_model: list[bytes], other_stream: list[bytes], with_model: bool):
    """One mutated stream (list of chunks) that must not decode."""
    n = rng.randint(1, len(chunks))
    s = list(chunks[:n])
    kinds = ["truncate", "flip", "insert", "delete", "empty", "garbage", "dup", "swap", "gap", "other_stream", "drop_first"]
    if with_model:
        kinds += ["field", "field", "field", "other_model"]
    kind = rng.choice(kinds)
    i = rng.randrange(n)
    c = bytearray(s[i])
    if kind == "truncate":
        s[i] = bytes(c[: rng.randrange(len(c))])
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(8 * len(c))
            c[pos // 8] ^= 1 << (pos % 8)
        if bytes(c) == s[i]:  # flips cancelled: flip one more
            c[0] ^= 1
        s[i] = bytes(c)
    elif kind == "insert":
        pos = rng.randrange(len(c) + 1)
        s[i] = bytes(c[:pos]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + bytes(c[pos:])
    elif kind == "delete":
        pos = rng.randrange(len(c))
        s[i] = bytes(c[:pos] + c[pos + rng.randint(1, 4) :])
    elif kind == "empty":
        s[i] = b""
    elif kind == "garbage":
        s[i] = MAGIC[: rng.randint(0, 4)] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 120)))
    elif kind == "dup":
        s.insert(i + 1, s[i])
    elif kind == "swap" and n >= 2:
        a, b = rng.sample(range(n), 2)
        s[a], s[b] = s[b], s[a]
    elif kind == "gap" and n >= 2:
        del s[rng.randrange(n - 1)]
    elif kind == "other_stream" and n >= 2:
        j = rng.randrange(1, n)
        s[j] = other_stream[j]
    elif kind == "drop_first":
        s = s[1:] or [b""]
    elif kind == "other_model":
        s[i] = other_model[i]
    elif kind == "field":
        s[i] = _bad_field(rng, s[i], i, len(chunks))
    else:  # a kind that needs 2 chunks on a 1-chunk stream
        s[i] = s[i][:-1]
    return s


def _bad_field(rng: random.Random, chunk: bytes, position: int, num_layers: int) -> bytes:
    """A header field set to an invalid value, CRC recomputed."""
    hdr = read_header(chunk)
    name = rng.choice(list(FIELDS))
    old = field_value(chunk, name)

    def other(lo: int, hi: int, bad: set[int]) -> int:
        while True:
            v = rng.randint(lo, hi)
            if v not in bad:
                return v

    if name == "magic":
        value = bytes(rng.randrange(256) for _ in range(4))
        value = value if value != MAGIC else b"XXXX"
    elif name == "fingerprint":
        value = bytes(x ^ 0x5A for x in old)
    elif name == "version":
        value = other(0, 255, {1})
    elif name == "coding":
        value = other(len(CODINGS), 255, set())
    elif name == "embed":
        value = other(3, 255, set())
    elif name == "ndim":
        value = other(0, 255, {old})
    elif name == "layer":
        value = other(0, 65535, {position})
    elif name == "stream_layers":
        value = rng.choice([0, other(num_layers + 1, 65535, set())])
    elif name == "model_layers":
        value = other(0, 65535, {num_layers})
    elif name == "step":
        value = other(1, 65535, set()) if hdr.coding != "entropy" else rng.choice([0, other(9, 65535, set())])
    elif name in ("num_vectors", "num_symbols", "embed_len", "payload_len"):
        value = other(0, 2**50 if rng.random() < 0.5 else old + 10, {old})
    elif name in ("dim", "num_leaves", "link"):
        value = other(0, 2**32 - 1 if rng.random() < 0.3 else old + 10, {old})
    else:  # reserved
        value = other(1, 2**32 - 1, set())
    return rebuild(chunk, **{name: value})


@pytest.mark.parametrize(
    "coding,embed",
    [("entropy-only", None), ("raw", None), ("entropy", "float16"), ("raw", "float32"), ("context-only", None),
     ("adaptive-only", None)],
)
def test_fuzz_2500_mutations_each_raise_bitstream_error(model, coding, embed, request):
    """5 x 2,500 = 12,500 mutated streams: each raises BitstreamError, never another exception or a decode.

    ``entropy-only`` / ``context-only`` / ``adaptive-only``: every chunk entropy- / context- / adaptively coded
    (the last two: the indices as a 20x20 grid); ``entropy``: the default, here a mix of raw and entropy chunks.
    """
    _, h, t, idx = model
    if coding.endswith("-only"):
        request.getfixturevalue("entropy_only")
    if coding == "adaptive-only":
        request.getfixturevalue("adaptive_only")
    coding = coding.removesuffix("-only")
    idx = idx.reshape(20, 20) if coding in ("context", "adaptive") else idx
    chunks = compress_layers(h, t, idx, coding=coding, embed_centers=embed)
    other = make_model(11)  # same K, D, L and N: only the model differs
    other_model = compress_layers(other[1], other[2], other[3].reshape(idx.shape), coding=coding, embed_centers=embed)
    other_stream = compress_layers(h, t, idx.roll(1), coding=coding, embed_centers=embed)
    rng = random.Random(f"{coding}-{embed}")
    for trial in range(2500):
        with_model = embed is None or trial % 2 == 0
        stream = _mutations(rng, chunks, other_model, other_stream, with_model)
        try:
            if with_model:
                decompress_layers(h, t, stream)
            else:
                decompress_layers(None, None, stream)
        except BitstreamError:
            continue
        except Exception as e:  # pragma: no cover - the failure report
            pytest.fail(f"trial {trial}: {type(e).__name__} instead of BitstreamError: {e}")
        pytest.fail(f"trial {trial}: a mutated stream decoded without error")


# ------------------------------------------------------------------------------------ container / files


def test_container_round_trip_and_partial_reads(model, tmp_path):
    _, h, t, idx = model
    chunks = compress_layers(h, t, idx)
    data = pack_container(chunks, b"MODEL")
    c = unpack_container(data)
    assert c.chunks == chunks and c.model == b"MODEL" and c.num_chunks == len(chunks)
    assert c.fingerprint == model_fingerprint(h, t)
    # progressive: the first two chunks are enough even when the file is cut after them
    cut = len(data) - sum(len(x) + 8 for x in chunks[2:])
    assert unpack_container(data[:cut], max_chunks=2).chunks == chunks[:2]
    with pytest.raises(BitstreamError, match="truncated"):
        unpack_container(data[:cut])
    with pytest.raises(BitstreamError, match="unexpected bytes"):
        unpack_container(data + b"\0")
    bad = bytearray(data)
    bad[40] ^= 1  # inside the model section
    with pytest.raises(BitstreamError, match="model section CRC32"):
        unpack_container(bytes(bad))
    with pytest.raises(BitstreamError, match="not a .svq"):
        unpack_container(b"")
    path = tmp_path / "x.svq"
    assert write_container(path, chunks) == path.stat().st_size
    assert read_container(path).chunks == chunks and read_container(path).model is None


def test_atomic_write_leaves_nothing_on_error(tmp_path, monkeypatch):
    target = tmp_path / "out.svq"

    def half_then_fail(f):
        f.write(b"x" * 1000)
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="simulated"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]

    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    atomic_write(tmp_path / "new.bin", b"data")
    assert (tmp_path / "new.bin").read_bytes() == b"data"


@pytest.mark.slow
def test_cli_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(6, 3, generator=g) * 4)[torch.randint(0, 6, (1500,), generator=g)] + torch.randn(1500, 3, generator=g)
    src = tmp_path / "data.npy"
    np.save(src, data.numpy())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "svq_modules", *args], capture_output=True, text=True, env=env, timeout=300)

    svq, model_file = tmp_path / "data.svq", tmp_path / "model.pt"
    r = run("compress", str(src), "-o", str(svq), "--codebook-size", "32", "--bits", "2,1,1", "--epochs", "2",
            "--batch-size", "512", "--save-model", str(model_file))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "MSE" in r.stdout and svq.exists() and model_file.exists()
    out = tmp_path / "approx.npy"
    r = run("decompress", str(svq), "--layers", "2", "-o", str(out), "--reference", str(src))
    assert r.returncode == 0, r.stderr
    approx = np.load(out)
    assert approx.shape == (1500, 3)

    # the same decode in-process, with the model stored in the file
    from svq_modules.cli.main import load_model

    vq = load_model(model_file)
    container = read_container(svq)
    expected = decompress_layers(vq.hierarchy, vq.tables, container.chunks, num_layers=2).reconstruction()
    assert np.array_equal(approx, expected.numpy())
    mse = [float(((decompress_layers(vq.hierarchy, vq.tables, container.chunks[:n]).reconstruction() - data) ** 2).mean())
           for n in range(1, 5)]  # fmt: skip
    assert all(b <= a for a, b in zip(mse, mse[1:]))

    # external model + self-contained chunks: decodes with --model, and without any model
    svq2 = tmp_path / "ext.svq"
    r = run(
        "compress", str(src), "-o", str(svq2), "--model", str(model_file), "--coding", "raw", "--embed-centers", "float32", "-q"
    )
    assert r.returncode == 0, r.stderr
    assert read_container(svq2).model is None
    out2 = tmp_path / "approx2.npy"
    r = run("decompress", str(svq2), "-o", str(out2), "-q")
    assert r.returncode == 0, r.stderr
    full = decompress_layers(vq.hierarchy, vq.tables, container.chunks).reconstruction().numpy()
    assert np.array_equal(np.load(out2), full)

    # errors: clear message, exit 1, nothing written
    bad = tmp_path / "bad.svq"
    bad.write_bytes(svq.read_bytes()[:-3])
    r = run("decompress", str(bad), "-o", str(tmp_path / "never.npy"))
    assert r.returncode == 1 and "error:" in r.stderr and "truncated" in r.stderr
    assert not (tmp_path / "never.npy").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ format stability

GOLDEN_TREE = {
    "parent": [5, 7, 5, 6, 6, 7, 8, 8, -1],
    "children": [[0, 2], [3, 4], [1, 5], [6, 7]],
    "size": [1, 1, 1, 1, 1, 2, 2, 3, 5],
    "count": [10.0, 3.0, 1.0, 6.0, 2.0, 11.0, 8.0, 14.0, 22.0],
    "center": [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [4.0, 4.0], [5.0, 5.0], [0.0, 0.09090909361839294], [4.25, 4.25],
               [0.2142857164144516, 0.0714285746216774], [1.6818181276321411, 1.5909091234207153]],  # fmt: skip
    "merge_cost": [0.9090908765792847, 3.0, 2.3766233921051025, 171.80520629882812],
}
GOLDEN_TABLES = {
    "widths": [1, 1, 1],
    "leaf_node": [[7, 7, 7, 6, 6], [5, 1, 5, 3, 4], [0, 1, 2, 3, 4]],
    "leaf_symbol": [[1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [0, -1, 1, -1, -1]],
    "group_start": [[0] * 9, [0, 0, 0, 0, 0, 0, 0, 2, 0], [0] * 9],
    "group_size": [[0, 0, 0, 0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 0, 2, 2, 0], [0, 0, 0, 0, 0, 2, 0, 0, 0]],
    "members": [[6, 7, -1, -1, -1], [3, 4, 1, 5, -1], [0, 2, -1, -1, -1]],
}
GOLDEN_INDICES = [0, 1, 2, 3, 4, 0, 0, 3, 1, 4, 2, 0]
GOLDEN_ENTROPY = [
    "5356514c0101000100000300030001004616cfa5c80073190c000000000000000c0000000000000002000000050000000000"
    "000000000000000000000000000008000000000000000c0000000000000000638aa10200000052d69387",
    "5356514c0101000001000300030001004616cfa5c80073190c000000000000000c00000000000000020000000500000052d6"
    "9387000000000000000000000000080000000000000024ba911b0300000066541ed5",
    "5356514c0101000002000300030001004616cfa5c80073190c00000000000000060000000000000002000000050000006654"
    "1ed50000000000000000000000000400000000000000028c2e0de37affce",
]

# the same model and indices as a 3x4 grid, every layer context coded (written 2026-11-28)
GOLDEN_CONTEXT = [
    "5356514c0102000200000300030000004616cfa5c80073190c000000000000000c0000000000000002000000050000000000"
    "00000000000000000000000000000a000000000000000300000000000000040000000000000004064f1f855b010000005505"
    "7b9d",
    "5356514c0102000001000300030000004616cfa5c80073190c000000000000000c0000000000000002000000050000005505"
    "7b9d0000000000000000000000000a0000000000000004143b1185a501000000ebce73c5",
    "5356514c0102000002000300030000004616cfa5c80073190c0000000000000006000000000000000200000005000000ebce"
    "73c5000000000000000000000000060000000000000006040655d50a70c286e0",
]


def test_golden_stream_decodes_and_encodes_bit_exactly(monkeypatch):
    """Streams written by format version 1 keep decoding; the entropy coder keeps producing the same bytes.

    If this fails after a change of constriction or of the coder, old files would no longer
    decode: bump FORMAT_VERSION (and keep a reader for version 1) instead of editing the bytes.
    """
    from svq_modules.hierarchy import Hierarchy
    from svq_modules.layers import LayerTables

    tree = {k: torch.tensor(v, dtype=torch.float32 if k in ("count", "center", "merge_cost") else torch.int64)
            for k, v in GOLDEN_TREE.items()}  # fmt: skip
    h = Hierarchy.from_dict(tree)
    t = LayerTables.from_dict({k: torch.tensor(v) for k, v in GOLDEN_TABLES.items()})
    idx = torch.tensor(GOLDEN_INDICES)
    golden = [bytes.fromhex(c) for c in GOLDEN_ENTROPY]
    ref = decode_codes(t, encode_indices(t, idx))
    assert torch.equal(decompress_layers(h, t, golden).nodes, ref)
    # today's default: 12 vectors, every raw payload (1-2 bytes) is smaller than the ANS words (4-8 bytes),
    # so every layer falls back to raw and the stream is the raw stream
    raw = compress_layers(h, t, idx, coding="raw")
    assert all(read_header(g).payload_len > read_header(r).payload_len for g, r in zip(golden, raw))
    assert compress_layers(h, t, idx) == raw
    assert torch.equal(decompress_layers(h, t, raw).nodes, ref)
    # the entropy coder itself still writes the golden bytes
    import svq_modules.coding.stream as stream

    monkeypatch.setattr(stream, "raw_payload_size", lambda *args: 1 << 62)
    assert compress_layers(h, t, idx) == golden
    # and the context coder its golden bytes
    context = [bytes.fromhex(c) for c in GOLDEN_CONTEXT]
    assert torch.equal(decompress_layers(h, t, context).nodes, ref)
    assert compress_layers(h, t, idx.reshape(3, 4), coding="context") == context


def test_container_fuzz_raises_bitstream_error(model):
    _, h, t, idx = model
    chunks = compress_layers(h, t, idx)
    data = pack_container(chunks, b"model bytes")
    rng = random.Random(1)
    for trial in range(1000):
        b = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:
            b = b[: rng.randrange(len(b))]
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            if bytes(b) == data:
                b[0] ^= 1
        elif kind == 2:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        else:
            pos = rng.randrange(len(b))
            del b[pos : pos + rng.randint(1, 3)]
        try:
            c = unpack_container(bytes(b))
            decompress_layers(h, t, c.chunks)
        except BitstreamError:
            continue
        changed = "changed" if c.model != b"model bytes" else "intact"
        pytest.fail(f"trial {trial}: a corrupted container was read without error (model section {changed})")


# ------------------------------------------------------------------------------------ context coding (grids)


def smooth_grid(t, shape: tuple[int, ...], block: int, seed: int) -> torch.Tensor:
    """Indices ``shape`` (last two dims a grid) constant over ``block x block`` tiles, one random code per tile."""
    g = torch.Generator().manual_seed(seed)
    *batch, h, w = shape
    tiles = torch.randint(0, t.num_leaves, (*batch, -(-h // block), -(-w // block)), generator=g)
    return tiles.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w].contiguous()


@pytest.mark.parametrize("shape", [(20, 20), (2, 10, 20), (1, 1, 400), (400, 1), (3, 1, 2, 5)])
@pytest.mark.parametrize("embed", [None, "float32"])
@pytest.mark.parametrize("coding", ["context", "adaptive"])
def test_context_coding_round_trips_every_prefix(model, shape, embed, coding, entropy_only, request):
    if coding == "adaptive":
        request.getfixturevalue("adaptive_only")
    _, h, t, idx = model
    for grid in (idx[: math.prod(shape)].reshape(shape), smooth_grid(t, shape, 3, 1)):
        ref = decode_codes(t, encode_indices(t, grid.reshape(-1)))
        chunks = compress_layers(h, t, grid, coding=coding, embed_centers=embed)
        assert [read_header(c).coding for c in chunks] == [coding] * t.num_layers
        for n in range(1, t.num_layers + 1):
            out = decompress_layers(h, t, chunks[:n])
            assert out.batch_shape == shape and torch.equal(out.nodes, ref[:n])
            if embed is not None:
                assert torch.equal(decompress_layers(None, None, chunks[:n]).nodes, ref[:n])


def test_context_coding_uses_the_neighbours_only_where_they_tell(model, entropy_only):
    """Tiles of one code: the neighbours give most symbols away (large factors, far fewer bytes than entropy coding).
    The same codes shuffled: nothing to gain (factors near 1, about the entropy coder's size)."""
    _, h, t, _ = model
    smooth = smooth_grid(t, (64, 64), 4, 2)
    g = torch.Generator().manual_seed(3)
    shuffled = smooth.reshape(-1)[torch.randperm(smooth.numel(), generator=g)].reshape(64, 64)
    for grid, tells in ((smooth, True), (shuffled, False)):
        context = compress_layers(h, t, grid, coding="context")
        entropy = compress_layers(h, t, grid, coding="entropy")
        for c, e in zip(context, entropy):
            hc, he = read_header(c), read_header(e)
            if hc.num_symbols < 100:
                continue
            factors = bytes(c[-4 - hc.payload_len :][:2])
            if tells:
                assert min(factors) >= 32 and hc.payload_len < 0.5 * he.payload_len, (factors, hc, he)
            else:
                assert max(factors) <= 12 and hc.payload_len < 1.05 * he.payload_len + 8, (factors, hc, he)


def test_context_coding_errors(model, entropy_only):
    _, h, t, idx = model
    with pytest.raises(ValueError, match=r"grid \[\.\.\., H, W\].*\[400\]"):
        compress_layers(h, t, idx, coding="context")
    grid = idx.reshape(20, 20)
    chunks = compress_layers(h, t, grid, coding="context")
    assert all(read_header(c).coding == "context" for c in chunks)
    i = 1
    payload = _payload(chunks[i])
    bad = {
        "factor": bytes([0]) + payload[1:],
        "words": payload[:-1],
        "short": payload[:1],
    }
    messages = {"factor": r"neighbour factors \[0, ", "words": "not 2 header bytes", "short": "not 2 header bytes"}
    for name, p in bad.items():
        stream = list(chunks[: i + 1])
        stream[i] = with_section(stream[i], payload=p)
        with pytest.raises(BitstreamError, match=messages[name]):
            decompress_layers(h, t, stream)
    head = bytearray(chunks[0][:HEADER_SIZE])  # the same chunk 0 with batch shape [400]: not a grid
    struct.pack_into("<B", head, FIELDS["ndim"][0], 1)
    body = bytes(head) + struct.pack("<Q", 400) + chunks[0][HEADER_SIZE + 16 : -4]
    with pytest.raises(BitstreamError, match=r"chunk 0: context coding needs indices laid out on a grid"):
        decompress_layers(h, t, [body + struct.pack("<I", zlib.crc32(body))])


def test_context_coding_of_a_long_thin_grid_falls_back_to_entropy(model, monkeypatch, entropy_only):
    """More anti-diagonals than MAX_DIAGONALS: the layers are entropy coded; a context chunk of such a grid is refused."""
    import svq_modules.coding.context as context

    _, h, t, idx = model
    monkeypatch.setattr(context, "MAX_DIAGONALS", 100)
    line = idx.reshape(1, 400)
    chunks = compress_layers(h, t, line, coding="context")
    assert {read_header(c).coding for c in chunks} == {"entropy"}
    assert torch.equal(decompress_layers(h, t, chunks).nodes, decode_codes(t, encode_indices(t, idx)))
    monkeypatch.setattr(context, "MAX_DIAGONALS", 1000)
    forced = compress_layers(h, t, line, coding="context")
    assert read_header(forced[0]).coding == "context"
    monkeypatch.setattr(context, "MAX_DIAGONALS", 100)
    with pytest.raises(BitstreamError, match="more than 100 anti-diagonals"):
        decompress_layers(h, t, forced)


# ------------------------------------------------------------------------------------ adaptive context coding


def test_adaptive_coding_learns_what_the_model_does_not_know(model, entropy_only):
    """Codes drawn from 3 of the model's codewords, in random places (the neighbours tell nothing): the static
    rows pay the model's code lengths, the adaptive ones learn the grid's own counts and get near its
    empirical entropy (log2 3 bits a vector over all layers)."""
    _, h, t, _ = model
    g = torch.Generator().manual_seed(5)
    three = torch.randperm(t.num_leaves, generator=g)[:3]
    grid = three[torch.randint(0, 3, (64, 64), generator=g)]
    streams = {c: compress_layers(h, t, grid, coding=c) for c in ("context", "adaptive")}
    sizes = {c: sum(len(_payload(x)) for x in chunks) for c, chunks in streams.items()}
    ideal = 64 * 64 * math.log2(3) / 8
    assert sizes["adaptive"] < 0.8 * sizes["context"], sizes
    assert sizes["adaptive"] < 1.15 * ideal + 16 * t.num_layers, (sizes, ideal)
    chunks = streams["adaptive"]
    assert "adaptive" in {read_header(c).coding for c in chunks}
    for a, c in zip(chunks, streams["context"]):  # each layer the smaller of the two (the coding byte says which)
        assert len(_payload(a)) <= len(_payload(c)) and read_header(a).coding in ("adaptive", "context")
    assert torch.equal(decompress_layers(h, t, chunks).nodes, decode_codes(t, encode_indices(t, grid.reshape(-1))))


def test_adaptive_coding_errors(model, monkeypatch, entropy_only, adaptive_only):
    """A bad beta byte, cut words, an adaptive chunk of a layer whose table would be too large: refused."""
    import svq_modules.coding.context as context

    _, h, t, idx = model
    chunks = compress_layers(h, t, idx.reshape(20, 20), coding="adaptive")
    assert {read_header(c).coding for c in chunks} == {"adaptive"}
    i = 1
    payload = _payload(chunks[i])
    bad = [(payload[:2] + bytes([0]) + payload[3:], r"neighbour factors and beta \[\d+, \d+, 0\]"),
           (payload[:-1], "not 3 header bytes"), (payload[:2], "not 3 header bytes")]
    for p, message in bad:  # beta 0, cut words, no words
        stream = list(chunks[: i + 1])
        stream[i] = with_section(stream[i], payload=p)
        with pytest.raises(BitstreamError, match=message):
            decompress_layers(h, t, stream)
    monkeypatch.setattr(context, "MAX_ADAPTIVE_ENTRIES", 0)
    with pytest.raises(BitstreamError, match="table of counts would exceed 0 entries"):
        decompress_layers(h, t, chunks)


def test_adaptive_coding_round_trips_in_blocks(model, monkeypatch, entropy_only, adaptive_only):
    """Diagonals split into blocks of a few vectors (the decoder's counts must still wait for the whole diagonal),
    batch items side by side, layers where only some vectors send a symbol: exact at every prefix."""
    import svq_modules.coding.context as context

    _, h, t, idx = model
    monkeypatch.setattr(context, "_BLOCK_ENTRIES", 7)
    for grid in (idx.reshape(2, 10, 20), smooth_grid(t, (3, 17, 11), 2, 4)):
        ref = decode_codes(t, encode_indices(t, grid.reshape(-1)))
        chunks = compress_layers(h, t, grid, coding="adaptive")
        assert {read_header(c).coding for c in chunks} == {"adaptive"}
        for n in range(1, t.num_layers + 1):
            assert torch.equal(decompress_layers(h, t, chunks[:n]).nodes, ref[:n])


def test_adaptive_coding_falls_back_to_context(model, monkeypatch, entropy_only):
    """A layer whose table of counts would be too large is context coded without adaptation, and decodes."""
    import svq_modules.coding.context as context

    _, h, t, idx = model
    grid = idx.reshape(20, 20)
    ref = decode_codes(t, encode_indices(t, idx))
    monkeypatch.setattr(context, "MAX_ADAPTIVE_ENTRIES", 0)
    fallback = compress_layers(h, t, grid, coding="adaptive")
    assert {read_header(c).coding for c in fallback} == {"context"}
    assert fallback == compress_layers(h, t, grid, coding="context")
    assert torch.equal(decompress_layers(h, t, fallback).nodes, ref)

"""Unit tests of the modules of ``svq_modules.coding``: chunk, tables, payload, stream checks, container.

The end-to-end behaviour (round trips, corrupt input, fuzzing, CLI) is in
``tests/test_bitstream.py``; this file checks each module's own contract, the
raw fallback of entropy coding, the argument checks, the golden ``.svq`` file
and the package's structure rules. Small models: a few seconds on 2 cores.
"""

from __future__ import annotations

import ast
import hashlib
import io
import zlib
from pathlib import Path

import mixtures
import numpy as np
import pytest
import torch

import svq_modules.coding.stream as stream_module
from svq_modules.coding import (
    BitstreamError,
    compress_layers,
    decompress_layers,
    fingerprint_tensors,
    model_fingerprint,
    read_header,
)
from svq_modules.coding.chunk import MIN_CHUNK_SIZE, check_sequence, pack_chunk, parse_chunk
from svq_modules.coding.container import pack_container, read_container, unpack_container
from svq_modules.coding.payload import pack_raw, unpack_raw
from svq_modules.hierarchy import Hierarchy
from svq_modules.layers import LayerTables, decode_codes, encode_indices

DATA = Path(__file__).resolve().parent / "data"
CODING_DIR = Path(stream_module.__file__).resolve().parent


def make_model(seed: int, n: int = 400, k: int = 32, d: int = 3, bits=(2, 1, 1)):
    """Hierarchy, tables and indices of :func:`mixtures.make_model` (its data left out)."""
    return mixtures.make_model(seed, n, k, d, bits)[1:]


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def entropy_sizes(monkeypatch, h, t, idx) -> list[int]:
    """Entropy-coded payload bytes of every layer (the fallback to raw switched off)."""
    with monkeypatch.context() as m:
        m.setattr(stream_module, "raw_payload_size", lambda *args: 1 << 62)
        chunks = compress_layers(h, t, idx)
    assert all(read_header(c).coding == "entropy" for c in chunks)
    return [read_header(c).payload_len for c in chunks]


# ------------------------------------------------------------------------------ raw fallback of entropy coding


def test_entropy_layer_larger_than_raw_is_written_raw(monkeypatch):
    """Branch probabilities from counts that contradict the data: entropy coding would cost ~16 bits per decision."""
    h, t, _ = make_model(5)
    used = [3, 17]
    on_path = torch.zeros(h.num_nodes, dtype=torch.bool)  # the two leaves and their ancestors
    for v in used:
        while v >= 0:
            on_path[v] = True
            v = int(h.parent[v])
    # every node the data goes through gets count 1, every node it avoids 1e6: q says "never this way"
    skewed = Hierarchy(**{**h.as_dict(), "count": torch.where(on_path, 1.0, 1e6)})
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(used)[torch.randint(0, 2, (500,), generator=g)]
    ref = decode_codes(t, encode_indices(t, idx))

    raw = compress_layers(skewed, t, idx, coding="raw")
    ent_sizes = entropy_sizes(monkeypatch, skewed, t, idx)
    chunks = compress_layers(skewed, t, idx)  # coding="entropy"
    fallbacks = 0
    for layer, (c, r) in enumerate(zip(chunks, raw)):
        hc, hr = read_header(c), read_header(r)
        assert len(c) <= len(r)
        if ent_sizes[layer] > hr.payload_len:
            fallbacks += 1
            assert hc.coding == "raw" and hc.step == 0
            if layer == fallbacks - 1:  # all layers so far raw: byte for byte the raw stream (same CRC links)
                assert c == r
        else:
            assert hc.coding == "entropy" and hc.payload_len == ent_sizes[layer]
    assert fallbacks >= 3  # the constructed case: entropy coding is several times larger in every coded layer
    for n in range(1, len(chunks) + 1):
        assert torch.equal(decompress_layers(skewed, t, chunks[:n]).nodes, ref[:n])


def test_stream_mixing_raw_and_entropy_chunks_decodes_exactly(monkeypatch, model):
    h, t, idx = model
    ref = decode_codes(t, encode_indices(t, idx))
    raw_sizes = [read_header(c).payload_len for c in compress_layers(h, t, idx, coding="raw")]
    ent_sizes = entropy_sizes(monkeypatch, h, t, idx)
    for embed in (None, "float16"):
        chunks = compress_layers(h, t, idx, embed_centers=embed)
        codings = [read_header(c).coding for c in chunks]
        # the rule: raw exactly where the entropy payload would be larger
        assert codings == ["raw" if e > r else "entropy" for e, r in zip(ent_sizes, raw_sizes)]
        assert set(codings) == {"raw", "entropy"}  # this model gives a mix (checked, so the test means something)
        for n in range(1, len(chunks) + 1):
            assert torch.equal(decompress_layers(h, t, chunks[:n]).nodes, ref[:n])
            if embed is not None:
                assert torch.equal(decompress_layers(None, None, chunks[:n]).nodes, ref[:n])


# ------------------------------------------------------------------------------ golden .svq file (previous main)


def _golden_cli_model() -> tuple[Hierarchy, LayerTables]:
    """The model stored in golden_cli_v1.svq, read as documented (zlib + torch.save), without the CLI."""
    container = read_container(DATA / "golden_cli_v1.svq")
    obj = torch.load(io.BytesIO(zlib.decompress(container.model)), map_location="cpu", weights_only=True)
    state = obj["state_dict"]
    h = Hierarchy.from_dict({k.removeprefix("tree_"): v for k, v in state.items() if k.startswith("tree_")})
    t = LayerTables.from_dict({k.removeprefix("layers_"): v for k, v in state.items() if k.startswith("layers_")})
    return h, t


def test_golden_cli_file_decodes_with_its_model():
    container = read_container(DATA / "golden_cli_v1.svq")
    expected = np.load(DATA / "golden_cli_v1_expected.npz")
    h, t = _golden_cli_model()
    assert model_fingerprint(h, t) == container.fingerprint
    full = decompress_layers(h, t, container.chunks)
    assert np.array_equal(full.reconstruction().float().numpy(), expected["full"])
    assert np.array_equal(full.reconstruction(1).float().numpy(), expected["layer1"])
    one = decompress_layers(h, t, read_container(DATA / "golden_cli_v1.svq", max_chunks=1).chunks)
    assert np.array_equal(one.reconstruction().float().numpy(), expected["layer1"])
    # re-encoding the decoded indices today: same nodes, no chunk larger than the file's
    again = compress_layers(h, t, full.nodes[-1].reshape(full.batch_shape))
    assert torch.equal(decompress_layers(h, t, again).nodes, full.nodes)
    assert all(len(a) <= len(c) for a, c in zip(again, container.chunks))


# ------------------------------------------------------------------------------ fingerprint


def test_model_fingerprint_follows_the_documented_recipe(model):
    """docs/bitstream.md: BLAKE2b-64 over the domain, then per field its name, shape and canonical bytes."""
    h, t, _ = model
    d = hashlib.blake2b(digest_size=8)
    d.update(b"svq-modules/bitstream/fingerprint/v1")
    for prefix, obj, names in (
        ("tree.", h, ["parent", "children", "size", "count", "center", "merge_cost"]),
        ("layers.", t, ["widths", "leaf_node", "leaf_symbol", "group_start", "group_size", "members"]),
    ):
        for name in names:
            v = getattr(obj, name)
            d.update(f"{prefix}{name}:{list(v.shape)};".encode())
            dtype = "<f4" if v.is_floating_point() else "<i8"
            d.update(np.ascontiguousarray(v.numpy(), dtype=dtype).tobytes())
    assert model_fingerprint(h, t) == d.digest()


def test_fingerprint_tensors_contract():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([1, 2], dtype=torch.int32)}
    fp = fingerprint_tensors(a, b"test/v1")
    assert len(fp) == 8 and len(fingerprint_tensors(a, b"test/v1", digest_size=20)) == 20
    # canonical: float64 copy, int64 copy and bool->int give the same digest
    same = {"w": a["w"].double(), "n": a["n"].long()}
    assert fingerprint_tensors(same, b"test/v1") == fp
    assert fingerprint_tensors({"b": torch.tensor([True, False])}, b"d") == fingerprint_tensors(
        {"b": torch.tensor([1, 0])}, b"d"
    )
    # everything named in the docstring changes it: domain, name, order, shape, value
    assert fingerprint_tensors(a, b"test/v2") != fp
    assert fingerprint_tensors({"W": a["w"], "n": a["n"]}, b"test/v1") != fp
    assert fingerprint_tensors({"n": a["n"], "w": a["w"]}, b"test/v1") != fp
    assert fingerprint_tensors({"w": a["w"].reshape(3, 2), "n": a["n"]}, b"test/v1") != fp
    assert fingerprint_tensors({"w": a["w"] + 1e-3, "n": a["n"]}, b"test/v1") != fp
    with pytest.raises(ValueError, match="domain"):
        fingerprint_tensors(a, "test/v1")
    with pytest.raises(ValueError, match="mapping"):
        fingerprint_tensors([a["w"]], b"d")
    with pytest.raises(ValueError, match="digest_size"):
        fingerprint_tensors(a, b"d", digest_size=65)
    with pytest.raises(ValueError, match="tensors\\['z'\\]"):
        fingerprint_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, b"d")


# ------------------------------------------------------------------------------ chunk and payload units


def test_pack_and_parse_chunk_round_trip():
    fields = dict(
        coding="entropy", embed="float16", step=3, layer=0, stream_layers=2, model_layers=3, fingerprint=b"12345678",
        num_vectors=6, num_symbols=5, dim=4, num_leaves=9, link=0, batch_shape=(2, 3),
    )  # fmt: skip
    data = pack_chunk(**fields, embed_section=b"EMB", payload=b"PAYLOAD")
    assert len(data) == MIN_CHUNK_SIZE + 2 * 8 + 3 + 7
    c = parse_chunk(data, "x")
    assert bytes(c.embed) == b"EMB" and bytes(c.payload) == b"PAYLOAD"
    for name, value in fields.items():
        assert getattr(c.header, name) == value, name
    assert c.header.crc == zlib.crc32(data[:-4]) and c.header.version == 1
    nxt = parse_chunk(
        pack_chunk(**{**fields, "layer": 1, "link": c.header.crc, "batch_shape": None}, embed_section=b"E", payload=b""), "y"
    )
    assert check_sequence([c, nxt]) == c.header
    with pytest.raises(BitstreamError, match="duplicated"):
        check_sequence([c, c])


@pytest.mark.parametrize("widths", [[3, 3, 3, 3], [0, 1, 5, 2, 7, 0, 3], [0, 0], []])
def test_raw_packing_round_trip_and_padding(widths):
    rng = np.random.default_rng(len(widths))
    w = np.array(widths, dtype=np.intp)
    sym = np.array([rng.integers(0, 1 << x) for x in widths], dtype=np.int64)
    data = pack_raw(sym, w)
    assert len(data) == (int(w.sum()) + 7) // 8
    assert np.array_equal(unpack_raw(memoryview(data), w, "t"), sym)
    if w.sum() % 8:
        bad = bytearray(data)
        bad[-1] |= 1  # the last bit is padding
        with pytest.raises(BitstreamError, match="padding"):
            unpack_raw(memoryview(bytes(bad)), w, "t")
    with pytest.raises(BitstreamError, match="raw payload has"):
        unpack_raw(memoryview(data + b"\0"), w, "t")


# ------------------------------------------------------------------------------ argument checks


def test_bad_arguments_fail_before_any_table_is_built(model, monkeypatch):
    h, t, idx = model

    def no_tables(*args, **kwargs):
        raise AssertionError("codec tables built before the arguments were checked")

    monkeypatch.setattr(stream_module, "codec_tables", no_tables)
    cases = [
        (dict(coding="zip"), "coding"),
        (dict(coding=["raw"]), "coding"),
        (dict(coding=None), "coding"),
        (dict(embed_centers="float64"), "embed_centers"),
        (dict(embed_centers=["float16"]), "embed_centers"),  # unhashable: still a ValueError
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=t.num_layers + 1), "num_layers"),
        (dict(num_layers=True), "num_layers"),
        (dict(num_layers=1.0), "num_layers"),
        (dict(entropy_step=0), "entropy_step"),
        (dict(entropy_step=9), "entropy_step"),
        (dict(entropy_step=2.5), "entropy_step"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            compress_layers(h, t, idx, **kwargs)
        assert "\n" not in str(e.value)
    for bad_idx, message in [(idx.float(), "integer"), (idx + 100, "out of range"), (idx.numpy().astype(np.float32), "integer"),
                             (np.array([2**64 - 1], dtype=np.uint64), "out of range"), ("0 1", "integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            compress_layers(h, t, bad_idx)
    with pytest.raises(ValueError, match="hierarchy must be a Hierarchy"):
        compress_layers(t, t, idx)


def test_decoder_checks_arguments_and_chunk_types_first(model, monkeypatch):
    h, t, idx = model
    chunks = compress_layers(h, t, idx)

    def no_parse(*args, **kwargs):
        raise AssertionError("a chunk was parsed before the arguments were checked")

    monkeypatch.setattr(stream_module, "parse_chunk", no_parse)
    with pytest.raises(ValueError, match="num_layers"):
        decompress_layers(h, t, chunks, num_layers=0)
    with pytest.raises(ValueError, match="tables must be LayerTables"):
        decompress_layers(h, h, chunks)
    with pytest.raises(BitstreamError, match="chunk 2 must be bytes"):
        decompress_layers(h, t, [chunks[0], chunks[1], [1, 2]])
    monkeypatch.undo()
    out = decompress_layers(h, t, chunks)
    with pytest.raises(ValueError, match="num_layers"):
        out.reconstruction(0)
    with pytest.raises(ValueError, match="num_layers"):
        out.reconstruction(out.num_layers + 1)
    assert torch.equal(out.reconstruction(np.int64(1)), out.reconstruction(1))


def test_container_checks_what_it_writes_and_reads(model):
    h, t, idx = model
    chunks = compress_layers(h, t, idx)
    with pytest.raises(ValueError, match="at least one chunk"):
        pack_container([])
    with pytest.raises(ValueError, match="single bytes"):
        pack_container(chunks[0])
    with pytest.raises(ValueError, match="model must be bytes"):
        pack_container(chunks, model="a model")
    with pytest.raises(BitstreamError, match="chunk 1 must be bytes"):
        pack_container([chunks[0], 5])
    with pytest.raises(BitstreamError, match="expected layer 1"):
        pack_container([chunks[0], chunks[2]])
    data = pack_container(chunks)
    with pytest.raises(ValueError, match="max_chunks"):
        unpack_container(data, max_chunks=0)
    assert unpack_container(data, max_chunks=99).chunks == chunks


# ------------------------------------------------------------------------------ structure of the package


def test_coding_modules_follow_the_structure_rules():
    """No ``_private`` imports between modules, functions <= 120 lines, classes <= 450 lines."""
    for path in sorted(CODING_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("svq_modules")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private names {private} from {node.module}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 120, f"{path.name}: {node.name} is too long"
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 450, f"{path.name}: class {node.name} is too long"

"""Images through the command line: ``compress photo.png --model CKPT``, ``decompress``, ``info [--json]``.

A tiny ScalableVQAutoencoder is trained once per module (a plain PyTorch loop
on crops of the two test images, a few seconds) and saved by Lightning's
``Trainer.save_checkpoint``, the format ``train.py`` writes. Runs in-process
through ``svq_modules.cli.main(argv)``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svq_modules.cli import main

#: layers of the tiny model: bits [2, 2] plus the final layer that reaches the codewords
LAYERS = 3

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def picture(h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` uint8: smooth gradients, a disc and a bar (a simple photo-like scene)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(5 * xx + 3 * yy)], axis=-1)
    disc = (yy - 0.5) ** 2 + (xx - 0.35) ** 2 < 0.06
    img[disc] = [0.9, 0.2, 0.1]
    img[(np.abs(xx - 0.75) < 0.06)] *= 0.3
    return np.round(255 * img).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def train_tiny(images: list[np.ndarray], seed: int = 0):
    """A ScalableVQAutoencoder (K=64, D=4, bits 2,2 -> 3 layers, 4-pixel patches) fitted to 16x16 crops of ``images``.

    Grayscale images (``[H, W, 1]``) are replicated to 3 channels, as ``compress`` does.
    """
    from svq_modules.lightning import ScalableVQAutoencoder

    torch.manual_seed(seed)
    model = ScalableVQAutoencoder(codebook_size=64, dim=4, bits=[2, 2], channels=32, patch_size=4, num_res_blocks=0,
                                  lr=1e-2)  # fmt: skip
    crops = []
    for img in images:
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().expand(3, -1, -1) / 255
        crops += [x[:, i : i + 16, j : j + 16] for i in range(0, x.shape[1] - 15, 6) for j in range(0, x.shape[2] - 15, 6)]
    x = torch.stack(crops)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is ~8x faster on a busy machine
    try:
        for _ in range(400):
            out = model.quantizer(model.encode(x))
            loss = F.mse_loss(model.decode(out.quantized), x) + out.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.quantizer.update()
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``odd.png`` (37x53 RGB), ``gray.jpg`` (29x22 grayscale), ``model.ckpt`` and ``other.ckpt`` (one decoder weight changed)."""
    import lightning as L

    d = tmp_path_factory.mktemp("images")
    rgb = picture(37, 53)
    gray = np.round(picture(29, 22).astype(np.float64).mean(-1)).astype(np.uint8)
    Image.fromarray(rgb).save(d / "odd.png")
    Image.fromarray(gray).save(d / "gray.jpg", quality=95)
    model = train_tiny([rgb, pixels(d / "gray.jpg")[:, :, None]])
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(d / "model.ckpt")
    ckpt = torch.load(d / "model.ckpt", weights_only=True)
    ckpt["state_dict"]["decoder.0.bias"][0] += 1e-3  # same architecture, same quantizer, another model
    torch.save(ckpt, d / "other.ckpt")
    assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", d / "odd.svq") == 0
    assert run_quiet("compress", d / "gray.jpg", "--model", d / "model.ckpt", "-o", d / "gray.svq") == 0
    return d


def run_quiet(*argv) -> int:
    return main([str(a) for a in argv] + ["-q"])


def info_json(capsys, path: Path) -> dict:
    rc, out, err = run(capsys, "info", path, "--json")
    assert rc == 0, err
    return json.loads(out)


def assert_refused(capsys, out_path: Path, *argv) -> str:
    """Exit status 1, one ``error:`` line on stderr, no traceback, no output file, no temporary file left."""
    before = set(out_path.parent.iterdir())
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out_path.exists()
    assert set(out_path.parent.iterdir()) == before
    return err


def decode(capsys, d: Path, src: Path, out: Path, *extra) -> np.ndarray:
    rc, _, err = run(capsys, "decompress", src, "--model", d / "model.ckpt", "-o", out, *extra)
    assert rc == 0, err
    return pixels(out)


# ------------------------------------------------------------------------------------------ round trips


def test_rgb_round_trip_every_layer(files, capsys, tmp_path):
    d = files
    original = pixels(d / "odd.png")
    info = info_json(capsys, d / "odd.svq")
    assert (info["height"], info["width"], info["channels"], info["num_layers"]) == (37, 53, 3, LAYERS)
    quality = []
    for layers in range(1, LAYERS + 1):
        out = decode(capsys, d, d / "odd.svq", tmp_path / f"l{layers}.png", "--layers", layers)
        assert out.shape == original.shape and out.dtype == np.uint8
        quality.append(psnr(out, original))
    assert all(b >= a for a, b in zip(quality, quality[1:])), quality
    flat = np.broadcast_to(original.reshape(-1, 3).mean(0).round(), original.shape)  # the best single colour
    assert quality[-1] > psnr(flat, original) + 3, quality
    full = decode(capsys, d, d / "odd.svq", tmp_path / "all.png")  # default: every layer
    assert np.array_equal(full, pixels(tmp_path / f"l{LAYERS}.png"))


def test_gray_jpeg_round_trip(files, capsys, tmp_path):
    d = files
    original = pixels(d / "gray.jpg")
    assert original.ndim == 2
    info = info_json(capsys, d / "gray.svq")
    assert (info["height"], info["width"], info["channels"], info["model_channels"]) == (29, 22, 1, 3)
    quality = []
    for layers in range(1, LAYERS + 1):
        out = decode(capsys, d, d / "gray.svq", tmp_path / f"l{layers}.png", "--layers", layers)
        assert out.shape == original.shape  # written back as grayscale
        quality.append(psnr(out, original))
    assert all(b >= a for a, b in zip(quality, quality[1:])), quality
    with Image.open(tmp_path / f"l{LAYERS}.png") as im:
        assert im.mode == "L" and im.size == (22, 29)
    jpeg = decode(capsys, d, d / "gray.svq", tmp_path / "out.jpg")
    assert jpeg.shape == original.shape and psnr(jpeg, pixels(tmp_path / f"l{LAYERS}.png")) > 35  # JPEG q95 of the PNG


def test_cut_after_each_layer_decodes_that_layer(files, capsys, tmp_path):
    d = files
    data = (d / "odd.svq").read_bytes()
    ends = info_json(capsys, d / "odd.svq")["layer_end"]
    for layer, end in enumerate(ends):
        cut = tmp_path / f"cut{layer}.svq"
        cut.write_bytes(data[:end])
        info = info_json(capsys, cut)
        assert info["num_layers"] == layer + 1 and info["layer_end"] == ends[: layer + 1]
        assert info["complete"] == (layer == len(ends) - 1) and info["stream_layers"] == len(ends)
        run(capsys, "decompress", cut, "--model", d / "model.ckpt", "-o", tmp_path / f"cut{layer}.png")
        run(capsys, "decompress", d / "odd.svq", "--model", d / "model.ckpt", "--layers", layer + 1,
            "-o", tmp_path / f"full{layer}.png")  # fmt: skip
        assert (tmp_path / f"cut{layer}.png").read_bytes() == (tmp_path / f"full{layer}.png").read_bytes()


def test_info_json(files, capsys):
    d = files
    info = info_json(capsys, d / "odd.svq")
    size = (d / "odd.svq").stat().st_size
    ends = info["layer_end"]
    assert len(ends) == info["num_layers"] == len(info["bpp"]) == len(info["layer_bytes"]) == LAYERS
    assert info["header_bytes"] < ends[0] and all(b > a for a, b in zip(ends, ends[1:])) and ends[-1] == size
    assert info["bytes"] == size and info["layer_bytes"] == np.diff([info["header_bytes"], *ends]).tolist()
    assert info["bpp"] == pytest.approx([8 * e / (37 * 53) for e in ends])
    assert info["latent_grid"] == [10, 14] and info["patch_size"] == 4 and info["padding"] == "edge"
    rc, text, _ = run(capsys, "info", d / "odd.svq")
    assert rc == 0 and f"37x53 RGB image, {LAYERS} layers" in text
    # the default for images: adaptive, each layer kept context coded where that is no larger, raw where smaller
    assert set(info["coding"]) <= {"adaptive", "context", "raw"}
    explicit = d / "odd_adaptive.svq"
    assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", explicit, "--coding", "adaptive") == 0
    assert explicit.read_bytes() == (d / "odd.svq").read_bytes()


def test_adaptive_image_file(files, capsys, tmp_path):
    """An image of 8x8 blocks in 3 colours (statistics the model never saw): adaptive layers, a smaller file
    than context coding of the same codewords (the same pixels), and a file cut after each layer decodes as
    ``--layers`` of the whole file."""
    d = files
    rng = np.random.default_rng(7)
    colours = rng.integers(0, 256, size=(3, 3))
    image = colours[rng.integers(0, 3, size=(12, 20))].repeat(8, 0).repeat(8, 1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "blocks.png")
    files_made = {}
    for coding in ("adaptive", "context"):
        files_made[coding] = tmp_path / f"{coding}.svq"
        assert run_quiet("compress", tmp_path / "blocks.png", "--model", d / "model.ckpt", "-o", files_made[coding],
                         "--coding", coding) == 0  # fmt: skip
    info = info_json(capsys, files_made["adaptive"])
    assert "adaptive" in info["coding"], info["coding"]
    assert info["bytes"] < info_json(capsys, files_made["context"])["bytes"]
    full = decode(capsys, d, files_made["adaptive"], tmp_path / "a.png")
    assert np.array_equal(full, decode(capsys, d, files_made["context"], tmp_path / "c.png"))
    data = files_made["adaptive"].read_bytes()
    for layer, end in enumerate(info["layer_end"]):
        (tmp_path / "cut.svq").write_bytes(data[:end])
        cut = decode(capsys, d, tmp_path / "cut.svq", tmp_path / "cut.png")
        assert np.array_equal(cut, decode(capsys, d, files_made["adaptive"], tmp_path / "l.png", "--layers", layer + 1))


def test_coding_option(files, capsys, tmp_path):
    """``--coding context`` / ``entropy`` / ``raw`` give the same pixels as the default adaptive coding; arrays
    refuse the grid codings."""
    d = files
    ref = decode(capsys, d, d / "odd.svq", tmp_path / "ref.png")
    for coding in ("context", "entropy", "raw"):
        out = tmp_path / f"{coding}.svq"
        assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", out, "--coding", coding) == 0
        assert set(info_json(capsys, out)["coding"]) <= {coding, "raw"}
        assert np.array_equal(decode(capsys, d, out, tmp_path / f"{coding}.png"), ref)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    for coding in ("context", "adaptive"):
        err = assert_refused(capsys, tmp_path / "x.svq", "compress", tmp_path / "x.npy", "-o", tmp_path / "x.svq",
                             "--coding", coding)
        assert f"--coding {coding}" in err and "entropy" in err


# --------------------------------------------------------------------------------- refused, nothing written


def cut_or_corrupt(data: bytes, ends: list[int]) -> dict[str, bytes]:
    from svq_modules.coding.image_file import IMAGE_HEADER_SIZE as head

    flip = lambda pos: data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :]  # noqa: E731
    cases = {
        "empty": b"",
        "inside the header": data[:10],
        "after the header only": data[:head],
        "inside the fields of layer 0": data[: head + 2],
        "trailing byte": data + b"\0",
        "byte in the image header": flip(9),
        "byte in the shared chunk fields of the header": flip(head - 10),
        "coding of layer 1": flip(ends[0]),
        "symbol count of layer 1": flip(ends[0] + 2),
        "last byte": flip(len(data) - 1),
    }
    starts = [head, *ends[:-1]]
    for layer, (start, end) in enumerate(zip(starts, ends)):
        cases[f"inside layer {layer}"] = data[: (start + end) // 2]
        cases[f"one byte short of layer {layer}"] = data[: end - 1]
        cases[f"byte in the payload of layer {layer}"] = flip(end - 6)
    return cases


def test_cut_inside_a_layer_or_corrupt_is_refused(files, capsys, tmp_path):
    d = files
    data = (d / "odd.svq").read_bytes()
    ends = info_json(capsys, d / "odd.svq")["layer_end"]
    for name, bad in cut_or_corrupt(data, ends).items():
        src = tmp_path / "bad.svq"
        src.write_bytes(bad)
        out = tmp_path / "out.png"
        err = assert_refused(capsys, out, "decompress", src, "--model", d / "model.ckpt", "-o", out)
        assert "bad.svq" in err, (name, err)
        if bad[:4] == b"SVQI":  # an image file: info refuses it too
            assert_refused(capsys, tmp_path / "none", "info", src, "--json")


def test_other_checkpoint_is_refused(files, capsys, tmp_path):
    d = files
    out = tmp_path / "out.png"
    err = assert_refused(capsys, out, "decompress", d / "odd.svq", "--model", d / "other.ckpt", "-o", out)
    assert "another model" in err


def test_image_misuse(files, capsys, tmp_path):
    d = files
    out = tmp_path / "x.svq"
    assert "--model" in assert_refused(capsys, out, "compress", d / "odd.png", "-o", out)
    assert "--bits" in assert_refused(capsys, out, "compress", d / "odd.png", "--model", d / "model.ckpt", "--bits", "2,1",
                                      "-o", out)  # fmt: skip
    before = (d / "odd.png").read_bytes()
    rc, _, err = run(capsys, "compress", d / "odd.png", "--model", d / "model.ckpt", "-o", d / "odd.png")
    assert rc == 1 and "same file" in err and (d / "odd.png").read_bytes() == before
    png = tmp_path / "out.png"
    assert f"holds {LAYERS} layers" in assert_refused(capsys, png, "decompress", d / "odd.svq", "--model",
                                                      d / "model.ckpt", "--layers", LAYERS + 1, "-o", png)  # fmt: skip
    assert "--model" in assert_refused(capsys, png, "decompress", d / "odd.svq", "-o", png)
    npy = tmp_path / "out.npy"
    assert "unsupported output type" in assert_refused(capsys, npy, "decompress", d / "odd.svq", "--model",
                                                       d / "model.ckpt", "-o", npy)  # fmt: skip
    not_ckpt = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(2)}, not_ckpt)
    assert "model.pt" in assert_refused(capsys, out, "compress", d / "odd.png", "--model", not_ckpt, "-o", out)
    rgba = tmp_path / "alpha.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba)
    assert "transparent" in assert_refused(capsys, out, "compress", rgba, "--model", d / "model.ckpt", "-o", out)


def test_array_files_keep_their_path(files, capsys, tmp_path):
    d = files
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    assert run_quiet("compress", tmp_path / "x.npy", "-o", tmp_path / "x.svq", "--codebook-size", "4", "--bits", "1",
                     "--epochs", "1") == 0  # fmt: skip
    png = tmp_path / "x.png"
    assert "array file" in assert_refused(capsys, png, "decompress", tmp_path / "x.svq", "--model", d / "model.ckpt",
                                          "-o", png)  # fmt: skip
    assert "--json" in assert_refused(capsys, tmp_path / "none", "info", tmp_path / "x.svq", "--json")
    rc, out, _ = run(capsys, "info", tmp_path / "x.svq")
    assert rc == 0 and "layer chunks" in out


def test_image_file_bytes(files):
    """``coding.image_file`` alone: pack then unpack gives header and chunks back; a grid the chunks do not fit is refused."""
    from svq_modules.coding import BitstreamError, read_header
    from svq_modules.coding.image_file import IMAGE_HEADER_SIZE, ImageHeader, pack_image_file, unpack_image_file

    data = (files / "odd.svq").read_bytes()
    f = unpack_image_file(data)
    again = unpack_image_file(pack_image_file(f.header, f.chunks))
    assert again.header == f.header and again.chunks == f.chunks and again.layer_end == f.layer_end
    # compacted: a layer takes its payload and at most 2 + 2 varints of <= 3 bytes + CRC 4 = 12 bytes more
    sizes = np.diff([IMAGE_HEADER_SIZE, *f.layer_end])
    payloads = [read_header(c).payload_len for c in f.chunks]
    assert all(p + 6 <= n <= p + 12 for n, p in zip(sizes, payloads)), (sizes, payloads)
    for cut in range(len(data) + 1):  # every prefix: a valid file exactly when cut after a layer
        if cut in f.layer_end:
            part = unpack_image_file(data[:cut])
            assert part.chunks == f.chunks[: part.num_layers] and part.stream_layers == f.num_layers
        else:
            with pytest.raises(BitstreamError):
                unpack_image_file(data[:cut])
    # a length field in a longer byte form than needed (same value, same chunk CRC) is refused
    pos = f.layer_end[0] + 2  # layer 1's symbol count
    end = pos + next(i for i in range(8) if not data[pos + i] & 0x80)
    padded = data[:end] + bytes([data[end] | 0x80, 0]) + data[end + 1 :]
    with pytest.raises(BitstreamError, match="minimal LEB128"):
        unpack_image_file(padded)
    # version 1 files (full chunks back to back after a 40-byte header) are still read
    v1 = bytearray(data[:36])
    v1[4] = 1
    v1 += struct.pack("<I", zlib.crc32(bytes(v1)))
    old = unpack_image_file(bytes(v1) + b"".join(f.chunks))
    assert old.header == f.header and old.chunks == f.chunks and old.header_size == 40
    assert old.layer_end == np.cumsum([40, *map(len, f.chunks)])[1:].tolist()
    wrong = ImageHeader(41, 53, 3, 3, "edge", 4, (11, 14), f.header.fingerprint)  # a valid header of another grid
    with pytest.raises(BitstreamError, match="latent grid"):
        pack_image_file(wrong, f.chunks)
    with pytest.raises(ValueError, match="latent grid"):
        pack_image_file(f.header._replace(grid=(9, 14)), f.chunks)


def test_rate_weight_option(files, capsys, tmp_path):
    """``--rate-weight``: 0 is the nearest codeword; a larger weight gives a smaller file, which still decodes at
    every layer; a bad value exits 1 with one line and no file."""
    d = files
    sizes, quality = {}, {}
    for w in ("0", "2", "8"):
        out = tmp_path / f"w{w}.svq"
        assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", out, "--rate-weight", w) == 0
        sizes[w] = out.stat().st_size
        quality[w] = psnr(decode(capsys, d, out, tmp_path / f"w{w}.png"), pixels(d / "odd.png"))
        assert info_json(capsys, out)["num_layers"] == LAYERS
    assert sizes["0"] >= sizes["2"] >= sizes["8"] and sizes["0"] > sizes["8"], sizes
    assert quality["0"] >= quality["8"], quality
    # the default is the documented weight
    from svq_modules.cli.images import RATE_WEIGHT

    explicit = tmp_path / "explicit.svq"
    assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", explicit,
                     "--rate-weight", RATE_WEIGHT) == 0
    assert (d / "odd.svq").read_bytes() == explicit.read_bytes()
    err = assert_refused(capsys, tmp_path / "bad.svq", "compress", d / "odd.png", "--model", d / "model.ckpt",
                         "-o", tmp_path / "bad.svq", "--rate-weight", "nan")
    assert "--rate-weight must be a finite float >= 0, got nan" in err


def test_repeat_bits_option(files, capsys, tmp_path):
    """``--repeat-bits``: a smaller share gives a smaller file that still decodes; outside [0, 1] is refused.
    With fixed layer weights (full depth alone): the default's check of every layer may switch weights between
    shares."""
    d = files
    sizes = {}
    full_depth = ",".join(["0"] * (LAYERS - 1) + ["1"])
    for share in ("1", "0.4", "0"):
        out = tmp_path / f"r{share}.svq"
        assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", out, "--rate-weight", "1",
                         "--repeat-bits", share, "--layer-weights", full_depth) == 0
        sizes[share] = out.stat().st_size
        decoded = decode(capsys, d, out, tmp_path / f"r{share}.png")
        assert decoded.shape == pixels(d / "odd.png").shape
    assert sizes["1"] >= sizes["0.4"] >= sizes["0"] and sizes["1"] > sizes["0"], sizes
    out = tmp_path / "default.svq"  # with the default layer weights (and their check) as well
    assert run_quiet("compress", d / "odd.png", "--model", d / "model.ckpt", "-o", out, "--repeat-bits", "0") == 0
    assert decode(capsys, d, out, tmp_path / "default.png").shape == pixels(d / "odd.png").shape
    for bad in ("1.5", "-0.1", "nan"):
        err = assert_refused(capsys, tmp_path / "bad.svq", "compress", d / "odd.png", "--model", d / "model.ckpt",
                             "-o", tmp_path / "bad.svq", "--repeat-bits", bad)
        assert "--repeat-bits must be a float in [0, 1]" in err


def test_layer_weights_option(files, capsys, tmp_path):
    """``--layer-weights``: by default :func:`default_layer_weights`, kept where every layer then decodes within
    ``LAYER_SLACK`` of the one before or better, else full depth alone if its worst step is smaller; a wrong count
    or value exits 1 with one line, no file."""
    from svq_modules.cli.images import COARSE_WEIGHT, LAYER_SLACK, default_layer_weights

    d = files
    weights = default_layer_weights(LAYERS)
    assert weights == [COARSE_WEIGHT] * min(2, LAYERS - 1) + [0.0] * (LAYERS - 3) + [1.0]
    kept = []
    for name, default in (("odd.png", d / "odd.svq"), ("gray.jpg", d / "gray.svq")):
        files_by = {}
        for tag, w in (("layered", weights), ("full", [0.0] * (LAYERS - 1) + [1.0])):
            out = tmp_path / f"{name}.{tag}.svq"
            assert run_quiet("compress", d / name, "--model", d / "model.ckpt", "-o", out,
                             "--layer-weights", ",".join(map(str, w))) == 0
            files_by[tag] = out
        original = pixels(d / name).astype(np.float64)
        worst = {}
        for tag, path in files_by.items():
            errors = [float(((decode(capsys, d, path, tmp_path / f"{name}.{tag}.{n}.png", "--layers", n)
                              .astype(np.float64) - original) ** 2).mean()) for n in range(1, LAYERS + 1)]
            worst[tag] = max(b / a for a, b in zip(errors, errors[1:]))
        keep = worst["layered"] <= 1 + LAYER_SLACK or worst["full"] >= worst["layered"]
        assert default.read_bytes() == files_by["layered" if keep else "full"].read_bytes()
        kept.append(keep)
        assert files_by["layered"].read_bytes() != files_by["full"].read_bytes()
    assert kept == [True, False]  # this small model: both branches (the gray image's last layer would drop)
    for bad, message in (("1,2", f"--layer-weights must be {LAYERS} finite numbers >= 0 (one per layer), not all 0"),
                         (",".join(["0"] * LAYERS), "not all 0"),
                         ("x" + ",1" * (LAYERS - 1), "--layer-weights[0] must be a finite float >= 0, got 'x'"),
                         ("1,-1" + ",1" * (LAYERS - 2), "--layer-weights[1] must be a finite float >= 0, got -1.0")):
        err = assert_refused(capsys, tmp_path / "bad.svq", "compress", d / "odd.png", "--model", d / "model.ckpt",
                             "-o", tmp_path / "bad.svq", "--layer-weights", bad)
        assert message in err, err


def test_default_layer_weights_rule():
    from svq_modules.cli.images import COARSE_WEIGHT, default_layer_weights

    assert default_layer_weights(1) == [1.0]
    assert default_layer_weights(2) == [COARSE_WEIGHT, 1.0]
    six = default_layer_weights(6)
    assert six[2:] == [0.0, 0.0, 0.0, 1.0] and six[0] == six[1] > 0

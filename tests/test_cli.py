"""The command line (``python -m svq_modules compress | decompress | info``): what it does when used right.

Run in-process through ``svq_modules.cli.main(argv)``; one subprocess checks the
``python -m svq_modules`` entry point. Misuse is in ``tests/test_misuse_cli.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from svq_modules.cli import main
from svq_modules.cli.model_file import load_model, model_from_bytes
from svq_modules.coding import decompress_layers
from svq_modules.coding.container import read_container

DATA = Path(__file__).resolve().parent / "data"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` float32: six Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, 3, generator=g) * 4
    return (centers[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, 3, generator=g)).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data file, the .svq file compress made of it and the model it trained (--save-model)."""
    d = tmp_path_factory.mktemp("trained")
    data = clustered(600)
    np.save(d / "data.npy", data)
    rc = main(["compress", str(d / "data.npy"), "-o", str(d / "data.svq"), "--codebook-size", "16", "--bits", "2,1,1",
               "--epochs", "2", "--batch-size", "256", "--save-model", str(d / "model.pt"), "-q"])  # fmt: skip
    assert rc == 0
    return d, data


def test_compress_then_decompress_every_prefix(trained, capsys, tmp_path):
    d, data = trained
    vq = load_model(d / "model.pt")
    assert vq.codebook_size == 16 and vq.num_layers == 4 and vq.is_built
    container = read_container(d / "data.svq")
    assert container.num_chunks == 4 and container.model is not None
    mse = []
    for n in range(1, 5):
        out = tmp_path / f"approx{n}.npy"
        rc, stdout, err = run(capsys, "decompress", d / "data.svq", "--layers", n, "-o", out, "--reference", d / "data.npy")
        assert rc == 0, err
        assert "MSE" in stdout and f"from {n} of 4 layers" in stdout
        approx = np.load(out)
        # the same decode through the library, with the model saved next to the file
        expected = decompress_layers(vq.hierarchy, vq.tables, container.chunks[:n]).reconstruction().numpy()
        assert approx.dtype == np.float32 and approx.shape == data.shape
        assert np.array_equal(approx, expected)
        mse.append(float(((approx.astype(np.float64) - data) ** 2).mean()))
    assert all(b <= a for a, b in zip(mse, mse[1:])) and mse[-1] < mse[0]


def test_external_model_and_self_contained_chunks(trained, capsys, tmp_path):
    d, data = trained
    ext = tmp_path / "ext.svq"
    rc, _, err = run(capsys, "compress", d / "data.npy", "-o", ext, "--model", d / "model.pt", "--coding", "raw",
                     "--embed-centers", "float32", "-q")  # fmt: skip
    assert rc == 0, err
    assert read_container(ext).model is None
    # decodes with the model, and without any (the chunks carry their centers)
    for extra in (["--model", d / "model.pt"], []):
        out = tmp_path / "out.npy"
        rc, _, err = run(capsys, "decompress", ext, "-o", out, "-q", *extra)
        assert rc == 0, err
        full = decompress_layers(None, None, read_container(ext).chunks).reconstruction().numpy()
        vq = load_model(d / "model.pt")
        assert np.array_equal(np.load(out), full)
        assert np.array_equal(full, vq.reconstruct(vq.quantize(torch.from_numpy(data)), 4).numpy())


def test_save_model_without_storing_it_in_the_file(trained, capsys, tmp_path):
    d, _ = trained
    svq, model = tmp_path / "bare.svq", tmp_path / "m.pt"
    rc, _, err = run(capsys, "compress", d / "data.npy", "-o", svq, "--codebook-size", "8", "--bits", "1,1", "--iters", "3",
                     "--no-store-model", "--save-model", model, "-q")  # fmt: skip
    assert rc == 0, err
    assert read_container(svq).model is None and load_model(model).codebook_size == 8
    rc, _, err = run(capsys, "decompress", svq, "--model", model, "-o", tmp_path / "x.pt", "-q")
    assert rc == 0, err
    assert torch.load(tmp_path / "x.pt", weights_only=True).shape == (600, 3)


def test_golden_cli_file_decodes_identically(capsys, tmp_path):
    """A .svq file written by the previous main (model included) decodes to the same arrays."""
    expected = np.load(DATA / "golden_cli_v1_expected.npz")
    for name, extra in (("full", []), ("layer1", ["--layers", "1"])):
        out = tmp_path / f"{name}.npy"
        rc, _, err = run(capsys, "decompress", DATA / "golden_cli_v1.svq", "-o", out, "-q", *extra)
        assert rc == 0, err
        got = np.load(out)
        assert got.dtype == expected[name].dtype and np.array_equal(got, expected[name])


def test_plain_state_dict_of_the_first_key_layout_is_a_model(capsys, tmp_path):
    """``torch.save(vq.state_dict())`` of the previous main (flat keys) works as --model and decodes as it did."""
    golden = torch.load(DATA / "golden_scalablevq_v1.pt", weights_only=True)
    flat = golden["state_dict"]
    assert "codebook" in flat and "layers_widths" in flat  # the old layout this test is about
    torch.save(flat, tmp_path / "flat.pt")
    vq = load_model(tmp_path / "flat.pt")
    assert torch.equal(vq.codebook, flat["codebook"]) and vq.num_layers == 4
    np.save(tmp_path / "probe.npy", golden["probe"].numpy())
    rc, _, err = run(capsys, "compress", tmp_path / "probe.npy", "--model", tmp_path / "flat.pt", "-o", tmp_path / "p.svq", "-q")
    assert rc == 0, err
    for n, recon in enumerate(golden["recon"], start=1):  # reconstructions the previous main gave for each prefix
        out = tmp_path / f"r{n}.npy"
        rc, _, err = run(capsys, "decompress", tmp_path / "p.svq", "--model", tmp_path / "flat.pt", "--layers", n, "-o", out)
        assert rc == 0, err
        assert np.array_equal(np.load(out), recon.numpy())


def test_state_dict_of_todays_module_is_a_model(trained, tmp_path):
    d, _ = trained
    vq = load_model(d / "model.pt")
    torch.save(vq.state_dict(), tmp_path / "sd.pt")
    again = model_from_bytes((tmp_path / "sd.pt").read_bytes())
    assert torch.equal(again.codebook, vq.codebook) and torch.equal(again.tables.widths, vq.tables.widths)


def test_npz_and_dict_entries_are_picked_by_key(trained, capsys, tmp_path):
    d, data = trained
    np.savez(tmp_path / "two.npz", other=np.zeros((5, 2), np.float32), vectors=data)
    rc, _, err = run(capsys, "compress", tmp_path / "two.npz", "--key", "vectors", "-o", tmp_path / "k.svq",
                     "--model", d / "model.pt", "-q")  # fmt: skip
    assert rc == 0, err
    torch.save({"x": torch.from_numpy(data)}, tmp_path / "ref.pt")
    rc, out, err = run(capsys, "decompress", tmp_path / "k.svq", "-o", tmp_path / "k.npz", "--model", d / "model.pt",
                       "--reference", tmp_path / "ref.pt", "--reference-key", "x")  # fmt: skip
    assert rc == 0, err
    assert "MSE" in out
    with np.load(tmp_path / "k.npz") as z:
        assert z["array"].shape == data.shape


def test_info_lists_every_chunk(capsys):
    rc, out, err = run(capsys, "info", DATA / "golden_cli_v1.svq")
    assert rc == 0, err
    lines = out.splitlines()
    assert "4 layer chunks" in lines[0] and "model included" in lines[0]
    assert [line.split()[0] for line in lines[3:]] == ["0", "1", "2", "3"]


def test_replaced_output_keeps_its_permissions(trained, capsys, tmp_path):
    d, _ = trained
    out = tmp_path / "out.npy"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    rc, _, err = run(capsys, "decompress", d / "data.svq", "-o", out, "-q")
    assert rc == 0, err
    assert np.load(out).shape == (600, 3) and (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]  # no temporary file left


def test_entry_points(capsys):
    assert main(["--help"]) == 0
    assert "compress" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "svq_modules", "info", str(DATA / "golden_cli_v1.svq")],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "4 layer chunks" in r.stdout

"""The command line used wrong: one test per mistake, named as what the user got wrong.

Every mistake must give exit status 1 (130 for Ctrl-C), exactly one ``error: ...``
line on stderr naming what is wrong, no traceback, no output file (nor a leftover
temporary one), an untouched input, and, for mistakes visible in the arguments,
no training at all (``fit_model`` is replaced by a function that fails the test).
Runs in-process through ``svq_modules.cli.main(argv)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import svq_modules.arrays as arrays
import svq_modules.cli.commands as commands
import svq_modules.cli.outputs as outputs
import svq_modules.coding.container as container
from svq_modules.cli import main
from svq_modules.cli.model_file import load_model
from svq_modules.validation import check_bit_proposal

DATA = Path(__file__).resolve().parent / "data"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``data.npy`` ([300, 3] float32), ``model.pt`` (K=8, bits 1,1), ``data.svq`` (model included), ``ext.svq`` (not)."""
    d = tmp_path_factory.mktemp("made")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=g) * 4)[torch.randint(0, 5, (300,), generator=g)] + torch.randn(300, 3, generator=g)
    np.save(d / "data.npy", x.numpy())
    assert main(["compress", str(d / "data.npy"), "-o", str(d / "data.svq"), "--codebook-size", "8", "--bits", "1,1",
                 "--epochs", "1", "--save-model", str(d / "model.pt"), "-q"]) == 0  # fmt: skip
    assert main(["compress", str(d / "data.npy"), "-o", str(d / "ext.svq"), "--model", str(d / "model.pt"), "-q"]) == 0
    return d


@pytest.fixture
def work(made, tmp_path, monkeypatch):
    """A fresh folder (the working directory) with copies of the made files; training fails the test."""
    for name in ("data.npy", "model.pt", "data.svq", "ext.svq"):
        (tmp_path / name).write_bytes((made / name).read_bytes())
    monkeypatch.chdir(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("the command started training before rejecting its arguments")

    monkeypatch.setattr(commands, "fit_model", no_training)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def fails(capsys, folder: Path, *argv, says: tuple[str, ...] = (), status: int = 1) -> str:
    """Run the CLI; check status, one error line containing ``says``, no traceback, no file changed or added."""
    before = snapshot(folder)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == status, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    for word in says:
        assert word in lines[0], (word, lines[0])
    assert snapshot(folder) == before  # nothing written, nothing overwritten, no temporary file left
    return lines[0]


COMPRESS = ("compress", "data.npy", "-o", "out.svq")


# ------------------------------------------------------------------ a. writing over an input


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "absolute", "dot-dot", "symlink", "hardlink"])
def test_compress_output_is_its_input(work, capsys, spelling):
    (work / "sub").mkdir()
    out = {
        "same": "data.npy",
        "dot-slash": "./data.npy",
        "absolute": str(work / "data.npy"),
        "dot-dot": "sub/../data.npy",
        "symlink": "link.svq",
        "hardlink": "hard.svq",
    }[spelling]
    if spelling == "symlink":
        os.symlink(work / "data.npy", work / "link.svq")
    if spelling == "hardlink":
        os.link(work / "data.npy", work / "hard.svq")
    fails(capsys, work, "compress", "data.npy", "-o", out, "--codebook-size", "64", "--bits", "2,2",
          says=("-o", "same file", "data.npy", "refusing to overwrite"))  # fmt: skip


@pytest.mark.parametrize("which", ["reference", "model", "input"])
def test_decompress_output_is_one_of_its_inputs(work, capsys, which):
    out = {"reference": "./data.npy", "model": str(work / "model.pt"), "input": "data.svq"}[which]
    fails(capsys, work, "decompress", "ext.svq" if which != "input" else "data.svq", "-o", out, "--model", "model.pt",
          "--reference", "data.npy", says=("same file", "refusing to overwrite"))  # fmt: skip


def test_compress_model_output_is_an_input_or_the_other_output(work, capsys):
    torch.save(torch.from_numpy(np.load(work / "data.npy")), work / "data.pt")
    fails(capsys, work, "compress", "data.pt", "-o", "out.svq", "--save-model", "./data.pt", says=("--save-model", "same file"))
    fails(capsys, work, "compress", "data.npy", "-o", "out.svq", "--save-model", "out.svq", says=("--save-model", "-o out.svq"))


# ------------------------------------------------------------------ b. nonsense parameters


def test_batch_size_zero(work, capsys):
    fails(capsys, work, *COMPRESS, "--batch-size", "0", says=("--batch-size", "positive", "0"))


@pytest.mark.parametrize("option", ["--epochs", "--iters"])
def test_zero_epochs_or_iterations(work, capsys, option):
    fails(capsys, work, *COMPRESS, option, "0", says=(option, "positive", "0"))


@pytest.mark.parametrize("k", ["0", "-5"])
def test_codebook_size_not_positive(work, capsys, k):
    line = fails(capsys, work, *COMPRESS, "--codebook-size", k, says=("--codebook-size", "positive", k))
    assert "cells" not in line


def test_bits_with_an_empty_entry(work, capsys):
    with pytest.raises(ValueError) as expected:  # the message everyone else gives for this proposal
        check_bit_proposal([4, "", 2], name="--bits")
    fails(capsys, work, *COMPRESS, "--bits", "4,,2", says=(str(expected.value),))


@pytest.mark.parametrize("bits", ["0,2", "2,25", "a,b", ""])
def test_bits_not_positive_ints(work, capsys, bits):
    fails(capsys, work, *COMPRESS, "--bits", bits, says=("--bits",))


def test_integer_array(work, capsys):
    np.save(work / "ints.npy", np.arange(600).reshape(200, 3))
    fails(capsys, work, "compress", "ints.npy", "-o", "out.svq", says=("ints.npy", "integer", "int64", "convert it to float"))


def test_three_dimensional_array(work, capsys):
    np.save(work / "cube.npy", np.zeros((4, 50, 3), np.float32))
    fails(capsys, work, "compress", "cube.npy", "-o", "out.svq", says=("cube.npy", "[N, D]", "[4, 50, 3]", "reshape"))


def test_codebook_larger_than_the_data(work, capsys):
    fails(capsys, work, *COMPRESS, "--codebook-size", "301", says=("--codebook-size 301", "300 vectors", "at most 300"))


def test_codebook_smaller_than_the_base_layer(work, capsys):
    fails(capsys, work, *COMPRESS, "--codebook-size", "8", "--bits", "4,2", says=("--codebook-size 8", "2**4"))


@pytest.mark.parametrize(("option", "value"), [("--seed", "-1"), ("--kmeans-iters", "-1")])
def test_negative_seed_or_kmeans_iterations(work, capsys, option, value):
    fails(capsys, work, *COMPRESS, option, value, says=(option, value))


def test_epochs_and_iterations_together(work, capsys):
    fails(capsys, work, *COMPRESS, "--epochs", "2", "--iters", "5", says=("--iters", "--epochs"))


@pytest.mark.parametrize("argv", [("--epochs", "two"), ("--layers", "2"), ("--bogus",)])
def test_malformed_or_unknown_option(work, capsys, argv):
    fails(capsys, work, *COMPRESS, *argv, says=(argv[0], "--help"))


def test_no_command(work, capsys):
    fails(capsys, work, says=("required",))


# ------------------------------------------------------------------ c. errors found late, tracebacks, partial outputs


def test_output_folder_does_not_exist(work, capsys):
    line = fails(capsys, work, "compress", "data.npy", "-o", "nodir/x.svq", says=("-o nodir/x.svq", "nodir", "does not exist"))
    assert ".tmp" not in line and "partial" not in line
    fails(capsys, work, "decompress", "data.svq", "-o", "nodir/x.npy", says=("-o nodir/x.npy", "does not exist"))
    fails(capsys, work, "compress", "data.npy", "-o", "data.npy/x.svq", says=("data.npy", "not a directory"))
    fails(capsys, work, "compress", "data.npy", "-o", "", says=("-o", "empty file name"))


@pytest.mark.parametrize("out", [".", "..", "sub/", "sub", "folder.svq"])
def test_output_is_a_directory(work, capsys, out):
    (work / "sub").mkdir()
    (work / "folder.svq").mkdir()
    fails(capsys, work, "compress", "data.npy", "-o", out, says=("-o", "is a directory"))
    fails(capsys, work, "decompress", "data.svq", "-o", out, says=("-o", "is a directory"))


@pytest.mark.parametrize(("argv", "says"), [
    (("compress", "data.npy", "-o", "out.npy"), ("-o out.npy", "'.npy'", ".svq")),
    (("compress", "data.npy", "-o", "out.svq", "--save-model", "m.svq"), ("--save-model m.svq", ".pt")),
    (("decompress", "data.svq", "-o", "out.svq"), ("-o out.svq", ".npy")),
    (("decompress", "data.svq", "-o", "out"), ("-o out", "(none)")),
])  # fmt: skip
def test_unsupported_output_type(work, capsys, argv, says):
    fails(capsys, work, *argv, says=says)


def test_decompress_reference_missing(work, capsys):
    fails(capsys, work, "decompress", "data.svq", "-o", "d.npy", "--reference", "missing.npy",
          says=("--reference missing.npy", "no such file"))  # fmt: skip


def test_decompress_reference_of_another_shape(work, capsys):
    np.save(work / "small.npy", np.zeros((10, 3), np.float32))
    fails(capsys, work, "decompress", "data.svq", "-o", "d.npy", "--reference", "small.npy", says=("[10, 3]", "[300, 3]"))


@pytest.mark.skipif(IS_ROOT, reason="root may write into any folder")
def test_output_folder_not_writable(work, capsys):
    (work / "ro").mkdir()
    os.chmod(work / "ro", 0o555)
    try:
        fails(capsys, work, "compress", "data.npy", "-o", "ro/x.svq", says=("ro", "not writable"))
    finally:
        os.chmod(work / "ro", 0o755)


def _fail_on_write(monkeypatch, error: BaseException, nth: int) -> None:
    """Make the ``nth`` output file's write raise ``error`` half-way (after some bytes are on disk).

    Patches ``atomic_write`` where the CLI's writers find it: in its outputs module and in svq_modules.arrays.
    """
    calls = []
    real = container.atomic_write

    def flaky(path, data):
        calls.append(path)
        if len(calls) != nth:
            return real(path, data)

        def half(f):
            f.write(b"partial")
            raise error

        return real(path, half)

    monkeypatch.setattr(outputs, "atomic_write", flaky)
    monkeypatch.setattr(arrays, "atomic_write", flaky)


def test_disk_full_while_writing_the_second_output(made, work, capsys, monkeypatch):
    monkeypatch.setattr(commands, "fit_model", lambda x, opts: load_model(made / "model.pt"))  # a model without training
    (work / "out.svq").write_bytes(b"previous content")
    _fail_on_write(monkeypatch, OSError(28, "No space left on device"), nth=2)
    fails(capsys, work, *COMPRESS, "--codebook-size", "8", "--bits", "1,1", "--save-model", "m.pt", "-q",
          says=("No space left on device",))  # fmt: skip
    assert (work / "out.svq").read_bytes() == b"previous content"


def test_ctrl_c_while_training(work, capsys, monkeypatch):
    def interrupted(x, opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "fit_model", interrupted)
    fails(capsys, work, *COMPRESS, "--codebook-size", "8", "--bits", "1,1", "--save-model", "m.pt", status=130,
          says=("interrupted",))  # fmt: skip


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_ctrl_c_while_writing(work, capsys, monkeypatch, command):
    _fail_on_write(monkeypatch, KeyboardInterrupt(), nth=1)
    argv = ("compress", "data.npy", "-o", "out.svq", "--model", "model.pt") if command == "compress" else (
        "decompress", "data.svq", "-o", "d.npy")  # fmt: skip
    fails(capsys, work, *argv, "-q", status=130, says=("interrupted",))


# ------------------------------------------------------------------ d. every other option


@pytest.mark.parametrize(("layers", "says"), [("0", "positive"), ("-1", "positive"), ("4", "holds 3 layers")])
def test_layers_out_of_range(work, capsys, layers, says):
    fails(capsys, work, "decompress", "data.svq", "--layers", layers, "-o", "d.npy", says=("--layers", layers, says))


@pytest.mark.parametrize("kind", ["array", "tensor", "svq", "garbage", "checkpoint", "empty"])
def test_model_is_not_a_model_file(work, capsys, kind):
    path = work / "bad.pt"
    if kind == "array":
        path.write_bytes((work / "data.npy").read_bytes())
    elif kind == "tensor":
        torch.save(torch.zeros(3, 3), path)
    elif kind == "svq":
        path.write_bytes((work / "data.svq").read_bytes())
    elif kind == "garbage":
        path.write_bytes(os.urandom(200))
    elif kind == "checkpoint":
        torch.save({"state_dict": {"quantizer.codebook": torch.zeros(8, 3)}, "epoch": 1}, path)
    else:
        path.write_bytes(b"")
    fails(capsys, work, "decompress", "ext.svq", "-o", "d.npy", "--model", "bad.pt", says=("--model bad.pt", "model"))
    fails(capsys, work, "compress", "data.npy", "-o", "x.svq", "--model", "bad.pt", says=("--model bad.pt", "model"))


def test_model_is_a_lightning_checkpoint_of_train_py(work, capsys):
    """``--model last.ckpt`` of ``train.py model=vectors``: its ScalableVQ codes the array, as extract_quantizer gives it."""
    from svq_modules.lightning import extract_quantizer

    golden = DATA / "golden_vectors_v1.ckpt"  # ScalableVQVectors of the previous main, D=3, K=16
    assert main(["compress", "data.npy", "-o", "g.svq", "--model", str(golden), "-q"]) == 0
    assert main(["decompress", "g.svq", "-o", "g.npy", "--model", str(golden), "-q"]) == 0
    x = torch.from_numpy(np.load(work / "data.npy"))
    q = extract_quantizer(golden)
    assert torch.equal(torch.from_numpy(np.load(work / "g.npy")), q.codebook[q.quantize(x)])
    empty = {"state_dict": {"net.weight": torch.zeros(2, 2)}, "pytorch-lightning_version": "2.5.0", "epoch": 0}
    torch.save(empty, work / "empty.ckpt")  # a Lightning checkpoint without a ScalableVQ
    fails(capsys, work, "compress", "data.npy", "-o", "x.svq", "--model", "empty.ckpt",
          says=("--model empty.ckpt", "holds no ScalableVQ"))  # fmt: skip


def test_model_saved_after_its_codebook_moved(work, capsys):
    """A state_dict saved after more training but before update(): the last layer still decodes to the codewords."""
    x = torch.from_numpy(np.load(work / "data.npy"))
    vq = load_model(work / "model.pt")
    vq.train()
    vq(x + 0.5)  # an EMA step: the codebook moves, the tables stay
    vq.eval()
    assert vq.is_stale
    torch.save(vq.state_dict(), work / "stale.pt")
    assert main(["compress", "data.npy", "-o", "s.svq", "--model", "stale.pt", "-q"]) == 0
    assert main(["decompress", "s.svq", "-o", "s.npy", "--model", "stale.pt", "-q"]) == 0
    assert torch.equal(torch.from_numpy(np.load(work / "s.npy")), vq.codebook[vq.quantize(x)])


def test_model_of_another_dimension(work, capsys):
    np.save(work / "d4.npy", np.zeros((50, 4), np.float32))
    fails(capsys, work, "compress", "d4.npy", "-o", "x.svq", "--model", "model.pt", says=("--model model.pt", "D=3", "D=4"))


def test_model_of_another_stream(work, capsys):
    golden = torch.load(DATA / "golden_scalablevq_v1.pt", weights_only=True)
    torch.save(golden["state_dict"], work / "other.pt")  # a valid model, D=3 too, but not the one of ext.svq
    for svq in ("ext.svq", "data.svq"):  # the model --model names wins over the one inside data.svq, and does not fit
        fails(capsys, work, "decompress", svq, "-o", "d.npy", "--model", "other.pt", says=(svq, "fingerprint", "other.pt"))


def test_file_needs_its_model(work, capsys):
    fails(capsys, work, "decompress", "ext.svq", "-o", "d.npy", says=("ext.svq", "external model", "--model"))


def test_training_options_given_with_a_trained_model(work, capsys):
    fails(capsys, work, "compress", "data.npy", "-o", "x.svq", "--model", "model.pt", "--codebook-size", "8", "--epochs", "3",
          says=("--codebook-size", "--epochs", "--model"))  # fmt: skip
    fails(capsys, work, "compress", "data.npy", "-o", "x.svq", "--model", "model.pt", "--save-model", "m.pt",
          says=("--save-model", "--model"))  # fmt: skip


def test_file_without_any_way_to_decode(work, capsys):
    fails(capsys, work, *COMPRESS, "--no-store-model", says=("--no-store-model", "--embed-centers", "--save-model"))


@pytest.mark.parametrize("case", ["npz-missing", "npy-with-key", "pt-missing"])
def test_key_not_in_the_file(work, capsys, case):
    x = np.load(work / "data.npy")
    if case == "npz-missing":
        np.savez(work / "a.npz", vectors=x)
        fails(capsys, work, "compress", "a.npz", "--key", "x", "-o", "o.svq", says=("a.npz", "'x'", "vectors"))
        fails(capsys, work, "decompress", "data.svq", "-o", "d.npy", "--reference", "a.npz", "--reference-key", "x",
              says=("a.npz", "'x'"))  # fmt: skip
    elif case == "npy-with-key":
        fails(capsys, work, "compress", "data.npy", "--key", "x", "-o", "o.svq", says=("data.npy", "key"))
    else:
        torch.save({"v": torch.from_numpy(x)}, work / "a.pt")
        fails(capsys, work, "compress", "a.pt", "--key", "x", "-o", "o.svq", says=("a.pt", "'x'"))


def test_reference_key_without_reference(work, capsys):
    fails(capsys, work, "decompress", "data.svq", "-o", "d.npy", "--reference-key", "x", says=("--reference-key", "--reference"))


@pytest.mark.parametrize(("option", "value"), [("--coding", "huffman"), ("--embed-centers", "float64")])
def test_bad_choice(work, capsys, option, value):
    fails(capsys, work, *COMPRESS, option, value, says=(option, value))


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
@pytest.mark.parametrize("which", ["data", "model", "svq"])
def test_unreadable_file(work, capsys, which):
    name = {"data": "data.npy", "model": "model.pt", "svq": "data.svq"}[which]
    os.chmod(work / name, 0)
    try:
        argv = {"data": COMPRESS, "model": (*COMPRESS, "--model", "model.pt"), "svq": ("decompress", "data.svq", "-o", "d.npy")}
        fails(capsys, work, *argv[which], says=(name, "cannot read"))
    finally:
        os.chmod(work / name, 0o644)


@pytest.mark.parametrize("argv", [
    ("compress", "dir.npy", "-o", "x.svq"),
    ("compress", "data.npy", "-o", "x.svq", "--model", "dir.npy"),
    ("decompress", "dir.npy", "-o", "d.npy"),
    ("decompress", "data.svq", "-o", "d.npy", "--reference", "dir.npy"),
    ("decompress", "ext.svq", "-o", "d.npy", "--model", "dir.npy"),
    ("info", "dir.npy"),
])  # fmt: skip
def test_directory_given_as_an_input_file(work, capsys, argv):
    (work / "dir.npy").mkdir()
    fails(capsys, work, *argv, says=("dir.npy", "is a directory"))


@pytest.mark.parametrize("argv", [
    ("compress", "nothing.npy", "-o", "x.svq"),
    ("compress", "data.npy", "-o", "x.svq", "--model", "nothing.npy"),
    ("decompress", "nothing.npy", "-o", "d.npy"),
    ("decompress", "ext.svq", "-o", "d.npy", "--model", "nothing.npy"),
    ("info", "nothing.npy"),
])  # fmt: skip
def test_input_file_missing(work, capsys, argv):
    fails(capsys, work, *argv, says=("nothing.npy", "no such file"))


def test_input_of_an_unsupported_type(work, capsys):
    (work / "data.txt").write_text("1 2 3\n")
    fails(capsys, work, "compress", "data.txt", "-o", "x.svq", says=("data.txt", "'.txt'", ".npy"))
    fails(capsys, work, "decompress", "data.svq", "-o", "d.npy", "--reference", "data.txt", says=("--reference", "'.txt'"))


@pytest.mark.parametrize("command", ["decompress", "info"])
def test_svq_input_is_not_an_svq_file(work, capsys, command):
    extra = ("-o", "d.npy") if command == "decompress" else ()
    fails(capsys, work, command, "data.npy", *extra, says=("not a .svq file",))


def test_svq_file_truncated(work, capsys):
    (work / "cut.svq").write_bytes((work / "data.svq").read_bytes()[:-3])
    fails(capsys, work, "decompress", "cut.svq", "-o", "d.npy", says=("truncated",))


@pytest.mark.parametrize(("array", "says"), [
    (np.array([[0.0, np.nan, 1.0]] * 20, np.float32), ("NaN",)),
    (np.zeros((0, 3), np.float32), ("empty",)),
    (np.ones((20, 3), dtype=bool), ("dtype bool",)),
    (np.zeros(30, np.float32), ("[N, D]",)),
    (np.full((20, 3), 1e39), ("float32 range",)),
])  # fmt: skip
def test_data_not_usable_vectors(work, capsys, array, says):
    np.save(work / "bad.npy", array)
    fails(capsys, work, "compress", "bad.npy", "-o", "x.svq", says=("bad.npy", *says))

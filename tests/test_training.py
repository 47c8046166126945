"""End-to-end: train.py / eval.py as subprocesses on tiny settings (CPU).

One tiny image run is shared by several tests (module fixture): checkpoint, metrics.csv
with RD metrics for every layer, the PNGs, reloading in this (fresh) process, resuming,
eval.py. Plus a vector run and a 2-process DDP run on CPU.
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# bits [1,1,1] -> 4 layers over K=16 codes (2, 4, 8 cells, then the exact codeword), one
# latent per 4x4 pixels: 200 steps of a small model train in seconds and give a ladder
# whose PSNR rises layer by layer (checked for 12 seeds: >= 0.09 dB per layer), trained on
# the nearest codewords: with 16 codes the default entropy-constrained training leaves two
# layers within 0.2 dB, either way round (seed 0: 18.23 then 18.07 dB).
TINY = [
    "bits=[1,1,1]",
    "model/quantizer=default",
    "model.codebook_size=16",
    "model.dim=8",
    "model.channels=32",
    "model.num_res_blocks=0",
    "model.lr=5e-3",
    "data.crop_size=32",
    "data.train_crops_per_epoch=1600",
    "data.batch_size=16",
    "data.val_crop_size=64",
    "data.max_val_crops=6",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
NUM_LAYERS = 4
STEPS_PER_EPOCH = 1600 // 16
PIXELS_PER_VECTOR = 16


def run_script(script: str, args: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", **env)
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environ)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def rd_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("rd/layer0/psnr")]


def table_line(stdout: str, label: str) -> str:
    """The line of the printed RD table whose first column is ``label`` (last occurrence)."""
    lines = [ln for ln in stdout.splitlines() if ln.split()[:1] == [label]]
    assert lines, f"no table line {label!r} in:\n{stdout[-3000:]}"
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    proc = run_script("train.py", TINY + [f"hydra.run.dir={run_dir}"])
    return run_dir, proc.stdout


def test_run_writes_checkpoint_metrics_and_figures(tiny_run):
    run_dir, stdout = tiny_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = rd_rows(read_metrics(run_dir / "metrics.csv"))
    assert len(rows) == 2  # one RD measurement per epoch
    last = rows[-1]
    for l in range(NUM_LAYERS):
        for key in ("bits", "bits_entropy", "bpp", "bpp_entropy", "mse", "psnr"):
            assert last[f"rd/layer{l}/{key}"] != "", (l, key)
    psnr = [float(last[f"rd/layer{l}/psnr"]) for l in range(NUM_LAYERS)]
    bpp = [float(last[f"rd/layer{l}/bpp"]) for l in range(NUM_LAYERS)]
    mse = [float(last[f"rd/layer{l}/mse"]) for l in range(NUM_LAYERS)]
    assert all(b > a for a, b in zip(psnr, psnr[1:])), psnr  # PSNR rises with every layer
    assert all(b > a for a, b in zip(bpp, bpp[1:])), bpp
    assert all(b < a for a, b in zip(mse, mse[1:])), mse
    # layer 0 is 1 bit per 4x4 pixels; PSNR and MSE agree
    assert bpp[0] == pytest.approx(1 / PIXELS_PER_VECTOR)
    for m, p in zip(mse, psnr):
        assert p == pytest.approx(-10 * math.log10(m), abs=1e-3)
    assert float(last["rd/flat/bits"]) == pytest.approx(4.0)  # log2 K
    assert float(last["rd/flat/psnr"]) == pytest.approx(psnr[-1])
    assert int(last["step"]) == 2 * STEPS_PER_EPOCH - 1  # Lightning logs validation at the last step index

    from matplotlib.image import imread

    curve = imread(run_dir / "rd_curve.png")
    strip = imread(run_dir / "rd_layers.png")
    assert curve.ndim == 3 and curve.shape[0] > 100 and curve.shape[1] > 100
    assert strip.shape[1] > 3 * strip.shape[0]  # original + one panel per layer, side by side
    assert curve[..., :3].std() > 0.01 and strip[..., :3].std() > 0.01  # not blank

    # the printed table: one line per layer and the flat VQ, same numbers as metrics.csv
    for l in range(NUM_LAYERS):
        fields = table_line(stdout, str(l)).split()
        assert float(fields[-1]) == pytest.approx(psnr[l], abs=0.006)
    assert "flat" in stdout and "last checkpoint:" in stdout


def test_checkpoint_reloads_in_a_fresh_process_with_fresh_hierarchy(tiny_run):
    from svq_modules.lightning import SampleImagesDataModule, ScalableVQAutoencoder, extract_quantizer

    run_dir, _ = tiny_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    model = ScalableVQAutoencoder.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    q = model.quantizer
    assert q.is_built and not q.is_stale
    assert q.num_layers == NUM_LAYERS and model.hparams.bits == [1, 1, 1]

    # the stored hierarchy is exactly the one update() builds for the stored codebook
    rebuilt = copy.deepcopy(q)
    rebuilt.update()
    for (name, a), (_, b) in zip(q.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name

    # the bare quantizer helper gives the same codes / reconstructions
    bare = extract_quantizer(ckpt)
    dm = SampleImagesDataModule(val_crop_size=64, max_val_crops=6)
    dm.setup("validate")
    x = torch.stack(list(dm.data_val))
    with torch.no_grad():
        z = model.encode(x)
        codes = q.encode(z)
        assert torch.equal(codes, bare.encode(z))
        for l in range(1, NUM_LAYERS + 1):
            assert torch.equal(q.decode(codes, l), bare.decode(codes, l))

        # recomputing the final validation figures here gives what the run logged
        out = model.rd_outputs(x)
    last = rd_rows(read_metrics(run_dir / "metrics.csv"))[-1]
    for l, rec in enumerate(out.recon):
        mse = float(torch.mean((rec - x) ** 2))
        assert mse == pytest.approx(float(last[f"rd/layer{l}/mse"]), rel=1e-4)
    rates = q.rates(out.indices)
    assert [float(b) / PIXELS_PER_VECTOR for b in rates.raw_bits] == pytest.approx(
        [float(last[f"rd/layer{l}/bpp"]) for l in range(NUM_LAYERS)], rel=1e-6)


def test_resume_continues_the_step_count(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    first_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert first_step == 2 * STEPS_PER_EPOCH
    resumed = tmp_path / "resumed"
    args = [a for a in TINY if not a.startswith("trainer.max_epochs")]
    run_script("train.py", args + ["trainer.max_epochs=3", f"ckpt_path={ckpt}", f"hydra.run.dir={resumed}"])
    new = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert new["global_step"] == first_step + STEPS_PER_EPOCH
    assert new["epoch"] == 2
    steps = [int(r["step"]) for r in read_metrics(resumed / "metrics.csv") if r.get("step")]
    assert min(steps) >= first_step and max(steps) == new["global_step"] - 1
    assert len(rd_rows(read_metrics(resumed / "metrics.csv"))) == 1  # the one new epoch


def test_eval_reproduces_the_final_figures(tiny_run, tmp_path):
    run_dir, train_stdout = tiny_run
    data_args = [a for a in TINY if a.startswith("data.")]
    proc = run_script("eval.py", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *data_args,
                                  "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"])
    for label in [str(NUM_LAYERS - 1), "flat"]:
        assert table_line(proc.stdout, label) == table_line(train_stdout, label)
    assert (tmp_path / "eval" / "rd_curve.png").is_file()
    assert (tmp_path / "eval" / "metrics.csv").is_file()


def test_vector_run(tmp_path):
    from svq_modules.lightning import extract_quantizer

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 3)) * 3
    x = (centers[rng.integers(0, 12, size=4000)] + rng.normal(size=(4000, 3)) * 0.3).astype(np.float32)
    path = tmp_path / "points.npy"
    np.save(path, x)
    run_dir = tmp_path / "run"
    proc = run_script("train.py", ["data=vectors", f"data.path={path}", "data.batch_size=512", "bits=[2,2]",
                                   "model.codebook_size=32", "trainer.max_epochs=3",
                                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"])
    last = rd_rows(read_metrics(run_dir / "metrics.csv"))[-1]
    psnr = [float(last[f"rd/layer{l}/psnr"]) for l in range(3)]
    bits = [float(last[f"rd/layer{l}/bits"]) for l in range(3)]
    assert all(b > a for a, b in zip(psnr, psnr[1:])), psnr
    assert bits[:2] == [2.0, 4.0] and bits[2] > 4.0
    assert "rd/layer0/bpp" not in last  # vectors: bits per vector only
    assert "bits/vec" in proc.stdout
    q = extract_quantizer(run_dir / "checkpoints" / "last.ckpt")
    assert q.codebook.shape == (32, 3) and q.is_built and not q.is_stale
    # 12 well separated clusters, 32 codes: the full-depth MSE is near the noise level (3 * 0.3^2)
    assert float(last["rd/layer2/mse"]) * 3 < 3 * 0.09 * 1.5


def test_entropy_constrained_image_run(tmp_path):
    """The image model's default quantizer config (train_rate_weight 1, the rate-weighted pick in training) runs
    end to end: the checkpoint records the weight and rebuilds a module that trains with it, and full depth still
    beats the base layer. (Its effect on the pick is checked in test_rate_weight.py; in this tiny model neither
    the entropy nor the perplexity moves the same way for every seed.)"""
    from svq_modules.lightning.modules import ScalableVQAutoencoder

    args = [a for a in TINY if a != "model/quantizer=default" and not a.startswith("trainer.max_epochs")]
    run_script("train.py", args + ["trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"])
    model = ScalableVQAutoencoder.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.hparams.quantizer["train_rate_weight"] == 1.0
    assert model.quantizer.learner.train_rate_weight == 1.0
    last = rd_rows(read_metrics(tmp_path / "metrics.csv"))[-1]
    assert float(last[f"rd/layer{NUM_LAYERS - 1}/psnr"]) > float(last["rd/layer0/psnr"]) + 0.5


@pytest.mark.slow
def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    run_dir = tmp_path / "ddp"
    args = [a for a in TINY if not a.startswith(("trainer.max_epochs", "data.train_crops_per_epoch"))]
    proc = run_script("train.py", args + ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                                          "data.train_crops_per_epoch=128", "trainer.max_epochs=2",
                                          f"hydra.run.dir={run_dir}"], timeout=400)
    prints = dict(re.findall(r"\[rank (\d)\] fingerprint of quantizer: ([0-9a-f]{40})", proc.stdout))
    assert set(prints) == {"0", "1"}, proc.stdout[-3000:]
    assert prints["0"] == prints["1"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 128 crops / 16 per batch / 2 ranks = 4 steps per epoch
    assert ckpt["global_step"] == 2 * 4
    rows = rd_rows(read_metrics(run_dir / "metrics.csv"))
    assert len(rows) == 2


def test_debug_fast_dev_run_trains_and_validates_one_batch(tmp_path):
    run_dir = tmp_path / "debug"
    proc = run_script("train.py", ["debug=fast_dev_run", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"])
    assert "Running in `fast_dev_run` mode" in proc.stdout + proc.stderr
    assert table_line(proc.stdout, "flat")  # one validation batch measured
    assert "step 1 " in proc.stdout  # one training step
    assert not (run_dir / "metrics.csv").exists()  # fast_dev_run turns the loggers off


def test_channel_shuffle_permutes_the_colours_of_the_same_crops():
    """With ``channel_shuffle`` each training crop is the crop without it, its RGB channels in some order;
    about half of them are reordered. Off by default; a non-bool is refused."""
    from svq_modules.lightning.data import RandomCropDataset, SampleImagesDataModule

    dm = SampleImagesDataModule()
    dm.setup("fit")
    plain = RandomCropDataset(dm.train_images, 32, 64, seed=3, fixed=True)
    shuffled = RandomCropDataset(dm.train_images, 32, 64, channel_shuffle=True, seed=3, fixed=True)
    reordered = 0
    for i in range(64):
        a, b = plain[i], shuffled[i]
        match = [c for c in itertools.permutations(range(3)) if torch.equal(a[list(c)], b)]
        assert match, f"crop {i} is not a channel permutation of the unshuffled crop"
        reordered += (0, 1, 2) not in match
    assert 16 <= reordered <= 48, reordered
    assert SampleImagesDataModule().channel_shuffle is False
    with pytest.raises(ValueError, match="channel_shuffle='yes' is not allowed: true or false"):
        SampleImagesDataModule(channel_shuffle="yes")

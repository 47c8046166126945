"""What a user gets wrong with train.py / eval.py / the callbacks, and what they get back.

Every bad setting ends as one line naming the setting, the value and what is allowed
(``ConfigError``; the scripts print it and exit with status 2), before any training.
The callbacks work with any LightningModule holding a ScalableVQ, and
``extract_quantizer`` / ``eval.py`` read checkpoints of modules this package does not know.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader

from svq_modules.lightning import (
    HierarchyUpdateCallback,
    RateDistortionCallback,
    checks,
    entry,
    extract_quantizer,
    format_rd_table,
)
from svq_modules.lightning.checks import ConfigError
from svq_modules.nn import ScalableVQ

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GOLDEN = ROOT / "tests" / "data" / "golden_vectors_v1.ckpt"  # ScalableVQVectors, D=3, K=16, bits [2, 1, 1]


def _compose(name: str, overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides + [f"paths.output_dir={tmp_path / 'run'}"])


def _error(tmp_path: Path, *overrides: str, job=entry.train, name: str = "train") -> str:
    """The one-line ConfigError the job raises for these overrides (nothing trained, no run files)."""
    cfg = _compose(name, list(overrides), tmp_path)
    with pytest.raises(ConfigError) as info:
        job(cfg)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()
    return message


def _script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _images(folder: Path, count: int, height: int, width: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


# ----------------------------------------------------------------------------------------
# (a) data / model / trainer settings: one line, before any heavy work
# ----------------------------------------------------------------------------------------

def test_image_folder_root_that_does_not_exist(tmp_path):
    message = _error(tmp_path, "data=image_folder", f"data.root={tmp_path / 'nonexistent'}")
    assert message.startswith(f"data.root={tmp_path / 'nonexistent'} is not a folder"), message


def test_image_folder_that_holds_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    message = _error(tmp_path, "data=image_folder", f"data.root={tmp_path / 'empty'}")
    assert message.startswith(f"data.root={tmp_path / 'empty'} holds no images") and ".png" in message, message


def test_images_smaller_than_the_crop(tmp_path):
    root = _images(tmp_path / "small", 2, height=30, width=50)  # training part: 40 x 30 pixels
    message = _error(tmp_path, "data=image_folder", f"data.root={root}")
    assert message.startswith("data.crop_size=64 is larger than every training image"), message
    assert "at most 30" in message and "40x30" in message, message


def test_vector_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "missing.npy"
    message = _error(tmp_path, "data=vectors", f"data.path={missing}")
    assert message.startswith(f"data.path={missing}: no such file") and ".npz" in message, message


def test_vector_file_with_a_key_it_does_not_hold(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, points=np.zeros((10, 3), np.float32))
    message = _error(tmp_path, "data=vectors", f"data.path={path}", "data.key=colors")
    assert message.startswith(f"data.path={path}: no array named 'colors'") and "points" in message, message


def test_crop_size_zero(tmp_path):
    assert _error(tmp_path, "data.crop_size=0") == "data.crop_size must be a positive int, got 0"


def test_batch_size_zero(tmp_path):
    assert _error(tmp_path, "data.batch_size=0") == "data.batch_size must be a positive int, got 0"
    message = _error(tmp_path, "data=vectors", f"data.path={GOLDEN}", "data.batch_size=0")
    assert message == "data.batch_size must be a positive int, got 0"


def test_crop_size_that_is_not_a_multiple_of_the_patch_size(tmp_path):
    message = _error(tmp_path, "data.crop_size=30")
    assert message.startswith("data.crop_size=30 is not a multiple of the model's patch_size=4"), message


def test_validation_fraction_that_leaves_nothing_to_train_on(tmp_path):
    message = _error(tmp_path, "data.val_fraction=1.0")
    assert message.startswith("data.val_fraction=1.0 leaves no pixels to train on"), message


def test_model_and_quantizer_settings_out_of_range(tmp_path):
    assert _error(tmp_path, "model.channels=0") == "model.channels must be a positive int, got 0"
    message = _error(tmp_path, "model.quantizer.decay=2.0")
    assert message.startswith("model.quantizer.decay") and "2.0" in message, message
    message = _error(tmp_path, "+model.quantizer.decayy=0.9")
    assert message.startswith("model.quantizer.decayy is not a ScalableVQ argument; allowed:"), message


def test_trainer_settings_out_of_range(tmp_path):
    assert _error(tmp_path, "trainer.max_epochs=-5") == "trainer.max_epochs must be an int >= -1, got -5"
    message = _error(tmp_path, "trainer.accelerator=banana")
    assert message.startswith("trainer.accelerator=banana:") and "cpu" in message, message


def test_switch_that_is_not_true_or_false(tmp_path):
    assert _error(tmp_path, "data.hflip=maybe") == "data.hflip='maybe' is not allowed: true or false"


def test_seed_out_of_range(tmp_path):
    assert _error(tmp_path, "seed=-1") == "seed must be an int in [0, 4294967295], got -1"


def test_bad_setting_exits_with_status_2_and_one_line(tmp_path):
    missing = tmp_path / "missing.npy"
    proc = _script("train.py", "data=vectors", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: data.path={missing}: no such file; allowed: a .npy, .npz or .pt file holding an "
                     f"[N, D] array (data.key names an .npz / dict entry)"], proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------
# (b) the callbacks' protocol: any LightningModule with a ScalableVQ and rd_outputs
# ----------------------------------------------------------------------------------------

class MyModel(L.LightningModule):
    """The docstring example of RateDistortionCallback: quantizer named `vq`, rd_outputs returns a tuple."""

    data_range = 1.0

    def __init__(self, with_rd_outputs: bool = True):
        super().__init__()
        self.net = nn.Linear(8, 8)
        self.vq = ScalableVQ(8, 16, bits=[2, 1])
        if not with_rd_outputs:
            self.rd_outputs = None

    def training_step(self, batch, batch_idx):
        out = self.vq(self.net(batch))
        return F.mse_loss(out.quantized, batch) + out.loss

    def validation_step(self, batch, batch_idx):
        pass

    @torch.no_grad()
    def rd_outputs(self, batch):
        z = self.net(batch)  # what the quantizer sees
        codes = self.vq(z).indices
        recon = [self.vq.reconstruct(codes, l) for l in range(1, self.vq.num_layers + 1)]
        return z, recon, codes

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), 1e-3)


def _loaders() -> tuple[DataLoader, DataLoader]:
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(x[:128], batch_size=64), DataLoader(x[128:], batch_size=64)


def _fit(model: L.LightningModule, callbacks: list, tmp_path: Path, max_steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, limit_train_batches=2, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, accelerator="cpu")
    train, val = _loaders()
    trainer.fit(model, train, val)
    return trainer


def test_your_own_lightning_module_gets_an_rd_table(tmp_path):
    L.seed_everything(0, verbose=False)
    rd = RateDistortionCallback(output_dir=str(tmp_path), strip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the protocol is met: no "cannot act" warning
        warnings.filterwarnings("ignore", message=".*(workers|logging interval|LeafSpec).*")
        _fit(MyModel(), [HierarchyUpdateCallback(), rd], tmp_path)
    assert rd.latest is not None and rd.latest["num_vectors"] == 128
    rows = rd.latest["rows"]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[0]["bits"] == 2.0 and rows[1]["bits"] == 3.0  # cumulative raw bits of [2, 1] + the final layer
    assert rows[0]["mse"] > rows[2]["mse"] > 0  # 4 cells at layer 0, the 16 codewords at full depth
    table = rd.table()
    assert "bits/vec" in table and "bpp" not in table and table.splitlines()[-1].split()[0] == "flat"
    assert (tmp_path / "rd_curve.png").is_file() and (tmp_path / "rd_table.json").is_file()


def test_lightning_module_without_rd_outputs_warns_once(tmp_path):
    rd = RateDistortionCallback(output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="has no rd_outputs") as record:
        trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[rd], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(MyModel(with_rd_outputs=False), *_loaders())
    assert len([w for w in record if "RateDistortionCallback" in str(w.message)]) == 1  # 2 validations, 1 warning
    assert rd.latest is None and not (tmp_path / "rd_curve.png").exists()


def test_model_with_two_quantizers_names_the_one_to_measure(tmp_path):
    model = MyModel()
    model.other = ScalableVQ(8, 4, bits=[1])
    with pytest.warns(UserWarning, match=r"several ScalableVQ modules \['vq', 'other'\]"):
        _fit(model, [RateDistortionCallback(output_dir=str(tmp_path))], tmp_path)
    named = MyModel()
    named.other = ScalableVQ(8, 4, bits=[1])
    rd = RateDistortionCallback(output_dir=str(tmp_path), quantizer="vq", plot=False)
    _fit(named, [rd], tmp_path)
    assert len(rd.latest["rows"]) == 3 and rd.latest["flat"]["bits"] == 4.0  # vq: 3 layers, K = 16


def test_rd_outputs_with_the_wrong_number_of_layers(tmp_path):
    class Short(MyModel):
        def rd_outputs(self, batch):
            target, recon, codes = super().rd_outputs(batch)
            return {"target": target, "recon": recon[:-1], "indices": codes}

    with pytest.raises(ValueError, match="returned 2 reconstructions but the quantizer has 3 layers"):
        _fit(Short(), [RateDistortionCallback(output_dir=str(tmp_path))], tmp_path)


def test_one_rd_table_formatter_for_other_columns():
    rows = [{"layer": 0, "coding": "raw", "bytes": 120, "bits": 2.0, "mse": None},
            {"layer": 1, "coding": "entropy", "bytes": 64, "bits": 3.0, "mse": 1e-3}]
    lines = format_rd_table(rows, title="stream").splitlines()
    assert lines[0] == "stream" and lines[1].split() == ["layer", "coding", "bytes", "bits/vec", "MSE"]
    assert lines[3].split() == ["0", "raw", "120", "2.000", "-"]
    assert lines[4].split() == ["1", "entropy", "64", "3.000", "1.0000e-03"]
    with pytest.raises(ValueError, match="empty"):
        format_rd_table([])


def test_callback_switches_and_paths_of_the_wrong_type(tmp_path):
    """``plot: maybe`` / ``on_checkpoint: 'no'`` used to count as true, ``output_dir: 3`` wrote into ./3."""
    assert _error(tmp_path, "callbacks.rate_distortion.plot=maybe") == (
        "callbacks.rate_distortion.plot must be a bool (True or False), got 'maybe'")
    assert _error(tmp_path, "callbacks.hierarchy_update.on_checkpoint='no'") == (
        "callbacks.hierarchy_update.on_checkpoint must be a bool (True or False), got 'no'")
    message = _error(tmp_path, "callbacks.rate_distortion.output_dir=3")
    assert message.startswith("callbacks.rate_distortion.output_dir must be a folder path"), message
    with pytest.raises(ValueError, match="^quantizer must be a str or None, got 3$"):
        RateDistortionCallback(quantizer=3)
    assert RateDistortionCallback(output_dir=tmp_path).output_dir == str(tmp_path)


# ----------------------------------------------------------------------------------------
# (c) checkpoints of your own LightningModule
# ----------------------------------------------------------------------------------------

def test_extract_quantizer_from_a_checkpoint_of_your_own_module(tmp_path):
    L.seed_everything(0, verbose=False)
    model = MyModel()
    trainer = _fit(model, [HierarchyUpdateCallback()], tmp_path)
    path = tmp_path / "mine.ckpt"
    trainer.save_checkpoint(path)
    q = extract_quantizer(path)
    assert isinstance(q, ScalableVQ) and q.is_built and not q.is_stale
    assert q.num_layers == 3 and q.codebook.shape == (16, 8)
    for key, value in model.vq.state_dict().items():
        assert torch.equal(q.state_dict()[key], value), key
    x = torch.randn(50, 8)
    assert torch.equal(q.encode(x), model.vq.eval().encode(x))


def test_extract_quantizer_from_an_old_flat_checkpoint_of_an_unknown_module(tmp_path):
    ckpt = torch.load(GOLDEN, weights_only=True)
    foreign = {"state_dict": {k.replace("quantizer.", "model.vq.", 1): v for k, v in ckpt["state_dict"].items()},
               "hyper_parameters": {"hidden": 7}, "epoch": 3}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    expected = torch.load(ROOT / "tests" / "data" / "golden_vectors_v1_expected.pt", weights_only=True)
    q = extract_quantizer(tmp_path / "foreign.ckpt")
    assert torch.equal(q.quantize(expected["probe"]), expected["indices"])
    for layer, recon in enumerate(expected["recon"], start=1):
        assert torch.equal(q.reconstruct(expected["indices"], layer), recon)
    with pytest.raises(ValueError, match="no ScalableVQ named 'quantizer'; it holds \\['model.vq'\\]"):
        extract_quantizer(tmp_path / "foreign.ckpt", name="quantizer")


def test_eval_of_a_checkpoint_of_your_own_module(tmp_path):
    L.seed_everything(0, verbose=False)
    trainer = _fit(MyModel(), [HierarchyUpdateCallback()], tmp_path)
    trainer.save_checkpoint(tmp_path / "mine.ckpt")
    np.save(tmp_path / "latents.npy", np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    # images: the module's class is needed (it is not recorded in the checkpoint)
    message = _error(tmp_path, f"ckpt_path={tmp_path / 'mine.ckpt'}", job=entry.evaluate, name="eval")
    assert "module_class=" in message and "data=vectors" in message, message
    # vectors: its quantizer alone
    cfg = _compose("eval", [f"ckpt_path={tmp_path / 'mine.ckpt'}", "data=vectors", f"data.path={tmp_path / 'latents.npy'}",
                            "trainer.enable_progress_bar=false"], tmp_path)
    result = entry.evaluate(cfg)
    assert result["layer"] == 2 and result["bits"] > 3.0 and result["mse"] > 0


def test_eval_of_the_golden_checkpoint_on_vectors(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(400, 3)).astype(np.float32))
    cfg = _compose("eval", [f"ckpt_path={GOLDEN}", "data=vectors", f"data.path={tmp_path / 'x.npy'}",
                            "trainer.enable_progress_bar=false"], tmp_path)
    result = entry.evaluate(cfg)
    assert result["layer"] == 3 and result["bits"] >= 4.0 and 0 < result["mse"] < float("inf")  # K = 16: >= log2 K
    message = _error(tmp_path, f"ckpt_path={GOLDEN}", "data=vectors", f"data.path={GOLDEN}", job=entry.evaluate,
                     name="eval")
    assert "data.path" in message  # a checkpoint is no vector file


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path):
    """ckpt_path= of an array file: one line before any data is read, not torch's UnpicklingError."""
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(200, 3)).astype(np.float32))
    message = _error(tmp_path, "data=vectors", f"data.path={tmp_path / 'x.npy'}", f"ckpt_path={tmp_path / 'x.npy'}")
    assert message.startswith(f"ckpt_path={tmp_path / 'x.npy'}: not a checkpoint"), message
    assert "allowed: a checkpoint train.py wrote" in message


def test_resume_from_a_checkpoint_of_another_model(tmp_path):
    """The golden checkpoint (ScalableVQVectors, K=16) resumed by a run of K=32, or by the autoencoder."""
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(200, 3)).astype(np.float32))
    vectors = ["data=vectors", f"data.path={tmp_path / 'x.npy'}", "bits=[2,1,1]"]
    message = _error(tmp_path, *vectors, "model.codebook_size=32", f"ckpt_path={GOLDEN}")
    assert message.startswith(f"ckpt_path={GOLDEN}: does not fit this model"), message
    assert "codebook_size=16" in message and "codebook_size=32" in message, message
    message = _error(tmp_path, f"ckpt_path={GOLDEN}")
    assert message.startswith(f"ckpt_path={GOLDEN}: a ScalableVQVectors checkpoint but this run trains a "
                              f"ScalableVQAutoencoder"), message
    cfg = _compose("train", [*vectors, "model.codebook_size=16", f"ckpt_path={GOLDEN}"], tmp_path)
    assert entry.check_resume(cfg.ckpt_path, entry.build_model(cfg, entry.build_datamodule(cfg.data),
                                                               checks.check_train_config(cfg))) == GOLDEN


def test_eval_with_a_module_class_that_is_not_one(tmp_path):
    """module_class= named itself (not ckpt_path) when it cannot be imported or is not a LightningModule."""
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(200, 3)).astype(np.float32))
    common = [f"ckpt_path={GOLDEN}", "data=vectors", f"data.path={tmp_path / 'x.npy'}"]
    message = _error(tmp_path, *common, "module_class=no_such_package.Model", job=entry.evaluate, name="eval")
    assert message.startswith("module_class=no_such_package.Model: cannot import it"), message
    message = _error(tmp_path, *common, "module_class=torch.nn.Linear", job=entry.evaluate, name="eval")
    assert message.startswith("module_class=torch.nn.Linear is not a LightningModule class"), message


def test_eval_of_a_vectors_checkpoint_on_images_says_which_data(tmp_path):
    """The model comes from the checkpoint: the hint is a data= setting, not model=."""
    message = _error(tmp_path, f"ckpt_path={GOLDEN}", job=entry.evaluate, name="eval")
    assert message == (f"ckpt_path={GOLDEN} holds a ScalableVQVectors, which takes vectors, but the data module "
                       f"gives images; use data=vectors data.path=<[N, D] file>"), message


# ----------------------------------------------------------------------------------------
# (d) Lightning's checkpoint names hold '='
# ----------------------------------------------------------------------------------------

def test_checkpoint_name_with_equals_signs_as_ckpt_path(tmp_path):
    named = tmp_path / "epoch=1-step=30.ckpt"
    shutil.copy(GOLDEN, named)
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(200, 3)).astype(np.float32))
    common = ["data=vectors", f"data.path={tmp_path / 'x.npy'}", "trainer.enable_progress_bar=false"]
    for arg in (f"ckpt_path={named}", f"ckpt_path='{named}'"):  # plain, and quoted for Hydra
        proc = _script("eval.py", arg, *common, f"hydra.run.dir={tmp_path / 'eval'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"rate-distortion of {named.name}" in proc.stdout
        shutil.rmtree(tmp_path / "eval")
    assert checks.quote_path_overrides(["ckpt_path=a/epoch=1.ckpt", "ckpt_path='b=c'", "bits=[1]"]) == [
        "ckpt_path='a/epoch=1.ckpt'", "ckpt_path='b=c'", "bits=[1]"]
    message = _error(tmp_path, f"ckpt_path='{tmp_path / 'epoch=9.ckpt'}'")
    assert "no such file" in message and "quoted for Hydra: ckpt_path=\"'" in message


def test_checkpoints_of_train_py_are_named_without_equals_signs(tmp_path):
    cfg = _compose("train", [], tmp_path)
    ckpt = entry.instantiate_list(cfg.callbacks)[0]
    name = Path(ckpt.format_checkpoint_name({"epoch": 1, "step": 30})).name
    assert name == "epoch001-step000030.ckpt"


# ----------------------------------------------------------------------------------------
# (e) log lines printed once, no "previous log files will be deleted"
# ----------------------------------------------------------------------------------------

TINY = ["bits=[1,1]", "model.codebook_size=8", "model.dim=4", "model.channels=8", "model.num_res_blocks=0",
        "data.crop_size=32", "data.train_crops_per_epoch=32", "data.val_crop_size=32", "data.max_val_crops=2",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_a_run_prints_each_log_line_once_and_keeps_earlier_metrics(tmp_path):
    run = tmp_path / "run"
    proc = _script("train.py", *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Previous log files" not in output
    assert output.count("GPU available") == 1, output[-3000:]
    assert "GPU available" in (run / "train.log").read_text()  # through Hydra's handlers, into the log file
    assert (run / "metrics.csv").is_file()
    before = (run / "metrics.csv").read_bytes()
    again = _script("train.py", *TINY, f"hydra.run.dir={run}")  # the same run directory: refused
    assert again.returncode == 2 and "already holds the metrics.csv" in again.stderr, again.stderr[-3000:]
    assert (run / "metrics.csv").read_bytes() == before

"""Hydra configs: every group composes and instantiates; bits / proposal overrides and their failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from svq_modules.lightning import checks, entry

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# groups whose options are a node with a _target_ (or a dict of them)
GROUPS = {
    "data": ["default_images", "image_folder", "vectors"],
    "model": ["autoencoder", "vectors"],
    "trainer": ["default", "gpu", "ddp"],
    "callbacks": ["default"],
    "logger": ["csv", "tensorboard", "many"],
    "proposal": ["default", "fixed", "balanced_clusters", "balanced_values"],
}
# groups of plain settings (the lightning-hydra-template layout)
SETTINGS = {
    "model/quantizer": ["default", "entropy_constrained"],
    "paths": ["default"],
    "hydra": ["default"],
    "debug": ["default", "fast_dev_run", "overfit"],
    "experiment": ["default_images"],
}


def _compose(name: str = "train", overrides: list[str] | None = None, tmp_path: Path | None = None):
    overrides = list(overrides or [])
    if tmp_path is not None:
        overrides.append(f"paths.output_dir={tmp_path}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_config_groups_on_disk_match_the_documented_options():
    for group, options in {**GROUPS, **SETTINGS}.items():
        on_disk = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        assert on_disk == sorted(options), group
    groups = {p.parent.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS}
    assert groups == set(GROUPS) | set(SETTINGS)


def _blocks(name: str) -> dict:
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONFIGS / name)).items() if k != "defaults"}


def test_train_and_eval_share_paths_and_hydra_and_repeat_no_block():
    train_cfg, eval_cfg = _blocks("train.yaml"), _blocks("eval.yaml")
    for cfg in (train_cfg, eval_cfg):
        assert not {"paths", "hydra"} & set(cfg)  # both come from the groups
    shared = {k for k in set(train_cfg) & set(eval_cfg) if isinstance(train_cfg[k], dict)}
    assert not shared, shared
    for name in ("train.yaml", "eval.yaml"):
        defaults = OmegaConf.load(CONFIGS / name).defaults
        assert {"paths": "default"} in defaults and {"hydra": "default"} in defaults


def test_one_quantizer_config_for_every_model():
    """Every model takes the shared quantizer options; the image model adds entropy-constrained training only."""
    default = OmegaConf.load(CONFIGS / "model" / "quantizer" / "default.yaml")
    added = {"vectors": {}, "autoencoder": {"train_rate_weight": 1.0}}
    assert set(added) == set(GROUPS["model"])
    for option in GROUPS["model"]:
        raw = OmegaConf.load(CONFIGS / "model" / f"{option}.yaml")
        assert "quantizer" not in raw
        cfg = _compose(overrides=[f"model={option}"] + (["data=vectors", "data.path=x"] if option == "vectors" else []))
        assert cfg.model.quantizer == OmegaConf.merge(default, added[option])
    plain = _compose(overrides=["model/quantizer=default"])
    assert plain.model.quantizer == default
    cfg = _compose(overrides=["model.quantizer.decay=0.9"])
    assert cfg.model.quantizer.decay == 0.9


def test_paths_and_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    try:
        assert Path(cfg.paths.root_dir) == tmp_path
        assert Path(cfg.paths.log_dir) == tmp_path / "outputs"
        assert Path(cfg.paths.data_dir) == tmp_path / "data"
        assert Path(cfg.hydra.run.dir).parent == tmp_path / "outputs" / "train"
        assert Path(cfg.paths.output_dir) == tmp_path / "run"
    finally:
        HydraConfig.instance().cfg = None
    loggers = cfg.hydra.job_logging.loggers
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # no handler of their own: printed once
        assert list(loggers[name].handlers) == [] and loggers[name].propagate is True


def test_experiment_default_images_is_the_default_run():
    assert _compose(overrides=["experiment=default_images"]) == _compose()


@pytest.mark.parametrize("option", SETTINGS["debug"])
def test_debug_options(option, tmp_path):
    cfg = _compose(overrides=[f"debug={option}"], tmp_path=tmp_path)
    assert cfg.task_name == "debug" and cfg.trainer.max_epochs >= 1
    if option == "fast_dev_run":
        assert cfg.trainer.fast_dev_run is True
    if option == "overfit":
        assert cfg.trainer.overfit_batches == 1
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.fast_dev_run == (option == "fast_dev_run")


def test_default_train_config():
    cfg = _compose()
    assert list(cfg.bits) == [4, 2, 2, 2, 2]
    assert cfg.seed == 0 and cfg.ckpt_path is None
    assert cfg.model._target_.endswith("ScalableVQAutoencoder")
    assert cfg.data._target_.endswith("SampleImagesDataModule")
    assert cfg.logger.csv._target_ == "lightning.pytorch.loggers.CSVLogger"
    assert cfg.trainer.accelerator == "cpu"
    assert set(cfg.callbacks) >= {"model_checkpoint", "hierarchy_update", "rate_distortion"}
    assert cfg.callbacks.model_checkpoint.save_last is True
    assert checks.resolve_proposal(cfg) == {"bits": [4, 2, 2, 2, 2], "num_layers": 6}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_its_targets_import(group, option, tmp_path):
    cfg = _compose(overrides=[f"{group}={option}"], tmp_path=tmp_path)
    node = cfg[group]
    targets = [node._target_] if "_target_" in node else [v._target_ for v in node.values() if "_target_" in v]
    assert targets, f"{group}={option} has no _target_"
    for target in targets:
        assert callable(get_class(target)), target


@pytest.mark.parametrize("option", GROUPS["trainer"])
def test_trainer_options(option, tmp_path):
    cfg = _compose(overrides=[f"trainer={option}"], tmp_path=tmp_path)
    assert cfg.trainer.default_root_dir == str(tmp_path)
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    if option == "gpu":
        assert cfg.trainer.accelerator == "gpu"
    if option == "default":
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_logger_options_instantiate_in_the_run_dir(option, tmp_path):
    cfg = _compose(overrides=[f"logger={option}"], tmp_path=tmp_path)
    loggers = entry.instantiate_list(cfg.logger, "logger")
    assert len(loggers) == (2 if option == "many" else 1)
    for lg in loggers:
        assert Path(lg.save_dir) == tmp_path
        if type(lg).__name__ == "CSVLogger":
            assert Path(lg.log_dir) == tmp_path  # metrics.csv directly in the run dir


def test_callbacks_instantiate(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from svq_modules.lightning import HierarchyUpdateCallback, RateDistortionCallback

    cfg = _compose(tmp_path=tmp_path)
    callbacks = entry.instantiate_list(cfg.callbacks)
    kinds = {type(c) for c in callbacks}
    assert {ModelCheckpoint, HierarchyUpdateCallback, RateDistortionCallback} <= kinds
    ckpt = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last
    rd = next(c for c in callbacks if isinstance(c, RateDistortionCallback))
    assert Path(rd.output_dir) == tmp_path


@pytest.mark.parametrize("overrides,expected", [
    (["bits=[4,2,2,2,2]"], {"bits": [4, 2, 2, 2, 2], "num_layers": 6}),
    (["bits=[3,3]"], {"bits": [3, 3], "num_layers": 3}),
    (["bits=[6]"], {"bits": [6], "num_layers": 2}),
    (["proposal=fixed"], {"bits": 2, "num_layers": 6}),
    (["proposal=fixed", "proposal.bits=3", "proposal.num_layers=4"], {"bits": 3, "num_layers": 4}),
    (["proposal=balanced_clusters"], {"bits": "balanced_clusters", "num_layers": 6}),
    (["proposal=balanced_values", "proposal.num_layers=3"], {"bits": "balanced_values", "num_layers": 3}),
])
def test_bits_and_proposal_overrides(overrides, expected):
    cfg = _compose(overrides=overrides)
    assert checks.check_train_config(cfg) == expected


@pytest.mark.parametrize("overrides", [["bits=[4,2,2]"], ["proposal=fixed"], ["proposal=balanced_values"]])
def test_resolved_proposal_builds_the_model(overrides):
    cfg = _compose(overrides=overrides + ["model.codebook_size=32", "model.channels=8"])
    spec = checks.check_train_config(cfg)
    model = instantiate(cfg.model, _convert_="all", **spec)
    assert model.quantizer.num_layers == (4 if overrides == ["bits=[4,2,2]"] else 6)
    assert model.hparams.bits == spec["bits"]


@pytest.mark.parametrize("overrides,message", [
    (["bits=[0]"], "at least 1 bit"),
    (["bits=[4,0,2]"], "at least 1 bit"),
    (["bits=[-2]"], "at least 1 bit"),
    (["bits=hello"], "'hello'"),
    (["bits=[]"], "empty"),
    (["bits=null"], "None"),
    (["bits=[4,2.5]"], "ints"),
    (["bits=[4,true]"], "ints"),
    (["bits=[40]"], "at most 24"),
    (["proposal=fixed", "proposal.num_layers=null"], "num_layers"),
    (["proposal=fixed", "proposal.bits=0"], "at least 1 bit"),
    (["proposal=balanced_clusters", "proposal.num_layers=1"], "num_layers"),
    (["proposal=balanced_clusters", "proposal.bits=balanced_nothing"], "balanced_nothing"),
    (["model.codebook_size=0"], "codebook_size"),
    (["data=image_folder"], "data.root"),
    (["data=vectors"], "data.path"),
    (["ckpt_path=/nonexistent/last.ckpt"], "no such file"),
    (["seed=1.5"], "seed"),
])
def test_bad_overrides_fail_with_a_clear_message(overrides, message):
    cfg = _compose(overrides=overrides)
    with pytest.raises(checks.ConfigError) as info:
        checks.check_train_config(cfg)
    assert message in str(info.value), str(info.value)


def test_unknown_proposal_fails_at_compose():
    with pytest.raises(HydraException, match="proposal/nope") as info:
        _compose(overrides=["proposal=nope"])
    assert "balanced_clusters" in str(info.value)  # Hydra lists the available options


def test_data_vectors_selects_the_vector_model_unless_overridden():
    cfg = _compose(overrides=["data=vectors", "data.path=x.npy"])
    assert cfg.model._target_.endswith("ScalableVQVectors")
    cfg = _compose(overrides=["data=vectors", "data.path=x.npy", "model=autoencoder"])
    assert cfg.model._target_.endswith("ScalableVQAutoencoder")


def test_data_model_mismatch_is_reported(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32))
    cfg = _compose(overrides=["data=vectors", f"data.path={path}", "model=autoencoder"])
    dm = instantiate(cfg.data)
    with pytest.raises(checks.ConfigError, match="model=vectors"):
        entry.check_pairing(get_class(cfg.model._target_), dm)
    cfg = _compose(overrides=["data=vectors", f"data.path={path}"])
    entry.check_pairing(get_class(cfg.model._target_), instantiate(cfg.data))  # fine


@pytest.mark.parametrize("option", GROUPS["data"])
def test_data_options_instantiate_and_give_batches(option, tmp_path):
    overrides = [f"data={option}"]
    if option == "image_folder":
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, size=(80, 120, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        overrides += [f"data.root={tmp_path}", "data.crop_size=32", "data.val_crop_size=16"]
    if option == "vectors":
        np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32))
        overrides += [f"data.path={tmp_path / 'x.npy'}"]
    cfg = _compose(overrides=overrides)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    if option == "vectors":
        assert batch.shape[1] == 5 and dm.dim == 5
        assert len(dm.data_train) + len(dm.data_val) == 50
    else:
        assert batch.shape[1:] == (3, cfg.data.crop_size, cfg.data.crop_size)
        assert val.shape[1:] == (3, cfg.data.val_crop_size, cfg.data.val_crop_size)
        assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0


def test_sample_images_validation_is_held_out_and_fixed():
    cfg = _compose()
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    # validation crops come from the right 20% of each image, training crops from the rest
    assert all(img.shape[2] == 512 for img in dm.train_images)
    assert all(img.shape[2] == 128 for img in dm.val_images)
    a = torch.stack(list(dm.data_val))
    dm2 = instantiate(cfg.data, _convert_="all")
    dm2.setup("validate")
    assert torch.equal(a, torch.stack(list(dm2.data_val)))


def test_eval_config():
    cfg = _compose("eval", overrides=["ckpt_path=some.ckpt"])
    assert cfg.ckpt_path == "some.ckpt" and cfg.get("model") is None and cfg.module_class is None
    assert cfg.data._target_.endswith("SampleImagesDataModule")
    cfg = _compose("eval")
    assert OmegaConf.is_missing(cfg, "ckpt_path")
    cfg = _compose("eval", overrides=["ckpt_path=x", "data=vectors", "data.path=x.npy"])
    assert cfg.data._target_.endswith("VectorDataModule")


@pytest.mark.parametrize("override,message", [
    ("bits=[0]", "at least 1 bit"),
    ("bits=hello", "'hello'"),
    ("proposal=nope", "proposal/nope"),
])
def test_train_script_rejects_bad_overrides_before_training(override, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), override, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()


def test_overfit_trains_on_the_same_crops_every_epoch(tmp_path):
    import lightning as L

    cfg = _compose(overrides=["debug=overfit", "data.batch_size=4", "data.train_crops_per_epoch=8"], tmp_path=tmp_path)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    dm.trainer = L.Trainer(overfit_batches=cfg.trainer.overfit_batches, logger=False, enable_progress_bar=False)
    first, again = (next(iter(dm.train_dataloader())) for _ in range(2))
    assert torch.equal(first, again)
    dm.trainer = L.Trainer(logger=False, enable_progress_bar=False)  # a normal run: fresh random crops
    first, again = (next(iter(dm.train_dataloader())) for _ in range(2))
    assert not torch.equal(first, again)

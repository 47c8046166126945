#!/usr/bin/env python
"""Rate-distortion table of a trained checkpoint on a dataset (Lightning + Hydra).

    python eval.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=... data.val_fraction=1.0          # whole sample images
    python eval.py ckpt_path=... data=image_folder data.root=DIR
    python eval.py ckpt_path=... data=vectors data.path=x.npy

Loads the LightningModule from the checkpoint (its class is recorded in it), runs one
validation pass over the data module's validation split with the
:class:`~svq_modules.lightning.callbacks.RateDistortionCallback`, prints the RD table
and writes ``rd_curve.png`` / ``rd_layers.png`` / ``rd_table.json`` / ``metrics.csv``
into Hydra's run directory (``outputs/eval/<date>_<time>``). With the data settings of
the training run it reproduces the last validation's figures of that run.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from train import ConfigError, check_pairing, instantiate_list, print_figures, quiet_warnings, run_checked


def evaluate(cfg: DictConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ConfigError("ckpt_path=<checkpoint> is required")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist")
    for key in ("root", "path"):
        if OmegaConf.is_missing(cfg.data, key):
            raise ConfigError(f"data.{key} is required for this data config (e.g. data.{key}=...)")

    quiet_warnings()
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from svq_modules.lightning.callbacks import HierarchyUpdateCallback, RateDistortionCallback
    from svq_modules.lightning.modules import load_lit_module

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    meta = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    model = load_lit_module(ckpt)
    datamodule = instantiate(cfg.data, _convert_="all")
    check_pairing(type(model), datamodule)
    if hasattr(datamodule, "dim") and int(datamodule.dim) != int(model.hparams.dim):
        raise ConfigError(f"the checkpoint quantizes {model.hparams.dim}-dim vectors but {datamodule.path} "
                          f"holds {datamodule.dim}-dim ones")

    rd = RateDistortionCallback(output_dir=cfg.paths.output_dir)
    callbacks = [HierarchyUpdateCallback(on_checkpoint=False, on_fit_end=False), rd]
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.validate(model, datamodule=datamodule, verbose=False)

    result: dict[str, float] = {}
    if trainer.is_global_zero and rd.latest is not None:
        print()
        title = (f"rate-distortion of {ckpt.name} (epoch {meta.get('epoch')}, step {meta.get('global_step')}) "
                 f"on {rd.latest['num_vectors']} vectors")
        print(rd.table(title=title))
        result = {k: float(v) for k, v in rd.latest["rows"][-1].items()}
        print_figures(Path(cfg.paths.output_dir), t0)
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_checked(evaluate, cfg)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train a model with a ScalableVQ bottleneck (Lightning + Hydra).

    python train.py                                   # conv autoencoder on sklearn's sample images
    python train.py bits=[4,2,2,2,2]                   # explicit bit list (base layer first)
    python train.py proposal=balanced_clusters         # named bit proposal (proposal.num_layers=6)
    python train.py data=vectors data.path=x.npy       # plain [N, D] vectors, quantizer only
    python train.py data=image_folder data.root=DIR    # your own images
    python train.py model.codebook_size=256 trainer.max_epochs=4 seed=1
    python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2
    python train.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt   # resume

Outputs land in Hydra's run directory (``outputs/train/<date>_<time>``): ``metrics.csv``
(CSVLogger), ``checkpoints/last.ckpt``, ``rd_curve.png``, ``rd_layers.png``,
``rd_table.json``, ``.hydra/`` (the composed config) and ``train.log``.

The configuration is checked before anything heavy happens: a wrong override (unknown
proposal, ``bits=[0]``, ``bits=hello``, a missing checkpoint, data/model mismatch) stops
with a one-line error and exit status 2.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


class ConfigError(ValueError):
    """A configuration that cannot work; reported without a traceback."""


# ----------------------------------------------------------------------------------------
# configuration checks (no training, no data loading)
# ----------------------------------------------------------------------------------------

def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def resolve_proposal(cfg: DictConfig) -> dict[str, Any]:
    """The ``bits`` / ``num_layers`` the model gets, validated. Raises :class:`ConfigError`."""
    from svq_modules.lightning.modules import check_proposal

    if "bits" not in cfg:
        raise ConfigError("the config has no top-level 'bits' key")
    proposal = cfg.get("proposal")
    try:
        if proposal is None or len(proposal) == 0:
            # no proposal group: the top-level bits list
            bits, num_layers = check_proposal(_plain(cfg.bits), None)
        else:
            if "_target_" not in proposal:
                raise ConfigError("proposal config needs a _target_ (e.g. svq_modules.lightning.modules.Proposal)")
            from hydra.utils import instantiate

            prop = instantiate(proposal, _convert_="all")
            if hasattr(prop, "as_kwargs"):
                spec = prop.as_kwargs()
            elif isinstance(prop, dict):
                spec = prop
            else:
                raise ConfigError(f"proposal {proposal._target_} returned {type(prop).__name__}, "
                                  f"expected a Proposal or a dict with bits / num_layers")
            bits, num_layers = check_proposal(spec.get("bits"), spec.get("num_layers"))
    except ConfigError:
        raise
    except Exception as e:  # ValueError from the checks, InstantiationException wrapping them, ...
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise ConfigError(f"bad bit proposal: {cause}") from None
    return {"bits": bits, "num_layers": num_layers}


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Fast checks of a composed train config; returns the resolved bit proposal.

    Raises :class:`ConfigError` naming the key at fault.
    """
    spec = resolve_proposal(cfg)
    model = cfg.get("model")
    if model is None or "_target_" not in model:
        raise ConfigError("no model config (model=autoencoder or model=vectors)")
    k = model.get("codebook_size")
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ConfigError(f"model.codebook_size must be an int >= 2, got {k!r}")
    bits = spec["bits"]
    if isinstance(bits, list) and 2 ** bits[0] > k:
        warnings.warn(f"base layer of {bits[0]} bits has room for {2 ** bits[0]} cells but the codebook has "
                      f"only {k} codes", stacklevel=2)
    data = cfg.get("data")
    if data is None or "_target_" not in data:
        raise ConfigError("no data config (data=default_images, image_folder or vectors)")
    for key in ("root", "path"):
        if OmegaConf.is_missing(data, key):
            raise ConfigError(f"data.{key} is required for data={_data_choice(cfg)} (e.g. data.{key}=...)")
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed must be an int, got {cfg.get('seed')!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist")
    return spec


def _data_choice(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get("data"))
    except Exception:
        return str(cfg.data.get("_target_"))


# ----------------------------------------------------------------------------------------
# building blocks shared with eval.py
# ----------------------------------------------------------------------------------------

def quiet_warnings() -> None:
    """Silence Lightning hints that do not apply to these small CPU runs."""
    for msg in (r".*does not have many workers.*", r".*smaller than the logging interval.*",
r".*is not divisible by the world size.*"):
        warnings.filterwarnings("ignore", message=msg)


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a dict of configs (callbacks, loggers)."""
    from hydra.utils import instantiate

    out = []
    if not node:
        return out
    for _name, conf in node.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            out.append(instantiate(conf))
    return out


def check_pairing(model_cls: type, datamodule: Any) -> None:
    want = getattr(model_cls, "data_kind", None)
    have = getattr(datamodule, "kind", None)
    if want and have and want != have:
        hint = "model=vectors" if have == "vectors" else "model=autoencoder"
        raise ConfigError(f"{model_cls.__name__} trains on {want} but the data module gives {have}; use {hint}")


def print_rank_fingerprints(trainer: Any, model: Any) -> None:
    from svq_modules.lightning.callbacks import quantizer_fingerprint
    from svq_modules.lightning.modules import quantizer_modules

    for name, q in quantizer_modules(model):
        print(f"[rank {trainer.global_rank}] fingerprint of {name or '<root>'}: "
              f"{quantizer_fingerprint(q)}", flush=True)


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------

def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final layer's RD figures (rank 0) or ``{}``."""
    t0 = time.perf_counter()
    spec = check_config(cfg)

    quiet_warnings()
    import lightning as L
    from hydra.utils import get_class, instantiate

    from svq_modules.lightning.callbacks import RateDistortionCallback

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    model_cls = get_class(cfg.model._target_)
    check_pairing(model_cls, datamodule)

    extra: dict[str, Any] = dict(spec)
    if "dim" in cfg.model and cfg.model.dim is None:
        if not hasattr(datamodule, "dim"):
            raise ConfigError("model.dim=null needs a data module that knows its dimension (data=vectors)")
        extra["dim"] = int(datamodule.dim)
    elif "dim" in cfg.model and hasattr(datamodule, "dim") and int(cfg.model.dim) != int(datamodule.dim):
        raise ConfigError(f"model.dim={cfg.model.dim} but the vectors in {datamodule.path} have "
                          f"dimension {datamodule.dim} (use model.dim=null to take it from the data)")
    if "data_range" in cfg.model and cfg.model.data_range is None and hasattr(datamodule, "data_range"):
        extra["data_range"] = float(datamodule.data_range)  # PSNR peak = value range of the data
    try:
        model = instantiate(cfg.model, _convert_="all", **extra)
    except Exception as e:
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"cannot build the model: {cause}") from None
        raise

    callbacks = instantiate_list(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # trainer.enable_progress_bar=false wins
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    rd = next((c for c in trainer.callbacks if isinstance(c, RateDistortionCallback)), None)
    if cfg.get("final_rd", True) and rd is not None:
        if rd.latest is None or rd.latest["step"] != trainer.global_step:
            trainer.validate(model, datamodule=datamodule, verbose=False)

    print_rank_fingerprints(trainer, model)
    result: dict[str, float] = {}
    if trainer.is_global_zero:
        out_dir = Path(cfg.paths.output_dir)
        ckpt_cb = trainer.checkpoint_callback
        print()
        if rd is not None and rd.latest is not None:
            print(rd.table())
            last = rd.latest["rows"][-1]
            result = {k: float(v) for k, v in last.items()}
        if ckpt_cb is not None and getattr(ckpt_cb, "last_model_path", ""):
            print(f"last checkpoint: {ckpt_cb.last_model_path}")
        for lg in trainer.loggers:
            metrics = Path(getattr(lg, "log_dir", "") or "") / "metrics.csv"
            if metrics.is_file():
                print(f"metrics: {metrics}")
        print_figures(out_dir, t0)
    return result


def print_figures(out_dir: Path, t0: float) -> None:
    """Name the RD figures written to ``out_dir`` and the wall time since ``t0``."""
    for png in ("rd_curve.png", "rd_layers.png"):
        if (out_dir / png).is_file():
            print(f"figure: {out_dir / png}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s", flush=True)


def run_checked(job: Any, cfg: DictConfig) -> float | None:
    """Run ``job(cfg)``; a ConfigError becomes a one-line message and exit status 2.

    Returns the final layer's PSNR (for Hydra sweepers).
    """
    try:
        result = job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return result.get("psnr")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_checked(train, cfg)


if __name__ == "__main__":
    main()

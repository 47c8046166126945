"""The work behind ``train.py`` and ``eval.py`` (two thin ``@hydra.main`` scripts).

Both scripts call :func:`run_checked` with :func:`train` or :func:`evaluate`: every
setting a user can get wrong is checked before anything heavy happens (data loading
included) and reported as one line, ``error: <setting>=<value> ...; allowed: ...``,
with exit status 2 (:class:`~svq_modules.lightning.checks.ConfigError`).

Lightning is imported with this module, before Hydra configures logging, so that
``configs/hydra/default.yaml`` can route Lightning's log lines through Hydra's
handlers (printed once, also written to ``<run dir>/<script>.log``).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from ..distributed import release_process_group
from .callbacks import HierarchyUpdateCallback, quantizer_fingerprint
from .checkpoints import extract_quantizer, load_checkpoint, load_lit_module, module_class
from .checks import (
    ConfigError,
    check_ckpt_path,
    check_eval_config,
    check_train_config,
    config_error,
    first_line,
    is_main_process,
    quote_path_overrides,
    root_cause,
)
from .modules import ScalableVQVectors
from .protocol import quantizer_modules
from .rate_distortion import RateDistortionCallback

__all__ = [
    "ConfigError",
    "build_datamodule",
    "check_pairing",
    "check_resume",
    "evaluate",
    "hydra_argv",
    "instantiate_list",
    "print_figures",
    "quiet_warnings",
    "run_checked",
    "train",
]


# ----------------------------------------------------------------------------------------
# script plumbing
# ----------------------------------------------------------------------------------------

def hydra_argv() -> None:
    """Quote path overrides holding ``=`` in ``sys.argv`` before Hydra parses it (see ``quote_path_overrides``)."""
    sys.argv[:] = quote_path_overrides(sys.argv)


def run_checked(job: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Run ``job(cfg)``; a :class:`ConfigError` becomes ``error: ...`` on stderr and exit status 2.

    Returns the final layer's PSNR (what a Hydra sweeper optimizes), or None.
    """
    try:
        result = job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    release_process_group()  # each DDP rank, once its run is done (Lightning leaves the group alive)
    return result.get("psnr")


def quiet_warnings() -> None:
    """Silence Lightning hints that do not apply to these runs.

    The CSV logger's "Previous log files in this directory will be deleted" fires for
    every run (the Hydra run directory already holds ``.hydra/``); the one file it
    would delete, an earlier ``metrics.csv``, is refused before training instead.
    """
    for msg in (r".*does not have many workers.*", r".*smaller than the logging interval.*",
                r".*is not divisible by the world size.*", r".*exists and is not empty.*",
                r".*isinstance\(treespec, LeafSpec\)` is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg)


def instantiate_list(node: DictConfig | None, group: str = "callbacks") -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a dict of configs (callbacks, loggers)."""
    from hydra.utils import instantiate

    out = []
    for name, conf in (node or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            try:
                out.append(instantiate(conf))
            except Exception as e:
                raise config_error(e, f"{group}.{name}", conf) from None
    return out


def print_figures(out_dir: Path, t0: float) -> None:
    """Name the RD figures written to ``out_dir`` and the wall time since ``t0``."""
    for png in ("rd_curve.png", "rd_layers.png"):
        if (out_dir / png).is_file():
            print(f"figure: {out_dir / png}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------
# building blocks (each turns a user's mistake into a ConfigError)
# ----------------------------------------------------------------------------------------

def build_datamodule(node: DictConfig) -> L.LightningDataModule:
    """Instantiate the data config (settings checked by the data module's constructor)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except Exception as e:
        raise config_error(e, "data", node) from None


def setup_data(datamodule: L.LightningDataModule, stage: str, node: DictConfig) -> None:
    """Load the data now (reading files, cutting crops) so that bad data stops the run before training."""
    try:
        datamodule.prepare_data()
        datamodule.setup(stage)
    except (OSError, ValueError) as e:
        raise config_error(e, "data", node) from None


def check_pairing(model: Any, datamodule: Any, checkpoint: Path | None = None) -> None:
    """The model (class or instance) takes the data module's batches; image crops fit its patches.

    ``checkpoint``: the file the model came from (eval.py); then the data is what to change.
    """
    want = getattr(model, "data_kind", None)
    have = getattr(datamodule, "kind", None)
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    if want and have and want != have:
        if checkpoint is not None:
            hint = "data=vectors data.path=<[N, D] file>" if want == "vectors" else "data=default_images or data=image_folder"
            raise ConfigError(f"ckpt_path={checkpoint} holds a {name}, which takes {want}, but the data module gives "
                              f"{have}; use {hint}")
        hint = "model=vectors" if have == "vectors" else "model=autoencoder"
        raise ConfigError(f"{name} trains on {want} but the data module gives {have}; use {hint}")
    patch = getattr(getattr(model, "hparams", None), "patch_size", None)
    for key in ("crop_size", "val_crop_size"):
        size = getattr(datamodule, key, None)
        if patch and size and size % patch:
            raise ConfigError(f"data.{key}={size} is not a multiple of the model's patch_size={patch}; "
                              f"allowed: multiples of {patch}")


def _data_dim(datamodule: Any, node: DictConfig) -> int:
    try:
        return int(datamodule.dim)
    except (OSError, ValueError) as e:
        raise config_error(e, "data", node) from None


def build_model(cfg: DictConfig, datamodule: Any, spec: dict[str, Any]) -> L.LightningModule:
    """Instantiate the model config with the checked bit proposal and what the data tells."""
    from hydra.utils import get_class, instantiate

    try:
        model_cls = get_class(cfg.model._target_)
    except Exception as e:
        raise config_error(e, "model._target_") from None
    check_pairing(model_cls, datamodule)
    extra: dict[str, Any] = dict(spec)
    if "dim" in cfg.model and hasattr(type(datamodule), "dim"):
        dim = _data_dim(datamodule, cfg.data)
        if cfg.model.dim is None:
            extra["dim"] = dim
        elif cfg.model.dim != dim:
            raise ConfigError(f"model.dim={cfg.model.dim} but the vectors in data.path={datamodule.path} have "
                              f"dimension {dim}; allowed: {dim} or null (taken from the data)")
    if "data_range" in cfg.model and cfg.model.data_range is None and hasattr(type(datamodule), "data_range"):
        extra["data_range"] = float(datamodule.data_range)  # PSNR peak = value range of the data
    try:
        model = instantiate(cfg.model, _convert_="all", **extra)
    except Exception as e:
        raise config_error(e, "model", cfg.model) from None
    check_pairing(model, datamodule)
    return model


def build_trainer(cfg: DictConfig, callbacks: list[Any]) -> L.Trainer:
    """Loggers and the trainer; refuses to overwrite an earlier run's ``metrics.csv``."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.loggers import CSVLogger

    if cfg.trainer.get("enable_progress_bar") is False:  # trainer.enable_progress_bar=false wins
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = instantiate_list(cfg.get("logger"), "logger")
    for lg in loggers:
        metrics = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
        if metrics is not None and metrics.is_file() and is_main_process():
            raise ConfigError(f"hydra.run.dir={metrics.parent} already holds the metrics.csv of an earlier run, "
                              f"which the CSV logger would delete; allowed: a new run directory (the default)")
    try:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except Exception as e:
        raise config_error(e, "trainer", cfg.trainer) from None


def print_rank_fingerprints(trainer: L.Trainer, model: Any) -> None:
    for name, q in quantizer_modules(model):
        print(f"[rank {trainer.global_rank}] fingerprint of {name or '<root>'}: {quantizer_fingerprint(q)}",
              flush=True)


# ----------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------

def check_resume(value: Any, model: L.LightningModule) -> Path | None:
    """The checkpoint ``ckpt_path`` resumes from, read and matched to ``model`` before training.

    Raises:
        ConfigError: not a Lightning checkpoint, one of another LightningModule, or one
            whose weights do not load into ``model`` (the first complaint named).
    """
    path = check_ckpt_path(value)
    if path is None:
        return None
    allowed = "allowed: a checkpoint train.py wrote for this model, e.g. outputs/train/<run>/checkpoints/last.ckpt"
    try:
        ckpt = load_checkpoint(path)
    except (OSError, ValueError) as e:
        reason = first_line(e).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        raise ConfigError(f"ckpt_path={value}: {reason}; {allowed}") from None
    cls = module_class(ckpt)
    if cls is not None and not isinstance(model, cls):
        raise ConfigError(f"ckpt_path={value}: a {cls.__name__} checkpoint but this run trains a "
                          f"{type(model).__name__}; {allowed}")
    try:  # what trainer.fit will do first; here it fails in one line, before any data is loaded
        model.load_state_dict(ckpt["state_dict"], strict=getattr(model, "strict_loading", True))
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]) if lines else ""
        raise ConfigError(f"ckpt_path={value}: does not fit this model ({reason[:300]}); {allowed}") from None
    return path


def _start(cfg: DictConfig) -> L.LightningDataModule:
    """After the config checks, common to both jobs: quiet warnings, seed, the (not yet set up) datamodule."""
    quiet_warnings()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_datamodule(cfg.data)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final layer's RD figures (rank 0) or ``{}``."""
    t0 = time.perf_counter()
    spec = check_train_config(cfg)
    datamodule = _start(cfg)
    model = build_model(cfg, datamodule, spec)
    trainer = build_trainer(cfg, instantiate_list(cfg.get("callbacks"), "callbacks"))
    resume = check_resume(cfg.get("ckpt_path"), model)
    setup_data(datamodule, "fit", cfg.data)

    trainer.fit(model, datamodule=datamodule, ckpt_path=None if resume is None else str(resume))
    rd = next((c for c in trainer.callbacks if isinstance(c, RateDistortionCallback)), None)
    if cfg.get("final_rd", True) and rd is not None:
        if rd.latest is None or rd.latest["step"] != trainer.global_step:
            trainer.validate(model, datamodule=datamodule, verbose=False)

    print_rank_fingerprints(trainer, model)
    result: dict[str, float] = {}
    if trainer.is_global_zero:
        print()
        if rd is not None and rd.latest is not None:
            print(rd.table())
            result = {k: float(v) for k, v in rd.latest["rows"][-1].items()}
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and getattr(ckpt_cb, "last_model_path", ""):
            print(f"last checkpoint: {ckpt_cb.last_model_path}")
        for lg in trainer.loggers:
            metrics = Path(getattr(lg, "log_dir", "") or "") / "metrics.csv"
            if metrics.is_file():
                print(f"metrics: {metrics}")
        print_figures(Path(cfg.paths.output_dir), t0)
    return result


# ----------------------------------------------------------------------------------------
# eval.py
# ----------------------------------------------------------------------------------------

def eval_model(cfg: DictConfig, ckpt: Path, datamodule: Any) -> L.LightningModule:
    """The LightningModule to validate: the checkpoint's own, ``module_class``'s, or its quantizer alone.

    A checkpoint of a LightningModule this package does not know is measured through
    its ScalableVQ alone on vectors (``data=vectors``, e.g. your model's latents).
    """
    from hydra.utils import get_class

    cls = None
    if cfg.get("module_class"):
        allowed = "allowed: the import path of your LightningModule class, e.g. module_class=my_package.MyModel"
        try:
            cls = get_class(cfg.module_class)
        except Exception as e:  # Hydra wraps ImportError / AttributeError in its own errors
            raise ConfigError(f"module_class={cfg.module_class}: cannot import it ({first_line(root_cause(e))}); "
                              f"{allowed}") from None
        if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
            raise ConfigError(f"module_class={cfg.module_class} is not a LightningModule class; {allowed}")
    try:
        meta = load_checkpoint(ckpt)
        cls = cls or module_class(meta)
        if cls is not None:
            model = load_lit_module(ckpt, cls=cls)
        elif getattr(datamodule, "kind", None) == "vectors":
            model = _quantizer_alone(extract_quantizer(meta), datamodule, cfg.data)
        else:
            raise ConfigError(f"ckpt_path={ckpt} was written by a LightningModule this package does not know; "
                              f"allowed: module_class=<package.module.Class> (with rd_outputs), or its quantizer "
                              f"alone on vectors: data=vectors data.path=<[N, D] latents>")
    except ConfigError:
        raise
    except Exception as e:
        reason = first_line(root_cause(e)).removeprefix(f"{ckpt}: ").removeprefix(f"{ckpt} ")
        raise ConfigError(f"ckpt_path={ckpt}: {reason}") from None
    check_pairing(model, datamodule, checkpoint=ckpt)
    dim = getattr(getattr(model, "hparams", None), "dim", None)
    if hasattr(type(datamodule), "dim") and dim is not None and _data_dim(datamodule, cfg.data) != int(dim):
        raise ConfigError(f"data.path={datamodule.path} holds {datamodule.dim}-dim vectors but the checkpoint "
                          f"quantizes {dim}-dim ones; allowed: a file of {dim}-dim vectors")
    return model


def _quantizer_alone(q: Any, datamodule: Any, node: DictConfig) -> L.LightningModule:
    dim = _data_dim(datamodule, node)
    if dim != q.dim:
        raise ConfigError(f"data.path={datamodule.path} holds {dim}-dim vectors but the checkpoint's quantizer "
                          f"quantizes {q.dim}-dim ones; allowed: a file of {q.dim}-dim vectors")
    model = ScalableVQVectors(dim=q.dim, codebook_size=q.codebook_size,
                              bits=[int(w) for w in q.tables.widths[:-1].tolist()], num_layers=q.num_layers,
                              data_range=float(datamodule.data_range) or None)
    model.quantizer = q
    return model


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """One validation pass of a checkpoint with the RD callback; returns the final layer's figures."""
    t0 = time.perf_counter()
    ckpt = check_eval_config(cfg)
    datamodule = _start(cfg)
    model = eval_model(cfg, ckpt, datamodule)
    rd = RateDistortionCallback(output_dir=cfg.paths.output_dir)
    trainer = build_trainer(cfg, [HierarchyUpdateCallback(on_checkpoint=False, on_fit_end=False), rd])
    setup_data(datamodule, "validate", cfg.data)
    trainer.validate(model, datamodule=datamodule, verbose=False)

    result: dict[str, float] = {}
    if trainer.is_global_zero and rd.latest is not None:
        meta = load_checkpoint(ckpt)
        print()
        print(rd.table(title=f"rate-distortion of {ckpt.name} (epoch {meta.get('epoch')}, step "
                             f"{meta.get('global_step')}) on {rd.latest['num_vectors']} vectors"))
        result = {k: float(v) for k, v in rd.latest["rows"][-1].items()}
        print_figures(Path(cfg.paths.output_dir), t0)
    return result

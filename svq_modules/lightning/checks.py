"""Checks of composed ``train.py`` / ``eval.py`` configs, before anything heavy happens.

Every problem a user can cause from the command line ends as a :class:`ConfigError`:
one line naming the setting, its value and what is allowed, which the scripts print
without a traceback (exit status 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..validation import check_bit_proposal, check_int
from .modules import to_plain

__all__ = [
    "ConfigError",
    "PATH_KEYS",
    "check_ckpt_path",
    "check_eval_config",
    "check_train_config",
    "config_error",
    "first_line",
    "is_main_process",
    "quote_path_overrides",
    "resolve_proposal",
    "root_cause",
]

#: overrides whose values are file paths (quoted for Hydra when they hold '=')
PATH_KEYS = ("ckpt_path", "data.path", "data.root")


class ConfigError(ValueError):
    """A configuration that cannot work; reported in one line without a traceback (exit status 2)."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost ``__cause__`` (Hydra wraps errors of ``_target_`` calls in InstantiationException)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def config_error(error: BaseException, group: str, node: Any = None) -> ConfigError:
    """A :class:`ConfigError` for an error raised while building the ``group`` config.

    A message that starts with one of the node's keys (``crop_size must be ...``,
    ``root=/x is not a folder``) gets the group in front (``data.crop_size ...``), also
    for keys of a sub-node (``decay ...`` -> ``model.quantizer.decay ...``); a message
    naming a key elsewhere (Lightning's ```max_epochs` must be ...``) is prefixed with
    that setting and its value; any other with ``group: ``.
    """
    message = first_line(root_cause(error))
    node = node if isinstance(node, (DictConfig, Mapping)) else {}
    keys = {str(k): str(k) for k in node}
    for sub, value in node.items():
        if isinstance(value, (DictConfig, Mapping)):
            keys.update({str(k): f"{sub}.{k}" for k in value if str(k) not in keys})
    head = re.match(r"[A-Za-z_]\w*", message)
    if head and head.group(0) in keys:
        return ConfigError(f"{group}.{keys[head.group(0)][: -len(head.group(0))]}{message}")
    for key in node:
        if re.search(rf"`{re.escape(str(key))}`|\b{re.escape(str(key))}=", message):
            return ConfigError(f"{group}.{key}={node[key]}: {message}")
    return ConfigError(f"{group}: {message}")


def quote_path_overrides(argv: list[str]) -> list[str]:
    """``argv`` with the path overrides (:data:`PATH_KEYS`) that hold ``=`` quoted for Hydra.

    Lightning names checkpoints like ``epoch=1-step=30.ckpt``; Hydra's override
    parser reads the second ``=`` as an error, so ``ckpt_path=.../epoch=1-step=30.ckpt``
    becomes ``ckpt_path='.../epoch=1-step=30.ckpt'``. Already quoted values and
    interpolations (``${...}``) are left alone.
    """
    out = []
    for arg in argv:
        match = re.fullmatch(r"(\+{0,2})([\w.]+)=(.*)", arg, flags=re.S)
        if match and match.group(2) in PATH_KEYS:
            value = match.group(3)
            if "=" in value and value[:1] not in ("'", '"') and "${" not in value:
                quote = "'" if "'" not in value else '"'
                if quote not in value:
                    arg = f"{match.group(1)}{match.group(2)}={quote}{value}{quote}"
        out.append(arg)
    return out


def check_ckpt_path(value: Any, required: bool = False) -> Path | None:
    """The checkpoint file of ``ckpt_path``, or None. Raises :class:`ConfigError`."""
    if value is None or value == "":
        if required:
            raise ConfigError("ckpt_path is required; allowed: a checkpoint file, "
                              "e.g. ckpt_path=outputs/train/<run>/checkpoints/last.ckpt")
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={value}: no such file; allowed: an existing checkpoint file (a path holding "
                          f"'=' or ',' must be quoted for Hydra: ckpt_path=\"'{value}'\")")
    return path


def resolve_proposal(cfg: DictConfig) -> dict[str, Any]:
    """The ``bits`` / ``num_layers`` the model gets, checked by ``check_bit_proposal``."""
    if "bits" not in cfg:
        raise ConfigError("the config has no top-level 'bits' key")
    proposal = cfg.get("proposal")
    try:
        if proposal is None or len(proposal) == 0:  # no proposal group: the top-level bits list
            bits, num_layers = check_bit_proposal(to_plain(cfg.bits), None)
            return {"bits": bits, "num_layers": num_layers}
        if "_target_" not in proposal:
            raise ConfigError("proposal needs a _target_ (e.g. svq_modules.lightning.modules.Proposal)")
        from hydra.utils import instantiate

        prop = instantiate(proposal, _convert_="all")
        spec = prop.as_kwargs() if hasattr(prop, "as_kwargs") else prop
        if not isinstance(spec, Mapping):
            raise ConfigError(f"proposal._target_={proposal._target_} returned {type(prop).__name__}; allowed: "
                              f"a Proposal or a dict with bits / num_layers")
        bits, num_layers = check_bit_proposal(spec.get("bits"), spec.get("num_layers"))
    except ConfigError:
        raise
    except Exception as e:  # ValueError of the checks, InstantiationException wrapping them, ...
        raise ConfigError(f"bad bit proposal: {root_cause(e)}") from None
    return {"bits": bits, "num_layers": num_layers}


def _missing(cfg: DictConfig, group: str) -> None:
    node = cfg.get(group)
    for key in node or {}:
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{group}.{key} is required for {group}={_choice(cfg, group)} "
                              f"(e.g. {group}.{key}=...)")


def _choice(cfg: DictConfig, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except Exception:  # composed without a Hydra run (tests, compose API)
        return str(cfg[group].get("_target_"))


#: trainer settings checked as ints before the Trainer is built: name -> smallest allowed value
TRAINER_INTS = {"max_epochs": -1, "min_epochs": 0, "max_steps": -1, "log_every_n_steps": 1,
                "check_val_every_n_epoch": 1, "num_sanity_val_steps": -1, "num_nodes": 1}


def _check_common(cfg: DictConfig) -> None:
    data = cfg.get("data")
    if data is None or "_target_" not in data:
        raise ConfigError("data has no _target_; allowed: data=default_images, image_folder or vectors")
    _missing(cfg, "data")
    trainer = cfg.get("trainer")
    if trainer is None or "_target_" not in trainer:
        raise ConfigError("trainer has no _target_; allowed: trainer=default, gpu or ddp")
    try:
        check_int(cfg.get("seed"), "seed", min=0, max=2**32 - 1)
        for key, least in TRAINER_INTS.items():
            if trainer.get(key) is not None:
                check_int(trainer.get(key), f"trainer.{key}", min=least)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_train_config(cfg: DictConfig) -> dict[str, Any]:
    """Fast checks of a composed train config; returns the checked bit proposal.

    Raises :class:`ConfigError` naming the setting at fault.
    """
    spec = resolve_proposal(cfg)
    model = cfg.get("model")
    if model is None or "_target_" not in model:
        raise ConfigError("model has no _target_; allowed: model=autoencoder or model=vectors")
    _missing(cfg, "model")
    try:
        k = check_int(model.get("codebook_size"), "model.codebook_size", min=2)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    bits = spec["bits"]
    if isinstance(bits, list) and 2 ** bits[0] > k:
        import warnings

        warnings.warn(f"base layer of {bits[0]} bits has room for {2 ** bits[0]} cells but the codebook has "
                      f"only {k} codes", stacklevel=2)
    _check_common(cfg)
    check_ckpt_path(cfg.get("ckpt_path"))
    return spec


def check_eval_config(cfg: DictConfig) -> Path:
    """Fast checks of a composed eval config; returns the checkpoint file."""
    ckpt = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    path = check_ckpt_path(ckpt, required=True)
    _check_common(cfg)
    return path


def is_main_process() -> bool:
    """False in the worker processes a DDP launcher starts (they re-run the script)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"

"""Lightning callbacks for ScalableVQ models.

* :class:`HierarchyUpdateCallback` -- calls ``update()`` on every ScalableVQ of the model
  before validation and before a checkpoint is written (and at the end of fit), so
  validation always decodes with the current codebook's hierarchy and checkpoints always
  hold a fresh one. Under DDP it also checks that every rank holds the same quantizer.
* :class:`RateDistortionCallback` -- at the end of validation, the rate (raw and
  entropy-coded bits, per pixel for images, per vector for vectors) and distortion (MSE,
  PSNR via torchmetrics) after every layer, logged with ``pl_module.log`` as
  ``rd/layer{l}/{bpp,bpp_entropy,bits,bits_entropy,mse,psnr}`` (``l = 0`` is the base
  layer; layer ``l`` means "decoded from layers 0..l"), plus an RD plot and, for images,
  a strip of one validation image decoded at every layer (PNGs in the run directory,
  also sent to TensorBoard when that logger is used).

Layers are numbered from 0 (the base layer), as in the design notes.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio
from torchmetrics.regression import MeanSquaredError

from .modules import quantizer_modules, refresh_hierarchy_in_checkpoint

__all__ = [
    "HierarchyUpdateCallback",
    "RateDistortionCallback",
    "CodeHistogram",
    "quantizer_fingerprint",
    "format_rd_table",
]


# ----------------------------------------------------------------------------------------
# hierarchy rebuilds
# ----------------------------------------------------------------------------------------

def quantizer_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of every tensor in ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint_tensor(module: torch.nn.Module, device: torch.device) -> Tensor:
    """The fingerprint as 5 int32 (20 bytes of SHA-1) for an all_gather."""
    digest = bytes.fromhex(quantizer_fingerprint(module))
    return torch.tensor([int.from_bytes(digest[i:i + 4], "little", signed=True) for i in range(0, 20, 4)],
                        dtype=torch.int64, device=device)


def _codebook_size(q: torch.nn.Module) -> int:
    for attr in ("codebook_size", "num_codes"):
        if isinstance(getattr(q, attr, None), int):
            return int(getattr(q, attr))
    return int(q.codebook.shape[0])


class HierarchyUpdateCallback(Callback):
    """Keep the ScalableVQ hierarchies of a model fresh.

    ``update()`` runs (on every rank, when the hierarchy is missing or stale):

    * before every validation epoch (not during the sanity check: the codebook is not
      trained yet), so the rate-distortion figures decode with the current codebook;
    * before a checkpoint is written: the fresh buffers are also written into the
      checkpoint's ``state_dict``, so a checkpoint never holds a stale tree;
    * at the end of fit, so the model in memory is ready to encode/decode.

    Args:
        on_validation / on_checkpoint / on_fit_end: switch the moments above.
        progress: tqdm bar over the merges of a build: True, False or ``"auto"`` (default:
            only for long builds, codebooks of ``progress_min_codes`` codes or more, rank 0).
        progress_min_codes: codebook size from which ``"auto"`` shows the bar.
        check_ranks: under DDP, compare a fingerprint of every quantizer across ranks
            after each rebuild; ``"raise"`` (default), ``"warn"`` or ``"off"``.
    """

    def __init__(self, on_validation: bool = True, on_checkpoint: bool = True, on_fit_end: bool = True,
                 progress: bool | str = "auto", progress_min_codes: int = 4096, check_ranks: str = "raise"):
        if check_ranks not in ("raise", "warn", "off"):
            raise ValueError(f"check_ranks must be 'raise', 'warn' or 'off', got {check_ranks!r}")
        self.on_validation = on_validation
        self.on_checkpoint = on_checkpoint
        self.on_fit_end_ = on_fit_end
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
        self.progress = progress
        self.progress_min_codes = int(progress_min_codes)
        self.check_ranks = check_ranks
        self.num_updates = 0
        self.last_fingerprints: dict[str, str] = {}

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> bool:
        changed = False
        for _, q in quantizer_modules(pl_module):
            if force or not q.is_built or q.is_stale:
                q.update(progress=self._progress(trainer, q))
                changed = True
        if changed:
            self.num_updates += 1
            self._check_ranks(trainer, pl_module)
        return changed

    def _progress(self, trainer: L.Trainer, q: torch.nn.Module) -> bool:
        if not trainer.is_global_zero or self.progress is False:
            return False
        return self.progress is True or _codebook_size(q) >= self.progress_min_codes

    def _check_ranks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_fingerprints = {name: quantizer_fingerprint(q) for name, q in quantizer_modules(pl_module)}
        if self.check_ranks == "off" or trainer.world_size <= 1:
            return
        for name, q in quantizer_modules(pl_module):
            mine = _fingerprint_tensor(q, pl_module.device)
            every = trainer.strategy.all_gather(mine)  # [world, 5]
            if not bool((every == mine).all()):
                msg = (f"ScalableVQ {name or '<root>'} differs between ranks after update() "
                       f"(rank {trainer.global_rank} fingerprint {self.last_fingerprints[name][:12]})")
                if self.check_ranks == "raise":
                    raise RuntimeError(msg)
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(msg)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._update(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation:
            self._update(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        progress = any(self._progress(trainer, q) for _, q in quantizer_modules(pl_module))
        if self.on_checkpoint and refresh_hierarchy_in_checkpoint(pl_module, checkpoint, progress=progress):
            self.num_updates += 1
            self._check_ranks(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_fit_end_:
            self._update(trainer, pl_module)


# ----------------------------------------------------------------------------------------
# rate-distortion
# ----------------------------------------------------------------------------------------

class CodeHistogram(Metric):
    """Counts of codeword indices (summed over batches and, under DDP, over ranks)."""

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_codes = int(num_codes)
        self.add_state("counts", default=torch.zeros(self.num_codes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).long(), minlength=self.num_codes)

    def compute(self) -> Tensor:
        return self.counts

    def indices(self) -> Tensor:
        """A flat index tensor with this histogram (what ``rates(indices)`` wants)."""
        counts = self.compute()
        return torch.repeat_interleave(torch.arange(self.num_codes, device=counts.device), counts)


def format_rd_table(rows: list[dict[str, float]], unit: str = "bpp", flat: dict[str, float] | None = None,
                    title: str | None = None) -> str:
    """Plain-text rate-distortion table: one line per layer (first column = layer), then the flat VQ.

    Rates are cumulative: raw bits per vector, ideal entropy-coded bits per vector and,
    for ``unit="bpp"``, the same per pixel.
    """
    per_pixel = unit == "bpp"
    head = f"{'layer':>6} {'bits/vec':>9} {'bits/vec(ent)':>13}"
    if per_pixel:
        head += f" {'bpp':>9} {'bpp(ent)':>10}"
    head += f" {'MSE':>11} {'PSNR dB':>8}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def line(label: str, r: dict[str, float]) -> str:
        text = f"{label:>6} {r['bits']:>9.3f} {r['bits_entropy']:>13.3f}"
        if per_pixel:
            text += f" {r['bpp']:>9.4f} {r['bpp_entropy']:>10.4f}"
        return text + f" {r['mse']:>11.4e} {r['psnr']:>8.2f}"

    lines += [line(str(int(r["layer"])), r) for r in rows]
    if flat is not None:
        lines.append(line("flat", flat))
    return "\n".join(lines)


class RateDistortionCallback(Callback):
    """Per-layer rate and distortion of the validation set, logged, plotted and kept.

    Works with any LightningModule that has a ``quantizer`` (ScalableVQ) and a
    ``rd_outputs(batch)`` method (see :mod:`svq_modules.lightning.modules`).

    Logged at every validation end (``l = 0..L-1``; layer ``l`` = decoded from layers
    0..l, the last one is the exact codeword):

    * ``rd/layer{l}/bits`` and ``rd/layer{l}/bits_entropy`` -- cumulative bits per vector,
      raw (fixed-length symbols) and ideal entropy-coded (tree branch probabilities);
    * for images also ``rd/layer{l}/bpp`` and ``rd/layer{l}/bpp_entropy`` (bits per pixel);
    * ``rd/layer{l}/mse`` and ``rd/layer{l}/psnr`` (torchmetrics, PSNR over the whole set);
    * ``rd/flat/bits``, ``rd/flat/psnr`` (and ``rd/flat/bpp``) -- the flat VQ with the same
      codebook: ``log2 K`` raw bits, same distortion as the last layer. Its entropy-coded
      rate equals the last layer's (chain rule over the tree), so the scalable code only
      costs extra in raw bits.

    Files written to ``output_dir`` (rank 0): ``rd_curve.png`` (PSNR vs rate, one faded
    curve per earlier validation and the latest bold, raw solid / entropy dashed, the flat
    VQ point), ``rd_layers.png`` (images: one validation image decoded at every layer),
    ``rd_table.json`` (latest table). With a TensorBoard logger the two figures are also
    added to it.

    Args:
        output_dir: where the PNG / JSON files go (default: the trainer's log dir).
        plot: write the RD plot.
        strip: write the per-layer image strip (image models only).
        strip_index: which validation sample (of the first batch) the strip shows
            (default: the one with the most pixel variance).
        every_n_epochs: measure every n-th validation (1 = always).
        prefix: metric name prefix.
    """

    def __init__(self, output_dir: str | None = None, plot: bool = True, strip: bool = True,
                 strip_index: int | None = None,
                 every_n_epochs: int = 1, prefix: str = "rd"):
        self.output_dir = None if output_dir is None else str(output_dir)
        self.plot = plot
        self.strip = strip
        self.strip_index = None if strip_index is None else int(strip_index)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        self._metrics: dict[str, Any] | None = None
        self._strip: list[Tensor] | None = None
        self._active = False

    # -- helpers ----------------------------------------------------------------------
    def _directory(self, trainer: L.Trainer) -> Path:
        d = self.output_dir or trainer.log_dir or trainer.default_root_dir
        path = Path(d)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def latest(self) -> dict[str, Any] | None:
        """The latest measurement: ``{"epoch", "step", "unit", "rows", "flat"}``."""
        return self.history[-1] if self.history else None

    def table(self, entry: dict[str, Any] | None = None, title: str | None = None) -> str:
        """The latest (or given) measurement as a plain-text table."""
        entry = entry or self.latest
        if entry is None:
            return "(no rate-distortion measurement yet)"
        title = title or f"rate-distortion after epoch {entry['epoch']}, step {entry['step']} ({entry['num_vectors']} vectors)"
        return format_rd_table(entry["rows"], entry["unit"], entry["flat"], title=title)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # -- hooks --------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking or not hasattr(pl_module, "rd_outputs"):
            return
        if (trainer.state.fn == "fit" and self.every_n_epochs > 1
                and (trainer.current_epoch + 1) % self.every_n_epochs != 0):
            return
        q = pl_module.quantizer
        if not q.is_built or q.is_stale:
            q.update()
        num_layers = int(q.num_layers)
        data_range = getattr(pl_module, "data_range", None)
        if data_range is None:
            data_range = getattr(trainer.datamodule, "data_range", None) if trainer.datamodule is not None else None
        if data_range is None or not float(data_range) > 0:
            data_range = 1.0
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("RateDistortionCallback: no data range known for PSNR (model.data_range); using 1.0")
        device = pl_module.device
        self._metrics = {
            "mse": [MeanSquaredError().to(device) for _ in range(num_layers)],
            "psnr": [PeakSignalNoiseRatio(data_range=data_range, reduction="elementwise_mean", dim=None).to(device)
                     for _ in range(num_layers)],
            "hist": CodeHistogram(_codebook_size(q)).to(device),
        }
        self._strip = None
        self._elements = 1.0
        self._active = True

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
               dataloader_idx: int) -> None:
        if not self._active:
            return
        with torch.no_grad():
            out = pl_module.rd_outputs(batch)
        target = out.target.float()
        flat_target = target.reshape(-1)
        for l, rec in enumerate(out.recon):
            flat = rec.float().reshape(-1)
            self._metrics["mse"][l].update(flat, flat_target)
            self._metrics["psnr"][l].update(flat, flat_target)
        self._metrics["hist"].update(out.indices)
        self._elements = float(out.elements_per_vector)
        if self._strip is None and dataloader_idx == 0 and target.ndim == 4 and trainer.is_global_zero:
            if self.strip_index is None:  # the most detailed image of the first batch
                i = int(target.flatten(1).std(1).argmax())
            else:
                i = min(self.strip_index, target.shape[0] - 1)
            self._strip = [target[i].detach().cpu()] + [r[i].detach().float().cpu() for r in out.recon]

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        q = pl_module.quantizer
        hist = self._metrics["hist"]
        indices = hist.indices()
        num_vectors = int(indices.numel())
        if num_vectors == 0:
            return
        rates = q.rates(indices)
        raw = [float(v) for v in torch.as_tensor(rates.raw_bits).flatten()]
        ent = [float(v) for v in torch.as_tensor(rates.entropy_bits).flatten()]
        unit = getattr(pl_module, "rd_unit", "bits")
        per = self._elements if unit == "bpp" else 1.0
        rows = []
        for l in range(len(raw)):
            mse = float(self._metrics["mse"][l].compute())
            psnr = float(self._metrics["psnr"][l].compute())
            row = {"layer": l, "bits": raw[l], "bits_entropy": ent[l], "mse": mse, "psnr": psnr}
            if unit == "bpp":
                row["bpp"] = raw[l] / per
                row["bpp_entropy"] = ent[l] / per
            rows.append(row)
        k = _codebook_size(q)
        flat = {"layer": -1, "bits": math.log2(k), "bits_entropy": ent[-1], "mse": rows[-1]["mse"],
                "psnr": rows[-1]["psnr"]}
        if unit == "bpp":
            flat["bpp"] = flat["bits"] / per
            flat["bpp_entropy"] = flat["bits_entropy"] / per
        entry = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step), "unit": unit,
                 "num_vectors": num_vectors, "rows": rows, "flat": flat}
        self.history.append(entry)

        # the values are already reduced over ranks (torchmetrics); sync_dist only averages
        # identical numbers and keeps Lightning from warning under DDP
        for row in rows:
            base = f"{self.prefix}/layer{row['layer']}"
            for key in ("bits", "bits_entropy", "bpp", "bpp_entropy", "mse", "psnr"):
                if key in row:
                    pl_module.log(f"{base}/{key}", row[key], sync_dist=True)
        for key in ("bits", "bpp", "psnr"):
            if key in flat:
                pl_module.log(f"{self.prefix}/flat/{key}", flat[key], sync_dist=True)

        if trainer.is_global_zero:
            out_dir = self._directory(trainer)
            with open(out_dir / "rd_table.json", "w") as f:
                json.dump(entry, f, indent=2)
            if self.plot:
                self._plot(trainer, out_dir)
            if self.strip and self._strip is not None:
                self._plot_strip(trainer, out_dir, entry)
        self._metrics = None
        self._strip = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module)

    # -- figures ------------------------------------------------------------------------
    def _tensorboard(self, trainer: L.Trainer) -> list[Any]:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _plot(self, trainer: L.Trainer, out_dir: Path) -> None:
        from matplotlib.figure import Figure

        entry = self.latest
        unit = entry["unit"]
        xkey = "bpp" if unit == "bpp" else "bits"
        fig = Figure(figsize=(6.4, 4.4), dpi=110)
        ax = fig.subplots()
        earlier = self.history[:-1][-8:]
        for i, old in enumerate(earlier):
            alpha = 0.15 + 0.5 * (i + 1) / (len(earlier) + 1)
            ax.plot([r[xkey] for r in old["rows"]], [r["psnr"] for r in old["rows"]], "-", color="0.5",
                    alpha=alpha, lw=1)
        xs = [r[xkey] for r in entry["rows"]]
        xe = [r[f"{xkey}_entropy"] for r in entry["rows"]]
        ys = [r["psnr"] for r in entry["rows"]]
        ax.plot(xs, ys, "o-", color="C0", lw=2, label=f"ScalableVQ raw (epoch {entry['epoch']})")
        ax.plot(xe, ys, "s--", color="C1", lw=1.5, label="ScalableVQ entropy-coded")
        for r in entry["rows"]:
            ax.annotate(f"L{r['layer']}", (r[xkey], r["psnr"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
        flat = entry["flat"]
        ax.plot([flat[xkey]], [flat["psnr"]], "*", color="C3", ms=12, label="flat VQ, same codebook (raw)")
        ax.set_xlabel("bits per pixel" if unit == "bpp" else "bits per vector")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"rate-distortion, step {entry['step']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "rd_curve.png")
        for lg in self._tensorboard(trainer):
            lg.experiment.add_figure(f"{self.prefix}/curve", fig, global_step=trainer.global_step, close=False)

    def _plot_strip(self, trainer: L.Trainer, out_dir: Path, entry: dict[str, Any]) -> None:
        from matplotlib.figure import Figure

        panels = self._strip
        n = len(panels)
        h, w = panels[0].shape[-2:]
        fig = Figure(figsize=(1.9 * n, 1.9 * h / w + 0.6), dpi=110)
        axes = fig.subplots(1, n)
        unit = entry["unit"]
        for i, (ax, img) in enumerate(zip(axes, panels)):
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original", fontsize=8)
            else:
                r = entry["rows"][i - 1]
                rate = r.get("bpp", r["bits"])
                mse = float(torch.mean((img.clamp(0, 1) - panels[0]) ** 2))
                psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
                ax.set_title(f"layer {i - 1}: {rate:.3f} {unit}\n{psnr:.1f} dB (this crop)", fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "rd_layers.png")
        for lg in self._tensorboard(trainer):
            lg.experiment.add_figure(f"{self.prefix}/layers", fig, global_step=trainer.global_step, close=False)
            grid = torch.cat([p.clamp(0, 1) for p in panels], dim=-1)
            lg.experiment.add_image(f"{self.prefix}/layers_image", grid, global_step=trainer.global_step)

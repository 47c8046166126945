"""Rate-distortion of the validation set after every layer: logged, plotted, tabulated.

See :class:`RateDistortionCallback` for what a LightningModule has to provide.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio
from torchmetrics.regression import MeanSquaredError

from ..coding.container import atomic_write
from ..nn import ScalableVQ
from ..plotting import plot_rate_distortion
from ..validation import check_bool, check_int
from .protocol import as_rd_outputs, find_quantizer
from .table import format_rd_table

__all__ = ["CodeHistogram", "RateDistortionCallback"]


class CodeHistogram(Metric):
    """Counts of codeword indices (summed over batches and, under DDP, over ranks)."""

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_codes = check_int(num_codes, "num_codes", min=1)
        self.add_state("counts", default=torch.zeros(self.num_codes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).long(), minlength=self.num_codes)

    def compute(self) -> Tensor:
        return self.counts

    def indices(self) -> Tensor:
        """A flat index tensor with this histogram (what ``rates(indices)`` wants)."""
        counts = self.compute()
        return torch.repeat_interleave(torch.arange(self.num_codes, device=counts.device), counts)


class RateDistortionCallback(Callback):
    """Per-layer rate and distortion of the validation set, logged, plotted and kept.

    **What the LightningModule provides** (the protocol, :mod:`svq_modules.lightning.protocol`):

    * a :class:`~svq_modules.nn.ScalableVQ` anywhere inside it (found by type, any
      attribute name; with several, name one with ``quantizer="path.to.it"``);
    * ``rd_outputs(batch)`` returning :class:`~svq_modules.lightning.protocol.RDOutputs`
      or a tuple ``(target, recon, indices[, elements_per_vector])`` or a dict with
      those keys: the batch's data, its reconstruction after every layer
      (``recon[l]`` decoded from layers ``0..l``, shaped like ``target``), its codeword
      indices, and how many data elements one quantized vector stands for (default 1);
    * optionally ``rd_unit = "bpp"`` (rates per pixel as well as per vector) and
      ``data_range`` (PSNR peak; default the datamodule's ``data_range``, else 1.0).

    When the module lacks one of these the callback warns once and does nothing.
    A minimal module of your own::

        class MyModel(L.LightningModule):
            data_range = 1.0  # PSNR peak (optional; else the datamodule's, else 1.0 with a warning)

            def __init__(self):
                super().__init__()
                self.net = nn.Linear(8, 8)
                self.vq = ScalableVQ(8, 64, bits=[2, 2])

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

        rd = RateDistortionCallback()
        L.Trainer(callbacks=[HierarchyUpdateCallback(), rd]).fit(MyModel(), loaders)
        print(rd.table())

    **Logged** at every validation end (``l = 0..L-1``; layer ``l`` = decoded from
    layers 0..l, the last one is the exact codeword):

    * ``rd/layer{l}/bits`` and ``rd/layer{l}/bits_entropy`` -- cumulative bits per vector,
      raw (fixed-length symbols) and ideal entropy-coded (tree branch probabilities);
    * with ``rd_unit="bpp"`` also ``rd/layer{l}/bpp`` and ``rd/layer{l}/bpp_entropy``;
    * ``rd/layer{l}/mse`` and ``rd/layer{l}/psnr`` (torchmetrics, over the whole set);
    * ``rd/flat/bits``, ``rd/flat/psnr`` (and ``rd/flat/bpp``) -- the flat VQ with the same
      codebook: ``log2 K`` raw bits, same distortion as the last layer. Its entropy-coded
      rate equals the last layer's (chain rule over the tree).

    **Files** written to ``output_dir`` (rank 0): ``rd_curve.png`` (PSNR vs rate: raw
    and entropy-coded curves of the latest validation, a few earlier ones, the flat VQ
    point; drawn by :func:`svq_modules.plotting.plot_rate_distortion`), ``rd_layers.png``
    (image models: one validation image decoded at every layer), ``rd_table.json``
    (latest table). With a TensorBoard logger the two figures are also added to it.

    Args:
        output_dir: where the PNG / JSON files go (default: the trainer's log dir).
        plot: write the RD plot.
        strip: write the per-layer image strip (RGB image batches ``[B, 3, H, W]`` only).
        strip_index: which validation sample (of the first batch) the strip shows
            (default: the one with the most pixel variance).
        every_n_epochs: measure every n-th validation (1 = always).
        prefix: metric name prefix.
        quantizer: module path of the ScalableVQ to measure when the model holds several.
    """

    def __init__(self, output_dir: str | None = None, plot: bool = True, strip: bool = True,
                 strip_index: int | None = None, every_n_epochs: int = 1, prefix: str = "rd",
                 quantizer: str | None = None):
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ValueError(f"output_dir must be a folder path (str or os.PathLike) or None, got {output_dir!r}")
        for name, value in (("prefix", prefix), ("quantizer", quantizer)):
            if not (isinstance(value, str) or (value is None and name == "quantizer")):
                raise ValueError(f"{name} must be a str{' or None' if name == 'quantizer' else ''}, got {value!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.plot = check_bool(plot, "plot")
        self.strip = check_bool(strip, "strip")
        self.strip_index = None if strip_index is None else check_int(strip_index, "strip_index", min=0)
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", min=1)
        self.prefix = prefix
        self.quantizer = quantizer
        self.history: list[dict[str, Any]] = []
        self._metrics: dict[str, Any] | None = None
        self._strip: list[Tensor] | None = None
        self._q: ScalableVQ | None = None
        self._warned: set[str] = set()

    # -- helpers ----------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"RateDistortionCallback: {message}", category=UserWarning)

    def _directory(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def latest(self) -> dict[str, Any] | None:
        """The latest measurement: ``{"epoch", "step", "unit", "num_vectors", "rows", "flat"}``."""
        return self.history[-1] if self.history else None

    def table(self, entry: dict[str, Any] | None = None, title: str | None = None) -> str:
        """The latest (or given) measurement as a plain-text table (:func:`format_rd_table`)."""
        entry = entry or self.latest
        if entry is None:
            return "(no rate-distortion measurement yet)"
        title = title or (f"rate-distortion after epoch {entry['epoch']}, step {entry['step']} "
                          f"({entry['num_vectors']} vectors)")
        return format_rd_table(entry["rows"], flat=entry["flat"], title=title)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def _quantizer(self, pl_module: L.LightningModule) -> ScalableVQ | None:
        """The module's ScalableVQ, or None (warned once) when the protocol is not met."""
        if not callable(getattr(pl_module, "rd_outputs", None)):
            self._warn_once("rd_outputs", f"{type(pl_module).__name__} has no rd_outputs(batch) method, so no "
                                          f"rate-distortion is measured (see the callback's docstring)")
            return None
        try:
            found = find_quantizer(pl_module, self.quantizer)
        except ValueError as e:
            self._warn_once("several", f"{e}; no rate-distortion is measured")
            return None
        if found is None:
            self._warn_once("none", f"{type(pl_module).__name__} holds no ScalableVQ; no rate-distortion is measured")
            return None
        return found[1]

    def _data_range(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        data_range = getattr(pl_module, "data_range", None)
        if data_range is None and trainer.datamodule is not None:
            data_range = getattr(trainer.datamodule, "data_range", None)
        if data_range is None or not float(data_range) > 0:
            self._warn_once("range", "no data range known for PSNR (data_range on the module or datamodule); "
                                     "using 1.0")
            return 1.0
        return float(data_range)

    # -- hooks --------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._q = None
        if trainer.sanity_checking:
            return
        if (trainer.state.fn == "fit" and self.every_n_epochs > 1
                and (trainer.current_epoch + 1) % self.every_n_epochs != 0):
            return
        q = self._quantizer(pl_module)
        if q is None:
            return
        q.update()  # rebuilds only a missing or stale hierarchy
        data_range = self._data_range(trainer, pl_module)
        device = pl_module.device
        self._metrics = {
            "mse": [MeanSquaredError().to(device) for _ in range(q.num_layers)],
            "psnr": [PeakSignalNoiseRatio(data_range=data_range, reduction="elementwise_mean", dim=None).to(device)
                     for _ in range(q.num_layers)],
            "hist": CodeHistogram(q.codebook_size).to(device),
            "elements": 1.0,
        }
        self._strip = None
        self._q = q

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if self._q is None:
            return
        with torch.no_grad():
            out = as_rd_outputs(pl_module.rd_outputs(batch), f"{type(pl_module).__name__}.rd_outputs")
        if len(out.recon) != self._q.num_layers:
            raise ValueError(f"{type(pl_module).__name__}.rd_outputs returned {len(out.recon)} reconstructions but "
                             f"the quantizer has {self._q.num_layers} layers (one per layer expected)")
        target = out.target.float()
        flat_target = target.reshape(-1)
        for l, rec in enumerate(out.recon):
            flat = rec.float().reshape(-1)
            self._metrics["mse"][l].update(flat, flat_target)
            self._metrics["psnr"][l].update(flat, flat_target)
        self._metrics["hist"].update(out.indices)
        self._metrics["elements"] = out.elements_per_vector
        if (self._strip is None and dataloader_idx == 0 and target.ndim == 4 and target.shape[1] == 3
                and trainer.is_global_zero):
            if self.strip_index is None:  # the most detailed image of the first batch
                i = int(target.flatten(1).std(1).argmax())
            else:
                i = min(self.strip_index, target.shape[0] - 1)
            self._strip = [target[i].detach().cpu()] + [r[i].detach().float().cpu() for r in out.recon]

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, dataloader_idx)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The table of this validation from the accumulated metrics (None without data)."""
        q, metrics = self._q, self._metrics
        indices = metrics["hist"].indices()
        num_vectors = int(indices.numel())
        if num_vectors == 0:
            return None
        rates = q.rates(indices)
        raw = [float(v) for v in torch.as_tensor(rates.raw_bits).flatten()]
        ent = [float(v) for v in torch.as_tensor(rates.entropy_bits).flatten()]
        unit = getattr(pl_module, "rd_unit", "bits")
        per = float(metrics["elements"]) if unit == "bpp" else 1.0
        rows = []
        for l in range(len(raw)):
            row = {"layer": l, "bits": raw[l], "bits_entropy": ent[l], "mse": float(metrics["mse"][l].compute()),
                   "psnr": float(metrics["psnr"][l].compute())}
            if unit == "bpp":
                row["bpp"], row["bpp_entropy"] = raw[l] / per, ent[l] / per
            rows.append(row)
        flat = {"layer": -1, "bits": math.log2(q.codebook_size), "bits_entropy": ent[-1], "mse": rows[-1]["mse"],
                "psnr": rows[-1]["psnr"]}
        if unit == "bpp":
            flat["bpp"], flat["bpp_entropy"] = flat["bits"] / per, flat["bits_entropy"] / per
        return {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step), "unit": unit,
                "num_vectors": num_vectors, "rows": rows, "flat": flat}

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._q is None:
            return
        entry = self._measure(trainer, pl_module)
        self._q = None
        self._metrics = None
        if entry is None:
            return
        self.history.append(entry)
        # the values are already reduced over ranks (torchmetrics); sync_dist only averages
        # identical numbers and keeps Lightning from warning under DDP
        for row in entry["rows"]:
            base = f"{self.prefix}/layer{row['layer']}"
            for key in ("bits", "bits_entropy", "bpp", "bpp_entropy", "mse", "psnr"):
                if key in row:
                    pl_module.log(f"{base}/{key}", row[key], sync_dist=True)
        for key in ("bits", "bpp", "psnr"):
            if key in entry["flat"]:
                pl_module.log(f"{self.prefix}/flat/{key}", entry["flat"][key], sync_dist=True)
        if trainer.is_global_zero:
            out_dir = self._directory(trainer)
            atomic_write(out_dir / "rd_table.json", json.dumps(entry, indent=2).encode())
            if self.plot:
                self._plot(trainer, out_dir)
            if self.strip and self._strip is not None:
                self._plot_strip(trainer, out_dir, entry)
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
        entry = self.latest
        xkey = "bpp" if entry["unit"] == "bpp" else "bits"
        rows = [r for r in entry["rows"] if math.isfinite(r["psnr"])]  # an exact reconstruction has PSNR inf
        if not rows:
            return
        series: dict[str, Any] = {}
        styles: dict[str, dict[str, Any]] = {}
        earlier = self.history[:-1][-3:]
        for i, old in enumerate(earlier):
            label = f"epoch {old['epoch']} (raw)"
            series[label] = [(r[xkey], r["psnr"]) for r in old["rows"] if math.isfinite(r["psnr"])]
            styles[label] = {"color": "0.5", "alpha": 0.25 + 0.5 * (i + 1) / (len(earlier) + 1), "linewidth": 1,
                             "marker": None}
        raw = f"ScalableVQ raw (epoch {entry['epoch']})"
        series[raw] = [(r[xkey], r["psnr"]) for r in rows]
        series["ScalableVQ entropy-coded"] = [(r[f"{xkey}_entropy"], r["psnr"]) for r in rows]
        styles[raw] = {"color": "C0", "linewidth": 2}
        styles["ScalableVQ entropy-coded"] = {"color": "C1", "linestyle": "--", "marker": "s"}
        flat = entry["flat"]
        if math.isfinite(flat["psnr"]):
            series["flat VQ, same codebook (raw)"] = [(flat[xkey], flat["psnr"])]
            styles["flat VQ, same codebook (raw)"] = {"color": "C3", "marker": "*", "markersize": 12}
        series = {k: v for k, v in series.items() if v}
        fig = plot_rate_distortion(series, out_dir / "rd_curve.png", metric="psnr", rate=xkey,
                                   annotations={raw: [f"L{r['layer']}" for r in rows]},
                                   styles={k: v for k, v in styles.items() if k in series},
                                   title=f"rate-distortion, step {entry['step']}")
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

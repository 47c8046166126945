"""``ScalableVQ``: a trainable vector-quantization layer with a progressive (layered) index.

``ScalableVQ`` composes two child modules and adds what a layer of a network
needs (input shapes and dtypes, losses, straight-through gradients):

* ``learner``: :class:`~svq_modules.nn.codebook.EMACodebook`, the codebook and
  everything that moves it (EMA k-means, k-means++ init, dead codes,
  relocation, statistics, DDP sync);
* ``index``: :class:`~svq_modules.nn.index.ScalableIndex`, the merge tree and
  layer tables in buffers of fixed shape, built by :meth:`ScalableVQ.update`
  (the name of CompressAI's entropy-model method) from codebook + statistics.

So ``state_dict`` / ``load_state_dict`` (into a fresh module, built or not),
``torch.save``, Lightning checkpoints, ``.to(device)``, ``.double()`` and DDP
need nothing special. Add it to a model::

    vq = ScalableVQ(dim=64, codebook_size=1024, bits=[4, 2, 2, 2, 2])
    for z, target in batches:        # training mode: EMA codebook update
        out = vq(z)                  # z: [..., 64]
        loss = recon_loss(decoder(out.quantized), target) + out.loss
        ...
    vq.eval()                        # freeze the codebook
    vq.update()                      # build the layer tables (True: built)
    out3 = vq(z, num_layers=3)       # reconstruction after layers 0..2 (4+2+2 bits)
    codes = vq.encode(z)             # [L, ...] per-layer symbols, -1 = nothing sent
    z_hat = vq.decode(codes[:3])     # == out3.quantized (values)

In place of vector-quantize-pytorch's ``VectorQuantize``: the call returns a
:class:`VQOutput` (a 6-field ``NamedTuple``) whose first three fields are
``quantized, indices, loss``, so write ``quantized, indices, loss = vq(x)[:3]``
(or use the fields by name); ``loss`` is a 0-d tensor.

Notes
-----
* The straight-through output is ``q + (x - x.detach())``: its value is
  exactly the codeword (``x - x`` is exactly 0 for finite ``x``), its gradient
  w.r.t. ``x`` is the identity; ``forward(x, num_layers=L)`` equals plain
  quantization bit for bit.
* Memory: distances come in blocks of at most ``chunk_elements`` elements
  (nearest search, k-means++ init, relocation); a training step also holds a
  few ``[N, D]`` tensors (the batch in the compute dtype, the codewords, the
  errors) and the ``[K, D]`` statistics.
* ``torch.compile``: checks and the data-dependent training housekeeping run
  eagerly inside a compiled forward (graph breaks), so compiled and eager
  training take the same steps.
* Checkpoint format: :attr:`ScalableVQ._version` is 2 (child modules
  ``learner.*`` and ``index.*``). State dicts of version 1 (flat keys
  ``codebook``, ``cluster_size``, ``tree_parent``, ``layers_widths``, ...) are
  recognized by their keys and migrated on load.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as svq_dist
from ..coding import CODINGS, GRID_CODINGS, BitstreamError, compress_layers, decompress_layers
from ..coding.context import grid_of
from ..hierarchy import Hierarchy, code_statistics
from ..layers import LayerRates, LayerTables
from ..nearest import DEFAULT_CHUNK_ELEMENTS, mean_squared_error
from ..validation import (
    BitProposal,
    check_bit_proposal,
    check_bool,
    check_choice,
    check_finite,
    check_indices,
    check_int,
    check_vectors,
    check_weight,
    working_dtype,
)
from .codebook import EMACodebook
from .index import ScalableIndex

__all__ = ["ScalableVQ", "VQOutput", "EMBED_CENTERS"]

#: values of ``embed_centers`` in :meth:`ScalableVQ.compress` (see ``docs/bitstream.md``)
EMBED_CENTERS = (None, "float16", "float32")

# knobs that live on the child modules: setting them on ScalableVQ would do nothing
_CHILD_KNOBS = {
    "learner": (
        "decay", "eps", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code", "ema_update", "sync_distributed",
        "dead_code_sampling", "relocate_codes", "relocate_every", "chunk_elements", "train_rate_weight",
    ),
    "index": ("linkage", "cut", "refine", "block_size"),
}  # fmt: skip
_KNOB_OWNER = {name: child for child, names in _CHILD_KNOBS.items() for name in names}
_CHILDREN = ("learner", "index")
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
_check_finite_eager = torch.compiler.disable(check_finite)
_STALE_MESSAGE = (
    "ScalableVQ: the codebook changed since the last update() (training steps move it); layered outputs, codes and "
    "rates use the tables built for the old codebook. Call update() to rebuild them, and eval() before update() so "
    "that later calls do not train the codebook again. Shown once per build."
)


class VQOutput(NamedTuple):
    """Result of :meth:`ScalableVQ.forward`.

    Attributes:
        quantized: same shape and dtype as the input; value = codeword (or the
            layer reconstruction when ``num_layers`` is given), gradient w.r.t.
            the input = identity (straight-through).
        indices: ``[*batch]`` int64 codeword index of every vector (``batch`` =
            input shape without the channel dimension).
        loss: 0-d float32, ``commitment_weight * commit_loss + codebook_loss``;
            add it to the model's loss.
        commit_loss: 0-d float32, ``mean((x - sg(q))^2)`` (per element).
        codebook_loss: 0-d float32, ``mean((sg(x) - q)^2)`` for a
            gradient-learned codebook, 0 otherwise.
        perplexity: 0-d float32, ``exp(entropy)`` of the code usage of this batch.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    perplexity: Tensor


def _user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function: the first frame outside torch and this package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level


def _as_tensor(value: Any, name: str, kind: str) -> Tensor:
    """``value`` as a tensor: tensors as they are, array-likes (NumPy arrays, lists) via ``torch.as_tensor``.

    ``kind``: ``"float"`` (a float tensor; integer array-likes become the
    default float dtype, float arrays keep their dtype), ``"real"`` (int or
    float) or ``"int"`` (an integer tensor). One-line ``ValueError`` otherwise.
    """
    what = {"float": "floats", "real": "numbers", "int": "ints"}[kind]
    if not torch.is_tensor(value):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a tensor or an array-like of {what}, got {type(value).__name__}") from None
        if kind == "float" and not value.is_floating_point() and value.dtype != torch.bool and not value.is_complex():
            value = value.to(torch.get_default_dtype())
    integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    ok = {"float": value.is_floating_point(), "real": integer or value.is_floating_point(), "int": integer}[kind]
    if not ok:
        raise ValueError(f"{name} must hold {what}, got dtype {value.dtype}")
    return value


def _check_input(x: Tensor, dim: int, channel_first: bool, name: str = "x") -> None:
    """One-line ``ValueError`` unless ``x`` is a finite float tensor ``[..., D]`` (``[B, D, ...]`` if channel-first)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor (convert with torch.as_tensor), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor (float16/bfloat16/float32/float64), got dtype {x.dtype}")
    if channel_first:
        if x.dim() < 2 or x.shape[1] != dim:
            got = x.shape[1] if x.dim() > 1 else "missing"
            raise ValueError(f"{name} must be channel-first [B, D={dim}, ...], got shape {list(x.shape)} (dimension 1 is {got})")
    elif x.dim() < 1 or x.shape[-1] != dim:
        got = x.shape[-1] if x.dim() else "missing"
        raise ValueError(f"{name} must be [..., D={dim}], got shape {list(x.shape)} (last dimension {got}, expected {dim})")
    _check_finite_eager(x, name)


def _compute_dtype(x: Tensor, codebook: Tensor) -> torch.dtype:
    """float32 for half inputs (autocast), else the promotion of input and codebook dtypes."""
    full = (torch.float32, torch.float64)
    xd = x.dtype if x.dtype in full else torch.float32
    return torch.promote_types(xd, codebook.dtype if codebook.dtype in full else torch.float32)


def _choice_penalty(rate_weight: float, bits: Any, spread: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``[K]`` penalty of each code in a codeword choice, in ``dtype``: ``rate_weight`` x ``bits()`` (its code lengths,
    not asked for a layered choice of weight 0) plus the ``spread`` of a layered choice; one line when it overflows."""
    if spread is not None and not bool(torch.isfinite(spread.to(dtype)).all()):
        raise ValueError(f"layer_weights: the layers' reconstructions lie too far apart for {dtype} distances; "
                         f"rescale the data")
    bias = rate_weight * bits() if rate_weight > 0 or spread is None else torch.zeros_like(spread)
    bias = (bias if spread is None else bias + spread).to(dtype)
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"rate_weight={rate_weight!r} is too large: its penalties overflow {dtype} distances")
    return bias


def _cast_like(t: Tensor | None, like: Tensor) -> Tensor | None:
    """``t`` on ``like``'s device and in its dtype (None stays None)."""
    return None if t is None else t.to(like.device, like.dtype)


def _perplexity(idx: Tensor, num_codes: int) -> Tensor:
    """0-d float32 ``exp(entropy)`` of the code usage in ``idx``."""
    counts = torch.zeros(num_codes, dtype=torch.float32, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def _wrapped_statistics(
    codebook: Tensor, x: Any, indices: Any, counts: Any, sums: Any, learner: EMACodebook
) -> tuple[Tensor, Tensor]:
    """``counts [K]`` and ``sums [K, D]`` for :meth:`ScalableVQ.from_codebook` (see there), in the codebook's
    :func:`~svq_modules.validation.working_dtype`; ``ValueError`` when they do not fit the codebook's own dtype."""
    k, d = codebook.shape
    work = dict(device=codebook.device, dtype=working_dtype(codebook.dtype))  # float32 for a half codebook
    if counts is not None:
        counts = _as_tensor(counts, "counts", "real").to(**work)
        if counts.shape != (k,):
            raise ValueError(f"counts must have shape [{k}], got {list(counts.shape)}")
        check_finite(counts, "counts")
        if bool((counts < 0).any()):
            raise ValueError(f"counts must be >= 0, got a minimum of {float(counts.min()):g}")
        sums = codebook.to(**work) * counts[:, None] if sums is None else _as_tensor(sums, "sums", "real").to(**work)
    elif sums is not None:
        raise ValueError("sums given without counts: pass counts [K] too")
    elif x is not None:
        x = check_vectors(_as_tensor(x, "x", "float"), d, "x").to(codebook)
        indices = learner.nearest(x, codebook)[0] if indices is None else _as_tensor(indices, "indices", "int")
        counts, sums = code_statistics(x, indices, k)
    elif indices is not None:
        raise ValueError("indices given without x: pass the data x [N, D] too")
    else:
        counts, sums = torch.ones_like(codebook[:, 0]), codebook.clone()
    if sums.shape != (k, d):
        raise ValueError(f"sums must have shape [{k}, {d}], got {list(sums.shape)}")
    for name, t in (("counts", counts), ("sums", sums)):
        if not bool(torch.isfinite(t.to(codebook.dtype)).all()):
            raise ValueError(f"{name} up to {float(t.abs().max()):g} do not fit the codebook's {codebook.dtype} (at most "
                             f"{torch.finfo(codebook.dtype).max:g}): pass the codebook as float32")
    return counts, sums


def _migrate_flat_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """State-dict format 1 -> 2 in place: ``{prefix}name`` -> ``{prefix}{child}.name`` for the child's entries.

    Keyed on the keys present (a plain dict saved without ``_metadata`` carries
    no version); a key already in format 2 is left alone.
    """
    for child in _CHILDREN:
        sub = getattr(module, child)
        names = [n for n, _ in sub.named_parameters(recurse=False)] + [n for n, _ in sub.named_buffers(recurse=False)]
        for name in names:
            old, new = prefix + name, f"{prefix}{child}.{name}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)


def _item_strings(hierarchy: Hierarchy, tables: LayerTables, indices: Tensor, **options: Any) -> list[list[bytes]]:
    """``strings[l][b]``: layer-``l`` chunk of item ``b`` of ``indices [B, ...]`` (one stream per item)."""
    per_item = [compress_layers(hierarchy, tables, item, **options) for item in indices]
    return [list(layer) for layer in zip(*per_item)]


def _decode_items(
    hierarchy: Hierarchy, tables: LayerTables, strings: Any, shape: Any, num_layers: int | None
) -> tuple[Tensor, tuple[int, ...]]:
    """Leaf-or-node ids ``[B, N_item]`` after the decoded layers of every item, and the item shape."""
    if isinstance(strings, (bytes, bytearray, str)) or not isinstance(strings, Sequence) or not strings:
        raise ValueError(f"strings must be a non-empty list (layers) of lists (items) of bytes, got {type(strings).__name__}")
    sizes = {len(layer) if isinstance(layer, Sequence) and not isinstance(layer, (bytes, str)) else -1 for layer in strings}
    if len(sizes) != 1 or min(sizes) < 1:
        raise ValueError(f"strings[l] must be lists of bytes, one per item, as many in every layer; got sizes {sorted(sizes)}")
    if shape is not None:
        try:
            shape = tuple(operator.index(n) for n in shape)  # ints of any kind: Python, NumPy, a torch.Size
        except TypeError:
            raise ValueError(f"shape must be the item shape from compress_items (a tuple of ints), got {shape!r}") from None
    nodes, shapes = [], set()
    for b in range(sizes.pop()):
        out = decompress_layers(hierarchy, tables, [layer[b] for layer in strings], num_layers=num_layers)
        nodes.append(out.nodes[-1])
        shapes.add(tuple(out.batch_shape))
    if len(shapes) != 1 or (shape is not None and tuple(shape) not in shapes):
        expected = "one shape" if shape is None else tuple(shape)
        raise BitstreamError(f"the items of the batch decode to shapes {sorted(shapes)}, expected {expected}")
    return torch.stack(nodes), shapes.pop()


class ScalableVQ(nn.Module):
    """Vector quantizer with an EMA k-means codebook and a scalable (layered) index.

    Args:
        dim: D, dimension of the vectors.
        codebook_size: K, number of codewords.
        bits: bit proposal (see :func:`~svq_modules.validation.check_bit_proposal`):
            ints in ``[1, 24]``, base layer first, e.g. ``[4, 2, 2, 2, 2]`` for
            ``len(bits) + 1`` layers (a final layer reaches every codeword); or
            an int, a proposal name or a callable, which need ``num_layers``.
        num_layers: L, total number of layers including the final one (an int
            >= 2; required unless ``bits`` is a list, must match it when both are given).
        commitment_weight: weight (>= 0) of the commitment loss in ``loss``.
        learnable_codebook: learn the codebook by gradients (an ``nn.Parameter``
            trained by ``codebook_loss``) instead of EMA updates.
        channel_first: inputs are ``[B, D, *spatial]`` (e.g. ``[B, D, H, W]``)
            instead of ``[..., D]``; outputs follow the input layout.
        decay, eps, kmeans_init, kmeans_iters, threshold_ema_dead_code,
            ema_update, sync_distributed, dead_code_sampling, relocate_codes,
            relocate_every, chunk_elements, train_rate_weight: knobs of the codebook learner, see
            :class:`~svq_modules.nn.codebook.EMACodebook` (``vq.learner``).
        linkage, cut, refine, block_size: knobs of the index, see
            :class:`~svq_modules.nn.index.ScalableIndex` (``vq.index``).

    State: ``learner.*`` (codebook, EMA statistics, versions) and ``index.*``
    (``built_version``, ``tree_*``, ``layers_*``); see the two child classes.
    """

    #: state_dict format version (1: flat keys of the single-class module, 2: ``learner.*`` / ``index.*``)
    _version = 2

    def __init__(
        self, dim: int, codebook_size: int, bits: BitProposal = (4, 2, 2, 2, 2), *, num_layers: int | None = None,
        decay: float = 0.99, eps: float = 1e-5, commitment_weight: float = 0.25, kmeans_init: bool = True,
        kmeans_iters: int = 10, threshold_ema_dead_code: float = 2.0, learnable_codebook: bool = False,
        ema_update: bool = True, channel_first: bool = False, linkage: str = "ward", cut: str = "nested",
        refine: bool = False, sync_distributed: bool = True, dead_code_sampling: str = "distortion",
        relocate_codes: bool = True, relocate_every: int = 4, block_size: int | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, train_rate_weight: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim = check_int(dim, "dim", min=1)
        self.codebook_size = check_int(codebook_size, "codebook_size", min=1)
        bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=True)
        self.commitment_weight = check_weight(commitment_weight, "commitment_weight")
        self.learnable_codebook = check_bool(learnable_codebook, "learnable_codebook")
        self.channel_first = check_bool(channel_first, "channel_first")
        self.learner = EMACodebook(
            self.codebook_size, self.dim, decay=decay, eps=eps, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code, learnable=self.learnable_codebook,
            ema_update=ema_update, sync_distributed=sync_distributed, dead_code_sampling=dead_code_sampling,
            relocate_codes=relocate_codes, relocate_every=relocate_every, chunk_elements=chunk_elements,
            train_rate_weight=train_rate_weight,
        )  # fmt: skip
        self.index = ScalableIndex(
            self.codebook_size, self.dim, bits, num_layers, linkage=linkage, cut=cut, refine=refine,
            block_size=block_size,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _KNOB_OWNER and "index" in self._modules:
            raise AttributeError(f"{name} is a knob of ScalableVQ.{_KNOB_OWNER[name]}: set vq.{_KNOB_OWNER[name]}.{name}")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ views
    @property
    def codebook(self) -> Tensor:
        """``[K, D]`` the codewords (the learner's buffer, or ``nn.Parameter`` when ``learnable_codebook``)."""
        return self.learner.codebook

    @property
    def bits(self) -> list[int] | int | str | Any:
        """The bit proposal (a list of ints, or the int / name / callable given)."""
        return self.index.bits

    @property
    def num_layers(self) -> int:
        """L, total number of layers (the last one reaches every codeword)."""
        return self.index.num_layers

    @property
    def is_built(self) -> bool:
        """True once :meth:`update` has filled the hierarchy / layer buffers (also after loading them)."""
        return self.index.is_built

    @property
    def is_stale(self) -> bool:
        """True when built and the codebook changed since the last :meth:`update` (version counter or leaf values)."""
        return self.index.is_stale(self.learner.codebook, self.learner.codebook_version)

    @property
    def hierarchy(self) -> Hierarchy:
        """The merge tree as a :class:`Hierarchy` view of the buffers (no copy). Needs :meth:`update`."""
        return self.index.hierarchy

    @property
    def tables(self) -> LayerTables:
        """The layer tables as a :class:`LayerTables` view of the buffers (no copy). Needs :meth:`update`."""
        return self.index.tables

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, bits={self.bits!r}, num_layers={self.num_layers}, "
            f"commitment_weight={self.commitment_weight}, learnable_codebook={self.learnable_codebook}, "
            f"channel_first={self.channel_first}"
        )

    # ------------------------------------------------------------ input shape
    def _sync(self) -> bool:
        return self.learner.sync_distributed and svq_dist.is_distributed()

    def _flatten(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if self.channel_first:  # [B, D, ...] -> [B, ..., D]
            x = x.movedim(1, -1)
        return x.reshape(-1, self.dim), x.shape[:-1]

    def _unflatten(self, flat: Tensor, batch: torch.Size) -> Tensor:
        out = flat.reshape(*batch, self.dim)
        return out.movedim(-1, 1) if self.channel_first and out.dim() > 1 else out  # one index: [D] either way

    def _check_layers(self, num_layers: Any, name: str = "num_layers", most: int | None = None) -> int:
        return check_int(num_layers, name, min=1, max=self.num_layers if most is None else most)

    @torch.compiler.disable
    def _warn_if_stale(self) -> None:
        """Warn once per build, at the user's line, when the tables were built for another codebook."""
        if self.index.stale_warned or not self.is_stale:
            return
        self.index.stale_warned = True
        warnings.warn(_STALE_MESSAGE, RuntimeWarning, stacklevel=_user_stacklevel())

    # ------------------------------------------------------------- quantizing
    @torch.no_grad()
    def quantize(self, x: Tensor, rate_weight: float = 0.0, *, relative: bool = False,
                 layer_weights: Sequence[float] | None = None) -> Tensor:
        """``[*batch]`` int64 codeword of every vector of ``x`` (``[..., D]``, or ``[B, D, ...]`` when channel-first): the
        nearest, or with ``rate_weight`` ``lam > 0`` the least ``||x - c_k||^2 + lam * bits_k`` (``bits_k``: its full-depth
        code length, ``vq.index.code_lengths()``; needs :meth:`update`), an entropy-constrained choice the decoder follows
        unaware. ``relative``: ``lam`` is ``rate_weight`` x the mean squared distance of ``x``'s vectors to their nearest.
        ``layer_weights`` (``L`` numbers >= 0; needs :meth:`update`): the error after each layer, weighted, instead of at
        full depth only (:meth:`ScalableIndex.layered_codebook`)."""
        _check_input(x, self.dim, self.channel_first)
        rate_weight, relative = check_weight(rate_weight, "rate_weight"), check_bool(relative, "relative")
        codebook, spread = (None, None) if layer_weights is None else self.index.layered_codebook(layer_weights)
        if (rate_weight == 0 and codebook is None) or x.numel() == 0:  # no vectors: nothing to weigh
            return self._quantize(x)
        self._warn_if_stale()
        if relative and rate_weight > 0:
            rate_weight *= mean_squared_error(self._flatten(x)[0], self.codebook, self._quantize(x))
        bias = _choice_penalty(rate_weight, self.index.code_lengths, spread, _compute_dtype(x, self.codebook))
        return self._quantize(x, bias, codebook)

    def _quantize(self, x: Tensor, bias: Tensor | None = None, codebook: Tensor | None = None) -> Tensor:
        flat, batch = self._flatten(x)
        flat = flat.to(_compute_dtype(x, self.codebook))
        with torch.autocast(device_type=x.device.type, enabled=False):
            idx, _ = self.learner.nearest(flat, _cast_like(codebook, flat), bias=_cast_like(bias, flat))
        return idx.reshape(batch)

    def forward(self, x: Tensor, num_layers: int | None = None) -> VQOutput:
        """Quantize ``x``; in training mode also initialize / EMA-update the codebook.

        Args:
            x: ``[..., D]`` float tensor (``[B, D, ...]`` with ``channel_first``),
                float32/float64, or float16/bfloat16 (e.g. under autocast; the
                distance math runs in float32). Must be finite.
            num_layers: ``None`` for plain quantization, or ``l`` in ``1..L``:
                the output is the reconstruction after layers ``0..l-1`` with
                the tables as built by the last :meth:`update`; ``l = L`` equals
                plain quantization exactly. In training mode the codebook still
                trains, which makes those tables stale for later calls.

        Returns:
            :class:`VQOutput` (``quantized`` has the shape and dtype of ``x``).
        """
        if num_layers is not None:
            num_layers = self._check_layers(num_layers)
        _check_input(x, self.dim, self.channel_first)
        if num_layers is not None:
            self.index.require_built()
        flat, batch = self._flatten(x)
        if flat.shape[0] == 0:
            raise ValueError(f"x holds no vectors (shape {list(x.shape)})")
        dtype = _compute_dtype(x, self.codebook)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = flat.to(dtype)
            with_gap = self.learner.prepare(xf.detach()) if self.training else False
            codebook = self.codebook.to(dtype)
            idx, gap = self.learner.assign(xf.detach(), codebook.detach(), with_gap)
            q = F.embedding(idx, codebook if self.learnable_codebook else codebook.detach())
            sq_err = (xf - q.detach()).pow(2)
            commit = sq_err.mean().float()
            codebook_loss = (q - xf.detach()).pow(2).mean().float() if self.learnable_codebook else commit.new_zeros(())
            loss = self.commitment_weight * commit + codebook_loss
            if num_layers is None:
                out = q.detach()
            else:
                self._warn_if_stale()
                out = self.index.layer_centers(num_layers).to(dtype)[idx]
            perplexity = _perplexity(idx, self.codebook_size)
            if self.training:
                self.learner.step(xf.detach(), idx, sq_err.detach().sum(1), gap)
        out = out.to(flat.dtype)
        quantized = out + (flat - flat.detach())  # value: exactly `out`; gradient: identity to x
        return VQOutput(self._unflatten(quantized, batch), idx.reshape(batch), loss, commit, codebook_loss, perplexity)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, force: bool = False, progress: bool = False) -> bool:
        """Build the hierarchy and layer tables for the current codebook, when needed.

        Skips (returns False) when the tables are built and fresh; otherwise (or
        with ``force=True``) builds them from the learner's codebook and
        statistics on the module's device (:meth:`ScalableIndex.build`) and
        returns True (CompressAI's convention). Under ``torch.distributed`` every
        rank must call it: the decision is joint, codebook and statistics are
        broadcast from rank 0 first and the tables after.

        Args:
            force: rebuild even when the tables are fresh.
            progress: show a progress bar while merging.

        Returns:
            whether the tables were (re)built.
        """
        force, progress = check_bool(force, "force"), check_bool(progress, "progress")
        needed = force or not self.is_built or self.is_stale
        if self._sync():
            needed = svq_dist.any_rank(needed, device=self.codebook.device)
        if not needed:
            return False
        self.learner.broadcast_()
        counts, sums = self.learner.statistics()
        self.index.build(
            self.codebook.detach(), counts, sums, self.learner.codebook_version, progress=progress, sync=self._sync()
        )
        return True

    # ------------------------------------------------------ layered coding API
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``[L, *batch]`` int64 per-layer symbols of ``x`` (``[..., D]``, or ``[B, D, ...]`` with ``channel_first``).

        ``codes[l]`` is the symbol sent in layer ``l`` (an index inside the
        vector's group), -1 where nothing is sent.
        """
        _check_input(x, self.dim, self.channel_first)
        self.index.require_built()
        self._warn_if_stale()
        idx = self._quantize(x)
        return self.index.encode(idx.reshape(-1)).reshape(self.num_layers, *idx.shape)

    @torch.no_grad()
    def decode(self, codes: Tensor, num_layers: int | None = None) -> Tensor:
        """``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``) reconstruction from the first layers of ``codes``.

        Args:
            codes: ``[l, *batch]`` integer codes (tensor or array-like) of layers
                ``0..l-1`` as from :meth:`encode`, ``1 <= l <= L``.
            num_layers: layers to use, ``1..l`` (default ``l``).

        Raises:
            ValueError: bad arguments, or invalid codes (see :func:`~svq_modules.layers.decode_codes`).
        """
        codes = _as_tensor(codes, "codes", "int")
        if codes.dim() < 1:
            raise ValueError(f"codes must be [layers, ...], got a 0-d tensor {codes.tolist()!r}")
        available = self._check_layers(codes.shape[0], "codes.shape[0] (layers held by codes)")
        num_layers = available if num_layers is None else self._check_layers(
            num_layers, f"num_layers (codes hold {available} layers)", most=available
        )
        self.index.require_built()
        batch = codes.shape[1:]
        flat = self.index.decode(codes[:num_layers].reshape(num_layers, -1))
        return self._unflatten(flat, batch)

    @torch.no_grad()
    def reconstruct(self, indices: Tensor, num_layers: int) -> Tensor:
        """``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``) reconstruction after ``num_layers`` layers.

        Args:
            indices: ``[*batch]`` integer codeword indices in ``[0, K)`` (tensor or array-like).
            num_layers: ``1..L``; ``L`` gives the codewords themselves.
        """
        num_layers = self._check_layers(num_layers)
        indices = _as_tensor(indices, "indices", "int")
        flat_idx = check_indices(indices.reshape(-1), self.codebook_size)
        self.index.require_built()
        self._warn_if_stale()
        return self._unflatten(self.index.reconstruct(flat_idx, num_layers), indices.shape)

    @torch.no_grad()
    def rates(self, indices: Tensor | None = None) -> LayerRates:
        """Cumulative mean bits per vector after each layer: :class:`~svq_modules.layers.LayerRates`.

        ``raw_bits [L]`` and ``entropy_bits [L]`` (ideal cost under the tree's
        branch probabilities), float64, of ``indices [*batch]`` (e.g.
        ``forward(x).indices``; default: the code usage in the statistics).
        """
        flat = None
        if indices is not None:
            flat = check_indices(_as_tensor(indices, "indices", "int").reshape(-1), self.codebook_size)
            if flat.numel() == 0:
                raise ValueError("indices is empty: nothing to rate")
        self.index.require_built()
        if flat is not None:
            self._warn_if_stale()
        return self.index.rates(flat)

    # ----------------------------------------------------------- bitstream
    @torch.no_grad()
    def compress(self, x: Tensor, *, coding: str = "entropy", num_layers: int | None = None,
                 embed_centers: str | None = None, rate_weight: float = 0.0) -> list[bytes]:
        """Per-layer byte chunks of ``x`` (see ``docs/bitstream.md``).

        Args:
            x: ``[..., D]`` float (``[B, D, ...]`` with ``channel_first``).
            coding: ``"entropy"`` (default; symbols conditioned on the parent
                node, from the stored counts), ``"context"`` (also on the left
                and upper neighbours' symbols, for latents on a grid: indices
                ``[..., H, W]``, i.e. ``x`` ``[B, D, H, W]`` with ``channel_first``), ``"adaptive"``
                (the same, also learning from the layer's earlier symbols) or ``"raw"``.
            num_layers: write only the first layers, ``1..L`` (default all L).
            embed_centers: one of :data:`EMBED_CENTERS`: chunks that also carry
                their layer's node centers, for a receiver without the model.
            rate_weight: the codeword choice, as for :meth:`quantize` (0: nearest).

        Returns:
            ``list[bytes]``, chunk l holds layer l; the batch shape travels in chunk 0.
        """
        options = self._coding_options(x, coding, num_layers, embed_centers)
        return compress_layers(self.hierarchy, self.tables, self.quantize(x, rate_weight), **options)

    def _coding_options(self, x: Tensor, coding: Any, num_layers: Any, embed_centers: Any) -> dict[str, Any]:
        """Check the arguments of :meth:`compress` (before any work) and the module's state."""
        check_choice(coding, "coding", CODINGS)
        check_choice(embed_centers, "embed_centers", list(EMBED_CENTERS))
        num_layers = None if num_layers is None else self._check_layers(num_layers)
        _check_input(x, self.dim, self.channel_first)
        if coding in GRID_CODINGS:  # indices [..., H, W]: x [..., H, W, D] or [B, D, H, W]
            grid_of(x.shape[:1] + x.shape[2:] if self.channel_first else x.shape[:-1])
        self.index.require_built()
        self._warn_if_stale()
        return {"coding": coding, "num_layers": num_layers, "embed_centers": embed_centers}

    @torch.no_grad()
    def compress_items(self, x: Tensor, *, coding: str = "entropy", num_layers: int | None = None,
                       embed_centers: str | None = None, rate_weight: float = 0.0) -> dict[str, Any]:
        """Per-item chunks of a batch (CompressAI's ``{"strings", "shape"}`` convention).

        Args:
            x: ``[B, ..., D]`` (``[B, D, ...]`` with ``channel_first``); other
                arguments as in :meth:`compress`.

        Returns:
            ``{"strings": strings, "shape": shape}``: ``strings[l][b]`` (bytes)
            is layer ``l`` of item ``b``, a stream of its own (any prefix of its
            layers decodes); ``shape`` is an item's index shape (``x.shape[1:-1]``,
            or ``x.shape[2:]`` with ``channel_first``).
        """
        options = self._coding_options(x, coding, num_layers, embed_centers)
        indices = self.quantize(x, rate_weight)
        if indices.dim() < 1 or indices.shape[0] == 0:
            raise ValueError(f"x must have a batch dimension with at least one item, got shape {list(x.shape)}")
        return {"strings": _item_strings(self.hierarchy, self.tables, indices, **options), "shape": tuple(indices.shape[1:])}

    @torch.no_grad()
    def decompress_items(self, strings: Sequence[Sequence[bytes]], shape: Any = None, num_layers: int | None = None) -> Tensor:
        """Batch reconstruction from :meth:`compress_items` output (any prefix of layers ``strings[:l]``).

        Args:
            strings: ``strings[l][b]``, layers ``0..l-1`` of every item.
            shape: the item shape from :meth:`compress_items` (checked), or None.
            num_layers: use only the first ``num_layers`` (``1..L``) layers.

        Returns:
            ``[B, *shape, D]`` (``[B, D, *shape]`` with ``channel_first``).
        """
        num_layers = None if num_layers is None else self._check_layers(num_layers)
        self.index.require_built()
        nodes, item_shape = _decode_items(self.hierarchy, self.tables, strings, shape, num_layers)
        centers = self.index.tree_center
        return self._unflatten(centers[nodes.to(centers.device)], torch.Size((nodes.shape[0], *item_shape)))

    @torch.no_grad()
    def decompress(self, chunks: Sequence[bytes], num_layers: int | None = None) -> Tensor:
        """``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``) from a prefix of the chunks of :meth:`compress`.

        Args:
            chunks: layers ``0..l-1`` in order (any prefix of the stream).
            num_layers: use only the first ``num_layers`` (``1..L``) of them (default all given).

        Raises:
            BitstreamError: (a ``ValueError``) corrupt, reordered, incomplete or
            foreign chunks.
        """
        if num_layers is not None:
            num_layers = self._check_layers(num_layers)
        self.index.require_built()
        out = decompress_layers(self.hierarchy, self.tables, chunks, num_layers=num_layers)
        centers = self.index.tree_center
        return self._unflatten(centers[out.nodes[-1].to(centers.device)], torch.Size(out.batch_shape))

    # ----------------------------------------------------------- checkpoints
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        _migrate_flat_keys(self, state_dict, prefix)  # format 1 (flat keys) -> 2 (child modules), before the children load
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_codebook(
        cls, codebook: Tensor, x: Tensor | None = None, indices: Tensor | None = None, counts: Tensor | None = None,
        sums: Tensor | None = None, bits: BitProposal = (4, 2, 2, 2, 2), *, build: bool = True, **kwargs: Any,
    ) -> ScalableVQ:  # fmt: skip
        """Wrap a codebook learned elsewhere (e.g. by k-means or another VQ layer).

        Every array argument may be a tensor or an array-like (NumPy array,
        list), converted with ``torch.as_tensor``: a float array keeps its
        dtype, a list of numbers becomes the default float dtype (float32).
        Statistics for the hierarchy come from, in this order: ``counts`` (and
        ``sums``, default ``codebook * counts``); the data ``x`` with its
        ``indices`` (default: nearest codewords), via
        :func:`~svq_modules.hierarchy.code_statistics`; or uniform counts.

        Args:
            codebook: ``[K, D]`` float, finite.
            x: optional ``[N, D]`` float data the codebook was learned on.
            indices: optional ``[N]`` int codes of ``x`` in ``[0, K)``.
            counts: optional ``[K]`` code counts (int or float).
            sums: optional ``[K, D]`` per-code sums of the data (needs ``counts``).
            bits: bit proposal, as in the constructor.
            build: call :meth:`update` (default True).
            **kwargs: other constructor arguments.

        Returns:
            A module on the codebook's device and dtype, marked initialized (the
            first training batch will not re-initialize it), built if ``build``.
        """
        codebook = _as_tensor(codebook, "codebook", "float")
        if codebook.dim() != 2 or 0 in codebook.shape:
            raise ValueError(f"codebook must be [K, D] with K, D >= 1, got shape {list(codebook.shape)}")
        check_finite(codebook, "codebook")
        check_bool(build, "build")
        k, d = codebook.shape
        module = cls(d, k, bits, **kwargs).to(device=codebook.device, dtype=codebook.dtype)
        counts, sums = _wrapped_statistics(codebook, x, indices, counts, sums, module.learner)
        module.learner.set_codebook(codebook, counts, sums)
        if build:
            module.update()
        return module

"""Small helpers around :mod:`torch.distributed` used by :class:`ScalableVQ`.

Every helper is a no-op (returns its input unchanged) when no default process
group is initialized, so single-process code never pays for them.  They always
act on the *default* process group: every rank must call them in the same order
(which is the case when they are called from ``forward``/``update`` of a module
replicated on every rank, as in DDP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_sum_",
    "any_rank",
    "broadcast_",
    "broadcast_tensors_",
    "all_gather_rows",
    "release_process_group",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available, initialized and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks of the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place sum over ranks of ``tensor`` (any shape, float or int). Returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True when ``flag`` is True on at least one rank (one all-reduce of one int64 on ``device``).

    Lets every rank take the same decision (e.g. whether to rebuild tables
    whose rebuild is collective). Returns ``bool(flag)`` when not distributed.
    """
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(int(t.item()) > 0)


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast of ``tensor`` from rank ``src`` to every rank. Returns ``tensor``."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_tensors_(tensors: list[Tensor], src: int = 0) -> None:
    """Broadcast several tensors from ``src`` in place, packing those of the same dtype into one message.

    Tensors must be contiguous (buffers are).  Used to make every rank hold the
    exact bytes of rank ``src`` for the codebook, statistics and hierarchy buffers.
    """
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x [n_r, ...]`` of every rank along dim 0, in rank order (``n_r`` may differ).

    Every rank receives the same ``[sum_r n_r, ...]`` tensor. Returns ``x`` itself when not distributed.
    """
    if not is_distributed():
        return x
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def release_process_group() -> None:
    """Destroy the default process group, if one is initialized: the last step of a distributed run.

    Each rank calls it once its last collective is done; it does not wait for the others (a
    rank that failed earlier must not leave the rest hanging). Lightning leaves the group
    alive after ``fit``; left to interpreter exit, the gloo backend's threads can abort a
    process whose run succeeded ("terminate called without an active exception", exit -6).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

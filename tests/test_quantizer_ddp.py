"""ScalableVQ under torch.distributed: 2 CPU processes (gloo), different data on each rank."""

from __future__ import annotations

import datetime
import inspect
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svq_modules.nn import ScalableVQ

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_buffer_sync() -> dict:
    """DDP kwargs that stop DDP from broadcasting buffers before every forward."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _rank_data(rank: int, n: int, d: int) -> torch.Tensor:
    """Rank 0 sees a blob around +4, rank 1 a blob around -4 (plus sub-clusters)."""
    g = torch.Generator().manual_seed(100 + rank)
    sub = torch.randn(6, d, generator=g)
    x = sub[torch.randint(6, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return x + (4.0 if rank == 0 else -4.0)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a bounded wait: a lost rank fails the test instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(rank)  # different random streams: only the module's own syncing can agree
        d = 4
        x = _rank_data(rank, 2048, d)

        # 1) the bare module: its own all-reduce / broadcast keeps the ranks identical
        vq = ScalableVQ(d, 32, bits=[2, 2], decay=0.8)
        for b in x.split(256):
            vq(b)
        decisions = [vq.eval().update(), vq.update()]  # built, then fresh on every rank
        if rank == 1:  # a change only rank 1 sees: every rank must still rebuild (collective broadcasts inside)
            with torch.no_grad():
                vq.codebook[0] += 1.0
        decisions.append(vq.update())
        torch.save(decisions, os.path.join(out_dir, f"decisions{rank}.pt"))
        torch.save({k: v.clone() for k, v in vq.state_dict().items()}, os.path.join(out_dir, f"bare{rank}.pt"))

        # 2) inside DDP (buffers not broadcast by DDP, so the module must sync itself)
        model = torch.nn.Sequential(torch.nn.Linear(d, d), ScalableVQ(d, 32, bits=[2, 2], decay=0.8))
        ddp = torch.nn.parallel.DistributedDataParallel(model, **_no_buffer_sync())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for b in x.split(256):
            out = ddp(b)
            loss = (out.quantized - b).pow(2).mean() + out.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model[1].update()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"ddp{rank}.pt"))
        dist.barrier()  # both ranks done before the group goes away
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_end_identical(tmp_path):
    ranks = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300  # a lost rank fails the test instead of hanging the suite
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two DDP ranks did not finish within 300 s")
    for kind in ("bare", "ddp"):
        s0 = torch.load(tmp_path / f"{kind}0.pt")
        s1 = torch.load(tmp_path / f"{kind}1.pt")
        assert s0.keys() == s1.keys()
        differing = [k for k in s0 if not torch.equal(s0[k], s1[k])]
        assert not differing, f"{kind}: buffers differ across ranks: {differing}"
        prefix = "1.index." if kind == "ddp" else "index."
        assert int(s0[prefix + "built_version"]) >= 0
        assert any(k.startswith(prefix + "tree_") for k in s0) and any(k.startswith(prefix + "layers_") for k in s0)
    # update() decides jointly: True (missing), False (fresh), True (stale on rank 1 only) on both ranks
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"decisions{rank}.pt") == [True, False, True]
    # the shared codebook learned from both ranks' data (all-reduced statistics, not one rank's)
    cb = torch.load(tmp_path / "bare0.pt")["learner.codebook"]
    for rank in range(WORLD):
        x = _rank_data(rank, 2048, 4)
        err = torch.cdist(x, cb).amin(1).pow(2).mean()
        assert err < 0.5, (rank, err)


def test_run_checked_releases_the_process_group():
    """The entry points' last step destroys the default process group (left alive by Lightning,
    it can abort a finished DDP process at exit), and returns the job's PSNR."""
    from omegaconf import OmegaConf

    from svq_modules.lightning.entry import run_checked

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert run_checked(lambda cfg: {"psnr": 31.5}, OmegaConf.create({})) == 31.5
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Benchmark of the ScalableVQ nn.Module (issue 5) against vector-quantize-pytorch, in one run.

Prints markdown tables:

1. Training step (forward + backward + EMA update) at K=1024, D=64, 16384
   vectors on CPU: median time of ScalableVQ vs ``VectorQuantize(dim=64,
   codebook_size=1024, decay=0.99)``, measured interleaved (A, B, A, B ...) in
   this process so that load from other jobs hits both alike.
2. Peak memory of one training step, each model in a fresh subprocess:
   resident-set high-water mark (``VmHWM`` of ``/proc/self/status``, reset via
   ``/proc/self/clear_refs``) minus the resident size before the step, with
   glibc's mmap threshold pinned at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so every
   tensor buffer is its own mapping and freed tensors leave the resident set at
   once. This counts what torch's CPU allocator really touches (``tracemalloc``
   does not see torch allocations at all).
3. ``update()`` (hierarchy + layer tables) time at K=1024 and K=16384, D=64, best of 3.
4. Rate-distortion on china.jpg (sklearn sample image / 255): pixels (D=3) and
   non-overlapping 4x4 patches (D=48). MSE per element at 4/6/8/10 cumulative
   bits, as a ratio to flat MiniBatchKMeans with as many cells, for
   * ScalableVQ K=1024, bits [4, 2, 2, 2, 2], trained by the module itself (EMA);
   * ScalableVQ.from_codebook on the flat MiniBatchKMeans K=1024 codebook;
   * vector-quantize-pytorch ResidualVQ(dim, codebook_size=(16, 4, 4, 4)) trained
     on the same batches with the same decay;
   * stagewise residual k-means 16-4-4-4 (sklearn KMeans on each residual).

Run: ``python bench/bench_module.py`` (a few minutes on 2 cores) or ``--quick``; the tables are
also written to ``docs/benchmarks/module.md`` (``common.write_report``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_report  # noqa: E402

from svq_modules.nn import ScalableVQ  # noqa: E402

warnings.filterwarnings("ignore")

K_STEP, D_STEP, N_STEP = 1024, 64, 16384


# ----------------------------------------------------------------- training step
def make_models(seed: int = 0):
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(seed)
    ours = ScalableVQ(D_STEP, K_STEP, decay=0.99)
    peer = VectorQuantize(dim=D_STEP, codebook_size=K_STEP, decay=0.99)
    return ours, peer


def step_ours(vq: ScalableVQ, x: torch.Tensor, target: torch.Tensor) -> None:
    xi = x.detach().requires_grad_(True)
    out = vq(xi)
    ((out.quantized - target).pow(2).mean() + out.loss).backward()


def step_peer(vq, x: torch.Tensor, target: torch.Tensor) -> None:
    xi = x.detach().requires_grad_(True)
    q, _, loss = vq(xi)
    ((q - target).pow(2).mean() + loss.sum()).backward()


def step_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(256, D_STEP, generator=g)
    x = centers[torch.randint(256, (N_STEP,), generator=g)] + 0.5 * torch.randn(N_STEP, D_STEP, generator=g)
    return x[None], torch.randn(1, N_STEP, D_STEP, generator=g)


def bench_step(rounds: int) -> dict:
    ours, peer = make_models()
    x, target = step_data()
    for _ in range(2):  # first-batch init and warm-up
        step_ours(ours, x, target)
        step_peer(peer, x, target)
    t_ours, t_peer = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step_ours(ours, x, target)
        t1 = time.perf_counter()
        step_peer(peer, x, target)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_peer.append(t2 - t1)
    return {"ours": statistics.median(t_ours), "peer": statistics.median(t_peer)}


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])  # KiB
    return out


def memory_child(which: str) -> None:
    """Subprocess body: peak extra resident memory (KiB) of one training step."""
    ours, peer = make_models()
    model, step = (ours, step_ours) if which == "ours" else (peer, step_peer)
    x, target = step_data()
    for _ in range(2):
        step(model, x, target)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _rss()["VmRSS"]
    step(model, x, target)
    print(json.dumps({"peak_kib": _rss()["VmHWM"] - before}))


def bench_memory() -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = {}
    for which in ("ours", "peer"):
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", which], env=env, capture_output=True, text=True, check=True
        )
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024.0  # MiB
    return out


# ----------------------------------------------------------------- update()
def bench_update(sizes: list[int], dim: int = 64, repeat: int = 3) -> dict:
    """Best of ``repeat`` ``update(force=True)`` calls per codebook size (the first one included)."""
    out = {}
    for k in sizes:
        g = torch.Generator().manual_seed(k)
        centers = torch.randn(max(16, k // 16), dim, generator=g) * 2
        codebook = centers[torch.randint(centers.shape[0], (k,), generator=g)] + torch.randn(k, dim, generator=g)
        counts = torch.randint(1, 50, (k,), generator=g).float()
        vq = ScalableVQ.from_codebook(codebook, counts=counts, bits=[4, 2, 2, 2, 2], build=False)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            vq.update(force=True)
            times.append(time.perf_counter() - t0)
        out[k] = min(times)
    return out


# ----------------------------------------------------------------- rate-distortion
def china(kind: str, max_vectors: int | None, seed: int = 0) -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    img = torch.from_numpy(load_sample_image("china.jpg").astype(np.float32) / 255.0)  # [H, W, 3]
    if kind == "pixels":
        x = img.reshape(-1, 3)
    else:
        h, w = (img.shape[0] // 4) * 4, (img.shape[1] // 4) * 4
        x = img[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).permute(0, 2, 1, 3, 4).reshape(-1, 48)
    if max_vectors is not None and x.shape[0] > max_vectors:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_vectors]]
    return x.contiguous()


def batches(n: int, batch: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for b in torch.randperm(n, generator=g).split(batch):
            if b.numel() < batch // 2:
                continue
            yield b
            done += 1
            if done == steps:
                return


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def rd_ours(x: torch.Tensor, steps: int, batch: int, decay: float) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    vq = ScalableVQ(x.shape[1], 1024, bits=[4, 2, 2, 2, 2], decay=decay)
    t0 = time.perf_counter()
    for b in batches(x.shape[0], batch, steps):
        vq(x[b])
    train_s = time.perf_counter() - t0
    vq.eval()
    t0 = time.perf_counter()
    vq.update()
    update_s = time.perf_counter() - t0
    idx = vq.quantize(x)
    rates = vq.rates(idx)
    errs = [mse(vq.reconstruct(idx, l), x) for l in range(1, 5)]
    info = {
        "train_s": train_s,
        "update_s": update_s,
        "raw_bits": rates.raw_bits[:4].tolist(),
        "entropy_bits": rates.entropy_bits[:4].tolist(),
        "full_raw_bits": float(rates.raw_bits[-1]),
        "full_mse": mse(vq.codebook[idx], x),
    }
    return errs, info


def rd_wrapped(x: torch.Tensor, codebook: torch.Tensor) -> tuple[list[float], dict]:
    vq = ScalableVQ.from_codebook(codebook, x, bits=[4, 2, 2, 2, 2]).eval()
    idx = vq.quantize(x)
    rates = vq.rates(idx)
    return [mse(vq.reconstruct(idx, l), x) for l in range(1, 5)], {"raw_bits": rates.raw_bits[:4].tolist()}


def rd_rvq(x: torch.Tensor, steps: int, batch: int, decay: float) -> list[float]:
    from vector_quantize_pytorch import ResidualVQ

    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=x.shape[1], codebook_size=(16, 4, 4, 4), decay=decay, kmeans_init=True, threshold_ema_dead_code=2
    )
    for b in batches(x.shape[0], batch, steps):
        rvq(x[b][None])
    rvq.eval()
    with torch.no_grad():
        parts = [rvq(chunk[None], return_all_codes=True)[3][:, 0] for chunk in x.split(65536)]
    cum = torch.cat(parts, dim=1).cumsum(0)  # [4, N, D] reconstruction after 1..4 stages
    return [mse(cum[l], x) for l in range(4)]


def rd_residual_kmeans(x: torch.Tensor) -> list[float]:
    from sklearn.cluster import KMeans

    residual = x.double().numpy()
    errs = []
    for k in (16, 4, 4, 4):
        km = KMeans(k, n_init=3, random_state=0).fit(residual)
        residual = residual - km.cluster_centers_[km.labels_]
        errs.append(float((residual**2).mean()))
    return errs


def rd_flat(x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    from sklearn.cluster import MiniBatchKMeans

    errs, codebook = [], None
    xn = x.numpy()
    for bits in (4, 6, 8, 10):
        km = MiniBatchKMeans(2**bits, init="random", random_state=0, n_init=3).fit(xn)
        idx = km.predict(xn)
        errs.append(float(((xn - km.cluster_centers_[idx]) ** 2).mean()))
        codebook = torch.from_numpy(km.cluster_centers_).float()
    return errs, codebook


def bench_rd(kind: str, quick: bool) -> dict:
    if kind == "pixels":
        x = china("pixels", 60_000 if quick else None)
        batch, steps = 8192, (120 if quick else 300)
    else:
        x = china("patches", None)
        batch, steps = 4096, (120 if quick else 300)
    decay = 0.95
    flat, codebook = rd_flat(x)
    ours, info = rd_ours(x, steps, batch, decay)
    wrapped, winfo = rd_wrapped(x, codebook)
    rvq = rd_rvq(x, steps, batch, decay)
    rkm = rd_residual_kmeans(x)
    return {
        "n": x.shape[0], "dim": x.shape[1], "steps": steps, "batch": batch, "decay": decay,
        "flat": flat, "ours": ours, "ours_info": info, "wrapped": wrapped, "wrapped_info": winfo,
        "rvq": rvq, "residual_kmeans": rkm,
    }


# ----------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds / training steps, pixel subsample")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-update", action="store_true")
    ap.add_argument("--skip-rd", action="store_true")
    ap.add_argument("--memory-child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text)
        lines.append(text)

    emit(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    if not args.skip_step:
        t = bench_step(rounds=5 if args.quick else 15)
        m = bench_memory()
        emit(f"### Training step, K={K_STEP}, D={D_STEP}, N={N_STEP} (fwd + bwd + EMA), CPU\n")
        emit("| | ScalableVQ | VectorQuantize (vector-quantize-pytorch) | ratio ours/peer | target |")
        emit("|---|---|---|---|---|")
        ratio = t["ours"] / t["peer"]
        emit(f"| median step time | {t['ours'] * 1e3:.1f} ms | {t['peer'] * 1e3:.1f} ms | {ratio:.2f} | <= 1.0 |")
        emit(f"| peak extra memory | {m['ours']:.1f} MiB | {m['peer']:.1f} MiB | {m['ours'] / m['peer']:.2f} | <= 1.2 |")
        emit("")
    if not args.skip_update:
        u = bench_update([1024, 16384])
        emit("### update() (hierarchy + layer tables), D=64, CPU\n")
        emit("| K | time | target |")
        emit("|---|---|---|")
        emit(f"| 1024 | {u[1024]:.3f} s | < 0.3 s |")
        emit(f"| 16384 | {u[16384]:.2f} s | < 10 s |")
        emit("")
    if not args.skip_rd:
        for kind in ("pixels", "patches"):
            r = bench_rd(kind, args.quick)
            flat = r["flat"]
            emit(
                f"### Rate-distortion, china.jpg {kind} (N={r['n']}, D={r['dim']}): MSE / flat MiniBatchKMeans MSE\n"
            )
            emit(f"Trained models: {r['steps']} steps of {r['batch']} vectors, decay {r['decay']}.\n")
            emit("| method | 4 bits | 6 bits | 8 bits | 10 bits |")
            emit("|---|---|---|---|---|")
            emit("| flat MiniBatchKMeans MSE | " + " | ".join(f"{v:.3e}" for v in flat) + " |")
            rows = [
                ("ScalableVQ K=1024 [4,2,2,2,2], trained by the module", r["ours"]),
                ("ScalableVQ.from_codebook(flat K=1024 codebook)", r["wrapped"]),
                ("ResidualVQ (16,4,4,4), trained (vector-quantize-pytorch)", r["rvq"]),
                ("residual k-means 16-4-4-4 (stagewise)", r["residual_kmeans"]),
            ]
            for name, errs in rows:
                emit(f"| {name} | " + " | ".join(f"{e / f:.2f}" for e, f in zip(errs, flat)) + " |")
            info = r["ours_info"]
            emit(
                "\nScalableVQ (trained): raw bits per layer "
                + "/".join(f"{b:.2f}" for b in info["raw_bits"])
                + ", ideal entropy bits "
                + "/".join(f"{b:.2f}" for b in info["entropy_bits"])
                + f"; full depth {info['full_raw_bits']:.2f} raw bits, MSE {info['full_mse']:.3e}; "
                + f"training {info['train_s']:.1f} s, update() {info['update_s']:.2f} s. "
                + "from_codebook raw bits "
                + "/".join(f"{b:.2f}" for b in r["wrapped_info"]["raw_bits"])
                + "."
            )
            beats = all(o < v for o, v in zip(r["ours"][1:], r["rvq"][1:]))
            emit(f"ScalableVQ below ResidualVQ at every rate from 6 bits on: {'yes' if beats else 'NO'}\n")
    path = write_report("module", "ScalableVQ module: training step, update(), rate-distortion", "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

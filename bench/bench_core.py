"""Issue-4 benchmark: scalable layers vs the seed (`scalablevq` 1.7.1) vs flat k-means.

Run from the repository root::

    python bench/bench_core.py            # full: pixels K=256/1024/4096, patches K=1024, K=65536 synthetic
    python bench/bench_core.py --quick    # pixels K=256/1024 only
    python bench/bench_core.py --no-seed  # without the seed package

Data: ``china.jpg`` (scikit-learn sample image) / 255, as pixels ``[273280, 3]``
and as 4x4 patches ``[16960, 48]``. Codebooks: ``MiniBatchKMeans(n_clusters=K,
init='random', random_state=0, n_init='auto')``, cached under ``bench/.cache/``.
The seed gets the codebook with its empty clusters dropped and renumbered (it
refuses them); ours gets the codebook as is. Both get float32 tensors and bits
``[4, 2, 2, 2, 2]``.

Measured, all in the same run:

* build time: the whole ``encode_layers`` call (statistics, tree, tables,
  per-layer codes), best of 5 after a warm-up for ours, one run for the seed
  (timings on a shared machine are noisy: the load average is printed);
* MSE (mean over all elements) after each of the first four layers (4, 6, 8,
  10 cumulative bits), as a ratio to the *flat k-means bound*: MiniBatchKMeans
  (same settings) with ``2**bits`` clusters on the same data. The <= 1.10
  target is checked at 4, 6 and 8 bits where ``2**bits < K`` (at ``2**bits >= K``
  the bound is a flat quantizer at least as fine as the whole codebook, which
  a layer can only match if every vector has reached its leaf);
* full-depth rate of ours: raw (fixed-length) bits per vector vs
  ``ceil(log2 K) + 2`` and ideal entropy-coded bits vs ``H(indices) + 0.05``;
  the seed's raw bits per vector for reference;
* a large synthetic case, K=65536, D=64 (codewords from a 256-component
  Gaussian mixture, 4 vectors per code on average around their codeword): build
  time and peak memory of ``encode_layers``, measured in a fresh child process:
  the child builds the data, resets its RSS high-water mark
  (``echo 5 > /proc/self/clear_refs``), runs ``encode_layers`` and reads the
  peak back from ``VmHWM`` in ``/proc/self/status``. So the peak is that of the
  whole child process *during the build* (python, torch and the data already
  resident included); the RSS just before the build is shown next to it.
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not used: in a subprocess
  it inherits the parent's peak on Linux and would report the bench's own size.)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DATASETS,
    current_rss_mib,
    drop_empty,
    entropy_bits,
    flat_kmeans_mse,
    kmeans,
    markdown_table,
    peak_rss_mib,
    quiet_stderr,
    reset_peak_rss,
    run_child,
    timed,
    verdict,
)

BITS = [4, 2, 2, 2, 2]
CUM_BITS = [4, 6, 8, 10]  # cumulative bits of the first four layers
OURS_MAX_RATIO = 1.10  # vs the flat bound, at 4, 6, 8 bits
SEED_OVER_OURS = {"pixels": 1.4, "patches": 1.8}  # at 4, 6, 8, 10 bits
BUILD_SPEEDUP_K4096 = 100.0
LARGE_TIME_S = 30.0
LARGE_PEAK_MIB = 4096.0


def layer_mse(decode_layer, layers, x: np.ndarray) -> list[float]:
    """MSE after each layer (mean over all elements, float64)."""
    xt = torch.from_numpy(x)
    out, context = [], None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
        out.append(float(((decoded.double() - xt) ** 2).mean()))
    return out


def run_case(dataset: str, num_codes: int, use_seed: bool) -> dict:
    from svq_modules.compat.functional import decode_layer, encode_layers, encode_scalable
    from svq_modules.layers import layer_rates

    x = DATASETS[dataset]()
    centers, labels = kmeans(x, num_codes, dataset)
    data = torch.from_numpy(x).float()
    q = torch.from_numpy(labels)
    cb = torch.from_numpy(centers).float()
    res: dict = {"dataset": dataset, "K": num_codes, "K_used": int(np.unique(labels).size)}

    # ours: full codebook, empty clusters included
    encode_layers(data, q, cb, BITS)  # warm-up (first-call allocations)
    _, t_ours = timed(lambda: encode_layers(data, q, cb, BITS), repeat=5)
    enc = encode_scalable(data, q, cb, BITS)
    res["t_ours"] = t_ours
    res["mse_ours"] = layer_mse(decode_layer, enc.layers, x)
    rates = layer_rates(enc.hierarchy, enc.tables, q)
    res["raw_bits"] = float(rates.raw_bits[-1])
    res["entropy_bits"] = float(rates.entropy_bits[-1])
    res["H"] = entropy_bits(labels)
    res["exact"] = bool(torch.equal(decode_layer_all(decode_layer, enc.layers), cb[q]))
    res["bound"] = [flat_kmeans_mse(x, b, dataset) for b in CUM_BITS]
    # ours with Lloyd-refined nested layers (option refine=True)
    enc_r, t_refined = timed(lambda: encode_scalable(data, q, cb, BITS, refine=True))
    res["t_refined"] = t_refined
    res["mse_refined"] = layer_mse(decode_layer, enc_r.layers, x)
    res["exact"] = res["exact"] and bool(torch.equal(decode_layer_all(decode_layer, enc_r.layers), cb[q]))

    if use_seed:
        import scalablevq

        c_s, l_s = drop_empty(centers, labels)
        cb_s, q_s = torch.from_numpy(c_s).float(), torch.from_numpy(l_s)
        with quiet_stderr():
            seed_layers, t_seed = timed(lambda: scalablevq.encode_layers(data, q_s, cb_s, BITS[0], BITS[1:]))
        res["t_seed"] = t_seed
        res["mse_seed"] = layer_mse(scalablevq.decode_layer, seed_layers, x)
        res["raw_bits_seed"] = sum(int(layer.n_bit) * layer.codes.numel() for layer in seed_layers) / x.shape[0]
    return res


def decode_layer_all(decode_layer, layers):
    context = decoded = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
    return decoded


def large_child(num_codes: int, dim: int, num_vectors: int) -> None:
    """Child process: synthetic Gaussian-mixture codebook, time and peak RSS of encode_layers."""
    from svq_modules.compat.functional import encode_layers

    gen = torch.Generator().manual_seed(0)
    num_components = 256
    means = 2.0 * torch.randn(num_components, dim, generator=gen)
    component = torch.randint(num_components, (num_codes,), generator=gen)
    codebook = means[component] + 0.5 * torch.randn(num_codes, dim, generator=gen)
    indices = torch.randint(num_codes, (num_vectors,), generator=gen)
    data = codebook[indices] + 0.1 * torch.randn(num_vectors, dim, generator=gen)
    del means, component
    gc.collect()
    was_reset = reset_peak_rss()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    layers = encode_layers(data, indices, codebook, BITS)
    elapsed = time.perf_counter() - t0
    peak = peak_rss_mib()
    print(json.dumps({
        "K": num_codes, "D": dim, "N": num_vectors, "time_s": elapsed,
        "peak_rss_mib": peak, "rss_before_mib": rss_before, "peak_reset": was_reset,
        "layers": len(layers), "threads": torch.get_num_threads(),
    }))


def print_case_tables(results: list[dict]) -> None:
    """Build time, per-layer MSE and full-depth rate tables."""
    # ---- build time
    rows = []
    for r in results:
        ratio = r["t_seed"] / r["t_ours"] if "t_seed" in r else math.nan
        target = f">= {BUILD_SPEEDUP_K4096:.0f}x" if r["K"] == 4096 and r["dataset"] == "pixels" else "-"
        ok = (ratio >= BUILD_SPEEDUP_K4096) if target != "-" and "t_seed" in r else None
        rows.append([r["dataset"], r["K"], r["K_used"], r.get("t_seed", math.nan), r["t_ours"], ratio, target, verdict(ok),
                     r["t_refined"]])
    print("## Build time (s)\n")
    print(markdown_table(["data", "K", "K used", "seed", "ours", "seed / ours", "target", "", "ours refined"], rows))

    # ---- MSE per layer
    rows = []
    for r in results:
        bound = r["bound"]
        ours = [m / b for m, b in zip(r["mse_ours"][:4], bound)]
        rows.append([r["dataset"], r["K"], "flat k-means MSE"] + bound + ["", ""])
        checked = [v for v, b in zip(ours[:3], CUM_BITS[:3]) if 2**b < r["K"]]
        where = ", ".join(str(b) for b in CUM_BITS[:3] if 2**b < r["K"])
        ok_ours = all(v <= OURS_MAX_RATIO for v in checked)
        rows.append([r["dataset"], r["K"], "ours / bound"] + ours + [f"<= {OURS_MAX_RATIO} at {where} bits", verdict(ok_ours)])
        if "mse_seed" in r:
            seed = [m / b for m, b in zip(r["mse_seed"][:4], bound)] + [math.nan] * max(0, 4 - len(r["mse_seed"]))
            gain = [s / o for s, o in zip(r["mse_seed"][:4], r["mse_ours"][:4])]
            gain += [math.nan] * (4 - len(gain))
            need = SEED_OVER_OURS[r["dataset"]]
            rows.append([r["dataset"], r["K"], "seed / bound"] + seed + ["", ""])
            rows.append([r["dataset"], r["K"], "seed / ours"] + gain + [f">= {need}", verdict(all(g >= need for g in gain))])
        refined = [m / b for m, b in zip(r["mse_refined"][:4], bound)]
        checked = [v for v, b in zip(refined[:3], CUM_BITS[:3]) if 2**b < r["K"]]
        rows.append([r["dataset"], r["K"], "ours refined / bound"] + refined
                    + [f"<= {OURS_MAX_RATIO} at {where} bits", verdict(all(v <= OURS_MAX_RATIO for v in checked))])
        if "mse_seed" in r:
            gain = [s / o for s, o in zip(r["mse_seed"][:4], r["mse_refined"][:4])]
            gain += [math.nan] * (4 - len(gain))
            rows.append([r["dataset"], r["K"], "seed / ours refined"] + gain
                        + [f">= {need}", verdict(all(g >= need for g in gain))])
    print("\n## MSE after each layer, as ratio to the flat k-means bound\n")
    print(markdown_table(["data", "K", "row", "4 bits", "6 bits", "8 bits", "10 bits", "target", ""], rows))

    # ---- rate at full depth
    rows = []
    for r in results:
        raw_target = math.ceil(math.log2(r["K"])) + 2
        ent_target = r["H"] + 0.05
        rows.append([
            r["dataset"], r["K"], r["raw_bits"], raw_target, verdict(r["raw_bits"] <= raw_target),
            r["entropy_bits"], ent_target, verdict(r["entropy_bits"] <= ent_target),
            r.get("raw_bits_seed", math.nan), "yes" if r["exact"] else "NO",
        ])
    print("\n## Full depth: bits per vector\n")
    print(markdown_table(
        ["data", "K", "ours raw", "ceil(log2 K)+2", "", "ours entropy", "H(indices)+0.05", "", "seed raw", "exact codewords"],
        rows,
    ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pixels K=256/1024 only (no K=4096, patches or large case)")
    parser.add_argument("--no-seed", action="store_true", help="skip the scalablevq seed package")
    parser.add_argument("--no-large", action="store_true", help="skip the K=65536 synthetic case")
    parser.add_argument("--large-only", action="store_true", help="only the K=65536 synthetic case")
    parser.add_argument("--child-large", nargs=3, type=int, metavar=("K", "D", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_large:
        large_child(*args.child_large)
        return

    use_seed = not args.no_seed
    if use_seed:
        try:
            import scalablevq  # noqa: F401
        except ImportError:
            print("scalablevq not installed: running without the seed (pip install scalablevq==1.7.1)")
            use_seed = False
    cases = [("pixels", 256), ("pixels", 1024)]
    if not args.quick:
        cases += [("pixels", 4096), ("patches", 1024)]
    if args.large_only:
        cases = []

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# bench_core: bits {BITS}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load}\n")
    results = []
    for dataset, k in cases:
        t0 = time.perf_counter()
        results.append(run_case(dataset, k, use_seed))
        print(f"<!-- {dataset} K={k} done in {time.perf_counter() - t0:.1f} s -->", flush=True)

    if results:
        print_case_tables(results)

    # ---- large synthetic case
    if not (args.quick or args.no_large):
        k, d, n = 65536, 64, 4 * 65536
        timeout = 20 * LARGE_TIME_S
        try:
            out = run_child([str(Path(__file__).resolve()), "--child-large", str(k), str(d), str(n)], timeout=timeout)
        except subprocess.TimeoutExpired:
            out = {"K": k, "D": d, "N": n, "time_s": math.inf, "peak_rss_mib": math.nan,
                   "rss_before_mib": math.nan, "threads": torch.get_num_threads()}
            print(f"\n(large case killed after {timeout:.0f} s)")
        print("\n## Large synthetic case (fresh child process)\n")
        print(markdown_table(
            ["K", "D", "N", "build s", "target", "", "peak RSS during build, MiB", "RSS before build, MiB", "target", ""],
            [[out["K"], out["D"], out["N"], out["time_s"], f"< {LARGE_TIME_S:.0f} s", verdict(out["time_s"] < LARGE_TIME_S),
              out["peak_rss_mib"], out["rss_before_mib"], f"< {LARGE_PEAK_MIB:.0f} MiB",
              verdict(out["peak_rss_mib"] < LARGE_PEAK_MIB)]],
        ))
        how = ("VmHWM after resetting it before the build" if out.get("peak_reset")
               else "VmHWM (not resettable: whole child lifetime)")
        print(f"\npeak RSS = {how}, whole child process (python, torch, data included); {out['threads']} torch threads.")


if __name__ == "__main__":
    main()

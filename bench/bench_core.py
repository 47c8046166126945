"""Core benchmark: the nested layers (default) against the greedy cut, refine, the seed and flat k-means.

Run from the repository root::

    python bench/bench_core.py              # everything (several minutes)
    python bench/bench_core.py --quick      # china pixels K=256/1024 only
    python bench/bench_core.py --no-seed    # without the seed package (scalablevq 1.7.1)
    python bench/bench_core.py --no-held-out --no-large

Data (each / 255 where an image): ``china.jpg`` (scikit-learn sample image) as
pixels ``[273280, 3]`` and 4x4 patches ``[16960, 48]``; held out (never tuned
on): ``flower.jpg`` (scikit-learn), ``grace_hopper.jpg`` (matplotlib's sample
data), pixels and patches each; ``splats``: 40000 synthetic 59-dim
Gaussian-splat-like attribute vectors (xyz around 64 centres, log-scales,
unit quaternions, opacity, colour and 45 decaying higher-order colour terms);
``digits``: scikit-learn's 1797 8x8 digits / 16. Codebooks:
``MiniBatchKMeans(n_clusters=K, init='random', random_state=0, n_init='auto')``,
cached under ``bench/.cache/``. Bits ``[4, 2, 2, 2, 2]``, float32 tensors.

Methods, all from the same statistics (count and sum per code):

* ``nested`` (the default, ``cut="nested"`` of :func:`svq_modules.nested.build_scalable`):
  Lloyd-optimised nested cells, one Ward tree to start from (on start units above 16384 codewords),
  one constrained build;
* ``greedy``: the greedy cut of the Ward tree (option ``cut="greedy"``);
* ``refine``: the per-layer rebuild (``refine=True``);
* ``seed``: ``scalablevq.encode_layers`` 1.7.1, given the codebook with its
  empty clusters dropped (it refuses them).

Measured in one run:

* build time: code statistics, layers and per-layer codes
  (:func:`svq_modules.compat.encode.layers_from_tables`), best of 5 after a
  warm-up for nested and greedy (interleaved, so both see the same load), best
  of 3 for the seed with one more nested build after each seed run (so ours
  also meets the load the seed met), one run for refine; the machine's load
  average is printed;
* MSE (mean over all elements) after each of the first four layers (4, 6, 8,
  10 cumulative bits), as a ratio to the *flat k-means bound*, MiniBatchKMeans
  (same settings) with ``2**bits`` clusters on the same data. Targets of the
  default where ``2**bits < K`` (at ``2**bits >= K`` the bound is a flat
  quantizer at least as fine as the whole codebook): at most 1.05, and never
  above the greedy cut; seed / nested MSE over the first four layers at least
  1.4 (pixels) / 1.8 (patches) on china K=1024, 4096 and patches K=1024;
* full depth of the default: raw bits per vector vs ``ceil(log2 K) + 2``,
  ideal entropy-coded bits vs ``H(indices) + 0.05``, exact codewords;
* a large synthetic case, K=65536, D=64 (codewords from a 256-component
  Gaussian mixture, 4 vectors per code on average): build time and peak
  memory of the default (and of the greedy cut for reference), each in a fresh
  child process that resets its RSS high-water mark before the build
  (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM`` after it.

The tables are written to ``docs/benchmarks/core.md`` (``common.write_report``).
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    china_patches,
    china_pixels,
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
    verdict,
    write_report,
)

BITS = [4, 2, 2, 2, 2]
SEED_REPEAT = 3  # runs of the seed per case (its best is kept)
CUM_BITS = [4, 6, 8, 10]  # cumulative bits of the first four layers
MAX_RATIO = 1.05  # default vs the flat bound, where 2**bits < K
SEED_OVER_OURS = {"pixels": 1.4, "patches": 1.8}
SEED_TARGET_CASES = {("pixels", 1024), ("pixels", 4096), ("patches", 1024)}
BUILD_SPEEDUP_K4096 = 100.0
LARGE_TIME_S = 30.0
LARGE_PEAK_MIB = 4096.0
METHODS: dict[str, dict] = {"nested": dict(cut="nested"), "greedy": dict(cut="greedy"), "refine": dict(refine=True)}


# --------------------------------------------------------------------------- held-out data


def _image(name: str) -> np.ndarray:
    if name in ("china.jpg", "flower.jpg"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name) / 255.0
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    return np.asarray(mpimg.imread(cbook.get_sample_data(name, asfileobj=False)))[..., :3] / 255.0


def image_pixels(name: str) -> np.ndarray:
    """An image's RGB pixels / 255: ``[H*W, 3]`` float64."""
    return np.ascontiguousarray(_image(name)[..., :3].reshape(-1, 3)).astype(np.float64)


def image_patches(name: str, size: int = 4) -> np.ndarray:
    """Non-overlapping ``size x size`` RGB patches / 255: ``[N, 3 size^2]`` float64."""
    img = _image(name)[..., :3]
    h, w, c = img.shape
    h, w = h - h % size, w - w % size
    patches = img[:h, :w].reshape(h // size, size, w // size, size, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(patches.reshape(-1, size * size * c)).astype(np.float64)


def splats(n: int = 40000, seed: int = 0) -> np.ndarray:
    """59-dim Gaussian-splat-like attributes: xyz (3), log-scales (3), unit quaternion (4),
    opacity (1), colour (3), 45 decaying higher-order colour terms: ``[n, 59]`` float64."""
    rng = np.random.default_rng(seed)
    centres = 64
    cent = rng.normal(size=(centres, 3)) * 2.0
    comp = rng.integers(centres, size=n)
    xyz = cent[comp] + rng.normal(size=(n, 3)) * 0.3
    scale = rng.normal(-4, 1.0, size=(n, 1)) + rng.normal(0, 0.3, size=(n, 3))
    quat = rng.normal(size=(n, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    quat *= np.sign(quat[:, :1])
    opacity = 1 / (1 + np.exp(-rng.normal(1, 2, size=(n, 1))))
    colour = rng.uniform(0, 1, size=(centres, 3))[comp] + rng.normal(size=(n, 3)) * 0.1
    rest = rng.laplace(scale=0.05, size=(n, 45)) * np.linspace(1, 0.2, 45)
    return np.concatenate([xyz, scale, quat, opacity, colour, rest], 1).astype(np.float64)


def digits() -> np.ndarray:
    """scikit-learn's 8x8 digits / 16: ``[1797, 64]`` float64."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64) / 16.0


DATA: dict[str, Callable[[], np.ndarray]] = {
    "pixels": china_pixels,
    "patches": china_patches,
    "flower_pixels": lambda: image_pixels("flower.jpg"),
    "flower_patches": lambda: image_patches("flower.jpg"),
    "hopper_pixels": lambda: image_pixels("grace_hopper.jpg"),
    "hopper_patches": lambda: image_patches("grace_hopper.jpg"),
    "splats": splats,
    "digits": digits,
}
MAIN_CASES = [("pixels", 256), ("pixels", 1024), ("pixels", 4096), ("patches", 256), ("patches", 1024), ("patches", 4096)]
SEED_CASES = {("pixels", 256), ("pixels", 1024), ("pixels", 4096), ("patches", 1024)}
HELD_OUT_CASES = [
    (name, k)
    for name in ("flower_pixels", "flower_patches", "hopper_pixels", "hopper_patches", "splats", "digits")
    for k in (256, 1024, 4096)
    if not (name == "digits" and k > 1024)
]


# --------------------------------------------------------------------------- one case


def encode(data: torch.Tensor, q: torch.Tensor, cb: torch.Tensor, method: dict):
    """Statistics, hierarchy, tables and per-layer codes: ``(hierarchy, tables, layers)``."""
    from svq_modules.compat.encode import layers_from_tables
    from svq_modules.hierarchy import code_statistics
    from svq_modules.nested import build_scalable

    counts, sums = code_statistics(data, q, cb.shape[0])
    hierarchy, tables = build_scalable(cb, counts, sums, BITS, **method)
    return hierarchy, tables, layers_from_tables(hierarchy, tables, q)


def layer_mse(hierarchy, tables, q: torch.Tensor, x: np.ndarray) -> list[float]:
    """MSE (mean over all elements, float64) after each listed layer."""
    xt = torch.from_numpy(x)
    return [
        float(((hierarchy.center[tables.leaf_node[layer, q]].double() - xt) ** 2).mean())
        for layer in range(tables.num_layers - 1)
    ]


def run_case(dataset: str, num_codes: int, use_seed: bool, repeat: int = 5) -> dict:
    from svq_modules.layers import layer_rates, reconstruct

    x = DATA[dataset]()
    centers, labels = kmeans(x, num_codes, dataset)
    data, q, cb = torch.from_numpy(x).float(), torch.from_numpy(labels), torch.from_numpy(centers).float()
    res: dict = {"dataset": dataset, "K": num_codes, "K_used": int(np.unique(labels).size)}
    res["bound"] = [flat_kmeans_mse(x, b, dataset) for b in CUM_BITS]
    times: dict[str, list[float]] = {"nested": [], "greedy": []}
    for name in times:  # warm-up
        encode(data, q, cb, METHODS[name])
    for _ in range(repeat):  # interleaved: both see the same load
        for name in times:
            t0 = time.perf_counter()
            encode(data, q, cb, METHODS[name])
            times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    encode(data, q, cb, METHODS["refine"])
    times["refine"] = [time.perf_counter() - t0]
    for name, method in METHODS.items():
        hierarchy, tables, _ = encode(data, q, cb, method)
        res[f"t_{name}"] = min(times[name])
        res[f"mse_{name}"] = layer_mse(hierarchy, tables, q, x)
        if name == "nested":
            rates = layer_rates(hierarchy, tables, q)
            res["raw_bits"], res["entropy_bits"] = float(rates.raw_bits[-1]), float(rates.entropy_bits[-1])
            res["exact"] = bool(torch.equal(reconstruct(hierarchy, tables, q, tables.num_layers), cb[q]))
    res["H"] = entropy_bits(labels)
    if use_seed:
        import scalablevq

        c_s, l_s = drop_empty(centers, labels)
        cb_s, q_s = torch.from_numpy(c_s).float(), torch.from_numpy(l_s)
        seed_times = []
        for _ in range(SEED_REPEAT):  # best of a few, like ours: one run is at the mercy of the load
            t0 = time.perf_counter()
            with quiet_stderr():
                seed_layers = scalablevq.encode_layers(data, q_s, cb_s, BITS[0], BITS[1:])
            seed_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # ours once more right after, so both meet the same stretch of load
            encode(data, q, cb, METHODS["nested"])
            res["t_nested"] = min(res["t_nested"], time.perf_counter() - t0)
        res["t_seed"] = min(seed_times)
        res["mse_seed"] = seed_mse(scalablevq.decode_layer, seed_layers, x)
        res["raw_bits_seed"] = sum(int(layer.n_bit) * layer.codes.numel() for layer in seed_layers) / x.shape[0]
    return res


def seed_mse(decode_layer, layers, x: np.ndarray) -> list[float]:
    xt = torch.from_numpy(x)
    out, context = [], None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
        out.append(float(((decoded.double() - xt) ** 2).mean()))
    return out


# --------------------------------------------------------------------------- tables


def _ratios(r: dict, name: str) -> list[float]:
    mse = r[f"mse_{name}"][:4]
    return [m / b for m, b in zip(mse, r["bound"])] + [math.nan] * (4 - len(mse))


def _checked(r: dict) -> list[int]:
    """Layers (0..3) whose bound has fewer cells than the codebook."""
    return [i for i, b in enumerate(CUM_BITS) if 2**b < r["K"]]


def build_time_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        speedup = r["t_seed"] / r["t_nested"] if "t_seed" in r else math.nan
        target = r["dataset"] == "pixels" and r["K"] == 4096 and "t_seed" in r
        rows.append([r["dataset"], r["K"], r["K_used"], r.get("t_seed", math.nan), r["t_nested"], r["t_greedy"],
                     r["t_refine"], speedup, f">= {BUILD_SPEEDUP_K4096:.0f}" if target else "-",
                     verdict(speedup >= BUILD_SPEEDUP_K4096) if target else "", r["t_nested"] / r["t_greedy"]])
    header = ["data", "K", "K used", "seed", "nested (default)", "greedy", "refine", "seed / nested", "target", "",
              "nested / greedy"]
    return markdown_table(header, rows)


def mse_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        checked = _checked(r)
        where = ", ".join(str(CUM_BITS[i]) for i in checked) or "-"
        nested, greedy = _ratios(r, "nested"), _ratios(r, "greedy")
        rows.append([r["dataset"], r["K"], "flat k-means MSE", *r["bound"], "", ""])
        ok = all(nested[i] <= MAX_RATIO for i in checked)
        rows.append([r["dataset"], r["K"], "**nested (default)** / bound", *nested,
                     f"<= {MAX_RATIO} at {where} bits", verdict(ok if checked else None)])
        rows.append([r["dataset"], r["K"], "greedy / bound", *greedy, "", ""])
        not_worse = all(nested[i] <= greedy[i] * (1 + 1e-12) for i in checked)
        rows.append([r["dataset"], r["K"], "nested / greedy", *[n / g for n, g in zip(nested, greedy)],
                     f"<= 1 at {where} bits", verdict(not_worse if checked else None)])
        rows.append([r["dataset"], r["K"], "refine / bound", *_ratios(r, "refine"), "", ""])
        if "mse_seed" in r:
            rows.append([r["dataset"], r["K"], "seed / bound", *_ratios(r, "seed"), "", ""])
            gain = [s / o for s, o in zip(r["mse_seed"][:4], r["mse_nested"][:4])]
            gain += [math.nan] * (4 - len(gain))
            kind = "patches" if "patches" in r["dataset"] else "pixels"
            target = (r["dataset"], r["K"]) in SEED_TARGET_CASES
            need = SEED_OVER_OURS[kind]
            rows.append([r["dataset"], r["K"], "seed / nested", *gain, f">= {need}" if target else "-",
                         verdict(all(g >= need for g in gain)) if target else ""])
    header = ["data", "K", "row", "4 bits", "6 bits", "8 bits", "10 bits", "target", ""]
    return markdown_table(header, rows)


def rate_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        raw_target = math.ceil(math.log2(r["K"])) + 2
        ent_target = r["H"] + 0.05
        rows.append([
            r["dataset"], r["K"], r["raw_bits"], raw_target, verdict(r["raw_bits"] <= raw_target),
            r["entropy_bits"], ent_target, verdict(r["entropy_bits"] <= ent_target),
            r.get("raw_bits_seed", math.nan), "yes" if r["exact"] else "NO",
        ])
    header = ["data", "K", "nested raw", "ceil(log2 K)+2", "", "nested entropy", "H(indices)+0.05", "", "seed raw",
              "exact codewords"]
    return markdown_table(header, rows)


# --------------------------------------------------------------------------- large case


def large_child(num_codes: int, dim: int, num_vectors: int, cut: str) -> None:
    """Child process: synthetic Gaussian-mixture codebook, time and peak RSS of the build."""
    gen = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(256, dim, generator=gen)
    component = torch.randint(256, (num_codes,), generator=gen)
    codebook = means[component] + 0.5 * torch.randn(num_codes, dim, generator=gen)
    indices = torch.randint(num_codes, (num_vectors,), generator=gen)
    data = codebook[indices] + 0.1 * torch.randn(num_vectors, dim, generator=gen)
    del means, component
    gc.collect()
    was_reset = reset_peak_rss()
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    _, tables, layers = encode(data, indices, codebook, METHODS[cut])
    elapsed = time.perf_counter() - t0
    print(json.dumps({
        "K": num_codes, "D": dim, "N": num_vectors, "cut": cut, "time_s": elapsed, "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss_before, "peak_reset": was_reset, "layers": len(layers),
        "threads": torch.get_num_threads(),
    }))


def large_table() -> str:
    k, d, n = 65536, 64, 4 * 65536
    rows, note = [], ""
    for cut in ("nested", "greedy"):  # the default, then the greedy cut for reference
        timeout = 20 * LARGE_TIME_S
        try:
            out = run_child([str(Path(__file__).resolve()), "--child-large", str(k), str(d), str(n), cut],
                            timeout=timeout)
        except subprocess.TimeoutExpired:
            out = {"time_s": math.inf, "peak_rss_mib": math.nan, "rss_before_mib": math.nan, "peak_reset": True,
                   "threads": torch.get_num_threads()}
        target = cut == "nested"
        rows.append([k, d, n, "nested (default)" if target else "greedy", out["time_s"],
                     f"< {LARGE_TIME_S:.0f} s" if target else "-", verdict(out["time_s"] < LARGE_TIME_S) if target else "",
                     out["peak_rss_mib"], out["rss_before_mib"], f"< {LARGE_PEAK_MIB:.0f} MiB" if target else "-",
                     verdict(out["peak_rss_mib"] < LARGE_PEAK_MIB) if target else ""])
        how = "VmHWM after resetting it before the build" if out.get("peak_reset") else "VmHWM (whole child lifetime)"
        note = f"\npeak RSS = {how}, whole child process (python, torch, data included); {out['threads']} torch threads.\n"
    header = ["K", "D", "N", "method", "build s", "target", "", "peak RSS during build, MiB", "RSS before build, MiB",
              "target", ""]
    return markdown_table(header, rows) + "\n" + note


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="china pixels K=256/1024 only (no report written)")
    parser.add_argument("--no-seed", action="store_true", help="skip the scalablevq seed package")
    parser.add_argument("--no-large", action="store_true", help="skip the K=65536 synthetic case")
    parser.add_argument("--no-held-out", action="store_true", help="skip the held-out data sets")
    parser.add_argument("--child-large", nargs=4, metavar=("K", "D", "N", "CUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_large:
        k, d, n, cut = args.child_large
        large_child(int(k), int(d), int(n), cut)
        return
    use_seed = not args.no_seed
    if use_seed:
        try:
            import scalablevq  # noqa: F401
        except ImportError:
            print("scalablevq not installed: running without the seed (pip install scalablevq==1.7.1)")
            use_seed = False
    main_cases = MAIN_CASES[:2] if args.quick else MAIN_CASES
    held_out = [] if (args.quick or args.no_held_out) else HELD_OUT_CASES

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [f"Bits {BITS}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
             f"load average at the start {load}.\n"]
    print(lines[0], flush=True)
    results, held = [], []
    for cases, out in ((main_cases, results), (held_out, held)):
        for dataset, k in cases:
            t0 = time.perf_counter()
            out.append(run_case(dataset, k, use_seed and (dataset, k) in SEED_CASES))
            print(f"<!-- {dataset} K={k} done in {time.perf_counter() - t0:.1f} s -->", flush=True)

    lines += ["## Build time (s), china.jpg\n", build_time_table(results),
              f"\nStatistics, layers and per-layer codes; nested and greedy: best of 5 after a warm-up, "
              f"interleaved; seed: best of {SEED_REPEAT}, nested timed once more after each seed run; refine: one run."]
    lines += ["\n## MSE after each layer as a ratio to the flat k-means bound, china.jpg\n", mse_table(results)]
    lines += ["\n## Full depth of the default (nested): bits per vector\n", rate_table(results + held)]
    if held:
        lines += ["\n## Held-out data sets (not tuned on): MSE ratio to the flat k-means bound\n", mse_table(held)]
        lines += ["\n## Held-out data sets: build time (s)\n", build_time_table(held)]
    if not (args.quick or args.no_large):
        lines += ["\n## Large synthetic case (fresh child process each)\n", large_table()]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        path = write_report("core", "Core: nested layers vs greedy cut, refine, the seed and flat k-means", body)
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()

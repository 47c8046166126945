"""Shared helpers of the benchmarks: data sets, cached k-means codebooks, timing, tables.

Benchmarks print markdown tables; they are not tests and assert nothing.
Fitted codebooks are cached under ``bench/.cache/`` (git-ignored), keyed by
data set, shape and number of clusters.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------- data


def china_pixels() -> np.ndarray:
    """``china.jpg`` (scikit-learn sample image) / 255 as pixels: ``[273280, 3]`` float64."""
    from sklearn.datasets import load_sample_image

    return (load_sample_image("china.jpg") / 255.0).reshape(-1, 3)


def china_patches(size: int = 4) -> np.ndarray:
    """Non-overlapping ``size x size`` RGB patches of ``china.jpg`` / 255: ``[N, 3 size^2]`` float64.

    For ``size=4``: 106 x 160 = 16960 patches of dimension 48.
    """
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg") / 255.0
    h, w, c = img.shape
    h, w = h - h % size, w - w % size
    img = img[:h, :w]
    patches = img.reshape(h // size, size, w // size, size, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(patches.reshape(-1, size * size * c))


DATASETS: dict[str, Callable[[], np.ndarray]] = {"pixels": china_pixels, "patches": china_patches}


# --------------------------------------------------------------------------- k-means (cached)


def kmeans(x: np.ndarray, n_clusters: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``MiniBatchKMeans(n_clusters, init='random', random_state=0, n_init='auto')`` on ``x``, cached.

    Args:
        x: ``[N, D]`` float64 data.
        n_clusters: K.
        key: data set name, part of the cache file name.

    Returns:
        ``centers [K, D]`` float64 and ``labels [N]`` int64 (``fit_predict``).
        Some clusters may be empty.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"kmeans_{key}_{x.shape[0]}x{x.shape[1]}_K{n_clusters}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["centers"], f["labels"]
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=n_clusters, init="random", random_state=0, n_init="auto")
    labels = km.fit_predict(x).astype(np.int64)
    centers = km.cluster_centers_.astype(np.float64)
    np.savez(path, centers=centers, labels=labels)
    return centers, labels


def flat_kmeans_mse(x: np.ndarray, bits: int, key: str) -> float:
    """MSE (mean over all elements) of flat k-means with ``2**bits`` cells: the bound per layer."""
    centers, labels = kmeans(x, 2**bits, key)
    return float(((x - centers[labels]) ** 2).mean())


def drop_empty(centers: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove clusters no vector uses and renumber: ``(centers [K', D], labels [N])``."""
    used = np.unique(labels)
    remap = np.full(centers.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return centers[used], remap[labels]


def entropy_bits(labels: np.ndarray) -> float:
    """Empirical entropy of the indices, bits per vector."""
    p = np.bincount(labels).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """Run ``fn`` ``repeat`` times; returns (last result, best wall time in seconds)."""
    best = math.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


@contextlib.contextmanager
def quiet_stderr():
    """Swallow stderr (e.g. the seed's tqdm bars)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    """Resident set size now, MiB (``VmRSS``; falls back to the peak where /proc is missing)."""
    value = _proc_status_mib("VmRSS")
    return value if value is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB.

    ``VmHWM`` from ``/proc/self/status`` where available: the high-water mark of
    this process's own address space. ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    is the fallback, but in a child started by ``subprocess`` it also counts the
    *parent's* peak (Linux carries the maximum over ``fork``/``exec``), so it
    over-reports there.
    """
    value = _proc_status_mib("VmHWM")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process and parse the JSON on its last stdout line.

    Raises ``subprocess.TimeoutExpired`` (child killed) past ``timeout`` seconds.
    """
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- printing


def verdict(ok: bool | None) -> str:
    """PASS / MISS / n/a."""
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


REPORT_DIR = REPO_ROOT / "docs" / "benchmarks"


def write_report(name: str, title: str, body: str, readme: str | None = None) -> Path:
    """Write a benchmark's tables to ``docs/benchmarks/<name>.md`` and into the README.

    ``body`` is the markdown the script printed; the page records the command,
    the date, the machine and the library versions, so figures are never typed
    by hand. ``readme`` (default: ``body``) replaces the README's block between
    ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` when the README has
    those markers.
    """
    import datetime
    import os
    import platform
    import re
    import sys

    import torch

    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{name}.md"
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
    stamp = (
        f"Written by `{cmd}` on {datetime.date.today().isoformat()}: "
        f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}."
    )
    path.write_text(f"# {title}\n\n{stamp} Do not edit by hand: rerun the script.\n\n{body.rstrip()}\n")
    readme_path = REPO_ROOT / "README.md"
    text = readme_path.read_text()
    block = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
    if block.search(text):
        inner = f"{(body if readme is None else readme).rstrip()}\n\n_{stamp} Full report: `docs/benchmarks/{name}.md`._\n"
        readme_path.write_text(block.sub(lambda m: m.group(1) + inner + m.group(2), text))
    return path

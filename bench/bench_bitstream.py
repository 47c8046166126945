"""Benchmark of the per-layer bitstream (issue 6) on china.jpg pixels and 4x4 patches.

For each data set (K=1024 from MiniBatchKMeans(init='random', random_state=0,
n_init='auto'), bits [4, 2, 2, 2, 2], hierarchy from the exact per-code
statistics of the data):

* bytes per layer: the payload of ``coding="entropy"`` (a layer whose entropy
  payload would be larger than raw is written raw: column "coding") vs the ideal conditional entropy
  ``sum(log2 P(p) - log2 P(node))`` under the float model of
  :func:`svq_modules.layers.node_log2_prob` (target: payload overhead <= 1%,
  PASS allows one ANS state flush of <= 8 bytes on top), raw payload, chunk
  header + CRC, and the seed's raw representation (scalablevq 1.7.1
  ``encode_layers``: codes at ``n_bit`` bits each + codebook node ids at
  ``ceil(log2(2K-1))`` bits each) from the same run;
* self-contained size: ours with float32 centers vs the seed's codes + ids + float32 centers;
* encode / decode throughput in symbols per second (symbols = vectors that
  send something in a layer, summed over layers), best of ``--repeat`` warm
  runs (model tables cached) and the cold first call; target >= 5 M/s.

Run: ``python bench/bench_bitstream.py`` (k-means results are cached in
``bench/.cache``; the seed takes a few seconds per data set; ``--no-seed`` skips it).
The printed tables are also written to ``docs/benchmarks/bitstream.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the seed's progress bars

import numpy as np
import torch
from common import write_report

from svq_modules.coding import compress_layers, decompress_layers, read_header
from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import build_layers, decode_codes, encode_indices, node_log2_prob

CACHE = Path(__file__).resolve().parent / ".cache"
BITS = [4, 2, 2, 2, 2]
K = 1024


def datasets() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg").astype(np.float64) / 255.0
    h, w, _ = img.shape
    pixels = img.reshape(-1, 3)
    patches = img[: h // 4 * 4, : w // 4 * 4].reshape(h // 4, 4, w // 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 48)
    return {"pixels": pixels, "patches 4x4": patches}


def kmeans(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"kmeans_{name.replace(' ', '_')}_{K}.npz"
    if path.exists():
        d = np.load(path)
        return d["codebook"], d["indices"]
    km = MiniBatchKMeans(n_clusters=K, init="random", random_state=0, n_init="auto").fit(x)
    idx = km.predict(x)
    np.savez(path, codebook=km.cluster_centers_, indices=idx)
    return km.cluster_centers_, idx


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def seed_layers(x: np.ndarray, codebook: np.ndarray, idx: np.ndarray):
    """The seed's layers and its per-layer reconstructions, or None if scalablevq is missing."""
    try:
        import scalablevq
    except ImportError:
        return None
    # the seed refuses empty clusters: give it the used codewords only
    used, q = np.unique(idx, return_inverse=True)
    xt, q, c = torch.from_numpy(x).float(), torch.from_numpy(q.reshape(-1)).long(), torch.from_numpy(codebook[used]).float()
    t = time.perf_counter()
    layers = scalablevq.encode_layers(xt, q, c, BITS[0], BITS[1:])
    build = time.perf_counter() - t
    recs, ctx = [], None
    for layer in layers:
        rec, ctx = scalablevq.decode_layer(layer, ctx)
        recs.append(rec.double())
    return layers, recs, build, used.size


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M/s"


def run(name: str, x: np.ndarray, repeat: int, with_seed: bool) -> list[str]:
    codebook, idx_np = kmeans(name, x)
    xt = torch.from_numpy(x)
    idx = torch.from_numpy(idx_np).long()
    counts, sums = code_statistics(xt, idx, K)
    h = build_hierarchy(torch.from_numpy(codebook), counts, sums)
    t = build_layers(h, BITS)
    L = t.num_layers
    n = x.shape[0]
    codes = encode_indices(t, idx)
    active = (codes >= 0).sum(1)
    num_symbols = int(active.sum())
    ref_nodes = decode_codes(t, codes)

    logp = node_log2_prob(h)
    prev = torch.cat([torch.full_like(t.leaf_node[:1], h.root), t.leaf_node[:-1]])[:, idx]
    ideal_bits = (logp[prev] - logp[t.leaf_node[:, idx]]).sum(1)

    t0 = time.perf_counter()
    ent = compress_layers(h, t, idx)  # cold: builds and caches the model's codec tables
    cold_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = decompress_layers(h, t, ent)
    cold_dec = time.perf_counter() - t0
    assert torch.equal(dec.nodes, ref_nodes)
    raw = compress_layers(h, t, idx, coding="raw")
    assert torch.equal(decompress_layers(h, t, raw).nodes, ref_nodes)
    selfc = compress_layers(h, t, idx, embed_centers="float32")
    assert torch.equal(decompress_layers(None, None, selfc).nodes, ref_nodes)

    enc_t = best_time(lambda: compress_layers(h, t, idx), repeat)
    dec_t = best_time(lambda: decompress_layers(h, t, ent), repeat)
    raw_enc_t = best_time(lambda: compress_layers(h, t, idx, coding="raw"), repeat)
    raw_dec_t = best_time(lambda: decompress_layers(h, t, raw), repeat)

    seed = seed_layers(x, codebook, idx_np) if with_seed else None
    id_bits = math.ceil(math.log2(2 * K - 1))

    out = [f"### {name}: N={n}, D={x.shape[1]}, K={K}, bits {BITS} (+ final layer), {num_symbols} symbols in {L} layers", ""]
    header = ("| layer | symbols | ideal B | coding | payload B | overhead | header+CRC B | raw payload B "
              "| seed codes+ids B | MSE ours | MSE seed | <=1% (+8 B) |")
    out += [header, "|" + "|".join(["---"] * 12) + "|"]
    cum = {"ideal": 0.0, "ent": 0, "chunk": 0, "raw": 0, "seed": 0}
    all_ok = True
    for layer in range(L):
        he, hr = read_header(ent[layer]), read_header(raw[layer])
        ideal_b = float(ideal_bits[layer]) / 8
        pay = he.payload_len
        over = (8 * pay - float(ideal_bits[layer])) / max(float(ideal_bits[layer]), 1e-9)
        ok = 8 * pay <= float(ideal_bits[layer]) * 1.01 + 64
        all_ok &= ok
        mse_ours = float(((dec.reconstruction(layer + 1) - xt) ** 2).mean())
        seed_b, mse_seed = "-", "-"
        if seed is not None and layer < len(seed[0]):
            sl = seed[0][layer]
            sb = math.ceil(sl.codes.numel() * sl.n_bit / 8) + math.ceil(sl.codebook.numel() * id_bits / 8)
            cum["seed"] += sb
            seed_b = str(sb)
            mse_seed = f"{float(((seed[1][layer] - xt) ** 2).mean()):.3e}"
        cum["ideal"] += ideal_b
        cum["ent"] += pay
        cum["chunk"] += len(ent[layer])
        cum["raw"] += hr.payload_len
        out.append(
            f"| {layer} | {int(active[layer])} | {ideal_b:.0f} | {he.coding} | {pay} | {100 * over:+.2f}% | "
            f"{len(ent[layer]) - pay} | "
            f"{hr.payload_len} | {seed_b} | {mse_ours:.3e} | {mse_seed} | {'PASS' if ok else 'MISS'} |"
        )
    seed_total = str(cum["seed"]) if seed is not None else "-"
    out.append(
        f"| all | {num_symbols} | {cum['ideal']:.0f} | | {cum['ent']} | {100 * (cum['ent'] / cum['ideal'] - 1):+.2f}% | "
        f"{cum['chunk'] - cum['ent']} | {cum['raw']} | {seed_total} | | | {'PASS' if all_ok else 'MISS'} |"
    )
    out.append("")
    bpv = lambda b: f"{8 * b / n:.3f}"  # noqa: E731
    out.append(
        f"Full depth, bits per vector: ideal {bpv(cum['ideal'])}, entropy-coded chunks {bpv(cum['chunk'])}, "
        f"raw payload {bpv(cum['raw'])}" + (f", seed codes+ids {bpv(cum['seed'])}" if seed is not None else "") + "."
    )
    sc_total = sum(map(len, selfc))
    line = f"Self-contained (float32 centers embedded): ours {sc_total} B"
    if seed is not None:
        seed_sc = cum["seed"] + sum(4 * sl.cluster_centers.numel() for sl in seed[0])
        line += (
            f", seed codes + ids + float32 centers {seed_sc} B (seed: {seed[3]} used codewords, "
            f"its layers built in {seed[2]:.1f} s)"
        )
    out += [line + ".", ""]

    rows = [
        ("entropy encode", num_symbols / enc_t, num_symbols / cold_enc),
        ("entropy decode", num_symbols / dec_t, num_symbols / cold_dec),
        ("raw encode", num_symbols / raw_enc_t, None),
        ("raw decode", num_symbols / raw_dec_t, None),
    ]
    out += [f"| throughput | warm (best of {repeat}) | cold (first call) | >= 5 M/s |", "|---|---|---|---|"]
    for label, warm, cold in rows:
        out.append(f"| {label} | {fmt_rate(warm)} | {fmt_rate(cold) if cold else '-'} | {'PASS' if warm >= 5e6 else 'MISS'} |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-seed", action="store_true", help="skip the scalablevq seed comparison")
    p.add_argument("--only", choices=["pixels", "patches"], help="one data set")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from importlib.metadata import version

    lines = [f"torch {torch.__version__}, numpy {np.__version__}, constriction {version('constriction')}, "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", ""]  # fmt: skip
    print("\n".join(lines))
    for name, x in datasets().items():
        if args.only and not name.startswith(args.only):
            continue
        part = run(name, x, args.repeat, not args.no_seed)
        print("\n".join(part))
        sys.stdout.flush()
        lines += part
    path = write_report("bitstream", "Per-layer bitstream: sizes and throughput", "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

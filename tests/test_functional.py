"""Seed-compatible functional API: round trips, call conventions, transcoding, plots, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svq_modules.compat.functional import (
    ClusterTree,
    Layer,
    build_layers,
    decode_layer,
    decode_layers,
    encode_known_layers,
    encode_layers,
    encode_scalable,
    layer_codebook,
    transcode,
    visualize_layers,
)
from svq_modules.layers import encode_indices
from svq_modules.plotting import plot_point_panels, plot_rate_distortion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_data(n: int = 2000, dim: int = 3, k: int = 64, seed: int = 0, dtype=torch.float64, empty: int = 0):
    """Gaussian blobs, a codebook of k data rows (+ ``empty`` unused far-away codes), nearest indices."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, dim, generator=gen, dtype=dtype) * 3
    x = centers[torch.randint(8, (n,), generator=gen)] + torch.randn(n, dim, generator=gen, dtype=dtype)
    codebook = x[torch.randperm(n, generator=gen)[:k]].clone()
    if empty:
        far = 100.0 + torch.randn(empty, dim, generator=gen, dtype=dtype)
        # interleave unused codes between used ones
        codebook = torch.cat([far[: empty // 2], codebook, far[empty // 2 :]])
    q = torch.cdist(x, codebook).argmin(1)
    return x, q, codebook


def decode_all(layers):
    """Decoded vectors and contexts after every layer."""
    out, context = [], None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
        out.append((decoded, context))
    return out


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("cut", ["greedy", "depth"])
def test_round_trip_exact_codewords_and_node_means(cut):
    x, q, cb = make_data()
    enc = encode_scalable(x, q, cb, [4, 2, 2, 2, 2], cut=cut)
    layers = enc.layers
    assert len(layers) == 6  # listed layers + the final one
    steps = decode_all(layers)
    assert torch.equal(steps[-1][0], cb[q])
    assert torch.equal(decode_layers(layers), cb[q])
    prev_mse = math.inf
    for decoded, context in steps:
        assert decoded.shape == x.shape and decoded.dtype == cb.dtype
        # decoded vector == center of its node
        assert torch.equal(decoded, enc.hierarchy.center[context.node_id])
        # internal node centers are the mean of the vectors in the node
        internal = context.node_id >= cb.shape[0]
        if internal.any():
            ids, inv = torch.unique(context.node_id[internal], return_inverse=True)
            sums = torch.zeros(ids.numel(), x.shape[1], dtype=x.dtype).index_add_(0, inv, x[internal])
            means = sums / torch.bincount(inv)[:, None]
            torch.testing.assert_close(decoded[internal], means[inv])
        # leaves: codeword index known, decoded is that codeword
        reached = context.index >= 0
        assert torch.equal(context.index[reached], q[reached])
        mse = float(((decoded - x) ** 2).mean())
        assert mse <= prev_mse + 1e-12
        prev_mse = mse


def test_layer_fields_and_symbol_widths():
    x, q, cb = make_data()
    layers = encode_layers(x, q, cb, [4, 2, 2, 2, 2])
    assert layers[0].codes.shape == (x.shape[0],)
    assert layers[0].group_size.tolist() == [layers[0].cluster_centers.shape[0]]
    for layer in layers:
        assert isinstance(layer, Layer)
        assert layer.codes.dtype == torch.int64 and layer.codes.dim() == 1
        assert layer.cluster_centers.shape == (layer.node_ids.numel(), x.shape[1])
        if layer.codes.numel():
            assert int(layer.codes.min()) >= 0 and int(layer.codes.max()) < 2**layer.n_bit
        if layer.group_size.numel():
            assert int(layer.group_size.max()) <= 2**layer.n_bit
        assert layer.n_leaf == int((layer.node_ids < cb.shape[0]).sum())
        assert layer.num_vectors == x.shape[0]
    # only the vectors whose leaf was not reached send symbols
    steps = decode_all(layers)
    counts = [x.shape[0]] + [int(ctx.active.sum()) for _, ctx in steps[:-1]]
    assert [layer.codes.numel() for layer in layers] == counts
    assert int(steps[-1][1].active.sum()) == 0


def test_codes_are_the_core_symbols():
    x, q, cb = make_data()
    enc = encode_scalable(x, q, cb, [4, 2, 2])
    symbols = encode_indices(enc.tables, q)
    for layer, row in zip(enc.layers, symbols):
        assert torch.equal(layer.codes, row[row >= 0])


# --------------------------------------------------------------------------- call conventions


def test_call_conventions_agree():
    x, q, cb = make_data()
    ref = encode_layers(x, q, cb, [4, 2, 2, 2, 2])  # README
    variants = [
        encode_layers(x, q, cb, 4, [2, 2, 2, 2]),  # package, positional
        encode_layers(x, q, cb, n_bit_baselayer=4, n_bits_proposal=[2, 2, 2, 2]),  # keywords
        encode_layers(x, q, cb, (4, 2, 2, 2, 2)),
        encode_layers(x, q, cb, torch.tensor([4, 2, 2, 2, 2])),
        encode_layers(x, q, cb),  # defaults: 4 + [2, 2, 2, 2]
    ]
    for layers in variants:
        assert len(layers) == len(ref)
        for a, b in zip(ref, layers):
            assert torch.equal(a.codes, b.codes)
            assert torch.equal(a.cluster_centers, b.cluster_centers)
            assert a.n_bit == b.n_bit


def test_int_proposal_repeats_until_leaves():
    x, q, cb = make_data()
    layers = encode_layers(x, q, cb, 4, 2)
    assert [layer.n_bit for layer in layers][:2] == [4, 2]
    assert all(layer.n_bit == 2 for layer in layers[1:])
    assert layers[-1].codes.numel() > 0  # no trailing empty layer
    assert torch.equal(decode_layers(layers), cb[q])


def test_seed_style_callable_returns_all_widths():
    x, q, cb = make_data()
    seen = {}

    def proposal(n_bit_baselayer, node_codes, values):
        seen.update(b0=n_bit_baselayer, codes=node_codes, values=values)
        return [n_bit_baselayer, 3]

    layers = encode_layers(x, q, cb, 3, proposal)
    assert [layer.n_bit for layer in layers[:2]] == [3, 3]
    assert len(layers) == 3
    assert torch.equal(decode_layers(layers), cb[q])
    assert seen["b0"] == 3 and torch.equal(seen["values"], q)
    codes = seen["codes"]
    k = cb.shape[0]
    assert codes.dtype == torch.int64 and codes.shape[0] >= k
    assert codes[:k].unique().numel() == k  # prefix codes of distinct leaves differ
    depth = torch.floor(torch.log2(codes.double())).long()  # bit length - 1
    assert int(depth.min()) >= 3  # every code starts with the marker bit above the base symbol


def test_core_style_proposals():
    x, q, cb = make_data()
    layers = encode_layers(x, q, cb, None, "balanced_clusters", num_layers=4)
    assert len(layers) == 4
    assert torch.equal(decode_layers(layers), cb[q])
    layers = encode_layers(x, q, cb, n_bits_proposal=lambda h, n: [3] * n, num_layers=3)
    assert [layer.n_bit for layer in layers[:2]] == [3, 3]


# --------------------------------------------------------------------------- codebooks


def test_empty_clusters_accepted():
    x, q, cb = make_data(empty=6)
    assert torch.bincount(q, minlength=cb.shape[0]).eq(0).sum() >= 6
    layers = encode_layers(x, q, cb, [4, 2, 2, 2, 2])
    assert torch.equal(decode_layers(layers), cb[q])
    # the empty codes are leaves of the layers too: their own vectors would decode exactly
    assert torch.equal(layer_codebook(layers), cb)
    unused = torch.nonzero(torch.bincount(q, minlength=cb.shape[0]) == 0).squeeze(1)
    relayered = encode_known_layers(unused, None, layers)
    assert torch.equal(decode_layers(relayered), cb[unused])


def test_one_code_and_small_codebooks():
    x, _, cb = make_data(n=50)
    layers = encode_layers(x, torch.zeros(50, dtype=torch.long), cb[:1], [4, 2])
    assert layers[0].codes.shape == (50,) and layers[0].n_bit == 0
    assert torch.equal(decode_layers(layers), cb[:1].expand(50, -1))
    q3 = torch.cdist(x, cb[:3]).argmin(1)
    layers = encode_layers(x, q3, cb[:3], [4, 2])
    assert len(layers) == 3
    assert torch.equal(decode_layers(layers), cb[q3])


def test_float32_data_with_float64_codebook():
    x, q, cb = make_data()
    layers = encode_layers(x.float(), q.int(), cb, [4, 2, 2])
    assert torch.equal(decode_layers(layers), cb[q])


def test_without_data():
    x, q, cb = make_data()
    layers = encode_layers(None, q, cb, [4, 2, 2])
    assert torch.equal(decode_layers(layers), cb[q])


# --------------------------------------------------------------------------- transcoding


def test_known_layers_reproduce_codes():
    x, q, cb = make_data()
    layers = encode_layers(x, q, cb, [4, 2, 2, 2, 2])
    again = encode_known_layers(q, cb, layers)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(layers, again))
    # a reordered codebook is matched to the layers' leaves
    perm = torch.randperm(cb.shape[0], generator=torch.Generator().manual_seed(1))
    inverse = torch.argsort(perm)
    shuffled = encode_known_layers(inverse[q], cb[perm], layers)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(layers, shuffled))


def test_transcoding_new_data_equals_direct_encoding():
    x, q, cb = make_data()
    enc = encode_scalable(x, q, cb, [4, 2, 2, 2, 2])
    y, _, _ = make_data(n=700, seed=5)
    nearest = torch.cdist(y, cb).argmin(1)
    new_layers = transcode(y, enc.layers)
    direct = encode_indices(enc.tables, nearest)
    assert len(new_layers) == len(enc.layers)
    for layer, row in zip(new_layers, direct):
        assert layer.num_vectors == 700
        assert torch.equal(layer.codes, row[row >= 0])
    assert torch.equal(decode_layers(new_layers), cb[nearest])
    # the same through the seed-style entry point
    via_known = encode_known_layers(nearest, cb, enc.layers)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(new_layers, via_known))
    # progressive decode of new data: every layer gives the center of the node
    for (decoded, context) in decode_all(new_layers):
        assert torch.equal(decoded, enc.hierarchy.center[context.node_id])


# --------------------------------------------------------------------------- seed-style tree + plots


def test_build_layers_tree_matches_base_layer():
    x, q, cb = make_data()
    k = cb.shape[0]
    tree = build_layers(cb, x, q, final_clusters=16)
    assert isinstance(tree, ClusterTree)
    centers, merges = tree  # unpacks like the seed's pair
    assert len(merges) == k - 16
    assert centers.shape == (k + len(merges), x.shape[1])
    assert torch.equal(centers[:k], cb)
    pairs = torch.tensor(merges)
    assert bool((pairs < torch.arange(k, k + len(merges))[:, None]).all())
    merged = pairs.reshape(-1)
    assert merged.unique().numel() == merged.numel()  # each node merged at most once
    # each merged center is the mean of the data below it
    leaves = [[i] for i in range(k)]
    for a, b in merges:
        leaves.append(leaves[a] + leaves[b])
    node = k + len(merges) - 1
    inside = torch.isin(q, torch.tensor(leaves[node]))
    torch.testing.assert_close(centers[node], x[inside].mean(0))
    # roots == the base layer of encode_layers with 2**4 nodes
    is_root = torch.ones(k + len(merges), dtype=torch.bool)
    is_root[merged] = False
    roots = centers[is_root]
    base = encode_layers(x, q, cb, [4, 2], cut="greedy")[0].cluster_centers
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(key(roots), key(base))


def test_visualize_layers_writes_png(tmp_path):
    x, q, cb = make_data(n=600, k=40)
    layers = encode_layers(x, q, cb, [3, 2, 2])
    for name, kwargs in [("data.png", {"data": x}), ("codebook.png", {})]:
        path = tmp_path / name
        fig = visualize_layers(layers, path=path, dpi=40, **kwargs)
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert len(fig.axes) == sum(1 for layer in layers if layer.cluster_centers.shape[0])
    centers, tree = build_layers(cb, x, q, 8)
    path = tmp_path / "tree.png"
    visualize_layers(cb, centers, tree, data=None, path=path, dpi=40)
    assert path.read_bytes()[:8] == PNG_MAGIC
    path = tmp_path / "tree_data.png"
    visualize_layers(cb, centers, tree, x, q, path=path, dpi=40)
    assert path.read_bytes()[:8] == PNG_MAGIC
    # D > 3: 2-D PCA panels
    x5, q5, cb5 = make_data(n=400, dim=5, k=30)
    path = tmp_path / "pca.png"
    fig = visualize_layers(encode_layers(x5, q5, cb5, [2, 2]), data=x5, path=path, dpi=40)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert all(not hasattr(ax, "get_zlim") for ax in fig.axes)
    # encode_layers(visualize=path) draws too
    path = tmp_path / "encode.png"
    encode_layers(x, q, cb, [3, 2], visualize=path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_rate_distortion(tmp_path):
    path = tmp_path / "rd.png"
    fig = plot_rate_distortion(
        {"ours": [(4, 2e-3), (6, 7e-4), (8, 3e-4)], "seed": torch.tensor([[4, 3e-3], [6, 1e-3]])}, path
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "MSE" and ax.get_xlabel() == "bits per vector"
    assert [line.get_label() for line in ax.get_lines()] == ["ours", "seed"]
    fig = plot_rate_distortion([[(4, 30.0), (6, 33.0)]], metric="psnr")
    assert fig.axes[0].get_yscale() == "linear" and fig.axes[0].get_ylabel() == "PSNR (dB)"
    with pytest.raises(ValueError, match="empty"):
        plot_rate_distortion({})
    with pytest.raises(ValueError, match="pairs"):
        plot_rate_distortion({"bad": [1, 2, 3]})
    with pytest.raises(ValueError, match="NaN"):
        plot_rate_distortion({"bad": [(1, float("nan"))]})


def test_plot_rate_distortion_layers_and_peers(tmp_path):
    """What an RD callback / benchmark draws: our per-layer points annotated, peers, bpp, PSNR, styles."""
    ours = np.array([[0.9, 31.0], [0.3, 24.0], [0.6, 28.0]])  # given out of rate order
    path = tmp_path / "sub" / "rd_bpp.png"  # missing folders are created
    fig = plot_rate_distortion(
        {"ScalableVQ": ours, "k-means": [(0.3, 24.5), (0.9, 31.5)], "RVQ": torch.tensor([[0.5, 26.0], [1.0, 30.0]])},
        path,
        rate="bpp",
        metric="psnr",
        annotations={"ScalableVQ": True, "k-means": ["K=8", "K=512"]},
        styles={"RVQ": {"linestyle": "--", "color": "k"}},
        title="china.jpg",
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    assert ax.get_xlabel() == "bits per pixel" and ax.get_ylabel() == "PSNR (dB)" and ax.get_title() == "china.jpg"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["ScalableVQ", "k-means", "RVQ"]
    assert lines["ScalableVQ"].get_xdata().tolist() == [0.3, 0.6, 0.9]  # joined in rate order
    assert lines["RVQ"].get_linestyle() == "--"
    # layer numbers follow the order the points were given, each at its own point
    texts = {t.get_text(): t.xy for t in ax.texts}
    assert texts == {"L0": (0.9, 31.0), "L1": (0.3, 24.0), "L2": (0.6, 28.0), "K=8": (0.3, 24.5), "K=512": (0.9, 31.5)}
    with pytest.raises(ValueError, match=r"annotations\['ScalableVQ'\] has 2 texts"):
        plot_rate_distortion({"ScalableVQ": ours}, annotations={"ScalableVQ": ["a", "b"]})
    with pytest.raises(ValueError, match="annotations names series \\['peer'\\]"):
        plot_rate_distortion({"ScalableVQ": ours}, annotations={"peer": True})
    with pytest.raises(ValueError, match="logy=False"):
        plot_rate_distortion({"lossless": [(1, 0.1), (8, 0.0)]})  # MSE 0 on a log axis


def test_plotting_imports_nothing_of_the_package():
    """plotting.py draws plain arrays: no import of svq_modules (top level or inside functions)."""
    import ast
    import importlib.util

    source = open(importlib.util.find_spec("svq_modules.plotting").origin).read()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])
    assert imported <= {"__future__", "math", "os", "collections", "pathlib", "typing", "numpy", "torch", "matplotlib"}


def test_plot_point_panels_from_plain_arrays(tmp_path):
    points = np.random.default_rng(0).normal(size=(300, 2))
    keys = [np.zeros(300, dtype=int), (points[:, 0] > 0).astype(int)]
    path = tmp_path / "panels.png"
    fig = plot_point_panels(points, keys, [points[:1], points[:2]], ["one group", "two groups"], path=path, dpi=30)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [ax.get_title() for ax in fig.axes] == ["one group", "two groups"]
    colors = fig.axes[1].collections[0].get_facecolors()[:, :3]
    right = keys[1] == 1
    assert len({tuple(c) for c in colors[right]}) == 1 and len({tuple(c) for c in colors[~right]}) == 1
    assert not np.allclose(colors[right][0], colors[~right][0])
    with pytest.raises(ValueError, match=r"panel_keys\[1\] must be \[N\]"):
        plot_point_panels(points, [keys[0], keys[1][:10]])


def test_compat_package_and_top_level_names():
    import svq_modules
    import svq_modules.compat as compat
    from svq_modules import layers as core_layers

    assert compat.build_layers is build_layers and compat.encode_layers is encode_layers
    assert svq_modules.build_layers is core_layers.build_layers  # the core one, not the seed's tree
    assert svq_modules.build_layers is not build_layers


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, q, cb: (x.clone().fill_(float("nan")), q, cb, [4, 2]), "data contains NaN"),
        (
            lambda x, q, cb: (x, q, torch.cat([cb[:-1], torch.full_like(cb[:1], float("inf"))]), [4, 2]),
            "cluster_centers contains Inf",
        ),
        (lambda x, q, cb: (x, q + cb.shape[0], cb, [4, 2]), "quantized_data out of range"),
        (lambda x, q, cb: (x, q - 1, cb, [4, 2]), "out of range"),
        (lambda x, q, cb: (x[:10], q, cb, [4, 2]), "entries but there are 10 vectors"),
        (lambda x, q, cb: (x[:, :2], q, cb, [4, 2]), "dimension 2, expected 3"),
        (lambda x, q, cb: (x[:0], q[:0], cb, [4, 2]), "data is empty"),
        (lambda x, q, cb: (x, q.double(), cb, [4, 2]), "quantized_data must hold integer"),
        (lambda x, q, cb: (x, q, cb.long(), [4, 2]), "cluster_centers must hold floats"),
        (lambda x, q, cb: (x, q, cb, [4, 0, 2]), "> 0"),
        (lambda x, q, cb: (x, q, cb, [-4, 2]), "> 0"),
        (lambda x, q, cb: (x, q, cb, []), "empty"),
    ],
)
def test_bad_input_raises(mutate, match):
    x, q, cb = make_data()
    with pytest.raises(ValueError, match=match):
        encode_layers(*mutate(x, q, cb))


def test_bad_bit_arguments():
    x, q, cb = make_data()
    with pytest.raises(ValueError, match="not both"):
        encode_layers(x, q, cb, [4, 2, 2], [2, 2])
    with pytest.raises(ValueError, match="n_bit_baselayer"):
        encode_layers(x, q, cb, 0, [2])
    with pytest.raises(ValueError, match="n_bits_proposal"):
        encode_layers(x, q, cb, 4, 0)
    with pytest.raises(ValueError, match="n_bits_proposal"):
        encode_layers(x, q, cb, 4, [2, -1])
    with pytest.raises(ValueError, match="must hold ints"):
        encode_layers(x, q, cb, torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match="base layer's width too"):
        encode_layers(x, q, cb, 4, "balanced_values")
    with pytest.raises(ValueError, match="n_bits_proposal: bits='nope' is not a bit proposal"):
        encode_layers(x, q, cb, None, "nope")
    with pytest.raises(ValueError, match="n_bit_limit"):
        encode_layers(x, q, cb, [4, 2], n_bit_limit=3)
    with pytest.raises(ValueError, match="file path"):
        encode_layers(x, q, cb, [4, 2], visualize=True)


def test_decode_errors():
    x, q, cb = make_data()
    layers = encode_layers(x, q, cb, [4, 2, 2])
    with pytest.raises(ValueError, match="base layer"):
        decode_layer(layers[1], None)
    _, context = decode_layer(layers[0], None)
    with pytest.raises(ValueError, match="codes but"):
        decode_layer(layers[2], context)  # skipped a layer
    bad = Layer(**{**layers[1].__dict__, "codes": layers[1].codes.clone().fill_(7)})
    with pytest.raises(ValueError, match="invalid code 7"):
        decode_layer(bad, context)
    with pytest.raises(ValueError, match="layer must be a Layer"):
        decode_layer("layer0", None)
    with pytest.raises(ValueError, match="empty"):
        decode_layers([])
    with pytest.raises(ValueError, match="every codeword"):
        encode_known_layers(q, cb, layers[:1])
    with pytest.raises(ValueError, match="dimension"):
        transcode(x[:, :2], layers)

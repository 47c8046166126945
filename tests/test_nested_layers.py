"""The nested layers (the default ``cut="nested"``, :mod:`svq_modules.nested`): exact at full depth, nested,
cheap to send, and closer to a flat k-means than the greedy cut of the Ward tree (option ``cut="greedy"``)."""

import math

import mixtures
import pytest
import torch

from svq_modules import nested
from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import (
    CUTS,
    build_layers,
    decode_codes,
    encode_indices,
    layer_rates,
    reconstruct,
    symbol_bits,
)
from svq_modules.lloyd import cell_error, joint_lloyd, seed_within
from svq_modules.nested import build_nested, build_scalable, start_units
from svq_modules.refine import build_refined


def _stats(seed=0, n=3000, k=96, d=3, dtype=torch.float64):
    x, codebook, idx = mixtures.gaussian_codes(seed, n, k, d, dtype=dtype)
    counts, sums = code_statistics(x, idx, k)
    return x, codebook, idx, counts, sums


def _check_nested(h, tables, bits):
    """Every layer's cells are subtrees, unions of the next layer's cells, at most 2**b per parent cell."""
    k = tables.num_leaves
    for layer in range(tables.num_layers):
        node = tables.leaf_node[layer]
        # a cell is the whole subtree of its node: as many leaves map to it as lie below it
        assert torch.equal(torch.bincount(node, minlength=h.num_nodes)[node], h.size[node])
        if layer + 1 < tables.num_layers:
            pairs = torch.unique(torch.stack([tables.leaf_node[layer + 1], node]), dim=1)
            assert pairs.shape[1] == tables.leaf_node[layer + 1].unique().numel()  # one parent cell each
        if layer < len(bits):
            assert int(tables.group_size[layer].max()) <= 2 ** bits[layer]
    assert torch.equal(tables.leaf_node[-1], torch.arange(k))


@pytest.mark.parametrize("k,bits", [(96, [2, 1, 1]), (96, [4, 2, 2, 2, 2]), (40, [3, 3]), (200, [5, 2])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_depth_is_exact_and_layers_nest(k, bits, dtype):
    x, codebook, idx, counts, sums = _stats(k=k, dtype=dtype)
    h, tables = build_nested(codebook, counts, sums, bits)
    assert tables.num_layers == len(bits) + 1
    assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook[idx])
    assert torch.equal(decode_codes(tables, encode_indices(tables, idx))[-1], idx)
    _check_nested(h, tables, bits)
    # a cell of several codewords is reconstructed by the data mean of its vectors
    for layer in range(len(bits)):
        node = tables.leaf_node[layer, idx]
        for n in node[node >= k].unique()[:5]:
            assert torch.allclose(h.center[n], x[node == n].mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed,k", [(0, 96), (1, 256), (2, 64)])
def test_full_depth_costs_at_most_log2_k_plus_2_raw_bits_and_the_index_entropy(seed, k):
    x, codebook, idx, counts, sums = _stats(seed=seed, n=6000, k=k, d=4)
    h, tables = build_nested(codebook, counts, sums, [4, 2, 2, 2])
    rates = layer_rates(h, tables, idx)
    assert float(rates.raw_bits[-1]) <= math.ceil(math.log2(k)) + 2
    p = torch.bincount(idx, minlength=k).double() / idx.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    assert float(rates.entropy_bits[-1]) <= entropy + 0.05
    # raw bits per layer never exceed the layer's width
    widths = tables.widths[:-1]
    assert bool((symbol_bits(tables)[:-1] <= widths[:, None]).all())


def _kmeans(x, cells, restarts=1, iters=40, seed=123):
    """Independent reference: best of a few k-means++ + Lloyd runs on ``x``: ``(mse, centers)``."""
    g = torch.Generator().manual_seed(seed)
    best = (math.inf, None)
    for _ in range(restarts):
        centers = x[torch.randint(0, x.shape[0], (1,), generator=g)]
        for _ in range(cells - 1):
            d2 = torch.cdist(x, centers).min(1).values.pow(2)
            centers = torch.cat([centers, x[torch.multinomial(d2, 1, generator=g)]])
        for _ in range(iters):
            a = torch.cdist(x, centers).argmin(1)
            count = torch.bincount(a, minlength=cells).to(x.dtype)
            total = torch.zeros_like(centers).index_add_(0, a, x)
            centers = torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], centers)
        mse = float(((x - centers[torch.cdist(x, centers).argmin(1)]) ** 2).mean())
        best = min(best, (mse, centers), key=lambda r: r[0])
    return best


def test_layers_near_the_flat_bound_and_not_worse_than_the_greedy_cut():
    """A k-means codebook of a Gaussian mixture, bits [4, 2, 2] as in the issue: the base layer
    (16 cells of 16 codewords) within 1.05x of a flat k-means of the data with 16 cells, and
    no layer of fewer cells than codewords worse than the greedy cut of the Ward tree."""
    x, _, _ = mixtures.gaussian_codes(3, 6000, 8, 3, dtype=torch.float64)
    _, codebook = _kmeans(x, 256)
    idx = torch.cdist(x, codebook).argmin(1)
    counts, sums = code_statistics(x, idx, 256)
    bits = [4, 2, 2]
    h, tables = build_nested(codebook, counts, sums, bits)
    tree = build_hierarchy(codebook, counts, sums)
    greedy = build_layers(tree, bits)
    for layer in (0, 1):  # 16 and 64 cells
        ours = float(((x - reconstruct(h, tables, idx, layer + 1)) ** 2).mean())
        theirs = float(((x - reconstruct(tree, greedy, idx, layer + 1)) ** 2).mean())
        assert ours <= theirs, (layer, ours, theirs)
    base = float(((x - reconstruct(h, tables, idx, 1)) ** 2).mean())
    assert base <= 1.05 * _kmeans(x, 16, restarts=3, iters=60)[0]


def test_deterministic_and_float64_like_float32():
    _, codebook, _, counts, sums = _stats(seed=4, k=128)
    a = build_nested(codebook, counts, sums, [3, 2, 2])
    b = build_nested(codebook, counts, sums, [3, 2, 2])
    for name, t in a[1].as_dict().items():
        assert torch.equal(t, b[1].as_dict()[name]), name
    assert torch.equal(a[0].parent, b[0].parent)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_tiny_codebooks(k):
    x, codebook, idx, counts, sums = _stats(k=k, n=200)
    h, tables = build_nested(codebook, counts, sums, [4, 2])
    assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook[idx])
    assert h.num_leaves == k


def test_codes_without_data_and_missing_statistics():
    x, codebook, idx, counts, sums = _stats(k=64)
    idx = torch.where(idx % 5 == 0, idx + 1, idx).clamp_max(63)  # some codes get no data
    counts, sums = code_statistics(x, idx, 64)
    assert bool((counts == 0).any())
    for c, s in ((counts, sums), (counts, None), (None, None)):
        h, tables = build_nested(codebook, c, s, [3, 2, 1])
        assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook[idx])
        _check_nested(h, tables, [3, 2, 1])


def test_proposals_other_than_lists():
    _, codebook, _, counts, sums = _stats(k=128)
    _, tables = build_nested(codebook, counts, sums, 2, num_layers=4)
    assert tables.widths[:-1].tolist() == [2, 2, 2]
    _, tables = build_nested(codebook, counts, sums, "balanced_clusters", num_layers=3)
    assert tables.num_layers == 3
    with pytest.raises(ValueError, match="iters"):
        build_nested(codebook, counts, sums, [2, 2], iters=-1)
    # iters=0 keeps the greedy cut of the Ward tree
    h, tables = build_nested(codebook, counts, sums, [2, 2], iters=0)
    greedy = build_layers(build_hierarchy(codebook, counts, sums), [2, 2])
    assert torch.equal(tables.leaf_node, greedy.leaf_node)


def test_build_scalable_dispatches_every_method():
    _, codebook, _, counts, sums = _stats(k=64)
    assert set(CUTS) == {"nested", "greedy", "depth"}
    h, tables = build_scalable(codebook, counts, sums, [2, 2], cut="nested")
    h2, tables2 = build_nested(codebook, counts, sums, [2, 2])
    assert torch.equal(tables.leaf_node, tables2.leaf_node)
    _, t = build_scalable(codebook, counts, sums, [2, 2])  # the default is the nested layers
    assert torch.equal(t.leaf_node, tables2.leaf_node)
    tree = build_hierarchy(codebook, counts, sums)
    assert not torch.equal(t.leaf_node, build_layers(tree, [2, 2], cut="greedy").leaf_node)
    for cut in ("greedy", "depth"):
        _, t = build_scalable(codebook, counts, sums, [2, 2], cut=cut)
        assert torch.equal(t.leaf_node, build_layers(tree, [2, 2], cut=cut).leaf_node)
    _, t = build_scalable(codebook, counts, sums, [2, 2], refine=True)
    assert torch.equal(t.leaf_node, build_refined(codebook, counts, sums, [2, 2])[1].leaf_node)
    with pytest.raises(ValueError, match="unknown cut 'best'"):
        build_scalable(codebook, counts, sums, [2, 2], cut="best")
    with pytest.raises(ValueError, match="build_scalable"):
        build_layers(tree, [2, 2], cut="nested")


def test_joint_lloyd_lowers_the_weighted_error_and_keeps_parents():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(300, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(300, generator=g, dtype=torch.float64) + 0.1
    parents = (points[:, 0] > 0).long()
    coarse = parents * 10 + torch.randint(0, 3, (300,), generator=g)
    fine = coarse * 10 + torch.randint(0, 2, (300,), generator=g)
    lam = (1.0, 2.0)
    c1, c2 = joint_lloyd(parents, coarse, fine, points, weights, lam, iters=30)

    def objective(a, b):
        return lam[0] * cell_error(points, weights, a) + lam[1] * cell_error(points, weights, b)

    assert objective(c1, c2) < objective(coarse, fine)
    # nesting: a fine cell inside one coarse cell, a coarse cell inside one parent
    for child, parent in ((c2, c1), (c1, parents)):
        pairs = torch.unique(torch.stack([child, parent]), dim=1)
        assert pairs.shape[1] == child.unique().numel()
    # at most as many cells per parent as before
    assert c1.unique().numel() <= coarse.unique().numel() and c2.unique().numel() <= fine.unique().numel()


def test_seed_within_keeps_parents_and_separates_blobs():
    g = torch.Generator().manual_seed(0)
    # parent 0: two far-apart blobs; parent 1: only two distinct points (repeated)
    blobs = torch.cat([torch.randn(50, 2, generator=g, dtype=torch.float64) * 0.1,
                       torch.randn(50, 2, generator=g, dtype=torch.float64) * 0.1 + 10.0])
    pair = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64).repeat(10, 1)
    points = torch.cat([blobs, pair])
    parents = torch.cat([torch.zeros(100), torch.ones(20)]).long() * 7  # any labels
    weights = torch.rand(120, generator=g, dtype=torch.float64) + 0.5
    cells = seed_within(points, weights, parents, 2, generator=torch.Generator().manual_seed(1))
    assert cells.dtype == torch.long and cells.shape == (120,)
    assert not bool(torch.isin(cells[:100], cells[100:]).any())  # cells never straddle parents
    assert cells[:50].unique().numel() == 1 and cells[50:100].unique().numel() == 1  # one cell per blob
    assert int(cells[0]) != int(cells[50])
    four = seed_within(points, weights, parents, 4, generator=torch.Generator().manual_seed(1))
    assert four[100:].unique().numel() == 2  # two distinct points: two cells, not four
    assert torch.equal(four[100::2].unique(), four[100:101])  # equal points share their cell
    with pytest.raises(ValueError, match="k"):
        seed_within(points, weights, parents, 0)


def test_start_units_cover_every_codeword_with_at_most_max_units():
    _, codebook, _, counts, sums = _stats(k=200, d=4)
    points = sums / counts.clamp_min(1)[:, None]
    units = start_units(points, counts, 24)
    assert units.shape == (200,) and units.dtype == torch.long
    assert torch.equal(units.unique(), torch.arange(int(units.max()) + 1))  # numbered 0..U-1
    assert 16 <= units.unique().numel() <= 24
    assert torch.equal(units, start_units(points, counts, 24))  # reproducible


def test_large_codebooks_start_from_units_without_a_tree_of_all_codewords(monkeypatch):
    """Above MAX_START_UNITS codewords the starting Ward tree is built on start units: layers still
    nested and exact at full depth, and about as good as with a tree of all codewords."""
    x, codebook, idx, counts, sums = _stats(seed=5, n=6000, k=256, d=3)
    bits = [3, 2, 1]
    h_full, full = build_nested(codebook, counts, sums, bits)
    sizes = []
    real_build = nested.build_hierarchy

    def recording(cb, *args, **kwargs):
        sizes.append(cb.shape[0])
        return real_build(cb, *args, **kwargs)

    monkeypatch.setattr(nested, "MAX_START_UNITS", 64)
    monkeypatch.setattr(nested, "build_hierarchy", recording)
    h, tables = build_nested(codebook, counts, sums, bits)
    assert sizes and max(sizes) <= 64  # no tree of all 256 codewords
    assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook[idx])
    _check_nested(h, tables, bits)
    for layer in range(len(bits)):  # 8, 32, 64 cells
        ours = float(((x - reconstruct(h, tables, idx, layer + 1)) ** 2).mean())
        reference = float(((x - reconstruct(h_full, full, idx, layer + 1)) ** 2).mean())
        assert ours <= 1.1 * reference, (layer, ours, reference)
    # codes without data and missing statistics take the same path
    idx2 = torch.where(idx % 5 == 0, idx + 1, idx).clamp_max(255)
    counts2, sums2 = code_statistics(x, idx2, 256)
    for c, s in ((counts2, sums2), (None, None)):
        h2, t2 = build_nested(codebook, c, s, bits)
        assert torch.equal(reconstruct(h2, t2, idx2, t2.num_layers), codebook[idx2])
        _check_nested(h2, t2, bits)

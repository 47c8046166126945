"""The raw-cost cap of the default layers (:mod:`svq_modules.raw_cap`): the fewest-bits split is optimal,
the raw bits computed from nested labels are those of the built tables, and where the Lloyd cells of
heavily used, near-identical codewords cost more than ``ceil(log2 K) + 2`` raw bits at full depth,
the default build re-cuts only the free layers and meets the cap."""

import math

import pytest
import torch

from svq_modules import nested
from svq_modules.layers import layer_rates, reconstruct
from svq_modules.raw_cap import cap_raw_bits, fewest_bits_split, nested_raw_bits, raw_bits_cap


def _partitions(items):
    """Every set partition of ``items`` (a list), as lists of blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _cost(weights, blocks):
    """Raw bits of a cell cut into ``blocks``: this layer's symbol, then the final layer inside each block."""
    layer = sum(float(weights[b].sum()) for b in blocks) * math.ceil(math.log2(len(blocks)))
    return layer + sum(float(weights[b].sum()) * math.ceil(math.log2(len(b))) for b in blocks)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_fewest_bits_split_is_the_best_partition_of_every_cell(seed, bits):
    g = torch.Generator().manual_seed(seed)
    sizes = [7, 1, 5, 3, 6, 2, 4]
    cells = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])[torch.randperm(sum(sizes), generator=g)]
    weights = torch.rand(cells.numel(), generator=g, dtype=torch.float64) ** 3 * 10
    weights[::5] = 0.0  # codewords without data
    labels = fewest_bits_split(cells, weights, bits)
    for c in range(len(sizes)):
        members = torch.nonzero(cells == c).squeeze(1)
        assert torch.equal(labels[members] // min(2**bits, 7), torch.full_like(members, c))  # nested in the cell
        groups = [members[labels[members] == v] for v in labels[members].unique()]
        assert len(groups) <= 2**bits
        best = min(_cost(weights, [torch.tensor(b) for b in part])
                   for part in _partitions(members.tolist()) if len(part) <= 2**bits)
        assert _cost(weights, groups) == pytest.approx(best, abs=1e-9)


def test_nested_raw_bits_are_those_of_the_built_tables():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(200, 4, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 40, (200,), generator=g).double()
    h, tables = nested.build_nested(codebook, counts, codebook * counts[:, None], [3, 2, 2])
    labels = [tables.leaf_node[layer] for layer in range(tables.num_layers - 1)]
    expected = layer_rates(h, tables).raw_bits[-1]
    assert float((nested_raw_bits(labels).double() * counts).sum() / counts.sum()) == pytest.approx(float(expected))


def _skewed(seed, heavy=16, k=256, count=50.0, spread=1e-3):
    """A codebook like the smooth regions of a photo: ``heavy`` near-identical, heavily used codewords."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.cat([torch.randn(heavy, 8, generator=g) * spread, torch.randn(k - heavy, 8, generator=g)])
    counts = torch.cat([torch.full((heavy,), count), torch.ones(k - heavy)])
    return codebook.double(), counts.double(), codebook.double() * counts[:, None].double()


def _uncapped_labels(codebook, counts, sums, bits, monkeypatch):
    """The listed layers' cells of the default build without the cap (its tree nodes as labels)."""
    monkeypatch.setattr(nested, "cap_raw_bits", lambda points, weights, labels, widths: labels)
    h, tables = nested.build_nested(codebook, counts, sums, bits)
    monkeypatch.undo()
    return h, tables, [tables.leaf_node[layer] for layer in range(len(bits))]


def _mean_raw(labels, counts):
    return float((nested_raw_bits(labels).double() * counts).sum() / counts.sum())


def test_cap_keeps_cells_within_the_cap_and_recuts_only_free_layers(monkeypatch):
    codebook, counts, sums = _skewed(0)
    bits = [2, 2, 2, 2]  # cumulative 2, 4, 6, 8: the 8-bit layer is free at K=256
    balanced = [torch.arange(256) // 4 ** (3 - layer) for layer in range(4)]  # 8 raw bits
    assert cap_raw_bits(codebook, counts, balanced, bits) is balanced
    _, _, labels = _uncapped_labels(codebook, counts, sums, [4, 2, 2], monkeypatch)
    assert _mean_raw(labels, counts) > raw_bits_cap(256)
    out = cap_raw_bits(codebook, counts, labels, [4, 2, 2])
    assert _mean_raw(out, counts) <= raw_bits_cap(256)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], labels[:2]))
    pairs = torch.unique(torch.stack([out[2], out[1]]), dim=1)
    assert pairs.shape[1] == out[2].unique().numel()  # nested: each cell in one parent
    assert int(torch.unique(pairs[1], return_counts=True)[1].max()) <= 4
    # no free layer (all below log2 K bits): nothing to re-cut
    above = labels[:2]
    assert _mean_raw(above, counts) > raw_bits_cap(256)
    assert cap_raw_bits(codebook, counts, above, [4, 2]) is above


@pytest.mark.parametrize("seed", range(3))
def test_default_build_meets_the_cap_where_the_lloyd_cells_miss_it(seed, monkeypatch):
    codebook, counts, sums = _skewed(seed)
    bits = [4, 2, 2]
    h, tables = nested.build_nested(codebook, counts, sums, bits)
    assert float(layer_rates(h, tables).raw_bits[-1]) <= raw_bits_cap(256)
    idx = torch.arange(256)
    assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook)
    # the layers below log2 K bits are those of the build without the cap
    h0, tables0, _ = _uncapped_labels(codebook, counts, sums, bits, monkeypatch)
    assert float(layer_rates(h0, tables0).raw_bits[-1]) > raw_bits_cap(256)  # the case this guards
    for layer in range(2):
        same = torch.unique(torch.stack([tables.leaf_node[layer], tables0.leaf_node[layer]]), dim=1)
        assert same.shape[1] == tables.leaf_node[layer].unique().numel() == tables0.leaf_node[layer].unique().numel()


def test_fewest_bits_split_leaves_a_heavy_codeword_alone_without_splitting_the_rest():
    # one group of 3 would cost the light ones 2 bits; four singletons cost everyone 2 bits in this layer
    labels = fewest_bits_split(torch.zeros(4, dtype=torch.long), torch.tensor([100.0, 1.0, 1.0, 1.0]), 2)
    assert labels.unique().numel() == 2 and int((labels == labels[0]).sum()) == 1


def test_fewest_bits_split_of_one_big_cell_among_many_small_ones_stays_small():
    # padding by size batches: a 3000-codeword cell beside 3000 singletons, 8 bits
    cells = torch.cat([torch.zeros(3000, dtype=torch.long), torch.arange(1, 3001)])
    weights = torch.cat([torch.rand(3000, generator=torch.Generator().manual_seed(0)), torch.ones(3000)])
    labels = fewest_bits_split(cells, weights, 8)
    assert labels[:3000].unique().numel() <= 256 and labels[3000:].unique().numel() == 3000


def test_raw_bits_cap_checks_its_argument():
    assert raw_bits_cap(1024) == 12 and raw_bits_cap(1000) == 12 and raw_bits_cap(1) == 2
    with pytest.raises(ValueError, match="num_codes"):
        raw_bits_cap(0)
    with pytest.raises(ValueError, match="labels"):
        nested_raw_bits([])
    with pytest.raises(ValueError, match="bits"):
        fewest_bits_split(torch.zeros(3, dtype=torch.long), torch.ones(3), 0)

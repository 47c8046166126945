import math

import pytest
import torch

from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import (
    branch_probabilities,
    build_layers,
    decode_codes,
    encode_indices,
    layer_rates,
    reconstruct,
    resolve_bits,
    symbol_bits,
)


@pytest.fixture
def built(gaussian_codes):
    x, codebook, idx = gaussian_codes
    counts, sums = code_statistics(x, idx, codebook.shape[0])
    h = build_hierarchy(codebook, counts, sums)
    return x, codebook, idx, h


@pytest.mark.parametrize("cut", ["greedy", "depth"])
def test_round_trip_and_node_means(built, cut):
    x, codebook, idx, h = built
    tables = build_layers(h, [2, 1, 1], cut=cut)
    assert tables.num_layers == 4
    codes = encode_indices(tables, idx)
    nodes = decode_codes(tables, codes)
    assert torch.equal(nodes, tables.leaf_node[:, idx])
    # last layer: exact codewords
    assert torch.equal(reconstruct(h, tables, idx, 4), codebook[idx])
    assert torch.equal(nodes[-1], idx)
    for layer in range(3):
        rec = reconstruct(h, tables, idx, layer + 1)
        for node in nodes[layer].unique():
            sel = nodes[layer] == node
            if int(node) >= codebook.shape[0]:  # internal node: mean of its vectors
                torch.testing.assert_close(rec[sel][0], x[sel].mean(0))


@pytest.mark.parametrize("cut", ["greedy", "depth"])
def test_mse_monotone_and_bits_bounded(built, cut):
    x, codebook, idx, h = built
    bits = [3, 1, 2, 1]
    tables = build_layers(h, bits, cut=cut)
    mse = [float(((x - reconstruct(h, tables, idx, l)) ** 2).sum(1).mean()) for l in range(1, 6)]
    assert all(b <= a + 1e-12 for a, b in zip(mse, mse[1:])), mse
    sb = symbol_bits(tables)
    for layer, b in enumerate(bits):
        assert int(sb[layer].max()) <= b
        # a layer never splits a node into more than 2**b nodes
        assert int(tables.group_size[layer].max()) <= 2**b
    assert int(tables.widths[-1]) == math.ceil(math.log2(int(tables.group_size[-1].max())))
    # a vector whose leaf is reached sends nothing more
    reached = tables.leaf_node[:-1] < codebook.shape[0]
    assert (tables.leaf_symbol[1:][reached] == -1).all()


def brute_greedy_cut(h, budget):
    """Open nodes one by one from the root, always the frontier node with the largest gain."""
    K = h.num_leaves
    gain = h.split_gain()
    frontier = {h.root}
    while len(frontier) < budget:
        internal = [v for v in frontier if v >= K]
        if not internal:
            break
        v = max(internal, key=lambda n: float(gain[n - K]))
        frontier.remove(v)
        frontier.update(h.children[v - K].tolist())
    return frontier


def test_greedy_base_layer_matches_brute_force(built):
    _, codebook, idx, h = built
    for b in (1, 2, 3, 4):
        tables = build_layers(h, [b])
        assert set(tables.leaf_node[0].tolist()) == brute_greedy_cut(h, 2**b)


def test_greedy_beats_depth_cut(built):
    x, _, idx, h = built
    greedy = build_layers(h, [3, 2])
    depth = build_layers(h, [3, 2], cut="depth")
    for l in (1, 2):
        mg = ((x - reconstruct(h, greedy, idx, l)) ** 2).sum(1).mean()
        md = ((x - reconstruct(h, depth, idx, l)) ** 2).sum(1).mean()
        assert mg <= md + 1e-9


def test_rates(built):
    x, codebook, idx, h = built
    tables = build_layers(h, [2, 2, 1])
    rates = layer_rates(h, tables, idx)
    assert (rates.raw_bits.diff() >= 0).all() and (rates.entropy_bits.diff() >= -1e-12).all()
    p = torch.bincount(idx, minlength=40).double() / idx.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    # conditional codes telescope: full depth costs the entropy of the indices
    assert abs(float(rates.entropy_bits[-1]) - entropy) < 1e-6
    assert float(rates.raw_bits[0]) == 2.0
    assert float(rates.entropy_bits[-1]) <= float(rates.raw_bits[-1])
    # branch probabilities come from the counts
    pl = branch_probabilities(h)
    left = h.children[:, 0]
    torch.testing.assert_close(pl, (h.count[left] / h.count[40:]).clamp(2**-20, 1 - 2**-20))
    by_counts = layer_rates(h, tables)
    torch.testing.assert_close(by_counts.entropy_bits, rates.entropy_bits)


def test_bit_proposals(built):
    _, codebook, idx, h = built
    assert resolve_bits([4, 2], h) == [4, 2]
    assert resolve_bits(2, h, num_layers=4) == [2, 2, 2]
    repeated = resolve_bits(2, h)
    t = build_layers(h, 2)
    assert t.num_layers == len(repeated) and (t.leaf_node[-1] == torch.arange(40)).all()
    for name in ("balanced_clusters", "balanced_values"):
        widths = resolve_bits(name, h, num_layers=4)
        assert len(widths) == 3 and all(w >= 1 for w in widths)
        tables = build_layers(h, name, num_layers=4)
        assert tables.num_layers == 4
    # balanced_clusters: the cluster count grows by about the same factor per layer
    t = build_layers(h, "balanced_clusters", num_layers=4)
    sizes = [len(t.leaf_node[l].unique()) for l in range(3)]
    for l, s in enumerate(sizes):
        assert s >= 40 ** ((l + 1) / 4) - 1e-9
    # a named proposal defaults to 5 layers, the final one included
    assert len(resolve_bits("balanced_values", h)) == 4
    assert build_layers(h, "balanced_clusters").num_layers == 5
    called = build_layers(h, lambda hier, n: [1] * n, num_layers=3)
    assert called.widths.tolist()[:2] == [1, 1]


@pytest.mark.parametrize(
    "bits, kwargs, message",
    [
        ([0, 2], {}, "> 0"),
        ([], {}, "empty"),
        ([2, -1], {}, "> 0"),
        ("hello", {}, "not a bit proposal"),
        (None, {}, "not a bit proposal"),
        (True, {}, "not a bit proposal"),
        (25, {}, "at most 24"),
        ([2.5], {}, "ints"),
        ([2, 2], dict(num_layers=5), "num_layers"),
        (2, dict(num_layers=1), "num_layers"),
        (lambda h, n: [1], {}, "pass num_layers"),
        (lambda h, n: [1], dict(num_layers=4), "returned 1 widths"),
        (lambda h, n: [0] * n, dict(num_layers=3), "returned by the proposal"),
        ([2], dict(cut="fancy"), "unknown cut"),
    ],
)
def test_bad_bits(built, bits, kwargs, message):
    h = built[3]
    with pytest.raises(ValueError, match=message):
        build_layers(h, bits, **kwargs)


def test_decode_rejects_invalid_codes(built):
    _, _, idx, h = built
    tables = build_layers(h, [2, 2])
    codes = encode_indices(tables, idx)
    bad = codes.clone()
    bad[0, 5] = 4  # base layer has 4 symbols
    with pytest.raises(ValueError, match="layer 0"):
        decode_codes(tables, bad)
    bad = codes.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="invalid code"):
        decode_codes(tables, bad)
    with pytest.raises(ValueError, match="layers"):
        decode_codes(tables, torch.zeros(9, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_layers"):
        reconstruct(h, tables, idx, 0)
    with pytest.raises(ValueError, match="out of range"):
        encode_indices(tables, torch.tensor([40]))


def test_tiny_codebooks():
    for K in (1, 2, 3, 5):
        codebook = torch.arange(K * 2, dtype=torch.float32).reshape(K, 2)
        h = build_hierarchy(codebook)
        tables = build_layers(h, [2, 2])
        idx = torch.arange(K)
        codes = encode_indices(tables, idx)
        assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook)
        assert torch.equal(decode_codes(tables, codes)[-1], idx)
        if K == 1:
            assert (codes == -1).all()

import torch

from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import build_layers, decode_codes, encode_indices, reconstruct
from svq_modules.refine import build_refined, lloyd_within


def mse(x, rec):
    return float(((x - rec) ** 2).sum(1).mean())


def test_refined_layers_nest_decode_and_improve(gaussian_codes):
    x, codebook, idx = gaussian_codes
    counts, sums = code_statistics(x, idx, 40)
    bits = [2, 1, 1]
    h, tables = build_refined(codebook, counts, sums, bits)
    greedy_h = build_hierarchy(codebook, counts, sums)
    greedy = build_layers(greedy_h, bits)
    # exact codewords at the end, valid symbols on the way
    codes = encode_indices(tables, idx)
    assert torch.equal(decode_codes(tables, codes)[-1], idx)
    assert torch.equal(reconstruct(h, tables, idx, tables.num_layers), codebook[idx])
    # nested: every layer-l node lies below the vector's layer-(l-1) node
    for l in range(1, tables.num_layers):
        node, prev = tables.leaf_node[l], tables.leaf_node[l - 1]
        anc = node.clone()
        for _ in range(80):
            anc = torch.where(anc == prev, anc, h.parent[anc].clamp_min(0))
        assert torch.equal(anc, prev)
    errors = [mse(x, reconstruct(h, tables, idx, l)) for l in range(1, tables.num_layers + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[0] <= mse(x, reconstruct(greedy_h, greedy, idx, 1)) + 1e-12
    # layer widths are kept
    assert len(tables.leaf_node[0].unique()) <= 4
    assert int(tables.group_size[1].max()) <= 2 and int(tables.group_size[2].max()) <= 2


def test_lloyd_within_keeps_parents_and_lowers_error():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(200, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(200, generator=g, dtype=torch.float64) + 0.1
    parents = (points[:, 0] > 0).long()
    cells = parents * 10 + torch.randint(0, 3, (200,), generator=g)  # 3 random cells per parent
    refined = lloyd_within(cells, parents, points, weights, iters=20)
    assert set(refined.unique().tolist()) <= set(cells.unique().tolist())
    # a leaf never leaves its parent
    assert torch.equal(refined // 10, parents)

    def sse(lab):
        total = 0.0
        for c in lab.unique():
            m = lab == c
            center = (points[m] * weights[m, None]).sum(0) / weights[m].sum()
            total += float((weights[m] * ((points[m] - center) ** 2).sum(1)).sum())
        return total

    assert sse(refined) < sse(cells)

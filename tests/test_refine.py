import pytest
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


# --------------------------------------------------------------------------- through the public front ends
#
# Data: 4 groups of 16 distinct points, the groups 100 apart, the points of a
# group uniform in a 4 x 4 square, point k repeated mult[k] times. Why the
# refined layers can be compared with the greedy ones exactly:
#
# * the codebook is the 64 points (the codes' data means) and the tree's
#   statistics are the data's, so the reconstruction of a cell is its data mean
#   and the MSE of a layer is (within-code error + weighted SSE of the code
#   means around their cell centers) / N: exactly what Lloyd lowers;
# * layer 0 (4 cells) is the 4 groups for both: the three inter-group merges
#   are by far the costliest, and no point is nearer another group's mean;
# * so refined layer 1 starts from the greedy layer 1 (same tree inside each
#   group) and Lloyd never raises the SSE; each point strictly nearer another
#   cell's center of its group lowers it by at least w (d_own - d_nearest) in
#   the first iteration (``first_lloyd_gain``, computed here independently).


def clustered_points(seed=0):
    """``points [64, 2]`` float64, ``group [64]`` (0..3), ``mult [64]`` int64 in [3, 30]."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[-50.0, -50.0], [-50.0, 50.0], [50.0, -50.0], [50.0, 50.0]], dtype=torch.float64)
    group = torch.arange(4).repeat_interleave(16)
    points = corners[group] + torch.rand(64, 2, generator=g, dtype=torch.float64) * 4
    mult = torch.randint(3, 31, (64,), generator=g)
    return points, group, mult


def cells_nest(fine, coarse):
    """Whether every cell of ``fine [K]`` lies inside one cell of ``coarse [K]`` (labels per code)."""
    pairs = torch.unique(torch.stack([fine, coarse], 1), dim=0)
    return pairs.shape[0] == torch.unique(fine).numel()


def first_lloyd_gain(points, weights, cells, parents):
    """SSE removed by moving each point to the nearest cell center of its parent cell (centers kept)."""
    _, cell = torch.unique(cells, return_inverse=True)
    mass = torch.zeros(int(cell.max()) + 1, dtype=points.dtype).index_add_(0, cell, weights)
    centers = torch.zeros(mass.shape[0], points.shape[1], dtype=points.dtype).index_add_(0, cell, points * weights[:, None])
    centers /= mass[:, None]
    cell_parent = torch.zeros_like(mass, dtype=torch.long).scatter_(0, cell, parents)
    d = torch.cdist(points, centers).pow(2)
    d[parents[:, None] != cell_parent[None, :]] = float("inf")
    own = d.gather(1, cell[:, None]).squeeze(1)
    return float((weights * (own - d.min(1).values)).sum())


def layer_labels(decoded, first):
    """Cell label per code after one layer: the row of its decoded center among the distinct centers."""
    return torch.unique(decoded[first], dim=0, return_inverse=True)[1]


def test_scalable_vq_refine_nests_decodes_exactly_and_beats_greedy():
    from svq_modules import ScalableVQ

    points, group, mult = clustered_points()
    x = points.repeat_interleave(mult, 0)
    n = x.shape[0]

    def trained(refine):
        torch.manual_seed(0)
        q = ScalableVQ(2, 64, [2, 2], cut="greedy", refine=refine).double()  # refine: of greedy cuts
        q.train()
        for _ in range(3):
            q(x[torch.randperm(n)])
        q.update()
        return q.eval()

    refined, greedy = trained(True), trained(False)
    errors = {}
    for name, q in (("refined", refined), ("greedy", greedy)):
        # preconditions of the argument above: codewords = points, tree counts = multiplicities
        d = torch.cdist(q.codebook, points)
        match = d.argmin(1)
        assert float(d.min(1).values.max()) < 1e-3 and match.unique().numel() == 64
        torch.testing.assert_close(q.hierarchy.count[:64], mult[match].double())
        tables = q.tables
        assert tables.num_layers == 3
        for l in range(tables.num_layers - 1):
            assert cells_nest(tables.leaf_node[l + 1], tables.leaf_node[l]), (name, l)
        # layer 0 is the 4 groups
        assert torch.unique(torch.stack([tables.leaf_node[0], group[match]], 1), dim=0).shape[0] == 4
        codes = q.encode(x)
        out = q(x)
        assert torch.equal(q.decode(codes), out.quantized)
        assert torch.equal(q.decode(codes, 3), q.codebook[out.indices])
        errors[name] = [float(((q.decode(codes, l) - x) ** 2).sum(1).mean()) for l in (1, 2)]
    for r, g in zip(errors["refined"], errors["greedy"]):
        assert r <= g + 1e-6, errors
    leaf_node = greedy.tables.leaf_node
    match = torch.cdist(greedy.codebook, points).argmin(1)
    gain = first_lloyd_gain(points[match], mult[match].double(), leaf_node[1], leaf_node[0]) / n
    assert gain > 1e-4  # the data does exercise the refinement
    assert errors["refined"][1] <= errors["greedy"][1] - gain + 1e-6, (errors, gain)


def test_functional_encode_layers_refine_nests_decodes_exactly_and_beats_greedy():
    from svq_modules.compat.functional import decode_layer, encode_layers

    points, group, mult = clustered_points()
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(64).repeat_interleave(mult)
    x = points[idx] + 0.3 * torch.randn(idx.numel(), 2, generator=g, dtype=torch.float64)
    # codebook = the codes' data means, so a cell's reconstruction is its data mean
    codebook = torch.zeros(64, 2, dtype=torch.float64).index_add_(0, idx, x) / mult[:, None]
    first = torch.searchsorted(idx, torch.arange(64))  # one vector of each code
    errors, labels = {}, {}
    for refine in (True, False):
        layers = encode_layers(x, idx, codebook, [2, 2], cut="greedy", refine=refine)
        assert len(layers) == 3
        context, decoded = None, []
        for layer in layers:
            rec, context = decode_layer(layer, context)
            decoded.append(rec)
        assert torch.equal(decoded[-1], codebook[idx])
        labels[refine] = [layer_labels(rec, first) for rec in decoded]
        for l in range(2):
            assert cells_nest(labels[refine][l + 1], labels[refine][l]), (refine, l)
        assert torch.unique(torch.stack([labels[refine][0], group], 1), dim=0).shape[0] == 4
        errors[refine] = [float(((rec - x) ** 2).sum(1).mean()) for rec in decoded[:2]]
    for r, g in zip(errors[True], errors[False]):
        assert r <= g + 1e-9, errors
    gain = first_lloyd_gain(codebook, mult.double(), labels[False][1], labels[False][0]) / x.shape[0]
    assert gain > 1e-4
    assert errors[True][1] <= errors[False][1] - gain + 1e-9, (errors, gain)
    # the default layers (nested cells) are Lloyd-optimised too: no worse than the greedy cut at either layer
    context, default = None, []
    for layer in encode_layers(x, idx, codebook, [2, 2])[:2]:
        rec, context = decode_layer(layer, context)
        default.append(float(((rec - x) ** 2).sum(1).mean()))
    for d, g in zip(default, errors[False]):
        assert d <= g + 1e-9, (default, errors)
    assert default[1] <= errors[False][1] - gain + 1e-9, (default, errors, gain)


def test_build_refined_checks_arguments_before_building():
    codebook = torch.randn(20, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a bit proposal"):
        build_refined(codebook, bits="nope")
    with pytest.raises(ValueError, match="pass num_layers"):
        build_refined(codebook, bits=lambda h, n: [1] * n)
    with pytest.raises(ValueError, match="num_layers"):
        build_refined(codebook, bits=[2, 2], num_layers=4)
    with pytest.raises(ValueError, match="iters"):
        build_refined(codebook, bits=[2], iters=-1)

import itertools

import pytest
import torch

from svq_modules.hierarchy import (
    Hierarchy,
    build_constrained_hierarchy,
    build_hierarchy,
    code_statistics,
    ward_clusters,
)
from svq_modules.linkage import candidate_rows


def greedy_ward(counts, sums):
    """Textbook greedy Ward: merge the globally cheapest pair, one at a time."""
    clusters = {i: (float(counts[i]), sums[i].clone(), frozenset([i])) for i in range(len(counts))}
    merges = []
    while len(clusters) > 1:
        best = None
        for a, b in itertools.combinations(sorted(clusters), 2):
            na, sa, _ = clusters[a]
            nb, sb, _ = clusters[b]
            cost = na * nb / (na + nb) * float(((sa / na - sb / nb) ** 2).sum())
            if best is None or cost < best[0]:
                best = (cost, a, b)
        cost, a, b = best
        na, sa, ma = clusters.pop(a)
        nb, sb, mb = clusters.pop(b)
        new = max(clusters, default=max(a, b)) + 1000
        clusters[new] = (na + nb, sa + sb, ma | mb)
        merges.append((ma | mb, cost))
    return merges


def tree_merges(h: Hierarchy):
    members = {i: frozenset([i]) for i in range(h.num_leaves)}
    out = []
    for i, (a, b) in enumerate(h.children.tolist()):
        members[h.num_leaves + i] = members[a] | members[b]
        out.append((members[h.num_leaves + i], float(h.merge_cost[i])))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ward_tree_equals_greedy_ward(seed):
    g = torch.Generator().manual_seed(seed)
    K, D = 24, 3
    counts = torch.randint(1, 50, (K,), generator=g).double()
    sums = torch.randn(K, D, generator=g, dtype=torch.float64) * counts[:, None]
    codebook = sums / counts[:, None]
    h = build_hierarchy(codebook, counts, sums)
    ours = sorted(tree_merges(h), key=lambda m: m[1])
    ref = sorted(greedy_ward(counts, sums), key=lambda m: m[1])
    assert [m[0] for m in ours] == [m[0] for m in ref]
    torch.testing.assert_close(torch.tensor([m[1] for m in ours]), torch.tensor([m[1] for m in ref]))


def test_tree_structure_and_centers(gaussian_codes):
    x, codebook, idx = gaussian_codes
    counts, sums = code_statistics(x, idx, 40)
    h = build_hierarchy(codebook, counts, sums)
    K = 40
    assert h.num_nodes == 2 * K - 1 and h.root == 2 * K - 2
    assert int(h.parent[h.root]) == -1 and (h.parent[:-1] > torch.arange(2 * K - 2)).all()
    assert int(h.size[h.root]) == K and float(h.count[h.root]) == 2000
    # every internal center is the mean of the data vectors below it
    members = {i: [i] for i in range(K)}
    for i, (a, b) in enumerate(h.children.tolist()):
        members[K + i] = members[a] + members[b]
        mask = torch.isin(idx, torch.tensor(members[K + i]))
        torch.testing.assert_close(h.center[K + i], x[mask].mean(0))
    torch.testing.assert_close(h.center[:K], codebook)
    # Ward merge heights never decrease up the tree (no inversions)
    internal_parent = h.parent[K:-1] - K
    assert (h.merge_cost[internal_parent] >= h.merge_cost[: K - 2] - 1e-9).all()


def test_empty_codes_duplicates_and_small_k():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(10, 4, generator=g)
    codebook[7] = codebook[2]  # duplicate codeword
    counts = torch.tensor([5.0, 0, 3, 0, 0, 9, 1, 3, 0, 2])  # empty clusters
    sums = codebook * counts[:, None]
    h = build_hierarchy(codebook, counts, sums)
    assert int(h.size[h.root]) == 10
    assert torch.isfinite(h.center).all() and torch.isfinite(h.merge_cost).all()
    # identical codes merge first, at zero cost; then empty codes are absorbed, at (almost) zero cost
    assert h.children[0].tolist() == [2, 7] and float(h.merge_cost[0]) == 0.0
    for merge in h.children[1:5].tolist():
        assert sum(int(counts[c] == 0) for c in merge if c < 10) == 1
    one = build_hierarchy(codebook[:1])
    assert one.num_nodes == 1 and one.children.shape == (0, 2)
    two = build_hierarchy(codebook[:2].double())
    assert two.center.dtype == torch.float64 and two.children.tolist() == [[0, 1]]


@pytest.mark.parametrize("linkage", ["ward", "centroid"])
def test_many_identical_codes_merge_in_few_rounds(linkage, monkeypatch):
    """Groups of identical codewords (e.g. dead codes a learner reset to one vector): every group becomes a
    zero-cost subtree in a few batched rounds, and the tree above is the tree of the deduplicated codebook."""
    import svq_modules.hierarchy as hierarchy

    g = torch.Generator().manual_seed(5)
    distinct = torch.randn(40, 3, generator=g, dtype=torch.float64)
    copies = torch.randint(1, 60, (40,), generator=g)  # up to 59 copies of a point
    codebook = distinct.repeat_interleave(copies, 0)
    counts = 2.0 ** torch.randint(0, 4, (codebook.shape[0],), generator=g).double()  # sums / counts == codebook
    point = torch.arange(40).repeat_interleave(copies)
    premerged = []
    original = hierarchy._merge_duplicate_roots
    monkeypatch.setattr(hierarchy, "_merge_duplicate_roots", lambda *a: premerged.append(original(*a)) or premerged[-1])
    h = build_hierarchy(codebook, counts, codebook * counts[:, None], linkage=linkage)
    assert premerged == [codebook.shape[0] - 40]  # every copy merged before the regular rounds
    zero = h.merge_cost == 0
    assert int(zero.sum()) == codebook.shape[0] - 40
    assert (h.parent[:-1] > torch.arange(h.num_nodes - 1)).all() and int(h.size[h.root]) == codebook.shape[0]
    # every group of copies is a subtree (a node whose leaves are exactly the group)
    members = {i: {i} for i in range(h.num_leaves)}
    for i, (a, b) in enumerate(h.children.tolist()):
        members[h.num_leaves + i] = members[a] | members[b]
    subtrees = {frozenset(m) for m in members.values()}
    for p in range(40):
        assert frozenset((point == p).nonzero().squeeze(1).tolist()) in subtrees
    if linkage == "ward":  # above them: the Ward tree of the deduplicated codebook, the copies' counts summed
        summed = torch.zeros(40, dtype=torch.float64).index_add_(0, point, counts)
        dedup = build_hierarchy(distinct, summed, distinct * summed[:, None])
        torch.testing.assert_close(h.merge_cost[~zero].sort().values, dedup.merge_cost.sort().values)


def test_centroid_linkage_without_data():
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(33, 2, generator=g)
    h = build_hierarchy(codebook, linkage="centroid")
    K = 33
    members = {i: [i] for i in range(K)}
    for i, (a, b) in enumerate(h.children.tolist()):
        members[K + i] = members[a] + members[b]
        torch.testing.assert_close(h.center[K + i], codebook[members[K + i]].mean(0))


def test_unit_weight_ward_matches_scipy():
    hierarchy_mod = pytest.importorskip("scipy.cluster.hierarchy")
    g = torch.Generator().manual_seed(7)
    K = 1200
    codebook = torch.randn(K, 6, generator=g, dtype=torch.float64)
    h = build_hierarchy(codebook)  # no statistics: every code weighs 1
    Z = hierarchy_mod.linkage(codebook.numpy(), method="ward")
    members = {i: frozenset([i]) for i in range(K)}
    ref = []
    for i, (a, b, _height, _) in enumerate(Z):
        members[K + i] = members[int(a)] | members[int(b)]
        ref.append(members[K + i])
    assert set(m for m, _ in tree_merges(h)) == set(ref)
    # scipy's Ward height is sqrt(2 * merge cost)
    torch.testing.assert_close(torch.sort((2 * h.merge_cost).sqrt()).values, torch.sort(torch.from_numpy(Z[:, 2])).values)


@pytest.mark.parametrize("switch", [0, 64, 512])
def test_tree_does_not_depend_on_when_the_build_turns_to_dense_rounds(switch, monkeypatch):
    """The candidate-list rounds hand over to padded dense rounds once few roots are left;
    where that happens (never, at 64 or at 512 roots) must not change the tree."""
    import svq_modules.hierarchy as hierarchy_module

    g = torch.Generator().manual_seed(11)
    K, D = 700, 3
    counts = torch.randint(1, 40, (K,), generator=g).double()
    sums = torch.randn(K, D, generator=g, dtype=torch.float64) * counts[:, None]
    codebook = sums / counts[:, None]
    default = build_hierarchy(codebook, counts, sums)
    monkeypatch.setattr(hierarchy_module, "_DENSE_SWITCH", switch)
    other = build_hierarchy(codebook, counts, sums)
    assert set(m for m, _ in tree_merges(other)) == set(m for m, _ in tree_merges(default))
    torch.testing.assert_close(torch.sort(other.merge_cost).values, torch.sort(default.merge_cost).values)


def test_large_k_is_blocked_and_valid():
    g = torch.Generator().manual_seed(5)
    K = 1500
    codebook = torch.randn(K, 8, generator=g)
    counts = torch.rand(K, generator=g) * 10
    h = build_hierarchy(codebook, counts, codebook * counts[:, None], block_size=1 << 16)
    ref = build_hierarchy(codebook, counts, codebook * counts[:, None])
    assert torch.equal(h.parent, ref.parent)
    # each node but the root has exactly one parent, which lists it as a child
    kids = torch.zeros(2 * K - 1, dtype=torch.long).index_add_(0, h.children.flatten(), torch.ones(2 * K - 2, dtype=torch.long))
    assert (kids[:-1] == 1).all() and kids[-1] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(codebook=torch.tensor([[0.0, float("nan")]])), "NaN"),
        (dict(codebook=torch.tensor([[0.0, float("inf")]])), "Inf"),
        (dict(codebook=torch.zeros(0, 3)), "empty"),
        (dict(codebook=torch.zeros(4, 3, dtype=torch.long)), "floating"),
        (dict(codebook=torch.zeros(4, 3), counts=torch.ones(5)), "counts must have shape"),
        (dict(codebook=torch.zeros(4, 3), counts=-torch.ones(4)), ">= 0"),
        (dict(codebook=torch.zeros(4, 3), counts=torch.ones(4), sums=torch.ones(4, 2)), "sums must have shape"),
        (dict(codebook=torch.zeros(4, 3), linkage="single"), "unknown linkage"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_hierarchy(**kwargs)


def test_code_statistics_and_errors():
    x = torch.arange(12.0).reshape(4, 3)
    counts, sums = code_statistics(x, torch.tensor([0, 2, 2, 0]), 3)
    assert counts.tolist() == [2.0, 0.0, 2.0]
    torch.testing.assert_close(sums[0], x[0] + x[3])
    with pytest.raises(ValueError, match="out of range"):
        code_statistics(x, torch.tensor([0, 3, 1, 1]), 3)
    with pytest.raises(ValueError, match="integer"):
        code_statistics(x, torch.tensor([0.0, 1, 1, 1]), 3)
    with pytest.raises(ValueError, match="4 vectors"):
        code_statistics(x, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="empty"):
        code_statistics(x[:0], torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="NaN"):
        code_statistics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), 3)


@pytest.mark.cuda
def test_cuda_tree_matches_cpu():
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(500, 16, generator=g, dtype=torch.float64)
    counts = torch.rand(500, generator=g, dtype=torch.float64) * 10 + 1
    cpu = build_hierarchy(codebook, counts, codebook * counts[:, None])
    gpu = build_hierarchy(codebook.cuda(), counts.cuda(), (codebook * counts[:, None]).cuda())
    assert gpu.parent.is_cuda
    assert torch.equal(cpu.parent, gpu.parent.cpu())


def test_empty_codes_do_not_change_the_tree_of_the_others():
    g = torch.Generator().manual_seed(8)
    K = 300
    codebook = torch.randn(K, 5, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 20, (K,), generator=g).double()
    counts[torch.randperm(K, generator=g)[:90]] = 0  # 30% codes without data
    sums = codebook * counts[:, None]
    h = build_hierarchy(codebook, counts, sums)
    full = counts > 0
    kept = full.nonzero().squeeze(1)
    sub = build_hierarchy(codebook[kept], counts[kept], sums[kept])
    # every empty code is absorbed at (almost) no cost
    empty_merges = [c for i, c in enumerate(h.children.tolist()) if any(x < K and counts[x] == 0 for x in c)]
    assert len(empty_merges) == 90
    # the merges among codes with data are those of the tree built without the empty ones
    ours = {m & frozenset(kept.tolist()) for m, _ in tree_merges(h)}
    ours = {m for m in ours if len(m) > 1}
    ref = {frozenset(kept[list(m)].tolist()) for m, _ in tree_merges(sub)}
    assert ours == ref
    torch.testing.assert_close(h.center[h.root], sums.sum(0) / counts.sum())


def test_constrained_tree_keeps_every_cell_a_subtree():
    g = torch.Generator().manual_seed(9)
    K = 80
    codebook = torch.randn(K, 2, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 10, (K,), generator=g).double()
    coarse = torch.randint(0, 3, (K,), generator=g)
    fine = coarse * 4 + torch.randint(0, 4, (K,), generator=g)
    fine[0], counts[0] = 99, 0.0  # an empty code alone in its finest cell
    constraints = torch.stack([coarse, fine])
    h, level = build_constrained_hierarchy(codebook, counts, codebook * counts[:, None], constraints)
    members = {i: {i} for i in range(K)}
    for i, (a, b) in enumerate(h.children.tolist()):
        members[K + i] = members[a] | members[b]
    subtrees = {frozenset(m) for m in members.values()}
    for row in constraints:
        for value in row.unique():
            assert frozenset((row == value).nonzero().squeeze(1).tolist()) in subtrees
    assert (level[:K] == -1).all()
    for node in range(K, 2 * K - 1):
        leaves = torch.tensor(sorted(members[node]))
        lev = int(level[node])
        if lev > 0:  # formed inside one label of row lev - 1
            assert constraints[lev - 1, leaves].unique().numel() == 1
        if lev < 2:  # formed across labels of the next finer row
            assert constraints[lev, leaves].unique().numel() >= 2
    plain = build_hierarchy(codebook, counts, codebook * counts[:, None])
    free, free_level = build_constrained_hierarchy(codebook, counts, codebook * counts[:, None])
    assert torch.equal(free.parent, plain.parent) and torch.equal(free.merge_cost, plain.merge_cost)
    assert (free_level[K:] == 0).all() and (free_level[:K] == -1).all()
    with pytest.raises(ValueError, match="constraints must be"):
        build_constrained_hierarchy(codebook, constraints=coarse)


@pytest.mark.parametrize("build", [build_hierarchy, build_constrained_hierarchy])
def test_constraints_that_are_not_nested_are_refused(build):
    # fine label 0 holds codes 0..7, which sit in coarse labels 0 and 1 (the coarse labels alternate)
    K = 32
    codebook = torch.randn(K, 3, generator=torch.Generator().manual_seed(4))
    coarse, fine = torch.arange(K) % 2, torch.arange(K) // 8
    with pytest.raises(ValueError, match=r"constraints must be nested .* row 1 label 0 spans row 0 labels 0 and 1"):
        build(codebook, constraints=torch.stack([coarse, fine]))
    # the same cells nested (fine = coarse refined) are accepted, also with a third row of singletons
    nested = torch.stack([coarse, coarse * 4 + fine, torch.arange(K)])
    assert build(codebook, constraints=nested) is not None


def greedy_constrained_ward(counts, sums, constraints):
    """Textbook constrained Ward: inside the finest labels, then each coarser row, then free."""
    rows = [None] + list(range(constraints.shape[0]))  # free last
    clusters = {i: (float(counts[i]), sums[i].clone(), frozenset([i])) for i in range(len(counts))}
    merges = []
    for row in reversed(rows):
        while True:
            best = None
            for a, b in itertools.combinations(sorted(clusters), 2):
                (na, sa, ma), (nb, sb, mb) = clusters[a], clusters[b]
                if row is not None and constraints[row, min(ma)] != constraints[row, min(mb)]:
                    continue
                cost = na * nb / (na + nb) * float(((sa / na - sb / nb) ** 2).sum())
                if best is None or cost < best[0]:
                    best = (cost, a, b)
            if best is None:
                break
            cost, a, b = best
            na, sa, ma = clusters.pop(a)
            nb, sb, mb = clusters.pop(b)
            clusters[max(clusters, default=max(a, b)) + 1000] = (na + nb, sa + sb, ma | mb)
            merges.append((ma | mb, cost))
    return merges


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_tree_equals_greedy_constrained_ward(seed, dense, monkeypatch):
    """Both ways of merging inside labels (padded dense rounds for small labels, candidate
    lists scanning only the row's own label otherwise) give the textbook tree."""
    import svq_modules.hierarchy as hierarchy_module

    if not dense:
        monkeypatch.setattr(hierarchy_module, "_DENSE_MAX_GROUP", 0)
    g = torch.Generator().manual_seed(seed)
    K, D = 30, 3
    counts = torch.randint(1, 50, (K,), generator=g).double()
    sums = torch.randn(K, D, generator=g, dtype=torch.float64) * counts[:, None]
    coarse = torch.randint(0, 3, (K,), generator=g)
    constraints = torch.stack([coarse, coarse * 3 + torch.randint(0, 3, (K,), generator=g)])
    h, _ = build_constrained_hierarchy(sums / counts[:, None], counts, sums, constraints)
    ours = sorted(tree_merges(h), key=lambda m: m[1])
    ref = sorted(greedy_constrained_ward(counts, sums, constraints), key=lambda m: m[1])
    assert [m[0] for m in ours] == [m[0] for m in ref]
    torch.testing.assert_close(torch.tensor([m[1] for m in ours]), torch.tensor([m[1] for m in ref]))


@pytest.mark.parametrize("dense", [True, False])
def test_ward_clusters_stops_at_the_greedy_ward_clusters(dense, monkeypatch):
    import svq_modules.hierarchy as hierarchy_module

    if not dense:
        monkeypatch.setattr(hierarchy_module, "_DENSE_MAX_GROUP", 0)
    g = torch.Generator().manual_seed(5)
    n = 40
    points = torch.randn(n, 2, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 20, (n,), generator=g).double()
    labels = torch.randint(0, 3, (n,), generator=g) * 7  # any label values
    clusters = ward_clusters(points, counts, labels, 4)
    assert clusters.dtype == torch.long and clusters.shape == (n,)
    # reference: per label, greedy Ward merges until 4 clusters are left
    for value in labels.unique():
        members = (labels == value).nonzero().squeeze(1)
        sub = greedy_ward(counts[members], points[members] * counts[members, None])
        keep = len(members) - 4  # the first merges
        by_cost = sorted(sub, key=lambda m: m[1])[:keep]
        maximal = [m for m, _ in by_cost if not any(m < other for other, _ in by_cost)]
        ref = {frozenset(members[list(m)].tolist()) for m in maximal}
        ref |= {frozenset([int(i)]) for i in members if not any(int(j) in m for m in ref for j in [i])}
        ours = {frozenset(members[clusters[members] == c].tolist()) for c in clusters[members].unique()}
        assert ours == ref
    with pytest.raises(ValueError, match="max_clusters"):
        ward_clusters(points, counts, labels, 0)


def test_labelled_candidate_rows_equal_a_masked_full_scan():
    g = torch.Generator().manual_seed(2)
    m, d, k = 300, 4, 5
    mu = torch.randn(m + 1, d, generator=g, dtype=torch.float64)
    weight = torch.rand(m + 1, generator=g, dtype=torch.float64) + 0.5
    label = torch.randint(0, 12, (m + 1,), generator=g)
    label[:40] = 99  # one large label
    active = torch.arange(m)
    rows = active[torch.randperm(m, generator=g)[:120]].sort().values
    cand, cost = candidate_rows(rows, active, mu, weight, mu.pow(2).sum(-1), "ward", k, 1 << 10, label)
    full = torch.cdist(mu[rows], mu[active]).pow(2) / (1 / weight[rows, None] + 1 / weight[None, active])
    full[label[rows, None] != label[None, active]] = float("inf")
    full[rows[:, None] == active[None, :]] = float("inf")
    ref_cost, ref_j = full.topk(k, dim=1, largest=False)
    torch.testing.assert_close(cost, ref_cost)
    finite = torch.isfinite(ref_cost)
    assert torch.equal(cand[finite], active[ref_j][finite]) and (cand[~finite] == m).all()


def test_identical_items_never_merge_across_labels():
    """Copies of points under any int64 labels (negative, huge): clusters and cells never straddle labels."""
    g = torch.Generator().manual_seed(6)
    points = torch.randn(700, 2, generator=g, dtype=torch.float64).repeat(2, 1)
    labels = torch.tensor([-5, 3]).repeat_interleave(700)
    for lab in (labels, labels * (1 << 40)):
        clusters = ward_clusters(points, torch.ones(1400, dtype=torch.float64), lab, 700)
        for c in torch.unique(clusters):
            assert torch.unique(lab[clusters == c]).numel() == 1
        built = build_constrained_hierarchy(points, None, None, lab[None])
        inside = built.node_level == 1  # merges of the constrained phase
        members = {i: {i} for i in range(1400)}
        for i, (a, b) in enumerate(built.hierarchy.children.tolist()):
            members[1400 + i] = members[a] | members[b]
            if bool(inside[1400 + i]):
                assert torch.unique(lab[list(members[1400 + i])]).numel() == 1

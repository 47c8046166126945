"""Entropy-constrained codeword choice: ``ScalableVQ.quantize(x, rate_weight)`` and ``compress --rate-weight``.

The choice is checked against a brute-force argmin of ``||x - c_k||^2 + lam * bits_k``;
its effect (smaller files, larger errors) against the plain nearest codeword.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mixtures import mixture, train

from svq_modules.cli import main
from svq_modules.nearest import layered_codebook, nearest_codewords, prefer_neighbours
from svq_modules.nn import ScalableVQ
from svq_modules.validation import check_layer_weights, check_weight


@pytest.fixture(scope="module")
def built() -> tuple[ScalableVQ, torch.Tensor]:
    """A trained and built module (K=128, D=4) on a mixture whose components have very unequal weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, _ = mixture(0, n=8192, k=24, sep=3.0)
    x = torch.cat([x, x[:512] + 0.1 * torch.randn(512, 4, generator=g)])  # a few components much more frequent
    vq = train(ScalableVQ(4, 128, bits=[3, 2, 2], decay=0.8), x)
    vq.update()
    return vq, x


def brute_force(x: torch.Tensor, codebook: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    cost = (x.double()[:, None, :] - codebook.double()[None]).pow(2).sum(-1) + penalty.double()[None]
    return cost.argmin(1)


def test_nearest_codewords_bias_is_added_to_the_squared_distance():
    g = torch.Generator().manual_seed(0)
    x, cb = torch.randn(300, 5, generator=g), torch.randn(40, 5, generator=g)
    bias = torch.rand(40, generator=g) * 3
    for chunk in (40, 1000, 1 << 20):  # one row per block, several, all at once
        idx, gap = nearest_codewords(x, cb, bias=bias, chunk_elements=chunk, with_gap=True)
        assert torch.equal(idx, brute_force(x, cb, bias))
        cost = torch.cdist(x, cb).pow(2) + bias
        best2 = cost.topk(2, dim=1, largest=False).values
        assert torch.allclose(gap, best2[:, 1] - best2[:, 0], atol=1e-4)


def test_code_lengths_are_a_complete_code(built):
    vq, _ = built
    bits = vq.index.code_lengths()
    assert bits.shape == (vq.codebook_size,) and bool((bits > 0).all())
    assert math.isclose(float(torch.exp2(-bits).sum()), 1.0, rel_tol=1e-9)  # Kraft equality: a probability per code
    # frequent codes are cheap: the mean length over the data is the ideal full-depth rate, below log2 K
    mean_bits = float(bits[vq.quantize(built[1])].mean())
    assert mean_bits < math.log2(vq.codebook_size)


def test_rate_weight_picks_the_least_error_plus_weighted_bits(built):
    vq, x = built
    assert torch.equal(vq.quantize(x, 0.0), vq.quantize(x))
    assert torch.equal(vq.quantize(x), brute_force(x, vq.codebook, torch.zeros(vq.codebook_size)))
    for lam in (0.05, 0.5, 5.0):
        assert torch.equal(vq.quantize(x, lam), brute_force(x, vq.codebook, lam * vq.index.code_lengths()))
    # relative: lam times the mean squared distance of x to its nearest codewords
    mean_err = float((x - vq.codebook[vq.quantize(x)]).pow(2).sum(1).mean())
    assert torch.equal(vq.quantize(x, 0.7, relative=True), vq.quantize(x, 0.7 * mean_err))


def test_rate_weight_trades_rate_for_error(built):
    vq, x = built
    mean_err = float((x - vq.codebook[vq.quantize(x)]).pow(2).sum(1).mean())
    sizes, errors, lengths = [], [], []
    for lam in (0.0, 0.5 * mean_err, 2.0 * mean_err):
        idx = vq.quantize(x, lam)
        errors.append(float((x - vq.codebook[idx]).pow(2).mean()))
        lengths.append(float(vq.index.code_lengths()[idx].mean()))
        sizes.append(sum(map(len, vq.compress(x, rate_weight=lam))))
    assert lengths[0] > lengths[1] > lengths[2], lengths
    assert errors[0] < errors[1] < errors[2], errors
    assert sizes[0] > sizes[1] > sizes[2], sizes
    # compress / compress_items with a rate weight decode to the codewords the same choice picks
    lam = mean_err
    assert torch.equal(vq.decompress(vq.compress(x, rate_weight=lam)), vq.codebook[vq.quantize(x, lam)])
    items = vq.compress_items(x[None].expand(2, -1, -1), rate_weight=lam)
    assert torch.equal(vq.decompress_items(items["strings"], items["shape"])[1], vq.codebook[vq.quantize(x, lam)])


def test_relative_weight_in_half_precision_survives_far_vectors(built):
    """The mean error of ``relative`` is summed in float64: a few far vectors must not overflow float16 and turn
    every cost into inf (which would send every vector to code 0)."""
    vq, x = built
    far = x.clone()
    far[:5] *= 200.0  # squared errors far above float16's largest value
    half = vq.quantize(far.half(), 1.0, relative=True)
    assert torch.equal(half, vq.quantize(far.half().float(), 1.0, relative=True))  # distances run in float32
    assert half.unique().numel() > 1


def test_bias_shape_and_overflowing_weights_are_refused(built):
    vq, x = built
    with pytest.raises(ValueError, match=r"^bias must be \[K\] = \[128\] \(one per codeword\), got shape \[3\]$"):
        nearest_codewords(x, vq.codebook, bias=torch.zeros(3))
    idx, _ = nearest_codewords(x, vq.codebook, bias=vq.index.code_lengths())  # float64 bias, float32 codebook
    assert torch.equal(idx, brute_force(x, vq.codebook, vq.index.code_lengths()))
    with pytest.raises(ValueError, match=r"^rate_weight=1e\+300 is too large: its penalties overflow torch.float32"):
        vq.quantize(x, 1e300)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1", None])
def test_bad_rate_weight_is_refused(built, bad):
    vq, x = built
    with pytest.raises(ValueError, match=r"^rate_weight must be a finite float >= 0, got "):
        vq.quantize(x, bad)


def test_rate_weight_needs_update():
    vq = ScalableVQ(4, 16)
    x = torch.randn(64, 4)
    vq.train()
    vq(x)
    vq.eval()
    assert vq.quantize(x).shape == (64,)  # the nearest codeword needs no tables
    with pytest.raises(RuntimeError, match="update"):
        vq.quantize(x, 1.0)


def test_check_weight():
    assert check_weight(0, "w") == 0.0 and check_weight(np.float32(2.5), "w") == 2.5
    for bad in (-0.1, math.nan, math.inf, False, "0", [1.0]):
        with pytest.raises(ValueError, match=r"^w must be a finite float >= 0, got "):
            check_weight(bad, "w")


def test_compress_rate_weight_option(tmp_path, capsys):
    """Arrays: ``--rate-weight`` gives a smaller file that decodes; a bad value exits 1 with one line, no file."""
    x, _ = mixture(3, n=4000, k=12, d=3)
    np.save(tmp_path / "x.npy", x.numpy())
    sizes = {}
    for w in ("0", "3"):
        out = tmp_path / f"w{w}.svq"
        assert main(["compress", str(tmp_path / "x.npy"), "-o", str(out), "--rate-weight", w, "--seed", "0", "-q"]) == 0
        sizes[w] = out.stat().st_size
        assert main(["decompress", str(out), "-o", str(tmp_path / f"w{w}.npy"), "-q"]) == 0
    assert sizes["3"] < sizes["0"], sizes
    capsys.readouterr()
    bad = tmp_path / "bad.svq"
    assert main(["compress", str(tmp_path / "x.npy"), "-o", str(bad), "--rate-weight", "-1"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --rate-weight must be a finite float >= 0, got -1.0\n" and not bad.exists()


def reference_prefer_neighbours(x, codebook, chosen, bits, lam, repeat, bias=None):
    """Row by row, left to right (the same dependencies as anti-diagonals): own choice or a neighbour's codeword."""
    out = chosen.clone()
    h, w = chosen.shape
    bias = torch.zeros(codebook.shape[0], dtype=torch.float64) if bias is None else bias
    for i in range(h):
        for j in range(w):
            def cost(k, share, v=x[i, j]):
                return float((v - codebook[k]).pow(2).sum()) + float(bias[k]) + lam * share * float(bits[k])
            best_k, best = int(out[i, j]), cost(int(out[i, j]), 1.0)
            for ni, nj in ((i, j - 1), (i - 1, j)):
                if ni >= 0 and nj >= 0:
                    k = int(out[ni, nj])
                    if cost(k, repeat) < best:
                        best_k, best = k, cost(k, repeat)
            out[i, j] = best_k
    return out


def test_prefer_neighbours_against_a_sequential_reference(built):
    vq, x = built
    g = torch.Generator().manual_seed(2)
    grid = x[torch.randperm(x.shape[0], generator=g)[: 2 * 9 * 13]].reshape(2, 9, 13, 4).double()
    cb, bits = vq.codebook.double(), vq.index.code_lengths()
    for lam, repeat in ((0.5, 0.4), (2.0, 0.0), (0.1, 0.9)):
        chosen = vq.quantize(grid.float(), lam)
        out = prefer_neighbours(grid, cb, chosen, bits, lam, repeat)
        for b in range(2):
            assert torch.equal(out[b], reference_prefer_neighbours(grid[b], cb, chosen[b], bits, lam, repeat))
        if repeat == 0.0:  # a free repeat: the first vector's codeword may spread, never a worse-coded choice
            assert (out != chosen).any()
    # repeat = 1 adds nothing to an entropy-constrained choice (it already minimizes the same cost)
    chosen = vq.quantize(grid.float(), 0.5)
    assert torch.equal(prefer_neighbours(grid, cb, chosen, bits, 0.5, 1.0), chosen)


def test_prefer_neighbours_with_a_bias_against_the_reference(built):
    """The bias (here the spread of a layered codebook) counts in full whether a codeword is repeated or not."""
    vq, x = built
    g = torch.Generator().manual_seed(4)
    grid = x[torch.randperm(x.shape[0], generator=g)[: 7 * 11]].reshape(7, 11, 4).double()
    weights = [2.0] + [0.0] * (vq.num_layers - 2) + [1.0]
    cb, spread = vq.index.layered_codebook(weights)
    bits = vq.index.code_lengths()
    chosen = vq.quantize(grid.float(), 0.5, layer_weights=weights)
    out = prefer_neighbours(grid, cb, chosen, bits, 0.5, 0.3, spread)
    assert torch.equal(out, reference_prefer_neighbours(grid, cb, chosen, bits, 0.5, 0.3, spread))
    assert not torch.equal(out, prefer_neighbours(grid, cb, chosen, bits, 0.5, 0.3))  # the bias changes choices


# ----------------------------------------------------------------- layer weights
def test_layered_codebook_is_the_weighted_error():
    """sum_l w_l ||x - c_lk||^2 (weights normalised) = ||x - c_k||^2 + bias_k for every x; bias = spread >= 0."""
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(3, 20, 4, generator=g, dtype=torch.float64)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    cb, bias = layered_codebook(centers, weights)
    want = sum(w / 3.0 * (x[:, None] - centers[layer][None]).pow(2).sum(-1) for layer, w in enumerate(weights))
    torch.testing.assert_close((x[:, None] - cb[None]).pow(2).sum(-1) + bias, want)
    assert bool((bias >= 0).all()) and bool((bias > 0).any())
    one, none = layered_codebook(centers, torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))
    assert torch.equal(one, centers[2]) and bool((none == 0).all())  # one layer weighed: its centres, no spread


def test_layer_weights_pick_the_least_weighted_error_over_the_layers(built):
    """Against a brute force over every codeword's reconstructions after each layer (``vq.reconstruct``)."""
    vq, x = built
    num_codes, num_layers = vq.codebook_size, vq.num_layers
    recon = torch.stack([vq.reconstruct(torch.arange(num_codes), n) for n in range(1, num_layers + 1)]).double()
    bits = vq.index.code_lengths()
    xs = x[:3000].double()
    err = (xs[None, :, None, :] - recon[:, None]).pow(2).sum(-1)  # [L, N, K]
    default_weights = [0.0] * (num_layers - 1) + [1.0]
    for weights in ([2.0, 2.0] + [0.0] * (num_layers - 3) + [1.0], [1.0] * num_layers):
        w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        for lam in (0.0, 0.5):
            cost = torch.einsum("l,lnk->nk", w, err) + lam * bits
            got = vq.quantize(x[:3000], lam, layer_weights=weights)
            picked = cost.gather(1, got[:, None]).squeeze(1)
            assert bool((picked <= cost.min(1).values + 1e-5).all())  # the least weighted cost, up to float32
            default = cost.gather(1, vq.quantize(x[:3000], lam)[:, None]).squeeze(1)
            assert float(picked.mean()) < float(default.mean())  # a pick the default does not make
    # full depth alone is the default pick; relative weights as without layer weights
    assert torch.equal(vq.quantize(x, 0.5, layer_weights=default_weights), vq.quantize(x, 0.5))
    assert torch.equal(vq.quantize(x, 0.0, layer_weights=default_weights), vq.quantize(x))
    weights = [2.0, 2.0] + [0.0] * (num_layers - 3) + [1.0]
    mean_err = float((x - vq.codebook[vq.quantize(x)]).pow(2).sum(1).mean())
    assert torch.equal(vq.quantize(x, 0.7, relative=True, layer_weights=weights),
                       vq.quantize(x, 0.7 * mean_err, layer_weights=weights))


@pytest.mark.parametrize("bad", [[1.0, 2.0], [0.0, 0.0, 0.0, 0.0], "1,1,1,1", [1.0, -1.0, 0.0, 1.0],
                                 [math.nan, 0.0, 0.0, 1.0], 3.0])
def test_bad_layer_weights_are_refused(built, bad):
    vq, x = built
    assert vq.num_layers == 4
    with pytest.raises(ValueError, match=r"^layer_weights"):
        vq.quantize(x, layer_weights=bad)


def test_check_layer_weights():
    assert check_layer_weights((1, np.float32(0.5), 0), 3, "w") == [1.0, 0.5, 0.0]
    assert check_layer_weights(torch.tensor([0.0, 2.0]), 2, "w") == [0.0, 2.0]
    with pytest.raises(ValueError, match=r"^w must be 2 finite numbers >= 0 \(one per layer\), not all 0, got \[0, 0\]$"):
        check_layer_weights([0, 0], 2, "w")
    with pytest.raises(ValueError, match=r"^w\[1\] must be a finite float >= 0, got 'x'$"):
        check_layer_weights([1, "x"], 2, "w")


def test_relative_weight_of_vectors_on_their_codewords(built):
    """A mean nearest error of 0 makes the relative weight 0: the nearest codewords, with or without layer weights."""
    vq, _ = built
    on = vq.codebook.clone()
    nearest = vq.quantize(on)
    assert torch.equal(vq.quantize(on, 0.5, relative=True), nearest)
    weights = [0.0] * (vq.num_layers - 1) + [1.0]
    assert torch.equal(vq.quantize(on, 0.5, relative=True, layer_weights=weights), nearest)


def test_huge_layer_weights_are_their_ratios(built):
    vq, x = built
    small = [1.0, 1.0] + [0.0] * (vq.num_layers - 3) + [1.0]
    huge = [1e308 * w for w in small]  # each finite, their sum is not
    assert torch.equal(vq.quantize(x, 0.5, layer_weights=huge), vq.quantize(x, 0.5, layer_weights=small))
    with pytest.raises(ValueError, match="not all 0"):
        layered_codebook(torch.zeros(2, 3, 1), torch.zeros(2))


def test_layer_weights_errors_are_one_line(built):
    vq, x = built
    with pytest.raises(ValueError) as err:
        vq.quantize(x, layer_weights=torch.ones(2, vq.num_layers))
    assert "\n" not in str(err.value) and f"got a Tensor of shape [2, {vq.num_layers}]" in str(err.value)
    far = ScalableVQ(2, 4, bits=[1, 1])
    far.train()
    far(torch.randn(64, 2))
    far.eval()
    far.update()
    far.index.tree_center.mul_(1e20)  # reconstructions beyond float32 squared distances (a build refuses such data)
    with pytest.raises(ValueError, match=r"^layer_weights: the layers' reconstructions lie too far apart"):
        far.quantize(torch.zeros(3, 2), layer_weights=[1.0, 0.0, 1.0])


def test_layer_weights_need_update():
    vq = ScalableVQ(3, 16, bits=[2, 2])
    with pytest.raises(RuntimeError, match="update"):
        vq.quantize(torch.randn(8, 3), layer_weights=[1.0, 1.0, 1.0])


def test_repeat_bits_option(tmp_path, capsys):
    """Images only, a share in [0, 1]: refused in one line otherwise, and for arrays."""
    x, _ = mixture(3, n=500, k=6, d=3)
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "x.svq"
    assert main(["compress", str(tmp_path / "x.npy"), "-o", str(out), "--repeat-bits", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --repeat-bits: an option for images (it needs the latents' grid); drop it for arrays\n"
    assert not out.exists()
    assert main(["compress", str(tmp_path / "x.npy"), "-o", str(out), "--layer-weights", "1,1,1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --layer-weights: an option for images") and err.count("\n") == 1
    assert not out.exists()


# ----------------------------------------------------------------- entropy-constrained training
def test_usage_bits_follow_the_ema_counts():
    """bits_k = -log2 of code k's share of the EMA counts (clamped at 0) plus eps each: a complete code."""
    vq = ScalableVQ(2, 4, bits=[1, 1], eps=0.5)
    vq.learner.cluster_size.copy_(torch.tensor([6.5, 2.5, 0.5, -0.5]))  # + eps: 7, 3, 1, 0.5 of 11.5
    want = torch.tensor([-math.log2(v / 11.5) for v in (7.0, 3.0, 1.0, 0.5)], dtype=torch.float64)
    torch.testing.assert_close(vq.learner.usage_bits(), want)
    assert float(torch.exp2(-vq.learner.usage_bits()).sum()) == pytest.approx(1.0)
    vq.learner.eps = 0.0  # a code never used costs a finite (huge) number of bits, never inf or NaN
    vq.learner.cluster_size.zero_()[0] = 1.0
    assert bool(torch.isfinite(vq.learner.usage_bits()).all())
    vq.learner.cluster_size.zero_()  # no counts at all: every code costs the same, so the pick stays the nearest
    bits = vq.learner.usage_bits()
    assert bool(torch.isfinite(bits).all()) and bool((bits == bits[0]).all())


def _trained(weight: float, x: torch.Tensor, steps: int = 12) -> ScalableVQ:
    torch.manual_seed(0)
    vq = ScalableVQ(4, 64, bits=[3, 3], train_rate_weight=weight).train()
    for b in x.split(512)[:steps]:
        vq(b)
    return vq


def test_training_assignment_is_the_rate_weighted_pick():
    """In training mode each vector takes the least ||x - c_k||^2 + lam * usage_bits_k (lam = w x the batch's mean
    nearest error): the codes forward returns, checked against a brute-force argmin before the step moves the codebook."""
    x, _ = mixture(0, n=4096, k=24, sep=3.0)
    vq = _trained(2.0, x, steps=4)
    batch = x[2048:2560]
    codebook, bits = vq.codebook.clone(), vq.learner.usage_bits()
    mean_err = float((batch - codebook[brute_force(batch, codebook, torch.zeros(64))]).pow(2).sum(1).mean())
    want = brute_force(batch, codebook, 2.0 * mean_err * bits)
    nearest = brute_force(batch, codebook, torch.zeros(64))
    got = vq(batch).indices
    assert torch.equal(got, want)
    assert int((got != nearest).sum()) > 10  # the weight does move vectors away from their nearest code
    # eval mode, or a weight of 0: the nearest code
    vq.eval()
    assert torch.equal(vq(batch).indices, brute_force(batch, vq.codebook, torch.zeros(64)))


def test_rate_weighted_training_concentrates_the_codes():
    """ECVQ trades error for rate: the training assignment of a module trained with a larger weight has lower
    entropy and higher error on the same batches."""
    x, _ = mixture(1, n=8192, k=24, sep=3.0)

    def entropy_and_error(vq: ScalableVQ) -> tuple[float, float]:
        vq.train()
        idx = torch.cat([vq(b).indices for b in x.split(512)])  # the training assignment of every vector
        p = torch.bincount(idx, minlength=64).double() / idx.numel()
        h = float(-(p[p > 0] * p[p > 0].log2()).sum())
        return h, float((x - vq.codebook[idx]).pow(2).sum(1).mean())

    (h0, e0), (h1, e1), (h4, e4) = (entropy_and_error(_trained(w, x, steps=16)) for w in (0.0, 1.0, 4.0))
    assert h0 > h1 > h4, (h0, h1, h4)
    assert e0 < e1 < e4, (e0, e1, e4)

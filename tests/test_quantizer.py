"""Tests of the ScalableVQ nn.Module (issue 5). Small sizes: the whole file runs in seconds on 2 cores."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from mixtures import mixture, train

from svq_modules.nn import ScalableVQ, VQOutput


@pytest.fixture(scope="module")
def built() -> tuple[ScalableVQ, torch.Tensor]:
    """A trained and built module (K=64, D=4, bits [2, 2, 1] -> 4 layers) and its data."""
    torch.manual_seed(0)
    x, _ = mixture(0, n=4096, k=24)
    vq = train(ScalableVQ(4, 64, bits=[2, 2, 1], decay=0.8), x)
    vq.update()
    return vq, x


# ---------------------------------------------------------------- gradients / losses
@pytest.mark.parametrize("channel_first", [False, True])
def test_straight_through_gradient_reaches_input(channel_first):
    torch.manual_seed(0)
    vq = ScalableVQ(8, 32, channel_first=channel_first)
    x = torch.randn(2, 8, 5, 6) if channel_first else torch.randn(2, 5, 6, 8)
    x.requires_grad_(True)
    out = vq(x)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == x.shape and out.indices.shape == ((2, 5, 6) if channel_first else (2, 5, 6))
    weight = torch.randn_like(x)
    (out.quantized * weight).sum().backward()
    # straight-through: d quantized / d x = identity
    assert torch.equal(x.grad, weight)
    # the commitment loss alone pulls x towards its codeword
    x.grad = None
    vq.eval()
    vq(x).loss.backward()
    flat = x.movedim(1, -1) if channel_first else x
    q = vq.codebook[vq.quantize(x)]
    expected = 2 * vq.commitment_weight * (flat - q) / flat.numel()
    got = x.grad.movedim(1, -1) if channel_first else x.grad
    torch.testing.assert_close(got, expected)


def test_quantized_value_is_exactly_the_codeword():
    torch.manual_seed(0)
    vq = ScalableVQ(8, 32).eval()
    x = torch.randn(100, 8, requires_grad=True)
    out = vq(x)
    assert torch.equal(out.quantized, vq.codebook[out.indices])
    assert torch.equal(out.indices, vq.quantize(x))


def test_first_three_fields_unpack_like_vector_quantize():
    """The docstring's promise for VectorQuantize users: ``quantized, indices, loss = vq(x)[:3]``."""
    torch.manual_seed(0)
    vq = ScalableVQ(8, 32)
    x = torch.randn(2, 50, 8)
    out = vq(x)
    quantized, indices, loss = out[:3]
    assert quantized is out.quantized and indices is out.indices and loss is out.loss
    assert loss.shape == () and indices.shape == (2, 50)
    assert VQOutput._fields[:3] == ("quantized", "indices", "loss")


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(300, 8),  # random
        torch.ones(300, 8) * 3.0,  # all vectors equal
        torch.randn(5, 8),  # fewer vectors than codes
        torch.randn(1, 8),  # a single vector
    ],
    ids=["random", "all-equal", "fewer-than-codes", "single"],
)
@pytest.mark.parametrize("kmeans_init", [True, False])
def test_loss_finite_on_random_and_degenerate_data(x, kmeans_init):
    torch.manual_seed(0)
    vq = ScalableVQ(8, 64, kmeans_init=kmeans_init, decay=0.9)
    for _ in range(5):
        xi = x.clone().requires_grad_(True)
        out = vq(xi)
        assert torch.isfinite(out.loss) and torch.isfinite(out.perplexity)
        out.loss.backward()
        assert torch.isfinite(xi.grad).all()
    assert torch.isfinite(vq.codebook).all()
    assert torch.isfinite(vq.learner.cluster_size).all() and torch.isfinite(vq.learner.embed_sum).all()
    assert vq.eval().update()  # a tree can be built from degenerate statistics too
    levels = [vq(x, num_layers=l).quantized for l in range(1, vq.num_layers + 1)]
    assert all(torch.isfinite(q).all() for q in levels)


def test_learnable_codebook_gets_gradients():
    torch.manual_seed(0)
    vq = ScalableVQ(8, 16, learnable_codebook=True)
    assert isinstance(vq.codebook, torch.nn.Parameter)
    vq(torch.randn(256, 8))  # first batch: k-means initialization
    x = torch.randn(256, 8)
    out = vq(x)
    assert out.codebook_loss > 0
    out.loss.backward()
    used = torch.zeros(16, dtype=torch.bool)
    used[out.indices] = True
    assert (vq.codebook.grad[used].abs().sum(1) > 0).all()
    assert (vq.codebook.grad[~used] == 0).all()
    # an optimizer step changes the codebook, which makes a built hierarchy stale
    assert vq.eval().update()
    assert not vq.is_stale
    torch.optim.SGD(vq.parameters(), lr=0.1).step()
    assert vq.is_stale


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kmeans_init", [True, False])
def test_gaussian_mixture_converges_like_kmeans(seed, kmeans_init):
    from sklearn.cluster import KMeans

    x, centers = mixture(seed)
    torch.manual_seed(seed)
    vq = train(ScalableVQ(4, 16, decay=0.8, kmeans_init=kmeans_init), x, epochs=8)
    mse = (vq(x).quantized - x).pow(2).sum(1).mean().item()
    ref = KMeans(16, n_init=4, random_state=0).fit(x.numpy()).inertia_ / x.shape[0]
    assert mse <= 1.1 * ref, (mse, ref)
    # every true center has a codeword near it
    d = torch.cdist(centers, vq.codebook).amin(1)
    assert (d < 1.0).all(), d


def test_dead_codes_are_reseeded():
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    vq = ScalableVQ(4, 16, decay=0.9, threshold_ema_dead_code=2.0, relocate_codes=False)
    vq(x)  # first batch: initialization
    with torch.no_grad():
        vq.codebook[3] = 1000.0  # far away: no vector will use it
        vq.learner.cluster_size[3] = 0.0
        vq.learner.embed_sum[3] = 0.0
    batch = torch.randn(512, 4)
    out = vq(batch)
    assert (out.indices != 3).all()
    # re-seeded with a vector of the current batch
    assert (batch == vq.codebook[3]).all(1).any()
    assert vq.learner.cluster_size[3] == 2.0
    assert vq(batch).indices.eq(3).any()


def test_relocation_moves_a_redundant_code():
    """Two codes sharing one cluster while a single code straddles two: a swap fixes it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    x = centers[torch.randint(3, (3000,), generator=g)] + 0.5 * torch.randn(3000, 2, generator=g)
    vq = ScalableVQ(2, 3, decay=0.8, kmeans_init=False, relocate_every=1)
    vq(x[:512])
    with torch.no_grad():  # plant the local minimum
        vq.codebook.copy_(torch.tensor([[-0.5, 0.0], [0.5, 0.0], [10.0, 10.0]]))
    # a frozen codebook (no EMA step) isolates the relocation
    vq.learner.ema_update = False
    vq.learner.cluster_size.fill_(100.0)
    for b in x.split(500):
        vq(b)
    assert torch.cdist(centers, vq.codebook).amin(1).max() < 2.0


def test_eval_never_changes_the_codebook():
    torch.manual_seed(0)
    x = torch.randn(1024, 8)
    vq = ScalableVQ(8, 32)
    vq(x)
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(256, 8) * 5)
    vq.quantize(x)
    after = vq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # an untrained module in eval mode is not initialized by a forward either
    fresh = ScalableVQ(8, 32).eval()
    cb = fresh.codebook.clone()
    fresh(x)
    assert torch.equal(fresh.codebook, cb) and not bool(fresh.learner.initted)


# ---------------------------------------------------------------- layers
def test_num_layers_before_update_raises():
    vq = ScalableVQ(4, 16, bits=[2, 1])
    x = torch.randn(64, 4)
    vq(x)
    with pytest.raises(RuntimeError, match="update()"):
        vq(x, num_layers=1)
    for call in (lambda: vq.encode(x), lambda: vq.decode(torch.zeros(1, 3, dtype=torch.long)), lambda: vq.rates()):
        with pytest.raises(RuntimeError, match="update()"):
            call()
    assert not vq.is_built and not vq.is_stale


def test_layers_mse_non_increasing_and_last_is_plain(built):
    vq, x = built
    assert vq.is_built and not vq.is_stale
    x = x.clone().requires_grad_(True)
    plain = vq(x)
    mses = []
    for l in range(1, vq.num_layers + 1):
        out = vq(x, num_layers=l)
        assert torch.equal(out.indices, plain.indices)
        mses.append((out.quantized - x).pow(2).mean().item())
    assert all(b <= a for a, b in zip(mses, mses[1:])), mses
    assert mses[0] > mses[-1]
    last = vq(x, num_layers=vq.num_layers)
    assert torch.equal(last.quantized, plain.quantized)
    # gradients still pass straight through at every layer
    g = torch.randn_like(x)
    (vq(x, num_layers=1).quantized * g).sum().backward()
    assert torch.equal(x.grad, g)
    with pytest.raises(ValueError, match="num_layers"):
        vq(x, num_layers=vq.num_layers + 1)
    with pytest.raises(ValueError, match="num_layers"):
        vq(x, num_layers=0)


def test_encode_decode_reconstruct_match_forward(built):
    vq, x = built
    x = x[:300].reshape(3, 100, 4)
    codes = vq.encode(x)
    assert codes.shape == (vq.num_layers, 3, 100) and codes.dtype == torch.long
    idx = vq.quantize(x)
    for l in range(1, vq.num_layers + 1):
        ref = vq(x, num_layers=l).quantized
        assert torch.equal(vq.decode(codes[:l]), ref)
        assert torch.equal(vq.decode(codes, num_layers=l), ref)
        assert torch.equal(vq.reconstruct(idx, l), ref)
    assert torch.equal(vq.decode(codes), vq.codebook[idx])
    bad = codes.clone()
    bad[0, 0, 0] = 99
    with pytest.raises(ValueError, match="invalid code"):
        vq.decode(bad)


def test_rates_are_cumulative(built):
    vq, x = built
    rates = vq.rates(vq.quantize(x))
    assert rates.raw_bits.shape == (vq.num_layers,) and rates.entropy_bits.shape == (vq.num_layers,)
    assert (rates.raw_bits.diff() >= 0).all() and (rates.entropy_bits.diff() >= -1e-9).all()
    assert rates.raw_bits[0] == 2.0  # base layer: 2 bits for everyone
    assert rates.entropy_bits[-1] <= 6.0 + 1e-6  # at most log2(K) bits ideal entropy
    default = vq.rates()
    assert torch.isfinite(default.entropy_bits).all()


def test_stale_hierarchy_is_reported_once():
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    vq = ScalableVQ(4, 16, bits=[2, 1])
    vq(x)
    vq.update()
    assert vq.is_built and not vq.is_stale
    vq(x)  # a training step changes the codebook
    assert vq.is_stale
    vq.eval()
    with pytest.warns(RuntimeWarning, match="update"):
        vq(x, num_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq(x, num_layers=2)  # only once
        vq.update()
        assert not vq.is_stale
        vq(x, num_layers=2)


def test_update_rebuilds_only_when_missing_stale_or_forced():
    """``update(force=False) -> bool`` (CompressAI's convention): True when it built, False when the tables were fresh."""
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    vq = ScalableVQ(4, 16, bits=[2, 1])
    builds = []
    build = vq.index.build
    vq.index.build = lambda *args, **kwargs: (builds.append(1), build(*args, **kwargs))[1]
    vq(x)
    assert vq.update() is True and len(builds) == 1  # missing
    assert vq.update() is False and len(builds) == 1  # fresh: nothing rebuilt
    vq(x)  # a training step moves the codebook
    assert vq.is_stale
    assert vq.update() is True and len(builds) == 2 and not vq.is_stale
    assert vq.update() is False and len(builds) == 2
    assert vq.update(force=True) is True and len(builds) == 3
    # a change that bypasses the version counter is seen through the leaves
    with torch.no_grad():
        vq.codebook[0] += 1.0
    assert vq.update() is True and len(builds) == 4


def test_bits_validation():
    assert ScalableVQ(4, 16, bits=[3, 1]).num_layers == 3
    assert ScalableVQ(4, 16, bits=2, num_layers=3).num_layers == 3
    with pytest.raises(ValueError, match="positive"):
        ScalableVQ(4, 16, bits=[3, 0])
    with pytest.raises(ValueError, match="num_layers"):
        ScalableVQ(4, 16, bits="balanced_values")
    with pytest.raises(ValueError, match="num_layers"):
        ScalableVQ(4, 16, bits=[2, 2], num_layers=5)


@pytest.mark.parametrize("bits", [2, "balanced_clusters", "balanced_values", lambda h, n: [2] * n])
def test_bit_proposals_fill_the_fixed_buffers(bits):
    torch.manual_seed(0)
    x, _ = mixture(1, n=1024, k=8)
    vq = train(ScalableVQ(4, 32, bits=bits, num_layers=3, decay=0.8), x, epochs=1)
    buffers = {name: (b.data_ptr(), b.shape) for name, b in vq.named_buffers()}
    vq.update()
    # update() fills the buffers allocated at construction (same storage, same shapes)
    assert buffers == {name: (b.data_ptr(), b.shape) for name, b in vq.named_buffers()}
    assert vq.tables.num_layers == 3
    assert torch.equal(vq(x, num_layers=3).quantized, vq(x).quantized)


# ---------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_into_fresh_module(built):
    vq, x = built
    buf = io.BytesIO()
    torch.save(vq.state_dict(), buf)
    buf.seek(0)
    fresh = ScalableVQ(4, 64, bits=[2, 2, 1])
    assert not fresh.is_built
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    assert fresh.is_built and not fresh.is_stale and bool(fresh.learner.initted)
    codes = vq.encode(x)
    assert torch.equal(fresh.encode(x), codes)
    for l in (1, vq.num_layers):
        assert torch.equal(fresh.decode(codes[:l]), vq.decode(codes[:l]))
    # loading into a module that was already trained and built replaces everything
    other = train(ScalableVQ(4, 64, bits=[2, 2, 1]), torch.randn(600, 4), epochs=1)
    assert other.update()
    other.load_state_dict(vq.state_dict())
    assert torch.equal(other.encode(x), codes)
    # a fresh module that was never trained is not re-initialized by training after loading
    fresh.train()
    fresh(x[:100])
    assert fresh.is_stale  # EMA step moved the codebook; it was not re-drawn from this batch
    assert (fresh.codebook - vq.codebook).abs().max() < 1.0


def test_unbuilt_state_dict_loads_and_double_works():
    torch.manual_seed(0)
    vq = ScalableVQ(4, 16, bits=[2, 1])
    x = torch.randn(256, 4)
    vq(x)
    fresh = ScalableVQ(4, 16, bits=[2, 1])
    fresh.load_state_dict(vq.state_dict())
    assert not fresh.is_built and torch.equal(fresh.codebook, vq.codebook)
    d = fresh.double().eval()
    assert d.update()
    assert d.codebook.dtype == torch.float64 and d.index.tree_center.dtype == torch.float64
    xd = x.double()
    assert d(xd).quantized.dtype == torch.float64
    assert torch.equal(d(xd, num_layers=3).quantized, d(xd).quantized)
    # float32 input into a float64 module: output keeps the input dtype
    assert d(x).quantized.dtype == torch.float32


@pytest.mark.parametrize("other", [(32, 4), (16, 8)], ids=["other-K", "other-D"])
def test_loading_checkpoint_of_other_shape_names_both(other):
    vq = ScalableVQ(4, 16, bits=[2, 1])
    k, d = other
    theirs = ScalableVQ(d, k, bits=[2, 1]).state_dict()
    with pytest.raises(RuntimeError) as err:
        vq.load_state_dict(theirs)
    msg = str(err.value)
    assert f"[{k}, {d}]" in msg and "[16, 4]" in msg


def test_loading_checkpoint_with_other_number_of_layers_fails():
    vq = ScalableVQ(4, 16, bits=[2, 1])
    with pytest.raises(RuntimeError, match="layers"):
        vq.load_state_dict(ScalableVQ(4, 16, bits=[2, 1, 1]).state_dict())


def test_from_codebook_wraps_a_codebook():
    from sklearn.cluster import KMeans

    x, _ = mixture(3, n=2048, k=8)
    km = KMeans(32, n_init=1, random_state=0).fit(x.numpy())
    codebook = torch.from_numpy(km.cluster_centers_).float()
    vq = ScalableVQ.from_codebook(codebook, x, bits=[2, 2]).eval()
    assert vq.is_built and not vq.is_stale
    assert torch.equal(vq.codebook, codebook)
    idx = vq.quantize(x)
    assert torch.equal(vq.learner.cluster_size, torch.bincount(idx, minlength=32).float())
    assert torch.equal(vq(x, num_layers=3).quantized, codebook[idx])
    # the same statistics given directly build the same tree
    by_stats = ScalableVQ.from_codebook(codebook, counts=vq.learner.cluster_size, sums=vq.learner.embed_sum, bits=[2, 2])
    assert torch.equal(by_stats.index.layers_leaf_node, vq.index.layers_leaf_node)
    # without data: uniform counts; the first training batch does not re-initialize it
    bare = ScalableVQ.from_codebook(codebook, bits=[2, 2])
    bare(x[:64])
    assert (bare.codebook - codebook).abs().max() < 1.0


# ---------------------------------------------------------------- dtypes
def test_bfloat16_under_autocast():
    torch.manual_seed(0)
    vq = ScalableVQ(8, 32, bits=[2, 2])
    x = torch.randn(256, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.Linear(8, 8)(x)
        assert h.dtype == torch.bfloat16
        out = vq(h)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert vq.codebook.dtype == torch.float32
    out.quantized.float().sum().backward()
    half = vq.eval()(x.to(torch.float16))
    assert half.quantized.dtype == torch.float16
    assert torch.equal(half.indices, vq.quantize(x.to(torch.float16).float()))


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_value_errors():
    vq = ScalableVQ(8, 16)
    with pytest.raises(ValueError, match="last dimension 7"):
        vq(torch.randn(10, 7))
    with pytest.raises(ValueError, match="NaN"):
        vq(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="Inf"):
        vq(torch.full((3, 8), float("inf")))
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(ValueError, match="floating-point"):
            vq(torch.zeros(4, 8, dtype=dtype))
    with pytest.raises(ValueError, match="NaN"):
        vq.quantize(torch.tensor([[1.0] * 7 + [float("nan")]]))
    cf = ScalableVQ(8, 16, channel_first=True)
    with pytest.raises(ValueError, match="channel-first"):
        cf(torch.randn(2, 3, 8))
    assert not bool(vq.learner.initted)  # nothing was learned from bad input

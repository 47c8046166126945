"""What users of the ScalableVQ module got wrong, one test per mistake: a clear error or the same answer, never a silent one."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

from svq_modules import BitstreamError
from svq_modules.nn import ScalableVQ


def _blobs(n_batches: int = 8, batch: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Batches of 4 well separated 2-D blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    x = centers[torch.randint(4, (n_batches * batch,), generator=g)] + 0.5 * torch.randn(n_batches * batch, 2, generator=g)
    return list(x.split(batch))


def _built(bits=(2, 1), k: int = 16, d: int = 3, seed: int = 0) -> ScalableVQ:
    g = torch.Generator().manual_seed(seed)
    return ScalableVQ.from_codebook(torch.randn(k, d, generator=g), bits=list(bits)).eval()


# ---------------------------------------------------------------- a. torch.compile
def _train(compiled: bool, **options) -> ScalableVQ:
    torch.manual_seed(0)
    vq = ScalableVQ(2, 8, bits=[1, 1], decay=0.5, kmeans_init=False, relocate_every=1, **options)
    model = torch.compile(vq, backend="aot_eager") if compiled else vq
    for b in _blobs():
        model(b)
    return vq


def test_training_a_torch_compiled_module():
    """Relocation and the NaN check used to be skipped under torch.compile: compiled training differed silently."""
    torch._dynamo.reset()
    eager, compiled = _train(False), _train(True)
    assert eager.learner.num_relocated > 0  # the batches do exercise the swap step
    assert compiled.learner.num_relocated == eager.learner.num_relocated
    assert compiled.learner.num_reseeded == eager.learner.num_reseeded
    torch.testing.assert_close(compiled.codebook, eager.codebook)
    assert int(compiled.learner.codebook_version) == int(eager.learner.codebook_version)
    bad = _blobs(1)[0].clone()
    bad[7, 1] = float("nan")
    for train in (True, False):
        vq = _train(False).train(train)
        before = vq.codebook.clone()
        model = torch.compile(vq, backend="aot_eager")
        with pytest.raises(ValueError, match="NaN"):
            model(bad)
        assert torch.equal(vq.codebook, before)
    torch._dynamo.reset()


def test_rate_weighted_training_under_torch_compile():
    """The rate-weighted pick (train_rate_weight) reads the batch's mean error on the host: compiled, it must
    still train exactly as eager does."""
    torch._dynamo.reset()
    eager, compiled = _train(False, train_rate_weight=1.0), _train(True, train_rate_weight=1.0)
    torch.testing.assert_close(compiled.codebook, eager.codebook)
    torch.testing.assert_close(compiled.learner.cluster_size, eager.learner.cluster_size)
    assert not torch.equal(eager.learner.cluster_size, _train(False).learner.cluster_size)  # the weight did act
    torch._dynamo.reset()


# ---------------------------------------------------------------- b. other bits
def test_loading_a_state_dict_made_with_other_bits():
    """A bits=[4, 2] state_dict loaded into a bits=[3, 3] module, which then reported [3, 3] but held [4, 2] tables."""
    theirs = _built(bits=[4, 2], k=64, d=2).state_dict()
    ours = ScalableVQ(2, 64, bits=[3, 3])
    with pytest.raises(RuntimeError) as err:
        ours.load_state_dict(theirs)
    msg = str(err.value)
    assert "[4, 2]" in msg and "[3, 3]" in msg and "\n" not in msg
    assert not ours.is_built  # nothing was half-loaded into the tables
    # an int proposal fixes only the number of layers: that is what is checked
    ScalableVQ(2, 64, bits=3, num_layers=3).load_state_dict(theirs)
    with pytest.raises(RuntimeError, match="layers"):
        ScalableVQ(2, 64, bits=3, num_layers=4).load_state_dict(theirs)
    # a state dict saved before update() holds no tables to disagree with
    ScalableVQ(2, 64, bits=[3, 3]).load_state_dict(ScalableVQ(2, 64, bits=[4, 2]).state_dict())


# ---------------------------------------------------------------- c. array-likes
def test_from_codebook_with_a_numpy_codebook():
    """``from_codebook(np_array)`` said "must be a [K, D] float tensor, got (16, 3)"."""
    g = np.random.default_rng(0)
    cb64 = g.normal(size=(16, 3))
    x64 = g.normal(size=(500, 3))
    ref = ScalableVQ.from_codebook(torch.from_numpy(cb64), torch.from_numpy(x64), bits=[2, 1])
    vq = ScalableVQ.from_codebook(cb64, x64, bits=[2, 1])
    assert vq.codebook.dtype == torch.float64  # a float array keeps its dtype
    assert torch.equal(vq.codebook, ref.codebook)
    assert torch.equal(vq.index.layers_leaf_node, ref.index.layers_leaf_node)
    # counts as an int array, indices as an int array
    idx = ref.quantize(torch.from_numpy(x64)).numpy()
    by_counts = ScalableVQ.from_codebook(cb64, counts=np.bincount(idx, minlength=16), bits=[2, 1])
    by_indices = ScalableVQ.from_codebook(cb64, x64, indices=idx, bits=[2, 1])
    assert torch.equal(by_indices.learner.cluster_size, ref.learner.cluster_size)
    assert torch.equal(by_counts.learner.cluster_size, ref.learner.cluster_size)
    # python lists: the default float dtype
    listed = ScalableVQ.from_codebook(cb64.tolist(), bits=[2, 1])
    assert listed.codebook.dtype == torch.float32
    torch.testing.assert_close(listed.codebook, torch.from_numpy(cb64).float())
    # what cannot be a codebook says what to pass
    with pytest.raises(ValueError, match=r"codebook must be \[K, D\]"):
        ScalableVQ.from_codebook(np.zeros(16), bits=[2, 1])
    with pytest.raises(ValueError, match="codebook must be a tensor or an array-like"):
        ScalableVQ.from_codebook({"a": 1}, bits=[2, 1])
    with pytest.raises(ValueError, match="indices must hold ints"):
        ScalableVQ.from_codebook(cb64, x64, indices=idx.astype(np.float32), bits=[2, 1])


# ---------------------------------------------------------------- d. stale warning
def test_layered_forward_in_train_mode_then_encode():
    """The README flow in train mode warned from inside torch, and the warning did not say what to do."""
    torch.manual_seed(0)
    z = torch.randn(512, 3)
    vq = ScalableVQ(3, 16, bits=[2, 1])
    vq(z)  # training step
    assert vq.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out3 = vq(z, num_layers=3)  # fresh tables: no warning; this call trains the codebook once more
    assert torch.equal(out3.quantized, vq.index.layer_centers(3)[out3.indices])  # the tables as built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        vq.encode(z)
        vq(z, num_layers=1)
        vq.encode(z)
    stale = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(stale) == 1  # once per build
    assert stale[0].filename == __file__ and stale[0].lineno == line  # the user's line, not torch's
    assert "update()" in str(stale[0].message) and "eval()" in str(stale[0].message)
    # and through forward, after the next build
    vq.eval()
    assert vq.update()
    vq.train()
    vq(z)
    vq.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        vq(z, num_layers=2)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_readme_module_example_runs_without_warning():
    """The module example of the README (train, then eval(), update(), layered calls) warns about nothing."""
    torch.manual_seed(0)
    z = torch.randn(2048, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq = ScalableVQ(dim=3, codebook_size=16, bits=[2, 1, 1])
        out = vq(z)
        loss = out.loss
        vq.eval()
        assert vq.update()
        out3 = vq(z, num_layers=3)
        codes = vq.encode(z)
        z_hat = vq.decode(codes[:3])
    assert torch.isfinite(loss) and torch.equal(z_hat, out3.quantized)


# ---------------------------------------------------------------- e. siblings
def test_bits_with_a_single_layer():
    """``ScalableVQ(4, 16, bits=2, num_layers=1)`` built and failed later; a module needs a base and a final layer."""
    with pytest.raises(ValueError, match="num_layers"):
        ScalableVQ(dim=4, codebook_size=16, bits=2, num_layers=1)


@pytest.mark.parametrize("bad", [0, 4, 2.0, True, "2"], ids=["zero", "too-many", "float", "bool", "str"])
def test_num_layers_out_of_range_or_not_an_int(bad):
    """A wrong ``num_layers`` anywhere raises one line naming it, before any work."""
    vq = _built()  # L = 3
    x = torch.randn(10, 3)
    codes = vq.encode(x)
    calls = [
        lambda: vq(x, num_layers=bad),
        lambda: vq.reconstruct(vq.quantize(x), bad),
        lambda: vq.compress(x, num_layers=bad),
        lambda: vq.decompress(vq.compress(x), num_layers=bad),
        lambda: vq.decode(codes, num_layers=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="num_layers") as err:
            call()
        assert "\n" not in str(err.value)


def test_num_layers_beyond_the_codes_given():
    vq = _built()
    codes = vq.encode(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"num_layers \(codes hold 2 layers\) must be an int in \[1, 2\], got 3"):
        vq.decode(codes[:2], num_layers=3)


def test_unknown_coding_or_embed_centers_name():
    vq = _built()
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="coding must be one of"):
        vq.compress(x, coding="arithmetic")
    with pytest.raises(ValueError, match="embed_centers must be one of"):
        vq.compress(x, embed_centers="float64")
    with pytest.raises(ValueError, match="embed_centers must be one of"):
        vq.compress(x, embed_centers=True)
    with pytest.raises(ValueError, match=r"embed_centers must be one of .*, got \['float32'\]"):
        vq.compress(x, embed_centers=["float32"])  # unhashable: a clear error, not a TypeError


def test_unknown_cut_or_linkage_is_refused_before_any_build(monkeypatch):
    from svq_modules.compat import encode as compat_encode
    from svq_modules.compat.functional import encode_layers

    def no_build(*args, **kwargs):
        raise AssertionError("the tree was built before the arguments were checked")

    monkeypatch.setattr(compat_encode, "build_hierarchy", no_build)

    with pytest.raises(ValueError, match=r"cut must be one of \('nested', 'greedy', 'depth'\), got 'best'"):
        ScalableVQ(3, 16, [2, 1], cut="best")
    with pytest.raises(ValueError, match="linkage must be one of"):
        ScalableVQ(3, 16, [2, 1], linkage="single")
    x = torch.randn(50, 3)
    with pytest.raises(ValueError, match="cut must be one of"):
        encode_layers(x, torch.zeros(50, dtype=torch.long), x[:4], [1, 1], cut="best")


def test_float_codes_or_indices():
    vq = _built()
    x = torch.randn(10, 3)
    codes = vq.encode(x)
    with pytest.raises(ValueError, match="codes must hold ints, got dtype torch.float32"):
        vq.decode(codes.float())
    with pytest.raises(ValueError, match="indices must hold ints"):
        vq.reconstruct(vq.quantize(x).double(), 1)
    with pytest.raises(ValueError, match="indices must hold ints"):
        vq.rates(vq.quantize(x).float())
    with pytest.raises(ValueError, match="out of range"):
        vq.reconstruct(torch.tensor([0, 16]), 1)
    # integer array-likes are fine
    assert torch.equal(vq.decode(codes.numpy()), vq.decode(codes))
    assert torch.equal(vq.reconstruct(vq.quantize(x).tolist(), 2), vq.reconstruct(vq.quantize(x), 2))


def test_codes_with_more_layers_than_the_module():
    vq = _built()
    codes = vq.encode(torch.randn(10, 3))
    with pytest.raises(ValueError, match="codes.shape"):
        vq.decode(torch.cat([codes, codes[:1]]))
    with pytest.raises(ValueError, match="0-d"):
        vq.decode(torch.tensor(1))


def test_update_flags_that_are_not_bools():
    vq = _built()
    with pytest.raises(ValueError, match="force must be a bool"):
        vq.update(1)
    with pytest.raises(ValueError, match="progress must be a bool"):
        vq.update(progress="yes")


def test_setting_a_learner_knob_on_the_module():
    """``vq.ema_update = False`` would have done nothing after the split: it says where the knob lives."""
    vq = ScalableVQ(3, 16, bits=[2, 1])
    with pytest.raises(AttributeError, match=r"vq\.learner\.ema_update"):
        vq.ema_update = False
    with pytest.raises(AttributeError, match=r"vq\.index\.cut"):
        vq.cut = "depth"
    vq.learner.ema_update = False  # the right place
    assert not vq.learner.ema_update


def test_bad_constructor_numbers():
    for kwargs, name in [
        ({"decay": 1.0}, "decay"),
        ({"relocate_every": 0}, "relocate_every"),
        ({"kmeans_iters": -1}, "kmeans_iters"),
        ({"chunk_elements": 0}, "chunk_elements"),
        ({"commitment_weight": -1.0}, "commitment_weight"),
        ({"threshold_ema_dead_code": float("nan")}, "threshold_ema_dead_code"),
        ({"train_rate_weight": -0.5}, "train_rate_weight"),
        ({"train_rate_weight": float("inf")}, "train_rate_weight"),
        ({"block_size": 0}, "block_size"),
        ({"linkage": "single"}, "linkage"),
        ({"cut": "deep"}, "cut"),
        ({"dead_code_sampling": "random"}, "dead_code_sampling"),
    ]:
        with pytest.raises(ValueError, match=name):
            ScalableVQ(3, 16, bits=[2, 1], **kwargs)
    for dim, k in [(0, 16), (3, 0), (3.0, 16), (True, 16)]:
        with pytest.raises(ValueError, match="dim|codebook_size"):
            ScalableVQ(dim, k, bits=[2, 1])


@pytest.mark.parametrize("name", ["channel_first", "learnable_codebook", "kmeans_init", "ema_update", "refine",
                                  "sync_distributed", "relocate_codes"])
def test_switches_given_as_strings_or_ints(name):
    """``channel_first="no"`` used to mean True (``bool("no")``): every switch takes True or False only."""
    for value in ("no", 0, None):
        with pytest.raises(ValueError, match=f"^{name} must be a bool \\(True or False\\), got {value!r}$"):
            ScalableVQ(3, 16, bits=[2, 1], **{name: value})
    assert ScalableVQ(3, 16, bits=[2, 1], channel_first=np.bool_(True)).channel_first is True


def test_array_input_to_forward_or_encode():
    vq = _built()
    with pytest.raises(ValueError, match=r"torch.as_tensor"):
        vq(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"torch.as_tensor"):
        vq.encode(np.zeros((4, 3), dtype=np.float32))


def test_decompress_of_bytes_instead_of_a_list_of_chunks():
    vq = _built()
    chunks = vq.compress(torch.randn(10, 3))
    with pytest.raises(BitstreamError, match="sequence"):
        vq.decompress(chunks[0])


# --------------------------------------------------------------------------- half precision, odd dtypes, mismatches


def test_half_precision_codebook_builds_the_float32_tree():
    # distances of codewords ~100 apart overflow float16 (max 65504); the build runs in float32 on the same values
    from svq_modules import build_hierarchy

    cb = (torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 100).half()
    half, full = build_hierarchy(cb), build_hierarchy(cb.float())
    assert torch.equal(half.parent, full.parent) and half.center.dtype == torch.float32
    assert sorted(half.children.flatten().tolist()) == list(range(2 * 16 - 2))  # every node merged once
    with pytest.raises(RuntimeError, match="float16 buffers cannot hold its tree"):  # its merge costs pass 65504
        ScalableVQ.from_codebook(cb, bits=[2, 1])
    small = cb / 100  # costs that a float16 module holds: the tree of the same values in a float32 module
    vq, ref = (ScalableVQ.from_codebook(c, bits=[2, 1]) for c in (small, small.float()))
    assert torch.equal(vq.index.tree_parent, ref.index.tree_parent)
    assert torch.equal(vq.index.layers_leaf_node, ref.index.layers_leaf_node)


def test_half_precision_statistics_count_past_2048():
    from svq_modules import code_statistics

    counts, sums = code_statistics(torch.ones(5000, 2).half(), torch.zeros(5000, dtype=torch.long), 2)
    assert counts.tolist() == [5000.0, 0.0] and sums[0].tolist() == [5000.0, 5000.0]


def test_half_precision_buffers_too_small_for_the_counts_say_so_and_keep_the_old_tables():
    cb = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).half()
    with pytest.raises(RuntimeError, match=r"float16 buffers cannot hold .* keep the quantizer in float32"):
        ScalableVQ.from_codebook(cb, counts=torch.full((16,), 5000.0), bits=[2, 1])
    vq = ScalableVQ.from_codebook(cb, counts=torch.full((16,), 50.0), bits=[2, 1])
    before = {k: b.clone() for k, b in vq.index.named_buffers()}
    vq.learner.cluster_size.fill_(5000.0)  # counts whose tree sums pass 65504
    with pytest.raises(RuntimeError, match="cannot hold"):
        vq.update(force=True)
    assert all(torch.equal(before[k], b) for k, b in vq.index.named_buffers())


def test_negative_counts_are_refused():
    with pytest.raises(ValueError, match="counts must be >= 0, got a minimum of -1"):
        ScalableVQ.from_codebook(torch.randn(16, 3), counts=-torch.ones(16), bits=[2, 1])


@pytest.mark.skipif(not hasattr(torch, "uint16"), reason="torch < 2.3 has no uint16 / uint32 / uint64 tensors")
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_indices_work(dtype):
    vq = _built()
    idx = np.array([1, 2, 15], dtype=dtype)
    assert torch.equal(vq.reconstruct(idx, 2), vq.reconstruct(torch.tensor([1, 2, 15]), 2))
    with pytest.raises(ValueError, match=r"indices out of range: values in \[1, 16\]"):
        vq.reconstruct(np.array([1, 16], dtype=dtype), 2)


def test_hierarchy_and_tables_of_different_codebooks_are_refused():
    from svq_modules import build_hierarchy, build_layers, layer_rates, reconstruct

    cb = torch.randn(16, 3)
    tables = build_layers(build_hierarchy(cb), [2, 1])
    with pytest.raises(ValueError, match="tables are for 16 leaves / 31 nodes but the hierarchy has 4 / 7"):
        reconstruct(build_hierarchy(cb[:4]), tables, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="tables are for 16 leaves"):  # was a silent 0 bits
        layer_rates(build_hierarchy(torch.randn(64, 8)), tables)


def test_empty_batches():
    vq = _built()
    assert vq.quantize(torch.randn(0, 3), 0.5, relative=True).shape == (0,)
    with pytest.raises(ValueError, match="at least one item"):
        vq.compress_items(torch.randn(0, 4, 5, 3))


def test_channel_first_single_index_gives_one_vector():
    vq = ScalableVQ.from_codebook(torch.randn(8, 3), bits=[1, 1], channel_first=True)
    assert torch.equal(vq.reconstruct(torch.tensor(5), 3), vq.codebook[5])


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda f, x, i: f(x, i, 8.0), "num_codes must be a positive int, got 8.0"),
        (lambda f, x, i: f(x, i, 8, weights=[1.0] * 20), "weights must be a real"),
        (lambda f, x, i: f(x, i, 8, weights=torch.ones(20, dtype=torch.complex64)), "weights must be a real"),
    ],
)
def test_code_statistics_bad_arguments(call, words):
    from svq_modules import code_statistics

    with pytest.raises(ValueError, match=words):
        call(code_statistics, torch.randn(20, 3), torch.randint(0, 8, (20,)))


@pytest.mark.parametrize("node_level, words", [
    (torch.zeros(3, dtype=torch.long), r"shape \[3\] torch.int64"),
    ([0] * 31, "got list"),
    (torch.zeros(31), "torch.float32"),
])
def test_build_layers_bad_node_level(node_level, words):
    from svq_modules import build_hierarchy, build_layers

    h = build_hierarchy(torch.randn(16, 3))
    with pytest.raises(ValueError, match=r"node_level must be a \[31\] integer tensor .*" + words):
        build_layers(h, [2], node_level=node_level, constrained_layers=1)


def test_records_from_incomplete_dicts_and_tables_to_a_dtype():
    from svq_modules import Hierarchy, LayerTables, build_hierarchy, build_layers

    h = build_hierarchy(torch.randn(8, 3))
    tables = build_layers(h, [1, 1])
    with pytest.raises(ValueError, match=r"Hierarchy.from_dict: missing \['parent', 'children'"):
        Hierarchy.from_dict({})
    partial = {k: v for k, v in tables.as_dict().items() if k != "members"}
    with pytest.raises(ValueError, match=r"LayerTables.from_dict: missing \['members'\]"):
        LayerTables.from_dict(partial)
    assert torch.equal(Hierarchy.from_dict(h.as_dict()).parent, h.parent)  # a whole dict still works
    with pytest.raises(ValueError, match="takes a device, got the dtype torch.float32"):
        tables.to(torch.float32)


@pytest.mark.parametrize("block_size", [0, -5, 2.5, "a"])
def test_build_hierarchy_bad_block_size(block_size):
    from svq_modules import build_hierarchy

    with pytest.raises(ValueError, match=f"block_size must be a positive int, got {block_size!r}"):
        build_hierarchy(torch.randn(8, 3), block_size=block_size)


def test_decompress_items_with_a_shape_that_is_not_a_tuple():
    vq = _built()
    sent = vq.compress_items(torch.randn(2, 4, 5, 3))
    assert vq.decompress_items(**sent).shape == (2, 4, 5, 3)
    for shape in ([4, 5], torch.Size([4, 5]), (np.int64(4), np.int64(5)), np.array([4, 5])):  # as saved and loaded
        assert vq.decompress_items(sent["strings"], shape=shape).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="shape must be the item shape from compress_items .* got 4"):
        vq.decompress_items(sent["strings"], shape=4)
    with pytest.raises(ValueError, match=r"got \(4.0, 5\)"):
        vq.decompress_items(sent["strings"], shape=(4.0, 5))


def test_decay_as_a_numpy_float():
    assert ScalableVQ(dim=3, codebook_size=16, decay=np.float32(0.5)).learner.decay == 0.5
    with pytest.raises(ValueError, match="decay must be a float in"):
        ScalableVQ(dim=3, codebook_size=16, decay=np.float32(1.0))


@pytest.mark.parametrize("num_codes", [16, 600])  # dense merge rounds only / candidate lists first
@pytest.mark.parametrize("scale", [1e19, 1e20])
def test_codewords_beyond_float32_linkage_say_rescale(scale, num_codes):
    # squared distances of codewords ~1e19 apart pass float32's 3.4e38: the merges would compare infinities
    # (at K=600 the tree came out silently wrong, at K=16 an IndexError)
    from svq_modules import build_hierarchy

    cb = torch.randn(num_codes, 3, generator=torch.Generator().manual_seed(2)) * scale
    with pytest.raises(ValueError, match="linkage costs overflow torch.float32 .* rescale the data"):
        build_hierarchy(cb)


def test_half_codebook_with_statistics_beyond_float16():
    cb = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)).half()
    with pytest.raises(ValueError, match=r"counts up to 70000 do not fit the codebook's torch.float16 \(at most 65504\)"):
        ScalableVQ.from_codebook(cb, counts=torch.full((16,), 70000.0), bits=[2, 1])
    with pytest.raises(RuntimeError, match="float16 buffers cannot hold its tree"):  # each code fits, the root does not
        ScalableVQ.from_codebook(cb, counts=torch.full((16,), 5000.0), sums=torch.zeros(16, 8), bits=[2, 1])


@pytest.mark.parametrize("field", ["index.layers_members", "index.layers_leaf_symbol", "index.layers_group_start"])
def test_checkpoint_with_corrupt_tables_is_refused_at_load(field):
    vq = _built()
    state = vq.state_dict()
    state[field] = torch.full_like(state[field], 99)
    fresh = ScalableVQ(dim=vq.dim, codebook_size=vq.codebook_size, bits=[2, 1])
    with pytest.raises(RuntimeError, match="layer tables are corrupt"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(vq.state_dict())  # the intact state loads, and decodes as the original
    x = torch.randn(20, vq.dim)
    assert torch.equal(fresh.reconstruct(fresh.quantize(x), 2), vq.reconstruct(vq.quantize(x), 2))

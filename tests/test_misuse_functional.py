"""What a user may get wrong with the seed-compatible functional API, one test each.

NumPy input (scikit-learn's k-means output, as users have it) must simply work;
everything else must fail with one line that names the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_sample_image

from svq_modules.compat.functional import (
    build_layers,
    decode_layer,
    decode_layers,
    encode_known_layers,
    encode_layers,
    transcode,
    visualize_layers,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def china_kmeans():
    """Pixels of sklearn's china.jpg (every 8th row and column, uint8 [4320, 3]) and a 48-means fit on them."""
    pixels = load_sample_image("china.jpg")[::8, ::8].reshape(-1, 3)
    km = KMeans(n_clusters=48, n_init=1, random_state=0).fit(pixels.astype(np.float64))
    return pixels, km.cluster_centers_, km.labels_


@pytest.fixture(scope="module")
def blobs():
    """NumPy float64 blobs [600, 3], a codebook of 20 of its rows, nearest indices (int64)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)) + rng.normal(scale=4.0, size=(5, 3))[rng.integers(0, 5, 600)]
    cb = x[rng.choice(600, 20, replace=False)].copy()
    q = ((x[:, None, :] - cb[None]) ** 2).sum(-1).argmin(1)
    return x, q, cb


def one_line_error(name: str, fn, *args, **kwargs) -> str:
    """Call ``fn``, expect a one-line ``ValueError`` that names the argument ``name``; return the message."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert name in msg, f"{name!r} not named in: {msg}"
    return msg


# --------------------------------------------------------------------------- NumPy input works


def test_readme_example_with_sklearn_kmeans_output(china_kmeans, tmp_path):
    """The README's functional example, fed with scikit-learn's k-means output as it comes (NumPy)."""
    pixels, cluster_centers, quantized_data = china_kmeans
    data = pixels.astype(np.float64)
    assert cluster_centers.dtype == np.float64 and quantized_data.dtype == np.int32  # what sklearn gives

    layers = encode_layers(data, quantized_data, cluster_centers, [4, 2, 2, 2, 2])
    context = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
    expected = torch.from_numpy(cluster_centers)[torch.from_numpy(quantized_data).long()]
    assert decoded.dtype == torch.float64  # float64 stays float64
    assert torch.equal(decoded, expected)  # the last layer gives back the exact codewords

    centers, tree = build_layers(cluster_centers, data, quantized_data, final_clusters=16)
    assert centers.shape == (48 + len(tree), 3) and len(tree) == 48 - 16
    torch.testing.assert_close(centers[:48], torch.from_numpy(cluster_centers))
    path = tmp_path / "layers.png"
    visualize_layers(cluster_centers, centers, tree, data=None, path=path, dpi=30)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_numpy_uint8_pixels_and_known_layers(china_kmeans):
    """Raw uint8 pixels as data; NumPy labels/centers for encode_known_layers and transcode."""
    pixels, cluster_centers, labels = china_kmeans
    from_float = encode_layers(pixels.astype(np.float64), labels, cluster_centers, [3, 2])
    from_uint8 = encode_layers(pixels, labels, cluster_centers, [3, 2])
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(from_float, from_uint8))
    again = encode_known_layers(labels, cluster_centers, from_uint8)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(from_uint8, again))
    # new pixels: transcoding decodes to each pixel's nearest codeword
    new = pixels[:300]
    nearest = ((new[:, None, :].astype(np.float64) - cluster_centers[None]) ** 2).sum(-1).argmin(1)
    decoded = decode_layers(transcode(new, from_uint8))
    assert torch.equal(decoded, torch.from_numpy(cluster_centers[nearest]))


def test_float32_numpy_stays_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 2)).astype(np.float32)
    km = KMeans(n_clusters=12, n_init=1, random_state=0).fit(x)
    assert km.cluster_centers_.dtype == np.float32
    decoded = decode_layers(encode_layers(x, km.labels_, km.cluster_centers_, [2, 1]))
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, torch.from_numpy(km.cluster_centers_[km.labels_]))


def test_nested_lists_and_read_only_arrays(blobs):
    x, q, cb = blobs
    ref = decode_layers(encode_layers(torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(cb), [2, 2]))
    from_lists = decode_layers(encode_layers(x.tolist(), q.tolist(), cb.tolist(), [2, 2]))
    assert from_lists.dtype == torch.float64  # Python floats are doubles
    assert torch.equal(from_lists, ref)
    frozen = [a.copy() for a in (x, q, cb)]
    for a in frozen:
        a.flags.writeable = False
    reversed_view = cb[::-1]  # negative strides
    assert torch.equal(decode_layers(encode_layers(*frozen, [2, 2])), ref)
    flipped = decode_layers(encode_layers(x, len(cb) - 1 - q, reversed_view, [2, 2]))
    assert torch.equal(flipped, ref)


# --------------------------------------------------------------------------- shapes and lengths


def test_one_dimensional_data_says_reshape(blobs):
    x, q, cb = blobs
    msg = one_line_error("data", encode_layers, x[:, 0], q, cb[:, :1])
    assert "reshape(-1, 1)" in msg


def test_one_dimensional_centers_says_reshape(blobs):
    x, q, cb = blobs
    msg = one_line_error("cluster_centers", encode_layers, x[:, :1], q, cb[:, 0])
    assert "reshape(-1, 1)" in msg


def test_two_dimensional_labels(blobs):
    x, q, cb = blobs
    one_line_error("quantized_data", encode_layers, x, q[:, None], cb)


def test_data_and_centers_dimensions_differ(blobs):
    x, q, cb = blobs
    msg = one_line_error("data", encode_layers, x[:, :2], q, cb)
    assert "dimension 2, expected 3" in msg


def test_data_and_labels_lengths_differ(blobs):
    x, q, cb = blobs
    msg = one_line_error("quantized_data", encode_layers, x[:100], q, cb)
    assert "600 entries but there are 100 vectors" in msg


# --------------------------------------------------------------------------- values


def test_labels_out_of_range(blobs):
    x, q, cb = blobs
    msg = one_line_error("quantized_data", encode_layers, x, q, cb[:10])  # labels of a bigger codebook
    assert "out of range" in msg and "10 codes" in msg


def test_negative_labels(blobs):
    x, q, cb = blobs
    one_line_error("quantized_data", encode_layers, x, q - 1, cb)


def test_float_labels_say_what_to_pass(blobs):
    x, q, cb = blobs
    msg = one_line_error("quantized_data", encode_layers, x, q.astype(np.float64), cb)
    assert "astype(numpy.int64)" in msg


def test_integer_centers_say_what_to_pass(blobs):
    x, q, cb = blobs
    msg = one_line_error("cluster_centers", encode_layers, x, q, cb.round().astype(np.int64))
    assert "astype(numpy.float64)" in msg


def test_nan_in_data(blobs):
    x, q, cb = blobs
    bad = x.copy()
    bad[7, 1] = np.nan
    msg = one_line_error("data", encode_layers, bad, q, cb)
    assert "NaN" in msg


def test_inf_in_centers(blobs):
    x, q, cb = blobs
    bad = cb.copy()
    bad[3, 0] = np.inf
    msg = one_line_error("cluster_centers", encode_layers, x, q, bad)
    assert "Inf" in msg


def test_empty_data(blobs):
    x, q, cb = blobs
    one_line_error("data", encode_layers, x[:0], q[:0], cb)


def test_empty_labels_without_data(blobs):
    _, q, cb = blobs
    one_line_error("quantized_data", encode_layers, None, q[:0], cb)


def test_empty_codebook(blobs):
    x, q, cb = blobs
    one_line_error("cluster_centers", encode_layers, x, q, cb[:0])


@pytest.mark.parametrize("bad", ["pixels.npy", {"x": 1}, [[1.0, 2.0], [3.0]]])
def test_not_an_array(blobs, bad):
    _, q, cb = blobs
    msg = one_line_error("data", encode_layers, bad, q, cb)
    assert "[N, D] float array" in msg


# --------------------------------------------------------------------------- bits


@pytest.mark.parametrize(
    "bits, words",
    [([4, 0, 2], "> 0"), ([], "empty"), ([4, 2.5], "must hold ints"), ([4, 30], "at most 24"), ("4,2,2", "must be an int")],
)
def test_bad_full_bits_list(blobs, bits, words):
    x, q, cb = blobs
    msg = one_line_error("n_bit_baselayer", encode_layers, x, q, cb, bits)
    assert words in msg


def test_unknown_proposal_name(blobs):
    x, q, cb = blobs
    msg = one_line_error("n_bits_proposal", encode_layers, x, q, cb, None, "balanced")
    assert "balanced_clusters" in msg  # says what is allowed


def test_bad_enhancement_list(blobs):
    x, q, cb = blobs
    msg = one_line_error("n_bits_proposal", encode_layers, x, q, cb, 4, [2, -1])
    assert "-1" in msg


def test_full_list_and_proposal_together(blobs):
    x, q, cb = blobs
    msg = one_line_error("n_bits_proposal", encode_layers, x, q, cb, [4, 2, 2], [2, 2])
    assert "not both" in msg


def test_bits_list_and_num_layers_disagree(blobs):
    x, q, cb = blobs
    msg = one_line_error("num_layers", encode_layers, x, q, cb, [4, 2, 2], num_layers=3)
    assert "make 4 layers" in msg


def test_seed_callable_returning_garbage(blobs):
    x, q, cb = blobs
    one_line_error("n_bits_proposal", encode_layers, x, q, cb, 3, lambda b0, codes, values: "lots")
    one_line_error("n_bits_proposal", encode_layers, x, q, cb, 3, lambda b0, codes, values: [3, 0])


def test_core_callable_without_num_layers(blobs):
    x, q, cb = blobs
    msg = one_line_error("n_bits_proposal", encode_layers, x, q, cb, None, lambda h, n: [2] * n)
    assert "num_layers" in msg


# --------------------------------------------------------------------------- negative / zero ints


@pytest.mark.parametrize(
    "name, call",
    [
        ("n_bit_baselayer", lambda x, q, cb: encode_layers(x, q, cb, -1, [2])),
        ("n_bit_baselayer", lambda x, q, cb: encode_layers(x, q, cb, 4.0, [2])),
        ("n_bits_proposal", lambda x, q, cb: encode_layers(x, q, cb, 4, -2)),
        ("num_layers", lambda x, q, cb: encode_layers(x, q, cb, 4, 2, num_layers=1)),
        ("n_bit_limit", lambda x, q, cb: encode_layers(x, q, cb, [4, 2], n_bit_limit=-1)),
        ("final_clusters", lambda x, q, cb: build_layers(cb, x, q, 0)),
        ("final_clusters", lambda x, q, cb: build_layers(cb, x, q, True)),
    ],
)
def test_bad_ints(blobs, name, call):
    msg = one_line_error(name, call, *blobs)
    assert "int" in msg


@pytest.mark.parametrize("name", ["progress", "refine"])
def test_switches_given_as_strings(blobs, name):
    """``refine="no"`` used to refine (a non-empty string is true): switches take True or False only."""
    x, q, cb = blobs
    msg = one_line_error(name, encode_layers, x, q, cb, [2, 2], **{name: "no"})
    assert "must be a bool" in msg and "'no'" in msg


def test_transcode_block_size_zero(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    one_line_error("block_size", transcode, x, layers, block_size=0)


# --------------------------------------------------------------------------- decoding and known layers


def test_decode_something_else_than_a_layer(blobs):
    one_line_error("layer", decode_layer, {"codes": [0, 1]})


def test_decode_with_a_wrong_context(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    _, context = decode_layer(layers[0])
    one_line_error("context", decode_layer, layers[1], context.decoded)  # the tensor, not the context


def test_decode_layers_given_one_layer(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    one_line_error("layers", decode_layers, layers[0])


def test_known_layers_with_a_codebook_of_another_dimension(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    one_line_error("cluster_centers", encode_known_layers, q, cb[:, :2], layers)


def test_known_layers_mixed_from_two_encodings(blobs):
    x, q, cb = blobs
    a = encode_layers(x, q, cb, [2, 2])
    b = encode_layers(x[:, :2], q, cb[:, :2], [2, 2])
    one_line_error("layers[1]", encode_known_layers, q, None, [a[0], b[1], a[2]])


def test_known_layers_labels_out_of_range(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    one_line_error("quantized_data", encode_known_layers, np.array([0, 20]), None, layers)


# --------------------------------------------------------------------------- tree and pictures


def test_build_layers_data_without_labels(blobs):
    x, _, cb = blobs
    one_line_error("quantized_data", build_layers, cb, x, None, 4)


def test_visualize_true_is_not_a_path(blobs):
    x, q, cb = blobs
    one_line_error("visualize", encode_layers, x, q, cb, [2, 2], visualize=True)


def test_visualize_seed_style_without_tree(blobs):
    _, _, cb = blobs
    one_line_error("layerized_cluster_centers", visualize_layers, cb)


def test_visualize_tree_with_wrong_centers(blobs):
    x, q, cb = blobs
    centers, tree = build_layers(cb, x, q, 4)
    one_line_error("layerized_cluster_centers", visualize_layers, cb, centers[:-1], tree)


def test_visualize_layers_with_data_of_another_length(blobs):
    x, q, cb = blobs
    layers = encode_layers(x, q, cb, [2, 2])
    one_line_error("data", visualize_layers, layers, data=x[:10])

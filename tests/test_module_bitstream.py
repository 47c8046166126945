import pytest
import torch

from svq_modules import BitstreamError, ScalableVQ
from svq_modules.coding import compress_layers, read_header


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    vq = ScalableVQ(8, 64, bits=[2, 2, 1], channel_first=True)
    x = torch.randn(4, 8, 16, 16)
    for _ in range(5):
        vq(x)
    vq.update()
    vq.eval()
    return vq, x


@pytest.mark.parametrize("coding", ["entropy", "context", "adaptive", "raw"])
def test_module_compress_every_prefix(trained, coding, request):
    vq, x = trained
    if coding == "adaptive":  # else these small grids stay context coded
        request.getfixturevalue("adaptive_only")
    chunks = vq.compress(x, coding=coding)
    if coding == "adaptive":
        assert "adaptive" in {read_header(c).coding for c in chunks}
    assert len(chunks) == vq.num_layers and all(isinstance(c, bytes) for c in chunks)
    codes = vq.encode(x)
    for layers in range(1, vq.num_layers + 1):
        out = vq.decompress(chunks[:layers])
        assert out.shape == x.shape
        assert torch.equal(out, vq.decode(codes, layers))
    # the full stream gives plain quantization
    assert torch.equal(vq.decompress(chunks), vq(x, num_layers=vq.num_layers).quantized)


def test_module_decompress_into_fresh_module_and_errors(trained):
    vq, x = trained
    chunks = vq.compress(x, embed_centers="float16")
    fresh = ScalableVQ(8, 64, bits=[2, 2, 1], channel_first=True)
    fresh.load_state_dict(vq.state_dict())
    assert torch.equal(fresh.decompress(chunks[:2]), vq.decompress(chunks[:2]))
    with pytest.raises(BitstreamError, match="layer"):
        vq.decompress([chunks[0], chunks[2]])
    other = ScalableVQ(8, 64, bits=[2, 2, 1], channel_first=True)
    other(torch.randn(4, 8, 16, 16))
    other.update()
    with pytest.raises(BitstreamError):
        other.decompress(chunks[:1])
    with pytest.raises(RuntimeError, match="update"):
        ScalableVQ(8, 64, bits=[2, 2, 1]).compress(torch.randn(3, 8))


@pytest.mark.parametrize("coding", ["entropy", "context", "adaptive", "raw"])
def test_module_compress_items_one_stream_per_batch_item(trained, coding, request):
    """CompressAI's convention: ``{"strings": strings[l][b], "shape": item shape}``; every item decodes on its own."""
    vq, x = trained  # channel-first [4, 8, 16, 16]
    if coding == "adaptive":  # else these small grids stay context coded
        request.getfixturevalue("adaptive_only")
    out = vq.compress_items(x, coding=coding)
    if coding == "adaptive":
        assert "adaptive" in {read_header(c).coding for item in out["strings"] for c in item}
    strings, shape = out["strings"], out["shape"]
    assert shape == (16, 16)
    assert len(strings) == vq.num_layers and all(len(layer) == 4 for layer in strings)
    assert all(isinstance(c, bytes) for layer in strings for c in layer)
    codes = vq.encode(x)
    for layers in range(1, vq.num_layers + 1):
        got = vq.decompress_items(strings[:layers], shape)
        assert got.shape == x.shape
        assert torch.equal(got, vq.decode(codes, layers))
        assert torch.equal(vq.decompress_items(strings, shape, num_layers=layers), got)
    # one item's stream is the stream of that item's indices alone
    expected = compress_layers(vq.hierarchy, vq.tables, vq.quantize(x)[2], coding=coding)
    assert [layer[2] for layer in strings] == expected


def test_module_compress_items_errors(trained):
    vq, x = trained
    out = vq.compress_items(x[:2])
    strings = out["strings"]
    with pytest.raises(ValueError, match="strings must be a non-empty list"):
        vq.decompress_items(strings[0][0])
    with pytest.raises(ValueError, match="one per item"):
        vq.decompress_items([strings[0], strings[1][:1]])
    with pytest.raises(BitstreamError, match="expected"):
        vq.decompress_items(strings, (8, 8))
    with pytest.raises(BitstreamError, match="layer"):
        vq.decompress_items([strings[0], strings[2]])
    flat = ScalableVQ.from_codebook(vq.codebook.detach(), bits=[2, 2, 1])
    with pytest.raises(ValueError, match="batch dimension"):
        flat.compress_items(torch.randn(8))


def test_module_context_coding_of_a_smooth_latent_grid(trained):
    """A latent map constant over 4x4 tiles: context coding (neighbours) takes far fewer bytes than entropy coding."""
    vq, x = trained
    smooth = x[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3)
    sizes = {c: sum(map(len, vq.compress(smooth, coding=c))) for c in ("entropy", "context")}
    assert sizes["context"] < 0.6 * sizes["entropy"], sizes
    assert torch.equal(vq.decompress(vq.compress(smooth, coding="context")), vq(smooth).quantized)
    vq._quantize = None  # the shape is checked before any work
    try:
        with pytest.raises(ValueError, match="grid"):
            vq.compress(x[:, :, 0, 0], coding="context")  # [B, D]: one index per item, no grid
        with pytest.raises(ValueError, match="grid"):
            vq.compress(x[:, :, 0, 0], coding="adaptive")
    finally:
        del vq._quantize

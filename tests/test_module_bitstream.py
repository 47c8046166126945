import pytest
import torch

from svq_modules import BitstreamError, ScalableVQ


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


@pytest.mark.parametrize("coding", ["entropy", "raw"])
def test_module_compress_every_prefix(trained, coding):
    vq, x = trained
    chunks = vq.compress(x, coding=coding)
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

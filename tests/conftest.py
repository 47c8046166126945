import mixtures
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gaussian_codes():
    """Data [2000, 3] float64, a codebook of 40 data points, nearest-code indices."""
    return mixtures.gaussian_codes(0, 2000, 40, dtype=torch.float64)


@pytest.fixture
def adaptive_only(monkeypatch):
    """Make ``coding="adaptive"`` keep every layer adaptive (it keeps context coding where that is smaller, which
    on these small grids would leave the adaptive decoder untested). Not for ``coding="context"``."""
    import svq_modules.coding.stream as stream

    encode = stream.encode_context
    monkeypatch.setattr(stream, "encode_context", lambda *a, adaptive=False: encode(*a, adaptive=True) + bytes(
        0 if adaptive else 1 << 20))

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
    """Make ``coding="adaptive"`` keep every layer adaptive where it fits (it keeps context coding where that is no
    larger, which on these small grids would leave the adaptive decoder untested). Not for ``coding="context"``."""
    import svq_modules.coding.context as context
    import svq_modules.coding.stream as stream

    def always_adaptive(codec, layer, leaves, batch_shape, adaptive):
        if adaptive and context.adaptive_fits(codec, layer):
            return "adaptive", context.encode_context(codec, layer, leaves, batch_shape, adaptive=True)
        return context.encode_grid_layer(codec, layer, leaves, batch_shape, adaptive)

    monkeypatch.setattr(stream, "encode_grid_layer", always_adaptive)

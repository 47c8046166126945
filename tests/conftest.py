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

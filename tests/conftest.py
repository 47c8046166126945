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
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 3, generator=g, dtype=torch.float64) * 4
    x = centers[torch.randint(0, 6, (2000,), generator=g)] + torch.randn(2000, 3, generator=g, dtype=torch.float64)
    codebook = x[torch.randperm(2000, generator=g)[:40]].clone()
    indices = torch.cdist(x, codebook).argmin(1)
    return x, codebook, indices

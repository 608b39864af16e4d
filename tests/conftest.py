import os

import pytest
import torch

os.environ.setdefault("CAUSALIR_ARTIFACTS", os.path.join(os.path.dirname(__file__), "..", "artifacts", "test"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def images(rng):
    return torch.rand(4, 3, 32, 32, generator=rng)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Test set-up: Triton runs under its CPU interpreter when there is no GPU (the variable is read when
a kernel is defined, so it is set here, before any test imports fastvl's kernels)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpret = pytest.mark.skip(reason="Triton interpreter tests run only without a GPU (TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interpret)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic region-feature set (128 pairs, 64-d features) for the training tests."""
    from fastvl.data.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(str(out), 128, feature_dim=64, shard_size=64)
    return str(out)

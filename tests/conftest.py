"""Test configuration.

FASTCM_TEST_DEVICE (default "cpu") picks where the fast paths are tested. On "cpu" the
Triton kernels run in Triton's interpreter, which must be switched on before triton is
first imported: that is why this happens here, at the top, before anything imports fastcm.
The GPU is never queried at import or collection time.
"""

import os

if os.environ.get("FASTCM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import DEVICE, cuda_float_arguments  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("FASTCM_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _float_arguments_as_on_cuda():
    """Every Triton launch in the interpreter types float arguments as a CUDA launch does
    (helpers.cuda_float_arguments), so a float64 kernel that would round a constant to float32 on a GPU
    fails here too."""
    with cuda_float_arguments():
        yield


@pytest.fixture
def backend(monkeypatch):
    """Call `backend("triton")` inside a test to route fastcm calls to that backend."""

    def use(name: str):
        monkeypatch.setenv("FASTCM_BACKEND", name)

    return use


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run with FASTCM_TEST_DEVICE=cuda on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

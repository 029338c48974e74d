"""Test configuration: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
With DISTILL_OPS_CUDA_EMU=1, backend="cpu" runs csrc/cuda's kernels compiled for the CPU emulator
(tests/cuda_emu) instead of csrc/cpu's: `make test-emu` runs the native backend's tests that way.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("DISTILL_OPS_CUDA_EMU") == "1":
    from cuda_emu import build as _emu_build

    _emu_build.install()


@pytest.fixture(scope="module")
def one_intraop_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

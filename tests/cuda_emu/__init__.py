"""A CPU emulator of the CUDA execution model that runs csrc/cuda's kernels in CI (build.py)."""

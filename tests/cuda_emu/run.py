"""Runs pytest with backend="cpu" on the emulated CUDA kernels (DISTILL_OPS_CUDA_EMU=1), under
AddressSanitizer where gcc has libasan (else without, and says so): `make test` calls it on the
kernel tests. Usage: python tests/cuda_emu/run.py [pytest arguments]."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import asan_env  # noqa: E402


def main(argv: list[str]) -> int:
    env = {**os.environ, "DISTILL_OPS_CUDA_EMU": "1"}
    asan = asan_env()
    if asan is None:
        print("cuda_emu: no libasan here; the emulated kernels run without AddressSanitizer",
              file=sys.stderr)
    else:
        env.update(asan)
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *argv], env)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Runs pytest with backend="cpu" on the emulated CUDA kernels (DISTILL_OPS_CUDA_EMU=1), under
AddressSanitizer where gcc has libasan (else without, and says so): `make test` calls it on the
kernel tests. A run that AddressSanitizer aborts exits with build.ASAN_EXIT_CODE and its report
printed on stdout. Usage: python tests/cuda_emu/run.py [pytest arguments]."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import ASAN_EXIT_CODE, asan_env  # noqa: E402


def main(argv: list[str]) -> int:
    env = {**os.environ, "DISTILL_OPS_CUDA_EMU": "1"}
    asan = asan_env()
    if asan is None:
        print("cuda_emu: no libasan here; the emulated kernels run without AddressSanitizer",
              file=sys.stderr)
    else:
        env.update(asan)
    with tempfile.TemporaryDirectory(prefix="cuda_emu_asan_") as logs:
        # pytest captures fd 2 while a test runs, and an aborted process never prints what it
        # captured: AddressSanitizer writes its report to a file instead, shown here.
        if asan is not None:
            env["ASAN_OPTIONS"] += f":log_path={logs}/report"
        code = subprocess.run([sys.executable, "-m", "pytest", *argv], env=env).returncode
        for report in sorted(Path(logs).iterdir()):  # (a swapcontext warning alone is no report)
            text = report.read_text(errors="replace")
            if "ERROR: AddressSanitizer" in text:
                print(f"cuda_emu: AddressSanitizer's report ({report.name}):\n{text}", flush=True)
    if code == ASAN_EXIT_CODE:
        print(f"cuda_emu: AddressSanitizer aborted the run (exit {code}); the test that was "
              "running is the one after the last that pytest reported", flush=True)
    # (under pytest-xdist an abort ends one worker, and pytest names the test it was running)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

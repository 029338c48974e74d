"""Every Triton kernel compiles for a GPU (sm_90 and sm_80 cubins, with the ptxas Triton ships),
on this machine without one: the interpreter that runs the other Triton tests accepts code that
the compiler refuses (a non-constexpr global, for one), so this is the check that a Triton change
still builds for a real GPU. bench/triton_aot.py does the work, in a subprocess: it needs
TRITON_INTERPRET unset before Triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas(), reason="Triton without its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_kernel_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    args = [sys.executable, "-m", "bench.triton_aot", "--arch", str(arch)]
    if arch != 90:
        args.append("--quick")
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failure(s)" in out.stdout
    for kernel in ("_dense_kd_kernel", "_sparse_kd_kernel", "_topk_kernel", "_sample_kernel"):
        assert kernel in out.stdout

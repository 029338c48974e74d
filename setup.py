"""Build of distill_ops._C: the C++ CPU kernels always, the CUDA kernels where they can be built.

    pip install --no-build-isolation --no-deps -e .

The CUDA part is compiled when nvcc is found (CUDA_HOME, or nvcc on PATH) and torch is a CUDA
build (torch.version.cuda); no GPU is needed to compile it. Environment:
    DISTILL_OPS_FORCE_CUDA=1   build the CUDA part or fail, saying why
    DISTILL_OPS_NO_CUDA=1      CPU only
    DISTILL_OPS_CUDA_ARCHS     gencode list, default "80;90" (+ PTX of the highest)
    DISTILL_OPS_PTXAS_REPORT=1 ptxas -v: each kernel's registers and spills in the build's output
                               (bench/ptxas_spills.py --log reads it)
    MAX_JOBS                   parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(home) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
        os.path.join(home, "include", "cuda_runtime.h"))


def _resolve_cuda_home(cpp_extension):
    """The CUDA toolkit root. torch derives CUDA_HOME from the nvcc on PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no lib64/libcudart):
    then look for a real toolkit and point torch's cpp_extension at it."""
    home = cpp_extension.CUDA_HOME
    if _is_toolkit(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if _is_toolkit(cand):
            cand = os.path.realpath(cand)
            cpp_extension.CUDA_HOME = cand
            os.environ["CUDA_HOME"] = cand
            return cand
    return home


def _cuda_status(torch, cpp_extension) -> tuple[bool, str]:
    """Whether the CUDA part can be built here, and why not."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    home = _resolve_cuda_home(cpp_extension)
    if home is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return False, f"nvcc not found at {nvcc}"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return False, f"no CUDA toolkit headers under {home} (set CUDA_HOME)"
    return True, ""


# nvcc's flags besides the gencode list (bench/ptxas_spills.py compiles with the same).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DDISTILL_OPS_WITH_CUDA=1"]
# ptxas's per-kernel register and spill report (DISTILL_OPS_PTXAS_REPORT=1; bench/ptxas_spills.py)
PTXAS_REPORT = ["-Xptxas", "-v"]


def _gencode() -> list[str]:
    archs = [a.strip() for a in os.environ.get("DISTILL_OPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = archs[-1]
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


BUILD_INFO = os.path.join(ROOT, "distill_ops", "_build_info.py")


def _write_build_info(cuda: bool, why: str) -> None:
    """distill_ops/_build_info.py (not in git): whether this build has the CUDA kernels and, if
    not, why, so that the installed package can say it (distill_ops.backends.native.available):
    pip hides this script's messages unless run with -v."""
    text = ("# Written by setup.py when it builds distill_ops._C; not in git.\n"
            f"CUDA_BUILT = {cuda!r}\n"
            f"CUDA_SKIPPED_BECAUSE = {('' if cuda else why)!r}\n")
    old = open(BUILD_INFO).read() if os.path.exists(BUILD_INFO) else None
    if old != text:  # an unchanged file keeps its mtime
        with open(BUILD_INFO, "w") as f:
            f.write(text)


def extensions():
    import torch
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # No -ffast-math or -march=native: NaN/inf semantics are part of the contract, and wheels must
    # run on any x86-64 (the CPU kernels carry their own AVX-512 and AVX2 clones, picked at load time).
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    ldflags = ["-fopenmp"]
    sources = [os.path.join("csrc", f) for f in ("ops.cpp", "dense_call.cpp", "sparse_call.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

    no_cuda = _flag("DISTILL_OPS_NO_CUDA")
    force = _flag("DISTILL_OPS_FORCE_CUDA")
    if no_cuda and force:
        raise RuntimeError("distill_ops: DISTILL_OPS_FORCE_CUDA=1 and DISTILL_OPS_NO_CUDA=1 contradict each other")
    ok, why = (False, "DISTILL_OPS_NO_CUDA=1") if no_cuda else _cuda_status(torch, cpp_extension)
    if force and not ok:
        raise RuntimeError(f"distill_ops: DISTILL_OPS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    _write_build_info(ok, why)

    if ok:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = NVCC_FLAGS + _gencode()
        if os.environ.get("DISTILL_OPS_PTXAS_REPORT") == "1":
            nvcc += PTXAS_REPORT
        print(f"distill_ops: building the CPU and CUDA kernels (CUDA {torch.version.cuda}, "
              f"nvcc in {cpp_extension.CUDA_HOME})", file=sys.stderr)
        return [cpp_extension.CUDAExtension(
            name="distill_ops._C",
            sources=sources + cu,
            include_dirs=include_dirs,
            define_macros=[("DISTILL_OPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=ldflags,
        )]
    print(f"distill_ops: building the CPU kernels only; CUDA part skipped: {why}", file=sys.stderr)
    return [cpp_extension.CppExtension(
        name="distill_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
    )]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()

"""The CUDA kernels of csrc/cuda compiled for the CPU emulator (runtime.h), as the operator library
``torch.ops.distill_ops_emu``: the same schemas as distill_ops_native, implemented on CPU tensors
by the CUDA code paths (the kernels, their launch configuration, the split-row and split-column
paths and the host code around them).

The .cu files are copied to build/cuda_emu-<python>-<torch> with four rewrites: ``kernel<<<cfg>>>(args)`` becomes
``::emu::launch(&kernel, cfg)(args)``, ``__shared__ T name;`` a reference into the running block's
shared memory (``::emu::shared<T>``), the CUDA dispatch registration becomes a CPU one of
distill_ops_emu, and the device type the argument checks expect becomes the CPU. Everything else
compiles as written, against shims of the few CUDA headers they include (shim/).

``install()`` points distill_ops.backends.native at the emulated operators, so that
``backend="cpu"`` runs the CUDA kernels: tests/conftest.py does it when DISTILL_OPS_CUDA_EMU=1.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# DISTILL_OPS_EMU_ASAN=1: the kernels built with AddressSanitizer (the emulator's compute-sanitizer
# memcheck: a read or write outside a tensor's allocation is reported where it happens). The
# process must start with libasan preloaded: `make test-emu-asan`.
ASAN = os.environ.get("DISTILL_OPS_EMU_ASAN") == "1"
# One build per interpreter and torch: the extension is tied to both, and a second environment
# (make test-twin) would otherwise rebuild it on every switch.
_ENV_TAG = re.sub(r"[^\w.-]", "_", f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")
BUILD = ROOT / "build" / (("cuda_emu_asan" if ASAN else "cuda_emu") + "-" + _ENV_TAG)
OPS = ("dense_forward", "sparse_forward", "teacher_topk", "teacher_sample_draws")

# A kernel name (with template arguments) before <<<config>>>, and the parenthesis that opens the
# argument list after it.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;{}()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_REGISTER = "TORCH_LIBRARY_IMPL(distill_ops_native, CUDA, m)"

# The exit status of a process AddressSanitizer aborted (its default, 1, is pytest's "tests failed").
ASAN_EXIT_CODE = 86

_library = None  # the torch.library.Library that holds the schemas (kept alive)


# `__shared__ TYPE NAME[DIMS];`: a variable of each block's own shared memory.
_SHARED = re.compile(r"__shared__\s+([^;=]+?)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")


def _shared(m: re.Match) -> str:
    type_, name, dims = m[1].strip(), m[2], m[3].replace(" ", "")
    return (f"static char {name}_emu_tag_; "
            f"auto& {name} = ::emu::shared<{type_}{dims}>(&{name}_emu_tag_);")


def rewrite(text: str, name: str) -> str:
    """A .cu/.cuh source as emulator C++ (raises if a launch is left unrewritten)."""
    text = _LAUNCH.sub(lambda m: f"::emu::launch(&{m[1].strip()}, {m[2].strip()})(", text)
    text = _SHARED.sub(_shared, text)
    if "<<<" in text:
        raise RuntimeError(f"cuda_emu: a kernel launch in {name} was not rewritten")
    text = text.replace(_REGISTER, "TORCH_LIBRARY_IMPL(distill_ops_emu, CPU, m)")
    text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")
    return '#include "runtime.h"\n' + text


def _write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:  # keep mtimes: ninja rebuilds less
        out.write_text(text)


def mirror() -> list[str]:
    """Copies csrc to BUILD/csrc, the CUDA files rewritten, and the emulator's self-test kernels;
    returns the sources to compile."""
    dst = BUILD / "csrc"
    selftest = BUILD / "selftest.cpp"
    _write(selftest, rewrite((HERE / "selftest.cu").read_text(), "selftest.cu"))
    sources = [str(selftest)]
    for src in sorted(CSRC.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(CSRC)
        out = dst / rel
        if rel.parts[0] == "cuda":
            out = out.with_suffix(".cpp" if src.suffix == ".cu" else src.suffix)
            text = rewrite(src.read_text(), str(rel))
            if src.suffix == ".cu":
                sources.append(str(out))
        else:
            text = src.read_text()
            if rel.name in ("dense_call.cpp", "sparse_call.cpp"):
                sources.append(str(out))
        _write(out, text)
    return sources


def load():
    """Builds (once; ninja keeps what is up to date) and loads the emulated kernels; returns the
    torch.ops.distill_ops_emu namespace. Needs distill_ops' compiled extension for the schemas."""
    global _library
    if _library is not None:
        return torch.ops.distill_ops_emu
    from torch.utils import cpp_extension

    from distill_ops.backends import native

    ok, why = native.available("cpu")
    if not ok:
        raise RuntimeError(f"cuda_emu needs distill_ops' extension for the schemas: {why}")
    lib = torch.library.Library("distill_ops_emu", "DEF")
    for op in OPS:
        schema = str(getattr(torch.ops.distill_ops_native, op).default._schema)
        lib.define(schema.split("::", 1)[1])
    BUILD.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []
    # One process at a time mirrors and builds (pytest-xdist's workers share BUILD). torch's own
    # lock is a file that a killed build leaves behind, and every later load waits on it forever;
    # this one is released by the kernel when its holder dies, so while it is held any torch lock
    # left in BUILD is stale.
    with open(BUILD / "load.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (BUILD / "lock").unlink(missing_ok=True)
        _build(cpp_extension, mirror(), sanitize)
    for op in OPS:  # the same fake (meta) kernels, so that torch.compile traces them
        torch.library.register_fake(f"distill_ops_emu::{op}", lib=lib)(
            getattr(native, f"_{op}_fake"))
    _library = lib
    return torch.ops.distill_ops_emu


def _build(cpp_extension, sources: list[str], sanitize: list[str]) -> None:
    """Compiles (what ninja finds out of date) and loads the emulated kernels' library."""
    cpp_extension.load(
        name="distill_ops_cuda_emu_asan" if ASAN else "distill_ops_cuda_emu",
        sources=sources,
        extra_include_paths=[str(HERE), str(HERE / "shim"), str(BUILD / "csrc" / "include"),
                             str(BUILD / "csrc")],
        extra_cflags=["-O1", "-g" if ASAN else "-g0"] + sanitize,
        extra_ldflags=sanitize,
        build_directory=str(BUILD),
        is_python_module=False,
        with_cuda=False,
        verbose=False,
    )


def install() -> None:
    """Makes distill_ops.backends.native call the emulated CUDA kernels (on CPU tensors), with the
    CUDA path of teacher_sample (the kernel draws, reference_sparse.merge_draws merges)."""
    from distill_ops.backends import native

    native.OPS = load()
    native.SAMPLE_MERGED_IN_KERNEL = ()


def asan_env() -> dict[str, str] | None:
    """The environment of a process that runs the AddressSanitizer build (libasan and libstdc++
    preloaded, leak checks off: the interpreter's own leaks are not the kernels'), or None where
    gcc has no libasan."""
    try:
        found = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                                text=True, check=True).stdout.strip()
                 for lib in ("libasan.so", "libstdc++.so")]
    except (OSError, subprocess.CalledProcessError):
        return None
    if not all(os.path.isabs(p) and os.path.exists(p) for p in found):
        return None
    return {"DISTILL_OPS_EMU_ASAN": "1", "LD_PRELOAD": " ".join(found),
            "ASAN_OPTIONS": f"detect_leaks=0:exitcode={ASAN_EXIT_CODE}"}


def clean() -> None:
    shutil.rmtree(BUILD, ignore_errors=True)

"""Register use and spills of every CUDA kernel, from ptxas itself, on a machine without a GPU.

    python -m bench.ptxas_spills [--arch 90] [--jobs 2] [--log BUILD_LOG] [csrc/cuda/x.cu ...]

Each translation unit of csrc/cuda is compiled for one architecture with `ptxas -v` and the
per-kernel report parsed. A spill on the hot path costs local-memory traffic that no CPU test can
see, and it can appear from a refactor that changes no result (af720c9 fixed one: an array left
undefined on one branch made every 16-bit row_kernel spill 72-96 bytes on sm_90). So this exits 1
when a kernel spills, except the float64 instantiations (two registers a value under the
64-register cap of the 1024-thread kernels: they spilled before, and nobody's hot path is fp64).
CI runs it after the tests (`make check-spills`), on the report of the twin's build where there is
one (`--log .prebuilt/build.log`: bench/prebuilt.py builds with DISTILL_OPS_PTXAS_REPORT=1, which
adds `-Xptxas -v`, and keeps the output), so the device code is not compiled a third time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class Kernel:
    name: str  # mangled
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def fp64(self) -> bool:
        # The kernels are templates <scalar_t, T, ...>; fp64 ones are instantiated with <double,
        # double>, mangled "Idd".
        return "Idd" in self.name


def parse(log: str) -> list[Kernel]:
    """The kernels of one `ptxas -v` log, in order."""
    kernels: list[Kernel] = []
    cur: Kernel | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = Kernel(m[1], m[2])
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur.spill_stores, cur.spill_loads = int(m[1]), int(m[2])
        m = _REGS.search(line)
        if m:
            cur.registers = int(m[1])
    return kernels


# A ninja build's output (torch's builds run `ninja -v`): each step's "[i/n] command" line, then
# what the command printed; an nvcc step compiles the .cu after "-c".
_STEP = re.compile(r"^\[\d+/\d+\] (.*)$", re.M)
_NVCC_INPUT = re.compile(r"\bnvcc\b.*\s-c\s+(\S+\.cu)\s")


def split_build_log(text: str) -> dict[str, str]:
    """What each nvcc step of a build's output printed (ptxas's report), by the .cu's file name."""
    steps = list(_STEP.finditer(text))
    parts = {}
    for i, m in enumerate(steps):
        cu = _NVCC_INPUT.search(m[1] + " ")
        if cu:
            end = steps[i + 1].start() if i + 1 < len(steps) else len(text)
            parts[os.path.basename(cu[1])] = text[m.end():end]
    return parts


def _setup_module():
    """setup.py, imported for its toolkit lookup and nvcc flags (its main() runs only as a script)."""
    spec = importlib.util.spec_from_file_location("_distill_ops_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_log(path: str, arch: str) -> str:
    """ptxas -v output of one .cu compiled as setup.py compiles it (its flags, defines, includes)."""
    from torch.utils import cpp_extension
    setup_py = _setup_module()
    home = setup_py._resolve_cuda_home(cpp_extension)
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        raise SystemExit("ptxas_spills: nvcc not found (set CUDA_HOME)")
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    incs += [f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-I{os.path.join(ROOT, 'csrc')}"]
    incs.append(f"-I{sysconfig.get_paths()['include']}")
    cmd = [os.path.join(home, "bin", "nvcc"), "-std=c++20", *setup_py.NVCC_FLAGS,
           "-D_GLIBCXX_USE_CXX11_ABI=1", *incs,
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", *setup_py.PTXAS_REPORT,
           # device code only: ptxas's report is all this needs, and the host half (g++ over
           # torch's headers, half the time) is the extension build's job
           "-cubin", path, "-o", os.devnull]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ptxas_spills: {path} did not compile:\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="default: every csrc/cuda/*.cu")
    ap.add_argument("--arch", default="90", help="one compute capability, e.g. 90 (default) or 80")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--log", help="a build's output made with DISTILL_OPS_PTXAS_REPORT=1 (the "
                    "twin's: .prebuilt/build.log): its report, instead of compiling")
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if args.log:
        if not os.path.exists(args.log):
            raise SystemExit(f"ptxas_spills: no build log at {args.log} (`make device-prebuilt` "
                             "writes .prebuilt/build.log)")
        with open(args.log) as f:
            parts = split_build_log(f.read())
        missing = [os.path.basename(p) for p in files if os.path.basename(p) not in parts]
        if missing:
            raise SystemExit(f"ptxas_spills: {args.log} has no nvcc step for {missing}")
        logs = [parts[os.path.basename(p)] for p in files]
    else:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            logs = list(pool.map(lambda f: compile_log(f, args.arch), files))
    bad = 0
    for path, log in zip(files, logs):
        # (a build for several architectures reports each kernel once per architecture)
        kernels = [k for k in parse(log) if k.arch == f"sm_{args.arch}"]
        if not kernels:
            raise SystemExit(f"ptxas_spills: no ptxas report for sm_{args.arch} of {path} (a "
                             "build log needs DISTILL_OPS_PTXAS_REPORT=1 and that architecture)")
        spilling = [k for k in kernels if k.spill_stores or k.spill_loads]
        print(f"{os.path.relpath(path, ROOT)}: {len(kernels)} kernels on sm_{args.arch}, "
              f"{len(spilling)} spilling, at most {max((k.registers for k in kernels), default=0)} registers")
        for k in spilling:
            tag = "fp64, allowed" if k.fp64 else "SPILLS"
            bad += not k.fp64
            print(f"  {tag}: {k.spill_stores} B stores, {k.spill_loads} B loads, {k.registers} regs  {k.name}")
    if bad:
        print(f"ptxas_spills: {bad} kernel(s) other than fp64 spill registers", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

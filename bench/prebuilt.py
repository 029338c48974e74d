"""python -m bench.prebuilt {build|install|digest}: the extension built ahead for the GPU machine.

A lent GPU session has 15 minutes of device time, and building distill_ops._C there costs one to
two of them. The GPU machine's Python is fixed (3.12, torch 2.11.0+cu130, x86-64), so the dev
machine can build the same extension ahead in a twin environment (`make device-twin`: a venv of
that Python and torch) and send it along (`run(carry=[".prebuilt", ...])`):

    build    (dev machine, twin venv) build _C for sm_90 in a scratch copy of the sources and put
             it, with a stamp, in .prebuilt/
    install  (GPU machine) copy .prebuilt/'s _C into distill_ops/ if the stamp matches: the same
             sources (a digest of setup.py and csrc/), Python tag and torch version; exit 1, saying
             why, when it does not, so bench/gpu_check.sh builds from source instead
    digest   print the sources' digest

A stale or foreign build is never used: the digest covers every file the build reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREBUILT = os.path.join(ROOT, ".prebuilt")
STAMP = "stamp.json"
# The build's output, with ptxas's report of every kernel (make check-spills reads it in CI)
BUILD_LOG = "build.log"
# what setup.py reads: itself and csrc/ (pyproject.toml only names the build backend)
SOURCES = ("setup.py", "csrc")


def source_digest(root: str = ROOT) -> str:
    """sha256 over the relative paths and contents of every file the build reads, in sorted order."""
    files = []
    for top in SOURCES:
        path = os.path.join(root, top)
        if os.path.isfile(path):
            files.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _identity() -> dict:
    """What a built _C must match besides its sources: the Python ABI and torch's exact build."""
    import torch

    return {"ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "torch": torch.__version__}


def build(archs: str, jobs: int) -> int:
    """Build _C from a scratch copy of the sources (the checkout's own build stays untouched)."""
    ident = _identity()
    digest = source_digest()
    with tempfile.TemporaryDirectory(prefix="distill_ops_prebuilt_") as tmp:
        for top in SOURCES:
            src = os.path.join(ROOT, top)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, top))
        os.makedirs(os.path.join(tmp, "distill_ops"))
        env = dict(os.environ, DISTILL_OPS_FORCE_CUDA="1", DISTILL_OPS_CUDA_ARCHS=archs,
                   MAX_JOBS=str(jobs), DISTILL_OPS_PTXAS_REPORT="1")
        run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                             cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        if run.returncode != 0:
            sys.stdout.write(run.stdout[-30000:])
            raise SystemExit(f"prebuilt: the build failed (exit {run.returncode})")
        if source_digest(tmp) != digest:
            raise SystemExit("prebuilt: the sources changed during the build; run it again")
        name = "_C" + ident["ext_suffix"]
        if shutil.which("strip"):
            # the host code's DWARF is half the file and the GPU machine has no gdb; the kernels'
            # line tables (-lineinfo, for compute-sanitizer and ncu) live in .nv_fatbin and stay
            subprocess.run(["strip", "--strip-debug", os.path.join(tmp, "distill_ops", name)],
                           check=True)
        shutil.rmtree(PREBUILT, ignore_errors=True)
        os.makedirs(PREBUILT)
        for f in (name, "_build_info.py"):
            shutil.copy2(os.path.join(tmp, "distill_ops", f), os.path.join(PREBUILT, f))
        with open(os.path.join(PREBUILT, BUILD_LOG), "w") as f:
            f.write(run.stdout)
    with open(os.path.join(PREBUILT, STAMP), "w") as f:
        json.dump(dict(ident, digest=digest, archs=archs, so=name), f, indent=1)
    size = os.path.getsize(os.path.join(PREBUILT, name)) / 2**20
    print(f"prebuilt: {PREBUILT}/{name} ({size:.1f} MiB, sm {archs}, torch {ident['torch']})")
    return 0


def install() -> int:
    """Put the prebuilt _C into distill_ops/ when it was built from these sources for this Python
    and torch; otherwise say why and return 1."""
    try:
        with open(os.path.join(PREBUILT, STAMP)) as f:
            stamp = json.load(f)
    except OSError:
        print(f"prebuilt: no {STAMP} under {PREBUILT}")
        return 1
    want = dict(_identity(), digest=source_digest())
    for key, value in want.items():
        if stamp.get(key) != value:
            print(f"prebuilt: not used: built for {key}={stamp.get(key)!r}, here {value!r}")
            return 1
    for f in (stamp["so"], "_build_info.py"):
        shutil.copy2(os.path.join(PREBUILT, f), os.path.join(ROOT, "distill_ops", f))
    print(f"prebuilt: installed {stamp['so']} (sm {stamp['archs']}, torch {stamp['torch']})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prebuilt", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build _C into .prebuilt/ (dev machine, twin venv)")
    b.add_argument("--archs", default="90", help="DISTILL_OPS_CUDA_ARCHS (default 90: Hopper)")
    b.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or os.cpu_count() or 2))
    sub.add_parser("install", help="copy .prebuilt/'s _C into distill_ops/ if it matches")
    sub.add_parser("digest", help="print the sources' digest")
    args = p.parse_args(argv)
    if args.cmd == "build":
        if not all(a.strip().isdigit() for a in args.archs.replace(",", ";").split(";")):
            p.error(f"--archs: {args.archs!r} is not a list of compute capabilities such as 90 or 80;90")
        if args.jobs < 1:
            p.error(f"--jobs: {args.jobs} must be at least 1")
        return build(args.archs, args.jobs)
    if args.cmd == "install":
        return install()
    print(source_digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())

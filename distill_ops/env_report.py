"""``distill-ops env``: what this installation can run, for a bug report or to see why
``backend="auto"`` picked what it did: the versions, whether the compiled extension loads (and,
if its CUDA part was not built, why), the GPUs torch sees, the backend ``auto`` picks for CPU and
CUDA tensors, and the DISTILL_OPS_* variables that change it.

Versions come from the installed packages' metadata: nothing heavy (transformers, TRL) is imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from typing import Any, Callable, Optional, Sequence

# The packages distill-ops runs on or beside (the peers are optional)
PACKAGES = ("torch", "triton", "transformers", "accelerate", "safetensors", "trl", "liger-kernel")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pick(resolve: Callable, device_type: str) -> str:
    """The backend ``resolve("auto", device)`` returns, or the error it raises (a
    DISTILL_OPS_BACKEND that cannot run on that device, say), as one line."""
    import torch

    try:
        return resolve("auto", torch.device(device_type))
    except (RuntimeError, ValueError) as exc:
        return f"error: {exc}"


def report() -> dict[str, Any]:
    """The facts ``distill-ops env`` prints, as a JSON-ready dict."""
    import torch

    import distill_ops

    from . import backends
    from .ops import sparse as sparse_ops

    cpu_ok, cpu_why = backends.native_status("cpu")
    cuda_ok, cuda_why = backends.native_status("cuda")
    triton_ok, triton_why = backends.triton_status()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "arch": f"sm_{major}{minor}"})
    return {
        "distill_ops": {"version": distill_ops.__version__,
                        "path": os.path.dirname(distill_ops.__file__)},
        "python": f"{platform.python_version()} ({platform.system()} {platform.machine()})",
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "extension": {"cpu": cpu_ok, "cpu_why_not": cpu_why or None,
                      "cuda": cuda_ok, "cuda_why_not": cuda_why or None},
        "triton": {"importable": triton_ok, "why_not": triton_why or None,
                   "interpreter": backends.triton_interpreted()},
        "gpus": gpus,
        # the dense losses (kd_loss, fused_linear_kd_loss) and the sparse ops (the sparse losses,
        # teacher_topk, teacher_sample) resolve separately: auto leaves the sparse CUDA kernels out
        "auto": {device: {"dense": _pick(backends.resolve, device),
                          "sparse": _pick(sparse_ops.resolve, device)}
                 for device in ("cpu", "cuda")},
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("DISTILL_OPS_") or k == "TRITON_INTERPRET"},
    }


def _yes(ok: bool, why: Optional[str]) -> str:
    return "yes" if ok else f"no ({why})"


def format_report(r: dict[str, Any]) -> str:
    """report()'s dict as the lines ``distill-ops env`` prints."""
    pkgs = ", ".join(f"{name} {version or 'not installed'}"
                     + (f" (CUDA {r['torch_cuda']})" if name == "torch" and r["torch_cuda"] else "")
                     for name, version in r["packages"].items())
    ext, tri = r["extension"], r["triton"]
    gpus = ", ".join(f"{g['name']} ({g['arch']})" for g in r["gpus"]) or "none visible to torch"
    lines = [
        f"distill-ops {r['distill_ops']['version']} at {r['distill_ops']['path']}",
        f"Python {r['python']}",
        f"packages: {pkgs}",
        f"compiled kernels: CPU {_yes(ext['cpu'], ext['cpu_why_not'])}; "
        f"CUDA {_yes(ext['cuda'], ext['cuda_why_not'])}",
        f"Triton: importable {_yes(tri['importable'], tri['why_not'])}; "
        f"CPU interpreter (TRITON_INTERPRET) {'on' if tri['interpreter'] else 'off'}",
        f"GPUs: {gpus}",
        'backend="auto" picks:',
    ]
    for device, label in (("cpu", "CPU tensors: "), ("cuda", "CUDA tensors:")):
        pick = r["auto"][device]
        lines.append(f"  {label} {pick['dense']} (every op)" if pick["dense"] == pick["sparse"]
                     else f"  {label} dense losses {pick['dense']}; "
                          f"sparse losses, top-k, sampling {pick['sparse']}")
    env = r["environment"]
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in env.items())
                                    or "no DISTILL_OPS_* variable set"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``distill-ops env [--json]``: prints the report; returns 0."""
    import argparse

    p = argparse.ArgumentParser(prog="distill-ops env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args(argv)
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

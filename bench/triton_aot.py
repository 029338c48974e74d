"""python -m bench.triton_aot: compile every Triton kernel the package launches for a GPU, on a
machine without one.

    python -m bench.triton_aot [--arch 90] [--quick]

The package's own launchers (backends/triton: dense_forward, sparse_forward, topk_forward,
sample_forward) run on small CPU tensors with the kernel launch intercepted: each launch's
arguments become a signature (tensor dtypes, scalar types) and its constexprs and options
(num_warps, enable_fp_fusion), and triton.compile builds that specialisation through TTIR, TTGIR,
LLVM IR and PTX to a cubin with the ptxas that ships with Triton, for sm_<arch>. So a kernel that
only the interpreter accepts (CI runs Triton under TRITON_INTERPRET=1) fails here, not on the first
GPU. Per kernel it prints the registers, the local memory (spills) and the shared memory that
cuobjdump reports, and checks that the sampling kernel has no fused multiply-add: its noise must be
rounded operation by operation (targets/rng.py noise_log).

Needs TRITON_INTERPRET unset (the interpreter replaces the JIT functions); it removes it from its
own environment before importing Triton.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

POINTER = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
           torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "i1"}
# PTX float64 arithmetic (not the loads of the float64 scalar arguments, nor their conversion)
F64_ARITHMETIC = re.compile(r"\b(?:add|sub|mul|fma|div|rcp|sqrt|neg|abs|min|max|setp|selp|ex2|lg2)"
                            r"(?:\.\w+)*\.f64\b")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__} {value!r}")


def capture(launcher: Callable[[], object]) -> list:
    """The (kernel, signature, constexprs, options) of every launch `launcher` makes."""
    launches = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            launches.append((self, args, kwargs))
        return launch

    saved = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        launcher()
    except Exception:
        # The launch did not run, so host code after it reads unwritten outputs (the sampler's
        # raw draws, merged on the host past MERGE_IN_KERNEL_MAX_S): only an error before any
        # launch is the launcher's own.
        if not launches:
            raise
    finally:
        JITFunction.__getitem__ = saved
    out = []
    for fn, args, kwargs in launches:
        bound = dict(zip(fn.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
        signature, constexprs = {}, {}
        for param in fn.params:
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + POINTER[value.dtype]
            elif param.annotation_type:  # as the JIT launcher: a float64-annotated float
                signature[param.name] = param.annotation_type
            else:
                signature[param.name] = _scalar_type(value)
        out.append((fn, signature, constexprs, options))
    return out


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK and LOCAL (where spills go), SHARED of the cubin's kernel, from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True,
                              text=True, timeout=60).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        return {}
    reg, stack, shared, local = map(int, found.groups())
    return {"regs": reg, "stack": stack, "shared": shared, "local": local}


def launchers(quick: bool) -> list:
    """(label, launcher) for the specialisations worth compiling: every divergence, tail mode and
    dtype path of the launchers, on small CPU tensors (only their shapes and dtypes matter)."""
    from distill_ops.backends import base
    from distill_ops.backends import reference_sparse as rs
    from distill_ops.backends.triton import dense, sparse, topk

    v = 128256
    divs = {"forward_kl": base.FORWARD_KL, "reverse_kl": base.REVERSE_KL, "jsd": base.JSD,
            "skew_forward_kl": base.SKEW_FORWARD_KL, "skew_reverse_kl": base.SKEW_REVERSE_KL}
    if quick:
        divs = {name: divs[name] for name in ("forward_kl", "jsd")}

    def logits(dtype, n=2, width=v):
        return torch.zeros(n, width, dtype=dtype)

    def dense_case(div, dtype, labels, grad, softcap=0.0, temperature=2.0):
        s, t = logits(dtype), logits(dtype)
        lab = torch.zeros(2, dtype=torch.int64) if labels else None
        return lambda: dense.dense_forward(
            s, t, lab, divergence=div, mix=0.5, temperature=temperature, softcap=softcap,
            soft_coef=1.0, hard_coef=0.5 if labels else 0.0, ignore_index=-100,
            grad=torch.empty_like(s) if grad else None, grad_scale=None)

    def sparse_case(div, mode, dtype, k=64, tail=False, retemper=False):
        s = logits(dtype)
        ids = torch.zeros(2, k, dtype=torch.int32)
        lps = torch.zeros(2, k, dtype=torch.float32)
        return lambda: sparse.sparse_forward(
            s, ids, lps, torch.zeros(2) if tail else None, torch.zeros(2, dtype=torch.int64),
            divergence=div, mix=0.5, mode=mode, temperature=2.0,
            target_scale=0.5 if retemper else 1.0, soft_coef=1.0, hard_coef=0.5,
            ignore_index=-100, grad=torch.empty_like(s), grad_scale=None)

    cases = []
    for name, div in divs.items():
        cases.append((f"dense {name} fp32 +ce grad", dense_case(div, torch.float32, True, True)))
    cases += [
        ("dense forward_kl bf16 fwd", dense_case(base.FORWARD_KL, torch.bfloat16, False, False)),
        ("dense forward_kl bf16 softcap grad",
         dense_case(base.FORWARD_KL, torch.bfloat16, False, True, softcap=30.0, temperature=1.0)),
    ]
    modes = {"full": rs.MODE_FULL, "support": rs.MODE_SUPPORT, "tail": rs.MODE_TAIL}
    for mname, mode in modes.items():
        cases.append((f"sparse forward_kl {mname} bf16",
                      sparse_case(base.FORWARD_KL, mode, torch.bfloat16, tail=mname == "tail")))
    if not quick:
        cases.append(("sparse jsd support fp32 retemper",
                      sparse_case(base.JSD, rs.MODE_SUPPORT, torch.float32, retemper=True)))
        cases.append(("dense jsd fp64 grad", dense_case(base.JSD, torch.float64, False, True)))
    cases += [
        ("topk k=64 bf16", lambda: topk.topk_forward(logits(torch.bfloat16), 64, temperature=1.0)),
        ("sample S=64 fp32", lambda: topk.sample_forward(
            logits(torch.float32), 64, temperature=1.0, proposal_temperature=1.0, seed=0)),
        ("sample S=1 bf16", lambda: topk.sample_forward(
            logits(torch.bfloat16), 1, temperature=0.7, proposal_temperature=2.0, seed=0)),
    ]
    if not quick:
        cases += [
            ("topk k=8 fp32", lambda: topk.topk_forward(logits(torch.float32), 8, temperature=2.0)),
            ("sample S=8 fp64", lambda: topk.sample_forward(
                logits(torch.float64, width=1000), 8, temperature=1.0, proposal_temperature=1.0,
                seed=0)),
            # past MERGE_IN_KERNEL_MAX_S: the raw draws only (the merge runs on the host)
            ("sample S=1024 fp32 draws", lambda: topk.sample_forward(
                logits(torch.float32), 1024, temperature=1.0, proposal_temperature=1.0, seed=0)),
        ]
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.triton_aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--quick", action="store_true", help="fewer specialisations")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, launcher in launchers(args.quick):
        for fn, signature, constexprs, options in capture(launcher):
            t0 = time.monotonic()
            try:
                kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                        target=target, options=options)
            except Exception as exc:  # noqa: BLE001 - report every kernel, fail at the end
                failures += 1
                print(f"FAIL {label}: {fn.__name__}: {type(exc).__name__}: {exc}"[:2000])
                continue
            use = resource_usage(kernel.asm["cubin"])
            # The noise is float32 whatever the logits (float64 ones' merge uses libdevice's
            # double exp and log, which are built on fma.rn.f64 by design).
            fmas = kernel.asm["ptx"].count("fma.rn.f32")
            note = ""
            if fn.__name__ == "_sample_kernel" and fmas:
                failures += 1
                note = f"  FAIL: {fmas} float32 fused multiply-adds in the sampling kernel"
            f64 = F64_ARITHMETIC.findall(kernel.asm["ptx"])
            if constexprs.get("ACC") == triton.language.float32 and f64:
                failures += 1
                note += (f"  FAIL: float64 arithmetic in a float32 kernel ({len(f64)}, e.g. "
                         f"{f64[0]}: a float64 scalar argument used before acc_scalar)")
            if use.get("local") or use.get("stack"):
                note += f"  (stack {use['stack']} B, local {use['local']} B: spills)"
            print(f"ok   {label}: {fn.__name__} sm_{args.arch} regs {use.get('regs')} "
                  f"shared {use.get('shared')} B  {time.monotonic() - t0:.1f} s{note}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

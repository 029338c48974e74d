"""Drive every CUDA kernel of distill_ops once on small, awkward shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 -m bench.sanitize_ops
    compute-sanitizer --tool racecheck python3 -m bench.sanitize_ops --quick

Shapes cover one-element rows, odd widths (unaligned 16-byte loads), rows split across blocks
(few rows, long vocabulary), the resident dense kernel (thread-block clusters) and every dtype;
the losses run forward and backward. The script
checks nothing numerically (the test suite does). A family of ops that raises (for instance one
not built for CUDA) is reported as FAILED with its error and the exit code is 1, never hidden.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import distill_ops

# --device cpu runs the same calls through the CPU kernels: a check of this script itself.
DEV = "cuda"
BACKEND = "cuda"


def _dense(shapes, dtypes) -> None:
    for n, v in shapes:
        for dtype in dtypes:
            for div in distill_ops.DIVERGENCES:
                s = torch.randn(n, v, device=DEV, dtype=dtype, requires_grad=True)
                t = torch.randn(n, v, device=DEV, dtype=dtype)
                labels = torch.randint(0, v, (n,), device=DEV)
                loss = distill_ops.kd_loss(s, t, divergence=div, temperature=2.0, labels=labels,
                                           hard_weight=0.5, backend=BACKEND)
                loss.backward()


def resident_applies(v: int, dtype: torch.dtype) -> bool:
    """Whether the resident kernel takes rows of v columns (csrc/cuda/dense_resident.cuh: 16-bit
    or float32, at most 16 blocks of 512 threads x 4 16-byte vectors)."""
    return dtype != torch.float64 and v <= 16 * 512 * 4 * (128 // torch.finfo(dtype).bits)


def _dense_resident(shapes, dtypes) -> None:
    """The dense losses again on the resident (cluster) kernel, for every shape and dtype it takes.
    DISTILL_OPS_CUDA_RESIDENT=require: where it would fall back to the row kernels, the family
    fails with the reason instead of passing without having run it."""
    os.environ["DISTILL_OPS_CUDA_RESIDENT"] = "require"
    try:
        for n, v in shapes:
            _dense([(n, v)], [d for d in dtypes if resident_applies(v, d)])
    finally:
        del os.environ["DISTILL_OPS_CUDA_RESIDENT"]


def _sparse(shapes, dtypes) -> None:
    for n, v in shapes:
        for dtype in dtypes:
            k = min(v, 7)
            t = torch.randn(n, v, device=DEV, dtype=torch.float32)
            targets = distill_ops.teacher_topk(t, k)  # auto backend: the validated kernel
            for div in ("forward_kl", "reverse_kl", "jsd"):
                for tail in distill_ops.TAILS:
                    s = torch.randn(n, v, device=DEV, dtype=dtype, requires_grad=True)
                    loss = distill_ops.sparse_kd_loss(s, targets, divergence=div, tail=tail,
                                                      backend=BACKEND)
                    loss.backward()


def _teacher(shapes, dtypes) -> None:
    for n, v in shapes:
        for dtype in dtypes:
            t = torch.randn(n, v, device=DEV, dtype=dtype)
            # The one-read kernel where it takes k (csrc/cuda/topk_filter.cuh), else the radix one;
            # then the radix kernel for every k; then rows sorted ascending, which compact the
            # one-read kernel's candidate buffer every tile.
            for k in sorted({1, min(v, 5), min(v, 64), min(v, 2048), min(v, 3500)}):
                distill_ops.teacher_topk(t, k, backend=BACKEND)
                os.environ["DISTILL_OPS_CUDA_TOPK"] = "radix"
                try:
                    distill_ops.teacher_topk(t, k, backend=BACKEND)
                finally:
                    del os.environ["DISTILL_OPS_CUDA_TOPK"]
            distill_ops.teacher_topk(t.sort(dim=-1).values, min(v, 64), backend=BACKEND)
            # sample groups of 1, 2, 4 and 8 (S = 13: a partial group), and the column splits
            for s in (1, 2, 3, 13):
                distill_ops.teacher_sample(t, s, proposal_temperature=1.5, seed=s, backend=BACKEND)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (racecheck is slow)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    global DEV, BACKEND
    DEV = BACKEND = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device", file=sys.stderr)
        return 2
    shapes = [(1, 1), (3, 7), (5, 1000), (2, 131073)]
    if not args.quick:
        shapes += [(64, 4099), (1, 262144)]
    dtypes = [torch.float32, torch.bfloat16] if args.quick else \
        [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    failed = False
    for name, fn in (("dense", _dense), ("dense-resident", _dense_resident), ("sparse", _sparse),
                     ("teacher", _teacher)):
        try:
            fn(shapes, dtypes)
            if DEV == "cuda":
                torch.cuda.synchronize()
            print(f"sanitize_ops: {name}: ran")
        except (RuntimeError, ValueError, NotImplementedError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"sanitize_ops: {name}: FAILED: {first}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

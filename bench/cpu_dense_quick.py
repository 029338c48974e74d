"""Quick CPU check of the compiled dense kernels against eager PyTorch (not the full harness).

    .venv/bin/python bench/cpu_dense_quick.py [--n 512] [--v 128256] [--dtype float32] [--reps 5]

Times loss + gradient (median of reps, perf_counter) and the peak extra resident memory of one call
(Linux: VmHWM reset through /proc/self/clear_refs), for:
  eager     log_softmax(s/tau), log_softmax(t/tau), kl_div(log_target) * tau^2, backward
  native    torch.ops.distill_ops_native.dense_forward writing the gradient into a new buffer
  inplace   the same with the gradient written over the student logits
for each divergence asked (--div forward_kl,jsd,...; eager is forward KL only).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from distill_ops.backends import native
from distill_ops.backends.base import DIVERGENCE_CODES


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_extra_mib(fn) -> float:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--div", default="forward_kl")
    args = ap.parse_args()
    ok, why = native.available("cpu")
    if not ok:
        raise SystemExit(why)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.n, args.v, generator=g) * 3).to(dtype)
    t = (torch.randn(args.n, args.v, generator=g) * 3).to(dtype)
    tau = args.tau
    print(f"N={args.n} V={args.v} {args.dtype} tau={tau} threads={torch.get_num_threads()}")

    def eager():
        x = s.detach().requires_grad_(True)
        logq = torch.log_softmax(x.float() / tau, -1)
        logp = torch.log_softmax(t.float() / tau, -1)
        loss = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum") * tau**2
        loss.backward()
        return x.grad

    rows = [("eager forward_kl", eager)]
    for name in args.div.split(","):
        code = DIVERGENCE_CODES[name]
        kw = dict(divergence=code, mix=0.5 if name == "jsd" else 0.1, temperature=tau, softcap=0.0,
                  soft_coef=tau * tau, hard_coef=0.0, ignore_index=-100, grad_scale=None)

        def run_native(kw=kw):
            grad = torch.empty_like(s)
            native.dense_forward(s, t, None, grad=grad, **kw)
            return grad

        buf = s.clone()

        def run_inplace(kw=kw, buf=buf):
            native.dense_forward(buf, t, None, grad=buf, **kw)  # overwrites buf: timing only
            return buf

        rows += [(f"native {name}", run_native), (f"inplace {name}", run_inplace)]

    base_ms = None
    for label, fn in rows:
        ms = timed(fn, args.reps)
        mib = peak_extra_mib(fn)
        base_ms = base_ms or ms
        print(f"{label:28s} {ms:9.1f} ms  x{base_ms / ms:5.2f}  peak extra {mib:8.1f} MiB")


if __name__ == "__main__":
    main()

"""python -m bench.trainer_step: one distillation training step of a transformers Llama student
against a Llama teacher, with the eager KD loss users write, torch.compile of it, Liger-Kernel's
fused-linear loss and distill_ops' fused losses.

    python -m bench.trainer_step [--device cuda|cpu] [--shape 3b-1b|small|tiny] [--batch B]
        [--seq T] [--steps S] [--providers NAME ...] [--find-max] [--budget-s SEC]
        [--out PATH|DIR]

Every provider runs the same step: the student forward (fp32 master weights, bf16 autocast on a
GPU), the teacher forward (bf16 weights on a GPU, no grad), the loss (over the full (B x T, V)
logits, or from the last hidden states and lm_heads for the fused-linear ones), the backward and an
AdamW step; gradient checkpointing on the student on a GPU. Only the loss differs:

- eager: fp32 log_softmax of both, F.kl_div(batchmean, log_target) x tau^2 (bench/providers.py's
  eager_forward_kl, as users write it);
- compile: that same eager loss function wrapped in torch.compile(dynamic=False), as a user who
  puts @torch.compile on their loss gets it (the models stay eager); compiled afresh for the row
  (torch._dynamo.reset()), the compilation inside the first, untimed step (the row's first_call_s);
- liger: Liger-Kernel's LigerFusedLinearJSD(jsd_beta=0: the forward KL the others compute) on both
  models' last hidden states and lm_heads, x tau^2 like the others; GPUs only (Triton): on the CPU,
  or without liger_kernel, the row says unavailable with the reason;
- distill_ops: distill_ops.kd_loss(..., inplace_grad=True): no probability tensor, the logits'
  gradient written over the student logits;
- distill_ops-fused: distill_ops.fused_linear_kd_loss on both models' last hidden states and
  lm_heads (the trainer's fused_linear=True): neither model's logits exist, chunks of them do.

Per provider: the median step time and tokens per second at (B, T), the peak memory of a step,
the first step's loss (they must agree: same models, same data; loss_vs_eager is the relative
difference from eager's), the first step's wall time (first_call_s: never timed, compilation
included), and with --find-max (CUDA) the
largest batch at sequence length T that trains without running out of memory (doubling, then
bisection; each try is one step). Models are random-initialised from a config: nothing is
downloaded. The JSON (schema distill-ops-bench-trainer/1) goes to bench/results/ like the kernel
suites'; `python -m bench.readme_table` renders it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from . import measure, report
from .config import split_list
from .providers import TEMPERATURE, Unavailable, eager_forward_kl, fresh_compiler, import_or

SCHEMA = "distill-ops-bench-trainer/1"

# Llama-3.2-3B-like and -1B-like shapes (hidden, layers, heads, kv heads, MLP), and small ones.
SHAPES = {
    "3b-1b": {"vocab": 128256,
              "teacher": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192),
              "student": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192)},
    "small": {"vocab": 32000,
              "teacher": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704),
              "student": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352)},
    "tiny": {"vocab": 2048,
             "teacher": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176),
             "student": dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=96)},
}
DEFAULTS = {"cuda": dict(shape="3b-1b", batch=4, seq=2048),
            "cpu": dict(shape="small", batch=4, seq=256)}
# In run order: issue 5's comparison (eager against distill_ops) first, so that a run cut by its
# --budget-s or a device-call limit (bench/gpu_check.sh) still has it; the other peers after.
PROVIDERS = ("eager", "distill_ops", "distill_ops-fused", "compile", "liger")
MAX_TOKENS = 1 << 21  # --find-max stops doubling here


def eager_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    v = student_logits.shape[-1]
    return eager_forward_kl(student_logits.reshape(-1, v), teacher_logits.reshape(-1, v))


def fused_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    import distill_ops

    return distill_ops.kd_loss(student_logits, teacher_logits, temperature=TEMPERATURE,
                               reduction="mean", inplace_grad=True)


def compiled_eager_loss() -> Callable:
    """eager_loss under torch.compile(dynamic=False), compiled afresh (bench/providers.py's
    fresh_compiler, as the kernel suites' torch-compile rows)."""
    return fresh_compiler()(eager_loss)


def liger_loss(device: torch.device) -> Callable:
    """Liger-Kernel's LigerFusedLinearJSD on (student hidden, student lm_head weight, teacher
    hidden, teacher lm_head weight); jsd_beta=0 is KL(teacher || student), the forward KL of the
    other providers (bench/providers.py's linear suite checks it). Unavailable off CUDA or when
    liger_kernel does not import."""
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel runs on GPUs only (Triton kernels); this run is on "
                          f"{device.type}")
    lk = import_or("liger_kernel.transformers", "liger_kernel")
    fl = lk.LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)

    def loss(h, w_s, h_t, w_t):
        return fl(h.reshape(-1, h.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t,
                  None) * TEMPERATURE ** 2

    return loss


def distill_ops_fused_linear(h, w_s, h_t, w_t):
    from distill_ops.fused_linear import fused_linear_kd_loss

    return fused_linear_kd_loss(h, w_s, h_t, w_t, temperature=TEMPERATURE, reduction="mean")


def make_loss(name: str, device: torch.device):
    """(loss, on_hidden): on_hidden False: loss(student logits, teacher logits); True:
    loss(student hidden, student lm_head weight, teacher hidden, teacher lm_head weight).
    Raises Unavailable when the provider cannot run here."""
    if name == "eager":
        return eager_loss, False
    if name == "compile":
        return compiled_eager_loss(), False
    if name == "liger":
        return liger_loss(device), True
    if name == "distill_ops":
        return fused_loss, False
    if name == "distill_ops-fused":
        return distill_ops_fused_linear, True
    raise ValueError(f"unknown provider {name!r}")


def build_models(shape: dict, device: torch.device, seq: int):
    """The teacher (bf16 on a GPU, eval mode) and the student (fp32), built on the device."""
    from distill_ops.trainer.models import llama  # transformers: only when a run needs models

    with torch.device(device):
        teacher = llama(shape["vocab"], **shape["teacher"], max_positions=seq, seed=1)
        student = llama(shape["vocab"], **shape["student"], max_positions=seq, seed=2)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student


class Step:
    """One training step with a given loss; the optimizer persists across calls."""

    def __init__(self, teacher, student, loss: Callable, device: torch.device,
                 on_hidden: bool = False):
        """``loss`` takes (student logits, teacher logits); with ``on_hidden`` (the fused-linear
        losses) (student hidden, student lm_head weight, teacher hidden, teacher lm_head weight),
        called inside the autocast region as the trainer's fused_linear does."""
        from distill_ops.trainer.objective import LastHidden

        self.teacher, self.student, self.loss, self.device = teacher, student, loss, device
        self.on_hidden = on_hidden
        self.opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.amp = torch.bfloat16 if device.type == "cuda" else None
        if on_hidden:
            self.s_body, self.t_body = LastHidden(student), LastHidden(teacher)

    def __call__(self, input_ids: torch.Tensor) -> float:
        from distill_ops.trainer.eval import autocast

        with autocast(self.device, self.amp):
            if self.on_hidden:
                h = self.s_body(input_ids)
                with torch.no_grad():
                    h_t = self.t_body(input_ids)
                loss = self.loss(h, self.s_body.head.weight, h_t, self.t_body.head.weight)
            else:
                s_logits = self.student(input_ids=input_ids, use_cache=False).logits
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        if not self.on_hidden:
            loss = self.loss(s_logits, t_logits)
            del t_logits
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def _tokens(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM) or "out of memory" in str(exc).lower()


def time_steps(step: Step, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    """Warm-up steps (at least one: the first step, compilation included, is never timed; its
    loss and wall time are kept), then timed steps: median, min, max, peak."""
    device = step.device
    measure.sync(device)
    t0 = time.perf_counter()
    first_loss = step(ids)
    measure.sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        measure.sync(device)
        t0 = time.perf_counter()
        loss = step(ids)
        measure.sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"step_ms": 1e3 * med, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
           "tokens_per_s": ids.numel() / med, "first_loss": first_loss, "last_loss": loss,
           "first_call_s": first_call_s}
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["peak_step_extra_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    else:  # one more step, for the resident-set high-water mark above what it starts with
        extra = measure.peak_extra_bytes(device, lambda: step(ids), lambda: None)
        out["peak_step_extra_gb"] = None if extra is None else extra / 1e9
    return out


def find_max_batch(step: Step, vocab: int, seq: int, deadline: float) -> dict:
    """The largest batch at length seq whose step fits: doubling from 1, then bisection."""
    device = step.device
    tries: list = []

    def fits(b: int) -> bool:
        try:
            step(_tokens(vocab, b, seq, device, seed=b))
            measure.sync(device)
            ok = True
        except Exception as exc:  # noqa: BLE001 - only an OOM is an answer; re-raise the rest
            if not _is_oom(exc):
                raise
            ok = False
        step.opt.zero_grad(set_to_none=True)
        _free(device)
        tries.append([b, ok])
        return ok

    lo, hi = 0, None
    b = 1
    while b * seq <= MAX_TOKENS and time.monotonic() < deadline:
        if not fits(b):
            hi = b
            break
        lo, b = b, 2 * b
    while hi is not None and hi - lo > 1 and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    exact = hi is not None and hi - lo == 1
    return {"max_batch": lo, "max_tokens": lo * seq, "max_exact": exact, "tries": tries}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trainer_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--shape", choices=tuple(SHAPES), default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before the timed ones (at least 1: the first step)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                   help=f"of {', '.join(PROVIDERS)} (spaces or commas)")
    p.add_argument("--find-max", action="store_true", help="search the largest batch (CUDA only)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="the max-batch search stops (keeping what it found) after this long")
    p.add_argument("--out", default=None, help="JSON path, or a directory for the automatic name")
    args = p.parse_args(argv)
    args.providers = split_list(args.providers)
    unknown = [name for name in args.providers if name not in PROVIDERS]
    if unknown:
        p.error(f"--providers: unknown {unknown} (choose from {', '.join(PROVIDERS)})")
    return args


def main(argv=None) -> dict:
    from distill_ops.trainer.models import count_parameters

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.find_max and device.type != "cuda":
        raise SystemExit("--find-max needs a CUDA device (the CPU does not run out of memory)")
    d = DEFAULTS[device.type]
    shape_name = args.shape or d["shape"]
    batch, seq = args.batch or d["batch"], args.seq or d["seq"]
    shape = SHAPES[shape_name]
    settings = {"shape": shape_name, **shape, "batch": batch, "seq": seq, "warmup": args.warmup,
                "steps": args.steps, "temperature": TEMPERATURE,
                "step": "student fwd (fp32 weights, bf16 autocast on GPU, gradient checkpointing "
                        "on GPU) + teacher fwd (bf16 on GPU, no grad) + loss + backward + AdamW"}
    doc = report.header(device, "trainer", False, list(sys.argv[1:] if argv is None else argv),
                        settings)
    doc["schema"] = SCHEMA
    when = report._dt.datetime.fromisoformat(doc["date"])
    out = report.output_path(args.out, report.default_path(doc["device"], "trainer", False, when))
    deadline = time.monotonic() + args.budget_s
    eager_first = None
    for name in args.providers:
        row = {"provider": name, "shape": shape_name, "V": shape["vocab"], "batch": batch,
               "seq": seq, "status": "ok"}
        teacher = student = step = None
        try:
            loss, on_hidden = make_loss(name, device)  # Unavailable before the models are built
            torch.manual_seed(0)
            teacher, student = build_models(shape, device, seq)
            row["teacher_params"] = count_parameters(teacher)
            row["student_params"] = count_parameters(student)
            step = Step(teacher, student, loss, device, on_hidden)
            row.update(time_steps(step, _tokens(shape["vocab"], batch, seq, device), args.warmup,
                                  args.steps))
            if name == "eager":
                eager_first = row["first_loss"]
            if eager_first:
                row["loss_vs_eager"] = abs(row["first_loss"] - eager_first) / abs(eager_first)
            if args.find_max:
                row.update(find_max_batch(step, shape["vocab"], seq, deadline))
        except Unavailable as exc:
            row["status"] = "unavailable"
            row["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported in the row, the next provider still runs
            row["status"] = "oom" if _is_oom(exc) else "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        del teacher, student, step
        _free(device)
        doc["rows"].append(row)
        report.write(doc, out)
        print(summary_line(row))
    print(f"wrote {out}")
    doc["path"] = str(out)
    return doc


def summary_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['provider']:17s} {row['status']}: {row.get('error', '')[:200]}"
    text = (f"{row['provider']:17s} B={row['batch']} T={row['seq']}  {row['step_ms']:.1f} ms/step  "
            f"{row['tokens_per_s']:.0f} tok/s  first loss {row['first_loss']:.5f}")
    if row.get("loss_vs_eager", 0.0) > 1e-2:
        text += f" (differs from eager's by {row['loss_vs_eager']:.1e})"
    text += f"  first step {row['first_call_s']:.2f} s"
    if row.get("peak_step_extra_gb") is not None:
        text += f"  step memory {1e3 * row['peak_step_extra_gb']:.0f} MB"
    if "max_tokens" in row:
        more = "" if row["max_exact"] else "+"
        text += f"  max batch {row['max_batch']}{more} ({row['max_tokens']} tokens)"
    return text


def render(paths) -> Optional[str]:
    """The README table of the newest trainer file per device (None when there is none)."""
    newest: dict = {}
    for path in paths:
        doc = report.load(path)
        if doc.get("schema") != SCHEMA:
            continue
        name = doc.get("device", {}).get("name", "?")
        if name not in newest or doc.get("date", "") > newest[name].get("date", ""):
            newest[name] = doc
    if not newest:
        return None
    out = []
    for name, doc in sorted(newest.items()):
        s = doc["settings"]
        out.append(f"**{name}**, trainer step ({s['shape']}: V = {s['vocab']}, batch "
                   f"{s['batch']} x "
                   f"{s['seq']} tokens; torch {doc['versions'].get('torch')}; commit "
                   f"{doc['commit'][:10]}; {doc['date'][:10]})")
        out.append("")
        out.append("| provider | ms / step | tokens / s | peak memory | largest batch "
                   "| first loss |")
        out.append("|---|---|---|---|---|---|")
        for r in doc["rows"]:
            if r["status"] != "ok":
                out.append(f"| {r['provider']} | {r['status']} | | | | |")
                continue
            if "peak_gb" in r:
                peak = f"{r['peak_gb']:.1f} GB (step: {r['peak_step_extra_gb']:.1f})"
            elif r.get("peak_step_extra_gb") is not None:
                peak = f"step: {1e3 * r['peak_step_extra_gb']:.0f} MB (RSS)"
            else:
                peak = "n/a"
            big = (f"{r['max_batch']}{'' if r['max_exact'] else '+'} x {r['seq']}"
                   if "max_batch" in r else "not searched")
            out.append(f"| {r['provider']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                       f"{peak} | "
                       f"{big} | {r['first_loss']:.5f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""One row per (case, provider). A provider that is missing, unavailable, fails or runs out of
memory becomes a row with its status and error string; nothing is dropped and nothing kills the run.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Callable, Optional

import torch

from . import agreement, inputs, measure
from . import providers as prov

# Bytes of fp32 (N x V) temporaries an eager-style provider holds at its peak, per divergence
# (forward+backward; a forward alone holds about 60 %). Used only to shrink N before a row is tried;
# a row that still runs out of memory is retried at N / 2 (twice at most).
EAGER_FACTOR = {"forward_kl": 6, "reverse_kl": 7, "jsd": 12, "generalized_jsd": 12,
                "skew_forward_kl": 10, "skew_reverse_kl": 10, "topk": 3, "sample": 3}
# The sparse divergences on the target support hold k-wide temporaries; what is N x V is the fp32
# upcast of the student and the gather's fp32 gradient.
SPARSE_SUPPORT_FACTOR = 2
# The inputs that get a gradient, per suite (the student side).
GRAD_INPUTS = {"dense": ("student",), "sparse": ("student",), "linear": ("hs", "ws")}
SHRINK_HEADROOM = 0.9
OOM_RETRIES = 2


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _error_text(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def estimate_bytes(case, provider, n: int, copies: int) -> int:
    """Rough device memory a row needs: inputs, gradient, and a baseline's fp32 temporaries."""
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    nv = n * case.v
    total = inputs.set_bytes(case, n) * copies
    grad = nv * elem if (case.mode != "fwd" and case.suite in ("dense", "sparse")) else 0
    total += grad
    if case.suite == "linear":
        # the logits: all of them for a baseline (student, teacher, fp32 temporaries), chunks
        # for the fused providers, which also keep the student's gradients
        total += inputs.set_bytes(case, n)
        if provider.family != "baseline":
            return total
    if provider.family == "baseline":
        if case.suite == "sparse" and not prov.sparse_uses_full_vocab(case.divergence):
            factor = SPARSE_SUPPORT_FACTOR
        else:
            factor = EAGER_FACTOR.get(case.divergence, 6) + (2 if case.hard_label else 0)
        work = factor * nv * 4
        if case.mode == "fwd":
            work = int(work * 0.6)
        if case.mode == "bwd":
            work *= copies  # one retained graph per input copy
        total += work
    return total


def build_step(fn: Callable, sets: list, mode: str, suite: str):
    """(step, reset, first_loss): ``step`` runs one call on the next input copy."""
    keys = GRAD_INPUTS.get(suite, ()) if mode != "fwd" else ()
    students = [s[key] for s in sets for key in keys]
    for x in students:
        x.requires_grad_(True)
    idx = [0]

    def next_index() -> int:
        i = idx[0]
        idx[0] = (i + 1) % len(sets)
        return i

    def reset() -> None:
        for x in students:
            x.grad = None

    if mode == "fwd":
        def step():
            return fn(sets[next_index()])
    elif mode == "fwdbwd":
        def step():
            loss = fn(sets[next_index()])
            loss.backward()
            return loss
    elif mode == "bwd":
        losses = [fn(s) for s in sets]

        def step():
            loss = losses[next_index()]
            loss.backward(retain_graph=True)
            return loss
    else:  # pragma: no cover - config validates modes
        raise ValueError(mode)
    return step, reset


def first_set_grads(x: dict, mode: str, suite: str) -> dict:
    """The gradients the first call left on the first input set (none for a forward)."""
    if mode == "fwd":
        return {}
    return {key: x[key].grad for key in GRAD_INPUTS.get(suite, ())}


def _loss_value(out) -> Optional[float]:
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return float(out.detach().float())
    return None


class Runner:
    def __init__(self, device: torch.device, timer, *, budget_s: Optional[float] = None,
                 progress: bool = True, on_row: Optional[Callable] = None,
                 copy_gb_per_s: Optional[float] = None):
        self.device = device
        self.timer = timer
        self.budget_s = budget_s
        self.progress = progress
        self.on_row = on_row
        self.copy_gb_per_s = copy_gb_per_s
        # inputs rotate among copies larger than this cache (GPU: L2; CPU: the last-level cache)
        self.cache_bytes = measure.rotation_cache_bytes(device)
        self.rows: list = []
        self.started = time.monotonic()

    # ------------------------------------------------------------------ one row

    def _base_row(self, case, provider) -> dict:
        return {
            "suite": case.suite, "case": case.label, "provider": provider.name,
            "family": provider.family, "divergence": case.divergence,
            "hard_label": case.hard_label, "dtype": case.dtype, "N": case.n, "N_requested": case.n,
            "V": case.v, "k": case.k, "mode": case.mode, "shrunk": False, "status": "pending",
            "error": None, "ms_median": None, "ms_min": None, "ms_max": None, "ms_p20": None,
            "ms_p80": None, "reps": None, "bytes": None, "gb_per_s": None, "floor_fraction": None,
            "peak_extra_mb": None, "first_call_s": None, "loss": None, "input_copies": None,
            "agreement": None,
        }

    def _fit(self, case, provider, n: int) -> int:
        if self.device.type != "cuda":
            return n
        _free_memory(self.device)
        free = torch.cuda.mem_get_info(self.device)[0]
        while n > 1:
            copies = inputs.copies_for_cache(case, n, self.cache_bytes)
            if estimate_bytes(case, provider, n, copies) <= SHRINK_HEADROOM * free:
                break
            n //= 2
        return n

    def _measure(self, case, provider, n: int) -> dict:
        """The measured fields of a row (nothing is written to the row unless all of it worked)."""
        row: dict = {}
        copies = inputs.copies_for_cache(case, n, self.cache_bytes)
        sets = [inputs.make(case, n, self.device, seed_offset=i) for i in range(copies)]
        row["input_copies"] = copies
        fn = provider.make(case)
        measure.sync(self.device)
        t0 = time.perf_counter()
        step, reset = build_step(fn, sets, case.mode, case.suite)
        out = step()  # first call: compilation / JIT included
        measure.sync(self.device)
        row["first_call_s"] = time.perf_counter() - t0
        row["loss"] = _loss_value(out)
        # Compared once, here: before the timing, so that neither the gradients nor the eager
        # reference's temporaries are alive while it runs (reset() drops the gradients next).
        row["agreement"] = self._agreement(case, provider, sets[0], out)
        del out
        peak = measure.peak_extra_bytes(self.device, step, reset)
        row["peak_extra_mb"] = None if peak is None else peak / 2 ** 20
        times = self.timer.time(step, reset)
        reset()
        row.update(measure.summarize(times))
        if case.mode == "bwd":
            # The fused providers make the gradient in the forward, so a bwd row times a scale of
            # it there and eager's whole backward here: no common work to hold against a floor
            # or a FLOP count (compare a provider's bwd with its own fwd and fwdbwd instead).
            row["status"] = "ok"
            return row
        nbytes = inputs.floor_bytes(case, n)
        row["bytes"] = nbytes
        row["gb_per_s"] = nbytes / (row["ms_median"] * 1e-3) / 1e9
        if case.suite == "linear":
            # compute-bound: GEMM throughput, not a fraction of the bandwidth floor
            row["H"] = case.h
            row["tflop_per_s"] = inputs.linear_flops(case, n) / (row["ms_median"] * 1e-3) / 1e12
        elif self.copy_gb_per_s:
            row["floor_fraction"] = row["gb_per_s"] / self.copy_gb_per_s
        row["status"] = "ok"
        return row

    def _agreement(self, case, provider, first_set: dict, out) -> dict:
        """The row's agreement record. The check's own memory (eager's chunk temporaries) is not
        in the N estimate: a check that fails, out of memory or otherwise, leaves the row
        measured and says so rather than failing or shrinking it."""
        try:
            return agreement.check_first_call(
                case, provider.name, first_set, out,
                first_set_grads(first_set, case.mode, case.suite))
        except Exception as exc:  # noqa: BLE001 - the timing is still worth having
            why = _error_text(exc, 300)
        # out of the except block: its traceback no longer holds the check's tensors
        _free_memory(self.device)
        record = agreement.new_record(agreement.reference_of(case.suite))
        agreement.add_unchecked(record, "the comparison", why)
        return record

    def run_row(self, case, provider) -> dict:
        row = self._base_row(case, provider)
        try:
            provider.check(case, self.device)
        except prov.Missing as exc:
            row.update(status="missing", error=str(exc))
            return row
        except prov.Unavailable as exc:
            row.update(status="unavailable", error=str(exc))
            return row
        except Exception as exc:  # noqa: BLE001 - a broken import is a row too
            row.update(status="error", error=_error_text(exc))
            return row
        n = self._fit(case, provider, case.n)
        if n != case.n:
            row.update(shrunk=True, shrink_reason="estimated memory above free memory")
        for attempt in range(OOM_RETRIES + 1):
            row["N"] = n
            failure = None
            try:
                row.update(self._measure(case, provider, n), error=None)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row
                failure = ("oom" if is_oom(exc) else "error", _error_text(exc))
            finally:
                _free_memory(self.device)
            if failure is None:
                return row
            row.update(status=failure[0], error=failure[1])
            if failure[0] != "oom" or n <= 1 or attempt == OOM_RETRIES:
                return row
            n //= 2
            row.update(shrunk=True, shrink_reason="out of memory at a larger N")
        return row

    # ------------------------------------------------------------------ the plan

    def _over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started > self.budget_s

    def run(self, cases: list, providers_for: Callable) -> list:
        work = [(case, providers_for(case)) for case in cases]
        total = sum(len(p) for _, p in work)
        bar = _progress(total, self.progress)
        # The gc.collect() between rows (_free_memory, measure.peak_extra_bytes) walks every object
        # the process holds: 0.18 s a call with torch and the peers imported, two calls a row
        # (2-core EPYC). What exists before the first row is no row's garbage: frozen out of the
        # collections for the run, a call costs 0.05 s.
        gc.freeze()
        try:
            for case, provs in work:
                case_rows = []
                for provider in provs:
                    bar.set(f"{case.label} | {provider.name}")
                    if case.optional and self._over_budget():
                        row = self._base_row(case, provider)
                        row.update(status="skipped",
                                   error=f"time budget of {self.budget_s:.0f} s spent")
                    else:
                        row = self.run_row(case, provider)
                    row["elapsed_s"] = time.monotonic() - self.started
                    case_rows.append(row)
                    self.rows.append(row)
                    bar.update()
                    if self.on_row is not None:
                        self.on_row(self.rows)
                agreement.compare_losses(case_rows)
                if self.on_row is not None:
                    self.on_row(self.rows)
        finally:
            gc.unfreeze()
            bar.close()
        return self.rows


class _progress:
    """tqdm when it is installed and wanted; otherwise one line per row on stderr (or nothing)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.done, self.total = 0, total
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)
            except Exception:
                self.bar = None

    def set(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

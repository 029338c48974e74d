"""Agreement checks: does each provider compute the same function as the reference?

Every measured row gets ``agreement``::

    {"against": "torch-eager",                        # what the checks compare with
     "checks": {"loss": {"error": 3e-7, "tol": 1e-2},  # each check made: its worst error
                "grad": {"error": 2e-6, "tol": 1e-4}},
     "failed": [],                                      # checks whose error is above their tol
     "unchecked": []}                                   # what could not be checked, and why

or ``{"reference": true, ...}`` for the row the others are checked against. A failed check does
not change the row's status (it was measured): report.summary flags it, as it always flagged a
loss above 1e-2, and the README table marks the cell.

What is checked, and against what (CHECKS below has the metrics):

- ``loss``: the scalar loss against the torch-eager row of the same case and N (relative).
- ``grad`` (fwdbwd and bwd rows): the gradient of the first input set, left by the provider's
  first (untimed) call, against torch-eager's recomputed on that set in row chunks (the losses are
  means over rows, so chunk c's loss is scaled by n_c / N). Compared chunk by chunk right after
  the first call, before the timing: no extra N x V copy lives beyond the check, and the eager
  temporaries are bounded by REFERENCE_CHUNK_ELEMENTS, whatever N.
- ``ids`` / ``values`` (top-k): the provider's ids against eager's fp32 log-softmax top-k as sets
  allowing ties (the eager log-probabilities at the provider's ids, sorted, against eager's top-k
  values), and its values against the eager log-probabilities at its own ids.
- sampling: torch.multinomial's draws (torch's generator; inductor's own under torch.compile) are
  comparable with nothing, so the eager and compiled rows say so. distill_ops' samplers draw from
  counter-based noise keyed by (seed, row, logits), the same ids on every backend: their ``ids``
  and ``values`` (the weights) are checked against the reference backend (distill_ops:torch) on
  the first SAMPLE_CHECK_ROWS rows (the reference evaluates all S x V noise values: 3 s a row of
  V = 128256, S = 64 on a busy 2-core CPU; one row's draws already differ where a sampler does).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

REFERENCE = "torch-eager"
SAMPLE_REFERENCE = "distill_ops:torch"
SAMPLE_CHECK_ROWS = 2
LOSS_TOL = 1e-2   # relative, every dtype: the check the harness has always made (unchanged)
# Gradient: max |g - g_eager| / max |g_eager| over the whole tensor (one number per tensor, not
# per element: elements near zero carry only absolute rounding). Both gradients are computed in
# fp32 and rounded to the input dtype, so in bf16 each element is off by up to half an ulp,
# 2^-9 = 2e-3 of its magnitude, and the two by up to 4e-3 of the largest (fp16: 2^-12 = 2.4e-4,
# but N = 16384 rows put |g| ~ 1e-5 near fp16's subnormals, spacing 6e-8: up to 6e-3 of the
# largest). 1e-2 for both: DESIGN.md's bound for 16-bit inputs, 2.5x the rounding above. fp32
# rounds nothing to a narrow type: the KLs' eager gradient is within 5e-5 of float64's (measured,
# V up to 262144), so 5e-4; a wrong gradient is off by order 1.
GRAD_TOL = {"fp32": 5e-4, "bf16": 1e-2, "fp16": 1e-2}
# ...except that the eager reference itself loses precision to cancellation in the mixture
# divergences' gradients (DESIGN.md: JSD and skew KL; 2e-3 of the norm at tau = 0.7). Measured
# against float64 at tau = 1, fp32, max-relative: JSD 3e-4 (V = 32000) to 2.6e-3 (V = 262144),
# skew reverse KL 7e-4 to 4.4e-3, and growing with V; an fp32 kernel is off by as much again.
# Added to the dtype's tolerance for them (whatever the dtype: the reference computes in fp32).
# The skew forward KL measured as the KLs do (4e-5): no allowance.
MIXTURE_GRAD_ALLOWANCE = 1e-2
MIXTURES = ("jsd", "generalized_jsd", "skew_reverse_kl")
# Top-k log-probabilities are computed in fp32 from the same input values whatever the input
# dtype (both sides upcast exactly), so one tolerance, absolute, in nats. ids: a kernel that
# orders transformed values (exp, scaled logits) may swap neighbours a few fp32 ulps apart
# (ulp = 5e-7 at |log p| ~ 5): treat those as ties; a wrong pick outside them is off by ~1e-2
# (the gaps between the top 64 of 128k randn * 4 logits). values: the normaliser is an fp32
# log-sum-exp over V terms, |log Z| ~ 20 here: the C++ and reference kernels are 1.5e-5 from
# eager's log_softmax at V = 128256 (every dtype; 8 ulps, mostly eager's rounding), and it grows
# with V; a wrong normaliser is off by more than 1e-2.
TOPK_IDS_TOL = 1e-5
TOPK_VALUES_TOL = 2e-4
# Sampling: the same noise draws the same ids on every backend (fraction of rows whose id set
# differs: none may); the weights c / S agree to fp32 rounding of their logs.
SAMPLE_IDS_TOL = 0.0
SAMPLE_VALUES_TOL = 1e-5
# Rows of the eager reference computed at a time: its fp32 temporaries (6-12 of them) are this
# many elements each, about 0.75 GB at most for JSD.
REFERENCE_CHUNK_ELEMENTS = 1 << 24
# The inputs that hold one row per token (sliced into chunks); others (lm_head weights) are shared.
PER_ROW_KEYS = ("student", "teacher", "labels", "ids", "logw", "hs", "ht")
# What the settings header says each check measures.
CHECKS = {
    "loss": "|loss - eager's| / |eager's| (eager row of the same case and N)",
    "grad": "max |g - g_eager| / max |g_eager|, first input set, worst input (linear: hs, ws)",
    "ids": "top-k: max |sorted log p_eager[ids] - eager top-k values| (ties allowed); sample: "
           "fraction of rows whose id set differs from distill_ops:torch's",
    "values": "top-k: max |values - log p_eager[ids]|; sample: max |log weight - reference's| "
              "at the same ids",
}


# ----------------------------------------------------------------------------- the row record

def reference_of(suite: Optional[str]) -> str:
    """The provider a suite's rows are checked against."""
    return SAMPLE_REFERENCE if suite == "sample" else REFERENCE


def reference_record() -> dict:
    return {"reference": True, "against": None, "checks": {}, "failed": [], "unchecked": []}


def new_record(against: Optional[str]) -> dict:
    return {"against": against, "checks": {}, "failed": [], "unchecked": []}


def add_check(record: dict, name: str, error: float, tol: float) -> None:
    """Record one check; NaN (a NaN gradient, say) counts as the worst error, not a pass."""
    if error != error:
        error = float("inf")
    record["checks"][name] = {"error": error, "tol": tol}
    if error > tol and name not in record["failed"]:
        record["failed"].append(name)


def add_unchecked(record: dict, what: str, why: str) -> None:
    record["unchecked"].append(f"{what}: {why}")


def state(row: dict) -> str:
    """'reference' | 'checked' | 'failed' | 'unchecked' (some or all of what applies was not
    checked). Rows of files written before the checks existed have no record: the suite's
    reference provider's row is the reference, every other is unchecked."""
    record = row.get("agreement")
    if record is None:
        return "reference" if row.get("provider") == reference_of(row.get("suite")) else "unchecked"
    if record.get("reference"):
        return "reference"
    if record.get("failed"):
        return "failed"
    if record.get("checks") and not record.get("unchecked"):
        return "checked"
    return "unchecked"


def failures_text(row: dict) -> Optional[str]:
    """'grad differs from torch-eager by 3.1e-02 (tol 1e-02)', for the summary; None if none."""
    record = row.get("agreement") or {}
    parts = []
    for name in record.get("failed", []):
        check = record["checks"][name]
        parts.append(f"{name} differs from {record.get('against')} by {check['error']:.1e} "
                     f"(tol {check['tol']:.0e})")
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- loss (per case)

def compare_losses(rows: list) -> None:
    """Each row's loss against the eager row of the same case (same N): ``loss_vs_eager`` (as
    before the checks existed, the eager row's own 0 included) and the ``loss`` check. Run once a
    case's rows are all measured."""
    ref = next((r for r in rows if r["provider"] == REFERENCE and r["status"] == "ok"
                and r["loss"] is not None), None)
    for row in rows:
        if row["status"] != "ok" or row["loss"] is None:
            continue
        error = None
        if ref is not None and row["N"] == ref["N"]:
            error = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
            row["loss_vs_eager"] = error
        record = row.get("agreement")
        if record is None or record.get("reference"):
            continue
        if error is not None:
            add_check(record, "loss", error, LOSS_TOL)
        elif ref is None:
            add_unchecked(record, "loss", "no torch-eager loss in this case")
        else:
            add_unchecked(record, "loss", f"torch-eager ran at N={ref['N']}, this row at "
                                          f"N={row['N']}")


# ----------------------------------------------------------------------------- per row

def check_first_call(case, provider_name: str, x: dict, out, grads: dict) -> dict:
    """The agreement record of one row from its first call: ``x`` the input set it ran on,
    ``out`` what it returned, ``grads`` the gradients it left (input name -> tensor, none for
    fwd rows). Run once, outside the timing; keeps no tensor."""
    if case.suite == "sample":
        return _check_sample(case, provider_name, x, out)
    if provider_name == REFERENCE:
        return reference_record()
    record = new_record(REFERENCE)
    with torch.no_grad():
        if case.suite == "topk":
            _check_topk(case, x, out, record)
    if case.mode != "fwd" and case.suite in ("dense", "sparse", "linear"):
        _check_grads(case, x, grads, record)
    return record


def _row_chunks(n: int, width: int) -> Iterator[slice]:
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _rows_of(x: dict, rows: slice) -> dict:
    """The chunk of an input set: per-row tensors sliced, shared ones whole; all detached."""
    return {key: (value[rows] if key in PER_ROW_KEYS else value).detach()
            for key, value in x.items()}


def _eager(case) -> Callable[[dict], object]:
    from .providers import TorchEager

    return TorchEager().make(case)


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max().float()) if t.numel() else 0.0


class _MaxRatio:
    """max |a - b| over max |b|, accumulated over chunks (NaN anywhere: NaN)."""

    def __init__(self) -> None:
        self.diff = 0.0
        self.ref = 0.0

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        self.diff = _worst(self.diff, _nan_max((got.float() - want.float()).abs()))
        self.ref = max(self.ref, _max_abs(want))

    def value(self) -> float:
        if self.diff != self.diff:
            return float("nan")
        return self.diff / self.ref if self.ref > 0 else (0.0 if self.diff == 0 else float("inf"))


def _grad_tol(case) -> float:
    from .config import DTYPE_NAMES

    extra = MIXTURE_GRAD_ALLOWANCE if case.divergence in MIXTURES else 0.0
    return GRAD_TOL[DTYPE_NAMES[case.torch_dtype]] + extra


def _check_grads(case, x: dict, grads: dict, record: dict) -> None:
    """The provider's gradients against eager's on the same set, computed chunk by chunk."""
    missing = [key for key, g in grads.items() if g is None]
    if missing or not grads:
        add_check(record, "grad", float("inf"), _grad_tol(case))
        add_unchecked(record, "grad", f"the provider left no gradient on {missing or 'any input'}")
        return
    for key, g in grads.items():
        if tuple(g.shape) != tuple(x[key].shape):
            add_check(record, "grad", float("inf"), _grad_tol(case))
            add_unchecked(record, "grad", f"gradient of {key} has shape {tuple(g.shape)}")
            return
    fn = _eager(case)
    n = next(x[key] for key in PER_ROW_KEYS if key in x).shape[0]
    width = case.v
    ratios = {key: _MaxRatio() for key in grads}
    shared = [key for key in grads if key not in PER_ROW_KEYS]
    leaves = {key: x[key].detach().requires_grad_(True) for key in shared}
    sums = {key: torch.zeros_like(x[key], dtype=torch.float32) for key in shared}
    for rows in _row_chunks(n, width):
        chunk = _rows_of(x, rows)
        chunk.update(leaves)
        for key in grads:
            if key in PER_ROW_KEYS:
                chunk[key].requires_grad_(True)
        with torch.enable_grad():
            loss = fn(chunk) * ((rows.stop - rows.start) / n)
            loss.backward()
        for key in grads:
            if key in PER_ROW_KEYS:
                ratios[key].add(grads[key][rows], chunk[key].grad)
            else:
                # accumulated in fp32: a 16-bit .grad summed over chunks would round each time
                sums[key] += leaves[key].grad.float()
                leaves[key].grad = None
        del chunk, loss
    for key in shared:
        ratios[key].add(grads[key], sums[key])
    del sums, leaves
    add_check(record, "grad", _worst(*(r.value() for r in ratios.values())), _grad_tol(case))


def _ids_values(out) -> tuple:
    """(ids, values) of a top-k / sample output: a SparseTargets or eager's (ids, values)."""
    if hasattr(out, "ids"):
        return out.ids, out.logprobs
    return out[0], out[1]


def _check_topk(case, x: dict, out, record: dict) -> None:
    ids, values = _ids_values(out)
    teacher = x["teacher"]
    n, v = teacher.shape
    k = min(case.k, v)
    if tuple(ids.shape) != (n, k) or tuple(values.shape) != (n, k):
        add_check(record, "ids", float("inf"), TOPK_IDS_TOL)
        add_unchecked(record, "ids", f"output of shape {tuple(ids.shape)}, not {(n, k)}")
        return
    if bool(((ids < 0) | (ids >= v)).any()):
        add_check(record, "ids", float("inf"), TOPK_IDS_TOL)
        add_check(record, "values", float("inf"), TOPK_VALUES_TOL)
        return
    ids_err = values_err = 0.0
    for rows in _row_chunks(n, v):
        log_p = torch.log_softmax(teacher[rows].float(), dim=-1)
        want = log_p.topk(k, dim=-1).values
        at_ids = log_p.gather(-1, ids[rows].long())
        ids_err = _worst(ids_err, _nan_max((at_ids.sort(-1, descending=True).values - want).abs()))
        values_err = _worst(values_err, _nan_max((values[rows].float() - at_ids).abs()))
        del log_p, want, at_ids
    add_check(record, "ids", ids_err, TOPK_IDS_TOL)
    add_check(record, "values", values_err, TOPK_VALUES_TOL)


def _worst(*errors: float) -> float:
    """The largest error, NaN if any is NaN (Python's max drops a NaN that is not first)."""
    return float("nan") if any(e != e for e in errors) else max(errors)


def _nan_max(t: torch.Tensor) -> float:
    if not t.numel():
        return 0.0
    return float("nan") if bool(t.isnan().any()) else float(t.max())


def _check_sample(case, provider_name: str, x: dict, out) -> dict:
    if provider_name == SAMPLE_REFERENCE:
        return reference_record()
    if not provider_name.startswith("distill_ops:"):
        record = new_record(None)
        add_unchecked(record, "ids, values",
                      "torch.multinomial draws from torch's generator (inductor's under "
                      "torch.compile): not comparable with any other provider's draws")
        return record
    record = new_record(f"{SAMPLE_REFERENCE} (first {SAMPLE_CHECK_ROWS} rows, same seed)")
    try:
        from .providers import DistillOps

        reference = DistillOps("torch").make(case)
        rows = slice(0, min(SAMPLE_CHECK_ROWS, x["teacher"].shape[0]))
        with torch.no_grad():
            want = reference({"teacher": x["teacher"][rows]})
    except Exception as exc:  # noqa: BLE001 - a reference that cannot run leaves it unchecked
        add_unchecked(record, "ids, values", f"the reference sampler failed ({exc})"[:300])
        return record
    got_ids, got_w = (t[rows] for t in _ids_values(out))
    want_ids, want_w = _ids_values(want)
    got_ids, got_w = _sorted_by_id(got_ids, got_w)
    want_ids, want_w = _sorted_by_id(want_ids, want_w)
    same = (got_ids == want_ids).all(dim=-1)
    add_check(record, "ids", float((~same).float().mean()), SAMPLE_IDS_TOL)
    finite = (got_w.isfinite() | want_w.isfinite()) & same.unsqueeze(-1)
    diff = torch.where(finite, (got_w.float() - want_w.float()).abs(), torch.zeros_like(got_w))
    add_check(record, "values", _nan_max(diff), SAMPLE_VALUES_TOL)
    return record


def _sorted_by_id(ids: torch.Tensor, weights: torch.Tensor) -> tuple:
    """Slots reordered by id (padding, -1, first): two samplers' rows compare slot by slot."""
    ids = ids.long()
    order = ids.argsort(dim=-1, stable=True)
    return ids.gather(-1, order), weights.float().gather(-1, order)

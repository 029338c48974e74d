"""The float64 oracle of ``distill_ops.kd_loss`` (a helper module, not a test file).

The loss is ``reference.row_losses`` (the definition every backend computes) on float64 copies of
the inputs, reduced the way ``kd_loss`` documents it; the gradient is torch.autograd's on that copy,
so no hand-derived gradient is trusted. Also: backend discovery shared by the test files, a seeded
generator of realistic logits and the relative-error measure.
"""

from __future__ import annotations

import os

from typing import Optional

import pytest
import torch

from distill_ops import backends
from distill_ops.backends import reference
from distill_ops.constants import resolve_divergence
from distill_ops.ops.fused_grad import REDUCTIONS

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "generalized_jsd")
MIXTURES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd")
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Warnings the Triton interpreter emits from numpy while evaluating masked-out lanes.
INTERPRETER_NOISE = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# Tests of what the ops layer does around the kernels, at sizes (thousands of rows) that the
# compiled kernels run in a second: the emulated CUDA kernels under AddressSanitizer
# (DISTILL_OPS_CUDA_EMU=1, `make test`'s second run) take a minute there, for nothing the ops
# layer's first run did not check.
OPS_LAYER_AT_SCALE = pytest.mark.skipif(os.environ.get("DISTILL_OPS_CUDA_EMU") == "1",
                                        reason="ops-layer logic at scale: the first run checks it")


def backend_status(name: str, device: str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` tensors here, and why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return False, "needs an NVIDIA GPU"
    try:
        backends.resolve(name, torch.device(device))
        backends.get(name, "dense_forward")
    except Exception as exc:  # a backend still being written, an extension not built, ...
        return False, f"backend {name!r} unavailable on {device}: {exc}"
    return True, ""


def require_backend(name: str, device: str = "cpu") -> None:
    ok, why = backend_status(name, device)
    if not ok:
        pytest.skip(why)


# (backend, device) pairs for the ``backend``/``device`` fixtures: what runs on the CPU here, and
# the GPU backends on CUDA tensors (marked cuda: skipped without a GPU).
BACKEND_PARAMS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", "cpu"), id="triton"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_and_device(request):
    name, device = request.param
    require_backend(name, device)
    return name, device


@pytest.fixture
def backend(backend_and_device):
    """The backend under test (a name for kd_loss(backend=...)); see ``device``."""
    return backend_and_device[0]


@pytest.fixture
def device(backend_and_device):
    """The device the tensors of the backend under test live on."""
    return backend_and_device[1]


def make_logits(n_shape, v: int, *, seed: int, dtype=torch.float32, spread: float = 3.0,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) of shape (*n_shape, V): independent randn * spread, then cast."""
    if isinstance(n_shape, int):
        n_shape = (n_shape,)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*n_shape, v, generator=g, dtype=torch.float64) * spread
    t = torch.randn(*n_shape, v, generator=g, dtype=torch.float64) * spread
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_labels(n_shape, v: int, *, seed: int, ignored: str = "some", ignore_index: int = -100,
                device: str = "cpu") -> Optional[torch.Tensor]:
    """Labels: None ('none'), about a third ignored but not all ('some'), all ignored ('all')."""
    if ignored == "none":
        return None
    if isinstance(n_shape, int):
        n_shape = (n_shape,)
    g = torch.Generator().manual_seed(seed + 7919)
    lab = torch.randint(0, v, tuple(n_shape), generator=g)
    if ignored == "all":
        lab.fill_(ignore_index)
    elif ignored == "some":
        flat = lab.view(-1)
        drop = torch.rand(flat.shape, generator=g) < 0.34
        drop[0] = False  # at least one live row
        if flat.numel() > 1:
            drop[-1] = True  # at least one ignored row
        flat[drop] = ignore_index
    else:
        raise ValueError(ignored)
    return lab.to(device)


def oracle(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale_temperature: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    vocab: str = "strict",
    grad_output: Optional[torch.Tensor] = None,
    need_grad: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """float64 (loss, d(sum(loss * grad_output)) / d student) of ``kd_loss`` with these options.

    The inputs are used as given (already rounded to their dtype), upcast exactly to float64. The
    gradient has the student's full shape (zero in columns beyond the common prefix).
    ``grad_output`` defaults to ones.
    """
    assert reduction in REDUCTIONS
    s_full = student.detach().to(torch.float64).requires_grad_(need_grad)
    t_full = teacher.detach().to(torch.float64)
    v = min(s_full.shape[-1], t_full.shape[-1])
    if vocab == "strict":
        assert s_full.shape[-1] == t_full.shape[-1]
    lead = s_full.shape[:-1]
    s = s_full[..., :v].reshape(-1, v)
    t = t_full[..., :v].reshape(-1, v)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64).cpu().to(s.device)
    code, mix = resolve_divergence(divergence, beta, alpha)
    soft_coef = soft_weight * (temperature ** 2 if scale_temperature else 1.0)
    with torch.enable_grad():
        rows = reference.row_losses(
            s, t, lab, divergence=code, mix=mix, temperature=temperature,
            softcap=0.0 if softcap is None else float(softcap), soft_coef=soft_coef,
            hard_coef=hard_weight, ignore_index=ignore_index,
        )
        n = rows.shape[0]
        if reduction == "none":
            loss = rows.reshape(lead)
        elif reduction == "sum":
            loss = rows.sum()
        elif reduction == "mean":
            count = n if lab is None else int((lab != ignore_index).sum())
            loss = rows.sum() / count if count > 0 else rows.sum() * 0.0
        else:  # batchmean
            loss = rows.sum() / max(n, 1)
        if not need_grad:
            return loss.detach(), None
        go = torch.ones_like(loss) if grad_output is None else grad_output.detach().to(loss)
        (grad,) = torch.autograd.grad(loss, s_full, go, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(s_full)
    return loss.detach(), grad.detach()


def rel_err(out: torch.Tensor, ref: torch.Tensor, zero: float = 0.0) -> float:
    """||out - ref|| / ||ref|| in float64; the absolute error ||out - ref|| when ||ref|| <= zero
    (a reference that is 0, or 0 up to float64 rounding such as a JSD with beta = 0)."""
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > zero else diff


def tolerance(dtype: torch.dtype, divergence: str, what: str, temperature: float = 1.0) -> float:
    """Allowed relative error of ``what`` ('loss' or 'grad') for inputs of ``dtype``.

    fp32: 1e-5, except the gradients of the mixture divergences (JSD, skew KL), which lose digits
    to cancellation in q (g - sum q g): 1e-4, and 2e-4 below tau = 0.7 (on randn * 3 logits the
    fp32 torch backend reaches 1.0e-4 at tau = 0.5 for skew reverse KL, eager PyTorch 1.6e-4).
    """
    if dtype in LOW_PRECISION:
        return 1e-2
    if dtype == torch.float64:
        return 1e-10
    if what == "grad" and divergence in MIXTURES:
        return 1e-4 if temperature >= 0.7 else 2e-4
    return 1e-5


ZERO = 1e-6  # a reference whose norm is below this is compared by absolute error


def run_kd(student, teacher, labels=None, *, grad_output=None, **kw):
    """kd_loss on a fresh leaf copy of ``student``: (loss, student.grad) in their own dtypes."""
    from distill_ops import kd_loss

    x = student.detach().clone().requires_grad_(True)
    loss = kd_loss(x, teacher, labels=labels, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
    loss.backward(go)
    return loss.detach(), x.grad


def check_against_oracle(student, teacher, labels=None, *, grad_output=None, loss_tol=None,
                         grad_tol=None, **kw) -> None:
    """Assert that kd_loss(**kw) matches the float64 oracle, loss and gradient."""
    div = kw.get("divergence", "forward_kl")
    loss, grad = run_kd(student, teacher, labels, grad_output=grad_output, **kw)
    opts = {k: v for k, v in kw.items() if k not in ("backend", "inplace_grad")}
    ref_loss, ref_grad = oracle(student, teacher, labels, grad_output=grad_output, **opts)
    expect_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expect_dtype, loss.dtype
    assert loss.shape == ref_loss.shape, (tuple(loss.shape), tuple(ref_loss.shape))
    assert grad is not None and grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all()
    tau = kw.get("temperature", 1.0)
    lt = tolerance(student.dtype, div, "loss", tau) if loss_tol is None else loss_tol
    gt = tolerance(student.dtype, div, "grad", tau) if grad_tol is None else grad_tol
    e_loss, e_grad = rel_err(loss, ref_loss, ZERO), rel_err(grad, ref_grad, ZERO)
    assert e_loss < lt, f"loss rel err {e_loss:.3g} >= {lt:g} ({loss} vs {ref_loss})"
    assert e_grad < gt, f"grad rel err {e_grad:.3g} >= {gt:g}"

"""kd_loss against the float64 oracle: every divergence x dtype x reduction x temperature x ignore
pattern, loss and gradient, on every backend that runs here (Triton on a reduced, covering subset
because its CPU interpreter is slow; the GPU sweep, with the real vocabulary sizes, is marked cuda).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from distill_ops import kd_loss
from oracle import (DIVERGENCES, INTERPRETER_NOISE, backend, backend_and_device,  # noqa: F401
                    check_against_oracle, device, make_labels, make_logits, require_backend)

pytestmark = INTERPRETER_NOISE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("none", "sum", "mean", "batchmean")
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
IGNORE = ("none", "some", "all")  # no labels / labels with some rows ignored / all ignored
CPU_BACKENDS = ("torch", "triton", "cpu")
N, V = 8, 300


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sweep():
    """Full product for torch and cpu; for triton one temperature and one ignore pattern per
    (divergence, dtype, reduction), rotated so every pair of values still meets."""
    cases = []
    for backend in CPU_BACKENDS:
        for i, div in enumerate(DIVERGENCES):
            for j, dtype in enumerate(DTYPES):
                for k, red in enumerate(REDUCTIONS):
                    if backend == "triton":
                        temps = (TEMPERATURES[(i + j + k) % 4],)
                        ignores = (IGNORE[(i + 2 * j + k) % 3],)
                    else:
                        temps, ignores = TEMPERATURES, IGNORE
                    for tau in temps:
                        for ign in ignores:
                            cases.append(pytest.param(
                                backend, div, dtype, red, tau, ign,
                                id=f"{backend}-{div}-{_dtype_id(dtype)}-{red}-t{tau}-ign_{ign}"))
    return cases


@pytest.mark.parametrize("backend_name,divergence,dtype,reduction,temperature,ignored", _sweep())
def test_matches_oracle(backend_name, divergence, dtype, reduction, temperature, ignored):
    require_backend(backend_name)
    seed = seed_of(divergence, dtype, reduction, temperature, ignored)
    s, t = make_logits(N, V, seed=seed, dtype=dtype)
    labels = make_labels(N, V, seed=seed, ignored=ignored)
    grad_output = None
    if reduction == "none":  # a different weight per row checks the per-row backward scaling
        grad_output = torch.rand(N, generator=torch.Generator().manual_seed(seed)) + 0.5
    check_against_oracle(s, t, labels, grad_output=grad_output, divergence=divergence,
                         temperature=temperature, reduction=reduction, backend=backend_name)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("hard_weight,soft_weight", [(0.5, 1.0), (1.0, 0.0), (0.3, 0.7)])
def test_hard_label_term(backend, device, divergence, hard_weight, soft_weight):
    # tau != 1 makes the CE term need its own normalizer (at tau = 1); tau = 1 shares it.
    tau = 2.0 if hard_weight != 0.5 else 1.0
    seed = seed_of("hard", divergence, hard_weight, soft_weight)
    s, t = make_logits(N, V, seed=seed, device=device)
    labels = make_labels(N, V, seed=seed, ignored="some", device=device)
    check_against_oracle(s, t, labels, divergence=divergence, temperature=tau,
                         hard_weight=hard_weight, soft_weight=soft_weight, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hard_label_term_low_precision(backend, device, dtype):
    seed = seed_of("hard-lp", dtype)
    s, t = make_logits(N, V, seed=seed, dtype=dtype, device=device)
    labels = make_labels(N, V, seed=seed, ignored="some", device=device)
    check_against_oracle(s, t, labels, divergence="reverse_kl", temperature=2.0, hard_weight=0.5,
                         reduction="sum", backend=backend)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_scale_temperature_false(backend, device, divergence):
    seed = seed_of("noscale", divergence)
    s, t = make_logits(N, V, seed=seed, device=device)
    check_against_oracle(s, t, divergence=divergence, temperature=3.0, scale_temperature=False,
                         backend=backend)
    # and it is exactly the scaled loss divided by tau^2
    a = kd_loss(s, t, divergence=divergence, temperature=3.0, scale_temperature=False,
                backend=backend)
    b = kd_loss(s, t, divergence=divergence, temperature=3.0, backend=backend)
    torch.testing.assert_close(a * 9.0, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap(backend, device, divergence, softcap):
    seed = seed_of("softcap", divergence, softcap)
    # spread 6: large enough that c = 5 bends them
    s, t = make_logits(N, V, seed=seed, spread=6.0, device=device)
    labels = make_labels(N, V, seed=seed, ignored="some", device=device)
    check_against_oracle(s, t, labels, divergence=divergence, temperature=1.5, softcap=softcap,
                         hard_weight=0.25, backend=backend)


@pytest.mark.parametrize("divergence,param", [
    ("jsd", "beta"), ("generalized_jsd", "beta"),
    ("skew_forward_kl", "alpha"), ("skew_reverse_kl", "alpha"),
])
@pytest.mark.parametrize("value", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mixture_parameter(backend, device, divergence, param, value):
    seed = seed_of("mix", divergence, value)
    s, t = make_logits(N, V, seed=seed, device=device)
    check_against_oracle(s, t, divergence=divergence, temperature=0.7, backend=backend,
                         **{param: value})


def _loss_and_grad(s, t, **kw):
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, **kw)
    loss.backward()
    return loss.detach(), x.grad


def test_generalized_jsd_endpoints_are_exact(backend, device):
    """TRL's convention: beta = 0 is forward KL and beta = 1 reverse KL, bit for bit."""
    s, t = make_logits(N, V, seed=seed_of("gjsd-ends"), device=device)
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        lg, gg = _loss_and_grad(s, t, divergence="generalized_jsd", beta=beta, temperature=2.0,
                                backend=backend)
        lo, go = _loss_and_grad(s, t, divergence=other, temperature=2.0, backend=backend)
        assert torch.equal(lg, lo), (beta, lg, lo)
        assert torch.equal(gg, go), beta
    # in between it is jsd with the same beta
    lg, gg = _loss_and_grad(s, t, divergence="generalized_jsd", beta=0.3, backend=backend)
    lj, gj = _loss_and_grad(s, t, divergence="jsd", beta=0.3, backend=backend)
    assert torch.equal(lg, lj) and torch.equal(gg, gj)


def test_mixture_special_cases(backend, device):
    """Endpoints with a known closed form: the mixture collapses onto one side."""
    s, t = make_logits(N, V, seed=seed_of("mix-ends"), device=device)
    fkl = _loss_and_grad(s, t, divergence="forward_kl", backend=backend)
    rkl = _loss_and_grad(s, t, divergence="reverse_kl", backend=backend)
    for kw, expect in (
        (dict(divergence="skew_forward_kl", alpha=0.0), fkl),  # M = q
        (dict(divergence="skew_reverse_kl", alpha=0.0), rkl),  # M = p
    ):
        loss, grad = _loss_and_grad(s, t, backend=backend, **kw)
        torch.testing.assert_close(loss, expect[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, expect[1], rtol=1e-4, atol=1e-7)
    for kw in (dict(divergence="jsd", beta=0.0), dict(divergence="jsd", beta=1.0),
               dict(divergence="skew_forward_kl", alpha=1.0),
               dict(divergence="skew_reverse_kl", alpha=1.0)):  # M equals the measured side
        loss, grad = _loss_and_grad(s, t, backend=backend, **kw)
        assert abs(loss.item()) < 1e-6, (kw, loss)
        assert grad.abs().max().item() < 1e-7, kw


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_backward_scales_by_grad_output(backend, device, reduction):
    """The gradient is computed in the forward; the backward must scale it by the upstream one."""
    seed = seed_of("go", reduction)
    s, t = make_logits(N, V, seed=seed, device=device)
    labels = make_labels(N, V, seed=seed, ignored="some", device=device)
    go = torch.tensor(-2.5) if reduction != "none" else torch.linspace(-1.0, 3.0, N)
    go = go.to(device)
    check_against_oracle(s, t, labels, grad_output=go, divergence="jsd", temperature=2.0,
                         hard_weight=0.5, reduction=reduction, backend=backend)


def test_mixed_teacher_dtype(backend, device):
    """A bf16 teacher with an fp32 student: the teacher is cast to the student's dtype."""
    s, t = make_logits(N, V, seed=seed_of("mixed"), device=device)
    t = t.to(torch.bfloat16)
    check_against_oracle(s, t, divergence="reverse_kl", temperature=2.0, backend=backend)


@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, 30.0), (torch.float16, 1e4)],
                         ids=["bf16", "fp16"])
def test_wider_teacher_keeps_its_precision(backend, device, dtype, offset):
    """A float32 teacher with a 16-bit student: the teacher's rows are shifted by their max before
    the cast, so the logits that carry the mass are rounded where the 16-bit dtype is finest.
    Cast as they were (until 2026-12-07), logits near 30 rounded to multiples of 0.125 in bf16
    (gradient 3e-2 off) and logits near 1e4 to multiples of 8 in fp16 (loss 17-80% off). Held to
    a loss of 1e-3 and the gradient's own 16-bit rounding (5e-3), against the float64 oracle on
    the float32 teacher itself."""
    s, t = make_logits(N, V, seed=seed_of("wider", offset), device=device)
    check_against_oracle(s.to(dtype), t + offset, temperature=1.5, hard_weight=0.0,
                         loss_tol=1e-3, grad_tol=5e-3, backend=backend)
    check_against_oracle(s.to(dtype), t + offset, divergence="jsd", loss_tol=1e-3, grad_tol=5e-3,
                         backend=backend)


def test_wider_teacher_with_a_softcap_is_cast_unshifted(backend, device):
    """With a softcap the teacher is cast as it is: softcap(x - max) is not softcap(x) shifted, so
    the row-max shift would change the distribution (a mutation audit: the loss doubled, 5.6 for
    2.9, and no test noticed)."""
    s, t = make_logits(N, V, seed=seed_of("wider-cap"), spread=3.0, device=device)
    check_against_oracle(s.bfloat16(), t + 20.0, softcap=10.0, temperature=2.0, loss_tol=2e-2,
                         grad_tol=3e-2, backend=backend)


def test_bf16_teacher_with_fp16_student_is_cast_exactly(backend, device):
    """A 16-bit pair is cast as it is (bf16 -> fp16 is exact below 65504): the row-max shift,
    done in bf16, rounded the shifted logits to bf16's mantissa (loss 1.7e-5 off, 100x worse)."""
    s, t = make_logits(N, V, seed=seed_of("bf16-fp16"), spread=12.0, device=device)
    check_against_oracle(s.half(), t.bfloat16(), temperature=4.0, loss_tol=1e-6, grad_tol=5e-3,
                         backend=backend)


def test_no_grad_and_detached_student(backend, device):
    s, t = make_logits(N, V, seed=seed_of("nograd"), device=device)
    ref = kd_loss(s.clone().requires_grad_(True), t, backend=backend).detach()
    with torch.no_grad():
        a = kd_loss(s.clone().requires_grad_(True), t, backend=backend)
    b = kd_loss(s, t, backend=backend)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)


def test_teacher_gets_no_gradient(backend, device):
    s, t = make_logits(N, V, seed=seed_of("teacher-grad"), device=device)
    x = s.clone().requires_grad_(True)
    y = t.clone().requires_grad_(True)
    kd_loss(x, y, backend=backend).backward()
    assert x.grad is not None and y.grad is None


def test_float64_inputs(backend, device):
    """fp64 inputs are computed in fp64 (it is what gradcheck relies on): near-exact results. (The
    Triton kernels take their float scalars as float64 for it: backends/triton/scalars.py.)"""
    s, t = make_logits(N, V, seed=seed_of("fp64"), dtype=torch.float64, device=device)
    labels = make_labels(N, V, seed=1, ignored="some", device=device)
    check_against_oracle(s, t, labels, divergence="skew_forward_kl", alpha=0.3, temperature=0.7,
                         hard_weight=0.5, softcap=20.0, backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_float64_mean_divides_in_float64(backend, device, reduction):
    """1/count as a float32 is up to 3e-8 off (1/3, 1/7): a float64 call gets a float64 scale, in
    the loss and in the gradient. (3 kept rows of 7: neither count is a power of two.)"""
    s, t = make_logits(7, 40, seed=seed_of("fp64-mean"), dtype=torch.float64, device=device)
    labels = torch.tensor([2, 1, -100, 30, -100, -100, -100], device=device)
    check_against_oracle(s, t, labels, reduction=reduction, loss_tol=1e-13, grad_tol=1e-13,
                         backend=backend)


# ---------------------------------------------------------------------------------------------
# GPU: the same contract on CUDA tensors, at the vocabulary sizes of real models.

GPU_BACKENDS = ("triton", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_oracle(backend_name, divergence, dtype, reduction):
    require_backend(backend_name, "cuda")
    for tau, ign in ((0.5, "none"), (1.0, "some"), (2.0, "all"), (4.0, "some")):
        seed = seed_of("cuda", divergence, dtype, reduction, tau, ign)
        s, t = make_logits(64, 1000, seed=seed, dtype=dtype, device="cuda")
        labels = make_labels(64, 1000, seed=seed, ignored=ign, device="cuda")
        check_against_oracle(s, t, labels, divergence=divergence, temperature=tau,
                             reduction=reduction, backend=backend_name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("vocab_size", [32000, 128256, 151936, 262144])
def test_cuda_large_vocab(backend_name, divergence, dtype, vocab_size):
    require_backend(backend_name, "cuda")
    seed = seed_of("cuda-large", divergence, dtype, vocab_size)
    s, t = make_logits(4, vocab_size, seed=seed, dtype=dtype, device="cuda")
    labels = make_labels(4, vocab_size, seed=seed, ignored="some", device="cuda")
    check_against_oracle(s, t, labels, divergence=divergence, temperature=2.0, hard_weight=0.5,
                         softcap=30.0, backend=backend_name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cuda_options(backend_name, divergence):
    """Hard term, softcap, no tau^2, mixture endpoints and 3-D input on the GPU."""
    require_backend(backend_name, "cuda")
    seed = seed_of("cuda-opts", divergence)
    s, t = make_logits((2, 33), 4099, seed=seed, spread=6.0, device="cuda")
    labels = make_labels((2, 33), 4099, seed=seed, ignored="some", device="cuda")
    for kw in (dict(hard_weight=1.0, soft_weight=0.0), dict(hard_weight=0.3, softcap=5.0),
               dict(scale_temperature=False, reduction="none"), dict(beta=0.0, alpha=1.0),
               dict(beta=1.0, alpha=0.0)):
        check_against_oracle(s, t, labels, divergence=divergence, temperature=1.5,
                             backend=backend_name, **kw)

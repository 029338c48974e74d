"""torch.autograd.gradcheck of kd_loss on small float64 inputs: the gradient the forward writes is
the derivative of the loss it returns (finite differences, no oracle involved)."""

from __future__ import annotations

import pytest
import torch

from distill_ops import kd_loss
from oracle import DIVERGENCES, INTERPRETER_NOISE, backend, backend_and_device, device  # noqa: F401

pytestmark = INTERPRETER_NOISE


def _inputs(seed, n=3, v=7, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_(True)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(device)
    labels = torch.tensor([2, -100, 6][:n], device=device)
    return s, t, labels


def _fast(backend, device):
    """gradcheck's fast mode for Triton under the interpreter (the full Jacobian is slow there)."""
    return backend == "triton" and device == "cpu"


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_full_options(backend, device, divergence):
    """Labels with an ignored row, the hard-label term, softcap, tau != 1, mean reduction."""
    s, t, labels = _inputs(seed=len(divergence), device=device)

    def f(x):
        return kd_loss(x, t, labels=labels, divergence=divergence, temperature=1.7, beta=0.3,
                       alpha=0.2, hard_weight=0.4, softcap=3.0, backend=backend)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend, device))


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_gradcheck_reductions(backend, device, reduction):
    """The per-row backward scaling (reduction none gets a vector grad_output)."""
    s, t, labels = _inputs(seed=5, device=device)

    def f(x):
        return kd_loss(x, t, labels=labels, divergence="skew_reverse_kl", alpha=0.4,
                       temperature=0.8, hard_weight=0.2, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend, device))


def test_gradcheck_three_dim_common_prefix(backend, device):
    g = torch.Generator().manual_seed(9)
    s = (torch.randn(2, 2, 6, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_(True)
    t = (torch.randn(2, 2, 5, generator=g, dtype=torch.float64) * 2).to(device)
    labels = torch.tensor([[0, 4], [-100, 1]], device=device)

    def f(x):
        return kd_loss(x, t, labels=labels, divergence="jsd", vocab="common_prefix",
                       hard_weight=0.5, temperature=2.0, backend=backend)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=_fast(backend, device))


def test_gradcheck_catches_a_wrong_gradient():
    """Sanity of the harness: a loss whose backward is off by 1% fails gradcheck."""

    s, t, _ = _inputs(seed=1)

    class Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return kd_loss(x.detach(), t, backend="torch")

        @staticmethod
        def backward(ctx, go):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                y = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(kd_loss(y, t, backend="torch"), y)
            return go * g * 1.01

    kw = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, backend="torch"), (s,), **kw)
    assert not torch.autograd.gradcheck(Off.apply, (s,), raise_exception=False, **kw)

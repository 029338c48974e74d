"""sparse_kd_loss(inplace_grad=True): the gradient written over the student logits.

Every backend must read each student value before it writes the column holding it. The cases that
would catch a kernel reading an overwritten logit: the hard-label term at tau != 1 (its slot
gradients need the raw logits at the target ids), a label among the target ids, rows longer than
the CPU kernel's 512-column chunk, and dtypes that the CPU kernel converts (bf16) or reads in place
(fp32, fp64). Each is checked against the float64 oracle and against the out-of-place call.
"""

from __future__ import annotations

import pytest
import torch

from distill_ops.sparse import sparse_kd_loss
from oracle import INTERPRETER_NOISE, require_backend
from sparse_oracle import (make_student, make_targets, rel_err, run_sparse, sparse_oracle,
                           tolerance)

pytestmark = INTERPRETER_NOISE

BACKENDS = ("torch", "triton", "cpu")


def _inplace(s, ids, lp, *, grad_output=None, **kw):
    """(loss, leaf gradient, what the student buffer holds afterwards)."""
    leaf = s.detach().clone().requires_grad_(True)
    x = leaf * 1  # a non-leaf buffer the kernel may overwrite
    loss = sparse_kd_loss(x, ids, lp, inplace_grad=True, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), leaf.grad, x.detach()


def _check(s, ids, lp, *, grad_output=None, **kw):
    loss, grad, buf = _inplace(s, ids, lp, grad_output=grad_output, **kw)
    ref_loss, ref_grad = run_sparse(s, ids, lp, grad_output=grad_output, **kw)
    # The same kernel arithmetic in both calls: only the destination differs.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    # The buffer ends holding d loss / d logits scaled by grad_output: scaled in place, without
    # a second N x V tensor.
    torch.testing.assert_close(buf, ref_grad, rtol=1e-6, atol=1e-9)
    opts = {k: v for k, v in kw.items() if k != "backend"}
    o_loss, o_grad = sparse_oracle(s, ids, lp, grad_output=grad_output, **opts)
    div = kw.get("divergence", "forward_kl")
    assert rel_err(loss, o_loss) < tolerance(s.dtype, div, "loss")
    assert rel_err(grad, o_grad) < tolerance(s.dtype, div, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["renorm", "tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_out_of_place_and_oracle(backend, divergence, tail, temperature):
    require_backend(backend)
    n, v, k = 6, 67, 5
    ids, lp, tails = make_targets(n, v, k, seed=v + k)
    s = make_student(n, v, seed=v)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    labels[2] = int(ids[2, 0])  # a label that is also a target id
    labels[4] = -100
    _check(s, ids, lp, divergence=divergence, tail=tail, tail_logmass=tails,
           temperature=temperature, labels=labels, hard_weight=0.4, beta=0.3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_dtypes_and_long_rows(backend, dtype):
    """Rows over several of the CPU kernel's 512-column chunks; bf16 (converted chunks) and fp64
    (read in place)."""
    require_backend(backend)
    n, v, k = 3, 1300, 33
    ids, lp, tails = make_targets(n, v, k, seed=v)
    s = make_student(n, v, seed=v, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5))
    _check(s, ids, lp, tail="tail", tail_logmass=tails, temperature=0.8, labels=labels,
           hard_weight=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_views_and_no_grad(backend):
    require_backend(backend)
    n, v, k = 4, 50, 6
    ids, lp, _ = make_targets(n, v, k, seed=11, empty_row=False)
    s = make_student(n, v, seed=11)
    go = torch.linspace(0.5, 2.0, n)
    _check(s, ids, lp, reduction="none", grad_output=go, backend=backend)
    # A column slice of a wider buffer is handed to the kernel as is: only its columns change.
    big = torch.zeros(n, v + 10)
    big[:, 5:5 + v] = s
    leaf = big.clone().requires_grad_(True)
    x = leaf * 1
    sparse_kd_loss(x[:, 5:5 + v], ids, lp, inplace_grad=True, backend=backend).backward()
    _, ref_grad = sparse_oracle(s, ids, lp)
    assert rel_err(leaf.grad[:, 5:5 + v], ref_grad) < 1e-5
    assert torch.count_nonzero(leaf.grad[:, :5]) == 0 and torch.count_nonzero(leaf.grad[:, -5:]) == 0
    assert rel_err(x.detach()[:, 5:5 + v], ref_grad) < 1e-5
    # Without a gradient to compute, the student is left alone (under torch.no_grad() too).
    x = s.clone()
    sparse_kd_loss(x, ids, lp, inplace_grad=True, backend=backend)
    assert torch.equal(x, s)
    x = s.clone().requires_grad_(True) * 1
    with torch.no_grad():
        sparse_kd_loss(x, ids, lp, inplace_grad=True, backend=backend)
    assert torch.equal(x.detach(), s)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_saved_logits_are_caught(backend):
    """exp() saves its output; after the kernel wrote the gradient over it, its backward must fail
    loudly instead of using the gradient as logits."""
    require_backend(backend)
    ids, lp, _ = make_targets(4, 50, 5, seed=12)
    leaf = make_student(4, 50, seed=12).requires_grad_(True)
    loss = sparse_kd_loss(leaf.exp(), ids, lp, inplace_grad=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_refuses_to_compile_and_non_bool():
    ids, lp, _ = make_targets(3, 10, 2, seed=13, pad=False, empty_row=False)
    s = make_student(3, 10, seed=13).requires_grad_(True)

    def f(x):
        return sparse_kd_loss(x * 1, ids, lp, inplace_grad=True, backend="torch")

    with pytest.raises(Exception, match="inplace_grad"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(s)
    with pytest.raises(TypeError, match="inplace_grad"):
        sparse_kd_loss(s, ids, lp, inplace_grad="yes", backend="torch")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda(backend, dtype):
    """On CUDA tensors, rows longer than a block's stride, more slots than a warp."""
    require_backend(backend, "cuda")
    n, v, k = 5, 40961, 100
    ids, lp, tails = make_targets(n, v, k, seed=15, device="cuda")
    s = make_student(n, v, seed=15, dtype=dtype, device="cuda")
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[1] = int(ids[1, 0])
    for tail in ("renorm", "tail"):
        _check(s, ids, lp, tail=tail, tail_logmass=tails, temperature=1.5, labels=labels,
               hard_weight=0.3, backend=backend)

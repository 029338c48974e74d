"""torch.compile(fullgraph=True) traces kd_loss (a custom op with a fake kernel) without a graph
break; compiled forward and backward match eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_ops import kd_loss
from oracle import INTERPRETER_NOISE, require_backend

pytestmark = INTERPRETER_NOISE


class TinyStudent(nn.Module):
    def __init__(self, d=16, v=96):
        super().__init__()
        self.head = nn.Linear(d, v)

    def forward(self, h, teacher_logits, labels, backend, reduction):
        logits = self.head(h)
        return kd_loss(logits, teacher_logits, labels=labels, divergence="jsd", beta=0.3,
                       temperature=2.0, hard_weight=0.0 if labels is None else 0.5,
                       reduction=reduction, backend=backend)


def _step(model, fn, h, t, labels, backend, reduction):
    model.zero_grad(set_to_none=True)
    loss = fn(h, t, labels, backend, reduction)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), model.head.weight.grad.clone(), model.head.bias.grad.clone()


# The op is opaque to the compiler: aot_eager covers Triton, inductor (the default) torch.
@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("torch", "aot_eager"),
                                              ("triton", "aot_eager")])
@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
def test_compiled_matches_eager(backend, compiler, with_labels):
    require_backend(backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = TinyStudent()
    h = torch.randn(2, 5, 16, generator=g)
    t = torch.randn(2, 5, 96, generator=g) * 3
    labels = torch.randint(0, 96, (2, 5), generator=g)
    labels[0, 1] = -100
    if not with_labels:
        labels = None
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    for reduction in ("mean", "none"):
        eager = _step(model, model, h, t, labels, backend, reduction)
        comp = _step(model, compiled, h, t, labels, backend, reduction)
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inplace_grad_refuses_to_compile():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 10, generator=g, requires_grad=True)
    t = torch.randn(3, 10, generator=g)

    def f(x):
        return kd_loss(x * 1, t, inplace_grad=True, backend="torch")

    with pytest.raises(Exception, match="inplace_grad"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(s)


def test_a_temperature_schedule_compiles():
    """A float argument that changes between calls becomes symbolic in dynamo: the argument
    checks' math.isfinite could not trace it, so fullgraph=True raised at the second
    temperature. (Each float still compiles once, a constant of the graph; as 0-d tensors one
    graph serves every value: tests/test_tensor_hyperparameters.py.)"""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 30, generator=g)
    t = torch.randn(4, 30, generator=g)
    step = torch.compile(lambda s, t, tau, beta: kd_loss(s, t, divergence="jsd", beta=beta,
                                                         temperature=tau, backend="torch"),
                         fullgraph=True, backend="aot_eager")
    for tau, beta in ((1.0, 0.5), (2.0, 0.3), (3.0, 0.7)):
        torch.testing.assert_close(step(s, t, tau, beta),
                                   kd_loss(s, t, divergence="jsd", beta=beta, temperature=tau,
                                           backend="torch"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_new_token_count_does_not_recompile(dtype):
    """Real steps change N (batch x sequence length) every call: after the first change dynamo
    makes it symbolic, and one graph serves every later N. The 16-bit backward's per-row factor
    went through a Python loop over row chunks, which pinned N: a graph per length, and
    fullgraph=True failed at the recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda s, t, w: (kd_loss(s, t, reduction="none", backend="torch")
                                          * w).sum(), fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    for length in (8, 12, 16, 20, 24, 28):
        s = torch.randn(2, length, 32, generator=g).to(dtype).requires_grad_(True)
        t = torch.randn(2, length, 32, generator=g).to(dtype)
        step(s, t, torch.rand(2, length, generator=g)).backward()
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_compiled_autograd_traces_the_backward(which):
    """The loss eager (or outside a compiled model), its backward under compiled autograd, as
    torchtitan sets it up: the ops' backward asked autograd whether the graph is retained, a
    query dynamo cannot trace, so fullgraph=True raised (and without it, 3 graph breaks)."""
    from distill_ops import sparse_kd_loss, teacher_topk

    compiled_autograd = getattr(torch._dynamo, "compiled_autograd", None)
    if compiled_autograd is None or not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled autograd")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    head = nn.Linear(16, 64)
    h = torch.randn(2, 7, 16, generator=g)
    t = torch.randn(2, 7, 64, generator=g)
    targets = teacher_topk(t, 6, backend="torch")

    def grads(compiled: bool) -> list:
        head.zero_grad(set_to_none=True)
        s = head(h)
        loss = (kd_loss(s, t, divergence="jsd", backend="torch") if which == "dense"
                else sparse_kd_loss(s, targets, backend="torch"))
        with (compiled_autograd._enable(torch.compile(fullgraph=True, backend="aot_eager"))
              if compiled else torch.enable_grad()):
            (loss * 0.5).backward()
        return [p.grad.clone() for p in head.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_reduce_overhead_captures_the_step(reduction):
    """mode='reduce-overhead' captures the compiled step in a CUDA graph, which refuses a copy
    from host memory: the ops make their 1/N with torch.full (a fill kernel). Loss, gradient and
    sampled targets match eager over several replays."""
    from distill_ops import sparse_kd_loss, teacher_sample

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    head = nn.Linear(32, 1000).cuda()
    h = torch.randn(64, 32, generator=g).cuda()
    t = (torch.randn(64, 1000, generator=g) * 2).cuda()

    def step(h, t):
        s = head(h)
        dense = kd_loss(s, t, divergence="jsd", reduction=reduction)
        sparse = sparse_kd_loss(s, teacher_sample(t, num_samples=8, seed=3), reduction=reduction)
        return dense + sparse

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = []
        for fn in (step, compiled):
            head.zero_grad(set_to_none=True)
            loss = fn(h, t)
            loss.backward()
            out.append((loss.detach().clone(), head.weight.grad.clone()))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""torch.compile(fullgraph=True) traces sparse_kd_loss and the teacher-side ops (custom ops with fake
kernels) without a graph break; compiled results match eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_ops.sparse import sparse_kd_loss, teacher_sample, teacher_topk
from oracle import INTERPRETER_NOISE, require_backend

pytestmark = INTERPRETER_NOISE


class TinyStudent(nn.Module):
    def __init__(self, d=16, v=96):
        super().__init__()
        self.head = nn.Linear(d, v)

    def forward(self, h, teacher_logits, labels, backend, tail):
        logits = self.head(h)
        targets = teacher_topk(teacher_logits, 8, temperature=2.0, backend=backend)
        return sparse_kd_loss(logits, targets, temperature=2.0, tail=tail, labels=labels,
                              hard_weight=0.5, divergence="jsd" if tail == "renorm" else "forward_kl",
                              backend=backend)


# The ops are opaque to the compiler: aot_eager covers Triton, inductor (slow to start) torch once.
@pytest.mark.parametrize("backend,compiler,tail", [
    ("torch", "inductor", "renorm"), ("torch", "aot_eager", "tail"),
    ("triton", "aot_eager", "renorm"), ("triton", "aot_eager", "tail"),
    ("cpu", "aot_eager", "renorm"), ("cpu", "inductor", "tail")])
def test_compiled_matches_eager(backend, compiler, tail):
    require_backend(backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = TinyStudent()
    h = torch.randn(2, 5, 16, generator=g)
    t = torch.randn(2, 5, 96, generator=g) * 3
    labels = torch.randint(0, 96, (2, 5), generator=g)
    labels[0, 1] = -100
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = fn(h, t, labels, backend, tail)
        loss.backward()
        results.append((loss.detach(), model.head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_teacher_sample_compiles(backend):
    require_backend(backend)
    torch._dynamo.reset()
    t = torch.randn(3, 40)
    fn = torch.compile(lambda x: teacher_sample(x, 8, seed=3, backend=backend), fullgraph=True,
                       backend="aot_eager")
    a, b = fn(t), teacher_sample(t, 8, seed=3, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

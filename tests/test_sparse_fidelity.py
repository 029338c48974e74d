"""The fidelity report runs end to end (a --quick smoke run) and its metrics behave on a known
distribution."""

from __future__ import annotations

import math

import torch

from distill_ops.sparse import teacher_topk
from distill_ops.targets import fidelity


def test_reconstruction_and_kl():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 30, generator=g) * 2
    p = torch.softmax(t.double(), -1)
    top = teacher_topk(t, 6, backend="torch")
    renorm = fidelity.reconstruction("topk-renorm", top, 30)
    tail = fidelity.reconstruction("topk-tail", top, 30)
    torch.testing.assert_close(renorm.sum(-1), torch.ones(5, dtype=torch.float64))
    # the targets are float32: k log-probs and the tail log-mass each carry ~6e-8 relative rounding
    torch.testing.assert_close(tail.sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    mass = p.gather(1, top.ids.long()).sum(-1)
    # KL(renorm || p) = -log(mass); KL(p || renorm) = inf; the tail reconstruction is finite
    torch.testing.assert_close(fidelity.kl(renorm, p), -mass.log(), rtol=1e-5, atol=1e-6)
    assert torch.isinf(fidelity.kl(p, renorm)).all()
    assert torch.isfinite(fidelity.kl(p, tail)).all()
    full = teacher_topk(t, 30, backend="torch")
    assert fidelity.kl(p, fidelity.reconstruction("topk-tail", full, 30)).abs().max() < 1e-6


def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "fidelity.md"
    assert fidelity.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| topk-renorm | 4 |" in text and "| sample (Tp=1) | 8 |" in text
    assert "bytes/token" in text and not math.isnan(float(text.count("nan")))
    assert "nan" not in text.split("## Columns")[1]

"""Held-out evaluation metrics (trainer.eval.evaluate) against a manual reference.

Tiny Llama models built from configs; every test runs in well under a second on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch

from distill_ops.sparse import teacher_topk
from distill_ops.trainer.eval import evaluate
from test_trainer import V, tiny


pytestmark = pytest.mark.usefixtures("one_intraop_thread")

CPU = torch.device("cpu")


def _models():
    return tiny(), tiny(48, seed=1)


def _ids(n=8, t=16):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(0))


def _reference(student, teacher_logits, x):
    """Token means over the positions with a next-token label (all but the last)."""
    with torch.no_grad():
        ls = student(input_ids=x).logits[:, :-1].double()
    lt = teacher_logits[:, :-1].double()
    p, logq = lt.log_softmax(-1), ls.log_softmax(-1)
    kl = (p.exp() * (p - logq)).sum(-1).mean()
    top1 = (ls.argmax(-1) == lt.argmax(-1)).double().mean()
    return float(kl), float(top1)


def test_eval_kl_and_top1_with_a_teacher_match_a_manual_reference():
    """eval_kl and eval_top1 are token means over labelled positions only (the last position has
    no next token); counting it would bias the KL and let agreement exceed 1."""
    student, teacher = _models()
    x = _ids()
    out = evaluate(student, x, batch_size=4, device=CPU, teacher=teacher)
    with torch.no_grad():
        lt = teacher(input_ids=x).logits
    kl, top1 = _reference(student, lt, x)
    assert out["eval_tokens"] == 8 * 15
    assert out["eval_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert out["eval_top1"] == pytest.approx(top1, abs=1e-9)
    assert 0.0 <= out["eval_top1"] <= 1.0


def test_eval_top1_of_a_teacher_identical_to_the_student_is_exactly_one():
    """A teacher equal to the student agrees everywhere: top-1 agreement is exactly 1 and the KL 0,
    so agreement counted at unlabelled positions (top1 > 1) is caught."""
    student, teacher = tiny(), tiny()
    out = evaluate(student, _ids(), batch_size=4, device=CPU, teacher=teacher)
    assert out["eval_top1"] == 1.0
    assert out["eval_kl"] == pytest.approx(0.0, abs=1e-5)


def _cached(x, logits, k=4):
    tg = teacher_topk(logits, k)
    return [{"input_ids": x[i], "ids": tg.ids[i], "logprobs": tg.logprobs[i]}
            for i in range(x.shape[0])]


def test_eval_top1_from_cached_targets_uses_the_highest_weighted_id():
    """With cached targets (ids/logprobs, no teacher), the teacher's top-1 is the cached id of
    highest log-probability; a cache of the student's own top-k must agree everywhere."""
    student, teacher = _models()
    x = _ids()
    with torch.no_grad():
        ls, lt = student(input_ids=x).logits, teacher(input_ids=x).logits
    own = evaluate(student, _cached(x, ls), batch_size=4, device=CPU)
    assert own["eval_top1"] == 1.0
    out = evaluate(student, _cached(x, lt), batch_size=4, device=CPU)
    _, top1 = _reference(student, lt, x)
    assert out["eval_top1"] == pytest.approx(top1, abs=1e-9)
    assert 0.0 <= out["eval_top1"] <= 1.0
    assert "eval_kl" not in out

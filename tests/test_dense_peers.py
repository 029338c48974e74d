"""Agreement with the losses people use today: torch's F.kl_div and F.cross_entropy, and TRL's
GKD ``generalized_jsd_loss`` (a local transcription, and the real one when trl is installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from distill_ops import kd_loss
from oracle import INTERPRETER_NOISE, make_labels, make_logits, require_backend

pytestmark = INTERPRETER_NOISE


@pytest.fixture(params=["torch", "triton", "cpu"])
def backend(request):
    """CPU tensors only: the peers are compared on the CPU (the GPU is covered by the oracle)."""
    require_backend(request.param)
    return request.param


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol)


def grad_of(fn, s):
    x = s.clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


# ---------------------------------------------------------------------------------------------
# torch


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_matches_kl_div(backend, tau):
    """Hinton KD as usually written: F.kl_div(log q, log p, log_target) * tau^2."""
    s, t = make_logits(8, 120, seed=1)

    def ref(x, reduction):
        return F.kl_div(F.log_softmax(x / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                        reduction=reduction) * tau * tau

    for red in ("batchmean", "sum"):
        ours, g_ours = grad_of(lambda x: kd_loss(x, t, temperature=tau, reduction=red,
                                                 backend=backend), s)
        theirs, g_theirs = grad_of(lambda x: ref(x, red), s)
        close(ours, theirs)
        close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)


def test_batchmean_on_three_dim_input_counts_tokens(backend):
    """Convention difference: F.kl_div's batchmean divides by size(0) (the batch), ours by the
    number of token rows B*T (what a per-token KD loss wants)."""
    s, t = make_logits((2, 3), 50, seed=2)
    ours = kd_loss(s, t, reduction="batchmean", backend=backend)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    close(ours, kl / 6)
    theirs = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                      reduction="batchmean")
    close(theirs, kl / 2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hard_term_alone_is_cross_entropy(backend, reduction):
    s, t = make_logits(8, 120, seed=3)
    labels = make_labels(8, 120, seed=3, ignored="some")
    kw = dict(soft_weight=0.0, hard_weight=1.0, labels=labels, temperature=3.0,
              reduction=reduction, backend=backend)
    ours = kd_loss(s, t, **kw)
    theirs = F.cross_entropy(s, labels, ignore_index=-100, reduction=reduction)
    close(ours, theirs)
    if reduction != "none":
        g1 = grad_of(lambda x: kd_loss(x, t, **kw), s)[1]
        g2 = grad_of(lambda x: F.cross_entropy(x, labels, reduction=reduction), s)[1]
        close(g1, g2, rtol=1e-4, atol=1e-7)


def test_cross_entropy_conventions(backend):
    """Custom ignore_index; and where F.cross_entropy's mean of an all-ignored batch is NaN, ours
    is 0 (documented)."""
    s, t = make_logits(6, 40, seed=4)
    labels = torch.tensor([3, -1, 5, -1, 39, 0])
    ours = kd_loss(s, t, soft_weight=0.0, hard_weight=1.0, labels=labels, ignore_index=-1,
                   backend=backend)
    close(ours, F.cross_entropy(s, labels, ignore_index=-1))
    none = torch.full((6,), -100)
    assert torch.isnan(F.cross_entropy(s, none))
    assert kd_loss(s, t, soft_weight=0.0, hard_weight=1.0, labels=none, backend=backend) == 0


# ---------------------------------------------------------------------------------------------
# TRL


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """Transcription of TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (written from its
    definition): JSD(beta) with M = beta p + (1 - beta) q computed in log space, forward KL at
    beta = 0, reverse KL at beta = 1, no tau^2 factor; tokens with label -100 dropped; batchmean
    divides by the number of kept tokens (at least 1), by size(0) = B without labels;
    num_items_in_batch, when given, divides the sum instead."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]),
            dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                              log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                              log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _real_trl():
    """TRL's own GKDTrainer.generalized_jsd_loss, found where the integration looks for it
    (trl.experimental.gkd in trl >= 1.x, trl.trainer before); None without trl."""
    if importlib.util.find_spec("trl") is None:
        return None
    from distill_ops.integrations import trl as dtrl

    dtrl.unpatch_gkd_trainer()
    errors: list = []
    classes = dtrl._gkd_classes(errors)
    if not classes:
        pytest.fail("trl is installed but no GKDTrainer was found (update GKD_MODULES, or "
                    f"install what trl's module needs): {'; '.join(errors) or 'no such class'}")
    return classes[0].generalized_jsd_loss


TRL_IMPLS = {"transcribed": trl_generalized_jsd_loss, "trl": None}


@pytest.fixture(params=list(TRL_IMPLS))
def trl_loss(request):
    if request.param == "trl":
        fn = _real_trl()
        if fn is None:
            pytest.skip("trl is not installed")
        return fn
    return TRL_IMPLS[request.param]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.9, 2.0])
def test_generalized_jsd_matches_trl(backend, trl_loss, beta, temperature):
    """The drop-in promise: kd_loss(generalized_jsd, scale_temperature=False, reduction='mean')
    with labels == TRL batchmean with labels, loss and gradient."""
    s, t = make_logits((2, 5), 64, seed=int(beta * 10) + int(temperature * 10))
    labels = make_labels((2, 5), 64, seed=5, ignored="some")
    ours, g_ours = grad_of(lambda x: kd_loss(
        x, t, divergence="generalized_jsd", beta=beta, temperature=temperature,
        scale_temperature=False, labels=labels, reduction="mean", backend=backend), s)
    theirs, g_theirs = grad_of(lambda x: trl_loss(x, t, labels=labels, beta=beta,
                                                  temperature=temperature), s)
    close(ours, theirs)
    close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_matches_trl_without_labels(backend, trl_loss, beta):
    """TRL sum == our sum; TRL batchmean without labels divides by B (the first dimension), its
    mean by every element (B * T * V); num_items_in_batch divides the sum."""
    s, t = make_logits((2, 5), 64, seed=6)
    kw = dict(divergence="generalized_jsd", beta=beta, temperature=1.5, scale_temperature=False,
              backend=backend)
    total = kd_loss(s, t, reduction="sum", **kw)
    close(total, trl_loss(s, t, beta=beta, temperature=1.5, reduction="sum"))
    close(total / 2, trl_loss(s, t, beta=beta, temperature=1.5))
    close(total / (10 * 64), trl_loss(s, t, beta=beta, temperature=1.5, reduction="mean"))
    close(total / 7, trl_loss(s, t, beta=beta, temperature=1.5, num_items_in_batch=7))


def test_trl_transcription_is_the_divergence_it_claims():
    """Guard the transcription itself: at beta in (0, 1) it is beta KL(p||M) + (1-beta) KL(q||M)."""
    s, t = make_logits(3, 20, seed=7, dtype=torch.float64)
    beta = 0.3
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    m = beta * lp.exp() + (1 - beta) * lq.exp()
    ref = (beta * (lp.exp() * (lp - m.log())).sum(-1)
           + (1 - beta) * (lq.exp() * (lq - m.log())).sum(-1))
    got = trl_generalized_jsd_loss(s.unsqueeze(0), t.unsqueeze(0), beta=beta, reduction="none")
    close(got.sum(-1).squeeze(0), ref, rtol=1e-12, atol=1e-14)

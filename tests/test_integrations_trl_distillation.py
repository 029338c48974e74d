"""TRL DistillationTrainer drop-in: chunked_divergence_loss against TRL's own
_chunked_divergence_loss (the installed trl, on the CPU its torch tiles), and the patch."""

from __future__ import annotations

import importlib

import pytest
import torch

from distill_ops.integrations import trl as dtrl
from oracle import INTERPRETER_NOISE

pytestmark = INTERPRETER_NOISE

B, K, H_S, H_T, V = 2, 7, 16, 24, 50


def trl_module():
    try:
        return importlib.import_module(dtrl.DISTILLATION_MODULE)
    except ImportError as e:
        pytest.skip(f"trl's DistillationTrainer is not importable: {e}")


def inputs(seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, K, H_S, generator=g)
    h_t = torch.randn(B, K, H_T, generator=g)
    w_s = torch.randn(V, H_S, generator=g) * 0.5
    w_t = torch.randn(V, H_T, generator=g) * 0.5
    b_s = torch.randn(V, generator=g) if bias else None
    b_t = torch.randn(V, generator=g) if bias else None
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -1] = 0
    return h_s, h_t, w_s, w_t, b_s, b_t, mask


def run(fn, h_s, h_t, w_s, w_t, b_s, b_t, mask, **kw):
    """(loss, entropy_sum, n_valid, grads of h_s, w_s, b_s)."""
    leaves = [x.clone().requires_grad_(True) for x in (h_s, w_s) + ((b_s,) if b_s is not None
                                                                     else ())]
    hs, ws = leaves[0], leaves[1]
    bs = leaves[2] if b_s is not None else None
    loss, ent, n = fn(hs, h_t, ws, w_t, mask, kw.pop("beta"), student_lm_head_bias=bs,
                      teacher_lm_head_bias=b_t, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), ent, n) + tuple(grads)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("variant", ["plain", "scaled", "softcap", "num_items", "no_bias"])
def test_matches_trl(beta, temperature, variant):
    module = trl_module()
    args = inputs(seed=int(beta * 10) + int(temperature), bias=variant != "no_bias")
    kw = dict(beta=beta, temperature=temperature)
    if variant == "scaled":
        kw.update(student_logit_scale=0.5, teacher_logit_scale=2.0)
    if variant == "softcap":
        kw.update(student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=3.0)
    if variant == "num_items":
        kw.update(num_items_in_batch=torch.tensor(13))
    ours = run(dtrl.chunked_divergence_loss, *args, **dict(kw))
    ref = run(module._chunked_divergence_loss, *args, **dict(kw))
    assert int(ours[2]) == int(ref[2]) == 10
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], ref[1], rtol=2e-5, atol=1e-6)
    for a, b in zip(ours[3:], ref[3:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_small_chunks_and_no_entropy():
    module = trl_module()
    args = inputs(seed=3)
    ref = run(module._chunked_divergence_loss, *args, beta=0.5, temperature=1.5)
    ours = run(dtrl.chunked_divergence_loss, *args, beta=0.5, temperature=1.5, chunk_size=3)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], ref[1], rtol=2e-5, atol=1e-6)
    loss, ent, _ = dtrl.chunked_divergence_loss(*args[:2], *args[2:4], args[6], 0.5,
                                                entropy=False)
    assert torch.isnan(ent) and torch.isfinite(loss)


def test_all_masked_is_zero():
    h_s, h_t, w_s, w_t, b_s, b_t, mask = inputs(seed=4)
    h_s.requires_grad_(True)
    loss, ent, n = dtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, torch.zeros_like(mask), 0.5)
    assert int(n) == 0 and float(loss.detach()) == 0.0 and float(ent) == 0.0
    loss.backward()
    assert torch.count_nonzero(h_s.grad) == 0


def test_bad_arguments_name_themselves():
    h_s, h_t, w_s, w_t, _, _, mask = inputs(seed=5)
    with pytest.raises(ValueError, match="teacher_final_logit_softcapping"):
        dtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 0.5,
                                     student_final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="student_logit_scale"):
        dtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 0.5, student_logit_scale=0.0)
    with pytest.raises(ValueError, match="completion_mask"):
        dtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, mask[:, :3], 0.5)
    with pytest.raises(ValueError, match="beta"):
        dtrl.chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.5)


def test_patch_and_unpatch():
    module = trl_module()
    original = module._chunked_divergence_loss
    dtrl.patch_distillation_trainer(entropy=False)
    try:
        patched = module._chunked_divergence_loss
        assert patched is not original
        args = inputs(seed=6)
        loss, ent, n = patched(*args[:2], *args[2:4], args[6], 0.5)
        ref = original(*args[:2], *args[2:4], args[6], 0.5)
        torch.testing.assert_close(loss, ref[0], rtol=2e-5, atol=1e-7)
        assert torch.isnan(ent) and int(n) == int(ref[2])
        dtrl.patch_distillation_trainer()   # patching twice keeps the true original
    finally:
        dtrl.unpatch_distillation_trainer()
    assert module._chunked_divergence_loss is original


def test_signature_covers_trls():
    """Every parameter of the installed TRL function, in its order and with its default: the
    trainer's call keeps working after the patch."""
    import inspect

    theirs = inspect.signature(trl_module()._chunked_divergence_loss).parameters
    ours = inspect.signature(dtrl.chunked_divergence_loss).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name

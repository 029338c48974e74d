"""The names other code builds on are exported at the top level (the issues' public contracts)."""

import pytest
import torch

import distill_ops


def test_top_level_names():
    for name in ("kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "teacher_topk",
                 "teacher_sample", "SparseTargets"):
        assert name in distill_ops.__all__ and hasattr(distill_ops, name), name


def test_topk_then_sparse_loss_round_trip():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 40, generator=g)
    s = torch.randn(2, 3, 40, generator=g, requires_grad=True)
    targets = distill_ops.teacher_topk(t, 40, backend="torch")
    # k = V with renormalisation is the dense forward KL
    loss = distill_ops.sparse_kd_loss(s, targets, backend="torch")
    dense = distill_ops.kd_loss(s, t, backend="torch")
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)


def test_sparse_module_equals_function():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 40, generator=g)
    s = torch.randn(2, 3, 40, generator=g)
    labels = torch.randint(0, 40, (2, 3), generator=g)
    targets = distill_ops.teacher_topk(t, 5, backend="torch")
    kw = dict(temperature=2.0, tail="tail", hard_weight=0.5, backend="torch")
    fn = distill_ops.SparseKDLoss(**kw)
    assert "tail='tail'" in repr(fn)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fn(a, targets, labels).backward()
    distill_ops.sparse_kd_loss(b, targets, labels=labels, **kw).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # ids and log-probabilities given apart, with the tail mass
    c = s.clone().requires_grad_(True)
    fn(c, targets.ids, labels, target_logprobs=targets.logprobs,
       tail_logmass=targets.tail_logmass).backward()
    torch.testing.assert_close(c.grad, b.grad, rtol=0, atol=0)
    for bad in ("labels", "target_ids", "tail_logmass"):
        try:
            distill_ops.SparseKDLoss(**{bad: None})
        except TypeError as e:
            assert bad in str(e)
        else:
            raise AssertionError(f"SparseKDLoss({bad}=...) was accepted")
    try:
        distill_ops.SparseKDLoss(tempreature=2.0)
    except TypeError:
        pass
    else:
        raise AssertionError("an unknown keyword was accepted")


@pytest.mark.parametrize("module", ["KDLoss", "FusedLinearKDLoss", "SparseKDLoss"])
@pytest.mark.parametrize("keyword, value, error", [
    ("temperature", 0.0, ValueError), ("divergence", "kl", ValueError),
    ("beta", 1.5, ValueError), ("hard_weight", -1.0, ValueError),
    ("reduction", "avg", ValueError), ("backend", "tpu", ValueError),
    ("ignore_index", 1.5, TypeError), ("scale_temperature", "yes", TypeError),
])
def test_modules_check_keyword_values_at_construction(module, keyword, value, error):
    """A bad keyword value fails where the module is made, naming the keyword, not at its first
    forward (which may be hours into a run)."""
    with pytest.raises(error, match=keyword):
        getattr(distill_ops, module)(**{keyword: value})


def test_module_specific_keywords_are_checked_at_construction():
    with pytest.raises(ValueError, match="chunk_size"):
        distill_ops.FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        distill_ops.FusedLinearKDLoss(reduction="none")   # fused losses have no per-token form
    with pytest.raises(ValueError, match="target_temperature"):
        distill_ops.SparseKDLoss(tail="tail", target_temperature=2.0)
    with pytest.raises(ValueError, match="tail"):
        distill_ops.SparseKDLoss(tail="drop")
    with pytest.raises(TypeError, match="inplace_grad"):
        distill_ops.SparseKDLoss(inplace_grad=1)
    with pytest.raises(ValueError, match="vocab"):
        distill_ops.KDLoss(vocab="union")
    distill_ops.KDLoss(divergence="generalized_jsd", beta=0.0, softcap=30.0)   # valid: accepted

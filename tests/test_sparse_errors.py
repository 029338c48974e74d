"""Bad input to sparse_kd_loss gets a clear error naming the argument, raised before any kernel runs;
and the dispatch refuses backends without sparse kernels."""

from __future__ import annotations

import pytest
import torch

from distill_ops.sparse import SparseTargets, sparse_kd_loss

V, K = 12, 3


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, V, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [3, 4, -1], [-1, -1, -1], [11, 5, 6]], dtype=torch.int32)
    lp = torch.log_softmax(torch.randn(4, K, generator=g), -1)
    return s, ids, lp


CASES = [
    # (description, mutation of (s, ids, lp, kwargs), exception, message)
    ("id out of range", lambda s, i, l, kw: i.__setitem__((0, 1), V), ValueError,
     r"target_ids must be in \[0, 12\) or -1"),
    ("negative id", lambda s, i, l, kw: i.__setitem__((1, 0), -2), ValueError,
     r"target_ids must be in \[0, 12\) or -1 \(padding\); found -2"),
    ("duplicate id", lambda s, i, l, kw: i.__setitem__((3, 2), 11), ValueError,
     "target_ids repeats id 11 in row 3"),
    ("duplicate id 0", lambda s, i, l, kw: i.__setitem__((1, 1), 0) or i.__setitem__((1, 0), 0),
     ValueError, "target_ids repeats id 0 in row 1"),
    ("NaN logprob", lambda s, i, l, kw: l.__setitem__((0, 2), float("nan")), ValueError,
     "target_logprobs has NaN"),
    ("+inf logprob", lambda s, i, l, kw: l.__setitem__((3, 0), float("inf")), ValueError,
     r"target_logprobs has \+inf"),
    ("bad divergence", lambda s, i, l, kw: kw.update(divergence="kl"), ValueError,
     "divergence must be one of"),
    ("bad tail", lambda s, i, l, kw: kw.update(tail="bucket"), ValueError, "tail must be one of"),
    ("bad reduction", lambda s, i, l, kw: kw.update(reduction="avg"), ValueError,
     "reduction must be one of"),
    ("zero temperature", lambda s, i, l, kw: kw.update(temperature=0.0), ValueError,
     "temperature must be > 0"),
    ("negative target temperature", lambda s, i, l, kw: kw.update(target_temperature=-1.0),
     ValueError, "target_temperature must be > 0"),
    ("retemper with tail", lambda s, i, l, kw: kw.update(target_temperature=2.0, tail="tail"),
     ValueError, "target_temperature .* needs tail='renorm'"),
    ("hard weight without labels", lambda s, i, l, kw: kw.update(hard_weight=1.0), ValueError,
     "hard_weight > 0 needs labels"),
    ("labels out of range", lambda s, i, l, kw: kw.update(labels=torch.tensor([0, 1, 99, 2])),
     ValueError, r"labels must be in \[0, 12\)"),
    ("int8 labels, ignore_index outside int8", lambda s, i, l, kw: kw.update(
        labels=torch.tensor([0, -56, 1, 2], dtype=torch.int8), ignore_index=200), ValueError,
     r"labels must be in \[0, 12\) or equal ignore_index=200; found -56"),
    ("bad backend", lambda s, i, l, kw: kw.update(backend="gpu"), ValueError,
     "backend must be one of"),
    ("beta out of range", lambda s, i, l, kw: kw.update(divergence="jsd", beta=1.5), ValueError,
     r"beta must be in \[0, 1\]"),
    ("NaN tail mass", lambda s, i, l, kw: kw.update(tail_logmass=torch.tensor([0.0, -1, float("nan"), -2]), tail="tail"),
     ValueError, "tail_logmass has NaN"),
    ("positive tail mass", lambda s, i, l, kw: kw.update(tail_logmass=torch.tensor([-1.0, 0.5, -1, -2]), tail="tail"),
     ValueError, "tail_logmass .* must be <= 0"),
    ("tail shape", lambda s, i, l, kw: kw.update(tail_logmass=torch.zeros(3)), ValueError,
     r"tail_logmass must have shape \(4,\)"),
    ("tail mode, ids' mass over 1", lambda s, i, l, kw: (l.__setitem__((3, 0), 0.5), kw.update(tail="tail")),
     ValueError, r"tail='tail' needs full-vocabulary log-probabilities: the mass of target_logprobs "
                 r"must be at most 1, found .* in row 3"),
    ("tail mode, with the tail over 1", lambda s, i, l, kw: kw.update(tail="tail", tail_logmass=torch.zeros(4)),
     ValueError, "the mass of target_logprobs plus tail_logmass must be at most 1, found 2 in row 0"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_values(name, mutate, exc, msg):
    s, ids, lp = _inputs()
    kw = {}
    mutate(s, ids, lp, kw)
    with pytest.raises(exc, match=msg):
        sparse_kd_loss(s, ids, lp, **kw)


def test_renorm_takes_unnormalised_weights_and_tail_mode_some_slack():
    """Weights above 1 are fine where they are renormalised; tail mode accepts a mass a rounding
    above 1 (the stored log-probabilities may be fp16)."""
    s, ids, lp = _inputs()
    assert torch.isfinite(sparse_kd_loss(s, ids, lp + 3.0))
    assert torch.isfinite(sparse_kd_loss(s, ids, lp + 5e-3, tail="tail"))
    # and a given tail_logmass a rounding above 0 (log 1) as well
    assert torch.isfinite(sparse_kd_loss(s, ids, lp - 20.0, tail="tail",
                                         tail_logmass=torch.full((4,), 5e-3)))


def test_bad_types_and_shapes():
    s, ids, lp = _inputs()
    with pytest.raises(TypeError, match="target_ids must be an integer tensor"):
        sparse_kd_loss(s, ids.float(), lp)
    with pytest.raises(TypeError, match="target_ids must be a torch.Tensor"):
        sparse_kd_loss(s, ids.tolist(), lp)
    with pytest.raises(ValueError, match=r"target_ids must have shape \(4,\) \+ \(k,\)"):
        sparse_kd_loss(s, ids[:3], lp[:3])
    with pytest.raises(ValueError, match="target_ids has no target slots"):
        sparse_kd_loss(s, ids[:, :0], lp[:, :0])
    with pytest.raises(ValueError, match="target_logprobs must have the shape of target_ids"):
        sparse_kd_loss(s, ids, lp[:, :2])
    with pytest.raises(TypeError, match="target_logprobs must be float32"):
        sparse_kd_loss(s, ids, lp.long())
    with pytest.raises(TypeError, match="student_logits must be float32"):
        sparse_kd_loss(s.long(), ids, lp)
    with pytest.raises(TypeError, match="needs target_logprobs"):
        sparse_kd_loss(s, ids)
    with pytest.raises(TypeError, match="^tail_logmass must be a float tensor"):
        sparse_kd_loss(s, ids, lp, tail_logmass=torch.zeros(4, dtype=torch.long))
    t = SparseTargets(ids, lp, torch.zeros(4))
    with pytest.raises(ValueError, match="either a SparseTargets or"):
        sparse_kd_loss(s, t, lp)


def test_errors_before_any_kernel(monkeypatch):
    """Validation happens before the op is called."""
    from distill_ops import sparse as sparse_mod

    called = []
    monkeypatch.setattr(sparse_mod, "sparse_kd", lambda *a: called.append(a))
    s, ids, lp = _inputs()
    ids[0, 0] = 1  # duplicate of ids[0, 1]
    with pytest.raises(ValueError, match="repeats id 1 in row 0"):
        sparse_kd_loss(s, ids, lp)
    assert not called


def test_padding_slots_may_hold_anything():
    """NaN or +inf in the logprobs of -1 slots is ignored (only valid slots are data)."""
    s, ids, lp = _inputs()
    lp[1, 2] = float("nan")
    lp[2, :] = float("inf")
    loss = sparse_kd_loss(s, ids, lp)
    assert torch.isfinite(loss)


def test_cuda_backend_refused_on_cpu_tensors():
    """backend='cuda' on CPU tensors is refused by name, not switched."""
    s, ids, lp = _inputs()
    with pytest.raises(RuntimeError, match="cannot run here"):
        sparse_kd_loss(s, ids, lp, backend="cuda")


def test_env_override_to_the_cpu_backend(monkeypatch):
    from distill_ops import backends

    s, ids, lp = _inputs()
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "cpu")
    if not backends.native_status("cpu")[0]:
        with pytest.raises(RuntimeError, match="DISTILL_OPS_BACKEND='cpu' cannot run here"):
            sparse_kd_loss(s, ids, lp)
    else:
        a = sparse_kd_loss(s, ids, lp)
        b = sparse_kd_loss(s, ids, lp, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="DISTILL_OPS_BACKEND='cuda' cannot run here"):
        sparse_kd_loss(s, ids, lp)
    monkeypatch.setenv("DISTILL_OPS_BACKEND", "torch")
    assert torch.isfinite(sparse_kd_loss(s, ids, lp))


def test_narrow_integer_ids_are_read_as_ids():
    """uint8 target ids (no padding possible) give the int64 ids' loss: the range check compared
    them in uint8, where -1 is 255, and refused every id ("found 0")."""
    s, ids, lp = _inputs()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [11, 9, 10]])
    want = sparse_kd_loss(s, ids, lp)
    assert torch.equal(sparse_kd_loss(s, ids.to(torch.uint8), lp), want)


def test_inplace_grad_refuses_target_logprobs_in_the_students_memory():
    s, ids, lp = _inputs()
    work = torch.cat([s, lp.expand(4, K)], dim=1) * 1   # one buffer: student, then the targets
    with pytest.raises(ValueError, match="target_logprobs shares its memory"):
        sparse_kd_loss(work[:, :V], ids, work[:, :K].detach(), inplace_grad=True)

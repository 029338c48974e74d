"""kd_loss on awkward inputs: odd shapes, -inf and NaN logits, extreme temperatures and logit
ranges, ignored rows, non-contiguous views, common-prefix vocabularies, the in-place gradient, the
module wrapper and backend selection."""

from __future__ import annotations

import math

import pytest
import torch

import distill_ops
from distill_ops import KDLoss, backends, kd_loss
from oracle import (DIVERGENCES, INTERPRETER_NOISE, OPS_LAYER_AT_SCALE, backend,  # noqa: F401
                    backend_and_device, check_against_oracle, device, make_labels, make_logits,
                    oracle, rel_err, run_kd)

pytestmark = INTERPRETER_NOISE


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("n,v", [(1, 1), (5, 1), (1, 257), (3, 1000), (2, 2048), (1, 2049)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
def test_awkward_shapes(backend, device, n, v, divergence):
    s, t = make_logits(n, v, seed=n * 7 + v, device=device)
    labels = make_labels(n, v, seed=v, ignored="some", device=device)
    check_against_oracle(s, t, labels, divergence=divergence, temperature=1.5, hard_weight=0.5,
                         backend=backend)


def test_vocab_of_one_is_zero_loss(backend, device):
    """V = 1: both distributions are the point mass, the label can only be 0: loss and grad 0."""
    s, t = make_logits(4, 1, seed=1, device=device)
    labels = torch.tensor([0, -100, 0, 0], device=device)
    for div in DIVERGENCES:
        loss, grad = run_kd(s, t, labels, divergence=div, hard_weight=1.0, reduction="sum",
                            backend=backend)
        assert abs(loss.item()) <= 1e-6, (div, loss)  # zero up to rounding
        assert grad.abs().max().item() <= 1e-6, (div, grad)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_vocab_larger_than_one_block(backend, device, divergence):
    """V above the largest Triton block (8192) with a ragged last block: the online softmax
    merges across blocks."""
    s, t = make_logits(2, 2 * 8192 + 3, seed=11, device=device)
    labels = torch.tensor([5, 2 * 8192 + 2], device=device)
    check_against_oracle(s, t, labels, divergence=divergence, temperature=2.0, hard_weight=0.5,
                         backend=backend)


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean"])
def test_three_dim_input(backend, device, reduction):
    s, t = make_logits((2, 5), 129, seed=3, device=device)
    labels = make_labels((2, 5), 129, seed=3, ignored="some", device=device)
    go = torch.rand(2, 5) + 0.5 if reduction == "none" else None
    check_against_oracle(s, t, labels, grad_output=go, divergence="reverse_kl", hard_weight=0.5,
                         reduction=reduction, backend=backend)
    if reduction == "none":
        assert kd_loss(s, t, reduction="none", backend=backend).shape == (2, 5)


def test_empty_batch(backend, device):
    s, t = make_logits(0, 10, seed=0, device=device)
    for red, expect in (("sum", 0.0), ("mean", 0.0), ("batchmean", 0.0)):
        loss, grad = run_kd(s, t, reduction=red, backend=backend)
        assert loss.item() == expect and grad.shape == (0, 10)
    assert kd_loss(s, t, reduction="none", backend=backend).shape == (0,)


# ---------------------------------------------------------------------------------------------
# -inf, NaN, extreme ranges


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_columns_minus_inf(backend, device, divergence):
    """-inf in the same columns of both (a padded vocabulary): finite, equal to the loss on the
    unpadded columns, zero gradient in the pad."""
    s, t = make_logits(4, 40, seed=21, device=device)
    labels = torch.tensor([1, -100, 30, 0], device=device)
    s[:, 33:] = -math.inf
    t[:, 33:] = -math.inf
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, backend=backend)
    loss, grad = run_kd(s, t, labels, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[:, 33:]) == 0
    ref, ref_grad = run_kd(s[:, :33].contiguous(), t[:, :33].contiguous(), labels, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[:, :33], ref_grad, rtol=1e-4, atol=1e-6)
    check_against_oracle(s, t, labels, **kw)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_or_student_columns(backend, device, divergence):
    """-inf on one side only. Observed (and mathematically right): KL(p||q) is +inf for a row where
    the student has -inf and the teacher mass, KL(q||p) is +inf where the teacher has -inf and the
    student mass; the mixtures (JSD, skew KL) stay finite. Other rows are unaffected."""
    s, t = make_logits(4, 30, seed=22, device=device)
    s[0, 3] = -math.inf   # student excludes a token the teacher likes
    t[2, 4] = -math.inf   # teacher excludes a token the student likes
    kw = dict(divergence=divergence, temperature=1.5, reduction="none", backend=backend)
    loss, grad = run_kd(s, t, **kw)
    ref, ref_grad = oracle(s, t, **{k: v for k, v in kw.items() if k != "backend"})
    inf_rows = {"forward_kl": [0], "reverse_kl": [2]}.get(divergence, [])
    if divergence == "generalized_jsd":  # default beta = 0.5: JSD
        inf_rows = []
    for r in range(4):
        if r in inf_rows:
            assert loss[r].item() == math.inf, (r, loss)
        else:
            assert math.isfinite(loss[r].item()), (r, loss)
            assert rel_err(loss[r], ref[r]) < 1e-5
            assert torch.isfinite(grad[r]).all()
            assert rel_err(grad[r], ref_grad[r]) < 1e-4
    # forward KL's gradient (q - p) / tau stays finite even on its infinite row; reverse KL's
    # gradient on an infinite row is not finite (inf - inf), in the oracle too: not asserted.
    if divergence == "forward_kl":
        assert torch.isfinite(grad[0]).all() and rel_err(grad[0], ref_grad[0]) < 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_first_block_entirely_minus_inf(backend, device, divergence):
    """-inf in every column of the first Triton block (8192 columns) of both sides: the online
    softmax starts from a block whose max is -inf (exp(-inf - -inf) must not make the running sum
    NaN). Finite, equal to the oracle, zero gradient in the masked columns."""
    v = 8192 + 40
    s, t = make_logits(2, v, seed=24, device=device)
    labels = torch.tensor([8200, -100], device=device)
    s[:, :8192] = -math.inf
    t[:, :8192] = -math.inf
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, backend=backend)
    loss, grad = run_kd(s, t, labels, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[:, :8192]) == 0
    check_against_oracle(s, t, labels, **kw)


@pytest.mark.parametrize("divergence,other,inf_row", [("skew_forward_kl", "forward_kl", 0),
                                                      ("skew_reverse_kl", "reverse_kl", 2)])
def test_skew_kl_at_alpha_zero_keeps_the_infinite_rows(backend, device, divergence, other, inf_row):
    """alpha = 0 collapses the mixture onto one side (M = q, resp. p): a zero of M where the measured
    side has mass is the plain KL's +inf, not NaN (log M is a log-add-exp with one operand -inf
    from the zero weight and the other -inf from the masked logit: -inf, not -inf - -inf). The
    other rows, with columns masked on both sides, match the oracle."""
    s, t = make_logits(4, 30, seed=22, device=device)
    s[0, 3] = -math.inf   # student excludes a token the teacher likes
    t[2, 4] = -math.inf   # teacher excludes a token the student likes
    s[:, 25:] = -math.inf
    t[:, 25:] = -math.inf
    kw = dict(temperature=1.5, reduction="none", backend=backend)
    loss = kd_loss(s, t, divergence=divergence, alpha=0.0, **kw)
    ref = kd_loss(s, t, divergence=other, **kw)
    assert loss[inf_row].item() == math.inf, loss
    want, _ = oracle(s, t, divergence=divergence, alpha=0.0, temperature=1.5, reduction="none")
    assert want[inf_row].item() == math.inf
    rows = [r for r in range(4) if r != inf_row]
    assert torch.isfinite(loss[rows]).all(), loss
    assert rel_err(loss[rows], want[rows]) < 1e-5
    assert rel_err(loss[rows], ref[rows]) < 1e-5


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_propagates(backend, device, divergence, side):
    """A NaN logit makes its row's loss NaN and so the reduced loss: never hidden."""
    s, t = make_logits(4, 50, seed=23, device=device)
    (s if side == "student" else t)[1, 7] = float("nan")
    rows = kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    assert torch.isnan(rows[1]), f"row with a NaN {side} logit gave {rows[1].item()}"
    assert torch.isfinite(rows[[0, 2, 3]]).all()
    assert torch.isnan(kd_loss(s, t, divergence=divergence, backend=backend))


@pytest.mark.parametrize("temperature", [0.05, 50.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_temperature(backend, device, divergence, temperature):
    """tau = 0.05 makes the distributions near one-hot (log-probabilities down to about -400,
    probabilities below fp32's smallest normal); tau = 50 makes them near uniform (the loss is
    small against log V, fp32 keeps about 5 digits: loss tolerance 1e-4)."""
    s, t = make_logits(4, 100, seed=24, device=device)
    labels = torch.tensor([3, -100, 99, 0], device=device)
    check_against_oracle(s, t, labels, divergence=divergence, temperature=temperature,
                         hard_weight=0.5, loss_tol=1e-4, grad_tol=1e-3, backend=backend)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl",
                                        "forward_kl", "reverse_kl"])
def test_wide_logit_range(backend, device, divergence):
    """Logits spread over about +-75 at tau = 1 (the range of some LLM heads without a softcap):
    many probabilities underflow fp32; the loss must stay finite and right. Gradient tolerance
    1e-3: eager fp32 PyTorch reaches 5e-4 on this input for reverse KL (the torch backend 3e-4)."""
    s, t = make_logits(4, 1000, seed=25, spread=25.0, device=device)
    check_against_oracle(s, t, divergence=divergence, backend=backend, grad_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# ignored rows


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_all_ignored_is_zero(backend, device, reduction, divergence):
    s, t = make_logits(6, 64, seed=26, device=device)
    labels = torch.full((6,), -100, device=device)
    loss, grad = run_kd(s, t, labels, divergence=divergence, hard_weight=1.0, reduction=reduction,
                        backend=backend)
    assert not torch.isnan(loss).any()
    assert torch.count_nonzero(loss) == 0
    assert torch.count_nonzero(grad) == 0


def test_ignored_rows_get_zero_grad_and_custom_ignore_index(backend, device):
    s, t = make_logits(6, 64, seed=27, device=device)
    labels = torch.tensor([1, -1, 2, -1, 63, 0], device=device)
    loss, grad = run_kd(s, t, labels, ignore_index=-1, hard_weight=0.5, reduction="none",
                        backend=backend)
    assert torch.count_nonzero(loss[[1, 3]]) == 0 and torch.count_nonzero(grad[[1, 3]]) == 0
    assert (loss[[0, 2, 4, 5]] > 0).all()
    check_against_oracle(s, t, labels, ignore_index=-1, hard_weight=0.5, backend=backend)
    # mean divides by the 4 live rows, batchmean by all 6
    m = kd_loss(s, t, labels=labels, ignore_index=-1, reduction="mean", backend=backend)
    bm = kd_loss(s, t, labels=labels, ignore_index=-1, reduction="batchmean", backend=backend)
    torch.testing.assert_close(m * 4, bm * 6, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# layouts


def _views(n, v):
    """Named (make(buffer) -> view) pairs producing (n, v) student views of various layouts."""
    return {
        "transposed": (lambda g: torch.randn(v, n, generator=g) * 3, lambda b: b.t()),
        "column_slice": (lambda g: torch.randn(n, v + 13, generator=g) * 3,
                         lambda b: b[:, 5:5 + v]),
        "row_step": (lambda g: torch.randn(2 * n, v, generator=g) * 3, lambda b: b[::2]),
        "column_step": (lambda g: torch.randn(n, 2 * v, generator=g) * 3, lambda b: b[:, ::2]),
    }


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "row_step", "column_step"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_contiguous_inputs(backend, device, layout, side):
    """One side a strided view (the other contiguous): same loss and gradient as contiguous
    copies; no gradient outside the student view."""
    n, v = 6, 77
    make, view = _views(n, v)[layout]
    g = torch.Generator().manual_seed(28)
    s_buf, t_buf = make(g).to(device), make(g).to(device)
    if side == "student":
        leaf = s_buf.clone().requires_grad_(True)
        s, t = view(leaf), view(t_buf).contiguous()
    else:
        leaf = view(s_buf).contiguous().requires_grad_(True)
        s, t = leaf, view(t_buf)
    labels = torch.tensor([0, -100, 76, 5, 6, 7], device=device)
    kw = dict(divergence="jsd", temperature=2.0, hard_weight=0.5)
    loss = kd_loss(s, t, labels=labels, backend=backend, **kw)
    loss.backward()
    ref, ref_grad = oracle(s.detach().contiguous(), t.contiguous(), labels, **kw)
    assert rel_err(loss, ref) < 1e-5
    if side == "student":
        assert rel_err(view(leaf.grad), ref_grad) < 1e-4
        mask = torch.ones_like(leaf, dtype=torch.bool)
        view(mask).fill_(False)
        assert torch.count_nonzero(leaf.grad[mask]) == 0  # nothing outside the view
    else:
        assert rel_err(leaf.grad, ref_grad) < 1e-4


def test_non_contiguous_three_dim(backend, device):
    g = torch.Generator().manual_seed(29)
    s = (torch.randn(5, 2, 33, generator=g) * 3).to(device).transpose(0, 1)  # (2, 5, 33)
    t = (torch.randn(5, 2, 33, generator=g) * 3).to(device).transpose(0, 1)
    check_against_oracle(s, t, divergence="skew_forward_kl", reduction="none", backend=backend)


# ---------------------------------------------------------------------------------------------
# vocab="common_prefix"


@pytest.mark.parametrize("v_student,v_teacher", [(53, 50), (50, 53)])
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl"])
def test_common_prefix(backend, device, v_student, v_teacher, divergence):
    g = torch.Generator().manual_seed(30)
    s = (torch.randn(2, 3, v_student, generator=g) * 3).to(device)
    t = (torch.randn(2, 3, v_teacher, generator=g) * 3).to(device)
    labels = torch.tensor([[0, 49, -100], [3, 4, 5]], device=device)
    kw = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, backend=backend)
    loss, grad = run_kd(s, t, labels, vocab="common_prefix", **kw)
    ref, ref_grad = run_kd(s[..., :50].contiguous(), t[..., :50].contiguous(), labels, **kw)
    assert torch.equal(loss, ref)
    torch.testing.assert_close(grad[..., :50], ref_grad, rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(grad[..., 50:]) == 0
    check_against_oracle(s, t, labels, vocab="common_prefix", **kw)
    with pytest.raises(ValueError, match="common_prefix"):
        kd_loss(s, t, labels=labels, backend=backend)
    x = s.clone().requires_grad_(True) * 1
    with pytest.raises(ValueError, match="inplace_grad"):
        kd_loss(x, t, vocab="common_prefix", inplace_grad=True, backend=backend)


def test_common_prefix_label_beyond_prefix_is_rejected(backend, device):
    s, t = make_logits(2, 53, seed=31, device=device)
    labels = torch.tensor([51, 0], device=device)  # a valid student id, but outside the common 50
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, t[:, :50], labels=labels, vocab="common_prefix", backend=backend)


# ---------------------------------------------------------------------------------------------
# inplace_grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_inplace_grad(backend, device, divergence, hard_weight):
    """Same loss and gradient as the out-of-place path; afterwards the student buffer holds the
    gradient."""
    s, t = make_logits(6, 50, seed=32, device=device)
    labels = make_labels(6, 50, seed=32, ignored="some", device=device)
    kw = dict(divergence=divergence, hard_weight=hard_weight, temperature=2.0, beta=1.0,
              backend=backend)  # beta = 1: generalized_jsd runs reverse KL
    ref_loss, ref_grad = run_kd(s, t, labels, **kw)
    leaf = s.clone().requires_grad_(True)
    x = leaf * 1
    loss = kd_loss(x, t, labels=labels, inplace_grad=True, **kw)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=0)
    loss.backward()
    torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x.detach(), ref_grad, rtol=1e-6, atol=1e-9)


def test_inplace_grad_reduction_none_and_views(backend, device):
    s, t = make_logits(4, 50, seed=33, device=device)
    go = torch.linspace(0.5, 2.0, 4, device=device)
    _, ref_grad = oracle(s, t, reduction="none", grad_output=go)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf * 1, t, reduction="none", inplace_grad=True, backend=backend).backward(go)
    assert rel_err(leaf.grad, ref_grad) < 1e-5
    # a column slice is passed to the kernel as is: its slice of the buffer holds the gradient
    big = torch.zeros(4, 60, device=device)
    big[:, 5:55] = s
    leaf = big.clone().requires_grad_(True)
    x = leaf * 1
    kd_loss(x[:, 5:55], t, inplace_grad=True, backend=backend).backward()
    _, ref_grad = oracle(s, t)
    assert rel_err(leaf.grad[:, 5:55], ref_grad) < 1e-5
    assert torch.count_nonzero(leaf.grad[:, :5]) == 0
    assert rel_err(x.detach()[:, 5:55], ref_grad) < 1e-5
    # without a gradient to compute, the student is left alone: one that needs none, and one
    # that would under torch.no_grad() (evaluation)
    x = s.clone()
    kd_loss(x, t, inplace_grad=True, backend=backend)
    assert torch.equal(x, s)
    x = s.clone().requires_grad_(True) * 1
    with torch.no_grad():
        kd_loss(x, t, inplace_grad=True, backend=backend)
    assert torch.equal(x.detach(), s)


def test_no_soft_term_reads_nothing_of_the_teacher(backend, device):
    """soft_weight = 0 leaves the hard-label CE alone: a teacher row with NaN, or all -inf, is
    not read into it (Triton's kernels multiplied the divergence by 0, giving NaN, where the
    reference and C++ kernels skip it)."""
    s, t = make_logits(3, 8, seed=35, device=device)
    t[1, 2] = float("nan")
    t[2] = -float("inf")
    labels = torch.tensor([1, 2, 3], device=device)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, soft_weight=0.0, hard_weight=1.0, labels=labels, reduction="none",
                   backend=backend)
    loss.sum().backward()
    y = s.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(y, labels, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_inplace_grad_second_backward_is_refused(backend, device):
    """The gradient lives in the logits' memory and goes to the first backward: a second one
    (retain_graph=True) says so, where it used to add nothing (or fail on a None)."""
    s, t = make_logits(3, 20, seed=36, device=device)
    leaf = s.clone().requires_grad_(True)
    loss = kd_loss(leaf * 1, t, inplace_grad=True, backend=backend)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward .* inplace_grad=True"):
        loss.backward()


def test_teacher_requiring_grad_is_never_differentiated(backend, device):
    """The teacher is detached: only its grad flag set, the loss needs none (it used to need one
    and fail in the backward); with both flags set the student's gradient is the usual one."""
    s, t = make_logits(3, 20, seed=37, device=device)
    teacher = t.clone().requires_grad_(True)
    assert not kd_loss(s, teacher, backend=backend).requires_grad
    student = s.clone().requires_grad_(True)
    kd_loss(student, teacher, backend=backend).backward()
    assert teacher.grad is None
    assert rel_err(student.grad, oracle(s, t)[1]) < 1e-5


def test_inplace_grad_is_caught_when_the_logits_were_saved(backend, device):
    """The overwritten logits must not silently feed another backward: exp() saves its output,
    so its backward has to fail loudly after the kernel wrote the gradient over it."""
    s, t = make_logits(4, 50, seed=35, device=device)
    leaf = s.clone().requires_grad_(True)
    x = leaf.exp()
    loss = kd_loss(x, t, inplace_grad=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# KDLoss


def test_module_equals_function(backend, device):
    s, t = make_logits(6, 50, seed=34, device=device)
    labels = make_labels(6, 50, seed=34, ignored="some", device=device)
    kw = dict(divergence="skew_forward_kl", alpha=0.2, temperature=2.0, hard_weight=0.3,
              softcap=20.0, reduction="sum", backend=backend)
    mod = KDLoss(**kw)
    assert "skew_forward_kl" in repr(mod)
    a_loss, a_grad = run_kd(s, t, labels, **kw)
    x = s.clone().requires_grad_(True)
    b_loss = mod(x, t, labels)
    b_loss.backward()
    assert torch.equal(a_loss, b_loss.detach()) and torch.equal(a_grad, x.grad)


def test_module_rejects_unknown_keywords_at_construction():
    with pytest.raises(TypeError, match="temprature"):
        KDLoss(temprature=2.0)
    with pytest.raises(TypeError, match="labels"):
        KDLoss(labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        KDLoss(2.0)  # keywords only


# ---------------------------------------------------------------------------------------------
# backend selection


def _record_backend(monkeypatch):
    used = []
    real = backends.get

    def spy(name, op):
        used.append(name)
        return real(name, op)

    monkeypatch.setattr(backends, "get", spy)
    return used


def test_env_var_overrides_auto(monkeypatch):
    s, t = make_logits(2, 10, seed=35)
    used = _record_backend(monkeypatch)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    kd_loss(s, t)
    assert used == ["torch"]
    # an explicit backend= wins over the variable
    ok, _ = backends._can_run("triton", torch.device("cpu"))
    if ok:
        kd_loss(s, t, backend="triton")
        assert used[-1] == "triton"


def test_env_var_asking_for_unavailable_backend_raises(monkeypatch):
    s, t = make_logits(2, 10, seed=36)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=backends.ENV_VAR):
        kd_loss(s, t)
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        kd_loss(s, t)


def test_auto_on_cpu_never_picks_a_gpu_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    used = _record_backend(monkeypatch)
    s, t = make_logits(2, 10, seed=37)
    kd_loss(s, t)
    expect = "cpu" if backends.native_status("cpu")[0] else "torch"
    assert used == [expect]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_unavailable_backend_raises_clearly(monkeypatch):
    s, t = make_logits(2, 10, seed=38)
    with pytest.raises(RuntimeError, match="cuda"):
        kd_loss(s, t, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        kd_loss(s, t, backend="triton")


def test_public_api():
    assert set(distill_ops.DIVERGENCES) == set(DIVERGENCES)
    assert distill_ops.kd_loss is kd_loss and distill_ops.KDLoss is KDLoss


class _NewTensorsOfShape(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that return a tensor of ``shape`` in new memory (not a view or an in-place
    result: storage that none of their inputs has)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)]
            ptr = out.untyped_storage().data_ptr()
            if all(a.untyped_storage().data_ptr() != ptr for a in inputs):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("inplace_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_scaled_backward_makes_no_second_gradient(backend, device, inplace_grad, reduction):
    """The backward of w * loss (gradient accumulation, a loss weight, GradScaler) scales the
    saved gradient in its own memory: out of place it made a second N x V tensor, +8.6 GB at
    N = 16384, V = 262144 in bf16, with inplace_grad too, whose point is to save one."""
    s, t = make_logits(5, 64, seed=41, device=device)
    leaf = s.clone().requires_grad_(True)
    student = leaf * 1 if inplace_grad else leaf
    loss = kd_loss(student, t, reduction=reduction, inplace_grad=inplace_grad, backend=backend)
    weight = torch.linspace(0.5, 2.0, 5, device=device) if reduction == "none" else 0.25
    spy = _NewTensorsOfShape(s.shape)
    with spy:
        torch.autograd.backward(loss * weight if reduction == "mean" else loss, None
                                if reduction == "mean" else weight)
    # (leaf * 1's own backward, MulBackward, makes one: it is not the loss's)
    assert spy.ops == (["aten.mul.Tensor"] if inplace_grad else []), spy.ops
    ref = oracle(s, t, reduction=reduction, grad_output=weight if reduction == "none" else None)[1]
    assert rel_err(leaf.grad, ref * (0.25 if reduction == "mean" else 1.0)) < 1e-5


@pytest.mark.parametrize("dtype,factor", [(torch.float16, 65536.0), (torch.float16, 1 / 3),
                                          (torch.bfloat16, 1 / 3)], ids=["fp16-gradscaler",
                                                                         "fp16-third", "bf16-third"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("mode", ["saved", "saved-retained", "inplace_grad"])
def test_a_16_bit_gradient_is_scaled_in_float32(backend, device, dtype, factor, reduction, mode):
    """The backward's factor multiplies a 16-bit saved gradient in float32, rounded once. It was
    rounded to the gradient's dtype first: in float16 GradScaler's first scale, 65536, is inf, so
    every gradient was inf (and GradScaler skipped the step); 1/3 is 0.2% off in bfloat16."""
    s, t = make_logits(6, 64, seed=43, device=device)
    s, t = s.to(dtype), t.to(dtype)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf, t, reduction="sum", backend=backend).backward()   # factor 1: the saved gradient
    want = (leaf.grad.float() * factor).to(dtype)
    leaf = s.clone().requires_grad_(True)
    inplace_grad = mode == "inplace_grad"
    student = leaf * 1 if inplace_grad else leaf
    loss = kd_loss(student, t, reduction=reduction, inplace_grad=inplace_grad, backend=backend)
    retain = mode == "saved-retained"   # (then scaled out of place)
    if reduction == "sum":
        (loss * factor).backward(retain_graph=retain)
    else:
        loss.backward(torch.full_like(loss, factor), retain_graph=retain)
    assert torch.isfinite(want).all()
    assert torch.equal(leaf.grad, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_per_row_factors_scale_a_16_bit_cpu_gradient_in_row_chunks(monkeypatch, backend, dtype):
    """A per-row backward factor (reduction='none') on a 16-bit CPU gradient goes in row chunks
    (fused_grad.CPU_FACTOR_CHUNK elements, 4M: no float32 N x V copy); shrunk here so that 12
    rows take 4 chunks, each row must still get its own factor (a mutation audit scaled every
    chunk by the first chunk's factors unnoticed: no test reached the loop)."""
    from distill_ops.ops import fused_grad
    monkeypatch.setattr(fused_grad, "CPU_FACTOR_CHUNK", 3 * 40)
    s, t = make_logits(12, 40, seed=44)
    s, t = s.to(dtype), t.to(dtype)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf, t, reduction="sum", backend=backend).backward()   # factor 1: the saved gradient
    go = torch.linspace(0.25, 3.0, 12)
    want = (leaf.grad.float() * go[:, None]).to(dtype)
    leaf = s.clone().requires_grad_(True)
    kd_loss(leaf, t, reduction="none", backend=backend).backward(go)
    assert torch.equal(leaf.grad, want)


def test_retain_graph_backwards_scale_the_saved_gradient_afresh(backend, device):
    """With retain_graph=True the saved gradient is read again, so it is scaled out of place:
    each backward gets its own weight (in place, the second one would carry both)."""
    s, t = make_logits(4, 50, seed=42, device=device)
    leaf = s.clone().requires_grad_(True)
    loss = kd_loss(leaf, t, backend=backend)
    (2.0 * loss).backward(retain_graph=True)
    first, leaf.grad = leaf.grad.clone(), None
    (3.0 * loss).backward()
    assert rel_err(leaf.grad, 1.5 * first) < 1e-6
    assert rel_err(first, 2.0 * oracle(s, t)[1]) < 1e-5


def test_inplace_grad_refuses_rows_that_share_memory(backend, device):
    """An expanded student's rows are one row's memory: written in place, each row's gradient
    would land on logits another row still reads (the CPU kernel accepted it and returned a
    wrong gradient). Refused, naming student_logits, before any kernel runs."""
    s, t = make_logits(4, 30, seed=43, device=device)
    base = s[:1].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="student_logits whose rows do not share memory"):
        kd_loss((base * 1).expand(4, 30), t, inplace_grad=True, backend=backend)
    targets = distill_ops.teacher_topk(t, 3, backend="torch")
    with pytest.raises(ValueError, match="student_logits whose rows do not share memory"):
        distill_ops.sparse_kd_loss((base * 1).expand(4, 30), targets, inplace_grad=True,
                                   backend=backend)
    kd_loss((base * 1).expand(4, 30), t, backend=backend).backward()  # out of place: fine
    assert base.grad is not None


def test_retain_graph_unit_backwards_do_not_share_the_saved_gradient(backend, device):
    """An unweighted loss backpropagated three times with retain_graph: the student's .grad
    must not be the saved gradient itself, or the second backward's accumulation into .grad
    changed the retained buffer (the third backward raised 'modified by an inplace operation')."""
    s, t = make_logits(3, 37, seed=44, device=device)
    leaf = s.clone().requires_grad_(True)
    loss = kd_loss(leaf, t, backend=backend)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.nn.utils.clip_grad_norm_([leaf], 1e-3)      # an in-place edit of .grad between them
    leaf.grad = None
    loss.backward()
    assert rel_err(leaf.grad, oracle(s, t)[1]) < 1e-5


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_a_second_backward_through_the_gradient_raises(backend, device, inplace_grad):
    """The gradient is made in the forward, a constant to autograd: a gradient penalty's
    backward through it silently lost every second-order term (the loss's Hessian). It raises;
    create_graph=True alone still gives the first-order gradient."""
    s, t = make_logits(3, 40, seed=44, device=device)
    leaf = s.clone().requires_grad_(True)
    student = leaf * 1 if inplace_grad else leaf
    loss = kd_loss(student, t, inplace_grad=inplace_grad, backend=backend)
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    assert rel_err(g.detach(), oracle(s, t)[1]) < 1e-5
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        (g ** 2).sum().backward()


@OPS_LAYER_AT_SCALE
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("inplace_grad", [False, True])
def test_float16_gradient_survives_a_mean_over_many_tokens(backend, device, reduction,
                                                            inplace_grad):
    """GradScaler's float16 recipe: (65536 * loss).backward(). The mean's 1/N was folded into the
    float16 gradient in the forward, before the scale: at N = 2048 its entries near 1/(V N)
    fell below float16's range (62% of them 0 here); eager PyTorch scales first. The 1/N now
    waits for the backward: 5% zeros (entries below 6e-8 before any factor), 1.9e-4 error."""
    if backend == "triton" and device == "cpu":
        pytest.skip("2048 rows take minutes in the interpreter; the fix is in the ops layer, "
                    "which every backend shares")
    n, v = 2048, 256
    s, t = make_logits(n, v, seed=45, device=device)
    s, t = (s * 1.5).half(), (t * 1.5).half()
    leaf = s.clone().requires_grad_(True)
    student = leaf * 1 if inplace_grad else leaf
    (kd_loss(student, t, reduction=reduction, inplace_grad=inplace_grad, backend=backend)
     * 65536.0).backward()
    ref = oracle(s.double(), t.double(), reduction=reduction)[1] * 65536.0
    assert (leaf.grad == 0).float().mean() < 0.1
    assert rel_err(leaf.grad.double(), ref) < 1e-3

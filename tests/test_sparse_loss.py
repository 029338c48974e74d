"""sparse_kd_loss against the float64 oracle (tests/sparse_oracle.py: written from the definitions
with dense tensors and autograd): every divergence x tail mode, target re-tempering, the hard-label
term, reductions, -1 padding, empty rows, dtypes, awkward shapes; on the torch and Triton backends
(Triton on a covering subset: its CPU interpreter is slow; large shapes on a GPU are marked cuda)."""

from __future__ import annotations

import zlib

import pytest
import torch

from distill_ops.sparse import sparse_kd_loss, teacher_topk
from oracle import INTERPRETER_NOISE, OPS_LAYER_AT_SCALE, require_backend
from sparse_oracle import (check_sparse, make_student, make_targets, rel_err, run_sparse,
                           sparse_oracle)

pytestmark = INTERPRETER_NOISE

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
               "generalized_jsd")
TAILS = ("renorm", "tail")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
N, V, K = 6, 67, 5


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _sweep():
    cases = []
    for backend in ("torch", "triton", "cpu"):
        for i, div in enumerate(DIVERGENCES):
            for j, tail in enumerate(TAILS):
                for dtype in (torch.float32, torch.bfloat16):
                    if backend == "triton" and dtype == torch.bfloat16 and (i + j) % 2:
                        continue
                    red = REDUCTIONS[(i + 2 * j) % 4]
                    cases.append(pytest.param(
                        backend, div, tail, dtype, red,
                        id=f"{backend}-{div}-{tail}-{str(dtype)[6:]}-{red}"))
    return cases


@pytest.mark.parametrize("backend,divergence,tail,dtype,reduction", _sweep())
def test_matches_oracle(backend, divergence, tail, dtype, reduction):
    require_backend(backend)
    seed = seed_of(divergence, tail, dtype, reduction)
    ids, lp, _ = make_targets(N, V, K, seed=seed)
    s = make_student(N, V, seed=seed, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    labels[3] = -100
    go = None
    if reduction == "none":
        go = torch.rand(N, generator=torch.Generator().manual_seed(seed)) + 0.5
    check_sparse(s, ids, lp, grad_output=go, divergence=divergence, tail=tail,
                 temperature=0.7 if divergence != "forward_kl" else 2.0, labels=labels,
                 hard_weight=0.25, reduction=reduction, beta=0.3, alpha=0.2, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_tail_logmass_given(backend, divergence):
    """tail='tail' with the teacher's own tail mass instead of 1 - sum exp(logprobs)."""
    require_backend(backend)
    ids, lp, tails = make_targets(N, V, K, seed=11, pad=False)
    s = make_student(N, V, seed=11)
    # A tail mass inconsistent with the logprobs is normalised into the bucket distribution.
    tails = tails - 0.3
    check_sparse(s, ids, lp, divergence=divergence, tail="tail", tail_logmass=tails,
                 temperature=1.5, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("target_temperature", [0.5, 3.0])
def test_target_temperature(backend, divergence, target_temperature):
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=12)
    s = make_student(N, V, seed=12)
    check_sparse(s, ids, lp, divergence=divergence, target_temperature=target_temperature,
                 temperature=2.0, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(backend, dtype):
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=13)
    s = make_student(N, V, seed=13, dtype=dtype)
    check_sparse(s, ids, lp.to(dtype), divergence="forward_kl", tail="tail", temperature=1.0,
                 backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (3, 2, 2), (2, 33, 33), (5, 300, 1), (4, 129, 17)])
def test_awkward_shapes(backend, n, v, k):
    require_backend(backend)
    ids, lp, _ = make_targets(n, v, k, seed=n * v + k, pad=k > 1, empty_row=False)
    s = make_student(n, v, seed=v)
    for tail in TAILS:
        check_sparse(s, ids, lp, tail=tail, temperature=1.3, backend=backend)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cpu_kernel_over_several_chunks(divergence, dtype):
    """The compiled CPU kernel streams 512-column chunks: long rows, every tail mode."""
    require_backend("cpu")
    n, v, k = 4, 1300, 33
    ids, lp, tails = make_targets(n, v, k, seed=v)
    s = make_student(n, v, seed=v, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    for tail in TAILS:
        check_sparse(s, ids, lp, divergence=divergence, tail=tail, tail_logmass=tails,
                     temperature=0.8, labels=labels, hard_weight=0.4, backend="cpu")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_cpu_kernel_masked_prefix_and_rising_max(divergence, temperature):
    """The CPU kernel keeps pass 1's exponentials and rescales them per 512-column chunk: row 0
    -inf over its first 1100 columns, then logits near -300 (the first chunks' exponentials must
    give 0, not 0 * inf); row 1 ascending, so that every chunk raises the running max. At tau = 1
    the CE term's softmax comes from the same kept exponentials; at 0.8 from its own pass."""
    require_backend("cpu")
    n, v, k, cut = 3, 2000, 9, 1100
    ids, lp, tails = make_targets(n, v - cut, k, seed=21, empty_row=False)
    ids = torch.where(ids >= 0, ids + cut, ids)  # targets in the unmasked part
    s = make_student(n, v, seed=21)
    s[0, :cut] = -torch.inf
    s[0, cut:] -= 300.0
    s[1] += torch.linspace(-40.0, 12.0, v, dtype=s.dtype)
    labels = torch.tensor([cut + 5, v - 1, 17])
    for tail in TAILS:
        check_sparse(s, ids, lp, divergence=divergence, tail=tail, tail_logmass=tails,
                     temperature=temperature, labels=labels, hard_weight=0.4, backend="cpu",
                     reduction="none")


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_leading_dims_and_noncontiguous(backend):
    require_backend(backend)
    ids, lp, tails = make_targets(2 * 3, V, K, seed=14)
    s_big = make_student((3, 2), V + 9, seed=14)
    s = s_big[..., 4:4 + V].transpose(0, 1)  # (2, 3, V), not contiguous
    ids, lp, tails = ids.reshape(2, 3, K), lp.reshape(2, 3, K), tails.reshape(2, 3)
    assert not s.is_contiguous()
    go = torch.rand(2, 3) + 0.5
    check_sparse(s, ids, lp, tail="tail", tail_logmass=tails, reduction="none", grad_output=go,
                 backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_empty_rows_and_ignored_rows(backend):
    """Rows with no valid target give only their CE term; ignored rows give nothing; all-ignored
    batches give 0 (not NaN) under mean."""
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=15)
    ids[:] = -1
    lp[:] = -torch.inf
    ids[0, 2], lp[0, 2] = 7, -1.0  # one row with a single target
    s = make_student(N, V, seed=15)
    labels = torch.arange(N) * 3
    labels[4] = -100
    check_sparse(s, ids, lp, labels=labels, hard_weight=0.5, backend=backend)
    loss, grad = run_sparse(s, ids, lp, labels=torch.full((N,), -100), hard_weight=1.0,
                            backend=backend)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    loss, grad = run_sparse(s, ids, lp, reduction="none", backend=backend)
    assert torch.count_nonzero(loss[1:]) == 0 and torch.count_nonzero(grad[1:]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_inf_logits_and_zero_weights(backend):
    """-inf student logits outside the targets and -inf target logprobs (zero teacher weight) give
    finite results, no NaN."""
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=16, pad=False)
    s = make_student(N, V, seed=16)
    mask = torch.ones(N, V, dtype=torch.bool)
    mask.scatter_(1, ids.long(), False)
    s[:, -10:] = torch.where(mask[:, -10:], -torch.inf, s[:, -10:])
    for tail in TAILS:
        check_sparse(s, ids, lp, tail=tail, divergence="reverse_kl", backend=backend)
    lp[:, -1] = -torch.inf
    for tail in TAILS:
        for div in ("forward_kl", "jsd"):
            check_sparse(s, ids, lp, tail=tail, divergence=div, backend=backend)
        # A zero teacher weight where the student has mass: reverse KL is +inf, as it should be.
        loss, _ = run_sparse(s, ids, lp, tail=tail, divergence="reverse_kl", backend=backend)
        assert loss.item() == torch.inf


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_targets_with_full_support_equal_dense(backend, divergence):
    """k = V top-k targets reproduce the dense divergence (renorm and tail alike). In tail mode
    neither side has a tail bucket: the student's is summed over no column (-inf), not 1 - Q_K,
    whose rounding residue made reverse KL q log(q / 0) = inf on about half of these rows."""
    require_backend(backend)
    from distill_ops import kd_loss

    g = torch.Generator().manual_seed(17)
    t = torch.randn(16, 40, generator=g) * 2
    s = torch.randn(16, 40, generator=g) * 2
    targets = teacher_topk(t, 40, temperature=1.5, backend=backend)
    assert torch.isneginf(targets.tail_logmass).all()
    dense = kd_loss(s, t, temperature=1.5, divergence=divergence, reduction="none",
                    backend="torch")
    for tail in TAILS:
        if tail == "renorm" and divergence != "forward_kl":
            continue  # (renorm renormalises q over the support: the same here, tested above)
        loss = sparse_kd_loss(s, targets, temperature=1.5, tail=tail, divergence=divergence,
                              reduction="none", backend=backend)
        assert torch.isfinite(loss).all() and rel_err(loss, dense) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("given_tail", [False, True])
def test_targets_covering_the_vocabulary_have_no_tail_bucket(backend, divergence, given_tail):
    """Tail mode with ids covering all V columns: no tail bucket on either side, whatever the
    teacher's numbers say -- a given finite tail_logmass, or logprobs whose sum falls short of 1
    (log1mexp of it is finite). A teacher tail against the student's empty one (-inf) would make
    forward KL infinite. Equal to the float64 oracle (which drops the bucket too)."""
    require_backend(backend)
    n, v = 3, 12
    g = torch.Generator().manual_seed(seed_of("cover", divergence, given_tail))
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)]).int()
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    lp = lp.gather(1, ids.long()).float()
    lp = lp - 1e-3  # the weights sum to 0.999: a finite log1mexp (without a given tail)
    tail = torch.full((n,), -8.0) if given_tail else None  # exp(-8) = 3.4e-4: total <= 1
    s = make_student(n, v, seed=seed_of("cover-s", divergence))
    check_sparse(s, ids, lp, tail_logmass=tail, tail="tail", divergence=divergence,
                 backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
def test_renorm_row_whose_targets_all_have_zero_weight(backend, divergence):
    """Renorm mode, a row whose ids are valid but whose logprobs are all -inf (no teacher mass to
    renormalise: log_softmax would be -inf - -inf = NaN): that row's soft term and gradient are
    0, as for a row of padding; the other rows match the oracle."""
    require_backend(backend)
    ids, lp, _ = make_targets(3, V, K, seed=33, pad=False)
    lp[0] = -torch.inf
    s = make_student(3, V, seed=33)
    check_sparse(s, ids, lp, divergence=divergence, reduction="none", backend=backend)
    loss, grad = run_sparse(s, ids, lp, divergence=divergence, reduction="none",
                            backend=backend)
    assert loss[0].item() == 0.0 and torch.count_nonzero(grad[0]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype,gap", [(torch.float32, 18.0), (torch.bfloat16, 18.0),
                                       (torch.float32, 40.0), (torch.bfloat16, 40.0),
                                       (torch.float32, 130.0), (torch.bfloat16, 400.0),
                                       (torch.float64, 900.0)])
def test_tail_mode_with_a_student_sure_of_its_targets(backend, divergence, dtype, gap):
    """A student that puts all but ~exp(-gap) of its mass on the target ids (late in training)
    against a teacher with a real tail: the tail term (1 - P_K) log((1 - P_K) / (1 - Q_K)) is
    large and finite. 1 - Q_K formed by subtraction rounds to 0 (inf loss) or to noise (at gap
    25 the CPU kernel was 10% off): it must be summed over the columns outside K. Past gap ~100
    (float32; ~745 in double) that sum's terms underflow relative to the row max (the CPU and
    Triton kernels gave an infinite loss and NaN gradients): relative to its own max."""
    require_backend(backend)
    n, v, k = 4, 300 if backend == "triton" else 3000, 4
    seed = seed_of("sure", divergence, str(dtype), gap)
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    t[:, :k] += 4.0  # the teacher's tail: ~0.1-0.9 of its mass
    logp = torch.log_softmax(t, -1)
    lp, ids = torch.topk(logp, k, -1)
    tail = torch.log1p(-lp.exp().sum(-1))
    # the targets near 0 and the rest near -gap (not the rest near 0: float32 logits near 130
    # resolve 1.5e-5, and the fp32 reference's gradient was 2e-5 off for that alone)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) - gap
    s.scatter_add_(1, ids, torch.full((n, k), gap, dtype=torch.float64))
    el, _ = check_sparse(s.to(dtype), ids.int(), lp.float(), tail_logmass=tail.float(),
                         divergence=divergence, tail="tail", beta=0.3, backend=backend)
    assert el < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence,mix", [("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0),
                                            ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.1)])
@pytest.mark.parametrize("tail", TAILS)
def test_mixtures_where_p_and_q_leave_float32(backend, divergence, mix, tail):
    """A low temperature, a student sure of one target and a teacher sure of the other: where p is
    subnormal and q ~ e^-300, the mixture formed as w_p p + w_q q rounded to 0 and its term was
    infinite (torch and Triton; beta 0 or 1 made 0 * inf = NaN). It is a log-add-exp, as in the
    dense losses."""
    require_backend(backend)
    s = torch.tensor([[0.0, 30.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0], [0.0, 30.0, -5.0, 1.0],
                      [3.0, 1.0, 0.0, 0.5]])
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.int32)
    lp = torch.tensor([[-103.5, -1e-3], [-200.0, -1e-3], [-90.0, -2e-3], [-0.5, -1.2]])
    check_sparse(s, ids, lp, divergence=divergence, tail=tail, temperature=0.1, beta=mix,
                 alpha=mix, reduction="sum", backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [8, 5])
def test_scaled_logits_are_rounded_once(backend, divergence, tail, k):
    """At tau != 1 a = s / tau is rounded once and that value is used by the max, the normaliser
    and the target slots alike. The CPU kernel's normaliser took exp(s * (1 / tau) - max) with the
    product contracted into an FMA (unrounded), so the top token's term was exp(its rounding
    error) instead of 1; reverse KL (R ~ 600 here) amplified that shift of every log q into a
    wrong loss and a gradient far from the truth's ~0. Likewise log q = a - lse(a) in float32
    (torch, Triton) rounds at |a| ~ 290: as (a - max) - log z."""
    require_backend(backend)
    s = torch.zeros(3, 8)
    s[0, 3] = 58.02304458618164  # student sure of token 3
    s[1] = torch.tensor([31.7, -2.0, 30.1, 0.0, 29.3, 1.0, 0.5, 27.9])
    s[2] = torch.tensor([1.3, 0.2, -0.7, 2.2, 0.1, -1.5, 0.9, 0.4])
    t = torch.zeros(3, 8)
    t[0, 3], t[0, 5] = -600.0, 5.0  # teacher sure of token 5 (e^-600: the oracle's double)
    t[1] = torch.tensor([3.0, 0.0, 2.0, -1.0, 1.0, 0.5, -3.0, 2.5])
    t[2] = torch.tensor([0.3, 1.2, 0.7, -0.2, 2.0, 0.0, -1.0, 0.8])
    tg = teacher_topk(t, k, backend="torch")
    check_sparse(s, tg.ids, tg.logprobs, tail_logmass=tg.tail_logmass, divergence=divergence,
                 tail=tail, temperature=0.2, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("tail", TAILS)
def test_an_ignored_row_may_have_undefined_targets(backend, tail):
    """A teacher row of -inf has no softmax: its top-k log-probabilities are NaN. Labelled -100
    the row does not count, so the value checks skip it (they refused the whole batch) and the
    other rows' loss and gradient are those of the batch without it; unlabelled, it is refused."""
    require_backend(backend)
    g = torch.Generator().manual_seed(23)
    t = torch.randn(3, 9, generator=g) * 2
    t[1] = -torch.inf
    s = torch.randn(3, 9, generator=g)
    targets = teacher_topk(t, 4, backend="torch")
    assert torch.isnan(targets.logprobs[1]).any()
    labels = torch.tensor([2, -100, 5])
    kw = dict(tail=tail, hard_weight=0.5, backend=backend)
    x = s.clone().requires_grad_(True)
    loss = sparse_kd_loss(x, targets, labels=labels, **kw)
    loss.backward()
    keep = torch.tensor([0, 2])
    part = teacher_topk(t[keep], 4, backend="torch")
    y = s[keep].clone().requires_grad_(True)
    ref = sparse_kd_loss(y, part, labels=labels[keep], **kw)
    ref.backward()
    assert rel_err(loss, ref) < 1e-6 and rel_err(x.grad[keep], y.grad) < 1e-6
    assert torch.count_nonzero(x.grad[1]) == 0
    with pytest.raises(ValueError, match="target_logprobs has NaN at a valid"):
        sparse_kd_loss(s, targets, labels=torch.tensor([2, 3, 5]), **kw)
    # nor is an ignored row's mass checked (tail mode: at most 1)
    heavy = targets.logprobs.clone()
    heavy[1] = 0.0
    x.grad = None
    again = sparse_kd_loss(x, targets.ids, heavy, labels=labels, **kw)
    assert rel_err(again, ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_renorm_student_without_mass_on_the_targets_is_nan(backend, divergence):
    """tail='renorm' renormalises the student over the target ids; a student row that is -inf at
    every id has no such distribution (0/0), so its loss and gradient are NaN in every backend (the
    torch and Triton reverse KLs masked the NaN q~ to a loss of 0, the CPU kernel gave NaN).
    The other rows are untouched, and labelled -100 the row counts for nothing."""
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=29, pad=False)
    s = make_student(N, V, seed=29)
    s[2].scatter_(0, ids[2].long(), -torch.inf)
    loss, grad = run_sparse(s, ids, lp, divergence=divergence, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).any()
    keep = [i for i in range(N) if i != 2]
    ref, ref_grad = run_sparse(s[keep], ids[keep], lp[keep], divergence=divergence,
                               reduction="none", backend=backend)
    assert rel_err(loss[keep], ref) < 1e-6 and rel_err(grad[keep], ref_grad) < 1e-6
    labels = torch.zeros(N, dtype=torch.long)
    labels[2] = -100
    loss, grad = run_sparse(s, ids, lp, divergence=divergence, labels=labels, backend=backend)
    assert torch.isfinite(loss) and torch.count_nonzero(grad[2]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_scale_temperature_and_weights(backend):
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=18)
    s = make_student(N, V, seed=18)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(18))
    check_sparse(s, ids, lp, temperature=3.0, scale_temperature=False, soft_weight=0.4,
                 hard_weight=0.6, labels=labels, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_backends_agree_bitwise_close(backend):
    """The kernels and the torch reference compute the same closed forms."""
    require_backend(backend)
    ids, lp, tails = make_targets(N, 150, 9, seed=19)
    s = make_student(N, 150, seed=19)
    a = run_sparse(s, ids, lp, tail="tail", tail_logmass=tails, divergence="jsd", backend=backend)
    b = run_sparse(s, ids, lp, tail="tail", tail_logmass=tails, divergence="jsd", backend="torch")
    assert rel_err(a[0], b[0]) < 1e-6 and rel_err(a[1], b[1]) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend):
    """torch.autograd.gradcheck on float64 inputs (the closed-form gradient vs finite differences),
    every mode."""
    require_backend(backend)
    ids, lp, _ = make_targets(3, 11, 4, seed=20)
    lp = lp.double()
    s = make_student(3, 11, seed=20, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([1, -100, 5])
    for tail, div in [("renorm", "forward_kl"), ("renorm", "jsd"), ("tail", "reverse_kl"),
                      ("tail", "forward_kl")]:
        def fn(x, div=div, tail=tail):
            return sparse_kd_loss(x, ids, lp, divergence=div, tail=tail, temperature=0.8,
                                  labels=labels, hard_weight=0.5, reduction="sum", backend=backend)

        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_no_grad_and_detached_paths(backend):
    require_backend(backend)
    ids, lp, _ = make_targets(N, V, K, seed=21)
    s = make_student(N, V, seed=21)
    with torch.no_grad():
        a = sparse_kd_loss(s.clone().requires_grad_(True), ids, lp, backend=backend)
    b = sparse_kd_loss(s, ids, lp, backend=backend)
    ref, _ = sparse_oracle(s, ids, lp)
    assert rel_err(a, ref) < 1e-5 and rel_err(b, ref) < 1e-5


# ---------------------------------------------------------------- GPU, real vocabulary sizes


@pytest.mark.cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,v,k", [(6, 67, 5), (3, 4099, 600), (2, 1, 1)])
def test_cuda_kernel_matches_oracle(divergence, dtype, n, v, k):
    """The compiled CUDA loss on CUDA tensors: every divergence, tail mode and dtype; V not a
    multiple of the vector width, more slots than threads."""
    require_backend("cuda", "cuda")
    ids, lp, tails = make_targets(n, v, k, seed=v + k)
    s = make_student(n, v, seed=v + k, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    labels[0] = -100
    dev = dict(device="cuda")
    for tail in TAILS:
        check_sparse(s.to(**dev), ids.to(**dev), lp.to(**dev), divergence=divergence, tail=tail,
                     tail_logmass=tails.to(**dev), temperature=0.7, labels=labels.to(**dev),
                     hard_weight=0.3, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(backend, tail, divergence, dtype):
    """N=512, V=128256, k=64 top-k targets from teacher_topk: the GPU kernels vs the torch
    reference on the same CUDA tensors (which matches the oracle above), and a few rows against
    the float64 oracle."""
    require_backend(backend, "cuda")
    n, v, k = 512, 128256, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(n, v, device="cuda", generator=g) * 4
    s = (torch.randn(n, v, device="cuda", generator=g) * 4).to(dtype)
    targets = teacher_topk(t, k, backend="triton")
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    kw = dict(divergence=divergence, tail=tail, temperature=2.0, labels=labels, hard_weight=0.1)
    loss, grad = run_sparse(s, targets.ids, targets.logprobs, tail_logmass=targets.tail_logmass,
                            backend=backend, **kw)
    ref_loss, ref_grad = run_sparse(s.float(), targets.ids, targets.logprobs,
                                    tail_logmass=targets.tail_logmass, backend="torch", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(grad.float(), ref_grad) < (tol if divergence == "forward_kl" else 10 * tol)
    rows = slice(0, 4)
    check_sparse(s[rows], targets.ids[rows], targets.logprobs[rows],
                 tail_logmass=targets.tail_logmass[rows], backend=backend,
                 **{**kw, "labels": labels[rows]})


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_strided_labels(backend):
    """1-D labels with a stride (labels2d[:, 0]): reshape and the int64 cast leave such a view as
    it is, and the Triton kernels read labels_ptr + row, i.e. other labels (a silently wrong CE).
    The checked labels are contiguous."""
    require_backend(backend)
    from distill_ops import kd_loss

    g = torch.Generator().manual_seed(31)
    s, t = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    labels = torch.randint(0, 30, (4, 3), generator=g)[:, 0]
    assert labels.stride() == (3,)
    want = torch.nn.functional.cross_entropy(s.double(), labels, reduction="none")
    targets = teacher_topk(t, 5, backend="torch")
    for loss in (kd_loss(s, t, labels=labels, hard_weight=1.0, soft_weight=0.0,
                         reduction="none", backend=backend),
                 sparse_kd_loss(s, targets, labels=labels, hard_weight=1.0, soft_weight=0.0,
                                reduction="none", backend=backend)):
        assert rel_err(loss, want) < 1e-6


def test_triton_kernels_read_no_label_or_id_outside_the_row():
    """Under torch.compile the value checks do not run, so a label or id outside [0, V) can reach
    a kernel: the Triton kernels give NaN for that row (as the CUDA kernels do), never a read past
    the row (it read the next row's logits: a finite, wrong loss)."""
    require_backend("triton")
    from distill_ops.backends.triton import dense, sparse

    g = torch.Generator().manual_seed(32)
    n, v = 3, 40
    s, t = torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)
    labels = torch.tensor([v + 3, 7, 2])
    out = dense.dense_forward(s, t, labels, divergence=0, mix=0.0, temperature=1.0, softcap=0.0,
                              soft_coef=1.0, hard_coef=1.0, ignore_index=-100, grad=None,
                              grad_scale=None)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    ids = torch.tensor([[1, 2, v + 1], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    lp = torch.log(torch.full((n, 3), 1 / 3))
    for lab in (None, torch.tensor([1, v, 3])):
        out = sparse.sparse_forward(s, ids, lp, None, lab, divergence=0, mix=0.0, mode=0,
                                    temperature=1.0, target_scale=1.0, soft_coef=1.0,
                                    hard_coef=0.0 if lab is None else 1.0, ignore_index=-100,
                                    grad=None, grad_scale=None)
        assert torch.isnan(out[0]) and torch.isfinite(out[2])
        assert torch.isnan(out[1]) == (lab is not None)
    # ... and never a store past the row: the gradient, in a buffer with 8 spare columns a row
    # (stride 48), keeps its spare columns (an id v + 1 would land in row 0's spare column 1).
    buf = torch.zeros(n, v + 8)
    out = sparse.sparse_forward(s, ids, lp, None, None, divergence=0, mix=0.0, mode=0,
                                temperature=1.0, target_scale=1.0, soft_coef=1.0, hard_coef=0.0,
                                ignore_index=-100, grad=buf[:, :v], grad_scale=None)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    assert torch.count_nonzero(buf[:, v:]) == 0, buf[:, v:]


@OPS_LAYER_AT_SCALE
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float16_gradient_survives_a_mean_over_many_tokens(backend):
    """As the dense loss (test_dense_edge.py): the mean's 1/N waits for the backward, so
    GradScaler's factor reaches a float16 gradient before its small entries would flush."""
    require_backend(backend)
    g = torch.Generator().manual_seed(46)
    s = (torch.randn(2048, 256, generator=g) * 1.5).half()
    targets = teacher_topk(torch.randn(2048, 256, generator=g) * 1.5, 16, backend="torch")
    leaf = s.clone().requires_grad_(True)
    (sparse_kd_loss(leaf, targets, backend=backend) * 65536.0).backward()
    exact = s.double().requires_grad_(True)
    sparse_kd_loss(exact, targets, backend="torch").backward()
    assert (leaf.grad == 0).float().mean() < 0.1
    assert rel_err(leaf.grad.double(), exact.grad * 65536.0) < 1e-3

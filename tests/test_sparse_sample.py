"""teacher_sample: the counter-based RNG, identical draws on every backend, the sampling
distribution (a chi-square test that a biased sampler fails), the importance weights, and the
unbiasedness of the sparse forward-KL gradient (a z-test that top-k targets fail)."""

from __future__ import annotations

import pytest
import torch

from distill_ops import kd_loss
from distill_ops.backends import reference_sparse
from distill_ops.backends.triton import topk as triton_topk
from distill_ops.sparse import sparse_kd_loss, teacher_sample, teacher_topk
from distill_ops.targets import rng
from oracle import INTERPRETER_NOISE, require_backend

pytestmark = INTERPRETER_NOISE


def test_fmix32_tensor_matches_python_ints():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([0, 1, 2**32 - 1])
    got = rng.fmix32(x)
    want = torch.tensor([rng.fmix32_int(int(v)) for v in x])
    assert torch.equal(got, want)
    assert got.min() >= 0 and got.max() < 2**32
    # fmix32 is a bijection: no collisions on distinct inputs
    assert rng.fmix32(torch.arange(1 << 16)).unique().numel() == 1 << 16
    assert rng.seed_key(0) != rng.seed_key(1) and rng.seed_key(2**40) != rng.seed_key(0)


def test_uniforms_are_uniform():
    """u over a (sample, column) grid: mean, variance and a 16-bin chi-square."""
    sk = rng.sample_keys(rng.row_keys(rng.seed_key(7), torch.arange(4)), torch.arange(64))
    bits = rng.fmix32(sk.unsqueeze(-1) ^ rng.vocab_keys(torch.arange(1000)))
    u = ((bits >> 9).double() + 0.5) / (1 << 23)
    assert 0 < u.min() and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    chi2 = ((hist - n / 16) ** 2 / (n / 16)).sum().item()
    assert chi2 < 45  # 15 dof: P(chi2 > 45) ~ 1e-4


def _logits(n, v, seed, spread=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * spread).to(dtype)


def _same_targets(a, b):
    """Same unique ids per row with the same weights (rows compared as sets, ordered by id)."""
    assert a.ids.shape == b.ids.shape
    ia, oa = a.ids.long().sort(-1)
    ib, ob = b.ids.long().sort(-1)
    assert torch.equal(ia, ib)
    la, lb = a.logprobs.gather(-1, oa), b.logprobs.gather(-1, ob)
    assert torch.equal(torch.isfinite(la), torch.isfinite(lb))
    fin = torch.isfinite(la)
    torch.testing.assert_close(la[fin], lb[fin], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v,s,tp", [(37, 8, 1.0), (300, 16, 2.0), (5, 32, 0.7), (1, 4, 1.0)])
def test_kernels_draw_the_reference_ids(backend, dtype, v, s, tp):
    require_backend(backend)
    t = _logits(5, v, seed=v + s).to(dtype)
    a = teacher_sample(t, s, temperature=1.3, proposal_temperature=tp, seed=11, backend="torch")
    b = teacher_sample(t, s, temperature=1.3, proposal_temperature=tp, seed=11, backend=backend)
    _same_targets(a, b)
    assert torch.equal(a.ids, b.ids)  # same order too (weight desc, then id asc)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_kernels_draw_the_reference_ids_over_several_blocks(monkeypatch, backend):
    """Several Triton blocks / CPU chunks per row (the CPU chunk is 512 columns)."""
    require_backend(backend)
    monkeypatch.setattr(triton_topk, "BLOCK_OVERRIDE", 16)
    v = 150 if backend == "triton" else 1300
    t = _logits(3, v, seed=3, dtype=torch.bfloat16)
    a = teacher_sample(t, 12, proposal_temperature=1.5, seed=5, backend="torch")
    b = teacher_sample(t, 12, proposal_temperature=1.5, seed=5, backend=backend)
    _same_targets(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_target_format(backend):
    require_backend(backend)
    t = _logits(6, 20, seed=4, spread=3.0)
    out = teacher_sample(t, 16, seed=1, backend=backend)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float32
    assert out.ids.shape == (6, 16) and torch.isneginf(out.tail_logmass).all()
    valid = out.ids >= 0
    for r in range(6):
        ids = out.ids[r][valid[r]]
        assert ids.unique().numel() == ids.numel()  # duplicates merged
        assert valid[r, : ids.numel()].all() and not valid[r, ids.numel():].any()  # packed first
        lp = out.logprobs[r][valid[r]]
        assert torch.all(lp[:-1] >= lp[1:])  # weight descending
        # proposal = teacher: weights are the counts / num_samples, summing to 1
        counts = (lp.exp() * 16).double()
        torch.testing.assert_close(counts, counts.round(), atol=1e-4, rtol=0)
        assert abs(lp.exp().sum().item() - 1) < 1e-5
    assert torch.isneginf(out.logprobs[~valid]).all()
    # a row of -inf draws id 0 (documented); its weight is undefined (NaN) but the padding is
    # -inf on every backend (the reference padded it with NaN: -inf * 0 spread by logsumexp)
    t[2] = -torch.inf
    out = teacher_sample(t, 4, seed=1, backend=backend)
    assert out.ids[2].tolist() == [0, -1, -1, -1] and torch.isneginf(out.logprobs[2, 1:]).all()


def test_reproducible_and_seeded():
    t = _logits(8, 50, seed=5)
    a = teacher_sample(t, 16, seed=3)
    b = teacher_sample(t, 16, seed=3)
    c = teacher_sample(t, 16, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.ids, c.ids)
    # a row's draws depend on its index, not on the rest of the batch
    d = teacher_sample(t[:3], 16, seed=3)
    assert torch.equal(d.ids, a.ids[:3])
    # leading dims are flattened into row indices
    e = teacher_sample(t.reshape(2, 4, 50), 16, seed=3)
    assert torch.equal(e.ids.reshape(8, 16), a.ids)


def _draw_counts(t_row, num_samples, rows, *, temperature=1.0, proposal_temperature=1.0, seed=0):
    """Counts of each id over ``rows`` independent rows (same logits) of num_samples draws each,
    recovered from the weights (count / num_samples when the proposal is the teacher)."""
    v = t_row.numel()
    x = t_row.expand(rows, v).contiguous()
    out = teacher_sample(x, num_samples, temperature=temperature * proposal_temperature, seed=seed,
                         backend="torch")
    counts = torch.zeros(v, dtype=torch.float64)
    valid = out.ids >= 0
    c = (out.logprobs.double().exp() * num_samples).round()
    counts.index_add_(0, out.ids[valid].long(), c[valid])
    return counts


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draws_follow_the_proposal(temperature):
    """Chi-square of the draw frequencies against softmax(x / T) over 40960 draws."""
    t_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    counts = _draw_counts(t_row, 64, 640, temperature=temperature)
    n = counts.sum()
    expect = torch.softmax(t_row.double() / temperature, 0) * n
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 30, chi2  # 7 dof: P(chi2 > 30) ~ 1e-4
    # The test has power: the same counts against a slightly different temperature fail it.
    wrong = torch.softmax(t_row.double() / (temperature * 1.15), 0) * n
    assert ((counts - wrong) ** 2 / wrong).sum().item() > 30


def test_importance_weights_with_a_tempered_proposal():
    """proposal_temperature != 1: the draws follow softmax(x / (T Tp)) and each unique id's weight
    is proportional to count * p / q."""
    t = _logits(4, 30, seed=6, spread=2.0)
    out = teacher_sample(t, 32, temperature=1.2, proposal_temperature=2.0, seed=9)
    raw = teacher_sample(t, 32, temperature=2.4, seed=9)  # same draws, weights = counts / S
    assert torch.equal(out.ids.sort(-1).values, raw.ids.sort(-1).values)
    p = torch.log_softmax(t.double() / 1.2, -1)
    q = torch.log_softmax(t.double() / 2.4, -1)
    for r in range(4):
        oi, oo = out.ids[r].long().sort()
        _, ro = raw.ids[r].long().sort()
        ok = oi >= 0
        counts = raw.logprobs[r][ro][ok].double().exp() * 32
        lw = counts.log() + p[r][oi[ok]] - q[r][oi[ok]]
        want = lw - torch.logsumexp(lw, 0)
        torch.testing.assert_close(out.logprobs[r][oo][ok].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu", "triton-host-merge"])
@pytest.mark.parametrize("tp", [2.0, 0.6])
def test_importance_weights_at_large_logit_offsets(monkeypatch, backend, tp):
    """Logits near 3e4 (a shifted row: the softmax does not see the shift): the weights depend on
    differences of drawn logits, (x_i - x_j) (1/T - 1/(T Tp)). Formed as x_i * delta, each product
    rounds at 1e4 (ulp 1e-3) before the differences are taken, so the float32 weights were 1e-3
    off; relative to the drawn max they are float32-accurate."""
    name = "triton" if backend == "triton-host-merge" else backend
    require_backend(name)
    if backend == "triton-host-merge":  # the kernel's raw draws, merged by merge_sampled
        monkeypatch.setattr(triton_topk, "MERGE_IN_KERNEL_MAX_S", 4)
    t = _logits(6, 50, seed=21, spread=3.0) + 30000.0
    out = teacher_sample(t, 16, temperature=1.2, proposal_temperature=tp, seed=5, backend=name)
    raw = teacher_sample(t, 16, temperature=1.2 * tp, seed=5, backend=name)  # counts / S
    assert torch.equal(out.ids.sort(-1).values, raw.ids.sort(-1).values)
    x = t.double()
    delta = 1 / 1.2 - 1 / (1.2 * tp)
    for r in range(6):
        oi, oo = out.ids[r].long().sort()
        _, ro = raw.ids[r].long().sort()
        ok = oi >= 0
        counts = (raw.logprobs[r][ro][ok].double().exp() * 16).round()
        xi = x[r][oi[ok]]
        lw = counts.log() + (xi - xi.max()) * delta
        want = lw - torch.logsumexp(lw, 0)
        torch.testing.assert_close(out.logprobs[r][oo][ok].double(), want, rtol=0, atol=2e-6)


def _grad_rows(student_row, targets, tau):
    """Per-row gradient of the sparse forward KL (reduction none, one row per estimate)."""
    n = targets.ids.shape[0]
    s = student_row.expand(n, -1).clone().requires_grad_(True)
    loss = sparse_kd_loss(s, targets, temperature=tau, reduction="none", backend="torch")
    loss.sum().backward()
    return s.grad.double()


def _z_max(est_rows, dense):
    """Largest |mean - dense| / standard error over the coordinates."""
    m = est_rows.shape[0]
    mean = est_rows.mean(0)
    se = est_rows.std(0) / m ** 0.5 + 1e-12
    return ((mean - dense).abs() / se).max().item(), (mean - dense).abs().max().item()


def test_sampled_gradient_is_unbiased():
    """Mean over 6000 independent estimates (rows = independent draws) of the sampled-target
    forward-KL gradient equals the dense gradient within 5 standard errors per coordinate; top-k
    targets of the same size are biased and fail the same test; different seeds agree too."""
    v, s_count, tau = 24, 8, 1.5
    g = torch.Generator().manual_seed(8)
    t_row = torch.randn(v, generator=g) * 1.5
    s_row = torch.randn(v, generator=g)
    dense = ((torch.softmax(s_row.double() / tau, 0) - torch.softmax(t_row.double() / tau, 0))
             * tau)  # tau^2 / tau
    rows = 6000
    x = t_row.expand(rows, v).contiguous()
    sampled = teacher_sample(x, s_count, temperature=tau, seed=1)
    est = _grad_rows(s_row, sampled, tau)
    z, err = _z_max(est, dense)
    assert z < 5.0, (z, err)
    se = est.std(0) / rows ** 0.5 + 1e-12
    # across seeds (one row, many seeds) as well
    per_seed = torch.stack([
        _grad_rows(s_row, teacher_sample(t_row[None], s_count, temperature=tau, seed=sd), tau)[0]
        for sd in range(400)])
    z_seed, _ = _z_max(per_seed, dense)
    assert z_seed < 5.0
    # Negative controls, the same z-test: top-k targets with as many slots are biased...
    topk = teacher_topk(x[:2], s_count, temperature=tau)
    assert ((_grad_rows(s_row, topk, tau)[0] - dense).abs() / se).max().item() > 20
    # ... and so, by O(1 / num_samples), are self-normalised weights of a tempered proposal.
    tempered = teacher_sample(x, s_count, temperature=tau, proposal_temperature=3.0, seed=1)
    assert _z_max(_grad_rows(s_row, tempered, tau), dense)[0] > 5.0


def test_sampled_loss_is_unbiased_up_to_a_teacher_term():
    """The loss value from sampled targets is the dense loss plus a term of the teacher alone (the
    renormalised targets' own entropy, docs/fidelity.md "loss err"), so what depends on the
    student is unbiased: the mean over 6000 draws (and over 400 seeds) of loss(s1) - loss(s2)
    equals the dense difference within 5 standard errors. Top-3 targets fail the same test."""
    v, s_count, tau = 24, 8, 1.5
    g = torch.Generator().manual_seed(11)
    t_row = torch.randn(v, generator=g) * 1.5
    s1, s2 = torch.randn(v, generator=g), torch.randn(v, generator=g) * 2

    def dense(s_row):
        return float(kd_loss(s_row[None].double(), t_row[None].double(), temperature=tau,
                             backend="torch"))

    def diff_rows(targets):
        n = targets.ids.shape[0]
        one = [sparse_kd_loss(x.expand(n, v), targets, temperature=tau, reduction="none",
                              backend="torch").double() for x in (s1, s2)]
        return one[0] - one[1]

    want = dense(s1) - dense(s2)
    x = t_row.expand(6000, v).contiguous()
    est = diff_rows(teacher_sample(x, s_count, temperature=tau, seed=4))
    z = abs(est.mean().item() - want) / (est.std().item() / est.numel() ** 0.5)
    assert z < 5.0, (est.mean().item(), want, z)
    per_seed = torch.cat([diff_rows(teacher_sample(t_row[None], s_count, temperature=tau, seed=sd))
                          for sd in range(400)])
    z_seed = abs(per_seed.mean().item() - want) / (per_seed.std().item() / 400 ** 0.5)
    assert z_seed < 5.0, (per_seed.mean().item(), want, z_seed)
    topk = diff_rows(teacher_topk(t_row[None], 3, temperature=tau))
    assert abs(topk.item() - want) / (est.std().item() / est.numel() ** 0.5) > 5.0


def test_tempered_proposal_is_consistent():
    """Self-normalised weights with proposal_temperature = 2: the bias shrinks with the sample
    count (64 draws: within 2e-2 of the dense gradient in max norm)."""
    v, tau = 24, 1.0
    g = torch.Generator().manual_seed(9)
    t_row = torch.randn(v, generator=g) * 2.0
    s_row = torch.randn(v, generator=g)
    dense = torch.softmax(s_row.double(), 0) - torch.softmax(t_row.double(), 0)
    x = t_row.expand(3000, v).contiguous()
    out = teacher_sample(x, 64, temperature=tau, proposal_temperature=2.0, seed=2)
    mean = _grad_rows(s_row, out, tau).mean(0)
    assert (mean - dense).abs().max().item() < 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_errors(backend):
    require_backend(backend)
    t = torch.randn(2, 10)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        teacher_sample(t, 0, backend=backend)
    with pytest.raises(ValueError, match="num_samples must be <="):
        teacher_sample(t, 5000, backend=backend)
    with pytest.raises(ValueError, match="proposal_temperature must be > 0"):
        teacher_sample(t, 4, proposal_temperature=-1.0, backend=backend)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        teacher_sample(t, 4, temperature=0, backend=backend)
    with pytest.raises(TypeError, match="seed must be an int"):
        teacher_sample(t, 4, seed=1.5, backend=backend)
    bad = t.clone()
    bad[1, 7] = torch.nan
    with pytest.raises(ValueError, match="teacher_logits has NaN"):
        teacher_sample(bad, 4, backend=backend)
    bad[1] = torch.nan  # a whole row too (the row max propagates it)
    with pytest.raises(ValueError, match="teacher_logits has NaN"):
        teacher_sample(bad, 4, backend=backend)


def test_reference_chunking_does_not_change_draws(monkeypatch):
    t = _logits(7, 90, seed=10)
    a = teacher_sample(t, 8, seed=2, backend="torch")
    monkeypatch.setattr(reference_sparse, "CHUNK_ELEMENTS", 200)  # tiny row and column chunks
    b = teacher_sample(t, 8, seed=2, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(backend, dtype):
    """N=512, V=128256, 64 samples: Triton and the CUDA kernel draw what the reference draws on the
    GPU (allowing a handful of near-tie flips from log approximations)."""
    require_backend(backend, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    t = (torch.randn(512, 128256, device="cuda", generator=g) * 4).to(dtype)
    a = teacher_sample(t, 64, proposal_temperature=1.5, seed=1, backend=backend)
    b = teacher_sample(t, 64, proposal_temperature=1.5, seed=1, backend="torch")
    same_rows = (a.ids.sort(-1).values == b.ids.sort(-1).values).all(-1)
    assert same_rows.float().mean().item() > 0.99
    pick = lambda x: type(x)(x.ids[same_rows], x.logprobs[same_rows],  # noqa: E731
                             x.tail_logmass[same_rows])
    _same_targets(pick(a), pick(b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,v,s", [(5, 37, 8), (3, 300, 13), (4, 5, 32), (2, 1, 3), (1, 70000, 64),
                                   (2, 20000, 2), (6, 4099, 1)])
def test_cuda_kernel_draws_the_reference_ids(dtype, n, v, s):
    """The CUDA sampling kernel against the reference on the same GPU: groups of 1/2/4/8 samples,
    S not a multiple of the group, and few long rows (the column-split path)."""
    require_backend("cuda", "cuda")
    g = torch.Generator(device="cuda").manual_seed(v + s)
    t = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    t[0, : min(v, 4)] = 2.0  # ties in the logits
    a = teacher_sample(t, s, temperature=1.3, proposal_temperature=1.7, seed=9, backend="torch")
    b = teacher_sample(t, s, temperature=1.3, proposal_temperature=1.7, seed=9, backend="cuda")
    _same_targets(a, b)
    assert torch.equal(a.ids, b.ids) and torch.isneginf(b.tail_logmass).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("v,s", [(37, 8), (1300, 13), (3, 16)])
def test_raw_draws_merged_on_the_host_equal_the_fused_op(dtype, v, s):
    """The CUDA path's pieces on the CPU: the teacher_sample_draws op (the kernel's raw ids) merged
    by reference_sparse.merge_sampled (merge_draws) equals the CPU kernel's fused op."""
    require_backend("cpu")
    from distill_ops.backends import native, reference_sparse

    t = _logits(6, v, seed=v, dtype=dtype)
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    inv_prop = torch.tensor(1 / (1.2 * 1.5), dtype=fp)
    delta = torch.tensor(1 / 1.2, dtype=fp) - inv_prop
    draws = native.sample_draws(t, s, inv_prop, rng.seed_key(3))
    assert draws.dtype == torch.int64 and draws.shape == (6, s)
    assert 0 <= draws.min() and draws.max() < v
    got = reference_sparse.merge_sampled(t, draws, delta)
    want = teacher_sample(t, s, temperature=1.2, proposal_temperature=1.5, seed=3, backend="cpu")
    assert torch.equal(got[0], want.ids) and torch.equal(got[2], want.tail_logmass)
    torch.testing.assert_close(got[1], want.logprobs, rtol=1e-6, atol=1e-7)


def test_raw_draws_op_refuses_bad_arguments():
    require_backend("cpu")
    op = torch.ops.distill_ops_native.teacher_sample_draws
    t = torch.randn(2, 10)
    for args, match in [((t, 0, 1.0, 1), "num_samples"), ((t, 4, 0.0, 1), "inv_prop"),
                        ((t, 4, float("nan"), 1), "inv_prop"), ((t, 4, 1.0, -1), "seed_key"),
                        ((t, 4, 1.0, 1 << 32), "seed_key"), ((t[:, :0], 4, 1.0, 1), "vocabulary"),
                        ((t.int(), 4, 1.0, 1), "float32"), ((t[0], 4, 1.0, 1), "2-D")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_pruned_race_draws_the_reference_ids(dtype):
    """Peaked rows (most columns more than kGumbelMax below the max: skipped by the CPU kernel's
    exact pruning), a row whose max is tied across chunks, a row of -inf but one column, a row of
    -inf only, and rows where nothing is pruned."""
    require_backend("cpu")
    t = _logits(8, 3000, seed=21, spread=12.0).to(torch.float64)
    t[1] = -30.0
    t[1, [5, 700, 2999]] = 4.0  # the max three times, in three chunks
    t[2] = -torch.inf
    t[2, 1234] = 0.0
    t[3] = -torch.inf
    t[4] = t[4] * 0.05  # nothing pruned
    t[5, 2000:] = -torch.inf
    t = t.to(dtype)
    for tp in (1.0, 3.0):
        a = teacher_sample(t, 24, temperature=0.8, proposal_temperature=tp, seed=6, backend="torch")
        b = teacher_sample(t, 24, temperature=0.8, proposal_temperature=tp, seed=6, backend="cpu")
        _same_targets(a, b)
        assert torch.equal(a.ids, b.ids)
    assert set(b.ids[1][b.ids[1] >= 0].tolist()) <= {5, 700, 2999}
    assert b.ids[2, 0] == 1234 and b.ids[3, 0] == 0


def test_noise_on_every_rank():
    """rng.noise_log on all 2^23 uniforms and on the logs they give (the two arguments the noise
    feeds it): within 0.82 ulp of the float64 log. The noise is nondecreasing in the rank (the
    losing_rank test relies on it) and below GUMBEL_MAX = rng.h kGumbelMax, and within 6e-7 of the
    exact -log(-log u) (losing_rank's error budget)."""
    u = rng.uniform_of_rank(torch.arange(1 << 23))
    inner = rng.noise_log(u)
    outer = rng.noise_log(-inner)
    for x, lx in ((u, inner), (-inner, outer)):
        exact = torch.log(x.double())
        ulp = (torch.nextafter(exact.float().abs(), torch.tensor(torch.inf)) - exact.float().abs()).double()
        assert ((lx.double() - exact).abs() / ulp).max() < 0.82
    g = rng.gumbel_of(u, torch.float32)
    assert torch.equal(g, -outer) and torch.equal(g, rng.gumbel_table("cpu"))
    assert (g.diff() >= 0).all()
    assert -2.82 < g.min().item() and g.max().item() < rng.GUMBEL_MAX
    assert (g.double() - -torch.log(-torch.log(u.double()))).abs().max() < 6e-7
    assert rng.gumbel_of(u[:5], torch.float64).dtype == torch.float64  # computed in float32, cast


def test_noise_log_does_not_depend_on_the_layout():
    """Bits fixed by the operations: contiguous, strided and single-element evaluations agree (a
    library log may take other code paths for a vector's body and its tail)."""
    x = torch.rand(4099, dtype=torch.float64).float() * 30 + 1e-7
    whole = rng.noise_log(x)
    assert torch.equal(whole[::3], rng.noise_log(x[::3].contiguous()))
    assert all(torch.equal(whole[i:i + 1], rng.noise_log(x[i:i + 1])) for i in range(0, 4099, 97))


def _noise(seed, row, num_samples, cols, dtype):
    """The reference's gumbel(s, j) of one row: (num_samples, len(cols))."""
    sk = rng.sample_keys(rng.row_keys(rng.seed_key(seed), torch.tensor([row])), torch.arange(num_samples))
    return rng.gumbel(sk.unsqueeze(-1), rng.vocab_keys(cols), dtype)[0]


def _near_tie_rows(dtype, num_samples, seed, n=16, v=1300, top=8.0):
    """Rows where sample 0's winner is decided by one ulp: column m holds the row max (the race's
    start), and an earlier column j (another chunk for the CPU kernel, another tile for Triton) is
    given the logit whose score ties m's exactly (even rows: j wins, the lower id) or falls one ulp
    short (odd rows: m wins). A skip test without enough slack drops j in the tie rows."""
    x = torch.full((n, v), top - 68.0, dtype=dtype)
    m = v - 300
    cols = torch.arange(v)
    want = []
    for r in range(n):
        x[r, m] = top
        g = _noise(seed, r, num_samples, cols, dtype)[0]
        target = x[r, m] + g[m]
        if r % 2:
            target = torch.nextafter(target, torch.tensor(-torch.inf, dtype=dtype))
        for j in torch.nonzero(g[: m - 600] > g[m] + 1.0)[r:, 0].tolist():  # x_j < x_m
            xj = target - g[j]
            while xj + g[j] < target:
                xj = torch.nextafter(xj, torch.tensor(torch.inf, dtype=dtype))
            while xj + g[j] > target:
                xj = torch.nextafter(xj, torch.tensor(-torch.inf, dtype=dtype))
            if xj + g[j] == target:  # else no logit rounds onto the target: try the next column
                break
        assert xj + g[j] == target and xj < x[r, m]
        x[r, j] = xj
        want.append(j if r % 2 == 0 else m)
    return x, torch.tensor(want)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_one_ulp_races_are_not_pruned(monkeypatch, backend, dtype, num_samples):
    """The kernels' exact pruning (rng::kGumbelMax, rng::losing_rank) keeps a column whose score
    ties the leader's, and the noise is the reference's to the bit (rng.noise_log): with a
    library log, about one race in ten of this kind goes the other way. The ids are the
    reference's, and sample 0's draw is the one the construction forces."""
    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    require_backend(backend, dev)
    monkeypatch.setattr(triton_topk, "BLOCK_OVERRIDE", 256)  # j and m in different Triton blocks
    x, want = _near_tie_rows(dtype, num_samples, seed=11)
    x = x.to(dev)
    a = teacher_sample(x, num_samples, seed=11, backend="torch")
    b = teacher_sample(x, num_samples, seed=11, backend=backend)
    _same_targets(a, b)
    assert torch.equal(a.ids, b.ids)
    for r in range(x.shape[0]):
        # sample 0's draw is in the targets, and no other sample can reach either column
        assert int(want[r]) in b.ids[r].tolist()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_one_ulp_races_at_large_logits_are_not_pruned(monkeypatch, backend):
    """The same near ties with the row max at 1e6, where a float32 score rounds at 0.06: the
    score a_j + g_j that ties the leader's is the rounded sum, up to half an ulp of the bound
    above the exact one, and the pruning bound (rng.h losing_rank) must leave that much room
    (its 4e-6 |bound| term). The ids are the reference's."""
    require_backend(backend)
    monkeypatch.setattr(triton_topk, "BLOCK_OVERRIDE", 256)
    x, want = _near_tie_rows(torch.float32, 1, seed=11, n=8, top=1e6)
    a = teacher_sample(x, 1, seed=11, backend="torch")
    b = teacher_sample(x, 1, seed=11, backend=backend)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.ids[:, 0].long(), want)


@pytest.mark.parametrize("s", [100, 200])
def test_triton_merges_many_samples_on_the_host(monkeypatch, s):
    """Past MERGE_IN_KERNEL_MAX_S the Triton kernel writes the raw draws and merge_sampled merges
    them (its samples x samples merge spilled from 256 samples on and took 24 minutes to compile
    at 1024): the same targets as the reference either way."""
    require_backend("triton")
    calls = []
    real = triton_topk.merge_sampled
    monkeypatch.setattr(triton_topk, "merge_sampled", lambda *a: calls.append(1) or real(*a))
    t = _logits(3, 40, seed=s, spread=1.0)
    a = teacher_sample(t, s, proposal_temperature=1.5, seed=9, backend="torch")
    b = teacher_sample(t, s, proposal_temperature=1.5, seed=9, backend="triton")
    _same_targets(a, b)
    assert torch.equal(a.ids, b.ids)
    assert len(calls) == (s > triton_topk.MERGE_IN_KERNEL_MAX_S)


def test_seeds_are_not_truncated_to_32_bits():
    """Seeds are taken modulo 2**63, not 2**32: seeds 5 and 5 + 2**32 draw different ids (the
    trainer's 63-bit per-micro-batch hashes must not collide on their low 32 bits)."""
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a, b = teacher_sample(x, 8, seed=5), teacher_sample(x, 8, seed=5 + 2 ** 32)
    assert not torch.equal(a.ids, b.ids)

"""teacher_topk against a float64 oracle: ids (value descending, ties to the lower id, as a stable
sort gives them), log-probabilities under the full-vocabulary softmax, and the tail mass (computed
from the complement, exactly); several blocks per row, ties, -inf logits, dtypes, leading dims."""

from __future__ import annotations

import pytest
import torch

from distill_ops.backends.triton import topk as triton_topk
from distill_ops.sparse import teacher_topk
from oracle import INTERPRETER_NOISE, backend_status, rel_err, require_backend

pytestmark = INTERPRETER_NOISE
BACKENDS = ["torch", "triton", "cpu"]


@pytest.fixture
def small_blocks(monkeypatch):
    """Several blocks per row even on small vocabularies (the merge path of the Triton kernel)."""
    monkeypatch.setattr(triton_topk, "BLOCK_OVERRIDE", 16)


def topk_oracle(t: torch.Tensor, k: int, temperature: float = 1.0):
    x = t.detach().cpu().double().reshape(-1, t.shape[-1])
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    logp = torch.log_softmax(x / temperature, -1)
    rest = logp.scatter(1, order, -torch.inf)
    lead = t.shape[:-1]
    return (order.reshape(*lead, k), logp.gather(1, order).reshape(*lead, k),
            torch.logsumexp(rest, -1).reshape(lead))


def check_topk(t, k, *, temperature=1.0, backend="torch", lp_tol=1e-6):
    out = teacher_topk(t, k, temperature=temperature, backend=backend)
    ids, lp, tail = topk_oracle(t, k, temperature)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float32
    assert out.tail_logmass.dtype == torch.float32
    assert out.ids.shape == ids.shape and out.tail_logmass.shape == tail.shape
    assert torch.equal(out.ids.long().cpu(), ids), (out.ids, ids)
    fin = torch.isfinite(lp)
    assert torch.equal(torch.isfinite(out.logprobs.cpu()), fin)
    assert rel_err(out.logprobs.cpu()[fin], lp[fin]) < lp_tol
    fin_t = torch.isfinite(tail)
    assert torch.equal(torch.isfinite(out.tail_logmass.cpu()), fin_t)
    # The tail is accumulated without cancellation: relative accuracy even when it is tiny.
    torch.testing.assert_close(out.tail_logmass.cpu().double()[fin_t], tail[fin_t], rtol=1e-5,
                               atol=1e-5)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,v,k,temperature", [(1, 1, 1, 1.0), (3, 5, 5, 0.6), (4, 37, 1, 2.5),
                                               (5, 100, 7, 1.0), (5, 100, 7, 0.6),
                                               (2, 300, 64, 2.5), (1, 257, 128, 0.6)])
def test_matches_oracle(backend, n, v, k, temperature):
    require_backend(backend)
    g = torch.Generator().manual_seed(n * 1000 + v + k)
    t = torch.randn(n, v, generator=g) * 4
    check_topk(t, k, temperature=temperature, backend=backend)


@pytest.mark.parametrize("k", [1, 5, 24])
def test_triton_multi_block_merge(small_blocks, k):
    """Blocks of 16 over V = 203: the running top-k is merged with many blocks, in increasing,
    decreasing and random order of the values."""
    require_backend("triton")
    g = torch.Generator().manual_seed(k)
    t = torch.randn(3, 203, generator=g) * 3
    t[1] = torch.linspace(-5, 5, 203)   # every block beats the running k-th value
    t[2] = torch.linspace(5, -5, 203)   # no block after the first does
    check_topk(t, k, backend="triton")


@pytest.mark.parametrize("n,v,k,temperature", [(3, 1500, 40, 0.6), (2, 2049, 700, 1.3),
                                               (2, 1030, 1030, 1.0), (4, 5000, 1, 0.8)])
def test_cpu_kernel_over_several_chunks(n, v, k, temperature):
    """The compiled CPU kernel streams 512-column chunks and cuts its candidate list at 2k: rows
    much longer than a chunk, k from 1 to V, and a maximum that moves late in the row."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(v + k)
    t = torch.randn(n, v, generator=g) * 4
    t[0, -3] = 30.0  # the max arrives in the last chunk: every earlier sum is rescaled
    check_topk(t, k, temperature=temperature, backend="cpu")
    ties = torch.randint(-2, 2, (n, v), generator=g).float()
    check_topk(ties, k, temperature=temperature, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [3, 40])
def test_rows_without_a_softmax_are_nan(backend, k, small_blocks):
    """A row with a +inf logit, or with every logit -inf, has no softmax: its log-probabilities
    and tail are NaN on every backend (the reference gave +inf rows -inf tails and -inf log
    probabilities beside the NaN), as the dense losses give such rows NaN. The ids still rank
    by value (+inf first)."""
    require_backend(backend)
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, 40, generator=g)
    t[0, 17] = torch.inf
    t[1] = -torch.inf
    out = teacher_topk(t, k, backend=backend)
    assert int(out.ids[0, 0]) == 17
    assert torch.isnan(out.logprobs[:2]).all() and torch.isnan(out.tail_logmass[:2]).all()
    assert torch.isfinite(out.logprobs[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_id(backend, small_blocks):
    require_backend(backend)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-3, 3, (4, 70), generator=g).float()  # 6 distinct values: many ties
    t[3] = 0.0
    t[3, 1::2] = -0.0  # equal to +0.0: a tie, not an order
    for k in (1, 9, 31):
        out = check_topk(t, k, backend=backend)
        assert torch.equal(out.ids[3].long(), torch.arange(k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits(backend, small_blocks):
    """-inf logits (masked vocabulary): selected only when k exceeds the finite ones, then with
    -inf log-probabilities, and never NaN; the tail is -inf when nothing finite is left out."""
    require_backend(backend)
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 40, generator=g)
    t[:, 10:] = -torch.inf
    out = check_topk(t, 12, backend=backend)
    assert torch.isneginf(out.logprobs[:, 10:]).all() and torch.isneginf(out.tail_logmass).all()
    out = check_topk(t, 4, backend=backend)
    assert torch.isfinite(out.tail_logmass).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    require_backend(backend)
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(4, 150, generator=g) * 3).to(dtype)  # bf16: many exact ties
    check_topk(t, 20, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_strides(backend):
    require_backend(backend)
    g = torch.Generator().manual_seed(6)
    t = (torch.randn(3, 2, 70, generator=g) * 2).transpose(0, 1)  # (2, 3, 70), not contiguous
    out = check_topk(t, 6, backend=backend)
    assert out.ids.shape == (2, 3, 6) and out.tail_logmass.shape == (2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_logits_keep_their_log_probabilities(backend, offset, small_blocks):
    """Logits far from 0 (softmax is shift-invariant): the log-probabilities are formed as
    (a - max) - log z, exact where a - logsumexp(a) rounds at the logits' scale (the torch and
    Triton backends were 4.8e-4 off at 1e4 in fp32, the kernels working in double 1e-7). At
    temperature 1, since at another one every backend rounds x / tau to fp32 first (a relative
    6e-8 of the logits, the input's own resolution)."""
    require_backend(backend)
    g = torch.Generator().manual_seed(11)
    t = torch.randn(4, 90, generator=g) * 3 + offset
    check_topk(t, 8, backend=backend)


def test_tiny_tail_is_accurate():
    """A peaked teacher: the mass outside the top-k is ~1e-12, far below float32's 1 - sum p
    resolution; its log is still right to a relative 1e-5."""
    require_backend("triton")
    t = torch.full((2, 64), -30.0)
    t[:, :4] = torch.tensor([3.0, 2.5, 2.0, 1.0])
    for backend in BACKENDS:
        if backend_status(backend)[0]:
            out = check_topk(t, 4, backend=backend)
            assert out.tail_logmass.max() < -20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,gap", [(torch.float32, 110.0), (torch.float32, 400.0),
                                       (torch.float64, 900.0)])
def test_tail_far_below_the_top(backend, dtype, gap, small_blocks):
    """A tail more than ~100 (float32) or ~745 (double) below the row max: summed as exponentials
    relative to that max it underflowed to 0 (tail -inf, and a sparse loss in tail mode of
    reverse KL infinite); it is summed again relative to its own max. The rows put the top-k
    early or late (several chunks and blocks), and row 2 ties its k-th best with a tail element
    of a higher id (a tie that stays out)."""
    require_backend(backend)
    n, v, k = 3, 1200, 2
    g = torch.Generator().manual_seed(int(gap))
    t = torch.randn(n, v, generator=g, dtype=torch.float64) - gap
    t[0, 5], t[0, 9] = 0.0, -0.5
    t[1, 1100], t[1, 3] = 0.0, -1.0
    t[2, 40], t[2, 700], t[2, 900] = 0.0, -gap + 20, -gap + 20   # 700 in, 900 tail
    out = check_topk(t.to(dtype), k, temperature=0.7, backend=backend)
    assert out.ids[2].tolist() == [40, 700]
    assert bool(torch.isfinite(out.tail_logmass).all()), out.tail_logmass


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    require_backend(backend)
    t = torch.randn(2, 10)
    with pytest.raises(ValueError, match="k must be <= the vocabulary size"):
        teacher_topk(t, 11, backend=backend)
    with pytest.raises(ValueError, match="k must be >= 1"):
        teacher_topk(t, 0, backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        teacher_topk(t, 2.0, backend=backend)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        teacher_topk(t, 2, temperature=0.0, backend=backend)
    with pytest.raises(TypeError, match="teacher_logits must be float"):
        teacher_topk(t.long(), 2, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        teacher_topk(t, 2, backend="gpu")


def test_cuda_backend_refused_on_cpu_tensors():
    with pytest.raises(RuntimeError, match="cannot run here|no sparse-target kernels"):
        teacher_topk(torch.randn(2, 10), 2, backend="cuda")


# ---------------------------------------------------------------------------------------------
# the CUDA kernel (radix select; csrc/cuda/teacher_cuda.cu), on a GPU only


@pytest.fixture(params=["auto", "radix"])
def cuda_topk_kernel(request, monkeypatch):
    """Both CUDA top-k kernels: the one-read kernel where it takes the call (auto), and the radix
    select (csrc/cuda/teacher_cuda.cu; DISTILL_OPS_CUDA_TOPK=radix)."""
    if request.param == "radix":
        monkeypatch.setenv("DISTILL_OPS_CUDA_TOPK", "radix")
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,v,k,temperature", [(1, 1, 1, 1.0), (3, 7, 3, 0.6), (5, 1000, 64, 1.0),
                                               (2, 1000, 1000, 2.5), (3, 4099, 1000, 0.8),
                                               (4, 128256, 64, 1.5), (2, 151936, 3, 1.0),
                                               (3, 20000, 2048, 1.0)])
def test_cuda_kernel_matches_oracle(dtype, n, v, k, temperature, cuda_topk_kernel):
    require_backend("cuda", "cuda")
    g = torch.Generator(device="cuda").manual_seed(v + k)
    t = (torch.randn(n, v, device="cuda", generator=g) * 4).to(dtype)
    t[0, -1] = 40.0  # the max at the end of the row
    check_topk(t, k, temperature=temperature, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 9, 31, 700])
def test_cuda_kernel_ties_nan_inf(k, cuda_topk_kernel):
    """Integer logits (ties everywhere, across radix digits and tiles), -0.0 against +0.0, NaN
    (ranks as +inf) and -inf, with k across a tile boundary."""
    require_backend("cuda", "cuda")
    g = torch.Generator(device="cuda").manual_seed(k)
    t = torch.randint(-3, 3, (4, 1500), device="cuda", generator=g).float()
    t[1] = 0.0
    t[1, 1::2] = -0.0
    t[2, 5:900:7] = -torch.inf
    out = check_topk(t, k, backend="cuda")
    assert torch.equal(out.ids[1].long().cpu(), torch.arange(k))
    t[3, 10] = torch.nan
    out = teacher_topk(t, k, backend="cuda")
    ref = teacher_topk(t.cpu(), k, backend="cpu")
    assert torch.equal(out.ids.cpu(), ref.ids)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["ascending", "constant"])
def test_cuda_filter_kernel_compactions(shape):
    """Rows that make the one-read kernel compact its candidate buffer every tile (ascending) or
    admit nothing after the first compaction (constant: the lowest ids win)."""
    require_backend("cuda", "cuda")
    v = 50000
    t = torch.linspace(-30, 30, v, device="cuda") if shape == "ascending" else \
        torch.full((v,), 2.0, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        check_topk(t.repeat(3, 1).to(dtype), 64, temperature=0.9, backend="cuda",
                   lp_tol=1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,gap", [(torch.float32, 60.0), (torch.float32, 300.0),
                                       (torch.bfloat16, 300.0), (torch.float64, 900.0)])
def test_cuda_kernel_tiny_tail(dtype, gap, cuda_topk_kernel):
    """log(4999) - gap, not -inf and not 0; past ~100 (fp32) the streamed tail underflows and is
    summed again (tail_refit.h)."""
    require_backend("cuda", "cuda")
    t = torch.full((2, 5000), -gap, device="cuda", dtype=torch.float64)
    t[:, 7] = 0.0
    t[1] += torch.rand(5000, device="cuda", dtype=torch.float64)
    out = check_topk(t.to(dtype), 1, backend="cuda")
    assert float(out.tail_logmass[0]) < 10.0 - gap


@pytest.mark.cuda
def test_auto_does_not_pick_the_cuda_kernel(monkeypatch):
    from distill_ops.ops.sparse import resolve

    monkeypatch.delenv("DISTILL_OPS_BACKEND", raising=False)
    assert resolve("auto", torch.device("cuda")) != "cuda"


def test_auto_backend_on_cpu(monkeypatch):
    """auto: the compiled CPU kernels where the extension loads, else the reference."""
    from distill_ops import backends
    from distill_ops.ops.sparse import resolve

    monkeypatch.delenv("DISTILL_OPS_BACKEND", raising=False)
    want = "cpu" if backends.native_status("cpu")[0] else "torch"
    assert resolve("auto", torch.device("cpu")) == want
    t = torch.randn(3, 50)
    a = teacher_topk(t, 5)
    b = teacher_topk(t, 5, backend="torch")
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(k, dtype):
    """N=512, V=128256 on CUDA: Triton against the reference on the same tensors."""
    require_backend("triton", "cuda")
    g = torch.Generator(device="cuda").manual_seed(k)
    t = (torch.randn(512, 128256, device="cuda", generator=g) * 4).to(dtype)
    a = teacher_topk(t, k, temperature=1.5, backend="triton")
    b = teacher_topk(t, k, temperature=1.5, backend="torch")
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.tail_logmass, b.tail_logmass, rtol=1e-5, atol=1e-5)
    check_topk(t[:8].float(), k, temperature=1.5, backend="triton")

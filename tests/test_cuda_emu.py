"""csrc/cuda's kernels on the CPU emulator (tests/cuda_emu) against the float64 oracles, on the
paths only a GPU takes: the dense split-row kernels and the resident (cluster) kernel, the
sampling kernel's column splits and its sample groups, the sparse kernel's slot loop wider than
the block, the top-k kernel's tiles, the in-place gradients under three thread orders. (`make test` also reruns every backend="cpu" test
of the kernel files on the emulated CUDA kernels: DISTILL_OPS_CUDA_EMU=1.)

A thread order changes what a racing read sees (runtime.h); the in-place tests run each order and
ask for the bits of the out-of-place result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda_emu import build
from distill_ops import sparse_kd_loss, teacher_sample, teacher_topk
from distill_ops.backends import native
from distill_ops.backends.base import (FORWARD_KL, JSD, REVERSE_KL, SKEW_FORWARD_KL,
                                       SKEW_REVERSE_KL)
from sparse_oracle import check_sparse, make_student, make_targets
from test_native import check, labels_for, logits, opts
from test_sparse_sample import _same_targets
from test_topk import check_topk

DIVS = (FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL)
SPARSE_DIVS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
ORDERS = ("shuffle", "forward", "reverse")


@pytest.fixture(autouse=True)
def emu(monkeypatch):
    """backend="cpu" (and native.*) on the emulated CUDA kernels, for this test."""
    ok, why = native.available("cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.setattr(native, "OPS", build.load())
    monkeypatch.setattr(native, "SAMPLE_MERGED_IN_KERNEL", ())
    return native.OPS


def _dtype_id(d):
    return str(d).split(".")[-1]


# ------------------------------------------------------------------------------ the harness


@pytest.mark.parametrize("case,error", [
    (0, "deadlock: threads 0-15 wait at __syncthreads, 16-31 at a warp op, 32-63 exited"),
    (1, "after some of its lanes exited"),
    (2, r"__syncthreads waited for threads that exited \(threads 32-63\)"),
    (5, "invalid block size"),
    (6, r"invalid grid \(1, 70000, 1\)"),
    (9, "cluster.sync waited for a block of the cluster that exited"),
    (10, "map_shared_rank to rank 1, a block that exited"),
])
def test_emulator_reports_what_a_gpu_would_hang_on(case, error):
    """The emulator is a checker too (tests/cuda_emu/selftest.cu): a barrier some threads skip, a
    warp op or barrier after threads exited, a launch outside the limits, a read of the shared
    memory of a cluster block that exited are errors."""
    with pytest.raises(RuntimeError, match=error):
        native.OPS.selftest(case)


def test_emulator_warp_ops_are_exact():
    out = build.load().selftest(4)
    assert out[0] == sum(l * l for l in range(32))  # shfl_down tree: lane 0 holds the sum
    assert out[1] == torch.tensor(0xAAAAAAAA, dtype=torch.int64).to(torch.int32)  # ballot
    assert out[2] == 64  # atomicAdd by every thread
    assert out[3] == 15  # shfl from lane 5 (value lane * 3)
    assert (out[4:] == sum(range(32))).all()  # xor butterfly: every lane holds the sum


def test_emulator_cluster_shares_memory():
    """Thread-block clusters: the blocks of a cluster each have their own shared memory, reach each
    other's through map_shared_rank after cluster.sync, and find shared memory unzeroed."""
    out = build.load().selftest(8)
    assert out[:4].tolist() == [6, 6, 6, 6]
    assert out[4:8].tolist() == [0xA5A5A5A5 - (1 << 32)] * 4


def test_emulator_asan_reports_a_write_past_the_end():
    """The AddressSanitizer build (DISTILL_OPS_EMU_ASAN=1, libasan preloaded) stops a kernel that
    writes outside its tensor and names the place: the memcheck `make test` runs the emulated
    kernel tests under."""
    env = build.asan_env()
    if env is None:
        pytest.skip("no libasan (gcc -print-file-name=libasan.so)")
    code = ("import sys; sys.path.insert(0, 'tests'); from cuda_emu import build; "
            "build.load().selftest(7); print('no report')")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=900)
    assert "heap-buffer-overflow" in run.stderr and "write_past_the_end" in run.stderr, \
        run.stderr[-3000:]
    assert "no report" not in run.stdout


def test_emulator_load_survives_a_killed_build():
    """A build killed mid-way leaves torch's lock file in the build folder, and torch's loader
    (2.11 at least: `make test-twin`) waits on it forever. load() takes its own lock, which dies
    with its holder, and clears torch's."""
    (build.BUILD / "lock").touch()   # what a killed build leaves (the fixture built already)
    code = "import sys; sys.path.insert(0, 'tests'); from cuda_emu import build; build.load()"
    root = Path(__file__).resolve().parents[1]
    # the same build as this process (plain, or AddressSanitizer's with its preloads): no compiling
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("order,seen", [("forward", 1), ("reverse", 0)])
def test_emulator_thread_order_decides_a_race(monkeypatch, order, seen):
    """A read racing a write in the same phase sees it or not depending on DISTILL_OPS_EMU_ORDER:
    that is how the in-place tests below catch missing barriers."""
    monkeypatch.setenv("DISTILL_OPS_EMU_ORDER", order)
    assert build.load().selftest(3)[0] == seen


# ------------------------------------------------------------------------------ dense


@pytest.mark.parametrize("splits", ["2", "7", "64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("div", DIVS)
def test_dense_forced_splits(monkeypatch, splits, dtype, div):
    """DISTILL_OPS_CUDA_SPLITS blocks per row (the split-row kernels and their finalize): the
    oracle's result, and the same bits in place."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_SPLITS", splits)
    s, t = logits(3, 5011, seed=14, dtype=dtype)
    labels = labels_for(3, 5011, seed=14)
    kw = opts(divergence=div, temperature=0.7, soft_coef=0.49, hard_coef=0.5, softcap=20.0)
    loss, g = check(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    loss2 = native.dense_forward(buf, t, labels, grad=buf, grad_scale=torch.tensor(0.5), **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, buf)


@pytest.mark.parametrize("splits", ["3", "7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("div", [FORWARD_KL, REVERSE_KL, JSD])
def test_dense_forced_splits_aligned_rows(monkeypatch, splits, dtype, div):
    """The split-row kernels on 16-byte aligned rows (V = 5000: their vector loads and stores;
    the other split tests' rows are not aligned and take the scalar ones): each split's columns
    start on a vector boundary (the emulator fails a misaligned vector load, as a GPU does). The
    oracle's result, and the same bits in place."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_SPLITS", splits)
    s, t = logits(3, 5000, seed=45, dtype=dtype)
    labels = torch.tensor([4999, -100, 17])
    kw = opts(divergence=div, temperature=0.7, hard_coef=0.5)
    loss, g = check(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    loss2 = native.dense_forward(buf, t, labels, grad=buf, grad_scale=torch.tensor(0.5), **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, buf)


@pytest.mark.parametrize("div", DIVS)
def test_dense_auto_split_path(monkeypatch, div):
    """Few rows of a long vocabulary split on their own (4 emulated SMs: N = 3 < 8 rows, V >= 16384:
    4 blocks per row of 256 threads)."""
    monkeypatch.delenv("DISTILL_OPS_CUDA_SPLITS", raising=False)
    s, t = logits(3, 16411, seed=15, dtype=torch.bfloat16)
    labels = labels_for(3, 16411, seed=15)
    check(s, t, labels, grad_scale=0.1,
          **opts(divergence=div, temperature=2.0, soft_coef=4.0, hard_coef=0.5))


@pytest.mark.parametrize("v", [1, 3, 7, 8, 9, 63, 1025])
def test_dense_vector_tails(v):
    """V not a multiple of the vector width: the 16-byte body plus the scalar tail."""
    s, t = logits(7, v, seed=v, dtype=torch.bfloat16)
    check(s, t, **opts(divergence=JSD, temperature=1.0))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("div", DIVS)
def test_dense_inplace_any_thread_order(monkeypatch, order, div):
    """In place, with labels (a logit read by one thread for the loss): the out-of-place bits."""
    monkeypatch.setenv("DISTILL_OPS_EMU_ORDER", order)
    s, t = logits(4, 4500, seed=16)
    assert_inplace_bits(s, t, labels_for(4, 4500, seed=16),
                        **opts(divergence=div, temperature=1.3, hard_coef=0.5))


def assert_inplace_bits(s, t, labels, **kw):
    """The loss and gradient written over the student logits are those of a separate buffer."""
    g = torch.empty_like(s)
    a = native.dense_forward(s, t, labels, grad=g, grad_scale=None, **kw)
    buf = s.clone()
    b = native.dense_forward(buf, t, labels, grad=buf, grad_scale=None, **kw)
    assert torch.equal(a, b) and torch.equal(g, buf)


# The resident kernel (csrc/cuda/dense_resident.cuh) holds 4 vectors of a row per thread: 4096
# float32 or 8192 16-bit columns a block of 256 threads, twice that with 512 (rows over 16 blocks
# of 256).
RESIDENT_V = {torch.float32: (7, 4096, 20001), torch.bfloat16: (1000, 8192, 40001),
              torch.float16: (16385,)}


@pytest.mark.parametrize("dtype,v", [(d, v) for d, vs in RESIDENT_V.items() for v in vs],
                         ids=lambda x: _dtype_id(x) if isinstance(x, torch.dtype) else str(x))
@pytest.mark.parametrize("div", DIVS)
def test_dense_resident(monkeypatch, dtype, v, div):
    """DISTILL_OPS_CUDA_RESIDENT=require: rows held in registers by a cluster of 1-5 blocks (a row
    shorter than one block's vectors, exactly one block, a partial last vector): the oracle's
    result, ignored rows included, and the same bits in place."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    s, t = logits(3, v, seed=v, dtype=dtype)
    labels = labels_for(3, v, seed=v)
    kw = opts(divergence=div, temperature=0.7, soft_coef=0.49, hard_coef=0.5, softcap=20.0)
    loss, g = check(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    loss2 = native.dense_forward(buf, t, labels, grad=buf, grad_scale=torch.tensor(0.5), **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, buf)


@pytest.mark.parametrize("div", [FORWARD_KL, JSD])
def test_dense_resident_non_portable_cluster(monkeypatch, div):
    """Ten blocks of 512 threads a row (18 of 256 would pass 16; over 8 is the non-portable cluster
    size), no labels, no gradient for one call (the loss-only pass), float32 rows whose stride is
    not 16-byte aligned (scalar loads)."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    v = 9 * 8192 + 5
    s, t = logits(2, v, seed=21)
    check(s, t, **opts(divergence=div, temperature=1.5))
    wide_s, wide_t = logits(2, v + 1, seed=22)
    check(wide_s[:, :v], wide_t[:, :v], **opts(divergence=div))
    loss = native.dense_forward(s, t, None, grad=None, grad_scale=None, **opts(divergence=div))
    ref, _ = check(s, t, **opts(divergence=div))
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("div", DIVS)
def test_dense_resident_inplace_any_thread_order(monkeypatch, order, div):
    """In place, five blocks a row, any thread and block order: the out-of-place bits."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    monkeypatch.setenv("DISTILL_OPS_EMU_ORDER", order)
    s, t = logits(3, 40001, seed=23, dtype=torch.bfloat16)
    assert_inplace_bits(s, t, labels_for(3, 40001, seed=23),
                        **opts(divergence=div, temperature=1.3, hard_coef=0.5))


@pytest.mark.parametrize("path", ["resident", "split"])
@pytest.mark.parametrize("div", DIVS)
def test_dense_kernels_loop_over_more_rows_than_the_grid(monkeypatch, path, div):
    """A grid of at most 2 rows along y (DISTILL_OPS_EMU_MAX_GRID_Y): the resident and the split
    kernels loop over 7 rows, reusing their cluster slots and block scratch from row to row,
    ignored rows between; the oracle's result, and the same bits in place."""
    monkeypatch.setenv("DISTILL_OPS_EMU_MAX_GRID_Y", "2")
    if path == "resident":
        monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    else:
        monkeypatch.setenv("DISTILL_OPS_CUDA_SPLITS", "3")
    v = 20001
    s, t = logits(7, v, seed=31, dtype=torch.bfloat16)
    labels = labels_for(7, v, seed=31)
    labels[1] = labels[4] = -100
    kw = opts(divergence=div, temperature=0.9, hard_coef=0.5)
    check(s, t, labels, **kw)
    assert_inplace_bits(s, t, labels, **kw)


def test_sanitize_resident_family_runs_the_resident_kernel(monkeypatch):
    """bench/sanitize_ops' dense-resident family (compute-sanitizer's run of the kernel) requires
    it on the shapes its resident_applies names: none of them is refused."""
    from bench import sanitize_ops

    monkeypatch.setattr(sanitize_ops, "DEV", "cpu")
    monkeypatch.setattr(sanitize_ops, "BACKEND", "cpu")
    sanitize_ops._dense_resident([(1, 1), (3, 7), (2, 131073)], [torch.float32, torch.bfloat16])


@pytest.mark.parametrize("case,env,error", [
    ("f64", {}, "float64 rows"),
    ("wide", {}, "wider than 16 blocks"),
    ("sm80", {"DISTILL_OPS_EMU_CC_MAJOR": "8"}, "no thread-block clusters"),
    # a build for sm_80 only on an sm_90 device: the driver compiled its PTX (the __trap() stub)
    ("ptx80", {"DISTILL_OPS_EMU_PTX_VERSION": "80"}, "no sm_90 code"),
    ("bad", {"DISTILL_OPS_CUDA_RESIDENT": "yes"}, "must be 0, 1 or require, got yes"),
])
def test_dense_resident_refusals(monkeypatch, case, env, error):
    """Where the resident kernel does not apply, "require" names the reason; "1" quietly runs the
    row and split kernels instead (the oracle's result)."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    dtype = torch.float64 if case == "f64" else torch.float32
    s, t = logits(2, 16 * 8192 + 1 if case == "wide" else 100, seed=24, dtype=dtype)
    with pytest.raises(RuntimeError, match=error):
        native.dense_forward(s, t, None, grad=None, grad_scale=None, **opts())
    if case != "bad":
        monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "1")
        check(s, t, **opts())


# ------------------------------------------------------------------------------ sparse


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("divergence", SPARSE_DIVS)
def test_sparse_slots_wider_than_the_block(dtype, divergence):
    """k = 700 slots over 128 threads (each thread several slots), padding, an empty row, the
    hard-label term; both tail modes."""
    ids, lp, tail = make_targets(3, 3000, 700, seed=len(divergence))
    s = make_student(3, 3000, seed=3, dtype=dtype)
    labels = torch.tensor([5, 17, -100])
    for mode in ("renorm", "tail"):
        check_sparse(s, ids, lp, tail=mode, tail_logmass=tail if mode == "tail" else None,
                     divergence=divergence, temperature=1.7, labels=labels, hard_weight=0.3,
                     backend="cpu")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_sparse_inplace_any_thread_order(monkeypatch, order, divergence):
    """The in-place gradient (the logits read at the slots and at the label, then overwritten)
    gives the out-of-place bits whatever order the threads run in."""
    monkeypatch.setenv("DISTILL_OPS_EMU_ORDER", order)
    ids, lp, _ = make_targets(4, 17000, 40, seed=7)  # 512 threads per row
    s = make_student(4, 17000, seed=7)
    labels = torch.tensor([int(ids[0, 0]), 9, -100, 16999])
    kw = dict(divergence=divergence, temperature=1.4, labels=labels, hard_weight=0.5,
              reduction="sum", backend="cpu")
    x = s.clone().requires_grad_(True)
    sparse_kd_loss(x, ids, lp, **kw).backward()
    y = s.clone().requires_grad_(True)
    sparse_kd_loss(y, ids, lp, inplace_grad=True, **kw).backward()
    assert torch.equal(x.grad, y.grad)


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("dtype", DTYPES + (torch.float16,), ids=_dtype_id)
@pytest.mark.parametrize("n,v,k", [(3, 1000, 300), (2, 257, 257), (4, 5000, 1), (1, 9, 4)])
def test_topk_tiles(dtype, n, v, k):
    """k beyond one tile of 256 threads, k = V, k = 1; the radix passes of every key width (2 for
    bf16, 3 for fp16, 4 for fp32, 8 for fp64)."""
    g = torch.Generator().manual_seed(n * v + k)
    t = (torch.randn(n, v, generator=g) * 4).to(dtype)
    check_topk(t, k, temperature=1.3, backend="cpu",
               lp_tol=1e-6 if dtype != torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("k", [1, 5, 255, 256, 600])
def test_topk_ties_cross_tiles(dtype, k):
    """Ties at the k-th value spread over several tiles and warps: the lowest ids win; -0 ties
    with +0. At the top of rows 0 and 2, values one ulp of the dtype apart (positive, negative):
    the larger wins, not the lower id."""
    g = torch.Generator().manual_seed(k)
    t = torch.randint(-3, 3, (3, 1500), generator=g).to(dtype)
    t[1, ::7] = float("-inf")
    t[1, 3::11] = -0.0
    t[2] -= 10
    for row, value in ((0, 2.5), (2, -3.25)):
        near = torch.tensor(value, dtype=dtype)
        up = torch.nextafter(near.float(), torch.tensor(9.0)) if dtype == torch.float32 \
            else near.float() + torch.finfo(dtype).eps * abs(value)
        t[row, 100:105] = near
        t[row, 1300:1305] = up.to(dtype)
        assert (t[row, 1300] > t[row, 100]).item()
    check_topk(t, k, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("k", [1, 64, 1000])
@pytest.mark.parametrize("shape", ["ascending", "descending", "constant", "random", "masked"])
def test_topk_filter_compactions(dtype, k, shape):
    """The one-read kernel (topk_filter.cuh) over rows of 20000: the candidate buffer (4096 words)
    fills and compacts. Ascending, every element enters and it compacts every few tiles; descending
    and constant, nothing enters after the first compaction (constant: the lowest ids win the
    tie); random with the max planted in the last vector; masked, a -inf prefix longer than the
    buffer, so the first compaction keeps -inf words and the threshold has to rise past them."""
    v = 20000
    g = torch.Generator().manual_seed(k)
    if shape == "ascending":
        t = torch.linspace(-30, 30, v).repeat(2, 1)
    elif shape == "descending":
        t = torch.linspace(30, -30, v).repeat(2, 1)
    elif shape == "constant":
        t = torch.full((2, v), 1.5)
    else:
        t = torch.randn(2, v, generator=g) * 3
        t[0, -1] = 20.0
        if shape == "masked":
            t[:, :6000] = float("-inf")
    t = t.to(dtype)
    check_topk(t, k, temperature=0.7, backend="cpu",
               lp_tol=1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_topk_filter_unaligned_and_ragged(dtype):
    """Rows that are not 16-byte aligned (a view one column in) take the scalar tiles; a vector
    width that does not divide V (1001) leaves a ragged last tile."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(3, 1002, generator=g) * 4).to(dtype)
    check_topk(base[:, 1:], 40, backend="cpu", lp_tol=1e-5)
    check_topk(base[:, :1001].contiguous(), 300, backend="cpu", lp_tol=1e-5)


def test_topk_radix_kernel_where_the_filter_does_not_take_the_call(monkeypatch):
    """k above filter_max_k (2048 for bf16) and DISTILL_OPS_CUDA_TOPK=radix take the radix kernel
    and its host sort; =filter insists on the one-read kernel and refuses what it cannot take; any
    other value is refused by name."""
    g = torch.Generator().manual_seed(9)
    t = (torch.randn(2, 2500, generator=g) * 4).to(torch.bfloat16)
    check_topk(t, 2100, backend="cpu", lp_tol=1e-5)
    monkeypatch.setenv("DISTILL_OPS_CUDA_TOPK", "radix")
    check_topk(t, 7, backend="cpu", lp_tol=1e-5)
    monkeypatch.setenv("DISTILL_OPS_CUDA_TOPK", "filter")
    check_topk(t, 7, backend="cpu", lp_tol=1e-5)
    with pytest.raises(RuntimeError, match="DISTILL_OPS_CUDA_TOPK=filter"):
        teacher_topk(t, 2100, backend="cpu")
    with pytest.raises(RuntimeError, match="DISTILL_OPS_CUDA_TOPK=filter"):
        teacher_topk(t.double(), 3, backend="cpu")
    monkeypatch.setenv("DISTILL_OPS_CUDA_TOPK", "fast")
    with pytest.raises(RuntimeError, match="DISTILL_OPS_CUDA_TOPK must be"):
        teacher_topk(t, 3, backend="cpu")


# ------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("s", [1, 2, 3, 8, 17])
def test_sample_column_splits_and_groups(dtype, s):
    """V = 9000 over few rows: the columns split across blocks and merge (merge_splits_kernel);
    S = 1, 2, 3, 8, 17 takes the group sizes 1, 2, 4, 8 and an idle tail in the last group."""
    g = torch.Generator().manual_seed(s)
    t = (torch.randn(2, 9000, generator=g) * 2).to(dtype)
    a = teacher_sample(t, s, temperature=1.2, proposal_temperature=1.5, seed=3, backend="torch")
    b = teacher_sample(t, s, temperature=1.2, proposal_temperature=1.5, seed=3, backend="cpu")
    _same_targets(a, b)
    assert torch.equal(a.ids, b.ids)


def test_sample_rows_of_minus_inf_inf_and_nan():
    """A row of -inf draws id 0, +inf logits tie (the lowest id wins), NaN never wins, a column
    split of only -inf (row 4's second half) skips its races and loses: the raw draws of the CPU
    kernel (the API refuses NaN before any kernel)."""
    t = torch.randn(5, 9000)
    t[0] = float("-inf")
    t[1, 100:] = float("nan")
    t[2, 7000:7005] = float("inf")
    t[3, ::3] = float("nan")
    t[4, 4000:] = float("-inf")
    inv_prop = torch.tensor(1 / 1.3).item()
    a = torch.ops.distill_ops_native.teacher_sample_draws(t, 11, inv_prop, 77)
    b = native.OPS.teacher_sample_draws(t, 11, inv_prop, 77)
    assert torch.equal(a, b)
    assert (b[0] == 0).all() and (b[1] < 100).all() and (b[2] == 7000).all()
    assert (b[3] % 3 != 0).all() and (b[4] < 4000).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("div", [FORWARD_KL, JSD])
def test_dense_resident_aligned_rows_with_a_partial_last_vector(monkeypatch, dtype, div):
    """Rows whose stride is 16-byte aligned but whose V is not a whole number of vectors (views
    into wider buffers, and a single row): the resident kernel takes its vector path and the last,
    partial vector of each row is loaded and stored element by element. The oracle's result, the
    same bits in place, and the buffers' columns past V untouched (a whole-vector store there
    would write into them)."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    v = 2 * 256 * 4 * vec + 3  # two blocks of 256 threads and 3 columns: a third block's vector
    width = v + vec - 3        # row stride a multiple of the vector width
    s_full, t_full = logits(2, width, seed=41, dtype=dtype)
    s, t = s_full[:, :v], t_full[:, :v]
    labels = torch.tensor([v - 1, 5])
    kw = opts(divergence=div, temperature=0.8, hard_coef=0.5)
    for rows in (slice(0, 2), slice(0, 1)):
        gbuf = torch.full((2, width), 7.0, dtype=dtype)[rows]
        loss = native.dense_forward(s[rows], t[rows], labels[rows], grad=gbuf[:, :v],
                                    grad_scale=None, **kw)
        loss_c, g_c = check(s[rows], t[rows], labels[rows], **kw)  # the oracle's, to rounding
        assert torch.equal(loss, loss_c) and torch.equal(gbuf[:, :v], g_c)
        assert (gbuf[:, v:] == 7.0).all(), gbuf[:, v:]
        buf = s_full[rows].clone()
        loss2 = native.dense_forward(buf[:, :v], t[rows], labels[rows], grad=buf[:, :v],
                                     grad_scale=None, **kw)
        assert torch.equal(loss, loss2) and torch.equal(buf[:, :v], gbuf[:, :v])
        assert torch.equal(buf[:, v:], s_full[rows, v:])


@pytest.mark.parametrize("k", [1, 64])
def test_topk_filter_threshold_lets_one_ulp_above_in(k):
    """After the first compaction (the buffer full after 4096 float32 elements) the threshold is
    the k-th best key so far; a later element one ulp above it (positive row, negative row) beats
    the k-th and must enter the buffer: it is among the top k, the old k-th is not."""
    g = torch.Generator().manual_seed(43)
    t = torch.full((2, 20000), -30.0)
    t[:, :4096] = torch.randn(2, 4096, generator=g) * 3
    t[1, :4096] -= 20.0
    for row in range(2):
        kth = t[row, :4096].topk(k).values[-1]
        t[row, 10000] = torch.nextafter(kth, torch.tensor(float("inf")))
    out = check_topk(t, k, backend="cpu")
    assert (out.ids[:, :k] == 10000).any(dim=1).all()


def test_sample_last_column_split_stays_in_its_row():
    """V = 9001 over two column splits of 4501: the last split ends at V, one column short of a
    whole slice; the next row starts with a logit far above the rest, which a read past the row
    would draw (an id V). The raw draws of the CPU kernel, all inside the row."""
    g = torch.Generator().manual_seed(44)
    t = torch.randn(3, 9001, generator=g)
    t[1:, 0] = 1e4
    inv_prop = torch.tensor(1 / 1.3).item()
    a = torch.ops.distill_ops_native.teacher_sample_draws(t, 5, inv_prop, 78)
    b = native.OPS.teacher_sample_draws(t, 5, inv_prop, 78)
    assert torch.equal(a, b)
    assert (b[0] < 9001).all() and (b[1:] == 0).all()

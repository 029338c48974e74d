"""The compiled extension (csrc/) against the float64 oracle, through the backend contract
(backends/base.py): torch.ops.distill_ops_native.dense_forward on CPU and, marked ``cuda``, on GPU.

The oracle is reference.row_losses on float64 copies of the (already rounded) inputs, differentiated
by torch.autograd: no hand-derived gradient is trusted.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from distill_ops.backends import native, reference
from distill_ops.backends.base import (FORWARD_KL, JSD, REVERSE_KL, SKEW_FORWARD_KL,
                                       SKEW_REVERSE_KL)

DIVS = (FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL)
MIXTURES = (JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))
SPLITS_ENV = "DISTILL_OPS_CUDA_SPLITS"


@pytest.fixture(autouse=True)
def _need_extension(request):
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    ok, why = native.available(device)
    if not ok:
        pytest.skip(why)


def tol(dtype, div, what):
    if dtype in (torch.bfloat16, torch.float16):
        return 1e-2
    if dtype == torch.float64:
        return 1e-10
    return 1e-4 if (what == "grad" and div in MIXTURES) else 1e-5


def rel(out, ref, zero=1e-9):
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    d = torch.linalg.vector_norm(out - ref).item()
    n = torch.linalg.vector_norm(ref).item()
    return d / n if n > zero else d


def logits(n, v, *, seed, dtype=torch.float32, device="cpu", spread=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def labels_for(n, v, *, seed, device="cpu", ignore_index=-100):
    g = torch.Generator().manual_seed(seed + 1)
    lab = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < 0.3
    drop[0] = False
    if n > 1:
        drop[-1] = True
    lab[drop] = ignore_index
    return lab.to(device)


def opts(**kw):
    base = dict(divergence=FORWARD_KL, mix=0.3, temperature=1.0, softcap=0.0, soft_coef=1.0,
                hard_coef=0.0, ignore_index=-100)
    base.update(kw)
    return base


def oracle(s, t, labels, grad_scale=None, **kw):
    """float64 (per-row loss, d sum(loss) / d student * grad_scale)."""
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    t64 = t.detach().to(torch.float64)
    with torch.enable_grad():
        rows = reference.row_losses(s64, t64, labels, **kw)
        (g,) = torch.autograd.grad(rows.sum(), s64, allow_unused=True)
    if g is None:
        g = torch.zeros_like(s64)
    if grad_scale is not None:  # the op takes it as a float32 tensor
        g = g * torch.tensor(grad_scale, dtype=torch.float32).item()
    return rows.detach(), g.detach()


def run(s, t, labels, *, grad=True, grad_scale=None, **kw):
    """(loss, grad) from the compiled op; grad written into a fresh tensor."""
    g = torch.empty_like(s) if grad else None
    gs = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32,
                                                      device=s.device)
    loss = native.dense_forward(s, t, labels, grad=g, grad_scale=gs, **kw)
    return loss, g


def check(s, t, labels=None, *, grad_scale=None, loss_tol=None, grad_tol=None, **kw):
    loss, g = run(s, t, labels, grad_scale=grad_scale, **kw)
    ref_loss, ref_g = oracle(s, t, None if labels is None else labels.cpu(), grad_scale, **kw)
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert loss.shape == (s.shape[0],) and g.dtype == s.dtype and g.shape == s.shape
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    div = kw["divergence"]
    lt = tol(s.dtype, div, "loss") if loss_tol is None else loss_tol
    gt = tol(s.dtype, div, "grad") if grad_tol is None else grad_tol
    e_loss, e_grad = rel(loss, ref_loss), rel(g, ref_g)
    assert e_loss < lt, f"loss rel err {e_loss:.3g} >= {lt:g}"
    assert e_grad < gt, f"grad rel err {e_grad:.3g} >= {gt:g}"
    return loss, g


# ---------------------------------------------------------------------------------------------
# the module


def test_module_flags():
    from distill_ops import _C

    assert isinstance(_C.WITH_CUDA, bool)
    assert native.available("cpu") == (True, "")


def test_build_info_matches_the_extension():
    """setup.py records whether it built the CUDA part, and why not (pip hides its messages)."""
    from distill_ops import _C, _build_info

    assert _build_info.CUDA_BUILT == _C.WITH_CUDA
    assert bool(_build_info.CUDA_SKIPPED_BECAUSE) == (not _C.WITH_CUDA)


def test_setup_writes_build_info(tmp_path, monkeypatch):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_setup_under_test", root / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    monkeypatch.setattr(setup_py, "BUILD_INFO", str(tmp_path / "_build_info.py"))
    setup_py._write_build_info(False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    info: dict = {}
    exec((tmp_path / "_build_info.py").read_text(), info)
    assert info["CUDA_BUILT"] is False
    assert info["CUDA_SKIPPED_BECAUSE"].startswith("nvcc not found")


def test_available_cuda_says_why_it_was_skipped(monkeypatch):
    import types

    import distill_ops
    from distill_ops import _C

    info = types.ModuleType("distill_ops._build_info")
    info.CUDA_BUILT, info.CUDA_SKIPPED_BECAUSE = False, "torch 2.13.0+cpu is not a CUDA build"
    monkeypatch.setitem(sys.modules, "distill_ops._build_info", info)
    monkeypatch.setattr(distill_ops, "_build_info", info, raising=False)
    monkeypatch.setattr(_C, "WITH_CUDA", False)
    assert native.available("cuda") == (
        False, "the extension was built without CUDA: torch 2.13.0+cpu is not a CUDA build")


def test_fake_kernel_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(7, 33, dtype=torch.bfloat16)
        out = torch.ops.distill_ops_native.dense_forward(
            s, s, None, torch.empty_like(s), None, 0, 0.0, 1.0, 0.0, 1.0, 0.0, -100)
        assert out.shape == (7,) and out.dtype == torch.float32
        s64 = torch.empty(3, 5, dtype=torch.float64)
        out = torch.ops.distill_ops_native.dense_forward(
            s64, s64, None, None, None, 2, 0.5, 2.0, 0.0, 1.0, 0.0, -100)
        assert out.shape == (3,) and out.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    s, t = logits(3, 8, seed=0, device=device)
    with pytest.raises(RuntimeError, match="teacher has shape"):
        run(s, t[:, :7], None, **opts())
    with pytest.raises(RuntimeError, match="teacher has dtype"):
        run(s, t.double(), None, **opts())
    with pytest.raises(RuntimeError, match="2-D"):
        run(s[0], t[0], None, **opts())
    with pytest.raises(RuntimeError, match="labels must be int64"):
        run(s, t, torch.zeros(3, dtype=torch.int32, device=device), **opts())
    with pytest.raises(RuntimeError, match="grad has dtype"):
        native.dense_forward(s, t, None, grad=torch.empty_like(s, dtype=torch.float64),
                             grad_scale=None, **opts())
    with pytest.raises(RuntimeError, match="temperature"):
        run(s, t, None, **opts(temperature=0.0))
    with pytest.raises(RuntimeError, match="divergence"):
        run(s, t, None, **opts(divergence=7))
    with pytest.raises(RuntimeError, match="int64|float32, bfloat16"):
        run(s.to(torch.int64), t.to(torch.int64), None, **opts())


def _bad_grads(s):
    """Gradient outputs the kernels must refuse (csrc/tensor_checks.h), with the error they get."""
    wide = torch.empty(s.shape[0], 2 * s.shape[1], dtype=s.dtype, device=s.device)
    return [
        (torch.empty(s.shape[0] + 1, s.shape[1], dtype=s.dtype, device=s.device), "grad has shape"),
        (torch.empty_like(s, dtype=torch.float64), "grad has dtype"),
        (wide[:, ::2], "grad must have unit stride"),
        (torch.empty(1, s.shape[1], dtype=s.dtype, device=s.device).expand_as(s),
         "grad's rows share memory"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_grad_outputs_are_refused_by_both_ops(device):
    s, t = logits(3, 8, seed=0, device=device)
    ids = torch.tensor([[0, 1], [2, -1], [5, 7]], dtype=torch.int32, device=device)
    lp = torch.log(torch.full((3, 2), 0.5, device=device))
    for grad, match in _bad_grads(s):
        with pytest.raises(RuntimeError, match=match):
            native.dense_forward(s, t, None, grad=grad, grad_scale=None, **opts())
        with pytest.raises(RuntimeError, match=match):
            torch.ops.distill_ops_native.sparse_forward(
                s, ids, lp, None, None, grad, None, 0, 0.5, 0, 1.0, 1.0, 1.0, 0.0, -100)
    # grad may be the student itself (inplace_grad), never a shifted view of its memory
    buf = torch.cat([s, s[:1]])
    s, shifted = buf[:-1], buf[1:]
    with pytest.raises(RuntimeError, match="overlaps the student"):
        native.dense_forward(s, t, None, grad=shifted, grad_scale=None, **opts())
    with pytest.raises(RuntimeError, match="overlaps the student"):
        torch.ops.distill_ops_native.sparse_forward(
            s, ids, lp, None, None, shifted, None, 0, 0.5, 0, 1.0, 1.0, 1.0, 0.0, -100)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_refuse_labels_and_ids_outside_the_row(device):
    """The kernels index a row with the labels and the target ids. A label that is neither
    ignore_index nor in [0, V), or an id neither -1 nor in [0, V) (each bound just outside: V,
    -1 / -2): the CPU kernels refuse it, naming the argument; the CUDA kernels, which would need a
    host sync to check, make that row's loss NaN and read nothing outside the row (the emulator's
    AddressSanitizer watches), as Triton's do (test_sparse_loss). V - 1, 0 and the padding pass.
    (The Python API checks the values first in eager mode: only a direct call, or a compiled one,
    reaches these.)"""
    host_checks = device == "cpu" and os.environ.get("DISTILL_OPS_CUDA_EMU") != "1"
    v = 8
    s, t = logits(3, v, seed=0, device=device)
    ids = torch.tensor([[0, 1], [2, -1], [5, v - 1]], dtype=torch.int32, device=device)
    lp = torch.log(torch.full((3, 2), 0.5, device=device))
    lab = lambda *x: torch.tensor(x, device=device)  # noqa: E731
    # (native.OPS: the emulated kernels' operators under DISTILL_OPS_CUDA_EMU=1)
    sparse = lambda i, labels: native.OPS.sparse_forward(  # noqa: E731
        s, i, lp, None, labels, None, None, 0, 0.5, 0, 1.0, 1.0, 1.0, 0.5, -100)
    dense = lambda labels: run(s, t, labels, grad=False, **opts(hard_coef=0.5))[0]  # noqa: E731

    def refused(call, pattern, bad_row):
        if host_checks:
            with pytest.raises(RuntimeError, match=pattern):
                call()
        else:
            loss = call()
            assert torch.isnan(loss[bad_row]).item(), loss
            assert torch.isfinite(loss[[r for r in range(3) if r != bad_row]]).all(), loss

    for labels in (lab(0, v, 1), lab(0, -1, 1), lab(-100, -101, 2)):
        refused(lambda: dense(labels), r"labels\[1\] = .* is neither ignore_index", 1)
        refused(lambda: sparse(ids, labels), r"labels\[1\] = .* is neither ignore_index", 1)
    for bad in (v, -2):
        i = ids.clone()
        i[2, 0] = bad
        refused(lambda: sparse(i, None), r"ids\[2, 0\] = .* is neither -1 nor in", 2)
    ok = lab(v - 1, -100, 0)
    assert torch.isfinite(dense(ok)).all()
    assert torch.isfinite(sparse(ids, ok)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_tail_mode_needs_the_target_bits(device):
    """Tail mode sums the student's mass outside the targets column by column, so the op takes
    their bit set (reference_sparse.target_bits) and refuses a call without it or of the wrong
    shape or dtype, naming target_bits, before any kernel runs."""
    from distill_ops.backends.reference_sparse import target_bits

    s, _ = logits(3, 40, seed=0, device=device)
    ids = torch.tensor([[0, 33], [2, -1], [31, 32]], dtype=torch.int32, device=device)
    lp = torch.log(torch.full((3, 2), 0.25, device=device))
    call = lambda bits: torch.ops.distill_ops_native.sparse_forward(  # noqa: E731
        s, ids, lp, None, None, None, None, 0, 0.5, 2, 1.0, 1.0, 1.0, 0.0, -100, bits)
    bits = target_bits(ids, 40)
    assert bits.tolist() == [[1, 2], [4, 0], [-(1 << 31), 1]]
    for bad, match in ((None, "target_bits is required in tail mode"),
                       (bits[:, :1].contiguous(), r"target_bits must have shape \(3, 2\)"),
                       (bits.long(), "target_bits must be int32")):
        with pytest.raises(RuntimeError, match=match):
            call(bad)
    assert torch.isfinite(call(bits)).all()


def test_target_bits_sets_each_target_bit_once():
    """target_bits against a bit set built in Python, every bit position of a word (bit 31 is the
    int32 sign), random unique ids with -1 padding."""
    from distill_ops.backends.reference_sparse import target_bits

    gen = torch.Generator().manual_seed(7)
    v, k = 100, 40
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(6)])
    ids[1, ::3] = -1
    ids = torch.cat([ids, torch.arange(k).unsqueeze(0)])   # bits 0..31 of word 0, 0..7 of word 1
    words = [[0] * ((v + 31) // 32) for _ in range(ids.shape[0])]
    for row, line in enumerate(ids.tolist()):
        for j in line:
            if j >= 0:
                words[row][j // 32] |= 1 << (j % 32)
    signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    assert target_bits(ids.to(torch.int32), v).tolist() == signed
    assert target_bits(ids.to(torch.int32), v)[-1, 0].item() == -1


# ---------------------------------------------------------------------------------------------
# against the oracle


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("div", DIVS)
def test_matches_oracle(device, div, dtype, tau):
    """Odd V, some ignored rows, the CE term and a grad scale: loss and gradient."""
    s, t = logits(6, 1000, seed=div * 10 + int(tau * 4), dtype=dtype, device=device)
    labels = labels_for(6, 1000, seed=div, device=device)
    check(s, t, labels, grad_scale=0.37,
          **opts(divergence=div, temperature=tau, soft_coef=tau * tau, hard_coef=0.5, mix=0.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("div", MIXTURES)
def test_mix_values(device, div, mix):
    s, t = logits(4, 777, seed=int(mix * 10) + div, device=device)
    check(s, t, **opts(divergence=div, mix=mix, temperature=0.7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("cap", [2.0, 30.0])
def test_softcap(device, div, cap):
    s, t = logits(4, 515, seed=3, device=device, spread=4.0)
    labels = torch.tensor([3, -100, 514, 0], device=device)
    check(s, t, labels, **opts(divergence=div, softcap=cap, temperature=2.0, soft_coef=4.0,
                               hard_coef=0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hard_only_and_soft_only(device, dtype):
    s, t = logits(5, 300, seed=4, dtype=dtype, device=device)
    labels = labels_for(5, 300, seed=4, device=device)
    for tau in (1.0, 3.0):
        check(s, t, labels, **opts(soft_coef=0.0, hard_coef=1.0, temperature=tau))
        check(s, t, labels, **opts(divergence=JSD, soft_coef=2.0, hard_coef=0.0, temperature=tau))
        check(s, t, None, **opts(divergence=REVERSE_KL, soft_coef=0.5, temperature=tau))


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_unused_without_soft_term(device):
    """soft_coef = 0: the teacher is not read, so a NaN in it does not reach the loss."""
    s, t = logits(3, 50, seed=5, device=device)
    t[1, 3] = float("nan")
    labels = torch.tensor([1, 2, 3], device=device)
    loss, g = run(s, t, labels, **opts(soft_coef=0.0, hard_coef=1.0))
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
def test_ignored_rows(device, div):
    s, t = logits(6, 64, seed=6, device=device)
    labels = torch.tensor([1, -1, 2, -1, 63, 0], device=device)
    loss, g = check(s, t, labels, **opts(divergence=div, ignore_index=-1, hard_coef=0.5))
    assert torch.count_nonzero(loss[[1, 3]]) == 0 and torch.count_nonzero(g[[1, 3]]) == 0
    # labels mark ignored rows even without the CE term
    loss, g = check(s, t, labels, **opts(divergence=div, ignore_index=-1))
    assert torch.count_nonzero(loss[[1, 3]]) == 0 and torch.count_nonzero(g[[1, 3]]) == 0
    everything = torch.full((6,), -1, device=device)
    loss, g = run(s, t, everything, **opts(divergence=div, ignore_index=-1, hard_coef=1.0))
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("div", [FORWARD_KL, REVERSE_KL, JSD, SKEW_REVERSE_KL])
def test_inplace_grad(device, dtype, div):
    """grad is the student tensor: same loss and gradient as into a separate buffer."""
    s, t = logits(5, 1031, seed=7, dtype=dtype, device=device)
    labels = labels_for(5, 1031, seed=7, device=device)
    kw = opts(divergence=div, temperature=1.5, hard_coef=0.5, softcap=10.0)
    loss, g = run(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    gs = torch.tensor(0.5, device=device)
    loss2 = native.dense_forward(buf, t, labels, grad=buf, grad_scale=gs, **kw)
    assert torch.equal(loss, loss2)
    assert torch.equal(g, buf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,v", [(1, 1), (4, 1), (1, 1000), (3, 4097), (2, 2), (9, 8), (1, 9)])
@pytest.mark.parametrize("div", DIVS)
def test_shapes(device, n, v, div):
    s, t = logits(n, v, seed=n * 31 + v, device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    loss, g = check(s, t, labels, **opts(divergence=div, temperature=1.3, hard_coef=0.5))
    if v == 1:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    s, t = logits(0, 16, seed=0, device=device)
    loss, g = run(s, t, None, **opts())
    assert loss.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("offset", [0, 1])
def test_row_strides(device, dtype, offset):
    """Row strides larger than V (column slices of wider buffers; an odd offset misaligns the
    rows, which takes the CUDA kernels' scalar path); grad a strided view too: nothing outside the
    view is written."""
    n, v, width = 5, 301, 320
    s_buf, t_buf = logits(n, width + 8, seed=8, dtype=dtype, device=device)
    s, t = s_buf[:, offset:offset + v], t_buf[:, 3:3 + v]
    labels = torch.tensor([0, -100, 300, 5, 6], device=device)
    kw = opts(divergence=JSD, temperature=2.0, hard_coef=0.5)
    g_buf = torch.full((n, width), 7.0, dtype=dtype, device=device)
    g = g_buf[:, offset:offset + v]
    loss = native.dense_forward(s, t, labels, grad=g, grad_scale=None, **kw)
    ref_loss, ref_g = oracle(s.contiguous(), t.contiguous(), labels.cpu(), **kw)
    assert rel(loss, ref_loss) < tol(dtype, JSD, "loss")
    assert rel(g, ref_g) < tol(dtype, JSD, "grad")
    outside = torch.ones_like(g_buf, dtype=torch.bool)
    outside[:, offset:offset + v] = False
    assert (g_buf[outside] == 7.0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
def test_masked_columns_both_sides(device, div):
    """-inf in the same columns of student and teacher: finite, equal to the unpadded loss, zero
    gradient in the pad (0 log 0 = 0)."""
    s, t = logits(4, 40, seed=9, device=device)
    s[:, 33:] = -math.inf
    t[:, 33:] = -math.inf
    s[2, :5] = -math.inf
    t[2, :5] = -math.inf
    labels = torch.tensor([1, -100, 30, 0], device=device)
    kw = opts(divergence=div, temperature=2.0, hard_coef=0.5, soft_coef=4.0)
    loss, g = run(s, t, labels, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert torch.count_nonzero(g[:, 33:]) == 0 and torch.count_nonzero(g[2, :5]) == 0
    ref, ref_g = run(s[:, :33].contiguous(), t[:, :33].contiguous(), labels, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[:, :33], ref_g, rtol=1e-4, atol=1e-6)
    check(s, t, labels, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
def test_rows_all_minus_inf_but_one(device, div):
    """A row whose logits are all -inf but one (both sides): a point mass, loss 0 and gradient 0;
    with the CE term on that token, still 0."""
    s, t = logits(3, 70, seed=10, device=device)
    s[0] = -math.inf
    t[0] = -math.inf
    s[0, 17] = 2.5
    t[0, 17] = -1.0
    s[1, :] = -math.inf  # student masked except one token, teacher spread
    s[1, 9] = 0.0
    labels = torch.tensor([17, 9, 4], device=device)
    kw = opts(divergence=div, temperature=1.5, hard_coef=0.5)
    loss, g = run(s, t, labels, **kw)
    assert loss[0].item() == 0.0 and torch.count_nonzero(g[0]) == 0
    if div == FORWARD_KL:
        assert loss[1].item() == math.inf  # the teacher has mass where the student has none
    if div in (REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL):
        ref, ref_g = oracle(s, t, labels.cpu(), **kw)
        assert torch.isfinite(loss[1]) and rel(loss[1], ref[1]) < 1e-5
        assert torch.isfinite(g[1]).all() and rel(g[1], ref_g[1]) < 1e-4
    ref, ref_g = oracle(s, t, labels.cpu(), **kw)
    assert rel(loss[2], ref[2]) < 1e-5 and rel(g[2], ref_g[2]) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_masked_prefix_and_rising_max(device, div, tau):
    """Rows wider than the CPU kernels' 512-element chunks whose running max starts empty and then
    rises chunk after chunk: row 0 masked (-inf, both sides) over its first 1100 columns, then
    logits near -300 (lse far below 0: exp(-lse) overflows float, where a chunk's kept
    exponentials must still give q = p = 0, not 0 * inf); row 1 ascending, so every chunk raises the
    max. The CPU kernel keeps pass 1's exponentials and rescales them per chunk: both must match
    the oracle on the unmasked part. (tau = 1: the CE term's softmax is the kept q; 0.7: its own.)"""
    v, cut = 2000, 1100
    s, t = logits(3, v, seed=14, device=device)
    s[0, :cut] = -math.inf
    t[0, :cut] = -math.inf
    s[0, cut:] -= 300.0
    t[0, cut:] -= 300.0
    ramp = torch.linspace(-40.0, 12.0, v, device=device)
    s[1] += ramp
    t[1] += ramp.flip(0)
    labels = torch.tensor([cut + 7, 1999, -100], device=device)
    kw = opts(divergence=div, temperature=tau, hard_coef=0.5)
    loss, g = run(s, t, labels, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert torch.count_nonzero(g[0, :cut]) == 0
    ref, ref_g = oracle(s[:, cut:], t[:, cut:], torch.tensor([7, 1999 - cut, -100]), **kw)
    assert rel(loss[0], ref[0]) < 1e-5 and rel(g[0, cut:], ref_g[0]) < tol(s.dtype, div, "grad")
    check(s[1:], t[1:], labels[1:], **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_propagates(device, div, side):
    s, t = logits(4, 50, seed=11, device=device)
    (s if side == "student" else t)[1, 7] = float("nan")
    loss, _ = run(s, t, None, **opts(divergence=div, temperature=1.5))
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
def test_no_grad_buffer(device, div):
    s, t = logits(3, 500, seed=12, device=device)
    a, _ = run(s, t, None, grad=False, **opts(divergence=div, temperature=0.8))
    b, _ = run(s, t, None, grad=True, **opts(divergence=div, temperature=0.8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS)
def test_extreme_temperatures_and_wide_logits(device, div):
    """Near one-hot (tau = 0.05) and near uniform (tau = 50) distributions, logits over +-75.
    (At tau = 0.05 with logits over +-75 the float64 oracle itself breaks: its mixture
    M = beta p + (1 - beta) q underflows to 0 where p does not, giving inf.)"""
    labels = torch.tensor([3, -100, 299, 0], device=device)
    for tau, spread in ((0.05, 3.0), (1.0, 25.0), (50.0, 25.0)):
        s, t = logits(4, 300, seed=13, device=device, spread=spread)
        check(s, t, labels, loss_tol=1e-4, grad_tol=1e-3,
              **opts(divergence=div, temperature=tau, hard_coef=0.5))


# ---------------------------------------------------------------------------------------------
# CUDA only: large vocabularies, the split-row path, the vector/scalar paths


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("v", [151936, 262144])
@pytest.mark.parametrize("n", [3, 64, 300])
@pytest.mark.parametrize("div", [FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL])
def test_cuda_large_vocab(device, v, n, div):
    """N = 3 and 64 take the split-row path on an H100 (fewer rows than 2 x SMs), N = 300 the
    row kernel."""
    s, t = logits(n, v, seed=v % 97 + n, dtype=torch.bfloat16, device=device)
    labels = labels_for(n, v, seed=n, device=device)
    check(s, t, labels, grad_scale=0.1,
          **opts(divergence=div, temperature=2.0, soft_coef=4.0, hard_coef=0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("splits", ["1", "2", "7", "64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("div", DIVS)
def test_cuda_forced_splits(device, splits, dtype, div, monkeypatch):
    """DISTILL_OPS_CUDA_SPLITS forces the number of blocks per row: every split count gives the
    oracle's result, in-place too."""
    monkeypatch.setenv(SPLITS_ENV, splits)
    s, t = logits(5, 20011, seed=14, dtype=dtype, device=device)
    labels = labels_for(5, 20011, seed=14, device=device)
    kw = opts(divergence=div, temperature=0.7, soft_coef=0.49, hard_coef=0.5, softcap=20.0)
    loss, g = check(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    loss2 = native.dense_forward(buf, t, labels, grad=buf,
                                 grad_scale=torch.tensor(0.5, device=device), **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, buf)


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_split_matches_row_kernel(device, monkeypatch):
    s, t = logits(8, 65536, seed=15, device=device)
    kw = opts(divergence=SKEW_REVERSE_KL, temperature=1.0)
    monkeypatch.setenv(SPLITS_ENV, "1")
    a, ga = run(s, t, None, **kw)
    monkeypatch.setenv(SPLITS_ENV, "16")
    b, gb = run(s, t, None, **kw)
    assert rel(b, a) < 1e-6 and rel(gb, ga) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("v", [1, 3, 7, 8, 9, 63, 1025])
def test_cuda_vector_tails(device, v):
    """V not a multiple of the vector width: vector body plus scalar tail."""
    s, t = logits(7, v, seed=v, dtype=torch.bfloat16, device=device)
    check(s, t, **opts(divergence=JSD, temperature=1.0))


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype,n,v", [(torch.bfloat16, 200, 8192), (torch.bfloat16, 5, 262144),
                                       (torch.float16, 40, 40001), (torch.float32, 100, 20001),
                                       (torch.float32, 5, 131072)],
                         ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("div", DIVS)
def test_cuda_resident_kernel(device, dtype, v, n, div, monkeypatch):
    """DISTILL_OPS_CUDA_RESIDENT=require (an error, not a fallback, where it does not run): the
    one-read cluster kernel from one block a row to 16 (non-portable clusters), the oracle's
    result, and the same bits in place."""
    monkeypatch.setenv("DISTILL_OPS_CUDA_RESIDENT", "require")
    s, t = logits(n, v, seed=v % 89 + n, dtype=dtype, device=device)
    labels = labels_for(n, v, seed=n, device=device)
    kw = opts(divergence=div, temperature=0.8, soft_coef=0.49, hard_coef=0.5)
    loss, g = check(s, t, labels, grad_scale=0.5, **kw)
    buf = s.clone()
    loss2 = native.dense_forward(buf, t, labels, grad=buf,
                                 grad_scale=torch.tensor(0.5, device=device), **kw)
    assert torch.equal(loss, loss2) and torch.equal(g, buf)


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_matches_cpu(device):
    s, t = logits(16, 32000, seed=16, device="cpu")
    labels = labels_for(16, 32000, seed=16)
    kw = opts(divergence=JSD, temperature=2.0, hard_coef=0.3, softcap=30.0)
    lc, gc = run(s, t, labels, **kw)
    lg, gg = run(s.cuda(), t.cuda(), labels.cuda(), **kw)
    assert rel(lg, lc) < 1e-6 and rel(gg, gc) < 1e-5


def _vm_flags_at(addr: int) -> list[str] | None:
    """The VmFlags of the mapping holding addr (Linux /proc/self/smaps), None when there is none."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
@pytest.mark.skipif(os.environ.get("DISTILL_OPS_CUDA_EMU") == "1",
                    reason="the emulated CUDA kernels take the GPU's memory path")
@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_cpu_gradient_buffer_asks_for_huge_pages(op):
    """A fresh gradient buffer of 12 MiB gets the MADV_HUGEPAGE hint on its 2 MiB-aligned interior
    (csrc/cpu/cpu_common.h advise_huge_pages); the result is the one of the same call without it
    (DISTILL_OPS_CPU_HUGEPAGES=0, read once, hence the subprocess)."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_native import _vm_flags_at
from distill_ops.backends import native
torch.manual_seed(0)
s, t = torch.randn(96, 32768), torch.randn(96, 32768)
grad = torch.empty_like(s)
if {op!r} == "dense":
    loss = native.dense_forward(s, t, None, divergence=0, mix=0.0, temperature=1.0, softcap=0.0,
                                soft_coef=1.0, hard_coef=0.0, ignore_index=-100, grad=grad,
                                grad_scale=None)
else:
    ids = torch.topk(t, 8).indices.int()
    lp = torch.log_softmax(t, -1).gather(1, ids.long()).float()
    loss = torch.ops.distill_ops_native.sparse_forward(s, ids, lp, None, None, grad, None, 0, 0.0,
                                                      0, 1.0, 1.0, 1.0, 0.0, -100)
mid = grad.data_ptr() + grad.nbytes // 2
print("hg" in (_vm_flags_at(mid) or []))
torch.save((loss, grad), sys.argv[1])
"""
    outs = {}
    for flag in ("1", "0"):
        path = os.path.join(tempfile.mkdtemp(), "out.pt")
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                           env={**os.environ, "DISTILL_OPS_CPU_HUGEPAGES": flag})
        assert r.returncode == 0, r.stderr[-3000:]
        outs[flag] = (r.stdout.split()[-1], torch.load(path))
    assert outs["1"][0] == "True" and outs["0"][0] == "False"
    for a, b in zip(outs["1"][1], outs["0"][1]):
        assert torch.equal(a, b)

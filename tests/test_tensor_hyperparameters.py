"""Hyperparameters as 0-d tensors (ops/scalar_args.py): the temperature, beta, alpha and the two
weights of every loss may be 0-d CPU tensors. Eager, they give the floats' loss and gradient to
the bit; compiled, one graph serves every value (a float is a constant of the graph: each new one
compiled the step anew), the values are read and checked when the op runs, and a value that
changes the kernels' divergence (generalized_jsd's beta = 0 or 1) or asks for labels (a hard
weight above 0) does so at run time."""

from __future__ import annotations

import pytest
import torch

from distill_ops import (KDLoss, SparseKDLoss, fused_linear_kd_loss, fused_linear_sparse_kd_loss,
                         kd_loss, sparse_kd_loss, teacher_topk)
from oracle import INTERPRETER_NOISE, require_backend

pytestmark = INTERPRETER_NOISE

N, H, V, K = 7, 12, 37, 6
LOSSES = ("dense", "sparse", "fused_dense", "fused_sparse")
NAMES = ("temperature", "beta", "alpha", "soft_weight", "hard_weight")
# (temperature, beta, alpha, soft_weight, hard_weight) per step: generalized_jsd's beta crosses
# 0 and 1 (forward and reverse KL kernels) and the hard weight leaves 0.
SCHEDULE = [(1.0, 0.0, 0.1, 1.0, 0.0), (2.5, 1.0, 0.2, 0.5, 0.3), (0.7, 0.3, 0.1, 1.5, 0.0),
            (4.0, 0.5, 0.9, 0.0, 1.0)]


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ht = torch.randn(N, H, generator=g).to(dtype)
    wt = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    teacher = ht @ wt.T
    return dict(hs=hs, ws=ws, ht=ht, wt=wt, labels=labels, teacher=teacher,
                targets=teacher_topk(teacher.float(), K))


def _loss(kind: str, x: dict, hs: torch.Tensor, ws: torch.Tensor, backend: str, tail: str,
          **hyper) -> torch.Tensor:
    common = dict(labels=x["labels"], divergence="generalized_jsd", backend=backend, **hyper)
    if kind == "dense":
        return kd_loss(hs @ ws.T, x["teacher"], **common)
    if kind == "sparse":
        return sparse_kd_loss(hs @ ws.T, x["targets"], tail=tail, **common)
    if kind == "fused_dense":
        return fused_linear_kd_loss(hs, ws, x["ht"], x["wt"], chunk_size=3, **common)
    return fused_linear_sparse_kd_loss(hs, ws, x["targets"], tail=tail, chunk_size=3, **common)


def _loss_and_grads(fn, kind, x, backend, tail, **hyper):
    hs, ws = x["hs"].clone().requires_grad_(), x["ws"].clone().requires_grad_()
    loss = fn(kind, x, hs, ws, backend, tail, **hyper)
    return (loss.detach(), *torch.autograd.grad(loss, (hs, ws)))


def _assert_identical(got, want):
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("tail", ["renorm", "tail"])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_eager_tensors_give_the_floats_results(kind, backend, tail):
    if tail == "tail" and kind in ("dense", "fused_dense"):
        pytest.skip("no tail in the dense losses")
    require_backend(backend)
    x = _inputs()
    for values in SCHEDULE[:2]:
        floats = dict(zip(NAMES, values))
        tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in floats.items()}
        _assert_identical(_loss_and_grads(_loss, kind, x, backend, tail, **tensors),
                          _loss_and_grads(_loss, kind, x, backend, tail, **floats))


F16 = torch.float16


@pytest.mark.parametrize("kind,tail,backend,compiler,dtype", [
    ("dense", "renorm", "cpu", "inductor", None), ("dense", "renorm", "triton", "aot_eager", None),
    ("sparse", "renorm", "cpu", "aot_eager", None), ("sparse", "tail", "torch", "aot_eager", None),
    ("fused_dense", "renorm", "cpu", "aot_eager", None),
    ("fused_sparse", "tail", "cpu", "aot_eager", None),
    # float16 leaves the mean's 1/N to the backward (fused_grad.defers_mean), which finds the
    # reduction and ignore_index among the op's inputs
    ("dense", "renorm", "torch", "aot_eager", F16), ("sparse", "renorm", "torch", "aot_eager", F16),
    ("fused_dense", "renorm", "torch", "aot_eager", F16),
])
def test_one_compiled_graph_serves_every_value(kind, tail, backend, compiler, dtype):
    """Tensors changed in place between calls: one graph, and each step's loss and gradients are
    the eager floats' to the bit."""
    from torch._dynamo.utils import counters

    require_backend(backend)
    torch._dynamo.reset()
    counters.clear()
    x = _inputs(1, dtype or torch.float32)
    tensors = {k: torch.tensor(0.0, dtype=torch.float64) for k in NAMES}
    compiled = torch.compile(_loss, fullgraph=True, backend=compiler)
    for values in SCHEDULE:
        for k, v in zip(NAMES, values):
            tensors[k].fill_(v)
        _assert_identical(_loss_and_grads(compiled, kind, x, backend, tail, **tensors),
                          _loss_and_grads(_loss, kind, x, backend, tail,
                                          **dict(zip(NAMES, values))))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kind", LOSSES)
def test_compiled_values_are_checked_when_the_op_runs(kind):
    """The checks of the floats, with the same messages, raised before any kernel runs."""
    torch._dynamo.reset()
    x = _inputs(2)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(NAMES, SCHEDULE[0])}
    hs, ws = x["hs"].requires_grad_(), x["ws"]
    compiled(kind, x, hs, ws, "torch", "renorm", **tensors)
    for name, bad, match in (("temperature", 0.0, "temperature must be > 0"),
                             ("beta", 1.5, "beta must be in"),
                             ("hard_weight", float("nan"), "hard_weight must be finite")):
        tensors[name].fill_(bad)
        with pytest.raises(ValueError, match=match):
            compiled(kind, x, hs, ws, "torch", "renorm", **tensors)
        tensors[name].fill_(dict(zip(NAMES, SCHEDULE[0]))[name])
    # A hard weight above 0 without labels, for a step compiled without labels and hard weight 0
    no_labels = dict(x, labels=None)
    compiled(kind, no_labels, hs, ws, "torch", "renorm", **tensors)
    tensors["hard_weight"].fill_(0.5)
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        compiled(kind, no_labels, hs, ws, "torch", "renorm", **tensors)


@pytest.mark.parametrize("bad,error,match", [
    (torch.tensor([2.0]), ValueError, r"temperature as a tensor must be 0-d .* shape \(1,\)"),
    (torch.tensor(2), TypeError, "temperature as a tensor must be floating point"),
    (torch.tensor(2.0, requires_grad=True), ValueError, "temperature takes no gradient"),
    (torch.tensor(2.0, device="meta"), ValueError, "temperature as a tensor must be on the CPU"),
    (torch.tensor(0.0), ValueError, "temperature must be > 0"),
])
@pytest.mark.parametrize("kind", LOSSES + ("KDLoss", "SparseKDLoss"))
def test_a_bad_tensor_is_named(kind, bad, error, match):
    x = _inputs(3)
    with pytest.raises(error, match=match):
        if kind == "KDLoss":
            KDLoss(temperature=bad)
        elif kind == "SparseKDLoss":
            SparseKDLoss(temperature=bad)
        else:
            _loss(kind, x, x["hs"], x["ws"], "torch", "renorm", temperature=bad)


@pytest.mark.parametrize("name,bad_value", [("beta", 1.5), ("alpha", -0.1), ("soft_weight", -1.0),
                                            ("hard_weight", float("inf"))])
@pytest.mark.parametrize("kind", LOSSES)
def test_each_hyperparameter_s_tensor_is_checked_under_its_name(kind, name, bad_value):
    """Eager: the other four take tensors too, and a bad form or value names its argument."""
    x = _inputs(3)
    with pytest.raises(ValueError, match=f"{name} as a tensor must be 0-d"):
        _loss(kind, x, x["hs"], x["ws"], "torch", "renorm", **{name: torch.tensor([0.5])})
    with pytest.raises(ValueError, match=name):
        _loss(kind, x, x["hs"], x["ws"], "torch", "renorm",
              **{name: torch.tensor(bad_value, dtype=torch.float64)})


def test_a_module_reads_its_tensor_at_each_call():
    x = _inputs(4)
    s = x["hs"] @ x["ws"].T
    tau = torch.tensor(2.0, dtype=torch.float64)
    loss_fn = KDLoss(temperature=tau, divergence="jsd")
    first = loss_fn(s, x["teacher"])
    tau.fill_(3.0)
    assert torch.equal(loss_fn(s, x["teacher"]), kd_loss(s, x["teacher"], temperature=3.0,
                                                         divergence="jsd"))
    assert not torch.equal(first, loss_fn(s, x["teacher"]))
    tau.fill_(-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        loss_fn(s, x["teacher"])


def test_only_the_tensor_ops_are_kept_out_of_cuda_graphs():
    """The ops that read tensor hyperparameters on the host carry cudagraph_unsafe (where torch
    has the tag); the float ops, which CUDA graphs capture, do not."""
    from distill_ops.ops import scalar_args

    if not scalar_args.OP_TAGS:
        pytest.skip("this torch has no cudagraph_unsafe tag, or custom_op takes no tags")
    tag = torch.Tag.cudagraph_unsafe
    ops = torch.ops.distill_ops
    for name in ("dense_kd", "sparse_kd", "fused_linear_chunks"):
        assert tag in getattr(ops, name + "_scalars").default.tags
        assert tag not in getattr(ops, name).default.tags


@pytest.mark.cuda
def test_reduce_overhead_reads_each_step_s_values():
    """mode='reduce-overhead' with tensor hyperparameters: the op is tagged cudagraph_unsafe, so
    inductor runs it outside its CUDA graphs, and each replay reads the values of its step (a
    capture of the op would have kept the first step's, and the op refuses to be captured)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(32, 1000).cuda()
    h = torch.randn(64, 32, generator=g).cuda()
    t = (torch.randn(64, 1000, generator=g) * 2).cuda()
    tau = torch.tensor(1.0, dtype=torch.float64)

    def step(h, t, tau):
        return kd_loss(head(h), t, temperature=tau, divergence="jsd")

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for value in (1.0, 2.0, 3.0, 1.5):
        tau.fill_(value)
        out = []
        for fn in (step, compiled):
            head.zero_grad(set_to_none=True)
            loss = fn(h, t, tau)
            loss.backward()
            out.append((loss.detach().clone(), head.weight.grad.clone()))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

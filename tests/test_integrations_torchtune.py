"""torchtune drop-ins (distill_ops.integrations.torchtune): the values and gradients of torchtune's
KD losses, checked against a float64 formula here and against torchtune's own classes where
torchtune is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from distill_ops import backends
from distill_ops.integrations import torchtune as dtt
from oracle import INTERPRETER_NOISE, backend, backend_and_device, device  # noqa: F401

pytestmark = INTERPRETER_NOISE

HAS_TORCHTUNE = importlib.util.find_spec("torchtune") is not None
# The native CPU kernels where the extension is built, else the reference backend: these tests are
# about the wrappers, which do the same over either.
CPU_BACKEND = "cpu" if backends.native_status("cpu")[0] else "torch"
needs_torchtune = pytest.mark.skipif(not HAS_TORCHTUNE, reason="torchtune is not installed")

V = 40


def per_token_reference(s, t, forward_weight):
    """torchtune's per-token loss from its definition, float64: forward is the cross-entropy
    -sum p log q, reverse KL(q||p)."""
    lq, lp = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    fwd = -(lp.exp() * lq).sum(-1)
    rev = (lq.exp() * (lq - lp)).sum(-1)
    return forward_weight * fwd + (1 - forward_weight) * rev


def reference(s, t, labels, forward_weight, normalize=True, ignore_index=-100):
    per = per_token_reference(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                              forward_weight)
    keep = labels.reshape(-1) != ignore_index
    total = per[keep].sum()
    return total / keep.sum().clamp_min(1) if normalize else total


def inputs(seed, shape=(3, 7), v=V, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, v, generator=g) * 2.5).to(dtype)
    t = (torch.randn(*shape, v, generator=g) * 2.5).to(dtype)
    labels = torch.randint(0, 1000, shape, generator=g)  # values are only a mask: any will do
    labels[0, 1:4] = -100
    labels[-1, -1] = -100
    return s.to(device), t.to(device), labels.to(device)


LOSSES = [(dtt.ForwardKLLoss, {}, 1.0), (dtt.ReverseKLLoss, {}, 0.0),
          (dtt.SymmetricKLLoss, {"sym_kd_ratio": 0.3}, 0.3)]
CHUNKED = [(dtt.ForwardKLWithChunkedOutputLoss, {}, 1.0),
           (dtt.ReverseKLWithChunkedOutputLoss, {}, 0.0),
           (dtt.SymmetricKLWithChunkedOutputLoss, {"sym_kd_ratio": 0.8}, 0.8)]


def check_against(loss, grad, s, t, labels, forward_weight, normalize=True, tol=2e-5):
    s64 = s.detach().double().requires_grad_()
    want = reference(s64, t, labels, forward_weight, normalize)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls,kw,fw", LOSSES)
@pytest.mark.parametrize("normalize", [True, False])
def test_losses_match_the_definition(backend, device, cls, kw, fw, normalize):
    s, t, labels = inputs(1, device=device)
    s2d = s.reshape(-1, V).requires_grad_()
    loss = cls(**kw, backend=backend)(s2d, t.reshape(-1, V), labels, normalize=normalize)
    loss.backward()
    assert loss.dim() == 0
    check_against(loss.cpu(), s2d.grad.cpu(), s2d.detach().cpu(), t.reshape(-1, V).cpu(),
                  labels.cpu(), fw, normalize)


@pytest.mark.parametrize("cls,kw,fw", CHUNKED)
@pytest.mark.parametrize("chunks", [1, 3])
def test_chunked_losses_match_the_definition(backend, device, cls, kw, fw, chunks):
    s, t, labels = inputs(2, shape=(2, 8), device=device)
    s = s.requires_grad_()
    loss = cls(num_output_chunks=chunks, **kw, backend=backend)(
        list(s.chunk(chunks, dim=1)), list(t.chunk(chunks, dim=1)), labels)
    loss.backward()
    check_against(loss.cpu(), s.grad.cpu(), s.detach().cpu(), t.cpu(), labels.cpu(), fw)


def test_bf16_logits():
    s, t, labels = inputs(3, dtype=torch.bfloat16)
    s = s.requires_grad_()
    loss = dtt.ForwardKLLoss(backend=CPU_BACKEND)(s, t, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    check_against(loss, s.grad.float(), s.detach().float(), t.float(), labels, 1.0, tol=2e-2)


@pytest.mark.parametrize("cls,kw,fw", [LOSSES[0], LOSSES[2]])
def test_without_teacher_entropy_the_forward_term_is_kl(cls, kw, fw):
    """teacher_entropy=False: the forward term is KL(p||q) (value minus H(p)), the same gradient."""
    s, t, labels = inputs(9)
    out = []
    for entropy in (True, False):
        x = s.detach().clone().requires_grad_()
        loss = cls(**kw, teacher_entropy=entropy, backend=CPU_BACKEND)(x, t, labels)
        loss.backward()
        out.append((loss.double(), x.grad))
    lp = F.log_softmax(t.double(), -1)
    h = -(lp.exp() * lp).sum(-1).reshape(-1)[labels.reshape(-1) != -100].mean()
    torch.testing.assert_close(out[0][0] - out[1][0], fw * h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)


def test_every_token_ignored_gives_zero_and_zero_gradient():
    s, t, labels = inputs(4)
    labels.fill_(-100)
    s = s.requires_grad_()
    loss = dtt.ForwardKLWithChunkedOutputLoss(num_output_chunks=2, backend=CPU_BACKEND)(
        list(s.chunk(2, dim=1)), list(t.chunk(2, dim=1)), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_vocabulary_entries_masked_in_both_models_agree():
    """-inf logits that student and teacher share add nothing (torchtune zeroes their terms)."""
    s, t, labels = inputs(5)
    s[..., -5:] = float("-inf")
    t[..., -5:] = float("-inf")
    for cls, kw, fw in LOSSES:
        loss = cls(**kw, backend=CPU_BACKEND)(s, t, labels)
        keep = s[..., :-5], t[..., :-5]
        torch.testing.assert_close(loss.double(), reference(*keep, labels, fw), rtol=2e-5,
                                   atol=2e-5)


def test_bad_input_is_named():
    s, t, labels = inputs(6, shape=(2, 6))
    chunked = dtt.ForwardKLWithChunkedOutputLoss(num_output_chunks=3, backend=CPU_BACKEND)
    with pytest.raises(ValueError, match="student_logits has 2 chunks"):
        chunked(list(s.chunk(2, dim=1)), list(t.chunk(2, dim=1)), labels)
    with pytest.raises(TypeError, match="student_logits must be a non-empty list"):
        chunked(s, t, labels)
    with pytest.raises(ValueError, match="labels must be a \\(batch, tokens\\) tensor"):
        chunked(list(s.chunk(3, dim=1)), list(t.chunk(3, dim=1)), labels.reshape(-1))
    with pytest.raises(ValueError, match="labels has 11 elements"):
        dtt.ForwardKLLoss(backend=CPU_BACKEND)(s.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1)[:11])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        dtt.ForwardKLLoss(backend=CPU_BACKEND)(s, t, labels.float())
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        dtt.SymmetricKLLoss(sym_kd_ratio=1.5)
    with pytest.raises(TypeError, match="teacher_entropy"):
        dtt.ForwardKLWithChunkedOutputLoss(teacher_entropy="no")
    with pytest.raises(ValueError, match="num_output_chunks"):
        dtt.ForwardKLWithChunkedOutputLoss(num_output_chunks=0)
    with pytest.raises(ValueError, match="teacher_logits"):
        dtt.ReverseKLLoss(backend=CPU_BACKEND)(s, t[..., :-1], labels)


# ------------------------------------------------------------------ against torchtune itself

def _torchtune_pairs():
    pairs = []
    for ours, kw, _ in LOSSES + CHUNKED:
        pairs.append(pytest.param(ours, kw, id=ours.__name__, marks=needs_torchtune))
    return pairs


@pytest.mark.parametrize("ours,kw", _torchtune_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_and_gradients_as_torchtune(ours, kw, dtype):
    import torchtune.modules.loss as ttl

    theirs_cls = getattr(ttl, ours.__name__)
    chunked = "Chunked" in ours.__name__
    s, t, labels = inputs(7, shape=(2, 9), dtype=dtype)
    results = []
    for make in (lambda: ours(**kw, backend=CPU_BACKEND), lambda: theirs_cls(**kw)):
        x = s.detach().clone().requires_grad_()
        fn = make()
        if chunked:
            loss = fn(list(x.chunk(fn.num_output_chunks, dim=1)),
                      list(t.chunk(fn.num_output_chunks, dim=1)), labels)
        else:
            loss = fn(x.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1))
        loss.backward()
        results.append((loss.detach().float(), x.grad.float()))
    (ours_loss, ours_grad), (their_loss, their_grad) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours_loss.reshape(()), their_loss.reshape(()), rtol=tol, atol=tol)
    torch.testing.assert_close(ours_grad, their_grad, rtol=tol, atol=tol)


@needs_torchtune
def test_constructor_signatures_match_torchtune():
    """Every torchtune parameter, in order and with its default; ours add only keyword-only
    ``backend`` and (forward and symmetric) ``teacher_entropy``."""
    import inspect

    import torchtune.modules.loss as ttl

    for ours, _, _ in LOSSES + CHUNKED:
        theirs = inspect.signature(getattr(ttl, ours.__name__).__init__).parameters
        mine = inspect.signature(ours.__init__).parameters
        assert [(p.name, p.default) for p in theirs.values()] == \
            [(p.name, p.default) for p in mine.values()
             if p.name not in ("backend", "teacher_entropy")], ours.__name__


def test_compiles_whole():
    """torchtune's recipes may compile the loss (compile: true): no graph break, same results."""
    s, t, labels = inputs(8, shape=(2, 6))
    fn = dtt.SymmetricKLWithChunkedOutputLoss(num_output_chunks=2, backend=CPU_BACKEND)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        x = s.detach().clone().requires_grad_()
        loss = f(list(x.chunk(2, dim=1)), list(t.chunk(2, dim=1)), labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)

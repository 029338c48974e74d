"""TRL drop-in: generalized_jsd_loss with GKDTrainer's semantics, and patch_gkd_trainer()."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from distill_ops.integrations import trl as dtrl


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def gkd_reference(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
                  num_items_in_batch=None):
    """GKD's generalized JSD written from its definition, in float64, element-wise over V."""
    s, t = s.double() / temperature, t.double() / temperature
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    if beta == 0:
        elem = p * (lp - lq)
    elif beta == 1:
        elem = q * (lq - lp)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        elem = beta * p * (lp - lm) + (1 - beta) * q * (lq - lm)
    if labels is not None:
        mask = labels != -100
        elem = elem[mask]
    if num_items_in_batch is not None:
        return elem.sum() / num_items_in_batch
    if reduction == "batchmean":   # TRL 1.16: kept tokens (at least 1), else the batch size
        return elem.sum() / (mask.sum().clamp_min(1) if labels is not None else s.shape[0])
    if reduction == "sum":
        return elem.sum()
    if reduction == "mean":
        return elem.mean()
    return elem


def logits(seed, shape=(2, 6, 50)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2


def labels_for(shape=(2, 6)):
    lab = torch.arange(shape[0] * shape[1]).view(shape) % 50
    lab[0, -2:] = -100
    lab[1, -1] = -100
    return lab


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_gkd_semantics(beta, temperature, reduction, with_labels):
    s, t = logits(int(beta * 10 + temperature * 3))
    lab = labels_for() if with_labels else None
    x = s.clone().requires_grad_(True)
    ours = dtrl.generalized_jsd_loss(x, t, labels=lab, beta=beta, temperature=temperature,
                                     reduction=reduction)
    ours.backward()
    y = s.double().clone().requires_grad_(True)
    ref = gkd_reference(y, t, labels=lab, beta=beta, temperature=temperature, reduction=reduction)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    # no tau^2 scaling: the gradient is the float64 reference's (JSD loses a little to cancellation)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("with_labels", [True, False])
def test_num_items_in_batch_divides_the_sum(with_labels):
    """GKDTrainer.compute_loss passes num_items_in_batch (gradient accumulation): sum / it, as an
    int or a tensor, whatever the reduction."""
    s, t = logits(8)
    lab = labels_for() if with_labels else None
    ref = gkd_reference(s, t, labels=lab, beta=0.4, num_items_in_batch=9)
    for n in (9, torch.tensor(9)):
        got = dtrl.generalized_jsd_loss(s, t, labels=lab, beta=0.4, reduction="mean",
                                        num_items_in_batch=n)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def test_none_reduction_is_per_token_row_sum():
    s, t = logits(3)
    lab = labels_for()
    per_token = dtrl.generalized_jsd_loss(s, t, labels=lab, beta=0.5, reduction="none")
    ref = gkd_reference(s, t, beta=0.5, reduction="none").sum(-1)
    ref[lab == -100] = 0
    torch.testing.assert_close(per_token.double(), ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="reduction"):
        dtrl.generalized_jsd_loss(s, t, reduction="avg")


def test_all_masked_batch_is_zero():
    s, t = logits(4)
    assert float(dtrl.generalized_jsd_loss(s, t, labels=torch.full((2, 6), -100))) == 0.0


def test_labels_are_only_a_mask():
    """TRL reads labels as != -100 alone: values outside the vocabulary (a -1, V, anything) keep
    their positions, where kd_loss would refuse them as class ids."""
    s, t = logits(5)
    lab = labels_for()
    odd = lab.clone()
    odd[0, 0], odd[0, 1], odd[1, 0] = -1, 50, 12345
    want = gkd_reference(s, t, labels=lab, beta=0.3)
    got = dtrl.generalized_jsd_loss(s, t, labels=odd, beta=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.fixture
def fake_trl(monkeypatch):
    """A stand-in trl with GKDTrainer where recent versions keep it (trl.experimental.gkd)."""
    def original(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                 reduction="batchmean", num_items_in_batch=None):
        return "original"

    class GKDTrainer:
        generalized_jsd_loss = staticmethod(original)

        def compute_loss(self, s, t, labels):   # keywords as TRL 1.16's compute_loss passes them
            return self.generalized_jsd_loss(student_logits=s, teacher_logits=t, labels=labels,
                                             beta=0.1, num_items_in_batch=None)

    class Subclass(GKDTrainer):
        pass

    pkg = types.ModuleType("trl")
    pkg.__path__ = []
    pkg.__spec__ = importlib.util.spec_from_loader("trl", loader=None, is_package=True)
    exp = types.ModuleType("trl.experimental")
    exp.__path__ = []
    gkd = types.ModuleType("trl.experimental.gkd")
    gkd.GKDTrainer = GKDTrainer
    for name, mod in (("trl", pkg), ("trl.experimental", exp), ("trl.experimental.gkd", gkd)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(dtrl, "GKD_MODULES", ("trl.experimental.gkd", "trl.trainer.gkd_trainer"))
    yield GKDTrainer, Subclass, original
    dtrl.unpatch_gkd_trainer()


def test_patch_gkd_trainer_says_why_none_imports(fake_trl, monkeypatch):
    """trl present but no GKDTrainer importable (a moved module, a dependency trl lacks): the
    error names each module tried and why it failed."""
    monkeypatch.setattr(dtrl, "GKD_MODULES", ("trl.no_such_gkd",))
    with pytest.raises(ImportError, match=r"trl\.no_such_gkd: ModuleNotFoundError\(.*no_such_gkd"):
        dtrl.patch_gkd_trainer()


def test_patch_gkd_trainer(fake_trl):
    GKDTrainer, Subclass, original = fake_trl
    assert dtrl.patch_gkd_trainer() == [GKDTrainer]
    s, t = logits(5)
    lab = labels_for()
    got = Subclass().compute_loss(s, t, lab)
    torch.testing.assert_close(got.double(), gkd_reference(s, t, labels=lab, beta=0.1),
                               rtol=1e-5, atol=1e-7)
    dtrl.unpatch_gkd_trainer()
    assert GKDTrainer().compute_loss(s, t, lab) == "original"


def test_patch_without_trl_says_so(monkeypatch):
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("trl is installed")
    with pytest.raises(ImportError, match="trl is not installed"):
        dtrl.patch_gkd_trainer()


def test_real_trl_if_installed():
    """Against the installed trl itself: our signature takes every argument of TRL's (its
    compute_loss passes them by keyword), and each reduction gives TRL's value."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    dtrl.unpatch_gkd_trainer()
    theirs = dtrl._gkd_classes()[0].generalized_jsd_loss
    missing = (set(inspect.signature(theirs).parameters)
               - set(inspect.signature(dtrl.generalized_jsd_loss).parameters))
    assert not missing, f"TRL's generalized_jsd_loss takes {missing}, ours does not"
    s, t = logits(6)
    for lab in (labels_for(), None):
        for kw in (dict(reduction="batchmean"), dict(reduction="sum"), dict(reduction="mean"),
                   dict(num_items_in_batch=torch.tensor(5))):
            want = theirs(s, t, labels=lab, beta=0.3, temperature=1.3, **kw)
            got = dtrl.generalized_jsd_loss(s, t, labels=lab, beta=0.3, temperature=1.3, **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{kw} {lab is None}")
    classes = dtrl.patch_gkd_trainer()
    try:
        lab = labels_for()
        got = classes[0].generalized_jsd_loss(student_logits=s, teacher_logits=t, labels=lab,
                                              beta=0.5, num_items_in_batch=None)
        torch.testing.assert_close(got.double(), gkd_reference(s, t, labels=lab), rtol=1e-5,
                                   atol=1e-7)
    finally:
        dtrl.unpatch_gkd_trainer()

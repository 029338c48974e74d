"""DistillationTrainer: transformers.Trainer with the fused loss, a few steps on a tiny model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
transformers = pytest.importorskip("transformers")

from distill_ops import kd_loss  # noqa: E402
from distill_ops.integrations.hf_trainer import DistillationTrainer  # noqa: E402
from distill_ops.trainer.models import llama  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


V = 64


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, t=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, V, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if i % 2 and i < 4:  # right padding on rows 1 and 3: micro-batches differ in tokens
            ids, mask, labels = ids.clone(), mask.clone(), labels.clone()
            ids[-3:], mask[-3:], labels[-3:] = 1, 0, -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_compute_loss_is_kd_loss_on_shifted_labels(tmp_path):
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    kd = dict(divergence="forward_kl", temperature=2.0, hard_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  train_dataset=ListDataset(), kd_kwargs=kd)
    batch = {k: torch.stack([ListDataset()[i][k] for i in range(4)])
             for k in ("input_ids", "attention_mask", "labels")}
    loss = trainer.compute_loss(student, batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    ref = kd_loss(s, t, labels=shifted, **kd)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    # all labels ignored: loss 0, not NaN
    batch["labels"][:] = -100
    assert float(trainer.compute_loss(student, batch).detach()) == 0.0


def test_two_training_steps(tmp_path):
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=args(tmp_path, gradient_accumulation_steps=2),
                                  train_dataset=ListDataset(),
                                  kd_kwargs=dict(divergence="jsd", beta=0.5))
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and all(x > 0 for x in logged)


@pytest.mark.parametrize("fused", [False, True])
def test_a_teacher_loaded_with_a_device_map_stays_where_it_is(tmp_path, fused):
    """A teacher spread over devices (hf_device_map, as from_pretrained(device_map=...) leaves
    it) is not moved whole to the student's device; a plain one is."""
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    teacher.hf_device_map = {"": "cpu"}
    moved = []
    teacher.to = lambda *a, **k: moved.append(a)  # noqa: E731  (a spy: nothing moves on the CPU)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  train_dataset=ListDataset(), fused_linear=fused)
    assert torch.isfinite(trainer.compute_loss(student, _batch()))
    trainer._place_teacher(torch.device("meta"))
    assert moved == []
    del teacher.hf_device_map
    trainer._place_teacher(torch.device("meta"))
    assert moved == [(torch.device("meta"),)]


def test_bad_arguments():
    student, teacher = llama(V, 32, 1, heads=2), llama(V, 48, 1, heads=2)
    with pytest.raises(TypeError, match="teacher_model"):
        DistillationTrainer(model=student, teacher_model="gpt2")
    with pytest.raises(TypeError, match="sparse_kd_loss does not take here: \\['softcap'\\]"):
        DistillationTrainer(model=student, teacher_model=None, kd_kwargs={"softcap": 30.0})
    with pytest.raises(TypeError, match="ignore_index"):
        DistillationTrainer(model=student, teacher_model=teacher, kd_kwargs={"ignore_index": 0})
    with pytest.raises(TypeError, match="reduction"):
        DistillationTrainer(model=student, teacher_model=teacher, kd_kwargs={"reduction": "sum"})


def test_settings_the_loss_would_ignore_are_refused(tmp_path):
    student, teacher = llama(V, 32, 1, heads=2), llama(V, 48, 1, heads=2)
    with pytest.raises(TypeError, match="compute_loss_func"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                            compute_loss_func=lambda outputs, labels, num_items_in_batch: 0.0)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        DistillationTrainer(model=student, teacher_model=teacher,
                            args=args(tmp_path, label_smoothing_factor=0.1))


def test_gradient_accumulation_normalises_over_the_accumulated_batch(tmp_path):
    """4 x 2 accumulation steps == one batch of 8 (the padded rows make token counts unequal)."""
    def run(bs, ga, sub):
        student = llama(V, 32, 1, heads=2, seed=0)
        trainer = DistillationTrainer(
            model=student, teacher_model=llama(V, 48, 1, heads=2, seed=1),
            args=args(tmp_path / sub, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga,
                      max_steps=1, learning_rate=1e-2, max_grad_norm=0.0, dataloader_drop_last=True,
                      lr_scheduler_type="constant", train_sampling_strategy="sequential"),
            train_dataset=ListDataset(n=8), kd_kwargs=dict(temperature=2.0, hard_weight=0.5))
        trainer.train()
        return [p.detach().clone() for p in student.parameters()]

    for a, b in zip(run(8, 1, "one"), run(4, 2, "acc")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _student_of_class(kind):
    """llama(V, 32, 1) as the class ``kind`` names: the plain LlamaForCausalLM; one that takes no
    loss kwargs (as Gemma3's ...ForConditionalGeneration: Trainer then counts no
    num_items_in_batch for it); one of another name (transformers maps its loss to nothing, and
    counts each row's first label too)."""
    base = llama(V, 32, 1, heads=2, seed=0)
    if kind == "llama":
        return base
    extra = {"accepts_loss_kwargs": False} if kind == "no-loss-kwargs" else {}
    cls = type("TinyStudent", (type(base),), extra)
    student = cls(base.config)
    student.load_state_dict(base.state_dict())
    return student


@pytest.mark.parametrize("kind", ["llama", "no-loss-kwargs", "other-name"])
@pytest.mark.parametrize("bs,ga", [(8, 1), (4, 2)])
def test_first_update_is_the_exact_gradient_whatever_the_student(tmp_path, kind, bs, ga):
    """The first SGD update against the exact gradient of sum over the scored (shifted) tokens /
    their count in the accumulated batch. Before the fix the student without loss kwargs was off
    at 4 x 2 (each micro-batch averaged on its own), and the other-named one 9% off at both
    (Trainer also counted each row's first label, which nothing scores)."""
    kd = dict(temperature=2.0, hard_weight=0.5)
    ds = ListDataset(n=8)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask",
                                                                   "labels")}
    ref_student = _student_of_class("llama")
    teacher = llama(V, 48, 1, heads=2, seed=1)
    s = ref_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    kd_loss(s, t, labels=shifted, reduction="mean", **kd).backward()

    lr = 10.0
    student = _student_of_class(kind)
    before = [p.detach().clone() for p in student.parameters()]
    DistillationTrainer(
        model=student, teacher_model=teacher, kd_kwargs=kd, train_dataset=ds,
        args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                  max_steps=1, learning_rate=lr, optim="sgd", max_grad_norm=0.0,
                  lr_scheduler_type="constant", weight_decay=0.0,
                  train_sampling_strategy="sequential")).train()
    for b, p, r in zip(before, student.parameters(), ref_student.parameters()):
        torch.testing.assert_close((b - p.detach()) / lr, r.grad, rtol=1e-4, atol=1e-7)


def _batch(n=4):
    return {k: torch.stack([ListDataset()[i][k] for i in range(n)])
            for k in ("input_ids", "attention_mask", "labels")}


def test_fused_linear_is_the_same_loss_and_gradient(tmp_path):
    """fused_linear (hidden states + lm_heads, no logits) == kd_loss on the logits: loss and
    gradients, with the Trainer's num_items_in_batch and without."""
    kd = dict(divergence="jsd", temperature=2.0, hard_weight=0.5)
    grads, losses = [], []
    for fused in (False, True):
        student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                      train_dataset=ListDataset(), kd_kwargs=kd,
                                      fused_linear=fused)
        a = trainer.compute_loss(student, _batch())
        b = trainer.compute_loss(student, _batch(), num_items_in_batch=torch.tensor(17))
        (a + b).backward()
        losses.append((a.detach(), b.detach()))
        grads.append([p.grad.clone() for p in student.parameters()])
    for x, y in zip(losses[0], losses[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_fused_linear_trains_like_the_logits_path(tmp_path):
    def run(fused):
        student = llama(V, 32, 1, heads=2, seed=0)
        trainer = DistillationTrainer(
            model=student, teacher_model=llama(V, 48, 1, heads=2, seed=1),
            args=args(tmp_path / str(fused), gradient_accumulation_steps=2, max_grad_norm=0.0),
            train_dataset=ListDataset(), kd_kwargs=dict(temperature=2.0), fused_linear=fused)
        trainer.train()
        return [p.detach().clone() for p in student.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_linear_refuses_logits_that_are_not_the_head(tmp_path):
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    base = type(student)

    class Scaled(base):   # a logit scale the lm_head does not know about
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kw):
            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep, **kw)
            out.logits = out.logits * 0.5
            return out

    student.__class__ = Scaled
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  fused_linear=True)
    with pytest.raises(ValueError, match="not lm_head\\(last hidden state\\)"):
        trainer.compute_loss(student, _batch())
    with pytest.raises(TypeError, match="fused_linear_kd_loss does not take here: \\['vocab'\\]"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                            kd_kwargs={"vocab": "strict"}, fused_linear=True)


# --------------------------------------------------------------------------- cached targets


def _cache(tmp_path, teacher, k=8):
    """A TargetCache over ListDataset's unpadded rows, written by the teacher."""
    from distill_ops.targets.cache import TargetCache, write_teacher_cache

    ids = ListDataset().ids[4:]   # rows 4.. carry no padding
    write_teacher_cache(teacher, [ids[i:i + 4] for i in range(0, len(ids), 4)], tmp_path / "cache",
                        k=k, temperature=1.0, dtype="float32", progress=False)
    return TargetCache(tmp_path / "cache", expect_vocab_size=V)


@pytest.mark.parametrize("fused", [False, True])
def test_cached_targets_are_sparse_kd_loss(tmp_path, fused):
    """teacher_model=None: the batch's cached targets go to sparse_kd_loss against the shifted
    input_ids (the cache has no labels), with and without fused_linear, and training runs."""
    from distill_ops import sparse_kd_loss

    teacher = llama(V, 48, 1, heads=2, seed=1)
    cache = _cache(tmp_path, teacher)
    student = llama(V, 32, 1, heads=2, seed=0)
    kd = dict(tail="tail", temperature=1.0, hard_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path / "run"),
                                  train_dataset=cache, kd_kwargs=kd, fused_linear=fused)
    items = [cache[i] for i in range(4)]
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"]).logits
    shifted = torch.full_like(batch["input_ids"], -100)
    shifted[:, :-1] = batch["input_ids"][:, 1:]
    ref = sparse_kd_loss(logits, batch["ids"], batch["logprobs"],
                         tail_logmass=batch["tail_logmass"], labels=shifted, **kd)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


@pytest.mark.parametrize("fused", [False, True])
def test_cached_targets_of_ragged_sequences_accumulate_over_the_whole_batch(tmp_path, fused):
    """A cache written from right-padded batches holds sequences of different lengths. The
    default collator pads them (target ids with -1), and the batches get their labels before
    Trainer counts num_items_in_batch: 2 x 2 accumulation makes the update one batch of 4 makes,
    although the two micro-batches hold 5 and 17 labelled tokens (with a per-micro-batch mean,
    the updates differed by more than 100%)."""
    from distill_ops.targets.cache import TargetCache, write_teacher_cache

    ids = ListDataset().ids[:4]
    mask = torch.ones_like(ids)
    for row, length in enumerate([3, 4, 12, 7]):
        mask[row, length:] = 0
    write_teacher_cache(llama(V, 48, 1, heads=2, seed=1), [(ids, mask)], tmp_path / "cache", k=8,
                        dtype="float32", progress=False)
    cache = TargetCache(tmp_path / "cache")
    assert [len(cache[i]["input_ids"]) for i in range(4)] == [3, 4, 12, 7]
    lr = 10.0

    def update(bs, ga):
        student = llama(V, 32, 1, heads=2, seed=0)
        before = [p.detach().clone() for p in student.parameters()]
        DistillationTrainer(
            model=student, teacher_model=None, fused_linear=fused,
            kd_kwargs=dict(tail="tail", hard_weight=0.5),
            args=args(tmp_path / f"run{bs}", per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, max_steps=1, learning_rate=lr, optim="sgd",
                      max_grad_norm=0.0, lr_scheduler_type="constant", weight_decay=0.0,
                      train_sampling_strategy="sequential"),
            train_dataset=cache).train()
        return [(b - p.detach()) / lr for b, p in zip(before, student.parameters())]

    for a, b in zip(update(4, 1), update(2, 2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_evaluation_on_cached_targets_reports_the_loss(tmp_path):
    """Cache items carry no labels, and Trainer computes no eval loss for a batch without them:
    evaluate() returned only its timings. The eval loss is the sparse loss of the whole set."""
    from distill_ops import sparse_kd_loss

    cache = _cache(tmp_path, llama(V, 48, 1, heads=2, seed=1))
    student = llama(V, 32, 1, heads=2, seed=0)
    kd = dict(tail="tail", hard_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=None, kd_kwargs=kd,
                                  args=args(tmp_path / "run", per_device_eval_batch_size=12),
                                  eval_dataset=cache)
    got = trainer.evaluate()
    items = [cache[i] for i in range(len(cache))]
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    shifted = torch.full_like(batch["input_ids"], -100)
    shifted[:, :-1] = batch["input_ids"][:, 1:]
    with torch.no_grad():
        ref = sparse_kd_loss(student(input_ids=batch["input_ids"]).logits, batch["ids"],
                             batch["logprobs"], tail_logmass=batch["tail_logmass"],
                             labels=shifted, **kd)
    assert "eval_loss" in got, got
    assert got["eval_loss"] == pytest.approx(float(ref), rel=1e-5)


def test_a_sampled_cache_needs_renorm(tmp_path):
    """Sampled targets need tail='renorm' (refused up front); a temperature other than the
    cache's warns, as the thin trainer does."""
    from distill_ops.targets.cache import CacheError, TargetCache, write_teacher_cache

    ids = ListDataset().ids[4:]
    write_teacher_cache(llama(V, 48, 1, heads=2, seed=1), [ids[i:i + 4] for i in range(0, 12, 4)],
                        tmp_path / "cache", k=8, mode="sample", progress=False)
    cache = TargetCache(tmp_path / "cache")
    student = llama(V, 32, 1, heads=2, seed=0)
    with pytest.raises(CacheError, match="holds sampled targets: they need tail='renorm'"):
        DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path / "run"),
                            train_dataset=cache, kd_kwargs=dict(tail="tail"))
    DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path / "run"),
                        train_dataset=cache)
    with pytest.warns(UserWarning, match="made at temperature 1.0, but kd_kwargs has "
                                         "temperature=2.0"):
        DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path / "run"),
                            train_dataset=cache, kd_kwargs=dict(temperature=2.0))


def test_cache_of_a_larger_vocabulary_is_refused_up_front(tmp_path):
    """A cache whose ids reach past the student's logits is an error when the trainer is built,
    not at the first batch that holds such an id; a cache of the student's size is fine."""
    cache = _cache(tmp_path, llama(V, 48, 1, heads=2, seed=1))
    with pytest.raises(ValueError, match=f"vocabulary of {V} tokens, but the student's logits "
                                         f"have {V - 8} columns"):
        DistillationTrainer(model=llama(V - 8, 32, 1, heads=2), teacher_model=None,
                            args=args(tmp_path / "a"), train_dataset=cache)
    DistillationTrainer(model=llama(V, 32, 1, heads=2), teacher_model=None,
                        args=args(tmp_path / "b"), train_dataset=cache)


def test_cached_targets_missing_say_so(tmp_path):
    trainer = DistillationTrainer(model=llama(V, 32, 1, heads=2), teacher_model=None,
                                  args=args(tmp_path), train_dataset=ListDataset())
    with pytest.raises(ValueError, match="cached targets: ids, logprobs"):
        trainer.compute_loss(trainer.model, _batch())


def test_a_batchs_own_shift_labels_are_used(tmp_path):
    """A batch carrying already-aligned 'shift_labels' (e.g. completion-only masks) is scored with
    those labels as given, not re-derived from 'labels'."""
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  kd_kwargs={})
    ids = torch.randint(2, V, (2, 10), generator=torch.Generator().manual_seed(0))
    shift = torch.full_like(ids, -100)
    shift[:, 3:7] = ids[:, 4:8]
    loss = trainer.compute_loss(student, {"input_ids": ids, "shift_labels": shift})
    ref = kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, labels=shift)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_a_zero_tensor_item_count_with_no_labels_gives_zero(tmp_path):
    """num_items_in_batch as a tensor 0 (every label ignored) gives loss 0, not NaN from 0/0."""
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  kd_kwargs={})
    ids = torch.randint(2, V, (2, 10), generator=torch.Generator().manual_seed(0))
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": torch.full_like(ids, -100)},
                                num_items_in_batch=torch.tensor(0))
    assert float(loss.detach()) == 0.0

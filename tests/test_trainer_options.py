"""Trainer options whose effect is easy to lose silently: final eval coverage, gradient clipping,
loss logging, resume RNG, weight checks, target temperatures and seeds, data order and collation.

Tiny Llama models built from configs (no download); every test runs in a few seconds on a CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from distill_ops.trainer import TrainConfig, objective, train
from distill_ops.trainer import checkpoint as ckpt_lib
from distill_ops.trainer.data import BlockDataset, StepBatches, collate, split_documents
from distill_ops.trainer.objective import sparse_available
from test_trainer import blocks, cfg, tiny


pytestmark = pytest.mark.usefixtures("one_intraop_thread")

needs_sparse = pytest.mark.skipif(not sparse_available(), reason="distill_ops.sparse is missing")


def _losses(result):
    return [row["loss"] for row in result.history if "loss" in row]


# ---------------------------------------------------------------------------------------------
# loop


def test_final_eval_covers_the_whole_eval_set(tmp_path):
    """eval_batches limits the periodic evals only: the final eval reads every held-out sequence,
    so the reported final metrics are over the whole eval set."""
    data = blocks(n=40)
    r = train(cfg(tmp_path, max_steps=2, eval_batches=1, eval_every=1), student=tiny(),
              teacher=tiny(48, seed=1), train_dataset=data[:24], eval_dataset=data[24:])
    assert r.final_eval["eval_tokens"] == 16 * 23


def test_grad_clip_changes_the_update(tmp_path):
    """grad_clip is applied before the optimizer step: a tiny clip norm changes the weights after
    one step compared with no clipping."""
    out = []
    for clip in (None, 1e-6):
        r = train(cfg(tmp_path / str(clip), max_steps=1, grad_clip=clip, warmup_steps=0,
                      eval_fraction=0.0),
                  student=tiny(), teacher=tiny(48, seed=1), train_dataset=blocks(n=16))
        out.append(r.model.model.embed_tokens.weight.detach().clone())
    assert not torch.allclose(out[0], out[1], rtol=0, atol=1e-7)


def test_logged_loss_is_the_mean_since_the_last_row(tmp_path):
    """Each logged loss is the token mean over the steps since the previous row, so the running
    sums must reset after a row: log_every=2's single row is the mean of log_every=1's two rows
    (equal token counts per step)."""
    kw = dict(max_steps=2, eval_fraction=0.0)
    one = _losses(train(cfg(tmp_path / "a", log_every=1, **kw), student=tiny(),
                        teacher=tiny(48, seed=1), train_dataset=blocks()))
    two = _losses(train(cfg(tmp_path / "b", log_every=2, **kw), student=tiny(),
                        teacher=tiny(48, seed=1), train_dataset=blocks()))
    assert len(one) == 2 and len(two) == 1
    assert one[1] != pytest.approx(one[0], rel=1e-6)
    assert two[0] == pytest.approx((one[0] + one[1]) / 2, rel=1e-5)


@needs_sparse
def test_a_cache_made_at_another_temperature_warns(tmp_path):
    """A cache written at temperature 1 used for a loss at temperature 2 warns, since its targets
    are not the teacher's distribution at the loss temperature."""
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks(16)
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, 16, 8)],
                        tmp_path / "cache", k=8, temperature=1.0, progress=False)
    with pytest.warns(UserWarning, match="made at temperature"):
        train(cfg(tmp_path / "o", targets="cache", cache=str(tmp_path / "cache"), temperature=2.0,
                  max_steps=1, eval_fraction=0.0), student=tiny())


# ---------------------------------------------------------------------------------------------
# checkpoint


def _saved():
    m = tiny()
    opt = torch.optim.AdamW(m.parameters())
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return m, opt, sch


def test_resume_restores_the_rng(tmp_path):
    """Loading a checkpoint restores the RNG state saved with it, so random draws after a resume
    (dropout, sampling) are those the uninterrupted run would have made."""
    m, opt, sch = _saved()
    torch.manual_seed(123)
    path = ckpt_lib.save_checkpoint(str(tmp_path), 1, m, opt, sch, config={})
    want = torch.rand(5)
    torch.manual_seed(999)
    ckpt_lib.load_checkpoint(path, m, opt, sch)
    assert torch.equal(torch.rand(5), want)


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    """A checkpoint lacking an untied weight raises instead of leaving that weight at its random
    initialisation."""
    from safetensors.torch import load_file, save_file

    m, opt, sch = _saved()
    path = ckpt_lib.save_checkpoint(str(tmp_path), 1, m, opt, sch, config={})
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    del sd[next(k for k in sd if "q_proj" in k)]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="lacks weights"):
        ckpt_lib.load_weights(tiny(seed=5), path)


# ---------------------------------------------------------------------------------------------
# objective


@needs_sparse
def test_online_topk_targets_are_made_at_the_loss_temperature(tmp_path):
    """Top-k targets come from the teacher at the loss temperature: with k equal to the vocabulary
    they are the whole distribution, so the loss equals the dense one at T=2."""
    kw = dict(max_steps=2, temperature=2.0, hard_weight=0.3, eval_fraction=0.0)
    dense = train(cfg(tmp_path / "d", **kw), student=tiny(), teacher=tiny(48, seed=1),
                  train_dataset=blocks())
    topk = train(cfg(tmp_path / "k", targets="topk", topk=96, **kw), student=tiny(),
                 teacher=tiny(48, seed=1), train_dataset=blocks())
    assert _losses(topk) == pytest.approx(_losses(dense), rel=1e-4)


@needs_sparse
def test_online_sampling_uses_the_proposal_temperature(tmp_path, monkeypatch):
    """cfg.proposal_temperature reaches teacher_sample, so the draws follow the configured
    proposal rather than the default one."""
    from distill_ops import sparse

    seen = []
    real = sparse.teacher_sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("proposal_temperature"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse, "teacher_sample", spy)
    train(cfg(tmp_path, targets="sample", num_samples=6, proposal_temperature=3.0, max_steps=1,
              eval_fraction=0.0), student=tiny(), teacher=tiny(48, seed=1),
          train_dataset=blocks(n=16))
    assert seen and set(seen) == {3.0}


@needs_sparse
def test_fused_sampling_draws_afresh_in_each_chunk(monkeypatch):
    """Each chunk of rows of the fused path gets its own seed: identical rows in different chunks
    draw different ids (a shared seed would repeat the same draws chunk after chunk)."""
    monkeypatch.setattr(objective, "default_chunk_size", lambda rows, v, size: 4)
    c = TrainConfig(targets="sample", num_samples=6, output_dir="unused")
    teacher = objective.LastHidden(tiny(48, seed=1))
    h = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0))
    h = h.expand(1, 8, 48).contiguous()   # 8 identical positions: two chunks of 4
    tg = objective.online_targets_from_hidden(
        c, h, teacher, 96, lambda chunk: objective.sample_seed(c, 0, 0, 0, chunk))
    assert not torch.equal(tg.ids[0, 0], tg.ids[0, 4])


# ---------------------------------------------------------------------------------------------
# data


def test_collate_keeps_an_items_own_attention_mask_when_padding():
    """Padding combines the length mask with each item's own attention_mask, so positions an item
    masks itself stay masked after collation."""
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 0])},
             {"input_ids": torch.tensor([5, 6]), "attention_mask": torch.tensor([1, 1])}]
    out = collate(items)
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]


def test_each_epoch_has_its_own_order():
    """Every epoch reshuffles: epoch 1's order is a different permutation of the data than epoch
    0's (a fixed order would repeat the same batches every epoch)."""
    sb = StepBatches(BlockDataset(torch.arange(8).view(8, 1)), 2, 1, seed=0)
    e0 = [x for s in range(4) for x in sb.micro_batches(s)[0]["input_ids"].flatten().tolist()]
    e1 = [x for s in range(4, 8) for x in sb.micro_batches(s)[0]["input_ids"].flatten().tolist()]
    assert sorted(e0) == sorted(e1) == list(range(8))
    assert e0 != e1


def test_split_keeps_a_training_document():
    """However large eval_fraction is, at least one document stays in the training split."""
    for seed in range(4):
        tr, ev = split_documents(["a" * 10, "b" * 90], 0.95, seed)
        assert len(tr) >= 1 and len(tr) + len(ev) == 2

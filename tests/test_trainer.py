"""The thin trainer: config, data, objective, loop, checkpoints and exact resume, bad input, CLI.

Tiny Llama models built from configs (no download); every test runs in a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from distill_ops.trainer import TrainConfig, train
from distill_ops.trainer import checkpoint as ckpt_lib
from distill_ops.trainer.config import ConfigError
from distill_ops.trainer.data import (BlockDataset, StepBatches, collate, pack_documents,
                                      shift_labels, split_documents, train_bpe_tokenizer)
from distill_ops.trainer.models import llama
from distill_ops.trainer.objective import (cross_entropy_sum, dense_loss_sum, sparse_available)
from distill_ops.trainer.optim import lr_factor


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


V = 96


def tiny(hidden=32, layers=1, vocab=V, seed=0):
    return llama(vocab, hidden, layers, heads=2, max_positions=64, seed=seed)


def blocks(n=48, t=24, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: token i+1 = token i + 1 (mod V), with noise
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(t)) % vocab
    noise = torch.rand(n, t, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (n, t), generator=g), seq)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, micro_batch_size=4, log_every=1,
                progress=False, plot=False, save_final=False, lr=3e-3, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------
# config


def test_config_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'temprature'.*temperature"):
        TrainConfig.from_dict({"temprature": 2.0})
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="'learning_rate'"):
        TrainConfig.from_yaml(str(path))


def test_malformed_yaml_is_a_config_error(tmp_path, capsys):
    """A YAML syntax error is a ConfigError naming the file, so the CLI prints one line and exits
    with status 2 (yaml's own error is not a ValueError: it gave a traceback and status 1)."""
    from distill_ops.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("student: [a\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        TrainConfig.from_yaml(str(path))
    assert main(["train", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_config_yaml_types_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\ntemperature: 2\nbf16: false\ndivergence: reverse_kl\n")
    c = TrainConfig.from_yaml(str(path), {"max-steps": "9", "gradient_checkpointing": "true"})
    assert (c.max_steps, c.temperature, c.bf16, c.divergence) == (9, 2.0, False, "reverse_kl")
    assert c.gradient_checkpointing is True
    c.save_yaml(str(tmp_path / "back.yaml"))
    assert TrainConfig.from_yaml(str(tmp_path / "back.yaml")) == c


@pytest.mark.parametrize("bad, match", [
    ({"divergence": "kl"}, "divergence"), ({"temperature": 0}, "temperature"),
    ({"targets": "cache"}, "cache"), ({"max_steps": 0}, "max_steps"), ({"vocab": "x"}, "vocab"),
    ({"max_steps": "many"}, "max_steps"), ({"fused_linear": "maybe"}, "fused_linear"),
    ({"inplace_grad": "sometimes"}, "inplace_grad"),
    # YAML's `true` (a bool) for a count: int() took it for 1 and the run went on
    ({"max_steps": True}, "max_steps expects int"),
    ({"micro_batch_size": True}, "micro_batch_size expects int"),
])
def test_config_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(bad)


@pytest.mark.parametrize("bad, match", [
    ({"weight_decay": -0.5}, r"weight_decay must be >= 0"),
    ({"grad_clip": -1.0}, r"grad_clip must be >= 0"), ({"grad_clip": float("inf")}, "grad_clip"),
    ({"grad_clip": float("nan")}, r"grad_clip must be finite"),
    ({"warmup_steps": 11, "max_steps": 10}, r"warmup_steps \(11\) must be <= max_steps \(10\)"),
    ({"max_steps": 10.5}, r"max_steps must be an integer"), ({"max_steps": True}, "max_steps"),
    ({"micro_batch_size": 2.5}, r"micro_batch_size must be an integer"),
    ({"lr": "1e-3"}, r"lr must be a number"), ({"lr": float("nan")}, r"lr must be finite"),
    ({"adam_beta1": 1.0}, r"adam_beta1 must be in \[0, 1\)"),
    ({"adam_beta2": -0.1}, r"adam_beta2 must be in \[0, 1\)"),
    ({"adam_eps": 0.0}, r"adam_eps must be > 0"), ({"beta": 2.0}, r"beta must be in \[0, 1\]"),
    ({"alpha": -1.0}, r"alpha must be in \[0, 1\]"), ({"softcap": 0.0}, r"softcap must be > 0"),
    ({"temperature": float("inf")}, r"temperature must be finite"),
    ({"hard_weight": float("nan")}, "hard_weight"), ({"device": "gpu"}, r"device must be"),
    ({"overwrite_output_dir": 1}, "overwrite_output_dir"), ({"fsdp": "yes"}, "fsdp must be"),
])
def test_config_rejects_values_the_run_would_fail_on(bad, match):
    """Through the Python API (no coercion): each value is a ConfigError naming the field before
    any model is loaded (they used to pass, and train silently, e.g. a negative weight decay, or
    fail deep in torch naming no field)."""
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_config_edge_values_still_accepted(tmp_path):
    """0 and None disable clipping (None used to crash the first step), warmup_steps ==
    max_steps is a run that is all warmup, adam_beta1 = 0 is Adam without momentum."""
    for ok in ({"grad_clip": 0.0}, {"grad_clip": None}, {"warmup_steps": 4, "max_steps": 4},
               {"adam_beta1": 0.0}, {"softcap": None}, {"device": "cuda:1"}):
        TrainConfig(**ok)
    # as a flag or YAML string too ("null" was parsed as a float and refused)
    for text in ("null", "none"):
        assert TrainConfig.from_dict({"grad_clip": text}).grad_clip is None
    res = train(cfg(tmp_path, max_steps=1, grad_clip=None), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=blocks())
    assert res.step == 1


def test_a_resume_needs_the_same_fsdp_setting(tmp_path):
    """A checkpoint's optimizer state is keyed by parameter name when written sharded (FSDP2), by
    index otherwise: loading one layout as the other is refused before anything is loaded."""
    from distill_ops.trainer.optim import build_optimizer, build_scheduler

    res = train(cfg(tmp_path, max_steps=1, save_final=True), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=blocks())
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    c = cfg(tmp_path / "x", max_steps=1)
    optimizer = build_optimizer(model, c)
    with pytest.raises(ConfigError, match="written without fsdp.*use the same fsdp setting"):
        ckpt_lib.load_checkpoint(res.checkpoint, model, optimizer, build_scheduler(optimizer, c),
                                 sharded=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_resume_keeps_no_copy_of_the_optimizer_state(tmp_path):
    """load_checkpoint hands the optimizer and scheduler their states and returns the rest: the
    trainer keeps that dict for the whole run, and on a GPU a host copy of AdamW's state (twice
    the student in float32) would stay alive with it."""
    from distill_ops.trainer.optim import build_optimizer, build_scheduler

    c = cfg(tmp_path, max_steps=1, save_final=True)
    res = train(c, student=tiny(), teacher=tiny(48, seed=1), train_dataset=blocks())
    model = tiny()
    optimizer = build_optimizer(model, c)
    scheduler = build_scheduler(optimizer, c)
    state = ckpt_lib.load_checkpoint(res.checkpoint, model, optimizer, scheduler)
    assert "optimizer" not in state and "scheduler" not in state and state["step"] == 1
    assert scheduler.last_epoch == 1
    saved = torch.load(os.path.join(res.checkpoint, ckpt_lib.STATE_FILE), weights_only=False)
    torch.testing.assert_close(optimizer.state_dict()["state"], saved["optimizer"]["state"],
                               rtol=0, atol=0)


def test_topk_larger_than_the_vocabulary_is_refused_before_the_first_step(tmp_path, monkeypatch):
    import distill_ops.trainer.loop as loop

    def no_step(*args, **kwargs):
        raise AssertionError("the check must come before the first step")

    monkeypatch.setattr(loop, "_micro_step", no_step)
    with pytest.raises(ConfigError, match=rf"topk={V + 1} exceeds .*\({V} tokens\)"):
        train(cfg(tmp_path, targets="topk", topk=V + 1), student=tiny(),
              teacher=tiny(48, seed=1), train_dataset=blocks())
    with pytest.raises(ConfigError, match=rf"topk={V + 1} exceeds .*\({V} tokens\)"):
        train(cfg(tmp_path, targets="topk", topk=V + 1, vocab="common_prefix"), student=tiny(),
              teacher=tiny(48, vocab=V + 8, seed=1), train_dataset=blocks())


def test_unavailable_device_is_a_config_error(tmp_path, monkeypatch, capsys):
    """A device that is not there: ConfigError naming device (a RuntimeError gave the CLI a
    traceback and status 1)."""
    from distill_ops.cli import main
    from distill_ops.trainer import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' but no CUDA GPU is visible"):
        dist.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device='cuda:2' asks for CUDA GPU 2 but 2 are"):
        dist.pick_device("cuda:2")
    assert dist.pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["--targets", "none", "--output-dir", str(tmp_path / "o"), "--progress", "false"]
    for device, what in (("cuda", "no CUDA GPU is visible"), ("gpu", "device must be")):
        assert main(["train", "--device", device, *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distill-ops train: error: ") and what in err, err
        assert "Traceback" not in err


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[0] == pytest.approx(0.2) and f[3] == pytest.approx(0.8) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[20] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# data


def test_shift_labels_masks_last_and_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0], [0, 0, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    # left padding too: the pad before the first token predicts nothing (it was scored on it)
    assert shift_labels(ids, mask).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100],
                                                [-100, -100, 4, -100]]


def test_dataset_labels_are_honoured(tmp_path):
    """Items that carry ``labels`` (transformers' layout: aligned with input_ids, -100 on the
    prompt) are scored on those: the logged loss is the float64 CE over the labelled completion
    tokens alone, ragged items' labels pad with -100, and ``tokens`` counts inputs, not padding.
    Until 2026-12-07 the loop rebuilt the labels from input_ids and trained on the prompts."""
    from distill_ops.trainer.data import collate

    g = torch.Generator().manual_seed(3)
    items = []
    for length in (12, 12, 9, 12):
        ids = torch.randint(0, V, (length,), generator=g)
        labels = ids.clone()
        labels[:6] = -100   # the prompt
        items.append({"input_ids": ids, "labels": labels})
    assert collate(items)["labels"][2, 9:].tolist() == [-100] * 3
    model = tiny()
    batch = collate(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.double()
    target = torch.full_like(batch["labels"], -100)
    target[:, :-1] = batch["labels"][:, 1:]
    expected = float(torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1)))
    res = train(cfg(tmp_path, max_steps=1, micro_batch_size=4, targets="none", eval_fraction=0.0),
                student=model, train_dataset=items)
    row = next(r for r in res.history if "loss" in r)
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["tokens"] == 12 * 3 + 9


def test_eval_batches_cap_over_all_ranks_and_lockstep():
    """``limit`` counts batches over all ranks (a periodic evaluation reads the same sequences
    whatever the world size; it read limit x world before); ``lockstep`` pads a rank that runs
    out with None, for FSDP2, whose forwards every rank must join."""
    from distill_ops.trainer.data import as_dataset, eval_batches

    data = as_dataset(torch.arange(50).reshape(10, 5))   # 10 sequences, batches of 2: 5 batches

    def firsts(rank, world, **kw):
        return [None if b is None else int(b["input_ids"][0, 0])
                for b in eval_batches(data, 2, rank=rank, world_size=world, **kw)]

    assert firsts(0, 1, limit=3) == [0, 10, 20]
    assert firsts(0, 2, limit=3) == [0, 20] and firsts(1, 2, limit=3) == [10]
    assert firsts(1, 2, limit=3, lockstep=True) == [10, None]
    assert firsts(0, 2) == [0, 20, 40] and firsts(1, 2, lockstep=True) == [10, 30, None]


def test_collate_pads_ragged_sequences():
    out = collate([{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4])}])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_step_batches_shard_the_global_batch():
    ds = BlockDataset(torch.arange(40).view(40, 1))
    one = StepBatches(ds, 2, 2, seed=3)
    ranks = [StepBatches(ds, 2, 1, rank=r, world_size=2, seed=3) for r in range(2)]
    two = StepBatches(ds, 2, 1, rank=0, world_size=2, seed=3)
    assert two.global_batch == 4 and one.global_batch == 4
    for step in (0, 5, 11):   # 11 is in the second epoch
        got = sorted(x for r in ranks for b in r.micro_batches(step)
                     for x in b["input_ids"].flatten().tolist())
        ref = sorted(x for b in one.micro_batches(step) for x in b["input_ids"].flatten().tolist())
        assert got == ref and len(set(got)) == 4
    again = StepBatches(ds, 2, 2, seed=3)   # a fresh object (a resumed run) gives the same batch
    assert torch.equal(one.micro_batches(7)[1]["input_ids"], again.micro_batches(7)[1]["input_ids"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(ds, 16, 2, world_size=2)


def test_tokenizer_and_packing(tmp_path):
    docs = ["def f(x):\n    return x + 1\n" * 20, "The quick brown fox jumps. " * 30]
    tok = train_bpe_tokenizer(docs, 300, str(tmp_path / "tok"))
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    b = pack_documents(docs, tok, 16)
    assert b.dim() == 2 and b.shape[1] == 16 and int(b.max()) < len(tok)
    assert tok.decode(tok("return x + 1")["input_ids"]) == "return x + 1"
    train_docs, held = split_documents(docs * 5, 0.2, 0)
    assert held and train_docs and len(train_docs) + len(held) == 10


# ---------------------------------------------------------------------------------------------
# objective


def test_all_ignored_batch_gives_zero_loss_and_gradient(tmp_path):
    s = torch.randn(2, 5, V, requires_grad=True)
    t = torch.randn(2, 5, V)
    labels = torch.full((2, 5), -100)
    c = cfg(tmp_path, hard_weight=0.5, temperature=2.0)
    for loss in (dense_loss_sum(c, s, t, labels), cross_entropy_sum(s, labels)):
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.count_nonzero(s.grad) == 0 and not torch.isnan(s.grad).any()
        s.grad = None


def test_all_ignored_batch_in_the_loop(tmp_path):
    """A step whose batch has no labelled token: loss 0 (logged), no NaN in the weights."""
    data = torch.randint(0, V, (8, 1))   # length-1 sequences: the only position has no next token
    res = train(cfg(tmp_path, max_steps=2, micro_batch_size=4, targets="dense"), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=data)
    assert [r["loss"] for r in res.history if "loss" in r] == [0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


# ---------------------------------------------------------------------------------------------
# the loop


@pytest.mark.parametrize("targets", ["dense", "none"])
def test_training_reduces_loss_and_writes_outputs(tmp_path, targets):
    res = train(cfg(tmp_path, max_steps=12, targets=targets, temperature=2.0, hard_weight=0.3,
                    eval_every=6, save_final=True, plot=True),
                student=tiny(), teacher=tiny(64, 2, seed=1), train_dataset=blocks()[:40],
                eval_dataset=blocks()[40:])
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    evals = [r for r in res.history if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [6, 12]
    if targets == "dense":
        assert 0 <= evals[-1]["eval_top1"] <= 1 and evals[-1]["eval_kl"] >= 0
    out = tmp_path / "out"
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    # transformers format: from_pretrained reads it back to the same weights
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(res.checkpoint)
    assert_same_weights(weights(back), weights(res.model))


@pytest.mark.parametrize("targets", ["dense", "sample"])
def test_exact_resume(tmp_path, targets):
    """6 steps straight == 3 steps, checkpoint, a fresh process state, 3 more: same weights to the
    bit, same logged losses (optimizer, scheduler, RNG and data position restored; sampled
    targets draw what they would have drawn)."""
    if targets == "sample" and not sparse_available():
        pytest.skip("sampled targets need distill_ops.sparse")
    data = blocks()
    common = dict(max_steps=6, micro_batch_size=4, grad_accum_steps=2, targets=targets,
                  temperature=1.5, hard_weight=0.2, num_samples=6)
    straight = train(cfg(tmp_path / "a", **common), student=tiny(), teacher=tiny(48, seed=1),
                     train_dataset=data)
    half = cfg(tmp_path / "b", **common, save_every=3)
    half.max_steps = 6
    # run the first half by stopping at 3 steps, with the same schedule length (max_steps=6)
    interrupted = _train_until(half, 3, data)
    assert interrupted.step == 3
    torch.manual_seed(1234)   # disturb the global RNG: resume must restore it
    resumed = train(cfg(tmp_path / "b", **common, resume_from="latest"), student=tiny(seed=9),
                    teacher=tiny(48, seed=1), train_dataset=data)
    assert resumed.step == 6
    assert_same_weights(weights(straight.model), weights(resumed.model))
    loss_a = [r["loss"] for r in straight.history if "loss" in r]
    loss_b = [r["loss"] for r in resumed.history if "loss" in r]
    assert loss_a == loss_b


def _train_until(config, stop_step, data):
    """Train with max_steps from the config but stop (crash-like) after ``stop_step`` steps."""
    import distill_ops.trainer.loop as loop

    class Stop(Exception):
        pass

    real_save = ckpt_lib.save_checkpoint

    def save_then_stop(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if args[1] >= stop_step:
            raise Stop(path)
        return path

    loop.ckpt_lib.save_checkpoint = save_then_stop
    try:
        train(config, student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    except Stop:
        pass
    finally:
        loop.ckpt_lib.save_checkpoint = real_save
    found = ckpt_lib.list_checkpoints(config.output_dir)
    assert found and found[-1][0] == stop_step

    class R:
        step = found[-1][0]

    return R


def test_resume_latest_without_checkpoint_is_an_error(tmp_path):
    """resume_from='latest' with nothing to resume from must not start over (and truncate the
    metrics of the run the user meant to continue)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / "checkpoint-5.tmp").mkdir()   # an incomplete save does not count
    with pytest.raises(FileNotFoundError, match="no checkpoint found in .*out"):
        train(cfg(tmp_path, resume_from="latest"), student=tiny(), teacher=tiny(48, seed=1),
              train_dataset=blocks())
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_resume_refuses_a_different_data_order(tmp_path):
    """A resume with other settings for what fixes the data order/position (micro batch,
    accumulation, world size, seq_len, data paths, seed) would not continue the run: refused,
    naming the keys, before anything is loaded."""
    data = blocks()
    common = dict(max_steps=4, save_every=2)
    train(cfg(tmp_path, **common), student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    with pytest.raises(ConfigError, match=r"micro_batch_size: 4 in the checkpoint, 2 now"):
        train(cfg(tmp_path, **common, resume_from="latest", micro_batch_size=2), student=tiny(),
              teacher=tiny(48, seed=1), train_dataset=data)
    with pytest.raises(ConfigError, match=r"grad_accum_steps, seed differ"):
        train(cfg(tmp_path, **common, resume_from="latest", grad_accum_steps=2, seed=3),
              student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    state = {"config": cfg(tmp_path, train_data="a/b.txt", seq_len=16).to_dict(), "world_size": 2}
    now = cfg(tmp_path, train_data="a/./b.txt", seq_len=32).to_dict()
    assert [k for k, _, _ in ckpt_lib.resume_mismatch(state, now, 1)] == ["seq_len", "world_size"]
    # what does not move the data (max_steps, lr, ...) may change
    res = train(cfg(tmp_path, max_steps=5, save_every=2, lr=1e-3, resume_from="latest"),
                student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    assert res.step == 5


def _optimizer_spy(monkeypatch):
    """Record (lr, weight decays, betas, eps) of the param groups at every optimizer step."""
    import distill_ops.trainer.loop as loop

    seen, real = [], loop.build_optimizer

    def build(model, config):
        opt = real(model, config)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
            ([g["lr"] for g in o.param_groups], [g["weight_decay"] for g in o.param_groups],
             [tuple(g["betas"]) for g in o.param_groups], [g["eps"] for g in o.param_groups])))
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)
    return seen


def test_resume_uses_the_new_optimizer_settings(tmp_path, monkeypatch):
    """A resume may change lr, the schedule (max_steps, warmup_steps, min_lr_ratio), weight_decay
    and adam_*: from its first step the optimizer follows the new values (the checkpoint's
    optimizer and scheduler state used to bring the old ones back, and a new max_steps came one
    step late); the Adam moments stay."""
    data = blocks()
    first = dict(max_steps=4, save_every=2, lr=3e-3, warmup_steps=1)
    _train_until(cfg(tmp_path, **first), 2, data)
    seen = _optimizer_spy(monkeypatch)
    new = dict(max_steps=6, save_every=2, lr=1e-3, warmup_steps=3, min_lr_ratio=0.5,
               weight_decay=0.0, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6)
    res = train(cfg(tmp_path, **new, resume_from="latest"), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=data)
    want = [1e-3 * lr_factor(s, 3, 6, 0.5) for s in range(2, 6)]
    assert [lrs for lrs, _, _, _ in seen] == [[x, x] for x in want]
    assert all(wd == [0.0, 0.0] and betas == [(0.8, 0.9)] * 2 and eps == [1e-6] * 2
               for _, wd, betas, eps in seen)
    assert [r["lr"] for r in res.history if "loss" in r and r["step"] > 2] == want
    # the builder's split stays: weight decay on matrices only
    seen.clear()
    train(cfg(tmp_path, **dict(new, max_steps=7, weight_decay=0.3), resume_from="latest"),
          student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    assert seen and all(wd == [0.3, 0.0] for _, wd, _, _ in seen)


def test_a_new_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    """An earlier run's checkpoints in output_dir: a new run (no resume_from) is refused before
    anything is written (its checkpoints were pruned in favour of the old ones' higher steps, and
    resume_from='latest' continued the old run); overwrite_output_dir=true deletes them."""
    data, out = blocks(), tmp_path / "out"
    train(cfg(tmp_path, max_steps=2, save_every=1, keep_checkpoints=3), student=tiny(),
          teacher=tiny(48, seed=1), train_dataset=data)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"output_dir '.*out' already holds checkpoints "
                                          r"\(checkpoint-1, checkpoint-2\).*resume_from='latest'"
                                          r".*another output_dir.*overwrite_output_dir"):
        train(cfg(tmp_path, max_steps=1), student=tiny(), teacher=tiny(48, seed=1),
              train_dataset=data)
    assert (out / "metrics.jsonl").read_text() == metrics
    res = train(cfg(tmp_path, max_steps=1, save_final=True, overwrite_output_dir=True),
                student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    assert [s for s, _ in ckpt_lib.list_checkpoints(str(out))] == [1]
    assert res.checkpoint == str(out / "checkpoint-1")


def test_a_resume_refuses_later_checkpoints(tmp_path):
    """Resuming from step s while checkpoints past s are in output_dir is refused (they would
    outrank the resumed run's own in pruning and resume_from='latest'); overwrite_output_dir
    deletes them."""
    data, out = blocks(), tmp_path / "out"
    train(cfg(tmp_path, max_steps=3, save_every=1, keep_checkpoints=3), student=tiny(),
          teacher=tiny(48, seed=1), train_dataset=data)
    first = str(out / "checkpoint-1")
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoint-1 \(step 1\): "
                                          r"output_dir .* holds later checkpoints "
                                          r"\(checkpoint-2, checkpoint-3\)"):
        train(cfg(tmp_path, max_steps=3, resume_from=first), student=tiny(),
              teacher=tiny(48, seed=1), train_dataset=data)
    assert [s for s, _ in ckpt_lib.list_checkpoints(str(out))] == [1, 2, 3]
    res = train(cfg(tmp_path, max_steps=2, save_every=1, resume_from=first,
                    overwrite_output_dir=True), student=tiny(), teacher=tiny(48, seed=1),
                train_dataset=data)
    assert res.step == 2
    assert [s for s, _ in ckpt_lib.list_checkpoints(str(out))] == [1, 2]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from distill_ops.trainer.optim import build_optimizer, build_scheduler

    model, c = tiny(), cfg(tmp_path)
    opt = build_optimizer(model, c)
    sched = build_scheduler(opt, c)
    out = str(tmp_path / "out")
    for step in (10, 2):   # a higher step (another run's) already there
        path = ckpt_lib.save_checkpoint(out, step, model, opt, sched, config=c.to_dict(), keep=1)
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [2] and path.endswith("checkpoint-2")
    for step in (3, 4):
        ckpt_lib.save_checkpoint(out, step, model, opt, sched, config=c.to_dict(), keep=2)
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [3, 4]


def test_resume_logs_the_rows_of_a_straight_run(tmp_path):
    """metrics.jsonl after a resume: the loss averaged since the last logged step and the
    cumulative tokens continue from the checkpoint (they restarted from zero), so the rows are the
    uninterrupted run's; elapsed_s keeps counting."""
    data = blocks()
    common = dict(max_steps=8, log_every=4, save_every=2)
    straight = train(cfg(tmp_path / "a", **common), student=tiny(), teacher=tiny(48, seed=1),
                     train_dataset=data)
    _train_until(cfg(tmp_path / "b", **common), 2, data)
    resumed = train(cfg(tmp_path / "b", **common, resume_from="latest"), student=tiny(),
                    teacher=tiny(48, seed=1), train_dataset=data)

    def rows(res):
        return [(r["step"], r["loss"], r["tokens"], r["lr"]) for r in res.history if "loss" in r]

    assert rows(resumed) == rows(straight) and [r[0] for r in rows(straight)] == [4, 8]
    state = torch.load(os.path.join(resumed.checkpoint, ckpt_lib.STATE_FILE), weights_only=False)
    saved = state["extra"]["metrics"]
    assert saved["seen_tokens"] == 8 * 4 * 24 and saved["train_seconds"] > 0
    assert resumed.tokens_per_s == pytest.approx(saved["seen_tokens"] / saved["train_seconds"])


def test_extra_is_saved_with_the_config(tmp_path):
    """TrainConfig.extra (free-form notes) goes where the config goes: config.yaml and each
    checkpoint's trainer state."""
    notes = {"experiment": "kd-7b", "ticket": 42}
    res = train(cfg(tmp_path, max_steps=1, save_final=True, extra=notes), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=blocks())
    assert TrainConfig.from_yaml(str(tmp_path / "out" / "config.yaml")).extra == notes
    state = torch.load(os.path.join(res.checkpoint, ckpt_lib.STATE_FILE), weights_only=False)
    assert state["config"]["extra"] == notes


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = blocks()
    a = train(cfg(tmp_path / "a", micro_batch_size=8, grad_accum_steps=1, max_steps=3),
              student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    b = train(cfg(tmp_path / "b", micro_batch_size=2, grad_accum_steps=4, max_steps=3),
              student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    assert_same_weights(weights(a.model), weights(b.model), exact=False)


def test_gradient_checkpointing_option(tmp_path):
    a = train(cfg(tmp_path / "a", max_steps=2), student=tiny(layers=2), teacher=tiny(48, seed=1),
              train_dataset=blocks())
    b = train(cfg(tmp_path / "b", max_steps=2, gradient_checkpointing=True), student=tiny(layers=2),
              teacher=tiny(48, seed=1), train_dataset=blocks())
    assert_same_weights(weights(a.model), weights(b.model), exact=False)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "generalized_jsd"])
def test_other_divergences_train(tmp_path, divergence):
    res = train(cfg(tmp_path, divergence=divergence, max_steps=2), student=tiny(),
                teacher=tiny(48, seed=1), train_dataset=blocks())
    assert all(r["loss"] >= 0 for r in res.history if "loss" in r)


@pytest.mark.parametrize("vocab_extra", [0, 8])
def test_fused_linear_trains_like_the_logits_path(tmp_path, vocab_extra):
    """fused_linear (the loss from hidden states and lm_heads, no logits) is the same objective:
    the same losses and weights as kd_loss on the models' logits, tied embeddings included, and
    over the common vocabulary when the teacher's is larger."""
    data = blocks()
    kw = dict(max_steps=3, temperature=2.0, hard_weight=0.3, divergence="jsd",
              vocab="common_prefix" if vocab_extra else "strict", eval_fraction=0.0)
    runs = [train(cfg(tmp_path / str(fused), fused_linear=fused, **kw), student=tiny(),
                  teacher=tiny(48, vocab=V + vocab_extra, seed=1), train_dataset=data)
            for fused in (False, True)]
    losses = [[r["loss"] for r in run.history if "loss" in r] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert_same_weights(weights(runs[0].model), weights(runs[1].model), exact=False)


@pytest.mark.parametrize("targets", ["dense", "topk"])
def test_inplace_grad_trains_like_a_separate_gradient(tmp_path, targets, monkeypatch):
    """inplace_grad (the default: the loss's gradient written over the student logits) changes
    where the gradient lives, not what it is: the same losses and weights, bit for bit."""
    if targets == "topk" and not sparse_available():
        pytest.skip("sparse targets need distill_ops.sparse")
    from distill_ops import sparse
    from distill_ops.trainer import objective

    asked = []   # what the loop passed as inplace_grad while the student needed a gradient
    for owner, name in ((objective, "kd_loss"), (sparse, "sparse_kd_loss")):
        def spy(*args, _fn=getattr(owner, name), **kw):
            if torch.is_grad_enabled():
                asked.append(kw.get("inplace_grad"))
            return _fn(*args, **kw)
        monkeypatch.setattr(owner, name, spy)
    data = blocks()
    kw = dict(max_steps=3, temperature=2.0, hard_weight=0.3, targets=targets, topk=8,
              eval_fraction=0.0)
    runs = [train(cfg(tmp_path / str(inplace), inplace_grad=inplace, **kw), student=tiny(),
                  teacher=tiny(48, seed=1), train_dataset=data) for inplace in (False, True)]
    losses = [[r["loss"] for r in run.history if "loss" in r] for run in runs]
    assert losses[1] == losses[0]
    assert_same_weights(weights(runs[0].model), weights(runs[1].model), exact=True)
    assert set(asked[:len(asked) // 2]) == {False} and set(asked[len(asked) // 2:]) == {True}


def test_fused_linear_refuses_what_it_cannot_compute(tmp_path):
    with pytest.raises(ConfigError, match="fused_linear needs teacher targets"):
        cfg(tmp_path, fused_linear=True, targets="none")
    student = tiny()
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        train(cfg(tmp_path, fused_linear=True), student=student, teacher=tiny(48, seed=1),
              train_dataset=blocks())


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="student model path .*does-not-exist"):
        train(cfg(tmp_path, student=str(tmp_path / "does-not-exist")), train_dataset=blocks())
    with pytest.raises(FileNotFoundError, match="teacher model path"):
        train(cfg(tmp_path, teacher="org/some-hub-name"), student=tiny(), train_dataset=blocks())
    with pytest.raises(ConfigError, match="no teacher model"):
        train(cfg(tmp_path, targets="dense"), student=tiny(), train_dataset=blocks())


def test_unloadable_model_directories_name_the_model_path_and_cause(tmp_path):
    from distill_ops.trainer import ModelLoadError, load_model

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"student model path .*model.safetensors' is a file"):
        load_model(str(a_file), "student")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"teacher model directory .*empty' has no "
                                             r"config.json \(the directory is empty\)"):
        load_model(str(empty), "teacher")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"cannot load the teacher model from .*bad': \w+"):
        load_model(str(bad), "teacher")
    with pytest.raises(ModelLoadError, match=r"cannot load the student model from .*bad'"):
        load_model(str(bad), "student", from_scratch=True)
    no_weights = tmp_path / "no_weights"
    tiny().config.save_pretrained(no_weights)
    with pytest.raises(ModelLoadError, match=r"student model directory .*no_weights' holds no "
                                             r"weights.*student_from_scratch"):
        load_model(str(no_weights), "student")
    assert load_model(str(no_weights), "student", from_scratch=True).config.vocab_size == V
    # a valid config beside a damaged weight file (safetensors' own error was a traceback)
    (no_weights / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match=r"cannot load the teacher model from .*"
                                             r"no_weights': SafetensorError"):
        load_model(str(no_weights), "teacher")
    with pytest.raises(ModelLoadError, match="teacher model path"):
        train(cfg(tmp_path, teacher=str(a_file)), student=tiny(), train_dataset=blocks())


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    from distill_ops.cli import main

    tiny().save_pretrained(tmp_path / "s")
    tiny(48, vocab=V + 8, seed=1).save_pretrained(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()   # save_pretrained's progress bars
    out = ["--output-dir", str(tmp_path / "out"), "--progress", "false"]
    cases = [(["--student", str(tmp_path / "empty")], "student model directory"),
             (["--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "empty")],
              "teacher model directory"),
             (["--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "t")],
              "teacher vocabulary (104) differs")]
    for args, what in cases:
        assert main(["train", *args, *out]) == 2
        err = capsys.readouterr().err   # after transformers' loading bars, if any
        lines = [x for x in err.splitlines() if "error" in x]
        assert len(lines) == 1 and lines[0].startswith("distill-ops train: error: "), err
        assert what in lines[0] and "Traceback" not in err, err
    monkeypatch.setenv("DISTILL_OPS_TRACEBACK", "1")   # bad input with its traceback, on request
    with pytest.raises(ValueError, match="teacher vocabulary"):
        main(["train", *cases[-1][0], *out])
    monkeypatch.delenv("DISTILL_OPS_TRACEBACK")
    import distill_ops.trainer.loop as loop

    def broken(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):   # unexpected: the traceback stays
        main(["train", "--student", str(tmp_path / "s"), *out])


def test_vocab_mismatch(tmp_path):
    teacher = tiny(48, vocab=V + 8, seed=1)
    with pytest.raises(ValueError, match="vocabulary.*common_prefix"):
        train(cfg(tmp_path), student=tiny(), teacher=teacher, train_dataset=blocks())
    res = train(cfg(tmp_path, vocab="common_prefix", max_steps=2), student=tiny(), teacher=teacher,
                train_dataset=blocks())
    assert res.step == 2


def test_teacher_tokenizer_must_match_the_students(tmp_path):
    """Same vocabulary size, other tokenizer: refused unless vocab='common_prefix' (a warning);
    tokenizer files that differ without changing the vocabulary (model_max_length) pass."""
    import shutil
    import warnings

    docs_a = ["import os\nprint(os.getcwd())\n" * 30, "Lists are mutable sequences. " * 40] * 3
    docs_b = ["SELECT name FROM users WHERE id = 1;\n" * 30, "Quick brown foxes jump. " * 40] * 3
    tok_a = train_bpe_tokenizer(docs_a, 300, str(tmp_path / "s"))
    tok_b = train_bpe_tokenizer(docs_b, 300, str(tmp_path / "t"))
    assert len(tok_a) == len(tok_b)
    tiny(vocab=len(tok_a)).save_pretrained(tmp_path / "s")
    tiny(48, vocab=len(tok_b), seed=1).save_pretrained(tmp_path / "t")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(docs_a))
    kw = dict(student=str(tmp_path / "s"), teacher=str(tmp_path / "t"), train_data=str(corpus),
              seq_len=16, max_steps=1, eval_fraction=0.0)
    with pytest.raises(ConfigError, match=r"teacher's tokenizer .*t\) differs from the student's "
                                          r".*token id \d+ is .*common_prefix"):
        train(cfg(tmp_path, **kw))
    with pytest.warns(UserWarning, match="differs from the student's.*vocab='common_prefix'"):
        assert train(cfg(tmp_path, vocab="common_prefix", **kw)).step == 1
    # the same vocabulary in other files: no complaint
    shutil.rmtree(tmp_path / "t")
    tiny(48, vocab=len(tok_a), seed=1).save_pretrained(tmp_path / "t")
    tok_a.save_pretrained(tmp_path / "t")
    conf = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    conf["model_max_length"] = 12345
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(conf))
    from distill_ops.targets.cache import tokenizer_hash

    assert tokenizer_hash(tmp_path / "s") != tokenizer_hash(tmp_path / "t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(cfg(tmp_path, **kw)).step == 1
    # a teacher directory without a tokenizer: the size check only
    for name in os.listdir(tmp_path / "t"):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(tmp_path / "t" / name)
    assert train(cfg(tmp_path, **kw)).step == 1


# ---------------------------------------------------------------------------------------------
# sparse targets (distill_ops.sparse), when present


needs_sparse = pytest.mark.skipif(not sparse_available(), reason="distill_ops.sparse is missing")


@needs_sparse
@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_online_topk_targets(tmp_path, tail):
    res = train(cfg(tmp_path, targets="topk", topk=8, tail=tail, max_steps=3, hard_weight=0.2),
                student=tiny(), teacher=tiny(48, seed=1), train_dataset=blocks())
    assert res.step == 3 and all(r["loss"] >= 0 for r in res.history if "loss" in r)


@needs_sparse
def test_online_sampled_targets(tmp_path, monkeypatch):
    """targets='sample': fresh draws every micro-batch (the seed hashes the run's seed, step,
    micro-batch, rank and chunk) and the same objective through the fused-linear path."""
    from distill_ops.trainer.objective import sample_seed

    c = cfg(tmp_path / "c", targets="sample")
    seeds = {sample_seed(c, step, micro, rank, chunk) for step in range(20) for micro in range(3)
             for rank in range(2) for chunk in range(2)}
    assert len(seeds) == 20 * 3 * 2 * 2 and all(0 <= x < 2 ** 63 for x in seeds)
    data = blocks()
    kw = dict(targets="sample", num_samples=6, max_steps=3, temperature=1.5, hard_weight=0.2,
              eval_fraction=0.0)
    runs = [train(cfg(tmp_path / str(fused), fused_linear=fused, **kw), student=tiny(),
                  teacher=tiny(48, seed=1), train_dataset=data) for fused in (False, True)]
    losses = [[r["loss"] for r in run.history if "loss" in r] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # the loop seeds each micro-batch's draws with sample_seed(step, micro, rank, chunk 0)
    from distill_ops import sparse

    used = []
    real = sparse.teacher_sample

    def spy(*args, seed, **kwargs):
        used.append(seed)
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr(sparse, "teacher_sample", spy)
    c = cfg(tmp_path / "s", grad_accum_steps=2, **{**kw, "max_steps": 2})
    train(c, student=tiny(), teacher=tiny(48, seed=1), train_dataset=data)
    assert used == [sample_seed(c, step, micro, 0, 0) for step in range(2) for micro in range(2)]
    with pytest.raises(ConfigError, match="tail='renorm'"):
        cfg(tmp_path, targets="sample", tail="tail")
    with pytest.raises(ConfigError, match="proposal_temperature"):
        cfg(tmp_path, targets="sample", proposal_temperature=0.0)


@needs_sparse
def test_full_topk_equals_dense(tmp_path):
    """k = V top-k targets hold the whole teacher distribution: the sparse loss trains exactly
    like the dense one (online top-k and the offline cache alike)."""
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks()
    kw = dict(max_steps=3, temperature=1.0, hard_weight=0.3, eval_fraction=0.0)
    dense = train(cfg(tmp_path / "d", **kw), student=tiny(), teacher=tiny(48, seed=1),
                  train_dataset=data)
    topk = train(cfg(tmp_path / "k", targets="topk", topk=V, **kw), student=tiny(),
                 teacher=tiny(48, seed=1), train_dataset=data)
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=V, dtype="float32", progress=False)
    cached = train(cfg(tmp_path / "c", targets="cache", cache=str(tmp_path / "cache"), **kw),
                   student=tiny())
    ref = [r["loss"] for r in dense.history if "loss" in r]
    for other in (topk, cached):
        assert [r["loss"] for r in other.history if "loss" in r] == pytest.approx(ref, rel=1e-4)
        assert_same_weights(weights(dense.model), weights(other.model), exact=False)


@needs_sparse
def test_cache_targets_with_held_out_split(tmp_path):
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks()
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=8, progress=False)
    res = train(cfg(tmp_path, targets="cache", cache=str(tmp_path / "cache"), eval_fraction=0.25,
                    max_steps=3), student=tiny())
    final = [r for r in res.history if "eval_ppl" in r][-1]
    assert final["eval_tokens"] == 12 * 23 and 0 <= final["eval_top1"] <= 1
    with pytest.raises(Exception, match="vocab"):
        train(cfg(tmp_path, targets="cache", cache=str(tmp_path / "cache")),
              student=tiny(vocab=V + 4))


@needs_sparse
def test_a_cache_matches_the_students_vocabulary_not_its_files(tmp_path):
    """The cache stores token ids: the student's tokenizer must have the cache's vocabulary. The
    check compared the tokenizer files' sha256, so the same tokenizer re-saved with a chat
    template was refused; another vocabulary still is."""
    import shutil

    from distill_ops.targets.cache import CacheError, tokenizer_hashes, write_teacher_cache

    docs = ["import os\nprint(os.getcwd())\n" * 30, "Lists are mutable sequences. " * 40] * 3
    tok = train_bpe_tokenizer(docs, V, str(tmp_path / "tok"))
    data = blocks()
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=8, progress=False,
                        tokenizer_hash=tokenizer_hashes(tmp_path / "tok")[0])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path / "resaved")
    kw = dict(targets="cache", cache=str(tmp_path / "cache"), max_steps=1)
    assert train(cfg(tmp_path / "a", tokenizer=str(tmp_path / "resaved"), **kw),
                 student=tiny()).step == 1
    shutil.copytree(tmp_path / "resaved", tmp_path / "other")
    spec = json.loads((tmp_path / "other" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]       # two tokens swap ids
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CacheError, match="another vocabulary"):
        train(cfg(tmp_path / "b", tokenizer=str(tmp_path / "other"), **kw), student=tiny())


@needs_sparse
def test_cache_shards_are_verified_once_per_node(tmp_path, monkeypatch):
    """Every rank hashed every shard of the cache at start-up; now local rank 0 does."""
    import distill_ops.targets.cache as cache_mod
    from distill_ops.trainer import dist

    data = blocks()
    cache_mod.write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, 48, 8)],
                                  tmp_path / "cache", k=8, progress=False)
    seen = []
    real = cache_mod.TargetCache.__init__

    def spy(self, *args, verify=True, **kwargs):
        seen.append(verify)
        real(self, *args, verify=verify, **kwargs)

    monkeypatch.setattr(cache_mod.TargetCache, "__init__", spy)
    kw = dict(targets="cache", cache=str(tmp_path / "cache"), max_steps=1)
    for local in (0, 1):
        monkeypatch.setattr(dist, "local_rank", lambda local=local: local)
        train(cfg(tmp_path / str(local), **kw), student=tiny())
    assert seen == [True, False]


@needs_sparse
def test_cache_fixes_the_data(tmp_path):
    """With targets='cache' the sequences come from the cache: train_data is an error (it would
    be ignored), and an explicit seq_len must be the cache's sequence length."""
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks()   # sequences of 24 tokens
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=8, progress=False)
    kw = dict(targets="cache", cache=str(tmp_path / "cache"), max_steps=1)
    with pytest.raises(ConfigError, match=r"train_data='nope.txt' would not be used.*cache fixes"):
        cfg(tmp_path, train_data="nope.txt", **kw)
    with pytest.raises(ConfigError, match=r"seq_len=16 but the target cache .* length 24"):
        train(cfg(tmp_path, seq_len=16, **kw), student=tiny())
    assert train(cfg(tmp_path, seq_len=24, **kw), student=tiny()).step == 1
    assert train(cfg(tmp_path, **kw), student=tiny()).step == 1   # seq_len left at its default


@needs_sparse
def test_a_sampled_cache_needs_renorm(tmp_path):
    """Sampled targets stand for the whole distribution (no tail mass): with tail='tail' a
    reverse-KL run logged an infinite loss, then NaN weights, and exited 0. It is refused."""
    from distill_ops.targets.cache import CacheError, write_teacher_cache

    data = blocks()
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=8, mode="sample", progress=False)
    kw = dict(targets="cache", cache=str(tmp_path / "cache"), max_steps=1)
    with pytest.raises(CacheError, match="holds sampled targets: they need tail='renorm'"):
        train(cfg(tmp_path, tail="tail", divergence="reverse_kl", **kw), student=tiny())
    assert train(cfg(tmp_path, **kw), student=tiny()).step == 1


@needs_sparse
def test_cache_of_ragged_sequences_trains_and_accumulates_exactly(tmp_path):
    """A cache written from right-padded batches keeps each sequence's own length, so a
    micro-batch mixes lengths: collate pads the target ids with -1 (a 0 repeated id 0, which
    sparse_kd_loss refuses), and 2 x 2 accumulation equals one batch of 4 although the
    micro-batches hold different numbers of tokens."""
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks(n=8, t=12)
    mask = torch.ones_like(data)
    for row, length in enumerate([3, 12, 12, 5, 7, 12, 2, 9]):
        mask[row, length:] = 0
    write_teacher_cache(tiny(48, seed=1), [(data[i:i + 4], mask[i:i + 4]) for i in (0, 4)],
                        tmp_path / "cache", k=8, progress=False)
    kw = dict(targets="cache", cache=str(tmp_path / "cache"), max_steps=2, eval_fraction=0.0,
              hard_weight=0.5)
    one = train(cfg(tmp_path / "a", micro_batch_size=4, grad_accum_steps=1, **kw), student=tiny())
    acc = train(cfg(tmp_path / "b", micro_batch_size=2, grad_accum_steps=2, **kw), student=tiny())
    assert_same_weights(weights(one.model), weights(acc.model), exact=False)


def test_collate_pads_cached_target_ids_with_minus_one():
    items = [{"input_ids": torch.tensor([1, 2]), "ids": torch.tensor([[3, 4], [5, 6]]),
              "logprobs": torch.zeros(2, 2)},
             {"input_ids": torch.tensor([7]), "ids": torch.tensor([[8, 9]]),
              "logprobs": torch.zeros(1, 2)}]
    out = collate(items)
    assert out["ids"].tolist() == [[[3, 4], [5, 6]], [[8, 9], [-1, -1]]]
    assert out["logprobs"].shape == (2, 2, 2) and out["input_ids"].tolist() == [[1, 2], [7, 0]]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_train_from_yaml_with_text_data(tmp_path, capsys):
    from distill_ops.cli import main

    docs = ["import os\nprint(os.getcwd())\n" * 30, "Lists are mutable sequences. " * 40] * 3
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = train_bpe_tokenizer(docs, 200, str(tmp_path / "student"))
    tiny(vocab=len(tok)).save_pretrained(tmp_path / "student")
    tiny(48, vocab=len(tok), seed=1).save_pretrained(tmp_path / "teacher")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        f"student: {tmp_path / 'student'}\nteacher: {tmp_path / 'teacher'}\n"
        f"train_data: {corpus}\nseq_len: 16\nmicro_batch_size: 4\nmax_steps: 5\n"
        f"output_dir: {tmp_path / 'run'}\nprogress: false\neval_fraction: 0.2\n")
    assert main(["train", "--config", str(yaml_path), "--max-steps", "3", "--temperature",
                 "2.0"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_ppl" in r for r in rows)

    yaml_path.write_text(yaml_path.read_text() + "temprature: 2\n")
    assert main(["train", "--config", str(yaml_path)]) == 2
    assert "unknown config key 'temprature'" in capsys.readouterr().err
    assert main(["train", "--student", str(tmp_path / "nope"), "--targets", "none",
                 "--train-data", str(corpus)]) == 2
    assert "student model path" in capsys.readouterr().err


def test_cli_cache_teacher_delegates_or_explains(capsys, monkeypatch):
    import sys
    import types

    from distill_ops.cli import main

    fake = types.ModuleType("distill_ops.targets.cache_cli")
    seen = {}
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "distill_ops.targets.cache_cli", fake)
    assert main(["cache-teacher", "--k", "8"]) == 0 and seen["argv"] == ["--k", "8"]
    monkeypatch.setitem(sys.modules, "distill_ops.targets.cache_cli", None)  # import fails
    assert main(["cache-teacher"]) == 2
    assert "not available" in capsys.readouterr().err
    assert main(["bogus"]) == 2


@needs_sparse
@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_fused_linear_sparse_targets_train_like_the_logits_path(tmp_path, tail):
    """fused_linear with online top-k targets (made from chunks of the teacher's lm_head(hidden))
    and with cached targets: the same losses and weights as the logits path."""
    from distill_ops.targets.cache import write_teacher_cache

    data = blocks()
    kw = dict(max_steps=3, temperature=1.5, hard_weight=0.3, eval_fraction=0.0, tail=tail, topk=8)
    write_teacher_cache(tiny(48, seed=1), [data[i:i + 8] for i in range(0, len(data), 8)],
                        tmp_path / "cache", k=8, temperature=1.5, dtype="float32", progress=False)
    for targets in ("topk", "cache"):
        extra = dict(cache=str(tmp_path / "cache")) if targets == "cache" else {}
        runs = [train(cfg(tmp_path / f"{targets}{fused}", targets=targets, fused_linear=fused,
                          **extra, **kw), student=tiny(),
                      teacher=tiny(48, seed=1) if targets == "topk" else None,
                      train_dataset=None if targets == "cache" else data)
                for fused in (False, True)]
        losses = [[r["loss"] for r in run.history if "loss" in r] for run in runs]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), targets
        # Adam turns the last-bit differences of chunked GEMMs into ~1e-5 weight differences
        # (3 steps of lr 3e-3); a wrong gradient moves them by a whole step
        a, b = weights(runs[0].model), weights(runs[1].model)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5,
                                       msg=f"{targets} {key}")

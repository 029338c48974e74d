"""End to end: TRL's own DistillationTrainer trains with patch_distillation_trainer() installed.

Two tiny randomly initialised Llamas (student hidden 32, teacher hidden 48, one shared vocabulary)
and a WordLevel tokenizer built in memory (no downloads). Each case trains twice from identical
seeds for 2 optimizer steps of 2 micro-batches each (on-policy generation from the student, plain
text prompts, no vLLM): once with TRL's ``_chunked_divergence_loss``, once after
``patch_distillation_trainer()``. The runs must sample the same completions, log the same losses,
gradient norms and entropies, and end on the same student weights.

SGD rather than the default AdamW: Adam's update barely depends on the scale of the gradient, so
the weight comparison would not see a loss that is off by a constant factor.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings

import pytest
import torch

from distill_ops.integrations import trl as dtrl
from oracle import INTERPRETER_NOISE

pytestmark = [INTERPRETER_NOISE, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("one_intraop_thread")]

WORDS = 253                    # + 3 special tokens = a vocabulary of 256
PAD, EOS, UNK = 0, 1, 2
# Extra end-of-completion ids (the student's generation_config; TRL stops and masks at any of
# them), so that some completions end early and the completion mask has holes.
STOP_IDS = list(range(3, 3 + WORDS, 8))
MAX_STEPS, BATCH, ACCUM, MAX_COMPLETION = 2, 2, 2, 5
MICRO_STEPS = MAX_STEPS * ACCUM


def trl_distillation():
    """(the trl.trainer.distillation_trainer module, DistillationTrainer, DistillationConfig)."""
    try:
        module = importlib.import_module(dtrl.DISTILLATION_MODULE)
        trainer_cls = module.DistillationTrainer
        config_cls = importlib.import_module("trl").DistillationConfig
    except Exception as e:  # trl missing, too old, or one of its dependencies is
        pytest.skip(f"trl's DistillationTrainer cannot be imported: {e!r}")
    if not callable(getattr(module, "_chunked_divergence_loss", None)):
        pytest.skip(f"{dtrl.DISTILLATION_MODULE} has no _chunked_divergence_loss (another trl)")
    return module, trainer_cls, config_cls


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i + 3 for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="module")
def prompts():
    """MAX_STEPS * ACCUM * BATCH plain-text prompts of 2 to 6 words (one epoch exactly)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(MAX_STEPS * ACCUM * BATCH):
        n = int(torch.randint(2, 7, (1,), generator=g))
        out.append(" ".join(f"w{i}" for i in torch.randint(0, WORDS, (n,), generator=g).tolist()))
    return out


def llama(vocab_size, hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.3: peaked logits, so a divergence and updates worth comparing
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         initializer_range=0.3, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=None)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)


def train(out_dir, tokenizer, prompts, beta, temperature):
    """One seeded DistillationTrainer run; returns what it did."""
    from datasets import Dataset

    module, trainer_cls, config_cls = trl_distillation()
    student = llama(len(tokenizer), 32, seed=1)
    teacher = llama(len(tokenizer), 48, seed=2)
    student.generation_config.eos_token_id = [EOS, *STOP_IDS]
    initial = copy.deepcopy(student.state_dict())
    args = config_cls(   # max_grad_norm: no clipping, the update follows the gradient
        output_dir=str(out_dir), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_completion_length=MAX_COMPLETION, beta=beta,
        temperature=temperature, optim="sgd", learning_rate=2.0, lr_scheduler_type="constant",
        max_grad_norm=1e9, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, fp16=False, seed=1234, use_vllm=False, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer)

    generated = []   # (prompt ids, completion ids, completion mask) of each generation batch
    generate = trainer._generate_and_score_completions

    def recording_generate(inputs):
        batch = generate(inputs)
        generated.append(tuple(batch[k].detach().cpu().clone()
                               for k in ("prompt_ids", "completion_ids", "completion_mask")))
        return batch

    trainer._generate_and_score_completions = recording_generate

    calls = []       # what the trainer passed to, and got from, _chunked_divergence_loss
    installed = module._chunked_divergence_loss

    def recording_loss(*a, **kw):
        loss, entropy_sum, n_valid = installed(*a, **kw)
        calls.append(dict(fn=installed, shapes=[tuple(x.shape) for x in a[:5]], beta=a[5],
                          kwargs={k: v for k, v in kw.items() if not torch.is_tensor(v)},
                          num_items=kw.get("num_items_in_batch"), loss=loss.detach().clone(),
                          entropy_sum=entropy_sum.detach().clone(), n_valid=int(n_valid),
                          requires_grad=loss.requires_grad))
        return loss, entropy_sum, n_valid

    module._chunked_divergence_loss = recording_loss
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = trainer.train()
    finally:
        module._chunked_divergence_loss = installed
    steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return dict(global_step=trainer.state.global_step, train_loss=result.training_loss,
                steps=steps, calls=calls, generated=generated, initial=initial, final=final)


CASES = [  # (beta, temperature, entropy): TRL's default reverse KL, the JSD, forward KL
    pytest.param(1.0, 1.0, True, id="reverse_kl"),
    pytest.param(0.5, 2.0, True, id="jsd_T2"),
    pytest.param(0.0, 0.8, False, id="forward_kl_T0.8_no_entropy"),
]


@pytest.mark.parametrize("beta,temperature,entropy", CASES)
def test_distillation_trainer_trains_with_the_patch(tmp_path, monkeypatch, tokenizer, prompts,
                                                    beta, temperature, entropy):
    module, _, _ = trl_distillation()
    trl_fn = module._chunked_divergence_loss
    assert trl_fn.__module__ == dtrl.DISTILLATION_MODULE, "a patch was left installed"

    ours_calls = []   # every call that reaches distill_ops' chunked_divergence_loss
    real = dtrl.chunked_divergence_loss

    def spy(*a, **kw):
        ours_calls.append(kw.get("entropy"))
        return real(*a, **kw)

    monkeypatch.setattr(dtrl, "chunked_divergence_loss", spy)

    ref = train(tmp_path / "trl", tokenizer, prompts, beta, temperature)
    assert ours_calls == []
    dtrl.patch_distillation_trainer(entropy=entropy)
    try:
        assert module._chunked_divergence_loss is not trl_fn
        got = train(tmp_path / "distill_ops", tokenizer, prompts, beta, temperature)
    finally:
        dtrl.unpatch_distillation_trainer()
    assert module._chunked_divergence_loss is trl_fn

    # Both trained to the end, each micro-batch through the installed loss, ours in the second.
    for run in (ref, got):
        assert run["global_step"] == MAX_STEPS
        assert [h["step"] for h in run["steps"]] == list(range(1, MAX_STEPS + 1))
        assert math.isfinite(run["train_loss"])
        assert len(run["calls"]) == MICRO_STEPS
        assert all(c["requires_grad"] for c in run["calls"])
    assert all(c["fn"] is trl_fn for c in ref["calls"])
    assert all(c["fn"] is not trl_fn for c in got["calls"])
    assert ours_calls == [entropy] * MICRO_STEPS

    # What TRL hands the loss: (B, K, H) hidden states of each model, its own (V, H) lm_head
    # weight, a (B, K) completion mask, no biases / scales / softcaps for Llama, the config's
    # temperature, and the count of completion tokens in the whole generation batch.
    for c_ref, c_got in zip(ref["calls"], got["calls"]):
        (b, k, h_s), (_, _, h_t), w_s, w_t, mask = c_ref["shapes"]
        assert (b, h_s, h_t) == (BATCH, 32, 48) and k <= MAX_COMPLETION
        assert w_s == (len(tokenizer), 32) and w_t == (len(tokenizer), 48) and mask == (b, k)
        assert c_ref["beta"] == c_got["beta"] == beta
        assert c_ref["kwargs"] == c_got["kwargs"]
        assert c_ref["kwargs"]["temperature"] == temperature
        assert int(c_ref["num_items"]) >= c_ref["n_valid"]

    # Each call's result. The first optimizer step's micro-batches were sampled from the same
    # initial student, so their inputs are identical in both runs; later ones only if the updated
    # students sampled the same completions (checked first, to say so when they did not).
    for i, (c_ref, c_got) in enumerate(zip(ref["calls"], got["calls"])):
        if i and i % ACCUM == 0:
            batch = i // ACCUM
            assert torch.equal(ref["generated"][batch][1], got["generated"][batch][1]), \
                f"the students sampled different completions after {batch} optimizer step(s)"
        assert c_got["shapes"] == c_ref["shapes"]
        assert int(c_got["num_items"]) == int(c_ref["num_items"])
        assert c_got["n_valid"] == c_ref["n_valid"]
        torch.testing.assert_close(c_got["loss"], c_ref["loss"], rtol=1e-4, atol=1e-7)
        if entropy:
            torch.testing.assert_close(c_got["entropy_sum"], c_ref["entropy_sum"], rtol=1e-4,
                                       atol=1e-5)
        else:   # NaN, which TRL's logger drops
            assert math.isnan(float(c_got["entropy_sum"]))

    # Identical on-policy samples (the second generation batch comes from the once-updated
    # student), with some completions ending early so that the mask has holes.
    assert len(ref["generated"]) == len(got["generated"]) == MAX_STEPS
    for batch_ref, batch_got in zip(ref["generated"], got["generated"]):
        for a, b in zip(batch_ref, batch_got):
            assert torch.equal(a, b)
    assert any(bool((m == 0).any()) for _, _, m in ref["generated"]), "no completion ended early"

    # The same logged losses, gradient norms and entropies.
    assert ref["steps"][0]["loss"] > 1e-2   # not a vanishing divergence
    for s_ref, s_got in zip(ref["steps"], got["steps"]):
        assert s_got["loss"] == pytest.approx(s_ref["loss"], rel=1e-4)
        assert s_got["grad_norm"] == pytest.approx(s_ref["grad_norm"], rel=1e-4)
        if entropy:
            assert s_got["entropy"] == pytest.approx(s_ref["entropy"], rel=1e-4)
        else:
            assert s_got["entropy"] is None and s_ref["entropy"] > 0
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)

    # The same student at the end, and it moved far more than the tolerance.
    assert ref["final"].keys() == got["final"].keys()
    moved = 0.0
    for name, w_ref in ref["final"].items():
        torch.testing.assert_close(got["final"][name], w_ref, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, float((w_ref - ref["initial"][name]).abs().max()))
    assert moved > 1e-2

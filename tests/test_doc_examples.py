"""The documentation's examples, run as written.

README.md's Python blocks are executed in order, in one namespace, on a tiny random Llama (no
hub); each block's loss is then held against the float64 oracle (the compiled schedule's against
the float temperature's, with its graph count), and the "Full signature" block against kd_loss's
real signature. docs/trainer.md's runnable blocks (the thin trainer, the
transformers.Trainer subclass on a teacher and on a target cache) train for real on tiny models.
An example that drifts from the API (a renamed keyword, a changed default, an attribute that
moved) fails here instead of in a user's first five minutes.
"""

import ast
import inspect
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch

from distill_ops import kd_loss
from oracle import oracle, rel_err
from sparse_oracle import sparse_oracle

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TRAINER_DOC = ROOT / "docs" / "trainer.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
V = 131  # odd on purpose (no block size divides it), and above the example's k = 64


def fenced_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced code blocks tagged ``lang`` ("" for untagged), in order."""
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def tiny_llama(seed: int):
    """The trainer's random Llama, its lm_head (untied) scaled so that the logits spread over a
    few units: at a fresh init's (std 0.1) temperatures 2 and 3 gave the same loss to 1e-5."""
    from distill_ops.trainer.models import llama

    model = llama(V, 32, 1, heads=4, kv_heads=2, intermediate=64, max_positions=32, tie=False,
                  seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)
    return model


@pytest.fixture(scope="module")
def ran():
    """The namespace after each README Python block, in order, with the student's lm_head
    gradient at that point as ``lm_head_grad`` (a copy: later blocks accumulate into it) and
    the graphs torch.compile made so far as ``graphs_so_far``."""
    from torch._dynamo.utils import counters

    pytest.importorskip("transformers")
    blocks = fenced_blocks(README.read_text(), "python")
    assert len(blocks) == 4, "README's Python examples changed: update this test with them"
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (2, 9), generator=g)
    labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[0, 3] = -100
    model = tiny_llama(0)
    ns = {"model": model, "student": model, "teacher": tiny_llama(1).eval(),
          "input_ids": input_ids, "labels": labels}
    after = []
    torch._dynamo.reset()
    counters.clear()
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
        grad = model.lm_head.weight.grad
        after.append(dict(ns, lm_head_grad=None if grad is None else grad.clone(),
                          graphs_so_far=counters["stats"]["unique_graphs"]))
    return after


def test_the_kd_loss_example_gives_the_oracle_s_loss(ran):
    """Block 1's kd_loss (forward KL at temperature 2 with half a CE term) is backpropagated: the
    lm_head's gradient is the oracle's logits gradient taken through the model. The block ends
    with KDLoss(divergence="jsd", beta=0.5, temperature=1.0) on the same logits."""
    ns = ran[0]
    s, t, labels, model = ns["student_logits"], ns["teacher_logits"], ns["labels"], ns["model"]
    assert s.shape == (2, 9, V) and s.requires_grad and not t.requires_grad
    _, grad = oracle(s, t, labels, temperature=2.0, hard_weight=0.5, soft_weight=1.0)
    w = model.lm_head.weight
    (want,) = torch.autograd.grad(model(ns["input_ids"]).logits, w, grad.to(s.dtype))
    assert rel_err(ns["lm_head_grad"], want) < 1e-4

    ref, _ = oracle(s, t, labels, divergence="jsd", beta=0.5, temperature=1.0)
    assert rel_err(ns["loss"], ref) < 1e-5


def test_the_schedule_example_compiles_once(ran):
    """Block 2 changes a tensor temperature between compiled calls: its last loss is the float
    temperature's, and one graph served the three values."""
    ns = ran[1]
    s, t = ns["student_logits"], ns["teacher_logits"]
    assert torch.equal(ns["loss"], kd_loss(s, t, temperature=2.0, divergence="jsd"))
    assert ns["graphs_so_far"] == 1


def test_the_fused_linear_example_gives_kd_loss_on_the_projected_logits(ran):
    ns = ran[2]
    s = ns["h_s"] @ ns["student"].lm_head.weight.T
    t = ns["h_t"] @ ns["teacher"].lm_head.weight.T
    ref, _ = oracle(s, t, ns["labels"], hard_weight=0.5, temperature=2.0)
    assert rel_err(ns["loss"], ref) < 1e-5


def test_the_sparse_example_gives_the_oracle_s_loss(ran):
    ns = ran[3]
    targets, s = ns["targets"], ns["student_logits"]
    assert targets.ids.shape == (2, 9, 64)
    ref, _ = sparse_oracle(s, targets.ids, targets.logprobs, labels=ns["labels"], hard_weight=0.5,
                           temperature=1.0, tail="renorm")
    assert rel_err(ns["loss"], ref) < 1e-5


def _signature_of(block: str, name: str) -> inspect.Signature:
    """The signature a README block writes as ``name(args) -> T``, read by Python's parser."""
    call = " ".join(block.split())
    assert call.startswith(name + "("), block
    header = "def " + call.split(" -> ")[0] + ": pass"
    fn = ast.parse(header).body[0]
    params = []
    for arg in fn.args.args:
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    defaults = [ast.literal_eval(d) for d in fn.args.kw_defaults]
    for arg, default in zip(fn.args.kwonlyargs, defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params)


def test_the_full_signature_block_is_kd_loss_s_signature():
    (block,) = [b for b in fenced_blocks(README.read_text(), "") if b.startswith("kd_loss(")]
    written = _signature_of(block, "kd_loss")
    real = inspect.signature(kd_loss).replace(return_annotation=inspect.Signature.empty)
    real = real.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                    for p in real.parameters.values()])
    assert written == real



# ----------------------------------------------------------------------------- docstrings


def docstring_example(obj) -> str:
    """The indented block after ``Example::`` in ``obj``'s docstring, dedented."""
    doc = inspect.getdoc(obj)
    assert "Example::" in doc, obj
    lines = doc.split("Example::", 1)[1].splitlines()
    body = [ln for ln in lines[1:] if ln.strip() or not ln]
    return textwrap.dedent("\n".join(body)).strip() + "\n"


@pytest.mark.parametrize("name", ["KDLoss", "FusedLinearKDLoss", "SparseKDLoss"])
def test_the_loss_modules_docstring_examples_run(ran, name):
    """Each module's example, with the README's tensors: a finite scalar loss with a gradient."""
    import distill_ops

    ns = dict(ran[2], **{name: getattr(distill_ops, name)}, teacher_topk=distill_ops.teacher_topk,
              h_student=ran[2]["h_s"], h_teacher=ran[2]["h_t"])
    exec(compile(docstring_example(getattr(distill_ops, name)), name, "exec"), ns)
    loss = ns["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad


def test_the_cache_writer_docstring_example_writes_a_readable_cache(tmp_path, monkeypatch):
    from distill_ops import teacher_topk
    from distill_ops.targets import TargetCache, TargetCacheWriter

    monkeypatch.chdir(tmp_path)
    teacher = tiny_llama(1).eval()
    batches = [torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    ns = dict(TargetCacheWriter=TargetCacheWriter, teacher_topk=teacher_topk, V=V,
              teacher=teacher, batches=batches)
    with torch.no_grad():
        exec(compile(docstring_example(TargetCacheWriter), "TargetCacheWriter", "exec"), ns)
    cache = TargetCache("cache/", expect_vocab_size=V)
    assert len(cache) == 6 and torch.equal(cache[5]["input_ids"], batches[2][1])


# ----------------------------------------------------------------------------- docs/trainer.md


@pytest.fixture
def trainer_doc(tmp_path, monkeypatch):
    """docs/trainer.md's Python blocks, and the names they assume, in a scratch directory (the
    examples write their outputs relative to it)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from distill_ops.trainer.data import train_bpe_tokenizer
    from distill_ops.trainer.models import llama

    monkeypatch.chdir(tmp_path)
    blocks = fenced_blocks(TRAINER_DOC.read_text(), "python")
    assert len(blocks) == 6, "docs/trainer.md's Python examples changed: update this test"
    tok = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog. " * 20,
                               "def f(x):\n    return x + 1\n" * 20], 300)
    v = len(tok)
    data = torch.randint(2, v, (32, 16), generator=torch.Generator().manual_seed(0))
    names = dict(tok=tok, tokenizer=tok, data=data,
                 student=llama(v, 32, 1, heads=2, max_positions=64, seed=0),
                 teacher=llama(v, 48, 1, heads=2, max_positions=64, seed=1))
    return blocks, names


def test_the_thin_trainer_example_trains(trainer_doc):
    blocks, names = trainer_doc
    ns = dict(student_model=names["student"], teacher_model=names["teacher"], tok=names["tok"],
              token_blocks=names["data"][:24], held_out=names["data"][24:])
    exec(compile(blocks[0], str(TRAINER_DOC), "exec"), ns)
    result = ns["result"]
    assert result.model is names["student"] and result.step == 500
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert losses[-1] < losses[0]
    assert {"eval_ce", "eval_kl"} <= set(result.final_eval)


def _rows(data: torch.Tensor) -> list:
    return [{"input_ids": row} for row in data]


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true")
def test_the_trainer_subclass_examples_train(trainer_doc):
    """The DistillationTrainer example on a teacher (without ``bf16=True`` when there is no GPU,
    as its comment says), then the one on a target cache, written here from the same teacher."""
    from distill_ops import teacher_topk
    from distill_ops.targets import TargetCacheWriter

    blocks, names = trainer_doc
    block = blocks[1]
    if not torch.cuda.is_available():
        assert "bf16=True" in block
        block = block.replace("bf16=True", "bf16=False")
    student = names["student"]
    before = student.lm_head.weight.detach().clone()
    ns = dict(names, train_ds=_rows(names["data"]))
    exec(compile(block, str(TRAINER_DOC), "exec"), ns)
    assert ns["trainer"].state.global_step > 0
    assert not torch.equal(student.lm_head.weight, before)

    with torch.no_grad(), TargetCacheWriter("cache/", vocab_size=student.config.vocab_size,
                                            mode="topk", k=8, temperature=1.0) as w:
        w.add(names["data"], teacher_topk(names["teacher"](names["data"]).logits, 8))
    exec(compile(blocks[2], str(TRAINER_DOC), "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.teacher_model is None
    before = student.lm_head.weight.detach().clone()
    loss = trainer.train().training_loss
    assert trainer.state.global_step > 0 and math.isfinite(loss) and loss > 0
    assert not torch.equal(student.lm_head.weight, before)

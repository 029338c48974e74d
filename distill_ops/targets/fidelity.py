"""How much of the teacher each kind of sparse target keeps, per byte: writes docs/fidelity.md.

    python -m distill_ops.targets.fidelity --out docs/fidelity.md [--steps 300] [--quick]

The teacher is real but small: a Llama-architecture causal LM (transformers config, random init)
briefly trained here on the Python standard library's source (no downloads), with a byte-level BPE
tokenizer trained on the same text. An early checkpoint of the same run plays the student. On
held-out positions the full teacher distribution p (tau = 1) is compared with what each target kind
reconstructs, at equal storage per token:

    topk-renorm   the k most likely ids, p renormalised over them
    topk-tail     the same k, plus the exact tail mass (spread uniformly over the other ids)
    sample        k draws from p (or from a tempered proposal), importance-weighted, merged

and the sparse forward-KL loss and gradient (what distillation actually uses) are compared with the
dense ones for the student checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from ..sparse import sparse_kd_loss
from .sample import teacher_sample
from .topk import teacher_topk
from .types import SparseTargets

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def corpus_text(max_bytes: int) -> str:
    """The Python standard library's top-level modules, concatenated (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            s = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(s)
        total += len(s)
        if total >= max_bytes:
            break
    if not parts:
        raise RuntimeError(f"no .py files under {root} to train the teacher on")
    return "\n".join(parts)


def train_tokenizer(text: str, vocab_size: int) -> "Tokenizer":
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``text`` (no download; any
    text encodes, with no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunk = 1 << 16
    tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer)
    return tok


def build_model(vocab_size: int, hidden: int, layers: int, seq_len: int) -> "LlamaForCausalLM":
    """A randomly initialised Llama-architecture causal LM of this size, from a transformers config
    (no download): the teacher that train() then fits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1),
                      num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=seq_len,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(model: torch.nn.Module, data: torch.Tensor, *, steps: int, batch: int, lr: float,
          student_step: int, log: Callable[[str], None] = print
          ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """AdamW with warm-up and cosine decay on random windows of ``data`` (num_windows, L).
    Returns the state dict at ``student_step`` (the student) and the loss curve."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    student_state, curve = None, []
    model.train()
    t0 = time.time()
    for step in range(steps):
        if step == student_step:
            student_state = copy.deepcopy(model.state_dict())
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x = data[idx]
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    if student_state is None:
        student_state = copy.deepcopy(model.state_dict())
    model.eval()
    return student_state, curve


def reconstruction(kind: str, targets: SparseTargets, v: int) -> torch.Tensor:
    """Dense float64 (N, V) distribution a target set stands for (see the module docstring)."""
    ids, lp = targets.ids.long(), targets.logprobs.double()
    valid = ids >= 0
    safe = torch.where(valid, ids, 0)
    w = torch.where(valid, lp.exp(), 0.0)
    n = ids.shape[0]
    out = torch.zeros(n, v, dtype=torch.float64)
    if kind == "topk-renorm":
        w = w / w.sum(-1, keepdim=True)
    elif kind == "topk-tail":
        tail = targets.tail_logmass.double().exp()
        k = valid.sum(-1, keepdim=True)
        out += (tail.unsqueeze(-1) / (v - k).clamp_min(1))
    out.scatter_(1, safe, torch.zeros_like(w))  # the kept ids hold their own mass only
    out.scatter_add_(1, safe, w)
    return out


def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || r) in float64 (inf where r = 0 < p)."""
    live = p > 0
    ratio = torch.where(live, p / torch.where(r > 0, r, 1e-300), 1.0)
    terms = torch.where(live, p * torch.log(ratio), 0.0)
    terms = torch.where(live & (r == 0), torch.inf, terms)
    return terms.sum(-1)


def grad_of(student: torch.Tensor, targets: Optional[SparseTargets], teacher_logp: torch.Tensor,
            tail: str = "renorm") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row forward-KL loss, its gradient wrt the student logits): sparse, or dense if
    ``targets`` is None (then from the full teacher log-probabilities)."""
    s = student.detach().clone().requires_grad_(True)
    if targets is None:
        logq = torch.log_softmax(s, -1)
        p = teacher_logp.exp()
        loss = (p * (teacher_logp - logq)).sum(-1)
    else:
        loss = sparse_kd_loss(s, targets, tail=tail, reduction="none", backend="torch")
    loss.sum().backward()
    return loss.detach().double(), s.grad.double()


def evaluate(teacher_logits: torch.Tensor, student_logits: torch.Tensor, ks: Sequence[int],
             dtype: str, seeds: int, proposal_temperatures: Sequence[float],
             sample_positions: int, log: Callable[[str], None] = print
             ) -> tuple[list[dict], dict]:
    """Metrics of every target kind. Sampled targets are evaluated on the first
    ``sample_positions`` positions (their reference sampler costs k x V per position and seed),
    against the dense loss and gradient of those same positions. Returns (rows, info): one row per
    (target kind, k), and run-wide numbers (dense losses, teacher entropy)."""
    full = _evaluate_topk(teacher_logits, student_logits, ks, dtype)
    m = min(sample_positions, teacher_logits.shape[0])
    rows, info = _evaluate_samples(teacher_logits[:m], student_logits[:m], ks, dtype, seeds,
                                   proposal_temperatures, log)
    info["sample_positions"] = m
    out = []
    for k in ks:
        out += [r for r in full[0] if r["k"] == k] + [r for r in rows if r["k"] == k]
    return out, {**full[1], **info}


def _dense(teacher_logits, student_logits):
    t = teacher_logits.double()
    logp = torch.log_softmax(t, -1)
    dense_loss, dense_grad = grad_of(student_logits, None, logp)
    return logp, dense_loss, dense_grad


def _stored(x: SparseTargets, dtype: str) -> SparseTargets:
    """What the cache would hand back: logprobs rounded (down) to the storage dtype."""
    from .cache import _rounded_down

    return SparseTargets(x.ids, _rounded_down(x.logprobs, getattr(torch, dtype)).float(),
                         x.tail_logmass)


def _evaluate_topk(teacher_logits, student_logits, ks, dtype):
    v = teacher_logits.shape[-1]
    logp, dense_loss, dense_grad = _dense(teacher_logits, student_logits)
    p = logp.exp()
    gnorm = dense_grad.norm()
    rows = []
    for k in ks:
        nbytes = k * (4 + BYTES[dtype]) + 8
        top = _stored(teacher_topk(teacher_logits.float(), k, backend="torch"), dtype)
        mass = torch.where(top.ids >= 0, top.logprobs.double().exp(), 0).sum(-1)
        for kind, tail in (("topk-renorm", "renorm"), ("topk-tail", "tail")):
            rec = reconstruction(kind, top, v)
            loss, grad = grad_of(student_logits, top, logp, tail)
            err = ((grad - dense_grad).norm() / gnorm).item()
            rows.append(dict(
                kind=kind, k=k, bytes=nbytes, mass=mass.mean().item(),
                kl_p_rec=kl(p, rec).mean().item(), kl_rec_p=kl(rec, p).mean().item(),
                loss_err=(loss.mean() / dense_loss.mean() - 1).item(), grad_err=err,
                grad_bias=err))
    return rows, dict(dense_loss=dense_loss.mean().item(),
                      teacher_entropy=-(p * torch.where(p > 0, logp, 0)).sum(-1).mean().item())


def _evaluate_samples(teacher_logits, student_logits, ks, dtype, seeds, proposal_temperatures,
                      log):
    v = teacher_logits.shape[-1]
    logp, dense_loss, dense_grad = _dense(teacher_logits, student_logits)
    p = logp.exp()
    gnorm = dense_grad.norm()
    rows = []

    def rel(g: torch.Tensor) -> float:
        """||g - g_dense|| / ||g_dense|| over all positions (Frobenius)."""
        return ((g - dense_grad).norm() / gnorm).item()

    for k in ks:
        nbytes = k * (4 + BYTES[dtype]) + 8
        for tp in proposal_temperatures:
            log(f"  sampled targets, k={k}, proposal temperature {tp:g}")
            grads, losses, kls, masses, uniq = [], [], [], [], []
            for seed in range(seeds):
                smp = _stored(teacher_sample(teacher_logits.float(), k, proposal_temperature=tp,
                                             seed=seed), dtype)  # same draws on every backend
                valid = smp.ids >= 0
                masses.append(torch.where(valid, p.gather(1, torch.where(valid, smp.ids.long(), 0)),
                                          0).sum(-1))
                uniq.append(valid.sum(-1).double())
                kls.append(kl(reconstruction("sample", smp, v), p))
                loss, grad = grad_of(student_logits, smp, logp)
                grads.append(grad)
                losses.append(loss)
            g_mean = torch.stack(grads).mean(0)
            rows.append(dict(
                kind=f"sample (Tp={tp:g})", k=k, bytes=nbytes,
                mass=torch.stack(masses).mean().item(), unique=torch.stack(uniq).mean().item(),
                kl_p_rec=math.inf, kl_rec_p=torch.stack(kls).mean().item(),
                loss_err=(torch.stack(losses).mean() / dense_loss.mean() - 1).item(),
                grad_err=sum(rel(g) for g in grads) / len(grads), grad_bias=rel(g_mean)))
    return rows, dict(sample_dense_loss=dense_loss.mean().item())


def _fmt(x: float, digits: int = 3) -> str:
    if x == math.inf:
        return "∞"
    if x == 0:
        return "0"
    if abs(x) < 10 ** -digits or abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _ratio(rows, k):
    err = {r["kind"]: r["grad_err"] for r in rows if r["k"] == k}
    return err["topk-tail"] / err["topk-renorm"]


def reading(rows: list[dict], cfg: dict) -> list[str]:
    """Observations drawn from this run's numbers (so they stay true when it is re-run)."""
    ks = sorted({r["k"] for r in rows})
    best = []
    for k in ks:
        at_k = [r for r in rows if r["k"] == k]
        b = min(at_k, key=lambda r: r["grad_err"])
        best.append(f"{b['kind']} at k={k} ({_fmt(b['grad_err'])})")
    out = [
        "- Smallest single-draw gradient error at equal bytes: " + "; ".join(best) + ".",
        "- Top-k targets keep the head exactly and drop the tail: deterministic, so their error "
        "is a bias, which shrinks with k (with the mass left out) but does not average away. The "
        "tail bucket (topk-tail) gives the student the teacher's total tail mass, spread like the "
        "student's own tail; here it leaves "
        + ", ".join(f"{_ratio(rows, k):.0%}" for k in ks)
        + f" (k = {', '.join(map(str, ks))}) of topk-renorm's gradient error, for 0 extra bytes "
        "(the tail log-mass is stored anyway).",
    ]
    root = 1 / math.sqrt(cfg["seeds"])
    kinds = sorted({r["kind"] for r in rows if r["kind"].startswith("sample")})
    if kinds:
        parts = []
        for kind in kinds:
            ratios = [r["grad_bias"] / r["grad_err"] for r in rows if r["kind"] == kind]
            parts.append(f"{kind}: " + ", ".join(f"{x:.2f}" for x in ratios))
        out.append(
            f"- Averaging the gradients of {cfg['seeds']} seeds leaves this fraction of the "
            f"single-draw error (k = {', '.join(map(str, ks))}): " + "; ".join(parts)
            + f". Pure noise would leave 1/sqrt({cfg['seeds']}) = {root:.2f}; bias would stay. "
            "Sampled targets trade a noisier per-position gradient for (with the teacher as "
            "proposal, Tp = 1) no bias at all: the noise averages out over positions, steps and "
            "epochs (Anshumann et al., \"Sparse Logit Sampling\", arXiv 2503.16870), the "
            "truncation bias of top-k does not.")
    plain = {r["k"]: r["grad_err"] for r in rows if r["kind"] == "sample (Tp=1)"}
    tempered = [r for r in rows
                if r["kind"].startswith("sample (Tp=") and r["kind"] != "sample (Tp=1)"]
    if plain and tempered:
        worse = sum(r["grad_err"] > plain.get(r["k"], math.inf) for r in tempered)
        out.append(
            "- Proposal temperatures above 1 spread the draws over more distinct ids (unique ids "
            "column) but weight them unevenly (self-normalised importance weights, bias of order "
            f"1/k); here the tempered proposal has the larger gradient error in {worse} of "
            f"{len(tempered)} cases (teacher entropy {cfg.get('entropy', float('nan')):.2f} "
            "nats: a flat teacher gains little from reaching further into its tail).")
    out.append("- Sampling with replacement repeats the likely ids: the unique ids column shows "
               "the slots a sampled cache actually fills; storing (id, count) pairs compactly "
               "would cut its bytes accordingly.")
    return out


def render(rows: list[dict], info: dict, cfg: dict) -> str:
    """The markdown report (docs/fidelity.md) of one run: setup, column definitions, the table of
    ``rows`` and reading()'s observations, all from this run's numbers."""
    lines = [
        "# Sparse targets: fidelity per byte",
        "",
        "Generated by `python -m distill_ops.targets.fidelity --out docs/fidelity.md`"
        + (" (--quick: a smoke run, numbers not meaningful)" if cfg["quick"] else "") + ".",
        "",
        "## Setup",
        "",
        f"- Teacher: Llama-architecture causal LM from a transformers config (hidden "
        f"{cfg['hidden']}, {cfg['layers']} layers, vocabulary {cfg['vocab']}), random init, "
        f"trained {cfg['steps']} steps (batch {cfg['batch']} x {cfg['seq_len']} tokens, AdamW) on "
        f"{cfg['corpus_mb']:.1f} MB of Python standard-library source with a byte-level BPE "
        "tokenizer trained on the same text. No downloads were possible here: a real 7B teacher "
        "has a larger vocabulary and, usually, a more peaked distribution than this small one.",
        f"- Final training loss {cfg['final_loss']:.3f} nats/token; held-out positions: "
        f"{cfg['positions']}; mean teacher entropy {info['teacher_entropy']:.3f} nats.",
        f"- Student: the same run's checkpoint at step {cfg['student_step']}; dense forward "
        f"KL(teacher || student) = {info['dense_loss']:.3f} nats/token (tau = 1).",
        f"- Storage per token: k x (4-byte id + {BYTES[cfg['dtype']]}-byte {cfg['dtype']} "
        "log-prob) + 4-byte tail log-mass + the 4-byte input token, the cache's layout "
        "(targets/cache.py); the log-probs below are rounded down to "
        f"{cfg['dtype']}, as the cache would return them. Sampled targets get "
        "the same k slots (k draws; merged duplicates leave padding).",
        f"- Sampled rows: {cfg['seeds']} seeds, on the first {info['sample_positions']} "
        "positions (the reference sampler costs k x V per position and seed on the CPU); their "
        "loss and gradient errors are against the dense values of those same positions "
        f"(dense KL there: {info['sample_dense_loss']:.3f}).",
        "",
        "## Columns",
        "",
        "- **mass**: teacher probability of the kept ids.",
        "- **KL(p‖p̂)**: full teacher p against the distribution p̂ a target set stands for: "
        "topk-renorm: p renormalised over the k ids; topk-tail: p on the ids, the exact tail mass "
        "spread evenly over the rest; sample: the importance weights (∞ where p̂ leaves out mass "
        "p has, as renormalised and sampled targets do).",
        "- **KL(p̂‖p)**: the other direction, finite for every kind (for topk-renorm it is "
        "-log mass).",
        "- **loss err**: mean sparse forward-KL loss / dense loss - 1. The sparse loss is not an "
        "estimate of the dense value (renormalised targets carry their own entropy; it differs by "
        "a student-independent term), so this column is for reading logged losses; what training "
        "sees is the gradient.",
        "- **grad err**: ‖G_sparse - G_dense‖ / ‖G_dense‖ over all positions (Frobenius), G the "
        "gradient of the summed loss wrt the student logits, one target set per position.",
        "- **grad bias**: the same for the gradient averaged over the seeds (for top-k, "
        "deterministic, equal to grad err). Unbiased targets drive it to 0 as seeds grow; "
        "biased ones do not.",
        "",
        "| targets | k | bytes/token | mass | unique ids | KL(p‖p̂) | KL(p̂‖p) | loss err | "
        "grad err | grad bias |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['k']} | {r['bytes']} | {_fmt(r['mass'])} | "
            f"{_fmt(r.get('unique', r['k']), 1)} | {_fmt(r['kl_p_rec'])} | {_fmt(r['kl_rec_p'])} | "
            f"{r['loss_err']:+.3f} | {_fmt(r['grad_err'])} | {_fmt(r['grad_bias'])} |")
    dense_bytes = cfg["vocab"] * 2
    lines += [
        "",
        f"For scale: dense fp16 teacher logits take {dense_bytes} bytes/token at this vocabulary "
        f"({cfg['vocab']}), {128256 * 2} at Llama-3's 128256.",
        "",
        "## Reading it",
        "",
    ] + reading(rows, dict(cfg, entropy=info["teacher_entropy"])) + [
        "",
        f"Run time: {cfg['seconds']:.0f} s on {cfg['threads']} CPU threads.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train the teacher (or reuse --logits-cache), evaluate every target kind and write the report
    to --out; returns 0. ``--quick`` is a tiny smoke run (the tests'; numbers not meaningful)."""
    ap = argparse.ArgumentParser(prog="python -m distill_ops.targets.fidelity",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/fidelity.md")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--sample-positions", type=int, default=512,
                    help="positions the sampled targets are evaluated on (the first ones)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--logits-cache", default=None,
                    help="a .pt file: reuse the teacher/student logits saved there by an earlier "
                    "run (skips training), or save them there")
    ap.add_argument("--ks", default="8,32,128")
    ap.add_argument("--dtype", choices=tuple(BYTES), default="float16")
    ap.add_argument("--proposal-temperatures", default="1,2")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.steps, args.batch = 300, 32, 3, 4
        args.corpus_mb, args.positions, args.seeds, args.ks = 0.1, 64, 2, "4,8"
        args.sample_positions = 32
    t0 = time.time()
    log = print
    cached = Path(args.logits_cache) if args.logits_cache else None
    if cached is not None and cached.is_file():
        saved = torch.load(cached, weights_only=False)
        log(f"reusing the logits of {cached} (trained with {saved['cfg']})")
        teacher_logits, student_logits, cfg = saved["teacher"], saved["student"], saved["cfg"]
    else:
        teacher_logits, student_logits, cfg = _train_and_run(args, log)
        if cached is not None:
            torch.save(dict(teacher=teacher_logits, student=student_logits, cfg=cfg), cached)
    ks = [int(x) for x in args.ks.split(",")]
    tps = [float(x) for x in args.proposal_temperatures.split(",")]
    rows, info = evaluate(teacher_logits, student_logits, ks, args.dtype, args.seeds, tps,
                          args.sample_positions, log)
    cfg = dict(cfg, dtype=args.dtype, seeds=args.seeds, quick=args.quick,
               seconds=time.time() - t0 + cfg.get("train_seconds", 0.0),
               threads=torch.get_num_threads(), positions=teacher_logits.shape[0])
    md = render(rows, info, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    log(f"wrote {out}")
    return 0


def _train_and_run(args, log):
    """Train the teacher; return held-out (teacher logits, student logits, config)."""
    t0 = time.time()
    torch.manual_seed(0)
    text = corpus_text(int(args.corpus_mb * 1e6))
    log(f"corpus: {len(text) / 1e6:.1f} MB; training a {args.vocab}-token BPE tokenizer")
    tok = train_tokenizer(text, args.vocab)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.int64)
    vocab = tok.get_vocab_size()
    windows = ids[: ids.numel() // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(1))
    n_eval = max(1, math.ceil(args.positions / args.seq_len))
    eval_windows, train_windows = windows[perm[:n_eval]], windows[perm[n_eval:]]
    log(f"{ids.numel()} tokens, {train_windows.shape[0]} training windows of {args.seq_len}")
    model = build_model(vocab, args.hidden, args.layers, args.seq_len)
    student_step = args.steps // 4
    student_state, curve = train(model, train_windows, steps=args.steps, batch=args.batch,
                                 lr=args.lr, student_step=student_step, log=log)
    with torch.no_grad():
        teacher_logits = model(eval_windows).logits.reshape(-1, vocab)[: args.positions].float()
        student = build_model(vocab, args.hidden, args.layers, args.seq_len)
        student.load_state_dict(student_state)
        student.eval()
        student_logits = student(eval_windows).logits.reshape(-1, vocab)[: args.positions].float()
    cfg = dict(hidden=args.hidden, layers=args.layers, seq_len=args.seq_len, batch=args.batch,
               steps=args.steps, lr=args.lr, vocab=vocab, student_step=student_step,
               final_loss=sum(curve[-10:]) / len(curve[-10:]), corpus_mb=len(text) / 1e6,
               train_seconds=time.time() - t0)
    return teacher_logits, student_logits, cfg


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

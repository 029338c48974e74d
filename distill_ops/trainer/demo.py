"""The embedded demo: distillation end to end on any machine, no GPU and no download needed.

    python -m distill_ops.trainer.demo [--out-dir demo_out] [--scale auto|cpu|gpu|tiny]
    distill-ops demo                                       # the same

1. Corpus: Python's own documentation (``pydoc_data.topics``) plus standard-library docstrings,
   split by document into training and held-out text.
2. A byte-level BPE tokenizer trained on the training text with the ``tokenizers`` library.
3. A Llama-architecture teacher trained from scratch with cross-entropy.
4. Its top-k targets written to the offline cache when ``distill_ops.targets.cache`` is present
   (else the students read the teacher's full logits online).
5. Two identical smaller students (same initial weights, data order and steps): one distilled with
   the fused loss, one trained with plain cross-entropy.
6. A table of held-out perplexity, KL to the teacher, top-1 agreement, tokens/s and peak memory;
   ``results.json`` and ``demo.png`` in the output directory.

On a GPU the defaults scale up (larger models, longer sequences, more steps) automatically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from . import data as data_lib
from .config import TrainConfig
from .eval import evaluate
from .loop import train
from .models import count_parameters, llama
from .objective import cache_available


@dataclass
class Scale:
    vocab_size: int
    seq_len: int
    batch_size: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    teacher_lr: float
    student_hidden: int
    student_layers: int
    student_steps: int
    student_lr: float
    heads: int = 4
    corpus: str = "builtin:python"
    max_chars: int = 0           # 0: the whole corpus
    eval_fraction: float = 0.08
    eval_every: int = 0          # students' held-out checks during training (0: only at the end)
    eval_batches: int = 6        # batches per in-training check (the final evaluation uses all)
    temperature: float = 1.0
    hard_weight: float = 0.5
    divergence: str = "forward_kl"
    topk: int = 64
    tail: str = "renorm"


SCALES = {
    # ~3-4 minutes on 2 CPU cores
    "cpu": Scale(vocab_size=2048, seq_len=128, batch_size=16,
                 teacher_hidden=192, teacher_layers=4, teacher_steps=400, teacher_lr=2e-3,
                 student_hidden=96, student_layers=2, student_steps=300, student_lr=2e-3,
                 eval_every=50),
    # a few minutes on one modern GPU
    "gpu": Scale(vocab_size=4096, seq_len=256, batch_size=32,
                 teacher_hidden=512, teacher_layers=8, teacher_steps=1500, teacher_lr=1e-3,
                 student_hidden=256, student_layers=4, student_steps=1000, student_lr=1e-3,
                 heads=8, eval_every=100),
    # seconds: for tests
    "tiny": Scale(vocab_size=512, seq_len=32, batch_size=8,
                  teacher_hidden=48, teacher_layers=1, teacher_steps=6, teacher_lr=3e-3,
                  student_hidden=32, student_layers=1, student_steps=4, student_lr=3e-3,
                  heads=2, corpus="builtin:pydoc", max_chars=60_000, eval_fraction=0.15),
}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def build_corpus(scale: Scale, seed: int):
    docs = data_lib.load_documents(scale.corpus)
    if scale.max_chars:
        kept, total = [], 0
        for d in docs:
            if total >= scale.max_chars:
                break
            kept.append(d[: scale.max_chars - total])
            total += len(kept[-1])
        docs = kept
    return data_lib.split_documents(docs, scale.eval_fraction, seed)


def run(out_dir: str = "demo_out", scale_name: str = "auto", seed: int = 0,
        device: str = "auto", targets: str = "auto", progress: bool = True,
        overrides: Optional[dict] = None) -> dict:
    if scale_name == "auto":
        scale_name = "gpu" if torch.cuda.is_available() and device != "cpu" else "cpu"
    scale = replace(SCALES[scale_name], **(overrides or {}))
    dev = "cuda" if scale_name == "gpu" and device == "auto" else device
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()

    # 1-2. corpus and tokenizer -----------------------------------------------------------
    train_docs, eval_docs = build_corpus(scale, seed)
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer = data_lib.train_bpe_tokenizer(train_docs, scale.vocab_size, tok_dir)
    vocab = len(tokenizer)
    train_blocks = data_lib.pack_documents(train_docs, tokenizer, scale.seq_len)
    eval_blocks = data_lib.pack_documents(eval_docs, tokenizer, scale.seq_len)
    _log(f"corpus: {sum(map(len, train_docs)):,} + {sum(map(len, eval_docs)):,} held-out characters"
         f" -> {train_blocks.numel():,} training and {eval_blocks.numel():,} held-out tokens "
         f"(BPE vocabulary {vocab}, trained locally)")

    common = dict(seq_len=scale.seq_len, micro_batch_size=scale.batch_size, seed=seed,
                  device=dev, weight_decay=0.1, log_every=5,
                  eval_batches=scale.eval_batches, progress=progress, plot=False,
                  keep_checkpoints=1, adam_beta2=0.99,
                  overwrite_output_dir=True)   # a rerun into the same --out-dir starts over

    # 3. teacher ------------------------------------------------------------------------------
    teacher = llama(vocab, scale.teacher_hidden, scale.teacher_layers, heads=scale.heads,
                    max_positions=scale.seq_len, seed=seed + 1)
    _log(f"teacher: Llama {scale.teacher_layers} layers x {scale.teacher_hidden}, "
         f"{count_parameters(teacher) / 1e6:.2f}M parameters, {scale.teacher_steps} steps (CE)")
    # 10 warmup steps (fewer at the tiny scale: a warmup may not outlast its run)
    t_cfg = TrainConfig(targets="none", max_steps=scale.teacher_steps, lr=scale.teacher_lr,
                        warmup_steps=min(10, scale.teacher_steps), eval_every=0,
                        output_dir=os.path.join(out_dir, "teacher"), **common)
    t_res = train(t_cfg, student=teacher, tokenizer=tokenizer, train_dataset=train_blocks,
                  eval_dataset=eval_blocks)
    teacher = t_res.model.eval().requires_grad_(False)

    # 4. teacher targets: the offline cache when available ---------------------------------
    mode = targets
    device_t = next(teacher.parameters()).device
    why_dense = ""
    if mode == "auto":
        mode, why_dense = _auto_targets(device_t)
    kd_data = train_blocks
    cache_seconds = 0.0
    if mode == "cache":
        t0 = time.perf_counter()
        kd_data = _write_cache(teacher, tok_dir, train_blocks, scale, out_dir, progress)
        cache_seconds = time.perf_counter() - t0
        _log(f"cached top-{scale.topk} teacher targets in {cache_seconds:.1f}s")
    else:
        _log("teacher targets: online (full teacher logits each step"
             + (f"; {why_dense}" if why_dense else "") + ")")

    # 5. students -----------------------------------------------------------------------------
    def student():
        return llama(vocab, scale.student_hidden, scale.student_layers, heads=scale.heads,
                     max_positions=scale.seq_len, seed=seed + 2)

    n_student = count_parameters(student())
    s_common = dict(common, max_steps=scale.student_steps, lr=scale.student_lr,
                    warmup_steps=min(10, scale.student_steps), eval_every=scale.eval_every)
    kd_cfg = TrainConfig(targets=mode, cache=os.path.join(out_dir, "cache") if mode == "cache"
                         else None, topk=scale.topk, num_samples=scale.topk,
                         tail="renorm" if mode == "sample" else scale.tail,
                         divergence=scale.divergence,
                         temperature=scale.temperature, hard_weight=scale.hard_weight,
                         output_dir=os.path.join(out_dir, "student_kd"), **s_common)
    ce_cfg = TrainConfig(targets="none", output_dir=os.path.join(out_dir, "student_ce"), **s_common)
    _log(f"students: Llama {scale.student_layers} layers x {scale.student_hidden}, "
         f"{n_student / 1e6:.2f}M parameters, {scale.student_steps} steps each")
    _log(f"KD student: {kd_cfg.divergence}, temperature {kd_cfg.temperature}, "
         f"hard_weight {kd_cfg.hard_weight}, targets {mode}")
    kd_res = train(kd_cfg, student=student(), teacher=teacher if mode != "cache" else None,
                   tokenizer=tokenizer, train_dataset=kd_data, eval_dataset=eval_blocks)
    _log("CE student: plain next-token cross-entropy")
    ce_res = train(ce_cfg, student=student(), tokenizer=tokenizer, train_dataset=train_blocks,
                   eval_dataset=eval_blocks)

    # 6. held-out evaluation against the teacher -------------------------------------------------
    ev = dict(batch_size=scale.batch_size, device=device_t)
    teacher_eval = evaluate(teacher, eval_blocks, **ev)
    kd_eval = evaluate(kd_res.model, eval_blocks, teacher=teacher, **ev)
    ce_eval = evaluate(ce_res.model, eval_blocks, teacher=teacher, **ev)

    rows = []
    for name, res, ev_out, params in (
            ("teacher (CE)", t_res, teacher_eval, count_parameters(teacher)),
            ("student CE", ce_res, ce_eval, n_student),
            ("student KD", kd_res, kd_eval, n_student)):
        rows.append({"model": name, "params": params, "steps": res.step,
                     "heldout_ppl": ev_out["eval_ppl"], "heldout_ce": ev_out["eval_ce"],
                     "kl_to_teacher": ev_out.get("eval_kl"),
                     "top1_agreement": ev_out.get("eval_top1"),
                     "tokens_per_s": res.tokens_per_s, "train_seconds": res.train_seconds,
                     "peak_memory_bytes": res.peak_memory_bytes,
                     "peak_memory_kind": res.peak_memory_kind})
    kd_wins = kd_eval["eval_ppl"] < ce_eval["eval_ppl"]
    total = time.perf_counter() - t_start
    results = {
        "scale": scale_name, "settings": asdict(scale), "targets": mode, "seed": seed,
        "device": str(device_t), "machine": _machine(device_t), "torch": torch.__version__,
        "vocab_size": vocab, "train_tokens": int(train_blocks.numel()),
        "heldout_tokens": int(eval_blocks.numel()), "cache_seconds": cache_seconds,
        "rows": rows, "kd_beats_ce": kd_wins,
        "ppl_reduction_vs_ce": 1.0 - kd_eval["eval_ppl"] / ce_eval["eval_ppl"],
        "total_seconds": total,
    }
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    from .plot import plot_metrics

    plot_metrics({"student CE": ce_res.history, "student KD": kd_res.history},
                 os.path.join(out_dir, "demo.png"),
                 title=f"distill-ops demo ({results['machine']}): KD vs CE student, same steps",
                 hlines={"teacher": teacher_eval["eval_ppl"]})
    print(format_table(results))
    _log(f"wrote {os.path.join(out_dir, 'results.json')} and {os.path.join(out_dir, 'demo.png')}"
         f" in {total:.0f}s total")
    return results


def _auto_targets(device: torch.device) -> tuple[str, str]:
    """The offline top-k cache when it exists and a fused sparse kernel serves ``device``; else
    the dense online teacher (and why)."""
    if not cache_available():
        return "dense", "distill_ops.targets.cache is not available"
    from ..ops.sparse import resolve

    if resolve("auto", device) == "torch":
        return "dense", (f"no fused sparse-target kernel for {device.type} tensors (the pure-torch "
                         "sparse reference is slower here than the dense fused loss)")
    return "cache", ""


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"


def format_table(results: dict) -> str:
    mem_kind = results["rows"][0]["peak_memory_kind"]
    mem_head = "peak GPU mem" if mem_kind == "cuda_allocated" else "peak RSS"
    head = (f"{'model':<14}{'params':>9}{'steps':>7}{'held-out ppl':>14}{'KL(t||s)':>10}"
            f"{'top-1 agr':>11}{'tokens/s':>10}{mem_head:>14}")
    lines = [f"distill-ops demo on {results['machine']} (targets: {results['targets']})", head,
             "-" * len(head)]
    for r in results["rows"]:
        kl = f"{r['kl_to_teacher']:.3f}" if r["kl_to_teacher"] is not None else "-"
        top1 = f"{100 * r['top1_agreement']:.1f}%" if r["top1_agreement"] is not None else "-"
        lines.append(f"{r['model']:<14}{r['params'] / 1e6:>8.2f}M{r['steps']:>7}"
                     f"{r['heldout_ppl']:>14.2f}{kl:>10}{top1:>11}{r['tokens_per_s']:>10.0f}"
                     f"{_fmt_bytes(r['peak_memory_bytes']):>14}")
    gain = 100 * results["ppl_reduction_vs_ce"]
    verdict = (f"beats the CE student: {gain:.1f}% lower" if results["kd_beats_ce"]
               else f"does NOT beat the CE student: {-gain:.1f}% higher")
    lines.append(f"KD student {verdict} held-out perplexity (same steps, data, seed and initial "
                 "weights).")
    return "\n".join(lines)


def _write_cache(teacher, tok_dir: str, blocks: torch.Tensor, scale: Scale, out_dir: str,
                 progress: bool):
    """Top-k teacher targets for every training block, written to the offline cache."""
    from ..targets.cache import (TargetCache, tokenizer_hash_to_record, tokenizer_hashes,
                                 write_teacher_cache)

    path = os.path.join(out_dir, "cache")
    if os.path.isdir(path):   # a previous demo's cache: start afresh
        import shutil

        shutil.rmtree(path)
    hashes = tokenizer_hashes(tok_dir)
    batches = [blocks[lo: lo + scale.batch_size] for lo in range(0, blocks.shape[0],
                                                                  scale.batch_size)]
    write_teacher_cache(teacher, batches, path, k=scale.topk, mode="topk",
                        temperature=scale.temperature, dtype="float16",
                        teacher="distill-ops demo teacher",
                        tokenizer_hash=tokenizer_hash_to_record(hashes),
                        vocab_size=int(teacher.config.vocab_size),
                        device=next(teacher.parameters()).device, progress=progress)
    return TargetCache(path, expect_vocab_size=int(teacher.config.vocab_size),
                       expect_tokenizer_hash=hashes or None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distill-ops demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="demo_out", help="where results.json, demo.png and the "
                   "models go (default: ./demo_out)")
    p.add_argument("--scale", default="auto", choices=["auto", *SCALES],
                   help="model/step sizes: auto = gpu when CUDA is available, else cpu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--targets", default="auto",
                   choices=["auto", "cache", "dense", "topk", "sample"],
                   help="teacher targets for the KD student (auto: the offline top-k cache when "
                        "available, else dense online logits; sample: online sampled targets, "
                        "as many draws as the top-k size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    results = run(args.out_dir, args.scale, args.seed, args.device, args.targets,
                  progress=not args.no_progress)
    return 0 if results["kd_beats_ce"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

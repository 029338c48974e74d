"""The training objective: where teacher targets come from and which fused loss consumes them.

Every function returns a *sum* over the batch's non-ignored tokens; the loop divides by the number
of such tokens in the whole (accumulated, all-rank) batch, so gradient accumulation and DDP give the
same update as one big batch. A batch whose labels are all ``ignore_index`` gives a loss of 0 and a
zero gradient (no NaN).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import struct
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..functional import kd_loss
from ..fused_linear import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from ..ops.fused_linear_chunks import default_chunk_size
from ..targets.types import SparseTargets
from .config import ConfigError, TrainConfig
from .data import IGNORE_INDEX


def sparse_api():
    """``distill_ops.sparse`` (teacher_topk, sparse_kd_loss), or raise saying what is missing."""
    try:
        return importlib.import_module("distill_ops.sparse")
    except ImportError as exc:
        raise RuntimeError(
            "sparse targets need distill_ops.sparse (teacher_topk, sparse_kd_loss), which this "
            f"installation lacks ({exc}); use targets='dense'") from None


def sparse_available() -> bool:
    try:
        mod = importlib.import_module("distill_ops.sparse")
    except ImportError:
        return False
    return hasattr(mod, "teacher_topk") and hasattr(mod, "sparse_kd_loss")


def cache_available() -> bool:
    try:
        mod = importlib.import_module("distill_ops.targets.cache")
    except ImportError:
        return False
    return hasattr(mod, "TargetCache") and hasattr(mod, "TargetCacheWriter") and sparse_available()


def count_tokens(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def cross_entropy_sum(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy, summed over non-ignored tokens (0 when all are ignored)."""
    v = student_logits.shape[-1]
    return F.cross_entropy(student_logits.reshape(-1, v).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def dense_loss_sum(cfg: TrainConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    # In place only over equal vocabularies (common_prefix would leave logits in the extra columns).
    inplace = cfg.inplace_grad and student_logits.shape[-1] == teacher_logits.shape[-1]
    return kd_loss(
        student_logits, teacher_logits, divergence=cfg.divergence, temperature=cfg.temperature,
        beta=cfg.beta, alpha=cfg.alpha, labels=labels, hard_weight=cfg.hard_weight,
        soft_weight=cfg.soft_weight, scale_temperature=cfg.scale_temperature,
        ignore_index=IGNORE_INDEX, reduction="sum", softcap=cfg.softcap, vocab=cfg.vocab,
        inplace_grad=inplace, backend=cfg.backend)


def _sparse_keywords(cfg: TrainConfig, ids: torch.Tensor, v: int,
                     tail_logmass: Optional[torch.Tensor], labels: torch.Tensor) -> dict:
    """The sparse loss's keywords from the config, after checking the target ids against the
    student's vocabulary v."""
    if ids.numel() and int(ids.max()) >= v:
        if cfg.vocab != "common_prefix":
            raise ValueError(f"teacher targets hold token id {int(ids.max())} but the student's "
                             f"vocabulary is {v}; pass vocab='common_prefix'")
        raise ValueError(f"teacher targets hold token id {int(ids.max())} >= the student's "
                         f"vocabulary {v}: make targets over the common prefix")
    # cfg.backend names the dense kernels; the sparse ops get it only for torch and triton, else
    # auto (the C++ kernel on the CPU, Triton on a GPU: the CUDA sparse kernel, not yet run on a
    # GPU, is only used when a caller names it)
    backend = cfg.backend if cfg.backend in ("auto", "torch", "triton") else "auto"
    return dict(divergence=cfg.divergence, temperature=cfg.temperature, tail=cfg.tail,
                tail_logmass=tail_logmass if cfg.tail == "tail" else None, labels=labels,
                hard_weight=cfg.hard_weight, soft_weight=cfg.soft_weight,
                scale_temperature=cfg.scale_temperature, beta=cfg.beta, alpha=cfg.alpha,
                ignore_index=IGNORE_INDEX, reduction="sum", backend=backend)


def sparse_loss_sum(cfg: TrainConfig, student_logits: torch.Tensor, ids: torch.Tensor,
                    logprobs: torch.Tensor, tail_logmass: Optional[torch.Tensor],
                    labels: torch.Tensor) -> torch.Tensor:
    kw = _sparse_keywords(cfg, ids, student_logits.shape[-1], tail_logmass, labels)
    return sparse_api().sparse_kd_loss(student_logits, ids, logprobs,
                                       inplace_grad=cfg.inplace_grad, **kw)


def fused_sparse_loss_sum(cfg: TrainConfig, student_hidden: torch.Tensor, student: "LastHidden",
                          ids: torch.Tensor, logprobs: torch.Tensor,
                          tail_logmass: Optional[torch.Tensor],
                          labels: torch.Tensor) -> torch.Tensor:
    """sparse_loss_sum on lm_head(hidden) without the student's logits."""
    head = student.head
    kw = _sparse_keywords(cfg, ids, head.weight.shape[0], tail_logmass, labels)
    return fused_linear_sparse_kd_loss(student_hidden, head.weight, ids, logprobs,
                                       student_bias=head.bias, **kw)


def sample_seed(cfg: TrainConfig, step: int, micro: int, rank: int, chunk: int = 0) -> int:
    """The teacher_sample seed of one micro-batch (and chunk of rows): a 64-bit hash of the run's
    seed and where the draws are in the run, so that fresh draws come every micro-batch and a
    resumed run draws what the uninterrupted one would."""
    parts = struct.pack("<5q", cfg.seed, step, micro, rank, chunk)
    return int.from_bytes(hashlib.blake2b(parts, digest_size=8).digest(), "little") >> 1


def _targets_of(cfg: TrainConfig, logits: torch.Tensor, seed: int) -> SparseTargets:
    """Top-k or sampled targets (cfg.targets) of teacher logits, at the loss temperature."""
    api = sparse_api()
    if cfg.targets == "sample":
        return api.teacher_sample(logits, cfg.num_samples, temperature=cfg.temperature,
                                  proposal_temperature=cfg.proposal_temperature, seed=seed)
    return api.teacher_topk(logits, cfg.topk, temperature=cfg.temperature)


def online_targets_from_hidden(cfg: TrainConfig, teacher_hidden: torch.Tensor,
                               teacher: "LastHidden", student_vocab: int,
                               seed: Callable[[int], int]) -> SparseTargets:
    """online_targets without the teacher's logits tensor: chunks of lm_head(hidden), each turned
    into top-k or sampled targets (over the common prefix with vocab='common_prefix');
    ``seed(chunk)`` seeds the draws of chunk number ``chunk``."""
    w, b = teacher.head.weight, teacher.head.bias
    if cfg.vocab == "common_prefix":
        w, b = w[:student_vocab], None if b is None else b[:student_vocab]
    lead = teacher_hidden.shape[:-1]
    h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    rows = default_chunk_size(h.shape[0], w.shape[0], h.element_size())
    parts = [_targets_of(cfg, F.linear(h[lo:lo + rows], w.to(h.dtype),
                                       None if b is None else b.to(h.dtype)), seed(i))
             for i, lo in enumerate(range(0, h.shape[0], rows))]
    ids, lp, tail = (torch.cat([getattr(p, name) for p in parts]) for name in
                     ("ids", "logprobs", "tail_logmass"))
    return SparseTargets(ids.reshape(*lead, -1), lp.reshape(*lead, -1), tail.reshape(lead))


def online_targets(cfg: TrainConfig, teacher_logits: torch.Tensor, student_vocab: int,
                   seed: int) -> SparseTargets:
    """Top-k or sampled targets from teacher logits, made at the loss temperature (over the
    common prefix of the vocabularies when ``vocab='common_prefix'``)."""
    if cfg.vocab == "common_prefix":
        teacher_logits = teacher_logits[..., :student_vocab]
    return _targets_of(cfg, teacher_logits, seed)


def check_vocab(cfg: TrainConfig, student_vocab: int, teacher_vocab: int) -> None:
    """A teacher/student vocabulary mismatch is an error unless vocab='common_prefix'."""
    if student_vocab != teacher_vocab and cfg.vocab != "common_prefix":
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}); "
            "distil over the shared first min(V) entries with vocab='common_prefix' (only when "
            "both tokenizers agree on those ids)")


def check_topk(cfg: TrainConfig, student_vocab: int, teacher_vocab: int) -> None:
    """targets='topk' needs topk <= the vocabulary the targets are drawn from: the teacher's, cut
    to the student's with vocab='common_prefix' (checked once the models are loaded, before the
    first step, where the kernel would say "k" instead of the config key)."""
    v = min(student_vocab, teacher_vocab)
    if cfg.targets == "topk" and cfg.topk > v:
        raise ConfigError(f"topk={cfg.topk} exceeds the vocabulary the teacher's targets are taken "
                          f"from ({v} tokens): set topk <= {v}")


def _vocab_difference(student_tok, teacher_tok) -> Optional[str]:
    """None when both tokenizers map the same strings to the same ids (over the shorter
    vocabulary), else a phrase saying where they first differ."""
    from ..targets.cache import vocab_fingerprint

    if vocab_fingerprint(student_tok) == vocab_fingerprint(teacher_tok):
        return None
    by_id_s = {i: t for t, i in student_tok.get_vocab().items()}
    by_id_t = {i: t for t, i in teacher_tok.get_vocab().items()}
    for i in range(min(len(by_id_s), len(by_id_t))):
        if by_id_s.get(i) != by_id_t.get(i):
            return (f"token id {i} is {by_id_s.get(i)!r} for the student, {by_id_t.get(i)!r} for "
                    "the teacher")
    if len(by_id_s) == len(by_id_t):
        return None   # same mapping listed differently (fingerprint of equal content)
    return (f"the first {min(len(by_id_s), len(by_id_t))} ids agree; the student's tokenizer has "
            f"{len(by_id_s)} tokens, the teacher's {len(by_id_t)}")


def check_tokenizers(cfg: TrainConfig, student_dir: Optional[str],
                     teacher_dir: Optional[str]) -> None:
    """Where both model directories carry a tokenizer, the teacher's must map token ids to the same
    strings as the student's: distilling across tokenizers of equal size trains on nonsense.

    Equal tokenizer files (targets.cache.tokenizer_hash, the cache manifest's hash) pass at once;
    otherwise both tokenizers are loaded and their vocabularies compared (files that differ only in
    e.g. a chat template pass). A mismatch is a ConfigError, or a warning with
    vocab='common_prefix' (where a difference within the shared ids is still worth a warning).
    A directory without tokenizer files leaves only the vocabulary-size check (check_vocab)."""
    from ..targets.cache import tokenizer_hash

    if not (student_dir and teacher_dir and os.path.isdir(student_dir)
            and os.path.isdir(teacher_dir)):
        return
    hs, ht = tokenizer_hash(student_dir), tokenizer_hash(teacher_dir)
    if not hs or not ht or hs == ht:
        return
    from .data import load_tokenizer

    try:
        diff = _vocab_difference(load_tokenizer(student_dir), load_tokenizer(teacher_dir))
    except Exception as exc:   # unreadable tokenizer files: only the files' hashes are known
        diff = (f"their tokenizer files differ and could not be compared token by token "
                f"({type(exc).__name__}: {' '.join(str(exc).split())})")
    if diff is None:
        return
    what = (f"the teacher's tokenizer ({teacher_dir}) differs from the student's ({student_dir}): "
            f"{diff}")
    if cfg.vocab == "common_prefix":
        warnings.warn(f"{what}; distilling anyway because vocab='common_prefix' (the teacher's "
                      "distribution over ids that mean other tokens to the student is a wrong "
                      "target)", stacklevel=3)
        return
    raise ConfigError(f"{what}; a teacher must share the student's tokenizer (set "
                      "vocab='common_prefix' to distil anyway)")


def model_dir(spec, model: Optional[torch.nn.Module]) -> Optional[str]:
    """The local directory a model came from: its path spec, or a loaded model's name_or_path."""
    path = spec if isinstance(spec, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    path = os.fspath(path) if path else None
    return path if path and os.path.isdir(path) else None


def model_vocab(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


class LastHidden(torch.nn.Module):
    """A causal LM without its lm_head: forward returns the last hidden states (after the final
    norm). With ``fused_linear`` this is the module the loop runs (and DDP wraps): the lm_head is
    applied inside the fused loss, in the same backward, so DDP still sees every gradient."""

    def __init__(self, lm: torch.nn.Module, through_root: bool = False) -> None:
        super().__init__()
        self.lm = lm
        # FSDP2 (trainer/fsdp.py): the whole model is the root unit, whose forward gathers the
        # embeddings, final norm and lm_head: run it (one logit row) and keep the decoder's output
        self.through_root = through_root
        if through_root and "logits_to_keep" not in inspect.signature(lm.forward).parameters:
            raise ValueError(f"fsdp with fused_linear runs {type(lm).__name__}'s forward for one "
                             "logit row, but it takes no logits_to_keep; use fused_linear=false")
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            value = getattr(getattr(lm, "config", None), key, None)
            if value not in (None, 1, 1.0):
                raise ValueError(f"fused_linear cannot reproduce this model's {key}={value} "
                                 "(its logits are not just lm_head(hidden)); use fused_linear=False")
        head = lm.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"fused_linear needs an nn.Linear lm_head, got {type(head).__name__}")
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
        if not self.through_root:
            return body(input_ids=input_ids, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state
        kept = []
        hook = body.register_forward_hook(lambda _m, _a, out: kept.append(out.last_hidden_state))
        try:
            self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=1)
        finally:
            hook.remove()
        return kept[-1]


def fused_dense_loss_sum(cfg: TrainConfig, student_hidden: torch.Tensor, student: LastHidden,
                         teacher_hidden: torch.Tensor, teacher: LastHidden,
                         labels: torch.Tensor) -> torch.Tensor:
    """dense_loss_sum on lm_head(hidden) of both models, without their logits (vocab='common_prefix'
    slices both heads to the shared vocabulary)."""
    ws, wt = student.head.weight, teacher.head.weight
    bs, bt = student.head.bias, teacher.head.bias
    if ws.shape[0] != wt.shape[0]:
        if cfg.vocab != "common_prefix":
            raise ValueError(f"the teacher's vocabulary is {wt.shape[0]} but the student's is "
                             f"{ws.shape[0]}; pass vocab='common_prefix'")
        v = min(ws.shape[0], wt.shape[0])
        ws, wt = ws[:v], wt[:v]
        bs, bt = (None if bs is None else bs[:v]), (None if bt is None else bt[:v])
    return fused_linear_kd_loss(
        student_hidden, ws, teacher_hidden, wt, student_bias=bs, teacher_bias=bt,
        divergence=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha,
        labels=labels, hard_weight=cfg.hard_weight, soft_weight=cfg.soft_weight,
        scale_temperature=cfg.scale_temperature, ignore_index=IGNORE_INDEX, reduction="sum",
        softcap=cfg.softcap, backend=cfg.backend)

"""Held-out evaluation: perplexity, teacher-student KL and top-1 agreement.

All three are token averages over the positions that have a next-token label (packing padding and
the last position excluded), summed across ranks before dividing.

- ``ppl``: exp(mean next-token cross-entropy of the model).
- ``kl``: mean KL(teacher || student) at temperature 1 (needs teacher logits).
- ``top1``: fraction of positions where the student's argmax equals the teacher's (from teacher
  logits, or from the highest-weighted cached target).
- ``accuracy``: fraction of positions where the model's argmax is the next token.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch

from .._dtensor import is_dtensor
from ..functional import kd_loss
from . import dist
from .data import IGNORE_INDEX, as_dataset, eval_batches, next_token_labels
from .objective import cross_entropy_sum


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Union[torch.Tensor, torch.utils.data.Dataset], *,
             batch_size: int, device: torch.device, teacher: Optional[torch.nn.Module] = None,
             amp_dtype: Optional[torch.dtype] = None, limit: int = 0,
             backend: str = "auto") -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` (items with ``input_ids``, optionally cached targets
    ``ids``/``logprobs``) and its labels (data.next_token_labels). Works under DDP and FSDP2
    (each rank takes a shard; sums are all-reduced)."""
    dataset = as_dataset(dataset)
    was_training = model.training
    model.eval()
    ce = kl = agree = correct = 0.0
    tokens = 0
    have_kl = have_top1 = False
    # FSDP2 (sharded parameters): each forward all-gathers, so every rank runs as many forwards
    # as the busiest one
    lockstep = any(map(is_dtensor, model.parameters()))
    for batch in eval_batches(dataset, batch_size, rank=dist.rank(),
                              world_size=dist.world_size(), limit=limit, lockstep=lockstep):
        if batch is None:   # this rank is out of batches: a one-token forward joins the others'
            one = torch.zeros((1, 1), dtype=torch.long, device=device)
            with autocast(device, amp_dtype):
                model(input_ids=one)
                if teacher is not None:
                    teacher(input_ids=one)
            continue
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = mask.to(device) if mask is not None else None
        labels = next_token_labels(batch).to(device)
        keep = labels != IGNORE_INDEX
        with autocast(device, amp_dtype):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            t_logits = (teacher(input_ids=input_ids, attention_mask=mask).logits
                        if teacher is not None else None)
        # (no fp32 copies of the logits: the kernels read bf16 exactly and accumulate in fp32,
        # and argmax is the same on the upcast; cross_entropy_sum upcasts its own transient)
        ce += float(cross_entropy_sum(logits, labels))
        tokens += int(keep.sum())
        pred = logits.argmax(-1)
        correct += float(((pred == labels) & keep).sum())
        if t_logits is not None:
            have_kl = have_top1 = True
            v = min(logits.shape[-1], t_logits.shape[-1])
            if t_logits.dtype != logits.dtype:  # (kd_loss would round one to the other's dtype)
                logits, t_logits = logits.float(), t_logits.float()
            kl += float(kd_loss(logits, t_logits, labels=labels, reduction="sum",
                                vocab="common_prefix", backend=backend))
            agree += float(((logits[..., :v].argmax(-1) == t_logits[..., :v].argmax(-1))
                            & keep).sum())
        elif "ids" in batch and "logprobs" in batch:
            have_top1 = True
            ids, lp = batch["ids"].to(device).long(), batch["logprobs"].to(device)
            teacher_top = ids.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1)
            agree += float(((pred == teacher_top) & keep).sum())
    ce, kl, agree, correct, tokens = dist.all_reduce_sum([ce, kl, agree, correct, tokens], device)
    if was_training:
        model.train()
    n = max(tokens, 1.0)
    out = {"eval_tokens": int(tokens), "eval_ce": ce / n, "eval_ppl": math.exp(min(ce / n, 50.0)),
           "eval_accuracy": correct / n}
    if have_kl:
        out["eval_kl"] = kl / n
    if have_top1:
        out["eval_top1"] = agree / n
    return out

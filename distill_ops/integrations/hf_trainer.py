"""A transformers.Trainer whose loss is the fused distillation loss against a frozen teacher.

    from distill_ops.integrations.hf_trainer import DistillationTrainer

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=TrainingArguments(...),
        train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        kd_kwargs=dict(divergence="forward_kl", temperature=2.0, hard_weight=0.5),
    )
    trainer.train()

The batch's ``labels`` follow the transformers convention for causal LMs (``labels = input_ids``
with -100 on padding, *unshifted*); the loss shifts them: the logits at position t are scored
against the label at t + 1. A ``shift_labels`` entry (already aligned with the logits, as
padding-free collators provide) is used as is. Tokens whose label is -100 contribute nothing; a
batch with every label ignored gives a loss of 0.

``fused_linear=True`` computes the loss from both models' last hidden states and lm_heads
(``fused_linear_kd_loss``): the models run through their own forward (so DDP and accelerate see
it) with ``output_hidden_states=True, logits_to_keep=1``, and neither model's (tokens x V) logits
are made. On the first batch the trainer checks that lm_head(last hidden state) reproduces the one
logit row the model did compute, and refuses models whose logits are something else (a softcap, a
logit scale). ``outputs.logits`` then holds only the last position.

Without a teacher (``teacher_model=None``) the targets come with the batch, as
``distill_ops.targets.TargetCache`` yields them: ``ids`` (..., k), ``logprobs`` (..., k) and
optionally ``tail_logmass`` per position, the teacher's targets for the token after it; the loss is
``sparse_kd_loss`` (``fused_linear_sparse_kd_loss`` with ``fused_linear``) and ``kd_kwargs`` are
its keywords. Cache items carry no ``labels``: then the labels are the ``input_ids`` (-100 where
``attention_mask`` is 0), added to each batch before Trainer counts the accumulated batch's tokens.
A cache written from padded batches holds sequences of different lengths; the default collator
here is then ``distill_ops.trainer.data.collate`` (right padding, target ids padded with -1).

``shard_teacher=True`` shards the teacher over the process group's ranks with FSDP2 (each decoder
layer a unit, the root holding embeddings, final norm and lm_head; trainer/fsdp.py, as the thin
trainer shards its own): each rank keeps 1/world of it; its forward gathers the root for the
whole forward and each decoder layer in turn, and the root is freed again after each step's loss
(FSDP2 keeps a root gathered for a backward that a frozen teacher never has). It needs
torch.distributed initialised with several ranks, which Trainer does under torchrun or
accelerate launch; the student is wrapped as accelerate decides (DDP, FSDP), independently.
By default (None) the teacher is sharded when accelerate shards the student with FSDP2
(``fsdp_config={"fsdp_version": 2}``) over several ranks and the teacher has no ``device_map``,
and replicated otherwise, as before (FSDP1 and DeepSpeed ZeRO-3 leave it whole on every rank).
A teacher sharded by an earlier trainer is used as it is.
Every rank holds the whole teacher in host memory until it is sharded (load it on the CPU): they
must hold the same weights, which is checked (fully_shard keeps each rank's own slices). Or only
rank 0 loads it, and the other ranks build it on the meta device (``from_config`` under
``torch.device("meta")``): rank 0's weights are then broadcast into every rank's shards, one
tensor at a time, and one copy sits in host memory instead of one per rank.

With gradient accumulation the loss is normalised by the number of labelled tokens of the whole
accumulated batch (``num_items_in_batch``), as transformers' own causal-LM loss is. Trainer counts
it for every student here, from the shifted labels each training batch is given; a transformers
release that passes no ``num_items_in_batch`` (before 4.46) gets the mean over each micro-batch's
labelled tokens instead.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Any, Mapping, Optional, Union

import torch
from transformers import Trainer

import torch.nn.functional as F

from .._dtensor import gathered
from ..functional import kd_loss
from ..fused_linear import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from ..sparse import sparse_kd_loss
from ..trainer import dist, fsdp
from ..trainer.data import collate, shift_labels

IGNORE_INDEX = -100
# The batch keys of cached targets (TargetCache's item keys).
TARGET_KEYS = ("ids", "logprobs", "tail_logmass")
_PER_CALL = {"student_logits", "teacher_logits", "student_hidden", "student_weight",
             "teacher_hidden", "teacher_weight", "student_bias", "teacher_bias", "target_ids",
             "target_logprobs", "tail_logmass", "labels", "reduction", "ignore_index"}


def _own_labels(batch: Mapping) -> torch.Tensor:
    """The labels of a batch of cached targets, which has none: its input_ids, -100 on padding."""
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _with_own_labels(batch: Any) -> Any:
    if not isinstance(batch, Mapping) or "input_ids" not in batch or \
            "labels" in batch or "shift_labels" in batch:
        return batch
    return {**batch, "labels": _own_labels(batch)}


def _with_shift_labels(batch: Any) -> Any:
    """The batch with ``shift_labels``, the labels the loss scores (compute_loss reads them as they
    are). Trainer counts ``num_items_in_batch`` from them where a batch has them; from "labels" it
    would count each row's first token too, which nothing scores, unless the student's class maps
    to transformers' ForCausalLMLoss (a subclass of another name does not)."""
    if not isinstance(batch, Mapping) or "labels" not in batch or "shift_labels" in batch:
        return batch
    return {**batch, "shift_labels": shift_labels(batch["labels"], ignore_index=IGNORE_INDEX)}


def _auto_shard(trainer: Trainer) -> bool:
    """shard_teacher's default: whether accelerate shards the student with FSDP2 over several
    ranks (then a teacher left whole on every rank would undo what sharding the student saves)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return (bool(getattr(trainer, "is_fsdp_enabled", False)) and plugin is not None
            and getattr(plugin, "fsdp_version", 1) == 2 and trainer.accelerator.num_processes > 1)


def _keywords(fn) -> set:
    return set(inspect.signature(fn).parameters) - _PER_CALL


# kd_kwargs allowed per (fused_linear, targets from the batch).
_ALLOWED = {(False, False): (_keywords(kd_loss), "kd_loss"),
            (True, False): (_keywords(fused_linear_kd_loss), "fused_linear_kd_loss"),
            (False, True): (_keywords(sparse_kd_loss), "sparse_kd_loss"),
            (True, True): (_keywords(fused_linear_sparse_kd_loss),
                           "fused_linear_sparse_kd_loss")}


class DistillationTrainer(Trainer):
    """transformers.Trainer + ``kd_loss`` against ``teacher_model`` (kept in eval mode, no grad).

    Args:
        teacher_model: the teacher (nn.Module); moved to the student's device on first use,
            unless it was loaded with a ``device_map`` (then it stays where it is and its
            outputs come to the student). None: the batches carry cached targets (module
            docstring).
        kd_kwargs: keywords of :func:`distill_ops.kd_loss` (divergence, temperature, beta, alpha,
            hard_weight, soft_weight, scale_temperature, softcap, vocab, backend, ...); not
            ``labels``, ``reduction`` or ``ignore_index``, which the trainer sets. With ``fused_linear``, those of
            :func:`distill_ops.fused_linear_kd_loss` (the same, less vocab and inplace_grad,
            plus chunk_size); without a teacher, those of ``sparse_kd_loss`` (or
            ``fused_linear_sparse_kd_loss``).
        fused_linear: the loss from hidden states and lm_heads, without logits (module docstring).
        shard_teacher: shard the teacher over the ranks with FSDP2 (module docstring); None: when
            accelerate shards the student with FSDP2 over several ranks.
        All other arguments go to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, teacher_model: Optional[torch.nn.Module],
                 kd_kwargs: Optional[dict] = None, fused_linear: bool = False,
                 shard_teacher: Optional[bool] = None, **kwargs: Any) -> None:
        if teacher_model is not None and not isinstance(teacher_model, torch.nn.Module):
            raise TypeError("teacher_model must be a torch.nn.Module (load it first, e.g. with "
                            "AutoModelForCausalLM.from_pretrained), or None for batches that "
                            "carry cached targets")
        if shard_teacher is not None and not isinstance(shard_teacher, bool):
            raise TypeError(f"shard_teacher must be True, False or None, got {shard_teacher!r}")
        if shard_teacher and teacher_model is None:
            raise ValueError("shard_teacher=True needs a teacher_model (without one the batches "
                             "carry cached targets: there is no teacher to shard)")
        kd_kwargs = dict(kd_kwargs or {})
        allowed, fn = _ALLOWED[(bool(fused_linear), teacher_model is None)]
        bad = sorted(set(kd_kwargs) - allowed)
        if bad:
            raise TypeError(f"kd_kwargs has keys {fn} does not take here: {bad} "
                            f"(allowed: {sorted(allowed)})")
        if teacher_model is None and len(args) < 3 and kwargs.get("data_collator") is None:
            # Trainer's default stacks the items, which a cache of ragged sequences cannot do
            kwargs["data_collator"] = collate
        super().__init__(*args, **kwargs)
        if getattr(self, "compute_loss_func", None) is not None:
            raise TypeError("DistillationTrainer computes its own loss (kd_kwargs set it): "
                            "compute_loss_func would not be called")
        if getattr(self.args, "label_smoothing_factor", 0.0):
            raise ValueError("args.label_smoothing_factor is not applied by DistillationTrainer's "
                             "loss (the teacher's soft targets take its place): set it to 0")
        # Trainer counts num_items_in_batch only for a model that takes loss kwargs (the student's
        # class decides: Gemma3's ...ForConditionalGeneration, or a forward without **kwargs, does
        # not). compute_loss normalises by the count itself and never hands it to the model, so it
        # is wanted whatever the student: without it, accumulated micro-batches are averaged one
        # by one, and one with fewer tokens weighs each of them more than one big batch would.
        self.model_accepts_loss_kwargs = True
        self.kd_kwargs = kd_kwargs
        self._check_caches()
        self.fused_linear = bool(fused_linear)
        self._heads_checked = False
        self.teacher_model = teacher_model
        self.shard_teacher = False
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self.shard_teacher = self._prepare_teacher(shard_teacher)

    def _prepare_teacher(self, requested: Optional[bool]) -> bool:
        """Decide whether the teacher is sharded (``requested``, or the default) and shard it;
        return the decision. What one rank alone could fail (a device_map, a teacher on the meta
        device) is agreed by every rank first, in one all-reduce, so that all raise together
        rather than some waiting in a collective the others never reach."""
        from torch.distributed.fsdp import FSDPModule

        teacher, device = self.teacher_model, self.accelerator.device
        if isinstance(teacher, FSDPModule):   # sharded by an earlier trainer: used as it is
            if requested is False:
                raise ValueError("shard_teacher=False, but the teacher is sharded already (by an "
                                 "earlier DistillationTrainer?)")
            return True
        several = dist.world_size() > 1
        on_meta = any(t.is_meta for t in itertools.chain(teacher.parameters(), teacher.buffers()))
        mine = [float(getattr(teacher, "hf_device_map", None) is not None), float(on_meta),
                float(on_meta and dist.rank() == 0)]
        spread, meta, meta_on_rank0 = (bool(x) for x in dist.all_reduce_max(mine, device))
        # (the default leaves a teacher spread over devices as it is)
        shard = (_auto_shard(self) and not spread) if requested is None else requested
        if shard and spread:
            raise ValueError("shard_teacher=True and a teacher loaded with a device_map: it is "
                             "spread over devices already; load it on the CPU to shard it")
        if shard and not several:
            raise ValueError("shard_teacher=True needs torch.distributed initialised with "
                             "several ranks (launch with torchrun or accelerate launch)")
        if meta and not shard:
            raise ValueError("the teacher is on the meta device (no weights) on some rank: only "
                             "a sharded teacher (shard_teacher=True) receives rank 0's weights")
        if meta_on_rank0:
            raise ValueError("shard_teacher: rank 0's teacher is on the meta device; rank 0 must "
                             "hold its weights (the other ranks may build it on the meta device, "
                             "AutoModelForCausalLM.from_config under torch.device('meta'), and "
                             "receive rank 0's)")
        if shard:
            # a rank on meta: rank 0's weights broadcast into every rank's shards
            fsdp.shard(teacher, device, from_rank0=meta, hint="use shard_teacher=False")
        return shard

    def _check_caches(self) -> None:
        """A TargetCache given as a dataset must suit the loss: sampled targets need
        tail="renorm" (targets/cache.py check_tail_mode), and its ids, which reach up to the
        cache's vocab_size, must fall inside the student's logits. Checked here, not at the first
        batch (an inf loss, or an id out of range)."""
        from ..targets.cache import TargetCache, check_tail_mode, warn_other_temperature

        head = self.model.get_output_embeddings() if self.model is not None else None
        for name in ("train_dataset", "eval_dataset"):
            ds = getattr(self, name, None)
            if not isinstance(ds, TargetCache):
                continue
            check_tail_mode(ds.manifest, self.kd_kwargs.get("tail", "renorm"), ds.path)
            warn_other_temperature(ds.manifest, self.kd_kwargs.get("temperature", 1.0), name,
                                   "kd_kwargs has temperature")
            if head is not None and ds.vocab_size > int(head.weight.shape[0]):
                raise ValueError(
                    f"{name} is a target cache made with a vocabulary of {ds.vocab_size} tokens, "
                    f"but the student's logits have {int(head.weight.shape[0])} columns: its "
                    "target ids would fall outside them (another teacher or tokenizer?)")

    def _place_teacher(self, device: torch.device) -> None:
        """The teacher on the student's device, unless it was loaded spread over devices
        (``device_map``: accelerate's hooks move its inputs and activations; moving it whole
        could not fit). Its outputs are then brought to the student's device."""
        teacher = self.teacher_model
        if not self.shard_teacher and getattr(teacher, "hf_device_map", None) is None and \
                next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()

    def _teacher_done(self) -> None:
        """A sharded teacher's root parameters freed once its outputs are used (fsdp.reshard)."""
        if self.shard_teacher:
            fsdp.reshard(self.teacher_model)

    def _teacher_logits(self, inputs: dict, device: torch.device) -> torch.Tensor:
        self._place_teacher(device)
        try:
            with torch.no_grad():
                return self.teacher_model(**inputs).logits.to(device)
        finally:
            self._teacher_done()

    def _fused_hidden(self, model, inputs: dict, grad: bool):
        """(last hidden states, lm_head) of ``model`` run through its own forward (wrapper
        included) with only the last position's logits; checked (its forward's signature, and
        the heads against the one logit row) on first use only."""
        core = self.accelerator.unwrap_model(model)
        if not self._heads_checked and "logits_to_keep" not in inspect.signature(
                core.forward).parameters:
            raise ValueError(f"fused_linear needs a model whose forward takes logits_to_keep; "
                             f"{type(core).__name__} does not (use fused_linear=False)")
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        head = core.get_output_embeddings()
        hidden = out.hidden_states[-1]
        if not self._heads_checked:
            with torch.no_grad():
                # (an FSDP2 head's DTensors gathered, as the loss gathers them)
                mine = F.linear(hidden[..., -1, :], gathered(head.weight, hidden.dtype),
                                gathered(head.bias, hidden.dtype)).float()
                theirs = out.logits[..., -1, :].float()
                tol = 2e-2 * float(theirs.abs().max().clamp_min(1.0))
                bad = mine.shape != theirs.shape or float((mine - theirs).abs().max()) > tol
                # each rank saw its own batch: all raise, or none
                if dist.all_reduce_max([float(bad)], hidden.device)[0]:
                    raise ValueError(
                        f"fused_linear: {type(core).__name__}'s logits are not lm_head(last "
                        "hidden state) (a softcap or a logit scale?); use fused_linear=False")
        return out, hidden, head

    def _fused_loss(self, model, inputs: dict, labels: torch.Tensor, reduction: str):
        out, h_s, s_head = self._fused_hidden(model, inputs, grad=True)
        dev = h_s.device
        self._place_teacher(dev)
        try:
            # (not kept: the teacher's output holds every layer's hidden states)
            h_t, t_head = self._fused_hidden(self.teacher_model, inputs, grad=False)[1:]
            self._heads_checked = True
            # a teacher spread over devices: its lm_head is copied to the student's each step
            t_bias = None if t_head.bias is None else t_head.bias.to(dev)
            loss = fused_linear_kd_loss(h_s, s_head.weight, h_t.to(dev), t_head.weight.to(dev),
                                        student_bias=s_head.bias, teacher_bias=t_bias,
                                        labels=labels, reduction=reduction,
                                        ignore_index=IGNORE_INDEX, **self.kd_kwargs)
        finally:
            # (the loss made its gradients in its forward: the teacher's head is not read again)
            self._teacher_done()
        return out, loss

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer keeps only the columns the model's forward takes (remove_unused_columns): the
        # cached targets are the loss's, so they are kept too.
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns += [k for k in TARGET_KEYS if k not in self._signature_columns]

    def _cached_loss(self, model, inputs: dict, targets: dict, labels: torch.Tensor,
                     reduction: str):
        """The sparse loss against the targets the batch carries (no teacher)."""
        missing = [k for k in TARGET_KEYS[:2] if k not in targets]
        if missing:
            raise ValueError(f"without a teacher_model the batch must carry cached targets: "
                             f"{', '.join(TARGET_KEYS[:2])} (missing {', '.join(missing)})")
        kw = dict(tail_logmass=targets.get("tail_logmass"), labels=labels, reduction=reduction,
                  ignore_index=IGNORE_INDEX, **self.kd_kwargs)
        if self.fused_linear:
            out, h_s, head = self._fused_hidden(model, inputs, grad=True)
            self._heads_checked = True
            return out, fused_linear_sparse_kd_loss(h_s, head.weight, targets["ids"],
                                                    targets["logprobs"], student_bias=head.bias,
                                                    **kw)
        out = model(**inputs, use_cache=False)
        return out, sparse_kd_loss(out.logits, targets["ids"], targets["logprobs"], **kw)

    def get_batch_samples(self, epoch_iterator: Any, *args: Any, **kwargs: Any) -> tuple:
        """Trainer's hook; a batch of cached targets gets its labels here (_own_labels), because
        Trainer counts ``num_items_in_batch`` only for batches with "labels": without them,
        gradient accumulation would average each micro-batch on its own, and micro-batches of
        different token counts would weigh their tokens differently than one big batch. Every
        batch gets the shifted labels it is scored on, which Trainer counts (_with_shift_labels)."""
        if self.teacher_model is None:
            epoch_iterator = map(_with_own_labels, epoch_iterator)
        epoch_iterator = map(_with_shift_labels, epoch_iterator)
        return super().get_batch_samples(epoch_iterator, *args, **kwargs)

    def prediction_step(self, model: torch.nn.Module, inputs: Mapping[str, Any],
                        prediction_loss_only: bool, ignore_keys: Optional[list] = None) -> tuple:
        """Trainer's hook; evaluation batches of cached targets get their labels too: Trainer
        computes no eval loss for a batch without them."""
        if self.teacher_model is None:
            inputs = _with_own_labels(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys)

    def compute_loss(self, model: torch.nn.Module, inputs: Mapping[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[int, torch.Tensor]] = None
                     ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """The distillation loss of one batch (Trainer's hook; see the module docstring for the
        labels, the cached-target batches and the normalisation by ``num_items_in_batch``)."""
        inputs = dict(inputs)
        targets = {k: inputs.pop(k) for k in TARGET_KEYS if k in inputs}
        labels = inputs.pop("labels", None)
        shift = inputs.pop("shift_labels", None)
        if labels is None and shift is None and self.teacher_model is None:
            # Cache items carry no labels: the next tokens are the input's own (Trainer's batches
            # have them already, from get_batch_samples and prediction_step; a direct call's not).
            labels = _own_labels(inputs)
        if labels is None and shift is None:
            raise ValueError("DistillationTrainer needs 'labels' (or 'shift_labels') in the batch: "
                             "use a causal-LM collator, e.g. DataCollatorForLanguageModeling(tok, "
                             "mlm=False)")
        model_inputs = inputs  # everything but the labels goes to both models
        if shift is None:
            shift = shift_labels(labels, ignore_index=IGNORE_INDEX)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        if self.teacher_model is None:
            outputs, result = self._cached_loss(model, model_inputs, targets, shift, reduction)
        elif self.fused_linear:
            outputs, result = self._fused_loss(model, model_inputs, shift, reduction)
        else:
            outputs = model(**model_inputs, use_cache=False)
            teacher_logits = self._teacher_logits(model_inputs, outputs.logits.device)
            result = kd_loss(outputs.logits, teacher_logits, labels=shift, reduction=reduction,
                             ignore_index=IGNORE_INDEX, **self.kd_kwargs)
        if num_items_in_batch is not None:
            total = result
            count = num_items_in_batch
            if torch.is_tensor(count):
                count = count.to(total.device).clamp_min(1)
            else:
                count = max(int(count), 1)
            loss = total / count
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every data-parallel rank's tokens; DDP averages
                # gradients. (Tensor-parallel ranks share one batch: transformers leaves them out
                # of the count, so they are left out of the factor too, as in its compute_loss.)
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // max(int(tp), 1))
        else:
            loss = result
        # Tell Trainer.training_step whether the loss is already normalised over the accumulated
        # batch (then it must not divide by the number of accumulation steps again).
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

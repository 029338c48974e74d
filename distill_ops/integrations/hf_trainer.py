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

With gradient accumulation the loss is normalised by the number of labelled tokens of the whole
accumulated batch when the Trainer provides it (``num_items_in_batch``), as transformers' own
causal-LM loss is; otherwise it is the mean over the micro-batch's labelled tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from transformers import Trainer

from ..functional import kd_loss

IGNORE_INDEX = -100
_KD_PARAMS = set(inspect.signature(kd_loss).parameters) - {"student_logits", "teacher_logits",
                                                           "labels", "reduction"}


class DistillationTrainer(Trainer):
    """transformers.Trainer + ``kd_loss`` against ``teacher_model`` (kept in eval mode, no grad).

    Args:
        teacher_model: the teacher (nn.Module); moved to the student's device on first use.
        kd_kwargs: keywords of :func:`distill_ops.kd_loss` (divergence, temperature, beta, alpha,
            hard_weight, soft_weight, scale_temperature, softcap, vocab, backend, ...); not
            ``labels`` or ``reduction``, which the trainer sets.
        All other arguments go to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, teacher_model: torch.nn.Module, kd_kwargs: Optional[dict] = None,
                 **kwargs: Any) -> None:
        if teacher_model is None or not isinstance(teacher_model, torch.nn.Module):
            raise TypeError("teacher_model must be a torch.nn.Module (load it first, e.g. with "
                            "AutoModelForCausalLM.from_pretrained)")
        kd_kwargs = dict(kd_kwargs or {})
        bad = sorted(set(kd_kwargs) - _KD_PARAMS)
        if bad:
            raise TypeError(f"kd_kwargs has keys kd_loss does not take here: {bad} "
                            f"(allowed: {sorted(_KD_PARAMS)})")
        super().__init__(*args, **kwargs)
        self.kd_kwargs = kd_kwargs
        self.teacher_model = teacher_model
        self.teacher_model.eval()
        self.teacher_model.requires_grad_(False)

    def _teacher_logits(self, inputs: dict, device: torch.device) -> torch.Tensor:
        teacher = self.teacher_model
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        with torch.no_grad():
            return teacher(**inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift = inputs.pop("shift_labels", None)
        if labels is None and shift is None:
            raise ValueError("DistillationTrainer needs 'labels' (or 'shift_labels') in the batch: "
                             "use a causal-LM collator, e.g. DataCollatorForLanguageModeling(tok, "
                             "mlm=False)")
        model_inputs = inputs  # everything but the labels goes to both models
        outputs = model(**model_inputs, use_cache=False)
        student_logits = outputs.logits
        teacher_logits = self._teacher_logits(model_inputs, student_logits.device)
        if shift is None:
            shift = torch.full_like(labels, IGNORE_INDEX)
            shift[..., :-1] = labels[..., 1:]
        if num_items_in_batch is not None:
            total = kd_loss(student_logits, teacher_logits, labels=shift, reduction="sum",
                            ignore_index=IGNORE_INDEX, **self.kd_kwargs)
            count = num_items_in_batch
            if torch.is_tensor(count):
                count = count.to(total.device).clamp_min(1)
            else:
                count = max(int(count), 1)
            loss = total / count
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every process's tokens; DDP averages gradients.
                loss = loss * self.accelerator.num_processes
        else:
            loss = kd_loss(student_logits, teacher_logits, labels=shift, reduction="mean",
                           ignore_index=IGNORE_INDEX, **self.kd_kwargs)
        # Tell Trainer.training_step whether the loss is already normalised over the accumulated
        # batch (then it must not divide by the number of accumulation steps again).
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

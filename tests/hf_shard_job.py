"""Run by tests/test_integrations_hf_shard.py under torchrun (two CPU processes, gloo): the same
DistillationTrainer run with the teacher sharded (shard_teacher=True) and whole on every rank,
through the logits and the fused-linear paths, and with the default beside accelerate's FSDP2
student; each rank writes what it saw to ``shard-<rank>.json`` in the working directory."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_ops._dtensor import is_dtensor  # noqa: E402
from distill_ops.integrations.hf_trainer import DistillationTrainer  # noqa: E402
from distill_ops.trainer.models import llama  # noqa: E402
from gloo_worker import GLOO_AVG_SUMS, leave  # noqa: E402
from test_integrations_hf import V, ListDataset  # noqa: E402


@contextlib.contextmanager
def accelerate_fsdp_on_cpu():
    """Make accelerate take the FSDP plugin on the CPU. It enables FSDP only for GPU-like device
    types, so the default shard_teacher=None, which follows an FSDP2 student, is otherwise never
    reached here; its FSDP2 preparation itself runs on gloo (fully_shard)."""
    from accelerate.state import DistributedType, PartialState

    state = PartialState()._shared_state
    before = state["distributed_type"]
    state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        state["distributed_type"] = before


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def run(shard: Optional[bool], fused_linear: bool, teacher_seed: int = 1,
        fsdp_student: bool = False, meta_ranks: tuple = (),
        meta_dtype: torch.dtype = torch.float32) -> dict:
    """``meta_ranks``: the ranks that build the teacher on the meta device (no weights), in
    ``meta_dtype``."""
    # two decoder layers: the teacher's layers are FSDP2 units of their own, the root another
    student = llama(V, 32, 2, heads=2, seed=0)
    meta = int(os.environ["RANK"]) in meta_ranks
    with torch.device("meta") if meta else contextlib.nullcontext():
        teacher = llama(V, 48, 2, heads=2, seed=teacher_seed)
    if meta:
        teacher.to(meta_dtype)
    fsdp = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap":
                                        ["LlamaDecoderLayer"]}) if fsdp_student else {}
    args = transformers.TrainingArguments(
        output_dir="out", per_device_train_batch_size=2, per_device_eval_batch_size=2,
        max_steps=3, learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, seed=0, **fsdp)
    common = dict(model=student, teacher_model=teacher, args=args, eval_dataset=ListDataset(n=8),
                  kd_kwargs=dict(divergence="jsd", beta=0.3, temperature=2.0),
                  fused_linear=fused_linear, shard_teacher=shard)
    with accelerate_fsdp_on_cpu() if fsdp_student else contextlib.nullcontext():
        trainer = DistillationTrainer(train_dataset=ListDataset(), **common)
        out = trainer.train()
        # resharded after each training loss (before any evaluation)
        head_after_train = is_dtensor(teacher.lm_head.weight)
        eval_loss = trainer.evaluate()["eval_loss"]
        # the same teacher given to another trainer (sharded already: used as it is); not beside
        # an FSDP2 student, which accelerate 1.15 prepares for evaluation only with an optimizer
        eval_again = None if fsdp_student else DistillationTrainer(**common).evaluate()["eval_loss"]
    return {"train_loss": out.training_loss, "eval_loss": eval_loss, "eval_again": eval_again,
            "head_after_train": head_after_train,
            "params": [full(p.detach()).double().sum().item() for p in student.parameters()],
            # (a layer's: after the evaluation's forward the student's root stays gathered)
            "fsdp_student": bool(trainer.is_fsdp_enabled) and is_dtensor(
                student.model.layers[0].mlp.up_proj.weight),
            "sharded": trainer.shard_teacher,
            # resharded after each loss: the root's lm_head and a layer's weight are shards again
            "head_is_shard": is_dtensor(teacher.lm_head.weight),
            "layer_is_shard": is_dtensor(teacher.model.layers[0].mlp.up_proj.weight)}


def main() -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen = {f"{name}-{fl}": run(shard, fl)
            for fl in (False, True) for name, shard in (("sharded", True), ("whole", False))}
    for fl in (False, True):   # rank 1's teacher built on the meta device: rank 0's weights
        seen[f"from-rank0-{fl}"] = run(True, fl, teacher_seed=1 + rank, meta_ranks=(1,))
    for fl in (False, True):   # the default beside accelerate's FSDP2 student
        if not GLOO_AVG_SUMS:   # (whose gradients torch < 2.9 sums on gloo instead of averaging)
            seen[f"default-fsdp2-{fl}"] = run(None, fl, fsdp_student=True)
    refused = {"different_teachers": dict(teacher_seed=1 + rank),   # each rank's own teacher
               "rank0_on_meta": dict(meta_ranks=(0,)),   # rank 0 without weights
               # rank 1's teacher on meta in another dtype than rank 0's
               "other_dtype_on_meta": dict(meta_ranks=(1,), meta_dtype=torch.float64),
               # a teacher on meta that is not to be sharded: nothing would give it weights
               "meta_unsharded": dict(shard=False, meta_ranks=(1,))}
    for name, kw in refused.items():   # each on every rank, before any step
        try:
            run(**{"shard": True, "fused_linear": False, **kw})
            seen[name] = "not refused"
        except (RuntimeError, ValueError) as exc:
            seen[name] = str(exc)
    Path(f"shard-{rank}.json").write_text(json.dumps(seen))
    # with the group torn down by the interpreter's exit, torch 2.11's gloo threads aborted the
    # process ("terminate called without an active exception") after all was written
    leave()


if __name__ == "__main__":
    main()

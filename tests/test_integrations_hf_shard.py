"""DistillationTrainer(shard_teacher=...): the teacher sharded over the ranks with FSDP2 trains the
student exactly as a teacher whole on every rank does, beside a DDP student and, by default,
beside accelerate's FSDP2 student; it is sharded again after every loss; the arguments are checked
before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as tdist

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
transformers = pytest.importorskip("transformers")

from distill_ops.integrations import hf_trainer  # noqa: E402
from distill_ops.integrations.hf_trainer import DistillationTrainer  # noqa: E402
from distill_ops.trainer.models import llama  # noqa: E402
from gloo_worker import GLOO_AVG_SUMS, NEEDS_GLOO, torchrun  # noqa: E402
from test_integrations_hf import V, ListDataset, args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def assert_same_training(run: dict, whole: dict, fused_linear: bool) -> None:
    """The same teacher outputs: the same losses and student, up to the all-gathers' float32
    re-association (bitwise on gloo, measured)."""
    for key in ("train_loss", "eval_loss"):
        assert run[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), (fused_linear, key)
    assert run["params"] == pytest.approx(whole["params"], rel=1e-6, abs=1e-7), fused_linear
    # a second trainer given the same teacher (sharded already) evaluates the same
    assert run["eval_again"] in (run["eval_loss"], None), fused_linear


@NEEDS_GLOO
def test_sharded_teacher_trains_as_a_whole_one_under_torchrun(tmp_path):
    run = torchrun([str(Path(__file__).resolve().parent / "hf_shard_job.py")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"shard-{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        for fl in (False, True):
            sharded, whole = seen[f"sharded-{fl}"], seen[f"whole-{fl}"]
            assert sharded["sharded"] and not whole["sharded"]
            assert sharded["head_is_shard"] and sharded["layer_is_shard"], fl
            assert sharded["head_after_train"], fl
            assert sharded["eval_again"] is not None and whole["eval_again"] is not None
            assert not whole["head_is_shard"]
            assert_same_training(sharded, whole, fl)
            # rank 1 built its teacher on the meta device (its weights, had it any, would differ
            # from rank 0's: seeded by rank): rank 0's are the teacher's
            rank0 = seen[f"from-rank0-{fl}"]
            assert rank0["sharded"] and rank0["head_is_shard"] and rank0["layer_is_shard"]
            assert_same_training(rank0, whole, fl)
            # the default (None) beside an FSDP2 student: sharded, and the same training again
            # (torch < 2.9: not run, FSDP2 on gloo sums the student's gradients; gloo_worker)
            if GLOO_AVG_SUMS:
                continue
            default = seen[f"default-fsdp2-{fl}"]
            assert default["fsdp_student"] and default["sharded"] and default["head_is_shard"]
            assert_same_training(default, whole, fl)
            assert not whole["fsdp_student"]
        assert "ranks hold different weights" in seen["different_teachers"]
        assert "rank 0's teacher is on the meta device" in seen["rank0_on_meta"]
        assert "models differ from rank 0's" in seen["other_dtype_on_meta"]
        assert "on the meta device (no weights) on some rank" in seen["meta_unsharded"]
    # and the ranks' students agree (DDP)
    assert ranks[0]["sharded-True"]["params"] == ranks[1]["sharded-True"]["params"]


def test_shard_teacher_arguments_are_checked_first(tmp_path):
    student, teacher = llama(V, 32, 1, heads=2, seed=0), llama(V, 48, 1, heads=2, seed=1)
    common = dict(model=student, args=args(tmp_path), train_dataset=ListDataset())
    with pytest.raises(TypeError, match="shard_teacher must be True, False or None"):
        DistillationTrainer(teacher_model=teacher, shard_teacher=1, **common)
    with pytest.raises(ValueError, match="shard_teacher=True needs a teacher_model"):
        DistillationTrainer(teacher_model=None, shard_teacher=True, **common)
    teacher.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match="device_map"):
        DistillationTrainer(teacher_model=teacher, shard_teacher=True, **common)
    del teacher.hf_device_map
    # one process, no process group: nothing to shard over
    assert not (tdist.is_available() and tdist.is_initialized())
    with pytest.raises(ValueError, match="several ranks"):
        DistillationTrainer(teacher_model=teacher, shard_teacher=True, **common)
    assert not any(type(p).__name__ == "DTensor" for p in teacher.parameters())
    # by default, one process: the teacher stays whole
    assert DistillationTrainer(teacher_model=teacher, **common).shard_teacher is False


@pytest.mark.parametrize("enabled,version,processes,expected", [
    (True, 2, 2, True), (True, 2, 1, False), (True, 1, 2, False), (False, None, 2, False)])
def test_default_shards_the_teacher_only_beside_an_fsdp2_student(enabled, version, processes,
                                                                 expected):
    plugin = None if version is None else SimpleNamespace(fsdp_version=version)
    trainer = SimpleNamespace(is_fsdp_enabled=enabled, accelerator=SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), num_processes=processes))
    assert hf_trainer._auto_shard(trainer) is expected

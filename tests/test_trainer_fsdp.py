"""The loop under FSDP2 (fsdp=True): two gloo processes on the CPU, a tiny Llama (tied lm_head) and
a teacher, both sharded. The result equals one process training on the same global batches with
gradient accumulation, with the logits or fused_linear (the lm_head read after the root's
forward); a checkpoint written sharded resumes to the same weights as a straight run."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from distill_ops.trainer import TrainConfig, train
from distill_ops.trainer.models import llama
from gloo_worker import FSDP2_ON_GLOO, NEEDS_GLOO, gloo_process

pytestmark = [NEEDS_GLOO, FSDP2_ON_GLOO,
              pytest.mark.usefixtures("one_intraop_thread")]

V = 64


def _data():
    return torch.randint(0, V, (32, 16), generator=torch.Generator().manual_seed(0))


def _config(out, **kw):
    base = dict(output_dir=out, max_steps=4, micro_batch_size=4, temperature=2.0, hard_weight=0.3,
                lr=3e-3, log_every=1, progress=False, plot=False, device="cpu", eval_fraction=0.0,
                save_every=2)
    base.update(kw)
    return TrainConfig(**base)


def _models(seed=0):
    return (llama(V, 32, 2, heads=2, max_positions=32, seed=seed),
            llama(V, 48, 1, heads=2, max_positions=32, seed=7))


def _flat(model) -> torch.Tensor:
    """The full weights, by name (every rank gathers; rank 0 gets them)."""
    from distill_ops.trainer import fsdp

    state = fsdp.model_state(model)
    return torch.cat([state[k].flatten() for k in sorted(state)]) if state else torch.empty(0)


def _worker(rank, world, tmp, data, fused):
    with gloo_process(rank, world, tmp):
        kw = dict(fsdp=True, fused_linear=fused, eval_batches=1)
        # ranks holding different weights are refused (FSDP2 would stitch them together)
        with pytest.raises(RuntimeError, match="the ranks hold different weights"):
            train(_config(os.path.join(tmp, "x"), **kw), student=_models(seed=rank)[0],
                  teacher=_models()[1], train_dataset=data)
        student, teacher = _models()
        # 12 held-out sequences: 3 batches, 2 on rank 0 and 1 on rank 1, whose FSDP2 forwards
        # (collectives) must still pair up (rank 1 joins with a one-token forward)
        straight = train(_config(os.path.join(tmp, "a"), **kw), student=student,
                         teacher=teacher, train_dataset=data, eval_dataset=data[:12])
        assert type(straight.model.lm_head.weight).__name__ == "DTensor"
        # the teacher's root unit (embeddings, lm_head) is sharded again after its forwards:
        # FSDP2 keeps a root gathered for a backward, which a teacher never has
        assert type(teacher.lm_head.weight).__name__ == "DTensor"
        # from the straight run's checkpoint-2, written sharded, to step 4 again
        resumed = train(_config(os.path.join(tmp, "b"), **kw,
                                resume_from=os.path.join(tmp, "a", "checkpoint-2")),
                        student=_models()[0], teacher=_models()[1], train_dataset=data)
        flats = [_flat(m.model) for m in (straight, resumed)]
        if rank == 0:
            torch.save({"flats": flats, "history": straight.history,
                        "eval": straight.final_eval}, os.path.join(tmp, "result.pt"))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_fsdp_two_gloo_processes_match_single_process(tmp_path, fused):
    data = _data()
    mp.spawn(_worker, args=(2, str(tmp_path), data, fused), nprocs=2, join=True)
    out = torch.load(tmp_path / "result.pt", weights_only=False)
    straight, resumed = out["flats"]
    # one process, same global batches (2 ranks x 4 = 1 process x 4 x 2 accumulation steps)
    student, teacher = _models()
    single = train(_config(str(tmp_path / "single"), grad_accum_steps=2, fused_linear=fused,
                           eval_batches=1),
                   student=student, teacher=teacher, train_dataset=data, eval_dataset=data[:12])
    state = single.model.state_dict()
    ref = torch.cat([state[k].flatten() for k in sorted(state)])
    torch.testing.assert_close(straight, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(resumed, straight, rtol=1e-5, atol=1e-7)
    loss_fsdp = [r["loss"] for r in out["history"] if "loss" in r]
    loss_one = [r["loss"] for r in single.history if "loss" in r]
    assert loss_fsdp == pytest.approx(loss_one, rel=1e-5)
    assert out["eval"]["eval_ce"] == pytest.approx(single.final_eval["eval_ce"], rel=1e-4)
    # the checkpoint holds full weights, as a single process writes them
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4")
    torch.testing.assert_close(saved.model.embed_tokens.weight,
                               single.model.model.embed_tokens.weight, rtol=1e-4, atol=1e-6)


def _saved_models(tmp_path) -> list[str]:
    """_models() written to tmp_path/student and tmp_path/teacher; their paths."""
    dirs = [str(tmp_path / "student"), str(tmp_path / "teacher")]
    for model, path in zip(_models(), dirs):
        model.save_pretrained(path)
    return dirs


def _refuse(*args, **kwargs):
    raise AssertionError("a rank other than 0 read weight files")


def _worker_dirs(rank, world, tmp, data, dirs):
    with gloo_process(rank, world, tmp):
        if rank != 0:   # rank 0 alone reads: the model files at the start, the checkpoint's
            import safetensors.torch
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained = _refuse
            safetensors.torch.load_file = _refuse
        kw = dict(fsdp=True, eval_batches=1, student=dirs[0], teacher=dirs[1])
        straight = train(_config(os.path.join(tmp, "a"), **kw), train_dataset=data)
        head, embed = straight.model.lm_head.weight, straight.model.model.embed_tokens.weight
        assert head is embed   # still tied on the ranks that built the model on the meta device
        resumed = train(_config(os.path.join(tmp, "b"), **kw,
                                resume_from=os.path.join(tmp, "a", "checkpoint-2")),
                        train_dataset=data)
        flats = [_flat(m.model) for m in (straight, resumed)]
        if rank == 0:
            torch.save(flats, os.path.join(tmp, "result.pt"))


def test_fsdp_models_from_directories_are_read_by_rank_0_alone(tmp_path):
    """Given as directories, the models are read by rank 0; the other ranks build them on the meta
    device and receive the weights (the rotary frequencies, not in any state dict, included): the
    run equals one process's, and a resume reads the checkpoint on rank 0 alone too."""
    dirs = _saved_models(tmp_path)
    data = _data()
    mp.spawn(_worker_dirs, args=(2, str(tmp_path), data, dirs), nprocs=2, join=True)
    straight, resumed = torch.load(tmp_path / "result.pt")
    single = train(_config(str(tmp_path / "single"), grad_accum_steps=2, eval_batches=1,
                           student=dirs[0], teacher=dirs[1]), train_dataset=data)
    state = single.model.state_dict()
    ref = torch.cat([state[k].flatten() for k in sorted(state)])
    torch.testing.assert_close(straight, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(resumed, straight, rtol=1e-5, atol=1e-7)


def _worker_bad_file(rank, world, tmp, data, dirs):
    import time

    from transformers import AutoModelForCausalLM

    if rank == 0:   # rank 0 alone reads the files: a corrupt one fails there only
        def corrupt(*args, **kwargs):
            raise OSError("unable to read the weights (a truncated file)")

        AutoModelForCausalLM.from_pretrained = corrupt
    outcome = {}
    with gloo_process(rank, world, tmp):
        t0 = time.perf_counter()
        try:
            train(_config(os.path.join(tmp, "a"), fsdp=True, student=dirs[0], teacher=dirs[1]),
                  train_dataset=data)
        except Exception as exc:   # noqa: BLE001 - the test records which
            outcome.update(error=type(exc).__name__, message=str(exc))
        outcome["seconds"] = time.perf_counter() - t0
        torch.save(outcome, os.path.join(tmp, f"outcome_{rank}.pt"))


def test_fsdp_a_model_file_rank_0_cannot_read_stops_every_rank(tmp_path):
    """Rank 0 reads the weights while the others build on the meta device: when its read fails,
    the others raise at once rather than wait for its broadcast until the group's timeout."""
    dirs = _saved_models(tmp_path)
    mp.spawn(_worker_bad_file, args=(2, str(tmp_path), _data(), dirs), nprocs=2, join=True)
    first, second = [torch.load(tmp_path / f"outcome_{r}.pt") for r in range(2)]
    assert first.get("error") == "ModelLoadError" and "truncated" in first["message"], first
    assert second.get("error") == "RuntimeError" and "another rank failed" in second["message"], \
        second
    assert second["seconds"] < 60, second

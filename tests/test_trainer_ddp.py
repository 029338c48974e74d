"""The loop under torch.distributed DDP: two gloo processes on the CPU
(torch.multiprocessing.spawn), a tiny model, a few steps. Both ranks end with identical weights,
equal to one process training on the same global batches with gradient accumulation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from distill_ops.trainer import TrainConfig, train
from distill_ops.trainer.models import llama
from gloo_worker import NEEDS_GLOO, gloo_process


pytestmark = [NEEDS_GLOO, pytest.mark.usefixtures("one_intraop_thread")]

V = 64


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (32, 16), generator=g)


def _config(out, **kw):
    base = dict(output_dir=out, max_steps=4, micro_batch_size=4, temperature=2.0, hard_weight=0.3,
                lr=3e-3, log_every=1, progress=False, plot=False, save_final=True, device="cpu",
                eval_fraction=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, tmp, data, fused):
    with gloo_process(rank, world, tmp):
        # different initial weights per rank: DDP must broadcast rank 0's
        student = llama(V, 32, 1, heads=2, max_positions=32, seed=rank)
        teacher = llama(V, 48, 1, heads=2, max_positions=32, seed=7)
        res = train(_config(os.path.join(tmp, "ddp"), fused_linear=fused), student=student,
                    teacher=teacher, train_dataset=data, eval_dataset=data[:8])
        flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        tdist.all_gather(gathered, flat)
        if rank == 0:
            torch.save({"gathered": gathered, "history": res.history, "step": res.step},
                       os.path.join(tmp, "result.pt"))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_ddp_two_gloo_processes_match_single_process(tmp_path, fused):
    """fused_linear: DDP wraps the student without its lm_head (LastHidden); the head's gradient,
    made inside the loss, must still be all-reduced."""
    data = _data()
    mp.spawn(_worker, args=(2, str(tmp_path), data, fused), nprocs=2, join=True)
    out = torch.load(tmp_path / "result.pt", weights_only=False)
    a, b = out["gathered"]
    assert out["step"] == 4
    assert torch.equal(a, b), "ranks diverged"
    assert (tmp_path / "ddp" / "checkpoint-4" / "model.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoint-4" / "rng_state_1.pt").is_file()

    # one process, same global batches (2 ranks x 4 = 1 process x 4 x 2 accumulation steps)
    single = train(_config(str(tmp_path / "single"), grad_accum_steps=2, fused_linear=fused),
                   student=llama(V, 32, 1, heads=2, max_positions=32, seed=0),
                   teacher=llama(V, 48, 1, heads=2, max_positions=32, seed=7), train_dataset=data)
    ref = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-6)
    loss_ddp = [r["loss"] for r in out["history"] if "loss" in r]
    loss_one = [r["loss"] for r in single.history if "loss" in r]
    assert loss_ddp == pytest.approx(loss_one, rel=1e-5)


def _signal_worker(rank, world, tmp, data):
    import signal

    import distill_ops.trainer.loop as loop
    from distill_ops.trainer import TrainingInterrupted

    real, calls = loop._micro_step, []

    def step(*args, **kwargs):   # only rank 1 is signalled, during its second step
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    loop._micro_step = step
    outcome = {"rank": rank}
    with gloo_process(rank, world, tmp):
        try:
            train(_config(os.path.join(tmp, "ddp"), max_steps=6), student=llama(
                V, 32, 1, heads=2, max_positions=32, seed=0), teacher=llama(
                V, 48, 1, heads=2, max_positions=32, seed=7), train_dataset=data)
        except TrainingInterrupted as exc:
            outcome.update(code=exc.code, step=exc.step, checkpoint=exc.checkpoint)
        torch.save(outcome, os.path.join(tmp, f"outcome_{rank}.pt"))


def test_ddp_signal_on_one_rank_stops_all_at_the_same_step(tmp_path):
    """SIGTERM reaching rank 1 only: both ranks finish step 2, write checkpoint-2 together (rank
    0 the model, each its RNG) and stop with status 143."""
    mp.spawn(_signal_worker, args=(2, str(tmp_path), _data()), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"outcome_{r}.pt") for r in range(2)]
    for out in outcomes:
        assert out.get("code") == 143 and out["step"] == 2, out
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert not (tmp_path / "ddp" / "checkpoint-3").exists()


def _failing_save_worker(rank, world, tmp, data):
    import time

    from transformers import PreTrainedModel

    if rank == 0:   # the disk fills up under rank 0's checkpoint
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        PreTrainedModel.save_pretrained = full
    outcome = {"rank": rank}
    with gloo_process(rank, world, tmp):
        t0 = time.perf_counter()
        try:
            train(_config(os.path.join(tmp, "ddp"), max_steps=2, save_every=1), student=llama(
                V, 32, 1, heads=2, max_positions=32, seed=0), teacher=llama(
                V, 48, 1, heads=2, max_positions=32, seed=7), train_dataset=data)
        except (OSError, RuntimeError) as exc:
            outcome.update(error=type(exc).__name__, message=str(exc))
        outcome["seconds"] = time.perf_counter() - t0
        torch.save(outcome, os.path.join(tmp, f"outcome_{rank}.pt"))


def test_ddp_a_checkpoint_write_failing_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0's save_pretrained raises (a full disk) in a process that lives on (a notebook):
    rank 1 hears of it at once and raises too, instead of waiting in the checkpoint's next
    barrier until the process group's timeout (2 min here, 30 by default)."""
    mp.spawn(_failing_save_worker, args=(2, str(tmp_path), _data()), nprocs=2, join=True)
    first, second = [torch.load(tmp_path / f"outcome_{r}.pt") for r in range(2)]
    assert first.get("error") == "OSError" and "No space" in first["message"], first
    assert second.get("error") == "RuntimeError" and "another rank failed" in second["message"], \
        second
    assert second["seconds"] < 60, second

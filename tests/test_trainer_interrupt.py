"""An interrupted run loses no completed step: SIGINT/SIGTERM finish the optimizer step in
progress, checkpoint it, say so, and exit 130/143; resuming reaches the weights of the
uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distill_ops.trainer import TrainingInterrupted, train
from distill_ops.trainer import checkpoint as ckpt_lib

from test_trainer import assert_same_weights, blocks, cfg, tiny, weights

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 8
COMMON = dict(max_steps=STEPS, micro_batch_size=4, grad_accum_steps=2, targets="dense",
              temperature=1.5, hard_weight=0.2)

# The child: the same run as the parent's reference, each micro-step slowed down so that the
# signal, sent once the first step is logged, arrives long before the run could end.
CHILD = """
import os, sys, time, pathlib
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
import distill_ops.trainer.loop as loop
from test_trainer import blocks, cfg, tiny

real = loop._micro_step
def slow(*args, **kwargs):
    time.sleep(0.25)
    return real(*args, **kwargs)
loop._micro_step = slow
loop.train(cfg(pathlib.Path(sys.argv[1]), **{common!r}), student=tiny(),
           teacher=tiny(48, seed=1), train_dataset=blocks())
print("finished without a signal")
"""


def _logged_steps(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:   # a line being written
            pass
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_checkpoints_and_resume_is_exact(tmp_path, signame, code):
    out = tmp_path / "out"   # cfg() puts the run there
    script = CHILD.format(here=HERE, common=COMMON)
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # a shell may start background jobs with SIGINT ignored; Python then leaves it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not _logged_steps(out / "metrics.jsonl"):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child logged no step"
            time.sleep(0.02)
        child.send_signal(getattr(signal, signame))
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == code, stderr
    assert "finished without a signal" not in stdout
    found = ckpt_lib.list_checkpoints(str(out))
    assert found, stderr
    stopped = found[-1][0]
    assert 1 <= stopped < STEPS
    assert f"{signame} received: stopped after step {stopped}" in stderr
    assert f"checkpoint-{stopped}" in stderr
    assert _logged_steps(out / "metrics.jsonl") == list(range(1, stopped + 1))

    straight = train(cfg(tmp_path / "straight", **COMMON), student=tiny(),
                     teacher=tiny(48, seed=1), train_dataset=blocks())
    torch.manual_seed(4321)   # resume must restore the RNG
    resumed = train(cfg(tmp_path, **COMMON, resume_from="latest"), student=tiny(seed=9),
                    teacher=tiny(48, seed=1), train_dataset=blocks())
    assert resumed.step == STEPS
    assert_same_weights(weights(straight.model), weights(resumed.model))
    assert ([r["loss"] for r in resumed.history if "loss" in r]
            == [r["loss"] for r in straight.history if "loss" in r])


def test_in_process_interrupt_restores_handlers(tmp_path, monkeypatch):
    """train() raises TrainingInterrupted (a SystemExit with code 143) after checkpointing the
    step in progress, and puts the caller's handlers back (also after a normal run)."""
    import distill_ops.trainer.loop as loop

    calls = []
    real = loop._micro_step

    def signal_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:   # step 3's first micro-batch (2 per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(loop, "_micro_step", signal_in_step_3)
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg(tmp_path, **COMMON), student=tiny(), teacher=tiny(48, seed=1),
                  train_dataset=blocks())
        assert info.value.code == 143 and info.value.step == 3
        assert info.value.checkpoint == str(tmp_path / "out" / "checkpoint-3")
        assert ckpt_lib.list_checkpoints(str(tmp_path / "out"))[-1][0] == 3
        assert not seen   # our handler took the signal during the run
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before_int
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_cli_returns_the_signal_status(tmp_path, monkeypatch, capsys):
    import distill_ops.trainer.loop as loop
    from distill_ops.cli import main

    def interrupted(config, **kwargs):
        raise TrainingInterrupted(signal.SIGINT, 2, "x/checkpoint-2")

    monkeypatch.setattr(loop, "train", interrupted)
    assert main(["train", "--targets", "none", "--output-dir", str(tmp_path)]) == 130


def test_signal_in_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    """A signal during the last step: the run is complete (final evaluation and save done), so
    train() returns its TrainResult, with a warning, instead of reporting it interrupted."""
    import distill_ops.trainer.loop as loop

    calls, real = [], loop._micro_step

    def signal_in_last_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:   # step 3 of 3's first micro-batch (2 per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_micro_step", signal_in_last_step)
    with pytest.warns(RuntimeWarning, match=r"SIGTERM received during the last step \(3 of 3\)"):
        res = train(cfg(tmp_path, **{**COMMON, "max_steps": 3}, save_final=True), student=tiny(),
                    teacher=tiny(48, seed=1), train_dataset=blocks(), eval_dataset=blocks(8))
    assert res.step == 3 and res.final_eval["eval_ppl"] > 1
    assert res.checkpoint == str(tmp_path / "out" / "checkpoint-3")

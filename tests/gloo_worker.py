"""The life of a test's torch.distributed worker process (torch.multiprocessing.spawn): gloo on
the CPU, one intra-op thread, and an exit without interpreter finalisation."""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as tdist

NEEDS_GLOO = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# torch 2.8's gloo reduce_scatter_tensor with ReduceOp.AVG returns the sum (two ranks of 1 and 2:
# 3, not 1.5; 2.9 averages, and NCCL was never affected). FSDP2 averages its gradients that way, as
# a DTensor Partial("avg") does, so on the CPU there they come out world-size times too large.
GLOO_AVG_SUMS = torch.torch_version.TorchVersion(torch.__version__) < "2.9"
FSDP2_ON_GLOO = pytest.mark.skipif(
    GLOO_AVG_SUMS, reason="torch < 2.9: gloo's reduce_scatter with ReduceOp.AVG sums, so FSDP2 "
                          "on the CPU does not average gradients")


@contextlib.contextmanager
def gloo_process(rank: int, world: int, tmp: str) -> Iterator[None]:
    """Join the group (rendezvous in ``tmp``), run the body, leave. The body's exception reaches
    spawn as usual; a body that returns ends the process with os._exit(0): gloo's C++ threads and
    statics racing Python's teardown once aborted a CI run (SIGABRT, "terminate called without an
    active exception") after all the work was done. Write what the test checks to disk before."""
    # A crash in C++ (gloo) dumps every thread's Python stack to stderr, which pytest shows.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    # a collective that one rank never joins fails after two minutes instead of hanging CI
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                             world_size=world, timeout=datetime.timedelta(minutes=2))
    try:
        yield
    except BaseException:
        tdist.destroy_process_group()
        raise
    leave()


def leave() -> None:
    """End a worker whose work is done: leave the group once every rank is done with it, then
    exit without interpreter finalisation (gloo_process says why)."""
    try:
        tdist.barrier()   # neither rank tears down while the other still talks
    finally:
        tdist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 *args`` in ``cwd``, as
    users launch several GPUs, here two CPU processes; one intra-op thread each, and the
    repository first on the path (`make test-twin` runs the package from the source tree)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})

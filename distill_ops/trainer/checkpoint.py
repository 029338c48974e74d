"""Checkpoints: the student in transformers format (``save_pretrained``: config + safetensors, the
tokenizer beside it) plus ``trainer_state.pt`` (optimizer, scheduler, step, config, and in
``extra`` the loop's running metric sums) and one ``rng_state_<rank>.pt`` per process, so a
resumed run continues exactly where it stopped: the data position is the step (see
data.StepBatches).

Layout::

    <output_dir>/checkpoint-<step>/   config.json, model.safetensors, tokenizer files,
                                      trainer_state.pt, rng_state_0.pt, ...
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import torch

from . import dist

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume_from: Optional[str], output_dir: str) -> Optional[str]:
    """``latest`` -> the newest complete checkpoint in output_dir; a path -> that checkpoint.
    Either must exist (FileNotFoundError): a resume that silently started from step 0 would
    also overwrite the run's metrics.jsonl."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"resume_from='latest' but no checkpoint found in {output_dir!r} (no "
                f"checkpoint-<step>/ holding {STATE_FILE}); to start a new run, drop resume_from")
        return found[-1][1]
    if not os.path.isfile(os.path.join(resume_from, STATE_FILE)):
        raise FileNotFoundError(f"resume_from={resume_from!r} is not a checkpoint directory "
                                f"(no {STATE_FILE})")
    return resume_from


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, *, config: dict,
                    tokenizer=None, extra: Optional[dict] = None, keep: int = 0,
                    sharded: bool = False, device: Optional[torch.device] = None) -> str:
    """Write checkpoint-<step> atomically (a temporary directory renamed at the end). Call on every
    rank: rank 0 writes the model and trainer state, each rank its RNG state; a write that fails
    on one rank raises on all (dist.agreed, whose vote ``device`` carries).
    ``sharded``: an FSDP2 model (trainer/fsdp.py), whose full weights and optimizer state the
    ranks gather first; the files are the same as a single process writes, but the optimizer
    state is keyed by parameter name."""
    weights = optim_state = None
    if sharded:
        from . import fsdp

        weights, optim_state = fsdp.model_state(model), fsdp.optimizer_state(model, optimizer)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    main = dist.is_main()

    def make_tmp() -> None:
        if main:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)

    def write() -> None:
        if main:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save({"step": step,
                        "optimizer": optim_state if sharded else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "config": config,
                        "world_size": dist.world_size(), "sharded": sharded,
                        "extra": extra or {}},
                       os.path.join(tmp, STATE_FILE))
        torch.save(rng_state(), os.path.join(tmp, f"rng_state_{dist.rank()}.pt"))

    def publish() -> None:
        if main:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep:
                prune(output_dir, keep, final)

    for part in (make_tmp, write, publish):   # each ends when every rank has done its share
        dist.agreed(part, device)
    return final


def prune(output_dir: str, keep: int, newest: str) -> None:
    """Leave ``keep`` checkpoints: ``newest`` (the one just written, whatever its step: a
    checkpoint with a higher step must never make it the one deleted) and the keep - 1 others
    with the highest steps."""
    others = [path for _, path in list_checkpoints(output_dir)
              if os.path.abspath(path) != os.path.abspath(newest)]
    for path in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def stale_checkpoints(output_dir: str, resume_step: Optional[int]) -> list[tuple[int, str]]:
    """The checkpoints in output_dir that are not this run's past: all of them for a new run
    (``resume_step`` None), those past ``resume_step`` for a resume. Left there, they would be
    taken for this run's: pruning keeps the highest steps (it deleted the new run's checkpoints)
    and resume_from='latest' picks the highest (it continued the earlier run)."""
    return [(s, path) for s, path in list_checkpoints(output_dir)
            if resume_step is None or s > resume_step]


def check_output_dir(output_dir: str, resume: Optional[str], resume_step: Optional[int],
                     overwrite: bool) -> list[str]:
    """Refuse (ConfigError naming output_dir) to start where stale_checkpoints finds any, unless
    ``overwrite`` (overwrite_output_dir): then return their paths, for the caller to delete once
    the run starts writing."""
    stale = stale_checkpoints(output_dir, resume_step)
    if not stale or overwrite:
        return [path for _, path in stale]
    from .config import ConfigError

    names = ", ".join(os.path.basename(path) for _, path in stale)
    if resume is None:
        raise ConfigError(
            f"output_dir {output_dir!r} already holds checkpoints ({names}) of an earlier run; a "
            "new run there would mix its checkpoints with them (keep_checkpoints prunes the "
            "lowest steps, resume_from='latest' takes the highest). Pass resume_from='latest' to "
            "continue that run, choose another output_dir or empty this one, or set "
            "overwrite_output_dir=true to delete them")
    raise ConfigError(
        f"cannot resume from {resume} (step {resume_step}): output_dir {output_dir!r} holds later "
        f"checkpoints ({names}), which pruning and resume_from='latest' would take for this run's. "
        "Move or delete them, or set overwrite_output_dir=true to delete them")


def load_weights(model: torch.nn.Module, ckpt: str, sharded: bool = False) -> None:
    """Load safetensors weights written by save_pretrained into ``model`` in place. Keys missing
    from the files are accepted only when they are tied to a loaded parameter (lm_head = embed).
    ``sharded``: an FSDP2 model (every rank calls): rank 0 reads the files and broadcasts them
    into the shards."""
    from safetensors.torch import load_file

    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    paths = [os.path.join(ckpt, shard) for shard in shards]
    for shard, path in zip(shards, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {ckpt!r} lacks {shard}")
    if sharded:
        from safetensors import safe_open

        from . import fsdp

        # every rank checks the names (the files' headers), so that all raise together
        names = set()
        for path in paths:
            with safe_open(path, "pt") as fh:
                names.update(fh.keys())
        unexpected = sorted(names - set(model.state_dict()))
        if unexpected:
            raise RuntimeError(f"checkpoint {ckpt!r} has weights the model lacks: "
                               f"{unexpected[:5]}")
        state = {}
        if dist.rank() == 0:
            for path in paths:
                state.update(load_file(path))
        # (tied weights: one of the pair is enough)
        fsdp.load_model_state(model, state, from_rank0=True)
        return
    state = {}
    for path in paths:
        state.update(load_file(path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {ckpt!r} has weights the model lacks: "
                           f"{result.unexpected_keys[:5]}")
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise RuntimeError(f"checkpoint {ckpt!r} lacks weights: {untied[:5]}")


# What fixes which sequences a step reads (data.StepBatches: the order is a function of seed and
# step over the global batch; the split and packing depend on the data, seq_len, eval split).
DATA_ORDER_KEYS = ("micro_batch_size", "grad_accum_steps", "seq_len", "train_data", "eval_data",
                   "eval_fraction", "cache", "seed")
_PATH_KEYS = ("train_data", "eval_data", "cache")


def _same_value(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if key in _PATH_KEYS and isinstance(saved, str) and isinstance(now, str):
        if os.path.normpath(saved) == os.path.normpath(now):
            return True
        try:
            return os.path.samefile(saved, now)
        except OSError:
            return False
    return False


def resume_mismatch(state: dict, config: dict, world_size: int) -> list[tuple[str, object, object]]:
    """(key, saved, now) for each setting that fixes the data order or position and differs
    between a checkpoint's trainer state and the resuming run (world_size included)."""
    saved = state.get("config") or {}
    out = [(k, saved[k], config.get(k)) for k in DATA_ORDER_KEYS
           if k in saved and not _same_value(k, saved[k], config.get(k))]
    if "world_size" in state and int(state["world_size"]) != int(world_size):
        out.append(("world_size", int(state["world_size"]), int(world_size)))
    return out


def check_resume(ckpt: str, state: dict, config: dict, world_size: int) -> None:
    """Refuse (ConfigError naming the keys) a resume whose data order or position would differ
    from the run that wrote the checkpoint: it would not continue that run."""
    diff = resume_mismatch(state, config, world_size)
    if diff:
        from .config import ConfigError

        parts = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff)
        raise ConfigError(
            f"cannot resume from {ckpt}: {', '.join(k for k, _, _ in diff)} "
            f"differ{'s' if len(diff) == 1 else ''} from the run that wrote it ({parts}); these "
            "fix the data order and position, so the run would not continue where it stopped "
            "(use the same values, or start a new run in another output_dir)")


def load_checkpoint(ckpt: str, model, optimizer, scheduler, *, config: Optional[dict] = None,
                    sharded: bool = False) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state. With
    ``config`` (the resuming run's TrainConfig.to_dict()), check_resume runs first, before
    anything is changed. ``sharded``: an FSDP2 model (save_checkpoint's).

    The optimizer's and scheduler's states are taken out of the returned dict: the caller keeps it
    for the run, and the optimizer state's host copy (twice the student in float32 for AdamW) must
    not live that long. For a model on an accelerator the file is memory-mapped, so the ranks of
    one machine share its pages (the state is copied to the device); on the CPU the optimizer
    would keep using the mapped pages, and a pruned checkpoint's file its disk space."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False,
                       mmap=not on_cpu)
    if config is not None:
        check_resume(ckpt, state, config, dist.world_size())
    if bool(state.get("sharded", False)) != sharded:
        from .config import ConfigError

        raise ConfigError(f"cannot resume from {ckpt}: it was written "
                          f"{'with' if state.get('sharded') else 'without'} fsdp, and this run "
                          f"{'shards' if sharded else 'does not shard'} the student (the "
                          "optimizer state's layout differs): use the same fsdp setting")
    load_weights(model, ckpt, sharded=sharded)
    if sharded:
        from . import fsdp

        fsdp.load_optimizer_state(model, optimizer, state.pop("optimizer"))
    else:
        optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng_file = os.path.join(ckpt, f"rng_state_{dist.rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state

"""The ``distill-ops`` command: ``train``, ``demo``, ``cache-teacher`` and ``env``.

    distill-ops train --config run.yaml --max-steps 200      # flags override the YAML
    distill-ops train --student ./s --teacher ./t --train-data corpus.txt --temperature 2
    distill-ops demo [--out-dir demo_out]
    distill-ops cache-teacher ...                             # see distill-ops cache-teacher -h
    distill-ops env [--json]                                  # versions, kernels, auto's picks

Under ``torchrun --nproc-per-node N -m distill_ops.cli train ...`` each process trains its shard
(DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from typing import Optional, Sequence


def _train_parser() -> argparse.ArgumentParser:
    from .trainer.config import TrainConfig

    p = argparse.ArgumentParser(
        prog="distill-ops train",
        description="Distil a transformers causal-LM student from a teacher with the fused losses. "
                    "Every TrainConfig field is a flag (--max-steps or --max_steps); flags "
                    "override the values of --config.")
    p.add_argument("--config", help="YAML file of TrainConfig fields (an unknown key is an error)")
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        doc = f"(default: {f.default!r})"
        dashed, under = "--" + f.name.replace("_", "-"), "--" + f.name
        names = [dashed] if dashed == under else [dashed, under]
        p.add_argument(*names, dest=f.name, default=None, metavar="VALUE", help=doc)
    return p


def cmd_train(argv: Sequence[str]) -> int:
    """``distill-ops train``: a TrainConfig from --config and the flags (flags win), then
    trainer.loop.train, under torchrun's process group when there is one; returns 0, or 130/143
    when SIGINT/SIGTERM stopped the run (after checkpointing the last completed step)."""
    from .trainer import dist
    from .trainer.config import TrainConfig
    from .trainer.interrupt import TrainingInterrupted
    from .trainer.loop import train

    args = _train_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    cfg = (TrainConfig.from_yaml(args.config, overrides) if args.config
           else TrainConfig.from_dict(overrides))
    started = dist.init_from_env(cfg.device)
    main = dist.is_main()   # (asked now: after the group is destroyed every process is "rank 0")
    try:
        result = train(cfg)
    except TrainingInterrupted as exc:   # SIGINT/SIGTERM: checkpointed and said so; 130 / 143
        return int(exc.code)
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    if main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result.final_eval.items()
                            if isinstance(v, float))
        print(f"done: {result.step} steps, {result.tokens_per_s:.0f} tokens/s"
              + (f"; {summary}" if summary else "") + f"; output in {result.output_dir}")
    return 0


def cmd_cache_teacher(argv: Sequence[str]) -> int:
    """``distill-ops cache-teacher``: targets.cache_cli.main, imported only now; an installation
    without it gets a message and status 2, not a traceback."""
    try:
        module = importlib.import_module("distill_ops.targets.cache_cli")
    except ImportError as exc:
        print("distill-ops cache-teacher: the offline target cache (distill_ops.targets.cache_cli) "
              f"is not available in this installation ({exc})", file=sys.stderr)
        return 2
    return int(module.main(list(argv)) or 0)


def cmd_demo(argv: Sequence[str]) -> int:
    """``distill-ops demo``: the self-contained demo (trainer.demo.main); returns its status."""
    from .trainer import demo

    return int(demo.main(list(argv)) or 0)


def cmd_env(argv: Sequence[str]) -> int:
    """``distill-ops env``: env_report.main (what this installation can run); returns 0."""
    from . import env_report

    return env_report.main(list(argv))


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "cache-teacher": cmd_cache_teacher,
            "env": cmd_env}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``distill-ops`` entry point: dispatch ``argv`` (default sys.argv[1:]) to a command;
    bad input (a config, vocabulary, tokenizer or cache error: ValueError; a missing file; a model
    that cannot be loaded) is one line ``distill-ops <command>: error: ...`` on stderr and status
    2; other exceptions keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = ("usage: distill-ops {train,demo,cache-teacher,env} [options]\n"
                 "  train          distil a student (flags or --config YAML)\n"
                 "  demo           the self-contained CPU/GPU demo (no downloads)\n"
                 "  cache-teacher  write a teacher's top-k or sampled targets to an offline cache\n"
                 "  env            versions, compiled kernels, GPUs and what backend='auto' picks")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"distill-ops: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    from .trainer.config import ModelLoadError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        # bad input: ConfigError, CacheError, vocabulary/tokenizer checks (ValueErrors), missing
        # paths, unloadable models. Anything else is unexpected and keeps its traceback; so does
        # this with DISTILL_OPS_TRACEBACK=1 (a ValueError may also come from a bug).
        if os.environ.get("DISTILL_OPS_TRACEBACK") == "1":
            raise
        print(f"distill-ops {argv[0]}: error: {' '.join(str(exc).split())} "
              "(DISTILL_OPS_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

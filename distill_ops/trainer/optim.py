"""AdamW with decoupled weight decay on matrices only; linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay applies to parameters with >= 2 dims (not to norms and biases).
    Tied parameters (embedding == lm_head) appear once."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in zip((decay, no_decay), group_weight_decays(cfg))]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps)


def group_weight_decays(cfg: TrainConfig) -> tuple[float, float]:
    """The weight decay of build_optimizer's two groups: matrices, then norms and biases."""
    return cfg.weight_decay, 0.0


def apply_config(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig,
                 step: int) -> None:
    """Make a resumed optimizer and scheduler follow ``cfg`` from ``step`` on.

    Their load_state_dict brings back the checkpoint's lr, initial_lr, weight decay, betas and
    eps (param groups) and base_lrs/_last_lr (scheduler), while the schedule's lambda is the new
    config's: a changed lr or weight decay was ignored and a changed max_steps came one step late.
    The Adam moments stay the checkpoint's. For an unchanged config every value set here is the one
    loaded (lr_factor is what LambdaLR evaluates), so the resume stays bit-identical."""
    lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group, wd in zip(optimizer.param_groups, group_weight_decays(cfg)):
        group.update(initial_lr=cfg.lr, lr=lr, weight_decay=wd,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup from 1/(warmup+1), then cosine from 1
    down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """torch's LambdaLR over :func:`lr_factor` (its state_dict round-trips for exact resume)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))

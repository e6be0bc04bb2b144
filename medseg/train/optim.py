"""Optimizer and learning-rate schedule.

- ``sgd``: SGD with Nesterov momentum (nnU-Net's defaults: lr 1e-2, momentum 0.99, weight decay
  3e-5) and the polynomial schedule ``lr = lr0 * (1 - step / total) ** 0.9`` (Isensee et al. 2021).
- ``adamw``: AdamW (Loshchilov & Hutter, ICLR 2019) with a cosine schedule (SGDR without restarts).
- ``wsd`` (warmup-stable-decay without the warmup, the trapezoid): the base LR until the last
  ``train.decay_fraction`` of the steps, then a linear decay to 0 (Hu et al. 2024, MiniCPM; Hägele et al., NeurIPS 2024,
  "Scaling laws and compute-optimal training beyond fixed training durations": a 20% cooldown
  matches cosine). For wall-clock budgets its LR does not depend on the estimated total until the
  cooldown, and the run spends ~0.9 of its steps' worth of LR where cosine spends 0.5.

The schedule is a :class:`~torch.optim.lr_scheduler.LambdaLR` stepped once per iteration whose
``total`` is read from the config at every step, so resuming with a raised ``train.epochs``
stretches the remaining schedule instead of restarting it. Its state dict holds only numbers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from medseg.config import TrainConfig
from medseg.errors import ConfigError

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "refresh_lr"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("poly", "cosine", "constant", "wsd")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer: '{cfg.optimizer}' is not valid (use {' or '.join(OPTIMIZERS)})")


def lr_factor(kind: str, step: int, total: int, exponent: float = 0.9, decay_fraction: float = 0.2) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total`` (clamped to the end).

    ``exponent``: the poly schedule's; ``decay_fraction``: the share of the steps ``wsd`` spends on
    its linear cooldown (1.0 = a linear decay from the first step).
    """
    frac = min(max(step, 0), total) / max(total, 1)
    if kind == "poly":
        return (1.0 - frac) ** exponent
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        return min(1.0, (1.0 - frac) / max(decay_fraction, 1e-12))
    raise ConfigError(f"train.scheduler: '{kind}' is not valid (use {', '.join(SCHEDULERS)})")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule; ``total_steps()`` is asked at every step (see module docstring)."""
    lr_factor(cfg.scheduler, 0, 1)  # validate the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.scheduler, step, total_steps(), cfg.poly_exponent, cfg.decay_fraction)
    )


def refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's lr for the scheduler's current step (after loading a state with another total)."""
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)

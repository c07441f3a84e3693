"""The optimiser (AdamW or SGD) and the per-step LR schedule (cosine, step or constant) of a run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from training.config import TrainConfig


def build_optimizer(config: TrainConfig, model: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """The optimiser over the model's trainable parameters (and the objective's, e.g. RSW proxies)."""
    c = config
    params = [p for p in model.parameters() if p.requires_grad]
    groups = objective.param_groups(params, c.lr) if hasattr(objective, "param_groups") else params
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: Callable[[], tuple[TrainConfig, int]]
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR factor per optimiser step; `plan()` → (config, steps per epoch) is read at every
    step, so raising the epochs of a resumed run stretches the schedule to them."""
    def factor(step: int) -> float:
        c, per_epoch = plan()
        if c.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, step / (c.epochs * per_epoch))))
        if c.schedule == "step":
            return 0.5 ** (step // (per_epoch * c.lr_step_epochs))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

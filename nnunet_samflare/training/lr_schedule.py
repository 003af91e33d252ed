"""Closed-form cosine learning-rate decay.

nnU-Net calls ``lr_scheduler.step(current_epoch)`` at the start of every epoch and does not checkpoint the
scheduler (docs/nnunet.md §6.4), so the learning rate must be a pure function of the epoch: then ``--c`` resumes
on the right value. (torch's chained schedulers keep internal state and would restart the decay.)
"""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_lr(step: int, max_steps: int, initial_lr: float, final_lr: float) -> float:
    """Half a cosine from ``initial_lr`` at step 0 to ``final_lr`` at ``max_steps``."""
    progress = min(max(step / max_steps, 0.0), 1.0)
    return final_lr + 0.5 * (initial_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


class CosineAnnealingLRScheduler(LRScheduler):
    """Sets every param group's lr to ``cosine_lr(step, ...)``; ``step(n)`` jumps straight to step ``n``."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, final_lr: float, max_steps: int):
        self.initial_lr = initial_lr
        self.final_lr = final_lr
        self.max_steps = max_steps
        self._next_step = 0
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [cosine_lr(self.last_epoch, self.max_steps, self.initial_lr, self.final_lr)] * len(
            self.optimizer.param_groups
        )

    def step(self, current_step: int | None = None) -> None:
        if current_step is None:
            current_step = self._next_step
        self._next_step = current_step + 1
        self.last_epoch = current_step
        lr = cosine_lr(current_step, self.max_steps, self.initial_lr, self.final_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

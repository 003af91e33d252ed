"""Benchmark-only trainers: the plug-in's two trainers and plain nnU-Net's, trained for a wall-clock budget.

``bench_learning.py`` compares the cascade with plain nnU-Net *at equal wall-clock time*. nnU-Net counts training
in epochs, so each trainer here gets a deadline instead (``SAMFLARE_BENCH_DEADLINE``, a ``time.time()`` value) and
decides after every epoch how many more fit: ``num_epochs`` becomes the epochs done plus the remaining time over
the median epoch time so far, and the learning-rate schedule's ``max_steps`` follows, so that the cosine (ours) or
poly (nnU-Net's) decay ends at the deadline, as it would at the end of a run planned for that length. Nothing
else changes: each class is the real trainer with this loop in front of it.

They are not part of the package: nnU-Net finds them through ``nnUNet_extTrainer`` pointing at this folder
(``bench_learning.py`` sets it for every command it runs, training and prediction). Other settings, read from
the environment when the trainer is built:

* ``SAMFLARE_BENCH_ITERATIONS`` / ``SAMFLARE_BENCH_VAL_ITERATIONS``: iterations per epoch (default 25 / 5): the
  resolution of the learning curves (nnU-Net logs the pseudo Dice of every class once per epoch);
* ``SAMFLARE_BENCH_FINAL_VALIDATION=1``: run the trainer's own final validation (off: the benchmark predicts
  and evaluates every model the same way afterwards).

Each run writes ``time_budget.json`` into its fold folder: epochs, iterations, seconds spent in training
iterations and in validation iterations, and training iterations per second.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareLocator, nnUNetTrainer_SAMFlareSegmenter

DEADLINE_ENV = "SAMFLARE_BENCH_DEADLINE"
ITERATIONS_ENV = "SAMFLARE_BENCH_ITERATIONS"
VAL_ITERATIONS_ENV = "SAMFLARE_BENCH_VAL_ITERATIONS"
FINAL_VALIDATION_ENV = "SAMFLARE_BENCH_FINAL_VALIDATION"
STATS_FILE = "time_budget.json"
_CUDA = torch.device("cuda")


class _TimeBudget:
    """Train until ``SAMFLARE_BENCH_DEADLINE``; the schedule is re-laid over the epochs that fit."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.deadline = float(os.environ.get(DEADLINE_ENV, "inf"))
        self.num_iterations_per_epoch = int(os.environ.get(ITERATIONS_ENV, "25"))
        self.num_val_iterations_per_epoch = int(os.environ.get(VAL_ITERATIONS_ENV, "5"))
        # Provisional: the first epoch runs at the initial learning rate whatever the length, then it is replanned.
        self.num_epochs = 1000

    def run_training(self):
        # nnU-Net's loop (nnUNetTrainer.run_training), with the number of epochs decided as it goes.
        self.on_train_start()
        epoch_seconds, train_seconds, val_seconds = [], 0.0, 0.0
        while self.current_epoch < self.num_epochs:
            start = time.monotonic()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            train_seconds += time.monotonic() - start
            val_start = time.monotonic()
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [
                    self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val_outputs)
            val_seconds += time.monotonic() - val_start
            self.on_epoch_end()
            epoch_seconds.append(time.monotonic() - start)
            self._replan(epoch_seconds)
        self.on_train_end()
        iterations = self.current_epoch * self.num_iterations_per_epoch
        stats = {
            "trainer": type(self).__name__,
            "epochs": self.current_epoch,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "iterations": iterations,
            "batch_size": self.batch_size,
            "patch_size": list(self.configuration_manager.patch_size),
            "train_iteration_seconds": round(train_seconds, 2),
            "validation_iteration_seconds": round(val_seconds, 2),
            "iterations_per_second": round(iterations / train_seconds, 4) if train_seconds else None,
            "epoch_seconds": [round(s, 2) for s in epoch_seconds],
            "overshoot_seconds": round(time.time() - self.deadline, 1),
        }
        Path(self.output_folder, STATS_FILE).write_text(json.dumps(stats, indent=2), encoding="utf-8")

    def _replan(self, epoch_seconds: list[float]) -> None:
        # The first epoch carries start-up costs (first batches, allocator warm-up): leave it out once others exist.
        typical = statistics.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds)
        more = int((self.deadline - time.time()) // typical)
        self.num_epochs = self.current_epoch + max(0, more)
        self.lr_scheduler.max_steps = max(self.num_epochs, 1)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get(FINAL_VALIDATION_ENV) == "1":
            super().perform_actual_validation(save_probabilities)


class nnUNetTrainer_SAMFlareLocatorTimeBudget(_TimeBudget, nnUNetTrainer_SAMFlareLocator):
    pass


class nnUNetTrainer_SAMFlareSegmenterTimeBudget(_TimeBudget, nnUNetTrainer_SAMFlareSegmenter):
    pass


class nnUNetTrainerTimeBudget(_TimeBudget, nnUNetTrainer):
    pass

"""SIGKILL in the middle of ``nnUNetv2_train`` with our segmenter trainer, then ``--c``: the run completes, the
learning rate of every epoch is the one an uninterrupted run uses, and the resumed epochs still draw their
patches from the foreground box (the ROI sampling of ``training/roi_sampling.py``).

The trainer under test is a small subclass defined in a temporary ``nnUNet_extTrainer`` folder: a toy-size
network (the architecture is not what is tested), 4 epochs of 2 iterations, a checkpoint every epoch, no final
validation, and a log of every case the training loader draws (epoch, case, crop shape, dataset wrapper).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from nnunet_samflare.training.lr_schedule import cosine_lr

from conftest import DATASET_ID, PLANS, command

TRAINER = "nnUNetTrainer_SAMFlareSegmenterKillTest"
EPOCHS = 4

TRAINER_MODULE = f'''
import json, os

from nnunet_samflare.networks import SAMHybridUNet
from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareSegmenter


class _Recorder:
    """Logs every case the training loader draws, then hands it on unchanged."""

    def __init__(self, dataset, trainer, log):
        self._dataset, self._trainer, self._log = dataset, trainer, log

    @property
    def identifiers(self):
        return self._dataset.identifiers

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        with open(self._log, "a", encoding="utf-8") as f:
            f.write(json.dumps({{"pid": os.getpid(), "epoch": self._trainer.current_epoch, "case": identifier,
                                "shape": list(data.shape[1:]), "wrapper": type(self._dataset).__name__}}) + "\\n")
        return data, seg, seg_prev, properties


class {TRAINER}(nnUNetTrainer_SAMFlareSegmenter):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {EPOCHS}
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        return SAMHybridUNet(num_input_channels, num_output_channels, False, embed_dims=[12, 24], depths=[1, 1],
                             sam_heads=[3, 3], msa_heads=[0, 2], mlp_ratios=[1, 1], expand_ratio=1,
                             decoder_feature_size=8)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        return _Recorder(dataset_tr, self, os.environ["KILL_TEST_LOG"]), dataset_val

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.current_epoch >= 2 and os.environ.get("KILL_TEST_SLOW"):
            import time
            time.sleep(60)  # the killer strikes here, after epoch 2's checkpoint

    def perform_actual_validation(self, save_probabilities=False):
        pass  # not what is tested, and the slowest part on a CPU
'''


def test_sigkill_mid_training_then_continue(planned_dataset, tmp_path):
    extra = tmp_path / "ext_trainers"
    extra.mkdir()
    (extra / "kill_test_trainer.py").write_text(TRAINER_MODULE, encoding="utf-8")
    log = tmp_path / "draws.jsonl"
    env = planned_dataset.env(training=True, nnUNet_extTrainer=str(extra), KILL_TEST_LOG=str(log))
    args = [
        command("nnUNetv2_train"),
        str(DATASET_ID),
        "3d_segmenter",
        "all",
        "-tr",
        TRAINER,
        "-p",
        PLANS,
        "-device",
        "cpu",
    ]
    output = planned_dataset.model_folder(TRAINER, "3d_segmenter") / "fold_all"

    process = subprocess.Popen(
        args, env={**env, "KILL_TEST_SLOW": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = output / "checkpoint_latest.pth"
    deadline = time.monotonic() + 600
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file():
            try:
                epoch = torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"]
            except Exception:  # caught mid-write: look again
                epoch = None
            if epoch is not None and epoch >= 2:
                process.send_signal(signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.5)
    process.wait()
    assert killed_at is not None, "training ended or timed out before it could be killed"
    assert not (output / "checkpoint_final.pth").exists()
    first_pid = process.pid

    planned_dataset.run(args + ["--c"], training=True, nnUNet_extTrainer=str(extra), KILL_TEST_LOG=str(log))

    final = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == EPOCHS
    lrs = final["logging"]["lrs"]
    assert lrs == pytest.approx([cosine_lr(e, EPOCHS, 1e-3, 1e-4) for e in range(EPOCHS)], rel=1e-9)

    draws = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    before = [d for d in draws if d["pid"] == first_pid]
    after = [d for d in draws if d["pid"] != first_pid]
    assert before and after
    assert min(d["epoch"] for d in after) == killed_at  # resumed where the checkpoint was, not at epoch 0
    # every draw, before and after the kill, came through the foreground-box sampling
    assert {d["wrapper"] for d in draws} == {"ForegroundBoxDataset"}

"""The trainers' own hooks, in-process on the preprocessed real CT: schedule, resume, ROI sampling, mirroring,
training-length variants."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_samflare.training import trainers
from nnunet_samflare.training.lr_schedule import CosineAnnealingLRScheduler, cosine_lr
from nnunet_samflare.training.optimizer import build_adamw
from nnunet_samflare.training.roi_sampling import DEFAULT_ROI_MARGIN_MM, ForegroundBoxDataset, foreground_box
from nnunet_samflare.training.trainers import (
    TRAINING_LENGTHS,
    binary_foreground_dataset_json,
    define_training_length_variants,
    nnUNetTrainer_SAMFlareLocator,
    nnUNetTrainer_SAMFlareSegmenter,
    training_length_name,
)

from conftest import DATASET_NAME, PLANS, read_json


@pytest.fixture
def nnunet_env(planned_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(planned_dataset.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(planned_dataset.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # never touch the session's models
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = planned_dataset.preprocessed / DATASET_NAME
    return read_json(folder / f"{PLANS}.json"), read_json(folder / "dataset.json")


def make_trainer(cls, configuration, plans, dataset_json, continue_training=False):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = continue_training
    return cls(plans, configuration, "all", dataset_json, device=torch.device("cpu"))


def test_cosine_schedule_endpoints():
    assert cosine_lr(0, 300, 3e-4, 1e-5) == pytest.approx(3e-4)
    assert cosine_lr(150, 300, 3e-4, 1e-5) == pytest.approx((3e-4 + 1e-5) / 2)
    assert cosine_lr(300, 300, 3e-4, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(10_000, 300, 3e-4, 1e-5) == pytest.approx(1e-5)


def test_scheduler_jumps_to_any_epoch_without_history():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = CosineAnnealingLRScheduler(optimizer, 3e-4, 1e-5, 300)
    scheduler.step(217)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(217, 300, 3e-4, 1e-5))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(218, 300, 3e-4, 1e-5))


def test_recipe_and_resume_restores_the_schedule(nnunet_env, tmp_path):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(nnUNetTrainer_SAMFlareLocator, "3d_locator", plans, dataset_json)
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["weight_decay"] == 1e-5
    assert trainer.optimizer.defaults["fused"] is True  # training.optimizer: PyTorch would loop per tensor on a CPU
    # the authors' code's schedule (docs/method.md §7 #14): the paper's 3e-4 to 1e-5 learned nothing in short runs
    assert trainer.num_epochs == 300 and (trainer.initial_lr, trainer.final_lr) == (1e-3, 1e-4)
    assert trainer._do_i_compile() is False
    trainer.current_epoch = 120
    trainer.on_train_epoch_start()
    trainer.current_epoch += 1  # what on_epoch_end does before a checkpoint is written
    checkpoint = tmp_path / "checkpoint.pth"
    trainer.save_checkpoint(str(checkpoint))

    resumed = make_trainer(nnUNetTrainer_SAMFlareLocator, "3d_locator", plans, dataset_json, continue_training=True)
    resumed.load_checkpoint(str(checkpoint))
    assert resumed.current_epoch == 122  # nnU-Net stores current_epoch + 1
    resumed.on_train_epoch_start()
    expected = cosine_lr(122, 300, 1e-3, 1e-4)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert not math.isclose(expected, 1e-3)
    assert resumed.optimizer.param_groups[0]["fused"] is True


def test_fused_adamw_makes_the_plain_adamw_update():
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3, 3), (6,), (4, 7)]
    plain_params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    plain = torch.optim.AdamW(plain_params, lr=1e-3, weight_decay=1e-5, fused=False, foreach=False)
    start = [p.detach().clone() for p in plain_params]
    fused = build_adamw(fused_params, 1e-3, 1e-5, torch.device("cpu"))
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == 1e-3 and fused.defaults["weight_decay"] == 1e-5
    for _ in range(3):
        for p, q in zip(plain_params, fused_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        plain.step(), fused.step()
    for p, q, p0 in zip(plain_params, fused_params, start):
        assert not torch.equal(q, p0)
        torch.testing.assert_close(q, p)
    assert build_adamw(fused_params, 1e-3, 1e-5, torch.device("meta")).defaults["fused"] is False


def test_fused_adamw_under_nnunets_amp_step_skips_an_overflow_and_takes_the_next_step():
    # nnUNetTrainer.train_step on CUDA: scale, backward, unscale_, clip at 12, GradScaler.step, update. The fused
    # optimizer takes the overflow flag from the scaler instead of a host-side check: the same order on a CPU.
    parameter = torch.nn.Parameter(torch.ones(4))
    optimizer = build_adamw([parameter], 0.1, 0.0, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for gradient, expected in ((torch.tensor([1.0, math.inf, 1.0, 1.0]), 1.0), (torch.ones(4), 0.9)):
        optimizer.zero_grad()
        scaler.scale((parameter * gradient).sum()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([parameter], 12)
        scaler.step(optimizer)
        scaler.update()
        torch.testing.assert_close(parameter.detach(), torch.full((4,), expected))  # Adam's first step: lr
    assert scaler.get_scale() == 512.0  # halved once, by the overflow


def test_binary_foreground_dataset_json_includes_tumor():
    dataset_json = {"labels": {"background": 0, "liver": 1, "tumor": 14}, "channel_names": {"0": "CT"}}
    binary = binary_foreground_dataset_json(dataset_json)
    assert binary["labels"] == {"background": 0, "foreground": [1, 14]}
    assert binary["regions_class_order"] == [1]
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "tumor": 14}  # input untouched


def test_segmenter_does_not_mirror_left_right(nnunet_env):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter", plans, dataset_json)
    *_, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert plans["transpose_forward"] == [0, 1, 2]
    assert mirror_axes == (0, 1)
    assert trainer.inference_allowed_mirroring_axes == (0, 1)
    locator = make_trainer(nnUNetTrainer_SAMFlareLocator, "3d_locator", plans, dataset_json)
    assert locator.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[-1] == (0, 1, 2)


def test_segmenter_samples_from_the_foreground_box(nnunet_env):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter", plans, dataset_json)
    trainer.dataset_class = None
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    assert isinstance(dataset_tr, ForegroundBoxDataset)
    data, seg, _, properties = dataset_tr._dataset.load_case("TSEX_0001")
    full_seg = np.asarray(seg[:])
    box = foreground_box(full_seg)
    assert box is not None
    margin_voxels = [math.ceil(20.0 / s) for s in trainer.configuration_manager.spacing]
    np.random.seed(0)
    for _ in range(5):
        cropped_data, cropped_seg, _, cropped_properties = dataset_tr.load_case("TSEX_0001")
        shape = cropped_seg.shape[1:]
        extent = [hi - lo for lo, hi in box]
        assert all(e <= s <= e + 2 * m for e, s, m in zip(extent, shape, margin_voxels))
        assert cropped_data.shape[1:] == shape
        # every foreground voxel survives the crop
        assert (cropped_seg > 0).sum() == (full_seg > 0).sum()
        for label, locations in cropped_properties["class_locations"].items():
            if len(locations):
                assert np.all(locations[:, 1:] < np.array(shape)) and np.all(locations >= 0)
                z, y, x = locations[0, 1:]
                assert cropped_seg[0, z, y, x] == label


def nnunet_training_lengths() -> set[int]:
    """The lengths of nnU-Net's own ``nnUNetTrainer_<N>epochs`` classes, read from the installed nnU-Net."""
    from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs

    pattern = re.compile(r"nnUNetTrainer_(\d+)epochs?")
    return {int(m.group(1)) for name in vars(nnUNetTrainer_Xepochs) if (m := pattern.fullmatch(name))}


def test_training_lengths_are_nnunets_and_found_by_stock_lookup():
    assert set(TRAINING_LENGTHS) == nnunet_training_lengths()
    names = [
        training_length_name(base, n)
        for base in ("nnUNetTrainer_SAMFlareLocator", "nnUNetTrainer_SAMFlareSegmenter")
        for n in TRAINING_LENGTHS
    ]
    assert "nnUNetTrainer_SAMFlareSegmenter_50epochs" in names and "nnUNetTrainer_SAMFlareLocator_1epoch" in names
    # nnU-Net's own lookup in a fresh interpreter without nnUNet_extTrainer: only the .pth hook makes it work; the
    # classes must pickle (spawned workers, DDP ranks) and carry their length.
    code = (
        "import pickle, sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "for name in sys.argv[1:]:\n"
        "    cls = find(name)\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls\n"
        "    print('FOUND', name, cls.__module__, cls.training_epochs)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "SAMFLARE_NO_AUTOREGISTER")}
    result = subprocess.run(
        [sys.executable, "-c", code, *names], env=env, capture_output=True, encoding="utf-8", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("FOUND")]
    expected_epochs = [str(n) for n in TRAINING_LENGTHS] * 2
    assert found == [[name, "nnunet_samflare.training.trainers", n] for name, n in zip(names, expected_epochs)]


def test_plugin_trainer_names_are_exactly_the_packages_trainers_and_none_builds_its_own_network():
    """Inference builds the networks of these names from the plans without importing the class (cascade.py)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_samflare.training import partial_labels
    from nnunet_samflare.training.names import plugin_trainer_names

    classes = {
        name: cls
        for module in (trainers, partial_labels)
        for name, cls in vars(module).items()
        if isinstance(cls, type)
        and issubclass(cls, nnUNetTrainer)
        and cls.__module__ == module.__name__
        and not name.startswith("_")
        and name != "nnUNetTrainer_SAMFlareBase"
    }
    assert set(classes) == plugin_trainer_names()
    for cls in classes.values():
        assert cls.build_network_architecture is nnUNetTrainer.build_network_architecture, cls.__name__


def test_variants_for_another_base_class_are_module_level():
    namespace = {"__name__": "some_plugin_module"}

    class Partial(nnUNetTrainer_SAMFlareSegmenter):
        pass

    names = define_training_length_variants(Partial, namespace, (5, 1))
    assert names == ["Partial_5epochs", "Partial_1epoch"]
    assert namespace["Partial_5epochs"].__module__ == "some_plugin_module"
    assert namespace["Partial_5epochs"].__qualname__ == "Partial_5epochs"
    assert issubclass(namespace["Partial_1epoch"], Partial) and namespace["Partial_1epoch"].training_epochs == 1
    with pytest.raises(TypeError, match="not a SAMFlare trainer"):
        define_training_length_variants(torch.nn.Module, namespace)


def test_variant_lays_the_cosine_over_its_own_length(nnunet_env):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(trainers.nnUNetTrainer_SAMFlareLocator_50epochs, "3d_locator", plans, dataset_json)
    trainer.initialize()
    assert trainer.num_epochs == 50 and trainer.lr_scheduler.max_steps == 50
    for epoch in (0, 25, 49, 50):
        trainer.lr_scheduler.step(epoch)
        expected = cosine_lr(epoch, 50, trainer.initial_lr, trainer.final_lr)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.final_lr)
    # the default length is untouched
    assert make_trainer(nnUNetTrainer_SAMFlareLocator, "3d_locator", plans, dataset_json).num_epochs == 300


def test_online_validation_uses_the_cascade_margin(nnunet_env):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter", plans, dataset_json)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    _, dataset_val = trainer.get_tr_and_val_datasets()
    _, seg, _, _ = dataset_val._dataset.load_case("TSEX_0001")
    box = foreground_box(np.asarray(seg[:]))
    pad = [math.ceil(DEFAULT_ROI_MARGIN_MM / s) for s in trainer.configuration_manager.spacing]
    expected = [min(size, hi + p) - max(0, lo - p) for (lo, hi), p, size in zip(box, pad, seg.shape[1:])]
    shapes = {dataset_val.load_case("TSEX_0001")[1].shape[1:] for _ in range(3)}
    assert shapes == {tuple(expected)}  # the same region every time, not a random one


def test_resumed_segmenter_validates_the_cascade_with_the_checkpoint_it_ends_with(nnunet_env):
    plans, dataset_json = nnunet_env
    trainer = make_trainer(nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter", plans, dataset_json)
    trainer.initialize()
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(latest)

    # nnUNetv2_train --c loads checkpoint_latest.pth, trains on, and nnU-Net's on_train_end writes
    # checkpoint_final.pth and deletes checkpoint_latest.pth before the final validation
    resumed = make_trainer(nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter", plans, dataset_json, continue_training=True)
    resumed.load_checkpoint(latest)
    assert resumed.validation_checkpoint_name == "checkpoint_latest.pth"
    resumed.on_train_end()
    assert not os.path.exists(latest)
    assert resumed.validation_checkpoint_name == "checkpoint_final.pth"
    assert os.path.isfile(os.path.join(resumed.output_folder, resumed.validation_checkpoint_name))
    # --val_best after training: the loaded checkpoint is the one to validate
    resumed.load_checkpoint(os.path.join(resumed.output_folder, "checkpoint_final.pth"))
    assert resumed.validation_checkpoint_name == "checkpoint_final.pth"


def test_every_plugin_trainer_skips_its_final_validation_when_asked(nnunet_env, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_samflare.training.partial_labels import nnUNetTrainer_SAMFlareSegmenterPartial

    plans, dataset_json = nnunet_env
    validated = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", lambda self, *a: validated.append(type(self)))
    monkeypatch.setattr(trainers, "validate_segmenter_in_roi", lambda self, *a: validated.append(type(self)))
    built = [
        make_trainer(cls, configuration, plans, dataset_json)
        for cls, configuration in (
            (nnUNetTrainer_SAMFlareLocator, "3d_locator"),
            (nnUNetTrainer_SAMFlareSegmenter, "3d_segmenter"),
            (nnUNetTrainer_SAMFlareSegmenterPartial, "3d_segmenter"),
        )
    ]
    log = []
    for trainer in built:
        trainer.print_to_log_file = lambda *args, **kwargs: log.append(" ".join(map(str, args)))

    monkeypatch.setenv(trainers.SKIP_FINAL_VALIDATION_ENV, "1")
    for trainer in built:
        trainer.perform_actual_validation()
    assert validated == []
    assert log == [f"final validation skipped ({trainers.SKIP_FINAL_VALIDATION_ENV} is set)"] * 3

    monkeypatch.delenv(trainers.SKIP_FINAL_VALIDATION_ENV)
    for trainer in built:
        trainer.perform_actual_validation()
    assert validated == [type(trainer) for trainer in built]


def test_partial_trainer_pseudo_dice_counts_a_class_only_in_the_cases_that_annotate_it(nnunet_env):
    from nnunet_samflare.training.partial_labels import nnUNetTrainer_SAMFlareSegmenterPartial

    plans, dataset_json = nnunet_env
    dataset_json = {**dataset_json, "partial_labels": {"TSEX_0001": [1]}}  # annotates the liver only
    trainer = make_trainer(nnUNetTrainer_SAMFlareSegmenterPartial, "3d_segmenter", plans, dataset_json)
    trainer.initialize()
    heads = trainer.label_manager.num_segmentation_heads
    truth = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    truth[..., :4] = 1  # liver
    truth[:, :, :2, :2, 6:] = 2  # right kidney, 8 voxels per case
    predicted = truth.clone()
    predicted[1, 0, 7, 7, 7] = 2  # one wrong kidney voxel in the fully annotated case
    target = truth.clone()
    target[0][target[0] == 2] = 0  # the liver-only case's label map: its kidney is background there

    class FixedLogits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((2, heads, 8, 8, 8), -10.0).scatter_(1, predicted, 10.0)

    trainer.network = FixedLogits()
    trainer.enable_deep_supervision = False
    step = trainer.validation_step(
        {"data": torch.zeros(2, 1, 8, 8, 8), "target": target.float(), "keys": ["TSEX_0001", "TSEX_0002"]}
    )
    liver, kidney = 0, 1  # nnU-Net's counts leave out the background
    assert (step["tp_hard"][liver], step["fp_hard"][liver], step["fn_hard"][liver]) == (512, 0, 0)
    # kidney: counted in TSEX_0002 only, where the extra voxel is a false positive; TSEX_0001's 8 correct voxels
    # are neither true nor false positives
    assert (step["tp_hard"][kidney], step["fp_hard"][kidney], step["fn_hard"][kidney]) == (8, 1, 0)

"""Partial-label training: the marginal loss (Shi et al. 2021), its annotation sets, and the trainer's wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_samflare.errors import InputError
from nnunet_samflare.training.partial_labels import (
    MarginalDiceCELoss,
    annotated_labels_per_case,
    nnUNetTrainer_SAMFlareSegmenterPartial,
)

from conftest import dataset, read_json


def nnunet_loss(batch_dice: bool, ignore_label: int | None) -> DC_and_CE_loss:
    """The loss nnUNetTrainer._build_loss builds for label (not region) training."""
    return DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=ignore_label,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 5])
def test_marginal_loss_is_nnunet_loss_when_every_class_is_annotated(batch_dice, ignore_label):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, 7, 8, generator=generator)
    target = torch.randint(0, 5 if ignore_label is None else 6, (2, 1, 6, 7, 8), generator=generator)
    marginal = MarginalDiceCELoss(batch_dice, 1e-5, ignore_label)
    for annotated in (None, torch.ones(2, 5, dtype=torch.bool)):
        marginal.annotated = annotated
        expected_logits = logits.clone().requires_grad_()
        actual_logits = logits.clone().requires_grad_()
        expected = nnunet_loss(batch_dice, ignore_label)(expected_logits, target.clone())
        actual = marginal(actual_logits, target.clone())
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        expected.backward()
        actual.backward()
        torch.testing.assert_close(actual_logits.grad, expected_logits.grad, rtol=1e-4, atol=1e-8)


def test_marginal_loss_gradient_matches_the_hand_derived_formula():
    """One case, 3 classes (0 background, 1 annotated, 2 NOT annotated), 4 voxels.

    Marginal probabilities: q0 = p0 + p2, q1 = p1. With N voxels, targets t and Dice on class 1 only
    (D = (2I + s) / (G + P + s), I = sum q1 y1, P = sum q1, G = sum y1), the loss is CE - D with
    CE = -(1/N) sum log q_t. For the logit z2 of voxel v (dp1/dz2 = -p1 p2):
      dCE/dz2 = (1/N) (p2 - [t == 0] p2 / (p0 + p2))
      dD/dz2  = (2 y1 (G + P + s) - (2I + s)) / (G + P + s)^2 * (-p1 p2)
    """
    logits = torch.tensor([[0.3, -1.2, 0.8], [1.5, 0.1, -0.4], [-0.7, 2.0, 0.9], [0.2, 0.2, 1.7]], dtype=torch.float64)
    target = np.array([0, 1, 1, 0])
    z = logits.T.reshape(1, 3, 4, 1, 1).float().requires_grad_()
    loss = MarginalDiceCELoss(batch_dice=False, smooth=1e-5)
    loss.annotated = torch.tensor([[True, True, False]])
    loss(z, torch.from_numpy(target).reshape(1, 1, 4, 1, 1)).backward()

    p = torch.softmax(logits, dim=1).numpy()
    p0, p1, p2 = p[:, 0], p[:, 1], p[:, 2]
    y1 = (target == 1).astype(float)
    n, s = len(target), 1e-5
    intersect, predicted, truth = (p1 * y1).sum(), p1.sum(), y1.sum()
    d_ce = (p2 - (target == 0) * p2 / (p0 + p2)) / n
    d_dice = (2 * y1 * (truth + predicted + s) - (2 * intersect + s)) / (truth + predicted + s) ** 2 * (-p1 * p2)
    np.testing.assert_allclose(z.grad[0, 2, :, 0, 0].numpy(), d_ce - d_dice, rtol=1e-4, atol=1e-7)


def test_unannotated_label_in_target_counts_as_background():
    logits = torch.randn(1, 4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    target = torch.full((1, 1, 3, 3, 3), 3)
    target[0, 0, 0] = 1
    as_background = target.clone()
    as_background[target == 3] = 0
    loss = MarginalDiceCELoss(batch_dice=False)
    loss.annotated = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(loss(logits, target), loss(logits, as_background))


def test_annotation_sets_from_dataset_json():
    data = read_json(dataset("partial") / "dataset.json")
    assert annotated_labels_per_case(data) == {"DCMQI_0001": frozenset({1}), "TSAO_0001": frozenset({5})}
    named = dict(data, partial_labels={"DCMQI_0001": ["liver", 2], "TSAO_0001": ["14"]})
    assert annotated_labels_per_case(named) == {"DCMQI_0001": frozenset({1, 2}), "TSAO_0001": frozenset({14})}


@pytest.mark.parametrize(
    ("partial", "cases", "message"),
    [
        ({"DCMQI_0001": [15]}, None, "label 15"),
        ({"DCMQI_0001": [0]}, None, "label 0"),
        ({"DCMQI_0001": ["spleeen"]}, None, "'spleeen'"),
        ({"NOPE_0001": [1]}, ["DCMQI_0001", "TSAO_0001"], "'NOPE_0001'"),
        ({"DCMQI_0001": 1}, None, "must be a list"),
    ],
)
def test_bad_partial_labels_are_refused_in_one_line(partial, cases, message):
    data = dict(read_json(dataset("partial") / "dataset.json"), partial_labels=partial)
    with pytest.raises(InputError, match=message) as error:
        annotated_labels_per_case(data, "x/dataset.json", cases)
    assert "\n" not in str(error.value) and str(error.value).startswith("x/dataset.json: ")


def test_run_defaults_to_the_partial_label_trainer():
    from nnunet_samflare.pseudolabel.run import PARTIAL_SEGMENTER_TRAINER

    assert nnUNetTrainer_SAMFlareSegmenterPartial.__name__ == PARTIAL_SEGMENTER_TRAINER


def test_trainer_masks_unannotated_classes_per_case():
    trainer = nnUNetTrainer_SAMFlareSegmenterPartial.__new__(nnUNetTrainer_SAMFlareSegmenterPartial)
    trainer.annotated_labels = {"DCMQI_0001": frozenset({1}), "DLPS_0001": frozenset({14})}

    class _Labels:
        num_segmentation_heads = 15

    trainer.label_manager = _Labels()
    mask = trainer.annotation_mask(np.array(["DCMQI_0001", "TSEX_0001", "DLPS_0001"]))
    assert mask.shape == (3, 15)
    assert mask[0].nonzero().flatten().tolist() == [0, 1]
    assert mask[1].all()
    assert mask[2].nonzero().flatten().tolist() == [0, 14]


def test_partial_trainer_has_nnunets_training_lengths_found_by_stock_lookup():
    """``nnUNetTrainer_SAMFlareSegmenterPartial_<N>epochs`` as for the other trainers: nnU-Net's lengths, found by
    stock nnU-Net's lookup by name in a fresh interpreter without ``nnUNet_extTrainer``, picklable, with their
    length and still the partial-label trainer."""
    import os
    import subprocess
    import sys

    from nnunet_samflare.training.trainers import TRAINING_LENGTHS, training_length_name

    names = [training_length_name("nnUNetTrainer_SAMFlareSegmenterPartial", n) for n in TRAINING_LENGTHS]
    assert "nnUNetTrainer_SAMFlareSegmenterPartial_1epoch" in names
    code = (
        "import pickle, sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "from nnunet_samflare.training.partial_labels import nnUNetTrainer_SAMFlareSegmenterPartial as Partial\n"
        "for name in sys.argv[1:]:\n"
        "    cls = find(name)\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls and issubclass(cls, Partial)\n"
        "    print('FOUND', name, cls.__module__, cls.training_epochs)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "SAMFLARE_NO_AUTOREGISTER")}
    result = subprocess.run(
        [sys.executable, "-c", code, *names], env=env, capture_output=True, encoding="utf-8", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("FOUND")]
    assert found == [
        [name, "nnunet_samflare.training.partial_labels", str(n)] for name, n in zip(names, TRAINING_LENGTHS)
    ]


def test_debug_trainers_skip_the_whole_cascade_validation_alike():
    from nnunet_samflare.training.partial_labels import nnUNetTrainer_SAMFlareSegmenterPartialDebug
    from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareSegmenterDebug

    assert nnUNetTrainer_SAMFlareSegmenterDebug.cascade_validation is False
    assert nnUNetTrainer_SAMFlareSegmenterPartialDebug.cascade_validation is False

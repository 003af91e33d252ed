"""nnU-Net trainers of the two phases. Each class overrides the few hooks its phase needs and says why.

Class names are frozen into checkpoints and result folders (``Trainer__Plans__Config``): never rename them.
They are found by nnU-Net through the shim folder ``trainers/`` (see ``nnunet_samflare_autoregister``).
"""

from __future__ import annotations

import copy
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_samflare.training.lr_schedule import CosineAnnealingLRScheduler
from nnunet_samflare.training.names import TRAINING_LENGTHS, training_length_name
from nnunet_samflare.training.optimizer import build_adamw
from nnunet_samflare.training.roi_sampling import DEFAULT_ROI_MARGIN_MM, TRAINING_ROI_MARGIN_MM, ForegroundBoxDataset
from nnunet_samflare.training.roi_validation import validate_segmenter_in_roi

__all__ = [
    "nnUNetTrainer_SAMFlareLocator",
    "nnUNetTrainer_SAMFlareSegmenter",
    "nnUNetTrainer_SAMFlareLocatorDebug",
    "nnUNetTrainer_SAMFlareSegmenterDebug",
]  # + the training-length variants, defined at the end of the module

# nnUNetTrainer's own default device, shared by the signatures below (nnU-Net inspects them).
_CUDA = torch.device("cuda")


def binary_foreground_dataset_json(dataset_json: dict) -> dict:
    """The same dataset seen as one region: every label > 0 (tumor included) is foreground
    (docs/method.md §6.1, §7 #17).

    Region-based training needs no second dataset and no relabelled files; nnU-Net's loss, sampling, final
    validation and export all understand regions, and the model folder's dataset.json makes stock
    ``nnUNetv2_predict`` write a 0/1 mask.
    """
    binary = copy.deepcopy(dataset_json)
    labels = dataset_json["labels"]
    foreground: list[int] = []
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        foreground.extend(value if isinstance(value, (list, tuple)) else [value])
    binary["labels"] = {"background": 0, "foreground": sorted(set(foreground))}
    if "ignore" in labels:
        binary["labels"]["ignore"] = labels["ignore"]
    binary["regions_class_order"] = [1]
    return binary


#: Set to 1 to skip the final validation after training (``perform_actual_validation``) in every plug-in trainer.
#: ``samflare pseudolabel run`` sets it for the trainings it starts: its rounds predict every held-out case
#: themselves, and a fold-``all`` validation would re-predict the whole training set. Checkpoints are written as
#: usual; ``nnUNetv2_train ... --val`` validates them later, in a shell without the variable.
SKIP_FINAL_VALIDATION_ENV = "SAMFLARE_SKIP_FINAL_VALIDATION"


def final_validation_skipped(trainer: nnUNetTrainer) -> bool:
    """Whether :data:`SKIP_FINAL_VALIDATION_ENV` is set; says so in the trainer's log when it is."""
    if os.environ.get(SKIP_FINAL_VALIDATION_ENV, "").strip().lower() not in ("1", "true", "t", "yes"):
        return False
    trainer.print_to_log_file(f"final validation skipped ({SKIP_FINAL_VALIDATION_ENV} is set)")
    return True


class nnUNetTrainer_SAMFlareBase(nnUNetTrainer):
    """The training recipe shared by both phases (docs/method.md §6.1, §11.6).

    AdamW (lr 1e-3, weight decay 1e-5; fused, ``training.optimizer``) with a closed-form cosine decay to 1e-4
    (the authors' code's schedule, not the paper's 3e-4; see ``__init__``), 300 epochs of nnU-Net's 250 iterations
    (the nearest equivalent of the paper's 300 epochs / the code's 80k iterations), nnU-Net's Dice+CE loss,
    augmentation and sampling.
    nnU-Net's gradient clipping (norm 12) is kept: it is part of its ``train_step`` and rarely binds with AdamW.
    """

    #: Epochs of ``num_iterations_per_epoch`` iterations; the training-length variants change only this, and the
    #: cosine schedule is laid over whatever it is.
    training_epochs: int = 300

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # The authors' code's schedule (docs/method.md §6.1, §7 #14), not the paper's 3e-4 nor a floor of 1e-5.
        # Measured (BENCHMARKS.md, Learning: segmenter, 3 mm / 48³ / batch 2, liver Dice after 50/100/150
        # iterations): 3e-4 cosine to 1e-5 over the run 0/0/0; 1e-3 to 1e-5 0/0.43/0.57; 1e-3 to 1e-4
        # 0/0.43/0.62. A low start, or a floor reached within a short run (the <N>epochs variants lay the cosine
        # over their length), keeps the network in the all-background cross-entropy plateau.
        self.initial_lr = 1e-3
        self.final_lr = 1e-4
        self.weight_decay = 1e-5
        self.num_epochs = self.training_epochs
        # The paper's networks have one output. Deep supervision is on only when the plans ask for the optional
        # extra heads; the network's ``deep_supervision_strides`` then says where its outputs are.
        arch_kwargs = self.configuration_manager.network_arch_init_kwargs
        self.enable_deep_supervision = bool(arch_kwargs.get("deep_supervision_heads", False))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if final_validation_skipped(self):
            return
        super().perform_actual_validation(save_probabilities)

    def configure_optimizers(self):
        optimizer = build_adamw(self.network.parameters(), self.initial_lr, self.weight_decay, self.device)
        scheduler = CosineAnnealingLRScheduler(optimizer, self.initial_lr, self.final_lr, self.num_epochs)
        return optimizer, scheduler

    def _get_deep_supervision_scales(self):
        # nnU-Net derives the scales from arch_kwargs['strides'] (a PlainConvUNet notion); ours come from the
        # network itself.
        if not self.enable_deep_supervision:
            return None
        network = self.network
        if isinstance(network, DistributedDataParallel):
            network = network.module
        if isinstance(network, OptimizedModule):
            network = network._orig_mod
        ndim = len(self.configuration_manager.patch_size)
        return [[1.0 / stride] * ndim for stride in network.deep_supervision_strides]

    def _do_i_compile(self):
        # nnU-Net compiles by default on CUDA. These networks (SDPA attention, token reshapes) have not been
        # validated under torch.compile, so it is opt-in: nnUNet_compile=t.
        if os.environ.get("nnUNet_compile", "").strip().lower() not in ("true", "1", "t"):
            return False
        return super()._do_i_compile()


class nnUNetTrainer_SAMFlareLocator(nnUNetTrainer_SAMFlareBase):
    """Phase 1: the PConv locator learns one foreground class (all labels > 0) on the coarse ``3d_locator`` grid."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,
    ):
        super().__init__(plans, configuration, fold, binary_foreground_dataset_json(dataset_json), device)


class nnUNetTrainer_SAMFlareSegmenter(nnUNetTrainer_SAMFlareBase):
    """Phase 2: the SAM/MSA hybrid learns the 14 labels on 96³ patches drawn from the foreground box."""

    #: Random margin (mm) added to each side of the ground-truth foreground box, drawn per side and per draw.
    #: It brackets the cascade's default ROI margin, so training sees boxes like the locator's.
    roi_margin_mm: tuple[float, float] = TRAINING_ROI_MARGIN_MM
    #: Margin (mm) of the region the segmenter is validated in: the cascade's default.
    validation_roi_margin_mm: float = DEFAULT_ROI_MARGIN_MM
    #: Whether the final validation also runs the whole cascade when a trained locator exists for the same fold
    #: (``SAMFLARE_CASCADE_VALIDATION=0/1`` overrides; see ``roi_validation``).
    cascade_validation: bool = True
    #: The checkpoint the network was last loaded from (``--val_best`` loads checkpoint_best.pth); the whole-cascade
    #: validation predicts with the same one.
    validation_checkpoint_name: str = "checkpoint_final.pth"

    def get_tr_and_val_datasets(self) -> tuple[ForegroundBoxDataset, ForegroundBoxDataset]:
        # Patches come from the region the cascade will crop, not from the whole scan (docs/method.md §11.6). Training
        # draws a random margin; the online validation (pseudo Dice, hence checkpoint_best) uses the cascade's.
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        spacing = self.configuration_manager.spacing
        margin = self.validation_roi_margin_mm
        return (
            ForegroundBoxDataset(dataset_tr, spacing, self.roi_margin_mm),
            ForegroundBoxDataset(dataset_val, spacing, (margin, margin)),
        )

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            self.validation_checkpoint_name = os.path.basename(filename_or_checkpoint)

    def on_train_end(self) -> None:
        # Training that resumed (--c) from checkpoint_latest/best ends with the final weights in memory, written to
        # checkpoint_final.pth, and nnU-Net deletes checkpoint_latest.pth: the cascade validation must load those.
        super().on_train_end()
        self.validation_checkpoint_name = "checkpoint_final.pth"

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # nnU-Net validates over whole scans; the cascade never asks that of the segmenter. Validate it in the
        # cascade's region (summary.json) and, where a locator exists, through the cascade (summary_cascade.json).
        if final_validation_skipped(self):
            return
        validate_segmenter_in_roi(self, save_probabilities)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(
        self,
    ) -> tuple[tuple[tuple[float, float], ...], bool, tuple[int, ...], tuple[int, ...]]:
        # Right/left kidney and adrenal gland are different labels: a left-right flip would teach the network
        # that the side does not matter. The x axis of the SimpleITK array is the patient's left-right axis in
        # axial CT; it is not mirrored in augmentation nor in test-time augmentation.
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        left_right_axis = list(self.plans_manager.transpose_forward).index(2)
        mirror_axes = tuple(axis for axis in mirror_axes if axis != left_right_axis)
        self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes


class _SmokeTestLength:
    """One epoch of two iterations, no test-time mirroring in the final validation.

    For CI and for checking a new installation end to end in minutes on a CPU; the models are untrained.
    """

    # nnUNetTrainer.__init__ records its arguments by inspecting ``self.__init__``'s signature: keep it explicit.
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configured


class nnUNetTrainer_SAMFlareLocatorDebug(_SmokeTestLength, nnUNetTrainer_SAMFlareLocator):
    pass


class nnUNetTrainer_SAMFlareSegmenterDebug(_SmokeTestLength, nnUNetTrainer_SAMFlareSegmenter):
    # An untrained locator boxes the whole scan: the cascade pass would cost more than the rest of the run.
    cascade_validation = False


def define_training_length_variants(
    base: type, namespace: dict, lengths: tuple[int, ...] = TRAINING_LENGTHS
) -> list[str]:
    """Define ``<base>_<N>epochs`` subclasses of ``base`` in a module's ``namespace`` (pass ``globals()``) and
    return their names, for that module's ``__all__``.

    Each variant changes nothing but ``training_epochs``; the schedule follows. The classes are ordinary
    module-level classes of the calling module (``__module__``, ``__qualname__``), so they pickle, and nnU-Net's
    lookup by bare class name finds them through the trainer shim folder once the module's ``__all__`` lists them.
    """
    if not isinstance(getattr(base, "training_epochs", None), int):
        raise TypeError(f"{base.__name__} has no integer training_epochs: it is not a SAMFlare trainer")
    names = []
    for epochs in lengths:
        name = training_length_name(base.__name__, epochs)
        namespace[name] = type(
            name,
            (base,),
            {
                "__module__": namespace["__name__"],
                "__qualname__": name,
                "__doc__": f"{base.__name__}, {epochs} epoch(s); the cosine schedule spans them.",
                "training_epochs": epochs,
            },
        )
        names.append(name)
    return names


__all__ += define_training_length_variants(nnUNetTrainer_SAMFlareLocator, globals())
__all__ += define_training_length_variants(nnUNetTrainer_SAMFlareSegmenter, globals())

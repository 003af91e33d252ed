"""Training the segmenter on partially labelled scans: a class a case does not annotate is unknown, not background.

FLARE23's 2,200 labelled scans each annotate only some of the 14 labels (docs/method.md §6.4, §11.8).
``dataset.json`` says which, per case::

    "partial_labels": {"DCMQI_0001": [1], "TSAO_0001": ["aorta"], ...}

(label ids or names of the ``labels`` map; a case without an entry is fully annotated). With the ordinary loss the
liver-only case teaches the network that its kidneys are background. The *marginal loss* (Shi et al., "Marginal
loss and exclusion loss for partially supervised multi-organ segmentation", MedIA 2021) does not: per case, the
softmax probabilities of the classes it does not annotate are added to the background probability, so the network
is only asked "annotated organ k, or something else?", and Dice + cross-entropy are computed on those merged
(marginal) probabilities. For a case that annotates everything the marginal probabilities are the softmax itself
and the loss is nnU-Net's Dice + CE.

The annotation sets reach the loss through nnU-Net's data loading: every batch of ``nnUNetDataLoader`` carries its
cases' ``keys``; :class:`nnUNetTrainer_SAMFlareSegmenterPartial` turns them into a (batch, class) mask before each
training and validation step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from torch import nn

from nnunet_samflare.errors import InputError
from nnunet_samflare.training.trainers import (
    _CUDA,
    _SmokeTestLength,
    define_training_length_variants,
    nnUNetTrainer_SAMFlareSegmenter,
)

__all__ = [
    "nnUNetTrainer_SAMFlareSegmenterPartial",
    "nnUNetTrainer_SAMFlareSegmenterPartialDebug",
]  # + the training-length variants, defined at the end of the module


def label_ids(dataset_json: Mapping) -> list[int]:
    """The label ids of a dataset.json ``labels`` map (background included, the ignore label left out).

    Only plain integer labels have per-class annotation sets; region-based datasets (label tuples) are refused.
    """
    ids = []
    for name, value in (dataset_json.get("labels") or {}).items():
        if name == "ignore":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError("dataset.json", f"label {name!r} is {value!r}: partial labels need integer label ids")
        ids.append(value)
    return sorted(ids)


def annotated_labels_per_case(
    dataset_json: Mapping, source: str = "dataset.json", cases: Sequence[str] | None = None
) -> dict[str, frozenset[int]]:
    """``partial_labels`` of a dataset.json as ``{case: annotated foreground label ids}``; cases without an entry
    are fully annotated and are not in the result.

    Entries are label ids or names of the ``labels`` map. Raises :class:`InputError` (naming ``source``) for an
    entry that is not a label of the map, for the ignore label or background listed as annotated classes, and,
    when ``cases`` is given, for a case that is not one of them.
    """
    partial = dataset_json.get("partial_labels") or {}
    if not isinstance(partial, Mapping):
        raise InputError(source, "partial_labels must map case ids to lists of label ids")
    names = {str(name): value for name, value in (dataset_json.get("labels") or {}).items()}
    valid = set(label_ids(dataset_json)) - {0}
    known_cases = None if cases is None else set(cases)
    result: dict[str, frozenset[int]] = {}
    for case, entries in partial.items():
        if known_cases is not None and case not in known_cases:
            raise InputError(source, f"partial_labels names case {case!r}, which is not in the dataset")
        if isinstance(entries, (str, int)) or not isinstance(entries, Sequence):
            raise InputError(source, f"partial_labels of {case!r} must be a list of label ids, not {entries!r}")
        ids = set()
        for entry in entries:
            label = names.get(entry) if isinstance(entry, str) and not entry.strip().isdigit() else entry
            try:
                label = int(label)
            except (TypeError, ValueError):
                label = None
            if label not in valid:
                raise InputError(
                    source,
                    f"partial_labels of {case!r} names label {entry!r}, which is not a foreground label of the "
                    f"label map (valid: {min(valid)}..{max(valid)} or their names)",
                )
            ids.add(label)
        result[str(case)] = frozenset(ids)
    return result


class MarginalDiceCELoss(nn.Module):
    """nnU-Net's Dice + CE on marginal probabilities (Shi et al. 2021).

    Before each call, :attr:`annotated` is set to a ``(batch, classes)`` boolean mask of the classes each case
    annotates (None: all of them). For case b with un-annotated classes U_b, the marginal probabilities are
    ``q_0 = p_0 + sum(p_u, u in U_b)``, ``q_k = p_k`` for annotated k, and ``q_u = 0``; target voxels carrying an
    un-annotated label count as background. Then, exactly as nnU-Net's ``DC_and_CE_loss`` with
    ``MemoryEfficientSoftDiceLoss`` (``do_bg=False``):

    * CE = mean over the non-ignored voxels of ``-log q_target``;
    * soft Dice per (case, foreground class), or per class over the batch with ``batch_dice``, averaged over the
      pairs that are annotated (an un-annotated class has nothing to be scored against).

    With every class annotated this is nnU-Net's loss to float tolerance (a test holds it so).
    """

    def __init__(
        self,
        batch_dice: bool,
        smooth: float = 1e-5,
        ignore_label: int | None = None,
        ddp: bool = False,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
    ):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ignore_label = ignore_label
        self.ddp = ddp
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.annotated: torch.Tensor | None = None

    def marginal_log_probabilities(self, logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """``log q`` of the class docstring, ``-inf`` for the un-annotated classes of each case."""
        view = (*annotated.shape, *([1] * (logits.ndim - 2)))
        log_p = torch.log_softmax(logits.float(), dim=1)
        into_background = ~annotated
        into_background[:, 0] = True
        log_background = torch.logsumexp(log_p.masked_fill(~into_background.view(view), float("-inf")), dim=1)
        log_q = torch.cat([log_background[:, None], log_p[:, 1:]], dim=1)
        return log_q.masked_fill(~annotated.view(view), float("-inf"))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape[:2]
        if self.annotated is None:
            annotated = torch.ones(batch, classes, dtype=torch.bool, device=logits.device)
        else:
            annotated = self.annotated.to(device=logits.device, dtype=torch.bool).clone()
            if annotated.shape != (batch, classes):
                raise ValueError(f"annotation mask {tuple(annotated.shape)} does not fit logits {tuple(logits.shape)}")
        annotated[:, 0] = True
        log_q = self.marginal_log_probabilities(logits, annotated)

        with torch.no_grad():
            labels = target[:, 0].long()
            valid = None if self.ignore_label is None else labels != self.ignore_label
            if valid is not None:
                labels = torch.where(valid, labels, 0)
            # An un-annotated label in the target is "unknown": the marginal background stands for it.
            lookup = torch.where(annotated, torch.arange(classes, device=labels.device), 0)
            labels = torch.gather(lookup, 1, labels.reshape(batch, -1)).reshape(labels.shape)

        ce = F.nll_loss(log_q, labels, reduction="none")
        if valid is None:
            ce = ce.mean()
        else:
            n_valid = valid.sum()
            ce = (ce * valid).sum() / n_valid if n_valid > 0 else ce.sum() * 0

        dice = self._soft_dice(torch.exp(log_q)[:, 1:], labels, valid, annotated[:, 1:])
        return self.weight_ce * ce - self.weight_dice * dice

    def _soft_dice(
        self, probabilities: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None, annotated: torch.Tensor
    ) -> torch.Tensor:
        axes = tuple(range(2, probabilities.ndim))
        with torch.no_grad():
            one_hot = torch.zeros(
                (labels.shape[0], probabilities.shape[1] + 1, *labels.shape[1:]), device=labels.device
            ).scatter_(1, labels[:, None], 1)[:, 1:]
            mask = None if valid is None else valid[:, None].float()
            if mask is not None:
                one_hot = one_hot * mask
            sum_gt = one_hot.sum(axes, dtype=torch.float32)
        if mask is not None:
            probabilities = probabilities * mask
        intersect = (probabilities * one_hot).sum(axes, dtype=torch.float32)
        sum_pred = probabilities.sum(axes, dtype=torch.float32)
        weights = annotated.float()
        if self.batch_dice:
            if self.ddp:
                intersect = AllGatherGrad.apply(intersect).sum(0, dtype=torch.float32)
                sum_pred = AllGatherGrad.apply(sum_pred).sum(0, dtype=torch.float32)
                sum_gt = AllGatherGrad.apply(sum_gt).sum(0, dtype=torch.float32)
                weights = AllGatherGrad.apply(weights).sum(0)
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
            weights = weights.sum(0).clamp_max(1)  # a class counts if any case of the batch annotates it
        dice = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        total = weights.sum()
        return (dice * weights).sum() / total if total > 0 else dice.sum() * 0


class nnUNetTrainer_SAMFlareSegmenterPartial(nnUNetTrainer_SAMFlareSegmenter):
    """The segmenter trained on partially labelled data with the marginal loss (Shi et al. 2021).

    ``partial_labels`` of the dataset.json (in ``nnUNet_preprocessed``, copied there by nnU-Net's planning) says
    which labels each case annotates; cases without an entry are fully annotated and train exactly as with
    :class:`nnUNetTrainer_SAMFlareSegmenter`. Works with an ignore label too (pseudo-label rounds write one).
    ``SAMFLARE_SKIP_FINAL_VALIDATION=1`` skips the final validation, as for every plug-in trainer.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise InputError("dataset.json", "partial-label training needs integer labels, not regions")
        self.annotated_labels = annotated_labels_per_case(dataset_json)
        self._marginal_loss: MarginalDiceCELoss | None = None

    def _build_loss(self):
        # nnU-Net's own loss, then its Dice + CE swapped for the marginal one: the deep-supervision weighting (when
        # the plans ask for extra heads) stays nnU-Net's.
        loss = super()._build_loss()
        self._marginal_loss = MarginalDiceCELoss(
            batch_dice=self.configuration_manager.batch_dice,
            smooth=1e-5,
            ignore_label=self.label_manager.ignore_label,
            ddp=self.is_ddp,
        )
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = self._marginal_loss
            return loss
        return self._marginal_loss

    def annotation_mask(self, keys: Sequence[str]) -> torch.Tensor:
        """``(len(keys), classes)`` booleans: which classes each case annotates (background always)."""
        mask = torch.ones(len(keys), self.label_manager.num_segmentation_heads, dtype=torch.bool)
        for row, key in enumerate(keys):
            labels = self.annotated_labels.get(str(key))
            if labels is not None:
                mask[row] = False
                mask[row, 0] = True
                mask[row, sorted(labels)] = True
        return mask

    def train_step(self, batch: dict) -> dict:
        self._marginal_loss.annotated = self.annotation_mask(batch["keys"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        annotated = self.annotation_mask(batch["keys"])
        self._marginal_loss.annotated = annotated
        if annotated.all():
            return super().validation_step(batch)
        # nnU-Net's online pseudo Dice (which picks checkpoint_best) counts every voxel predicted as class c against
        # the label map; where a case does not annotate c, its c voxels are background there, so a correct c would
        # count as a false positive. Take those voxels out: c counts only in the cases that annotate it.
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        reference = target[:, 0].to(self.device, copy=True)  # nnU-Net's step overwrites ignored voxels with 0
        counted = None
        if self.label_manager.has_ignore_label:
            counted = reference != self.label_manager.ignore_label
        outputs = []
        hook = self.network.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            result = super().validation_step(batch)
        finally:
            hook.remove()
        output = outputs[0][0] if isinstance(outputs[0], (list, tuple)) else outputs[0]
        predicted = output.argmax(1)
        for case, row in enumerate(annotated):
            for label in (~row).nonzero().flatten().tolist():
                voxels = (predicted[case] == label) & (reference[case] != label)  # nnU-Net's false positives of c
                if counted is not None:
                    voxels &= counted[case]
                result["fp_hard"][label - 1] -= int(voxels.sum())
        return result


class nnUNetTrainer_SAMFlareSegmenterPartialDebug(_SmokeTestLength, nnUNetTrainer_SAMFlareSegmenterPartial):
    # As nnUNetTrainer_SAMFlareSegmenterDebug: an untrained locator boxes the whole scan.
    cascade_validation = False


# nnU-Net's training lengths (``nnUNetTrainer_SAMFlareSegmenterPartial_<N>epochs``), as for the other segmenters;
# the trainer shim re-exports them from ``__all__`` for nnU-Net's lookup by name.
__all__ += define_training_length_variants(nnUNetTrainer_SAMFlareSegmenterPartial, globals())

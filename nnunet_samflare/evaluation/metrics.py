"""Per-case DSC and NSD with the semantics of the official FLARE23 evaluator (docs/method.md §10).

The rules, in the order the official evaluator applies them to each label id i:

1. Reference and prediction both without label i (whole volume): DSC = NSD = 1.
   Exactly one of them without it: DSC = NSD = 0.
2. Aorta (5), IVC (6) and esophagus (10): both masks are cut to the axial slab of slices in which the
   *reference* has the label; prediction voxels outside it are ignored. The official code slices
   ``[z_lower:z_upper]`` with ``z_upper`` the last labelled slice, which is half-open and so leaves that slice
   out (``official_slab_quirk=True``, the default, reproduces it; ``False`` keeps it). For a label on a
   single slice that range is empty, and the official evaluator crashes there: the empty slab reaches its
   surface-distance computation. We score that one slice instead.
3. DSC = 2|G∩P| / (|G| + |P|), counted in voxels.
4. NSD = 0 if DSC < ``nsd_cutoff``, else DeepMind's surface Dice at the class tolerance (mm), with the
   reference's anisotropic spacing.
5. Both values are rounded to 4 decimals per case.

Arrays are in SimpleITK order (z, y, x): the slab axis is axis 0 and spacings are (z, y, x) in mm.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_samflare.errors import InputError
from nnunet_samflare.labels import ALL_FOREGROUND_LABELS

# Official FLARE23 NSD tolerances in mm, per label id.
NSD_TOLERANCE_MM: dict[int, float] = {
    1: 5.0,  # liver
    2: 3.0,  # right kidney
    3: 3.0,  # spleen
    4: 5.0,  # pancreas
    5: 2.0,  # aorta
    6: 2.0,  # inferior vena cava
    7: 2.0,  # right adrenal gland
    8: 2.0,  # left adrenal gland
    9: 2.0,  # gallbladder
    10: 3.0,  # esophagus
    11: 5.0,  # stomach
    12: 7.0,  # duodenum
    13: 3.0,  # left kidney
    14: 2.0,  # tumor
}
# Tubular structures that are only partly inside a scan: scored on the reference's labelled slices only.
SLAB_LABELS: tuple[int, ...] = (5, 6, 10)
DEFAULT_NSD_CUTOFF = 0.2  # the evaluator as published today
DECIMALS = 4

Metric = dict[str, float]  # {"DSC": x, "NSD": y}


def round_metric(value: float) -> float:
    """Round like the official evaluator (numpy rounding of a float64), returned as a plain float."""
    return float(np.round(np.float64(value), DECIMALS))


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Volumetric Dice of two boolean masks, in voxels. Both empty is undefined here: the caller's empty
    rules decide that case, so it raises instead of returning NaN."""
    total = int(np.count_nonzero(reference)) + int(np.count_nonzero(prediction))
    if total == 0:
        raise ValueError("dice of two empty masks is undefined; apply the empty-mask rules first")
    return 2.0 * int(np.count_nonzero(reference & prediction)) / total


def surface_dice(
    reference: np.ndarray, prediction: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> float:
    """DeepMind's surface Dice at ``tolerance_mm`` of two non-empty boolean masks (2D or 3D).

    ``spacing_mm`` is per array axis, i.e. (z, y, x) for SimpleITK arrays. Empty masks are refused because
    ``surface_distance`` reaches NumPy-1-only code (``np.Inf``) on that path.
    """
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    if not reference.any() or not prediction.any():
        raise ValueError("surface dice needs two non-empty masks; apply the empty-mask rules first")
    if len(spacing_mm) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not match a {reference.ndim}D mask")
    with warnings.catch_warnings():
        # The package calls scipy.ndimage.filters/morphology, deprecated aliases of the same functions.
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = compute_surface_distances(
            reference.astype(bool, copy=False),
            prediction.astype(bool, copy=False),
            [float(s) for s in spacing_mm],
        )
    return float(compute_surface_dice_at_tolerance(distances, float(tolerance_mm)))


def axial_slab(reference_mask: np.ndarray, official_slab_quirk: bool = True) -> slice:
    """The slice range along axis 0 (z) where ``reference_mask`` is set.

    With ``official_slab_quirk`` the range is ``[first, last)`` as in the official code, so the last labelled
    slice (highest z index in stored order) is left out. If the label lies on a single slice that range is
    empty, and the official evaluator crashes on such a case (the empty masks reach its surface-distance
    computation) instead of scoring it. We fall back to ``[first, last]`` (that one slice), i.e. the quirk is
    dropped for such a case only.
    """
    z = np.flatnonzero(reference_mask.any(axis=tuple(range(1, reference_mask.ndim))))
    if z.size == 0:
        raise ValueError("the reference mask is empty: it defines no slab")
    first, last = int(z[0]), int(z[-1])
    if official_slab_quirk and last > first:
        return slice(first, last)
    return slice(first, last + 1)


def label_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    label: int,
    spacing_mm: Sequence[float],
    *,
    tolerance_mm: float | None = None,
    nsd_cutoff: float = DEFAULT_NSD_CUTOFF,
    official_slab_quirk: bool = True,
) -> Metric:
    """DSC and NSD of one label id between two label maps of the same shape (rules in the module docstring).

    ``tolerance_mm`` defaults to the official FLARE23 tolerance of ``label``. The slab restriction applies
    to 3D maps and the labels in ``SLAB_LABELS`` only. Returns ``{"DSC": x, "NSD": y}`` rounded to 4 decimals.
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if tolerance_mm is None:
        if label not in NSD_TOLERANCE_MM:
            raise ValueError(f"no FLARE23 NSD tolerance for label {label}; pass tolerance_mm")
        tolerance_mm = NSD_TOLERANCE_MM[label]
    gt = reference == label
    pred = prediction == label
    # Empty rules first, on the whole volumes (as the official evaluator does).
    gt_any, pred_any = bool(gt.any()), bool(pred.any())
    if not gt_any and not pred_any:
        return {"DSC": 1.0, "NSD": 1.0}
    if gt_any != pred_any:
        return {"DSC": 0.0, "NSD": 0.0}
    if label in SLAB_LABELS and gt.ndim == 3:
        slab = axial_slab(gt, official_slab_quirk)
        gt, pred = gt[slab], pred[slab]
    dsc = dice(gt, pred)
    # A prediction that lies only outside the slab has DSC 0 there: with a cut-off of 0 it would otherwise
    # reach surface_dice with an empty mask.
    if dsc < nsd_cutoff or not pred.any():
        nsd = 0.0
    else:
        nsd = surface_dice(gt, pred, spacing_mm, tolerance_mm)
    return {"DSC": round_metric(dsc), "NSD": round_metric(nsd)}


def case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    labels: Iterable[int] = ALL_FOREGROUND_LABELS,
    *,
    annotated: Collection[int] | None = None,
    nsd_cutoff: float = DEFAULT_NSD_CUTOFF,
    official_slab_quirk: bool = True,
    tolerances_mm: Mapping[int, float] | None = None,
) -> dict[int, Metric | None]:
    """Metrics of every label id in ``labels`` for one case.

    ``annotated``: the label ids the reference annotates (partially labelled cases); other labels are not
    scored and map to ``None``. ``None`` means fully labelled.
    """
    tolerances = {**NSD_TOLERANCE_MM, **(tolerances_mm or {})}
    result: dict[int, Metric | None] = {}
    for label in labels:
        if annotated is not None and label not in annotated:
            result[label] = None
            continue
        result[label] = label_metrics(
            reference,
            prediction,
            label,
            spacing_mm,
            tolerance_mm=tolerances.get(label),
            nsd_cutoff=nsd_cutoff,
            official_slab_quirk=official_slab_quirk,
        )
    return result


def read_label_array(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A label map as an integer array in SimpleITK order (z, y, x) and its spacing in the same order.

    (Not to be confused with :func:`nnunet_samflare.io.read_label_map`, which returns the ``SimpleITK.Image``.)
    """
    import SimpleITK as sitk

    from nnunet_samflare.io import read_label_map as read_label_image

    image = read_label_image(path)  # one-line errors for missing, unreadable, non-integer or negative maps
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.int32)  # float-typed maps of whole numbers do occur
    return array, tuple(float(s) for s in reversed(image.GetSpacing()))


def read_label_map(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Deprecated name of :func:`read_label_array` (``nnunet_samflare.io.read_label_map`` returns an image)."""
    warnings.warn(
        "nnunet_samflare.evaluation.metrics.read_label_map is deprecated: use read_label_array",
        DeprecationWarning,
        stacklevel=2,
    )
    return read_label_array(path)


def evaluate_case_files(
    reference_file: str | Path,
    prediction_file: str | Path,
    labels: Iterable[int] = ALL_FOREGROUND_LABELS,
    **kwargs,
) -> tuple[dict[int, Metric | None], list[int]]:
    """Read a reference/prediction pair and score it with :func:`case_metrics` (``kwargs`` go there).

    The spacing comes from the reference header; there is no resampling, so both files must have the same
    grid. Returns the metrics and the sorted label ids present in the reference.
    """
    reference, spacing = read_label_array(reference_file)
    prediction, prediction_spacing = read_label_array(prediction_file)
    if reference.shape != prediction.shape:
        raise InputError(
            prediction_file,
            f"shape {prediction.shape} (z, y, x) does not match the reference {reference_file} with shape "
            f"{reference.shape}",
        )
    if reference.ndim not in (2, 3):
        raise InputError(reference_file, f"expected a 2D or 3D label map, got {reference.ndim}D")
    if not np.allclose(spacing, prediction_spacing, rtol=1e-3):
        # Scored anyway (the official evaluator only checks shapes), but a different spacing usually means
        # the prediction was resampled or written with another image's geometry.
        warnings.warn(
            f"{prediction_file}: spacing {prediction_spacing} differs from the reference's {spacing}; "
            "the reference spacing is used",
            stacklevel=2,
        )
    present = [int(v) for v in np.unique(reference) if v != 0]
    return case_metrics(reference, prediction, spacing, labels, **kwargs), present

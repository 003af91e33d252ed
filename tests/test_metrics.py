"""Known answers for every rule of the FLARE23 DSC/NSD semantics (docs/method.md §10).

Arrays are (z, y, x) with the axial (slab) axis first; spacings are given in the same order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunet_samflare.evaluation import metrics
from nnunet_samflare.evaluation.metrics import (
    NSD_TOLERANCE_MM,
    axial_slab,
    case_metrics,
    evaluate_case_files,
    label_metrics,
    read_label_array,
    round_metric,
    surface_dice,
)

from conftest import data_file

AORTA, LIVER = 5, 1


def cube(shape=(12, 12, 12), lo=(4, 4, 4), size=4) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return mask


def ellipsoid(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    """Voxels (centres) inside a physical sphere of ``radius_mm`` on a grid with ``spacing`` (z, y, x)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def as_labels(mask: np.ndarray, label: int) -> np.ndarray:
    return mask.astype(np.uint8) * label


def test_tolerances_are_the_official_ones():
    # docs/method.md §10, in label order 1..14.
    expected = [5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3, 2]
    assert [NSD_TOLERANCE_MM[i] for i in range(1, 15)] == expected


# --- a cube shifted by one voxel ------------------------------------------------------------------------------


def test_cube_shifted_one_voxel_dsc_and_nsd_isotropic():
    gt = cube()
    pred = np.roll(gt, 1, axis=0)
    m = label_metrics(as_labels(gt, LIVER), as_labels(pred, LIVER), LIVER, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    # overlap 3 of 4 slices of a 4x4x4 cube: 2*48/(64+64)
    assert m["DSC"] == 0.75
    # A translation moves every surface point by exactly the shift (1 mm): all are within a 1 mm tolerance.
    assert m["NSD"] == 1.0


def test_cube_shift_with_anisotropic_spacing_below_and_above_tolerance():
    gt, pred = as_labels(cube(), LIVER), as_labels(np.roll(cube(), 1, axis=0), LIVER)
    # The shift is along axis 0 (z); with 3 mm slices it is 3 mm, more than a 2 mm tolerance ...
    below = label_metrics(gt, pred, LIVER, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert below["DSC"] == 0.75  # DSC is in voxels, spacing does not enter
    assert 0.0 < below["NSD"] < 1.0  # the side faces still coincide
    # ... and covered by a 3 mm one.
    assert label_metrics(gt, pred, LIVER, (3.0, 1.0, 1.0), tolerance_mm=3.0)["NSD"] == 1.0
    # The spacing is per axis: the same shift along a 1 mm axis is within 2 mm.
    assert label_metrics(gt, pred, LIVER, (1.0, 1.0, 3.0), tolerance_mm=2.0)["NSD"] == 1.0


# --- two spheres at a known distance --------------------------------------------------------------------------


def test_concentric_spheres_surfaces_nine_mm_apart():
    spacing = (2.0, 1.0, 1.0)
    shape = (32, 64, 64)
    centre = (31.0, 31.5, 31.5)
    inner = ellipsoid(shape, centre, 15.0, spacing)
    outer = ellipsoid(shape, centre, 24.0, spacing)
    ref, pred = as_labels(outer, LIVER), as_labels(inner, LIVER)
    m_far = label_metrics(ref, pred, LIVER, spacing, tolerance_mm=6.0)
    # inner ⊂ outer: DSC = 2|inner| / (|inner| + |outer|), from voxel counts
    expected_dsc = 2 * inner.sum() / (inner.sum() + outer.sum())
    assert m_far["DSC"] == round(float(expected_dsc), 4)
    assert 0.35 < m_far["DSC"] < 0.45  # (15/24)³ analytically: 2·0.244/1.244 = 0.39
    # The surfaces are 9 mm apart (± voxelisation, < 2 mm here): none within 6 mm, all within 12 mm.
    assert m_far["NSD"] == 0.0
    assert label_metrics(ref, pred, LIVER, spacing, tolerance_mm=12.0)["NSD"] == 1.0


def test_disjoint_spheres_score_zero_through_the_cutoff():
    shape, spacing = (24, 24, 48), (1.0, 1.0, 1.0)
    a = ellipsoid(shape, (11.5, 11.5, 12.0), 8.0, spacing)
    b = ellipsoid(shape, (11.5, 11.5, 32.0), 8.0, spacing)  # centres 20 mm apart: a 4 mm gap
    ref, pred = as_labels(a, LIVER), as_labels(b, LIVER)
    assert label_metrics(ref, pred, LIVER, spacing, tolerance_mm=100.0) == {"DSC": 0.0, "NSD": 0.0}
    # Without the cut-off the surface Dice itself is computed: 0 within 2 mm, 1 within 100 mm.
    assert label_metrics(ref, pred, LIVER, spacing, tolerance_mm=2.0, nsd_cutoff=0.0)["NSD"] == 0.0
    assert label_metrics(ref, pred, LIVER, spacing, tolerance_mm=100.0, nsd_cutoff=0.0)["NSD"] == 1.0


# --- empty masks ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_surface_distance(monkeypatch):
    """Fail the test if surface_distance is reached (it breaks on empty masks under NumPy 2)."""
    import surface_distance

    def forbidden(*args, **kwargs):
        raise AssertionError("surface_distance called")

    monkeypatch.setattr(surface_distance, "compute_surface_distances", forbidden)


def test_both_empty_is_one(no_surface_distance):
    empty = np.zeros((6, 6, 6), np.uint8)
    for label in (LIVER, AORTA):
        assert label_metrics(empty, empty, label, (1, 1, 1)) == {"DSC": 1.0, "NSD": 1.0}


def test_exactly_one_empty_is_zero(no_surface_distance):
    empty = np.zeros((12, 12, 12), np.uint8)
    full = as_labels(cube(), AORTA)
    assert label_metrics(full, empty, AORTA, (1, 1, 1)) == {"DSC": 0.0, "NSD": 0.0}
    assert label_metrics(empty, full, AORTA, (1, 1, 1)) == {"DSC": 0.0, "NSD": 0.0}
    # other labels in the maps do not matter
    assert label_metrics(full, as_labels(cube(), LIVER), AORTA, (1, 1, 1)) == {"DSC": 0.0, "NSD": 0.0}


def test_empty_masks_never_reach_surface_distance():
    empty, full = np.zeros((6, 6, 6), bool), cube((6, 6, 6), (1, 1, 1), 2)
    with pytest.raises(ValueError, match="non-empty"):
        surface_dice(full, empty, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="two empty masks"):
        metrics.dice(empty, empty)


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="the hazard exists under NumPy 2 only")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_guard_is_needed_numpy2_breaks_surface_distance_on_empty_masks():
    import surface_distance

    with pytest.raises(AttributeError):  # np.Inf was removed in NumPy 2
        surface_distance.compute_surface_distances(cube((6, 6, 6), (1, 1, 1), 2), np.zeros((6, 6, 6), bool), (1, 1, 1))


# --- the DSC cut-off ------------------------------------------------------------------------------------------


def test_dsc_cutoff_decides_whether_nsd_is_computed():
    gt = np.zeros((50, 4, 4), bool)
    gt[2:22, 1:3, 1:3] = True  # 2x2x20 bar
    pred = np.roll(gt, 17, axis=0)  # 3 slices overlap: DSC = 2*12/160 = 0.15
    ref, prd = as_labels(gt, LIVER), as_labels(pred, LIVER)
    flare23 = label_metrics(ref, prd, LIVER, (1, 1, 1), nsd_cutoff=0.1)
    today = label_metrics(ref, prd, LIVER, (1, 1, 1), nsd_cutoff=0.2)
    assert flare23["DSC"] == today["DSC"] == 0.15
    assert flare23["NSD"] > 0.0
    assert today["NSD"] == 0.0
    assert label_metrics(ref, prd, LIVER, (1, 1, 1))["NSD"] == 0.0  # default cut-off is 0.2


def test_dsc_equal_to_the_cutoff_keeps_nsd():
    gt = np.zeros((50, 4, 4), bool)
    gt[2:22, 1:3, 1:3] = True
    pred = np.roll(gt, 18, axis=0)  # 2 slices overlap: DSC = 2*8/160 = 0.1, not below 0.1
    m = label_metrics(as_labels(gt, LIVER), as_labels(pred, LIVER), LIVER, (1, 1, 1), nsd_cutoff=0.1)
    assert m["DSC"] == 0.1 and m["NSD"] > 0.0


# --- the axial slab for aorta, IVC, esophagus -----------------------------------------------------------------


def slab_case(missing_slice: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: a 4x4 square on slices 2, 3, 4. Prediction: the same without ``missing_slice``, plus a
    false positive on slices 7-8, outside the reference's slab."""
    ref = np.zeros((10, 8, 8), np.uint8)
    ref[2:5, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[missing_slice] = 0
    pred[7:9, 2:6, 2:6] = 1
    return ref, pred


@pytest.mark.parametrize("label", [5, 6, 10])
def test_slab_quirk_leaves_out_the_last_labelled_slice(label):
    ref, pred = slab_case(missing_slice=4)
    ref, pred = ref * label, pred * label
    # quirk: slab = slices 2, 3 — identical there; the false positives outside are ignored
    assert label_metrics(ref, pred, label, (1, 1, 1)) == {"DSC": 1.0, "NSD": 1.0}
    # without the quirk slice 4 counts: 2*32/(48+32)
    assert label_metrics(ref, pred, label, (1, 1, 1), official_slab_quirk=False)["DSC"] == 0.8


def test_slab_quirk_keeps_the_first_labelled_slice():
    ref, pred = slab_case(missing_slice=2)
    # slab 2, 3: reference 32 voxels, prediction 16 (slice 3 only): 2*16/48
    assert label_metrics(ref * AORTA, pred * AORTA, AORTA, (1, 1, 1))["DSC"] == 0.6667
    assert axial_slab(ref.astype(bool)) == slice(2, 4)
    assert axial_slab(ref.astype(bool), official_slab_quirk=False) == slice(2, 5)


def test_other_labels_use_the_whole_volume():
    ref, pred = slab_case(missing_slice=4)
    # liver: reference 48, prediction 32 + 32 false positives, overlap 32: 64/112
    assert label_metrics(ref * LIVER, pred * LIVER, LIVER, (1, 1, 1))["DSC"] == round(64 / 112, 4)


def test_prediction_only_outside_the_slab_scores_zero_even_without_cutoff(no_surface_distance):
    ref = np.zeros((10, 8, 8), np.uint8)
    ref[2:5, 2:6, 2:6] = AORTA
    pred = np.zeros_like(ref)
    pred[7:9, 2:6, 2:6] = AORTA
    assert label_metrics(ref, pred, AORTA, (1, 1, 1), nsd_cutoff=0.0) == {"DSC": 0.0, "NSD": 0.0}


def test_single_slice_label_falls_back_to_that_slice():
    """The official half-open slab is empty for a one-slice label (the official code gives NaN); we score
    the labelled slice itself, i.e. as if the quirk were off."""
    ref = np.zeros((10, 8, 8), np.uint8)
    ref[3, 2:6, 2:6] = AORTA
    pred = ref.copy()
    pred[5:7, 2:6, 2:6] = AORTA  # outside the slab: ignored
    assert axial_slab(ref == AORTA) == slice(3, 4)
    with_quirk = label_metrics(ref, pred, AORTA, (1, 1, 1))
    assert with_quirk == {"DSC": 1.0, "NSD": 1.0}
    assert with_quirk == label_metrics(ref, pred, AORTA, (1, 1, 1), official_slab_quirk=False)
    half = pred.copy()
    half[3, 2:4] = 0  # half of the labelled slice missing: 2*8/(16+8)
    assert label_metrics(ref, half, AORTA, (1, 1, 1))["DSC"] == 0.6667


# --- rounding -------------------------------------------------------------------------------------------------


def test_values_are_rounded_to_four_decimals():
    gt = np.zeros((12, 12, 12), bool)
    gt[3:8, 3:8, 3:7] = True
    pred = np.zeros_like(gt)
    pred[3:8, 4:9, 3:8] = True
    raw_dsc = 2 * (gt & pred).sum() / (gt.sum() + pred.sum())
    raw_nsd = surface_dice(gt, pred, (1.0, 1.0, 2.0), 1.0)
    assert raw_dsc != round(raw_dsc, 4) and raw_nsd != round(raw_nsd, 4)  # the test needs unrounded values
    m = label_metrics(as_labels(gt, LIVER), as_labels(pred, LIVER), LIVER, (1.0, 1.0, 2.0), tolerance_mm=1.0)
    assert m == {"DSC": round(raw_dsc, 4), "NSD": round(raw_nsd, 4)}
    assert round_metric(0.66666666) == 0.6667 and round_metric(1) == 1.0


# --- partial labels -------------------------------------------------------------------------------------------


def test_unannotated_labels_are_not_scored():
    ref = as_labels(cube(), AORTA)
    pred = ref.copy()
    pred[0, 0, 0] = LIVER  # a liver the reference does not annotate: must not cost anything
    result = case_metrics(ref, pred, (1, 1, 1), labels=range(1, 15), annotated=[AORTA])
    assert result[AORTA] == {"DSC": 1.0, "NSD": 1.0}
    assert all(result[lb] is None for lb in range(1, 15) if lb != AORTA)
    # fully labelled, the same liver voxel is a false positive
    assert case_metrics(ref, pred, (1, 1, 1), labels=[LIVER])[LIVER] == {"DSC": 0.0, "NSD": 0.0}


# --- files ----------------------------------------------------------------------------------------------------


def write_image(array_zyx: np.ndarray, path, spacing_xyz=(0.5, 0.8, 3.0)) -> None:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def test_read_label_array_gives_zyx_arrays_and_spacing(tmp_path):
    write_image(np.zeros((4, 5, 6), np.uint8), tmp_path / "a.nii.gz")
    array, spacing = read_label_array(tmp_path / "a.nii.gz")
    assert array.shape == (4, 5, 6)
    assert spacing == pytest.approx((3.0, 0.8, 0.5))


def test_shape_mismatch_names_both_files(tmp_path):
    write_image(np.zeros((4, 5, 6), np.uint8), tmp_path / "ref.nii.gz")
    write_image(np.zeros((4, 5, 7), np.uint8), tmp_path / "pred.nii.gz")
    with pytest.raises(ValueError, match=r"pred\.nii\.gz.*ref\.nii\.gz"):
        evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz")


def test_spacing_comes_from_the_reference(tmp_path):
    ref = as_labels(cube(), LIVER)
    write_image(ref, tmp_path / "ref.nii.gz", spacing_xyz=(1.0, 1.0, 3.0))  # z = 3 mm
    write_image(np.roll(ref, 1, axis=0), tmp_path / "pred.nii.gz", spacing_xyz=(1.0, 1.0, 1.0))
    with pytest.warns(UserWarning, match="spacing"):
        result, present = evaluate_case_files(
            tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz", [LIVER], tolerances_mm={LIVER: 2.0}
        )
    assert present == [LIVER]
    # a 3 mm shift (reference spacing) is beyond 2 mm; with the prediction's 1 mm it would score 1
    assert result[LIVER]["NSD"] < 1.0


# --- a real pair: TSEX_0001 against itself with one organ eroded ----------------------------------------------


def independent_surface_dice(gt: np.ndarray, pred: np.ndarray, spacing, tolerance: float) -> float:
    """Surface Dice in DeepMind's model, computed another way.

    Shared with the package: only its bit convention for 2x2x2 neighbourhoods and its table of surfel areas
    per neighbourhood code (from marching cubes). Computed here independently: the neighbourhood codes (by
    shifting a padded array instead of a correlation), the surface points (corners with a mixed
    neighbourhood), their positions in mm, and the exact nearest distances (a k-d tree instead of distance
    transforms), and the final sum.
    """
    from surface_distance.lookup_tables import (
        ENCODE_NEIGHBOURHOOD_3D_KERNEL,
        create_table_neighbour_code_to_surface_area,
    )

    area_of_code = create_table_neighbour_code_to_surface_area(spacing)

    def surfels(mask):
        padded = np.pad(mask, 1).astype(np.int64)
        n = [s + 1 for s in mask.shape]  # corner lattice
        code = np.zeros(n, np.int64)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    code += ENCODE_NEIGHBOURHOOD_3D_KERNEL[a, b, c] * padded[a : a + n[0], b : b + n[1], c : c + n[2]]
        border = (code != 0) & (code != 255)
        return np.argwhere(border) * np.asarray(spacing), area_of_code[code[border]]

    points_gt, area_gt = surfels(gt)
    points_pred, area_pred = surfels(pred)
    d_gt = cKDTree(points_pred).query(points_gt)[0]
    d_pred = cKDTree(points_gt).query(points_pred)[0]
    within = area_gt[d_gt <= tolerance].sum() + area_pred[d_pred <= tolerance].sum()
    return within / (area_gt.sum() + area_pred.sum())


@pytest.mark.parametrize("organ", [3, 5, 12])  # spleen (3 mm), aorta (2 mm, slab), duodenum (7 mm)
def test_real_scan_with_one_organ_eroded(organ):
    reference, spacing = read_label_array(data_file("flare_like", "label", "TSEX_0001"))
    gt = reference == organ
    eroded = ndimage.binary_erosion(gt)
    prediction = reference.copy()
    prediction[gt & ~eroded] = 0
    result = case_metrics(reference, prediction, spacing)
    # DSC from voxel counts (the eroded organ lies inside the original; the aorta is cut to its slab first)
    slab = axial_slab(gt) if organ == 5 else slice(None)
    g, p = gt[slab], eroded[slab]
    assert result[organ]["DSC"] == round(2 * p.sum() / (g.sum() + p.sum()), 4)
    expected_nsd = independent_surface_dice(g, p, spacing, NSD_TOLERANCE_MM[organ])
    assert result[organ]["NSD"] == round(expected_nsd, 4)
    assert 0.0 < result[organ]["NSD"] < 1.0
    # everything else untouched: 1/1, including labels absent from both (esophagus, tumor)
    others = {lb: m for lb, m in result.items() if lb != organ}
    assert all(m == {"DSC": 1.0, "NSD": 1.0} for m in others.values())


def test_real_anisotropic_tumor_shift_in_plane_vs_across_slices():
    """DLPS_0002: 0.98 mm in-plane, 5 mm slices, tumor tolerance 2 mm. A one-voxel in-plane shift moves the
    surface by < 2 mm (NSD exactly 1); a one-slice shift moves it by 5 mm (NSD < 1). Swapping the spacing
    order would invert both."""
    reference, spacing = read_label_array(data_file("tumor_pseudohu", "label", "DLPS_0002"))
    assert spacing[0] == 5.0 and spacing[2] < 1.0
    tumor = reference == 14
    in_plane = case_metrics(reference, np.roll(reference, 1, axis=2), spacing, [14])[14]
    across = case_metrics(reference, np.roll(reference, 1, axis=0), spacing, [14])[14]
    assert in_plane["NSD"] == 1.0
    assert across["NSD"] < 1.0
    shifted = np.roll(tumor, 1, axis=0)
    assert across["DSC"] == round(2 * (tumor & shifted).sum() / (2 * tumor.sum()), 4)
    assert across["NSD"] == round(independent_surface_dice(tumor, shifted, spacing, 2.0), 4)
    assert not math.isnan(across["NSD"])

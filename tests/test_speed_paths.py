"""The cascade's fast paths give nnU-Net's numbers: slab-wise preprocessing and resampling, post-processing on the
ROI only. Each test compares with nnU-Net's own function (or the whole-scan computation) on the same input."""

from __future__ import annotations

import numpy as np
import pytest
from nnunet_stand_ins import DATASET_JSON, plans_manager
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from scipy import ndimage

from nnunet_samflare.inference.cascade import postprocess_in_box
from nnunet_samflare.inference.postprocessing import postprocess_flare
from nnunet_samflare.inference.preprocessing import nonzero_box, preprocess_image, resample_image, zoom_operator
from nnunet_samflare.inference.roi import crop_to_roi

RNG = np.random.default_rng(20261127)


def ct_like(shape: tuple[int, ...], channels: int = 1) -> np.ndarray:
    """Air around a noisy body with bright spots: over- and undershoot of the cubic spline get clipped."""
    data = np.full((channels, *shape), -1000.0, dtype=np.float32)
    inner = tuple(slice(max(1, n // 6), n - max(1, n // 6)) for n in shape)
    data[(slice(None), *inner)] = RNG.normal(40, 60, size=data[(slice(None), *inner)].shape)
    data[(slice(None), *(slice(n // 2, n // 2 + 2) for n in shape))] = 1500
    return data


@pytest.mark.parametrize(
    "shape, new_shape, spacing, new_spacing, kwargs",
    [
        ((20, 33, 27), (13, 40, 18), (2.0, 1.0, 1.2), (3.0, 0.8, 1.8), {}),  # up and down, one 3-D zoom
        ((12, 40, 44), (30, 20, 22), (5.0, 0.7, 0.7), (2.0, 1.4, 1.4), {}),  # anisotropic: per slice, then z
        ((40, 9, 38), (20, 23, 19), (0.7, 5.0, 0.7), (1.4, 2.0, 1.4), {}),  # low-resolution axis in the middle
        ((30, 31, 8), (15, 15, 20), (0.7, 0.7, 5.0), (1.4, 1.4, 2.0), {"order_z": 1}),
        ((25, 26, 27), (13, 13, 14), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), {"order": 1}),
        ((25, 26, 27), (25, 26, 27), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), {}),
    ],
)
def test_resample_image_equals_nnunet(shape, new_shape, spacing, new_spacing, kwargs):
    data = ct_like(shape, channels=2)
    settings = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None, **kwargs}
    reference = resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, **settings)
    # tiny slabs: the slab boundaries must not show
    ours = resample_image(data, new_shape, spacing, new_spacing, slab_voxels=3 * shape[1] * shape[2], **settings)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-6 * np.abs(reference).max())


def test_zoom_operator_of_a_long_axis_has_no_subnormal_weights_and_the_same_result():
    # 512 -> 128 with the cubic spline: the prefilter's geometric tails leave thousands of float32 subnormals in
    # the matrix, which make the matrix product ~30x slower on Intel CPUs unless they are dropped.
    operator = zoom_operator(512, 128, 3)
    weights = np.abs(operator[operator != 0])
    assert weights.min() >= np.finfo(np.float32).tiny
    rows = ct_like((512,), channels=8)
    exact = ndimage.zoom(rows.astype(np.float64), (1.0, 0.25), order=3, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(rows @ operator.T, exact, rtol=0, atol=2e-6 * np.abs(exact).max())


def test_resample_image_reads_a_crop_without_copying_the_scan():
    scan = ct_like((30, 40, 50))
    view = scan[:, 5:25, 3:33, 10:40]
    assert not view.flags.c_contiguous
    reference = resample_data_or_seg_to_shape(np.ascontiguousarray(view), (10, 12, 14), (1, 1, 1), (2, 2.5, 2.1))
    np.testing.assert_allclose(resample_image(view, (10, 12, 14), (1, 1, 1), (2, 2.5, 2.1)), reference, atol=5e-3)


@pytest.mark.parametrize(
    "transpose, spacing, normalization",
    [
        ((0, 1, 2), (2.0, 2.5, 3.0), "CTNormalization"),  # slab-wise path
        ((2, 0, 1), (2.0, 2.5, 3.0), "CTNormalization"),  # transposed plans
        ((0, 1, 2), (6.0, 1.5, 1.5), "CTNormalization"),  # anisotropic target: per-slice path
        ((0, 1, 2), (2.0, 2.5, 3.0), "ZScoreNormalization"),  # whole-image statistics: nnU-Net's own code
    ],
)
def test_preprocess_image_equals_nnunet_run_case_npy(transpose, spacing, normalization):
    manager, configuration = plans_manager(transpose, spacing, normalization)
    data = ct_like((24, 30, 36))
    data[:, :, :2] = 0  # zero faces that nnU-Net crops away
    data[:, 3:5] = 0  # and a zero slab inside, which it keeps
    properties = {"spacing": [1.5, 0.9, 1.1], "sitk_stuff": {}}
    before = data.copy()
    reference, _, expected = DefaultPreprocessor(verbose=False).run_case_npy(
        data, None, dict(properties), manager, configuration, DATASET_JSON
    )
    ours, got = preprocess_image(data, properties, manager, configuration, DATASET_JSON)
    np.testing.assert_array_equal(data, before)  # the input is not touched
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert [list(v) if isinstance(v, (list, tuple)) else v for v in got[key]] == [
            list(v) if isinstance(v, (list, tuple)) else v for v in expected[key]
        ], key


def test_nonzero_box_matches_nnunet_crop_and_handles_an_empty_image():
    data = np.zeros((2, 10, 12, 14), dtype=np.float32)
    data[1, 3:6, 2, 5:9] = 7
    data[0, 8, 11, 1] = -1
    assert nonzero_box(data, slab_voxels=12 * 14) == [[3, 9], [2, 12], [1, 9]]
    assert nonzero_box(np.zeros((1, 4, 5, 6))) == [[0, 4], [0, 5], [0, 6]]


def random_label_map(shape, box):
    """Organ blobs with stray fragments and tumours (some isolated, some touching an organ) inside ``box``."""
    seg = np.zeros(shape, dtype=np.uint8)
    inner = crop_to_roi(seg, box)
    for _ in range(40):
        label = int(RNG.choice([1, 2, 5, 14, 14]))
        corner = [int(RNG.integers(0, max(1, n - 3))) for n in inner.shape]
        size = [int(RNG.integers(1, 4)) for _ in inner.shape]
        inner[tuple(slice(c, c + s) for c, s in zip(corner, size))] = label
    inner[0, :, -1] = 14  # tumour on the box's faces: its dilation reaches outside the box
    inner[-1, 0, :] = 14
    return seg


@pytest.mark.parametrize("box", [[[3, 15], [2, 20], [5, 17]], [[0, 12], [0, 22], [4, 24]]])
def test_postprocessing_on_the_grown_box_equals_the_whole_scan(box):
    for _ in range(20):
        seg = random_label_map((18, 22, 24), box)
        whole = postprocess_flare(seg)
        assert not np.array_equal(whole, seg)  # something was removed
        np.testing.assert_array_equal(postprocess_in_box(seg.copy(), box), whole)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_probabilities_are_nnunets_export_of_the_roi_pasted_into_the_scan(transpose):
    """Probabilities come from nnU-Net's exporter with the ROI box as its crop: resampled (linearly) from the
    segmenter's grid to the box, softmax, background outside; axis order handled through the transposes."""
    import torch

    from nnunet_samflare.inference.cascade import CascadePredictor

    manager, configuration = plans_manager(transpose)
    segmenter = type("Segmenter", (), {})()
    segmenter.plans_manager, segmenter.configuration_manager = manager, configuration
    segmenter.label_manager = manager.get_label_manager(DATASET_JSON)
    predictor = object.__new__(CascadePredictor)
    predictor.segmenter = segmenter

    full_shape, box, spacing = (10, 12, 14), [[1, 9], [2, 12], [3, 14]], [1.0, 1.2, 0.8]  # box 8 x 10 x 11
    grid_zyx = (4, 5, 6)  # the ROI on the segmenter's grid, (z, y, x)
    grid = [grid_zyx[axis] for axis in transpose]  # nnU-Net's axis order
    logits = torch.randn(2, *grid, generator=torch.Generator().manual_seed(0))
    properties = {"shape_before_cropping": grid, "bbox_used_for_cropping": [[0, n] for n in grid]}
    probabilities = predictor.export_probabilities(logits, properties, box, full_shape, spacing)

    assert probabilities.shape == (2, *full_shape)
    inside = (slice(None), *(slice(lo, hi) for lo, hi in box))
    outside = np.ones(full_shape, dtype=bool)
    outside[inside[1:]] = False
    np.testing.assert_array_equal(probabilities[0][outside], 1)
    np.testing.assert_array_equal(probabilities[1][outside], 0)
    # what nnU-Net's resampling of the logits to the box, then softmax, gives, in (z, y, x)
    box_shape = [hi - lo for lo, hi in box]
    resampled = resample_data_or_seg_to_shape(
        logits.numpy(),
        [box_shape[axis] for axis in transpose],
        [2.0, 2.5, 3.0],
        [spacing[a] for a in transpose],
        order=1,
    )
    expected = torch.softmax(torch.from_numpy(resampled), 0).numpy()
    expected = expected.transpose(0, *[int(a) + 1 for a in np.argsort(transpose)])
    np.testing.assert_allclose(probabilities[inside], expected, atol=1e-6)

"""ROI helpers: small-component removal by physical volume, boxes, margins in mm, crop/paste, ROI records."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_samflare.inference.io import InputError
from nnunet_samflare.inference.roi import (
    bounding_box,
    crop_image,
    crop_to_roi,
    expand_box_mm,
    load_roi_record,
    make_roi_record,
    paste_into_original,
    paste_roi,
    properties_from_roi_record,
    remove_small_components,
    roi_record_from_image,
    roi_record_from_properties,
    save_roi_record,
)

REF_SPACING = (2.0, 1.5, 1.5)  # the reference grid (z, y, x): 4.5 mm^3 per voxel, 8,000 voxels = 36 cm^3


def _block(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def test_threshold_is_8000_voxels_on_the_reference_grid():
    shape = (60, 60, 60)
    exactly = _block(shape, (0, 0, 0), (20, 20, 20))  # 8,000 voxels = 36,000 mm^3: kept
    one_less = _block(shape, (30, 30, 30), (20, 20, 20))
    one_less[30, 30, 30] = False  # 7,999 voxels: removed
    out = remove_small_components(exactly | one_less, REF_SPACING)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, exactly)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 3.0, 3.0), (2.5, 0.75, 0.75)])
def test_threshold_is_a_physical_volume_independent_of_spacing(spacing):
    """A 40 x 30 x 30 mm block (36 cm^3) survives and a 30 x 30 x 30 mm one (27 cm^3) does not, on any grid."""
    big = tuple(round(mm / s) for mm, s in zip((40.0, 30.0, 30.0), spacing))
    small = tuple(round(mm / s) for mm, s in zip((30.0, 30.0, 30.0), spacing))
    shape = (big[0] + 2, big[1] + small[1] + 5, big[2] + 2)
    big_mask = _block(shape, (1, 1, 1), big)
    small_mask = _block(shape, (1, big[1] + 3, 1), small)
    np.testing.assert_array_equal(remove_small_components(big_mask | small_mask, spacing), big_mask)
    if spacing != (1.0, 1.0, 1.0):
        # The same voxel counts on a finer grid are smaller objects: both go.
        assert not remove_small_components(big_mask | small_mask, (1.0, 1.0, 1.0)).any()


def test_small_components_use_6_connectivity_by_default():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels
    mask[4, 4, 4] = True  # corner contact only: a separate 6-component of 1 voxel
    out = remove_small_components(mask, (1.0, 1.0, 1.0), min_volume_mm3=2.0)
    assert out[2:4, 2:4, 2:4].all() and not out[4, 4, 4]
    out26 = remove_small_components(mask, (1.0, 1.0, 1.0), min_volume_mm3=2.0, connectivity=26)
    assert out26[4, 4, 4]


def test_bounding_box():
    assert bounding_box(np.zeros((4, 5, 6), dtype=bool)) is None
    mask = np.zeros((10, 12, 14), dtype=np.uint8)
    mask[2, 3, 4] = 1
    mask[5, 7, 13] = 3
    box = bounding_box(mask)
    assert box == [[2, 6], [3, 8], [4, 14]]
    assert all(type(v) is int for pair in box for v in pair)  # JSON-serialisable
    assert bounding_box(mask[5]) == [[7, 8], [13, 14]]  # other dimensionalities work too


def test_expand_box_mm_rounds_up_per_axis_and_clips():
    box = [[10, 20], [10, 20], [10, 20]]
    out = expand_box_mm(box, spacing_zyx=(2.5, 0.8, 1.0), margin_mm=10.0, shape=(100, 100, 100))
    assert out == [[6, 24], [0, 33], [0, 30]]  # 10/2.5 = 4, ceil(10/0.8) = 13 (clipped at 0), 10
    assert expand_box_mm(box, (1.0, 1.0, 1.0), 0.0, (30, 30, 30)) == box
    assert expand_box_mm(box, (1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (22, 30, 21)) == [[9, 21], [8, 22], [7, 21]]
    assert box == [[10, 20], [10, 20], [10, 20]]  # input untouched
    with pytest.raises(ValueError):
        expand_box_mm(box, (1.0, 1.0, 1.0), -1.0, (30, 30, 30))


def test_crop_and_paste_round_trip_3d_and_4d():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 9, 11, 13)).astype(np.float32)
    box = [[2, 7], [0, 11], [5, 9]]
    crop4 = crop_to_roi(image, box)
    crop3 = crop_to_roi(image[1], box)
    assert crop4.shape == (2, 5, 11, 4) and crop3.shape == (5, 11, 4)
    np.testing.assert_array_equal(crop3, image[1, 2:7, :, 5:9])

    pasted3 = paste_roi(crop3, box, image.shape[1:], fill=-1)
    inside = np.zeros(image.shape[1:], dtype=bool)
    inside[2:7, :, 5:9] = True
    np.testing.assert_array_equal(pasted3[inside], image[1][inside])
    assert (pasted3[~inside] == -1).all()

    pasted4 = paste_roi(crop4, box, image.shape[1:])  # spatial full shape: channels taken from the ROI
    assert pasted4.shape == image.shape and pasted4.dtype == image.dtype
    np.testing.assert_array_equal(pasted4[:, inside], image[:, inside])
    assert (pasted4[:, ~inside] == 0).all()

    with pytest.raises(ValueError):
        crop_to_roi(image, [[0, 10], [0, 11], [0, 13]])  # beyond the image
    with pytest.raises(ValueError):
        paste_roi(crop3, [[0, 4], [0, 11], [5, 9]], image.shape[1:])  # box size does not match


def _image(size=(13, 11, 9), spacing=(0.7, 0.9, 2.5)):
    array = np.arange(np.prod(size[::-1]), dtype=np.int16).reshape(size[::-1])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -20.0, 33.3))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    return image


def test_crop_image_keeps_world_position():
    image = _image()
    box = [[2, 7], [1, 10], [3, 12]]
    roi = crop_image(image, box)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(roi), crop_to_roi(sitk.GetArrayFromImage(image), box))
    assert roi.GetSpacing() == image.GetSpacing() and roi.GetDirection() == image.GetDirection()
    corner = image.TransformIndexToPhysicalPoint((3, 1, 2))  # (x, y, z) index of the box start
    assert roi.GetOrigin() == pytest.approx(corner)


def test_roi_record_json_round_trip_and_uncrop(tmp_path):
    image = _image()
    box = [[2, 7], [1, 10], [3, 12]]
    record = roi_record_from_image(box, image, case_id="c1", margin_mm=10.0)
    assert record["box_zyx"] == box and record["shape_zyx"] == [9, 11, 13] and record["size_xyz"] == [13, 11, 9]
    save_roi_record(record, tmp_path / "c1.json")
    assert [p.name for p in tmp_path.iterdir()] == ["c1.json"]
    loaded = load_roi_record(tmp_path / "c1.json")
    assert loaded == json.loads(json.dumps(record)) and loaded["case_id"] == "c1"

    props = properties_from_roi_record(loaded)
    assert props["sitk_stuff"]["spacing"] == pytest.approx(image.GetSpacing())
    assert props["sitk_stuff"]["origin"] == pytest.approx(image.GetOrigin())
    assert props["sitk_stuff"]["direction"] == pytest.approx(image.GetDirection())
    assert props["spacing"] == pytest.approx([2.5, 0.9, 0.7])
    assert roi_record_from_properties(box, [9, 11, 13], props, case_id="c1", margin_mm=10.0) == loaded

    roi_seg = np.full([hi - lo for lo, hi in box], 4, dtype=np.uint8)
    full = paste_into_original(roi_seg, loaded)
    assert full.shape == (9, 11, 13) and full.sum() == 4 * roi_seg.size and full[2:7, 1:10, 3:12].all()

    nothing = make_roi_record(None, [9, 11, 13], image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert not paste_into_original(np.zeros((0, 0, 0), np.uint8), nothing).any()


def test_load_roi_record_rejects_foreign_json(tmp_path):
    (tmp_path / "x.json").write_text('{"box": [[0, 1]]}', encoding="utf-8")
    with pytest.raises(InputError, match="x.json"):
        load_roi_record(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="y.json"):
        load_roi_record(tmp_path / "y.json")

"""Per-organ stats (volume in mL, mean HU) and the preview PNG (aspect ratio from the spacing, orientation)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from nnunet_samflare.inference.reports import LABEL_COLOURS, organ_stats, save_preview_png, save_stats_json

from conftest import data_file


def test_organ_stats_volumes_and_mean_hu():
    seg = np.zeros((10, 20, 30), dtype=np.uint8)
    image = np.full(seg.shape, -1000.0, dtype=np.float32)
    seg[2:6, 0:10, 0:10] = 1  # 400 voxels
    image[2:6, 0:10, 0:5] = 50.0
    image[2:6, 0:10, 5:10] = 70.0  # mean 60
    seg[8, 15, 25] = 14
    image[8, 15, 25] = 33.0
    stats = organ_stats(seg, image, spacing_zyx=(2.5, 0.8, 0.8))  # 1.6 mm^3 per voxel
    assert sorted(stats) == [1, 14]
    assert stats[1]["name"] == "liver" and stats[14]["name"] == "tumor"
    assert stats[1]["voxels"] == 400 and stats[1]["volume_ml"] == pytest.approx(400 * 1.6 / 1000)
    assert stats[1]["mean_hu"] == pytest.approx(60.0) and stats[14]["mean_hu"] == pytest.approx(33.0)
    assert organ_stats(seg[None], image[None], (2.5, 0.8, 0.8)) == stats  # nnU-Net's (1, z, y, x) layout
    no_image = organ_stats(seg, None, (1.0, 1.0, 1.0))
    assert no_image[1]["mean_hu"] is None and no_image[1]["volume_ml"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        organ_stats(seg, image[:, :, :5], (1.0, 1.0, 1.0))


def test_save_stats_json_is_loadable_and_atomic(tmp_path):
    seg = np.zeros((4, 4, 4), dtype=np.uint8)
    seg[0, 0, :2] = 3
    stats = organ_stats(seg, np.full(seg.shape, 40.0), (1.0, 1.0, 1.0))
    save_stats_json(stats, tmp_path / "case.json", case="case")
    assert [p.name for p in tmp_path.iterdir()] == ["case.json"]
    document = json.loads((tmp_path / "case.json").read_text(encoding="utf-8"))
    assert document["case"] == "case"
    assert document["labels"] == {"3": {"name": "spleen", "voxels": 2, "volume_ml": 0.002, "mean_hu": 40.0}}


def _png(path):
    from matplotlib.image import imread

    pixels = imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels[..., :3]


def _coloured_blob(pixels, colour, columns):
    """Bounding box (height, width) in pixels of the largest blob of overlay colour within the given columns."""
    gray = np.full(3, 0.4)  # the CT value 0 HU in the W400/L40 window
    blended = 0.5 * gray + 0.5 * np.asarray(colour)
    near = np.all(np.abs(pixels - blended) < 0.06, axis=-1)
    near[:, : columns.start] = False
    near[:, columns.stop :] = False
    labels, n = ndimage.label(near)
    assert n > 0, "overlay colour not found"
    biggest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    rows, cols = np.nonzero(labels == biggest)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, rows.mean()


def test_preview_keeps_physical_aspect_ratio(tmp_path):
    # A 60 mm ball on 5 x 1 x 1 mm voxels: 12 slices but 60 x 60 pixels in-plane. Drawn with the voxel spacing it
    # must look round in the coronal panel, not five times flatter.
    spacing = (5.0, 1.0, 1.0)
    z, y, x = np.meshgrid(np.arange(20) * 5.0, np.arange(100) * 1.0, np.arange(100) * 1.0, indexing="ij")
    ball = (z - 50) ** 2 + (y - 50) ** 2 + (x - 50) ** 2 <= 30**2
    seg = ball.astype(np.uint8) * 5
    image = np.zeros(seg.shape, dtype=np.float32)
    path = save_preview_png(image, seg, tmp_path / "preview.png", spacing_zyx=spacing, title="ball")
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]
    pixels = _png(path)
    half = pixels.shape[1] // 2
    for columns in (slice(0, half), slice(half, pixels.shape[1])):  # axial panel, coronal panel
        height, width, _ = _coloured_blob(pixels, LABEL_COLOURS[5], columns)
        assert height / width == pytest.approx(1.0, abs=0.1)


def test_preview_shows_superior_up_and_follows_direction(tmp_path):
    # Label only the upper (superior) half of a block; with the image's direction flipped along z the array is
    # stored upside down, and the preview must still put it at the top of the coronal panel.
    seg = np.zeros((40, 40, 40), dtype=np.uint8)
    image = np.zeros(seg.shape, dtype=np.float32)
    seg[0:40, 10:30, 10:30] = 1  # the whole block: the vertical reference
    seg[0:10, 10:30, 10:30] = 14  # array slices 0..9
    rows = {}
    for name, direction in (("plain", None), ("flipped", (1, 0, 0, 0, 1, 0, 0, 0, -1))):
        path = save_preview_png(image, seg, tmp_path / f"{name}.png", (1.0, 1.0, 1.0), direction=direction)
        pixels = _png(path)
        half = pixels.shape[1] // 2
        _, _, liver_row = _coloured_blob(pixels, LABEL_COLOURS[1], slice(half, pixels.shape[1]))
        _, _, tumor_row = _coloured_blob(pixels, LABEL_COLOURS[14], slice(half, pixels.shape[1]))
        rows[name] = tumor_row - liver_row  # negative: the tumor is drawn above the liver part
    # Plain: array slice 0 is the most inferior (LPS +z is superior), so the tumor is at the bottom.
    assert rows["plain"] > 0 and rows["flipped"] < 0


def test_preview_of_real_case(tmp_path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data_file("flare_like", "image", "TSEX_0001")))
    labels = sitk.ReadImage(str(data_file("flare_like", "label", "TSEX_0001")))
    path = save_preview_png(
        sitk.GetArrayFromImage(image),
        sitk.GetArrayFromImage(labels),
        tmp_path / "TSEX_0001.png",
        spacing_zyx=image.GetSpacing()[::-1],
        direction=image.GetDirection(),
        title="TSEX_0001",
    )
    pixels = _png(path)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05  # a real picture, not a blank canvas

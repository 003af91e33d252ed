"""``samflare predict --reference_pipeline`` against an independent transcription of docs/method.md §5.

``transcribed_pipeline`` below is written from the spec's steps alone, with numpy/scipy/torch (scipy's
``map_coordinates`` for the resampling, ``ndimage.label`` for every connected-component step, explicit window
arithmetic for the sliding window); it calls none of the product's helpers, only the networks' forward.

Fixed weights: the authors' state-dict layout filled with seeded random values (``test_interop``), the locator's
foreground bias set so that it finds one small region of the real CT.

The scan is TSEX_0001 (real CT) with two changes that keep MONAI's float64 rounding noise out of the comparison:
MONAI's resampling (which the product reproduces bit for bit) maps output voxel j to input index ``j · t / s``
through a chain of normalising matrices, so it lands a few 1e-15 voxels off where the exact value is a whole or
half voxel. A transcription from the spec cannot know that noise, and it matters in three places: (1) where the
exact index is a half-integer (3 mm slices to 2 mm and back) it picks the slice; (2) where interpolation weights
are 1/2 (3 mm to 1.5 mm) it rounds exact float32 midpoints; (3) on the first voxel plane, index 0 exactly, it
turns air next to tissue into 1e-14 instead of 0, which changes the nonzero set of the z-score. Hence a header
spacing of 2.7 × 2.7 × 2.4 mm (no half-integer indices, no dyadic weights) and a one-voxel soft-tissue frame
(the first planes are never air). (1) is pinned by ``test_half_voxel_ties_follow_monai`` with values measured on
MONAI 1.2.0; the product was compared with MONAI 1.2.0 itself on the unchanged scans (identical label maps).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from test_interop import random_reference_state_dict

from nnunet_samflare.cli import main
from nnunet_samflare.inference.api import predict
from nnunet_samflare.inference.reference_pipeline import resample_nearest, resampled_grid, window_starts
from nnunet_samflare.interop import convert_reference_state_dict
from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

from conftest import data_file

SPACING_XYZ = (2.7, 2.7, 2.4)
FRAME_HU = 40
LOCATOR_HEAD_BIAS = "to_segmentation.1.bias"  # the authors' name of the locator's class head bias


# ----------------------------------------------------------------------------------------------------------------
# docs/method.md §5, step by step (arrays in the reference's (x, y, z) voxel order)


def _zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    # MONAI's NormalizeIntensity(nonzero=True): torch float32 statistics, population std.
    t = torch.from_numpy(np.array(volume, dtype=np.float32))
    mask = t != 0
    values = t[mask]
    mean, std = values.mean().item(), values.std(unbiased=False).item()
    t[mask] = (values - mean) / (std if std != 0 else 1.0)
    return t.numpy()


def _box(mask: np.ndarray) -> list[tuple[int, int]] | None:
    if not mask.any():
        return None
    return [
        (
            int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))).min()),
            int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))).max()) + 1,
        )
        for k in range(3)
    ]


def _slices(box):
    return tuple(slice(lo, hi) for lo, hi in box)


def _phase1_input(image: np.ndarray, spacing: tuple[float, float, float]) -> dict:
    p5, p95 = (np.float32(np.percentile(image, q)) for q in (5, 95))  # step 2, whole volume
    scaled = np.clip((image - p5) / (p95 - p5) * np.float32(255), 0, 255)
    crop = _box(scaled > 0)  # step 3
    cropped = scaled[_slices(crop)]
    target = (1.5, 1.5, 2.0)  # step 4: first voxel kept, voxel j read at index j * t / s, linear, edge values
    shape = [int(np.round((n - 1) * s / t + 1)) for n, s, t in zip(cropped.shape, spacing, target)]
    axes = [np.arange(m) * (t / s) for m, s, t in zip(shape, spacing, target)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    step4 = ndimage.map_coordinates(cropped.astype(np.float64), coords, order=1, mode="nearest", prefilter=False)
    step5 = _zscore_nonzero(step4.astype(np.float32))
    step6 = F.interpolate(
        torch.from_numpy(step5)[None, None], size=(128, 128, 128), mode="trilinear", align_corners=False
    )
    return dict(crop=crop, cropped_shape=cropped.shape, step5=step5, step6=step6)


def _locator_mask(foreground128: torch.Tensor, shape) -> np.ndarray:
    """Steps 9-10: nearest back to the step-4 grid, 6-connected components under 8,000 voxels removed."""
    up = F.interpolate(foreground128[None, None].float(), size=tuple(shape), mode="nearest")[0, 0].numpy() > 0
    components, _ = ndimage.label(up)  # scipy's default structure: 6-connectivity
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return sizes[components] >= 8000


def _locator_foreground(locator, step6: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = locator(step6)[0]
    return torch.argmax(torch.softmax(logits, dim=0), dim=0)


def _starts(n: int) -> list[int]:
    # stride 48, the last window shifted to end at the border
    return [0] if n == 96 else list(range(0, n - 96, 48)) + [n - 96]


def _largest_component_per_organ(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for organ in range(1, 14):
        components, n = ndimage.label(labels == organ, structure=np.ones((3, 3, 3)))
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components > 0) & (components != np.argmax(sizes))] = 0
    return out


def _remove_isolated_tumors(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    if not (out == 14).any():
        return out
    dilated = ndimage.binary_dilation(out == 14, structure=np.ones((3, 3, 3)))
    regions, n = ndimage.label(dilated)
    for region in range(1, n + 1):
        inside = regions == region
        if set(np.unique(out[inside]).tolist()) == {0, 14}:
            out[inside] = 0
    return out


def transcribed_pipeline(image_zyx: np.ndarray, spacing_xyz, locator, segmenter) -> dict:
    image = np.ascontiguousarray(np.transpose(image_zyx, (2, 1, 0)), dtype=np.float32)
    p1 = _phase1_input(image, spacing_xyz)
    kept = _locator_mask(_locator_foreground(locator, p1["step6"]), p1["step5"].shape)
    roi = _box(kept)  # step 12, margin 0
    assert roi is not None, "the locator found nothing: the fixture's weights are wrong"
    # Steps 13-15. The authors' MONAI NormalizeIntensity of step 5 works in place, so the image cropped here is the
    # step-5 one (the same as cropping the 0-255 image up to float rounding).
    cropped = _zscore_nonzero(p1["step5"][_slices(roi)])
    padded = np.pad(cropped, [(0, max(96 - n, 0)) for n in cropped.shape])
    volume = torch.from_numpy(padded)
    total = torch.zeros((15, *padded.shape))
    count = torch.zeros(padded.shape)
    with torch.inference_mode():  # step 16, first axis slowest, logits averaged in float32
        for corner in itertools.product(*(_starts(n) for n in padded.shape)):
            window = tuple(slice(c, c + 96) for c in corner)
            total[(slice(None), *window)] += segmenter(volume[window].contiguous()[None, None])[0]
            count[window] += 1
    raw = torch.argmax(torch.softmax(total / count, dim=0), dim=0).numpy().astype(np.uint8)  # step 18
    organs_kept = _largest_component_per_organ(raw)  # step 19
    post = _remove_isolated_tumors(organs_kept)  # step 20
    step4 = np.zeros(p1["step5"].shape, dtype=np.uint8)  # step 21
    step4[_slices(roi)] = post[tuple(slice(0, n) for n in cropped.shape)]
    index = [
        np.clip(np.rint(np.arange(n) * (s / t)).astype(int), 0, m - 1)  # step 22
        for n, s, t, m in zip(p1["cropped_shape"], spacing_xyz, (1.5, 1.5, 2.0), step4.shape)
    ]
    full = np.zeros(image.shape, dtype=np.uint8)
    full[_slices(p1["crop"])] = step4[np.ix_(*index)]
    return dict(
        labels=np.ascontiguousarray(full.transpose(2, 1, 0)),
        roi=roi,
        step4_shape=step4.shape,
        raw=raw,
        organs_kept=organs_kept,
        post=post,
    )


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> sitk.Image:
    original = sitk.ReadImage(str(data_file("flare_like", "image", "TSEX_0001")))
    array = sitk.GetArrayFromImage(original)
    for axis in range(3):  # the one-voxel soft-tissue frame (module docstring)
        array[(slice(None),) * axis + ([0, -1],)] = FRAME_HU
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(original)
    image.SetSpacing(SPACING_XYZ)
    # As written to and read from NIfTI (float32 header fields), so that files and memory give the same scan.
    path = tmp_path_factory.mktemp("scan") / "TSEX_0001_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    return sitk.ReadImage(str(path))


def _networks(locator_sd: dict, segmenter_sd: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    locator, segmenter = PConvLocator(), SAMHybridUNet()
    locator.load_state_dict(convert_reference_state_dict(locator_sd, "locator"))
    segmenter.load_state_dict(convert_reference_state_dict(segmenter_sd, "segmenter"))
    return locator.eval(), segmenter.eval()


@pytest.fixture(scope="module")
def weights(scan, tmp_path_factory) -> dict:
    """The authors'-layout weight files; the locator's foreground bias is lowered until exactly one region of
    at least 8,000 voxels, small enough for one 96³ window, survives."""
    torch.set_num_threads(2)
    locator_sd = random_reference_state_dict("locator", seed=1)
    segmenter_sd = random_reference_state_dict("segmenter", seed=2)
    locator, _ = _networks(locator_sd, segmenter_sd)
    image = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(scan), (2, 1, 0)), dtype=np.float32)
    p1 = _phase1_input(image, scan.GetSpacing())
    with torch.inference_mode():
        logits = locator(p1["step6"])[0]
    margin = (logits[1] - logits[0]).numpy()
    for quantile in (0.999, 0.998, 0.997, 0.996, 0.995, 0.994, 0.993, 0.992, 0.991, 0.99):
        threshold = float(np.quantile(margin, quantile))
        roi = _box(_locator_mask(torch.from_numpy(margin > threshold), p1["step5"].shape))
        if roi is not None and all(hi - lo <= 96 for lo, hi in roi):
            break
    else:
        pytest.fail("no locator bias gives a non-empty ROI that fits one window")
    locator_sd[LOCATOR_HEAD_BIAS] = locator_sd[LOCATOR_HEAD_BIAS] - torch.tensor([0.0, threshold])
    folder = tmp_path_factory.mktemp("weights")
    files = {
        "locator": folder / "model_stage1.pth",
        "segmenter": folder / "model_stage2.pth",
        "segmenter_converted": folder / "segmenter_converted.pth",
    }
    torch.save(locator_sd, files["locator"])
    torch.save(segmenter_sd, files["segmenter"])
    torch.save(convert_reference_state_dict(segmenter_sd, "segmenter"), files["segmenter_converted"])
    files["networks"] = _networks(locator_sd, segmenter_sd)
    return files


@pytest.fixture(scope="module")
def expected(scan, weights) -> dict:
    return transcribed_pipeline(sitk.GetArrayFromImage(scan), scan.GetSpacing(), *weights["networks"])


# ----------------------------------------------------------------------------------------------------------------
# tests


def test_equals_the_transcription_voxel_for_voxel(scan, weights, expected):
    # The fixed weights exercise every step: a proper sub-box of the scan, several organs, post-processing at work.
    roi_size = [hi - lo for lo, hi in expected["roi"]]
    assert 0 < np.prod(roi_size) < 0.25 * np.prod(expected["step4_shape"]), expected["roi"]
    organs = set(np.unique(expected["labels"]).tolist()) & set(range(1, 14))
    assert len(organs) >= 3, organs
    assert (expected["organs_kept"] != expected["raw"]).any(), "largest-component step removed nothing"
    assert (expected["raw"] == 14).any()

    result = predict(
        scan,
        reference_pipeline=True,
        locator_weights=weights["locator"],
        segmenter_weights=weights["segmenter"],
        device="cpu",
    )
    labels = sitk.GetArrayFromImage(result)
    assert labels.dtype == np.uint8
    assert labels.shape == expected["labels"].shape
    assert int((labels != expected["labels"]).sum()) == 0
    assert result.GetSpacing() == scan.GetSpacing() and result.GetOrigin() == scan.GetOrigin()
    assert result.GetDirection() == scan.GetDirection()


def test_cli_files_in_files_out(scan, weights, expected, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(scan, str(inputs / "TSEX_0001_0000.mha"))  # the format is kept: .mha in, .mha out
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "-i",
            str(inputs),
            "-o",
            str(out),
            "--reference_pipeline",
            "--locator_weights",
            str(weights["locator"]),
            "--segmenter_weights",
            str(weights["segmenter_converted"]),
            "-device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["TSEX_0001.mha"]
    written = sitk.ReadImage(str(out / "TSEX_0001.mha"))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetSize() == scan.GetSize() and written.GetSpacing() == scan.GetSpacing()
    assert written.GetOrigin() == scan.GetOrigin() and written.GetDirection() == scan.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(written), expected["labels"])


def _cli_error(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_weights_and_flags_fail_before_writing(scan, weights, tmp_path, capsys):
    image = tmp_path / "TSEX_0001_0000.nii.gz"
    sitk.WriteImage(scan, str(image))
    out = tmp_path / "out"
    base = ["predict", "-i", str(image), "-o", str(out), "-device", "cpu"]
    missing = tmp_path / "nowhere.pth"
    cases = [
        (
            base
            + [
                "--reference_pipeline",
                "--locator_weights",
                str(missing),
                "--segmenter_weights",
                str(weights["segmenter"]),
            ],
            str(missing),
        ),
        # the phase-1 file where the phase-2 one belongs: named, and said what it is not
        (
            base
            + [
                "--reference_pipeline",
                "--locator_weights",
                str(weights["locator"]),
                "--segmenter_weights",
                str(weights["locator"]),
            ],
            f"{weights['locator']}: not the authors' segmenter",
        ),
        (base + ["--reference_pipeline", "--locator_weights", str(weights["locator"])], "--segmenter_weights"),
        # a flag of the nnU-Net cascade, which the fixed pipeline would ignore
        *(
            (
                base
                + [
                    "--reference_pipeline",
                    *flag,
                    "--locator_weights",
                    str(weights["locator"]),
                    "--segmenter_weights",
                    str(weights["segmenter"]),
                ],
                f"drop {flag[0]}",
            )
            for flag in (["-d", "501"], ["--fast"])
        ),
        (base + ["--locator_weights", str(weights["locator"])], "are for --reference_pipeline"),
    ]
    for argv, needle in cases:
        code, err = _cli_error(argv, capsys)
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists(), f"{argv} wrote {out}"
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint", encoding="utf-8")
    code, err = _cli_error(
        base
        + ["--reference_pipeline", "--locator_weights", str(text), "--segmenter_weights", str(weights["segmenter"])],
        capsys,
    )
    assert code == 2 and len(err.splitlines()) == 1 and str(text) in err and not out.exists()


def test_monai_window_and_grid_arithmetic():
    assert window_starts(96, 96) == [0]
    assert window_starts(150, 96) == [0, 48, 54]
    assert window_starts(144, 96) == [0, 48]
    assert window_starts(145, 96) == [0, 48, 49]
    for n in (96, 97, 143, 144, 145, 191, 192, 193, 300):
        assert window_starts(n, 96) == _starts(n)
    # size round((n - 1) s / t + 1), half to even; an axis within 1e-3 mm of the target keeps its spacing
    grid, size, unchanged = resampled_grid((122, 101, 112), (3.0, 3.0, 3.0))
    assert (grid, size, unchanged) == ([1.5, 1.5, 2.0], [243, 201, 168], False)
    assert resampled_grid((10, 10, 12), (3.0, 3.0, 3.0))[1][2] == 18  # 11 · 1.5 + 1 = 17.5
    assert resampled_grid((10, 10, 10), (3.0, 3.0, 3.0))[1][2] == 14  # 9 · 1.5 + 1 = 14.5
    assert resampled_grid((5, 5, 5), (1.5, 1.5005, 2.0)) == ([1.5, 1.5005, 2.0], [5, 5, 5], True)


def test_half_voxel_ties_follow_monai():
    """Output slice j of a 3 mm (5 mm) scan maps to 2 mm slice 1.5 j (2.5 j); where that is a half-integer MONAI
    1.2.0's float64 affine algebra, not the exact value, picks the slice. Slices where it rounded up, measured
    with MONAI 1.2.0's SpatialResample (nearest, border, align_corners False, float64)."""
    monai_rounds_up = {
        (3.0, 112, 168): [53, 57, 77, 81, 85, 89, 93, 97, 105, 109],
        (5.0, 40, 98): [1, 3, 5, 7, 9, 11, 15, 19, 21, 23],
    }
    for (slice_mm, n, m), up in monai_rounds_up.items():
        source = torch.arange(m).reshape(1, 1, m)
        taken = resample_nearest(source, (1.5, 1.5, 2.0), (1.5, 1.5, slice_mm), (1, 1, n))[0, 0].numpy()
        exact = np.arange(n) * slice_mm / 2.0
        ties = exact % 1 == 0.5
        assert ties.sum() > 10
        assert np.array_equal(taken[~ties], np.rint(exact[~ties]))
        assert sorted(np.flatnonzero(ties & (taken == np.ceil(exact)))) == up
        assert np.all(taken[ties & (taken != np.ceil(exact))] == np.floor(exact[ties & (taken != np.ceil(exact))]))

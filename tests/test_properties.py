"""Property-based tests of the whole predict path (hypothesis, toy models): whatever the size (1 voxel, below a
patch), spacing, origin, direction (oblique, flipped, left-handed), pixel type and file format, ``samflare
predict`` and the Python API either write a label map with exactly the input's geometry and labels in the label
set, or refuse with a one-line bad-input error; never a traceback, never a partial file.

A fixed, derandomized profile keeps the example counts affordable in CI (each example well under a second).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import LABELS, make_tiny_models

from nnunet_samflare.cli import main
from nnunet_samflare.errors import EXIT_BAD_INPUT, InputError
from nnunet_samflare.inference.api import build_predictor, predict
from nnunet_samflare.io import TEMP_PREFIX

PROFILE = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LABEL_SET = set(LABELS.values())
PIXEL_TYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]
ENDINGS = [".nii.gz", ".nii", ".mha", ".nrrd"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def predictor(models):
    return build_predictor(locator=models[0], segmenter=models[1], device="cpu")


def rotation(angles, flips, swap) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    matrix = rz @ ry @ rx @ np.diag(flips)  # a flip of one or three axes makes it left-handed
    return matrix[:, [1, 0, 2]] if swap else matrix


@st.composite
def scans(draw) -> sitk.Image:
    size = [draw(st.integers(1, 20)) for _ in range(3)]  # 1 voxel up to above the toy models' 16³ patch
    dtype = draw(st.sampled_from(PIXEL_TYPES))
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    low, high = (max(info.min, -1024), min(info.max, 3000)) if info else (-1024.0, 3000.0)
    values = np.random.default_rng(draw(st.integers(0, 2**16))).uniform(low, high, size[::-1]).astype(dtype)
    image = sitk.GetImageFromArray(values)
    # up to the segmenter's 4 mm: a scan is then at most 20³ on its grid, a handful of the toy models' tiles
    image.SetSpacing([draw(st.floats(0.3, 4.0)) for _ in range(3)])
    image.SetOrigin([draw(st.floats(-500, 500)) for _ in range(3)])
    if draw(st.booleans()):
        angles = [draw(st.floats(-np.pi, np.pi)) for _ in range(3)]
        flips = [draw(st.sampled_from([1, -1])) for _ in range(3)]
        image.SetDirection(rotation(angles, flips, draw(st.booleans())).ravel().tolist())
    return image


def assert_label_map_of(result: sitk.Image, source: sitk.Image) -> None:
    assert result.GetSize() == source.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(result.GetOrigin(), source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(result.GetDirection(), source.GetDirection(), atol=1e-5)
    assert set(np.unique(sitk.GetArrayViewFromImage(result)).tolist()) <= LABEL_SET


@PROFILE
@given(image=scans())
def test_api_gives_a_label_map_in_the_input_geometry_or_a_bad_input_error(predictor, image):
    try:
        result = predict(image, predictor=predictor)
    except InputError as error:
        assert "\n" not in str(error)
        return
    assert_label_map_of(result, image)


@PROFILE
@given(image=scans(), ending=st.sampled_from(ENDINGS))
def test_cli_writes_a_label_map_in_the_input_geometry_or_refuses_in_one_line(
    models, tmp_path_factory, capsys, image, ending
):
    folder = tmp_path_factory.mktemp("case")
    source = folder / f"scan_0000{ending}"
    sitk.WriteImage(image, str(source))
    written = sitk.ReadImage(str(source))  # what the format kept (e.g. NIfTI's float32 geometry)
    out = folder / "out"
    code = main(
        [
            "predict",
            "-i",
            str(source),
            "-o",
            str(out),
            "--locator",
            str(models[0]),
            "--segmenter",
            str(models[1]),
            "-device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert not list(out.glob(f"{TEMP_PREFIX}*")) if out.exists() else True
    if code == 0:
        assert_label_map_of(sitk.ReadImage(str(out / f"scan{ending}")), written)
    else:
        assert code == EXIT_BAD_INPUT and len(err) == 1, err
        assert not out.exists() or not list(out.glob(f"scan{ending}"))

"""Input discovery, reading (nnU-Net SimpleITKIO-compatible), validation of bad inputs, DICOM series, and
atomic output writing."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_samflare.io import (
    TEMP_PREFIX,
    Case,
    InputError,
    check_num_channels,
    find_cases,
    read_case,
    read_label_map,
    remove_stale_temporaries,
    write_image_atomic,
    write_json_atomic,
    write_seg_atomic,
    writing,
)

from conftest import data_file
from image_factory import make_bad_input, truncate, write_dicom_series

CT = data_file("flare_like", "image", "TSEX_0002")  # 122 x 101 x 30, 3 mm, int16 HU, RAS on disk


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _small_image(shape_zyx=(4, 5, 6), value=0, dtype=np.int16, spacing=(0.7, 0.8, 2.5)):
    image = sitk.GetImageFromArray(np.full(shape_zyx, value, dtype=dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((1.0, -2.0, 3.0))
    return image


def _write(image, path):
    sitk.WriteImage(image, str(path), True)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# find_cases


def test_find_cases_in_an_image_folder(tmp_path):
    img = _small_image()
    for name in ["a_0000.nii.gz", "b.mha", "c_0000.nrrd", "c_0001.nrrd", "d.nii", "liver_0007.nii.gz"]:
        _write(img, tmp_path / name)
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")
    _write(img, tmp_path / f"{TEMP_PREFIX}123-e.nii.gz")  # a killed run's leftover: not a case
    cases = {c.case_id: c for c in find_cases(tmp_path)}
    assert sorted(cases) == ["a", "b", "c", "d", "liver_0007"]
    assert {k: c.output_name for k, c in cases.items()} == {
        "a": "a.nii.gz",
        "b": "b.mha",
        "c": "c.nrrd",
        "d": "d.nii",
        "liver_0007": "liver_0007.nii.gz",  # no _0000 sibling: a plain name, kept whole
    }
    assert [f.name for f in cases["c"].files] == ["c_0000.nrrd", "c_0001.nrrd"] and cases["c"].channels == (0, 1)
    assert not any(c.is_dicom for c in cases.values())


def test_find_cases_single_file_and_duplicates(tmp_path):
    path = _write(_small_image(), tmp_path / "case7_0000.mha")
    (case,) = find_cases(path)
    assert (case.case_id, case.output_name, case.files) == ("case7", "case7.mha", (path,))
    _write(_small_image(), tmp_path / "case7.nii.gz")
    with pytest.raises(InputError, match="case7"):
        find_cases(tmp_path)  # two files claim case id "case7"
    with pytest.raises(InputError, match="no such file"):
        find_cases(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no images"):
        find_cases(tmp_path / "empty_dir")


def test_check_num_channels(tmp_path):
    img = _small_image()
    for name in ["x_0000.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz", "y_0002.nii.gz"]:
        _write(img, tmp_path / name)
    cases = {c.case_id: c for c in find_cases(tmp_path)}
    check_num_channels(cases["x"], 2)
    with pytest.raises(InputError) as e:
        check_num_channels(cases["x"], 1)
    message = str(e.value)
    assert "\n" not in message and "x_0000.nii.gz" in message and "expects 1" in message and "found 2" in message
    with pytest.raises(InputError, match="_0000, _0002"):
        check_num_channels(cases["y"], 2)  # a gap: channel 1 missing


# ---------------------------------------------------------------------------------------------------------------
# read_case


def test_read_case_matches_nnunet_simpleitkio_and_leaves_input_alone():
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    before = _sha(CT)
    (case,) = find_cases(CT)
    data, props = read_case(case)
    ref_data, ref_props = SimpleITKIO().read_images([str(CT)])
    assert data.dtype == np.float32 and data.shape == ref_data.shape == (1, 30, 101, 122)
    np.testing.assert_array_equal(data, ref_data)
    assert props == ref_props
    assert set(props) == {"sitk_stuff", "spacing"} and set(props["sitk_stuff"]) == {"spacing", "origin", "direction"}
    assert _sha(CT) == before


def test_read_case_from_memory_and_multichannel(tmp_path):
    image = _small_image(value=7)
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    data, props = read_case(image)
    assert data.shape == (1, 4, 5, 6) and (data == 7).all()
    assert props["spacing"] == [2.5, 0.8, 0.7] and props["sitk_stuff"]["direction"] == (0, 1, 0, 1, 0, 0, 0, 0, -1)

    _write(_small_image(value=1), tmp_path / "m_0000.nii.gz")
    _write(_small_image(value=2), tmp_path / "m_0001.nii.gz")
    (case,) = find_cases(tmp_path)
    data, _ = read_case(case)
    assert data.shape == (2, 4, 5, 6) and (data[0] == 1).all() and (data[1] == 2).all()

    _write(_small_image(shape_zyx=(4, 5, 7)), tmp_path / "m_0001.nii.gz")
    with pytest.raises(InputError, match="m_0001.nii.gz.*size"):
        read_case(find_cases(tmp_path)[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line InputError naming the file


EXPECTED_CAUSE = {
    "2d": "2-D",
    "4d": "4-D",
    "vector": "vector image",
    "empty": "empty file",
    "truncated_nii_gz": "truncated",
    "truncated_nii": "truncated",
    "truncated_mha": "cannot read",
    "garbage": "cannot read",
    "nan": "1 NaN",
    "inf": "1 inf",
    "nan_mha": "1 NaN",
}
BAD_KINDS = list(EXPECTED_CAUSE)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_gives_one_line_error_naming_the_file(kind, tmp_path):
    path = make_bad_input(kind, tmp_path)
    before = _sha(path)
    with pytest.raises(InputError) as e:
        (case,) = find_cases(path)
        read_case(case)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert EXPECTED_CAUSE[kind] in message, message
    assert isinstance(e.value, ValueError)  # the CLI turns ValueErrors into one line and exit code 2
    assert _sha(path) == before


def test_in_memory_bad_image_is_named():
    with pytest.raises(InputError, match=r"^scan A: 2-D image"):
        read_case(sitk.Image(8, 8, sitk.sitkFloat32), name="scan A")


def test_read_label_map_rejects_fractional_labels(tmp_path):
    _write(sitk.GetImageFromArray(np.full((3, 3, 3), 1.5, dtype=np.float32)), tmp_path / "frac.nii.gz")
    with pytest.raises(InputError, match="frac.nii.gz: label map has non-integer"):
        read_label_map(tmp_path / "frac.nii.gz")


# ---------------------------------------------------------------------------------------------------------------
# DICOM


def _assert_same_volume(data, props, image):
    np.testing.assert_array_equal(data[0], sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(props["sitk_stuff"]["spacing"], image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(props["sitk_stuff"]["origin"], image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(props["sitk_stuff"]["direction"], image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(props["spacing"], image.GetSpacing()[::-1], atol=1e-5)


def test_dicom_series_reads_back_like_the_nifti(tmp_path):
    nifti = sitk.ReadImage(str(CT))
    assert nifti.GetPixelID() == sitk.sitkInt16
    folder = write_dicom_series(nifti, tmp_path / "patient1", "1.2.826.0.1.3680043.8.498.2")
    (case,) = find_cases(folder)
    assert case.is_dicom and case.case_id == "patient1" and case.output_name == "patient1.nii.gz"
    assert len(case.files) == nifti.GetDepth()
    data, props = read_case(case)
    ref_data, ref_props = read_case(CT)
    np.testing.assert_array_equal(data, ref_data)
    _assert_same_volume(data, props, nifti)


def _rotation_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "direction",
    [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0), _rotation_z(20)],
    ids=["identity", "permuted", "oblique"],
)
def test_dicom_geometry_round_trip_anisotropic(tmp_path, direction):
    # Same voxels, but distinct x/y/z spacings and other orientations, so that any axis mix-up shows.
    image = sitk.ReadImage(str(CT))
    image.SetSpacing((0.7, 0.85, 2.5))
    image.SetDirection(direction)
    folder = write_dicom_series(image, tmp_path / "aniso", "1.2.826.0.1.3680043.8.498.3")
    data, props = read_case(find_cases(folder)[0])
    _assert_same_volume(data, props, image)


def test_folder_with_two_series_gives_two_cases_and_subfolders_are_scanned(tmp_path):
    image = sitk.ReadImage(str(CT))[:, :, :6]
    folder = tmp_path / "study"
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.8.498.10", series_number=2)
    shifted = sitk.Cast(image + 100, sitk.sitkInt16)
    shifted.CopyInformation(image)
    writer_dir = tmp_path / "tmp_series"
    write_dicom_series(shifted, writer_dir, "1.2.826.0.1.3680043.8.498.11", series_number=5)
    for f in writer_dir.iterdir():
        shutil.move(str(f), folder / f"B_{f.name}")
    cases = find_cases(folder)
    assert [c.case_id for c in cases] == ["study_series2", "study_series5"]
    assert [c.output_name for c in cases] == ["study_series2.nii.gz", "study_series5.nii.gz"]
    first, second = (read_case(c)[0] for c in cases)
    np.testing.assert_array_equal(second - first, 100)

    root = tmp_path / "root"
    write_dicom_series(image, root / "p1", "1.2.826.0.1.3680043.8.498.20")
    write_dicom_series(image, root / "p2", "1.2.826.0.1.3680043.8.498.21")
    assert [c.case_id for c in find_cases(root)] == ["p1", "p2"]


def test_unreadable_dicom(tmp_path):
    image = sitk.ReadImage(str(CT))[:, :, :8]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(3):
        (garbage / f"{i}.dcm").write_bytes(os.urandom(600))
    with pytest.raises(InputError, match=r"garbage: unreadable DICOM"):
        find_cases(garbage)

    damaged = write_dicom_series(image, tmp_path / "damaged", "1.2.826.0.1.3680043.8.498.30")
    truncate(damaged / "IM0004.dcm", damaged / "IM0004.dcm")  # GDCM would silently drop this slice
    with pytest.raises(InputError, match=r"damaged: unreadable DICOM.*IM0004.dcm"):
        find_cases(damaged)

    gap = write_dicom_series(image, tmp_path / "gap", "1.2.826.0.1.3680043.8.498.31")
    (gap / "IM0003.dcm").unlink()  # a missing slice: ITK would stack the rest as if evenly spaced
    (case,) = find_cases(gap)
    with pytest.raises(InputError) as e:
        read_case(case)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{gap}: unreadable DICOM series")


# ---------------------------------------------------------------------------------------------------------------
# Atomic writing


def _file_format(path):
    """What the bytes on disk are, whatever the name says."""
    import gzip

    head = Path(path).read_bytes()[:16]
    if head.startswith(b"\x1f\x8b"):
        with gzip.open(path, "rb") as f:
            return "nifti-gz" if f.read(348)[344:347] == b"n+1" else "gzip"
    if head.startswith(b"ObjectType"):
        return "metaimage"
    if head.startswith(b"NRRD"):
        return "nrrd"
    return "unknown"


@pytest.mark.parametrize("ending,file_format", [(".nii.gz", "nifti-gz"), (".mha", "metaimage"), (".nrrd", "nrrd")])
def test_write_seg_atomic_keeps_geometry_and_format(tmp_path, ending, file_format):
    image = _small_image()
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    _, props = read_case(image)
    seg = np.zeros((4, 5, 6), dtype=np.int64)
    seg[1:3, 2:4, 3:5] = 14
    out = tmp_path / "sub" / f"case{ending}"
    write_seg_atomic(seg, props, out)
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert _file_format(out) == file_format  # the temporary kept the real extension, so SimpleITK chose the format
    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), seg)
    assert written.GetSpacing() == pytest.approx(image.GetSpacing())
    assert written.GetOrigin() == pytest.approx(image.GetOrigin())
    assert written.GetDirection() == pytest.approx(image.GetDirection())


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "case.nii.gz"
    out.write_bytes(b"previous result")
    seen = []

    def crashing_write(image, path, *args):
        seen.append(Path(path))
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writing.sitk, "WriteImage", crashing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image_atomic(_small_image(), out)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith("case.nii.gz")
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_remove_stale_temporaries_and_json(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}abc-case.nii.gz").write_bytes(b"x")
    (tmp_path / "done.nii.gz").write_bytes(b"y")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f"{TEMP_PREFIX}abc-case.nii.gz"]
    assert [p.name for p in tmp_path.iterdir()] == ["done.nii.gz"]
    # only the temporaries of the given outputs: another writer's in the same folder stay
    for name in ("a.nii.gz", "a_stats.json", "b.nii.gz", "b-c.npz"):
        (tmp_path / f"{TEMP_PREFIX}0123456789ab-{name}").write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, {"a.nii.gz", "a_stats.json", "b-c.npz"})
    assert sorted(p.name[len(TEMP_PREFIX) + 13 :] for p in removed) == ["a.nii.gz", "a_stats.json", "b-c.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{TEMP_PREFIX}0123456789ab-b.nii.gz", "done.nii.gz"]
    write_json_atomic({"a": [1, 2]}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text(encoding="utf-8").startswith("{")


def test_input_error_is_picklable():
    import pickle

    error = pickle.loads(pickle.dumps(InputError("/data/x.nii.gz", "empty file (0 bytes)")))
    assert str(error) == "/data/x.nii.gz: empty file (0 bytes)" and error.path == "/data/x.nii.gz"
    assert Case("a", (Path("a.nii.gz"),), "a.nii.gz").source == Path("a.nii.gz")


@pytest.mark.parametrize("top_label", [14, 300])
def test_in_memory_label_map_equals_what_nnunets_writer_writes(tmp_path, top_label):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_samflare.io import nnunet_properties, seg_to_image

    image = _small_image()
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    seg = np.zeros((4, 5, 6), dtype=np.int64)
    seg[1, 2, 3] = top_label
    properties = nnunet_properties(image)
    SimpleITKIO().write_seg(seg, str(tmp_path / "stock.nii.gz"), properties)
    stock, ours = sitk.ReadImage(str(tmp_path / "stock.nii.gz")), seg_to_image(seg, properties)
    assert ours.GetPixelID() == stock.GetPixelID() == (sitk.sitkUInt8 if top_label < 255 else sitk.sitkUInt16)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(stock))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(ours, get)() == pytest.approx(getattr(stock, get)())

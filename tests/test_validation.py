"""Fail early, fail clearly (issue 7): each numbered defect has its regression test here, then the per-case
validation of folder inputs, the error classes and determinism, all with the toy models of ``tiny_models``."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_models import make_tiny_models

from nnunet_samflare.cli import main
from nnunet_samflare.errors import EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, InputError
from nnunet_samflare.inference import api
from nnunet_samflare.io import TEMP_PREFIX, atomic_output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def cli(models):
    """``samflare predict`` in this process with the toy models; returns (exit code, stderr lines)."""

    def run(capsys, *args: str) -> tuple[int, list[str]]:
        code = main(["predict", *args, "--locator", str(models[0]), "--segmenter", str(models[1]), "-device", "cpu"])
        return code, capsys.readouterr().err.strip().splitlines()

    return run


def scan(shape_zyx=(12, 14, 16), spacing=(3.0, 3.0, 3.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(0, 300, shape_zyx).astype(np.int16))
    image.SetSpacing(spacing)
    return image


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def zero_spacing_nifti(path: Path) -> Path:
    """A NIfTI whose header says pixdim[1..3] = 0 (ITK reads it as 1 mm and only prints a warning)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name("plain.nii")
    sitk.WriteImage(scan(), str(plain))
    header = bytearray(plain.read_bytes())
    plain.unlink()
    header[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    path.write_bytes(gzip.compress(bytes(header)))
    return path


def never(*args, **kwargs):
    raise AssertionError("reached although the input should have been refused first")


# ---------------------------------------------------------------------------------------------------------------
# The five defects


def test_1_zero_spacing_is_refused_naming_the_file(cli, capsys, tmp_path):
    bad = zero_spacing_nifti(tmp_path / "in" / "zero_0000.nii.gz")
    assert sitk.ReadImage(str(bad)).GetSpacing() == (1.0, 1.0, 1.0)  # what ITK makes of it
    code, err = cli(capsys, "-i", str(bad), "-o", str(tmp_path / "out"))
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert str(bad) in err[0] and "spacing" in err[0]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_2_implausible_spacing_is_refused_with_the_numbers_before_reading(cli, capsys, tmp_path, monkeypatch):
    bad = write(scan(spacing=(100.0, 100.0, 100.0)), tmp_path / "in" / "huge_0000.nii.gz")
    monkeypatch.setattr(api, "read_case", never)
    code, err = cli(capsys, "-i", str(bad), "-o", str(tmp_path / "out"))
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert str(bad) in err[0] and "implausible voxel spacing (100, 100, 100)" in err[0]


def test_2_grids_that_would_not_fit_memory_are_refused_with_the_numbers_before_reading(
    cli, capsys, tmp_path, monkeypatch
):
    # 20 mm voxels are plausible, but the segmenter's 4 mm grid of this scan is 320³ voxels of 15 classes
    big = write(scan(shape_zyx=(64, 64, 64), spacing=(20.0, 20.0, 20.0)), tmp_path / "in" / "big_0000.nii.gz")
    monkeypatch.setattr(api, "read_case", never)
    monkeypatch.setenv("SAMFLARE_MAX_MEMORY_GB", "1")
    code, err = cli(capsys, "-i", str(big), "-o", str(tmp_path / "out"))
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert "too large to process" in err[0] and "320x320x320 at (4, 4, 4) mm" in err[0]
    assert "more than the 1 GiB available" in err[0]


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder no file can be created in, also for root (which ignores permission bits): immutable."""
    folder = tmp_path / "locked"
    folder.mkdir()
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_3_unwritable_output_folder_is_found_before_any_work(cli, capsys, tmp_path, unwritable_folder, monkeypatch):
    good = write(scan(), tmp_path / "in" / "a_0000.nii.gz")
    monkeypatch.setattr(api, "build_predictor", never)
    code, err = cli(capsys, "-i", str(good), "-o", str(unwritable_folder))
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert str(unwritable_folder) in err[0] and "cannot be written" in err[0]


def test_3_a_failing_clean_up_never_masks_the_original_error(tmp_path, monkeypatch):
    def unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(RuntimeError, match="disk full") as caught:
        with atomic_output(tmp_path / "case.nii.gz") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert any("could not be removed" in note for note in getattr(caught.value, "__notes__", []))


@pytest.mark.parametrize("where", ["same", "inside"])
def test_4_output_folder_equal_to_or_inside_the_input_folder_is_refused(cli, capsys, tmp_path, where):
    images = tmp_path / "images"
    write(scan(), images / "a_0000.nii.gz")
    before = sorted(p.name for p in images.rglob("*"))
    out = images if where == "same" else images / "predictions"
    code, err = cli(capsys, "-i", str(images), "-o", str(out))
    assert code == EXIT_BAD_INPUT and len(err) == 1, err
    assert "input folder" in err[0]
    assert sorted(p.name for p in images.rglob("*")) == before  # nothing written, not even the sub-folder


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        MemoryError("Unable to allocate 51.2 GiB for an array"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
    ids=["cuda", "numpy", "cpu_allocator"],
)
def test_5_out_of_memory_has_its_own_message_and_exit_code(cli, capsys, tmp_path, monkeypatch, error):
    from nnunet_samflare.inference.cascade import CascadePredictor

    def predict_case(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(CascadePredictor, "predict_case", predict_case)
    good = write(scan(), tmp_path / "in" / "a_0000.nii.gz")
    code, err = cli(capsys, "-i", str(good), "-o", str(tmp_path / "out"))
    assert code == EXIT_OUT_OF_MEMORY and len(err) == 1, err
    assert "out of memory" in err[0] and "--tile_batch 1" in err[0] and "-device cpu" in err[0]


def test_5_a_bug_keeps_its_traceback(cli, capsys, tmp_path, monkeypatch):
    from nnunet_samflare.inference.cascade import CascadePredictor

    def predict_case(self, *args, **kwargs):
        raise RuntimeError("an internal inconsistency")

    monkeypatch.setattr(CascadePredictor, "predict_case", predict_case)
    good = write(scan(), tmp_path / "in" / "a_0000.nii.gz")
    with pytest.raises(RuntimeError, match="internal inconsistency"):
        cli(capsys, "-i", str(good), "-o", str(tmp_path / "out"))


def test_5_numpys_array_memory_error_counts_as_out_of_memory():
    from nnunet_samflare.errors import exit_code_for

    try:
        np.empty((2**62,), dtype=np.uint8)
    except MemoryError as error:  # numpy's _ArrayMemoryError
        assert "Unable to allocate" in str(error)
        assert exit_code_for(error) == EXIT_OUT_OF_MEMORY


# ---------------------------------------------------------------------------------------------------------------
# One validation step per case; folders go on past a bad case


def test_a_bad_case_does_not_stop_the_others_and_the_summary_lists_it(cli, capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    zero_spacing_nifti(images / "a_0000.nii.gz")
    write(scan(seed=1), images / "b_0000.nii.gz")
    write(scan(spacing=(100.0, 100.0, 100.0)), images / "c_0000.nii.gz")
    write(scan(seed=2), images / "d_0000.nii.gz")
    out = tmp_path / "out"
    code, err = cli(capsys, "-i", str(images), "-o", str(out))
    assert code == EXIT_BAD_INPUT
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["b.nii.gz", "d.nii.gz"]
    assert err[0].startswith("samflare predict: error: a: ") and "spacing" in err[0]
    assert err[1].startswith("samflare predict: error: c: ") and "implausible" in err[1]
    assert err[-1] == "samflare predict: error: 2 of 4 case(s) failed: a, c"
    assert not list(out.glob(f"{TEMP_PREFIX}*"))
    # --fail-fast: the first bad case stops the run before any model work
    shutil.rmtree(out)
    code, err = cli(capsys, "-i", str(images), "-o", str(out), "--fail-fast")
    assert code == EXIT_BAD_INPUT and len(err) == 1 and "a_0000.nii.gz" in err[0]
    assert not list(out.glob("*.nii.gz"))


def test_every_folder_entry_point_validates_case_by_case(models, tmp_path, capsys):
    labels = tmp_path / "labels"
    for name, seed in (("a", 0), ("b", 1)):
        seg = sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 3, (8, 9, 10)).astype(np.uint8))
        write(seg, labels / f"{name}.nii.gz")
    zero_spacing_nifti(labels / "c.nii.gz")
    code = main(["postprocess", "-i", str(labels), "-o", str(tmp_path / "pp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and err[-1].endswith("1 of 3 case(s) failed: c.nii.gz"), err
    assert sorted(p.name for p in (tmp_path / "pp").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    # evaluate: the bad pair is listed and left out of the means, the others are scored
    code = main(["evaluate", str(labels), str(tmp_path / "pp"), "-o", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "c: " in err and "1 of 3 case(s) could not be scored" in err
    import json

    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert set(metrics["cases"]) == {"a", "b"} and set(metrics["summary"]["failed_cases"]) == {"c"}
    # locate refuses the same output-folder mistakes as predict
    code = main(
        [
            "locate",
            "-i",
            str(labels),
            "-o",
            str(labels / "roi"),
            "--locator",
            str(models[0]),
            "--segmenter",
            str(models[1]),
            "-device",
            "cpu",
        ]
    )
    assert code == EXIT_BAD_INPUT and "inside the input folder" in capsys.readouterr().err


def test_the_python_api_validates_in_memory_images_before_any_model_work(models, monkeypatch):
    monkeypatch.setattr(api, "build_predictor", never)
    with pytest.raises(ValueError, match="implausible voxel spacing"):
        api.predict(scan(spacing=(0.001, 1.0, 1.0)), locator=models[0], segmenter=models[1], device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Determinism on CPU


def test_same_input_same_labels_bit_for_bit_across_runs_and_continue_prediction(cli, capsys, tmp_path):
    images = tmp_path / "images"
    for i in range(2):
        write(scan(shape_zyx=(20, 24, 22), seed=i), images / f"case{i}_0000.nii.gz")
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(capsys, "-i", str(images), "-o", str(first))[0] == 0
    assert cli(capsys, "-i", str(images), "-o", str(second))[0] == 0
    (second / "case1.nii.gz").unlink()  # as if the run had been killed before this case
    assert cli(capsys, "-i", str(images), "-o", str(second), "--continue_prediction")[0] == 0
    for i in range(2):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(first / f"case{i}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / f"case{i}.nii.gz")))
        np.testing.assert_array_equal(a, b)


def test_a_part_resuming_clears_only_the_leftovers_of_its_own_cases(cli, capsys, tmp_path):
    # The parts of one prediction may run at once in one folder (samflare pseudolabel run's predict_parts.sh).
    images = tmp_path / "images"
    for i in range(2):
        write(scan(seed=i), images / f"case{i}_0000.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    in_flight = out / f"{TEMP_PREFIX}0123456789ab-case0.npz"  # part 0 is writing case0 right now
    left_behind = out / f"{TEMP_PREFIX}ba9876543210-case1_stats.json"  # a killed part 1 left this
    in_flight.write_bytes(b"x")
    left_behind.write_bytes(b"y")
    args = ["-i", str(images), "-o", str(out), "--continue_prediction", "--num_parts", "2", "--part_id", "1"]
    assert cli(capsys, *args)[0] == 0
    assert in_flight.exists() and not left_behind.exists()
    assert (out / "case1.nii.gz").is_file() and not (out / "case0.nii.gz").exists()


def test_locate_validates_every_case_before_loading_the_models(models, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    write(scan(seed=3), images / "a_0000.nii.gz")
    zero_spacing_nifti(images / "b_0000.nii.gz")
    args = [
        "locate",
        "-i",
        str(images),
        "-o",
        str(tmp_path / "roi"),
        "--locator",
        str(models[0]),
        "--segmenter",
        str(models[1]),
        "-device",
        "cpu",
    ]
    with monkeypatch.context() as patch:  # only a bad case: refused before any model is loaded
        patch.setattr(api, "build_predictor", never)
        assert main([*args, "--fail-fast"]) == EXIT_BAD_INPUT
    assert "b_0000.nii.gz" in capsys.readouterr().err
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("1 of 2 case(s) failed: b")
    assert sorted(p.name for p in (tmp_path / "roi").glob("*.json")) == ["a.json"]


def test_a_scan_thinner_than_half_a_model_voxel_is_refused(models):
    # found by the property tests: 0.3 mm along z has no voxel on the locator's 8 mm grid
    with pytest.raises(ValueError, match="too thin for the locator: 0.3 mm along z"):
        api.predict(
            scan(shape_zyx=(1, 6, 6), spacing=(4.0, 4.0, 0.3)), locator=models[0], segmenter=models[1], device="cpu"
        )


# ---------------------------------------------------------------------------------------------------------------
# Found in review (2026-12-07)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--margin_mm", "-5", "must be a finite number of mm >= 0, not -5"),
        ("--margin_mm", "nan", "must be a finite number of mm >= 0, not nan"),
        ("--step_size", "0", "must be in (0, 1], a fraction of the patch, not 0"),
        ("--step_size", "1.5", "must be in (0, 1], a fraction of the patch, not 1.5"),
        ("--tile_batch", "0", "must be at least 1, not 0"),
    ],
)
def test_an_out_of_range_setting_is_refused_in_one_line_before_any_work(
    cli, capsys, tmp_path, monkeypatch, flag, value, message
):
    monkeypatch.setattr(api, "build_predictor", never)
    write(scan(), tmp_path / "images" / "a_0000.nii.gz")
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"), flag, value)
    assert exit_.value.code == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.endswith(f"error: argument {flag}: {message}")
    assert not (tmp_path / "out").exists()


def test_renamed_model_folders_predict(models, capsys, tmp_path):
    locator, segmenter = tmp_path / "my_locator", tmp_path / "my_segmenter"
    shutil.copytree(models[0], locator)
    shutil.copytree(models[1], segmenter)
    write(scan(seed=5), tmp_path / "images" / "a_0000.nii.gz")
    args = ["predict", "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"), "-device", "cpu"]
    assert main([*args, "--locator", str(locator), "--segmenter", str(segmenter)]) == 0
    assert (tmp_path / "out" / "a.nii.gz").is_file()


def test_a_torn_checkpoint_is_bad_input_naming_the_file(models, capsys, tmp_path):
    segmenter = tmp_path / models[1].name
    shutil.copytree(models[1], segmenter)
    (checkpoint,) = segmenter.glob("fold_*/checkpoint_final.pth")
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    write(scan(seed=6), tmp_path / "images" / "a_0000.nii.gz")
    args = ["predict", "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"), "-device", "cpu"]
    assert main([*args, "--locator", str(models[0]), "--segmenter", str(segmenter)]) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"samflare predict: error: {checkpoint}: not a readable PyTorch checkpoint (")


def test_a_scan_exactly_half_a_locator_voxel_thick_is_too_thin(models):
    from nnunet_samflare.inference.validation import CascadeGrids
    from nnunet_samflare.io import Geometry

    grids = CascadeGrids.from_model_folders(*models)
    t = grids.locator_spacing_zyx[0]
    half = Geometry(3, (16, 16, 1), (3.0, 3.0, t / 2), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match="too thin for the locator"):
        grids.check_extent(half, "thin.nii.gz")
    just_more = Geometry(3, (16, 16, 1), (3.0, 3.0, t * 0.51), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    grids.check_extent(just_more, "thin.nii.gz")  # one locator voxel


def test_the_python_api_refuses_a_folder_as_the_output_of_an_in_memory_image(models, monkeypatch, tmp_path):
    monkeypatch.setattr(api, "build_predictor", never)
    with pytest.raises(InputError, match="an in-memory image is written to one file ending with .nii.gz"):
        api.predict(scan(), tmp_path / "out_folder", locator=models[0], segmenter=models[1], device="cpu")


def test_the_sliding_window_settings_are_the_segmenters_and_the_locator_keeps_plain_ones(models):
    # samflare locate has no such flags: the composed path (locate, nnUNetv2_predict, uncrop) finds the same box
    # as samflare predict --gaussian only if predict's locator ignores them too
    from nnunet_samflare.inference.cascade import CascadePredictor

    cascade = CascadePredictor(
        models[0], models[1], device="cpu", tile_step_size=0.7, use_gaussian=True, use_mirroring=True
    )
    assert (cascade.segmenter.tile_step_size, cascade.segmenter.use_gaussian, cascade.segmenter.use_mirroring) == (
        0.7,
        True,
        True,
    )
    assert (cascade.locator.tile_step_size, cascade.locator.use_gaussian, cascade.locator.use_mirroring) == (
        0.5,
        False,
        False,
    )

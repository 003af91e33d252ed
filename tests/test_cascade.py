"""The cascade (``samflare predict`` and its composed form around stock nnUNetv2_predict) on real CT.

Models are the session's debug-trained locator and segmenter (untrained in effect: what is tested is geometry,
composition, robustness and file handling, not accuracy).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_samflare import predict
from nnunet_samflare.cli import main as samflare_main
from nnunet_samflare.inference.cascade import CascadePredictor, preprocessed_to_original_box
from nnunet_samflare.inference.io import TEMP_PREFIX
from nnunet_samflare.networks.fast_paths import ChannelsLastInstanceNorm3d, Float32Conv3d

from conftest import (
    DATASET_ID,
    LOCATOR_TRAINER,
    PLANS,
    SEGMENTER_TRAINER,
    command,
    data_file,
    read_json,
)
from image_factory import make_bad_input, oblique_anisotropic, write_dicom_series

MODELS = [
    "-d",
    str(DATASET_ID),
    "--locator_trainer",
    LOCATOR_TRAINER,
    "--segmenter_trainer",
    SEGMENTER_TRAINER,
    "-device",
    "cpu",
]


@pytest.fixture(scope="module")
def models(trained_models):
    return (
        trained_models.model_folder(LOCATOR_TRAINER, "3d_locator"),
        trained_models.model_folder(SEGMENTER_TRAINER, "3d_segmenter"),
    )


@pytest.fixture(scope="module")
def predictor(models):
    return CascadePredictor(*models, device="cpu")


@pytest.fixture
def ct() -> sitk.Image:
    return sitk.ReadImage(str(data_file("flare_like", "image", "TSEX_0002")))


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_plugin_models_load_as_nnunet_loads_them_without_its_trainer_lookup(models, predictor):
    """The loader builds our networks from the plans (inference/cascade.py): the same predictor state as nnU-Net's
    initialize_from_trained_model_folder, and nnUNetTrainer (3.8 s of imports and lookup) is never imported."""
    import sys

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_samflare.inference.cascade import available_folds

    for folder, ours in zip(models, (predictor.locator, predictor.segmenter)):
        stock = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        stock.initialize_from_trained_model_folder(str(folder), available_folds(folder, "checkpoint_final.pth"))
        assert type(ours.network) is type(stock.network)
        assert ours.trainer_name == stock.trainer_name and ours.allowed_mirroring_axes == stock.allowed_mirroring_axes
        assert ours.configuration_manager.configuration == stock.configuration_manager.configuration
        assert ours.plans_manager.plans == stock.plans_manager.plans and ours.dataset_json == stock.dataset_json
        assert len(ours.list_of_parameters) == len(stock.list_of_parameters)
        theirs = stock.network.state_dict()
        assert ours.network.state_dict().keys() == theirs.keys()
        for key, value in ours.network.state_dict().items():
            assert torch.equal(value, theirs[key]), key
    code = (
        "import sys\n"
        "from nnunet_samflare.inference.cascade import CascadePredictor\n"
        "CascadePredictor(sys.argv[1], sys.argv[2], device='cpu')\n"
        "print('IMPORTED', 'nnunetv2.training.nnUNetTrainer.nnUNetTrainer' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, models)], capture_output=True, encoding="utf-8", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED False" in result.stdout


def test_in_process_and_composed_paths_agree_voxel_for_voxel(trained_models, tmp_path, ct):
    """samflare predict == samflare locate → stock nnUNetv2_predict → samflare uncrop → samflare postprocess.

    The second scan is oblique with anisotropic voxels, so the ROI is resampled to the segmenter's grid and the
    labels are brought back by nearest neighbour: the whole geometry chain is exercised.
    """
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(ct, str(images / "plain_0000.nii.gz"))
    sitk.WriteImage(oblique_anisotropic(ct), str(images / "oblique_0000.nii.gz"))
    run = trained_models.run
    # stock nnUNetv2_predict always blends with a Gaussian; --disable_tta on both sides
    run(
        [
            command("samflare"),
            "predict",
            "-i",
            str(images),
            "-o",
            str(tmp_path / "direct"),
            *MODELS,
            "--gaussian",
            "--disable_tta",
        ]
    )
    run([command("samflare"), "locate", "-i", str(images), "-o", str(tmp_path / "roi"), *MODELS])
    run(
        [
            command("nnUNetv2_predict"),
            "-i",
            str(tmp_path / "roi"),
            "-o",
            str(tmp_path / "roi_pred"),
            "-d",
            str(DATASET_ID),
            "-c",
            "3d_segmenter",
            "-f",
            "all",
            "-tr",
            SEGMENTER_TRAINER,
            "-p",
            PLANS,
            "-device",
            "cpu",
            "--disable_tta",
            "-npp",
            "0",
            "-nps",
            "0",
        ]
    )
    run(
        [
            command("samflare"),
            "uncrop",
            "-i",
            str(tmp_path / "roi_pred"),
            "-r",
            str(tmp_path / "roi"),
            "-o",
            str(tmp_path / "uncropped"),
        ]
    )
    run([command("samflare"), "postprocess", "-i", str(tmp_path / "uncropped"), "-o", str(tmp_path / "composed")])

    roi_image = sitk.ReadImage(str(tmp_path / "roi" / "oblique_0000.nii.gz"))
    record = read_json(tmp_path / "roi" / "oblique.json")
    np.testing.assert_allclose(roi_image.GetSpacing(), (3.0, 3.0, 3.0))  # resampled to the segmenter's grid
    assert record["shape_zyx"] != record["roi_shape_zyx"]
    for case in ("plain", "oblique"):
        direct = sitk.ReadImage(str(tmp_path / "direct" / f"{case}.nii.gz"))
        composed = sitk.ReadImage(str(tmp_path / "composed" / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        assert_same_geometry(direct, source)
        assert_same_geometry(composed, source)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(direct), sitk.GetArrayFromImage(composed))
        assert sitk.GetArrayFromImage(direct).any()
    # the stock postprocessing CLI accepts samflare's output folder and pickle
    run([command("samflare"), "postprocess", "--write-nnunet-pkl", str(tmp_path / "pp.pkl")])
    run(
        [
            command("nnUNetv2_apply_postprocessing"),
            "-i",
            str(tmp_path / "uncropped"),
            "-o",
            str(tmp_path / "stock_pp"),
            "-pp_pkl_file",
            str(tmp_path / "pp.pkl"),
            "-np",
            "1",
            "-plans_json",
            str(tmp_path / "direct" / "plans.json"),
            "-dataset_json",
            str(tmp_path / "direct" / "dataset.json"),
        ]
    )
    for case in ("plain", "oblique"):
        np.testing.assert_array_equal(
            labels(tmp_path / "stock_pp" / f"{case}.nii.gz"), labels(tmp_path / "composed" / f"{case}.nii.gz")
        )


def test_dicom_series_gives_nifti_in_the_series_geometry(predictor, tmp_path, ct):
    series = write_dicom_series(ct, tmp_path / "series", "1.2.826.0.1.3680043.8.498.77")
    written = predict(series, tmp_path / "out", predictor=predictor, progress=False)
    assert [p.name for p in written] == ["series.nii.gz"]
    reference = predict(ct, predictor=predictor)  # the same voxels from the NIfTI, in memory
    dicom = sitk.ReadImage([str(p) for p in sorted(series.glob("*.dcm"))])
    out = sitk.ReadImage(str(written[0]))
    assert_same_geometry(out, dicom)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(reference))


def test_python_api_returns_an_image_in_the_input_geometry(predictor, ct):
    result = predict(ct, predictor=predictor)
    assert isinstance(result, sitk.Image)
    assert_same_geometry(result, ct)
    assert set(np.unique(sitk.GetArrayFromImage(result))) <= set(range(15))


def test_probabilities_are_full_size_and_consistent_with_labels(models, tmp_path, ct):
    sitk.WriteImage(ct, str(tmp_path / "scan.nii.gz"))
    raw = CascadePredictor(*models, device="cpu", postprocess=False)
    (label_file,) = predict(
        tmp_path / "scan.nii.gz",
        tmp_path / "out",
        predictor=raw,
        save_probabilities=True,
        stats=True,
        preview=True,
        progress=False,
    )
    probabilities = np.load(tmp_path / "out" / "scan.npz")["probabilities"].astype(np.float32)
    seg = labels(label_file)
    assert probabilities.shape == (15, *seg.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-2)
    np.testing.assert_array_equal(probabilities.argmax(0), seg)
    assert (tmp_path / "out" / "scan.pkl").is_file()
    stats = read_json(tmp_path / "out" / "scan_stats.json")
    for label, entry in stats["labels"].items():
        assert entry["voxels"] == int((seg == int(label)).sum())
        assert entry["volume_ml"] == pytest.approx(entry["voxels"] * 27 / 1000)  # 3 mm isotropic voxels
    assert (tmp_path / "out" / "scan_preview.png").stat().st_size > 10_000


def test_box_maps_back_through_transpose_crop_and_resize():
    properties = {
        "bbox_used_for_cropping": [[2, 42], [0, 30], [5, 105]],  # transposed axes
        "shape_after_cropping_and_before_resampling": [40, 30, 100],
        "grid_shape": (20, 30, 25),
    }
    box = preprocessed_to_original_box([[1, 3], [0, 30], [4, 5]], properties, transpose_backward=[2, 0, 1])
    # transposed axis k is original axis transpose_forward[k] = [1, 2, 0][k]
    assert box == [[5 + 16, 5 + 20], [2 + 2, 2 + 6], [0, 30]]


def test_no_foreground_gives_background_map_and_a_warning(models, ct):
    blind = CascadePredictor(*models, device="cpu", min_component_mm3=1e12)  # every component is "too small"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = predict(ct, predictor=blind)
    assert any("no foreground" in str(w.message) for w in caught)
    assert_same_geometry(result, ct)
    assert not sitk.GetArrayFromImage(result).any()


def test_scan_smaller_than_a_patch(predictor, ct):
    tiny = ct[40:60, 30:50, 10:22]  # 20 x 20 x 12 voxels, far below the 64³ and 128³ patches
    result = predict(tiny, predictor=predictor)
    assert_same_geometry(result, tiny)


def test_thousand_slice_scan(predictor):
    array = np.full((1000, 24, 20), -1000, dtype=np.int16)
    array[100:900, 4:20, 4:16] = 40  # a long soft-tissue column
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((3.0, 3.0, 0.5))
    result = predict(image, predictor=predictor)
    assert_same_geometry(result, image)


@pytest.mark.parametrize(
    "kind", ["2d", "4d", "vector", "empty", "truncated_nii_gz", "garbage", "nan", "unreadable_dicom"]
)
def test_bad_input_one_line_error_no_output(trained_models, monkeypatch, capsys, tmp_path, kind, ct):
    monkeypatch.setenv("nnUNet_results", str(trained_models.results))
    if kind == "unreadable_dicom":
        bad = write_dicom_series(ct[:, :, :4], tmp_path / "dicom", "1.2.826.0.1.3680043.8.498.99")
        (bad / "IM0002.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    else:
        bad = make_bad_input(kind, tmp_path)
    out = tmp_path / "out"
    code = samflare_main(["predict", "-i", str(bad), "-o", str(out), *MODELS])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and str(bad) in err, err
    assert not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".gz", ".png", ".npz")]


def test_missing_model_folder_and_wrong_channel_count(trained_models, monkeypatch, capsys, tmp_path, ct):
    monkeypatch.setenv("nnUNet_results", str(trained_models.results))
    sitk.WriteImage(ct, str(tmp_path / "scan_0000.nii.gz"))
    missing = tmp_path / "no_such_model"
    code = samflare_main(
        [
            "predict",
            "-i",
            str(tmp_path / "scan_0000.nii.gz"),
            "-o",
            str(tmp_path / "out"),
            "--locator",
            str(missing),
            "--segmenter",
            str(missing),
            "-device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and str(missing) in err
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(tmp_path / "scan_0000.nii.gz", images / "scan_0000.nii.gz")
    sitk.WriteImage(ct, str(images / "scan_0001.nii.gz"))  # a second channel the CT models do not take
    code = samflare_main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), *MODELS])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "scan" in err and "channel" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_resume_after_a_killed_run(trained_models, tmp_path, ct):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        sitk.WriteImage(ct, str(images / f"case{i}_0000.nii.gz"))
    out = tmp_path / "out"
    args = [command("samflare"), "predict", "-i", str(images), "-o", str(out), *MODELS]
    process = subprocess.Popen(args, env=trained_models.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "case0.nii.gz").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = sorted(p.name for p in out.glob("case*.nii.gz"))
    assert "case0.nii.gz" in done_before and len(done_before) < 4, done_before
    first_mtime = (out / "case0.nii.gz").stat().st_mtime_ns
    (out / f"{TEMP_PREFIX}0123456789ab-case3.nii.gz").write_bytes(b"half")  # what a kill mid-write leaves
    trained_models.run(args + ["--continue_prediction"])
    assert sorted(p.name for p in out.glob("case*.nii.gz")) == [f"case{i}.nii.gz" for i in range(4)]
    assert (out / "case0.nii.gz").stat().st_mtime_ns == first_mtime  # finished cases are not redone
    assert not list(out.glob(f"{TEMP_PREFIX}*"))
    for i in range(4):
        assert_same_geometry(sitk.ReadImage(str(out / f"case{i}.nii.gz")), ct)


def test_inputs_are_never_modified(predictor, tmp_path, ct, capsys):
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(ct, str(path))
    before = path.read_bytes()
    predict(path, tmp_path / "out", predictor=predictor, progress=False)
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict(path, path, predictor=predictor, progress=False)
    assert path.read_bytes() == before


def test_profile_runs_predict_per_case_in_fresh_processes(trained_models, tmp_path, ct):
    """FLARE protocol on CPU: one process per case, time and RAM measured, GPU figures declared absent."""
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(ct, str(images / "a_0000.nii.gz"))
    sitk.WriteImage(ct[:, :, :20], str(images / "b_0000.nii.gz"))
    trained_models.run([command("samflare"), "profile", "-i", str(images), "-o", str(tmp_path / "out"), *MODELS])
    report = read_json(tmp_path / "out" / "profile.json")
    assert [case["case"] for case in report["cases"]] == ["a", "b"]
    for case in report["cases"]:
        assert case["exit_code"] == 0
        assert case["MaxRAM_MB"] > 100
        assert case["MaxGPU_MB"] is None and case["AUC_GPU_Time_MBs"] is None
        assert (tmp_path / "out" / f"{case['case']}.nii.gz").is_file()
        assert (tmp_path / "out" / f"profile_{case['case']}.png").is_file()
    assert "GPU figures absent" in report["settings"]["gpu_note"]
    assert (tmp_path / "out" / "profile.csv").is_file()


@pytest.mark.parametrize("gaussian", [False, True])
def test_batched_tiles_give_the_same_logits(models, ct, gaussian):
    from nnunet_samflare.inference.cascade import sliding_window_logits
    from nnunet_samflare.inference.io import read_case

    data, properties = read_case(ct)
    one = CascadePredictor(*models, device="cpu", use_gaussian=gaussian, tile_batch_size=1)
    four = CascadePredictor(*models, device="cpu", use_gaussian=gaussian, tile_batch_size=4)
    preprocessed, _ = one._preprocess(one.segmenter, data, properties)
    patch = one.segmenter.configuration_manager.patch_size
    padded = [max(n, p) for n, p in zip(preprocessed.shape[1:], patch)]
    assert len(one.segmenter._internal_get_sliding_window_slicers(padded)) == 9  # batches of 4, 4 and 1
    reference = sliding_window_logits(one.segmenter, preprocessed).float()
    batched = sliding_window_logits(four.segmenter, preprocessed).float()
    torch.testing.assert_close(batched, reference, atol=2e-2, rtol=1e-2)
    assert (batched.argmax(0) == reference.argmax(0)).float().mean() > 0.999


def test_fast_changes_only_the_float_rounding(predictor, models, ct):
    """--fast (the segmenter in channels-last memory format) computes the same function as the default."""
    from nnunet_samflare.inference.io import read_case

    data, properties = read_case(ct)
    fast = CascadePredictor(*models, device="cpu", channels_last=True)
    reference = predictor.predict_case(data, properties)
    result = fast.predict_case(data, properties)
    assert result.box == reference.box  # the locator is untouched
    assert any(  # the convolution weights really are in channels-last layout
        p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
        for p in fast.segmenter.network.parameters()
    )
    norms = [type(m) for m in fast.segmenter.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and set(norms) == {ChannelsLastInstanceNorm3d}  # no norm converts back to contiguous
    assert ChannelsLastInstanceNorm3d not in {type(m) for m in predictor.segmenter.network.modules()}
    assert (result.segmentation == reference.segmentation).mean() > 0.999


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_has_native_bfloat16(models, monkeypatch, native):
    """--fast asks for bfloat16 autocast on a CPU; a CPU that would emulate bfloat16 keeps float32."""
    import nnunet_samflare.inference.tiling as tiling
    from nnunet_samflare.inference.api import FAST_OPTIONS

    monkeypatch.setattr(tiling, "cpu_has_native_bf16", lambda: native)
    fast = CascadePredictor(*models, device="cpu", **FAST_OPTIONS)
    assert fast.segmenter.cpu_autocast_dtype == (torch.bfloat16 if native else None)
    head = fast.segmenter.network.decoder.seg_layers[0]
    assert type(head) is (Float32Conv3d if native else torch.nn.Conv3d)  # bfloat16 never rounds the logits
    assert fast.locator.cpu_autocast_dtype is None  # the ROI comes from the float32 locator
    assert CascadePredictor(*models, device="cpu").segmenter.cpu_autocast_dtype is None  # the default


def test_fast_flag_turns_on_every_fast_option():
    from nnunet_samflare.cli import build_parser
    from nnunet_samflare.cli._models import predictor_options
    from nnunet_samflare.inference.api import FAST_OPTIONS

    def options(*flags):
        command = ["predict", "-i", "in", "-o", "out", "--locator", "L", "--segmenter", "S", *flags]
        args = build_parser().parse_args(command)
        chosen = predictor_options(args)
        return {name: chosen[name] for name in FAST_OPTIONS}

    assert options("--fast") == {name: True for name in FAST_OPTIONS}
    assert options() == {name: False for name in FAST_OPTIONS}

"""Folder evaluation: case matching, partial labels, aggregation, metrics.json, the table, the plot and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_samflare.cli import main
from nnunet_samflare.evaluation.evaluate import (
    evaluate_folders,
    find_label_files,
    format_table,
    parse_label_spec,
)
from nnunet_samflare.evaluation.plots import plot_metrics

from conftest import dataset

LIVER, AORTA, TUMOR = 1, 5, 14
LABELS = (LIVER, AORTA, TUMOR)


def write(array: np.ndarray, path, like: sitk.Image | None = None) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    if like is not None:
        image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


def box(shape, z, y, x) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z, y, x] = True
    return mask


@pytest.fixture
def toy(tmp_path):
    """Three cases on a 1 mm grid.

    A: liver and aorta predicted exactly; no tumor anywhere.
    B: liver shifted by one slice (DSC 0.75, NSD 1 at 5 mm); no aorta anywhere; a tumor only in the prediction.
    C: partially labelled (liver only); the prediction adds an aorta and a tumor that must not count.
    """
    shape = (14, 12, 12)
    liver = box(shape, slice(4, 8), slice(4, 8), slice(4, 8))
    aorta = box(shape, slice(2, 12), slice(1, 3), slice(1, 3))
    tumor = box(shape, slice(9, 11), slice(9, 11), slice(9, 11))
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    a = liver * LIVER + aorta * AORTA
    write(a, ref / "A.nii.gz")
    write(a, pred / "A.nii.gz")
    write(liver * LIVER, ref / "B.nii.gz")
    write(np.roll(liver, 1, axis=0) * LIVER + tumor * TUMOR, pred / "B.nii.gz")
    write(liver * LIVER, ref / "C.nii.gz")
    write(liver * LIVER + aorta * AORTA + tumor * TUMOR, pred / "C.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1}, "partial_labels": {"C": [LIVER]}})
    )
    return ref, pred


def test_per_case_values_partial_labels_and_nulls(toy):
    ref, pred = toy
    result = evaluate_folders(ref, pred, labels=LABELS)  # dataset.json found in REF_DIR's parent
    cases = result["cases"]
    assert cases["A"] == {"1": {"DSC": 1.0, "NSD": 1.0}, "5": {"DSC": 1.0, "NSD": 1.0}, "14": {"DSC": 1.0, "NSD": 1.0}}
    assert cases["B"] == {"1": {"DSC": 0.75, "NSD": 1.0}, "5": {"DSC": 1.0, "NSD": 1.0}, "14": {"DSC": 0.0, "NSD": 0.0}}
    assert cases["C"] == {"1": {"DSC": 1.0, "NSD": 1.0}, "5": None, "14": None}
    assert result["reference_labels"] == {"A": [1, 5], "B": [1], "C": [1]}
    assert result["summary"]["settings"]["partially_labelled_cases"] == ["C"]


def test_summary_means_std_present_means_organ_and_tumor(toy):
    ref, pred = toy
    s = evaluate_folders(ref, pred, labels=LABELS)["summary"]
    liver, aorta, tumor = (s["per_label"][k] for k in ("1", "5", "14"))
    assert liver["n"] == 3 and liver["DSC_mean"] == round(np.mean([1, 0.75, 1]), 4)
    assert liver["DSC_std"] == round(np.std([1, 0.75, 1]), 4)
    # aorta: scored in A and B (C does not annotate it); present in A only
    assert (aorta["n"], aorta["n_present"]) == (2, 1)
    assert aorta["DSC_mean"] == 1.0 and aorta["DSC_mean_present"] == 1.0
    # tumor: B's false positive is 0, A's empty/empty is 1; no reference contains a tumor
    assert (tumor["n"], tumor["DSC_mean"], tumor["NSD_mean"]) == (2, 0.5, 0.5)
    assert tumor["n_present"] == 0 and tumor["DSC_mean_present"] is None
    assert (s["tumor_DSC"], s["tumor_NSD"]) == (0.5, 0.5)
    # organ average = mean of the organ means (liver, aorta), not of all organ values
    assert s["organ_labels_averaged"] == ["1", "5"]
    assert s["organ_DSC"] == round((liver["DSC_mean"] + 1.0) / 2, 4)
    assert s["organ_NSD"] == 1.0
    settings = s["settings"]
    assert settings["nsd_cutoff"] == 0.2 and settings["official_slab_quirk"] is True
    assert settings["nsd_tolerance_mm"] == {"1": 5.0, "5": 2.0, "14": 2.0}


def test_metrics_json_is_the_result_and_written_atomically(toy, tmp_path):
    ref, pred = toy
    out = tmp_path / "out" / "metrics.json"
    result = evaluate_folders(ref, pred, labels=LABELS, output_file=out)
    assert json.loads(out.read_text(encoding="utf-8")) == result
    assert json.loads(out.read_text(encoding="utf-8"))["cases"]["C"]["5"] is None  # null in JSON
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_missing_prediction_scores_zero_or_fails(toy):
    ref, pred = toy
    (pred / "B.nii.gz").unlink()
    with pytest.warns(UserWarning, match="no prediction for B"):
        result = evaluate_folders(ref, pred, labels=LABELS)
    assert result["cases"]["B"] == {str(lb): {"DSC": 0.0, "NSD": 0.0} for lb in LABELS}
    assert result["summary"]["settings"]["missing_predictions"] == ["B"]
    with pytest.raises(FileNotFoundError, match="B"):
        evaluate_folders(ref, pred, labels=LABELS, on_missing="error")


def test_without_dataset_json_every_label_is_annotated(toy, tmp_path):
    ref, pred = toy
    (tmp_path / "dataset.json").unlink()
    result = evaluate_folders(ref, pred, labels=LABELS)
    assert result["cases"]["C"]["5"] == {"DSC": 0.0, "NSD": 0.0}  # the extra aorta is now a false positive
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_folders(ref, pred, dataset_json=tmp_path / "nope.json")


def test_table_has_the_layout_of_table_3(toy):
    ref, pred = toy
    lines = format_table(evaluate_folders(ref, pred, labels=LABELS)).splitlines()
    rows = [line.split()[0] for line in lines[2:]]
    assert rows == ["liver", "aorta", "Organ", "Tumor"]
    assert " ".join(lines[2].split()) == "liver 3 0.9167 ± 0.1179 | 1.0000 ± 0.0000"
    assert "DSC mean ± std" in lines[1] and "NSD mean ± std" in lines[1]


def test_real_partial_dataset_scores_only_annotated_labels(tmp_path):
    ref = dataset("partial") / "labelsTr"
    pred = tmp_path / "pred"
    shutil.copytree(ref, pred)
    result = evaluate_folders(ref, pred)  # partial/dataset.json is REF_DIR's parent
    assert {k for k, v in result["cases"]["DCMQI_0001"].items() if v is not None} == {"1"}
    assert {k for k, v in result["cases"]["TSAO_0001"].items() if v is not None} == {"5"}
    per_label = result["summary"]["per_label"]
    assert per_label["1"]["n"] == 1 and per_label["5"]["n"] == 1 and per_label["2"]["n"] == 0
    assert result["summary"]["organ_labels_averaged"] == ["1", "5"]
    assert result["summary"]["tumor_DSC"] is None


def test_real_pair_through_files_and_workers(tmp_path):
    """flare_like against itself with TSEX_0002's liver eroded; also the 'present' means (no esophagus)."""
    ref = dataset("flare_like") / "labelsTr"
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(ref / "TSEX_0001.nii.gz", pred)
    image = sitk.ReadImage(str(ref / "TSEX_0002.nii.gz"))
    labels = sitk.GetArrayFromImage(image)
    liver = labels == LIVER
    eroded = ndimage.binary_erosion(liver)
    changed = labels.copy()
    changed[liver & ~eroded] = 0
    write(changed, pred / "TSEX_0002.nii.gz", like=image)
    result = evaluate_folders(ref, pred, num_processes=2)
    assert all(v == {"DSC": 1.0, "NSD": 1.0} for v in result["cases"]["TSEX_0001"].values())
    assert result["cases"]["TSEX_0002"]["1"]["DSC"] == round(2 * eroded.sum() / (liver.sum() + eroded.sum()), 4)
    esophagus = result["summary"]["per_label"]["10"]
    assert esophagus["DSC_mean"] == 1.0 and esophagus["n_present"] == 0 and esophagus["DSC_mean_present"] is None
    assert result == evaluate_folders(ref, pred, num_processes=1)


def test_label_spec_forms():
    assert parse_label_spec("1..14") == tuple(range(1, 15))
    assert parse_label_spec(["1-3", "5"]) == (1, 2, 3, 5)
    assert parse_label_spec(["1", "2", "5"]) == (1, 2, 5)
    assert parse_label_spec("1,2,2") == (1, 2)
    assert parse_label_spec([14, 1]) == (14, 1)
    for bad in ("liver", "3..1", "0..2", ""):
        with pytest.raises(ValueError):
            parse_label_spec(bad)


def test_case_matching_by_name_with_the_endings_predict_writes(tmp_path):
    from nnunet_samflare.io import TEMP_PREFIX, find_cases

    for name in (
        "a.nii.gz",
        "b.nrrd",
        "c.mha",
        "d.nii",
        "plans.json",
        "e.npz",
        "f_preview.png",
        "g.tif",
        f"{TEMP_PREFIX}0123-h.nii.gz",
        ".hidden.nii.gz",
    ):
        (tmp_path / name).write_bytes(b"")
    # one discovery rule: evaluate sees exactly the cases predict would (hidden temporaries included: never)
    assert set(find_label_files(tmp_path)) == {c.case_id for c in find_cases(tmp_path)}
    assert {k: v.name for k, v in find_label_files(tmp_path).items()} == {
        "a": "a.nii.gz",
        "b": "b.nrrd",
        "c": "c.mha",
        "d": "d.nii",
    }
    (tmp_path / "a.nrrd").write_bytes(b"")
    with pytest.raises(ValueError, match="two label files"):
        find_label_files(tmp_path)


def test_cli_writes_metrics_and_plot(toy, tmp_path, capsys):
    ref, pred = toy
    out, png = tmp_path / "m.json", tmp_path / "plots" / "m.png"
    assert (
        main(
            [
                "evaluate",
                str(ref),
                str(pred),
                "-o",
                str(out),
                "--labels",
                "1",
                "5",
                "14",
                "--nsd-cutoff",
                "0.1",
                "--no-slab-quirk",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["summary"]["settings"]["labels"] == [1, 5, 14]
    assert data["summary"]["settings"]["nsd_cutoff"] == 0.1
    assert data["summary"]["settings"]["official_slab_quirk"] is False
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "Organ average" in capsys.readouterr().out


def test_cli_default_labels_and_output(toy):
    ref, pred = toy
    assert main(["evaluate", str(ref), str(pred), "--labels", "1..14"]) == 0
    assert len(json.loads((pred / "metrics.json").read_text(encoding="utf-8"))["cases"]["A"]) == 14


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "no such directory" in err


def test_plot_of_partial_result(toy, tmp_path):
    ref, pred = toy
    path = plot_metrics(evaluate_folders(ref, pred, labels=LABELS), tmp_path / "p.png")
    assert path.stat().st_size > 10_000


def test_references_and_predictions_with_upper_case_endings_are_matched(toy, tmp_path):
    ref, pred = toy
    upper_ref, upper_pred = tmp_path / "REF", tmp_path / "PRED"
    for source, target in ((ref, upper_ref), (pred, upper_pred)):
        target.mkdir()
        for path in source.glob("*.nii.gz"):
            shutil.copy(path, target / path.name.replace(".nii.gz", ".NII.GZ"))
    lower = evaluate_folders(ref, pred, labels=(1, 5))
    upper = evaluate_folders(upper_ref, upper_pred, labels=(1, 5))
    assert upper["cases"] == lower["cases"] and upper["summary"]["settings"]["missing_predictions"] == []


@pytest.mark.parametrize("what", ["-o", "--plot"])
def test_cli_refuses_a_wrong_output_name_before_scoring_and_overwrites_nothing(toy, tmp_path, capsys, what):
    ref, pred = toy
    (prediction,) = sorted(pred.glob("A.nii.gz"))
    before = prediction.read_bytes()
    args = ["evaluate", str(ref), str(pred), "-o", str(tmp_path / "m.json")]
    if what == "-o":
        args[-1] = str(prediction)  # a label map named as the metrics file
    else:
        args += ["--plot", str(tmp_path / "plot.txt")]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("samflare evaluate: error: ")
    assert prediction.read_bytes() == before and not (tmp_path / "m.json").exists()


def test_cli_exit_code_is_out_of_memory_when_a_case_ran_out_of_it(toy, tmp_path, capsys, monkeypatch):
    import nnunet_samflare.evaluation.evaluate as evaluate_module

    ref, pred = toy
    score = evaluate_module.evaluate_case_files

    def scarce_memory(reference, prediction, *args, **kwargs):
        if "B." in str(reference):
            raise MemoryError("Unable to allocate 3.2 GiB for an array")
        return score(reference, prediction, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_case_files", scarce_memory)
    assert main(["evaluate", str(ref), str(pred), "-o", str(tmp_path / "m.json")]) == 3
    summary = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["summary"]
    assert summary["failed_out_of_memory"] == ["B"] and set(summary["failed_cases"]) == {"B"}
    assert "B: out of memory" in capsys.readouterr().err


def test_malformed_partial_labels_are_bad_input(toy, tmp_path, capsys):
    ref, pred = toy
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "partial_labels": ["C"]}))
    assert main(["evaluate", str(ref), str(pred), "-o", str(tmp_path / "m.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("dataset.json: partial_labels must map case ids to lists of label ids or names")

"""``samflare demo``: its input checks, its work folder and its report, without training anything.

The whole demo runs end to end (``--quick``) from an installed wheel in ``test_wheel.py``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from nnunet_samflare.cli import main
from nnunet_samflare.errors import InputError
from nnunet_samflare.workflows.demo import (
    MARKER_FILE,
    SIZES,
    DemoFolders,
    check_raw_dataset,
    dataset_identity,
    foreground_labels,
    format_metrics_table,
    metrics_rows,
    prepare_work_folder,
    remove_large_files,
)

from conftest import dataset


def test_dataset_identity_keeps_nnunet_names_and_names_other_folders_501(tmp_path):
    assert dataset_identity(tmp_path / "Dataset042_Kidneys") == (42, "Dataset042_Kidneys")
    assert dataset_identity(tmp_path / "flare_like") == (501, "Dataset501_FlareLike")
    assert dataset_identity(tmp_path / "my ct-data") == (501, "Dataset501_MyCtData")


def test_the_example_dataset_is_a_valid_raw_dataset_with_flare_labels():
    dataset_json = check_raw_dataset(dataset("flare_like"))
    assert foreground_labels(dataset_json)[1] == "liver" and foreground_labels(dataset_json)[14] == "tumor"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "dataset.json").unlink(), "dataset.json: missing"),
        (lambda d: (d / "dataset.json").write_text("{", encoding="utf-8"), "dataset.json: not valid JSON"),
        (lambda d: (d / "labelsTr" / "TSEX_0002.nii.gz").unlink(), "TSEX_0002.nii.gz: missing (case TSEX_0002)"),
        (lambda d: shutil.rmtree(d / "imagesTr"), "imagesTr: missing"),
    ],
)
def test_demo_refuses_a_bad_dataset_in_one_line_before_any_work(tmp_path, capsys, damage, message):
    data = tmp_path / "data"
    shutil.copytree(dataset("flare_like"), data)
    damage(data)
    work = tmp_path / "work"
    assert main(["demo", "--data", str(data), "--work", str(work), "-device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("samflare demo: error: ") and message in err
    assert not work.exists()


def test_demo_refuses_region_based_labels(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset("flare_like"), data)
    dataset_json = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    dataset_json["labels"] = {"background": 0, "organs": [1, 2, 3]}
    (data / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    with pytest.raises(InputError, match="region-based labels"):
        check_raw_dataset(data)


def test_work_folder_of_someone_else_is_never_cleared(tmp_path, capsys):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("precious", encoding="utf-8")
    assert main(["demo", "--work", str(work), "-device", "cpu"]) == 2
    assert "was not made by samflare demo" in capsys.readouterr().err
    assert (work / "thesis.tex").read_text(encoding="utf-8") == "precious"


def test_a_previous_demo_folder_is_replaced_and_user_data_is_linked_not_copied(tmp_path):
    data = tmp_path / "Dataset042_Copy"
    shutil.copytree(dataset("flare_like"), data)
    work = tmp_path / "work"
    folders = prepare_work_folder(work, data, link=True)
    assert (work / MARKER_FILE).is_file()
    assert folders.dataset == work / "nnUNet_raw" / "Dataset042_Copy"
    assert folders.dataset.is_symlink() and folders.dataset.resolve() == data.resolve()
    (folders.predictions).mkdir()
    (folders.predictions / "old.nii.gz").write_bytes(b"from the last run")
    again = prepare_work_folder(work, data, link=True)
    assert not again.predictions.exists()
    assert (data / "dataset.json").is_file()  # clearing the work folder never follows the link into the data


def test_remove_large_files_deletes_checkpoints_and_preprocessed_arrays_only(tmp_path):
    folders = DemoFolders(tmp_path, 501, "Dataset501_X")
    model = folders.results / "Dataset501_X" / "Trainer__samflarePlans__3d_segmenter" / "fold_all"
    model.mkdir(parents=True)
    (model / "checkpoint_final.pth").write_bytes(b"w" * 1000)
    (model / "checkpoint_best.pth").write_bytes(b"w" * 1000)
    (model / "progress.png").write_bytes(b"png")
    arrays = folders.preprocessed / "Dataset501_X" / "samflarePlans_3d_segmenter"
    arrays.mkdir(parents=True)
    (arrays / "case.b2nd").write_bytes(b"a" * 500)
    (folders.preprocessed / "Dataset501_X" / "samflarePlans.json").write_text("{}", encoding="utf-8")
    assert remove_large_files(folders) == 2500
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["progress.png", "samflarePlans.json"]


def test_report_table_shows_only_labels_in_the_reference_and_their_average():
    per_label = {
        "1": {"name": "liver", "n": 2, "n_present": 2, "DSC_mean_present": 0.9, "NSD_mean_present": 0.8},
        "3": {"name": "spleen", "n": 2, "n_present": 1, "DSC_mean_present": 0.5, "NSD_mean_present": 0.4},
        "10": {"name": "esophagus", "n": 2, "n_present": 0, "DSC_mean_present": None, "NSD_mean_present": None},
    }
    rows = metrics_rows({"summary": {"per_label": per_label}}, {1: "liver", 3: "spleen", 10: "esophagus"})
    assert [(r["name"], r["cases"]) for r in rows] == [("liver", 2), ("spleen", 1)]
    table = format_metrics_table(rows, 0.7, 0.6)
    assert "esophagus" not in table
    assert table.splitlines()[-1].split("|")[3:5] == [" 0.7000 ", " 0.6000 "]


def test_demo_sizes_are_valid_plans():
    for size in SIZES.values():
        assert all(p % 16 == 0 for p in size.segmenter_patch)  # SAMHybridUNet's divisor
        assert all(p % 32 == 0 for p in size.locator_patch)  # PConvLocator's divisor
        assert "--segmenter_patch" in size.plan_arguments()
    assert SIZES["quick"].segmenter_epochs * SIZES["quick"].segmenter_iterations < (
        SIZES["standard"].segmenter_epochs * SIZES["standard"].segmenter_iterations
    )

"""``samflare export`` / ``samflare install``: the zip's layout and manifest, and that a bad zip installs nothing.

These tests use model folders with placeholder checkpoints (export and install never load weights); the round trip
with trained models and ``samflare predict`` on the installed copy is in ``test_wheel.py``, in a fresh environment.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from nnunet_samflare.cli import main
from nnunet_samflare.errors import InputError
from nnunet_samflare.workflows.sharing import MANIFEST, export_cascade, install_cascade, predict_command

DATASET = "Dataset777_Share"
LOCATOR = "nnUNetTrainer_SAMFlareLocator__samflarePlans__3d_locator"
SEGMENTER = "nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter"


def make_model_folder(results: Path, name: str, folds=("all",), seed: int = 0) -> Path:
    folder = results / DATASET / name
    (folder / "crossval_results_folds_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "samflarePlans", "seed": seed}), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}), encoding="utf-8")
    (folder / "crossval_results_folds_0" / "postprocessing.json").write_text("{}", encoding="utf-8")
    for fold in folds:
        (folder / f"fold_{fold}" / "validation").mkdir(parents=True)
        (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(os.urandom(2048) + bytes([seed]))
        (folder / f"fold_{fold}" / "checkpoint_best.pth").write_bytes(b"not exported by default")
        (folder / f"fold_{fold}" / "validation" / "summary.json").write_text("{}", encoding="utf-8")
        (folder / f"fold_{fold}" / "validation" / "case.nii.gz").write_bytes(b"validation predictions stay home")
    return folder


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    results = tmp_path / "results"
    make_model_folder(results, LOCATOR)
    make_model_folder(results, SEGMENTER, folds=(0, 1))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    return results


@pytest.fixture
def cascade_zip(results, tmp_path) -> Path:
    return export_cascade(777, tmp_path / "cascade.zip")


def files_below(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_packs_both_phases_in_nnunet_layout_with_a_manifest(cascade_zip, results):
    with zipfile.ZipFile(cascade_zip) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read(MANIFEST))
    expected = {
        f"{DATASET}/{LOCATOR}/{f}"
        for f in (
            "plans.json",
            "dataset.json",
            "crossval_results_folds_0/postprocessing.json",
            "fold_all/checkpoint_final.pth",
            "fold_all/validation/summary.json",
        )
    } | {
        f"{DATASET}/{SEGMENTER}/{f}"
        for f in (
            "plans.json",
            "dataset.json",
            "crossval_results_folds_0/postprocessing.json",
            "fold_0/checkpoint_final.pth",
            "fold_0/validation/summary.json",
            "fold_1/checkpoint_final.pth",
            "fold_1/validation/summary.json",
        )
    }
    assert names == expected | {MANIFEST}  # no other checkpoints, no validation predictions
    assert manifest["dataset"] == DATASET
    assert manifest["locator"] == {
        "folder": f"{DATASET}/{LOCATOR}",
        "trainer": "nnUNetTrainer_SAMFlareLocator",
        "configuration": "3d_locator",
        "folds": ["all"],
    }
    assert manifest["segmenter"]["folds"] == [0, 1]
    assert set(manifest["files"]) == expected
    assert predict_command(manifest) == "samflare predict -i IMAGES -o OUTPUT -d 777"


def test_install_recreates_the_model_folders_byte_for_byte(cascade_zip, results, tmp_path):
    other = tmp_path / "other_machine"
    manifest = install_cascade(cascade_zip, results=other)
    for name in (LOCATOR, SEGMENTER):
        exported = {
            k: v
            for k, v in files_below(results / DATASET / name).items()
            if k.endswith(("checkpoint_final.pth", ".json"))
        }
        assert files_below(other / DATASET / name) == exported
    assert manifest["installed"]["segmenter"] == str(other / DATASET / SEGMENTER)
    assert not [p for p in other.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    # installing the same zip again changes nothing and says so
    again = install_cascade(cascade_zip, results=other)
    assert again["already_installed"] == ["locator", "segmenter"]


def test_cli_export_then_install_under_nnunet_results(results, tmp_path, monkeypatch, capsys):
    archive = tmp_path / "via_cli.zip"
    assert main(["export", "-d", "777", "-o", str(archive), "-f", "all"]) == 2  # the segmenter has no fold_all
    assert "fold_all/checkpoint_final.pth" in capsys.readouterr().err
    assert not archive.exists()
    assert main(["export", "-d", "777", "-o", str(archive)]) == 0
    target = tmp_path / "installed"
    monkeypatch.setenv("nnUNet_results", str(target))
    assert main(["install", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "predict with: samflare predict -i IMAGES -o OUTPUT -d 777" in out
    assert (target / DATASET / SEGMENTER / "fold_1" / "checkpoint_final.pth").is_file()


def corrupt_copy(source: Path, target: Path, member_suffix: str) -> Path:
    """The zip with one byte of the named member's stored data flipped (its CRC no longer matches)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    header = info.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_length + extra_length
    data[start + 100] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def assert_refused(archive: Path, results: Path, capsys, *phrases: str) -> None:
    before = files_below(results) if results.exists() else {}
    assert main(["install", str(archive), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"samflare install: error: {archive.resolve()}")
    for phrase in phrases:
        assert phrase in err
    after = files_below(results) if results.exists() else {}
    assert after == before  # nothing installed, nothing left behind


def test_corrupt_zip_installs_nothing(cascade_zip, tmp_path, capsys):
    target = tmp_path / "target"
    flipped = corrupt_copy(cascade_zip, tmp_path / "flipped.zip", "fold_1/checkpoint_final.pth")
    assert_refused(flipped, target, capsys, "corrupt", "fold_1/checkpoint_final.pth")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(cascade_zip.read_bytes()[: cascade_zip.stat().st_size // 2])
    assert_refused(truncated, target, capsys, "not a zip file")
    not_a_zip = tmp_path / "notes.zip"
    not_a_zip.write_text("hello", encoding="utf-8")
    assert_refused(not_a_zip, target, capsys, "not a zip file")


def test_foreign_zips_install_nothing(results, tmp_path, capsys):
    target = tmp_path / "target"
    # a stock nnU-Net model export: no cascade manifest
    stock = tmp_path / "stock_nnunet_model.zip"
    with zipfile.ZipFile(stock, "w") as archive:
        for path in (results / DATASET / SEGMENTER).rglob("*"):
            if path.is_file():
                archive.write(path, path.relative_to(results).as_posix())
    assert_refused(stock, target, capsys, "not a samflare cascade", "nnUNetv2_install_pretrained_model_from_zip")
    # a manifest that lists a path outside the dataset folder
    manifest = {
        "format": "samflare-cascade",
        "format_version": 1,
        "dataset": DATASET,
        "plans": "samflarePlans",
        "checkpoint": "checkpoint_final.pth",
        "files": {"../../etc/evil": "0" * 64},
        "locator": {"folder": f"{DATASET}/{LOCATOR}"},
        "segmenter": {"folder": f"{DATASET}/{SEGMENTER}"},
    }
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../etc/evil", "x")
        archive.writestr(MANIFEST, json.dumps(manifest))
    assert_refused(evil, target, capsys, "unsafe or foreign member name")
    # a newer format this version cannot read
    future = tmp_path / "future.zip"
    with zipfile.ZipFile(future, "w") as archive:
        archive.writestr(MANIFEST, json.dumps({**manifest, "format_version": 99}))
    assert_refused(future, target, capsys, "format version 99")


def test_existing_other_models_are_kept_unless_overwrite(cascade_zip, results, tmp_path):
    other = tmp_path / "other_machine"
    make_model_folder(other, SEGMENTER, folds=(0, 1), seed=7)
    before = files_below(other)
    with pytest.raises(InputError, match="already installed with other files"):
        install_cascade(cascade_zip, results=other)
    assert files_below(other) == before
    install_cascade(cascade_zip, results=other, overwrite=True)
    assert (other / DATASET / SEGMENTER / "fold_1" / "checkpoint_final.pth").read_bytes() == (
        results / DATASET / SEGMENTER / "fold_1" / "checkpoint_final.pth"
    ).read_bytes()


def test_a_dataset_id_taken_by_another_dataset_is_refused(cascade_zip, tmp_path):
    other = tmp_path / "other_machine"
    (other / "Dataset777_SomethingElse").mkdir(parents=True)
    with pytest.raises(InputError, match="dataset id 777 is already used"):
        install_cascade(cascade_zip, results=other)
    assert not (other / DATASET).exists()


def test_export_refuses_a_missing_model_before_writing(results, tmp_path):
    with pytest.raises(InputError, match="segmenter model folder not found"):
        export_cascade(777, tmp_path / "x.zip", segmenter_trainer="nnUNetTrainer_Nope")
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no zip, no temporary file

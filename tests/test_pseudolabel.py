"""merge / vote / filter of the pseudo-label pipeline: hand-built arrays with known answers, the real partially
labelled CT, and bad input (one line, exit code 2, nothing written)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_samflare.cli import main as samflare_main
from nnunet_samflare.errors import InputError
from nnunet_samflare.pseudolabel.filtering import filter_folder, filter_pseudo_label
from nnunet_samflare.pseudolabel.merge import merge_folders, merge_with_ground_truth
from nnunet_samflare.pseudolabel.probabilities import ProbabilityReader, write_probabilities
from nnunet_samflare.pseudolabel.vote import vote_case, vote_folders

from conftest import data_file, dataset, read_json

GEOMETRY = {"spacing": (1.5, 1.5, 3.0), "origin": (-10.0, 20.0, 5.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}


def write_fold(folder: Path, case: str, probabilities: np.ndarray, geometry: dict = GEOMETRY) -> Path:
    """What --save_probabilities writes: <case>.npz and <case>.pkl (nnU-Net's properties)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities.astype(np.float32))
    properties = {
        "sitk_stuff": {k: tuple(float(x) for x in v) for k, v in geometry.items()},
        "spacing": list(geometry["spacing"][::-1]),
    }
    with open(folder / f"{case}.pkl", "wb") as f:
        pickle.dump(properties, f)
    return folder / f"{case}.npz"


def label_image(array: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(GEOMETRY["spacing"])
        image.SetOrigin(GEOMETRY["origin"])
    return image


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


# -- merge ---------------------------------------------------------------------------------------------------------


def test_merge_hand_built():
    gt = np.array([0, 1, 1, 0, 0, 0, 1, 0])
    pseudo = np.array([3, 3, 1, 1, 2, 0, 0, 15])
    # voxel: 0 pseudo fills | 1, 2, 6 ground truth wins | 3 liver not added where GT says no liver -> 0 |
    #        4 other organ kept | 5 background kept | 7 ignore kept (unknown where GT has nothing to say)
    assert merge_with_ground_truth(gt, pseudo, {1}).tolist() == [3, 1, 1, 0, 2, 0, 1, 15]
    assert merge_with_ground_truth(gt, pseudo, None).tolist() == gt.tolist()  # fully annotated
    # two annotated labels: a pseudo label of either never appears outside the GT's own voxels of it
    gt2 = np.array([0, 1, 2, 0, 2])
    pseudo2 = np.array([2, 2, 1, 3, 0])
    assert merge_with_ground_truth(gt2, pseudo2, {1, 2}).tolist() == [0, 1, 2, 3, 2]


@pytest.mark.parametrize("name", ["partial", "tumor_pseudohu"])
def test_merge_real_partial_cases_keep_every_annotated_voxel(tmp_path, name):
    shutil.copytree(dataset(name) / "labelsTr", tmp_path / "gt")
    shutil.copy(dataset(name) / "dataset.json", tmp_path / "dataset.json")
    (tmp_path / "pseudo").mkdir()
    partial = read_json(dataset(name) / "dataset.json")["partial_labels"]
    rng = np.random.default_rng(0)
    pseudo = {}
    for case in partial:
        gt_image = sitk.ReadImage(str(tmp_path / "gt" / f"{case}.nii.gz"))
        pseudo[case] = rng.integers(0, 15, size=gt_image.GetSize()[::-1])  # disagrees wherever it can
        sitk.WriteImage(label_image(pseudo[case], gt_image), str(tmp_path / "pseudo" / f"{case}.nii.gz"))
    assert (
        samflare_main(
            [
                "pseudolabel",
                "merge",
                "--gt",
                str(tmp_path / "gt"),
                "--pseudo",
                str(tmp_path / "pseudo"),
                "-o",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    for case, labels in partial.items():
        gt_image = sitk.ReadImage(str(tmp_path / "gt" / f"{case}.nii.gz"))
        gt = sitk.GetArrayFromImage(gt_image)
        merged_image = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        merged = sitk.GetArrayFromImage(merged_image)
        annotated = np.isin(gt, labels)
        assert annotated.any()
        assert np.array_equal(merged[annotated], gt[annotated])  # no annotated voxel changes
        assert not np.isin(merged[~annotated], labels).any()  # an annotated label is never added
        others = ~annotated & ~np.isin(pseudo[case], labels)
        assert np.array_equal(merged[others], pseudo[case][others])  # pseudo labels fill the rest
        assert merged_image.GetSize() == gt_image.GetSize()
        np.testing.assert_allclose(merged_image.GetOrigin(), gt_image.GetOrigin())
        record = read_json(tmp_path / "out" / f"{case}_merge.json")
        assert record["provenance"] == "ground_truth+pseudo" and record["annotated"] == labels
        assert record["from_ground_truth"] == int(annotated.sum())


def test_merge_fully_annotated_and_unlabelled_cases(tmp_path):
    gt_dir, pseudo_dir = tmp_path / "gt", tmp_path / "pseudo"
    gt_dir.mkdir()
    pseudo_dir.mkdir()
    shutil.copy(data_file("flare_like", "label", "TSEX_0002"), gt_dir / "TSEX_0002.nii.gz")
    gt = read(gt_dir / "TSEX_0002.nii.gz")
    sitk.WriteImage(
        label_image(np.zeros_like(gt), sitk.ReadImage(str(gt_dir / "TSEX_0002.nii.gz"))),
        str(pseudo_dir / "TSEX_0002.nii.gz"),
    )
    sitk.WriteImage(label_image(np.full((3, 4, 5), 7)), str(pseudo_dir / "UNL_0001.nii.gz"))
    records = merge_folders(gt_dir, pseudo_dir, tmp_path / "out")  # no dataset.json: every GT is complete
    assert records["TSEX_0002"]["provenance"] == "ground_truth"
    assert np.array_equal(read(tmp_path / "out" / "TSEX_0002.nii.gz"), gt)
    assert records["UNL_0001"]["provenance"] == "pseudo"
    assert np.all(read(tmp_path / "out" / "UNL_0001.nii.gz") == 7)


# -- vote ----------------------------------------------------------------------------------------------------------


def test_vote_averages_streams_and_reports_agreement(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5, 6, 7)) * 3
    folds = [softmax(fold).astype(np.float32) for fold in logits]
    files = [write_fold(tmp_path / f"fold_{k}", "case", p) for k, p in enumerate(folds)]
    record = vote_case(files, tmp_path / "voted", "case", ".nii.gz")

    mean = (folds[0] + folds[1]) / 2
    voted = read(tmp_path / "voted" / "case.nii.gz")
    assert np.array_equal(voted, mean.argmax(0))
    np.testing.assert_array_equal(np.load(tmp_path / "voted" / "case.npz")["probabilities"], mean)
    labels = [f.argmax(0) for f in folds]
    agree = labels[0] == labels[1]
    assert agree.any() and not agree.all()
    assert np.array_equal(voted[agree], labels[0][agree])  # where both folds agree, their label stays
    for label in range(4):
        both = int(((labels[0] == label) & (labels[1] == label)).sum())
        either = int((labels[0] == label).sum() + (labels[1] == label).sum())
        assert record["agreement"].get(str(label), [0, 0]) == ([both, either] if either else [0, 0])
    image = sitk.ReadImage(str(tmp_path / "voted" / "case.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), GEOMETRY["spacing"])
    np.testing.assert_allclose(image.GetOrigin(), GEOMETRY["origin"])


def test_vote_equals_nnunet_ensembling(tmp_path):
    """nnU-Net's own ensembling (``nnUNetv2_ensemble``'s ``merge_files``) loads each fold whole; the streaming vote
    must give the same label map and averaged probabilities."""
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    rng = np.random.default_rng(7)
    files = [write_fold(tmp_path / f"fold_{k}", "case", softmax(rng.normal(size=(5, 6, 7, 8)) * 2)) for k in range(3)]
    vote_case(files, tmp_path / "ours", "case", ".nii.gz")
    (tmp_path / "nnunet").mkdir()
    merge_files(
        [str(f) for f in files],
        str(tmp_path / "nnunet" / "case"),
        ".nii.gz",
        SimpleITKIO(),
        LabelManager({"background": 0, **{f"c{i}": i for i in range(1, 5)}}, None),
        save_probabilities=True,
    )
    assert files_equal_arrays(tmp_path / "ours" / "case.nii.gz", tmp_path / "nnunet" / "case.nii.gz")
    np.testing.assert_array_equal(
        np.load(tmp_path / "ours" / "case.npz")["probabilities"],
        np.load(tmp_path / "nnunet" / "case.npz")["probabilities"],
    )


def files_equal_arrays(a: Path, b: Path) -> bool:
    return np.array_equal(read(a), read(b))


def test_vote_of_one_fold_is_its_argmax_and_equal_probabilities_keep_the_lower_class(tmp_path):
    probabilities = np.zeros((3, 1, 1, 4), dtype=np.float32)
    probabilities[:, 0, 0, 0] = [0.2, 0.4, 0.4]  # tie: the lower class wins, as np.argmax
    probabilities[:, 0, 0, 1] = [0.1, 0.1, 0.8]
    probabilities[:, 0, 0, 2] = [1.0, 0.0, 0.0]
    probabilities[:, 0, 0, 3] = [0.3, 0.6, 0.1]
    vote_case([write_fold(tmp_path / "f", "c", probabilities)], tmp_path / "v", "c", ".nii.gz")
    assert read(tmp_path / "v" / "c.nii.gz").ravel().tolist() == [1, 2, 0, 1]
    assert np.array_equal(np.load(tmp_path / "v" / "c.npz")["probabilities"], probabilities)


def test_written_probabilities_are_reproducible_and_streamable(tmp_path):
    array = np.random.default_rng(2).random((3, 4, 5, 6), dtype=np.float32)
    write_probabilities(tmp_path / "a.npz", array.shape, iter(array))
    write_probabilities(tmp_path / "b.npz", array.shape, iter(array))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    reader = ProbabilityReader(tmp_path / "a.npz")
    assert reader.shape == array.shape
    assert np.array_equal(np.stack(list(reader.channels())), array)


@pytest.mark.parametrize("what", ["shape", "spacing"])
def test_vote_names_the_fold_that_does_not_fit_and_writes_nothing(tmp_path, capsys, what):
    good = softmax(np.random.default_rng(3).normal(size=(3, 4, 5, 6))).astype(np.float32)
    write_fold(tmp_path / "fold_0", "case", good)
    if what == "shape":
        write_fold(tmp_path / "fold_1", "case", good[:, :3])
    else:
        write_fold(tmp_path / "fold_1", "case", good, dict(GEOMETRY, spacing=(1.5, 1.5, 2.0)))
    out = tmp_path / "out"
    code = samflare_main(
        ["pseudolabel", "vote", "-i", str(tmp_path / "fold_0"), str(tmp_path / "fold_1"), "-o", str(out)]
    )
    message = capsys.readouterr().err.strip()
    assert code == 2 and len(message.splitlines()) == 1
    assert str(tmp_path / "fold_1" / ("case.npz" if what == "shape" else "case.pkl")) in message
    assert "differ" in message
    assert not out.exists()


def test_vote_refuses_a_case_missing_from_a_fold(tmp_path):
    good = softmax(np.random.default_rng(4).normal(size=(3, 2, 2, 2))).astype(np.float32)
    for case in ("a", "b"):
        write_fold(tmp_path / "fold_0", case, good)
    write_fold(tmp_path / "fold_1", "a", good)
    with pytest.raises(InputError, match="fold_1/b.npz: missing"):
        vote_folders([tmp_path / "fold_0", tmp_path / "fold_1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- filter --------------------------------------------------------------------------------------------------------


def test_confidence_threshold_ignores_exactly_the_voxels_below_it():
    rng = np.random.default_rng(5)
    segmentation = np.zeros((6, 8, 8), dtype=np.uint8)
    segmentation[1:5, 2:6, 2:6] = 1  # one liver block, one component: post-processing leaves it alone
    winning = rng.uniform(0.3, 1.0, size=segmentation.shape).astype(np.float32)
    winning[0, 0, 0] = np.float32(0.9)  # exactly at the threshold: kept
    filtered, ignored = filter_pseudo_label(segmentation, winning, 0.9, 15)
    low = winning < np.float32(0.9)
    assert np.array_equal(filtered == 15, low)
    assert np.array_equal(filtered[~low], segmentation[~low])
    assert ignored == {str(k): int(((segmentation == k) & low).sum()) for k in (0, 1)}


def test_filter_applies_the_paper_postprocessing_before_the_confidence_step():
    segmentation = np.zeros((5, 12, 12), dtype=np.uint8)
    segmentation[1:4, 1:5, 1:5] = 3  # spleen, largest component
    segmentation[2, 9, 9] = 3  # a stray spleen voxel: removed (largest component per organ)
    segmentation[2, 9, 1] = 14  # a tumor touching no organ: removed
    winning = np.ones(segmentation.shape, dtype=np.float32)
    filtered, ignored = filter_pseudo_label(segmentation, winning, 0.5, 15)
    assert filtered[2, 9, 9] == 0 and filtered[2, 9, 1] == 0
    assert (filtered == 3).sum() == 48 and ignored == {}


def test_filter_folder_reports_ignored_voxels_per_label(tmp_path, capsys):
    probabilities = np.zeros((3, 2, 3, 4), dtype=np.float32)
    probabilities[0] = 0.6
    probabilities[1] = 0.4
    probabilities[:, 1, :, :2] = np.array([0.05, 0.95, 0.0])[:, None, None]  # confident label 1 there
    write_fold(tmp_path / "voted", "c", probabilities)
    sitk.WriteImage(label_image(probabilities.argmax(0)), str(tmp_path / "voted" / "c.nii.gz"))
    assert (
        samflare_main(
            [
                "pseudolabel",
                "filter",
                "-i",
                str(tmp_path / "voted"),
                "-o",
                str(tmp_path / "out"),
                "--confidence",
                "0.9",
                "--no_postprocessing",
            ]
        )
        == 0
    )
    filtered = read(tmp_path / "out" / "c.nii.gz")
    assert (filtered == 3).sum() == 18 and (filtered == 1).sum() == 6  # ignore label = 3 classes = max label + 1
    assert read_json(tmp_path / "out" / "c_filter.json")["ignored"] == {"0": 18}
    assert "ignored voxels per label: 0: 18" in capsys.readouterr().out


def test_filter_refuses_probabilities_of_another_shape(tmp_path):
    write_fold(tmp_path / "voted", "c", np.full((3, 2, 3, 4), 1 / 3, dtype=np.float32))
    sitk.WriteImage(label_image(np.zeros((2, 3, 5))), str(tmp_path / "voted" / "c.nii.gz"))
    with pytest.raises(InputError, match=r"c.npz: probabilities of spatial shape \(2, 3, 4\) do not fit"):
        filter_folder(tmp_path / "voted", tmp_path / "out", confidence=0.9)
    assert not (tmp_path / "out").exists()


# -- bad partial_labels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partial_labels", "message"),
    [
        ({"DCMQI_0001": [1], "GONE_0001": [5]}, "names case 'GONE_0001', which is not in the dataset"),
        ({"DCMQI_0001": [1], "TSAO_0001": [16]}, "names label 16, which is not a foreground label"),
    ],
)
def test_merge_refuses_bad_partial_labels_and_writes_nothing(tmp_path, capsys, partial_labels, message):
    shutil.copytree(dataset("partial") / "labelsTr", tmp_path / "gt")
    shutil.copytree(dataset("partial") / "labelsTr", tmp_path / "pseudo")
    data = read_json(dataset("partial") / "dataset.json")
    data["partial_labels"] = partial_labels
    (tmp_path / "dataset.json").write_text(__import__("json").dumps(data), encoding="utf-8")
    code = samflare_main(
        [
            "pseudolabel",
            "merge",
            "--gt",
            str(tmp_path / "gt"),
            "--pseudo",
            str(tmp_path / "pseudo"),
            "-o",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "dataset.json") in err and message in err
    assert not (tmp_path / "out").exists()


# -- run plumbing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [1, 2, 3, 7])
def test_parts_hold_every_case_exactly_once_in_nnunet_order(num_parts):
    from nnunet_samflare.inference.parts import select_part

    cases = [f"case_{i:02d}" for i in range(5)]
    parts = [select_part(cases, num_parts, part) for part in range(num_parts)]
    assert sorted(c for part in parts for c in part) == cases
    assert parts[0] == cases[::num_parts]  # nnU-Net: list_of_lists[part_id::num_parts]


def test_state_file_refuses_a_rerun_with_other_settings(tmp_path):
    from nnunet_samflare.pseudolabel.state import RunState

    state = RunState.open(tmp_path, {"rounds": 3, "device": "cuda"})
    state.record("prepare", 1.0)
    again = RunState.open(tmp_path, {"rounds": 3, "device": "cpu"})  # where it runs may change
    assert again.invocation == 2 and again.done("prepare") and again.steps["prepare"]["invocation"] == 1
    with pytest.raises(InputError, match=r"other settings \(rounds: 3 -> 2\)"):
        RunState.peek(tmp_path, {"rounds": 2, "device": "cpu"})


# -- run: bad input, refused before anything is written ----------------------------------------------------------


def _run_source(root: Path, monkeypatch, partial_labels: dict | None = None) -> dict[str, Path]:
    """A partially labelled raw dataset (the real partial cases), a stand-in for its plans (the refusals below
    come before any plan is read, except the output-folder one, which needs only the configuration names) and a
    folder with one unlabelled scan; nnU-Net's folders point there."""
    import json

    raw = root / "raw" / "Dataset530_PLSource"
    for kind in ("imagesTr", "labelsTr"):
        shutil.copytree(dataset("partial") / kind, raw / kind)
    data = read_json(dataset("partial") / "dataset.json")
    if partial_labels is not None:
        data["partial_labels"] = partial_labels
    (raw / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    plans = root / "preprocessed" / "Dataset530_PLSource" / "samflarePlans.json"
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"configurations": {"3d_locator": {}, "3d_segmenter": {}}}), encoding="utf-8")
    (root / "results").mkdir()
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    shutil.copy(data_file("flare_like", "image", "TSEX_0002"), unlabelled / "UNL_0001_0000.nii.gz")
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))
    return {"raw": raw, "unlabelled": unlabelled}


def _shift_origin(path: Path, mm: float) -> None:
    image = sitk.ReadImage(str(path))
    image.SetOrigin(tuple(o + mm for o in image.GetOrigin()))
    sitk.WriteImage(image, str(path))


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("folds", "--folds must be at least 2, not 1"),
        ("empty_unlabelled", "empty: no images found"),
        ("missing_unlabelled", "nowhere: unlabelled-scan folder not found"),
        ("confidence", "--confidence must be in (0, 1], not 1.5"),
        ("partial_case", "dataset.json: partial_labels names case 'GONE_0001', which is not in the dataset"),
        (
            "partial_label",
            "dataset.json: partial_labels of 'TSAO_0001' names label 16, which is not a foreground label",
        ),
        ("2d_unlabelled", "UNL_0002_0000.nii.gz: 2-D image"),
        ("work_in_unlabelled", "output folder is inside the input folder"),
        ("shifted_partial_label", "labelsTr/TSAO_0001.nii.gz: origin ("),
    ],
)
def test_run_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case, message):
    partial_labels = {
        "partial_case": {"DCMQI_0001": [1], "GONE_0001": [5]},
        "partial_label": {"DCMQI_0001": [1], "TSAO_0001": [16]},
    }.get(case)
    folders = _run_source(tmp_path / "nnunet", monkeypatch, partial_labels)
    unlabelled, work = folders["unlabelled"], tmp_path / "work"
    extra = {"folds": ["--folds", "1"], "confidence": ["--confidence", "1.5"]}.get(case, [])
    if case == "empty_unlabelled":
        unlabelled = tmp_path / "empty"
        unlabelled.mkdir()
    elif case == "missing_unlabelled":
        unlabelled = tmp_path / "nowhere"
    elif case == "2d_unlabelled":
        sitk.WriteImage(sitk.Image([20, 30], sitk.sitkInt16), str(unlabelled / "UNL_0002_0000.nii.gz"))
    elif case == "work_in_unlabelled":
        work = unlabelled / "work"
    elif case == "shifted_partial_label":  # half a millimetre off its image: found now, not in round 1's merge
        _shift_origin(folders["raw"] / "labelsTr" / "TSAO_0001.nii.gz", 0.5)
    before = _snapshot(tmp_path)
    code = samflare_main(
        [
            "pseudolabel",
            "run",
            "-d",
            "Dataset530_PLSource",
            "--unlabeled",
            str(unlabelled),
            "-o",
            str(work),
            "-device",
            "cpu",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert _snapshot(tmp_path) == before and not work.exists()


def test_run_api_refuses_a_locator_folder_that_is_no_model(tmp_path, monkeypatch):
    from nnunet_samflare.pseudolabel.run import RunSettings, run_pseudolabel

    folders = _run_source(tmp_path / "nnunet", monkeypatch)
    before = _snapshot(tmp_path)
    with pytest.raises(InputError, match="not a trained nnU-Net model folder"):
        run_pseudolabel(
            RunSettings(
                dataset="Dataset530_PLSource",
                unlabeled=str(folders["unlabelled"]),
                locator=str(tmp_path / "nnunet" / "results"),
                device="cpu",
                work_dir=str(tmp_path / "work"),
            )
        )
    assert _snapshot(tmp_path) == before


# -- found in review (2026-12-07) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_label", [0, -1, 256, 300])
def test_filter_refuses_an_ignore_label_that_no_uint8_label_map_holds(tmp_path, capsys, ignore_label):
    write_fold(tmp_path / "voted", "c", np.full((3, 2, 3, 4), 1 / 3, dtype=np.float32))
    sitk.WriteImage(label_image(np.zeros((2, 3, 4))), str(tmp_path / "voted" / "c.nii.gz"))
    args = ["pseudolabel", "filter", "-i", str(tmp_path / "voted"), "-o", str(tmp_path / "out")]
    assert samflare_main([*args, "--confidence", "0.9", "--ignore_label", str(ignore_label)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"samflare pseudolabel: error: --ignore_label must be in 1..255 (label maps are uint8), not {ignore_label}"
    ]
    assert not (tmp_path / "out").exists()


def test_filter_finds_a_label_at_or_above_the_ignore_label_in_any_case_before_writing(tmp_path):
    for case, top in (("a", 1), ("b", 5)):
        write_fold(tmp_path / "voted", case, np.full((3, 2, 3, 4), 1 / 3, dtype=np.float32))
        labels = np.zeros((2, 3, 4))
        labels[0, 0, 0] = top
        sitk.WriteImage(label_image(labels), str(tmp_path / "voted" / f"{case}.nii.gz"))
    with pytest.raises(InputError, match=r"b.nii.gz: label 5 is not below the ignore label 4"):
        filter_folder(tmp_path / "voted", tmp_path / "out", confidence=0.9, ignore_label=4, postprocess=False)
    assert not (tmp_path / "out").exists()  # case a was not written first
    with pytest.raises(InputError, match=r"b.nii.gz: label 5 is not below the ignore label 3"):  # 3 classes
        filter_folder(tmp_path / "voted", tmp_path / "out", confidence=0.9, postprocess=False)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_probability_file_is_bad_input_wherever_it_is_corrupt(tmp_path):
    # Some corruptions of a deflate stream raise zlib.error before the zip's CRC check: those are bad input too.
    rng = np.random.default_rng(0)
    probabilities = softmax(rng.normal(size=(3, 8, 16, 16)).astype(np.float32))
    npz = write_fold(tmp_path / "f", "c", probabilities)
    original = npz.read_bytes()
    outcomes = set()
    for offset in range(60, len(original) - 200, max(1, (len(original) - 260) // 120)):
        npz.write_bytes(original[:offset] + bytes(16) + original[offset + 16 :])
        try:
            reader = ProbabilityReader(npz)
            for _ in reader.channels():
                pass
            outcomes.add("read")  # the corruption hit nothing that is checked (e.g. padding)
        except InputError as error:
            assert str(error).startswith(f"{npz}: cannot read probabilities (")
            outcomes.add("bad input")
    assert "bad input" in outcomes


def test_a_probability_file_without_the_array_is_named_once(tmp_path):
    npz = tmp_path / "c.npz"
    np.savez_compressed(npz, softmax=np.zeros((2, 1, 1, 1), dtype=np.float32))
    with pytest.raises(InputError) as caught:
        ProbabilityReader(npz)
    assert str(caught.value).count(str(npz)) == 1
    assert "no 'probabilities' array (found softmax.npy)" in str(caught.value)


def test_torn_checkpoints_are_removed_so_that_a_rerun_resumes_from_an_intact_one(tmp_path):
    import torch

    from nnunet_samflare.pseudolabel.run import remove_torn_checkpoints

    torch.save({"current_epoch": 3}, tmp_path / "checkpoint_latest.pth")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"PK\x03\x04 torn by a kill")
    (tmp_path / "checkpoint_final.pth").write_bytes(b"")
    removed = remove_torn_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]


def test_part_commands_name_absolute_folders(tmp_path, monkeypatch):
    from nnunet_samflare.pseudolabel.run import PseudoLabelRun, RunSettings

    folders = _run_source(tmp_path / "nnunet", monkeypatch)
    locator = tmp_path / "locator"  # what the checks before any work look at
    (locator / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "fold_all/checkpoint_final.pth"):
        (locator / name).write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    settings = RunSettings(
        dataset="Dataset530_PLSource", unlabeled=str(folders["unlabelled"]), locator="locator", work_dir="work"
    )
    run = PseudoLabelRun(settings)
    # predict_parts.sh holds these: a cluster job starts elsewhere
    assert run.work_dir == tmp_path / "work" and run.locator_dir() == locator


def test_merge_finds_a_pseudo_label_off_its_partial_ground_truth_before_writing(tmp_path, capsys):
    shutil.copytree(dataset("partial") / "labelsTr", tmp_path / "gt")
    shutil.copytree(dataset("partial") / "labelsTr", tmp_path / "pseudo")
    shutil.copy(dataset("partial") / "dataset.json", tmp_path / "dataset.json")
    (last,) = sorted((tmp_path / "pseudo").glob("TSAO_0001.nii.gz"))
    _shift_origin(last, 0.5)
    args = ["pseudolabel", "merge", "--gt", str(tmp_path / "gt"), "--pseudo", str(tmp_path / "pseudo")]
    assert samflare_main([*args, "-o", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{last}: origin (" in line and "differs from" in line
    assert not (tmp_path / "out").exists()  # DCMQI_0001, merged first, was not written either


def test_every_round_holds_out_the_same_labelled_cases_per_fold(tmp_path, monkeypatch):
    # --warm-start starts round r's fold k from round r-1's fold k: its held-out cases must be the same ones
    from nnunet_samflare.pseudolabel.run import PseudoLabelRun, RunSettings

    folders = _run_source(tmp_path / "nnunet", monkeypatch)
    run = PseudoLabelRun(
        RunSettings(
            dataset="Dataset530_PLSource",
            unlabeled=str(folders["unlabelled"]),
            work_dir=str(tmp_path / "work"),
            rounds=3,
        )
    )
    first = run.splits(1)
    assert sorted(c for s in first for c in s["val"]) == sorted(run.source.labels)
    for r in (2, 3):
        splits = run.splits(r)
        assert [s["val"] for s in splits] == [s["val"] for s in first]
        for split, before in zip(splits, first):
            assert split["train"] == sorted([*before["train"], *run.unlabelled])


@pytest.mark.parametrize("root", ["raw", "preprocessed", "results"])
def test_a_run_without_state_refuses_round_datasets_an_earlier_run_left(tmp_path, monkeypatch, root):
    # The work folder (and its state.json) was deleted, the round datasets and models were not: a new run with
    # other settings would otherwise skip their steps and reuse them.
    from nnunet_samflare.pseudolabel.run import PseudoLabelRun, RunSettings

    folders = _run_source(tmp_path / "nnunet", monkeypatch)
    left = tmp_path / "nnunet" / root / "Dataset631_PLSourcePL1"
    left.mkdir(parents=True)
    before = _snapshot(tmp_path)
    settings = RunSettings(
        dataset="Dataset530_PLSource", unlabeled=str(folders["unlabelled"]), work_dir=str(tmp_path / "work")
    )
    with pytest.raises(InputError, match="left by an earlier run whose work folder .* has no state.json") as caught:
        PseudoLabelRun(settings)
    assert caught.value.path == str(left) or str(caught.value).startswith(str(left))
    assert _snapshot(tmp_path) == before

"""FLARE23 post-processing (docs/method.md §5.6): every rule on hand-built label maps, the real tumor cases, the
nnU-Net postprocessing.pkl route through stock nnUNetv2_apply_postprocessing, and `samflare postprocess`."""

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_samflare.cli import main as samflare_main
from nnunet_samflare.inference.postprocessing import (
    keep_largest_component_per_organ,
    nnunet_postprocessing_steps,
    postprocess_flare,
    remove_isolated_tumors,
    write_nnunet_postprocessing_pkl,
)
from nnunet_samflare.inference.roi import remove_small_components

from conftest import data_file

TUMOR_LABELS = [data_file("tumor_pseudohu", "label", f"DLPS_{i:04d}") for i in range(1, 7)]
LIVER, KIDNEY, SPLEEN, TUMOR = 1, 2, 3, 14


def empty(shape=(20, 20, 20)):
    return np.zeros(shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Largest component per organ


def test_two_organ_components_keeps_the_largest():
    seg = empty()
    seg[2:5, 2:5, 2:5] = LIVER  # 27 voxels
    seg[12:14, 12:14, 12:14] = LIVER  # 8 voxels, far away
    out = keep_largest_component_per_organ(seg)
    assert (out[2:5, 2:5, 2:5] == LIVER).all()
    assert (out[12:14, 12:14, 12:14] == 0).all()
    assert (out == LIVER).sum() == 27


def test_diagonal_voxels_are_one_component_26_connectivity():
    seg = empty()
    seg[5, 5, 5] = seg[6, 6, 6] = seg[7, 7, 7] = KIDNEY  # corner-touching chain: one 26-component of 3
    seg[15, 15, 2:4] = KIDNEY  # face-connected pair: 2 voxels
    out = keep_largest_component_per_organ(seg)
    # With 6-connectivity the chain would be three single voxels and the pair would win.
    assert out[5, 5, 5] == out[6, 6, 6] == out[7, 7, 7] == KIDNEY
    assert (out[15, 15, 2:4] == 0).all()


def test_each_organ_is_filtered_independently():
    seg = empty()
    seg[2:8, 2:8, 2:8] = LIVER
    seg[8, 4, 4] = SPLEEN  # touches the liver: must not join the liver's component
    seg[14:16, 14:16, 14:16] = SPLEEN  # the larger spleen component
    seg[0, 19, 19] = KIDNEY  # a lone kidney voxel is the kidney's largest component
    out = keep_largest_component_per_organ(seg)
    assert out[8, 4, 4] == 0
    assert (out[14:16, 14:16, 14:16] == SPLEEN).all()
    assert (out[2:8, 2:8, 2:8] == LIVER).all()
    assert out[0, 19, 19] == KIDNEY


def test_tumor_is_not_size_filtered_by_lcc():
    seg = empty()
    seg[2:6, 2:6, 2:6] = TUMOR
    seg[12, 12, 12] = TUMOR
    out = keep_largest_component_per_organ(seg)
    np.testing.assert_array_equal(out, seg)


# ---------------------------------------------------------------------------------------------------------------
# Isolated-tumor removal


def test_tumor_touching_an_organ_diagonally_is_kept():
    seg = empty()
    seg[10:13, 10:13, 10:13] = LIVER
    seg[9, 9, 9] = TUMOR  # its only organ neighbour is the liver's corner voxel (10, 10, 10)
    out = remove_isolated_tumors(seg)
    np.testing.assert_array_equal(out, seg)


def test_tumor_one_voxel_away_from_an_organ_is_removed():
    seg = empty()
    seg[10:13, 10:13, 10:13] = LIVER
    seg[8, 8, 8] = TUMOR  # nearest organ voxel (10, 10, 10) is two steps away: outside the 3x3x3 dilation
    seg[4:6, 15:17, 3:5] = TUMOR  # far away, isolated
    out = remove_isolated_tumors(seg)
    assert (out == TUMOR).sum() == 0
    assert (out == LIVER).sum() == 27  # organs untouched, nothing else deleted


def test_tumors_whose_dilations_merge_are_judged_together():
    seg = empty((12, 12, 30))
    seg[4:8, 4:8, 0:3] = LIVER
    seg[5, 5, 3:5] = TUMOR  # face contact with the liver (x = 2); dilation covers x = 2..5
    seg[5, 5, 7] = TUMOR  # no organ near; its dilation x = 6..8 is face-adjacent to 2..5: judged with the first
    seg[5, 5, 11] = TUMOR  # dilation x = 10..12, separated from 6..8 by x = 9: judged alone, removed
    out = remove_isolated_tumors(seg)
    assert out[5, 5, 3] == out[5, 5, 4] == out[5, 5, 7] == TUMOR
    assert out[5, 5, 11] == 0


def test_dilated_components_use_6_connectivity():
    seg = empty()
    seg[2:5, 2:5, 2:5] = LIVER
    seg[5, 5, 5] = TUMOR  # corner contact with the liver: kept
    # Dilations [4..6]^3 and [7..9]^3 meet only at a corner, so they are two 6-connected components:
    # this tumor touches no organ and goes. (With 26-connectivity it would be merged and kept.)
    seg[8, 8, 8] = TUMOR
    out = remove_isolated_tumors(seg)
    assert out[5, 5, 5] == TUMOR
    assert out[8, 8, 8] == 0


def test_kept_tumors_are_not_dilated_and_other_labels_untouched():
    seg = empty()
    seg[2:6, 2:6, 2:6] = SPLEEN
    seg[6:8, 3:5, 3:5] = TUMOR
    out = remove_isolated_tumors(seg)
    np.testing.assert_array_equal(out, seg)


def test_removal_needs_the_label_set_to_be_exactly_background_and_tumor():
    # The reference deletes a dilated component only when the labels under it are exactly {0, 14}.
    all_tumor = np.full((4, 4, 4), TUMOR, dtype=np.uint8)  # label set {14}: kept
    np.testing.assert_array_equal(remove_isolated_tumors(all_tumor), all_tumor)
    seg = empty()
    seg[5, 5, 5] = TUMOR
    seg[5, 5, 6] = 15  # some other (non-organ) label: {0, 14, 15} is not {0, 14}, kept
    np.testing.assert_array_equal(remove_isolated_tumors(seg), seg)


def test_organ_fragment_removed_by_lcc_no_longer_counts_as_contact():
    seg = empty()
    seg[1:9, 1:9, 1:9] = SPLEEN  # main spleen
    seg[15, 15, 15] = SPLEEN  # false-positive fragment...
    seg[16, 16, 16] = TUMOR  # ...that is the tumor's only contact
    assert remove_isolated_tumors(seg)[16, 16, 16] == TUMOR  # without LCC the fragment counts
    out = postprocess_flare(seg)
    assert out[15, 15, 15] == 0 and out[16, 16, 16] == 0
    assert (out[1:9, 1:9, 1:9] == SPLEEN).all()


def test_inputs_unchanged_and_dtype_kept_for_nnunet_float_maps():
    seg = empty()
    seg[2:5, 2:5, 2:5] = LIVER
    seg[10, 10, 10] = LIVER
    seg[15, 15, 15] = TUMOR
    before = seg.copy()
    expected = postprocess_flare(seg)
    as_float = seg.astype(np.float32)  # nnU-Net's read_seg hands float32 to pp functions
    out = postprocess_flare(as_float)
    np.testing.assert_array_equal(seg, before)
    np.testing.assert_array_equal(as_float, before)
    assert out.dtype == np.float32 and expected.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert expected[10, 10, 10] == 0 and expected[15, 15, 15] == 0
    with pytest.raises(ValueError, match="whole numbers"):
        postprocess_flare(np.full((3, 3, 3), 1.5, dtype=np.float32))


def _literal_reference(seg):
    """docs/method.md §5.6 transcribed step by step with scipy, one label and one component at a time (slow, clear)."""
    from scipy import ndimage

    out = seg.copy()
    for organ in range(1, 14):
        components, n = ndimage.label(out == organ, structure=np.ones((3, 3, 3)))
        if n > 1:
            sizes = ndimage.sum_labels(np.ones_like(components), components, index=range(1, n + 1))
            out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    if (out == TUMOR).any():
        dilated = ndimage.binary_dilation(out == TUMOR, structure=np.ones((3, 3, 3)), iterations=1)
        components, n = ndimage.label(dilated)  # scipy's default structure: 6-connectivity
        for i in range(1, n + 1):
            region = components == i
            if set(np.unique(out[region]).tolist()) == {0, TUMOR}:
                out[region] = 0
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_literal_transcription_of_the_reference(seed):
    rng = np.random.default_rng(seed)
    # Sparse random blobs of a few organs and tumor: many components, contacts, merges and ties.
    seg = np.zeros((18, 20, 22), dtype=np.uint8)
    for _ in range(40):
        z, y, x = rng.integers(0, (18, 20, 22))
        size = rng.integers(1, 4, size=3)
        seg[z : z + size[0], y : y + size[1], x : x + size[2]] = rng.choice([1, 2, 5, 11, 14, 14, 14])
    expected = _literal_reference(seg)
    assert not np.array_equal(expected, seg)
    np.testing.assert_array_equal(postprocess_flare(seg), expected)


# ---------------------------------------------------------------------------------------------------------------
# Real tumor cases: tumor only, no organs


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("path", TUMOR_LABELS, ids=lambda p: p.name.split(".")[0])
def test_real_tumor_only_cases_lose_every_tumor(path):
    seg = _read(path)
    assert (seg == TUMOR).any()
    out = postprocess_flare(seg)
    assert not (out == TUMOR).any()
    assert not out.any()


def _organ_next_to_tumor(seg, gap):
    """Put one liver voxel at chessboard distance 1 + gap from the tumor (gap 0: in its 26-neighbourhood)."""
    from scipy import ndimage

    tumor = seg == TUMOR
    ring_inner = ndimage.binary_dilation(tumor, np.ones((3, 3, 3)), iterations=gap) if gap else tumor
    ring = ndimage.binary_dilation(ring_inner, np.ones((3, 3, 3))) & ~ring_inner
    z, y, x = np.argwhere(ring)[0]
    out = seg.copy()
    out[z, y, x] = LIVER
    return out


@pytest.mark.parametrize("path", TUMOR_LABELS[:2], ids=lambda p: p.name.split(".")[0])
def test_real_tumor_kept_once_an_organ_is_adjacent(path):
    seg = _read(path)
    touching = _organ_next_to_tumor(seg, gap=0)
    np.testing.assert_array_equal(postprocess_flare(touching), touching)
    one_voxel_gap = _organ_next_to_tumor(seg, gap=1)
    out = postprocess_flare(one_voxel_gap)
    assert not (out == TUMOR).any() and (out == LIVER).sum() == 1


# ---------------------------------------------------------------------------------------------------------------
# nnU-Net integration


def test_pkl_holds_picklable_module_functions(tmp_path):
    pkl = write_nnunet_postprocessing_pkl(tmp_path / "postprocessing.pkl")
    with open(pkl, "rb") as f:
        fns, kwargs = pickle.load(f)
    assert [fn.__module__ for fn in fns] == ["nnunet_samflare.inference.postprocessing"] * 2
    assert [fn.__name__ for fn in fns] == ["keep_largest_component_per_organ", "remove_isolated_tumors"]
    assert (fns, kwargs) == nnunet_postprocessing_steps()

    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    seg = empty()
    seg[1:9, 1:9, 1:9] = SPLEEN
    seg[15, 15, 15] = SPLEEN
    seg[16, 16, 16] = TUMOR
    seg[5, 5, 9] = TUMOR
    np.testing.assert_array_equal(apply_postprocessing(seg.astype(np.float32), fns, kwargs), postprocess_flare(seg))


def _write_label(array, path, spacing=(0.8, 0.7, 2.5), direction=(0, 1, 0, 1, 0, 0, 0, 0, -1)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 30.0, 101.25))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)
    return image


def _hand_built_case():
    seg = empty((12, 24, 30))
    seg[2:8, 2:12, 2:12] = LIVER
    seg[9, 20, 25] = LIVER
    seg[3:5, 12:14, 5:7] = TUMOR  # face contact with the liver (y = 11): kept
    seg[6:8, 20:22, 20:22] = TUMOR  # isolated: removed
    seg[10, 2:4, 20:23] = KIDNEY
    return seg


def test_stock_nnunet_apply_postprocessing_matches(tmp_path):
    """The pkl through `nnUNetv2_apply_postprocessing` (spawned worker, float32 maps, write_seg) gives exactly
    what postprocess_flare gives."""
    exe = shutil.which("nnUNetv2_apply_postprocessing", path=str(Path(sys.executable).parent))
    assert exe is not None, "nnunetv2 console script missing from the environment"
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    cases = {"hand": _hand_built_case(), "real": _organ_next_to_tumor(_read(TUMOR_LABELS[1]), gap=0)}
    cases["real"][0, :4, :4] = TUMOR  # plus an isolated tumor in the real map, to be removed
    for name, seg in cases.items():
        _write_label(seg, src / f"{name}.nii.gz")
    pkl = write_nnunet_postprocessing_pkl(tmp_path / "postprocessing.pkl")
    (tmp_path / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}), encoding="utf-8")
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}), encoding="utf-8")
    cmd = [exe, "-i", str(src), "-o", str(dst), "-pp_pkl_file", str(pkl), "-np", "1"]
    cmd += ["-plans_json", str(tmp_path / "plans.json"), "-dataset_json", str(tmp_path / "dataset.json")]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, seg in cases.items():
        expected = postprocess_flare(seg)
        assert not np.array_equal(expected, seg)  # the case exercises the post-processing
        np.testing.assert_array_equal(_read(dst / f"{name}.nii.gz"), expected)


# ---------------------------------------------------------------------------------------------------------------
# `samflare postprocess`


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_postprocess_folder_keeps_format_and_geometry(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    seg = _hand_built_case()
    written = {
        "a.nii.gz": _write_label(seg, src / "a.nii.gz"),
        "b.mha": _write_label(seg[::-1].copy(), src / "b.mha"),
    }
    hashes = {name: _sha(src / name) for name in written}
    assert (
        samflare_main(["postprocess", "-i", str(src), "-o", str(dst), "--write-nnunet-pkl", str(tmp_path / "pp.pkl")])
        == 0
    )
    assert sorted(p.name for p in dst.iterdir()) == ["a.nii.gz", "b.mha"]  # no temporaries left
    for name, original in written.items():
        out = sitk.ReadImage(str(dst / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), postprocess_flare(sitk.GetArrayFromImage(original)))
        assert out.GetSpacing() == pytest.approx(original.GetSpacing())
        assert out.GetOrigin() == pytest.approx(original.GetOrigin())
        assert out.GetDirection() == pytest.approx(original.GetDirection())
        assert _sha(src / name) == hashes[name]  # inputs never modified
    with open(tmp_path / "pp.pkl", "rb") as f:
        assert pickle.load(f) == nnunet_postprocessing_steps()


def test_cli_postprocess_pkl_only_and_argument_errors(tmp_path):
    assert samflare_main(["postprocess", "--write-nnunet-pkl", str(tmp_path / "postprocessing.pkl")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["postprocessing.pkl"]
    with pytest.raises(SystemExit) as e:
        samflare_main(["postprocess", "-i", str(tmp_path)])  # -o missing
    assert e.value.code == 2


def test_cli_postprocess_single_file_to_file(tmp_path):
    _write_label(_hand_built_case(), tmp_path / "case.nrrd")
    assert samflare_main(["postprocess", "-i", str(tmp_path / "case.nrrd"), "-o", str(tmp_path / "pp.nrrd")]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "pp.nrrd"), postprocess_flare(_hand_built_case()))


def test_cli_postprocess_bad_input_one_line_error_exit_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"")
    assert samflare_main(["postprocess", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.nii.gz" in err and "empty" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_postprocess_refuses_to_overwrite_inputs(tmp_path, capsys):
    _write_label(_hand_built_case(), tmp_path / "a.nii.gz")
    before = _sha(tmp_path / "a.nii.gz")
    assert samflare_main(["postprocess", "-i", str(tmp_path), "-o", str(tmp_path)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert _sha(tmp_path / "a.nii.gz") == before


def test_thin_volumes_that_break_cc3d_boolean_path():
    # cc3d 4.1.1 raises "maximum length exception" on this bool mask at 26-connectivity; our wrapper must not.
    seg = np.array([[[2, 0, 2]]], dtype=np.uint8)
    result = postprocess_flare(seg)
    np.testing.assert_array_equal(result, [[[2, 0, 0]]])
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(rng.integers(1, 6, 3))
        seg = rng.integers(0, 15, shape).astype(np.uint8)
        seg[rng.random(shape) < 0.6] = 0
        np.testing.assert_array_equal(postprocess_flare(seg), _literal_reference(seg), err_msg=repr(seg))
        # 100 mm³ at 27 mm³ per voxel: face-connected components of fewer than 4 voxels go
        components, n = ndimage.label(seg > 0)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        expected = (components > 0) & (sizes[components] >= 4)
        np.testing.assert_array_equal(remove_small_components(seg > 0, (3.0, 3.0, 3.0), 100.0), expected)

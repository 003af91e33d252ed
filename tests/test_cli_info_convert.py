"""``samflare info`` and ``samflare convert-weights`` through the CLI entry point."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nnunet_samflare.cli import main
from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

from conftest import TEST_DATA

SPEC_TSV = TEST_DATA / "reference_state_dict_keys.tsv"


def authors_locator_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the authors' phase-1 names and shapes (from the spec TSV)."""
    g = torch.Generator().manual_seed(seed)
    out, section = {}, None
    for line in SPEC_TSV.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            section = line[1:].split()[0]
        elif line.strip() and section == "phase1":
            key, shape = line.split("\t")
            dims = tuple(int(v) for v in re.findall(r"\d+", shape))
            out[key] = torch.randn(dims, generator=g) / math.sqrt(math.prod(dims[1:]) if len(dims) > 1 else 1)
    assert len(out) == 63
    return out


def test_info_json_reports_exact_counts_and_conventions(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    loc, seg = info["networks"]["locator"], info["networks"]["segmenter"]
    assert loc["parameters"] == 1_383_746
    assert seg["parameters"] == 35_844_525
    assert loc["class"] == "nnunet_samflare.networks.PConvLocator"
    assert seg["class"] == "nnunet_samflare.networks.SAMHybridUNet"
    assert loc["input_shape"] == [1, 1, 128, 128, 128] and seg["input_shape"] == [1, 1, 96, 96, 96]
    assert loc["gmacs"] == pytest.approx(1.53, abs=0.01)
    assert seg["gmacs"] == pytest.approx(141.16, abs=0.01)
    assert seg["flops"] == 2 * seg["macs"]
    assert (loc["input_divisor"], seg["input_divisor"]) == (32, 16)
    # what info reports is what the default networks are built with (checked against the counts above)
    with torch.device("meta"):
        assert seg["arch_kwargs"] == SAMHybridUNet().arch_kwargs
        assert loc["arch_kwargs"] == PConvLocator().arch_kwargs
    assert (seg["paper"]["parameters"], seg["paper"]["flops"]) == ("35.84 M", "374.77 G")
    assert (loc["paper"]["parameters"], loc["paper"]["flops"]) == ("1.38 M", "1.56 G")
    assert "FlopCounterMode" in info["mac_convention"] and "2 x MACs" in info["mac_convention"]


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "1,383,746" in out and "35,844,525" in out
    assert "141.16" in out and "282.32" in out


@pytest.mark.parametrize("single_logit", [False, True])
def test_convert_weights_writes_a_loadable_state_dict(tmp_path, capsys, single_logit):
    ref = authors_locator_state_dict()
    src = tmp_path / "phase1.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}, "epoch": 7}, src)
    dst = tmp_path / "locator.pth"
    argv = ["convert-weights", "--phase", "locator", str(src), str(dst)] + (["--single-logit"] if single_logit else [])
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locator.pth", "phase1.pth"]  # no temporary left over
    net = PConvLocator(num_classes=1 if single_logit else 2)
    net.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    head = net.decoder.seg_layers[0].weight
    expected = ref["to_segmentation.1.weight"]
    torch.testing.assert_close(head, expected[1:] - expected[:1] if single_logit else expected)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_convert_weights_fails_cleanly_on_a_corrupt_input(tmp_path, capsys):
    src = tmp_path / "broken.pth"
    src.write_bytes(b"PK\x03\x04 truncated zip that is not a checkpoint")
    dst = tmp_path / "out.pth"
    line = _one_line_error(capsys, ["convert-weights", "--phase", "segmenter", str(src), str(dst)])
    assert "convert-weights" in line and "broken.pth" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_convert_weights_fails_cleanly_on_wrong_phase_and_missing_files(tmp_path, capsys):
    src = tmp_path / "phase1.pth"
    torch.save(authors_locator_state_dict(), src)
    line = _one_line_error(capsys, ["convert-weights", "--phase", "segmenter", str(src), str(tmp_path / "o.pth")])
    assert "phase1.pth" in line and "unknown key" in line
    line = _one_line_error(capsys, ["convert-weights", "--phase", "locator", str(tmp_path / "nope.pth"), "o.pth"])
    assert "nope.pth" in line
    line = _one_line_error(capsys, ["convert-weights", "--phase", "locator", str(src), str(tmp_path / "no/dir/o.pth")])
    assert "no/dir" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase1.pth"]


def test_convert_weights_never_leaves_a_half_written_output(tmp_path, monkeypatch):
    src = tmp_path / "phase1.pth"
    torch.save(authors_locator_state_dict(), src)
    dst = tmp_path / "out.pth"

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        main(["convert-weights", "--phase", "locator", str(src), str(dst)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase1.pth"]


def test_console_script_freezes_the_survivors_before_python_shuts_down(monkeypatch):
    """The installed ``samflare`` runs ``console_main``: ``main``'s exit code, and every live object moved out of
    the garbage collector's sight, so that shutdown does not spend seconds collecting them."""
    import gc
    from importlib.metadata import entry_points

    import nnunet_samflare.cli as cli

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "samflare"]
    assert script.value == "nnunet_samflare.cli:console_main"
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    gc.unfreeze()
    try:
        assert cli.console_main() == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()

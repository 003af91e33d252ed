"""Converter from the authors' state dicts, and forward equivalence with an independent functional reference.

We do not have the authors' code. ``reference_locator`` / ``reference_segmenter`` below re-derive their forward
pass from docs/method.md §2-§3 alone, consuming their state dict by *their* key names, in a deliberately different
style from our modules: everything stays a (B, C, X, Y, Z) volume (linear layers as einsums, LayerNorm over a
moved channel axis), attention is an explicit softmax, the SAA shuffle is an explicit index list, nearest
upsampling is ``repeat_interleave`` and the trilinear (align_corners=True) resize is a product of 1-D
interpolation matrices. Which blocks are SAM or MSA is read from the keys present, not from our schedule.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from nnunet_samflare.interop import convert_reference_state_dict, load_reference_checkpoint
from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

from conftest import TEST_DATA

SPEC_TSV = TEST_DATA / "reference_state_dict_keys.tsv"

DEAD = {"locator": ("decode_stages_list.", "trans_up.", "outconv0."), "segmenter": ("decoder1.",)}
TSV_SECTION = {"locator": "phase1", "segmenter": "phase2"}


def reference_shapes(phase: str) -> dict[str, tuple[int, ...]]:
    """The authors' key -> shape table for one phase, parsed from the spec TSV."""
    if not SPEC_TSV.is_file():
        raise FileNotFoundError(f"{SPEC_TSV} is missing: the checkout is incomplete")
    shapes: dict[str, tuple[int, ...]] = {}
    section = None
    for line in SPEC_TSV.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            section = line[1:].split()[0]
            continue
        if line.strip() and section == TSV_SECTION[phase]:
            key, shape = line.split("\t")
            shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


def random_reference_state_dict(phase: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random weights with sane magnitudes (fan-in scaled), norms near identity, small biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in reference_shapes(phase).items():
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) == 1 and "norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.2 * noise
        elif len(shape) == 1:
            value = 0.2 * noise
        else:
            value = noise / math.sqrt(math.prod(shape[1:]))
        out[key] = value.to(dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# functional reference forward passes (docs/method.md §2 and §3, literally)


def _inorm(t):
    return F.instance_norm(t, eps=1e-5)  # affine-free, no running stats


def _channel_ln(t, sd, prefix, eps):
    moved = t.movedim(1, -1)
    return F.layer_norm(moved, moved.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps).movedim(-1, 1)


def _pointwise(t, sd, prefix):
    """nn.Linear on the channel axis of a volume."""
    y = torch.einsum("bc...,oc->bo...", t, sd[prefix + ".weight"])
    return y + sd[prefix + ".bias"].reshape(1, -1, 1, 1, 1)


def _depthwise(t, sd, prefix):
    w = sd[prefix + ".weight"]
    return F.conv3d(t, w, sd[prefix + ".bias"], padding=w.shape[-1] // 2, groups=t.shape[1])


def _trilinear_align_corners(t, size):
    mats = []
    for n_in, n_out in zip(t.shape[2:], size):
        pos = torch.arange(n_out, dtype=t.dtype) * ((n_in - 1) / (n_out - 1))
        lo = pos.floor().long().clamp(max=n_in - 2)
        frac = pos - lo
        m = torch.zeros(n_out, n_in, dtype=t.dtype)
        m[torch.arange(n_out), lo] += 1 - frac
        m[torch.arange(n_out), lo + 1] += frac
        mats.append(m)
    return torch.einsum("bcxyz,Xx,Yy,Zz->bcXYZ", t, *mats)


def reference_locator(sd, x):
    """Authors' phase-1 FasterNet forward (docs/method.md §2)."""
    x_in = x
    x = _inorm(F.conv3d(x, sd["patch_embed.proj.weight"], stride=4))
    stage_outputs = []
    for s in range(4):
        if s > 0:
            x = _inorm(F.conv3d(x, sd[f"stages.{2 * s - 1}.reduction.weight"], stride=2))
        for j in range(2):
            p = f"stages.{2 * s}.blocks.{j}."
            w = sd[p + "spatial_mixing.partial_conv3.weight"]
            n_conv = w.shape[0]
            mixed = x.clone()
            mixed[:, :n_conv] = F.conv3d(x[:, :n_conv], w, padding=1)
            hidden = F.relu(_inorm(F.conv3d(mixed, sd[p + "mlp.0.weight"])))
            x = x + F.conv3d(hidden, sd[p + "mlp.3.weight"])
        stage_outputs.append(_inorm(x))
    fused = []
    for i, feat in enumerate(stage_outputs):
        y = F.conv3d(feat, sd[f"to_fused.{i}.0.weight"], sd[f"to_fused.{i}.0.bias"])
        for axis in (2, 3, 4):
            y = y.repeat_interleave(2**i, dim=axis)
        fused.append(y)
    y = F.conv3d(torch.cat(fused, 1), sd["to_segmentation.0.weight"], sd["to_segmentation.0.bias"])
    y = F.conv3d(y, sd["to_segmentation.1.weight"], sd["to_segmentation.1.bias"])
    return _trilinear_align_corners(y, x_in.shape[2:])


MSA_HEADS = {3: 8, 4: 16}  # sa_num_heads of the reference instantiation


def _sam(t, sd, p, interleave=True):
    v = _pointwise(t, sd, p + "v")
    s = _pointwise(t, sd, p + "s")
    n_heads = sum(1 for k in sd if k.startswith(p + "local_conv_") and k.endswith(".weight"))
    c = s.shape[1] // n_heads
    heads = [
        F.conv3d(
            s[:, j * c : (j + 1) * c],
            sd[f"{p}local_conv_{j + 1}.weight"],
            sd[f"{p}local_conv_{j + 1}.bias"],
            padding=1 + j,
            groups=c,
        )
        for j in range(n_heads)
    ]
    stacked = torch.cat(heads, 1)
    order = [j * c + g for g in range(c) for j in range(n_heads)] if interleave else list(range(c * n_heads))
    shuffled = stacked[:, order]
    mod = F.conv3d(shuffled, sd[p + "proj0.weight"], sd[p + "proj0.bias"], groups=c)
    mod = F.conv3d(F.gelu(_inorm(mod)), sd[p + "proj1.weight"], sd[p + "proj1.bias"])
    return _pointwise(mod * v, sd, p + "proj")


def _msa(t, sd, p, n_heads):
    b, c, *grid = t.shape
    d, n = c // n_heads, math.prod(grid)
    q = _pointwise(t, sd, p + "q").reshape(b, n_heads, d, n)
    kv = _pointwise(t, sd, p + "kv")
    k = kv[:, :c].reshape(b, n_heads, d, n)
    v_vol = kv[:, c:]
    v = v_vol.reshape(b, n_heads, d, n)
    weights = (torch.einsum("bhdn,bhdm->bhnm", q, k) * d**-0.5).softmax(dim=-1)
    out = torch.einsum("bhnm,bhdm->bhdn", weights, v).reshape(b, c, *grid)
    out = out + _depthwise(v_vol, sd, p + "dw_conv")
    return _pointwise(out, sd, p + "proj")


def _mix_ffn(t, sd, p):
    h = _pointwise(t, sd, p + "fc1")
    h = h + _depthwise(h, sd, p + "dwconv.dwconv")
    return _pointwise(F.gelu(h), sd, p + "fc2")


def _unet_res_block(t, sd, p):
    out = F.leaky_relu(_inorm(F.conv3d(t, sd[p + "conv1.conv.weight"], padding=1)), 0.01)
    out = _inorm(F.conv3d(out, sd[p + "conv2.conv.weight"], padding=1))
    shortcut = _inorm(F.conv3d(t, sd[p + "conv3.conv.weight"])) if p + "conv3.conv.weight" in sd else t
    return F.leaky_relu(out + shortcut, 0.01)


def reference_segmenter(sd, x, *, interleave=True, block_ln_eps=1e-6):
    """Authors' phase-2 SMT + UNETR-decoder forward (docs/method.md §3)."""
    t = F.relu(_inorm(F.conv3d(x, sd["patch_embed1.conv.0.weight"], stride=2, padding=1)))
    t = F.conv3d(t, sd["patch_embed1.conv.3.weight"], sd["patch_embed1.conv.3.bias"], padding=1)
    t = _channel_ln(t, sd, "patch_embed1.norm", 1e-5)
    skips = []
    for stage in (1, 2, 3, 4):
        if stage > 1:
            p = f"patch_embed{stage}."
            t = F.conv3d(t, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=2, padding=1)
            t = _channel_ln(t, sd, p + "norm", 1e-5)
        j = 0
        while f"block{stage}.{j}.norm1.weight" in sd:
            p = f"block{stage}.{j}."
            normed = _channel_ln(t, sd, p + "norm1", block_ln_eps)
            if p + "attn.s.weight" in sd:
                t = t + _sam(normed, sd, p + "attn.", interleave)
            else:
                t = t + _msa(normed, sd, p + "attn.", MSA_HEADS[stage])
            t = t + _mix_ffn(_channel_ln(t, sd, p + "norm2", block_ln_eps), sd, p + "mlp.")
            j += 1
        t = _channel_ln(t, sd, f"norm{stage}", block_ln_eps)
        skips.append(t)
    enc = [_unet_res_block(f, sd, f"encoder{i + 2}.layer.") for i, f in enumerate(skips)]
    d = enc[3]
    for level, skip in ((4, enc[2]), (3, enc[1]), (2, enc[0])):
        up = F.conv_transpose3d(d, sd[f"decoder{level}.transp_conv.conv.weight"], stride=2)
        d = _unet_res_block(torch.cat([up, skip], 1), sd, f"decoder{level}.conv_block.")
    u = F.conv_transpose3d(d, sd["outup.weight"], sd["outup.bias"], stride=2)
    return F.conv3d(u, sd["out.conv.conv.weight"], sd["out.conv.conv.bias"])


# ----------------------------------------------------------------------------------------------------------
# forward equivalence


def test_locator_forward_equals_the_functional_reference():
    ref_sd = random_reference_state_dict("locator", seed=1, dtype=torch.float64)
    net = PConvLocator().double().eval()
    net.load_state_dict(convert_reference_state_dict(ref_sd, "locator"), strict=True)
    x = torch.randn(2, 1, 64, 32, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_locator(ref_sd, x)
        actual = net(x)
    assert actual.shape == (2, 2, 64, 32, 96)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)

    # The 1-logit sigmoid head is the same classifier: sigmoid(new) == softmax(old)[:, 1].
    single = PConvLocator(num_classes=1).double().eval()
    single.load_state_dict(convert_reference_state_dict(ref_sd, "locator", single_logit=True), strict=True)
    with torch.no_grad():
        prob = torch.sigmoid(single(x))
    assert prob.shape == (2, 1, 64, 32, 96)
    torch.testing.assert_close(prob[:, 0], expected.softmax(dim=1)[:, 1], rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def segmenter_case():
    ref_sd = random_reference_state_dict("segmenter", seed=3, dtype=torch.float64)
    x = torch.randn(2, 1, 32, 48, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference_segmenter(ref_sd, x)
    return ref_sd, x, expected


def test_segmenter_forward_equals_the_functional_reference(segmenter_case):
    ref_sd, x, expected = segmenter_case
    net = SAMHybridUNet().double().eval()
    net.load_state_dict(convert_reference_state_dict(ref_sd, "segmenter"), strict=True)
    with torch.no_grad():
        actual = net(x)
    assert actual.shape == (2, 15, 32, 48, 16)
    assert expected.abs().mean() > 0.1  # non-degenerate activations
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_functional_reference_is_sensitive_to_shuffle_and_epsilon(segmenter_case):
    """Guards the guard: the comparison above would catch a contiguous SAA order or a wrong LN epsilon."""
    ref_sd, x, expected = segmenter_case
    with torch.no_grad():
        contiguous = reference_segmenter(ref_sd, x[:1], interleave=False)
        eps_1e5 = reference_segmenter(ref_sd, x[:1], block_ln_eps=1e-5)
    assert not torch.allclose(contiguous, expected[:1], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(eps_1e5, expected[:1], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# converter


@pytest.mark.parametrize(
    "phase,cls,total,used",
    [("locator", PConvLocator, 1_976_516, 1_383_746), ("segmenter", SAMHybridUNet, 36_172_125, 35_844_525)],
)
def test_round_trip_drops_dead_modules_and_loads_strictly(phase, cls, total, used):
    ref_sd = random_reference_state_dict(phase)
    assert sum(t.numel() for t in ref_sd.values()) == total  # the TSV is what we think it is
    converted = convert_reference_state_dict(ref_sd, phase)
    assert sum(t.numel() for t in converted.values()) == used
    with torch.device("meta"):
        net = cls()
    assert list(converted) == list(net.state_dict())
    net.load_state_dict(converted, strict=True, assign=True)
    # values travel unchanged (a spot check per kind of tensor)
    if phase == "locator":
        pconv = (
            "stages.4.blocks.1.spatial_mixing.partial_conv3.weight",
            "encoder.stages.2.blocks.1.partial_conv.conv.weight",
        )
        pairs = [
            pconv,
            ("stages.5.reduction.weight", "encoder.merges.2.reduction.weight"),
            ("to_segmentation.1.bias", "decoder.seg_layers.0.bias"),
        ]
    else:
        pairs = [
            ("block3.1.attn.dw_conv.weight", "encoder.stages.2.blocks.1.token_mixer.local_enhance.weight"),
            ("block1.0.attn.local_conv_3.weight", "encoder.stages.0.blocks.0.token_mixer.mhmc.2.weight"),
            ("decoder4.conv_block.conv3.conv.weight", "decoder.up_blocks.2.res_block.res_conv.weight"),
            ("out.conv.conv.weight", "decoder.seg_layers.0.weight"),
        ]
    for theirs, ours in pairs:
        assert torch.equal(converted[ours], ref_sd[theirs])


def test_dataparallel_prefix_and_optional_dead_keys():
    ref_sd = random_reference_state_dict("locator")
    wrapped = {f"module.{k}": v for k, v in ref_sd.items()}
    plain = convert_reference_state_dict(ref_sd, "locator")
    for converted in (
        convert_reference_state_dict(wrapped, "locator"),
        convert_reference_state_dict({k: v for k, v in ref_sd.items() if not k.startswith(DEAD["locator"])}, "locator"),
    ):
        assert converted.keys() == plain.keys()
        assert all(torch.equal(converted[k], plain[k]) for k in plain)


def test_converter_errors_name_the_key():
    ref_sd = random_reference_state_dict("segmenter")
    bad_shape = dict(ref_sd, **{"block2.3.attn.proj0.weight": torch.zeros(240, 6, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"block2\.3\.attn\.proj0\.weight.*\(240, 6, 1, 1, 1\)"):
        convert_reference_state_dict(bad_shape, "segmenter")
    with pytest.raises(ValueError, match=r"unknown key 'block5\.0\.norm1\.weight'"):
        convert_reference_state_dict(dict(ref_sd, **{"block5.0.norm1.weight": torch.zeros(480)}), "segmenter")
    with pytest.raises(ValueError, match=r"unknown key 'head\.weight'"):
        convert_reference_state_dict(dict(ref_sd, **{"head.weight": torch.zeros(3)}), "segmenter")
    missing = {k: v for k, v in ref_sd.items() if k != "norm4.bias"}
    with pytest.raises(ValueError, match=r"encoder\.stages\.3\.norm\.bias"):
        convert_reference_state_dict(missing, "segmenter")
    with pytest.raises(ValueError, match="unknown key"):  # the phases are not interchangeable
        convert_reference_state_dict(ref_sd, "locator")
    with pytest.raises(ValueError, match="phase"):
        convert_reference_state_dict(ref_sd, "phase2")
    with pytest.raises(ValueError, match="single_logit"):
        convert_reference_state_dict(ref_sd, "segmenter", single_logit=True)
    locator_sd = random_reference_state_dict("locator")
    with pytest.raises(ValueError, match=r"'stages\.2\.reduction\.weight'"):  # even index = a stage, not a merge
        convert_reference_state_dict(dict(locator_sd, **{"stages.2.reduction.weight": torch.zeros(1)}), "locator")


def test_load_reference_checkpoint_accepts_raw_and_nested(tmp_path):
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    variants = {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "network_weights": {"network_weights": sd, "trainer_name": "x"},
        "twice": {"model": {"state_dict": sd}},
    }
    for name, obj in variants.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        loaded = load_reference_checkpoint(path)
        assert loaded.keys() == sd.keys() and torch.equal(loaded["a.weight"], sd["a.weight"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_reference_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage, not a zip or a pickle")
    with pytest.raises(ValueError, match="corrupt.pth.*not a readable PyTorch checkpoint") as err:
        load_reference_checkpoint(tmp_path / "corrupt.pth")
    assert "\n" not in str(err.value)
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nosd.pth")
    with pytest.raises(ValueError, match="nosd.pth.*no state dict"):
        load_reference_checkpoint(tmp_path / "nosd.pth")

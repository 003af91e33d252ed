"""PConvLocator / SAMHybridUNet: sizes, nnU-Net network contract, input rules, block semantics, complexity.

Counts use the ``meta`` device (free); forward passes use small inputs (locator 64^3, segmenter 32^3).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_samflare.networks import PConvLocator, SAMHybridUNet
from nnunet_samflare.networks.complexity import count_macs, count_parameters
from nnunet_samflare.networks.layers import DropPath, to_tokens, to_volume
from nnunet_samflare.networks.segmenter import MetaFormerBlock, MultiHeadSelfAttention, ScaleAwareModulation

NETWORKS_DIR = Path(__file__).resolve().parents[1] / "nnunet_samflare" / "networks"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta(cls: type[nn.Module], **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


@pytest.fixture(scope="module")
def segmenter() -> SAMHybridUNet:
    torch.manual_seed(0)
    return SAMHybridUNet().eval()


@pytest.fixture(scope="module")
def locator() -> PConvLocator:
    torch.manual_seed(0)
    return PConvLocator().eval()


# ----------------------------------------------------------------------------------------------------------
# parameter counts (docs/method.md §2, §3.10, §4.1)


def test_default_parameter_counts_are_the_papers():
    assert count_parameters(meta(PConvLocator)) == 1_383_746
    assert count_parameters(meta(SAMHybridUNet)) == 35_844_525


def test_locator_per_module_counts():
    net = meta(PConvLocator)
    enc, dec = net.encoder, net.decoder
    assert n_params(enc.stem) == 2_048
    assert [n_params(s) for s in enc.stages] == [11_648, 46_592, 186_368, 745_472]
    assert [n_params(m) for m in enc.merges] == [16_384, 65_536, 262_144]
    assert n_params(dec.lateral) == 30_976  # authors' to_fused
    assert n_params(dec.fuse) + n_params(dec.seg_layers) == 16_578  # authors' to_segmentation
    for c in (32, 64, 128, 256):  # PConv block 27C^2/16 + 4C^2
        block = enc.stages[(32, 64, 128, 256).index(c)].blocks[0]
        assert n_params(block) == 27 * c * c // 16 + 4 * c * c


def test_segmenter_per_module_counts():
    net = meta(SAMHybridUNet)
    enc, dec = net.encoder, net.decoder
    assert [n_params(e) for e in enc.embeddings] == [49_590, 194_760, 778_320, 3_111_840]
    assert [n_params(s.blocks) for s in enc.stages] == [93_720, 634_080, 3_179_520, 3_777_600]
    assert sum(n_params(s.norm) for s in enc.stages) == 1_800
    assert [n_params(b) for b in dec.skip_blocks] == [194_400, 777_600, 3_110_400, 12_441_600]  # E1..E4
    assert [n_params(b) for b in dec.up_blocks] == [356_400, 1_425_600, 5_702_400]  # D1, D2, D3
    assert n_params(dec.final_up) == 14_430
    assert n_params(dec.seg_layers) == 465
    assert len(dec.seg_layers) == 1  # no DS heads in the paper's network
    for a, b in ((480, 240), (240, 120), (120, 60)):  # UpBlock(a->b) = 8ab + 83b^2
        assert n_params(dec.up_blocks[(60, 120, 240).index(b)]) == 8 * a * b + 83 * b * b


@pytest.mark.parametrize("c", [60, 120, 240])
def test_sam_block_formula(c):
    with torch.device("meta"):
        block = MetaFormerBlock(c, ScaleAwareModulation(c, num_heads=3, expand_ratio=2), mlp_ratio=2.0)
    assert n_params(block) == 9 * c * c + 241 * c


@pytest.mark.parametrize("c,heads", [(240, 8), (480, 16)])
def test_msa_block_formula(c, heads):
    with torch.device("meta"):
        block = MetaFormerBlock(c, MultiHeadSelfAttention(c, num_heads=heads), mlp_ratio=2.0)
    assert n_params(block) == 8 * c * c + 95 * c


def test_segmenter_mixer_layout():
    net = meta(SAMHybridUNet)
    kinds = [[type(b.token_mixer).__name__[:3] for b in s.blocks] for s in net.encoder.stages]
    assert kinds == [
        ["Sca"] * 2,
        ["Sca"] * 4,
        ["Sca", "Mul", "Sca", "Mul", "Sca", "Mul"],
        ["Mul"] * 2,
    ]
    sam = net.encoder.stages[2].blocks[0].token_mixer
    assert [conv.kernel_size for conv in sam.mhmc] == [(3, 3, 3), (5, 5, 5), (7, 7, 7)]
    assert net.encoder.stages[3].blocks[0].token_mixer.head_dim == 30


def test_json_arch_kwargs_build_the_same_network():
    for cls in (PConvLocator, SAMHybridUNet):
        kwargs = json.loads(json.dumps(cls.default_arch_kwargs()))
        assert count_parameters(meta(cls, **kwargs)) == count_parameters(meta(cls))
        assert meta(cls, **kwargs).state_dict().keys() == meta(cls).state_dict().keys()


def test_arch_kwargs_change_the_architecture():
    small = meta(
        SAMHybridUNet,
        embed_dims=[24, 48, 96],
        depths=[1, 1, 2],
        sam_heads=[3, 3, 3],
        msa_heads=[0, 0, 4],
        mlp_ratios=[2, 2, 2],
        decoder_feature_size=16,
    )
    assert len(small.encoder.stages) == 3
    assert [type(b.token_mixer).__name__ for b in small.encoder.stages[2].blocks] == [
        "ScaleAwareModulation",
        "MultiHeadSelfAttention",
    ]
    assert small.decoder.skip_blocks[0].res_conv is not None  # 24 -> 16 needs a projection shortcut
    with pytest.raises(ValueError, match="depths"):
        meta(SAMHybridUNet, depths=[2, 2])
    with pytest.raises(ValueError, match="divisible"):
        meta(SAMHybridUNet, sam_heads=[7, 3, 3, 0])
    with pytest.raises(TypeError):
        meta(PConvLocator, no_such_kwarg=1)


def test_no_nnunet_import_and_no_initialize_method():
    sources = sorted(NETWORKS_DIR.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "layers.py", "locator.py", "segmenter.py"}
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "nnunetv2" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "nnunetv2", path
    for cls in (PConvLocator, SAMHybridUNet):
        assert not hasattr(cls, "initialize")  # nnU-Net would net.apply(net.initialize)


# ----------------------------------------------------------------------------------------------------------
# forward shapes, deep supervision contract


def test_locator_output_shape(locator):
    x = torch.randn(2, 1, 64, 32, 96)
    with torch.no_grad():
        y = locator(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 64, 32, 96)


def test_segmenter_output_shape(segmenter):
    x = torch.randn(1, 1, 32, 48, 16)
    with torch.no_grad():
        y = segmenter(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 15, 32, 48, 16)


def test_full_resolution_logits_in_slabs_are_bit_identical(segmenter):
    """Without autograd the last up-sampling runs slab by slab (less peak memory); the logits must not change by a
    single bit, in either memory layout, float32 or under bfloat16 autocast."""
    calls = []
    hook = segmenter.decoder.final_up.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[2]))
    try:
        x = torch.randn(1, 1, 64, 48, 32, generator=torch.Generator().manual_seed(7))
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            net = segmenter.to(memory_format=layout)
            inputs = x.contiguous(memory_format=layout)
            for autocast in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    calls.clear()
                    with torch.enable_grad():
                        whole = net(inputs).detach()
                    assert calls == [32]
                    calls.clear()
                    with torch.inference_mode():
                        slabs = net(inputs)
                    assert calls == [8, 8, 8, 8]
                assert torch.equal(slabs, whole)
                assert slabs.is_contiguous(memory_format=layout) == whole.is_contiguous(memory_format=layout)
    finally:
        hook.remove()
        segmenter.to(memory_format=torch.contiguous_format)


def test_locator_deep_supervision_flag(locator):
    x = torch.randn(1, 1, 64, 64, 64)
    keys = set(locator.state_dict())
    assert locator.deep_supervision_strides == (1,)
    try:
        with torch.no_grad():
            plain = locator(x)
            locator.decoder.deep_supervision = True
            ds = locator(x)
    finally:
        locator.decoder.deep_supervision = False
    assert isinstance(ds, list) and len(ds) == 1
    torch.testing.assert_close(ds[0], plain)
    assert set(PConvLocator(deep_supervision=True).state_dict()) == keys
    assert PConvLocator(deep_supervision=True).decoder.deep_supervision is True


def test_segmenter_deep_supervision_flag_without_heads(segmenter):
    x = torch.randn(1, 1, 32, 32, 32)
    assert segmenter.deep_supervision_strides == (1,)
    try:
        segmenter.decoder.deep_supervision = True
        with torch.no_grad():
            ds = segmenter(x)
    finally:
        segmenter.decoder.deep_supervision = False
    assert isinstance(ds, list) and len(ds) == 1 and ds[0].shape == (1, 15, 32, 32, 32)
    assert meta(SAMHybridUNet, deep_supervision=True).state_dict().keys() == segmenter.state_dict().keys()


def test_segmenter_deep_supervision_heads_and_checkpoint_round_trip():
    torch.manual_seed(1)
    with_flag = SAMHybridUNet(deep_supervision=True, deep_supervision_heads=True).eval()
    assert with_flag.deep_supervision_strides == (1, 2, 4, 8)
    assert [k for k in with_flag.state_dict() if ".seg_layers." in k] == [
        f"decoder.seg_layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    ]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        outs = with_flag(x)
    assert [tuple(o.shape) for o in outs] == [(1, 15, 32 // s, 32 // s, 32 // s) for s in (1, 2, 4, 8)]

    # The same state dict loads with the flag off (and back on), and the flag only changes the return type.
    without_flag = SAMHybridUNet(deep_supervision=False, deep_supervision_heads=True).eval()
    without_flag.load_state_dict(with_flag.state_dict(), strict=True)
    with torch.no_grad():
        single = without_flag(x)
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(single, outs[0])
    again = meta(SAMHybridUNet, deep_supervision=True, deep_supervision_heads=True)
    again.load_state_dict(without_flag.state_dict(), strict=True, assign=True)
    assert again.decoder.seg_layers[3].weight.device.type == "cpu"


def _assert_every_parameter_gets_a_gradient(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    net.decoder.deep_supervision = True
    outputs = net(x)
    assert isinstance(outputs, list)
    sum(o.float().square().mean() for o in outputs).backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None]
    assert no_grad == []  # DDP without find_unused_parameters needs every parameter in the graph


def test_locator_every_parameter_gets_a_gradient():
    torch.manual_seed(2)
    _assert_every_parameter_gets_a_gradient(PConvLocator(), torch.randn(2, 1, 64, 64, 64))


def test_segmenter_every_parameter_gets_a_gradient():
    # With the optional heads: their parameter set contains the paper network's.
    torch.manual_seed(3)
    net = SAMHybridUNet(deep_supervision_heads=True, drop_path_rate=0.1)
    _assert_every_parameter_gets_a_gradient(net, torch.randn(1, 1, 32, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# input rules


def test_input_divisor_classmethods():
    assert PConvLocator.input_divisor() == 32
    assert SAMHybridUNet.input_divisor() == 16
    assert PConvLocator.input_divisor(depths=[2, 2, 2]) == 16
    assert PConvLocator.input_divisor(patch_size=2, depths=(1, 1, 1, 1)) == 16
    assert SAMHybridUNet.input_divisor(embed_dims=[32, 64, 128]) == 8
    # a full arch_kwargs dict from a plans file, plus the nnU-Net call arguments, is accepted
    assert SAMHybridUNet.input_divisor(input_channels=1, num_classes=15, **SAMHybridUNet.default_arch_kwargs()) == 16
    with pytest.raises(TypeError, match="strides"):
        SAMHybridUNet.input_divisor(strides=[[1, 1, 1]])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 1, 40, 32, 32), r"\(40, 32, 32\).*divisible by 16"),
        ((1, 1, 32, 32, 24), r"\(32, 32, 24\).*divisible by 16"),
        ((1, 1, 16, 16, 16), r"\(16, 16, 16\).*too small"),
        ((1, 2, 32, 32, 32), "input channel"),
        ((1, 32, 32, 32), "5-D"),
    ],
)
def test_segmenter_rejects_bad_shapes(segmenter, shape, match):
    with pytest.raises(ValueError, match=match):
        segmenter(torch.zeros(shape))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 1, 48, 64, 64), r"\(48, 64, 64\).*divisible by 32"),
        ((1, 1, 32, 32, 32), r"\(32, 32, 32\).*too small"),
    ],
)
def test_locator_rejects_bad_shapes(locator, shape, match):
    with pytest.raises(ValueError, match=match):
        locator(torch.zeros(shape))


# ----------------------------------------------------------------------------------------------------------
# block semantics


@pytest.mark.parametrize("batch", [1, 2])
def test_to_volume_is_a_channels_last_view_that_torch_recognises(batch):
    """Token volumes feed depthwise convolutions: they must be views with the canonical ``channels_last_3d``
    strides, batch stride included, or oneDNN reorders them on every call (for a batch of one, ``reshape`` gave
    the batch stride ``C``)."""
    tokens = torch.randn(batch, 4 * 3 * 5, 6)
    volume = to_volume(tokens, (4, 3, 5))
    assert volume.data_ptr() == tokens.data_ptr()
    assert volume.stride() == torch.empty(batch, 6, 4, 3, 5, memory_format=torch.channels_last_3d).stride()
    assert volume[0, 2, 1, 2, 3].item() == tokens[0, (1 * 3 + 2) * 5 + 3, 2].item()  # H-major, D fastest
    assert torch.equal(to_tokens(volume), tokens)
    assert to_tokens(volume).is_contiguous()


def test_saa_channel_shuffle_order_at_block_level():
    """docs/method.md §3.7 step 4: for C = 6 (3 heads x 2 channels), proj0 sees s-channels [0, 2, 4, 1, 3, 5]."""
    sam = ScaleAwareModulation(6, num_heads=3, expand_ratio=2).double()
    with torch.no_grad():
        sam.s.weight.copy_(torch.eye(6))
        sam.s.bias.zero_()
        for conv in sam.mhmc:  # identity depthwise kernels: MHMC passes each channel through
            conv.weight.zero_()
            conv.bias.zero_()
            k = conv.kernel_size[0] // 2
            conv.weight[:, 0, k, k, k] = 1.0
    seen = {}

    def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen["x"] = inputs[0]

    sam.proj0.register_forward_pre_hook(capture)
    # token value = its channel index, on a 2x2x2 grid
    tokens = torch.arange(6, dtype=torch.float64).expand(1, 8, 6)
    sam(tokens, (2, 2, 2))
    order = seen["x"][0, :, 0, 0, 0].round().long().tolist()
    assert order == [0, 2, 4, 1, 3, 5]


def test_saa_grouped_projection_mixes_one_channel_of_each_kernel_size():
    sam = ScaleAwareModulation(60, num_heads=3)
    assert sam.proj0.groups == 20 and sam.proj0.weight.shape == (120, 3, 1, 1, 1)
    assert isinstance(sam.act, nn.GELU) and sam.norm.affine is False


def test_drop_path_is_per_sample_and_identity_in_eval():
    torch.manual_seed(4)
    dp = DropPath(0.5)
    x = torch.ones(2000, 3, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # whole samples dropped
    assert abs(y.mean().item() - 1.0) < 0.1
    dp.eval()
    assert dp(x) is x


def test_locator_drop_path_schedule():
    net = meta(PConvLocator)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in net.encoder.stages for b in s.blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])
    assert isinstance(net.encoder.stages[0].blocks[0].drop_path, nn.Identity)  # rate 0: nothing built


# ----------------------------------------------------------------------------------------------------------
# complexity (docs/method.md §4.2, FlopCounterMode column)


def test_macs_reproduce_method_section_4_2():
    assert count_macs(meta(PConvLocator), (1, 1, 128, 128, 128)) / 1e9 == pytest.approx(1.5305, abs=5e-4)
    assert count_macs(meta(SAMHybridUNet), (1, 1, 96, 96, 96)) / 1e9 == pytest.approx(141.16, abs=0.005)
    assert count_macs(meta(SAMHybridUNet), (1, 1, 128, 128, 128)) / 1e9 == pytest.approx(348.86, abs=0.005)


def test_macs_count_attention_matmuls_and_leave_the_model_alone():
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = MultiHeadSelfAttention(24, num_heads=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, (4, 2, 3))

    net = Wrapped().train()
    n, c = 24, 24
    # q, kv, proj: 4 N C^2; q k^T and attn v: 2 N^2 C; depthwise 3^3: 27 N C
    assert count_macs(net, (2, n, c)) == 2 * (4 * n * c * c + 2 * n * n * c + 27 * n * c)
    assert net.training and net.attn.q.weight.device.type == "cpu"

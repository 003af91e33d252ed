"""Faster forms of layers whose PyTorch kernels are slow, computing the same function with the same parameters.

:class:`GroupedPointwiseConv3d` is a 1×1×1 convolution with groups, i.e. a block-diagonal channel mix, evaluated
as one batched matrix product instead of PyTorch's grouped-convolution kernel. The scale-aware modulation's
``proj0`` (60 → 120 channels in 20 groups of 3 at 48³ in stage 1) is such a layer, and oneDNN's grouped path
ran 6× slower than this form in isolation on a 2-core CPU (0.63 s against 0.11 s per call). The class is an
``nn.Conv3d`` with the same parameters, names and shapes, so checkpoints, ``state_dict`` loading and the weight
converter see no difference; outputs and gradients equal the plain layer's to float rounding
(``tests/test_speed_paths_networks.py``).

:class:`ChannelsLastInstanceNorm3d` is an instance norm evaluated as a group norm with one group per channel: the
same per-sample, per-channel statistics. PyTorch's instance norm views its input as one sample of ``B·C`` channels,
which forces a channels-last tensor into a contiguous copy, and its output stays contiguous, so the next
convolution copies it back. Group norm has a channels-last kernel. On the 2-core CPU, for 120 channels at 48³ in
bfloat16, that is 5 ms against 34 ms per call; one 96³ segmenter forward in channels-last went from 2.7 to 2.2 s
in float32 and from 1.34 to 1.17 s under bfloat16 autocast (``BENCHMARKS.md``).

:class:`Float32Conv3d` is the precision policy of a network run under bfloat16 autocast (``samflare predict
--fast`` on a CPU): a convolution that computes in float32 whatever autocast says. Given to the class heads
(:func:`use_float32_class_heads`), it stops bfloat16 from rounding the logits themselves (8 bits of mantissa: ±0.04
at a logit of 10), which alone flipped half of the labels that bfloat16 changes: on the real CT with a trained
segmenter, 20 instead of 38 of 196,608 voxels against float32. It costs 2 % of a 96³ forward on 2 cores (0.733 →
0.750 s, median of 7; ``BENCHMARKS.md``).

:func:`use_fast_paths` switches the eligible layers of a built network in place. Nothing does so unless asked
(``CascadePredictor(fast_layers=True)``, ``benchmarks/bench_train_step.py``): in the whole segmenter's CPU
forward pass it measured no faster (``BENCHMARKS.md``), and on a GPU it is unmeasured until
``benchmarks/gpu_check.sh`` runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelsLastInstanceNorm3d",
    "Float32Conv3d",
    "GroupedPointwiseConv3d",
    "use_channels_last",
    "use_channels_last_norms",
    "use_float32_class_heads",
    "use_fast_paths",
]


def _is_grouped_pointwise(conv: nn.Conv3d) -> bool:
    return (
        conv.groups > 1
        and tuple(conv.kernel_size) == (1, 1, 1)
        and tuple(conv.stride) == (1, 1, 1)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.padding in ((0, 0, 0), "valid")
    )


class GroupedPointwiseConv3d(nn.Conv3d):
    """``nn.Conv3d`` with ``kernel_size=1`` and ``groups > 1``, evaluated as ``(groups, out/g, in/g) @ (B, groups,
    in/g, voxels)``. Other settings fall back to the plain convolution."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not _is_grouped_pointwise(self) or input.ndim != 5:
            return super()._conv_forward(input, weight, bias)
        batch, channels, *spatial = input.shape
        groups = self.groups
        mixed = torch.matmul(
            weight.reshape(groups, self.out_channels // groups, channels // groups),
            input.reshape(batch, groups, channels // groups, -1),
        ).reshape(batch, self.out_channels, *spatial)
        return mixed if bias is None else mixed + bias.reshape(1, -1, 1, 1, 1)


def use_fast_paths(network: nn.Module) -> int:
    """Turn every grouped 1×1×1 ``nn.Conv3d`` of ``network`` into a :class:`GroupedPointwiseConv3d`, in place
    (parameters untouched); returns how many layers changed."""
    changed = 0
    for module in network.modules():
        if type(module) is nn.Conv3d and _is_grouped_pointwise(module):
            module.__class__ = GroupedPointwiseConv3d
            changed += 1
    return changed


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` evaluated with ``F.group_norm`` (``C`` groups of one channel), which keeps a
    channels-last input channels-last. Batched ``(B, C, D, H, W)`` input, without running statistics; anything
    else goes to the plain instance norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or input.ndim != 5:
            return super().forward(input)
        return F.group_norm(input, self.num_features, self.weight, self.bias, self.eps)


def use_channels_last_norms(network: nn.Module) -> int:
    """Turn every ``nn.InstanceNorm3d`` of ``network`` into a :class:`ChannelsLastInstanceNorm3d`, in place
    (parameters and buffers untouched); returns how many layers changed."""
    changed = 0
    for module in network.modules():
        if type(module) is nn.InstanceNorm3d:
            module.__class__ = ChannelsLastInstanceNorm3d
            changed += 1
    return changed


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


def use_channels_last(network: nn.Module) -> nn.Module:
    """Run ``network`` in ``torch.channels_last_3d`` memory format, in place: its weights converted, its input
    converted on the way in, its instance norms made layout-keeping (:func:`use_channels_last_norms`). The same
    function to float rounding; returns ``network``."""
    use_channels_last_norms(network)
    network.to(memory_format=torch.channels_last_3d)
    network.register_forward_pre_hook(_channels_last_input)
    return network


class Float32Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes in float32 under autocast too (its input cast up; the output is float32).
    Without autocast it is the plain layer."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(input.device.type):
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float())


def use_float32_class_heads(network: nn.Module) -> int:
    """Turn the class heads of ``network`` (the ``nn.Conv3d`` layers of its ``decoder.seg_layers``, or of
    ``seg_layers``, nnU-Net's name for them) into :class:`Float32Conv3d`, in place (parameters untouched); returns
    how many layers changed."""
    owner = getattr(network, "decoder", network)
    changed = 0
    for module in getattr(owner, "seg_layers", ()):
        if type(module) is nn.Conv3d:
            module.__class__ = Float32Conv3d
            changed += 1
    return changed

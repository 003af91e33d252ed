"""Faster forms of layers whose PyTorch kernels are slow, computing the same function with the same parameters.

:class:`GroupedPointwiseConv3d` is a 1×1×1 convolution with groups, i.e. a block-diagonal channel mix, evaluated
as one batched matrix product instead of PyTorch's grouped-convolution kernel. The scale-aware modulation's
``proj0`` (60 → 120 channels in 20 groups of 3 at 48³ in stage 1) is such a layer, and oneDNN's grouped path
ran 6× slower than this form in isolation on a 2-core CPU (0.63 s against 0.11 s per call). The class is an
``nn.Conv3d`` with the same parameters, names and shapes, so checkpoints, ``state_dict`` loading and the weight
converter see no difference; outputs and gradients equal the plain layer's to float rounding
(``tests/test_speed_paths_networks.py``).

:class:`SlicedDepthwiseConv3d` is a depthwise 3-D convolution evaluated as 2-D depthwise convolutions of the depth
slices, summed over the kernel's depth: the same parameters again, a different summation order. It is a candidate
for the GPU, where PyTorch runs a 5-D depthwise convolution either with its own 3-D kernel or with cuDNN's grouped
NDHWC kernels, and the authors' network trained 4× slower per step than nnU-Net's; the 2-D depthwise kernels are
the tuned ones. On the 2-core CPU it is slower (a 2 × 48³ training step 3.07 against 2.68 s), so nothing uses it
there; ``benchmarks/bench_train_step.py`` measures it on the GPU.

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

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelsLastInstanceNorm3d",
    "Float32Conv3d",
    "GroupedPointwiseConv3d",
    "SlicedDepthwiseConv3d",
    "use_channels_last",
    "use_channels_last_norms",
    "use_fast_paths",
    "use_float32_class_heads",
    "use_sliced_depthwise",
]


def _recast(modules: Iterable[nn.Module], form: type[nn.Module], eligible: Callable[[Any], bool] | None = None) -> int:
    """Give every module whose class is exactly ``form``'s base class (a plain PyTorch layer, not a subclass) and
    that is ``eligible`` the class ``form``, in place: a subclass that adds no state, so parameters, buffers and
    hooks stay as they are. Returns how many modules changed."""
    (plain,) = form.__bases__
    changed = 0
    for module in modules:
        if type(module) is plain and (eligible is None or eligible(module)):
            module.__class__ = form
            changed += 1
    return changed


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
    return _recast(network.modules(), GroupedPointwiseConv3d, _is_grouped_pointwise)


def _is_sliceable_depthwise(conv: nn.Conv3d) -> bool:
    return (
        conv.groups == conv.in_channels > 1
        and conv.out_channels % conv.in_channels == 0
        and max(conv.kernel_size) > 1
        and tuple(conv.stride) == (1, 1, 1)
        and tuple(conv.dilation) == (1, 1, 1)
        and not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
    )


class SlicedDepthwiseConv3d(nn.Conv3d):
    """Depthwise ``nn.Conv3d`` (``groups == in_channels``, stride 1) evaluated as 2-D depthwise convolutions of the
    depth slices, summed over the kernel's depth.

    ``out[d] = Σ_k conv2d(x[d + k - p], w[:, :, k])``. The scan's depth goes into the batch, ``(B·D, C, H, W)``,
    and one 2-D depthwise convolution with channel multiplier ``kD`` (weight ``(O·kD, 1, kH, kW)``, a reshape of
    the 3-D one) gives every ``(slice, k)`` term at once; the terms are then added with their depth shifts.

    A channels-last input stays a view on the way in (depth and batch merge without a copy) and the output keeps
    the input's layout. Other settings fall back to the plain convolution. Scratch memory: ``kD`` times the output.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not _is_sliceable_depthwise(self) or input.ndim != 5:
            return super()._conv_forward(input, weight, bias)
        batch, channels, depth, height, width = input.shape
        k_depth, k_height, k_width = self.kernel_size
        p_depth, p_height, p_width = self.padding
        slices = input.transpose(1, 2).reshape(batch * depth, channels, height, width)
        terms = F.conv2d(
            slices,
            weight.reshape(self.out_channels * k_depth, 1, k_height, k_width),
            padding=(p_height, p_width),
            groups=channels,
        )
        # (B, D, O, kD, H', W'): term k of output depth d sits at input depth d + k - p.
        terms = terms.unflatten(1, (self.out_channels, k_depth)).unflatten(0, (batch, depth))
        out_depth = depth + 2 * p_depth - k_depth + 1
        channels_last = input.is_contiguous(memory_format=torch.channels_last_3d) and not input.is_contiguous()
        # The output starts as the bias, in the input's layout; the terms are added into its (B, D', O, H', W') view.
        start = terms.new_zeros(()) if bias is None else bias.to(terms.dtype).reshape(-1, 1, 1, 1)
        out = start.expand(batch, self.out_channels, out_depth, *terms.shape[-2:]).clone(
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format
        )
        by_depth = out.transpose(1, 2)
        for k in range(k_depth):
            first, stop = max(0, p_depth - k), min(out_depth, depth + p_depth - k)
            if first < stop:
                by_depth[:, first:stop] += terms[:, first + k - p_depth : stop + k - p_depth, :, k]
        return out


def use_sliced_depthwise(network: nn.Module) -> int:
    """Turn every depthwise ``nn.Conv3d`` of ``network`` that :class:`SlicedDepthwiseConv3d` can evaluate into
    one, in place (parameters untouched); returns how many layers changed."""
    return _recast(network.modules(), SlicedDepthwiseConv3d, _is_sliceable_depthwise)


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
    return _recast(network.modules(), ChannelsLastInstanceNorm3d)


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
    return _recast(getattr(owner, "seg_layers", ()), Float32Conv3d)

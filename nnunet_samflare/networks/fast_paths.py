"""Faster forms of layers whose PyTorch kernels are slow, computing the same function with the same parameters.

:class:`GroupedPointwiseConv3d` is a 1×1×1 convolution with groups, i.e. a block-diagonal channel mix, evaluated
as one batched matrix product instead of PyTorch's grouped-convolution kernel. The scale-aware modulation's
``proj0`` (60 → 120 channels in 20 groups of 3 at 48³ in stage 1) is such a layer, and oneDNN's grouped path
ran 6× slower than this form in isolation on a 2-core CPU (0.63 s against 0.11 s per call). The class is an
``nn.Conv3d`` with the same parameters, names and shapes, so checkpoints, ``state_dict`` loading and the weight
converter see no difference; outputs and gradients equal the plain layer's to float rounding
(``tests/test_speed_paths_networks.py``).

:func:`use_fast_paths` switches the eligible layers of a built network in place. Nothing does so unless asked
(``CascadePredictor(fast_layers=True)``, ``benchmarks/bench_train_step.py``): in the whole segmenter's CPU
forward pass it measured no faster (``BENCHMARKS.md``), and on a GPU it is unmeasured until
``benchmarks/gpu_check.sh`` runs there.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GroupedPointwiseConv3d", "use_fast_paths"]


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

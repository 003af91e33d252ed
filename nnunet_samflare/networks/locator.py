"""Phase 1: the PConv locator (FasterNet-style encoder + SegFormer-style MLP decoder), docs/method.md §2.

Follows the authors' code where it differs from the paper (docs/method.md §7 #1, #4, #5): every norm is an
affine-free InstanceNorm, the decoder width is 64 and its per-scale upsampling is nearest-neighbour. The
authors' unused "dense decoder" (§2.5) is not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_samflare.networks.layers import (
    PaperArchitecture,
    as_int_tuple,
    drop_path_or_identity,
    stochastic_depth_schedule,
    validate_input,
)

__all__ = [
    "PartialConv",
    "PConvMlp",
    "PConvBlock",
    "PConvStage",
    "PatchEmbed",
    "PatchMerging",
    "PConvEncoder",
    "MLPDecoder",
    "PConvLocator",
]


class PartialConv(nn.Module):
    """Partial convolution (FasterNet, "split_cat" variant).

    Only the first ``dim // n_div`` channels go through a dense 3x3x3 convolution; the rest are passed through
    and the two parts are concatenated back in their original order.

    Shapes: ``(B, dim, H, W, D)`` -> ``(B, dim, H, W, D)``.
    """

    def __init__(self, dim: int, n_div: int = 4) -> None:
        super().__init__()
        self.dim_conv = dim // n_div
        if self.dim_conv < 1:
            raise ValueError(f"PartialConv: dim={dim} is smaller than n_div={n_div}")
        self.dim_untouched = dim - self.dim_conv
        self.conv = nn.Conv3d(self.dim_conv, self.dim_conv, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convolved, untouched = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.conv(convolved), untouched), dim=1)


class PConvMlp(nn.Module):
    """Inverted bottleneck of a PConv block: 1x1x1 conv -> IN -> ReLU -> 1x1x1 conv, no biases.

    There is deliberately no norm/activation after ``fc2``: the block output is a plain residual sum.

    Shapes: ``(B, dim, H, W, D)`` -> ``(B, dim, H, W, D)`` (hidden width ``int(dim * mlp_ratio)``).
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Conv3d(dim, hidden, kernel_size=1, bias=False)
        self.norm = nn.InstanceNorm3d(hidden, affine=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv3d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class PConvBlock(nn.Module):
    """FasterNet block: ``x + DropPath(Mlp(PartialConv(x)))``.

    Not pre-norm and no layer scale; the shortcut is the block input (before the partial conv).

    Shapes: ``(B, dim, H, W, D)`` -> ``(B, dim, H, W, D)``.
    """

    def __init__(self, dim: int, n_div: int = 4, mlp_ratio: float = 2.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.partial_conv = PartialConv(dim, n_div)
        self.mlp = PConvMlp(dim, mlp_ratio)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.partial_conv(x)))


class PConvStage(nn.Module):
    """A sequence of :class:`PConvBlock` at one resolution.

    Shapes: ``(B, dim, H, W, D)`` -> ``(B, dim, H, W, D)``.
    """

    def __init__(self, dim: int, depth: int, n_div: int, mlp_ratio: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(PConvBlock(dim, n_div, mlp_ratio, drop_paths[i]) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PatchEmbed(nn.Module):
    """Stem: non-overlapping ``patch_size``-cube conv (no bias) + affine-free IN, no activation.

    Shapes: ``(B, in_channels, H, W, D)`` -> ``(B, embed_dim, H/p, W/p, D/p)``.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.norm = nn.InstanceNorm3d(embed_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PatchMerging(nn.Module):
    """Downsampling between stages: 2x2x2 stride-2 conv (no bias) + affine-free IN.

    The paper says LayerNorm; the authors' code (which produced the results) uses IN (docs/method.md §7 #1).

    Shapes: ``(B, dim, H, W, D)`` -> ``(B, 2*dim, H/2, W/2, D/2)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv3d(dim, 2 * dim, kernel_size=2, stride=2, bias=False)
        self.norm = nn.InstanceNorm3d(2 * dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class PConvEncoder(nn.Module):
    """Stem + PConv stages joined by patch merging.

    Each stage output is instance-normalised *for the decoder only*; the un-normalised tensor continues to the
    next merge (docs/method.md §2.3).

    Shapes: ``(B, in_channels, H, W, D)`` -> list of ``(B, embed_dim * 2**i, H/(p*2**i), W/(p*2**i), D/(p*2**i))``.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        depths: Sequence[int],
        mlp_ratio: float,
        n_div: int,
        patch_size: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        dims = [embed_dim * 2**i for i in range(len(depths))]
        rates = stochastic_depth_schedule(depths, drop_path_rate)
        self.stem = PatchEmbed(in_channels, embed_dim, patch_size)
        self.stages = nn.ModuleList(
            PConvStage(dims[i], depths[i], n_div, mlp_ratio, rates[i]) for i in range(len(depths))
        )
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(len(depths) - 1))
        self.out_norms = nn.ModuleList(nn.InstanceNorm3d(d, affine=False) for d in dims)
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.merges[i - 1](x)
            x = stage(x)
            features.append(self.out_norms[i](x))
        return features


class MLPDecoder(nn.Module):
    """SegFormer-like all-MLP decoder (authors' variant, docs/method.md §2.4 and §7 #4/#5).

    Per-stage 1x1x1 projections to ``decoder_dim`` (bias), nearest upsampling to the stage-1 grid, channel
    concatenation in stage order, 1x1x1 fusion conv, then the 1x1x1 class head ``seg_layers[0]``. There is no
    non-linearity between fusion and head; the logits are upsampled trilinearly (align_corners=True) to the
    input size.

    Shapes: list of ``(B, dims[i], S/2**i)`` + output size -> ``(B, num_classes, *output_size)``, or a
    one-element list of it when ``deep_supervision`` is set (the locator has no auxiliary heads).
    """

    def __init__(self, dims: Sequence[int], decoder_dim: int, num_classes: int, deep_supervision: bool = False) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv3d(d, decoder_dim, kernel_size=1, bias=True) for d in dims)
        self.fuse = nn.Conv3d(len(dims) * decoder_dim, decoder_dim, kernel_size=1, bias=True)
        # Named seg_layers so that nnU-Net's -pretrained_weights skips the class-specific head.
        self.seg_layers = nn.ModuleList([nn.Conv3d(decoder_dim, num_classes, kernel_size=1, bias=True)])
        self.deep_supervision = bool(deep_supervision)

    def forward(
        self, features: Sequence[torch.Tensor], output_size: Sequence[int]
    ) -> torch.Tensor | list[torch.Tensor]:
        projected = []
        for i, (proj, feat) in enumerate(zip(self.lateral, features)):
            y = proj(feat)
            if i > 0:
                y = F.interpolate(y, scale_factor=float(2**i), mode="nearest")
            projected.append(y)
        logits = self.seg_layers[0](self.fuse(torch.cat(projected, dim=1)))
        logits = F.interpolate(logits, size=tuple(output_size), mode="trilinear", align_corners=True)
        return [logits] if self.deep_supervision else logits


class PConvLocator(PaperArchitecture, nn.Module):
    """Phase-1 ROI locator of the FLARE23 method (docs/method.md §2). Defaults = the paper's network, 1,383,746 params.

    Args:
        input_channels: image channels.
        num_classes: output channels (2 = the authors' softmax head; 1 for nnU-Net's region-based binary head).
        deep_supervision: initial value of ``decoder.deep_supervision``; only changes the return type
            (``[logits]`` instead of ``logits``), never the parameters.
        embed_dim: stage-1 width; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: PConv blocks per stage.
        mlp_ratio: inverted-bottleneck expansion.
        n_div: a partial conv convolves ``C // n_div`` channels.
        decoder_dim: width of the MLP decoder.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        patch_size: stem kernel and stride.

    Shapes: ``(B, input_channels, X, Y, Z)`` -> ``(B, num_classes, X, Y, Z)``; each of X, Y, Z divisible by
    :meth:`input_divisor` (32 by default).
    """

    DEFAULT_ARCH_KWARGS: dict[str, Any] = {
        "embed_dim": 32,
        "depths": [2, 2, 2, 2],
        "mlp_ratio": 2.0,
        "n_div": 4,
        "decoder_dim": 64,
        "drop_path_rate": 0.1,
        "patch_size": 4,
    }

    def __init__(
        self,
        input_channels: int = 1,
        num_classes: int = 2,
        deep_supervision: bool = False,
        *,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        mlp_ratio: float | None = None,
        n_div: int | None = None,
        decoder_dim: int | None = None,
        drop_path_rate: float | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        kw = self.resolved(
            dict(
                embed_dim=embed_dim,
                depths=depths,
                mlp_ratio=mlp_ratio,
                n_div=n_div,
                decoder_dim=decoder_dim,
                drop_path_rate=drop_path_rate,
                patch_size=patch_size,
            )
        )
        depths = as_int_tuple(kw["depths"], None, "depths")
        if not depths or min(depths) < 1:
            raise ValueError(f"PConvLocator: depths must be a non-empty list of positive ints, got {list(depths)}")
        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)
        self.arch_kwargs: dict[str, Any] = self.json_arch_kwargs(kw)
        a = self.arch_kwargs
        self.encoder = PConvEncoder(
            self.input_channels,
            a["embed_dim"],
            depths,
            a["mlp_ratio"],
            a["n_div"],
            a["patch_size"],
            a["drop_path_rate"],
        )
        self.decoder = MLPDecoder(self.encoder.dims, a["decoder_dim"], self.num_classes, deep_supervision)
        self.deep_supervision_strides: tuple[int, ...] = (1,)
        self._divisor = self.divisor_of(a)

    @staticmethod
    def divisor_of(arch_kwargs: dict[str, Any]) -> int:
        """Stem stride x 2 per merge (32 by default)."""
        return int(arch_kwargs["patch_size"]) * 2 ** (len(arch_kwargs["depths"]) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        validate_input(
            x,
            network=type(self).__name__,
            input_channels=self.input_channels,
            divisor=self._divisor,
            rule=f"stem stride {self.arch_kwargs['patch_size']} x {len(self.arch_kwargs['depths']) - 1} "
            "stride-2 merges",
        )
        return self.decoder(self.encoder(x), x.shape[2:])

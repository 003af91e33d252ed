"""Phase 2: the hybrid SAM/MSA encoder (adapted from SMT) + UNETR-like decoder, docs/method.md §3.

Follows the authors' code where it differs from the paper (docs/method.md §7 #2, #3, #6-#11): overlapping 3x3x3
downsampling embeddings, the two-conv stem, GELU inside SAA, the extra ``s`` and output projections of SAM,
a depthwise local enhancement on the attention values, a Mix-FFN, and no raw-input skip in the decoder. The
authors' unused fourth up-block (``decoder1``) is not built.

Norm epsilons matter for weight compatibility: LayerNorm eps 1e-5 in the embeddings, 1e-6 in the blocks and
at the stage ends; every InstanceNorm is affine-free with eps 1e-5.
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
    to_tokens,
    to_volume,
    validate_input,
)

__all__ = [
    "ConvStem",
    "OverlapPatchEmbed",
    "ScaleAwareModulation",
    "MultiHeadSelfAttention",
    "MixFFN",
    "MetaFormerBlock",
    "HybridStage",
    "SAMEncoder",
    "ResBlock",
    "UpBlock",
    "UNETRDecoder",
    "SAMHybridUNet",
]

BLOCK_LN_EPS = 1e-6
EMBED_LN_EPS = 1e-5


class ConvStem(nn.Module):
    """Stage-1 embedding ("head"): conv3 s2 (no bias) -> IN -> ReLU -> conv3 s1 (bias) -> tokens -> LN (eps 1e-5).

    Shapes: ``(B, in_channels, H, W, D)`` -> tokens ``(B, H/2 * W/2 * D/2, dim)`` and the grid ``(H/2, W/2, D/2)``.
    """

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        hidden = dim // 2
        self.conv1 = nn.Conv3d(in_channels, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(hidden, affine=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(hidden, dim, kernel_size=3, stride=1, padding=1, bias=True)
        self.norm = nn.LayerNorm(dim, eps=EMBED_LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.conv2(self.act(self.norm1(self.conv1(x))))
        spatial = tuple(x.shape[2:])
        return self.norm(to_tokens(x)), spatial


class OverlapPatchEmbed(nn.Module):
    """Downsampling embedding before stages 2..L: conv 3x3x3 s2 p1 (bias) -> tokens -> LN (eps 1e-5).

    Shapes: ``(B, in_dim, H, W, D)`` -> tokens ``(B, H/2 * W/2 * D/2, out_dim)`` and the grid.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=True)
        self.norm = nn.LayerNorm(out_dim, eps=EMBED_LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.proj(x)
        spatial = tuple(x.shape[2:])
        return self.norm(to_tokens(x)), spatial


class ScaleAwareModulation(nn.Module):
    """Scale-Aware Modulation token mixer (SMT "ca" attention, docs/method.md §3.7).

    ``s = S(z)`` is split into ``num_heads`` contiguous chunks of ``c = dim / num_heads`` channels; chunk ``j``
    gets a depthwise conv of kernel ``3 + 2j`` (multi-head mixed convolution, MHMC). The head outputs are then
    interleaved (channel ``g * num_heads + j`` = head ``j``, channel ``g``) so that each of the ``c`` groups
    of the grouped ``proj0`` sees one channel of every kernel size (scale-aware aggregation, SAA). The
    resulting modulator multiplies ``v = V(z)`` element-wise.

    Shapes: tokens ``(B, N, dim)`` on grid ``(H, W, D)`` -> ``(B, N, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 3, expand_ratio: int = 2, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"ScaleAwareModulation: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.s = nn.Linear(dim, dim, bias=qkv_bias)
        self.mhmc = nn.ModuleList(
            nn.Conv3d(self.head_dim, self.head_dim, kernel_size=3 + 2 * j, padding=1 + j, groups=self.head_dim)
            for j in range(num_heads)
        )
        hidden = dim * expand_ratio
        self.proj0 = nn.Conv3d(dim, hidden, kernel_size=1, groups=self.head_dim)
        # Per-sample, per-channel statistics over the current patch: weight-free, so it also runs at inference.
        self.norm = nn.InstanceNorm3d(hidden, affine=False)
        self.act = nn.GELU()  # the paper's Eq. 1 says ReLU; the released weights were trained with GELU
        self.proj1 = nn.Conv3d(hidden, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)

    def shuffle_heads(self, heads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``num_heads`` tensors ``(B, c, H, W, D)`` -> ``(B, c * num_heads, H, W, D)``, interleaved by channel."""
        return torch.stack(tuple(heads), dim=2).flatten(1, 2)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        v = self.v(x)
        s = to_volume(self.s(x), spatial_shape)
        mixed = [conv(chunk) for conv, chunk in zip(self.mhmc, torch.split(s, self.head_dim, dim=1))]
        modulator = self.proj1(self.act(self.norm(self.proj0(self.shuffle_heads(mixed)))))
        return self.proj(to_tokens(modulator) * v)


class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention with a depthwise local enhancement of the values (docs/method.md §3.8).

    ``out = Attn(q, k, v) + DWConv3(v)``, heads merged head-major (channel ``= head * head_dim + d``) in both
    terms, then the output projection. No positional encoding, no spatial reduction.

    Shapes: tokens ``(B, N, dim)`` on grid ``(H, W, D)`` -> ``(B, N, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"MultiHeadSelfAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.local_enhance = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        q = self.q(x).reshape(batch, n_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        # kv's output channels are [k heads | v heads], each head-major.
        k, v = self.kv(x).reshape(batch, n_tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA picks a fused kernel on GPU; same math as softmax(q k^T * scale) v with dropout 0.
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scale)
        attn = attn.transpose(1, 2).reshape(batch, n_tokens, dim)
        v_merged = v.transpose(1, 2).reshape(batch, n_tokens, dim)
        local = to_tokens(self.local_enhance(to_volume(v_merged, spatial_shape)))
        return self.proj(attn + local)


class MixFFN(nn.Module):
    """Mix-FFN: ``fc2(GELU(h + DWConv3(h)))`` with ``h = fc1(x)`` (docs/method.md §3.6).

    Shapes: tokens ``(B, N, dim)`` on grid ``(H, W, D)`` -> ``(B, N, dim)`` (hidden ``int(dim * mlp_ratio)``).
    """

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        h = self.fc1(x)
        h = h + to_tokens(self.dwconv(to_volume(h, spatial_shape)))
        return self.fc2(self.act(h))


class MetaFormerBlock(nn.Module):
    """Pre-norm block: ``x + DropPath(mixer(LN(x)))``, then ``x + DropPath(MixFFN(LN(x)))``; LN eps 1e-6.

    ``token_mixer`` is a :class:`ScaleAwareModulation` or :class:`MultiHeadSelfAttention`. No layer scale.

    Shapes: tokens ``(B, N, dim)`` on grid ``(H, W, D)`` -> ``(B, N, dim)``.
    """

    def __init__(self, dim: int, token_mixer: nn.Module, mlp_ratio: float = 2.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.token_mixer = token_mixer
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mlp = MixFFN(dim, mlp_ratio)
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.token_mixer(self.norm1(x), spatial_shape))
        return x + self.drop_path2(self.mlp(self.norm2(x), spatial_shape))


class HybridStage(nn.Module):
    """One encoder stage: MetaFormer blocks, then the stage-end LN (eps 1e-6).

    Mixer per block: SAM if ``msa_heads == 0``, MSA if ``sam_heads == 0``, else SAM at even and MSA at odd
    block indices (docs/method.md §3.4).

    Shapes: tokens ``(B, N, dim)`` on grid ``(H, W, D)`` -> ``(B, N, dim)``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        sam_heads: int,
        msa_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        expand_ratio: int,
        drop_paths: Sequence[float],
    ) -> None:
        super().__init__()
        if sam_heads <= 0 and msa_heads <= 0:
            raise ValueError(f"HybridStage(dim={dim}): sam_heads and msa_heads cannot both be 0")
        blocks = []
        for j in range(depth):
            use_sam = msa_heads <= 0 or (sam_heads > 0 and j % 2 == 0)
            mixer = (
                ScaleAwareModulation(dim, sam_heads, expand_ratio, qkv_bias)
                if use_sam
                else MultiHeadSelfAttention(dim, msa_heads, qkv_bias)
            )
            blocks.append(MetaFormerBlock(dim, mixer, mlp_ratio, drop_paths[j]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)

    def forward(self, x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, spatial_shape)
        return self.norm(x)


class SAMEncoder(nn.Module):
    """Hierarchical hybrid encoder: ``embeddings[i]`` then ``stages[i]`` for every stage.

    The normalised stage output is both the skip feature and the input of the next embedding.

    Shapes: ``(B, in_channels, H, W, D)`` -> list of ``(B, embed_dims[i], H/2**(i+1), W/2**(i+1), D/2**(i+1))``.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        sam_heads: Sequence[int],
        msa_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        qkv_bias: bool,
        expand_ratio: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        rates = stochastic_depth_schedule(depths, drop_path_rate)
        self.embeddings = nn.ModuleList(
            [ConvStem(in_channels, embed_dims[0])]
            + [OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i]) for i in range(1, n)]
        )
        self.stages = nn.ModuleList(
            HybridStage(
                embed_dims[i],
                depths[i],
                sam_heads[i],
                msa_heads[i],
                mlp_ratios[i],
                qkv_bias,
                expand_ratio,
                rates[i],
            )
            for i in range(n)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for embed, stage in zip(self.embeddings, self.stages):
            tokens, spatial = embed(x)
            x = to_volume(stage(tokens, spatial), spatial)
            features.append(x)
        return features


class ResBlock(nn.Module):
    """Residual conv block (MONAI UnetResBlock semantics, docs/method.md §3.9).

    conv3 (no bias) -> IN -> LeakyReLU(0.01) -> conv3 (no bias) -> IN, plus the shortcut (identity, or a
    1x1x1 conv + IN when the width changes), then LeakyReLU(0.01). All INs are affine-free.

    Shapes: ``(B, in_dim, H, W, D)`` -> ``(B, out_dim, H, W, D)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_dim, out_dim, kernel_size=3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_dim, affine=False)
        self.conv2 = nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_dim, affine=False)
        self.act = nn.LeakyReLU(0.01)
        if in_dim != out_dim:
            self.res_conv: nn.Module | None = nn.Conv3d(in_dim, out_dim, kernel_size=1, bias=False)
            self.res_norm: nn.Module | None = nn.InstanceNorm3d(out_dim, affine=False)
        else:
            self.res_conv = None
            self.res_norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        shortcut = x if self.res_conv is None else self.res_norm(self.res_conv(x))
        return self.act(out + shortcut)


class UpBlock(nn.Module):
    """Decoder step: transposed conv k2 s2 (no bias), concatenate ``[upsampled, skip]``, :class:`ResBlock`.

    Shapes: ``(B, in_dim, H, W, D)`` + skip ``(B, out_dim, 2H, 2W, 2D)`` -> ``(B, out_dim, 2H, 2W, 2D)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.transp_conv = nn.ConvTranspose3d(in_dim, out_dim, kernel_size=2, stride=2, bias=False)
        self.res_block = ResBlock(2 * out_dim, out_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.res_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UNETRDecoder(nn.Module):
    """UNETR-like decoder on the four normalised stage outputs (no raw-input skip).

    ``skip_blocks[i]`` refines stage output ``i`` (E_{i+1}); ``up_blocks[i]`` produces D_{i+1} at stride
    ``2**(i+1)``; ``final_up`` (transposed conv with bias) returns to full resolution and ``seg_layers[0]`` is
    the 1x1x1 class head. With ``ds_heads``, ``seg_layers[i]`` (i >= 1) is an extra 1x1x1 head on D_i.

    Shapes: features ``(B, embed_dims[i], S/2**(i+1))`` -> ``(B, num_classes, S)``; with
    ``deep_supervision`` a list ``[full, D1 head, D2 head, ...]`` (strides 1, 2, 4, ...), highest first.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        feature_size: int,
        num_classes: int,
        ds_heads: bool = False,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        widths = [feature_size * 2**i for i in range(n)]
        self.skip_blocks = nn.ModuleList(ResBlock(embed_dims[i], widths[i]) for i in range(n))
        self.up_blocks = nn.ModuleList(UpBlock(widths[i + 1], widths[i]) for i in range(n - 1))
        # No norm/activation between final_up and the head: the authors' two layers are jointly linear.
        self.final_up = nn.ConvTranspose3d(feature_size, feature_size // 2, kernel_size=2, stride=2, bias=True)
        heads = [nn.Conv3d(feature_size // 2, num_classes, kernel_size=1)]
        if ds_heads:
            heads += [nn.Conv3d(widths[i - 1], num_classes, kernel_size=1) for i in range(1, n)]
        self.seg_layers = nn.ModuleList(heads)
        self.deep_supervision = bool(deep_supervision)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        skips = [block(f) for block, f in zip(self.skip_blocks, features)]
        x = skips[-1]
        decoded: list[torch.Tensor] = [x] * len(self.up_blocks)
        for i in reversed(range(len(self.up_blocks))):
            x = self.up_blocks[i](x, skips[i])
            decoded[i] = x
        logits = self.full_resolution_logits(x)
        if not self.deep_supervision:
            return logits
        return [logits] + [self.seg_layers[i](decoded[i - 1]) for i in range(1, len(self.seg_layers))]

    def full_resolution_logits(self, x: torch.Tensor, slabs: int = 4) -> torch.Tensor:
        """``seg_layers[0](final_up(x))``, ``(B, feature_size, H, W, D)`` -> ``(B, num_classes, 2H, 2W, 2D)``.

        ``final_up`` has kernel 2 and stride 2, so every input slice along H makes its own two output slices: without
        autograd the pair runs on ``slabs`` slabs of ``x``, which gives bit-identical logits but never holds the
        ``feature_size // 2``-channel full-resolution tensor whole. That tensor and its transient copies set the
        peak of a whole inference: 150 MB less for a 96³ tile in float32 on the CPU."""
        head = self.seg_layers[0]
        if torch.is_grad_enabled() or x.shape[2] < 2 * slabs:
            return head(self.final_up(x))
        parts = torch.chunk(x, slabs, dim=2)
        first = head(self.final_up(parts[0]))
        channels_last = first.is_contiguous(memory_format=torch.channels_last_3d)
        out = torch.empty(
            (first.shape[0], first.shape[1], 2 * x.shape[2], *first.shape[3:]),
            dtype=first.dtype,
            device=first.device,
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
        )
        out[:, :, : first.shape[2]] = first
        start = first.shape[2]
        for part in parts[1:]:
            slab = head(self.final_up(part))
            out[:, :, start : start + slab.shape[2]] = slab
            start += slab.shape[2]
        return out


class SAMHybridUNet(PaperArchitecture, nn.Module):
    """Phase-2 segmenter of the FLARE23 method (docs/method.md §3). Defaults = the paper's network, 35,844,525 params.

    Args:
        input_channels: image channels.
        num_classes: output channels (15 = background + 13 organs + tumor).
        deep_supervision: initial value of ``decoder.deep_supervision`` (return a list instead of a tensor);
            it never changes the parameters.
        embed_dims: encoder stage widths.
        depths: MetaFormer blocks per stage.
        sam_heads: SAM heads per stage (0 = no SAM blocks in that stage).
        msa_heads: MSA heads per stage (0 = no MSA blocks); both > 0 alternates SAM, MSA, SAM, ...
        mlp_ratios: Mix-FFN expansion per stage.
        qkv_bias: bias of the SAM ``v``/``s`` and MSA ``q``/``kv`` projections.
        expand_ratio: SAA bottleneck expansion.
        decoder_feature_size: decoder width at stride 2 (doubles per level).
        drop_path_rate: stochastic depth of the last encoder block (linear from 0).
        deep_supervision_heads: build extra 1x1x1 heads on D1..D{L-1} (not in the paper). With them and
            ``deep_supervision`` on, forward returns outputs at strides ``deep_supervision_strides``.

    Shapes: ``(B, input_channels, X, Y, Z)`` -> ``(B, num_classes, X, Y, Z)``; each of X, Y, Z divisible by
    :meth:`input_divisor` (16 by default).
    """

    DEFAULT_ARCH_KWARGS: dict[str, Any] = {
        "embed_dims": [60, 120, 240, 480],
        "depths": [2, 4, 6, 2],
        "sam_heads": [3, 3, 3, 0],
        "msa_heads": [0, 0, 8, 16],
        "mlp_ratios": [2.0, 2.0, 2.0, 2.0],
        "qkv_bias": True,
        "expand_ratio": 2,
        "decoder_feature_size": 60,
        "drop_path_rate": 0.0,
        "deep_supervision_heads": False,
    }

    def __init__(
        self,
        input_channels: int = 1,
        num_classes: int = 15,
        deep_supervision: bool = False,
        *,
        embed_dims: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        sam_heads: Sequence[int] | None = None,
        msa_heads: Sequence[int] | None = None,
        mlp_ratios: Sequence[float] | None = None,
        qkv_bias: bool | None = None,
        expand_ratio: int | None = None,
        decoder_feature_size: int | None = None,
        drop_path_rate: float | None = None,
        deep_supervision_heads: bool | None = None,
    ) -> None:
        super().__init__()
        kw = self.resolved(
            dict(
                embed_dims=embed_dims,
                depths=depths,
                sam_heads=sam_heads,
                msa_heads=msa_heads,
                mlp_ratios=mlp_ratios,
                qkv_bias=qkv_bias,
                expand_ratio=expand_ratio,
                decoder_feature_size=decoder_feature_size,
                drop_path_rate=drop_path_rate,
                deep_supervision_heads=deep_supervision_heads,
            )
        )
        embed_dims = as_int_tuple(kw["embed_dims"], None, "embed_dims")
        n = len(embed_dims)
        if n < 2:
            raise ValueError(f"SAMHybridUNet: need at least 2 stages, got embed_dims={list(embed_dims)}")
        depths = as_int_tuple(kw["depths"], n, "depths")
        sam_heads = as_int_tuple(kw["sam_heads"], n, "sam_heads")
        msa_heads = as_int_tuple(kw["msa_heads"], n, "msa_heads")
        mlp_ratios = kw["mlp_ratios"]
        if isinstance(mlp_ratios, (int, float)):
            raise TypeError(f"mlp_ratios must be a list (one per stage), got {mlp_ratios!r}")
        mlp_ratios = tuple(float(r) for r in mlp_ratios)
        if len(mlp_ratios) != n:
            raise ValueError(f"mlp_ratios must have {n} entries (one per stage), got {list(mlp_ratios)}")
        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)
        self.arch_kwargs: dict[str, Any] = self.json_arch_kwargs(kw)
        a = self.arch_kwargs
        self.encoder = SAMEncoder(
            self.input_channels,
            embed_dims,
            depths,
            sam_heads,
            msa_heads,
            mlp_ratios,
            a["qkv_bias"],
            a["expand_ratio"],
            a["drop_path_rate"],
        )
        self.decoder = UNETRDecoder(
            embed_dims, a["decoder_feature_size"], self.num_classes, a["deep_supervision_heads"], deep_supervision
        )
        self.deep_supervision_strides: tuple[int, ...] = (
            tuple(2**i for i in range(n)) if a["deep_supervision_heads"] else (1,)
        )
        self._divisor = self.divisor_of(a)

    @staticmethod
    def divisor_of(arch_kwargs: dict[str, Any]) -> int:
        """Stem stride 2 x 2 per later stage (16 by default)."""
        return 2 ** len(arch_kwargs["embed_dims"])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        validate_input(
            x,
            network=type(self).__name__,
            input_channels=self.input_channels,
            divisor=self._divisor,
            rule=f"stem stride 2 x {len(self.arch_kwargs['embed_dims']) - 1} stride-2 embeddings",
        )
        return self.decoder(self.encoder(x))

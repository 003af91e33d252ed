"""Small building blocks shared by both networks (pure torch).

Token layout (docs/method.md §3.1): a volume ``(B, C, H, W, D)`` becomes tokens ``(B, N, C)`` with
``N = H * W * D`` flattened row-major (H slowest, D fastest). Every reshape between the two goes through
:func:`to_tokens` / :func:`to_volume` so that the order is defined in exactly one place.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "DropPath",
    "drop_path_or_identity",
    "stochastic_depth_schedule",
    "to_tokens",
    "to_volume",
    "validate_input",
    "resolve_arch_kwargs",
    "PaperArchitecture",
]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W, D)`` -> ``(B, H*W*D, C)``, H-major."""
    return x.flatten(2).transpose(1, 2)


def to_volume(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, C, H, W, D)``; inverse of :func:`to_tokens`.

    A view: contiguous tokens become a ``channels_last_3d`` volume with the canonical strides of that format, the
    batch stride ``N * C`` included. ``reshape`` gave a batch of one the stride ``C`` instead, which PyTorch does
    not recognise as channels-last, so oneDNN reordered such a volume for every depthwise convolution that read it:
    the Mix-FFN's took 200 instead of 32 ms and three times its output in scratch memory at 48³ on a 2-core CPU
    (one tile per forward is nnU-Net's default there; ``BENCHMARKS.md``).
    """
    return x.unflatten(1, tuple(spatial_shape)).movedim(-1, 1)


class DropPath(nn.Module):
    """Per-sample stochastic depth: zero a residual branch for a whole sample with probability ``drop_prob``.

    The survivors are scaled by ``1 / (1 - drop_prob)`` so that the expectation is unchanged; identity in eval.

    Shapes: ``(B, *)`` -> ``(B, *)``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    return DropPath(drop_prob) if drop_prob > 0.0 else nn.Identity()


def stochastic_depth_schedule(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Per-stage drop-path rates, linear from 0 (first block) to ``drop_path_rate`` (last block).

    Plain Python rather than ``torch.linspace`` so that networks can be built under ``torch.device("meta")``.
    """
    total = sum(depths)
    rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


def validate_input(x: torch.Tensor, *, network: str, input_channels: int, divisor: int, rule: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, input_channels, X, Y, Z)`` with every spatial size a multiple
    of ``divisor`` and more than one voxel at the deepest level (the affine-free instance norms there need at
    least two voxels to compute a variance)."""
    shape = tuple(x.shape)
    if x.ndim != 5:
        raise ValueError(f"{network}: expected a 5-D input (B, C, X, Y, Z), got shape {shape}")
    if shape[1] != input_channels:
        raise ValueError(f"{network}: expected {input_channels} input channel(s), got shape {shape}")
    spatial = shape[2:]
    if any(s % divisor for s in spatial):
        raise ValueError(
            f"{network}: input spatial shape {spatial} is invalid: every spatial size must be divisible by "
            f"{divisor} ({rule})"
        )
    deepest = [s // divisor for s in spatial]
    if deepest[0] * deepest[1] * deepest[2] < 2:
        raise ValueError(
            f"{network}: input spatial shape {spatial} is too small: the deepest feature map would be "
            f"{tuple(deepest)}, but its instance norm needs at least 2 voxels (make one axis >= {2 * divisor})"
        )


def resolve_arch_kwargs(cls: type, defaults: Mapping[str, Any], arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``arch_kwargs`` into ``defaults`` for a classmethod that must not build the network.

    Keys that the constructor accepts but that do not shape the architecture (``input_channels``, ...) are
    ignored; anything the constructor would reject raises ``TypeError`` just like the constructor would.
    """
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(arch_kwargs) - accepted)
    if unknown:
        raise TypeError(f"{cls.__name__}: unexpected architecture keyword(s) {unknown}")
    merged = dict(defaults)
    merged.update({k: v for k, v in arch_kwargs.items() if k in defaults})
    return merged


def as_int_tuple(value: Sequence[int] | int, length: int | None, name: str) -> tuple[int, ...]:
    """Plans files give JSON lists; accept lists and tuples (and check per-stage lengths)."""
    if isinstance(value, int):
        raise TypeError(f"{name} must be a list/tuple of ints, got {value!r}")
    out = tuple(int(v) for v in value)
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries (one per stage), got {list(value)}")
    return out


class PaperArchitecture:
    """The architecture keywords of a network in one place: ``DEFAULT_ARCH_KWARGS`` (the paper's network, as the
    JSON a plans file holds) is the only copy of the defaults. The constructor takes them as keyword-only
    arguments without defaults of its own (:meth:`resolved` fills them in), ``samflare plan`` writes them into the
    plans, and :meth:`json_arch_kwargs` records what a built network uses.
    """

    DEFAULT_ARCH_KWARGS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def default_arch_kwargs(cls) -> dict[str, Any]:
        """The paper's configuration as JSON-ready kwargs (a fresh copy)."""
        return copy.deepcopy(cls.DEFAULT_ARCH_KWARGS)

    @classmethod
    def resolved(cls, arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``arch_kwargs`` with every missing architecture keyword set to its default; ``None`` means default."""
        unknown = sorted(set(arch_kwargs) - set(cls.DEFAULT_ARCH_KWARGS))
        if unknown:
            raise TypeError(f"{cls.__name__}: unexpected architecture keyword(s) {unknown}")
        merged = cls.default_arch_kwargs()
        merged.update({k: v for k, v in arch_kwargs.items() if v is not None})
        return merged

    @classmethod
    def json_arch_kwargs(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (one per architecture keyword) as the JSON types of the defaults: lists for sequences,
        the default's scalar type otherwise."""
        out: dict[str, Any] = {}
        for key, default in cls.DEFAULT_ARCH_KWARGS.items():
            value = values[key]
            if isinstance(default, list):
                out[key] = [type(default[0])(v) for v in value]
            else:
                out[key] = type(default)(value)
        return out

    @classmethod
    def input_divisor(cls, **arch_kwargs: Any) -> int:
        """Every spatial input size must be a multiple of this (see :meth:`divisor_of`)."""
        return int(cls.divisor_of(resolve_arch_kwargs(cls, cls.DEFAULT_ARCH_KWARGS, arch_kwargs)))

    @staticmethod
    def divisor_of(arch_kwargs: Mapping[str, Any]) -> int:
        """The input size divisor of a network with these (complete) architecture keywords."""
        raise NotImplementedError

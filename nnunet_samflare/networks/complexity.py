"""Parameter and MAC counts of the two networks (docs/method.md §4, §7 #12).

Convention (the same as docs/method.md §4.2's "torch FlopCounterMode" column): MACs are counted by
``torch.utils.flop_counter.FlopCounterMode`` and halved. It counts convolutions (incl. transposed and
depthwise), linear layers and matrix products, i.e. also the two attention matmuls ``q @ k^T`` and
``attn @ v``. Norms, activations, softmax, interpolation and element-wise additions/products are not counted.
FLOPs = 2 x MACs. The count runs on the ``meta`` device, so no real compute happens; on ``meta``,
``scaled_dot_product_attention`` decomposes into the two batched matmuls, which are counted. A fused CPU
attention kernel has no formula in torch's registry, so one is supplied below in case the dispatch changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["MAC_CONVENTION", "count_parameters", "count_macs", "describe_networks"]

MAC_CONVENTION = (
    "MACs = torch.utils.flop_counter.FlopCounterMode FLOPs / 2, counted on the meta device: convolutions "
    "(incl. transposed/depthwise), linear layers and the attention matmuls (q@k^T, attn@v); norms, activations, "
    "softmax, interpolation and element-wise ops are not counted. FLOPs = 2 x MACs."
)

_PAPER = {
    "locator": {
        "parameters": "1.38 M",
        "flops": "1.56 G",
        "note": "the paper's 'FLOPs' are thop MACs at 1x1x128^3 (thop 1.555 GMAC; FlopCounterMode 1.53 GMAC)",
    },
    "segmenter": {
        "parameters": "35.84 M",
        "flops": "374.77 G",
        "note": (
            "374.77 G is thop MACs at a 128^3 input, not at the stated 96^3 patch (docs/method.md §7 #12); "
            "at 96^3 thop gives 158.1 G because it counts norms/activations but misses the attention matmuls"
        ),
    },
}


def _sdpa_for_cpu_flops(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flop_formulas() -> dict[Any, Any]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_for_cpu_flops} if op is not None else {}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one eval-mode forward pass on an input of ``input_shape`` = ``(B, C, X, Y, Z)``.

    The model's own tensors are not touched or copied: the forward runs with meta stand-ins for its
    parameters and buffers, so this is free even at 128^3. Convention: see :data:`MAC_CONVENTION`.
    """
    meta_state = {
        name: torch.empty_like(t, device="meta") for name, t in (*model.named_parameters(), *model.named_buffers())
    }
    x = torch.empty(tuple(int(s) for s in input_shape), device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as counter:
            functional_call(model, meta_state, (x,))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def describe_networks() -> dict[str, Any]:
    """Both default (paper) networks: class path, parameters, MACs/FLOPs at the paper input size, input rule,
    default arch kwargs and the paper's reported figures. JSON-serialisable."""
    from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

    specs = (
        ("locator", PConvLocator, (1, 1, 128, 128, 128)),
        ("segmenter", SAMHybridUNet, (1, 1, 96, 96, 96)),
    )
    networks: dict[str, Any] = {}
    for name, cls, input_shape in specs:
        with torch.device("meta"):
            model = cls()
        macs = count_macs(model, input_shape)
        divisor = cls.input_divisor()
        networks[name] = {
            "class": f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}",
            "input_channels": model.input_channels,
            "num_classes": model.num_classes,
            "parameters": count_parameters(model),
            "input_shape": list(input_shape),
            "macs": macs,
            "gmacs": round(macs / 1e9, 2),
            "flops": 2 * macs,
            "gflops": round(2 * macs / 1e9, 2),
            "input_divisor": divisor,
            "input_constraint": (
                f"every spatial size divisible by {divisor}, and at least one axis >= {2 * divisor} "
                "(the deepest instance norm needs 2 voxels)"
            ),
            "arch_kwargs": cls.default_arch_kwargs(),
            "paper": dict(_PAPER[name]),
        }
    return {"mac_convention": MAC_CONVENTION, "networks": networks}

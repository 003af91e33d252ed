"""The recipe's optimizer: AdamW, with PyTorch's fused kernel where it has one.

The fused AdamW makes the same update to float rounding, in one pass over each group of tensors instead of a
dozen element-wise operations per parameter tensor. PyTorch never picks it by itself: unasked, it takes the
for-each form on CUDA and the per-tensor loop on a CPU. On the 2-core CPU the segmenter's optimizer step
with nnU-Net's gradient clipping (35.8 M parameters in 373 tensors) went from 157–161 to 59–60 ms, and a whole
training step at the demo's 2 × 32³ from 964–1,028 to 884–885 ms (BENCHMARKS.md).

A checkpoint keeps the form it was written with: ``load_state_dict`` restores the saved param groups, ``fused``
included, and moves the step counters where that form wants them, so a run resumed from an older checkpoint goes
on with the unfused optimizer it started with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Device types with a fused AdamW kernel in the pinned PyTorch.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_adamw(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``parameters`` (all on ``device``), fused where :data:`FUSED_ADAMW_DEVICES`
    allows."""
    return torch.optim.AdamW(
        parameters, lr=lr, weight_decay=weight_decay, fused=torch.device(device).type in FUSED_ADAMW_DEVICES
    )

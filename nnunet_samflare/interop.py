"""Load the FLARE23 authors' weights into our networks (docs/method.md §11 #2).

The authors' tensor names and shapes are listed in ``tests/data/reference_state_dict_keys.tsv``: phase 1 is
their FasterNet (our :class:`~nnunet_samflare.networks.PConvLocator`), phase 2 their SMT/UNETR model (our
:class:`~nnunet_samflare.networks.SAMHybridUNet`). Only the default (paper) configurations are supported.
Modules their forward pass never uses (phase 1: the dense decoder ``decode_stages_list``/``trans_up``/
``outconv0``; phase 2: ``decoder1``) are dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nnunet_samflare.errors import InputError

__all__ = ["PHASES", "convert_reference_state_dict", "load_reference_checkpoint"]

PHASES = ("locator", "segmenter")

_DEAD_PREFIXES = {
    "locator": ("decode_stages_list.", "trans_up.", "outconv0."),
    "segmenter": ("decoder1.",),
}

_NESTING_KEYS = ("state_dict", "model", "network_weights")

Rule = tuple[re.Pattern, Callable[[re.Match], "str | None"]]


def _locator_stage(m: re.Match[str]) -> str | None:
    # The authors interleave stages and merges in one list: even = PConv stage, odd = merge before the next.
    index, rest = int(m["i"]), m["rest"]
    block_match = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if index % 2 == 0 and block_match is not None:
        block, tail = block_match.groups()
        ours = {
            "spatial_mixing.partial_conv3.weight": "partial_conv.conv.weight",
            "mlp.0.weight": "mlp.fc1.weight",
            "mlp.3.weight": "mlp.fc2.weight",
        }.get(tail)
        return None if ours is None else f"encoder.stages.{index // 2}.blocks.{block}.{ours}"
    if index % 2 == 1 and rest == "reduction.weight":
        return f"encoder.merges.{index // 2}.reduction.weight"
    return None


_LOCATOR_RULES: list[Rule] = [
    (re.compile(r"patch_embed\.proj\.weight"), lambda m: "encoder.stem.proj.weight"),
    (re.compile(r"stages\.(?P<i>\d+)\.(?P<rest>.+)"), _locator_stage),
    (re.compile(r"to_fused\.(\d+)\.0\.(weight|bias)"), lambda m: f"decoder.lateral.{m[1]}.{m[2]}"),
    (re.compile(r"to_segmentation\.0\.(weight|bias)"), lambda m: f"decoder.fuse.{m[1]}"),
    (re.compile(r"to_segmentation\.1\.(weight|bias)"), lambda m: f"decoder.seg_layers.0.{m[1]}"),
]

_BLOCK = r"block(\d+)\.(\d+)\."


def _block(m: re.Match[str]) -> str:
    return f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}."


def _conv_block(part: str) -> str:
    # MONAI UnetResBlock: conv3 is the 1x1x1 shortcut projection.
    return {"conv1": "conv1", "conv2": "conv2", "conv3": "res_conv"}[part]


_SEGMENTER_RULES: list[Rule] = [
    (re.compile(r"patch_embed1\.conv\.0\.weight"), lambda m: "encoder.embeddings.0.conv1.weight"),
    (re.compile(r"patch_embed1\.conv\.3\.(weight|bias)"), lambda m: f"encoder.embeddings.0.conv2.{m[1]}"),
    (re.compile(r"patch_embed(\d+)\.norm\.(weight|bias)"), lambda m: f"encoder.embeddings.{int(m[1]) - 1}.norm.{m[2]}"),
    (re.compile(r"patch_embed(\d+)\.proj\.(weight|bias)"), lambda m: f"encoder.embeddings.{int(m[1]) - 1}.proj.{m[2]}"),
    (re.compile(_BLOCK + r"(norm1|norm2)\.(weight|bias)"), lambda m: f"{_block(m)}{m[3]}.{m[4]}"),
    (
        re.compile(_BLOCK + r"attn\.(v|s|proj|proj0|proj1|q|kv)\.(weight|bias)"),
        lambda m: f"{_block(m)}token_mixer.{m[3]}.{m[4]}",
    ),
    (
        re.compile(_BLOCK + r"attn\.local_conv_(\d+)\.(weight|bias)"),
        lambda m: f"{_block(m)}token_mixer.mhmc.{int(m[3]) - 1}.{m[4]}",
    ),
    (re.compile(_BLOCK + r"attn\.dw_conv\.(weight|bias)"), lambda m: f"{_block(m)}token_mixer.local_enhance.{m[3]}"),
    (re.compile(_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)"), lambda m: f"{_block(m)}mlp.{m[3]}.{m[4]}"),
    (re.compile(_BLOCK + r"mlp\.dwconv\.dwconv\.(weight|bias)"), lambda m: f"{_block(m)}mlp.dwconv.{m[3]}"),
    (re.compile(r"norm(\d+)\.(weight|bias)"), lambda m: f"encoder.stages.{int(m[1]) - 1}.norm.{m[2]}"),
    (
        re.compile(r"encoder(\d+)\.layer\.(conv1|conv2|conv3)\.conv\.weight"),
        lambda m: f"decoder.skip_blocks.{int(m[1]) - 2}.{_conv_block(m[2])}.weight",
    ),
    (
        re.compile(r"decoder(\d+)\.transp_conv\.conv\.weight"),
        lambda m: f"decoder.up_blocks.{int(m[1]) - 2}.transp_conv.weight",
    ),
    (
        re.compile(r"decoder(\d+)\.conv_block\.(conv1|conv2|conv3)\.conv\.weight"),
        lambda m: f"decoder.up_blocks.{int(m[1]) - 2}.res_block.{_conv_block(m[2])}.weight",
    ),
    (re.compile(r"outup\.(weight|bias)"), lambda m: f"decoder.final_up.{m[1]}"),
    (re.compile(r"out\.conv\.conv\.(weight|bias)"), lambda m: f"decoder.seg_layers.0.{m[1]}"),
]

_RULES = {"locator": _LOCATOR_RULES, "segmenter": _SEGMENTER_RULES}


def _target_shapes(phase: str, single_logit: bool) -> dict[str, torch.Size]:
    from nnunet_samflare.networks import PConvLocator, SAMHybridUNet

    # Built on the meta device: only names and shapes are needed, no memory or init cost.
    with torch.device("meta"):
        model = PConvLocator(num_classes=1 if single_logit else 2) if phase == "locator" else SAMHybridUNet()
    return {k: v.shape for k, v in model.state_dict().items()}


def _map_key(phase: str, key: str) -> str | None:
    for pattern, target in _RULES[phase]:
        m = pattern.fullmatch(key)
        if m is not None:
            return target(m)
    return None


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], phase: str, *, single_logit: bool = False
) -> dict[str, torch.Tensor]:
    """Map an authors' state dict onto the default ``PConvLocator()`` (phase ``"locator"``) or
    ``SAMHybridUNet()`` (phase ``"segmenter"``) state dict, ready for ``load_state_dict(strict=True)``.

    A leading ``module.`` (DataParallel) is stripped and the authors' dead modules are dropped. With
    ``single_logit`` (locator only) the 2-class softmax head becomes the equivalent 1-logit sigmoid head
    (``w1 - w0``, ``b1 - b0``: ``sigmoid(l1 - l0) == softmax(l)[1]``), for nnU-Net's region-based binary
    locator; load it into ``PConvLocator(num_classes=1)``.

    Raises ``ValueError`` naming the key on an unknown key, a shape mismatch, a non-tensor value, a duplicate
    or a missing tensor.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if single_logit and phase != "locator":
        raise ValueError("single_logit applies only to the locator's 2-class head")
    expected = _target_shapes(phase, single_logit)
    head_w, head_b = "decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"

    converted: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = raw_key[len("module.") :] if raw_key.startswith("module.") else raw_key
        if key.startswith(_DEAD_PREFIXES[phase]):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{raw_key!r}: expected a tensor, got {type(value).__name__}")
        ours = _map_key(phase, key)
        if ours is None or ours not in expected:
            raise ValueError(f"unknown key {raw_key!r} for the {phase} reference model")
        if ours in converted:
            raise ValueError(f"duplicate key {raw_key!r} (maps to {ours!r} twice)")
        tensor = value.detach().clone()
        if single_logit and ours in (head_w, head_b):
            if tensor.shape[0] != 2:
                raise ValueError(f"{raw_key!r}: single_logit needs a 2-class head, got shape {tuple(tensor.shape)}")
            tensor = tensor[1:2] - tensor[0:1]
        if tensor.shape != expected[ours]:
            raise ValueError(
                f"shape mismatch for {raw_key!r}: got {tuple(value.shape)}, the {phase} expects "
                f"{tuple(expected[ours])} (as {ours!r})"
            )
        converted[ours] = tensor
    missing = [k for k in expected if k not in converted]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"the {phase} state dict lacks {len(missing)} tensor(s) we need: {shown}")
    return {k: converted[k] for k in expected}


def _looks_like_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_reference_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` file holding a raw state dict, or one nested under ``'state_dict'``, ``'model'``
    or ``'network_weights'`` (searched in that order, also nested twice).

    Uses ``torch.load(weights_only=True)``: plain tensors and containers only, no arbitrary pickles.
    Raises ``FileNotFoundError`` or a one-line ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/unsafe files; the CLI wants one line
        detail = " ".join(str(e).split()).split(". ")[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise InputError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {detail})") from e
    for _ in range(3):
        if _looks_like_state_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _NESTING_KEYS if k in obj), None)
        if inner is None:
            break
        obj = inner
    raise InputError(
        path, f"no state dict found (expected a dict of tensors, possibly under one of {list(_NESTING_KEYS)})"
    )

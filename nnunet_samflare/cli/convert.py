"""``samflare convert-weights``: the FLARE23 authors' checkpoint -> a state dict of our network."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert-weights",
        help="convert the authors' phase-1/phase-2 checkpoint into a PConvLocator/SAMHybridUNet state dict",
        description="Map the authors' state dict (phase 1 = locator, phase 2 = segmenter) onto our network's "
        "names, dropping their unused modules. The output is a plain state dict (torch.save) that loads with "
        "strict=True into PConvLocator() / SAMHybridUNet() (PConvLocator(num_classes=1) with --single-logit).",
    )
    parser.add_argument("--phase", required=True, choices=("locator", "segmenter"), help="which model IN holds")
    parser.add_argument(
        "--single-logit",
        action="store_true",
        help="locator only: turn the 2-class softmax head into the equivalent 1-logit sigmoid head",
    )
    parser.add_argument("input", metavar="IN.pth", help="the authors' checkpoint (raw or nested state dict)")
    parser.add_argument("output", metavar="OUT.pth", help="where to write the converted state dict")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nnunet_samflare.errors import InputError
    from nnunet_samflare.interop import convert_reference_state_dict, load_reference_checkpoint

    output = Path(args.output)
    if not output.parent.is_dir():
        raise InputError(output.parent, "output folder does not exist")
    state_dict = load_reference_checkpoint(args.input)
    try:
        converted = convert_reference_state_dict(state_dict, args.phase, single_logit=args.single_logit)
    except ValueError as e:
        raise InputError(args.input, str(e)) from e
    # Write to a temporary file in the same folder, then rename: OUT is either absent or complete.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        torch.save(converted, tmp_name)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    n_params = sum(t.numel() for t in converted.values())
    print(f"wrote {output} ({args.phase}, {len(converted)} tensors, {n_params:,} parameters)")
    return 0

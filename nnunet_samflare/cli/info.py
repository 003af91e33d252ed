"""``samflare info [--json]``: parameters, MACs and input constraints of both default networks."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameters, MACs and input constraints of the locator and the segmenter",
        description="Describe both default (paper) networks: parameters, MACs/FLOPs at the paper input size "
        "(counted on the meta device, no compute), input size rule and default architecture kwargs.",
    )
    parser.add_argument("--json", action="store_true", help="print the full description as JSON")
    parser.set_defaults(func=run)


def format_table(description: dict[str, Any]) -> str:
    networks = description["networks"]
    header = ("network", "class", "params", "GMAC", "GFLOP", "input", "divisor", "paper")
    rows = [header]
    for name, info in networks.items():
        rows.append(
            (
                name,
                info["class"],
                f"{info['parameters']:,}",
                f"{info['gmacs']:.2f}",
                f"{info['gflops']:.2f}",
                "x".join(str(s) for s in info["input_shape"]),
                str(info["input_divisor"]),
                f"{info['paper']['parameters']} / {info['paper']['flops']}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"MAC convention: {description['mac_convention']}")
    for name, info in networks.items():
        lines.append(f"{name}: input {info['input_constraint']}")
        paper = info["paper"]
        lines.append(f"{name}: paper {paper['parameters']} params / {paper['flops']} ({paper['note']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nnunet_samflare.networks.complexity import describe_networks

    description = describe_networks()
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        print(format_table(description))
    return 0

"""``samflare profile``: the FLARE efficiency protocol, one fresh ``samflare predict`` process per case.

Every option this command does not know is passed to ``predict`` unchanged, e.g.
``samflare profile -i imagesTs -o out -d 501 -device cuda -f 0``, or, without a dataset,
``samflare profile -i imagesTs -o out --locator LOC_DIR --segmenter SEG_DIR``. argparse cannot do that by itself (it
reads ``-device`` as ``-d evice`` and rejects unknown options), so the sub-parser splits the arguments
first: exact matches of its own options are parsed, everything else is handed through. Anything after
``--`` is handed through as well.
"""

from __future__ import annotations

import argparse
import sys


class _PassThroughParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps its own options and collects every other token in ``extra_args``."""

    def _own_options(self) -> dict[str, int]:
        """Option string -> number of values it takes (0 for flags)."""
        return {option: (0 if action.nargs == 0 else 1)
                for action in self._actions for option in action.option_strings}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        own_options = self._own_options()
        own: list[str] = []
        extra: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            name = token.split("=", 1)[0] if token.startswith("--") else token
            if token == "--":
                extra.extend(args[i + 1:])
                break
            if name in own_options:
                width = 1 if "=" in token and name != token else 1 + own_options[name]
                own.extend(args[i:i + width])
                i += width
            else:
                extra.append(token)
                i += 1
        namespace, leftover = super().parse_known_args(own, namespace)
        namespace.extra_args = extra + leftover
        return namespace, []


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="time, GPU memory (every 0.1 s) and RAM of predict, one fresh process per case (FLARE)",
        description="Run `samflare predict` on every case of IMAGES in its own process (so start-up, imports, "
        "model loading and I/O count, as in FLARE) and sample device-wide and own GPU memory through NVML "
        "(nvidia-smi, device-wide only, where pynvml is missing) and host RAM (summed PSS of the process tree) "
        "every 0.1 s. Reports per case the time (s), MaxGPU (MB), AUC_GPU_Time (MB·s), own-process GPU peak, "
        "RAM peak, largest single-process RSS and exit code in profile.json, profile.csv and a memory-time PNG. "
        "All other options (e.g. -f, -device, --locator DIR --segmenter DIR) are passed to predict.",
        allow_abbrev=False,
    )
    # add_parser builds the sub-parser with the parent's class; switch it to the pass-through variant.
    parser.__class__ = _PassThroughParser
    parser.add_argument("-i", dest="images", required=True, metavar="IMAGES",
                        help="folder of <case>_0000 images (or one image file)")
    parser.add_argument("-o", dest="output_dir", required=True, metavar="OUT", help="prediction folder")
    parser.add_argument("-d", dest="dataset", metavar="DATASET",
                        help="dataset id or name, passed to predict; leave it out when the models are given as "
                        "--locator DIR --segmenter DIR (passed to predict as well)")
    parser.add_argument("--report-dir", metavar="DIR",
                        help="where profile.json, profile.csv, the PNGs and logs go (default: OUT)")
    parser.add_argument("--sample-interval", type=float, default=0.1, metavar="S",
                        help="sampling interval in seconds (FLARE: 0.1)")
    parser.add_argument("--case-timeout", type=float, metavar="S",
                        help="kill a case after this many seconds (reported as failed)")
    parser.add_argument("--no-gpu", action="store_true", help="do not sample GPU memory")
    parser.set_defaults(func=run, extra_args=[])


def _has_option(tokens: list[str], option: str) -> bool:
    return any(t == option or t.startswith(f"{option}=") for t in tokens)


def run(args: argparse.Namespace) -> int:
    from nnunet_samflare.evaluation.profile import format_profile_table, profile_cases

    if args.sample_interval <= 0:
        raise ValueError(f"--sample-interval must be positive, not {args.sample_interval}")
    if args.dataset is None and not (_has_option(args.extra_args, "--locator")
                                     and _has_option(args.extra_args, "--segmenter")):
        raise ValueError("give a dataset (-d) or both model folders (--locator DIR --segmenter DIR)")
    result = profile_cases(
        args.images,
        args.output_dir,
        args.dataset,
        args.extra_args,
        report_dir=args.report_dir,
        interval=args.sample_interval,
        timeout_s=args.case_timeout,
        gpu=None if args.no_gpu else "auto",
        progress=print,
    )
    print(format_profile_table(result))
    report_dir = args.report_dir or args.output_dir
    print(f"profile written to {report_dir}/profile.json and profile.csv")
    failed = result["summary"]["failed_cases"]
    if failed:
        print(f"samflare profile: {len(failed)} case(s) failed: {', '.join(failed)} (see their logs)",
              file=sys.stderr)
        return 1
    return 0

"""The ``samflare`` console script. Thin: every sub-command module only parses arguments and calls the
library; heavy imports (torch, nnunetv2) happen inside the handlers so that ``samflare -h`` stays fast."""

import argparse
import gc
import importlib
import sys

# Each module defines ``register(subparsers)``, which adds one sub-command whose handler is stored as
# ``func`` (``parser.set_defaults(func=...)``) and returns an exit code.
_COMMAND_MODULES = (
    "plan",
    "info",
    "convert",
    "predict",
    "locate",
    "uncrop",
    "postprocess",
    "pseudolabel",
    "evaluate",
    "profile",
    "demo",
    "export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samflare",
        description="FLARE23 two-phase cascade (PConv locator + SAM/MSA segmenter) for nnU-Net v2.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"nnunet_samflare.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # Tables use ±, ³ and ·: under an ASCII-only locale print them approximately rather than crash.
        if getattr(stream, "encoding", "utf-8").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "pass_through", False):  # only `profile` hands unknown options on (to predict)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        # Bad input and out of memory get their message and exit code (nnunet_samflare.errors); a bug keeps its
        # traceback.
        from nnunet_samflare.errors import report

        code = report(error, f"samflare {args.command}")
        if code is None:
            raise
        return code


def console_main() -> int:
    """The ``samflare`` executable: :func:`main`, then a quick exit. At shutdown Python runs full garbage
    collections over every object still alive, ~260,000 of them once torch and nnU-Net are imported: 1.3 s of
    each ``samflare predict`` on the 2-core CPU (``BENCHMARKS.md``). The process is ending and owns no cycles
    worth collecting, so the survivors are moved out of the collector's sight first."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())

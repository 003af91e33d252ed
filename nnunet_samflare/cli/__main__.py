"""``python -m nnunet_samflare.cli``: the same as the ``samflare`` console script."""

from nnunet_samflare.cli import console_main

# The guard matters: nnU-Net's worker pools use spawn, which re-imports the main module in every worker.
if __name__ == "__main__":
    raise SystemExit(console_main())

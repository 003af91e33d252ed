"""``python -m nnunet_samflare.cli``: the same as the ``samflare`` console script."""

from nnunet_samflare.cli import main

raise SystemExit(main())

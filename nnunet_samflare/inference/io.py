"""Former home of the file I/O helpers, kept so that ``from nnunet_samflare.inference.io import ...`` keeps
working. The code lives in :mod:`nnunet_samflare.io` (below both inference and evaluation); import from there."""

from nnunet_samflare.io import *  # noqa: F403
from nnunet_samflare.io import __all__  # noqa: F401

"""Re-exports the plug-in's nnU-Net trainers for ``nnUNet_extTrainer`` lookups.

nnU-Net imports every module of this folder as a top-level module and then purges it from
``sys.modules``; classes defined here could then not be pickled (spawned workers). The classes therefore
live in ``nnunet_samflare.training.trainers`` and are only re-exported.
"""

from nnunet_samflare.training.partial_labels import *  # noqa: F401,F403
from nnunet_samflare.training.trainers import *  # noqa: F401,F403

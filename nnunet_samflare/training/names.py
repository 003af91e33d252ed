"""The names nnU-Net keys our files and folders by, spelt once. Pure Python (the CLI imports it for its defaults).

Result folders are ``<trainer>__<plans>__<configuration>`` and checkpoints record the trainer's class name, so
these strings are frozen: renaming one makes existing models unloadable (docs/nnunet.md §1).
"""

#: ``samflare plan`` writes ``<DEFAULT_PLANS_NAME>.json`` unless told otherwise.
DEFAULT_PLANS_NAME = "samflarePlans"
#: The nnU-Net plans ``samflare plan`` starts from by default.
DEFAULT_SOURCE_PLANS_NAME = "nnUNetPlans"
#: The nnU-Net configuration the plug-in configurations inherit from.
BASE_CONFIGURATION = "3d_fullres"
LOCATOR_CONFIGURATION = "3d_locator"
SEGMENTER_CONFIGURATION = "3d_segmenter"
#: Class names of the trainers in :mod:`nnunet_samflare.training.trainers` (a test holds them equal).
LOCATOR_TRAINER = "nnUNetTrainer_SAMFlareLocator"
SEGMENTER_TRAINER = "nnUNetTrainer_SAMFlareSegmenter"

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
#: Segmenter trained on partially labelled scans (pseudo-label rounds; :mod:`nnunet_samflare.training.partial_labels`).
SEGMENTER_PARTIAL_TRAINER = "nnUNetTrainer_SAMFlareSegmenterPartial"
#: The training lengths nnU-Net offers as ``nnUNetTrainer_<N>epochs`` (nnunetv2/training/nnUNetTrainer/variants/
#: training_length/nnUNetTrainer_Xepochs.py); each trainer of this plug-in gets the same set.
TRAINING_LENGTHS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)


def training_length_name(base_name: str, epochs: int) -> str:
    """nnU-Net's naming: ``<base>_1epoch``, ``<base>_5epochs``, ..."""
    return f"{base_name}_{epochs}epoch" if epochs == 1 else f"{base_name}_{epochs}epochs"


def plugin_trainer_names() -> frozenset[str]:
    """The class name of every trainer the package defines: the three trainers, their ``Debug`` smoke-test forms and
    their training lengths (``tests/test_trainers.py`` holds this equal to the classes). None of them overrides
    ``nnUNetTrainer.build_network_architecture``, so inference can build their networks from the plans alone."""
    bases = (LOCATOR_TRAINER, SEGMENTER_TRAINER, SEGMENTER_PARTIAL_TRAINER)
    return frozenset(
        [*bases, *(f"{base}Debug" for base in bases)]
        + [training_length_name(base, n) for base in bases for n in TRAINING_LENGTHS]
    )

"""Zero-configuration trainer discovery for nnU-Net (run at interpreter start-up by a ``.pth`` file).

nnU-Net 2.8.1 finds trainers outside its own package only through the ``nnUNet_extTrainer`` environment
variable (a path list). This module appends the plug-in's trainer shim folder to it, so ``nnUNetv2_train``,
``nnUNetv2_predict``, ``--c``/``--val`` and DDP children (which inherit the environment and run this file
again) find ``nnUNetTrainer_SAMFlare*`` without any user setting. A value the user set is kept.

Opt out with ``SAMFLARE_NO_AUTOREGISTER=1``. Importing torch or nnunetv2 here would slow every Python start,
so only the light package ``__init__`` is imported, to locate the folder.
"""

import os

OPT_OUT_VARIABLE = "SAMFLARE_NO_AUTOREGISTER"


def _register() -> None:
    if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() in ("1", "true", "t", "yes", "y"):
        return
    import importlib.util

    spec = importlib.util.find_spec("nnunet_samflare.nnunet_trainers")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = os.path.abspath(list(spec.submodule_search_locations)[0])
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


try:
    _register()
except Exception:  # a .pth hook must never break the interpreter
    pass

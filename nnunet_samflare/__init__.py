"""nnunet-samflare: the FLARE23 PConv locator + SAM/MSA hybrid segmenter cascade as an nnU-Net v2 plug-in.

This module stays import-light on purpose (it is imported at every interpreter start by the trainer
autoregistration hook): torch and nnunetv2 are imported only by the sub-packages.
"""

__version__ = "0.1.0"

__all__ = ["predict", "__version__"]


def __getattr__(name: str):
    if name == "predict":
        from nnunet_samflare.inference.api import predict

        return predict
    raise AttributeError(f"module 'nnunet_samflare' has no attribute {name!r}")

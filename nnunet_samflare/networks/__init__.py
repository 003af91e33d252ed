"""The two networks of the FLARE23 method as plain, nnU-Net-compatible ``nn.Module`` s (pure torch).

* :class:`PConvLocator`: phase-1 ROI locator (docs/method.md §2), 1,383,746 parameters by default.
* :class:`SAMHybridUNet`: phase-2 SAM/MSA hybrid segmenter (docs/method.md §3), 35,844,525 parameters by default.

Both accept ``(input_channels, num_classes, deep_supervision, **arch_kwargs)`` as nnU-Net passes them from a
plans file, expose ``decoder.deep_supervision`` and ``deep_supervision_strides``, and name their class heads
``decoder.seg_layers.<i>``.
"""

from nnunet_samflare.networks.locator import PConvLocator
from nnunet_samflare.networks.segmenter import SAMHybridUNet

__all__ = ["PConvLocator", "SAMHybridUNet"]

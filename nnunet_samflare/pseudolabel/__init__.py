"""The paper's pseudo-label training on partially labelled and unlabelled scans (docs/method.md §6.4, §11.8).

Above :mod:`nnunet_samflare.inference` (it predicts with the cascade) and below the CLI
(``samflare pseudolabel {run,merge,vote,filter}``):

* :mod:`.vote` — fold probabilities (nnU-Net's ``.npz``/``.pkl``) averaged channel by channel, then argmax;
* :mod:`.filtering` — the paper's post-processing, then low-confidence voxels → nnU-Net's ignore label;
* :mod:`.merge` — ground truth wins on every label a case annotates;
* :mod:`.run` — the rounds as one resumable command (:mod:`.state`: the state file; :mod:`.datasets`: the
  rounds' nnU-Net raw datasets; :mod:`.report`: the per-round report);
* :mod:`.probabilities`, :mod:`.labelmaps` — the files they read and write.

Partial-label training without pseudo labels is a trainer:
:class:`nnunet_samflare.training.partial_labels.nnUNetTrainer_SAMFlareSegmenterPartial`.
"""

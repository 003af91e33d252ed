"""Issue 10, 2026-12-06: labels of the bench's 512×512×215 case through the default predictor, with the old
reshape-based ``to_volume`` and the new view, in one process.

Usage: ``labels_ab.py [--fast] [SEGMENTER_FOLDER]``; default: the bench workdir's untrained segmenter, whose
near-random logits are the worst case for near-ties. ``--fast``: the predictor of ``samflare predict --fast``.
"""

import json
import sys

import numpy as np

import nnunet_samflare.networks.segmenter as segmenter_module
from nnunet_samflare.inference import api
from nnunet_samflare.io import read_case

WORKDIR = "/tmp/samflare-bench"


def old_to_volume(x, spatial_shape):  # the implementation before this change
    batch, _, channels = x.shape
    return x.transpose(1, 2).reshape(batch, channels, *spatial_shape)


def main() -> None:
    models = json.load(open(f"{WORKDIR}/logs/models.json"))
    args = sys.argv[1:]
    options = dict(api.FAST_OPTIONS) if "--fast" in args else {}
    folders = [a for a in args if a != "--fast"]
    segmenter = folders[0] if folders else models["segmenter"]["folder"]
    predictor = api.build_predictor(
        locator=models["locator"]["folder"], segmenter=segmenter, device="cpu", folds=[0], **options
    )
    data, properties = read_case(f"{WORKDIR}/input/BENCH_0001_0000.nii.gz")
    labels = {}
    for name, to_volume in (("new", segmenter_module.to_volume), ("old", old_to_volume)):
        segmenter_module.to_volume = to_volume
        prediction = predictor.predict_case(data, properties)
        labels[name] = prediction.segmentation
        print(name, prediction.timings)
    differ = labels["new"] != labels["old"]
    print("voxels differing:", int(differ.sum()), "of", differ.size)
    for label in np.unique(labels["old"]):
        a, b = labels["old"] == label, labels["new"] == label
        print(label, int(a.sum()), 2 * (a & b).sum() / (a.sum() + b.sum()))


if __name__ == "__main__":
    main()

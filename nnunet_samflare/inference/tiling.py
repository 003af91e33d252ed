"""Sliding-window inference with several tiles per forward pass.

nnU-Net's predictor runs one tile at a time; on a GPU a 96³ tile of the segmenter leaves most of the device
idle. ``TileBatchingPredictor`` changes only how tiles are fed (``tile_batch_size`` at once); tiling, blending,
mirroring, fp16 accumulation on the device and nnU-Net's fall-back to host memory on OOM are unchanged.
"""

from __future__ import annotations

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian


class TileBatchingPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that predicts ``tile_batch_size`` tiles per network call (1 = nnU-Net's own loop)."""

    tile_batch_size: int = 1

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(
        self, data: torch.Tensor, slicers, do_on_device: bool = True
    ) -> torch.Tensor:
        if self.tile_batch_size <= 1:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        num_heads = self.label_manager.num_segmentation_heads
        logits = torch.zeros((num_heads, *data.shape[1:]), dtype=torch.half, device=results_device)
        weight_sum = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        if self.use_gaussian:
            # the same cached weights nnU-Net's loop uses
            weight = compute_gaussian(
                tuple(self.configuration_manager.patch_size),
                sigma_scale=1.0 / 8,
                value_scaling_factor=10,
                device=results_device,
            )
        else:
            weight = 1
        for start in range(0, len(slicers), self.tile_batch_size):
            group = slicers[start : start + self.tile_batch_size]
            tiles = torch.stack([data[s] for s in group]).to(self.device)
            predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
            for prediction, s in zip(predictions, group):
                logits[s] += prediction * weight if self.use_gaussian else prediction
                weight_sum[s[1:]] += weight
        torch.div(logits, weight_sum, out=logits)
        if torch.isinf(logits).any():
            raise RuntimeError("inf in the accumulated logits (fp16 overflow); use tile_batch_size 1 to compare")
        return logits

"""Sliding-window inference with several tiles per forward pass, inside nnU-Net's own loop.

nnU-Net's predictor runs one tile at a time; on a GPU a 96³ tile of the segmenter leaves most of the device
idle. ``TileBatchingPredictor`` keeps nnU-Net's ``_internal_predict_sliding_window_return_logits`` as it is —
tile order, the producer thread, blending, fp16 accumulation, its error-path clean-up and the fall-back to host
memory after a CUDA out-of-memory error — and changes only what one call of its per-tile hook
``_internal_maybe_mirror_and_predict`` does: the first call predicts the next ``tile_batch_size`` tiles in one
forward pass and hands the others out on the following calls. nnU-Net asks for the tiles in the order of its
slicers, so the batch can be read from the same padded data at the same slicers. When an attempt fails, what it
held is released before nnU-Net's retry (``tests/test_tiling.py`` forces that path with a stand-in network).

The same per-tile hook is where nnU-Net decides on mixed precision: autocast on CUDA, float32 elsewhere.
``cpu_autocast_dtype`` adds bfloat16 autocast on a CPU (``samflare predict --fast``): on a CPU with native
bfloat16 instructions (AVX512-BF16, AMX) oneDNN's bfloat16 convolutions halved the segmenter's forward pass on the
2-core VM (``BENCHMARKS.md``); elsewhere bfloat16 is emulated and slower, so :func:`cpu_has_native_bf16` decides.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import deque
from collections.abc import Callable, Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


class _TileBatches:
    """Predictions of the tiles ``slicers`` of ``data``, computed ``size`` at a time, handed out in order."""

    def __init__(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        data: torch.Tensor,
        slicers: Sequence[tuple[slice, ...]],
        size: int,
        device: torch.device,
    ):
        self.predict, self.data, self.slicers, self.size, self.device = predict, data, slicers, size, device
        self.next_tile = 0
        self.ready: deque[torch.Tensor] = deque()

    def take(self, tile: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            group = self.slicers[self.next_tile : self.next_tile + self.size]
            batch = torch.stack([self.data[s] for s in group]).to(self.device)
            self.ready.extend(prediction[None] for prediction in self.predict(batch))
            del batch
        index = self.next_tile
        self.next_tile += 1
        if index >= len(self.slicers) or tile.shape[1:] != self.data[self.slicers[index]].shape:
            raise RuntimeError("nnU-Net asked for tiles in an unexpected order; use tile_batch_size 1")
        return self.ready.popleft()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU with native instructions (not emulated)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the query
        return False


class TileBatchingPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that predicts ``tile_batch_size`` tiles per network call (1 = nnU-Net unchanged) and,
    with ``cpu_autocast_dtype`` set, runs the network under CPU autocast (predictions returned as float32)."""

    tile_batch_size: int = 1
    cpu_autocast_dtype: torch.dtype | None = None
    _batches: _TileBatches | None = None

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(
        self, data: torch.Tensor, slicers: Sequence[tuple[slice, ...]], do_on_device: bool = True
    ) -> torch.Tensor:
        if self.tile_batch_size > 1:
            self._batches = _TileBatches(
                super()._internal_maybe_mirror_and_predict, data, slicers, self.tile_batch_size, self.device
            )
        try:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        except RuntimeError as error:
            # nnU-Net retries with results on the host while still inside its exception handler, so the
            # traceback keeps every failed frame alive with the tensors it held on the GPU (the tile in the
            # network's forward, a batch of predictions here). nnU-Net deletes its own loop's tensors; free the
            # rest before its retry.
            if self._batches is not None:
                self._batches.ready.clear()
            traceback.clear_frames(error.__traceback__)
            raise
        finally:
            self._batches = None

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        autocast = self.cpu_autocast_dtype is not None and self.device.type == "cpu"
        with torch.autocast("cpu", dtype=self.cpu_autocast_dtype) if autocast else contextlib.nullcontext():
            if self._batches is None:
                prediction = super()._internal_maybe_mirror_and_predict(x)
            else:
                prediction = self._batches.take(x)
        return prediction.float() if autocast else prediction

"""Tile batching inside nnU-Net's sliding-window loop: the same logits as one tile at a time, and nnU-Net's
fall-back to host memory after an out-of-memory error still works, with nothing of the failed attempt kept."""

from __future__ import annotations

import weakref

import pytest
import torch
from nnunet_stand_ins import DATASET_JSON, plans_manager
from torch import nn

from nnunet_samflare.inference.tiling import TileBatchingPredictor


class StandIn(nn.Module):
    """A small convolutional network; ``fail_on_call`` raises what PyTorch raises on a CUDA OOM at that call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, kernel_size=3, padding=1)
        self.calls = 0
        self.fail_on_call: int | None = None
        self.outputs: list[weakref.ref] = []
        self.inputs: list[weakref.ref] = []
        self.output_dtypes: list[torch.dtype] = []

    def forward(self, x):
        self.calls += 1
        self.inputs.append(weakref.ref(x))
        if self.calls == self.fail_on_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        out = self.conv(x)
        self.output_dtypes.append(out.dtype)
        self.outputs.append(weakref.ref(out))
        return out


def predictor(tile_batch_size: int, gaussian: bool = True, mirroring: bool = False) -> TileBatchingPredictor:
    manager, configuration = plans_manager()
    p = TileBatchingPredictor(
        tile_step_size=0.5,
        use_gaussian=gaussian,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    p.manual_initialization(StandIn(), manager, configuration, None, DATASET_JSON, "StandIn", (0, 1, 2))
    p.tile_batch_size = tile_batch_size
    return p


IMAGE = torch.randn(1, 30, 25, 40, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("gaussian, mirroring", [(True, False), (False, False), (True, True)])
def test_batched_tiles_give_nnunets_logits(gaussian, mirroring):
    reference = predictor(1, gaussian, mirroring).predict_sliding_window_return_logits(IMAGE)
    batched_predictor = predictor(5, gaussian, mirroring)
    batched = batched_predictor.predict_sliding_window_return_logits(IMAGE)
    n_tiles = len(batched_predictor._internal_get_sliding_window_slicers(IMAGE.shape[1:]))
    assert n_tiles == 36  # 3 x 3 x 4 tiles of 16³ in batches of 5: the last batch is partial
    assert batched_predictor.network.calls == 8 * (8 if mirroring else 1)
    torch.testing.assert_close(batched, reference, atol=1e-3, rtol=1e-3)  # fp16 accumulation in both


@pytest.mark.parametrize("tile_batch_size", [1, 4])
def test_cpu_autocast_runs_every_tile_in_bfloat16_and_hands_nnunet_float32(tile_batch_size, monkeypatch):
    # Uniform blending (the cascade's default): Gaussian weights near the border are tiny, and nnU-Net's division
    # by their sum magnifies any rounding there.
    reference = predictor(1, gaussian=False).predict_sliding_window_return_logits(IMAGE)
    p = predictor(tile_batch_size, gaussian=False)
    p.cpu_autocast_dtype = torch.bfloat16
    handed_to_nnunet = []
    original = TileBatchingPredictor._internal_maybe_mirror_and_predict

    def spy(self, x):
        prediction = original(self, x)
        handed_to_nnunet.append(prediction.dtype)
        return prediction

    monkeypatch.setattr(TileBatchingPredictor, "_internal_maybe_mirror_and_predict", spy)
    logits = p.predict_sliding_window_return_logits(IMAGE)
    assert p.network.output_dtypes and set(p.network.output_dtypes) == {torch.bfloat16}
    assert set(handed_to_nnunet) == {torch.float32} and len(handed_to_nnunet) == 36
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call
    torch.testing.assert_close(logits.float(), reference.float(), atol=5e-2, rtol=2e-2)  # bfloat16: 8-bit mantissa
    assert not torch.equal(logits, reference)  # bfloat16 really changed the rounding


@pytest.mark.parametrize("tile_batch_size", [1, 4])
def test_out_of_memory_falls_back_to_the_host_with_the_failed_attempt_released(tile_batch_size):
    clean = predictor(tile_batch_size).predict_sliding_window_return_logits(IMAGE)
    p = predictor(tile_batch_size)
    # nnU-Net tries "results on the device" first only for a non-CPU device; the flag makes it take that path
    # here (torch.device("cpu") != "cpu"), and the stand-in fails in the middle of it like a CUDA OOM would.
    p.perform_everything_on_device = True
    p.network.fail_on_call = 3
    attempts = []
    original = TileBatchingPredictor._internal_predict_sliding_window_return_logits

    def spy(self, data, slicers, do_on_device=True):
        if attempts:  # the retry: everything the failed attempt computed must already be gone
            alive = [r for r in self.network.outputs + self.network.inputs if r() is not None]
            assert not alive, f"{len(alive)} tensors of the failed attempt still referenced"
            assert self._batches is None
        attempts.append(do_on_device)
        return original(self, data, slicers, do_on_device)

    p._internal_predict_sliding_window_return_logits = spy.__get__(p)
    logits = p.predict_sliding_window_return_logits(IMAGE)
    assert attempts == [True, False]
    torch.testing.assert_close(logits, clean)

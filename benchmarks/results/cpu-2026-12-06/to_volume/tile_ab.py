"""Issue 10, 2026-12-06: one 96³ segmenter forward (batch 1) with the old reshape-based ``to_volume`` and the new
view, interleaved, 3 runs each. Peak = ``VmHWM`` above the RSS before the call (reset through ``clear_refs``).

Usage: ``tile_ab.py CHECKPOINT {plain,cl,bf16}`` (plain = the default predictor's network; cl = channels-last;
bf16 = ``--fast``: channels-last, bfloat16 autocast, float32 class head).
"""

import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
from _benchlib import current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402

import nnunet_samflare.networks.segmenter as segmenter_module
from nnunet_samflare.networks.fast_paths import use_channels_last, use_float32_class_heads
from nnunet_samflare.networks.segmenter import SAMHybridUNet


def old_to_volume(x, spatial_shape):  # the implementation before this change
    batch, _, channels = x.shape
    return x.transpose(1, 2).reshape(batch, channels, *spatial_shape)


def main() -> None:
    torch.set_num_threads(2)
    checkpoint, mode = sys.argv[1], sys.argv[2]
    variants = {"old": old_to_volume, "new": segmenter_module.to_volume}
    net = SAMHybridUNet(1, 15).eval()
    net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"])
    if mode in ("cl", "bf16"):
        use_channels_last(net)
    if mode == "bf16":
        use_float32_class_heads(net)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    x = torch.randn(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    logits, times, peaks = {}, {n: [] for n in variants}, {n: [] for n in variants}
    with torch.no_grad(), autocast:
        for rep in range(3):
            for name, to_volume in variants.items():
                segmenter_module.to_volume = to_volume
                if rep == 0:
                    net(x)
                gc.collect()
                before = current_rss_mb()
                reset_peak_rss()
                start = time.perf_counter()
                out = net(x)
                times[name].append(time.perf_counter() - start)
                peaks[name].append(peak_rss_mb() - before)
                logits[name] = out.float()
    for name in variants:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{mode} {name}: median {statistics.median(times[name]):.2f} s ({runs}), +{max(peaks[name]):.0f} MB")
    diff = (logits["old"] - logits["new"]).abs().max().item()
    flips = (logits["old"].argmax(1) != logits["new"].argmax(1)).sum().item()
    print(f"max abs diff {diff:.3g}, argmax flips {flips}")


if __name__ == "__main__":
    main()

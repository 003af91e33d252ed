"""Issue 10, 2026-12-06: the Mix-FFN's depthwise 3³ convolution of stage 1 (120 channels at 48³, batch 1) on a
view of its tokens, as the old ``reshape`` built it (batch stride C) and with canonical channels-last strides
(batch stride N·C). Time of one call after a warm-up, and its peak above the RSS before it (``VmHWM`` reset
through ``clear_refs``; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed scratch memory leaves the RSS).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
from _benchlib import current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402

CHANNELS, SIDE = 120, 48


def main() -> None:
    torch.set_num_threads(2)
    conv = torch.nn.Conv3d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS).eval()
    tokens = torch.randn(1, SIDE**3, CHANNELS)
    inputs = {
        "reshape (old)": tokens.transpose(1, 2).reshape(1, CHANNELS, SIDE, SIDE, SIDE),
        "unflatten + movedim (new)": tokens.unflatten(1, (SIDE, SIDE, SIDE)).movedim(-1, 1),
        "contiguous copy": tokens.transpose(1, 2).reshape(1, CHANNELS, SIDE, SIDE, SIDE).contiguous(),
    }
    outputs = {}
    with torch.no_grad():
        for name, volume in inputs.items():
            conv(volume)
            times = []
            for _ in range(3):
                before = current_rss_mb()
                reset_peak_rss()
                start = time.perf_counter()
                outputs[name] = conv(volume)
                times.append(time.perf_counter() - start)
                peak = peak_rss_mb() - before
            out = outputs[name]
            print(
                f"{name:26s} strides {volume.stride()}: {min(times) * 1000:.0f} ms (best of 3), +{peak:.0f} MB "
                f"(output {out.numel() * 4 / 2**20:.0f} MB, channels-last "
                f"{out.is_contiguous(memory_format=torch.channels_last_3d)})"
            )
    reference = outputs["contiguous copy"]
    for name, out in outputs.items():
        print(f"{name:26s} bit-identical to the contiguous input's output: {torch.equal(out, reference)}")


if __name__ == "__main__":
    main()

"""One 96³ segmenter forward (paper-sized, random weights, channels-last, bfloat16 autocast, 2 threads) with the
plain class head and with the float32 one, interleaved: 7 timed runs of each after a warm-up."""

import copy
import statistics
import time

import torch

from nnunet_samflare.networks.fast_paths import use_channels_last, use_float32_class_heads
from nnunet_samflare.networks.segmenter import SAMHybridUNet

torch.set_num_threads(2)
plain = use_channels_last(SAMHybridUNet(1, 15).eval())
head = copy.deepcopy(plain)
use_float32_class_heads(head)
x = torch.randn(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
times = {"bfloat16 class head": [], "float32 class head": []}
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
    plain(x), head(x)
    for _ in range(7):
        for name, network in zip(times, (plain, head)):
            start = time.perf_counter()
            network(x)
            times[name].append(time.perf_counter() - start)
for name, values in times.items():
    print(f"{name}: median {statistics.median(values):.3f} s ({', '.join(f'{v:.3f}' for v in values)})")

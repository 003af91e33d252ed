"""Forward, backward and optimizer step (nnU-Net's clipping at 12, then AdamW) of the segmenter, one batch of
2 × S³ on the CPU: medians of 4 steps after 2 warm-up steps, with PyTorch's default AdamW or the fused one.

Usage (from benchmarks/): python results/cpu-2026-12-06/fused_adamw/optimizer_probe.py S [fused]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _benchlib as lib  # noqa: E402
import bench_networks as networks  # noqa: E402

from nnunet_samflare.training.plans import derive_samflare_plans  # noqa: E402

size, fused = int(sys.argv[1]), sys.argv[2:] == ["fused"]
plans_path = networks.plan_default_dataset(lib.DEFAULT_DATASET, Path(tempfile.mkdtemp()))
nnunet_plans = networks.load_json(plans_path)
spec_args = argparse.Namespace(
    models=["segmenter"],
    forward_batch=1,
    segmenter_size=[size] * 3,
    segmenter_batch=2,
    nnunet_patch=None,
    nnunet_batch=2,
    nnunet_optimizer="adamw",
    locator_size=None,
    locator_batch=1,
)
dataset_json = networks.load_json(plans_path.parent / "dataset.json")
spec = networks.build_specs(spec_args, nnunet_plans, dataset_json, derive_samflare_plans(nnunet_plans))[0]
torch.manual_seed(0)
network = networks.build_network(spec, deep_supervision=spec.deep_supervision).train()
shape = (2, spec.input_channels, *spec.patch)
x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
loss_fn = networks._build_loss(spec)
targets = networks._make_targets(spec, networks._output_shapes(spec, spec.deep_supervision, shape), x.device)
optimizer = torch.optim.AdamW(network.parameters(), lr=3e-4, weight_decay=1e-5, fused=fused)


def step() -> tuple[float, float, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(network(x), targets)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
    optimizer.step()
    return forward - start, backward - forward, time.perf_counter() - backward


for _ in range(2):
    step()
medians = [statistics.median(t) * 1000 for t in zip(*(step() for _ in range(4)))]
parameters = list(network.parameters())
print(f"{sum(p.numel() for p in parameters) / 1e6:.2f} M parameters in {len(parameters)} tensors, fused {fused}")
print("forward {:.0f} ms, backward {:.0f} ms, clip + optimizer {:.0f} ms".format(*medians))

"""Where do ``--fast``'s label flips come from? The segmenter's tiles of the real case as the cascade feeds them,
run in float32 (the reference) and under bfloat16 autocast with parts of the network kept in float32: voxels whose
argmax differs from the reference, the float32 top-two margin at those voxels, and one 96³ forward's time of each
variant (paper-sized segmenter, random weights, median of 5 after a warm-up).

Usage: python bf16_flips.py LOCATOR_FOLDER SEGMENTER_FOLDER CT.nii.gz
"""

import copy
import statistics
import sys
import time

import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_samflare.inference.cascade import CascadePredictor
from nnunet_samflare.networks.fast_paths import use_channels_last
from nnunet_samflare.networks.segmenter import SAMHybridUNet

VARIANTS = {
    "bfloat16 throughout (--fast before)": [],
    "class head in float32 (--fast now)": ["decoder.seg_layers"],
    "final up-sampling + class head in float32": ["decoder.final_up", "decoder.seg_layers"],
    "up_blocks.0 + final up-sampling + head": ["decoder.up_blocks.0", "decoder.final_up", "decoder.seg_layers"],
    "whole decoder in float32": ["decoder"],
    "whole encoder in float32": ["encoder"],
}


def as_float(value):
    if torch.is_tensor(value):
        return value.float()
    if isinstance(value, (list, tuple)):
        return [as_float(v) for v in value]
    return value


def keep_float32(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.ModuleList):
        for child in module:
            keep_float32(child)
        return
    forward = module.forward

    def float32_forward(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(*as_float(args), **kwargs)

    module.forward = float32_forward


def variant(network: torch.nn.Module, parts: list[str]) -> torch.nn.Module:
    network = use_channels_last(copy.deepcopy(network))
    for path in parts:
        module = network
        for key in path.split("."):
            module = module[int(key)] if key.isdigit() else getattr(module, key)
        keep_float32(module)
    return network


def bf16(network, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return network(x).float()


def float32(network, x):
    return network(x)


def forward_time(network, x, run=bf16, repeats: int = 5) -> float:
    run(network, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(network, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    locator, segmenter, image = sys.argv[1:4]
    torch.set_num_threads(2)
    predictor = CascadePredictor(locator, segmenter, device="cpu")
    network = predictor.segmenter.network
    tiles = []
    hook = network.register_forward_pre_hook(lambda module, args: tiles.append(args[0].detach().clone()))
    predictor.predict_case(*SimpleITKIO().read_images([image]))
    hook.remove()
    paper = SAMHybridUNet(1, 15).eval()
    x96 = torch.randn(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = [network(tile) for tile in tiles]
        top2 = [torch.topk(r, 2, dim=1).values for r in reference]
        margins = [t[:, 0] - t[:, 1] for t in top2]
        voxels = sum(m.numel() for m in margins)
        print(f"{len(tiles)} tiles of {tuple(tiles[0].shape[2:])}: {voxels:,} voxels")
        plain = use_channels_last(copy.deepcopy(paper))
        print(f"one 96³ forward in float32, channels-last: {forward_time(plain, x96, float32):.2f} s")
        print(
            "| variant | flipped voxels | float32 margin at flips, max | largest logit difference | 96³ forward (s) |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, parts in VARIANTS.items():
            fast = variant(network, parts)
            approx = [bf16(fast, tile) for tile in tiles]
            flipped = [a.argmax(1) != r.argmax(1) for a, r in zip(approx, reference)]
            flips = sum(int(f.sum()) for f in flipped)
            at_flips = torch.cat([m[f] for m, f in zip(margins, flipped)])
            worst = max(float((a - r).abs().max()) for a, r in zip(approx, reference))
            margin = f"{float(at_flips.max()):.4f}" if flips else "—"
            seconds = forward_time(variant(paper, parts), x96)
            print(f"| {name} | {flips} | {margin} | {worst:.4f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Speed and memory of the two plug-in networks beside nnU-Net's default 3d_fullres network, in one run.

Measured per network, each measurement in a **fresh Python process** (so that allocator caches, thread pools and
peak-memory counters of one measurement cannot leak into the next):

* forward: ``model.eval()``, ``torch.inference_mode()``, one input of ``forward_batch`` (default 1, what a sliding
  window feeds) × patch; on CUDA under ``torch.autocast`` (fp16), like nnU-Net's predictor.
* training step: forward + loss + backward + gradient clipping (norm 12) + optimizer step, as
  ``nnUNetTrainer.train_step`` does it, on a batch of the plans' batch size; on CUDA with autocast + GradScaler.
  Loss: nnU-Net's own (``DC_and_CE_loss``; ``DC_and_BCE_loss`` for the region-based locator), wrapped in
  ``DeepSupervisionWrapper`` for the nnU-Net network exactly as ``nnUNetTrainer._build_loss`` builds it.
  Optimizer: AdamW (lr 3e-4, wd 1e-5, fused like the plug-in's trainers) for all three by default;
  ``--nnunet-optimizer sgd`` gives nnU-Net's network its own SGD (momentum 0.99, Nesterov).
* time: median of ``--repeats`` runs after ``--warmup`` runs, each bracketed by ``torch.cuda.synchronize``.
* peak memory: on CPU the peak RSS of the measuring process (``getrusage`` ``ru_maxrss``) minus its RSS after
  imports, model, inputs and optimizer construction, i.e. what the measured work itself added; on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights, inputs and optimizer state
  included).

Networks:

* ``locator``: ``PConvLocator`` at 1×1×128³ (``--locator-size``), built from the samflare plans' ``3d_locator``
  architecture; one region output as ``nnUNetTrainer_SAMFlareLocator`` trains it.
* ``segmenter``: ``SAMHybridUNet`` at the ``3d_segmenter`` patch (96³), training batch from those plans (2).
* ``nnunet``: nnU-Net's ``3d_fullres`` network of the same dataset, built with nnU-Net's own
  ``get_network_from_plans`` from ``nnUNetPlans.json``: its patch size, batch size, class count, and deep
  supervision on for training (off for the forward), as ``nnUNetTrainer`` does.

Parameters and GMAC (``nnunet_samflare.networks.complexity.count_macs``: ``FlopCounterMode`` FLOPs / 2 on the
meta device, the same counter for all three networks) are per forward of one patch.

Plans: ``--plans`` is an ``nnUNetPlans.json`` (or the ``nnUNet_preprocessed/DatasetX`` folder holding it; its
``dataset.json`` is read from the same folder unless ``--dataset-json``). Without ``--plans`` the script plans
the raw dataset ``--data`` (default the package's example dataset
``nnunet_samflare/example_data/flare_like``) with stock ``nnUNetv2_plan_and_preprocess --no_pp`` in a temporary
folder (a few seconds; the raw data is linked, not copied). ``--samflare-plans`` defaults to
``derive_samflare_plans`` of those same nnU-Net plans.

Example (quick smoke run)::

    python benchmarks/bench_networks.py --locator-size 64 64 64 --segmenter-size 32 32 32 \\
        --nnunet-patch 32 32 32 --repeats 1 --warmup 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _benchlib as lib

MODELS = ("locator", "segmenter", "nnunet")
DATASET_ID = 501
DATASET_NAME = "Dataset501_FlareLike"


@dataclass
class NetworkSpec:
    """Everything a fresh process needs to build one network, its inputs, loss and optimizer."""

    name: str
    label: str
    arch_class: str
    arch_kwargs: dict
    arch_kwargs_req_import: list
    input_channels: int
    output_channels: int
    patch: list[int]
    forward_batch: int
    train_batch: int
    loss: str  # "ce" (softmax classes) or "regions" (sigmoid regions)
    batch_dice: bool
    deep_supervision: bool = False
    deep_supervision_scales: list | None = None
    optimizer: str = "adamw"
    notes: list[str] = field(default_factory=list)


# -- plans ----------------------------------------------------------------------------------------------------


def plan_default_dataset(raw_dataset: Path, workdir: Path) -> Path:
    """Stock nnU-Net planning (fingerprint + plans, no preprocessing) of a raw dataset; returns the plans file."""
    raw = workdir / "nnUNet_raw" / DATASET_NAME
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        raw.symlink_to(raw_dataset.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(raw_dataset, raw)
    env = lib.nnunet_env(workdir, n_proc=1)
    print(f"planning {raw_dataset} with nnUNetv2_plan_and_preprocess --no_pp (in {workdir}) ...", flush=True)
    lib.run_checked(
        lib.nnunet_command(
            "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "--no_pp", "-npfp", "1"
        ),
        env,
        timeout=1800,
    )
    return workdir / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"


def resolve_plans_path(path: Path) -> Path:
    if path.is_dir():
        path = path / "nnUNetPlans.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such plans file")
    return path


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def build_specs(args, nnunet_plans: dict, dataset_json: dict, samflare_plans: dict) -> list[NetworkSpec]:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_samflare.training.trainers import binary_foreground_dataset_json

    specs: list[NetworkSpec] = []

    def configuration_spec(name: str, plans: dict, configuration: str, ds_json: dict, label: str) -> NetworkSpec:
        plans_manager = PlansManager(copy.deepcopy(plans))
        cm = plans_manager.get_configuration(configuration)
        label_manager = plans_manager.get_label_manager(ds_json)
        return NetworkSpec(
            name=name,
            label=label,
            arch_class=cm.network_arch_class_name,
            arch_kwargs=dict(cm.network_arch_init_kwargs),
            arch_kwargs_req_import=list(cm.network_arch_init_kwargs_req_import),
            input_channels=determine_num_input_channels(plans_manager, cm, ds_json),
            output_channels=label_manager.num_segmentation_heads,
            patch=list(cm.patch_size),
            forward_batch=args.forward_batch,
            train_batch=cm.batch_size,
            loss="regions" if label_manager.has_regions else "ce",
            batch_dice=bool(cm.batch_dice),
        ), cm

    if "locator" in args.models:
        spec, _ = configuration_spec(
            "locator", samflare_plans, "3d_locator", binary_foreground_dataset_json(dataset_json), "PConvLocator"
        )
        spec.patch = list(args.locator_size)
        spec.forward_batch = args.locator_batch
        spec.train_batch = args.locator_batch
        spec.notes.append("one region head (all labels > 0), DC_and_BCE loss, as nnUNetTrainer_SAMFlareLocator")
        specs.append(spec)
    if "segmenter" in args.models:
        spec, _ = configuration_spec("segmenter", samflare_plans, "3d_segmenter", dataset_json, "SAMHybridUNet")
        if args.segmenter_size:
            spec.patch = list(args.segmenter_size)
        if args.segmenter_batch:
            spec.train_batch = args.segmenter_batch
        specs.append(spec)
    if "nnunet" in args.models:
        spec, cm = configuration_spec("nnunet", nnunet_plans, "3d_fullres", dataset_json, "nnU-Net 3d_fullres")
        spec.label = f"nnU-Net 3d_fullres ({spec.arch_class.rsplit('.', 1)[-1]})"
        if args.nnunet_patch:
            spec.patch = list(args.nnunet_patch)
        if args.nnunet_batch:
            spec.train_batch = args.nnunet_batch
        pools = [list(p) for p in cm.pool_op_kernel_sizes]
        # nnUNetTrainer._get_deep_supervision_scales: 1 / cumulative pooling, all but the coarsest stage.
        scales = []
        cumulative = [1] * len(spec.patch)
        for pool in pools[:-1]:
            cumulative = [c * p for c, p in zip(cumulative, pool)]
            scales.append([1.0 / c for c in cumulative])
        spec.deep_supervision = True
        spec.deep_supervision_scales = scales
        spec.optimizer = args.nnunet_optimizer
        specs.append(spec)
    for spec in specs:
        if spec.name != "nnunet":
            spec.optimizer = "adamw"
    return specs


# -- complexity (this process, meta device) --------------------------------------------------------------------


def build_network(spec: NetworkSpec, deep_supervision: bool):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        spec.arch_class,
        spec.arch_kwargs,
        spec.arch_kwargs_req_import,
        spec.input_channels,
        spec.output_channels,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def complexity(spec: NetworkSpec) -> dict[str, Any]:
    import torch

    from nnunet_samflare.networks.complexity import count_macs, count_parameters

    with torch.device("meta"):
        network = build_network(spec, deep_supervision=False)
    macs = count_macs(network, (1, spec.input_channels, *spec.patch))
    return {"parameters": count_parameters(network), "macs_per_patch": macs}


# -- measurement (fresh process) -------------------------------------------------------------------------------


def _output_shapes(spec: NetworkSpec, deep_supervision: bool, input_shape) -> list[tuple[int, ...]]:
    """Output shapes of one forward, from a copy of the network on the meta device (no real compute)."""
    import torch

    with torch.device("meta"):
        network = build_network(spec, deep_supervision=deep_supervision)
        with torch.no_grad():
            out = network(torch.empty(input_shape))
    outputs = out if isinstance(out, (list, tuple)) else [out]
    return [tuple(o.shape) for o in outputs]


def _build_loss(spec: NetworkSpec):
    import numpy as np
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    # nnUNetTrainer._build_loss, without DDP and without an ignore label.
    if spec.loss == "regions":
        loss = DC_and_BCE_loss(
            {},
            {"batch_dice": spec.batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
            use_ignore_label=False,
            dice_class=MemoryEfficientSoftDiceLoss,
        )
    else:
        loss = DC_and_CE_loss(
            {"batch_dice": spec.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=None,
            dice_class=MemoryEfficientSoftDiceLoss,
        )
    if spec.deep_supervision:
        weights = np.array([1 / (2**i) for i in range(len(spec.deep_supervision_scales))])
        weights[-1] = 0
        loss = DeepSupervisionWrapper(loss, weights / weights.sum())
    return loss


def _make_targets(spec: NetworkSpec, output_shapes, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    targets = []
    for shape in output_shapes:
        spatial = shape[2:]
        if spec.loss == "regions":
            t = torch.randint(0, 2, (shape[0], shape[1], *spatial), generator=generator).float()
        else:
            t = torch.randint(0, spec.output_channels, (shape[0], 1, *spatial), generator=generator).to(torch.int16)
        targets.append(t.to(device))
    return targets if spec.deep_supervision else targets[0]


def worker(spec_file: Path, mode: str, result_file: Path) -> None:
    """One measurement in this (fresh) process; writes its result as JSON."""
    import torch

    payload = json.loads(spec_file.read_text(encoding="utf-8"))
    spec = NetworkSpec(**payload["spec"])
    options = payload["options"]
    device = torch.device(options["device"])
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer and predictor set it
    torch.manual_seed(0)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def autocast():
        return torch.autocast("cuda", enabled=True) if cuda else _null_context()

    training = mode == "train"
    network = build_network(spec, deep_supervision=training and spec.deep_supervision).to(device)
    batch = spec.train_batch if training else spec.forward_batch
    input_shape = (batch, spec.input_channels, *spec.patch)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(1)).to(device)

    if training:
        network.train()
        loss_fn = _build_loss(spec)
        targets = _make_targets(spec, _output_shapes(spec, spec.deep_supervision, input_shape), device)
        optimizer = build_optimizer(spec, network, device)
        scaler = torch.amp.GradScaler("cuda") if cuda else None

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                output = network(x)
                loss = loss_fn(output, targets)
            return backward_and_step(loss, network, optimizer, scaler)
    else:
        network.eval()

        def step():
            with torch.inference_mode(), autocast():
                network(x)

    sync()
    baseline_rss = lib.current_rss_mb()
    baseline_allocated = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline_allocated = torch.cuda.memory_allocated(device) / lib.MIB
    for _ in range(options["warmup"]):
        step()
    sync()
    times = []
    for _ in range(options["repeats"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak_rss = lib.peak_rss_mb()
    result = {
        "mode": mode,
        "batch": batch,
        "input_shape": list(input_shape),
        "times_s": times,
        "median_s": lib.median(times),
        "min_s": min(times) if times else None,
        "torch_threads": torch.get_num_threads(),
        "baseline_rss_MB": baseline_rss,
        "peak_rss_MB": peak_rss,
        "peak_rss_delta_MB": peak_rss - baseline_rss,
    }
    if cuda:
        result["baseline_allocated_MB"] = baseline_allocated
        result["max_allocated_MB"] = torch.cuda.max_memory_allocated(device) / lib.MIB
        result["max_reserved_MB"] = torch.cuda.max_memory_reserved(device) / lib.MIB
        result["peak_MB"] = result["max_allocated_MB"]
        result["peak_kind"] = "torch.cuda.max_memory_allocated (weights, inputs, optimizer state included)"
    else:
        result["peak_MB"] = result["peak_rss_delta_MB"]
        result["peak_kind"] = "peak RSS minus RSS after imports, model, inputs and optimizer construction"
    result_file.write_text(json.dumps(result), encoding="utf-8")


def build_optimizer(spec: NetworkSpec, network, device):
    """nnU-Net's SGD for ``spec.optimizer == "sgd"``, else the plug-in trainers' AdamW (fused where PyTorch has the
    kernel, ``nnunet_samflare.training.optimizer``) at lr 3e-4, weight decay 1e-5."""
    import torch

    if spec.optimizer == "sgd":
        return torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    from nnunet_samflare.training.optimizer import build_adamw

    return build_adamw(network.parameters(), 3e-4, 1e-5, device)


def backward_and_step(loss, network, optimizer, scaler) -> float:
    """What ``nnUNetTrainer.train_step`` does after the loss: backward (scaled under AMP), gradient norm clipped at
    12, optimizer step; the loss comes back to the host, as nnU-Net pulls it there too."""
    import torch

    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
    return loss.detach().cpu().item()


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure(spec: NetworkSpec, mode: str, options: dict, scratch: Path, timeout: float | None) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; failures and timeouts come back as ``{"error": ...}``."""
    spec_file = scratch / f"{spec.name}_{mode}.spec.json"
    result_file = scratch / f"{spec.name}_{mode}.result.json"
    spec_file.write_text(json.dumps({"spec": asdict(spec), "options": options}), encoding="utf-8")
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_file), mode, str(result_file)]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {timeout:g} s"}
    wall = time.perf_counter() - start
    if completed.returncode != 0 or not result_file.is_file():
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"mode": mode, "error": f"exit code {completed.returncode}: {tail[0][:200]}"}
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["process_wall_s"] = wall
    return result


# -- report -----------------------------------------------------------------------------------------------------


def patch_text(patch) -> str:
    return "×".join(str(p) for p in patch)


def report(records: list[dict], device: str) -> str:
    by_name = {r["spec"]["name"]: r for r in records}
    reference = by_name.get("nnunet")
    peak_note = "peak RSS added by the step" if device == "cpu" else "torch max_memory_allocated"

    def value(record, mode, key):
        m = record["measurements"].get(mode, {})
        return None if "error" in m else m.get(key)

    def shown(record, mode, key, digits=3):
        m = record["measurements"].get(mode)
        if m is None:
            return "not run"
        if "error" in m:
            return "timed out" if m["error"].startswith("timed out") else "failed"
        return lib.fmt(m.get(key), digits)

    def per_mvox(record, mode):
        m = record["measurements"].get(mode, {})
        t = value(record, mode, "median_s")
        if t is None:
            return None
        return t / (math.prod(m["input_shape"][2:]) * m["batch"] / 1e6)

    rows = []
    for r in records:
        s = r["spec"]
        rows.append(
            [
                s["label"],
                patch_text(s["patch"]),
                f"{s['forward_batch']} / {s['train_batch']}",
                r["parameters"] / 1e6,
                r["macs_per_patch"] / 1e9,
                shown(r, "forward", "median_s"),
                per_mvox(r, "forward"),
                shown(r, "forward", "peak_MB", 4),
                shown(r, "train", "median_s"),
                per_mvox(r, "train"),
                shown(r, "train", "peak_MB", 4),
            ]
        )
    headers = [
        "model",
        "patch",
        "batch fwd/train",
        "params (M)",
        "GMAC/patch",
        "forward s",
        "fwd s/Mvox",
        "fwd peak MB",
        "train step s",
        "train s/Mvox",
        "train peak MB",
    ]
    text = [markdown(headers, rows)]
    if reference is not None and len(records) > 1:
        ratio_rows = []
        for r in records:
            if r is reference:
                continue

            def rr(getter, r=r):
                return lib.fmt_ratio(lib.ratio(getter(reference), getter(r)))

            def voxels(x):
                return math.prod(x["spec"]["patch"])

            ratio_rows.append(
                [
                    r["spec"]["label"],
                    rr(lambda x: x["parameters"]),
                    rr(lambda x: x["macs_per_patch"]),
                    rr(lambda x: x["macs_per_patch"] / voxels(x)),
                    rr(lambda x: value(x, "forward", "median_s")),
                    rr(lambda x: per_mvox(x, "forward")),
                    rr(lambda x: value(x, "forward", "peak_MB")),
                    rr(lambda x: value(x, "train", "median_s")),
                    rr(lambda x: per_mvox(x, "train")),
                    rr(lambda x: value(x, "train", "peak_MB")),
                ]
            )
        text.append("")
        text.append(f"Ratios = {reference['spec']['label']} ÷ model (> 1: the model is cheaper)")
        text.append(
            markdown(
                [
                    "model",
                    "params",
                    "GMAC/patch",
                    "GMAC/voxel",
                    "forward",
                    "fwd per voxel",
                    "fwd peak MB",
                    "train step",
                    "train per voxel",
                    "train peak MB",
                ],
                ratio_rows,
            )
        )
    for r in records:
        for mode, m in r["measurements"].items():
            if "error" in m:
                text.append(f"{r['spec']['label']} {mode}: {m['error']}")
    text.append("")
    text.append(
        f"Times: median; s/Mvox = seconds per million input voxels (batch × patch). Peak MB: {peak_note}. "
        "GMAC = FlopCounterMode FLOPs/2 per forward of one patch."
    )
    return "\n".join(text)


def markdown(headers, rows) -> str:
    return lib.markdown_table(headers, rows)


# -- main -------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plans", type=Path, help="nnUNetPlans.json (or the nnUNet_preprocessed/DatasetX folder)")
    p.add_argument("--dataset-json", type=Path, help="dataset.json (default: beside --plans)")
    p.add_argument("--samflare-plans", type=Path, help="samflarePlans.json (default: derived from --plans)")
    p.add_argument(
        "--data",
        type=Path,
        default=lib.DEFAULT_DATASET,
        help="raw nnU-Net dataset planned when --plans is not given (default: %(default)s)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (use >= 3 on CUDA)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, = CPU cores)")
    p.add_argument("--forward-batch", type=int, default=1, help="batch of the forward pass (default 1, a tile)")
    p.add_argument("--locator-size", type=int, nargs=3, default=[128, 128, 128], metavar=("X", "Y", "Z"))
    p.add_argument("--locator-batch", type=int, default=1)
    p.add_argument("--segmenter-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: from the plans")
    p.add_argument("--segmenter-batch", type=int, help="training batch (default: from the plans)")
    p.add_argument("--nnunet-patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: from the plans")
    p.add_argument("--nnunet-batch", type=int, help="training batch (default: from the plans)")
    p.add_argument("--nnunet-optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="samflare-bench-networks-")) if owned else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # nnunetv2.paths reads these at import time; a default keeps it quiet when --plans is given.
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, str(workdir / key))
    try:
        return run(args, workdir)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    plans_path = resolve_plans_path(args.plans) if args.plans else plan_default_dataset(args.data, workdir)
    dataset_json_path = args.dataset_json or plans_path.parent / "dataset.json"
    nnunet_plans = load_json(plans_path)
    dataset_json = load_json(dataset_json_path)
    if args.samflare_plans:
        samflare_plans = load_json(args.samflare_plans)
    else:
        from nnunet_samflare.training.plans import derive_samflare_plans

        samflare_plans = derive_samflare_plans(nnunet_plans)

    busy = lib.announce_busy()
    specs = build_specs(args, nnunet_plans, dataset_json, samflare_plans)
    options = {"device": args.device, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    info = lib.environment_info(args.device)
    print(lib.describe_environment(info), flush=True)
    print(f"nnU-Net plans: {plans_path}" + (" (planned here from " + str(args.data) + ")" if not args.plans else ""))
    scratch = workdir / "measurements"
    scratch.mkdir(exist_ok=True)
    records = []
    for spec in specs:
        record: dict[str, Any] = {"spec": asdict(spec), **complexity(spec), "measurements": {}}
        record["load_average_before"] = list(os.getloadavg())
        for mode in args.modes:
            print(f"measuring {spec.label} {mode} ...", flush=True)
            result = measure(spec, mode, options, scratch, args.timeout)
            record["measurements"][mode] = result
            if "error" in result:
                print(f"  {mode}: {result['error']}", flush=True)
            else:
                print(
                    f"  {mode}: median {result['median_s']:.4g} s over {len(result['times_s'])} run(s), "
                    f"peak {result['peak_MB']:.1f} MB",
                    flush=True,
                )
        records.append(record)

    table = report(records, args.device)
    if busy:
        table += "\n" + busy
    print()
    print(table)
    if args.json:
        lib.write_json(
            args.json,
            {
                "benchmark": "bench_networks",
                "environment": info,
                "settings": {
                    **options,
                    "forward_batch": args.forward_batch,
                    "nnunet_plans": str(plans_path),
                    "planned_from": None if args.plans else str(args.data),
                    "dataset_json": str(dataset_json_path),
                    "samflare_plans": str(args.samflare_plans) if args.samflare_plans else "derived from nnU-Net plans",
                    "autocast": "fp16 (torch.autocast cuda)" if args.device == "cuda" else "off (fp32)",
                },
                "records": records,
                "table": table,
            },
        )
        print(f"\nwritten: {args.json}")
    failed = [f"{r['spec']['name']}/{m}" for r in records for m, v in r["measurements"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_worker":
        worker(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())

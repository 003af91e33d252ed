"""The segmenter's training step beside nnU-Net's default network's, with the same-function variants of the
segmenter and a torch.profiler table of where its step goes.

One training step as ``nnUNetTrainer.train_step`` does it (zero_grad, forward and loss under fp16 autocast on
CUDA, GradScaler backward, gradient clipping at 12, the trainers' fused AdamW step, loss to the host), batch 2 ×
96³ for the segmenter, nnU-Net's own patch and batch for its ``3d_fullres`` network (deep supervision on, as it
trains).
Networks, losses and targets come from ``bench_networks.py``; every measurement runs in a fresh process.

Segmenter variants (all compute the same function with the same parameters; ``tests/test_speed_paths_networks.py``
checks outputs and gradients of each form):

* ``plain``: the network as built from the plans;
* ``channels_last``: weights and input in ``torch.channels_last_3d`` memory format (cuDNN's NDHWC kernels), the
  instance norms as group norms that keep that format, as ``samflare predict --fast`` runs the segmenter;
* ``sliced``: its depthwise 3-D convolutions (the scale-aware modulation's 3³/5³/7³, the Mix-FFN's and the
  attention's 3³) as 2-D depthwise convolutions of the depth slices, summed over the kernel's depth
  (``SlicedDepthwiseConv3d``), for the case that the 3-D depthwise kernels are the slow part;
* ``sliced+channels_last``: both;
* ``fast``: its grouped 1×1×1 convolutions as batched matrix products (``GroupedPointwiseConv3d``);
* ``fast+channels_last``, ``compile`` (``torch.compile`` of the plain network; its compile time is reported
  apart, from the warm-up): on request.

All in ``nnunet_samflare.networks.fast_paths``. nnU-Net's network is measured first and the variants in the order
above, each printing its line as it finishes, so a run cut short by a time limit still has the comparison.

``--profile-dir DIR`` also runs ``torch.profiler`` over 3 steps of ``plain`` and ``channels_last``: the top
operators by device (or CPU) time go into the JSON and the report, the Chrome traces into DIR.

Example (CPU smoke run, sizes shrunk, numbers meaningless)::

    python benchmarks/bench_train_step.py --segmenter-size 32 32 32 --nnunet-patch 32 32 32 --repeats 1 --warmup 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _benchlib as lib
import bench_networks as networks

VARIANTS = ("plain", "channels_last", "sliced", "sliced+channels_last", "fast", "fast+channels_last", "compile")
DEFAULT_VARIANTS = ["plain", "channels_last", "sliced", "sliced+channels_last", "fast"]
PROFILED_VARIANTS = ("plain", "channels_last")


def worker(payload_file: Path, result_file: Path) -> None:
    """One variant's training steps in this (fresh) process; writes the result as JSON."""
    import torch

    payload = json.loads(payload_file.read_text(encoding="utf-8"))
    spec = networks.NetworkSpec(**payload["spec"])
    variant, options = payload["variant"], payload["options"]
    device = torch.device(options["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer sets it
    torch.manual_seed(0)
    network = networks.build_network(spec, deep_supervision=spec.deep_supervision).to(device)
    input_shape = (spec.train_batch, spec.input_channels, *spec.patch)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(1)).to(device)
    if "fast" in variant:
        from nnunet_samflare.networks.fast_paths import use_fast_paths

        use_fast_paths(network)
    if "sliced" in variant:
        from nnunet_samflare.networks.fast_paths import use_sliced_depthwise

        use_sliced_depthwise(network)
    if "channels_last" in variant:
        from nnunet_samflare.networks.fast_paths import use_channels_last

        use_channels_last(network)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    model = torch.compile(network) if variant == "compile" else network
    network.train()
    loss_fn = networks._build_loss(spec)
    targets = networks._make_targets(spec, networks._output_shapes(spec, spec.deep_supervision, input_shape), device)
    optimizer = networks.build_optimizer(spec, network, device)
    scaler = torch.amp.GradScaler("cuda") if cuda else None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=True) if cuda else networks._null_context():
            loss = loss_fn(model(x), targets)
        return networks.backward_and_step(loss, network, optimizer, scaler)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warmup_times = []
    for _ in range(options["warmup"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        warmup_times.append(time.perf_counter() - start)
    times = []
    for _ in range(options["repeats"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "variant": variant,
        "input_shape": list(input_shape),
        "warmup_s": warmup_times,
        "times_s": times,
        "median_s": lib.median(times),
        "min_s": min(times) if times else None,
        "peak_rss_MB": lib.peak_rss_mb(),
    }
    if cuda:
        result["max_allocated_MB"] = torch.cuda.max_memory_allocated(device) / lib.MIB
        result["max_reserved_MB"] = torch.cuda.max_memory_reserved(device) / lib.MIB
    if options.get("profile_dir") and variant in PROFILED_VARIANTS:
        result["profile"] = profile(step, device, Path(options["profile_dir"]) / f"{spec.name}-{variant}.json.gz")
    result_file.write_text(json.dumps(result), encoding="utf-8")


def profile(step, device, trace_file: Path, steps: int = 3, top: int = 20) -> dict[str, Any]:
    """``torch.profiler`` over ``steps`` training steps: the ``top`` operators by self time on the device (CPU
    time on a CPU) and a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    trace_file.parent.mkdir(parents=True, exist_ok=True)
    plain_trace = trace_file.with_suffix("")
    prof.export_chrome_trace(str(plain_trace))
    # gzip: a trace of 3 steps is ~30 MB of JSON, more than a device call may bring back; Perfetto reads .json.gz
    with open(plain_trace, "rb") as src, gzip.open(trace_file, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain_trace.unlink()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in prof.key_averages()) or 1
    rows = []
    for event in events[:top]:
        value = getattr(event, key, 0)
        rows.append(
            {
                "op": event.key,
                "input_shapes": str(event.input_shapes)[:120],
                "calls": event.count,
                "self_ms_per_step": value / 1000 / steps,
                "share": value / total,
            }
        )
    return {"trace": str(trace_file), "time_kind": key, "steps": steps, "top": rows}


def measure(spec, variant: str, options: dict, scratch: Path, timeout: float) -> dict[str, Any]:
    payload = scratch / f"{spec.name}-{variant}.payload.json"
    result = scratch / f"{spec.name}-{variant}.result.json"
    payload.write_text(json.dumps({"spec": asdict(spec), "variant": variant, "options": options}), encoding="utf-8")
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(payload), str(result)]
    print(f"measuring {spec.label} [{variant}] ...", flush=True)
    try:
        completed = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        record = {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    else:
        if completed.returncode != 0 or not result.is_file():
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            record = {"variant": variant, "error": f"exit code {completed.returncode}: {tail[0][:200]}"}
        else:
            record = json.loads(result.read_text(encoding="utf-8"))
    if "error" in record:
        print(f"  {spec.label} [{variant}]: {record['error']}", flush=True)
    else:
        gpu = f", peak GPU allocated {record['max_allocated_MB']:.0f} MB" if "max_allocated_MB" in record else ""
        print(f"  {spec.label} [{variant}]: median step {record['median_s'] * 1000:.0f} ms{gpu}", flush=True)
    return record


def report(segmenter: list[dict], nnunet: dict | None, specs: dict, device: str) -> str:
    cuda = device == "cuda"
    reference = nnunet.get("median_s") if nnunet else None
    headers = ["network [variant]", "input", "median step (ms)", "min (ms)"]
    headers += ["peak GPU allocated (MB)"] if cuda else []
    headers += ["nnU-Net ÷ this (time)"]
    rows = []
    for record, spec in [(r, specs["segmenter"]) for r in segmenter] + ([(nnunet, specs["nnunet"])] if nnunet else []):
        shape = "×".join(map(str, [spec.train_batch, *spec.patch]))
        if "error" in record:
            rows.append(
                [f"{spec.label} [{record['variant']}]", shape, record["error"], "—"] + (["—"] if cuda else []) + ["—"]
            )
            continue
        row = [f"{spec.label} [{record['variant']}]", shape, record["median_s"] * 1000, record["min_s"] * 1000]
        if cuda:
            row.append(record.get("max_allocated_MB"))
        row.append(lib.fmt_ratio(lib.ratio(reference, record["median_s"])))
        rows.append(row)
    lines = [lib.markdown_table(headers, rows), ""]
    compiled = [r for r in segmenter if r.get("variant") == "compile" and r.get("warmup_s")]
    if compiled:
        lines.append(f"torch.compile: first (compiling) step {compiled[0]['warmup_s'][0]:.1f} s.")
    lines.append(
        "One training step as nnUNetTrainer.train_step: "
        + ("fp16 autocast + GradScaler, " if cuda else "fp32, ")
        + "clip 12, AdamW; median of the timed steps after the warm-up ones, each in a fresh process."
    )
    for record in segmenter:
        if record.get("profile"):
            top = record["profile"]["top"][:12]
            lines += ["", f"Profile, segmenter [{record['variant']}] ({record['profile']['time_kind']}, per step):", ""]
            lines.append(
                lib.markdown_table(
                    ["op", "input shapes", "calls", "ms/step", "share"],
                    [
                        [r["op"], r["input_shapes"], r["calls"], r["self_ms_per_step"], f"{100 * r['share']:.1f} %"]
                        for r in top
                    ],
                )
            )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plans", type=Path, help="nnUNetPlans.json or its folder (default: plan the example dataset)")
    p.add_argument("--data", type=Path, default=lib.DEFAULT_DATASET, help="raw dataset planned without --plans")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    p.add_argument("--no-nnunet", action="store_true", help="skip nnU-Net's network")
    p.add_argument("--segmenter-size", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    p.add_argument("--batch", type=int, default=2, help="segmenter and nnU-Net training batch (default: 2)")
    p.add_argument("--nnunet-patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="default: from the plans")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--profile-dir", type=Path, help="also profile plain and channels_last; Chrome traces here")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement process")
    p.add_argument("--json", type=Path, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="samflare-bench-train-step-") as tmp:
        workdir = Path(tmp)
        plans_path = (
            networks.resolve_plans_path(args.plans) if args.plans else networks.plan_default_dataset(args.data, workdir)
        )
        nnunet_plans = networks.load_json(plans_path)
        dataset_json = networks.load_json(plans_path.parent / "dataset.json")
        from nnunet_samflare.training.plans import derive_samflare_plans

        spec_args = argparse.Namespace(
            models=["segmenter"] + ([] if args.no_nnunet else ["nnunet"]),
            forward_batch=1,
            segmenter_size=args.segmenter_size,
            segmenter_batch=args.batch,
            nnunet_patch=args.nnunet_patch,
            nnunet_batch=args.batch,
            nnunet_optimizer="adamw",
            locator_size=None,
            locator_batch=1,
        )
        specs = {
            s.name: s
            for s in networks.build_specs(spec_args, nnunet_plans, dataset_json, derive_samflare_plans(nnunet_plans))
        }
        busy = lib.announce_busy()
        options = {
            "device": args.device,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "profile_dir": str(args.profile_dir.resolve()) if args.profile_dir else None,
        }
        load_before = list(os.getloadavg())
        nnunet = None if args.no_nnunet else measure(specs["nnunet"], "plain", options, workdir, args.timeout)
        segmenter = [measure(specs["segmenter"], v, options, workdir, args.timeout) for v in args.variants]
        table = report(segmenter, nnunet, specs, args.device) + (f"\n{busy}" if busy else "")
        info = lib.environment_info(args.device)
        print()
        print(lib.describe_environment(info))
        print(table)
        if args.json:
            lib.write_json(
                args.json,
                {
                    "benchmark": "bench_train_step",
                    "environment": info,
                    "settings": {**vars(args), "nnunet_plans": str(plans_path)},
                    "load_average_before": load_before,
                    "specs": {k: asdict(v) for k, v in specs.items()},
                    "segmenter": segmenter,
                    "nnunet": nnunet,
                    "table": table,
                },
            )
            print(f"\nwritten: {args.json}")
    failed = [r for r in segmenter + ([nnunet] if nnunet else []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())

"""Peak host memory of ``samflare predict`` as the scan gets longer, beside what nnU-Net's preprocessing alone
needs for the same scans.

The benchmark case of ``bench_cascade.py`` (prepared in ``--workdir``, or prepared here) is resampled with
SimpleITK to 512 × 512 × N slices over the same physical extent (``--slices``, default 215 and 1000: thinner
slices, the same body), so the ROI covers the same anatomy in more voxels. For each scan:

* ``samflare predict`` (the CLI, one case, fold 0) is run in its own process with ``samflare profile``'s
  sampler: wall time and peak host RAM (the process tree's summed PSS every 0.1 s);
* nnU-Net's own reading and ``3d_fullres`` preprocessing of the same file (``DefaultPreprocessor.run_case``),
  sampled the same way: the least memory stock ``nnUNetv2_predict`` needs for that scan before any network runs
  (its sliding window and export come on top). Stock prediction itself is not run here: ~28 min per 215-slice
  case on a 2-core CPU (``bench_cascade.py``).

The float32 copy of the scan that reading makes (nnU-Net's reader makes the same one) is printed as a reference
line: beyond it, the cascade's memory should grow with the ROI, not with the scan.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _benchlib as lib
from _cascade_case import add_case_arguments, add_run_arguments, case_workdir, prepare, resample_to, run_threads
from _cascade_runs import run_worker, sampled_run


def make_scan(source: Path, slices: int, folder: Path) -> Path:
    """``source`` resampled to ``slices`` slices (same in-plane grid, same extent), as ``<folder>/<name>``."""
    import SimpleITK as sitk

    target = folder / f"LONG{slices:04d}_0000.nii.gz"
    if not target.is_file():
        image = sitk.ReadImage(str(source))
        size = list(image.GetSize())
        resampled = image if size[2] == slices else resample_to(image, size=[size[0], size[1], slices])
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(resampled, str(target))
    return target


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--slices", type=int, nargs="+", default=[215, 1000], help="scan lengths (default: 215 1000)")
    p.add_argument("--no-nnunet", action="store_true", help="skip nnU-Net's preprocessing runs")
    p.add_argument(
        "--segmenter",
        type=Path,
        help="segmenter model folder to use instead of the prepared (untrained) one, e.g. the one "
        "bench_cascade_accuracy.py fitted: the post-processing's memory depends on how fragmented the "
        "label map is, and an untrained segmenter's noise is its worst case",
    )
    p.add_argument("--fast", action="store_true", help="samflare predict --fast")
    add_run_arguments(p, timeout=1800)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    busy = lib.announce_busy()
    load_before = list(os.getloadavg())
    with case_workdir(args) as workdir:
        prepared = prepare(args, workdir)
        models = prepared["models"]
        threads = run_threads(args)
        env = lib.nnunet_env(workdir, n_proc=threads)
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        rows, records = [], {}
        for slices in args.slices:
            scan = make_scan(Path(prepared["input"]), slices, workdir / "long_scans" / f"{slices}")
            out = workdir / "outputs" / f"long-{slices}"
            # fmt: off
            command = lib.samflare_command(
                "predict", "-i", scan, "-o", out, "--locator", models["locator"]["folder"],
                "--segmenter", args.segmenter or models["segmenter"]["folder"], "-f", "0", "-device", args.device,
                *(["--fast"] if args.fast else []),
            )
            # fmt: on
            sam = sampled_run(f"samflare-long-{slices}", command, env, workdir, args.timeout)
            nnunet = {"not_run": "--no-nnunet"}
            if not args.no_nnunet:
                spec = {"folder": models["nnunet"]["folder"], "input": str(scan), "output": str(out) + "-nnunet"}
                nnunet = run_worker(
                    f"nnunet-preprocess-{slices}", "nnunet-preprocess", spec, env, workdir, args.timeout
                )
            records[slices] = {"samflare": sam, "nnunet_preprocess": nnunet, "scan": str(scan)}
            scan_float_mb = 512 * 512 * slices * 4 / lib.MIB
            ok_sam = sam.get("exit_code") == 0
            ok_nn = nnunet.get("exit_code") == 0
            rows.append(
                [
                    f"512×512×{slices}",
                    scan_float_mb,
                    sam["time_s"] if ok_sam else sam.get("error") or "failed",
                    sam["MaxRAM_MB"] if ok_sam else "—",
                    (nnunet.get("result") or {}).get("preprocess_s") if ok_nn else nnunet.get("not_run", "failed"),
                    nnunet["MaxRAM_MB"] if ok_nn else "—",
                    lib.fmt_ratio(lib.ratio(nnunet.get("MaxRAM_MB"), sam.get("MaxRAM_MB")))
                    if ok_sam and ok_nn
                    else "—",
                ]
            )
        headers = [
            "scan",
            "float32 scan (MB)",
            "samflare CLI (s)",
            "samflare peak RAM (MB)",
            "nnU-Net preprocessing alone (s)",
            "nnU-Net preprocessing peak RAM (MB)",
            "nnU-Net ÷ samflare RAM",
        ]
        table = lib.markdown_table(headers, rows)
        table += (
            "\n\nPeak RAM: the process tree's summed PSS, sampled every 0.1 s. samflare: the whole CLI run (start-up, "
            f"models, one case, fold 0{', --fast' if args.fast else ''}). nnU-Net: reading + 3d_fullres "
            "preprocessing only, a lower bound of nnUNetv2_predict's peak for the same scan. Segmenter: "
            + (
                str(args.segmenter)
                if args.segmenter
                else "untrained (noisy labels everywhere in the ROI: the post-processing's worst case)"
            )
            + "."
        ) + (f"\n{busy}" if busy else "")
        info = lib.environment_info(args.device)
        print()
        print(lib.describe_environment(info))
        print(table)
        if args.json:
            lib.write_json(
                args.json,
                {
                    "benchmark": "bench_long_scan",
                    "environment": info,
                    "settings": vars(args),
                    "load_average_before": load_before,
                    "prepared": prepared,
                    "records": records,
                    "table": table,
                    "wall_s": time.perf_counter() - start,
                },
            )
            print(f"\nwritten: {args.json}")
    failed = [s for s, r in records.items() if r["samflare"].get("exit_code") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

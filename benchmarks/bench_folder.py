"""A folder of cases through ``samflare predict`` with and without overlap of consecutive cases (``-npp``/``-nps``,
nnUNetv2_predict's flags), and through stock ``nnUNetv2_predict`` where that is affordable.

The folder holds ``--cases`` copies of the benchmark case of ``bench_cascade.py`` (prepared in ``--workdir``,
or here). Each setting runs the CLI once over the whole folder in its own process (wall time and peak host RAM
by ``samflare profile``'s sampler); the table gives seconds per case and the speed-up over ``-npp 0 -nps 0``.
Stock ``nnUNetv2_predict -npp 3 -nps 3`` on the same folder runs with ``--nnunet`` (default on CUDA only: on a
2-core CPU one case takes ~28 min, see ``bench_cascade.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import _benchlib as lib
from _cascade_case import add_case_arguments, add_run_arguments, case_workdir, prepare, run_threads
from _cascade_runs import sampled_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--cases", type=int, default=4, help="copies of the case in the folder (default: 4)")
    p.add_argument(
        "--settings",
        nargs="+",
        default=["0,0", "1,1", "2,2"],
        metavar="NPP,NPS",
        help="-npp,-nps pairs to compare (default: 0,0 1,1 2,2)",
    )
    p.add_argument(
        "--nnunet",
        choices=("auto", "on", "off"),
        default="auto",
        help="stock nnUNetv2_predict -npp 3 -nps 3 on the folder (auto: on CUDA only)",
    )
    add_run_arguments(p, timeout=3600)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    busy = lib.announce_busy()
    load_before = list(os.getloadavg())
    with case_workdir(args) as workdir:
        prepared = prepare(args, workdir)
        models = prepared["models"]
        folder = workdir / "folder_input"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i in range(args.cases):
            os.link(prepared["input"], folder / f"CASE{i:03d}_0000.nii.gz")
        threads = run_threads(args)
        env = lib.nnunet_env(workdir, n_proc=threads)
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        records = {}
        for setting in args.settings:
            npp, nps = (int(v) for v in setting.split(","))
            out = workdir / "outputs" / f"folder-npp{npp}-nps{nps}"
            shutil.rmtree(out, ignore_errors=True)
            # fmt: off
            command = lib.samflare_command(
                "predict", "-i", folder, "-o", out, "--locator", models["locator"]["folder"],
                "--segmenter", models["segmenter"]["folder"], "-f", "0", "-device", args.device,
                "-npp", npp, "-nps", nps,
            )
            # fmt: on
            records[f"samflare -npp {npp} -nps {nps}"] = sampled_run(
                f"folder-npp{npp}-nps{nps}", command, env, workdir, args.timeout
            )
        if args.nnunet == "on" or (args.nnunet == "auto" and args.device == "cuda"):
            out = workdir / "outputs" / "folder-nnunet"
            shutil.rmtree(out, ignore_errors=True)
            # fmt: off
            command = lib.nnunet_command(
                "nnUNetv2_predict", "-i", folder, "-o", out, "-d", str(args.dataset_id), "-c", "3d_fullres",
                "-f", "0", "-device", args.device, "--disable_tta", "-npp", "3", "-nps", "3",
            )
            # fmt: on
            records["nnUNetv2_predict --disable_tta -npp 3 -nps 3"] = sampled_run(
                "folder-nnunet", command, env, workdir, args.timeout
            )
        else:
            records["nnUNetv2_predict --disable_tta -npp 3 -nps 3"] = {"not_run": "CPU: ~28 min per case"}
        base = records[f"samflare -npp {args.settings[0].replace(',', ' -nps ')}"]
        rows = []
        for name, record in records.items():
            ok = record.get("exit_code") == 0
            per_case = record["time_s"] / args.cases if ok else None
            status = record.get("not_run") or record.get("error") or "failed"
            rows.append(
                [
                    name,
                    record["time_s"] if ok else status,
                    per_case if ok else "—",
                    record["MaxRAM_MB"] if ok else "—",
                    lib.fmt_ratio(lib.ratio(base.get("time_s"), record.get("time_s"))) if ok else "—",
                ]
            )
        headers = [
            "run",
            f"wall, {args.cases} cases (s)",
            "s per case",
            "peak RAM (MB)",
            f"speed-up over {args.settings[0]}",
        ]
        table = lib.markdown_table(headers, rows)
        table += (
            f"\n\nOne CLI process per row over the same {args.cases} cases (start-up and model loading included); "
            "peak RAM: the process tree's summed PSS every 0.1 s."
        ) + (f"\n{busy}" if busy else "")
        info = lib.environment_info(args.device)
        print()
        print(lib.describe_environment(info))
        print(table)
        if args.json:
            lib.write_json(
                args.json,
                {
                    "benchmark": "bench_folder",
                    "environment": info,
                    "settings": vars(args),
                    "load_average_before": load_before,
                    "records": records,
                    "table": table,
                    "wall_s": time.perf_counter() - start,
                },
            )
            print(f"\nwritten: {args.json}")
    failed = [n for n, r in records.items() if "not_run" not in r and r.get("exit_code") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

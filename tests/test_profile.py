"""Profiling with real subprocesses on CPU; NVML paths with a stand-in pynvml module, the nvidia-smi fallback
with a stand-in nvidia-smi executable."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import SimpleITK as sitk

from nnunet_samflare.cli import build_parser, main
from nnunet_samflare.errors import InputError
from nnunet_samflare.evaluation import host_memory, profile
from nnunet_samflare.evaluation.profile import (
    NvmlSampler,
    SmiSampler,
    open_gpu_sampler,
    predict_command,
    process_memory_mb,
    profile_cases,
    run_and_sample,
    visible_gpu,
)

PY = sys.executable
# Holds ~200 MB of RAM for 0.6 s, then exits with the code given as argv[1].
ALLOCATE = "import sys, time; x = bytearray(200 * 2**20); time.sleep(0.6); sys.exit(int(sys.argv[1]))"
# Holds ~200 MB, then forks: parent and child share those pages (copy-on-write) for 0.6 s.
FORK_SHARED = (
    # b"\1" * n writes every page before the fork, so both processes map the same 200 MB resident pages
    "import os, sys, time; x = b'\\1' * (200 * 2**20); pid = os.fork(); time.sleep(1.5); "
    "sys.exit(0) if pid == 0 else sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
)


def python_case(case, output_dir: Path, predict_options) -> list[str]:
    """A stand-in for predict: case B fails with exit code 3."""
    return [PY, "-c", ALLOCATE, "3" if case.case_id == "B" else "0"]


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for case in ("A", "B"):
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(folder / f"{case}_0000.nii.gz"))
    (folder / "dataset.json").write_text("{}", encoding="utf-8")
    return folder


def test_run_and_sample_measures_ram_without_gpu():
    record = run_and_sample([PY, "-c", ALLOCATE, "0"], gpu=None)
    assert record["exit_code"] == 0 and record["error"] is None
    assert record["MaxRAM_MB"] > 150  # the 200 MB buffer
    assert record["MaxRSS_process_MB"] >= record["MaxRAM_MB"] - 1  # one process: PSS <= RSS
    assert record["n_samples"] >= 5  # 0.1 s apart over > 0.6 s
    times = record["samples"]["time_s"]
    assert times[0] < 0.1 and all(b > a for a, b in zip(times, times[1:]))
    assert record["MaxGPU_MB"] is None and record["AUC_GPU_Time_MBs"] is None and record["MaxGPU_own_MB"] is None
    assert "gpu_mb" not in record["samples"]


def test_profile_cases_reports_every_case_and_the_failure(images, tmp_path):
    out = tmp_path / "out"
    lines = []
    result = profile_cases(
        images, out, {"dataset": "501", "folds": [0]}, command_builder=python_case, progress=lines.append
    )
    by_case = {r["case"]: r for r in result["cases"]}
    assert list(by_case) == ["A", "B"]
    assert by_case["A"]["exit_code"] == 0 and by_case["B"]["exit_code"] == 3  # B failed, A still ran
    assert result["summary"]["failed_cases"] == ["B"]
    for record in by_case.values():
        assert record["MaxRAM_MB"] > 150
        assert Path(record["plot"]).read_bytes()[:4] == b"\x89PNG"
        assert Path(record["log"]).is_file()
    if result["settings"]["gpu"] is None:  # this machine has no usable GPU: the figures are absent and said so
        assert all(r["MaxGPU_MB"] is None and r["AUC_GPU_Time_MBs"] is None for r in result["cases"])
        assert result["settings"]["gpu_note"].startswith("GPU figures absent")
    assert json.loads((out / "profile.json").read_text(encoding="utf-8")) == result
    rows = list(csv.DictReader((out / "profile.csv").open(encoding="utf-8")))
    assert [r["case"] for r in rows] == ["A", "B"] and rows[1]["exit_code"] == "3"
    assert len(lines) == 2 and "FAILED (exit code 3)" in lines[1]


def test_no_gpu_is_a_note_not_a_crash(images, tmp_path):
    result = profile_cases(
        images,
        tmp_path / "out",
        {"dataset": "501"},
        command_builder=lambda *args: [PY, "-c", "pass"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result["settings"]["gpu"] is None
    assert "hides every GPU" in result["settings"]["gpu_note"]
    assert profile.format_profile_table(result).splitlines()[-1] == result["settings"]["gpu_note"]


class ScriptedGpu:
    """A GPU whose device-wide use is 1000 MB plus 100 MB per process of the sampled tree."""

    def __init__(self):
        self.pid_sets = []

    def sample(self, pids):
        self.pid_sets.append(set(pids))
        return 1000.0 + 100.0 * len(pids), 100.0 * len(pids)


def test_gpu_figures_from_samples_and_the_process_tree():
    gpu = ScriptedGpu()
    child = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(1.0)']); p.wait()"
    )
    record = run_and_sample([PY, "-c", child], gpu=gpu, interval=0.1)
    used = record["samples"]["gpu_mb"]
    assert record["GPU_baseline_MB"] == 1000.0  # sampled with no process before the start
    assert record["MaxGPU_MB"] == max(used) == 1200.0  # the child and its grandchild were both seen
    assert record["MaxGPU_own_MB"] == 200.0
    assert record["AUC_GPU_Time_MBs"] == pytest.approx(sum(used) * 0.1, abs=0.05)
    assert any(len(p) == 2 for p in gpu.pid_sets)


def test_failing_start_and_timeout_are_reported(tmp_path):
    record = run_and_sample([str(tmp_path / "no-such-program")])
    assert record["exit_code"] is None and record["error"].startswith("cannot start")
    spawn = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print(p.pid, flush=True); time.sleep(30)"
    )
    log = tmp_path / "logs" / "timeout.log"
    record = run_and_sample([PY, "-c", spawn], timeout_s=1.0, log_file=log)
    assert record["timed_out"] and record["exit_code"] != 0
    grandchild = int(log.read_text().split()[0])  # killed with its parent, not left running
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_an_exited_child_awaiting_its_parent_is_not_a_process_whose_pss_was_unreadable():
    # A child that has exited but not been waited for stays in the tree as a zombie, without memory: reading its
    # smaps_rollup fails with ESRCH. It must count as nothing, not as an RSS fallback (a sample that met the forked
    # child of the test below in that state once turned its record into "PSS, RSS where PSS was unreadable").
    zombie_for_a_while = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'pass']); time.sleep(1.5); p.wait()"
    )
    record = run_and_sample([PY, "-c", zombie_for_a_while], interval=0.05)
    assert record["exit_code"] == 0 and record["RAM_measure"] == "PSS", record["RAM_measure"]
    child = subprocess.Popen([PY, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_memory_mb(child.pid) is None
    finally:
        child.wait()


def test_ram_is_summed_pss_so_pages_shared_with_a_fork_count_once(monkeypatch):
    record = run_and_sample([PY, "-c", FORK_SHARED])
    figures = {k: v for k, v in record.items() if k.startswith(("Max", "RAM", "exit", "n_samples"))}
    assert record["exit_code"] == 0 and record["RAM_measure"] == "PSS", figures
    assert record["MaxRSS_sum_MB"] > 350, figures  # RSS counts the 200 MB buffer in both processes
    assert 150 < record["MaxRAM_MB"] < 300, figures  # PSS counts it once
    assert 150 < record["MaxRSS_process_MB"] < 300, figures  # the larger of the two processes

    # Where PSS cannot be read, each process counts with its RSS and the record says so.
    monkeypatch.setattr(host_memory, "process_memory_mb", lambda pid: (process_memory_mb(pid) or (0.0,))[:1] + (None,))
    record = run_and_sample([PY, "-c", FORK_SHARED])
    assert record["RAM_measure"] == "RSS"
    assert record["MaxRAM_MB"] == record["MaxRSS_sum_MB"] > 350


def test_process_memory_reads_rss_and_pss():
    rss, pss = process_memory_mb(os.getpid())
    assert rss > 10 and (pss is None or 0 < pss <= rss + 1)  # PSS where /proc/<pid>/smaps_rollup exists
    if sys.platform.startswith("linux"):
        assert pss is not None
    assert process_memory_mb(2**22 + 12345) is None  # above Linux's pid_max: no such process


def test_visible_gpu_follows_cuda_visible_devices():
    assert visible_gpu({}) == (0, None)
    assert visible_gpu({"CUDA_VISIBLE_DEVICES": "2,3"}) == (2, None)
    assert visible_gpu({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == ("GPU-abc", None)
    for hidden in ("", "-1"):
        device, note = visible_gpu({"CUDA_VISIBLE_DEVICES": hidden})
        assert device is None and "hides every GPU" in note


@pytest.fixture
def fake_pynvml(monkeypatch):
    """A stand-in for pynvml with two GPUs; GPU 1 has 3 GiB used, 1 GiB of it by pid 4242."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def handle(index):
        if index > 1:
            raise NVMLError("Invalid Argument")
        return index

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetName = lambda h: f"Fake GPU {h}"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(3 if h else 1) * 2**30, total=80 * 2**30)
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=4242, usedGpuMemory=2**30),
        types.SimpleNamespace(pid=7, usedGpuMemory=2**29),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_nvml_sampler_reads_the_visible_device_and_own_pids(fake_pynvml):
    sampler, note = open_gpu_sampler({"CUDA_VISIBLE_DEVICES": "1"})
    assert note is None and isinstance(sampler, NvmlSampler)
    assert sampler.description == {"device": 1, "name": "Fake GPU 1", "total_MB": 81920.0, "source": "NVML"}
    assert sampler.sample({4242, 5}) == (3072.0, 1024.0)
    assert sampler.sample({5}) == (3072.0, 0.0)
    sampler, note = open_gpu_sampler({"CUDA_VISIBLE_DEVICES": "5"})
    assert sampler is None and "not found" in note


FAKE_NVIDIA_SMI = """\
import sys, time
args = sys.argv[1:]
device = args[args.index("-i") + 1]
if device not in ("0", "1"):
    print("No devices were found")
    sys.exit(6)
if "--query-gpu=name,memory.total" in args:
    print(f"Fake GPU {device}, 81559")
    sys.exit(0)
assert "--query-gpu=memory.used" in args and "--format=csv,noheader,nounits" in args
period = int(args[args.index("-lms") + 1]) / 1000
while True:
    print(3000 if device == "1" else 1000, flush=True)
    time.sleep(period)
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` on PATH that answers for GPUs 0 (1000 MiB used) and 1 (3000 MiB); pynvml unimportable."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!{PY}\n{FAKE_NVIDIA_SMI}", encoding="utf-8")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    return script


def test_nvidia_smi_is_the_fallback_without_pynvml(fake_nvidia_smi, images, tmp_path):
    sampler, note = open_gpu_sampler({"CUDA_VISIBLE_DEVICES": "1"})
    try:
        assert isinstance(sampler, SmiSampler)
        assert "pynvml (nvidia-ml-py) is not installed" in note and "nvidia-smi" in note
        assert sampler.description == {"device": 1, "name": "Fake GPU 1", "total_MB": 81559.0, "source": "nvidia-smi"}
        assert sampler.sample({1, 2}) == (3000.0, None)  # device-wide only
        record = run_and_sample([PY, "-c", "import time; time.sleep(0.5)"], gpu=sampler)
        assert record["MaxGPU_MB"] == 3000.0 and record["GPU_baseline_MB"] == 3000.0
        assert record["MaxGPU_own_MB"] is None and "gpu_error" not in record
        assert record["AUC_GPU_Time_MBs"] == pytest.approx(3000.0 * 0.1 * record["n_samples"], abs=0.05)
    finally:
        sampler.close()
    with pytest.raises(RuntimeError, match="stopped"):
        sampler.sample(set())
    sampler, note = open_gpu_sampler({"CUDA_VISIBLE_DEVICES": "5"})
    assert sampler is None and "No devices were found" in note

    # What `samflare profile` does by default: GPU figures from nvidia-smi, and the note says what is missing.
    result = profile_cases(
        images,
        tmp_path / "out",
        command_builder=lambda *args: [PY, "-c", "pass"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
    )
    assert result["settings"]["gpu"]["source"] == "nvidia-smi"
    assert "no own-process GPU figure" in result["settings"]["gpu_note"]
    assert all(r["MaxGPU_MB"] == 1000.0 for r in result["cases"])
    assert "MaxRAM_MB" in result["settings"]["figures"]


def test_predict_command_runs_the_library_in_a_fresh_interpreter_with_the_clis_exit_codes(images, tmp_path):
    (case,) = [c for c in profile.profile_cases_of(images) if c.case_id == "A"]
    options = {"locator": str(tmp_path / "no_locator"), "segmenter": str(tmp_path / "no_segmenter"), "device": "cpu"}
    command = predict_command(case, tmp_path / "out", options)
    assert command[:2] == [PY, "-c"] and "nnunet_samflare.cli" not in " ".join(command)
    assert json.loads(command[-1]) == {"input": str(case.files[0]), "output": str(tmp_path / "out"), "options": options}
    # Bad input in the child: one line naming the cause and exit code 2, as `samflare predict` gives.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "no_locator" in done.stderr


def test_profile_finds_exactly_the_cases_predict_finds(tmp_path):
    from nnunet_samflare.io import TEMP_PREFIX, find_cases

    for name in ("a_0000.nii.gz", "b.mha", f"{TEMP_PREFIX}0123-c_0000.nii.gz", "notes.txt", "d.png"):
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(tmp_path / name)) if name.endswith(
            (".gz", ".mha")
        ) else (tmp_path / name).write_bytes(b"x")
    assert [c.case_id for c in profile.profile_cases_of(tmp_path)] == [c.case_id for c in find_cases(tmp_path)]
    assert [c.case_id for c in find_cases(tmp_path)] == ["a", "b"]
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(tmp_path / "a_0001.nii.gz"))
    with pytest.raises(InputError, match="several channel files"):
        profile.profile_cases_of(tmp_path)


def test_cli_hands_unknown_flags_to_predicts_own_parser():
    from nnunet_samflare.cli.profile import predict_options_from

    args, extra = build_parser().parse_known_args(
        [
            "profile",
            "-i",
            "imgs",
            "-device",
            "cpu",
            "-o",
            "out",
            "-d",
            "501",
            "-f",
            "0",
            "--disable_tta",
            "--report-dir",
            "rep",
            "--no-gpu",
            "--save_probabilities",
        ]
    )
    assert (args.images, args.output_dir, args.report_dir, args.no_gpu) == ("imgs", "out", "rep", True)
    assert extra == ["-device", "cpu", "-d", "501", "-f", "0", "--disable_tta", "--save_probabilities"]
    options = predict_options_from(extra, "imgs", "out")
    assert (options["device"], options["dataset"], options["folds"]) == ("cpu", "501", [0])
    assert options["save_probabilities"] is True and options["tta"] is False
    with pytest.raises(InputError, match="invalid predict options"):
        predict_options_from(["--no_such_flag"], "imgs", "out")


def test_cli_runs_each_case_and_exits_1_when_one_failed(images, tmp_path, monkeypatch, capsys):
    seen = []

    def builder(case, output_dir, options):
        seen.append((case.files[0].name, output_dir, options["dataset"], options["folds"]))
        return python_case(case, output_dir, options)

    monkeypatch.setattr(profile, "predict_command", builder)
    out, report = tmp_path / "out", tmp_path / "report"
    assert (
        main(
            [
                "profile",
                "-i",
                str(images),
                "-o",
                str(out),
                "-d",
                "501",
                "-f",
                "0",
                "--report-dir",
                str(report),
                "--no-gpu",
            ]
        )
        == 1
    )
    assert seen == [("A_0000.nii.gz", out, "501", [0]), ("B_0000.nii.gz", out, "501", [0])]
    data = json.loads((report / "profile.json").read_text(encoding="utf-8"))
    assert [r["exit_code"] for r in data["cases"]] == [0, 3]
    assert data["settings"]["gpu_note"] == "GPU figures absent: GPU sampling disabled"
    assert (report / "profile.csv").is_file() and (report / "profile_A.png").is_file()
    assert "1 case(s) failed: B" in capsys.readouterr().err


def test_cli_without_dataset_hands_the_model_folders_to_predict(images, tmp_path, monkeypatch, capsys):
    seen = []

    def builder(case, output_dir, options):
        seen.append((options["dataset"], options["locator"], options["segmenter"]))
        return [PY, "-c", "pass"]

    monkeypatch.setattr(profile, "predict_command", builder)
    out = tmp_path / "out"
    models = ["--locator", "LOC", "--segmenter=SEG"]
    assert main(["profile", "-i", str(images), "-o", str(out), *models, "--no-gpu"]) == 0
    assert seen == [(None, "LOC", "SEG"), (None, "LOC", "SEG")]
    assert json.loads((out / "profile.json").read_text(encoding="utf-8"))["settings"]["dataset"] is None
    # Neither a dataset nor both folders: refused before any case runs.
    assert main(["profile", "-i", str(images), "-o", str(out), "--locator", "LOC"]) == 2
    assert "give a dataset (-d) or both model folders" in capsys.readouterr().err
    assert len(seen) == 2


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["profile", "-i", str(tmp_path / "none"), "-o", str(tmp_path / "o"), "-d", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none" in err

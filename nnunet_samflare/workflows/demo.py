"""``samflare demo``: the plug-in's whole nnU-Net workflow on a small dataset, in one process, sized for a CPU.

The demo runs what a user runs (README "Workflow"), through nnU-Net's own Python entry points instead of its
console scripts, so that torch and nnU-Net are imported once (each ``nnUNetv2_*`` process costs ~10 s of imports
on 2 cores, docs/nnunet.md §7):

=====================  ===========================================================================================
stage                  nnU-Net / samflare function (the command it stands for)
=====================  ===========================================================================================
nnU-Net planning       ``extract_fingerprint_dataset`` + ``plan_experiment_dataset``
                       (``nnUNetv2_plan_and_preprocess -d D -c 3d_fullres --no_pp -npfp 1``)
samflare plan          ``write_samflare_plans`` with the demo's CPU plan (``samflare plan -d D --segmenter_* ...``)
preprocessing          ``preprocess_dataset`` (``nnUNetv2_preprocess -d D -plans_name samflarePlans -c 3d_locator
                       3d_segmenter -np 1 1``)
training, per phase    ``get_trainer_from_args`` + ``nnUNetTrainer.run_training`` (``nnUNetv2_train D CONFIG all -tr
                       TRAINER -p samflarePlans``), shortened; nnU-Net's final validation is skipped: the demo
                       predicts and evaluates the cascade itself, which is what the numbers should describe
prediction             ``nnunet_samflare.predict`` (``samflare predict --stats --preview``)
evaluation             ``evaluate_folders`` (``samflare evaluate``)
=====================  ===========================================================================================

The trainers are the real ones (``nnUNetTrainer_SAMFlareLocator``/``...Segmenter``, the real networks and recipe);
only their length is set on the instance, so the model folders are the ones ``samflare predict -d D`` and
``samflare export -d D`` find. Training and evaluation use the same scans: the numbers show that the workflow
learns, not how well a model generalises.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from nnunet_samflare.errors import InputError
from nnunet_samflare.example_data import example_dataset
from nnunet_samflare.training.names import DEFAULT_PLANS_NAME as PLANS
from nnunet_samflare.training.names import (
    LOCATOR_CONFIGURATION,
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,
    SEGMENTER_TRAINER,
)

if TYPE_CHECKING:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

DEFAULT_DATASET_ID = 501
DEFAULT_WORK_FOLDER = "samflare-demo"
#: Written into the work folder; only a folder holding it is ever cleared by a later run.
MARKER_FILE = "samflare_demo.json"
#: NSD tolerance for labels that have none in FLARE23 (datasets given with ``--data``).
DEFAULT_NSD_TOLERANCE_MM = 2.0
#: Labels whose pseudo-Dice the training progress lines show, when the dataset has them.
_MARKER_ORGANS = ("liver", "spleen", "right kidney", "left kidney")


@dataclass(frozen=True)
class DemoSize:
    """The demo's CPU plan and training length (spacings and patches in (z, y, x) order)."""

    name: str
    segmenter_spacing: tuple[float, float, float]
    segmenter_patch: tuple[int, int, int]
    locator_patch: tuple[int, int, int]
    batch_size: int
    locator_epochs: int
    locator_iterations: int
    segmenter_epochs: int
    segmenter_iterations: int
    val_iterations: int
    expectation: str

    def plan_arguments(self) -> list[str]:
        return [
            "--segmenter_spacing", *map(_number, self.segmenter_spacing),
            "--segmenter_patch", *map(str, self.segmenter_patch),
            "--locator_patch", *map(str, self.locator_patch),
            "--batch_size", str(self.batch_size),
        ]  # fmt: skip


SIZES: dict[str, DemoSize] = {
    "standard": DemoSize(
        name="standard",
        segmenter_spacing=(6.0, 6.0, 6.0),
        segmenter_patch=(32, 32, 32),
        locator_patch=(64, 64, 64),
        batch_size=2,
        locator_epochs=10,
        locator_iterations=20,
        segmenter_epochs=20,
        segmenter_iterations=25,
        val_iterations=2,
        expectation="about 10 to 11 minutes on an idle 2-core CPU (measured 10:02 to 10:28: liver, spleen, stomach "
        "and both kidneys learned, some of the small organs partly, the others not yet)",
    ),
    "quick": DemoSize(
        name="quick",
        segmenter_spacing=(6.0, 6.0, 6.0),
        segmenter_patch=(32, 32, 32),
        locator_patch=(64, 64, 64),
        batch_size=2,
        locator_epochs=1,
        locator_iterations=3,
        segmenter_epochs=1,
        segmenter_iterations=3,
        val_iterations=1,
        expectation="a smoke test of every step (about a minute on an idle 2-core CPU); the models are untrained",
    ),
}


@dataclass
class DemoFolders:
    work: Path
    dataset_id: int
    dataset_name: str

    @property
    def raw(self) -> Path:
        return self.work / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.work / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.work / "nnUNet_results"

    @property
    def dataset(self) -> Path:
        return self.raw / self.dataset_name

    @property
    def predictions(self) -> Path:
        return self.work / "predictions"

    @property
    def report(self) -> Path:
        return self.work / "report"

    @property
    def log(self) -> Path:
        return self.work / "demo.log"

    def model_folder(self, trainer: str, configuration: str) -> Path:
        return self.results / self.dataset_name / f"{trainer}__{PLANS}__{configuration}"

    def environment(self) -> dict[str, str]:
        return {
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
        }


@dataclass
class DemoResult:
    work: Path
    report: Path
    size: str
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    #: ``{label name: {"DSC": x, "NSD": y, "cases": n}}`` over the cases whose reference contains the label.
    metrics: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    organ_dsc: float | None = None
    organ_nsd: float | None = None
    kept_models: bool = False


# ------------------------------------------------------------------------------------------------- the dataset


def _number(value: float) -> str:
    return f"{value:g}"


def dataset_identity(folder: Path) -> tuple[int, str]:
    """``(id, DatasetNNN_Name)``: a folder already named like that keeps its name; others become dataset 501."""
    match = re.fullmatch(r"Dataset(\d{3})_(.+)", folder.name)
    if match:
        return int(match.group(1)), folder.name
    name = re.sub(r"[^A-Za-z0-9]+", " ", folder.name).title().replace(" ", "") or "Demo"
    return DEFAULT_DATASET_ID, f"Dataset{DEFAULT_DATASET_ID:03d}_{name}"


def check_raw_dataset(folder: Path) -> dict[str, Any]:
    """Fail before any heavy work, naming the file and the cause, if ``folder`` is not a usable raw dataset."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_file = folder / "dataset.json"
    if not folder.is_dir():
        raise InputError(folder, "no such dataset folder")
    if not dataset_file.is_file():
        raise InputError(dataset_file, "missing (an nnU-Net raw dataset needs dataset.json)")
    try:
        dataset_json = json.loads(dataset_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(dataset_file, f"not valid JSON ({e})") from None
    for key in ("labels", "channel_names", "file_ending"):
        if key not in dataset_json:
            raise InputError(dataset_file, f"no {key!r} entry")
    labels = dataset_json["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError(dataset_file, "region-based labels are not supported by the demo")
    if labels.get("background") != 0:
        raise InputError(dataset_file, "labels must map 'background' to 0")
    if "dataset" not in dataset_json and not (folder / "imagesTr").is_dir():
        raise InputError(folder / "imagesTr", "missing")
    cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    if not cases:
        raise InputError(folder / "imagesTr", f"no training images ending in {dataset_json['file_ending']}")
    for case, files in sorted(cases.items()):
        for path in [*files["images"], files["label"]]:
            if not Path(path).is_file():
                raise InputError(path, f"missing (case {case})")
    return dataset_json


def foreground_labels(dataset_json: Mapping[str, Any]) -> dict[int, str]:
    """``{id: name}`` of the dataset's foreground labels (no background, no ignore label)."""
    return {
        int(value): name
        for name, value in dataset_json["labels"].items()
        if name not in ("background", "ignore") and int(value) > 0
    }


def prepare_work_folder(work: Path, data: Path, link: bool) -> DemoFolders:
    """Lay out ``work`` (raw/preprocessed/results, predictions, report); a previous demo run there is cleared.

    A non-empty folder that no demo made is refused: the demo never deletes what is not its own.
    """
    dataset_id, dataset_name = dataset_identity(data)
    if work.exists() and not work.is_dir():
        raise InputError(work, "exists and is not a folder")
    if work.is_dir() and any(work.iterdir()):
        if not (work / MARKER_FILE).is_file():
            raise InputError(work, "folder exists and was not made by samflare demo; choose another --work folder")
        for child in work.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    folders = DemoFolders(work, dataset_id, dataset_name)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER_FILE).write_text(
        json.dumps({"made_by": "samflare demo", "data": str(data), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        + "\n",
        encoding="utf-8",
    )
    for folder in (folders.raw, folders.preprocessed, folders.results, folders.report):
        folder.mkdir()
    if link:
        # A user's dataset may be large; nnU-Net only reads the raw folder, so a link is enough.
        folders.dataset.symlink_to(data.resolve(), target_is_directory=True)
    else:
        shutil.copytree(data, folders.dataset)
    return folders


# ------------------------------------------------------------------------------------------------ console, logs


class _Console:
    """Progress lines for the person watching; everything nnU-Net prints goes to ``demo.log`` instead."""

    def __init__(self, stream: TextIO, log: Path):
        self.stream = stream
        self.log = log

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        with open(self.log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (nnU-Net reads its paths from the environment on every use)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class _Stages:
    def __init__(self, console: _Console, total: int):
        self.console = console
        self.total = total
        self.count = 0
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, key: str, title: str, command: str) -> Iterator[None]:
        self.count += 1
        self.console.say(f"[{self.count}/{self.total}] {title}")
        self.console.say(f"      ≙ {command}")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.console.say(
                f"      failed after {_duration(time.perf_counter() - start)}; details in {self.console.log}"
            )
            raise
        self.timings[key] = round(time.perf_counter() - start, 1)
        self.console.say(f"      done in {_duration(self.timings[key])}")


# ------------------------------------------------------------------------------------------------------ training


def _pseudo_dice_text(trainer: nnUNetTrainer, names: Mapping[int, str]) -> str:
    """The latest epoch's pseudo-Dice (nnU-Net's online validation on patches), for the marker organs."""
    values = trainer.logger.get_value("dice_per_class_or_region", step=-1)
    label_manager = trainer.label_manager
    if label_manager.has_regions:
        keys = [
            "foreground" if len(label_manager.foreground_regions) == 1 else f"region {i + 1}"
            for i in range(len(values))
        ]
    else:
        keys = [names.get(int(lb), str(lb)) for lb in label_manager.foreground_labels]
    by_name = dict(zip(keys, values))
    shown = [n for n in _MARKER_ORGANS if n in by_name] or keys[:4]
    parts = [f"{n} {by_name[n]:.2f}" if not math.isnan(by_name[n]) else f"{n} –" for n in shown]
    return "pseudo-Dice " + ", ".join(parts)


def train_phase(
    folders: DemoFolders,
    configuration: str,
    trainer_name: str,
    epochs: int,
    iterations: int,
    val_iterations: int,
    device: str,
    console: _Console,
    names: Mapping[int, str],
) -> Path:
    """Train one phase on fold ``all`` through nnU-Net's own entry points; return its model folder."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    with console.quiet():
        trainer = get_trainer_from_args(
            str(folders.dataset_id), configuration, "all", trainer_name, PLANS, device=torch.device(device)
        )
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    start = time.perf_counter()
    nnunet_on_epoch_end = trainer.on_epoch_end

    def on_epoch_end() -> None:
        # One console line per epoch; nnU-Net's own epoch report still goes to its training log.
        nnunet_on_epoch_end()
        done = trainer.current_epoch
        logger = trainer.logger
        elapsed = time.perf_counter() - start
        epoch_time = logger.get_value("epoch_end_timestamps", -1) - logger.get_value("epoch_start_timestamps", -1)
        loss = logger.get_value("train_losses", step=-1)
        eta = elapsed / done * (epochs - done)
        console.say(
            f"      epoch {done:>2}/{epochs}  loss {loss:+.3f}  {_pseudo_dice_text(trainer, names)}"
            f"  ({epoch_time / (iterations + val_iterations):.1f} s/iteration, {_duration(eta)} left)"
        )

    trainer.on_epoch_end = on_epoch_end
    with console.quiet(), _environment({"nnUNet_n_proc_DA": "0"}):
        # nnUNet_n_proc_DA=0: augmentation in this process; worker processes would each re-import torch.
        trainer.run_training()
    return Path(trainer.output_folder).parent


# ------------------------------------------------------------------------------------------------------- report


def metrics_rows(result: Mapping[str, Any], names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Per label present in at least one reference: mean DSC/NSD over the cases that contain it."""
    rows = []
    for key, entry in result["summary"]["per_label"].items():
        if entry["n_present"]:
            rows.append(
                {
                    "label": int(key),
                    "name": names.get(int(key), entry["name"]),
                    "cases": entry["n_present"],
                    "DSC": entry["DSC_mean_present"],
                    "NSD": entry["NSD_mean_present"],
                }
            )
    return rows


def format_metrics_table(rows: Sequence[Mapping[str, Any]], organ_dsc: float | None, organ_nsd: float | None) -> str:
    width = max([len("average")] + [len(r["name"]) for r in rows])
    lines = [f"| {'label':<{width}} | cases |   DSC  |   NSD  |", f"|{'-' * (width + 2)}|------:|-------:|-------:|"]
    for r in rows:
        lines.append(f"| {r['name']:<{width}} | {r['cases']:>5} | {r['DSC']:.4f} | {r['NSD']:.4f} |")
    if organ_dsc is not None:
        lines.append(f"| {'average':<{width}} |       | {organ_dsc:.4f} | {organ_nsd:.4f} |")
    return "\n".join(lines)


def _report_readme(
    size: DemoSize,
    folders: DemoFolders,
    source: Path,
    example: bool,
    table: str,
    absent: Sequence[str],
    timings: Mapping[str, float],
    device: str,
) -> str:
    scope = (
        "the example CT that ships with the package (one patient; TSEX_0002 is a 30-slice part of TSEX_0001)"
        if example
        else f"the dataset in {source}"
    )
    absent_line = (
        f"Labels of the dataset that no reference scan contains ({', '.join(absent)}) are left out of the table "
        "and of the average (the FLARE evaluator would count them as 1.0 when the prediction is empty too).\n"
        if absent
        else ""
    )
    timing_lines = "\n".join(f"  {k:<22} {_duration(v):>8}" for k, v in timings.items())
    return f"""samflare demo report
====================

What ran: the plug-in's nnU-Net workflow (planning, samflare plan, preprocessing, training of the locator and the
segmenter, samflare predict, samflare evaluate) on {scope}, on {device}.

THE MODELS WERE TRAINED AND EVALUATED ON THE SAME SCAN(S). The numbers show that the workflow runs and that the
networks learn; they say nothing about accuracy on new patients. Training was shortened to fit a CPU: locator
{size.locator_epochs} epochs x {size.locator_iterations} iterations, segmenter {size.segmenter_epochs} epochs x
{size.segmenter_iterations} iterations (the full recipe is 300 x 250 per phase), and the segmenter works at
{" x ".join(map(_number, size.segmenter_spacing))} mm with {"x".join(map(str, size.segmenter_patch))} patches
(the paper: 2.0 x 1.5 x 1.5 mm, 96x96x96). Demo size: {size.name}.

metrics.md / metrics.json: per label, over the cases whose reference contains it,
  DSC  Dice similarity coefficient, 2|A∩B| / (|A| + |B|): 1 = perfect overlap, 0 = none;
  NSD  normalised surface Dice: the share of both boundaries that lie within the label's tolerance (1-7 mm, the
       FLARE23 values) of the other boundary; set to 0 where DSC < 0.2 (docs/method.md §10);
  cases: how many scans contain the label. "average" is the mean over the labels in the table.
{absent_line}metrics.json holds everything samflare evaluate computes (per case, with the FLARE conventions).
metrics.png: the per-label DSC/NSD plot. *_preview.png: axial and coronal slices with the predicted labels.
*_progress.png: nnU-Net's training curves (loss, pseudo-Dice on training patches, learning rate).
timings.json, per stage:
{timing_lines}

Predictions (label maps, *_stats.json with volumes and mean HU) are in {folders.predictions}.
"""


def write_report(
    folders: DemoFolders,
    result: Mapping[str, Any],
    names: Mapping[int, str],
    size: DemoSize,
    source: Path,
    example: bool,
    timings: Mapping[str, float],
    device: str,
) -> tuple[list[dict[str, Any]], float | None, float | None, str]:
    from nnunet_samflare.evaluation.plots import plot_metrics

    rows = metrics_rows(result, names)
    organ_rows = [r for r in rows if r["name"] != "tumor"]
    organ_dsc = round(sum(r["DSC"] for r in organ_rows) / len(organ_rows), 4) if organ_rows else None
    organ_nsd = round(sum(r["NSD"] for r in organ_rows) / len(organ_rows), 4) if organ_rows else None
    table = format_metrics_table(rows, organ_dsc, organ_nsd)
    absent = [names[lb] for lb in sorted(names) if lb not in {r["label"] for r in rows}]
    report = folders.report
    (report / "metrics.md").write_text(table + "\n", encoding="utf-8")
    plot_metrics(result, report / "metrics.png")
    for preview in sorted(folders.predictions.glob("*_preview.png")):
        shutil.copy2(preview, report / preview.name)
    for phase, trainer, configuration in (
        ("locator", LOCATOR_TRAINER, LOCATOR_CONFIGURATION),
        ("segmenter", SEGMENTER_TRAINER, SEGMENTER_CONFIGURATION),
    ):
        progress = folders.model_folder(trainer, configuration) / "fold_all" / "progress.png"
        if progress.is_file():
            shutil.copy2(progress, report / f"{phase}_progress.png")
    (report / "timings.json").write_text(json.dumps(dict(timings), indent=2) + "\n", encoding="utf-8")
    (report / "README.txt").write_text(
        _report_readme(size, folders, source, example, table, absent, timings, device), encoding="utf-8"
    )
    return rows, organ_dsc, organ_nsd, table


def remove_large_files(folders: DemoFolders) -> int:
    """Delete checkpoints and preprocessed arrays; return the bytes freed."""
    freed = 0
    for path in sorted(folders.results.rglob("*.pth")):
        freed += path.stat().st_size
        path.unlink()
    dataset_preprocessed = folders.preprocessed / folders.dataset_name
    if dataset_preprocessed.is_dir():
        for child in dataset_preprocessed.iterdir():
            if child.is_dir():
                freed += sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
                shutil.rmtree(child)
    return freed


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------------------- the run


def run_demo(
    work: str | os.PathLike | None = None,
    *,
    data: str | os.PathLike | None = None,
    quick: bool = False,
    device: str | None = None,
    keep: bool = False,
    stream: TextIO | None = None,
    size: DemoSize | None = None,
) -> DemoResult:
    """Run the demo; see the module docstring.

    ``data``: an nnU-Net raw dataset (default: the example CT). ``quick``: the smoke-test size. ``size``: any other
    plan and training length (overrides ``quick``). Progress goes to ``stream`` (default stdout).
    """
    size = size or SIZES["quick" if quick else "standard"]
    example = data is None
    source = example_dataset() if example else Path(data).expanduser().resolve()
    work = Path(work if work is not None else DEFAULT_WORK_FOLDER).expanduser().resolve()
    if not example and (work == source or source in work.parents):
        raise InputError(work, f"the work folder must not be inside the dataset {source}")
    dataset_json = check_raw_dataset(source)
    names = foreground_labels(dataset_json)
    folders = prepare_work_folder(work, source, link=not example)
    console = _Console(stream or sys.stdout, folders.log)
    d = folders.dataset_id

    import torch

    from nnunet_samflare.inference.api import default_device

    device = device or default_device()
    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_train -device cpu does
    threads = f" ({torch.get_num_threads()} threads)" if device == "cpu" else ""
    n_cases = len(list((folders.dataset / "labelsTr").glob(f"*{dataset_json['file_ending']}")))
    console.say("samflare demo: the nnunet-samflare workflow end to end, through nnU-Net's own entry points")
    console.say(f"  data    {source}" + (" (the example CT shipped with the package)" if example else ""))
    console.say(f"          {n_cases} training case(s), labels: {', '.join(names.values())}")
    console.say(f"  work    {work} (nnU-Net log: {folders.log.name})")
    console.say(f"  device  {device}{threads}")
    console.say(f"  size    {size.name}: {size.expectation}")
    console.say("  NOTE    the models are trained and evaluated on the same scan(s): this shows the workflow and that")
    console.say("          it learns, not how well it would do on a new patient.")
    console.say()

    stages = _Stages(console, total=7)
    env = {**folders.environment(), "nnUNet_compile": "f"}
    with _environment(env):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )

        from nnunet_samflare.training.plans import write_samflare_plans

        with stages.stage(
            "nnU-Net planning",
            "nnU-Net planning: dataset fingerprint and the default plans",
            f"nnUNetv2_plan_and_preprocess -d {d} -c 3d_fullres --no_pp -npfp 1",
        ):
            with console.quiet():
                extract_fingerprint_dataset(d, num_processes=1, clean=True, verbose=False, show_progress_bar=False)
                plan_experiment_dataset(d)
        with stages.stage(
            "samflare plan",
            "samflare plan: add 3d_locator and 3d_segmenter (a CPU-sized plan)",
            f"samflare plan -d {d} {' '.join(size.plan_arguments())}",
        ):
            plans_file = write_samflare_plans(
                d,
                segmenter_spacing_zyx=size.segmenter_spacing,
                segmenter_patch_size=size.segmenter_patch,
                locator_patch_size=size.locator_patch,
                batch_size=size.batch_size,
            )
            from nnunet_samflare.training.plans import describe_configuration

            plans = json.loads(plans_file.read_text(encoding="utf-8"))
            for name in (LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION):
                console.say("      " + describe_configuration(plans, name))
        with stages.stage(
            "preprocessing",
            "preprocessing both configurations (nnU-Net's preprocessor)",
            f"nnUNetv2_preprocess -d {d} -plans_name {PLANS} -c {LOCATOR_CONFIGURATION} "
            f"{SEGMENTER_CONFIGURATION} -np 1 1",
        ):
            with console.quiet():
                preprocess_dataset(
                    d, PLANS, [LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION], [1, 1], show_progress_bar=False
                )
        phases = (
            (
                "train locator",
                "phase 1",
                LOCATOR_CONFIGURATION,
                LOCATOR_TRAINER,
                size.locator_epochs,
                size.locator_iterations,
            ),
            (
                "train segmenter",
                "phase 2",
                SEGMENTER_CONFIGURATION,
                SEGMENTER_TRAINER,
                size.segmenter_epochs,
                size.segmenter_iterations,
            ),
        )
        for key, phase, configuration, trainer, epochs, iterations in phases:
            title = (
                f"training {phase}: {trainer}, {epochs} epochs x {iterations} iterations (the full recipe: 300 x 250)"
            )
            with stages.stage(
                key, title, f"nnUNetv2_train {d} {configuration} all -tr {trainer} -p {PLANS} -device {device}"
            ):
                train_phase(
                    folders, configuration, trainer, epochs, iterations, size.val_iterations, device, console, names
                )

        from nnunet_samflare.inference.api import predict

        images = folders.dataset / "imagesTr"
        with stages.stage(
            "predict",
            "samflare predict: locate, crop, segment, post-process, paste back",
            f"samflare predict -i {images} -o {folders.predictions} -d {d} -device {device} --stats --preview",
        ):
            with console.quiet():
                written = predict(
                    images, folders.predictions, dataset=d, device=device, stats=True, preview=True, progress=False
                )
            console.say(f"      {len(written)} label map(s), *_stats.json and *_preview.png in {folders.predictions}")

        from nnunet_samflare.evaluation.evaluate import evaluate_folders
        from nnunet_samflare.evaluation.metrics import NSD_TOLERANCE_MM

        labels_dir = folders.dataset / "labelsTr"
        with stages.stage(
            "evaluate",
            "samflare evaluate: DSC and NSD with the FLARE23 rules",
            f"samflare evaluate {labels_dir} {folders.predictions} -o {folders.report / 'metrics.json'}",
        ):
            tolerances = {lb: NSD_TOLERANCE_MM.get(lb, DEFAULT_NSD_TOLERANCE_MM) for lb in names}
            with console.quiet():
                result = evaluate_folders(
                    labels_dir,
                    folders.predictions,
                    labels=sorted(names),
                    tolerances_mm=tolerances,
                    output_file=folders.report / "metrics.json",
                )

    stages.timings["total"] = round(sum(stages.timings.values()), 1)
    rows, organ_dsc, organ_nsd, table = write_report(
        folders, result, names, size, source, example, stages.timings, device
    )

    console.say()
    console.say("Result (trained and evaluated on the same scan(s); per label, over the scans that contain it):")
    console.say(table)
    if quick:
        console.say("(--quick: a smoke test of every step; the models are untrained and these numbers mean nothing)")
    console.say()
    console.say("Time per stage: " + ", ".join(f"{k} {_duration(v)}" for k, v in stages.timings.items()))
    console.say(f"Report: {folders.report} (README.txt says what the numbers mean; previews, curves, metrics)")

    if keep:
        console.say(f"Kept the trained models and preprocessed data ({folder_size(work) / 1e6:.0f} MB in {work}).")
        console.say("Next, with these models:")
        console.say(f"  export nnUNet_results={folders.results}")
        console.say(f"  samflare predict -i YOUR_CT.nii.gz -o out/ -d {d} -device {device}")
        console.say(f"  samflare export -d {d} -o demo_cascade.zip")
    else:
        freed = remove_large_files(folders)
        console.say(
            f"Removed checkpoints and preprocessed data ({freed / 1e6:.0f} MB); {work} keeps "
            f"{folder_size(work) / 1e6:.0f} MB. Run with --keep to keep the models for samflare predict "
            "and samflare export."
        )
    return DemoResult(
        work=work,
        report=folders.report,
        size=size.name,
        device=device,
        timings_s=dict(stages.timings),
        metrics={r["name"]: {"DSC": r["DSC"], "NSD": r["NSD"], "cases": r["cases"]} for r in rows},
        organ_dsc=organ_dsc,
        organ_nsd=organ_nsd,
        kept_models=keep,
    )

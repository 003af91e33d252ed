"""``samflare pseudolabel run``: the paper's self-training on partially labelled and unlabelled scans as one
resumable command (docs/method.md §6.4, §11.8).

Round r (1..R) trains on dataset D_r (D_1: the source's labelled cases, links to its files; D_r: the labels made
by round r-1, unlabelled scans included) and makes D_{r+1}:

1. ``preprocess`` — D_r's ``splits_final.json`` (``--folds`` folds: nnU-Net's seeded split of the labelled cases,
   the same in every round, the unlabelled scans in every fold's training set from round 2 on) and stock
   ``nnUNetv2_preprocess`` of ``3d_segmenter``;
2. ``train.<k>`` — stock ``nnUNetv2_train`` of the segmenter per fold (``--warm-start``: from round r-1's fold-k
   weights through ``-pretrained_weights``);
3. ``predict`` — the cascade (``samflare predict``) with probabilities on every partially labelled case (by the
   fold model that did not train on it) and every unlabelled scan (by all fold models); with ``--num_parts N``
   the run writes N ``samflare predict --num_parts N --part_id K`` command lines and picks the results up when
   all parts are there;
4. ``vote`` — soft vote of the folds' probabilities (:mod:`.vote`);
5. ``filter`` — the paper's post-processing and, with ``--confidence``, the ignore label (:mod:`.filtering`);
6. ``merge`` — ground truth wins (:mod:`.merge`), written as D_{r+1}'s ``labelsTr``;
7. ``dataset`` — D_{r+1}'s images (links), dataset.json (label provenance, ignore label) and plans;
8. ``report`` — ``report.json``, ``report.png`` and a printed table (:mod:`.report`);
9. ``cleanup`` — the round's probability files are deleted unless ``--keep_probabilities``.

The locator that finds the ROI for step 3 is ``--locator`` or trained once on D_1. After the last round the
locator and the final segmenter are trained on D_{R+1} (fold ``all``).

Killing the run at any moment and re-running the same command continues it: ``state.json`` in the work folder
lists the finished steps; a half-done training resumes through nnU-Net's ``--c``; the per-case steps skip the
cases whose outputs exist (every file is written under a temporary name and renamed, the label map last). The
trainings the run starts skip nnU-Net's final validation (``SAMFLARE_SKIP_FINAL_VALIDATION=1``, honoured by every
plug-in trainer): the held-out cases are predicted by step 3 anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import atomic_output, check_output_folder, remove_stale_temporaries, write_json_atomic
from nnunet_samflare.pseudolabel import datasets as ds
from nnunet_samflare.pseudolabel.filtering import check_confidence, filter_case
from nnunet_samflare.pseudolabel.labelmaps import read_sidecar
from nnunet_samflare.pseudolabel.merge import PROVENANCE_GROUND_TRUTH, merge_case
from nnunet_samflare.pseudolabel.report import build_report, format_report, label_changes, save_report
from nnunet_samflare.pseudolabel.state import RunState
from nnunet_samflare.pseudolabel.vote import vote_case
from nnunet_samflare.training.names import (
    DEFAULT_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,
)
from nnunet_samflare.training.trainers import SKIP_FINAL_VALIDATION_ENV

PARTIAL_SEGMENTER_TRAINER = "nnUNetTrainer_SAMFlareSegmenterPartial"
#: nnU-Net's seed for cross-validation splits (``generate_crossval_split``), so folds are those nnU-Net would make.
SPLIT_SEED = 12345
#: Exit code of ``run --num_parts N`` while prediction parts are missing (sysexits' EX_TEMPFAIL: try again later).
EXIT_WAITING_FOR_PARTS = 75
#: Test hook: ``<step>:<n>`` makes the run kill itself (SIGKILL) after n cases of that per-case step, e.g.
#: ``r1.merge:3``, to test resuming from a kill at a known point. Never set it otherwise.
KILL_HOOK_ENV = "_SAMFLARE_TEST_KILL_AFTER"


class WaitingForParts(Exception):
    """Prediction parts are missing; the message says which commands to run."""

    exit_code = EXIT_WAITING_FOR_PARTS


class StepFailed(RuntimeError):
    """An nnU-Net command the run started failed; the message names its log."""


@dataclass
class RunSettings:
    """What ``samflare pseudolabel run`` does; see the CLI's help for each option."""

    dataset: str
    unlabeled: str | None = None
    rounds: int = 3
    folds: int = 2
    confidence: float | None = None
    warm_start: bool = False
    plans: str = DEFAULT_PLANS_NAME
    segmenter_trainer: str = PARTIAL_SEGMENTER_TRAINER
    final_segmenter_trainer: str | None = None
    locator_trainer: str = LOCATOR_TRAINER
    locator: str | None = None
    first_id: int | None = None
    work_dir: str | None = None
    postprocess: bool = True
    device: str | None = None
    num_parts: int = 1
    keep_probabilities: bool = False
    num_processes: int = 4


def _log(message: str) -> None:
    print(message, flush=True)


class PseudoLabelRun:
    """One run; :meth:`run` does (or continues) it. Every input is checked in the constructor, which writes
    nothing."""

    def __init__(self, settings: RunSettings):
        self.settings = s = settings
        if s.folds < 2:
            raise InputError(
                None,
                f"--folds must be at least 2, not {s.folds}: every partially labelled case is "
                "predicted by a fold model that did not train on it",
            )
        if s.rounds < 1:
            raise InputError(None, f"--rounds must be at least 1, not {s.rounds}")
        if s.num_parts < 1:
            raise InputError(None, f"--num_parts must be at least 1, not {s.num_parts}")
        check_confidence(s.confidence)
        self.raw, self.preprocessed, self.results = ds.nnunet_folders()
        self.source = ds.load_raw_dataset(s.dataset)
        self.unlabelled: dict[str, tuple[Path, ...]] = {}
        if s.unlabeled is not None:
            self.unlabelled = ds.find_unlabelled(
                s.unlabeled, self.source.num_channels, self.source.file_ending, set(self.source.labels)
            )
        self.pool = sorted([*self.source.partial_cases, *self.unlabelled])
        if not self.pool:
            raise InputError(
                self.source.folder,
                "nothing to pseudo-label: no case has partial_labels and no unlabelled scans were given (--unlabeled)",
            )
        if len(self.source.labels) < s.folds:
            raise InputError(
                self.source.folder, f"{len(self.source.labels)} labelled case(s) cannot be split into {s.folds} folds"
            )
        self._check_plans()
        source_id = int(self.source.name[len("Dataset") :].split("_")[0])
        self.first_id = s.first_id if s.first_id is not None else source_id + 100
        short = self.source.name.split("_", 1)[1] if "_" in self.source.name else self.source.name
        self.dataset_names = [f"Dataset{self.first_id + i:03d}_{short}PL{i}" for i in range(s.rounds + 1)]
        # Absolute: the part commands of predict_parts.sh must work from any directory (cluster jobs).
        work_dir = Path(s.work_dir) if s.work_dir else self.results / self.source.name / "samflare_pseudolabel"
        self.work_dir = work_dir.resolve()
        for i, name in enumerate(self.dataset_names):
            ds.check_dataset_id_free(self.first_id + i, name, self.work_dir)
        if s.locator is not None:
            _check_model_folder(Path(s.locator))
        self.ignore_label = ds.ignore_label_of(self.source.dataset_json) if s.confidence is not None else None
        if RunState.peek(self.work_dir, self.identity()) is None:
            self._refuse_leftovers()
        if s.device is None:
            import torch

            s.device = "cuda" if torch.cuda.is_available() else "cpu"

    # -- settings and layout ----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The settings recorded in the state file (paths resolved)."""
        identity = dataclasses.asdict(self.settings)
        identity["dataset"] = self.source.name
        identity["first_id"] = self.first_id
        for key in ("unlabeled", "locator"):
            if identity[key] is not None:
                identity[key] = str(Path(identity[key]).resolve())
        identity["work_dir"] = str(self.work_dir.resolve())
        identity["final_segmenter_trainer"] = self.final_segmenter_trainer
        return identity

    @property
    def final_segmenter_trainer(self) -> str:
        return self.settings.final_segmenter_trainer or self.settings.segmenter_trainer

    def _refuse_leftovers(self) -> None:
        # Without a state file nothing says which settings made a round dataset, its models or its labels, and the
        # steps skip what exists: after the work folder was deleted, a run with other settings (another --folds,
        # --confidence) would silently reuse them.
        for root in (self.raw, self.preprocessed, self.results):
            for name in self.dataset_names:
                if (root / name).exists():
                    raise InputError(
                        root / name,
                        f"left by an earlier run whose work folder ({self.work_dir}) has no state.json: delete "
                        f"{name} from nnU-Net's raw, preprocessed and results folders, or choose another --first_id",
                    )

    def _check_plans(self) -> None:
        plans_file = self.preprocessed / self.source.name / f"{self.settings.plans}.json"
        if not plans_file.is_file():
            raise InputError(plans_file, "plans not found: run nnUNetv2_plan_and_preprocess and samflare plan first")
        configurations = json.loads(plans_file.read_text(encoding="utf-8")).get("configurations", {})
        for configuration in (LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION):
            if configuration not in configurations:
                raise InputError(plans_file, f"no {configuration} configuration: run samflare plan for the dataset")

    def round_dir(self, r: int) -> Path:
        return self.work_dir / f"round_{r}"

    def raw_dir(self, labels_round: int) -> Path:
        return self.raw / self.dataset_names[labels_round]

    def model_dir(self, labels_round: int, trainer: str, configuration: str) -> Path:
        return self.results / self.dataset_names[labels_round] / f"{trainer}__{self.settings.plans}__{configuration}"

    def locator_dir(self) -> Path:
        if self.settings.locator is not None:
            return Path(self.settings.locator).resolve()
        return self.model_dir(0, self.settings.locator_trainer, LOCATOR_CONFIGURATION)

    def training_cases(self, r: int) -> list[str]:
        """The cases D_r trains on: the labelled ones, plus the unlabelled ones from round 2 on."""
        return sorted([*self.source.labels, *(self.unlabelled if r > 1 else [])])

    def splits(self, r: int) -> list[dict[str, list[str]]]:
        """nnU-Net's seeded split of the labelled cases, the same in every round, so that fold k never trains on
        what fold k held out in another round (``--warm-start`` starts fold k from the previous round's fold k).
        From round 2 on every fold also trains on all unlabelled scans: every fold predicts them anyway, and their
        labels are the previous round's pseudo labels, not a reference to validate on."""
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        labelled = generate_crossval_split(sorted(self.source.labels), seed=SPLIT_SEED, n_splits=self.settings.folds)
        unlabelled = sorted(self.unlabelled) if r > 1 else []
        return [
            {"train": sorted([*map(str, s["train"]), *unlabelled]), "val": [str(c) for c in s["val"]]} for s in labelled
        ]

    def pool_by_fold(self, r: int) -> dict[int, list[str]]:
        """Which cases fold model k predicts in round r: its held-out partially labelled cases and every
        unlabelled scan."""
        splits = self.splits(r)
        partial = set(self.source.partial_cases)
        return {
            k: sorted([c for c in split["val"] if c in partial] + list(self.unlabelled))
            for k, split in enumerate(splits)
        }

    def pool_images(self, case: str) -> tuple[Path, ...]:
        return self.unlabelled[case] if case in self.unlabelled else self.source.images[case]

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Do (or continue) the run; returns the final dataset's raw folder."""
        inputs = [self.source.folder] + ([Path(self.settings.unlabeled)] if self.settings.unlabeled else [])
        check_output_folder(self.work_dir, inputs)
        with _exclusive(self.work_dir):
            self.state = RunState.open(self.work_dir, self.identity())
            _log(f"samflare pseudolabel run: {self.work_dir} (invocation {self.state.invocation})")
            self.step("prepare", self.prepare)
            for r in range(1, self.settings.rounds + 1):
                self.run_round(r)
            final = self.settings.rounds
            self.step(
                "final.preprocess", lambda: self.preprocess(final, [LOCATOR_CONFIGURATION, SEGMENTER_CONFIGURATION])
            )
            self.step(
                "final.train.locator",
                lambda: self.train(final, LOCATOR_CONFIGURATION, "all", self.settings.locator_trainer, None),
            )
            warm = self.checkpoint(final - 1, self.settings.segmenter_trainer, 0) if self.settings.warm_start else None
            self.step(
                "final.train.segmenter",
                lambda: self.train(final, SEGMENTER_CONFIGURATION, "all", self.final_segmenter_trainer, warm),
            )
        name = self.dataset_names[final]
        _log(
            f"done: final models in {self.results / name}; predict with: samflare predict -i IMAGES -o OUT "
            f"-d {self.first_id + final} -p {self.settings.plans} --locator_trainer {self.settings.locator_trainer} "
            f"--segmenter_trainer {self.final_segmenter_trainer}"
        )
        return self.raw_dir(final)

    def run_round(self, r: int) -> None:
        # D_{r-1} (0-based labels index r - 1) is what round r trains on
        labels = r - 1
        configurations = [SEGMENTER_CONFIGURATION]
        if r == 1 and self.settings.locator is None:
            configurations.append(LOCATOR_CONFIGURATION)
        self.step(f"r{r}.preprocess", lambda: self.preprocess(labels, configurations))
        if r == 1 and self.settings.locator is None:
            self.step(
                "locator.train",
                lambda: self.train(0, LOCATOR_CONFIGURATION, "all", self.settings.locator_trainer, None),
            )
        for k in range(self.settings.folds):
            warm = (
                self.checkpoint(labels - 1, self.settings.segmenter_trainer, k)
                if self.settings.warm_start and r > 1
                else None
            )
            self.step(
                f"r{r}.train.{k}",
                lambda k=k, warm=warm: self.train(
                    labels, SEGMENTER_CONFIGURATION, k, self.settings.segmenter_trainer, warm
                ),
            )
        self.step(f"r{r}.predict", lambda: self.predict(r))
        self.step(f"r{r}.vote", lambda: self.vote(r))
        self.step(f"r{r}.filter", lambda: self.filter(r))
        self.step(f"r{r}.merge", lambda: self.merge(r))
        self.step(f"r{r}.dataset", lambda: self.write_dataset(r))
        self.step(f"r{r}.report", lambda: self.report(r))
        self.step(f"r{r}.cleanup", lambda: self.cleanup(r))

    def step(self, name: str, action: Callable[[], Any]) -> None:
        if self.state.done(name):
            _log(f"[{name}] done (invocation {self.state.steps[name]['invocation']}), skipped")
            return
        _log(f"[{name}] ...")
        start = time.perf_counter()
        action()
        wall = time.perf_counter() - start
        self.state.record(name, wall)
        _log(f"[{name}] done in {wall:.1f} s")

    # -- steps -------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """D_0 (labels round 0): the source's labelled cases, linked, with their partial_labels."""
        folder = self.raw_dir(0)
        provenance = {}
        for case in self.source.labels:
            ds.link_images(folder / "imagesTr", case, self.source.images[case], self.source.file_ending)
            ds.link_file(self.source.labels[case], folder / "labelsTr" / f"{case}{self.source.file_ending}")
            provenance[case] = (
                ds.PROVENANCE_PARTIAL_GROUND_TRUTH if case in self.source.annotated else PROVENANCE_GROUND_TRUTH
            )
        self._finish_dataset(0, provenance, ignore_label=None, keep_partial_labels=True)

    def _finish_dataset(
        self, labels_round: int, provenance: dict[str, str], ignore_label: int | None, keep_partial_labels: bool
    ) -> None:
        name = self.dataset_names[labels_round]
        data = ds.round_dataset_json(
            self.source, name, provenance, self.work_dir, labels_round, ignore_label, keep_partial_labels
        )
        (self.preprocessed / name).mkdir(parents=True, exist_ok=True)
        # the plans first (nnU-Net's helper reads the target's raw dataset.json), then dataset.json, written last
        write_json_atomic(data, self.raw_dir(labels_round) / "dataset.json")
        ds.copy_plans(self.source.name, name, self.settings.plans)
        ds.write_dataset_json(data, self.raw_dir(labels_round), self.preprocessed / name)

    def preprocess(self, labels_round: int, configurations: list[str]) -> None:
        name = self.dataset_names[labels_round]
        splits = self.splits(labels_round + 1) if labels_round < self.settings.rounds else None
        if splits is not None:
            write_json_atomic(splits, self.preprocessed / name / "splits_final.json")
        n = str(max(1, self.settings.num_processes))
        self.nnunet(
            [
                _nnunet_command("nnUNetv2_preprocess"),
                "-d",
                str(self.first_id + labels_round),
                "-plans_name",
                self.settings.plans,
                "-c",
                *configurations,
                "-np",
                *[n] * len(configurations),
            ],
            f"preprocess_{name}",
        )

    def checkpoint(self, labels_round: int, trainer: str, fold: int | str) -> Path:
        return self.model_dir(labels_round, trainer, SEGMENTER_CONFIGURATION) / f"fold_{fold}" / "checkpoint_final.pth"

    def train(
        self, labels_round: int, configuration: str, fold: int | str, trainer: str, pretrained: Path | None
    ) -> None:
        out = self.model_dir(labels_round, trainer, configuration) / f"fold_{fold}"
        final = out / "checkpoint_final.pth"
        remove_torn_checkpoints(out)
        if final.is_file():
            _log(f"  {final} exists: training had finished")
            return
        command = [
            _nnunet_command("nnUNetv2_train"),
            str(self.first_id + labels_round),
            configuration,
            str(fold),
            "-tr",
            trainer,
            "-p",
            self.settings.plans,
            "-device",
            self.settings.device,
        ]
        if any((out / f"checkpoint_{which}.pth").is_file() for which in ("latest", "best")):
            command.append("--c")
        elif pretrained is not None:
            command += ["-pretrained_weights", str(pretrained)]
        self.nnunet(
            command,
            f"train_{self.dataset_names[labels_round]}_{configuration}_{fold}",
            {SKIP_FINAL_VALIDATION_ENV: "1"},
        )
        if not final.is_file():
            raise StepFailed(f"{' '.join(command)} ended without writing {final}")

    def nnunet(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        log = self.work_dir / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        _log(f"  {shlex.join(command)}  (log: {log})")
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {shlex.join(command)}\n")
            f.flush()
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
            raise StepFailed(f"{command[0]} failed with exit code {code} (see {log}): {tail[0].strip()}")

    def fold_model(self, r: int, k: int) -> Path:
        """Fold k's segmenter of round r as a model folder of its own (``fold_all`` links to ``fold_k``), so that
        the cascade can pair it with the fold-``all`` locator. It keeps nnU-Net's folder name
        (``<trainer>__<plans>__<configuration>``), which tools read the configuration from."""
        source = self.model_dir(r - 1, self.settings.segmenter_trainer, SEGMENTER_CONFIGURATION)
        view = self.round_dir(r) / "models" / f"fold_{k}" / source.name
        view.mkdir(parents=True, exist_ok=True)
        for name in ("plans.json", "dataset.json"):
            shutil.copyfile(source / name, view / name)
        link = view / "fold_all"
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link)
            os.symlink((source / f"fold_{k}").resolve(), link, target_is_directory=True)
        return view

    def predict(self, r: int) -> None:
        pools = self.pool_by_fold(r)
        folders = {}
        for k, cases in pools.items():
            pool_dir = self.round_dir(r) / "pool" / f"fold_{k}"
            for case in cases:
                ds.link_images(pool_dir, case, self.pool_images(case), self.source.file_ending)
            folders[k] = (pool_dir, self.round_dir(r) / "predictions" / f"fold_{k}", self.fold_model(r, k))
        if self.settings.num_parts > 1:
            self._predict_in_parts(r, pools, folders)
            return
        from nnunet_samflare.inference.api import build_predictor, predict

        for k, (pool_dir, out_dir, model) in folders.items():
            if not pools[k]:
                continue
            predictor = build_predictor(
                locator=self.locator_dir(), segmenter=model, device=self.settings.device, postprocess=False
            )
            predict(
                pool_dir,
                out_dir,
                predictor=predictor,
                save_probabilities=True,
                continue_prediction=True,
                progress=False,
            )

    def _predict_in_parts(self, r: int, pools: dict[int, list[str]], folders: dict) -> None:
        n = self.settings.num_parts
        lines = []
        for part in range(n):
            commands = [
                shlex.join(
                    [
                        "samflare",
                        "predict",
                        "-i",
                        str(pool_dir),
                        "-o",
                        str(out_dir),
                        "--locator",
                        str(self.locator_dir()),
                        "--segmenter",
                        str(model),
                        "-device",
                        self.settings.device,
                        "--save_probabilities",
                        "--continue_prediction",
                        "--no_postprocessing",
                        "--num_parts",
                        str(n),
                        "--part_id",
                        str(part),
                    ]
                )
                for k, (pool_dir, out_dir, model) in folders.items()
                if pools[k]
            ]
            lines.append(" && ".join(commands))
        script = self.round_dir(r) / "predict_parts.sh"
        write_json_atomic({"num_parts": n, "commands": lines}, self.round_dir(r) / "predict_parts.json")
        with atomic_output(script) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        missing = [
            case
            for k, cases in pools.items()
            for case in cases
            if not _predicted(folders[k][1], case, self.source.file_ending)
        ]
        if missing:
            raise WaitingForParts(
                f"round {r}: {len(missing)} prediction(s) missing (e.g. {missing[0]}). Run the {n} lines of "
                f"{script} (one job each, in any order or at once), then run this command again."
            )

    def _per_case(
        self, step: str, cases: list[str], work: Callable[[str], dict | None], done: Callable[[str], bool]
    ) -> None:
        """``work(case)`` for each case whose output is not there yet; the kill hook counts here."""
        kill_after = _kill_hook(step)
        count = 0
        for case in cases:
            if done(case):
                continue
            work(case)
            count += 1
            if kill_after is not None and count >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    def vote(self, r: int) -> None:
        pools = self.pool_by_fold(r)
        out = self.round_dir(r) / "voted"
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        ending = self.source.file_ending
        self._per_case(
            f"r{r}.vote",
            self.pool,
            lambda case: vote_case(
                [self.round_dir(r) / "predictions" / f"fold_{k}" / f"{case}.npz" for k in pools if case in pools[k]],
                out,
                case,
                ending,
            ),
            lambda case: (out / f"{case}{ending}").is_file(),
        )

    def filter(self, r: int) -> None:
        voted, out = self.round_dir(r) / "voted", self.round_dir(r) / "filtered"
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        ending = self.source.file_ending

        self._per_case(
            f"r{r}.filter",
            self.pool,
            lambda case: filter_case(
                voted / f"{case}{ending}",
                voted / f"{case}.npz",
                out / f"{case}{ending}",
                self.settings.confidence,
                self.ignore_label,
                self.settings.postprocess,
                record_dir=out,
            ),
            lambda case: (out / f"{case}{ending}").is_file(),
        )

    def merge(self, r: int) -> None:
        labels_dir = self.raw_dir(r) / "labelsTr"
        records_dir = self.round_dir(r) / "merged"
        for folder in (labels_dir, records_dir):
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
        ending = self.source.file_ending
        filtered = self.round_dir(r) / "filtered"

        def work(case: str) -> None:
            ground_truth = self.source.labels.get(case)
            pseudo = filtered / f"{case}{ending}" if case in self.pool else None
            merge_case(
                ground_truth,
                pseudo,
                self.source.annotated.get(case) if ground_truth else None,
                labels_dir / f"{case}{ending}",
                record_dir=records_dir,
            )

        self._per_case(
            f"r{r}.merge", self.training_cases(r + 1), work, lambda case: (labels_dir / f"{case}{ending}").is_file()
        )

    def write_dataset(self, r: int) -> None:
        folder = self.raw_dir(r)
        provenance = {}
        for case in self.training_cases(r + 1):
            images = self.unlabelled.get(case) or self.source.images[case]
            ds.link_images(folder / "imagesTr", case, images, self.source.file_ending)
            provenance[case] = read_sidecar(self.round_dir(r) / "merged", case, "merge")["provenance"]
        self._finish_dataset(r, provenance, self.ignore_label, keep_partial_labels=False)

    def report(self, r: int) -> None:
        ending = self.source.file_ending
        previous = self.raw_dir(r - 1) / "labelsTr"
        current = self.raw_dir(r) / "labelsTr"
        pairs = [
            (
                (previous / f"{case}{ending}") if (previous / f"{case}{ending}").exists() else None,
                current / f"{case}{ending}",
            )
            for case in self.training_cases(r + 1)
        ]
        round_dir = self.round_dir(r)
        data = ds.load_dataset_json(self.raw_dir(r) / "dataset.json")
        names = {int(v): k for k, v in self.source.dataset_json["labels"].items()}
        if self.ignore_label is not None:
            names[self.ignore_label] = "ignore"
        walls = {
            name.split(".", 1)[1]: step["wall_s"]
            for name, step in self.state.steps.items()
            if name.startswith(f"r{r}.")
        }
        report = build_report(
            r,
            self.dataset_names[r],
            label_changes(pairs),
            [read_sidecar(round_dir / "voted", case, "vote") for case in self.pool],
            [read_sidecar(round_dir / "filtered", case, "filter") for case in self.pool],
            data[ds.MARKER_KEY]["label_provenance"],
            walls,
            names,
        )
        save_report(report, round_dir)
        _log(format_report(report))

    def cleanup(self, r: int) -> None:
        if self.settings.keep_probabilities:
            return
        for folder in (*(self.round_dir(r) / "predictions").glob("fold_*"), self.round_dir(r) / "voted"):
            for path in folder.glob("*.npz"):
                path.unlink()


# -- helpers ----------------------------------------------------------------------------------------------------


def _nnunet_command(name: str) -> str:
    """An nnU-Net console script, preferably the one installed beside this interpreter."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise InputError(None, f"{name} not found: is nnU-Net installed in this environment?")
    return found


def _check_model_folder(folder: Path) -> None:
    if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
        raise InputError(folder, "not a trained nnU-Net model folder (plans.json and dataset.json needed)")
    if not any(folder.glob("fold_*/checkpoint_final.pth")):
        raise InputError(folder, "no fold_*/checkpoint_final.pth in the locator model folder")


def remove_torn_checkpoints(fold_dir: Path) -> list[Path]:
    """Delete the checkpoints of ``fold_dir`` that a kill tore while nnU-Net wrote them (it saves in place) and
    return them: a torn final one would count as a finished training, a torn latest or best one would make every
    ``--c`` re-run fail. nnU-Net's ``--c`` then takes the next one it finds (latest, best) or starts over."""
    torn = [
        path
        for path in (fold_dir / f"checkpoint_{which}.pth" for which in ("final", "latest", "best"))
        if path.is_file() and not _checkpoint_loads(path)
    ]
    for path in torn:
        path.unlink()
    return torn


def _checkpoint_loads(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:  # a torn file fails in many ways
        return False


def _predicted(folder: Path, case: str, ending: str) -> bool:
    return all((folder / name).is_file() for name in (f"{case}{ending}", f"{case}.npz", f"{case}.pkl"))


def _kill_hook(step: str) -> int | None:
    value = os.environ.get(KILL_HOOK_ENV, "")
    if ":" in value:
        name, count = value.rsplit(":", 1)
        if name == step:
            return int(count)
    return None


@contextlib.contextmanager
def _exclusive(work_dir: Path):
    """One run per work folder at a time (the lock goes away with the process, also when it is killed)."""
    with open(work_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(work_dir, "another samflare pseudolabel run is using this work folder") from None
        yield


def run_pseudolabel(settings: RunSettings) -> Path:
    """Check everything, then do or continue the run (see the module docstring)."""
    return PseudoLabelRun(settings).run()

"""Sharing a trained cascade: ``samflare export`` packs both phases' model folders into one zip, ``samflare install``
puts them under ``$nnUNet_results`` so that ``samflare predict -d D`` works on another machine.

The zip has nnU-Net's own layout (paths relative to ``$nnUNet_results``: ``DatasetXXX_Name/<trainer>__<plans>__<
configuration>/...``), so stock ``nnUNetv2_install_pretrained_model_from_zip`` can install it too, plus one file at
its root, ``samflare_cascade.json``: which folders, folds and checkpoint make up the cascade, the SHA-256 of every
file, and the versions that wrote it.

Why not nnU-Net's functions themselves (``nnunetv2.model_sharing``):

* ``export_pretrained_model`` packs one trainer per zip (the cascade has two), opens the zip for writing on every
  call, and requires the files of nnU-Net's final validation (``validation/summary.json``, ``progress.png``); models
  trained without it (``samflare demo``, the pseudo-label rounds) could not be exported. Here those files are
  packed when present and never required.
* ``install_model_from_zip_file`` extracts straight into ``$nnUNet_results`` without any check: a truncated or
  foreign zip leaves half a model behind. Here the zip is checked first (CRC, manifest, member names, checksums),
  extracted into a temporary folder beside the destination, and each model folder is moved into place by a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import atomic_output
from nnunet_samflare.training.names import (
    DEFAULT_PLANS_NAME,
    LOCATOR_CONFIGURATION,
    LOCATOR_TRAINER,
    SEGMENTER_CONFIGURATION,
    SEGMENTER_TRAINER,
)

MANIFEST = "samflare_cascade.json"
FORMAT = "samflare-cascade"
FORMAT_VERSION = 1
PHASES = ("locator", "segmenter")
#: Files of a model folder that prediction needs (besides the checkpoints).
_MODEL_FILES = ("plans.json", "dataset.json")
#: Packed when present: nnU-Net's fingerprint, its determined post-processing, and the training record of a fold.
_OPTIONAL_MODEL_FILES = ("dataset_fingerprint.json",)
_OPTIONAL_FOLD_FILES = ("debug.json", "progress.png", "validation/summary.json")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PhaseModel:
    """One phase's model folder and what of it goes into the zip."""

    phase: str
    folder: Path
    trainer: str
    configuration: str
    folds: tuple[int | str, ...]

    def files(self, checkpoint_name: str) -> list[Path]:
        wanted = [self.folder / name for name in _MODEL_FILES]
        wanted += [self.folder / name for name in _OPTIONAL_MODEL_FILES if (self.folder / name).is_file()]
        for crossval in sorted(self.folder.glob("crossval_results_folds_*")):
            wanted += sorted(p for p in crossval.glob("postprocessing.*") if p.is_file())
        for fold in self.folds:
            fold_folder = self.folder / f"fold_{fold}"
            wanted.append(fold_folder / checkpoint_name)
            wanted += [fold_folder / name for name in _OPTIONAL_FOLD_FILES if (fold_folder / name).is_file()]
        return wanted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _results_folder(results: str | os.PathLike | None) -> Path:
    if results is not None:
        return Path(results).expanduser().resolve()
    from nnunetv2.paths import nnUNet_results

    if not nnUNet_results:
        raise InputError(
            None, "nnUNet_results is not set: export nnUNet_results=<folder of trained models> or give --results"
        )
    return Path(str(nnUNet_results)).expanduser().resolve()


def find_phase_model(
    phase: str,
    dataset: str | int,
    trainer: str,
    plans: str,
    configuration: str,
    folds: Sequence[int | str] | None,
    checkpoint_name: str,
) -> PhaseModel:
    """The model folder of one phase as ``samflare predict`` finds it, checked for everything prediction needs."""
    from nnunet_samflare.inference.cascade import available_folds, model_folder

    folder = model_folder(dataset, trainer, plans, configuration)
    if not folder.is_dir():
        raise InputError(folder, f"{phase} model folder not found (check -d, -p and --{phase}_trainer)")
    for name in _MODEL_FILES:
        if not (folder / name).is_file():
            raise InputError(folder / name, f"missing: {folder} is not a trained model folder")
    if folds is None:
        folds = available_folds(folder, checkpoint_name)
        if not folds:
            raise InputError(folder, f"no fold_* folder holds {checkpoint_name}")
    for fold in folds:
        if not (folder / f"fold_{fold}" / checkpoint_name).is_file():
            raise InputError(folder / f"fold_{fold}" / checkpoint_name, "checkpoint missing")
    return PhaseModel(phase, folder, trainer, configuration, tuple(folds))


def export_cascade(
    dataset: str | int,
    output: str | os.PathLike,
    *,
    plans: str = DEFAULT_PLANS_NAME,
    locator_trainer: str = LOCATOR_TRAINER,
    segmenter_trainer: str = SEGMENTER_TRAINER,
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
) -> Path:
    """Write both phases' model folders of ``dataset`` into the zip ``output`` (written under a temporary name and
    renamed). ``folds``: the same for both phases; by default every fold that holds the checkpoint."""
    import nnunetv2

    from nnunet_samflare import __version__

    output = Path(output).expanduser().resolve()
    if output.suffix.lower() != ".zip":
        raise InputError(output, "the output must be a .zip file")
    if not output.parent.is_dir():
        raise InputError(output.parent, "output folder does not exist")
    models = [
        find_phase_model("locator", dataset, locator_trainer, plans, LOCATOR_CONFIGURATION, folds, checkpoint_name),
        find_phase_model(
            "segmenter", dataset, segmenter_trainer, plans, SEGMENTER_CONFIGURATION, folds, checkpoint_name
        ),
    ]
    results = models[0].folder.parent.parent
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": models[0].folder.parent.name,
        "plans": plans,
        "checkpoint": checkpoint_name,
        "written_by": {"nnunet_samflare": __version__, "nnunetv2": getattr(nnunetv2, "__version__", "unknown")},
        "files": {},
    }
    for model in models:
        manifest[model.phase] = {
            "folder": model.folder.relative_to(results).as_posix(),
            "trainer": model.trainer,
            "configuration": model.configuration,
            "folds": list(model.folds),
        }
    with atomic_output(output) as tmp:
        # Checkpoints are mostly float weights that deflate poorly: storing them saves minutes on large models.
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for model in models:
                for path in model.files(checkpoint_name):
                    name = path.relative_to(results).as_posix()
                    compression = zipfile.ZIP_STORED if path.suffix == ".pth" else zipfile.ZIP_DEFLATED
                    archive.write(path, name, compress_type=compression)
                    manifest["files"][name] = _sha256(path)
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return output


# ------------------------------------------------------------------------------------------------------- install


def _bad_zip(path: Path, cause: str) -> InputError:
    return InputError(path, cause)


def read_manifest(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    """The cascade manifest of an open zip, checked against the zip's own member list."""
    try:
        manifest = json.loads(archive.read(MANIFEST).decode("utf-8"))
    except KeyError:
        raise _bad_zip(
            path,
            f"not a samflare cascade (no {MANIFEST}); a single nnU-Net model installs with "
            "nnUNetv2_install_pretrained_model_from_zip",
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad_zip(path, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad_zip(path, f"{MANIFEST} does not describe a samflare cascade")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _bad_zip(
            path,
            f"cascade format version {manifest.get('format_version')} is not supported "
            f"(this samflare reads version {FORMAT_VERSION}); update nnunet-samflare",
        )
    files = manifest.get("files")
    dataset = manifest.get("dataset")
    if not isinstance(files, dict) or not files or not isinstance(dataset, str) or not dataset.startswith("Dataset"):
        raise _bad_zip(path, f"{MANIFEST} lists no model files")
    for phase in PHASES:
        entry = manifest.get(phase)
        if not isinstance(entry, dict) or not str(entry.get("folder", "")).startswith(dataset + "/"):
            raise _bad_zip(path, f"{MANIFEST} has no {phase} model folder")
    members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
    for name in files:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or parts[0] != dataset:
            raise _bad_zip(path, f"unsafe or foreign member name {name!r}")
        if name not in members:
            raise _bad_zip(path, f"{name} is listed in {MANIFEST} but missing from the zip (truncated?)")
        if (members[name].external_attr >> 16) & 0o170000 == 0o120000:
            raise _bad_zip(path, f"{name} is a symbolic link")
    extra = sorted(set(members) - set(files) - {MANIFEST})
    if extra:
        raise _bad_zip(path, f"{extra[0]} is in the zip but not in {MANIFEST}")
    return manifest


def _same_files(root: Path, files: dict[str, str], prefix: str) -> bool:
    """True when every manifest file under ``prefix`` exists below ``root`` with the listed checksum."""
    names = [n for n in files if n.startswith(prefix + "/")]
    return all((root / n).is_file() and _sha256(root / n) == files[n] for n in names)


def install_cascade(
    archive_path: str | os.PathLike,
    *,
    results: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Install a zip written by :func:`export_cascade` under ``results`` (default ``$nnUNet_results``).

    Nothing is installed unless the whole zip checks out. A model folder that already exists with the same files
    is left as it is; one with other files is replaced only with ``overwrite``. Returns the manifest, with the
    installed folders under ``"installed"``.
    """
    path = Path(archive_path).expanduser().resolve()
    if not path.is_file():
        raise InputError(path, "no such file")
    root = _results_folder(results)
    if not zipfile.is_zipfile(path):
        raise _bad_zip(path, "not a zip file (corrupt or truncated)")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = read_manifest(archive, path)
            broken = archive.testzip()
            if broken is not None:
                raise _bad_zip(path, f"corrupt: {broken} fails its CRC check")
            dataset = manifest["dataset"]
            _check_dataset_id_free(root, dataset)
            targets = {phase: root / manifest[phase]["folder"] for phase in PHASES}
            todo = [
                p
                for p in PHASES
                if not (targets[p].exists() and _same_files(root, manifest["files"], manifest[p]["folder"]))
            ]
            clashes = [targets[p] for p in todo if targets[p].exists()]
            if clashes and not overwrite:
                raise InputError(clashes[0], "already installed with other files; use --overwrite to replace it")
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".samflare-install-", dir=root))
            try:
                for phase in todo:
                    prefix = manifest[phase]["folder"] + "/"
                    for name in manifest["files"]:
                        if name.startswith(prefix):
                            archive.extract(name, staging)
                            if _sha256(staging / name) != manifest["files"][name]:
                                raise _bad_zip(path, f"corrupt: {name} does not match its checksum")
                _move_into_place(staging, root, [manifest[p]["folder"] for p in todo])
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise _bad_zip(path, f"corrupt zip ({e})") from None
    manifest["installed"] = {phase: str(targets[phase]) for phase in PHASES}
    manifest["already_installed"] = [p for p in PHASES if p not in todo]
    manifest["results"] = str(root)
    return manifest


def _check_dataset_id_free(root: Path, dataset: str) -> None:
    """nnU-Net resolves ``-d 501`` by the id prefix: two names with one id would make every command ambiguous."""
    prefix = dataset[: len("Dataset000")]
    if root.is_dir():
        for other in root.glob(prefix + "_*"):
            if other.name != dataset and other.is_dir():
                raise InputError(
                    other, f"dataset id {prefix[7:]} is already used by another dataset; the cascade is for {dataset}"
                )


def _move_into_place(staging: Path, root: Path, folders: Sequence[str]) -> None:
    """Rename each staged model folder into ``root``; an existing one is set aside first and restored if any
    rename fails, so the destination holds either the old or the new folders."""
    moved: list[tuple[Path, Path | None]] = []
    try:
        for relative in folders:
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            backup = None
            if target.exists():
                backup = staging / (".previous-" + target.name)
                os.replace(target, backup)
            moved.append((target, backup))
            os.replace(staging / relative, target)
    except BaseException:
        for target, backup in reversed(moved):
            if backup is not None and backup.exists():
                if target.exists():
                    shutil.rmtree(target)
                os.replace(backup, target)
            elif backup is None and target.exists():
                shutil.rmtree(target)
        raise


def predict_command(manifest: dict[str, Any]) -> str:
    """The ``samflare predict`` line for an installed cascade (non-default options only)."""
    dataset_id = int(manifest["dataset"][7:10])
    parts = ["samflare predict -i IMAGES -o OUTPUT", f"-d {dataset_id}"]
    if manifest["plans"] != DEFAULT_PLANS_NAME:
        parts.append(f"-p {manifest['plans']}")
    if manifest["locator"]["trainer"] != LOCATOR_TRAINER:
        parts.append(f"--locator_trainer {manifest['locator']['trainer']}")
    if manifest["segmenter"]["trainer"] != SEGMENTER_TRAINER:
        parts.append(f"--segmenter_trainer {manifest['segmenter']['trainer']}")
    if manifest["checkpoint"] != "checkpoint_final.pth":
        parts.append(f"-chk {manifest['checkpoint']}")
    return " ".join(parts)

"""nnU-Net finds the plug-in's trainers with no configuration (the .pth hook), with the documented
``nnUNet_extTrainer`` setting, and in every process nnU-Net starts: train, predict, --c, --val, DDP children.

Every subprocess here starts from an environment without ``nnUNet_extTrainer``: only the installed
``nnunet_samflare_autoregister.pth`` can make the lookup succeed, and the opt-out test proves it is what does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import nnunet_samflare.nnunet_trainers

from conftest import DATASET_ID, LOCATOR_TRAINER, PLANS, command

SHIM_FOLDER = os.path.abspath(nnunet_samflare.nnunet_trainers.__path__[0])
LOOKUP = (
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
    "cls = find('nnUNetTrainer_SAMFlareSegmenter'); print(cls.__module__)"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "SAMFLARE_NO_AUTOREGISTER")}
    env.update(extra)
    return env


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )


def test_autoregistration_sets_the_variable_at_startup():
    result = python("import os; print(os.environ['nnUNet_extTrainer'])", clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SHIM_FOLDER


def test_autoregistration_keeps_a_user_value():
    result = python("import os; print(os.environ['nnUNet_extTrainer'])", clean_env(nnUNet_extTrainer="/my/trainers"))
    assert result.stdout.strip().split(os.pathsep) == ["/my/trainers", SHIM_FOLDER]


def test_trainer_found_without_environment_variable():
    result = python(LOOKUP, clean_env())
    assert result.returncode == 0, result.stderr
    # the class comes from the package, not from the purged shim module, so it can be pickled
    assert result.stdout.strip().splitlines()[-1] == "nnunet_samflare.training.trainers"


def test_trainer_found_with_documented_environment_variable_and_opt_out():
    result = python(LOOKUP, clean_env(SAMFLARE_NO_AUTOREGISTER="1", nnUNet_extTrainer=SHIM_FOLDER))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "nnunet_samflare.training.trainers"


def test_opt_out_without_variable_is_not_found():
    # negative control: without the hook and without the variable nnU-Net cannot know the trainer
    result = python(LOOKUP, clean_env(SAMFLARE_NO_AUTOREGISTER="1"))
    assert result.returncode != 0
    assert "Could not find requested nnunet trainer" in result.stderr


def test_ddp_children_find_the_trainer(tmp_path):
    # nnUNetv2_train -num_gpus N starts its ranks with torch.multiprocessing.spawn (fresh interpreters).
    # NCCL needs GPUs, so the same spawn is done here with the lookup each rank performs.
    code = textwrap.dedent(
        """
        import torch.multiprocessing as mp

        def rank(i):
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
            import pickle
            cls = find('nnUNetTrainer_SAMFlareSegmenter')
            pickle.dumps(cls)
            print('rank', i, cls.__module__, flush=True)

        if __name__ == '__main__':
            mp.spawn(rank, nprocs=2, join=True)
        """
    )
    script = tmp_path / "ddp_lookup.py"  # spawn re-imports __main__, so it must be a file
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        env=clean_env(),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 nnunet_samflare.training.trainers",
        "rank 1 nnunet_samflare.training.trainers",
    ]


@pytest.mark.parametrize(
    ("flag", "extra_env"),
    [
        ("--c", {}),
        ("--val", {}),
        ("--val", {"SAMFLARE_NO_AUTOREGISTER": "1", "nnUNet_extTrainer": SHIM_FOLDER}),
    ],
    ids=["continue", "validation-only", "validation-only-with-variable"],
)
def test_continue_and_validation_only_find_the_trainer(trained_models, flag, extra_env):
    result = trained_models.run(
        [
            command("nnUNetv2_train"),
            str(DATASET_ID),
            "3d_locator",
            "all",
            "-tr",
            LOCATOR_TRAINER,
            "-p",
            PLANS,
            "-device",
            "cpu",
            flag,
        ],
        training=True,
        **extra_env,
    )
    assert "Mean Validation Dice" in result.stdout

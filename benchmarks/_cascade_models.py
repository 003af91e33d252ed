"""Model folders for the cascade benchmarks, in nnU-Net's own format (fold 0): nnU-Net's default ``3d_fullres``
network and the plug-in's locator and segmenter, built by their real trainer classes and fitted where the
benchmark needs realistic outputs (see ``benchmarks/README.md``). Runs in a worker process whose environment
points nnU-Net at the working folder: ``python _cascade_workers.py --_worker make-models``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from _cascade_case import CASE_ID, PLANS, dataset_name


def make_models_worker(config: dict, out_file: Path) -> None:
    """In a process whose environment points nnU-Net at the workdir: write the three model folders."""
    import shutil as _shutil

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareLocator, nnUNetTrainer_SAMFlareSegmenter

    torch.manual_seed(12345)
    name = dataset_name(config["dataset_id"])
    preprocessed = Path(nnUNet_preprocessed) / name
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    models = {}
    for key, trainer_class, plans_name, configuration in (
        ("nnunet", nnUNetTrainer, "nnUNetPlans", "3d_fullres"),
        ("locator", nnUNetTrainer_SAMFlareLocator, PLANS, "3d_locator"),
        ("segmenter", nnUNetTrainer_SAMFlareSegmenter, PLANS, "3d_segmenter"),
    ):
        plans = load_json(str(preprocessed / f"{plans_name}.json"))
        plans["continue_training"] = False  # nnUNetTrainer.__init__ pops this key (docs/nnunet.md §6.9)
        trainer = trainer_class(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        # on_train_start -> get_dataloaders sets the mirroring axes that the checkpoint hands to the predictor.
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        info: dict[str, Any] = {}
        if key == "locator":
            info = calibrate_locator(trainer, config)
        base = Path(trainer.output_folder_base)
        Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
        save_json(trainer.plans_manager.plans, str(base / "plans.json"), sort_keys=False)
        save_json(trainer.dataset_json, str(base / "dataset.json"), sort_keys=False)
        _shutil.copyfile(preprocessed / "dataset_fingerprint.json", base / "dataset_fingerprint.json")
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        cm = trainer.configuration_manager
        models[key] = {
            "folder": str(base),
            "trainer": trainer_class.__name__,
            "plans": plans_name,
            "configuration": configuration,
            "network": cm.network_arch_class_name,
            "patch_size": list(cm.patch_size),
            "spacing": list(cm.spacing),
            "transpose_forward": list(trainer.plans_manager.transpose_forward),
            "batch_size": cm.batch_size,
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
            **info,
        }
    out_file.write_text(json.dumps(models, indent=2, default=list), encoding="utf-8")


def calibrate_locator(trainer, config: dict) -> dict[str, Any]:
    """Give the untrained locator a realistic output (see the module docstring, step 3)."""
    import numpy as np
    import torch

    network = trainer.network
    head = network.decoder.seg_layers[0]
    if config["locator"] == "all":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(10.0)
        return {"locator_weights": "untrained, head set to call every voxel foreground (ROI = whole scan)"}

    steps = int(config["locator_fit_steps"])
    device = torch.device(config.get("fit_device", "cpu"))
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, identifiers=[CASE_ID])
    data, seg, _, _ = dataset.load_case(CASE_ID)
    data = torch.from_numpy(np.ascontiguousarray(data[:])).float()[None]
    target = (torch.from_numpy(np.ascontiguousarray(seg[:])) > 0).float()[None]
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    pad = []
    for size, p in zip(reversed(data.shape[2:]), reversed(patch)):
        missing = max(0, p - size)
        pad += [missing // 2, missing - missing // 2]
    data = torch.nn.functional.pad(data, pad)
    target = torch.nn.functional.pad(target, pad)
    data, target = data.to(device), target.to(device)
    generator = np.random.default_rng(0)
    network.to(device)  # moves the parameters in place: the trainer's optimizer still refers to them
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-5)
    network.train()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        corner = [int(generator.integers(0, s - p + 1)) for s, p in zip(data.shape[2:], patch)]
        window = (slice(None), slice(None), *(slice(c, c + p) for c, p in zip(corner, patch)))
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(network(data[window]), target[window])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    network.eval()
    network.to("cpu")  # the checkpoint is written from the CPU trainer, as the other two
    return {
        "locator_weights": f"fitted for {steps} AdamW steps (lr 1e-3) to {CASE_ID}'s foreground, "
        f"{patch} crops of its {list(data.shape[2:])} preprocessed grid, on {device.type}",
        "locator_fit_s": round(time.perf_counter() - start, 1),
        "locator_fit_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
    }


def fit_segmenter_worker(spec: dict, out_file: Path) -> None:
    """A copy of the segmenter model folder (``spec["target"]``) whose weights are fitted for ``spec["steps"]``
    AdamW steps to the benchmark case's own labels: a quickly fitted stand-in for a trained segmenter, so that
    comparisons of label maps are made on organ-shaped output rather than an untrained network's noise."""
    import shutil

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_samflare.training.trainers import nnUNetTrainer_SAMFlareSegmenter

    source, target = Path(spec["source"]), Path(spec["target"])
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    plans = load_json(str(source / "plans.json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainer_SAMFlareSegmenter(
        plans, "3d_segmenter", 0, load_json(str(source / "dataset.json")), device=torch.device(spec["device"])
    )
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    trainer.load_checkpoint(str(source / "fold_0" / "checkpoint_final.pth"))
    network = trainer.network
    device = torch.device(spec["device"])
    if device.type == "cpu":
        from nnunet_samflare.networks.fast_paths import use_fast_paths

        use_fast_paths(network)  # same function and parameters, faster on a CPU
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, identifiers=[CASE_ID])
    data, seg, _, _ = dataset.load_case(CASE_ID)
    data = torch.from_numpy(np.ascontiguousarray(data[:])).float()
    seg = torch.from_numpy(np.ascontiguousarray(seg[:])).long().clamp_min(0)
    patch = [int(p) for p in spec["patch"]]
    pad = []
    for size, p in zip(reversed(data.shape[1:]), reversed(patch)):
        missing = max(0, p - size)
        pad += [missing // 2, missing - missing // 2]
    data = torch.nn.functional.pad(data, pad)
    seg = torch.nn.functional.pad(seg, pad)
    foreground = torch.nonzero(seg[0] > 0)
    generator = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=spec.get("lr", 1e-3), weight_decay=1e-5)
    network.to(device).train()
    losses = []
    start = time.perf_counter()
    for step in range(int(spec["steps"])):
        batch_x, batch_y = [], []
        for sample in range(int(spec.get("batch", 2))):
            if (step + sample) % 2 and len(foreground):  # half the crops centred on a labelled voxel
                centre = foreground[int(generator.integers(len(foreground)))].tolist()
                corner = [min(max(0, c - p // 2), s - p) for c, p, s in zip(centre, patch, data.shape[1:])]
            else:
                corner = [int(generator.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], patch)]
            window = (slice(None), *(slice(c, c + p) for c, p in zip(corner, patch)))
            batch_x.append(data[window])
            batch_y.append(seg[window])
        x, y = torch.stack(batch_x).to(device), torch.stack(batch_y).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(network(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
    network.eval().to("cpu")
    trainer.save_checkpoint(str(target / "fold_0" / "checkpoint_final.pth"))
    result = {
        "folder": str(target),
        "segmenter_weights": f"fitted for {spec['steps']} AdamW steps (lr {spec.get('lr', 1e-3)}) to {CASE_ID}'s "
        f"labels, batches of {spec.get('batch', 2)} crops of {patch} (half centred on a label), on {device.type}",
        "fit_s": round(time.perf_counter() - start, 1),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
    }
    out_file.write_text(json.dumps(result, indent=2), encoding="utf-8")

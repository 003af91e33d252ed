"""Train only the demo's segmenter phase, N epochs x 25 iterations, in a work folder prepared by
`samflare demo --quick --keep --work DIR` (same plan and preprocessed data as the standard size), and print the
pseudo Dice of the large organs after every epoch.

    python segmenter_only.py DIR RESULTS_DIR EPOCHS ITERATIONS
"""

import os
import sys
import time

work, results, epochs, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ.update(
    nnUNet_raw=f"{work}/nnUNet_raw",
    nnUNet_preprocessed=f"{work}/nnUNet_preprocessed",
    nnUNet_results=results,
    nnUNet_compile="f",
    nnUNet_n_proc_DA="0",  # as the demo: augmentation in this process
)
import torch  # noqa: E402
from nnunetv2.run.run_training import get_trainer_from_args  # noqa: E402

torch.set_num_threads(2)
trainer = get_trainer_from_args(
    "501", "3d_segmenter", "all", "nnUNetTrainer_SAMFlareSegmenter", "samflarePlans", device=torch.device("cpu")
)
trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 2
organs = {1: "liver", 2: "rkid", 3: "spleen", 11: "stomach", 13: "lkid"}
nnunet_on_epoch_end = trainer.on_epoch_end
start = time.perf_counter()


def on_epoch_end() -> None:
    nnunet_on_epoch_end()
    dice = trainer.logger.get_value("dice_per_class_or_region", step=-1)
    labels = list(trainer.label_manager.foreground_labels)
    shown = {name: round(float(dice[labels.index(lb)]), 2) for lb, name in organs.items()}
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss = trainer.logger.get_value("train_losses", -1)
    print(f"epoch {trainer.current_epoch:2d} lr {lr:.2e} loss {loss:+.3f} {shown} {time.perf_counter() - start:.0f}s")


trainer.on_epoch_end = on_epoch_end
trainer.print_to_log_file = lambda *args, **kwargs: None
trainer.run_training()

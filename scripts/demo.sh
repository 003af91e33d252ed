#!/usr/bin/env bash
# The whole nnunet-samflare workflow on the example CT shipped in nnunet_samflare/example_data/flare_like, sized for a CPU (~4 min on
# 2 cores): stock nnU-Net planning → samflare plan → preprocessing → training both phases (1-epoch debug
# trainers) → samflare predict (cascade, with stats and previews) → samflare evaluate (FLARE DSC/NSD).
#
#   bash scripts/demo.sh [DATA_FOLDER] [WORK_FOLDER]
#
# The models are smoke-trained, so the labels are not meaningful; the run shows every step working. On a GPU,
# drop the CPU sizing (--segmenter_* below) and the Debug trainers: see README "Workflow".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${1:-$here/nnunet_samflare/example_data/flare_like}
work=${2:-$(mktemp -d /tmp/samflare-demo.XXXXXX)}
dataset=Dataset501_FlareLike
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-1} nnUNet_compile=${nnUNet_compile:-f}
device=${DEVICE:-cpu}

mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
[ -d "$nnUNet_raw/$dataset" ] || cp -r "$data" "$nnUNet_raw/$dataset"

nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -npfp 1 -np 1 --no_pbar
# 3 mm / 64³ keeps the paper's segmenter affordable on a CPU (its own defaults: 2.0/1.5/1.5 mm, 96³)
samflare plan -d 501 --segmenter_spacing 3 3 3 --segmenter_patch 64 64 64
nnUNetv2_preprocess -d 501 -plans_name samflarePlans -c 3d_locator 3d_segmenter -np 1 1
for phase in Locator:3d_locator Segmenter:3d_segmenter; do
  nnUNet_n_proc_DA=0 nnUNetv2_train 501 "${phase#*:}" all -tr "nnUNetTrainer_SAMFlare${phase%%:*}Debug" \
    -p samflarePlans -device "$device"
done
samflare predict -i "$nnUNet_raw/$dataset/imagesTr" -o "$work/predictions" -d 501 -device "$device" \
  --locator_trainer nnUNetTrainer_SAMFlareLocatorDebug --segmenter_trainer nnUNetTrainer_SAMFlareSegmenterDebug \
  --stats --preview
samflare evaluate "$nnUNet_raw/$dataset/labelsTr" "$work/predictions" -o "$work/metrics.json" \
  --plot "$work/metrics.png"
echo "demo outputs in $work: predictions/ (label maps, *_stats.json, *_preview.png), metrics.json, metrics.png"

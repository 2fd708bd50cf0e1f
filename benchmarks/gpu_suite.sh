#!/usr/bin/env bash
# The GPU throughput suite: this project's training step against a plain PyTorch loop for
# ResNet-18, ResNet-50, VGG-16, VGG-16-BN and ViT-B/16 at 224 px on one GPU, on synthetic data,
# in bf16 (fp16 on GPUs older than Ampere; PRECISION=fp16|bf16|fp32 overrides). channels_last
# is decided as train.channels_last = "auto" decides it (on for the convolutional models, off
# for ViT), on both sides. About 6 minutes on one H100. Results go to stdout and to
# benchmarks/results/<gpu>-*.json. Then "what limits my run": the input pipeline of DATA_CFG
# (default: the built-in demo set of 48 px JPEGs, read by DALI, which decodes far faster than
# ImageNet's; give DATA_CFG=configs/data/imagenet.toml for the real figure) alone, and each
# model's step on synthetic and on real batches at the seed's 176 px crops, ending in a
# "limited by: loader|compute" line per model. The correctness suite is apart: pytest -m gpu.
#
#   bash benchmarks/gpu_suite.sh [python]
#   DATA_CFG=configs/data/imagenet.toml bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')
precision=${PRECISION:-$("$PYTHON" -c 'import torch; print("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")')}
mkdir -p benchmarks/results
# batch sizes fit an 80 GB GPU with room to spare
for spec in resnet18:256 resnet50:256 vgg16:128 vgg16_bn:128 vit_base_16:128; do
  arch=${spec%%:*}
  batch=${spec##*:}
  echo "== $arch, batch $batch, 224 px, $precision on $gpu"
  "$PYTHON" -m train.benchmark --device cuda --precision "$precision" --arch "$arch" --batch-size "$batch" \
    --image-size 224 --steps 30 --warmup 15 --rounds 3 --json "benchmarks/results/$gpu-$arch.json"
done
echo "== summary: img/s, this project's step / plain loop"
for spec in resnet18 resnet50 vgg16 vgg16_bn vit_base_16; do
  "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print("%14s: %8.0f / %8.0f = %.3fx" % (r["arch"], r["ours_images_per_s"], r["plain_images_per_s"], r["ratio"]))' \
    "benchmarks/results/$gpu-$spec.json"
done
echo "== what limits a run: the loader alone, then each model on synthetic and on real batches"
data_cfg=${DATA_CFG:-benchmarks/results/builtin-shapes-dali.toml}
if [ -z "${DATA_CFG:-}" ]; then
  printf 'data_dir = "builtin:shapes"\nnum_classes = 10\n\n[dataloader]\nname = "dali"\nnum_data_workers = 8\n' \
    > "$data_cfg"
fi
"$PYTHON" -m train.benchmark --device cuda --precision "$precision" --data-cfg "$data_cfg" \
  --train-cfg configs/train/resnet50-sgd.toml --set train.batch_size=256 \
  --models resnet18,resnet50,vgg16,vgg16_bn,vit_base_patch16_224 --steps 30 --warmup 15 \
  --json "benchmarks/results/$gpu-pipeline.json"

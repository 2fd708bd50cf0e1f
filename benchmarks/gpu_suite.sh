#!/usr/bin/env bash
# The GPU throughput suite: this project's training step against a plain PyTorch loop for
# ResNet-18, ResNet-50, VGG-16 and ViT-B/16 at 224 px in bf16 on one GPU, on synthetic data.
# About 5 minutes on one H100. Results go to stdout and to benchmarks/results/<gpu>-*.json.
#
#   bash benchmarks/gpu_suite.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')
mkdir -p benchmarks/results
# batch sizes fit an 80 GB GPU with room to spare
for spec in resnet18:256 resnet50:256 vgg16:128 vit_base_16:128; do
  arch=${spec%%:*}
  batch=${spec##*:}
  echo "== $arch, batch $batch, 224 px, bf16 on $gpu"
  "$PYTHON" -m train.benchmark --device cuda --precision bf16 --arch "$arch" --batch-size "$batch" \
    --image-size 224 --steps 30 --warmup 15 --rounds 3 --json "benchmarks/results/$gpu-$arch.json"
done

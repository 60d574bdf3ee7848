#!/usr/bin/env bash
# The GPU check: ONE command that measures every GPU target of issue 13 on a machine with an NVIDIA GPU
# (the device tool's H100/H200), raw output under $OUT (or gpu-check-out/):
#   bash benchmarks/gpu_check.sh              # full: about 8-9 minutes on an H100
#   QUICK=1 bash benchmarks/gpu_check.sh      # the essentials: a few minutes
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh   # the same script end to end on the CPU, tiny sizes
# 1. phase 1: memory server (embedded, pipelined; queries answered by the trainer's replica, and sent
#    to the server) vs in-process memory, as ratios (target >= 0.95x);
# 2. the memory server on the torch CUDA backend at m = 1e4 and 1e5: end to end vs in-process search
#    (target >= 0.9x at 1e5), for each --key-dtype, with tf32/bf16 top-k recall against fp32 search;
# 3. the 256 px phase-2 step in bf16: images/s, TFLOP/s and share of the dense bf16 peak for each
#    `train` option (ratio to default) and a per-GPU batch sweep with the fastest (target >= 20 %);
#    a torch.profiler table of the step.
# Wheels the GPU image lacks (pyzmq, webdataset, braceexpand, faiss-cpu) are installed from .whl/ when
# present (ENVIRONMENT.md 9).
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
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
rc=0
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  # The CPU path: every section runs, at sizes that finish in minutes on 2 cores.
  DEVICE=cpu; SIZE=64; WIDTH=16; BATCHES=2; SWEEP=2,4; OPTIONS=channels_last,fused; BF16=
  P1_CONFIG=configs/pokemon_every10_cpu.yaml; P1_ARGS="--quick"; MEM_ARGS="--quick"
  echo "no GPU: GPU_CHECK_CPU=1, tiny sizes" | tee "$OUT/gpu.txt"
else
  DEVICE=cuda; SIZE=256; WIDTH=64; BATCHES=4; BF16=--bf16; P1_CONFIG=configs/gpu_check.yaml; MEM_ARGS=
  OPTIONS=channels_last,fused,channels_last+fused,compile,channels_last+fused+compile,cuda_graphs
  if [ "${QUICK:-0}" = 1 ]; then SWEEP=4,16,32; P1_ARGS="--quick"; OPTIONS=channels_last+fused,compile;
  else SWEEP=4,8,16,32,64,128; P1_ARGS=; fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== 1. phase 1: memory server (pipelined) vs in-process =="
# The default (the trainer's replica answers the queries) and queries sent to the server, vs in-process.
$PY benchmarks/trainer.py --config "$P1_CONFIG" --procs 0 --repeats 1 $P1_ARGS --modes inproc,server,server-remote \
  --json "$OUT/phase1.json" \
  2>&1 | tee "$OUT/phase1.txt" || rc=1

echo "== 2. memory server, torch backend: end to end vs in-process search =="
# Each key dtype (issue 13 item 2); tf32 and bfloat16 also print their top-k recall and search time
# against exact float32 search on the same keys and queries.
for dt in float32 tf32 bfloat16; do
  $PY benchmarks/memory_server.py --backend torch $MEM_ARGS --key-dtype $dt --json "$OUT/memory_server_$dt.json" \
    2>&1 | tee "$OUT/memory_server_$dt.txt" || rc=1
done

echo "== 3. phase-2 step: options, batch sweep, profile =="
$PY benchmarks/model_step.py --device $DEVICE $BF16 --sizes $SIZE --batches $BATCHES --width $WIDTH --reps 5 \
  --options "$OPTIONS" --sweep "$SWEEP" --json "$OUT/model_step.json" 2>&1 | tee "$OUT/model_step.txt" || rc=1
$PY benchmarks/model_step.py --device $DEVICE $BF16 --sizes $SIZE --batches $BATCHES --width $WIDTH --profile \
  2>&1 | tee "$OUT/profile.txt" || rc=1
echo "gpu_check: exit $rc; raw output in $OUT"
exit $rc

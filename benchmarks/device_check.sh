#!/usr/bin/env bash
# Every GPU check of rmoe in one command, sized for one short device lease (~8 min on one H100/H200
# after the machine is up):
#   env             torch, CUDA, the card, and which expert backend `auto` takes there and why;
#   routers         one bf16 training step of every configs/router/*.yaml on grouped_mm against sliced
#                   (loss, gradient norm and every gradient equal; benchmarks/router_check.py);
#   block_bf16      the MoE block in bf16 against the dense MLP and transformers' eager and grouped_mm
#                   experts (issue 15's three shapes), block_gpu_shape one GPU-sized fine-grained shape;
#   train_moe       configs/size/gpu.yaml's model, bf16-mixed, compiled layers, grouped_mm, with validation
#                   and the routing analytics on: tokens/s, MFU, val/loss (DDP over every visible GPU);
#   train_dense     the same run with the dense MLP of the same active parameters (the step-time ratio).
#
# On the device machine (the `device` tool's `run`, from the repository root, carry [".whl"]):
#     bash benchmarks/device_check.sh
# Prepare the wheels it needs first, here (packages that machine's image lacks, for its Python 3.12):
#     bash benchmarks/device_check.sh --wheels
# Dry run of the whole sequence on a CPU (reduced sizes; what to try before spending device time):
#     bash benchmarks/device_check.sh --cpu
#
# The steps' timeouts add up to 550 s, inside one 600 s command of the device tool.
# Everything it prints also lands in $OUT (default: ./device_check_out): env.txt, routers.txt/.json,
# block_bf16.txt/.json, block_gpu_shape.txt/.json, train_moe.txt, train_dense.txt, summary.txt. Each
# step has its own timeout and a failed step does not stop the ones after it; the exit code is the
# number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_check_out}
PYTHON=${PYTHON:-python3}
MODE=${1:-gpu}

# The packages rmoe needs that the H200 image (torch, lightning, transformers, tensorboard, pandas,
# pyarrow, ... already there) does not hold; the versions this repository is tested with.
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
        jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)

if [ "$MODE" = "--wheels" ]; then
  mkdir -p .whl
  exec "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
fi
case "$MODE" in
  gpu|--cpu) ;;
  *) echo "usage: bash benchmarks/device_check.sh [--cpu | --wheels]  (got: $MODE)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$MODE" = gpu ]; then  # the device machine: install the carried wheels beside its image
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing .whl/ failed" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failures=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, tee to $OUT/NAME.txt, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "device_check: $name rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

step env 45 "$PYTHON" -c "
import torch, lightning, transformers, datasets, omegaconf, jsonargparse, matplotlib, yaml, tensorboard
from rmoe.model.moe import grouped_mm_unavailable
from rmoe.training.callbacks import peak_bf16_flops
for m in (torch, lightning, transformers, datasets, omegaconf, jsonargparse):
    print(m.__name__, m.__version__)
print('torch built with CUDA', torch.version.cuda)
if torch.cuda.is_available():
    d = torch.device('cuda')
    name = torch.cuda.get_device_name(0)
    print(name, 'x', torch.cuda.device_count(), 'capability', torch.cuda.get_device_capability(0))
    print('bf16 dense peak FLOP/s:', peak_bf16_flops(name))
    print('auto takes grouped_mm (bf16, d=512, F=256):', grouped_mm_unavailable(d, torch.bfloat16, 512, 256) or 'yes')
else:
    print('no CUDA device: CPU dry run')
"

if [ "$MODE" = gpu ]; then
  BLOCK=(--device cuda --dtype bf16)
  SHAPES=(--sweep)  # the three shapes of issue 15, one table
  TRAIN=(benchmarks/gpu_check.py --steps 200)
else
  BLOCK=(--device cpu --dtype bf16 --repeats 2 --warmup 1)  # bf16 matmuls are ~25x slower than fp32 on this CPU
  SHAPES=(--tokens 768 --seq-len 64 --hidden-size 128 --expert-size 176)  # the sweep's small shape only
  TRAIN=(benchmarks/gpu_check.py --cpu --steps 12)
fi
if [ "$MODE" = gpu ]; then
  ROUTERS=(--device cuda)
else
  ROUTERS=(--device cpu --tokens 256 --seq-len 64 --hidden-size 64 --num-layers 2 --num-experts 8 --expert-size 32
           --vocab-size 256)
fi
step routers 75 "$PYTHON" benchmarks/router_check.py "${ROUTERS[@]}" --json "$OUT/routers.json"
DENSE=(model.arch.num_experts=0)  # the dense MLP's intermediate_size = top_k x expert width: same active params
step block_bf16 120 "$PYTHON" benchmarks/bench_moe.py "${SHAPES[@]}" "${BLOCK[@]}" --json "$OUT/block_bf16.json"
# A GPU-sized fine-grained shape (Qwen3-MoE-like: 64 experts of 512, top-8, d=1024, 16k tokens).
if [ "$MODE" = gpu ]; then
  step block_gpu_shape 60 "$PYTHON" benchmarks/bench_moe.py "${BLOCK[@]}" --tokens 16384 --seq-len 2048 \
    --hidden-size 1024 --num-experts 64 --expert-size 512 --top-k 8 --json "$OUT/block_gpu_shape.json"
fi
step train_moe 150 "$PYTHON" "${TRAIN[@]}" "trainer.logger.init_args.save_dir=${RUNS:-/tmp/device_check_runs}"
step train_dense 100 "$PYTHON" "${TRAIN[@]}" "${DENSE[@]}" "trainer.logger.init_args.save_dir=${RUNS:-/tmp/device_check_runs}"

grep -h "agree (sliced / grouped_mm)" "$OUT/routers.txt" | tee -a "$OUT/summary.txt"
grep -H "^gpu_check:" "$OUT/train_moe.txt" "$OUT/train_dense.txt" | tee -a "$OUT/summary.txt"
echo "device_check: $failures failed step(s); outputs in $OUT" | tee -a "$OUT/summary.txt"
exit "$failures"

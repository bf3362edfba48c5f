#!/usr/bin/env bash
# The first minutes on a lent GPU, in one call: every GPU path once, then a summary table last.
#   bash test/gpu_check.sh              build for this machine's GPU alone (needs nvcc), then check
#   bash test/gpu_check.sh --prebuilt   check ./fpdt, build/fpdt_tests and build/mpi_layout as they are:
#                                       built with nvcc on another machine and copied here, e.g.
#                                       make GPU_ARCH="-gencode arch=compute_90,code=sm_90" fpdt build/fpdt_tests build/mpi_layout
#   --sanitize                          also compute-sanitizer memcheck and racecheck (minutes more)
# Logs go to $OUT (default build/gpu_check). Planned for one H200 with 16 cores: under 7 minutes
# from prebuilt binaries (not yet timed on a GPU). The stages, each under a time limit cut to fit
# what is left of BUDGET seconds (default 400: a hang must not eat a loan, and the table must come
# out), each a row of the table:
#   preflight   a GPU (nvidia-smi, device nodes); the binaries (a CUDA build whose libraries all
#               resolve: ldd); one tiny bench on the GPU (driver, runtime, this GPU's architecture)
#   op twins    every kernel against its CPU twin (GpuOps, Gpu, GpuA2a)
#   model       the whole model against the CPU, fp32 and bf16 (GpuModel, GpuModelHeads)
#   train       ./fpdt train on the GPU and on the CPU, fp32 and bf16, losses side by side, and
#               the GPU's memory after the first step against the stated headroom
#   race stress medium at 32K tokens: offload on and off, --zero 3, the same losses (GpuStress)
#   ranks       the program on the GPU: ranks sharing it over MPI, ZeRO 1-3, replicated kv heads,
#               the trace, bf16 at a realistic size (GpuTrain)
#   nccl        NCCL collectives and the watchdog's ring (GpuNccl; the two-rank tests need 2 GPUs)
#   bench       ./fpdt bench --device gpu (matmuls, one attention block, pinned copies)
#   peer        the PyTorch peer, only when .peer/peer_pytorch.py is there (it is not in the repository)
# GPU tests run with FPDT_EXPECT_GPU=1: no usable device fails them (with the reason) instead of
# skipping them, so this script cannot pass without GPU coverage. Exit 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_check}
mkdir -p "$out"
prebuilt=0 sanitize=0
for a in "$@"; do
    case "$a" in
        --prebuilt) prebuilt=1 ;;
        --sanitize) sanitize=1 ;;
        *) echo "gpu_check: unknown argument '$a' (expected --prebuilt, --sanitize)"; exit 2 ;;
    esac
done
rows=()  # "stage|result|tests|seconds|note"
deadline=$(( SECONDS + ${BUDGET:-400} ))
limit() {  # a stage's time limit: its own, or what is left of the budget (10 s kept for the table)
    local left=$(( deadline - SECONDS - 10 ))
    [ "$left" -lt 5 ] && left=5
    echo $(( $1 < left ? $1 : left ))
}
row() { rows+=("$1|$2|$3|$4|$5"); }
summary() {
    echo
    echo "=== fpdt GPU check | ${gpu_line:-no GPU} | $(date -u '+%Y-%m-%d %H:%M UTC') ==="
    printf "%-12s %-7s %-16s %8s  %s\n" stage result "tests p/f/s" seconds note
    for r in "${rows[@]}"; do
        IFS='|' read -r s res t sec note <<< "$r"
        printf "%-12s %-7s %-16s %8s  %s\n" "$s" "$res" "$t" "$sec" "$note"
    done
}
fail_preflight() {  # one clear line, the table, exit 1
    echo "gpu_check: FAILED: $1"
    row preflight FAILED - "$(( SECONDS - t0 ))" "$1"
    summary
    exit 1
}

# ---- preflight
t0=$SECONDS
nodes=$(ls /dev/nvidia[0-9]* 2>/dev/null | tr '\n' ' ')
if command -v nvidia-smi >/dev/null 2>&1; then
    if ! smi=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1); then
        fail_preflight "no usable GPU: nvidia-smi failed ($(echo "$smi" | head -1)); device nodes: ${nodes:-none}"
    fi
    gpu_line=$(echo "$smi" | head -1)
    echo "$smi" > "$out/gpu.txt"
    sm=$(echo "$gpu_line" | awk -F', ' '{print $4}' | tr -d ' .')
elif [ -n "$nodes" ]; then
    gpu_line="nvidia-smi missing; device nodes $nodes"
    sm=""
else
    fail_preflight "no GPU on this machine: no nvidia-smi and no /dev/nvidia* device nodes (the NVIDIA driver is not installed, or this is not a GPU machine)"
fi
if [ "$prebuilt" = 1 ]; then
    for f in fpdt build/fpdt_tests build/mpi_layout; do
        [ -x "$f" ] || fail_preflight "--prebuilt: $f is missing (build it with nvcc, e.g. make GPU_ARCH=\"-gencode arch=compute_90,code=sm_90\" fpdt build/fpdt_tests build/mpi_layout, and copy it here)"
    done
    how="prebuilt"
else
    # the toolkit's nvcc, also where it is installed but not on PATH; this GPU's architecture alone
    export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:/usr/local/cuda/bin:$PATH"
    command -v nvcc >/dev/null 2>&1 ||
        fail_preflight "nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): install the CUDA toolkit, or build on a machine that has it and run with --prebuilt"
    arch=${sm:+-gencode arch=compute_$sm,code=sm_$sm}
    echo "building for ${arch:--arch=native} (log: $out/build.log)"
    make -j"$(nproc)" GPU_ARCH="${arch:--arch=native}" fpdt build/fpdt_tests build/mpi_layout > "$out/build.log" 2>&1 ||
        { tail -20 "$out/build.log"; fail_preflight "the build failed (see $out/build.log)"; }
    how="built here (${arch:--arch=native})"
fi
missing=$(ldd fpdt build/fpdt_tests build/mpi_layout 2>&1 | grep "not found" | sort -u | tr -s ' \t' ' ' | tr '\n' ';')
[ -z "$missing" ] || fail_preflight "libraries not found:$missing put the CUDA toolkit's, NCCL's and OpenMPI's lib directories on LD_LIBRARY_PATH"
ldd fpdt | grep -q libcudart || fail_preflight "./fpdt is a CPU-only build (no libcudart): build it with nvcc"
./build/fpdt_tests --gtest_list_tests --gtest_filter='GpuOps.*' | grep -q NormForward ||
    fail_preflight "build/fpdt_tests has no GPU tests: build it with nvcc"
timeout "$(limit 60)" ./fpdt bench --device gpu --size 256 --seq 256 --heads 2 --head-dim 64 --reps 1 > "$out/smoke.log" 2>&1 ||
    fail_preflight "a tiny bench on the GPU failed: $(tail -1 "$out/smoke.log")"
row preflight ok - "$(( SECONDS - t0 ))" "$how; $(head -1 "$out/smoke.log" | cut -d'|' -f2 | sed 's/^ *//; s/ *$//')"

# ---- GPU tests, one gtest filter a stage
gtest_stage() {  # name, filter, time limit
    local name=$1 filter=$2 lim t=$SECONDS log="$out/${1// /_}.log"
    lim=$(limit "$3")
    FPDT_EXPECT_GPU=1 timeout "$lim" ./build/fpdt_tests --gtest_filter="$filter" --gtest_color=no > "$log" 2>&1
    local rc=$? p f s
    p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*, listed below.*/\1/p' "$log" | tail -1)
    s=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*, listed below.*/\1/p' "$log" | tail -1)
    local res=ok note=""
    [ "$rc" = 124 ] && note="timed out after $lim s; "
    if [ "$rc" != 0 ] || [ "${f:-0}" != 0 ] || [ "${p:-0}" = 0 ]; then res=FAILED; fi
    local failed_names  # the first four failed tests by name, and how many more
    failed_names=$(grep -E "^\[  FAILED  \] [A-Za-z]" "$log" | sed 's/^\[  FAILED  \] //; s/, where .*//; s/ (.*//' | sort -u)
    [ -n "$failed_names" ] && note+="failed: $(echo "$failed_names" | head -4 | tr '\n' ' ')$(echo "$failed_names" |
        awk 'NR > 4 {n++} END {if (n) printf "and %d more ", n}')"
    [ -z "$failed_names" ] && [ "$res" = FAILED ] && note+="$(tail -1 "$log") "
    [ "${s:-0}" != 0 ] && note+="skipped: $(grep -A1 ': Skipped$' "$log" | grep -v -e ': Skipped$' -e '^--$' | sort -u | head -2 | tr '\n' ' ')"
    row "$name" "$res" "${p:-0}/${f:-0}/${s:-0}" "$(( SECONDS - t ))" "$note"
}
gtest_stage "op twins" 'GpuOps.*:Gpu.*:GpuA2a.*' 90
gtest_stage model 'Families/GpuModel.*:GpuModelHeads.*' 90

# ---- train: the same run on both backends, both precisions; memory after the first step
t=$SECONDS
args="--model small --seq 4096 --chunk-size 1024 --offload 1 --steps 4 --eval-every 0 --seed 7"
bad=0
for p in fp32 bf16; do
    timeout "$(limit 60)" ./fpdt train $args --precision $p --device gpu > "$out/train_gpu_$p.log" 2>&1 || bad=1
    OMP_NUM_THREADS=$(nproc) timeout "$(limit 60)" ./fpdt train $args --precision $p --device cpu > "$out/train_cpu_$p.log" 2>&1 || bad=1
done
worst=$(for p in fp32 bf16; do  # the largest relative difference over the steps both printed
    paste <(grep -o '^step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_gpu_$p.log" | awk '{print $5}') \
          <(grep -o '^step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_cpu_$p.log" | awk '{print $5}') |
        awk -v p=$p 'NF == 2 {d = ($1 - $2) / $2; if (d < 0) d = -d; if (d > m) m = d; n++}
                     END {if (n) printf "%s %.1e ", p, m; else printf "%s: no steps on both ", p}'
done)
grep -q "MORE than the headroom" "$out"/train_gpu_*.log && bad=1
row train "$([ $bad = 0 ] && echo ok || echo FAILED)" - "$(( SECONDS - t ))" "largest loss difference GPU vs CPU: $worst(fp32 to ~1e-5, bf16 to ~1e-3)"

gtest_stage "race stress" 'GpuStress.*' 150
gtest_stage ranks 'GpuTrain.*' 150
gtest_stage nccl 'GpuNccl.*' 90

# ---- bench
t=$SECONDS
timeout "$(limit 60)" ./fpdt bench --device gpu > "$out/bench.log" 2>&1
rc=$?
row bench "$([ $rc = 0 ] && echo ok || echo FAILED)" - "$(( SECONDS - t ))" "$(grep -o 'matmul bf16.*' "$out/bench.log" | head -1)"

# ---- the PyTorch peer, when its script is here (it is kept out of the repository)
if [ -f .peer/peer_pytorch.py ]; then
    t=$SECONDS
    timeout "$(limit 90)" python3 .peer/peer_pytorch.py attention --seq 8192 --heads 32 --kv-heads 32 --head-dim 128 > "$out/peer.log" 2>&1
    rc=$?
    row peer "$([ $rc = 0 ] && echo ok || echo FAILED)" - "$(( SECONDS - t ))" "$(tail -1 "$out/peer.log")"
fi

# ---- compute-sanitizer, on request
if [ "$sanitize" = 1 ]; then
    t=$SECONDS
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='GpuOps*:Gpu.*:Families/GpuModel*-GpuOps.AddInplacePast2e31' > "$out/memcheck.log" 2>&1; mc=$?
    timeout 180 compute-sanitizer --tool racecheck --error-exitcode 9 ./build/fpdt_tests --gtest_filter='Gpu.Attention*' > "$out/racecheck.log" 2>&1; rc=$?
    row sanitizer "$([ $mc = 0 ] && [ $rc = 0 ] && echo ok || echo FAILED)" - "$(( SECONDS - t ))" \
        "memcheck exit $mc, racecheck exit $rc ($(grep -h 'ERROR SUMMARY' "$out/memcheck.log" "$out/racecheck.log" | tr '\n' ' '))"
fi

# ---- the details worth keeping, then the table last
echo
for p in fp32 bf16; do
    echo "train $p (GPU | CPU): $args"
    paste -d'|' <(grep -o '^step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_gpu_$p.log") \
                 <(grep -o '^step [0-9]*/[0-9]* | loss [0-9.]*' "$out/train_cpu_$p.log" | sed 's/.*loss/ cpu loss/')
    grep -h -e 'memory after step' -e '^done:' "$out/train_gpu_$p.log"
done
grep -h -e '(.*s)$' "$out/race_stress.log" 2>/dev/null | grep -e '--offload'
grep -h '^trace:' "$out/ranks.log" 2>/dev/null
cat "$out/bench.log"
summary
for r in "${rows[@]}"; do [ "$(echo "$r" | cut -d'|' -f2)" = ok ] || exit 1; done
exit 0

#!/usr/bin/env bash
# fpdt's CPU backend against plain PyTorch on the CPU (bench/cpu_peer.py), in one run: the same
# llama model, one sequence per step, fp32, forward + backward + clipping + AdamW, the same number
# of threads on both sides. fpdt runs as `./fpdt train` does by default (one chunk up to 1024
# tokens; beyond that chunks of 1024 with the host store on); PyTorch without activation
# checkpointing. Prints one row per (model, seq): each side's median ms/step over the steps after
# the first, and fpdt / torch (below 1: fpdt is faster). Where --seq is longer than 1024 the last
# column is fpdt unchunked (--chunk-size S --offload 0: the same recompute, fewer and larger
# attention blocks, no copies).
#   bash bench/cpu_compare.sh [threads] [steps] ["model:seq model:seq ..."]
#   (defaults: 2 threads, 4 steps, "small:1024 small:4096 medium:1024 medium:4096")
# FPDT_CPU_SIMD=0|1|2 caps fpdt's instruction set (ops.cuh) and, unless they are set already,
# PyTorch's the same way: ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA (1: an
# AVX2 machine on an AVX-512 one). REPEAT=n runs each side n times, alternating, and keeps the
# fastest median of each (a machine shared with other jobs only ever slows a run down).
# Logs go to $OUT (default build/cpu_compare/).
set -uo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
steps=${2:-4}
cases=${3:-"small:1024 small:4096 medium:1024 medium:4096"}
repeat=${REPEAT:-1}
out=${OUT:-build/cpu_compare}
mkdir -p "$out"
fpdt=${FPDT:-./fpdt}  # the binary to measure
[ -x "$fpdt" ] || { echo "cpu_compare: $fpdt is not built (run make)"; exit 1; }
python3 -c 'import torch' 2>/dev/null || { echo "cpu_compare: no torch (pip install torch)"; exit 1; }
case "${FPDT_CPU_SIMD:-}" in
    0) caps=(default SSE4_2 SSE41) ;;
    1) caps=(avx2 AVX2 AVX2) ;;
    2) caps=(avx512 AVX512 AVX512_CORE) ;;
    *) caps=() ;;
esac
if [ ${#caps[@]} -gt 0 ]; then
    export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-${caps[0]}}
    export MKL_ENABLE_INSTRUCTIONS=${MKL_ENABLE_INSTRUCTIONS:-${caps[1]}}
    export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-${caps[2]}}
fi
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
fastest() { sort -g | head -1; }
echo "cpu_compare: $(date -u '+%F %H:%M UTC') | commit $(git rev-parse --short HEAD 2>/dev/null) | $(nproc) cores, $threads threads | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') | load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fpdt: ./fpdt train --device cpu --model M --seq S --steps $steps --eval-every 0 (OMP_NUM_THREADS=$threads); instruction set: $("$fpdt" bench --device cpu --size 8 --seq 8 --heads 1 --head-dim 2 --reps 1 2>/dev/null | sed -n 's/.*TFLOP\/s (\([^,]*\),.*/\1/p' | head -1) (FPDT_CPU_SIMD=${FPDT_CPU_SIMD:-unset})"
echo "unchunked: the same with --chunk-size S --offload 0"
echo "torch: python3 bench/cpu_peer.py --model M --seq S --steps $((steps - 1)) --threads $threads; ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-unset} MKL_ENABLE_INSTRUCTIONS=${MKL_ENABLE_INSTRUCTIONS:-unset} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-unset}"
[ "$repeat" -gt 1 ] && echo "each side $repeat times, alternating; the fastest median of each"
run_fpdt() {  # log, then extra flags; prints the median ms/step of the steps after the first
    rm -rf "$out/run"
    OMP_NUM_THREADS=$threads "$fpdt" train --device cpu --model "$m" --seq "$s" --steps "$steps" --eval-every 0 \
        --out "$out/run" "${@:2}" > "$1" 2>&1 || { echo "fpdt failed: see $1" >&2; tail -3 "$1" >&2; echo nan; return; }
    grep -o '[0-9.]* ms/step' "$1" | awk '{print $1}' | tail -n +2 | median
}
run_torch() {  # log; prints PyTorch's median ms/step
    OMP_NUM_THREADS=$threads python3 bench/cpu_peer.py --model "$m" --seq "$s" --steps $((steps - 1)) \
        --threads "$threads" > "$1" 2>&1 || { echo "cpu_peer.py failed: see $1" >&2; tail -3 "$1" >&2; echo nan; return; }
    grep -o 'torch ms/step [0-9.]*' "$1" | awk '{print $3}'
}
printf "%-8s %6s %14s %15s %7s %17s\n" model seq "fpdt ms/step" "torch ms/step" ratio "unchunked ms/step"
for c in $cases; do
    m=${c%%:*} s=${c##*:}
    fs="" ps="" us=""
    for r in $(seq "$repeat"); do
        fs+="$(run_fpdt "$out/fpdt_${m}_${s}_$r.log") "
        ps+="$(run_torch "$out/torch_${m}_${s}_$r.log") "
        [ "$s" -gt 1024 ] && us+="$(run_fpdt "$out/fpdt_${m}_${s}_unchunked_$r.log" --chunk-size "$s" --offload 0) "
    done
    f=$(echo $fs | tr ' ' '\n' | fastest) p=$(echo $ps | tr ' ' '\n' | fastest)
    u=-
    [ -n "$us" ] && u=$(printf "%.1f" "$(echo $us | tr ' ' '\n' | fastest)")
    { [ "$f" = nan ] || [ "$p" = nan ]; } && { echo "$m $s: a run failed (logs in $out)"; continue; }
    printf "%-8s %6s %14.1f %15.1f %7.2f %17s\n" "$m" "$s" "$f" "$p" "$(awk -v a="$f" -v b="$p" 'BEGIN {print a / b}')" "$u"
done

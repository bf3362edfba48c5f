#!/usr/bin/env bash
# fpdt's CPU backend against plain PyTorch on the CPU (bench/cpu_peer.py), in one run: the same
# llama model, one sequence per step, fp32, forward + backward + clipping + AdamW, unchunked
# (fpdt: --seq tokens in one chunk, offload off; PyTorch: no activation checkpointing), the same
# number of threads on both sides. Prints one row per (model, seq): each side's median ms/step
# over the steps after the first, and fpdt / torch (below 1: fpdt is faster). Where --seq is
# longer than 1024 the last column is fpdt again as `./fpdt train` runs by default: chunks of
# 1024 tokens with the host store on (the same recompute; more, smaller attention blocks).
#   bash bench/cpu_compare.sh [threads] [steps] ["model:seq model:seq ..."]
#   (defaults: 2 threads, 4 steps, "small:1024 small:4096 medium:1024 medium:4096")
# Logs go to $OUT (default build/cpu_compare/).
set -uo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
steps=${2:-4}
cases=${3:-"small:1024 small:4096 medium:1024 medium:4096"}
out=${OUT:-build/cpu_compare}
mkdir -p "$out"
fpdt=${FPDT:-./fpdt}  # the binary to measure
[ -x "$fpdt" ] || { echo "cpu_compare: $fpdt is not built (run make)"; exit 1; }
python3 -c 'import torch' 2>/dev/null || { echo "cpu_compare: no torch (pip install torch)"; exit 1; }
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "cpu_compare: $(date -u '+%F %H:%M UTC') | commit $(git rev-parse --short HEAD 2>/dev/null) | $(nproc) cores, $threads threads | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "fpdt: ./fpdt train --device cpu --model M --seq S --chunk-size S --offload 0 --steps $steps --eval-every 0 (OMP_NUM_THREADS=$threads)"
echo "chunked: the same without --chunk-size and --offload (S > 1024: chunks of 1024, offload on)"
echo "torch: python3 bench/cpu_peer.py --model M --seq S --steps $((steps - 1)) --threads $threads"
run_fpdt() {  # log, then extra flags; prints the median ms/step of the steps after the first
    rm -rf "$out/run"
    OMP_NUM_THREADS=$threads "$fpdt" train --device cpu --model "$m" --seq "$s" --steps "$steps" --eval-every 0 \
        --out "$out/run" "${@:2}" > "$1" 2>&1 || { echo "fpdt failed: see $1" >&2; tail -3 "$1" >&2; echo nan; return; }
    grep -o '[0-9.]* ms/step' "$1" | awk '{print $1}' | tail -n +2 | median
}
printf "%-8s %6s %14s %15s %7s %17s\n" model seq "fpdt ms/step" "torch ms/step" ratio "chunked ms/step"
for c in $cases; do
    m=${c%%:*} s=${c##*:}
    log="$out/fpdt_${m}_$s.log"
    f=$(run_fpdt "$log" --chunk-size "$s" --offload 0)
    [ "$f" = nan ] && continue
    plog="$out/torch_${m}_$s.log"
    OMP_NUM_THREADS=$threads python3 bench/cpu_peer.py --model "$m" --seq "$s" --steps $((steps - 1)) --threads "$threads" \
        > "$plog" 2>&1 || { echo "cpu_peer.py failed: see $plog"; tail -3 "$plog"; continue; }
    p=$(grep -o 'torch ms/step [0-9.]*' "$plog" | awk '{print $3}')
    chunked=-
    [ "$s" -gt 1024 ] && chunked=$(run_fpdt "$out/fpdt_${m}_${s}_chunked.log")
    printf "%-8s %6s %14.1f %15.1f %7.2f %17s\n" "$m" "$s" "$f" "$p" "$(awk -v a="$f" -v b="$p" 'BEGIN {print a / b}')" "$chunked"
done

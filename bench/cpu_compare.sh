#!/usr/bin/env bash
# fpdt's CPU backend against plain PyTorch on the CPU (bench/cpu_peer.py), in one run: the same
# llama model, one sequence per step, fp32, forward + backward + clipping + AdamW, unchunked
# (fpdt: --seq tokens in one chunk, offload off; PyTorch: no activation checkpointing), the same
# number of threads on both sides. Prints one row per (model, seq): each side's median ms/step
# over the steps after the first, and fpdt / torch (below 1: fpdt is faster).
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
echo "fpdt: ./fpdt train --device cpu --model M --seq S --steps $steps --eval-every 0 (OMP_NUM_THREADS=$threads)"
echo "torch: python3 bench/cpu_peer.py --model M --seq S --steps $((steps - 1)) --threads $threads"
printf "%-8s %6s %14s %15s %7s\n" model seq "fpdt ms/step" "torch ms/step" ratio
for c in $cases; do
    m=${c%%:*} s=${c##*:}
    log="$out/fpdt_${m}_$s.log"
    OMP_NUM_THREADS=$threads "$fpdt" train --device cpu --model "$m" --seq "$s" --steps "$steps" --eval-every 0 > "$log" 2>&1 \
        || { echo "fpdt failed: see $log"; tail -3 "$log"; continue; }
    f=$(grep -o '[0-9.]* ms/step' "$log" | awk '{print $1}' | tail -n +2 | median)
    plog="$out/torch_${m}_$s.log"
    OMP_NUM_THREADS=$threads python3 bench/cpu_peer.py --model "$m" --seq "$s" --steps $((steps - 1)) --threads "$threads" \
        > "$plog" 2>&1 || { echo "cpu_peer.py failed: see $plog"; tail -3 "$plog"; continue; }
    p=$(grep -o 'torch ms/step [0-9.]*' "$plog" | awk '{print $3}')
    printf "%-8s %6s %14.1f %15.1f %7.2f\n" "$m" "$s" "$f" "$p" "$(awk -v a="$f" -v b="$p" 'BEGIN {print a / b}')"
done

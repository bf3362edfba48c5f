#!/usr/bin/env bash
# Packed documents (--doc-mask 1) on the CPU: ms/step of a sequence of many short documents
# against the same sequence length as one document, both masked. passkey:docs:L packs passkey
# documents of mean length L (uniform in [L/2, 3L/2]); passkey is one document (its only BOS is
# its first token), so the mask there skips nothing. Prints each side's median ms/step over the
# steps after the first, their ratio, and the share of (query chunk, kv chunk) attention blocks
# the documents keep (from the step lines). Inside the kept blocks whole key tiles before a
# row's document are skipped too, so the work saved is more than the blocks show.
#   bash bench/docmask.sh [seq] [chunk] [doc-len] [steps] [model] [threads]
#   (defaults: 16384 2048 1024 4 small 2)
# Logs go to $OUT (default build/docmask/).
set -uo pipefail
cd "$(dirname "$0")/.."
seq=${1:-16384}
chunk=${2:-2048}
len=${3:-1024}
steps=${4:-4}
model=${5:-small}
threads=${6:-2}
out=${OUT:-build/docmask}
mkdir -p "$out"
fpdt=${FPDT:-./fpdt}
[ -x "$fpdt" ] || { echo "docmask: $fpdt is not built (run make)"; exit 1; }
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
args="train --device cpu --model $model --seq $seq --chunk-size $chunk --steps $steps --eval-every 0 --doc-mask 1"
echo "docmask: $(date -u '+%F %H:%M UTC') | commit $(git rev-parse --short HEAD 2>/dev/null) | $(nproc) cores, $threads threads | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "command: OMP_NUM_THREADS=$threads $fpdt $args --data passkey:docs:$len  (and --data passkey)"
run() {  # log, data; prints the median ms/step of the steps after the first
    OMP_NUM_THREADS=$threads "$fpdt" $args --data "$2" > "$1" 2>&1 || { echo "fpdt failed: see $1" >&2; tail -3 "$1" >&2; echo nan; return; }
    grep '^step ' "$1" | tail -n +2 | sed 's/.* | \([0-9.]*\) ms\/step.*/\1/' | median
}
docs=$(run "$out/docs.log" "passkey:docs:$len")
one=$(run "$out/one.log" passkey)
skipped=$(grep '^step ' "$out/docs.log" | tail -1 | sed 's/.*tok, \([0-9.]*\)% of blocks skipped.*/\1/')
mean=$(grep '^step ' "$out/docs.log" | tail -1 | sed 's/.*docs [0-9]*, mean \([0-9]*\) tok.*/\1/')
printf "%-28s %12s\n" "data (seq $seq, chunk $chunk)" "ms/step"
printf "%-28s %12s\n" "one document (passkey)" "$one"
printf "%-28s %12s\n" "documents, mean $mean tok" "$docs"
awk -v a="$docs" -v b="$one" -v s="$skipped" 'BEGIN {printf "ratio (documents / one): %.3f | attention blocks kept: %.1f%% (%.1f%% skipped)\n", a / b, 100 - s, s}'

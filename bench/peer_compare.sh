#!/usr/bin/env bash
# fpdt against the PyTorch peers on the same GPU, in one run: a training step of the peer's Llama (preset llama-peer: d 2048, 4 layers, 16 heads,
# 4 kv heads, ffn 5632, vocab 32000) at growing sequence lengths, and causal attention alone.
# The peers are a PyTorch script, peer_pytorch.py, kept outside this repository: put a copy in
# .peer/ (git ignores it) to run them; without it only fpdt's side runs.
#   bash bench/peer_compare.sh [max_seq]        (default 131072)
# Both sides run bf16 (fpdt's --precision default on the GPU). fpdt's attention kernels are the
# simple first pair, not tensor-core flash kernels yet: expect the attention-bound sizes to lag.
set -uo pipefail
cd "$(dirname "$0")/.."
max=${1:-131072}
out=${OUT:-build/bench}
mkdir -p "$out"
make -j"$(nproc)" fpdt > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
echo "date $(date -u +%F) commit $(git rev-parse --short HEAD 2>/dev/null)"
for s in 32768 65536 131072 262144; do
    [ "$s" -gt "$max" ] && break
    timeout 300 ./fpdt train --device gpu --model llama-peer --data passkey --seq "$s" --chunk-size 16384 --offload 1 \
        --steps 3 --eval-every 0 > "$out/fpdt_$s.log" 2>&1
    echo "fpdt S=$s: $(grep -o '[0-9.]* tok/s | [0-9.]* ms/step' "$out/fpdt_$s.log" | tail -1) | $(grep -o 'peak device memory.*' "$out/fpdt_$s.log")"
done
if [ -f .peer/peer_pytorch.py ]; then
    PYTHONUNBUFFERED=1 timeout 300 python3 .peer/peer_pytorch.py train --dim 2048 --layers 4 --heads 16 --kv-heads 4 \
        --ffn 5632 --vocab 32000 --seq 32768 --max-seq "$max" 2>&1 | grep -E "peer=|device="
    PYTHONUNBUFFERED=1 timeout 120 python3 .peer/peer_pytorch.py attention --seq 32768 --heads 32 --kv-heads 32 --head-dim 128 2>&1 | grep -E "peer="
else
    echo "no .peer/peer_pytorch.py: put the PyTorch peer script there to run the peers"
fi

#!/usr/bin/env python3
"""
Writes the seed corpora for `make fuzz`: a few small VALID inputs, so that the fuzzers start past
the magic, size and checksum checks instead of having to discover them.

    python3 test/fuzz_seeds.py DIR      writes DIR/shard/* and DIR/checkpoint/*

Formats: test/fuzz_shard.cpp (2 bytes: vocab choice, seq; then an llm.c shard or text, as in
data/data.h) and checkpoint.h (format 2's manifest.txt: `key value` lines, FNV-1a 64 end line).
"""
import os
import struct
import sys


def fnv1a(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard(magic, version, fmt, tokens):
    header = struct.pack("<3i", magic, version, len(tokens)) + bytes(1024 - 12)
    return header + struct.pack("<%d%s" % (len(tokens), fmt), *tokens)


def n_params(gpt, L, d, H, KV, D, F, V, tied):
    """model.h's param_table, counted."""
    q3, f2 = (H + 2 * KV) * D, F if gpt else 2 * F
    layer = d + q3 * d + d * H * D + d + f2 * d + d * F
    if gpt:
        layer += d + q3 + d + d + f2 + d
    return V * d + L * layer + d + (d if gpt else 0) + (0 if (gpt or tied) else V * d)


def manifest(family, shards):
    gpt = family == "gpt"
    L, d, H, KV, D, F, V = 1, 8, 2, (2 if gpt else 1), 4, 16, 260
    n = n_params(gpt, L, d, H, KV, D, F, V, False)
    lines = ["fpdt-checkpoint 2", "step 3", "total_steps 10", "seed 1337", "model.name " + family + "-seed",
             "model.family " + family, "model.n_layer %d" % L, "model.d_model %d" % d, "model.n_head %d" % H,
             "model.n_kv_head %d" % KV, "model.head_dim %d" % D, "model.ffn %d" % F, "model.vocab %d" % V,
             "model.rope_theta 10000", "model.norm_eps 9.99999975e-06", "model.tie_embeddings 0",
             "model.rope_scaling none", "model.rope_factor 1", "model.rope_low_freq_factor 1",
             "model.rope_high_freq_factor 4", "model.rope_original_max_pos 8192", "data.seq 64",
             "data.source passkey", "n_params %d" % n, "optimizer 1", "shards %d" % shards]
    k = (n + shards - 1) // shards
    for r in range(shards):
        lines.append("shard %d %d %d %016x" % (r, min(n, r * k), min(n, (r + 1) * k), fnv1a(b"%d" % r)))
    text = "".join(l + "\n" for l in lines).encode()
    return text + b"end %016x\n" % fnv1a(text)


def main(out):
    seeds = {
        # vocab choice 2 = 50257, seq 8: a GPT-2 shard (uint16 tokens)
        "shard/u16": bytes([2, 8]) + shard(20240520, 1, "H", [(i * 977) % 50257 for i in range(40)]),
        # vocab choice 3 = 128256, seq 5: a Llama 3 shard (uint32 tokens)
        "shard/u32": bytes([3, 5]) + shard(20240801, 7, "I", [(i * 104729) % 128256 for i in range(20)]),
        # vocab choice 1 = 260 (byte-level), seq 16: plain text
        "shard/text": bytes([1, 16]) + b"the grass is green. the sky is blue. here we go.\n",
    }
    # checkpoint format 2 manifests (checkpoint.h): a small llama and a gpt, one and three shards
    for name, fam, shards in (("llama", "llama", 1), ("gpt", "gpt", 3)):
        seeds["checkpoint/" + name] = manifest(fam, shards)
    for name, data in seeds.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 test/fuzz_seeds.py DIR")
    main(sys.argv[1])

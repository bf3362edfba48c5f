#!/usr/bin/env python3
"""
Writes the seed corpora for `make fuzz`: a few small VALID inputs, so that the fuzzers start past
the magic, size and checksum checks instead of having to discover them.

    python3 test/fuzz_seeds.py DIR      writes DIR/shard/* and DIR/checkpoint/*

Formats: test/fuzz_shard.cpp (2 bytes: vocab choice, seq; then an llm.c shard or text, as in
data/data.h) and checkpoint.h (CkptHeader, then weights, m and v as fp32, FNV-1a 64 checksum).
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


def main(out):
    seeds = {
        # vocab choice 2 = 50257, seq 8: a GPT-2 shard (uint16 tokens)
        "shard/u16": bytes([2, 8]) + shard(20240520, 1, "H", [(i * 977) % 50257 for i in range(40)]),
        # vocab choice 3 = 128256, seq 5: a Llama 3 shard (uint32 tokens)
        "shard/u32": bytes([3, 5]) + shard(20240801, 7, "I", [(i * 104729) % 128256 for i in range(20)]),
        # vocab choice 1 = 260 (byte-level), seq 16: plain text
        "shard/text": bytes([1, 16]) + b"the grass is green. the sky is blue. here we go.\n",
    }
    n = 4  # parameters: weights, m and v of 4 floats each
    payload = struct.pack("<%df" % (3 * n), *[0.25 * i - 1.0 for i in range(3 * n)])
    def header_with(checksum):
        return struct.pack("<8s32s8i9Q", b"FPDTCKP1", b"tiny", 0, 1, 4, 1, 1, 4, 260, 0,
                           n, 1, 1337, 10, checksum, 0, 0, 0, 0)
    header = header_with(fnv1a(header_with(0) + payload))  # the checksum covers the header too
    assert len(header) == 144  # sizeof(CkptHeader)
    seeds["checkpoint/valid"] = header + payload
    for name, data in seeds.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 test/fuzz_seeds.py DIR")
    main(sys.argv[1])

#!/usr/bin/env python3
"""
Turns text files into one llm.c token shard with byte-level tokens, for fpdt.

    python3 data/make_shard.py OUT.bin FILE...

Tokens are the bytes of the files (0..255), with BOS (256) between files, exactly as fpdt
tokenizes plain text itself (data/data.h), so a shard and its text give the same stream.
Empty files are skipped. Train with a vocab of at least 260 (fpdt's byte-level vocab).

Format (llm.c, dev/data/data_common.py): a header of 256 little-endian int32
(magic 20240520, version 1, number of tokens), then the tokens as little-endian uint16.
No dependencies beyond the standard library.
"""
import array
import os
import sys

MAGIC, VERSION = 20240520, 1  # llm.c's GPT-2 format: uint16 tokens
BOS = 256  # data/data.h: TOK_BOS


def main(argv):
    if len(argv) < 3:
        sys.exit("usage: python3 data/make_shard.py OUT.bin FILE...")
    out, inputs = argv[1], argv[2:]
    if not out.endswith(".bin"):
        sys.exit(f"make_shard: {out}: the output must end in .bin (fpdt reads .bin files as shards)")
    for path in inputs:
        if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            sys.exit(f"make_shard: {out} is also an input")

    tokens = array.array("H")  # uint16
    used = 0
    for path in inputs:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            sys.exit(f"make_shard: {path}: cannot read ({e.strerror})")
        if not data:
            continue  # empty files are skipped, as fpdt does
        if used > 0:
            tokens.append(BOS)
        tokens.extend(data)  # each byte becomes one uint16 token
        used += 1
    if len(tokens) == 0:
        sys.exit("make_shard: all inputs are empty; nothing to write")
    if len(tokens) >= 2**31:
        sys.exit(f"make_shard: {len(tokens)} tokens is too many for one shard (the header count is an int32)")

    header = array.array("i", [0] * 256)  # int32
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    if sys.byteorder == "big":  # the format is little-endian
        header.byteswap()
        tokens.byteswap()
    tmp = out + ".tmp"  # write then rename: never a half-written shard under the real name
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    os.replace(tmp, out)
    print(f"{out}: {len(tokens)} tokens from {used} file(s), {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main(sys.argv)

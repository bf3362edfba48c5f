#!/usr/bin/env python3
"""
Turns text files into one llm.c token shard with byte-level tokens, for fpdt.

    python3 data/make_shard.py OUT.bin FILE...

Tokens are the bytes of the files (0..255), with BOS (256) between files, exactly as fpdt
tokenizes plain text itself (data/data.h), so a shard and its text give the same stream.
Empty files are skipped. Train with a vocab of at least 260 (fpdt's byte-level vocab).

Format (llm.c, dev/data/data_common.py): a header of 256 little-endian int32
(magic 20240520, version 1, number of tokens), then the tokens as little-endian uint16.
No dependencies beyond the standard library (and data/tools_common.py beside it).
"""
import array
import os
import sys

# data/ also holds tokenize.py, named like the standard library module that the library itself
# imports: data/ goes last on the module path, behind the standard library (for tools_common)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]
from tools_common import check_replaceable, commit, fail, new_temp_file, open_input, run  # noqa: E402

MAGIC, VERSION = 20240520, 1  # llm.c's GPT-2 format: uint16 tokens
BOS = 256  # data/data.h: TOK_BOS


def main(argv):
    """Any failure is one line `make_shard.py: ...` (tools_common.run); inputs must be regular
    files; the shard is written as OUT.bin.tmp (removed on failure) and renamed into place."""
    if len(argv) < 3:
        fail("usage: python3 data/make_shard.py OUT.bin FILE...")
    out, inputs = argv[1], argv[2:]
    if not out.endswith(".bin"):
        fail(f"{out}: the output must end in .bin (fpdt reads .bin files as shards)")
    for path in inputs:
        if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            fail(f"{out} is also an input")
    check_replaceable(out)

    tokens = array.array("H")  # uint16
    used = 0
    for path in inputs:
        with open_input(path, "rb") as f:
            try:
                data = f.read()
            except OSError as e:
                fail(f"{path}: cannot read ({e.strerror})")
        if not data:
            continue  # empty files are skipped, as fpdt does
        if used > 0:
            tokens.append(BOS)
        tokens.extend(data)  # each byte becomes one uint16 token
        used += 1
    if len(tokens) == 0:
        fail("all inputs are empty; nothing to write")
    if len(tokens) >= 2**31:
        fail(f"{len(tokens)} tokens is too many for one shard (the header count is an int32)")

    header = array.array("i", [0] * 256)  # int32
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    if sys.byteorder == "big":  # the format is little-endian
        header.byteswap()
        tokens.byteswap()
    f = new_temp_file(out + ".tmp")  # write then rename: never a half-written shard under the real name
    f.write(header.tobytes())
    f.write(tokens.tobytes())
    f.close()
    commit(out + ".tmp", out)
    print(f"{out}: {len(tokens)} tokens from {used} file(s), {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    run("make_shard.py", main)

#!/usr/bin/env python3
"""
Text to an llm.c token shard with a real tokenizer (Hugging Face `tokenizers`), and back.

    python3 data/tokenize.py --tokenizer TOK OUT.bin FILE_OR_GLOB...
        every file is one document: BOS, its tokens, EOS. Files and globs are read in the order
        given (a glob's matches sorted), streamed in pieces of --piece-mb (never whole in memory),
        with a progress line on stderr. OUT.bin: llm.c's uint32 format (magic 20240801,
        version 7, a 256 x int32 header, then the tokens), as fpdt's --data reads it.
    python3 data/tokenize.py --tokenizer TOK --encode TEXT
        prints BOS and the ids of TEXT, comma-separated: a --prompt-ids for ./fpdt sample
    python3 data/tokenize.py --tokenizer TOK --decode IDS
        IDS: ids separated by spaces or commas, or - to read them from stdin (what
        ./fpdt sample prints for a model with a real tokenizer); prints the text

TOK is a tokenizer.json or a Hugging Face model directory holding one. BOS and EOS are the
tokenizer_config.json's bos_token and eos_token when the directory has one, else the first of
the usual names the vocabulary holds (<|begin_of_text|>, <s>, ...; <|end_of_text|>, </s>,
<|endoftext|>, ...); --bos/--eos TOKEN name them, and `none` leaves one out.

Text pieces are cut after a newline followed by a non-space character, so a byte-level BPE
(Llama 3, GPT-2 style) tokenizes each document as it would whole; a SentencePiece-style
tokenizer that marks the start of its input may differ at the cuts (one per --piece-mb).
Needs the `tokenizers` package (pip install tokenizers). Every problem is one line on stderr and a
non-zero exit (--debug adds the traceback); the shard is written as OUT.bin.tmp, removed on any
failure, and every input must be a regular file (data/tools_common.py).
"""
import os
import sys

# This file is named like the standard library's tokenize module, which the library itself
# imports (linecache, inspect): drop this directory from the module path before anything does.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(_HERE)  # last, behind the standard library: for tools_common alone

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

from tools_common import check_regular, check_replaceable, commit, fail, new_temp_file, open_input, run  # noqa: E402

MAGIC, VERSION = 20240801, 7  # llm.c's Llama 3 format: uint32 tokens (data/data.h)
HEADER_INTS = 256
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[CLS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>", "[SEP]")


def load_tokenizer(tok):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("needs the tokenizers package (pip install tokenizers)")
    path = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
    if not os.path.lexists(path):
        fail("--tokenizer %s: no %s" % (tok, "tokenizer.json in that directory" if os.path.isdir(tok) else "such file"))
    check_regular(path)  # a FIFO would block the library's read
    try:
        t = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception with its parser's message
        fail("--tokenizer %s: not a tokenizer.json (%s)" % (path, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return t, os.path.dirname(os.path.abspath(path))


def special_id(t, tok_dir, which, given):
    """The id of BOS or EOS: --bos/--eos, else tokenizer_config.json, else a usual name; None if none."""
    if given is not None:
        if given == "none":
            return None
        i = t.token_to_id(given)
        if i is None:
            fail("--%s %s: the tokenizer has no such token" % (which, given))
        return i
    cfg = os.path.join(tok_dir, "tokenizer_config.json")
    if os.path.lexists(cfg):
        with open_input(cfg, "rb", max_bytes=64 << 20) as f:
            raw = f.read()
        try:
            v = json.loads(raw)
        except ValueError:
            v = None
        v = v.get(which + "_token") if isinstance(v, dict) else None
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and t.token_to_id(v) is not None:
            return t.token_to_id(v)
    for name in BOS_NAMES if which == "bos" else EOS_NAMES:
        if t.token_to_id(name) is not None:
            return t.token_to_id(name)
    return None


def read_text(f, path, n):
    """Up to n characters of f; a read error or text that is not UTF-8 fails naming the input."""
    try:
        return f.read(n)
    except UnicodeDecodeError as e:
        fail("%s: not UTF-8 text (byte %d of a piece)" % (path, e.start))
    except OSError as e:
        fail("%s: cannot read (%s)" % (path, e.strerror))


def pieces(path, piece_bytes):
    """The text of a file in pieces of about piece_bytes, cut after a newline that a non-space follows."""
    cut_at = re.compile(r"\n(?=\S)")
    rest = ""
    with open_input(path, "r", encoding="utf-8", errors="strict", newline="") as f:
        while True:
            block = read_text(f, path, piece_bytes)
            if not block:
                break
            text = rest + block
            cut = None
            for m in cut_at.finditer(text, max(0, len(text) - piece_bytes // 2)):
                cut = m.end()
            if cut is None:  # no cut in the second half: keep reading (bounded by the file's lines)
                rest = text
                if len(rest) < 16 * piece_bytes:
                    continue
                cut = len(rest)
            yield text[:cut]
            rest = text[cut:]
    if rest:
        yield rest


def expand(inputs):
    files = []
    for p in inputs:
        if any(ch in p for ch in "*?["):
            m = sorted(glob.glob(p))
            if not m:
                fail("no files match '%s'" % p)
            files += m
        else:
            files.append(p)
    for p in files:
        check_regular(p)  # a FIFO among the inputs is one line, not a hang
    return files


def cmd_shard(t, bos, eos, out, inputs, piece_mb):
    if not out.endswith(".bin"):
        fail("%s: the output must end in .bin (fpdt reads .bin files as shards)" % out)
    files = expand(inputs)
    for p in files:
        if os.path.exists(out) and os.path.samefile(out, p):
            fail("%s is also an input" % out)
    check_replaceable(out)
    total_bytes = sum(os.path.getsize(p) for p in files)
    n, done_bytes, last, t0 = 0, 0, 0.0, time.time()
    tty = sys.stderr.isatty()

    def progress(final=False):
        msg = "tokenize: %d/%d files, %.1f/%.1f MB, %d tokens, %.1f MB/s" % (
            nfiles, len(files), done_bytes / 1e6, total_bytes / 1e6, n, done_bytes / 1e6 / max(time.time() - t0, 1e-9))
        sys.stderr.write(("\r" + msg + ("\n" if final else "")) if tty else msg + "\n")
        sys.stderr.flush()

    nfiles = 0
    f = new_temp_file(out + ".tmp")  # removed on any failure (tools_common.run)
    f.write(b"\0" * (4 * HEADER_INTS))
    for p in files:
        if bos is not None:
            f.write(struct.pack("<I", bos))
            n += 1
        for text in pieces(p, piece_mb << 20):
            ids = t.encode(text, add_special_tokens=False).ids
            f.write(struct.pack("<%dI" % len(ids), *ids))
            n += len(ids)
            done_bytes += len(text.encode("utf-8"))
            if time.time() - last > 2:
                last = time.time()
                progress()
        if eos is not None:
            f.write(struct.pack("<I", eos))
            n += 1
        nfiles += 1
    if n == 0:
        fail("all inputs are empty and there is no BOS/EOS: nothing to write")
    if n >= 2 ** 31:
        fail("%d tokens is too many for one shard (the header count is an int32): split the inputs" % n)
    f.seek(0)
    header = [0] * HEADER_INTS
    header[0], header[1], header[2] = MAGIC, VERSION, n
    f.write(struct.pack("<%di" % HEADER_INTS, *header))
    f.close()
    commit(out + ".tmp", out)
    progress(final=True)
    print("%s: %d tokens from %d file(s) (vocab %d, BOS %s, EOS %s)" % (out, n, len(files), t.get_vocab_size(),
                                                                        bos, eos))


def parse_ids(s):
    ids = []
    for w in re.split(r"[\s,]+", s.strip()):
        if not w:
            continue
        if not re.fullmatch(r"[0-9]+", w):
            fail("--decode: '%s' is not a token id" % w[:40])
        ids.append(int(w))
    return ids


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other failure
        fail(message)


def main(argv):
    ap = Parser(description=__doc__.splitlines()[1].strip())
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json, or a Hugging Face model directory")
    ap.add_argument("--bos", help="BOS token (default: the tokenizer's); none: no BOS")
    ap.add_argument("--eos", help="EOS token (default: the tokenizer's); none: no EOS")
    ap.add_argument("--piece-mb", type=int, default=4, help="text read and tokenized at once, in MiB (default 4)")
    ap.add_argument("--encode", metavar="TEXT", help="print BOS and the ids of TEXT, comma-separated")
    ap.add_argument("--decode", metavar="IDS", help="print the text of ids (spaces or commas; - reads stdin)")
    ap.add_argument("paths", nargs="*", metavar="OUT.bin FILE", help="the shard to write, then the inputs")
    ap.add_argument("--debug", action="store_true", help="a failure prints its Python traceback too")
    a = ap.parse_args(argv[1:])
    t, tok_dir = load_tokenizer(a.tokenizer)
    if a.decode is not None:
        ids = parse_ids(sys.stdin.read() if a.decode == "-" else a.decode)
        bad = [i for i in ids if i >= t.get_vocab_size()]
        if bad:
            fail("--decode: id %d is outside the vocab of %d" % (bad[0], t.get_vocab_size()))
        sys.stdout.write(t.decode(ids, skip_special_tokens=False) + "\n")
        return
    bos = special_id(t, tok_dir, "bos", a.bos)
    eos = special_id(t, tok_dir, "eos", a.eos)
    if a.encode is not None:
        ids = ([bos] if bos is not None else []) + t.encode(a.encode, add_special_tokens=False).ids
        print(",".join(map(str, ids)))
        return
    if len(a.paths) < 2:
        fail("needs OUT.bin and at least one input file (or --encode / --decode)")
    if not 1 <= a.piece_mb <= 1024:
        fail("--piece-mb %d: must be from 1 to 1024" % a.piece_mb)
    cmd_shard(t, bos, eos, a.paths[0], a.paths[1:], a.piece_mb)


if __name__ == "__main__":
    run("tokenize.py", main)

#!/usr/bin/env python3
"""
Hugging Face Llama-architecture models in and out of fpdt.

    python3 data/hf.py import HF_DIR OUT_DIR [--name NAME]
        HF_DIR: config.json and model.safetensors (or model-0000N-of-0000M.safetensors with
        model.safetensors.index.json). Writes OUT_DIR/ckpt_00000000/, an fpdt checkpoint
        (format 2) at step 0 holding the weights only; `./fpdt train --init OUT_DIR` starts
        from it with the model configuration it carries.
    python3 data/hf.py export CKPT HF_OUT_DIR
        CKPT: a ckpt_<step> directory, or a directory holding them (its newest valid one is
        used). Writes HF_OUT_DIR/config.json and model.safetensors (fp32), which
        transformers.AutoModelForCausalLM.from_pretrained loads.

Needs numpy and safetensors only (pip install numpy safetensors). Every problem is one line
on stderr and a non-zero exit (--debug adds the traceback); nothing half-written is left
(data/tools_common.py). Every config.json and manifest field is type- and range-checked against
fpdt's own limits before anything is read or allocated, and every input must be a regular file.

The mapping (fpdt's names: model.h param_table, in that order):
    wte            model.embed_tokens.weight                     (V, d)
    h.L.ln1_w      model.layers.L.input_layernorm.weight         (d)
    h.L.qkv_w      q_proj, k_proj, v_proj stacked by rows        ((H + 2 Hkv) D, d)
    h.L.o_w        self_attn.o_proj.weight                       (d, H D)
    h.L.ln2_w      post_attention_layernorm.weight               (d)
    h.L.fc_w       mlp.gate_proj, mlp.up_proj stacked by rows    (2 F, d): fpdt's SwiGLU is [gate | up]
    h.L.proj_w     mlp.down_proj.weight                          (d, F)
    lnf_w          model.norm.weight                             (d)
    lm_head        lm_head.weight (absent when tied)             (V, d)
RoPE: Hugging Face rotates value i of a head with value i + D/2 (rotate_half); fpdt rotates 2i
with 2i + 1. The rows of q_proj and k_proj are permuted within each head on import (fpdt row
2i = HF row i, fpdt row 2i + 1 = HF row i + D/2) and back on export, as llama.cpp's converter
does; q.k is unchanged by a permutation applied to both, so the models compute the same thing.

Checkpoint format 2 (the fpdt repository's shared spec): OUT/ckpt_<step>/ with shard_<r>.bin
(little-endian fp32 params[lo:hi], then AdamW m and v when `optimizer 1`) and manifest.txt
(`key value` lines in a fixed order, the shards' FNV-1a 64 checksums, and an `end` line with
the checksum of every byte before it). Written into ckpt_<step>.tmp/, fsynced, then renamed.
"""
import json
import math
import os
import re
import stat
import sys

# data/ also holds tokenize.py, named like the standard library module that the library itself
# imports (linecache, inspect): keep this directory off the module path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(_HERE)  # last, behind the standard library: for tools_common alone
from tools_common import (Failure, Output, check_memory, check_regular, check_replaceable, commit, fail,  # noqa: E402
                          fsync_dir, kind, make_dir, new_temp_dir, new_temp_file, open_input, run)

try:
    import numpy as np
except ImportError:
    sys.exit("hf.py: needs numpy (pip install numpy)")

# ----------------------------------------------------------------------------
# FNV-1a 64, vectorized. h = (h ^ b) * P for each byte b. XOR with a byte changes only the low
# byte l of h: h ^ b = h + d with d = (l ^ b) - l, so h_n = h_0 P^n + sum_k d_k P^(n-k) (mod 2^64),
# a dot product, once every l_k is known. The low bytes form their own chain,
# l_{k+1} = ((l_k ^ b_k) * (P mod 256)) mod 256, and because P is odd bit j of a product depends
# only on bits <= j of the operand: bit j of l_{k+1} = bit j of l_k ^ (bit j of b_k ^ G_j(low j
# bits of l_k ^ b_k)), with G_j(y) = bit j of y * (P mod 256). So bit 0 of every l_k is a prefix
# XOR, then bit 1 given bit 0, and so on: eight prefix XORs per block instead of a Python loop per
# byte (which runs at ~6 MB/s; this several times faster).

FNV_OFFSET, FNV_PRIME, MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
_LOW = FNV_PRIME & 0xFF
_G = [np.array([((y * _LOW) >> j) & 1 for y in range(256)], dtype=np.uint8) for j in range(8)]
_BLOCK = 1 << 22
_POW = None  # P^1 .. P^BLOCK mod 2^64


def prefix_xor(e):
    """Inclusive prefix XOR of a 0/1 uint8 array, 64 values per machine word: within a word by
    shifts (bit i of a little-endian word is value i), across words by one XOR-accumulate of the
    words' parities."""
    n = len(e)
    bits = np.packbits(e, bitorder="little")
    bits = np.concatenate([bits, np.zeros((-len(bits)) % 8, dtype=np.uint8)])
    w = bits.view("<u8").copy()
    for k in (1, 2, 4, 8, 16, 32):
        w ^= w << np.uint64(k)
    parity = (w >> np.uint64(63)).astype(np.uint8)  # of each word's values
    carry = np.zeros(len(w), dtype=np.uint8)
    carry[1:] = np.bitwise_xor.accumulate(parity[:-1])
    w ^= carry.astype(np.uint64) * np.uint64(MASK64)
    return np.unpackbits(w.view(np.uint8), bitorder="little")[:n]


class Fnv1a64:
    def __init__(self):
        self.h = FNV_OFFSET

    def update(self, data):
        global _POW
        if _POW is None:  # _POW[k] = P^(BLOCK - k): the weight of byte k of a full block
            with np.errstate(over="ignore"):
                _POW = np.cumprod(np.full(_BLOCK, FNV_PRIME, dtype=np.uint64), dtype=np.uint64)[::-1].copy().view(np.int64)
        b = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        for s in range(0, len(b), _BLOCK):
            self._block(b[s:s + _BLOCK])
        return self

    def _block(self, b):
        n = len(b)
        if n == 0:
            return
        l0 = self.h & 0xFF
        low = np.zeros(n, dtype=np.uint8)  # l_k: the low byte of h before byte k
        for j in range(8):
            x = low ^ b  # its bits below j are final
            y = x & np.uint8((1 << j) - 1)
            e = ((b ^ (y * np.uint8(_LOW))) >> np.uint8(j)) & np.uint8(1)  # bit j of l_{k+1} = bit j of l_k ^ e_k
            bit = np.empty(n, dtype=np.uint8)
            bit[0] = (l0 >> j) & 1
            if n > 1:
                bit[1:] = prefix_xor(e[:-1]) ^ bit[0]
            low |= bit << np.uint8(j)
        d = (low ^ b).astype(np.int64) - low.astype(np.int64)
        with np.errstate(over="ignore"):
            s = int(np.dot(d, _POW[_BLOCK - n:])) & MASK64  # int64 products and sums wrap mod 2^64
        pn = int(_POW[_BLOCK - n]) & MASK64  # P^n
        self.h = (self.h * pn + s) & MASK64

    def hexdigest(self):
        return "%016x" % self.h


def fnv1a64_slow(data, h=FNV_OFFSET):  # the definition, for tests
    for byte in bytes(data):
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


# ----------------------------------------------------------------------------
# The model configuration: Hugging Face config.json -> fpdt's Config fields (model.h)

LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def f32(x):
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def g9(x):  # the manifest's %.9g of a float32
    return "%.9g" % f32(x)


# fpdt's own limits (checkpoint.h parse_manifest, model.h check_shape): a config or a manifest
# outside them is refused before anything is read or allocated
LIMITS = {"n_layer": 4096, "d_model": 1 << 17, "n_head": 4096, "n_kv_head": 4096, "head_dim": 4096, "ffn": 1 << 20,
          "vocab": 1 << 24, "rope_original_max_pos": 2 ** 31 - 1}
MAX_PARAMS = 1 << 40
F32_MAX = 3e38
_MISSING = object()


def typed(d, k, want, where, default=_MISSING, lo=None, hi=None):
    """d[k] checked: want is "int" (a whole number, not a bool), "num" (a finite number, not a
    bool), "bool", "str", "dict" or "list"; None counts as missing; ints and numbers in [lo, hi]."""
    v = d.get(k) if isinstance(d, dict) else None
    if v is None:
        if default is _MISSING:
            fail("%s: %s: missing" % (where, k))
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "num": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "bool": isinstance(v, bool), "str": isinstance(v, str), "dict": isinstance(v, dict), "list": isinstance(v, list)}[want]
    if not ok:
        fail("%s: %s: %r is not %s" % (where, k, v, {"int": "a whole number", "num": "a finite number", "bool": "true or false",
                                                     "str": "a string", "dict": "an object", "list": "a list"}[want]))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        fail("%s: %s: %r is out of range (fpdt takes %s to %s)" % (where, k, v, lo, hi))
    return v


def config_from_hf(hc, where="config.json"):
    """fpdt's model fields from a Hugging Face config dict; fails naming the first field fpdt cannot
    represent, or one of the wrong type or outside fpdt's limits."""
    def bad(field, why):
        fail("%s: %s: %s" % (where, field, why))

    archs = typed(hc, "architectures", "list", where, [])
    mtype = typed(hc, "model_type", "str", where, None)
    if not all(isinstance(a, str) for a in archs):
        bad("architectures", "%r is not a list of names" % (archs,))
    if archs and not all(a in LLAMA_ARCHS for a in archs):
        bad("architectures", "%s is not a Llama-architecture model (supported: %s)" % (",".join(archs), ", ".join(LLAMA_ARCHS)))
    if mtype is not None and mtype not in ("llama", "mistral"):
        bad("model_type", "'%s' is not a Llama-architecture model (supported: llama, mistral)" % mtype)
    if not archs and mtype is None:
        bad("model_type", "missing (and no architectures): cannot tell which model this is")
    d = typed(hc, "hidden_size", "int", where, lo=1, hi=LIMITS["d_model"])
    F = typed(hc, "intermediate_size", "int", where, lo=1, hi=LIMITS["ffn"])
    L = typed(hc, "num_hidden_layers", "int", where, lo=1, hi=LIMITS["n_layer"])
    H = typed(hc, "num_attention_heads", "int", where, lo=1, hi=LIMITS["n_head"])
    V = typed(hc, "vocab_size", "int", where, lo=1, hi=LIMITS["vocab"])
    Hkv = typed(hc, "num_key_value_heads", "int", where, H, lo=1, hi=LIMITS["n_kv_head"])
    if typed(hc, "hidden_act", "str", where, "silu") != "silu":
        bad("hidden_act", "'%s': fpdt's llama MLP is SwiGLU with silu" % hc["hidden_act"])
    for k in ("attention_bias", "mlp_bias"):
        if typed(hc, k, "bool", where, False):
            bad(k, "true: fpdt's llama family has no biases")
    if hc.get("sliding_window") is not None and typed(hc, "use_sliding_window", "bool", where, True):
        bad("sliding_window", "%r: fpdt's attention is full causal (set it to null to ignore the window)" % hc["sliding_window"])
    for k in MOE_KEYS:
        if hc.get(k) not in (None, 0, 1):
            bad(k, "%r: mixture-of-experts layers are not representable" % hc[k])
    if typed(hc, "partial_rotary_factor", "num", where, 1.0) != 1.0:
        bad("partial_rotary_factor", "%r: fpdt rotates the whole head" % hc["partial_rotary_factor"])
    if hc.get("head_dim") is None and d % H:
        bad("hidden_size", "%d is not a multiple of num_attention_heads %d (and no head_dim)" % (d, H))
    D = typed(hc, "head_dim", "int", where, d // H, lo=1, hi=LIMITS["head_dim"])
    if D % 2 or D > 512:
        bad("head_dim", "%r: fpdt needs an even head size of at most 512" % D)
    if H % Hkv:
        bad("num_key_value_heads", "%d does not divide num_attention_heads %d" % (Hkv, H))
    eps = typed(hc, "rms_norm_eps", "num", where, 1e-6)
    if not 0 < f32(eps) <= F32_MAX:
        bad("rms_norm_eps", "%r: must be a positive number (as a float32)" % eps)
    tie = typed(hc, "tie_word_embeddings", "bool", where, False)
    # RoPE: top level (rope_theta, rope_scaling: published Llama 3.x) or transformers 5's rope_parameters
    rp = typed(hc, "rope_parameters", "dict", where, None)
    field = "rope_parameters"
    if rp and all(isinstance(v, dict) for v in rp.values()):
        bad("rope_parameters", "per-layer-type RoPE parameters are not representable")
    if rp is None:
        rp, field = dict(typed(hc, "rope_scaling", "dict", where, {})), "rope_scaling"
        if hc.get("rope_theta") is not None:
            rp.setdefault("rope_theta", hc["rope_theta"])
    theta = typed(rp, "rope_theta", "num", where + ": " + field, 10000.0)
    rtype = typed(rp, "rope_type", "str", where + ": " + field, None) or typed(rp, "type", "str", where + ": " + field, "default")
    c = dict(family="llama", n_layer=L, d_model=d, n_head=H, n_kv_head=Hkv, head_dim=D, ffn=F, vocab=V, rope_theta=theta,
             norm_eps=eps, tie_embeddings=1 if tie else 0, rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0,
             rope_high_freq_factor=4.0, rope_original_max_pos=8192)
    num = lambda k: typed(rp, k, "num", where + ": " + field, lo=0)  # noqa: E731
    if rtype == "linear":
        c.update(rope_scaling="linear", rope_factor=typed(rp, "factor", "num", where + ": " + field, 1.0))
    elif rtype == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if rp.get(k) is None:
                bad(field + "." + k, "missing (llama3 RoPE needs factor, low_freq_factor, high_freq_factor, "
                                     "original_max_position_embeddings)")
        omp = rp["original_max_position_embeddings"]
        if isinstance(omp, float) and omp.is_integer():
            omp = int(omp)
        omp = typed({"original_max_position_embeddings": omp}, "original_max_position_embeddings", "int", where + ": " + field,
                    lo=1, hi=LIMITS["rope_original_max_pos"])
        if not num("high_freq_factor") > num("low_freq_factor") > 0:
            bad(field + ".high_freq_factor", "must exceed low_freq_factor > 0")
        c.update(rope_scaling="llama3", rope_factor=num("factor"), rope_low_freq_factor=rp["low_freq_factor"],
                 rope_high_freq_factor=rp["high_freq_factor"], rope_original_max_pos=omp)
    elif rtype != "default":
        bad(field + ".rope_type", "'%s': fpdt's RoPE does default, linear and llama3" % rtype)
    if not 1 < f32(theta) <= F32_MAX:
        bad("rope_theta", "%r: must be a number above 1" % (theta,))
    for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        if not 0 < f32(c[k]) <= F32_MAX:
            bad(field + "." + {"rope_factor": "factor"}.get(k, k[5:]), "%r: must be a positive number" % c[k])
    n = n_params(c)
    if n > MAX_PARAMS:
        bad("vocab_size", "the model has %d parameters, more than fpdt's limit of 2^40" % n)
    return c


def n_params(c):
    return sum(int(np.prod(shape)) for _, shape in param_table(c))


def config_to_hf(c, seq):
    """config.json for transformers (LlamaForCausalLM), RoPE at the top level as published Llama 3.x ships it."""
    rope = None
    if c["rope_scaling"] == "linear":
        rope = {"rope_type": "linear", "factor": c["rope_factor"]}
    elif c["rope_scaling"] == "llama3":
        rope = {"rope_type": "llama3", "factor": c["rope_factor"], "low_freq_factor": c["rope_low_freq_factor"],
                "high_freq_factor": c["rope_high_freq_factor"],
                "original_max_position_embeddings": c["rope_original_max_pos"]}
    ctx = c["rope_original_max_pos"] * (c["rope_factor"] if rope else 1)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["d_model"], "intermediate_size": c["ffn"], "num_hidden_layers": c["n_layer"],
        "num_attention_heads": c["n_head"], "num_key_value_heads": c["n_kv_head"], "head_dim": c["head_dim"],
        "vocab_size": c["vocab"], "rms_norm_eps": c["norm_eps"], "rope_theta": c["rope_theta"], "rope_scaling": rope,
        "tie_word_embeddings": bool(c["tie_embeddings"]), "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "max_position_embeddings": int(max(seq, ctx, 1)), "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------
# The parameters: model.h's param_table for the llama family, and the Hugging Face tensors of each

def param_table(c):
    """[(fpdt name, shape)] in model.h's order (llama family)."""
    d, D, F, V = c["d_model"], c["head_dim"], c["ffn"], c["vocab"]
    t = [("wte", (V, d))]
    for l in range(c["n_layer"]):
        p = "h.%d." % l
        t += [(p + "ln1_w", (1, d)), (p + "qkv_w", ((c["n_head"] + 2 * c["n_kv_head"]) * D, d)),
              (p + "o_w", (d, c["n_head"] * D)), (p + "ln2_w", (1, d)), (p + "fc_w", (2 * F, d)), (p + "proj_w", (d, F))]
    t.append(("lnf_w", (1, d)))
    if not c["tie_embeddings"]:
        t.append(("lm_head", (V, d)))
    return t


def hf_names(c):
    """{fpdt name: [(HF tensor name, HF shape)]}: the HF tensors each fpdt tensor is made of, stacked by rows."""
    d, D, F, V, H, Hkv = c["d_model"], c["head_dim"], c["ffn"], c["vocab"], c["n_head"], c["n_kv_head"]
    m = {"wte": [("model.embed_tokens.weight", (V, d))], "lnf_w": [("model.norm.weight", (d,))]}
    for l in range(c["n_layer"]):
        p, q = "h.%d." % l, "model.layers.%d." % l
        m[p + "ln1_w"] = [(q + "input_layernorm.weight", (d,))]
        m[p + "qkv_w"] = [(q + "self_attn.q_proj.weight", (H * D, d)), (q + "self_attn.k_proj.weight", (Hkv * D, d)),
                          (q + "self_attn.v_proj.weight", (Hkv * D, d))]
        m[p + "o_w"] = [(q + "self_attn.o_proj.weight", (d, H * D))]
        m[p + "ln2_w"] = [(q + "post_attention_layernorm.weight", (d,))]
        m[p + "fc_w"] = [(q + "mlp.gate_proj.weight", (F, d)), (q + "mlp.up_proj.weight", (F, d))]
        m[p + "proj_w"] = [(q + "mlp.down_proj.weight", (d, F))]
    if not c["tie_embeddings"]:
        m["lm_head"] = [("lm_head.weight", (V, d))]
    return m


def rope_perm(D):
    """fpdt row r of a head = HF row perm[r]: 2i <- i, 2i + 1 <- i + D/2."""
    perm = np.empty(D, dtype=np.int64)
    perm[0::2] = np.arange(D // 2)
    perm[1::2] = np.arange(D // 2) + D // 2
    return perm


def permute_heads(w, D, perm):
    rows, cols = w.shape
    return w.reshape(rows // D, D, cols)[:, perm, :].reshape(rows, cols)


def to_fpdt(c, name, parts):
    """One fpdt tensor (float32, its table shape) from its HF tensors (in hf_names order)."""
    D = c["head_dim"]
    if name.endswith("qkv_w"):
        perm = rope_perm(D)
        parts = [permute_heads(parts[0], D, perm), permute_heads(parts[1], D, perm), parts[2]]
    return np.ascontiguousarray(np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts], axis=0)
                                if len(parts) > 1 else parts[0].reshape(1, -1) if parts[0].ndim == 1 else parts[0],
                                dtype=np.float32)


def from_fpdt(c, name, w):
    """The HF tensors of one fpdt tensor w (its table shape): [(HF name, array)]."""
    D = c["head_dim"]
    out, r = [], 0
    for hname, shape in hf_names(c)[name]:
        rows = shape[0] if len(shape) == 2 else 1
        part = w[r:r + rows].reshape(shape)
        r += rows
        out.append([hname, part])
    if name.endswith("qkv_w"):
        inv = np.argsort(rope_perm(D))
        out[0][1] = permute_heads(out[0][1], D, inv)
        out[1][1] = permute_heads(out[1][1], D, inv)
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


# ----------------------------------------------------------------------------
# Reading safetensors (one file or an index of shards)

def read_json(path, max_bytes):
    """A JSON object from path, a regular file of at most max_bytes."""
    with open_input(path, "rb", max_bytes=max_bytes) as f:
        raw = f.read()
    try:
        v = json.loads(raw)
    except ValueError as e:
        fail("%s: not valid JSON (%s)" % (path, e))
    if not isinstance(v, dict):
        fail("%s: not a JSON object" % path)
    return v


def open_hf_tensors(hf_dir):
    """{HF tensor name: (file path, safe_open handle)} for every tensor in the directory's safetensors."""
    try:
        from safetensors import safe_open
    except ImportError:
        fail("needs safetensors (pip install safetensors)")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.lexists(index):
        weight_map = typed(read_json(index, 64 << 20), "weight_map", "dict", index)
        files = sorted(set(weight_map.values()))
        for fn in files:  # file names in this directory, nothing else
            if not isinstance(fn, str) or not fn or "/" in fn or fn in (".", ".."):
                fail("%s: weight_map: %r is not a file name in %s" % (index, fn, hf_dir))
    elif os.path.lexists(single):
        files = ["model.safetensors"]
    else:
        fail("%s: no model.safetensors or model.safetensors.index.json (pytorch_model.bin is not read: "
             "save the model with safetensors)" % hf_dir)
    where = {}
    for fn in files:
        path = os.path.join(hf_dir, fn)
        if not os.path.lexists(path):
            fail("%s: missing (listed in model.safetensors.index.json)" % path)
        check_regular(path)  # a FIFO would block safe_open
        try:
            h = safe_open(path, framework="numpy")
            keys = list(h.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            fail("%s: not a valid safetensors file (truncated or corrupt?): %s" % (path, e))
        for k in keys:
            where[k] = (path, h)
    return where


def read_tensor(where, name):
    """A tensor as float32 (F32, F16, BF16, F64 on disk)."""
    path, h = where[name]
    sl = h.get_slice(name)
    dtype = sl.get_dtype()
    if dtype == "BF16":  # numpy has no bfloat16: the raw bits, widened exactly (bf16 is fp32's top half)
        raw = read_raw(path, name)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(sl.get_shape())
    if dtype not in ("F32", "F16", "F64"):
        fail("%s: tensor %s has dtype %s (expected F32, F16, BF16 or F64)" % (path, name, dtype))
    return h.get_tensor(name).astype(np.float32)


def read_raw(path, name):
    """The bytes of a BF16 tensor as uint16, from the safetensors layout: an 8-byte little-endian
    header length, the JSON header (name -> dtype, shape, data_offsets), then the data."""
    with open_input(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 << 20:
            fail("%s: a safetensors header of %d bytes (corrupt?)" % (path, n))
        header = json.loads(f.read(n))
        lo, hi = header[name]["data_offsets"]
        f.seek(8 + n + lo)
        buf = f.read(hi - lo)
    if len(buf) != hi - lo:
        fail("%s: tensor %s is cut short (truncated file?)" % (path, name))
    return np.frombuffer(buf, dtype="<u2")


# ----------------------------------------------------------------------------
# Checkpoint format 2

MANIFEST_KEYS = ["fpdt-checkpoint", "step", "total_steps", "seed", "model.name", "model.family", "model.n_layer",
                 "model.d_model", "model.n_head", "model.n_kv_head", "model.head_dim", "model.ffn", "model.vocab",
                 "model.rope_theta", "model.norm_eps", "model.tie_embeddings", "model.rope_scaling",
                 "model.rope_factor", "model.rope_low_freq_factor", "model.rope_high_freq_factor",
                 "model.rope_original_max_pos", "data.seq", "data.source", "n_params", "optimizer", "shards"]
INT_FIELDS = ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "ffn", "vocab", "tie_embeddings",
              "rope_original_max_pos")
FLOAT_FIELDS = ("rope_theta", "norm_eps", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")


def write_checkpoint(out_dir, name, c, tensors, step=0):
    """OUT_DIR/ckpt_<step>/ from tensors, an iterable of (fpdt name, float32 array) in table order,
    written into ckpt_<step>.tmp/ (removed on any failure), fsynced, then renamed."""
    table = param_table(c)
    make_dir(out_dir)
    final = os.path.join(out_dir, "ckpt_%08d" % step)
    tmp = final + ".tmp"
    if os.path.lexists(final):
        fail("%s exists already (import into an empty directory)" % final)
    new_temp_dir(tmp, ("shard_0.bin", "manifest.txt"))
    hsh, n = Fnv1a64(), 0
    f = Output(os.path.join(tmp, "shard_0.bin"))
    for (tname, shape), (gname, w) in zip(table, tensors):
        assert tname == gname and w.shape == shape and w.dtype == np.float32, (tname, gname, w.shape, shape)
        if not np.all(np.isfinite(w)):
            fail("tensor %s has non-finite values (NaN or Inf): nothing imported" % tname)
        b = np.ascontiguousarray(w).astype("<f4").tobytes()
        f.write(b)
        hsh.update(b)
        n += w.size
    f.close()
    vals = {"fpdt-checkpoint": "2", "step": str(step), "total_steps": "0", "seed": "0", "model.name": name,
            "data.seq": "0", "data.source": "none", "n_params": str(n), "optimizer": "0", "shards": "1"}
    for k in ("family", "rope_scaling"):
        vals["model." + k] = c[k]
    for k in INT_FIELDS:
        vals["model." + k] = str(int(c[k]))
    for k in FLOAT_FIELDS:
        vals["model." + k] = g9(c[k])
    text = "".join("%s %s\n" % (k, vals[k]) for k in MANIFEST_KEYS)
    text += "shard 0 0 %d %s\n" % (n, hsh.hexdigest())
    text += "end %s\n" % Fnv1a64().update(text.encode()).hexdigest()
    f = Output(os.path.join(tmp, "manifest.txt"))
    f.write(text.encode())
    f.close()
    fsync_dir(tmp)
    commit(tmp, final)
    fsync_dir(out_dir)
    return final, n


def manifest_number(fields, key, path, lo=None, hi=None):
    """A manifest field as checkpoint.h parses it: digits only in [lo, hi], or (lo None) a
    positive finite float32."""
    v = fields[key]
    if lo is not None:
        if not re.fullmatch("[0-9]{1,19}", v) or not lo <= int(v) <= hi:
            raise ValueError("%s: %s '%s' (expected a whole number from %d to %d)" % (path, key, v[:80], lo, hi))
        return int(v)
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not 0 < x <= F32_MAX or v != v.strip():
        raise ValueError("%s: %s '%s' (expected a positive finite number)" % (path, key, v[:80]))
    return x


def read_manifest(ckpt):
    """(fields, shards) of ckpt_<step>/manifest.txt, every field checked against fpdt's own limits
    before anything is sized from it; raises ValueError naming the first bad one."""
    path = os.path.join(ckpt, "manifest.txt")
    try:
        with open_input(path, "rb", follow=False, max_bytes=64 << 20) as f:
            raw = f.read()
    except Failure as e:
        raise ValueError(str(e))
    end = raw.rfind(b"\nend ")
    if end < 0 or not raw.endswith(b"\n"):
        raise ValueError("%s: no end line (partly written?)" % path)
    body, tail = raw[:end + 1], raw[end + 1:].decode("ascii", "replace").split()
    if len(tail) != 2 or Fnv1a64().update(body).hexdigest() != tail[1]:
        raise ValueError("%s: checksum mismatch on the end line (corrupt)" % path)
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError("%s: not text" % path)
    lines = [l for l in lines if not l.startswith("data.batch ")]  # a train run's --batch
    fields = {}
    for i, k in enumerate(MANIFEST_KEYS):
        if i >= len(lines) or not lines[i].startswith(k + " "):
            raise ValueError("%s: line %d should be '%s ...'" % (path, i + 1, k))
        fields[k] = lines[i][len(k) + 1:]
    if fields["fpdt-checkpoint"] != "2":
        raise ValueError("%s: fpdt-checkpoint %s (this reads format 2)" % (path, fields["fpdt-checkpoint"]))
    c = {"family": fields["model.family"], "rope_scaling": fields["model.rope_scaling"]}
    for k in INT_FIELDS:
        c[k] = manifest_number(fields, "model." + k, path, 0 if k == "tie_embeddings" else 1, LIMITS.get(k, 1))
    for k in FLOAT_FIELDS:
        c[k] = manifest_number(fields, "model." + k, path)
    if c["n_head"] % c["n_kv_head"]:
        raise ValueError("%s: model.n_kv_head %d does not divide model.n_head %d" % (path, c["n_kv_head"], c["n_head"]))
    step = manifest_number(fields, "step", path, 0, 1 << 62)
    seq = manifest_number(fields, "data.seq", path, 0, 1 << 40)
    n = manifest_number(fields, "n_params", path, 1, MAX_PARAMS)
    opt = manifest_number(fields, "optimizer", path, 0, 1)
    nsh = manifest_number(fields, "shards", path, 1, 1 << 20)
    if c["family"] != "llama":
        raise ValueError("%s: model.family %s: only the llama family exports to Hugging Face's Llama" % (path, c["family"]))
    if c["rope_scaling"] not in ("none", "linear", "llama3"):
        raise ValueError("%s: model.rope_scaling %s" % (path, c["rope_scaling"]))
    if n_params(c) != n:
        raise ValueError("%s: n_params %d does not match the model fields" % (path, n))
    named = re.fullmatch(r"ckpt_([0-9]+)", os.path.basename(os.path.normpath(ckpt)))
    if named and int(named.group(1)) != step:
        raise ValueError("%s: its manifest is of step %d, its name says step %d (a copy or a rename of another checkpoint?)"
                         % (ckpt, step, int(named.group(1))))
    shards, lo_want = [], 0
    rest = lines[len(MANIFEST_KEYS):]
    if len(rest) != nsh:
        raise ValueError("%s: shards %d but %d shard lines" % (path, nsh, len(rest)))
    for r, line in enumerate(rest):
        p = line.split()
        if len(p) != 5 or p[0] != "shard" or p[1] != str(r) or not re.fullmatch("[0-9a-f]{16}", p[4]) or \
                not all(re.fullmatch("[0-9]{1,19}", x) for x in p[2:4]):
            raise ValueError("%s: bad shard line %d: '%s'" % (path, r, line[:100]))
        lo, hi = int(p[2]), int(p[3])
        if lo != lo_want or hi < lo or hi > n:
            raise ValueError("%s: shard %d covers [%d, %d), expected to start at %d" % (path, r, lo, hi, lo_want))
        shards.append((os.path.join(ckpt, "shard_%d.bin" % r), lo, hi, p[4]))
        lo_want = hi
    if lo_want != n:
        raise ValueError("%s: the shards cover [0, %d) of %d parameters" % (path, lo_want, n))
    c["name"], c["step"], c["seq"], c["n_params"], c["optimizer"] = fields["model.name"], step, seq, n, opt
    return c, shards


def read_checkpoint(ckpt):
    """(config, params float32 (n_params,)) of one ckpt_<step> directory, every checksum verified;
    the memory an export takes (the parameters, their tensors, the file's bytes) checked first."""
    c, shards = read_manifest(ckpt)
    per = 3 if c["optimizer"] else 1
    for path, lo, hi, want in shards:
        try:
            size = check_regular(path, follow=False)
        except Failure as e:
            raise ValueError(str(e))
        if size != (hi - lo) * 4 * per:
            raise ValueError("%s: %d bytes, expected %d (truncated?)" % (path, size, (hi - lo) * 4 * per))
    check_memory("%s: exporting %d parameters" % (ckpt, c["n_params"]), 3 * 4 * c["n_params"])
    params = np.empty(c["n_params"], dtype=np.float32)
    for path, lo, hi, want in shards:
        h = Fnv1a64()
        with open_input(path, "rb", follow=False) as f:
            dst = memoryview(params[lo:hi]).cast("B")
            for a in range(0, len(dst), 1 << 24):  # the parameters, in place
                got = f.readinto(dst[a:a + (1 << 24)])
                if got != min(1 << 24, len(dst) - a):
                    raise ValueError("%s: changed size while being read" % path)
                h.update(dst[a:a + got])
            while True:  # the moments: checksummed only
                b = f.read(1 << 24)
                if not b:
                    break
                h.update(b)
        if h.hexdigest() != want:
            raise ValueError("%s: checksum mismatch (corrupt or partly written)" % path)
    return c, params


def find_checkpoint(arg):
    """A ckpt_<step> directory, or the newest valid one in a directory (a corrupt newer one, or a
    link or anything else named like one, is reported and skipped)."""
    if os.path.isfile(arg) and os.path.basename(arg) == "manifest.txt":
        arg = os.path.dirname(arg) or "."
    if os.path.isdir(arg) and os.path.lexists(os.path.join(arg, "manifest.txt")):
        try:
            return arg, read_checkpoint(arg)
        except ValueError as e:
            fail(str(e))
    if os.path.lexists(arg) and not os.path.isdir(arg):
        fail("%s: not a format-2 checkpoint (expected a ckpt_<step> directory or the directory holding them)" % arg)
    if not os.path.isdir(arg):
        fail("%s: no such checkpoint or directory" % arg)
    steps = []
    for fn in os.listdir(arg):
        m = re.fullmatch(r"ckpt_([0-9]+)", fn)
        if not m:
            continue
        mode = os.lstat(os.path.join(arg, fn)).st_mode
        if stat.S_ISDIR(mode):
            steps.append((int(m.group(1)), fn))
        else:
            sys.stderr.write("hf.py: warning: skipping %s: %s, not a checkpoint directory\n" % (os.path.join(arg, fn), kind(mode)))
    for _, fn in sorted(steps, reverse=True):
        try:
            return os.path.join(arg, fn), read_checkpoint(os.path.join(arg, fn))
        except ValueError as e:
            sys.stderr.write("hf.py: warning: skipping %s\n" % e)
    fail("%s: no valid checkpoint (ckpt_<step>/ with manifest.txt) there" % arg)


# ----------------------------------------------------------------------------
# import / export

def load_hf_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        fail("%s: not a directory (expected a Hugging Face model directory)" % hf_dir)
    if not os.path.lexists(path):
        fail("%s: no config.json (expected a Hugging Face model directory)" % hf_dir)
    return read_json(path, 16 << 20)


def hf_tensors_in_fpdt_order(hf_dir, c):
    """Checks the memory the largest tensor takes to convert (from the config alone), then every
    tensor of the directory against the config, then yields (fpdt name, float32 array)."""
    big, shape = max(((n, s) for n, s in param_table(c)), key=lambda t: int(np.prod(t[1])))
    check_memory("%s: importing tensor %s (%d values; read, converted and written)" % (hf_dir, big, int(np.prod(shape))),
                 16 * int(np.prod(shape)))
    where = open_hf_tensors(hf_dir)
    names = hf_names(c)
    wanted = {hn: shape for parts in names.values() for hn, shape in parts}
    for hn, shape in wanted.items():
        if hn not in where:
            fail("%s: tensor %s is missing" % (hf_dir, hn))
        got = tuple(where[hn][1].get_slice(hn).get_shape())
        if got != shape:
            fail("%s: tensor %s has shape %s, config.json says %s" % (where[hn][0], hn, list(got), list(shape)))
    for hn in sorted(where):
        if hn in wanted or hn.endswith("rotary_emb.inv_freq"):
            continue
        if hn == "lm_head.weight" and c["tie_embeddings"]:
            continue  # checked below: it must be the embedding
        why = "a bias, which fpdt's llama family does not have" if hn.endswith(".bias") else "not part of a Llama model"
        fail("%s: tensor %s is %s" % (where[hn][0], hn, why))
    if c["tie_embeddings"] and "lm_head.weight" in where:
        if not np.array_equal(read_tensor(where, "lm_head.weight"), read_tensor(where, "model.embed_tokens.weight")):
            fail("%s: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight" % hf_dir)
    for name, _ in param_table(c):
        yield name, to_fpdt(c, name, [read_tensor(where, hn) for hn, _ in names[name]])


def cmd_import(hf_dir, out_dir, name=None):
    hc = load_hf_config(hf_dir)
    c = config_from_hf(hc, os.path.join(hf_dir, "config.json"))
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(hf_dir)))
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:31] or "imported"
    gen = hf_tensors_in_fpdt_order(hf_dir, c)
    first = next(gen)  # every check of the directory runs before anything is written
    path, n = write_checkpoint(out_dir, name, c, _chain(first, gen))
    print("%s: %s (llama, %d layers, d %d, %d/%d heads, head %d, ffn %d, vocab %d, rope %s, %s embeddings), "
          "%d params" % (path, name, c["n_layer"], c["d_model"], c["n_head"], c["n_kv_head"], c["head_dim"], c["ffn"],
                         c["vocab"], c["rope_scaling"], "tied" if c["tie_embeddings"] else "untied", n))


def _chain(first, rest):
    yield first
    yield from rest


def cmd_export(ckpt_arg, out_dir):
    """config.json and model.safetensors in out_dir, each written as a .tmp (removed on any failure)
    and renamed over a regular file of that name (anything else there is refused)."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        fail("needs safetensors (pip install safetensors)")
    if os.path.lexists(os.path.join(out_dir, "model.safetensors.index.json")):
        fail("%s holds model.safetensors.index.json (a sharded model, which transformers would load instead): "
             "export into another directory" % out_dir)
    path, (c, params) = find_checkpoint(ckpt_arg)
    tensors, off = {}, 0
    for name, shape in param_table(c):
        n = int(np.prod(shape))
        for hn, arr in from_fpdt(c, name, params[off:off + n].reshape(shape)):
            if not np.all(np.isfinite(arr)):
                fail("%s: tensor %s has non-finite values (NaN or Inf): nothing exported" % (path, hn))
            tensors[hn] = arr
        off += n
    make_dir(out_dir)
    final = {k: os.path.join(out_dir, k) for k in ("config.json", "model.safetensors")}
    for p in final.values():
        check_replaceable(p)
    f = new_temp_file(final["config.json"] + ".tmp")
    f.write((json.dumps(config_to_hf(c, c["seq"]), indent=2) + "\n").encode())
    f.close()
    f = new_temp_file(final["model.safetensors"] + ".tmp")  # made new here (never a link); the library fills it
    f.close()
    try:
        save_file(tensors, f.path, metadata={"format": "pt"})
    except Exception as e:  # safetensors' own error type, a full disk included
        fail("cannot write %s: %s" % (f.path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
    commit(f.path, final["model.safetensors"])
    commit(final["config.json"] + ".tmp", final["config.json"])
    print("%s: config.json and model.safetensors from %s (step %d, %d params, fp32)" % (out_dir, path, c["step"],
                                                                                         c["n_params"]))


USAGE = ("usage: python3 data/hf.py import HF_DIR OUT_DIR [--name NAME] [--debug]\n"
         "       python3 data/hf.py export CKPT HF_OUT_DIR [--debug]\n"
         "  --debug: a failure prints its Python traceback too")


def main(argv):
    args = argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 1
    if args[0] == "import":
        rest, name = args[1:], None
        if "--name" in rest:
            i = rest.index("--name")
            if i + 1 >= len(rest):
                fail("--name needs a value")
            name = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        if len(rest) != 2:
            fail("import needs HF_DIR OUT_DIR (python3 data/hf.py import HF_DIR OUT_DIR [--name NAME])")
        cmd_import(rest[0], rest[1], name)
    elif args[0] == "export":
        if len(args) != 3:
            fail("export needs CKPT HF_OUT_DIR (python3 data/hf.py export CKPT HF_OUT_DIR)")
        cmd_export(args[1], args[2])
    else:
        fail("unknown command '%s' (expected import or export)" % args[0])
    return 0


if __name__ == "__main__":
    run("hf.py", main)

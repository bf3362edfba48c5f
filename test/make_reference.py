#!/usr/bin/env python3
"""Reference fixtures for fpdt's model math.

Builds the two tiny fpdt models (llama: RMSNorm/GQA/SwiGLU/untied head;
gpt: LayerNorm/MHA/GELU-tanh MLP/tied head; both RoPE, no position
embedding) in PyTorch with float64 math and random parameters from a fixed
seed, runs one forward+backward on random tokens, and writes a fixture file
per model: config, tokens, targets, parameters, logits, mean CE loss and
every parameter's gradient (stored as float32). The format is read by
test/fixture.h:

  magic "FPDTREF1", then records:
    int32 name_len, name bytes, int32 dtype (0 f32, 1 i32), int32 ndim,
    ndim x int64 dims, prod(dims) values.   (all little-endian)

The packed-document fixtures (ref_*_docs.bin) hold byte tokens with BOS (256) at
DOC_BOS: a document starts at every BOS and at the first token, attention is causal
within a document only (an explicit block-diagonal causal mask), and RoPE positions
count from 0 at each document's start. Their BOS positions cover fpdt's edge cases at
32 tokens in chunks of 8 on 2 or 4 ranks: a first document that crosses a rank boundary,
a document starting exactly at a chunk boundary (8) that is one token long, one that spans a
chunk boundary and several ranks (9..20), and a BOS as the last token (31).

Rerun (needs only torch):  python3 test/make_reference.py --out test/fixtures
"""
import argparse
import math
import os
import struct
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # numpy not needed
import torch  # noqa: E402

GPT, LLAMA = 0, 1
CONFIGS = {
    "llama_tiny": dict(family=LLAMA, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                       ffn_hidden=176, vocab=260, seq=32, rope_theta=10000.0,
                       norm_eps=1e-5, seed=1234),
    "gpt_tiny": dict(family=GPT, n_layer=2, d_model=64, n_head=4, n_kv_head=4,
                     ffn_hidden=256, vocab=260, seq=32, rope_theta=10000.0,
                     norm_eps=1e-5, seed=5678),
}
BOS = 256  # data/data.h: TOK_BOS
DOC_BOS = [5, 8, 9, 21, 31]
CONFIGS["llama_docs"] = dict(CONFIGS["llama_tiny"], seed=4321, docs=True)
CONFIGS["gpt_docs"] = dict(CONFIGS["gpt_tiny"], seed=8765, docs=True)


def param_shapes(c):
    """Ordered (name, shape, kind) for every parameter of the model."""
    d, F, V = c["d_model"], c["ffn_hidden"], c["vocab"]
    D = d // c["n_head"]
    gpt = c["family"] == GPT
    qkv = (c["n_head"] + 2 * c["n_kv_head"]) * D
    out = [("wte", (V, d), "emb")]
    for l in range(c["n_layer"]):
        p = f"h.{l}."
        out += [(p + "ln1_w", (d,), "norm")] + ([(p + "ln1_b", (d,), "bias")] if gpt else [])
        out += [(p + "qkv_w", (qkv, d), "lin")] + ([(p + "qkv_b", (qkv,), "bias")] if gpt else [])
        out += [(p + "o_w", (d, c["n_head"] * D), "lin")] + ([(p + "o_b", (d,), "bias")] if gpt else [])
        out += [(p + "ln2_w", (d,), "norm")] + ([(p + "ln2_b", (d,), "bias")] if gpt else [])
        out += [(p + "fc_w", (F if gpt else 2 * F, d), "lin")] + ([(p + "fc_b", (F,), "bias")] if gpt else [])
        out += [(p + "proj_w", (d, F), "lin")] + ([(p + "proj_b", (d,), "bias")] if gpt else [])
    out += [("lnf_w", (d,), "norm")] + ([("lnf_b", (d,), "bias")] if gpt else [])
    if not gpt:
        out += [("lm_head", (V, d), "emb")]
    return out


def init_params(c, gen):
    params = {}
    for name, shape, kind in param_shapes(c):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "lin":
            t = z / math.sqrt(shape[1])          # std 1/sqrt(in_features)
        elif kind == "emb":
            t = 0.25 * z  # std 0.25: logits (|y|~sqrt(d)) of std ~2, loss ~ log V
        elif kind == "norm":
            t = 1.0 + 0.1 * z
        else:
            t = 0.1 * z
        params[name] = t.requires_grad_(True)
    return params


def norm(x, w, b, eps):
    if b is None:  # RMSNorm
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mu) / torch.sqrt(var + eps) * w + b


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def rope(x, theta, pos):
    """x: (T, H, D); interleaved pairs (2i, 2i+1) rotate by pos * theta^(-2i/D)."""
    T, _, D = x.shape
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)      # (D/2,)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]                  # (T, D/2)
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(x.shape)


def attention(q, k, v, doc):
    """q: (T, Hq, D), k/v: (T, Hkv, D); causal within each document (doc: (T,) document index),
    GQA: q head h uses kv head h // (Hq/Hkv)."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
    s = (q @ k.transpose(1, 2)) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) | (doc[:, None] != doc[None, :])  # True: not seen
    p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    out = p @ v
    assert torch.allclose(out, ref, atol=1e-10)
    return out.transpose(0, 1).reshape(T, Hq * D)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def documents(c, tokens):
    """(T,) document index and (T,) RoPE position of every token: one document unless the
    config is a packed one, where a document starts at every BOS and at the first token."""
    T = c["seq"]
    if not c.get("docs"):
        return torch.zeros(T, dtype=torch.long), torch.arange(T)
    starts = (tokens == BOS).clone()
    starts[0] = True
    doc = torch.cumsum(starts.long(), 0) - 1
    first = torch.tensor([max(s for s in range(t + 1) if starts[s]) for t in range(T)])
    return doc, torch.arange(T) - first


def forward(c, P, tokens, targets):
    gpt = c["family"] == GPT
    Hq, Hkv, d, F = c["n_head"], c["n_kv_head"], c["d_model"], c["ffn_hidden"]
    D, T, eps = d // Hq, c["seq"], c["norm_eps"]
    doc, pos = documents(c, tokens)
    g = lambda n: P.get(n)  # None for params the family lacks (biases in llama)
    x = P["wte"][tokens]
    for l in range(c["n_layer"]):
        p = f"h.{l}."
        h = norm(x, g(p + "ln1_w"), g(p + "ln1_b"), eps)
        qkv = linear(h, g(p + "qkv_w"), g(p + "qkv_b"))
        q = qkv[:, :Hq * D].reshape(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D)
        a = attention(rope(q, c["rope_theta"], pos), rope(k, c["rope_theta"], pos), v, doc)
        x = x + linear(a, g(p + "o_w"), g(p + "o_b"))
        h2 = norm(x, g(p + "ln2_w"), g(p + "ln2_b"), eps)
        if gpt:
            m = linear(gelu_tanh(linear(h2, g(p + "fc_w"), g(p + "fc_b"))), g(p + "proj_w"), g(p + "proj_b"))
        else:
            gu = linear(h2, g(p + "fc_w"))
            gate, up = gu[:, :F], gu[:, F:]
            m = linear(torch.nn.functional.silu(gate) * up, g(p + "proj_w"))
        x = x + m
    y = norm(x, g("lnf_w"), g("lnf_b"), eps)
    logits = y @ (P["wte"] if gpt else P["lm_head"]).T
    loss = torch.nn.functional.cross_entropy(logits, targets)  # mean over positions
    return logits, loss


def record(f, name, t, is_int):
    t = t.detach().reshape(t.shape)
    f.write(struct.pack("<i", len(name)) + name.encode())
    f.write(struct.pack("<ii", 1 if is_int else 0, t.dim()))
    f.write(struct.pack("<%dq" % t.dim(), *t.shape))
    vals = t.flatten().tolist()
    f.write(struct.pack("<%d%s" % (len(vals), "i" if is_int else "f"), *vals))


def make(name, c, out_dir):
    gen = torch.Generator().manual_seed(c["seed"])
    P = init_params(c, gen)
    tokens = torch.randint(0, c["vocab"], (c["seq"],), generator=gen)
    targets = torch.randint(0, c["vocab"], (c["seq"],), generator=gen)
    if c.get("docs"):  # bytes, and BOS exactly where DOC_BOS says
        tokens = torch.randint(0, BOS, (c["seq"],), generator=gen)
        tokens[DOC_BOS] = BOS
    logits, loss = forward(c, P, tokens, targets)
    loss.backward()

    path = os.path.join(out_dir, f"ref_{name}.bin")
    with open(path, "wb") as f:
        f.write(b"FPDTREF1")
        keys = ["family", "n_layer", "d_model", "n_head", "n_kv_head", "ffn_hidden", "vocab", "seq"]
        record(f, "config", torch.tensor([c[k] for k in keys]), True)
        record(f, "config_f", torch.tensor([c["rope_theta"], c["norm_eps"]]), False)
        record(f, "tokens", tokens, True)
        record(f, "targets", targets, True)
        if c.get("docs"):
            record(f, "doc_starts", torch.tensor(sorted({0} | set(DOC_BOS))), True)
        for n in P:
            record(f, "param." + n, P[n], False)
        record(f, "logits", logits, False)
        record(f, "loss", loss.reshape(1), False)
        for n in P:
            record(f, "grad." + n, P[n].grad, False)

    print(f"{path}: {os.path.getsize(path)} bytes, loss {loss.item():.6f} (log V = {math.log(c['vocab']):.3f})")
    for n in P:
        gmax = P[n].grad.abs().max().item()
        assert math.isfinite(gmax) and gmax > 0, n
        print(f"  {n:14s} {str(tuple(P[n].shape)):12s} max|grad| {gmax:.3e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="test/fixtures", help="output directory")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, c in CONFIGS.items():
        make(name, c, args.out)

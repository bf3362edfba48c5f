#!/usr/bin/env python3
"""Tiny random Hugging Face Llama models and their reference numbers, for test/test_hf.cpp.

    python3 test/make_hf_fixture.py [--out test/fixtures]      (needs torch and transformers)

Writes two directories, each a model as transformers saves it plus reference.bin:
  hf_tied/    tie_word_embeddings true, one model.safetensors, config.json as transformers 5
              writes it (rope_parameters)
  hf_untied/  tie_word_embeddings false, sharded (model-0000N-of-0000M.safetensors and
              model.safetensors.index.json), config.json in the published Llama 3.x shape
              (rope_theta and rope_scaling at the top level)
Both: GQA (4 query heads, 2 kv heads), head_dim 8 with hidden_size 24 (so H D != d), vocab 272,
llama3 RoPE scaling with all three of its bands in use (head_dim 8 at theta 10^4 has wavelengths
6.3, 63, 628 and 6283; original context 1024 over high_freq_factor 8 and low_freq_factor 1 keeps
the first two, blends the third and divides the fourth), random norm weights, fixed seeds.

reference.bin (test/fixture.h's FPDTREF1 format): tokens (S + 1 ids: inputs are the first S,
targets the last S), logits (S, V), loss (mean cross-entropy), and grad.<fpdt name> for every
fpdt parameter, computed by transformers in float64 from the fp32 weights and mapped to fpdt's
layout by data/hf.py's own mapping (q/k rows permuted for fpdt's RoPE pairing).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np
import torch
import transformers

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))  # after the standard library
import hf  # noqa: E402

SEQ = 64
COMMON = dict(vocab_size=272, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.1,
              max_position_embeddings=4096, attention_bias=False, mlp_bias=False)
ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0,
            original_max_position_embeddings=1024)
THETA = 10000.0


def record(f, name, a):
    a = np.asarray(a)
    is_int = a.dtype.kind in "iu"
    f.write(struct.pack("<i", len(name)) + name.encode())
    f.write(struct.pack("<ii", 1 if is_int else 0, a.ndim))
    f.write(struct.pack("<%dq" % a.ndim, *a.shape))
    f.write(np.ascontiguousarray(a, dtype="<i4" if is_int else "<f4").tobytes())


def make_config(tied):
    try:  # transformers 5: rope_parameters
        return transformers.LlamaConfig(**COMMON, tie_word_embeddings=tied,
                                        rope_parameters=dict(ROPE, rope_theta=THETA))
    except TypeError:  # transformers 4
        return transformers.LlamaConfig(**COMMON, tie_word_embeddings=tied, rope_theta=THETA, rope_scaling=ROPE)


def make(out_dir, name, tied, seed):
    torch.manual_seed(seed)
    cfg = make_config(tied)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # norms away from 1, so that their gradients and the mapping show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    d = os.path.join(out_dir, name)
    shutil.rmtree(d, ignore_errors=True)
    if tied:
        model.save_pretrained(d)
    else:
        model.save_pretrained(d, max_shard_size="50KB")
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "expected a sharded save"
        with open(os.path.join(d, "config.json")) as f:  # rewrite in the published Llama 3.x shape
            hc = json.load(f)
        hc.pop("rope_parameters", None)
        hc["rope_theta"] = THETA
        hc["rope_scaling"] = dict(ROPE)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hc, f, indent=2)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))

    # the reference: the saved model as transformers loads it, in float64
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").double()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (SEQ + 1,), generator=g)
    logits = ref(tokens[None, :SEQ]).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, tokens[1:])
    loss.backward()
    with torch.no_grad():  # the loaded model is the one that was saved
        same = model.double()(tokens[None, :SEQ]).logits[0]
        assert torch.allclose(same, logits, atol=1e-12), "from_pretrained changed the model"

    with open(os.path.join(d, "config.json")) as f:
        c = hf.config_from_hf(json.load(f))
    grads = {n: p.grad.float().numpy() for n, p in ref.named_parameters()}
    if tied:
        grads.pop("lm_head.weight", None)  # the same tensor as the embedding
    names = hf.hf_names(c)
    with open(os.path.join(d, "reference.bin"), "wb") as f:
        f.write(b"FPDTREF1")
        record(f, "tokens", tokens.numpy().astype(np.int32))
        record(f, "logits", logits.detach().float().numpy())
        record(f, "loss", np.array([loss.item()], dtype=np.float32))
        for fname, _ in hf.param_table(c):
            record(f, "grad." + fname, hf.to_fpdt(c, fname, [grads[hn] for hn, _ in names[fname]]))
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print("%s: %d files, %d bytes, loss %.6f" % (d, len(os.listdir(d)), size, loss.item()))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="test/fixtures")
    args = ap.parse_args()
    make(args.out, "hf_tied", True, 1234)
    make(args.out, "hf_untied", False, 4321)

#!/usr/bin/env python3
"""PyTorch CPU peer of `./fpdt train --device cpu`: the same llama-family model, one training step
timed as fpdt times it (forward + backward + gradient clipping + AdamW), fp32, batch 1.

The model is fpdt's llama preset, layer by layer (model.h, test/make_reference.py): token
embedding; per layer RMSNorm -> fused qkv Linear (no bias, GQA: Hq query heads, Hkv kv heads of
size D) -> RoPE on q and k (interleaved pairs, theta^(-2i/D)) -> causal attention (torch SDPA) ->
output Linear -> residual; RMSNorm -> Linear to [gate | up] (2F) -> silu(gate) * up -> Linear ->
residual; final RMSNorm, untied LM head, mean cross-entropy. Plain PyTorch: no activation
checkpointing, no torch.compile.

  python3 bench/cpu_peer.py --model small --seq 1024 --steps 5 --threads 2
prints the parameter count and one line `torch ms/step <median of the timed steps>`.
"""
import argparse
import math
import statistics
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# fpdt's llama presets (model.h): n_layer, d_model, n_head, n_kv_head, ffn, vocab
PRESETS = {
    "tiny": (2, 64, 4, 2, 176, 260),
    "small": (2, 128, 4, 2, 352, 260),
    "medium": (6, 384, 6, 2, 1024, 260),
}


class Layer(torch.nn.Module):
    def __init__(self, d, hq, hkv, ffn, eps):
        super().__init__()
        self.hq, self.hkv, self.D, self.ffn = hq, hkv, d // hq, ffn
        self.ln1 = torch.nn.RMSNorm(d, eps=eps)
        self.qkv = torch.nn.Linear(d, (hq + 2 * hkv) * self.D, bias=False)
        self.o = torch.nn.Linear(hq * self.D, d, bias=False)
        self.ln2 = torch.nn.RMSNorm(d, eps=eps)
        self.fc = torch.nn.Linear(d, 2 * ffn, bias=False)
        self.proj = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):  # x (T, d); cos, sin (T, 1, D/2)
        T, D = x.shape[0], self.D
        qkv = self.qkv(self.ln1(x))
        q = qkv[:, : self.hq * D].view(T, self.hq, D)
        k = qkv[:, self.hq * D : (self.hq + self.hkv) * D].view(T, self.hkv, D)
        v = qkv[:, (self.hq + self.hkv) * D :].view(T, self.hkv, D)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # (1, H, T, D); query head h reads kv head h // (Hq / Hkv), as enable_gqa does
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        x = x + self.o(a[0].transpose(0, 1).reshape(T, self.hq * D))
        gu = self.fc(self.ln2(x))
        return x + self.proj(F.silu(gu[:, : self.ffn]) * gu[:, self.ffn :])


def rope(x, cos, sin):
    """x (T, H, D): interleaved pairs (2i, 2i+1) rotated by pos * theta^(-2i/D)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class Model(torch.nn.Module):
    def __init__(self, n_layer, d, hq, hkv, ffn, vocab, eps=1e-5):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(Layer(d, hq, hkv, ffn, eps) for _ in range(n_layer))
        self.lnf = torch.nn.RMSNorm(d, eps=eps)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens, targets, cos, sin):
        x = self.wte(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.cross_entropy(self.head(self.lnf(x)), targets)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=sorted(PRESETS))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after one untimed warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--theta", type=float, default=10000.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    n_layer, d, hq, hkv, ffn, vocab = PRESETS[a.model]
    model = Model(n_layer, d, hq, hkv, ffn, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    D, T = d // hq, a.seq
    inv = a.theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]
    # fpdt's AdamW: decoupled weight decay on matrices only (not on norm weights)
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    print(f"torch {torch.__version__} | model {a.model} ({n_params / 1e6:.2f}M params) | seq {T} | "
          f"threads {torch.get_num_threads()} | fp32 | cpu capability {torch.backends.cpu.get_cpu_capability()}")
    times = []
    for step in range(a.steps + 1):
        tokens = torch.randint(0, vocab, (T,))
        targets = torch.randint(0, vocab, (T,))
        t0 = time.perf_counter()
        loss = model(tokens, targets, cos, sin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ms = 1000 * (time.perf_counter() - t0)
        print(f"step {step} | loss {loss.item():.4f} | {ms:.1f} ms", flush=True)
        if step > 0:
            times.append(ms)
    print(f"torch ms/step {statistics.median(times):.1f}")
    assert math.isfinite(loss.item())


if __name__ == "__main__":
    main()

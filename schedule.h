// schedule.h: the FPDT schedule. One training pass over the model (model.h) as chunk loops of op
// calls, with the host store (offload.h), the Ulysses all-to-alls (ulysses.h) and the sharding's
// hooks (zero.h). Written once over the ops; the backend behind the ops and copies decides where
// it runs (the CPU in program order, or the GPU on four streams ordered by events).
//
// Read it top-down as the method. A pass (model_forward_backward, at the end) is:
//   embedding              tokens -> layer 0's input, chunk by chunk
//   layer_forward(l)       for l = 0..L-1: chunk_forward on each chunk i (attention of q_i over
//                          k_j, v_j for j <= i, merged by log-sum-exp; then the MLP)
//   head_pass              final norm, LM head and cross-entropy chunk by chunk; with grads, back
//                          through them into dresid
//   layer_backward(l)      for l = L-1..0: phase 1 recomputes chunk_forward from the layer input
//                          and goes back through the MLP to dO; phase 2 (layer_backward_attention)
//                          runs attention's backward kv-outer, q-inner, then the QKV projection
//   embedding backward     dresid into the embedding rows
//
// Token layout. Rank r holds of chunk c the global tokens [c C + r cl, c C + (r+1) cl) (model.h's
// model_set_tokens). Why this and not one contiguous run of S/P tokens per rank: every rank then
// works on every chunk (no rank idles while another's chunks run), one all-to-all per chunk gives
// each rank the whole contiguous chunk c for its Hl heads, and so inside attention positions are
// just c C + t and the causal mask is needed on the diagonal block only, as on one rank.
//
// The stores (offload.h) this file moves, and what each holds:
//   layer_in   ((L+1) u chunks of (cl, d)) every layer's input and the last layer's output: the
//              activation checkpoints the backward recomputes from
//   dresid     (u chunks of (cl, d)) the residual stream's gradient, one chunk per slot, updated
//              in place; its meaning changes through the backward pass, and each place that
//              changes it says so: after head_pass dL/d(output of layer L-1); in layer l's phase 1
//              it becomes dL/d(x_mid of l) (the residual after attention); in phase 2 dL/d(input
//              of l), which is layer l-1's output gradient; the embedding backward reads it last
//   q, k, v    one layer's, in the heads layout (C, Hl, D), (C, Hkvl, D) x2 (with --keep-attention
//              every layer's, L u chunks, kept from the forward pass: qkv_chunk)
//   lse, delta one layer's log-sum-exp (C, Hl) and Delta = rowsum(dO . O) (C, Hl), each written
//              once per chunk and read in phase 2
//   dout       one layer's dO (C, Hl, D), written once per chunk in phase 1
//   dq         dQ (C, Hl, D), accumulated across phase 2's kv chunks (with dresid, the only stores
//              that are read, added to and written back)
//   attn_o, attn_lse   (L u chunks of (C, Hl, D), (C, Hl)) with --keep-attention only: every
//              layer's attention output and lse from the forward pass, fp32, which phase 1 takes
//              instead of running attention again
//   mlp_xmid, mlp_fch  (L u chunks of (cl, d), (cl, F2)) with --keep-mlp only: every layer's
//              x_mid and MLP pre-activations from the forward pass, fp32, which phase 1 takes
//              instead of running the output projection and the MLP's first matmul again
//
// Precision (--precision): fp32 throughout, or bf16 mixed precision: the matmuls read bf16
// operands (the weights' bf16 copy, activations rounded as they go in) and sum in fp32; the layer
// inputs, q, k, v and dO are rounded to bf16 where they are stored (round_stored) and kept in bf16
// on the host when offloaded; the all-to-alls carry bf16 (on one rank too); master weights,
// gradients, AdamW moments, the attention's O, LSE and dQ accumulators, the loss and the O(C)
// working set stay fp32.
#pragma once
#include <string>
#include "attention.cuh"
#include "loss.cuh"
#include "model.h"
#include "offload.h"
#include "ops.cuh"
#include "ulysses.h"
#include "zero.h"

// ----------------------------------------------------------------------------
// Helpers: the matmuls in either precision, rounding what is stored, positions

// Chunk i of layer l's input in the layer_in store, in 64 bits: (L+1) u chunks can pass 2^31.
static inline int64_t layer_in_chunk(int l, int u, int i) { return (int64_t)l * u + i; }
// Chunk i of q, k and v in their stores: one layer's (u chunks), or with --keep-attention every
// layer's (L u chunks, kept from the forward pass for the backward).
static inline int64_t qkv_chunk(const Model* M, int l, int i) { return M->run.keep_attn ? layer_in_chunk(l, M->u, i) : i; }

// The matmuls of the schedule. fp32: as they are. bf16: both operands rounded to bf16 (the
// activation into cast_a/cast_b, the weight from its copy at the same offset in wlow), fp32 sums,
// fp32 results.
// ZeRO-3: the weights live in the gathered buffers, each with its bf16 copy.
static inline const bf16* low(const Model* M, const float* w) {
    if (M->run.zero < 3) return M->wlow + (w - M->params);
    if (w >= M->wgather_wte && w < M->wgather_wte + (size_t)M->cfg.vocab * M->cfg.d_model)
        return M->wgather_wte_low + (w - M->wgather_wte);
    for (int s = 0; s < 2; s++)
        if (w >= M->wgather[s] && w < M->wgather[s] + M->group_max) return M->wgather_low[s] + (w - M->wgather[s]);
    fatal("internal: a weight outside the gathered buffers");
}
static inline void mm_forward(Model* M, float* out, const float* inp, const float* w, const float* b, size_t T, int IC,
                              int OC) {
    Ctx* ctx = &M->ctx;
    (void)ctx;  // the CPU-only build's MATMUL() does not read it
    if (!M->run.bf16) return (void)MATMUL(ctx, matmul_forward, out, inp, w, b, T, IC, OC);
    OP(ctx, to_bf16, M->cast_a, inp, T * IC);
    MATMUL(ctx, matmul_forward, out, (const bf16*)M->cast_a, low(M, w), b, T, IC, OC);
}
static inline void mm_backward(Model* M, float* dinp, float* dw, float* db, const float* dout, const float* inp,
                               const float* w, size_t T, int IC, int OC) {
    Ctx* ctx = &M->ctx;
    (void)ctx;
    if (!M->run.bf16) return (void)MATMUL(ctx, matmul_backward, dinp, dw, db, dout, inp, w, T, IC, OC);
    OP(ctx, to_bf16, M->cast_a, dout, T * OC);
    OP(ctx, to_bf16, M->cast_b, inp, T * IC);
    MATMUL(ctx, matmul_backward, dinp, dw, db, (const bf16*)M->cast_a, (const bf16*)M->cast_b, low(M, w), T, IC, OC);
}
// bf16 mode: x (n), about to be stored, takes the value its bf16 copy will have, so that what is
// computed next from x is the same whether the store is offloaded (bf16 on the host) or not.
static inline void round_stored(Model* M, float* x, size_t n) {
    if (M->run.bf16) OP(&M->ctx, round_bf16, x, n);
}

// RoPE positions of a chunk into M->pos: global positions, or with packed documents (--doc-mask 1)
// counted from 0 at each document's start (model_set_docs made them).
static inline void set_positions(Model* M, int chunk) {
    if (M->run.doc_bos < 0) return dev_iota(&M->ctx, M->pos, (int32_t)(chunk * M->C), M->C);
    dev_upload_async(&M->ctx, M->pos, M->docpos + 2 * (size_t)chunk * M->C, M->C * sizeof(int32_t));
}

// Packed documents. Attention's mask for query chunk i: its tokens' document starts in M->qdoc
// (null without documents). Query chunk i sees no key of a kv chunk before first_kv(i): those
// (i, j) pairs are skipped whole, computed nowhere and copied nowhere; the trace marks each.
static inline const int32_t* set_query_docs(Model* M, int i) {
    if (M->run.doc_bos < 0) return nullptr;
    dev_upload_async(&M->ctx, M->qdoc, M->docpos + (2 * (size_t)i + 1) * M->C, M->C * sizeof(int32_t));
    return M->qdoc;
}
static inline int first_kv(const Model* M, int i) { return M->first_kv.empty() ? 0 : M->first_kv[i]; }
// The last query chunk that sees kv chunk j (u - 1 without documents; never before j, since
// first_kv(i) <= i, and non-decreasing in j, since first_kv is).
static inline int last_query(const Model* M, int j) {
    int i = M->u - 1;
    while (first_kv(M, i) > j) i--;
    return i;
}
static inline void mark_skipped(Model* M, int i) { TraceScope ts(&M->ctx, "attention block skipped", TRACK_COMPUTE, i); }

// The MLP's hidden activations for rows [r0, r0 + n) of the chunk, from ln2: fch (n, F2), the
// pre-activations (M->fch, or with --keep-mlp the kept store's rows), and act (n, F) from them.
// The MLP runs in blocks of at most mr rows so that these stay small for wide models.
static inline void mlp_act(Model* M, const float* fch, size_t n) {
    Ctx* ctx = &M->ctx;
    (void)ctx;  // the CPU-only build's OP() does not read it
    if (M->cfg.family == GPT) OP(ctx, gelu_forward, M->act, fch, n * M->cfg.ffn);
    else OP(ctx, swiglu_forward, M->act, fch, n, M->cfg.ffn);  // (n, F)
}
static inline void mlp_hidden(Model* M, int l, size_t r0, size_t n, float* fch) {
    const Config& c = M->cfg;
    mm_forward(M, fch, M->ln2 + r0 * c.d_model, M->w.layer[l].fc_w, M->w.layer[l].fc_b, n, c.d_model, M->F2);  // (n, F2)
    mlp_act(M, fch, n);
}

// Where chunk_forward left what the backward reads: the working set, or the kept stores' slots.
struct ChunkActs {
    const float* o;     // (C, Hl, D) the attention output O_i
    const float* xmid;  // (cl, d) x_mid, the residual after attention
    const float* fch;   // (cl, F2) the MLP's pre-activations when kept (--keep-mlp), else null
};

// ----------------------------------------------------------------------------
// Forward: a layer, chunk by chunk

// Forward of layer l on chunk i, from x (cl, d) = the layer input. Leaves the chunk's
// intermediates in the working set or, those kept (below), in the kept stores' slots. Writes k_i,
// v_i to the store (later chunks attend to them) and, when recomputing for the backward pass,
// q_i and lse_i too. Returns the layer output in `out` unless out is null (the backward pass
// needs the intermediates, not the output), and where the chunk's attention output O_i
// (C, Hl, D), x_mid and MLP pre-activations are (ChunkActs).
// --keep-attention (M->run.keep_attn): the forward pass of a step (M->keeping) also keeps q_i
// (k_i, v_i are stored anyway: every layer's, in this mode), O_i and lse_i (attn_o, attn_lse),
// and the backward's recompute takes them instead of running the first norm, the QKV projection,
// RoPE and attention again.
// --keep-mlp (M->run.keep_mlp): likewise x_mid and the MLP's pre-activations (mlp_xmid, mlp_fch):
// the recompute skips the output projection and the MLP's first matmul, and redoes only the
// second norm (its statistics) and the activation.
static inline ChunkActs chunk_forward(Model* M, int l, int i, const float* x, float* out, bool for_backward) {
    const Config& c = M->cfg;
    const LayerW& w = M->w.layer[l];
    Ctx* ctx = &M->ctx;
    const size_t cl = M->cl, C = M->C, d = c.d_model, HD = (size_t)c.n_head * M->D;
    const int D = M->D, Hl = M->Hl, Hkvl = M->Hkvl;
    const int64_t kept = layer_in_chunk(l, M->u, i);  // chunk i of layer l in attn_o, attn_lse
    const bool recall = for_backward && M->run.keep_attn;  // O_i, lse_i from the stores, not attention
    const bool recall_mlp = for_backward && M->run.keep_mlp;  // x_mid_i, fch_i from the stores
    const bool fill_attn = M->keeping && !for_backward && M->run.keep_attn;  // the step's forward pass fills them
    const bool fill_mlp = M->keeping && !for_backward && M->run.keep_mlp;
    float* o = M->o;  // (C, Hl, D) O_i
    float* lse = M->lsew;  // (C, Hl) lse_i
    if (recall) {  // layer_backward prefetched them with the layer input; q_i, k_i, v_i are in their stores
        o = store_use(ctx, &M->attn_o, kept, slot_of(i));
        lse = store_use(ctx, &M->attn_lse, kept, slot_of(i));
    } else {
        {
            TraceScope ts(ctx, "norm + qkv", TRACK_COMPUTE, i);
            OP(ctx, norm_forward, M->ln1, M->mean1, M->rstd1, x, w.ln1_w, w.ln1_b, cl, d, M->rms, c.norm_eps);
            mm_forward(M, M->qkv, M->ln1, w.qkv_w, w.qkv_b, cl, d, M->Q3);  // (cl, Q3)
        }
        const int64_t qc = qkv_chunk(M, l, i);
        float* qi = store_produce(ctx, &M->q, qc, SLOT_NEW);  // (C, Hl, D)
        float* ki = store_produce(ctx, &M->k, qc, SLOT_NEW);  // (C, Hkvl, D)
        float* vi = store_produce(ctx, &M->v, qc, SLOT_NEW);  // (C, Hkvl, D)
        qkv_to_heads(M, i, M->qkv, qi, ki, vi);
        set_positions(M, i);
        OP(ctx, rope, qi, M->pos, C, Hl, D, rope_params(c), +1);
        OP(ctx, rope, ki, M->pos, C, Hkvl, D, rope_params(c), +1);
        round_stored(M, qi, C * Hl * D), round_stored(M, ki, C * Hkvl * D), round_stored(M, vi, C * Hkvl * D);
        store_put(ctx, &M->k, qc, SLOT_NEW);
        store_put(ctx, &M->v, qc, SLOT_NEW);
        if (for_backward || fill_attn) store_put(ctx, &M->q, qc, SLOT_NEW);
        if (fill_attn) o = store_produce(ctx, &M->attn_o, kept, SLOT_NEW), lse = store_produce(ctx, &M->attn_lse, kept, SLOT_NEW);
        // attention of q_i over k_j, v_j for first_kv(i) <= j <= i (0 without documents),
        // double-buffered: fetch j+1 while j computes. The first k_j, v_j were fetched at the end of
        // chunk i-1's attention (below), behind its MLP.
        dev_zero(ctx, o, C * Hl * D * sizeof(float));
        dev_fill(ctx, lse, -INFINITY, C * Hl);
        const int32_t* qdoc = set_query_docs(M, i);
        for (int j = 0; j < first_kv(M, i); j++) mark_skipped(M, i);
        for (int j = first_kv(M, i); j <= i; j++) {
            if (j + 1 < i)
                store_prefetch(ctx, &M->k, qkv_chunk(M, l, j + 1), slot_of(j + 1)),
                    store_prefetch(ctx, &M->v, qkv_chunk(M, l, j + 1), slot_of(j + 1));
            const float* kj = j == i ? ki : store_use(ctx, &M->k, qkv_chunk(M, l, j), slot_of(j));
            const float* vj = j == i ? vi : store_use(ctx, &M->v, qkv_chunk(M, l, j), slot_of(j));
            TraceScope ts(ctx, "attention block", TRACK_COMPUTE, i);
            OP(ctx, attention_forward, o, lse, qi, kj, vj, C, C, Hl, Hkvl, D, j == i, qdoc, (size_t)j * C);
        }
        // Both callers (layer_forward, layer_backward's phase 1) run the chunks in order: the next
        // chunk's first key/value block can come in now, while this chunk finishes.
        const int next = i + 1 < M->u ? first_kv(M, i + 1) : i + 1;
        if (next <= i)
            store_prefetch(ctx, &M->k, qkv_chunk(M, l, next), slot_of(next)),
                store_prefetch(ctx, &M->v, qkv_chunk(M, l, next), slot_of(next));
        if (fill_attn) store_put(ctx, &M->attn_o, kept, SLOT_NEW), store_put(ctx, &M->attn_lse, kept, SLOT_NEW);
    }
    if (for_backward) {
        dev_copy(ctx, store_produce(ctx, &M->lse, i, SLOT_NEW), lse, C * Hl * sizeof(float));
        store_put(ctx, &M->lse, i, SLOT_NEW);
    }
    o_to_seq(M, i, o, M->oloc);

    float* xmid = M->xmid;  // (cl, d)
    if (recall_mlp) {  // layer_backward prefetched it with the layer input
        xmid = store_use(ctx, &M->mlp_xmid, kept, slot_of(i));
    } else {
        TraceScope ts(ctx, "out proj", TRACK_COMPUTE, i);
        if (fill_mlp) xmid = store_produce(ctx, &M->mlp_xmid, kept, SLOT_NEW);
        mm_forward(M, xmid, M->oloc, w.o_w, w.o_b, cl, (int)HD, d);  // (cl, d)
        OP(ctx, add_inplace, xmid, x, cl * d);                        // residual
    }
    OP(ctx, norm_forward, M->ln2, M->mean2, M->rstd2, xmid, w.ln2_w, w.ln2_b, cl, d, M->rms, c.norm_eps);
    if (!out) return {o, xmid, recall_mlp ? store_use(ctx, &M->mlp_fch, kept, slot_of(i)) : nullptr};
    // (the backward pass runs the MLP itself, block by block: layer_backward)
    TraceScope ts(ctx, "mlp", TRACK_COMPUTE, i);
    float* fch = fill_mlp ? store_produce(ctx, &M->mlp_fch, kept, SLOT_NEW) : nullptr;  // (cl, F2)
    for (size_t r0 = 0; r0 < cl; r0 += M->mr) {
        const size_t n = std::min(M->mr, cl - r0);
        mlp_hidden(M, l, r0, n, fch ? fch + r0 * M->F2 : M->fch);
        mm_forward(M, out + r0 * d, M->act, w.proj_w, w.proj_b, n, c.ffn, d);
    }
    OP(ctx, add_inplace, out, xmid, cl * d);  // residual
    round_stored(M, out, cl * d);             // the next layer's input (kept: the backward recomputes from it)
    if (fill_mlp) store_put(ctx, &M->mlp_xmid, kept, SLOT_NEW), store_put(ctx, &M->mlp_fch, kept, SLOT_NEW);
    return {o, xmid, fch};
}

static inline void layer_forward(Model* M, int l) {
    Ctx* ctx = &M->ctx;
    const int u = M->u;
    ctx->layer = l;
    store_prefetch(ctx, &M->layer_in, layer_in_chunk(l, u, 0), slot_of(0));
    for (int i = 0; i < u; i++) {
        if (i + 1 < u) store_prefetch(ctx, &M->layer_in, layer_in_chunk(l, u, i + 1), slot_of(i + 1));
        const float* x = store_use(ctx, &M->layer_in, layer_in_chunk(l, u, i), slot_of(i));
        float* out = store_produce(ctx, &M->layer_in, layer_in_chunk(l + 1, u, i), SLOT_NEW);
        chunk_forward(M, l, i, x, out, false);
        store_put(ctx, &M->layer_in, layer_in_chunk(l + 1, u, i), SLOT_NEW);
    }
}

// ----------------------------------------------------------------------------
// The head: final norm, LM head, cross-entropy (and back through them)

// acc[0] += sum of x (n), in double, in order (a single thread block on the GPU, so the sum does
// not depend on scheduling).
static inline void accumulate_cpu(double* acc, const float* x, size_t n) {
    double s = 0.0;
    for (size_t t = 0; t < n; t++) s += x[t];
    acc[0] += s;
}
#ifdef __CUDACC__
static __global__ void accumulate_kernel(double* acc, const float* x, size_t n) {  // twin of accumulate_cpu
    __shared__ double part[256];
    double s = 0.0;
    for (size_t t = threadIdx.x; t < n; t += blockDim.x) s += x[t];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int k = 0; k < (int)blockDim.x; k++) total += part[k];
        acc[0] += total;
    }
}
static inline void accumulate_gpu(cudaStream_t s, double* acc, const float* x, size_t n) {
    if (n == 0) return;
    accumulate_kernel<<<1, 256, 0, s>>>(acc, x, n);
    CUDA_LAUNCHED();
}
#endif

// The LM head and its cross-entropy, chunk by chunk: the (S, V) logits never exist. With grads,
// also back through the head and the final norm, leaving dL/d(last layer output) in dresid.
// This rank's sum of token losses goes to M->acc[0]; predictions to M->preds, and without grads
// (evaluation) each token's loss to M->token_loss (the loss by position).
static inline void head_pass(Model* M, bool grads) {
    const Config& c = M->cfg;
    Ctx* ctx = &M->ctx;
    const size_t cl = M->cl, d = c.d_model;
    const int u = M->u, L = c.n_layer;
    const float dscale = 1.0f / ((float)M->run.seq * (float)M->run.batch);  // the step's mean: over B sequences of S tokens
    ctx->layer = L;
    store_prefetch(ctx, &M->layer_in, layer_in_chunk(L, u, 0), slot_of(0)), store_prefetch(ctx, &M->targets, 0, slot_of(0));
    for (int i = 0; i < u; i++) {
        if (i + 1 < u) store_prefetch(ctx, &M->layer_in, layer_in_chunk(L, u, i + 1), slot_of(i + 1)), store_prefetch(ctx, &M->targets, i + 1, slot_of(i + 1));
        const float* x = store_use(ctx, &M->layer_in, layer_in_chunk(L, u, i), slot_of(i));
        const int32_t* tg = store_use<int32_t>(ctx, &M->targets, i, slot_of(i));
        TraceScope ts(ctx, "head + loss", TRACK_COMPUTE, i);
        OP(ctx, norm_forward, M->y, M->mean1, M->rstd1, x, M->w.lnf_w, M->w.lnf_b, cl, d, M->rms, c.norm_eps);
        if (grads) dev_zero(ctx, M->dy, cl * d * sizeof(float));
        for (size_t r0 = 0; r0 < cl; r0 += M->hr) {  // hr rows at a time: the logits are (hr, V)
            const size_t n = std::min(M->hr, cl - r0), at = i * cl + r0;  // rows, and where they sit on this rank
            mm_forward(M, M->logits, M->y + r0 * d, M->w.head, nullptr, n, d, c.vocab);  // (n, V)
            if (M->logits_out) dev_to_host_async(ctx, M->logits_out + at * c.vocab, M->logits, n * c.vocab * sizeof(float));
            OP(ctx, crossentropy, M->logits, M->lossw, M->predw, tg + r0, n, c.vocab, dscale);
            dev_to_host_async(ctx, M->preds + at, M->predw, n * sizeof(int32_t));
            if (!grads) dev_to_host_async(ctx, M->token_loss + at, M->lossw, n * sizeof(float));  // evaluation only
            OP(ctx, accumulate, M->acc, M->lossw, n);
            if (grads)
                mm_backward(M, M->dy + r0 * d, M->g.head, nullptr, M->logits, M->y + r0 * d, M->w.head, n, d, c.vocab);
        }
        if (!grads) continue;
        float* dlast = store_produce(ctx, &M->dresid, i, slot_of(i));  // (cl, d) dL/d(last layer output)
        dev_zero(ctx, dlast, cl * d * sizeof(float));
        OP(ctx, norm_backward, dlast, M->g.lnf_w, M->g.lnf_b, M->dy, x, M->w.lnf_w, M->mean1, M->rstd1, cl, d, M->rms);
        store_put(ctx, &M->dresid, i, slot_of(i));
    }
}

// ----------------------------------------------------------------------------
// Backward: a layer in two phases

static inline void layer_backward_attention(Model* M, int l);  // phase 2, below

// Backward of layer l. The store dresid holds dL/d(output of layer l) and is turned, in place,
// into dL/d(input of layer l). Parameter gradients accumulate into M->g.
static inline void layer_backward(Model* M, int l) {
    const Config& c = M->cfg;
    const LayerW& w = M->w.layer[l];
    const LayerW& g = M->g.layer[l];
    Ctx* ctx = &M->ctx;
    const int u = M->u, D = M->D, Hl = M->Hl;
    const size_t cl = M->cl, C = M->C, d = c.d_model, HD = (size_t)c.n_head * M->D;
    ctx->layer = l;

    // Phase 1, chunk by chunk: recompute the forward from the layer input (storing q, k, v, lse),
    // then back through the MLP and the output projection down to dO_i; dresid_i becomes dL/dx_mid.
    // With --keep-attention, the forward pass's O_i and lse_i come in with the layer input instead
    // of attention running again.
    const bool need_x = !(M->run.keep_attn && M->run.keep_mlp);  // (with both, the recompute reads no layer input)
    auto fetch = [&](int i) {
        if (need_x) store_prefetch(ctx, &M->layer_in, layer_in_chunk(l, u, i), slot_of(i));
        store_prefetch(ctx, &M->dresid, i, slot_of(i));
        if (M->run.keep_attn)
            store_prefetch(ctx, &M->attn_o, layer_in_chunk(l, u, i), slot_of(i)),
                store_prefetch(ctx, &M->attn_lse, layer_in_chunk(l, u, i), slot_of(i));
        if (M->run.keep_mlp)
            store_prefetch(ctx, &M->mlp_xmid, layer_in_chunk(l, u, i), slot_of(i)),
                store_prefetch(ctx, &M->mlp_fch, layer_in_chunk(l, u, i), slot_of(i));
    };
    fetch(0);
    for (int i = 0; i < u; i++) {
        if (i + 1 < u) fetch(i + 1);
        const float* x = need_x ? store_use(ctx, &M->layer_in, layer_in_chunk(l, u, i), slot_of(i)) : nullptr;
        const ChunkActs acts = chunk_forward(M, l, i, x, nullptr, true);
        float* dres = store_use(ctx, &M->dresid, i, slot_of(i));  // (cl, d) dL/d(layer output), made dL/d(x_mid)
        {
            TraceScope ts(ctx, "mlp backward", TRACK_COMPUTE, i);
            dev_zero(ctx, M->dln, cl * d * sizeof(float));
            for (size_t r0 = 0; r0 < cl; r0 += M->mr) {  // recompute the hidden rows, then back through them
                const size_t n = std::min(M->mr, cl - r0);
                const float* fch = acts.fch ? acts.fch + r0 * M->F2 : M->fch;  // (n, F2)
                if (acts.fch) mlp_act(M, fch, n);  // kept: the activation alone
                else mlp_hidden(M, l, r0, n, M->fch);
                dev_zero(ctx, M->dact, n * c.ffn * sizeof(float));
                mm_backward(M, M->dact, g.proj_w, g.proj_b, dres + r0 * d, M->act, w.proj_w, n, c.ffn, d);
                if (c.family == GPT) OP(ctx, gelu_backward, M->dfch, fch, M->dact, n * c.ffn);
                else OP(ctx, swiglu_backward, M->dfch, fch, M->dact, n, c.ffn);
                mm_backward(M, M->dln + r0 * d, g.fc_w, g.fc_b, M->dfch, M->ln2 + r0 * d, w.fc_w, n, d, M->F2);
            }
            OP(ctx, norm_backward, dres, g.ln2_w, g.ln2_b, M->dln, acts.xmid, w.ln2_w, M->mean2, M->rstd2, cl, d, M->rms);
            dev_zero(ctx, M->doloc, cl * HD * sizeof(float));
            mm_backward(M, M->doloc, g.o_w, g.o_b, dres, M->oloc, w.o_w, cl, (int)HD, d);
        }
        store_put(ctx, &M->dresid, i, slot_of(i));
        float* doi = store_produce(ctx, &M->dout, i, SLOT_NEW);  // (C, Hl, D)
        do_to_heads(M, i, M->doloc, doi);
        round_stored(M, doi, C * Hl * D);
        // Delta_i = rowsum(dO_i . O_i) reads O_i where chunk_forward above left it: the working set
        // (its recompute), or the kept store's slot; either way this is the last moment it is read.
        OP(ctx, attention_delta, store_produce(ctx, &M->delta, i, SLOT_NEW), doi, acts.o, C, Hl, D);
        store_put(ctx, &M->dout, i, SLOT_NEW);
        store_put(ctx, &M->delta, i, SLOT_NEW);
    }
    layer_backward_attention(M, l);
}

// Backward of layer l, phase 2 (attention): outer loop over kv chunks j, inner over query chunks
// i >= j, from the last that sees j (last_query: u - 1 without documents) down to j so that the
// last visit, i == j, leaves the final dQ_j in its slot. Then dQ_j, dK_j, dV_j go back through
// RoPE, the all-to-all, the QKV projection and the first norm, taking dresid_j from
// dL/d(x_mid of l) to dL/d(input of l).
static inline void layer_backward_attention(Model* M, int l) {
    const Config& c = M->cfg;
    const LayerW& w = M->w.layer[l];
    const LayerW& g = M->g.layer[l];
    Ctx* ctx = &M->ctx;
    const int u = M->u, D = M->D, Hl = M->Hl, Hkvl = M->Hkvl;
    const size_t cl = M->cl, C = M->C, d = c.d_model;
    ChunkStore* qset[] = {&M->dout, &M->lse, &M->delta};  // and q (chunk qkv_chunk(l, i))
    // The query side (q, dO, lse, delta and dQ of chunk i) alternates between two slots as i runs
    // down. A copy-in waits for all compute queued before it is issued, so j + 1's first chunk
    // (last_query(j + 1)) is fetched as soon as j's block i = j + 1 is queued, into the slot that
    // block used: its copies run beside j's last block and QKV backward, instead of after them
    // with compute waiting. Each j's slots are flipped (`flip`) so that j + 1's first chunk never
    // lands in the slot of j's last one (i = j), whose dQ_j the QKV backward still reads.
    auto prefetch = [&](int jj, int i, int flip) {  // chunk i of the query side, for kv chunk jj
        store_prefetch(ctx, &M->q, qkv_chunk(M, l, i), slot_of(i, flip));
        for (ChunkStore* s : qset) store_prefetch(ctx, s, i, slot_of(i, flip));
        if (jj > first_kv(M, i)) store_prefetch(ctx, &M->dq, i, slot_of(i, flip));  // on the first visit dQ_i starts at zero
    };
    store_prefetch(ctx, &M->k, qkv_chunk(M, l, 0), slot_of(0)), store_prefetch(ctx, &M->v, qkv_chunk(M, l, 0), slot_of(0));
    prefetch(0, last_query(M, 0), 0);
    for (int j = 0, flip = 0; j < u; j++) {
        const int last = last_query(M, j), next_first = j + 1 < u ? last_query(M, j + 1) : 0;
        const int next_flip = (flip + j + next_first + 1) % 2;  // slot_of(next_first, next_flip) != slot_of(j, flip)
        for (int i = u - 1; i > last; i--) mark_skipped(M, i);
        // then, in the order needed: the next kv chunk, and what the end of this j needs
        if (j + 1 < u)
            store_prefetch(ctx, &M->k, qkv_chunk(M, l, j + 1), slot_of(j + 1)),
                store_prefetch(ctx, &M->v, qkv_chunk(M, l, j + 1), slot_of(j + 1));
        store_prefetch(ctx, &M->layer_in, layer_in_chunk(l, u, j), SLOT_SINGLE);  // for the QKV backward at the end of this j
        store_prefetch(ctx, &M->dresid, j, SLOT_SINGLE);
        const float* kj = store_use(ctx, &M->k, qkv_chunk(M, l, j), slot_of(j));
        const float* vj = store_use(ctx, &M->v, qkv_chunk(M, l, j), slot_of(j));
        dev_zero(ctx, M->dk, C * Hkvl * D * sizeof(float));
        dev_zero(ctx, M->dv, C * Hkvl * D * sizeof(float));
        float* dqi = nullptr;
        for (int i = last; i >= j; i--) {
            if (i - 1 >= j) prefetch(j, i - 1, flip);
            const int si = slot_of(i, flip);
            const float* qi = store_use(ctx, &M->q, qkv_chunk(M, l, i), si);
            const float* doi = store_use(ctx, &M->dout, i, si);
            const float* lsei = store_use(ctx, &M->lse, i, si);
            const float* dli = store_use(ctx, &M->delta, i, si);
            if (j == first_kv(M, i)) {
                dqi = store_produce(ctx, &M->dq, i, si);
                dev_zero(ctx, dqi, C * Hl * D * sizeof(float));
            } else {
                dqi = store_use(ctx, &M->dq, i, si);
            }
            {
                TraceScope ts(ctx, "attention block backward", TRACK_COMPUTE, i);
                OP(ctx, attention_backward, dqi, M->dk, M->dv, doi, qi, kj, vj, lsei, dli, C, C, Hl, Hkvl, D, i == j,
                   set_query_docs(M, i), (size_t)j * C);
            }
            if (i != j) store_put(ctx, &M->dq, i, si);
            if (j + 1 < u && i == std::min(j + 1, last))  // the next j's first chunk, into the slot i = j + 1
                prefetch(j + 1, next_first, next_flip);     // used (or, if no block i > j, after i = j)
        }
        flip = next_flip;
        // dQ_j, dK_j, dV_j are final: undo RoPE, back to the sequence layout, through the QKV
        // projection and the first norm (recomputed from the layer input) into dresid_j.
        set_positions(M, j);
        OP(ctx, rope, dqi, M->pos, C, Hl, D, rope_params(c), -1);
        OP(ctx, rope, M->dk, M->pos, C, Hkvl, D, rope_params(c), -1);
        dqkv_to_seq(M, j, dqi, M->dk, M->dv, M->dqkv);
        const float* x = store_use(ctx, &M->layer_in, layer_in_chunk(l, u, j), SLOT_SINGLE);
        float* dres = store_use(ctx, &M->dresid, j, SLOT_SINGLE);  // (cl, d) dL/d(x_mid), made dL/d(layer input)
        TraceScope ts(ctx, "qkv backward", TRACK_COMPUTE, j);
        OP(ctx, norm_forward, M->ln1, M->mean1, M->rstd1, x, w.ln1_w, w.ln1_b, cl, d, M->rms, c.norm_eps);
        dev_zero(ctx, M->dln, cl * d * sizeof(float));
        mm_backward(M, M->dln, g.qkv_w, g.qkv_b, M->dqkv, M->ln1, w.qkv_w, cl, d, M->Q3);
        OP(ctx, norm_backward, dres, g.ln1_w, g.ln1_b, M->dln, x, w.ln1_w, M->mean1, M->rstd1, cl, d, M->rms);
        store_put(ctx, &M->dresid, j, SLOT_SINGLE);
    }
}

// ----------------------------------------------------------------------------
// The whole pass

// One forward (and, with grads, backward) pass over the sequence in the token stores. Returns the
// mean loss over its S tokens (summed over the sequence-parallel group). Gradients are this rank's
// partial sums of the step's loss (see model_update); with accumulate they add to those the step's
// earlier sequences left (zero.h says where, stage by stage).
static inline float model_forward_backward(Model* M, bool grads, bool accumulate = false) {
    const Config& c = M->cfg;
    Ctx* ctx = &M->ctx;
    const size_t cl = M->cl, d = c.d_model;
    const int u = M->u, L = c.n_layer;
    M->accumulate = grads && accumulate;
    M->keeping = grads;  // (evaluation, no grads, has no backward to keep anything for)
    if (grads && M->grads && !accumulate) dev_zero(ctx, M->grads, M->n_padded * sizeof(float));
    if (M->run.bf16 && M->wlow) OP(ctx, to_bf16, M->wlow, M->params, M->n_padded);  // the weights may have changed since the last pass
    zero_pass_begin(M, grads);  // ZeRO-3: the embedding's weights, layer 0's on their way
    ctx->layer = -1;
    store_prefetch(ctx, &M->tokens, 0, slot_of(0));
    for (int i = 0; i < u; i++) {  // embedding -> layer 0's input
        if (i + 1 < u) store_prefetch(ctx, &M->tokens, i + 1, slot_of(i + 1));
        const int32_t* tok = store_use<int32_t>(ctx, &M->tokens, i, slot_of(i));
        TraceScope ts(ctx, "embedding", TRACK_COMPUTE, i);
        float* x0 = store_produce(ctx, &M->layer_in, i, SLOT_NEW);  // (cl, d)
        OP(ctx, embedding_forward, x0, tok, M->w.wte, cl, d);
        round_stored(M, x0, cl * d);
        store_put(ctx, &M->layer_in, i, SLOT_NEW);
    }
    // ZeRO-3's timing, all of it here. Each zero_weights_for(g, next) waits for group g's gather
    // and issues next's behind it, so a layer's weights arrive while the layer before computes.
    // The embedding has a buffer of its own, gathered once (zero_pass_begin) and held through the
    // pass; layers and the tail share a double buffer, group g in slot g % 2 (zero_slot). Adjacent
    // groups alternate slots, so a gather never lands in the slot being read. The turn from
    // forward to backward relies on that parity: the last layer (group L, slot L % 2) and the tail
    // (group L + 1, the other slot) are both resident at the head, so the backward starts on the
    // last layer without gathering it again, and layer L-2's gather takes the tail's slot once
    // the head is done. Every later layer is gathered again for its backward.
    for (int l = 0; l < L; l++) {
        zero_weights_for(M, group_of_layer(l), l + 1 < L ? group_of_layer(l + 1) : tail_group(M));
        layer_forward(M, l);
    }
    dev_zero(ctx, M->acc, sizeof(double));
    zero_weights_for(M, tail_group(M), grads ? group_of_layer(L - 1) : -1);
    if (grads) zero_grads_for(M, tail_group(M));
    head_pass(M, grads);
    if (grads) {
        zero_grads_done(M, tail_group(M));  // the final norm's and an untied head's gradients are final
        for (int l = L - 1; l >= 0; l--) {
            zero_weights_for(M, group_of_layer(l), l > 0 ? group_of_layer(l - 1) : -1);
            zero_grads_for(M, group_of_layer(l));
            layer_backward(M, l);
            zero_grads_done(M, group_of_layer(l));  // reduce-scattered while the next layer computes
        }
        ctx->layer = -1;
        store_prefetch(ctx, &M->tokens, 0, slot_of(0)), store_prefetch(ctx, &M->dresid, 0, slot_of(0));
        for (int i = 0; i < u; i++) {
            if (i + 1 < u) store_prefetch(ctx, &M->tokens, i + 1, slot_of(i + 1)), store_prefetch(ctx, &M->dresid, i + 1, slot_of(i + 1));
            const int32_t* tok = store_use<int32_t>(ctx, &M->tokens, i, slot_of(i));
            const float* dembed = store_use(ctx, &M->dresid, i, slot_of(i));  // (cl, d) dL/d(layer 0 input)
            TraceScope ts(ctx, "embedding backward", TRACK_COMPUTE, i);
            OP(ctx, embedding_backward, M->g.wte, tok, dembed, cl, d);
        }
        zero_grads_done(M, 0);  // wte: the embedding's (and a tied head's) gradient is final
    }
    zero_pass_end(M);
    double loss = 0.0;
    dev_download(ctx, &loss, M->acc, sizeof(double));  // waits for the whole pass: the one sync
    comm_sp_allreduce(&loss, 1);
    return (float)(loss / M->run.seq);
}

// The optimizer step, model_update, is in zero.h (it is the sharding's).

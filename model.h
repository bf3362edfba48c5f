// model.h: the model on one rank, and nothing that runs a pass. Configurations and presets; the
// parameter table and its views; a run's shape (RunCfg) and its rules; struct Model (parameters,
// gradients, optimizer state, the host store, the O(C) working set) and its memory layout; the
// tensor groups the sharding moves (zero.h); creation, initialisation and token placement.
// What runs a pass over this model is in schedule.h; the all-to-all in ulysses.h; the sharding
// and the optimizer step in zero.h. Each of those includes this file; this file includes none of them.
//
// Notation: S sequence length (global), P ranks of the sequence-parallel group (--sp), W ranks in
// all (the world: W / P data-parallel replicas of the group), C chunk length (global), u = S/C
// chunks, cl = C/P tokens of a chunk on this rank, H/Hkv query/kv heads, Hl/Hkvl the heads of this rank
// after the all-to-all, D head size, d model width, V vocab, L layers, F the MLP's hidden width
// (F2 = 2F for SwiGLU's gate and up halves), Q3 = (H + 2 Hkv) D the QKV projection's width.
#pragma once
#include <map>
#include <string>
#include <vector>
#include "attention.cuh"
#include "comm.h"
#include "common.h"
#include "loss.cuh"
#include "offload.h"
#include "ops.cuh"

// ----------------------------------------------------------------------------
// Ops on the chosen backend: op(ctx, args) runs op_cpu(args) on the CPU and, in the nvcc build,
// op_gpu(compute stream, args) on the GPU. The schedule below is written once in these terms.

#ifdef __CUDACC__
#define OP(ctx, op, ...) ((ctx)->gpu ? op##_gpu((ctx)->g->compute, __VA_ARGS__) : op##_cpu(__VA_ARGS__))
#define MATMUL(ctx, op, ...) ((ctx)->gpu ? op##_gpu((ctx)->g->blas, (ctx)->g->compute, __VA_ARGS__) : op##_cpu(__VA_ARGS__))
#else
#define OP(ctx, op, ...) op##_cpu(__VA_ARGS__)
#define MATMUL(ctx, op, ...) op##_cpu(__VA_ARGS__)
#endif

// ----------------------------------------------------------------------------
// Configurations

enum Family { GPT = 0, LLAMA = 1 };

enum RopeScaling { ROPE_NONE = 0, ROPE_LINEAR = 1, ROPE_LLAMA3 = 2 };

struct Config {
    char name[32];  // a preset's name, or the name an imported model was given
    int family;
    int n_layer, d_model, n_head, n_kv_head, ffn, vocab;
    float rope_theta, norm_eps;
    const char* note;
    // The presets leave these at their defaults; imported models (data/hf.py) and the RoPE flags
    // set them, and checkpoints carry them.
    int head_dim = 0;             // D; 0: d_model / n_head
    bool tie_embeddings = false;  // llama: the LM head is wte (gpt always ties)
    int rope_scaling = ROPE_NONE; // ROPE_LINEAR: positions / rope_factor; ROPE_LLAMA3: Llama 3.1's frequency bands
    float rope_factor = 1.0f, rope_low_freq_factor = 1.0f, rope_high_freq_factor = 4.0f;
    int rope_original_max_pos = 8192;  // ROPE_LLAMA3: the context the frequencies were trained for
};

// Head size D, and whether the LM head is the embedding matrix.
static inline int head_dim(const Config& c) { return c.head_dim ? c.head_dim : c.d_model / c.n_head; }
static inline bool tied_head(const Config& c) { return c.family == GPT || c.tie_embeddings; }

// gpt: LayerNorm, GELU MLP (4x), biases, multi-head attention, RoPE, tied embeddings.
// llama: RMSNorm, SwiGLU MLP, no biases, grouped-query attention, RoPE, untied embeddings.
// vocab 260 = bytes + the specials of data/data.h (byte-level models).
static const Config presets[] = {
    {"tiny", LLAMA, 2, 64, 4, 2, 176, 260, 10000.0f, 1e-5f, "unit tests"},
    {"gpt-tiny", GPT, 2, 64, 4, 4, 256, 260, 10000.0f, 1e-5f, "unit tests"},
    {"small", LLAMA, 2, 128, 4, 2, 352, 260, 1e8f, 1e-5f, "default: learns passkey on a CPU in minutes"},
    {"gpt-small", GPT, 2, 128, 4, 4, 512, 260, 10000.0f, 1e-5f, "CPU training"},
    {"medium", LLAMA, 6, 384, 6, 2, 1024, 260, 10000.0f, 1e-5f, "CPU/GPU training"},
    {"gpt-medium", GPT, 6, 384, 6, 6, 1536, 260, 10000.0f, 1e-5f, "CPU/GPU training"},
    {"llama-peer", LLAMA, 4, 2048, 16, 4, 5632, 32000, 500000.0f, 1e-5f, "the PyTorch peer's model (bench/)"},
    {"gpt-2.7b", GPT, 32, 2560, 32, 32, 10240, 50304, 10000.0f, 1e-5f, "paper size (planning)"},
    {"gpt-6.7b", GPT, 32, 4096, 32, 32, 16384, 50304, 10000.0f, 1e-5f, "paper size (planning)"},
    {"gpt-13b", GPT, 40, 5120, 40, 40, 20480, 50304, 10000.0f, 1e-5f, "paper size (planning)"},
    {"gpt-30b", GPT, 48, 7168, 56, 56, 28672, 50304, 10000.0f, 1e-5f, "paper size (planning)"},
    {"llama3-8b", LLAMA, 32, 4096, 32, 8, 14336, 128256, 500000.0f, 1e-5f, "paper size (planning)"},
    {"llama3-70b", LLAMA, 80, 8192, 64, 8, 28672, 128256, 500000.0f, 1e-5f, "paper size (planning)"},
};

static inline const Config* find_preset(const std::string& name) {
    for (const Config& c : presets)
        if (name == c.name) return &c;
    return nullptr;
}

// ----------------------------------------------------------------------------
// Parameters: one flat fp32 array; the table gives each tensor's name, shape and offset
// (names match test/make_reference.py).

struct ParamInfo {
    std::string name;
    size_t rows, cols, offset;
    bool decay;  // weight decay for matrices and embeddings, not for norms and biases
    size_t numel() const { return rows * cols; }
};

static inline std::vector<ParamInfo> param_table(const Config& c, size_t* total) {
    const bool gpt = c.family == GPT;
    const size_t d = c.d_model, D = head_dim(c), Q3 = (c.n_head + 2 * c.n_kv_head) * D;
    const size_t F2 = gpt ? c.ffn : 2 * (size_t)c.ffn;
    std::vector<ParamInfo> t;
    size_t off = 0;
    auto add = [&](const std::string& n, size_t r, size_t cols, bool decay) {
        t.push_back({n, r, cols, off, decay});
        off += r * cols;
    };
    add("wte", c.vocab, d, true);
    for (int l = 0; l < c.n_layer; l++) {
        std::string p = "h." + std::to_string(l) + ".";
        add(p + "ln1_w", 1, d, false);
        if (gpt) add(p + "ln1_b", 1, d, false);
        add(p + "qkv_w", Q3, d, true);
        if (gpt) add(p + "qkv_b", 1, Q3, false);
        add(p + "o_w", d, c.n_head * D, true);
        if (gpt) add(p + "o_b", 1, d, false);
        add(p + "ln2_w", 1, d, false);
        if (gpt) add(p + "ln2_b", 1, d, false);
        add(p + "fc_w", F2, d, true);
        if (gpt) add(p + "fc_b", 1, F2, false);
        add(p + "proj_w", d, c.ffn, true);
        if (gpt) add(p + "proj_b", 1, d, false);
    }
    add("lnf_w", 1, d, false);
    if (gpt) add("lnf_b", 1, d, false);
    if (!tied_head(c)) add("lm_head", c.vocab, d, true);
    *total = off;
    return t;
}

// Pointers to one layer's tensors inside the flat parameter (or gradient) array; null if absent.
struct LayerW {
    float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *o_w, *o_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *proj_w, *proj_b;
};
struct ModelW {
    float *wte, *lnf_w, *lnf_b, *head;  // head == wte when tied (gpt)
    std::vector<LayerW> layer;
};

// With [lo, hi): base holds only that range of the array (a ZeRO buffer); tensors outside it are null.
static inline ModelW model_views(const Config& c, const std::vector<ParamInfo>& table, float* base, size_t lo = 0,
                                 size_t hi = SIZE_MAX) {
    std::map<std::string, float*> at;
    for (const ParamInfo& p : table) at[p.name] = base && p.offset >= lo && p.offset < hi ? base + (p.offset - lo) : nullptr;
    auto get = [&](const std::string& n) { return at.count(n) ? at[n] : nullptr; };
    ModelW w;
    w.wte = get("wte");
    w.lnf_w = get("lnf_w");
    w.lnf_b = get("lnf_b");
    w.head = tied_head(c) ? w.wte : get("lm_head");
    for (int l = 0; l < c.n_layer; l++) {
        std::string p = "h." + std::to_string(l) + ".";
        w.layer.push_back({get(p + "ln1_w"), get(p + "ln1_b"), get(p + "qkv_w"), get(p + "qkv_b"), get(p + "o_w"),
                           get(p + "o_b"), get(p + "ln2_w"), get(p + "ln2_b"), get(p + "fc_w"), get(p + "fc_b"),
                           get(p + "proj_w"), get(p + "proj_b")});
    }
    return w;
}

// ----------------------------------------------------------------------------
// A run's shape on this rank

struct RunCfg {
    size_t seq = 0, chunk = 0;  // global S and C (chunk 0 = the whole sequence)
    bool offload = false;
    int zero = 0;       // ZeRO stage (zero.h): 1 optimizer state, 2 and gradients, 3 and weights sharded
    int P = 1, rank = 0;  // the sequence-parallel group (--sp): its ranks, and this rank in it
    int world = 1, world_rank = 0;  // every rank (W = P x replicas): the ZeRO shards and checkpoints are cut W ways
    int batch = 1;        // B: sequences per optimizer step, all replicas together; the loss is the mean over B S tokens
    size_t device_cap = 0, host_cap = 0;  // refuse to start above these bytes (0 = no limit)
    size_t head_rows = 0;                 // LM head rows at once (0: as many as fit 64M logits)
    size_t mlp_rows = 0;                  // MLP rows at once (0: as many as fit 64M hidden values)
    bool bf16 = false;  // --precision bf16: bf16 matmul operands and bf16 sequence-sized stores (see below)
    int32_t doc_bos = -1;  // --doc-mask 1: the token that starts a document (data.h's TOK_BOS); -1: one document
    bool keep_attn = false;  // --keep-attention 1: every layer's q, k, v, attention output and lse kept from the
                             // forward pass for the backward, which then runs neither the QKV projection nor
                             // attention's forward again
    bool keep_mlp = false;   // --keep-mlp 1: every layer's x_mid and MLP hidden pre-activations kept from the
                             // forward pass, so the backward does not run the output projection and the MLP's
                             // first matmul again
};

// The world's layout: W ranks in groups of N (--sp), B sequences a step (--batch) spread over the
// R = W / N replicas. Returns "" or one line saying what is wrong.
static inline std::string check_layout(int W, int N, long long B) {
    char b[512];
    const int R = N >= 1 && N <= W && W % N == 0 ? W / N : 1;
    if (N < 1 || N > W) snprintf(b, sizeof b, "--sp %d: a sequence-parallel group of 1 to %d ranks (there are %d)", N, W, W);
    else if (W % N) snprintf(b, sizeof b, "--sp %d does not divide the %d ranks into sequence-parallel groups (W %% N must be 0)", N, W);
    else if (B < 1) snprintf(b, sizeof b, "--batch %lld: at least one sequence per step", B);
    else if (B % R) snprintf(b, sizeof b, "--batch %lld is not a multiple of the %d data-parallel replicas (%d ranks / --sp %d; B %% R must be 0)", B, R, W, N);
    else return "";
    return b;
}

// " of a sequence-parallel group (--sp)" when the group is not every rank, for messages.
static inline const char* sp_words(const RunCfg& r) { return r.P < r.world ? " of a sequence-parallel group (--sp)" : ""; }

// Checks every divisibility rule; returns "" or one line saying what is wrong.
static inline std::string check_shape(const Config& c, const RunCfg& r) {
    char b[512];
    const size_t C = r.chunk ? r.chunk : r.seq;
    const int D = head_dim(c);
    if (!c.head_dim && c.d_model % c.n_head) snprintf(b, sizeof b, "model %s: d_model %d is not a multiple of n_head %d", c.name, c.d_model, c.n_head);
    else if (D % 2 || D > 512) snprintf(b, sizeof b, "model %s: head size %d must be even and at most 512", c.name, D);
    else if (c.n_head % c.n_kv_head) snprintf(b, sizeof b, "model %s: n_head %d is not a multiple of n_kv_head %d", c.name, c.n_head, c.n_kv_head);
    else if (r.seq < 1) snprintf(b, sizeof b, "--seq must be at least 1");
    else if (r.seq > (size_t)INT32_MAX) snprintf(b, sizeof b, "--seq %zu: positions past 2^31-1 = 2147483647 do not fit the int32 positions RoPE is given", r.seq);
    else if (r.seq % C) snprintf(b, sizeof b, "--chunk-size %zu does not divide --seq %zu (S %% C must be 0)", C, r.seq);
    else if (C % r.P) snprintf(b, sizeof b, "--chunk-size %zu is not a multiple of the %d ranks%s (C %% P must be 0)", C, r.P, sp_words(r));
    else if (c.n_head % r.P) snprintf(b, sizeof b, "model %s has %d heads, not a multiple of the %d ranks%s (H %% P must be 0)", c.name, c.n_head, r.P, sp_words(r));
    else if (c.n_kv_head % r.P && r.P % c.n_kv_head) snprintf(b, sizeof b, "model %s has %d kv heads; with %d ranks%s one must divide the other", c.name, c.n_kv_head, r.P, sp_words(r));
    else if (r.offload && C == r.seq) snprintf(b, sizeof b, "--offload 1 needs chunking: set --chunk-size below --seq %zu (one chunk leaves nothing to stream)", r.seq);
    else return "";
    return b;
}

// ----------------------------------------------------------------------------
// The model on one rank: parameters, gradients, optimizer state, the host store and the O(C)
// working set, all taken from two arenas.

struct Model {
    Config cfg;
    RunCfg run;
    Ctx ctx;
    // derived shape
    int D, Hl, Hkvl, Q3, F2;
    int u;          // chunks
    size_t C, cl;   // chunk length (global), tokens of a chunk on this rank
    size_t Sl;      // tokens on this rank
    bool rms;
    // memory
    Arena dev, host;
    std::vector<ParamInfo> table;
    size_t n_params = 0, n_padded = 0, shard_n = 0;  // padded to a multiple of W; shard_n = n_padded / W under ZeRO
    float* params;      // (n_padded) the fp32 weights; ZeRO-3: (shard_n) this rank's slice only
    float* grads;       // (n_padded) ZeRO 0/1; null under ZeRO-2/3
    float* grad_shard;  // (shard_n) this rank's summed gradients: ZeRO-1 on P > 1 ranks, ZeRO-2/3
    float *opt_m, *opt_v;  // (shard_n) AdamW moments of this rank's slice
    bf16* wlow = nullptr;  // (n_padded) bf16 mode, ZeRO 0-2: the weights rounded to bf16, what the matmuls read
    ModelW w, g;        // every tensor's weights and gradients (ZeRO-2/3: pointed into the buffers below)
    // ZeRO-2/3 (zero.h): tensor groups (0 wte, 1 + l layer l, L + 1 the tail) as flat ranges
    std::vector<size_t> group_lo, group_hi;  // tensor groups (below)
    size_t group_max = 0;                 // the largest layer or tail group
    float *gbuf[2] = {}, *gbuf_wte = nullptr;        // (group_max) x2, (V d): gradients in flight
    float *wgather[2] = {}, *wgather_wte = nullptr;  // ZeRO-3 (group_max) x2, (V d): gathered weights
    bf16 *wgather_low[2] = {}, *wgather_wte_low = nullptr;  // ZeRO-3 bf16 mode: their bf16 copies
    int wslot_holds[2] = {-1, -1};        // the group each gathered slot holds
    CUevent_st *zero_gathered[3] = {}, *zero_rs_done[3] = {};  // GPU: per slot (2: the embedding's)
    // host store (offload.h): per-chunk tensors that grow with the sequence
    ChunkStore tokens, targets;  // (u, cl) int32
    ChunkStore layer_in;         // ((L+1) u, cl*d): the input of every layer, and the last layer's output
                                 // (what the backward recomputes each layer from: activation checkpoints)
    ChunkStore dresid;           // (u, cl*d): the residual stream's gradient, updated in place (its meaning
                                 // phase by phase: schedule.h's header)
    ChunkStore q, k, v;          // (u, C*Hl*D), (u, C*Hkvl*D) x2: one layer's (--keep-attention: L u, every layer's)
    ChunkStore lse, dout, delta, dq;  // (u, C*Hl), (u, C*Hl*D), (u, C*Hl), (u, C*Hl*D)
    ChunkStore attn_o, attn_lse;      // --keep-attention: (L u, C*Hl*D), (L u, C*Hl) every layer's attention
                                      // output and lse, fp32, from the forward pass (empty without it)
    ChunkStore mlp_xmid, mlp_fch;     // --keep-mlp: (L u, cl*d), (L u, cl*F2) every layer's x_mid and MLP hidden
                                      // pre-activations, fp32, from the forward pass (empty without it)
    // working set (device), shapes per buffer
    float *ln1, *mean1, *rstd1;   // (cl, d), (cl), (cl)
    float *qkv;                   // (cl, Q3)
    float *o, *lsew;              // (C, Hl, D) fp32 accumulator, (C, Hl)
    float *oloc, *xmid;           // (cl, H*D), (cl, d)
    float *ln2, *mean2, *rstd2;   // (cl, d), (cl), (cl)
    size_t mr;                    // MLP rows done at once (run.mlp_rows, or a budget)
    float *fch, *act;             // (mr, F2), (mr, F)
    float *dact, *dfch, *dln;     // (mr, F), (mr, F2), (cl, d)
    float *doloc, *dqkv;          // (cl, H*D), (cl, Q3)
    float *dk, *dv;               // (C, Hkvl, D) each
    float *a2a_send;              // (P, cl, Hl, D)
    size_t hr;                    // rows of the LM head done at once (run.head_rows, or a budget)
    float *logits, *y, *dy;       // (hr, V), (cl, d), (cl, d)
    size_t ncast;                 // the largest matmul operand: rows x max(in, out) features
    bf16 *cast_a, *cast_b;        // (ncast) each, bf16 mode: one matmul's operands rounded to bf16
    float *lossw;                 // (hr)
    int32_t* pos;                 // (C) global positions of the current chunk
    int32_t* predw;               // (cl) argmax predictions of the current chunk
    double* acc;                  // (2) device: this pass's loss sum; the gradient's sum of squares
    double* scratch;              // (sumsq_gpu_scratch) device partial sums for the sum of squares
    int32_t* preds;               // host (Sl): argmax prediction at every input position
    float* token_loss;            // host (Sl): the loss of the token predicted at every input position
    float* stage = nullptr;       // host (2 C Hl D, or the gradients): MPI staging of device buffers
    bool nccl = false;            // GPU buffers move by NCCL (set before model_create)
    size_t gpu_free_before = 0;   // GPU: its free bytes just before the arena was taken (gpu_memory_after_step)
    bool accumulate = false;      // this pass adds its gradients to those of the step's earlier sequences
    bool keeping = false;         // this pass has a backward: its forward fills the kept stores of
                                  // --keep-attention and --keep-mlp (those that are on)
    float* logits_out = nullptr;  // test hook: if set, (Sl, V) host logits are written here
    // packed documents (run.doc_bos >= 0), set with each sequence's tokens (model_set_docs)
    std::vector<int32_t> doc_starts;  // global positions of the documents' first tokens, ascending, 0 first
    std::vector<int> first_kv;        // (u) the first kv chunk query chunk i sees (earlier pairs are empty)
    int32_t* docpos = nullptr;        // host (u, 2, C): per chunk its RoPE positions, then each token's document start
    int32_t* qdoc = nullptr;          // (C) the current query chunk's document starts (attention's mask)
};

// ----------------------------------------------------------------------------
// Tensor groups: the ranges of the flat parameter array that move together under ZeRO-2/3
// (zero.h) and that the schedule names when it asks for a layer's weights or hands back its
// gradients. Group 0 is wte, group 1 + l layer l's tensors, group L + 1 the tail (final norm, an
// untied LM head, and the padding up to n_padded). They are part of the layout: model_create sets
// them before it sizes the buffers that hold one group.

static inline int zero_groups(const Model* M) { return M->cfg.n_layer + 2; }
static inline int group_of_layer(int l) { return 1 + l; }
static inline int tail_group(const Model* M) { return M->cfg.n_layer + 1; }

// Group boundaries from the parameter table, and the largest layer or tail group.
static inline void model_set_groups(Model* M) {
    const int L = M->cfg.n_layer;
    M->group_lo.assign(L + 2, 0), M->group_hi.assign(L + 2, 0);
    for (const ParamInfo& p : M->table) {
        int g = p.name == "wte" ? 0 : p.name.rfind("h.", 0) == 0 ? group_of_layer(atoi(p.name.c_str() + 2)) : L + 1;
        if (M->group_hi[g] == 0) M->group_lo[g] = p.offset;
        M->group_hi[g] = p.offset + p.numel();
    }
    M->group_hi[L + 1] = M->n_padded;
    M->group_max = 0;  // the largest layer or tail group (what a double-buffer slot holds)
    for (int g = 1; g <= L + 1; g++) M->group_max = std::max(M->group_max, M->group_hi[g] - M->group_lo[g]);
}

// ----------------------------------------------------------------------------
// Memory layout, creation, initialisation

static inline void model_layout(Model* M) {
    const Config& c = M->cfg;
    Arena *dev = &M->dev, *host = &M->host;
    const size_t d = c.d_model, cl = M->cl, C = M->C, L = c.n_layer;
    const size_t HD = (size_t)c.n_head * M->D, qc = C * M->Hl * M->D, kvc = C * M->Hkvl * M->D;
    const bool off = M->run.offload;
    const int stage = M->run.zero;
    const size_t V_d = (size_t)c.vocab * d;
    M->params = stage >= 3 ? arena_alloc<float>(dev, M->shard_n, "weights (this rank's shard)")
                           : arena_alloc<float>(dev, M->n_padded, "weights");
    M->grads = stage <= 1 ? arena_alloc<float>(dev, M->n_padded, "gradients") : nullptr;
    // ZeRO-1 on one rank: its shard is the whole array, updated where it is
    M->grad_shard = stage == 1 && M->run.world > 1 ? arena_alloc<float>(dev, M->shard_n, "optimizer: gradient shard")
                    : stage >= 2 ? arena_alloc<float>(dev, M->shard_n, "gradients (this rank's shard)") : nullptr;
    if (stage >= 2) {
        for (float*& b : M->gbuf) b = arena_alloc<float>(dev, M->group_max, "gradients: layer in flight (x2)");
        M->gbuf_wte = arena_alloc<float>(dev, V_d, "gradients: embedding (wte)");
    }
    if (stage >= 3) {
        for (float*& b : M->wgather) b = arena_alloc<float>(dev, M->group_max, "weights: gathered layer (x2)");
        M->wgather_wte = arena_alloc<float>(dev, V_d, "weights: gathered embedding (wte)");
        if (M->run.bf16) {
            for (bf16*& b : M->wgather_low) b = arena_alloc<bf16>(dev, M->group_max, "weights (bf16 copy): gathered layer (x2)");
            M->wgather_wte_low = arena_alloc<bf16>(dev, V_d, "weights (bf16 copy): gathered embedding");
        }
    }
    M->opt_m = arena_alloc<float>(dev, M->shard_n, "optimizer: AdamW m");
    M->opt_v = arena_alloc<float>(dev, M->shard_n, "optimizer: AdamW v");
    // bf16 mode: layer inputs, q, k, v and dO are stored in bf16 (the schedule rounds them before
    // it puts them); dresid and dQ accumulate across visits and stay fp32, and so do lse and delta
    // (written once per chunk, but softmax statistics that bf16 would coarsen)
    const bool b16 = M->run.bf16;
    store_init(&M->ctx, &M->tokens, "store: tokens", cl * 4, M->u, off, 2, dev, host);
    store_init(&M->ctx, &M->targets, "store: targets", cl * 4, M->u, off, 2, dev, host);
    store_init(&M->ctx, &M->layer_in, "store: layer inputs", cl * d * 4, (L + 1) * M->u, off, 3, dev, host, b16);
    store_init(&M->ctx, &M->dresid, "store: dresid", cl * d * 4, M->u, off, 2, dev, host);
    const size_t qkv_chunks = (M->run.keep_attn ? L : 1) * (size_t)M->u;  // --keep-attention: every layer's
    store_init(&M->ctx, &M->q, "store: q", qc * 4, qkv_chunks, off, 3, dev, host, b16);
    store_init(&M->ctx, &M->k, "store: k", kvc * 4, qkv_chunks, off, 3, dev, host, b16);
    store_init(&M->ctx, &M->v, "store: v", kvc * 4, qkv_chunks, off, 3, dev, host, b16);
    store_init(&M->ctx, &M->lse, "store: lse", C * M->Hl * 4, M->u, off, 3, dev, host);
    store_init(&M->ctx, &M->dout, "store: dO", qc * 4, M->u, off, 3, dev, host, b16);
    store_init(&M->ctx, &M->delta, "store: delta", C * M->Hl * 4, M->u, off, 3, dev, host);
    store_init(&M->ctx, &M->dq, "store: dQ", qc * 4, M->u, off, 2, dev, host);
    if (M->run.keep_attn) {  // fp32 as the recompute would make them: the backward is the same to the bit
        store_init(&M->ctx, &M->attn_o, "store: attention output (kept)", qc * 4, (size_t)L * M->u, off, 3, dev, host);
        store_init(&M->ctx, &M->attn_lse, "store: attention lse (kept)", C * M->Hl * 4, (size_t)L * M->u, off, 3, dev, host);
    }
    if (M->run.keep_mlp) {
        store_init(&M->ctx, &M->mlp_xmid, "store: x_mid (kept)", cl * d * 4, (size_t)L * M->u, off, 3, dev, host);
        store_init(&M->ctx, &M->mlp_fch, "store: MLP hidden (kept)", cl * M->F2 * 4, (size_t)L * M->u, off, 3, dev, host);
    }
    auto work = [&](size_t n) { return arena_alloc<float>(dev, n, "working set"); };
    M->ln1 = work(cl * d), M->mean1 = work(cl), M->rstd1 = work(cl);
    M->qkv = work(cl * M->Q3);
    M->o = work(qc), M->lsew = work(C * M->Hl);
    M->oloc = work(cl * HD), M->xmid = work(cl * d);
    M->ln2 = work(cl * d), M->mean2 = work(cl), M->rstd2 = work(cl);
    M->fch = work(M->mr * M->F2), M->act = work(M->mr * c.ffn);
    M->dact = work(M->mr * c.ffn), M->dfch = work(M->mr * M->F2), M->dln = work(cl * d);
    M->doloc = work(cl * HD), M->dqkv = work(cl * M->Q3);
    M->dk = work(kvc), M->dv = work(kvc);
    M->a2a_send = work(qc);
    M->logits = work(M->hr * c.vocab), M->y = work(cl * d), M->dy = work(cl * d);
    M->lossw = work(M->hr);
    if (b16) {
        if (stage < 3) M->wlow = arena_alloc<bf16>(dev, M->n_padded, "weights (bf16 copy)");
        M->cast_a = arena_alloc<bf16>(dev, M->ncast, "working set");
        M->cast_b = arena_alloc<bf16>(dev, M->ncast, "working set");
    }
    M->pos = arena_alloc<int32_t>(dev, C, "working set");
    if (M->run.doc_bos >= 0) {
        M->qdoc = arena_alloc<int32_t>(dev, C, "working set");
        M->docpos = arena_alloc<int32_t>(host, 2 * M->run.seq, "document positions");
    }
    M->predw = arena_alloc<int32_t>(dev, M->hr, "working set");
    M->acc = arena_alloc<double>(dev, 2, "working set");
    M->scratch = arena_alloc<double>(dev, sumsq_gpu_scratch(M->shard_n), "working set");
    M->preds = arena_alloc<int32_t>(host, M->Sl, "predictions");
    M->token_loss = arena_alloc<float>(host, M->Sl, "predictions");
    if (M->ctx.gpu && M->run.world > 1 && !M->nccl)  // MPI reads host memory: device buffers are staged through it
        M->stage = arena_alloc<float>(host, std::max({2 * qc, M->n_padded + M->shard_n, 2 * V_d, 2 * M->group_max}), "MPI staging");
}

// Device memory a GPU run allocates after its arena is taken, which the free-memory check at the
// start keeps aside (the CUDA context exists by then, so it is not in the free memory): the
// kernels CUDA loads lazily at their first launch (fpdt's and cuBLAS's), cuBLAS's workspaces, and
// with NCCL the buffers of its connections, which open at the first collectives. STATED, NOT
// MEASURED: no GPU has run fpdt yet. A GPU run prints what it took after its first step
// (gpu_memory_after_step; test/gpu_check.sh collects the line); measured numbers go here.
static const size_t GPU_HEADROOM_KERNELS = (size_t)512 << 20;  // lazily loaded kernels, cuBLAS workspaces
static const size_t GPU_HEADROOM_NCCL = (size_t)512 << 20;     // NCCL's connection buffers
static inline size_t gpu_headroom(bool nccl) { return GPU_HEADROOM_KERNELS + (nccl ? GPU_HEADROOM_NCCL : 0); }

static inline void reset_arenas(Model* M) {
    M->dev = arena_new("device", Mem::Device);
    M->host = arena_new("host", Mem::Pinned);
}

// Sets the derived shape and, unless count_only, allocates everything. With count_only nothing is
// allocated and M->dev.peak / M->host.peak are the bytes a real run will take: that is the plan.
static inline void model_create(Model* M, const Config& c, const RunCfg& r, bool count_only) {
    std::string err = check_shape(c, r);
    if (!err.empty()) fatal_all("%s", err.c_str());
    M->cfg = c;
    M->run = r;
    if (r.world < r.P) M->run.world = r.P, M->run.world_rank = r.rank;  // a shape that names only the group: it is the world
    M->D = head_dim(c);
    M->Hl = c.n_head / r.P;
    M->Hkvl = c.n_kv_head >= r.P ? c.n_kv_head / r.P : 1;
    M->Q3 = (c.n_head + 2 * c.n_kv_head) * M->D;
    M->F2 = c.family == GPT ? c.ffn : 2 * c.ffn;
    M->C = r.chunk ? r.chunk : r.seq;
    M->u = (int)(r.seq / M->C);
    M->cl = M->C / r.P;
    M->Sl = r.seq / r.P;
    // the LM head's logits are (rows, vocab): a chunk's worth would be 8 GB at 16K rows and a
    // 128K vocab, so the head runs in row blocks of at most 64M logits (256 MB in fp32)
    M->hr = std::min(M->cl, r.head_rows ? r.head_rows : std::max<size_t>(1, ((size_t)64 << 20) / c.vocab));
    M->mr = std::min(M->cl, r.mlp_rows ? r.mlp_rows : std::max<size_t>(1, ((size_t)64 << 20) / M->F2));  // likewise
    const size_t d = c.d_model, HD = (size_t)c.n_head * M->D;
    M->ncast = std::max({M->cl * std::max({d, HD, (size_t)M->Q3}), M->mr * std::max({(size_t)M->F2, (size_t)c.ffn, d}),
                         M->hr * std::max(d, (size_t)c.vocab)});
    M->rms = c.family == LLAMA;
    M->table = param_table(c, &M->n_params);
    M->n_padded = align_up(M->n_params, M->run.world);
    M->shard_n = r.zero ? M->n_padded / M->run.world : M->n_padded;
    model_set_groups(M);
    reset_arenas(M);
    M->dev.count_only = M->host.count_only = true;
    model_layout(M);  // dry run: how much of each
    if (count_only) return;
    size_t need_dev = M->dev.peak, need_host = M->host.peak;
    // The device limit: --device-mem, or this rank's share of what the GPU has free less the
    // headroom, whichever is less. Above it, say what would fit: the longest chunk (a divisor of S,
    // a multiple of P) that, offloaded, does.
    size_t dev_limit = r.device_cap;
    bool limited = dev_limit > 0;
    const char* limit = "--device-mem allows";
    std::string limit_why;  // how the GPU's limit came about
#ifdef __CUDACC__
    if (M->ctx.gpu) {
        const std::string why = attention_gpu_fits(M->D);  // head size 512 on a GPU with 99 KiB per block
        if (!why.empty()) fatal("model %s: %s", c.name, why.c_str());
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        M->gpu_free_before = free_b;
        const int sharers = M->ctx.g->sharers;  // ranks on this GPU: each plans for its share
        const size_t share = free_b / sharers, room = gpu_headroom(M->nccl), usable = share > room ? share - room : 0;
        if (!dev_limit || usable < dev_limit) {
            char b[256];
            snprintf(b, sizeof b, " (%.1f MiB free%s, less %.1f MiB of headroom for CUDA's kernels, cuBLAS%s)",
                     free_b / 1048576.0, sharers > 1 ? (", shared by " + std::to_string(sharers) + " ranks").c_str() : "",
                     room / 1048576.0, M->nccl ? " and NCCL" : "");
            dev_limit = usable, limited = true, limit = "the GPU allows", limit_why = b;
        }
    }
#endif
    if (limited && dev_limit < need_dev) {
        std::vector<size_t> chunks;  // divisors of S, largest first
        for (size_t k = 1; k * k <= r.seq; k++)
            if (r.seq % k == 0) chunks.push_back(k), chunks.push_back(r.seq / k);
        std::sort(chunks.rbegin(), chunks.rend());
        char hint[256];
        snprintf(hint, sizeof hint, "no chunk size fits, even offloaded: add ranks, or a smaller model%s",
                 r.keep_attn || r.keep_mlp ? ", or --keep-attention 0 --keep-mlp 0" : "");
        for (size_t C : chunks) {
            RunCfg t = r;
            t.chunk = C, t.offload = C < r.seq;
            if (!check_shape(c, t).empty()) continue;
            Model T;
            model_create(&T, c, t, true);
            if (T.dev.peak > dev_limit || (r.host_cap && T.host.peak > r.host_cap)) continue;
            snprintf(hint, sizeof hint, "the planner suggests --chunk-size %zu%s (%.1f MiB on the device, %.1f MiB host)",
                     C, t.offload ? " --offload 1" : "", T.dev.peak / 1048576.0, T.host.peak / 1048576.0);
            break;
        }
        char msg[768];
        snprintf(msg, sizeof msg, "device memory: this run needs %.1f MiB but %s %.1f MiB%s; %s; see ./fpdt plan",
                 need_dev / 1048576.0, limit, dev_limit / 1048576.0, limit_why.c_str(), hint);
        if (dev_limit != r.device_cap) fatal("%s", msg);  // this GPU's own free memory: maybe this rank alone
        fatal_all("%s", msg);
    }
    if (r.host_cap && r.host_cap < need_host)
        fatal_all("host memory: this run's host store needs %.1f MiB but --host-mem allows %.1f MiB "
                  "(shorten --seq or add ranks%s)", need_host / 1048576.0, r.host_cap / 1048576.0,
                  r.keep_attn || r.keep_mlp ? ", or --keep-attention 0 --keep-mlp 0" : "");
    // host memory (the CPU backend's "device" arena is host memory too), for every rank on this
    // machine, against what the machine has: a model from a forged manifest is refused here
    const int local = std::max(1, comm_world().local_size);
    const double host_bytes = ((double)need_host + (M->ctx.gpu ? 0.0 : (double)need_dev)) * local;
    err = check_host_bytes(std::string("host memory: this run's arenas") + (local > 1 ? " (" + std::to_string(local) +
                           " ranks on this machine)" : std::string()), host_bytes);
    if (!err.empty())
        fatal("%s; see ./fpdt plan%s", err.c_str(), r.keep_attn || r.keep_mlp ? " (or --keep-attention 0 --keep-mlp 0)" : "");
    reset_arenas(M);
    M->dev.cap = need_dev;
    M->host.cap = std::max<size_t>(need_host, 256);
    arena_back(&M->ctx, &M->dev);  // on the CPU backend the "device" is host memory
    arena_back(&M->ctx, &M->host);
    model_layout(M);
    M->w = model_views(c, M->table, r.zero >= 3 ? nullptr : M->params);  // ZeRO-2/3: set group by group (zero.h)
    M->g = model_views(c, M->table, M->grads);
#ifdef __CUDACC__
    if (M->ctx.gpu && r.zero >= 2)
        for (int k = 0; k < 3; k++) {
            CUDA_CHECK(cudaEventCreateWithFlags(&M->zero_gathered[k], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&M->zero_rs_done[k], cudaEventDisableTiming));
        }
#endif
}

// After a GPU run's first step: what this process has allocated on the GPU outside its arena
// since the arena was taken (CUDA's lazily loaded kernels, cuBLAS's workspaces, NCCL's buffers),
// against the headroom the start kept aside for it, in one line; *over when it took more (a run
// planned at the limit could then fail). On a GPU that several ranks share, the figure is all of
// theirs together, against all of their headroom. "" on the CPU.
static inline std::string gpu_memory_after_step(const Model* M, int step, bool* over) {
    *over = false;
#ifdef __CUDACC__
    if (!M->ctx.gpu) return "";
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    const int sharers = M->ctx.g->sharers;
    const double outside = ((double)M->gpu_free_before - (double)M->dev.cap * sharers - (double)free_b) / 1048576.0;
    const double kept = (double)gpu_headroom(M->nccl) * sharers / 1048576.0;
    *over = outside > kept;
    char b[512];
    snprintf(b, sizeof b, "memory after step %d (GPU): arena %.1f MiB, outside it %.1f MiB%s (CUDA's kernels, cuBLAS%s; "
             "headroom kept %.1f MiB), %.1f of %.1f MiB free%s", step, M->dev.cap / 1048576.0, std::max(0.0, outside),
             sharers > 1 ? (" for the " + std::to_string(sharers) + " ranks on this GPU").c_str() : "",
             M->nccl ? ", NCCL" : "", kept, free_b / 1048576.0, total_b / 1048576.0,
             *over ? "; MORE than the headroom kept (model.h, GPU_HEADROOM_*): a run planned at the limit could fail" : "");
    return b;
#else
    (void)M, (void)step;
    return "";
#endif
}

static inline void model_free(Model* M) {
    dev_sync(&M->ctx);
    for (ChunkStore* s : {&M->tokens, &M->targets, &M->layer_in, &M->dresid, &M->q, &M->k, &M->v, &M->lse, &M->dout,
                          &M->delta, &M->dq, &M->attn_o, &M->attn_lse,
                          &M->mlp_xmid, &M->mlp_fch})
        store_free(&M->ctx, s);
#ifdef __CUDACC__
    for (CUevent_st* e : {M->zero_gathered[0], M->zero_gathered[1], M->zero_gathered[2], M->zero_rs_done[0],
                          M->zero_rs_done[1], M->zero_rs_done[2]})
        if (e) CUDA_CHECK(cudaEventDestroy(e));
#endif
    arena_unback(&M->ctx, &M->dev);
    arena_unback(&M->ctx, &M->host);
}

// GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), norms 1, biases 0.
// Every rank draws the same numbers from the seed; under ZeRO-3 each keeps its slice.
static inline void model_init_params(Model* M, uint64_t seed) {
    Rng rng{seed * 0x2545F4914F6CDD1Dull + 1};
    std::vector<float> host(M->n_padded, 0.0f);
    for (const ParamInfo& p : M->table) {
        float* x = host.data() + p.offset;
        const bool norm_w = p.name.find("ln") != std::string::npos && p.name.back() == 'w';
        const bool bias = p.name.size() > 2 && p.name.compare(p.name.size() - 2, 2, "_b") == 0;
        const bool resid = p.name.find("o_w") != std::string::npos || p.name.find("proj_w") != std::string::npos;
        const float std = 0.02f / (resid ? sqrtf(2.0f * M->cfg.n_layer) : 1.0f);
        for (size_t i = 0; i < p.numel(); i++) x[i] = norm_w ? 1.0f : bias ? 0.0f : std * rng_normal(&rng);
    }
    if (M->run.zero >= 3) dev_upload(&M->ctx, M->params, host.data() + M->run.world_rank * M->shard_n, M->shard_n * sizeof(float));
    else dev_upload(&M->ctx, M->params, host.data(), M->n_padded * sizeof(float));
    dev_zero(&M->ctx, M->opt_m, M->shard_n * sizeof(float));
    dev_zero(&M->ctx, M->opt_v, M->shard_n * sizeof(float));
}

// ----------------------------------------------------------------------------
// Tokens. Each rank reads only its own: for chunk c, inputs at global positions
// [c C + r cl, c C + (r+1) cl) and the targets one further.

// Packed documents, from their starts (ascending, 0 first) in a sequence of `seq` tokens in chunks
// of C: the first kv chunk each query chunk sees (the chunk of its first token's document start;
// every pair (i, j) with j before it is empty), and the share of the u (u + 1) / 2 attention
// blocks (query chunk, kv chunk) that are empty.
static inline std::vector<int> docs_first_kv(const std::vector<int32_t>& starts, size_t seq, size_t C) {
    std::vector<int> first(seq / C, 0);
    size_t d = 0;
    for (size_t i = 0; i < first.size(); i++) {
        while (d + 1 < starts.size() && (size_t)starts[d + 1] <= i * C) d++;
        first[i] = (int)(starts[d] / C);
    }
    return first;
}
static inline double docs_skipped_share(const std::vector<int>& first_kv) {
    double skipped = 0, u = (double)first_kv.size();
    for (int f : first_kv) skipped += f;
    return u > 0 ? skipped / (u * (u + 1) / 2) : 0.0;
}

// Packed documents: `mine` holds the global positions of the BOS tokens among this rank's inputs.
// The ranks share them (one all-gather of a few integers), so every rank knows the documents of
// the whole sequence: their starts, each chunk's first kv chunk, and per chunk the RoPE positions
// (counting from 0 at each document's start) and each token's document start, on the host.
static inline void model_set_docs(Model* M, const std::vector<int32_t>& mine) {
    if (M->run.doc_bos < 0) return;
    std::vector<int32_t> starts = comm_sp_allgather_i32(mine);
    starts.push_back(0);  // the sequence's first token starts a document, BOS or not
    std::sort(starts.begin(), starts.end());
    starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
    M->doc_starts = starts;
    M->first_kv = docs_first_kv(starts, M->run.seq, M->C);
    size_t next = 1;  // the document after the one position p is in
    for (size_t p = 0; p < M->run.seq; p++) {
        while (next < starts.size() && (size_t)starts[next] <= p) next++;
        const int32_t start = starts[next - 1];
        const size_t c = p / M->C, t = p % M->C;
        M->docpos[2 * c * M->C + t] = (int32_t)(p - start);    // RoPE position
        M->docpos[(2 * c + 1) * M->C + t] = start;               // document start
    }
}

template <typename Reader>
static inline void model_set_tokens(Model* M, Reader read) {
    std::vector<int32_t> buf(M->cl + 1), bos;
    for (int c = 0; c < M->u; c++) {
        read((size_t)c * M->C + (size_t)M->run.rank * M->cl, M->cl + 1, buf.data());
        for (size_t t = 0; t <= M->cl; t++)
            if (buf[t] < 0 || buf[t] >= M->cfg.vocab)
                fatal("data: token id %d at position %zu is outside the model's vocab %d", buf[t],
                      (size_t)c * M->C + M->run.rank * M->cl + t, M->cfg.vocab);
        for (size_t t = 0; t < M->cl; t++)
            if (buf[t] == M->run.doc_bos) bos.push_back((int32_t)((size_t)c * M->C + M->run.rank * M->cl + t));
        store_write(&M->ctx, &M->tokens, c, buf.data());
        store_write(&M->ctx, &M->targets, c, buf.data() + 1);
    }
    model_set_docs(M, bos);
}

// The same from whole arrays (tests): tokens (S) and targets (S) of the global sequence.
static inline void model_set_token_arrays(Model* M, const int32_t* tokens, const int32_t* targets) {
    std::vector<int32_t> bos;
    for (int c = 0; c < M->u; c++) {
        const size_t s = (size_t)c * M->C + (size_t)M->run.rank * M->cl;
        store_write(&M->ctx, &M->tokens, c, tokens + s);
        store_write(&M->ctx, &M->targets, c, targets + s);
        for (size_t t = s; t < s + M->cl; t++)
            if (tokens[t] == M->run.doc_bos) bos.push_back((int32_t)t);
    }
    model_set_docs(M, bos);
}


// zero.h: the sharded training state (ZeRO), in the manner of llm.c's llmc/zero.cuh: which rank
// owns which slice, the gathers and reduce-scatters, and the optimizer step on a shard.
//
//   --zero 0   every rank holds everything; gradients are all-reduced
//   --zero 1   AdamW m and v sharded; the full gradients are reduce-scattered after the backward
//              pass and the updated weight shards all-gathered back
//   --zero 2   also the gradients: each tensor group's gradient is reduce-scattered as soon as it
//              is final (a layer when layer_backward returns; the final norm and untied LM head
//              after head_pass; wte after the embedding backward, which with a tied head also
//              holds the head's gradient); no full-size gradient array exists
//   --zero 3   also the fp32 master weights: each group is all-gathered into a buffer before the
//              layer's forward and again before its backward (unless the buffer still holds it),
//              the next group's gather issued while this one computes (double buffer)
//
// Ownership map. The state is sharded over every rank of the world, W of them (all replicas of
// the sequence-parallel group together, as DeepSpeed does): a rank owns 1/W of it, and "rank"
// below is the world rank. k = n_padded / W (n_padded: n_params rounded up to a multiple of W). Rank r owns
// the contiguous slice [r k, (r+1) k) of the flat parameter array (model.h's param_table order),
// for weights, gradients, m and v alike: the same cut as a format-2 checkpoint's shard r
// (ceil(n/P) values per rank), so a checkpoint reads and writes a rank's owned slice as it is.
// The tensor groups the schedule moves at once are contiguous ranges of the same array:
//   group 0        wte                                     [0, V d)
//   group 1 + l    layer l's tensors                       [first offset of h.l., first of h.l+1.)
//   group L + 1    the tail: lnf_w (lnf_b), lm_head when untied, and the padding up to n_padded
// A group's range crosses the slices of several ranks: rank r's part of group g is
// [max(lo_g, r k), min(hi_g, (r+1) k)), possibly empty; these parts are contiguous and in rank
// order, so a group is reduce-scattered with counts per rank into the owned gradient shard at that
// part's offset, and all-gathered likewise (comm.h: MPI_Reduce_scatter and MPI_Allgatherv; over
// NCCL grouped ncclReduce / ncclBroadcast, one per rank that owns a part, on the communication stream).
//
// The gradient reduction: one over the world (not over the group, then across replicas). Every
// rank's gradients are partial sums over its own tokens (of its group's sequences), so the step's
// gradient is the sum over all W ranks, scaled once (the loss's 1 / (B S), schedule.h's head_pass);
// the ZeRO shards are the world's too, so the reduce-scatter that hands each rank its shard must
// span the world anyway, and a single collective lets MPI and NCCL choose their own hierarchical
// algorithm (inside a node first, then across nodes) instead of two collectives we order by hand.
//
// Gradient accumulation (--batch B: each replica runs B / R sequences one after the other).
// ZeRO 0/1 add every sequence's gradients into the full-size gradient array and reduce once, after
// the step's last sequence (model_update). ZeRO-2/3 have no full-size gradient array (that is
// their point), so each tensor group is reduce-scattered as it becomes final in every sequence, as
// DeepSpeed's stage 2 does; a later sequence's reduce-scatter adds to the shard: before it, the
// owner adds its shard's running sum into its part of the group buffer (zero_reduce_scatter), so
// the reduce-scatter that overwrites the shard leaves the sum over all sequences there. Deferring
// it to the last sequence would need the full-size gradient array ZeRO-2 exists to avoid.
//
// Buffers (device arena; the planner names them):
//   ZeRO-2/3  "gradients (this rank's shard)" (k), "gradients: layer in flight (x2)" (2 x the
//             largest layer or tail group: one accumulates while the other is reduce-scattered),
//             "gradients: embedding (wte)" (V d, alive through the whole backward pass: a tied head
//             adds to it first, the embedding backward last)
//   ZeRO-3    "weights (this rank's shard)" (k), "weights: gathered layer (x2)" (2 x the largest
//             layer or tail group), "weights: gathered embedding (wte)" (V d, held from the
//             embedding forward through the head to the embedding backward), and in bf16 mode the
//             bf16 copies of the three gathered buffers (each gather is rounded after it lands).
// On the CPU backend every collective is a blocking MPI call; on the GPU each is issued on the
// communication stream after an event of the compute stream and waited for by an event, so a
// gather of the next layer and the reduce-scatter of the last one overlap the current layer.
// Known limit of the overlap: the Ulysses all-to-alls share the communication stream and compute
// waits for that stream after each of them (ulysses.h, on_comm_stream), so a prefetched gather
// still in flight is waited for at the layer's first all-to-all; a second NCCL stream would lift it.
#pragma once
#include "comm.h"
#include "loss.cuh"
#include "model.h"
#include "offload.h"

// This rank's part of group g (model.h's tensor groups), [lo, hi) of the flat array, and rank r's count in it.
static inline size_t zero_part(const Model* M, int g, int r, size_t* lo) {
    const size_t k = M->shard_n, a = std::max(M->group_lo[g], (size_t)r * k), b = std::min(M->group_hi[g], (size_t)(r + 1) * k);
    *lo = a;
    return b > a ? b - a : 0;
}

// Points M->w (weights) or M->g (gradients) at buffer `buf`, which holds group g's range.
static inline void zero_point(Model* M, ModelW* W, int g, float* buf) {
    const ModelW V = model_views(M->cfg, M->table, buf, M->group_lo[g], M->group_hi[g]);
    if (g == 0) {
        W->wte = V.wte;
        if (tied_head(M->cfg)) W->head = V.wte;
    } else if (g == tail_group(M)) {
        W->lnf_w = V.lnf_w, W->lnf_b = V.lnf_b;
        if (!tied_head(M->cfg)) W->head = V.head;
    } else {
        W->layer[g - 1] = V.layer[g - 1];
    }
}

// ----------------------------------------------------------------------------
// The collectives of a group. rank r's part goes to / comes from the owned shard at offset
// (part lo - r k).

static inline void zero_counts(const Model* M, int g, std::vector<int>* counts, std::vector<int>* displs) {
    counts->assign(M->run.world, 0), displs->assign(M->run.world, 0);
    for (int r = 0; r < M->run.world; r++) {
        size_t lo;
        (*counts)[r] = mpi_count(zero_part(M, g, r, &lo));
        (*displs)[r] = mpi_count(lo - M->group_lo[g]);
    }
}

// buf (group g's range) summed over the world; this rank's part lands in the gradient shard (with
// M->accumulate, added to what the step's earlier sequences left there).
static inline void zero_reduce_scatter(Model* M, int g, float* buf, int slot) {
    Ctx* ctx = &M->ctx;
    const int P = M->run.world, me = M->run.world_rank;
    const size_t n = M->group_hi[g] - M->group_lo[g], k = M->shard_n;
    size_t mylo;
    const size_t mine = zero_part(M, g, me, &mylo);
    float* dst = M->grad_shard + (mylo - (size_t)me * k);
    if (M->accumulate && mine) OP(ctx, add_inplace, buf + (mylo - M->group_lo[g]), dst, mine);  // the running sum joins the reduction
    TraceScope ts(ctx, "reduce-scatter (gradients)", TRACK_COMM, g, n * sizeof(float));
#ifdef __CUDACC__
    if (ctx->gpu && (nccl_world() || P == 1)) {
        GpuCtx* G = ctx->g;
        stream_after(G->comm, G->compute);  // the group's gradients are final
        if (P == 1) CUDA_CHECK(cudaMemcpyAsync(dst, buf, n * sizeof(float), cudaMemcpyDeviceToDevice, G->comm));
        else {
            std::vector<int> counts, displs;
            zero_counts(M, g, &counts, &displs);
            comm_reduce_scatterv_nccl(buf, dst, counts.data(), displs.data(), G->comm);
            comm_nccl_issued("reduce-scatter (ZeRO gradients)", G->comm);
        }
        CUDA_CHECK(cudaEventRecord(M->zero_rs_done[slot], G->comm));  // the slot may be zeroed again after this
        return;
    }
#endif
    (void)slot;
    if (P == 1) return dev_copy(ctx, dst, buf, n * sizeof(float));
    std::vector<int> counts, displs;
    zero_counts(M, g, &counts, &displs);
    if (ctx->gpu) {  // ranks sharing a GPU: through host memory (synchronous)
        float* h = M->stage;  // (n) the group, then (mine) this rank's part
        dev_download(ctx, h, buf, n * sizeof(float));
        comm_reduce_scatterv(h, h + n, counts.data());
        dev_upload(ctx, dst, h + n, mine * sizeof(float));
        return;
    }
    comm_reduce_scatterv(buf, dst, counts.data());
}

// ZeRO-3: group g's weights from every rank's shard into buf (its range), bf16 copy in low.
// The GPU issues it on the communication stream; zero_gather_wait makes compute wait for it.
static inline void zero_gather_begin(Model* M, int g, float* buf, int slot) {
    Ctx* ctx = &M->ctx;
    const int P = M->run.world, me = M->run.world_rank;
    const size_t n = M->group_hi[g] - M->group_lo[g], k = M->shard_n;
    size_t mylo;
    const size_t mine = zero_part(M, g, me, &mylo);
    const float* src = M->params + (mylo - (size_t)me * k);
    TraceScope ts(ctx, "all-gather (weights)", TRACK_COMM, g, n * sizeof(float));
#ifdef __CUDACC__
    if (ctx->gpu && (nccl_world() || P == 1)) {
        GpuCtx* G = ctx->g;
        stream_after(G->comm, G->compute);  // compute is done with what the buffer held
        if (P == 1) CUDA_CHECK(cudaMemcpyAsync(buf, src, n * sizeof(float), cudaMemcpyDeviceToDevice, G->comm));
        else {
            std::vector<int> counts, displs;
            zero_counts(M, g, &counts, &displs);
            comm_allgatherv_nccl(src, buf, counts.data(), displs.data(), G->comm);
            comm_nccl_issued("all-gather (ZeRO-3 weights)", G->comm);
        }
        CUDA_CHECK(cudaEventRecord(M->zero_gathered[slot], G->comm));
        return;
    }
#endif
    (void)slot;
    if (P == 1) return dev_copy(ctx, buf, src, n * sizeof(float));
    std::vector<int> counts, displs;
    zero_counts(M, g, &counts, &displs);
    if (ctx->gpu) {  // ranks sharing a GPU: through host memory (synchronous)
        float* h = M->stage;  // (mine) this rank's part, then (n) the group
        dev_download(ctx, h, src, mine * sizeof(float));
        comm_allgatherv(h, h + mine, counts.data(), displs.data());
        dev_upload(ctx, buf, h + mine, n * sizeof(float));
        return;
    }
    comm_allgatherv(src, buf, counts.data(), displs.data());
}

static inline void zero_gather_wait(Model* M, int g, float* buf, bf16* low_buf, int slot) {
    Ctx* ctx = &M->ctx;
#ifdef __CUDACC__
    if (ctx->gpu && (nccl_world() || M->run.world == 1)) CUDA_CHECK(cudaStreamWaitEvent(ctx->g->compute, M->zero_gathered[slot], 0));
#endif
    (void)slot, (void)ctx;
    const size_t n = M->group_hi[g] - M->group_lo[g];
    if (M->run.bf16) OP(ctx, to_bf16, low_buf, buf, n);  // what the matmuls read
    zero_point(M, &M->w, g, buf);
}

// ----------------------------------------------------------------------------
// The hooks the schedule calls (schedule.h); each does nothing below the stage that needs it.
// Weights (ZeRO-3) and gradients (ZeRO-2/3) of layers and the tail use slot g % 2 of their double
// buffer, the embedding a buffer of its own; when each gather happens, and why the parity keeps
// a gather out of the slot being read, is said once, in model_forward_backward (schedule.h).

static inline int zero_slot(int g) { return g % 2; }

// Weights of group g ready in compute order; `next` (or -1) gathered behind it.
static inline void zero_weights_for(Model* M, int g, int next) {
    if (M->run.zero < 3) return;
    auto issue = [&](int h) {
        if (h < 0 || h == 0) return;  // the embedding is gathered once per pass (zero_pass_begin)
        const int s = zero_slot(h);
        if (M->wslot_holds[s] == h) return;  // still there (see model_forward_backward)
        zero_gather_begin(M, h, M->wgather[s], s);
        M->wslot_holds[s] = h;
    };
    if (g != 0) {
        issue(g);  // normally issued already, by the group before it
        zero_gather_wait(M, g, M->wgather[zero_slot(g)], M->wgather_low[zero_slot(g)], zero_slot(g));
    }
    issue(next);
}

// Gradients of group g accumulate from here: its buffer zeroed (on the GPU once the slot's last
// reduce-scatter has read it) and M->g pointed at it.
static inline void zero_grads_for(Model* M, int g) {
    if (M->run.zero < 2) return;
    Ctx* ctx = &M->ctx;
    float* buf = g == 0 ? M->gbuf_wte : M->gbuf[zero_slot(g)];
#ifdef __CUDACC__
    if (ctx->gpu && g != 0 && (nccl_world() || M->run.world == 1))
        CUDA_CHECK(cudaStreamWaitEvent(ctx->g->compute, M->zero_rs_done[zero_slot(g)], 0));
#endif
    dev_zero(ctx, buf, (M->group_hi[g] - M->group_lo[g]) * sizeof(float));
    zero_point(M, &M->g, g, buf);
}

// Group g's gradients are final: reduce-scatter them into this rank's shard.
static inline void zero_grads_done(Model* M, int g) {
    if (M->run.zero < 2) return;
    zero_reduce_scatter(M, g, g == 0 ? M->gbuf_wte : M->gbuf[zero_slot(g)], g == 0 ? 2 : zero_slot(g));
}

// The start of a pass: ZeRO-3 gathers the embedding and starts layer 0's gather; ZeRO-2 starts
// the embedding's gradient (a tied head adds to it before the embedding backward does).
static inline void zero_pass_begin(Model* M, bool grads) {
    if (M->run.zero >= 3) {
        M->wslot_holds[0] = M->wslot_holds[1] = -1;
        zero_gather_begin(M, 0, M->wgather_wte, 2);
        zero_gather_wait(M, 0, M->wgather_wte, M->wgather_wte_low, 2);
        zero_weights_for(M, 0, group_of_layer(0));
    }
    if (grads) zero_grads_for(M, 0);
}

// The end of a pass: compute waits for every collective still in flight (the update reads the
// shards next).
static inline void zero_pass_end(Model* M) {
#ifdef __CUDACC__
    Ctx* ctx = &M->ctx;
    if (ctx->gpu && M->run.zero >= 2) stream_after(ctx->g->compute, ctx->g->comm);
#endif
    (void)M;
}

// ----------------------------------------------------------------------------
// The optimizer step. Sum the gradients over the world (ZeRO 0/1; ZeRO-2/3 already did, group by
// group), clip to max_norm (0 = no clipping), AdamW on this rank's slice, and (ZeRO-1/2) the
// updated slices all-gathered back. Returns the global gradient norm (before clipping).
struct AdamW {
    float lr, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, clip = 1.0f;
};
static inline float model_update(Model* M, const AdamW& opt, int t, bool* finite) {
    Ctx* ctx = &M->ctx;
    const int stage = M->run.zero;
    const size_t n = M->shard_n, N = M->n_padded, lo = stage ? (size_t)M->run.world_rank * n : 0;
    float* g = M->grad_shard ? M->grad_shard : M->grads;
    // ZeRO 0/1, sum over the world: NCCL on GPU buffers, or MPI on host memory (the GPU's gradients
    // staged through it when ranks share a GPU)
#ifdef __CUDACC__
    const bool nccl = ctx->gpu && nccl_world();
    if (nccl && stage <= 1)
        on_comm_stream(ctx, stage == 1 ? "reduce-scatter (gradients)" : "all-reduce (gradients)", [&](cudaStream_t s) {
            if (stage == 1) comm_reduce_scatter_nccl(M->grads, M->grad_shard, n, s);
            else comm_allreduce_nccl(M->grads, N, s);
        });
#else
    const bool nccl = false;
#endif
    if (M->run.world > 1 && !nccl && stage <= 1) {
        float* buf = ctx->gpu ? M->stage : M->grads;
        if (ctx->gpu) dev_download(ctx, buf, M->grads, N * sizeof(float));
        if (stage == 1) {
            float* out = ctx->gpu ? buf + N : M->grad_shard;
            comm_reduce_scatter(buf, out, n);
            if (ctx->gpu) dev_upload(ctx, M->grad_shard, out, n * sizeof(float));
        } else {
            comm_allreduce(buf, N);
            if (ctx->gpu) dev_upload(ctx, M->grads, buf, N * sizeof(float));
        }
    }
    double ss = 0.0;
#ifdef __CUDACC__
    if (ctx->gpu) {
        sumsq_gpu(ctx->g->compute, g, n, M->acc + 1, M->scratch);
        dev_download(ctx, &ss, M->acc + 1, sizeof(double));
    } else
#endif
        ss = sumsq_cpu(g, n);
    if (stage) comm_allreduce(&ss, 1);
    const float norm = (float)sqrt(ss);
    *finite = std::isfinite(norm);
    if (!*finite) return norm;
    if (opt.clip > 0 && norm > opt.clip) OP(ctx, scale, g, n, opt.clip / norm);
    for (const ParamInfo& p : M->table) {  // each tensor's overlap with this rank's range
        const size_t a = std::max(p.offset, lo), b = std::min(p.offset + p.numel(), lo + n);
        if (a >= b) continue;
        OP(ctx, adamw, M->params + (stage >= 3 ? a - lo : a),  // ZeRO-3 holds only [lo, lo + n)
           g + (a - lo), M->opt_m + (a - lo), M->opt_v + (a - lo), b - a, opt.lr,
           opt.beta1, opt.beta2, opt.eps, opt.wd, p.decay, t);
    }
    if (stage == 0 || stage >= 3) return norm;
#ifdef __CUDACC__
    if (nccl)  // every rank's updated shard to every rank, in place
        on_comm_stream(ctx, "all-gather (weights)", [&](cudaStream_t s) { comm_allgather_nccl(M->params, n, s); });
#endif
    if (M->run.world > 1 && !nccl) {  // every rank's updated shard to every rank
        float* buf = ctx->gpu ? M->stage : M->params;
        if (ctx->gpu) dev_download(ctx, buf, M->params, N * sizeof(float));
        comm_allgather(buf, n);
        if (ctx->gpu) dev_upload(ctx, M->params, buf, N * sizeof(float));
    }
    return norm;
}

// ----------------------------------------------------------------------------
// State in and out (checkpoints): this rank's owned slice [lo, lo + k) ∩ [0, n_params) of the
// weights, m and v, on the host. Under every stage rank r owns the same contiguous slice (see the
// top), so these read and write it without communication.
static inline void zero_owned_range(const Model* M, size_t* lo, size_t* hi) {
    const size_t k = M->run.zero ? M->shard_n : M->n_padded, a = M->run.zero ? (size_t)M->run.world_rank * k : 0;
    *lo = std::min(a, M->n_params), *hi = std::min(a + k, M->n_params);
}

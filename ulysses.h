// ulysses.h: the Ulysses all-to-all of sequence parallelism. Within a chunk, rank r holds the
// global tokens [c C + r cl, c C + (r+1) cl) with every head; attention needs the whole chunk
// with some heads. The all-to-all turns one layout into the other and back: the packing on each
// side (CPU loops and their CUDA twins), the exchange (MPI, or NCCL on the communication stream),
// and the named call sites the schedule uses: qkv_to_heads, o_to_seq, do_to_heads, dqkv_to_seq.
// Notation as in model.h; these read the Model's shapes and buffers (Hl, Hkvl, D, cl, a2a_send,
// stage, the run's P and precision).
#pragma once
#include "comm.h"
#include "model.h"
#include "offload.h"
#include "ops.cuh"

// ----------------------------------------------------------------------------
// Who holds what. Rank r holds, of chunk c, the global tokens [c C + r cl, c C + (r+1) cl).
// Query heads are split evenly (rank r: r Hl .. r Hl + Hl - 1); kv heads too when Hkv >= P, and
// replicated when Hkv < P (each rank gets the one its query heads read).

// Global head held as local head m by rank r (kv: the key/value heads).
HOST_DEVICE static inline int a2a_head(int r, int m, bool kv, int Hl, int Hkvl, int H, int Hkv, int P) {
    if (!kv) return r * Hl + m;
    return Hkv >= P ? r * Hkvl + m : (r * Hl) / (H / Hkv);
}
static inline int q_head(const Model* M, int r, int m) {
    return a2a_head(r, m, false, M->Hl, M->Hkvl, M->cfg.n_head, M->cfg.n_kv_head, M->run.P);
}
static inline int kv_head(const Model* M, int r, int m) {
    return a2a_head(r, m, true, M->Hl, M->Hkvl, M->cfg.n_head, M->cfg.n_kv_head, M->run.P);
}

// The packing on each side of the all-to-all, as loops (CPU) and kernels (GPU). W is the type on
// the wire: float, or bf16 in bf16 mode (half the bytes; the values are rounded as they are packed).
// pack: send (P, cl, nh, D)[r, t, m, :] = src (cl, cols)[t, (first + head(r, m)) D : ...]
template <typename W>
static inline void a2a_pack_cpu(W* send, const float* src, int cols, int first, bool kv, int nh, size_t cl, int D,
                                int Hl, int Hkvl, int H, int Hkv, int P) {
    for (int r = 0; r < P; r++)
        for (size_t t = 0; t < cl; t++)
            for (int m = 0; m < nh; m++) {
                const int h = first + a2a_head(r, m, kv, Hl, Hkvl, H, Hkv, P);
                W* o = send + ((r * cl + t) * nh + m) * D;
                const float* s = src + t * cols + (size_t)h * D;
                for (int e = 0; e < D; e++) store_as(o + e, s[e]);
            }
}
// unpack: dst (cl, cols)[t, (first + hh) D + e] += sum over every (r, m) holding head hh of
// recv (P, cl, nh, D)[r, t, m, e], in rank order (replicated kv heads sum their gradients).
template <typename W>
static inline void a2a_unpack_cpu(float* dst, const W* recv, int cols, int first, bool kv, int nh, size_t cl, int D,
                                  int Hl, int Hkvl, int H, int Hkv, int P) {
    for (int r = 0; r < P; r++)
        for (size_t t = 0; t < cl; t++)
            for (int m = 0; m < nh; m++) {
                const int h = first + a2a_head(r, m, kv, Hl, Hkvl, H, Hkv, P);
                const W* s = recv + ((r * cl + t) * nh + m) * D;
                float* o = dst + t * cols + (size_t)h * D;
                for (int e = 0; e < D; e++) o[e] += to_f32(s[e]);
            }
}
#ifdef __CUDACC__
// twin of a2a_pack_cpu: one thread per value of send
template <typename W>
static __global__ void a2a_pack_kernel(W* send, const float* src, int cols, int first, bool kv, int nh, size_t cl, int D,
                                       int Hl, int Hkvl, int H, int Hkv, int P) {
    const size_t n = (size_t)P * cl * nh * D;
    GRID_STRIDE_LOOP(i, n) {
        const int e = (int)(i % D), m = (int)(i / D % nh);
        const size_t t = i / ((size_t)D * nh) % cl;
        const int r = (int)(i / ((size_t)D * nh * cl));
        store_as(send + i, src[t * cols + (size_t)(first + a2a_head(r, m, kv, Hl, Hkvl, H, Hkv, P)) * D + e]);
    }
}
// twin of a2a_unpack_cpu: one thread per (t, head of this kind, e), summing its sources in rank
// order, so replicated heads add up deterministically
template <typename W>
static __global__ void a2a_unpack_kernel(float* dst, const W* recv, int cols, int first, bool kv, int nh, size_t cl,
                                         int D, int Hl, int Hkvl, int H, int Hkv, int P) {
    const int nheads = kv ? Hkv : H;
    const size_t n = cl * nheads * D;
    GRID_STRIDE_LOOP(i, n) {
        const int e = (int)(i % D), hh = (int)(i / D % nheads);
        const size_t t = i / ((size_t)D * nheads);
        float acc = 0.0f;
        bool any = false;
        for (int r = 0; r < P; r++)
            for (int m = 0; m < nh; m++)
                if (a2a_head(r, m, kv, Hl, Hkvl, H, Hkv, P) == hh) {
                    acc += to_f32(recv[((r * cl + t) * nh + m) * D + e]);
                    any = true;
                }
        if (any) dst[t * cols + (size_t)(first + hh) * D + e] += acc;
    }
}
template <typename W>
static inline void a2a_pack_gpu(cudaStream_t s, W* send, const float* src, int cols, int first, bool kv, int nh,
                                size_t cl, int D, int Hl, int Hkvl, int H, int Hkv, int P) {
    if (cl == 0 || nh == 0) return;
    a2a_pack_kernel<<<elementwise_grid((size_t)P * cl * nh * D), 256, 0, s>>>(send, src, cols, first, kv, nh, cl, D, Hl,
                                                                              Hkvl, H, Hkv, P);
    CUDA_LAUNCHED();
}
template <typename W>
static inline void a2a_unpack_gpu(cudaStream_t s, float* dst, const W* recv, int cols, int first, bool kv, int nh,
                                  size_t cl, int D, int Hl, int Hkvl, int H, int Hkv, int P) {
    if (cl == 0) return;
    a2a_unpack_kernel<<<elementwise_grid(cl * (kv ? Hkv : H) * D), 256, 0, s>>>(dst, recv, cols, first, kv, nh, cl, D, Hl,
                                                                                Hkvl, H, Hkv, P);
    CUDA_LAUNCHED();
}
#endif

#ifdef __CUDACC__
// NCCL work runs on the communication stream, after everything compute has queued so far and
// before anything compute queues next (so a trace scope on the compute stream spans it); `what`
// names it to the watchdog (comm.h), should it not complete.
template <typename F>
static inline void on_comm_stream(Ctx* ctx, const char* what, F nccl_calls) {
    stream_after(ctx->g->comm, ctx->g->compute);
    nccl_calls(ctx->g->comm);
    comm_nccl_issued(what, ctx->g->comm);
    stream_after(ctx->g->compute, ctx->g->comm);
}
#endif

// The all-to-all itself, inside the sequence-parallel group: recv (P, n) on every group rank =
// block r of each group rank's send, values of `elem` bytes (4, or 2 on a bf16 wire). On the GPU: NCCL when each rank has its own GPU, else pinned
// host staging and MPI (synchronous).
static inline void a2a_exchange(Model* M, const void* send, void* recv, size_t n, size_t elem, const char* what) {
    Ctx* ctx = &M->ctx;
    if (!ctx->gpu) return comm_alltoall(send, recv, n, elem);
#ifdef __CUDACC__
    if (nccl_sp()) return on_comm_stream(ctx, what, [&](cudaStream_t s) { comm_alltoall_nccl(send, recv, n, elem, s); });
#endif
    (void)what;
    const size_t bytes = M->run.P * n * elem;
    char* stage = (char*)M->stage;  // (2, P, n) values: what goes, what comes
    dev_download(ctx, stage, send, bytes);
    comm_alltoall(stage, stage + bytes, n, elem);
    dev_upload(ctx, recv, stage + bytes, bytes);
}

// sequence -> heads: src (cl, src_cols) holds this rank's tokens; the D values of global head
// `first + head(r, m)` go to local head m of rank r. dst (C, nh, D) is the whole chunk.
// bf16 mode: the values travel as bf16 and arrive rounded (on one rank too, so that P changes
// nothing).
static inline void a2a_to_heads(Model* M, int chunk, const float* src, int src_cols, int first, bool kv, int nh,
                                float* dst) {
    Ctx* ctx = &M->ctx;
    const int P = M->run.P;
    const size_t n = M->cl * nh * M->D;  // values per rank
    const bool b16 = M->run.bf16;
    TraceScope ts(ctx, "all-to-all (to heads)", TRACK_COMM, chunk, P * n * (b16 ? 2 : 4));
    const int H = M->cfg.n_head, Hkv = M->cfg.n_kv_head;
    if (!b16) {
        float* send = P == 1 ? dst : M->a2a_send;  // one rank: the packing is the whole job
        OP(ctx, a2a_pack, send, src, src_cols, first, kv, nh, M->cl, M->D, M->Hl, M->Hkvl, H, Hkv, P);
        if (P > 1) a2a_exchange(M, send, dst, n, sizeof(float), "all-to-all (to heads)");
        return;
    }
    bf16 *send = (bf16*)M->a2a_send, *recv = send + P * n;  // (P, cl, nh, D) each, in a2a_send's bytes
    OP(ctx, a2a_pack, send, src, src_cols, first, kv, nh, M->cl, M->D, M->Hl, M->Hkvl, H, Hkv, P);
    if (P > 1) a2a_exchange(M, send, recv, n, sizeof(bf16), "all-to-all (to heads)");
    OP(ctx, from_bf16, dst, P > 1 ? recv : send, P * n);
}

// heads -> sequence: src (C, nh, D) for this rank's heads; dst (cl, dst_cols) += the D values for
// global head `first + head(r, m)` of every rank r. Accumulating makes replicated kv heads sum
// their gradients; callers zero dst first. bf16 mode: src travels rounded to bf16, as above.
static inline void a2a_to_seq(Model* M, int chunk, const float* src, int nh, float* dst, int dst_cols, int first,
                              bool kv) {
    Ctx* ctx = &M->ctx;
    const int P = M->run.P;
    const size_t n = M->cl * nh * M->D;  // values per rank
    const bool b16 = M->run.bf16;
    TraceScope ts(ctx, "all-to-all (to sequence)", TRACK_COMM, chunk, P * n * (b16 ? 2 : 4));
    const int H = M->cfg.n_head, Hkv = M->cfg.n_kv_head;
    if (!b16) {
        const float* recv = src;
        if (P > 1) a2a_exchange(M, src, M->a2a_send, n, sizeof(float), "all-to-all (to sequence)"), recv = M->a2a_send;
        OP(ctx, a2a_unpack, dst, recv, dst_cols, first, kv, nh, M->cl, M->D, M->Hl, M->Hkvl, H, Hkv, P);
        return;
    }
    bf16 *send = (bf16*)M->a2a_send, *recv = send + P * n;  // (P, cl, nh, D) each, in a2a_send's bytes
    OP(ctx, to_bf16, send, src, P * n);
    if (P > 1) a2a_exchange(M, send, recv, n, sizeof(bf16), "all-to-all (to sequence)");
    OP(ctx, a2a_unpack, dst, (const bf16*)(P > 1 ? recv : send), dst_cols, first, kv, nh, M->cl, M->D, M->Hl, M->Hkvl,
       H, Hkv, P);
}

// ----------------------------------------------------------------------------
// The call sites, by what crosses. Chunk `i`, this rank's (cl, Q3) QKV projection output in
// sequence layout; q (C, Hl, D), k and v (C, Hkvl, D) the whole chunk for this rank's heads.

// forward: the projected q, k, v of this rank's tokens to the heads layout
static inline void qkv_to_heads(Model* M, int i, const float* qkv, float* q, float* k, float* v) {
    const int H = M->cfg.n_head, Hkv = M->cfg.n_kv_head;
    a2a_to_heads(M, i, qkv, M->Q3, 0, false, M->Hl, q);
    a2a_to_heads(M, i, qkv, M->Q3, H, true, M->Hkvl, k);
    a2a_to_heads(M, i, qkv, M->Q3, H + Hkv, true, M->Hkvl, v);
}
// forward: the attention output o (C, Hl, D) back to this rank's tokens, oloc (cl, H D), overwritten
static inline void o_to_seq(Model* M, int i, const float* o, float* oloc) {
    const int HD = M->cfg.n_head * M->D;
    dev_zero(&M->ctx, oloc, M->cl * HD * sizeof(float));
    a2a_to_seq(M, i, o, M->Hl, oloc, HD, 0, false);
}
// backward: dL/d(attention output) of this rank's tokens, doloc (cl, H D), to the heads layout
static inline void do_to_heads(Model* M, int i, const float* doloc, float* dout) {
    a2a_to_heads(M, i, doloc, M->cfg.n_head * M->D, 0, false, M->Hl, dout);
}
// backward: the final dQ, dK, dV of chunk j back to this rank's tokens as dqkv (cl, Q3),
// overwritten (replicated kv heads sum their gradients)
static inline void dqkv_to_seq(Model* M, int j, const float* dq, const float* dk, const float* dv, float* dqkv) {
    const int H = M->cfg.n_head, Hkv = M->cfg.n_kv_head;
    dev_zero(&M->ctx, dqkv, M->cl * M->Q3 * sizeof(float));
    a2a_to_seq(M, j, dq, M->Hl, dqkv, M->Q3, 0, false);
    a2a_to_seq(M, j, dk, M->Hkvl, dqkv, M->Q3, H, true);
    a2a_to_seq(M, j, dv, M->Hkvl, dqkv, M->Q3, H + Hkv, true);
}

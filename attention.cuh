// attention.cuh: causal attention of one query chunk against one key/value chunk, the unit FPDT
// schedules. The forward pass merges each block's partial result into a running (O, LSE) by
// log-sum-exp; the backward pass recomputes P from the saved LSE. CPU reference here; the CUDA
// twins sit beside them.
//
// Layouts: q (Tq, Hq, D), k and v (Tk, Hkv, D), o (Tq, Hq, D) fp32, lse and delta (Tq, Hq) fp32.
// Query head h reads kv head h / (Hq / Hkv) (grouped-query attention). `causal` is for the
// diagonal block (same positions for queries and keys): query t sees keys 0..t only.
//
// Packed documents (--doc-mask 1): qdoc (Tq) int32, where not null, holds for each query row the
// global position of the first token of its document (non-decreasing in t), and k0 the global
// position of key 0. Query t then sees key j only if k0 + j >= qdoc[t]: the mask is a lower key
// limit per row, on top of the causal upper one. Null qdoc: no such limit (one document).
#pragma once
#include <cmath>
#include "common.h"
#include "ops.cuh"  // cpu_simd: the instruction set the CPU loops run on
#ifdef __CUDACC__
#include "cuda_common.cuh"
#endif

// The CPU functions tile the work as FlashAttention does: a block of ATTN_CPU_ROWS output rows of
// one head (query rows for the forward pass and dq, key rows for dk and dv) against tiles of
// ATTN_CPU_TILE rows of the other side, and a causal block visits only the tiles at or below the
// diagonal. Each tile is three steps: its scores, a small matmul; the softmax (or its gradient)
// over the tile, element-wise with the vectorizable exp below; and a second small matmul that
// adds the tile's share to the block's output rows. Both matmuls run through attn_mm, ops.cuh's
// register block of MR x NR accumulators (gemm_micro), on operands copied into this thread's
// scratch (the block's own rows once, each tile's rows once per tile) and zero-padded to whole
// register blocks, so its loops have no edge cases and read no memory outside the scratch.
// The blocks are the parallel tasks (each writes only its own rows, so no atomics), and each
// output is summed in the same order whatever the thread count. The block bodies are compiled
// once per instruction set with that set's register block (ops.cuh, cpu_simd).
#define ATTN_CPU_ROWS 48  // output rows of one task: a multiple of every MR below (8, 6, 4)
#define ATTN_CPU_TILE 64  // rows of the other side per tile: a multiple of every NR (32, 16)
#define ATTN_CPU_NR_MAX 32

// The arguments of one attention call, shared by the three block functions.
struct AttnCpu {
    float *o, *lse, *dq, *dk, *dv;                  // outputs
    const float *q, *k, *v, *dout, *lse_in, *delta;  // inputs
    size_t Tq, Tk;
    int Hq, Hkv, D;
    bool causal;
    float scale;
    const int32_t* qdoc;  // (Tq) document start of each query row (global position), or null
    size_t k0;            // global position of key 0
};
static inline size_t attn_min_cpu(size_t a, size_t b) { return a < b ? a : b; }
static inline int attn_round_up(int x, int m) { return (x + m - 1) / m * m; }
// Floats of scratch one thread needs (the dk/dv block, the largest): its key and value rows
// (ROWS, D) each; a tile's queries and output gradients transposed (D, TILE) and as rows
// (TILE, Dp) each; scores and their gradients (ROWS, TILE) each; the accumulated dk, dv
// (ROWS, Dp) each; per-row and per-column statistics. Dp = D rounded up to a register block.
static inline size_t attn_cpu_scratch(int D) {
    const size_t R = ATTN_CPU_ROWS, T = ATTN_CPU_TILE, Dp = (size_t)attn_round_up(D, ATTN_CPU_NR_MAX);
    return 2 * R * D + 2 * D * T + 2 * T * Dp + 2 * R * T + 2 * R * Dp + 2 * R + 2 * T;
}

// e^x in fp32 for the softmax loops, written so the compiler can vectorize it (libm's expf is a
// call per element): e^x = 2^n e^f with n = round(x / ln 2) and f = x - n ln 2 in [-ln2/2, ln2/2]
// (ln 2 in two parts, so f keeps its low bits), e^f by Cephes expf's polynomial (degree 7), and
// 2^n put straight into the exponent bits. Within 2 ulp of e^x; 0 below -87.33 (where fp32 turns
// subnormal), +inf above 88 (e^88 = 1.7e38, near fp32's largest), NaN for NaN. The softmax only
// calls it on s - max s <= 0 and on s - lse, a few ulp above 0 at most.
static inline __attribute__((always_inline)) float attn_exp(float x) {
    const float lo = -87.33654f, hi = 88.0f;  // lo = ln 2^-126
    const float xc = x < lo ? lo : (x > hi ? hi : x);
    const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: + 1.5 * 2^23, back
    const float f = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = (p * f * f + f) + 1.0f;
    const int bits = ((int)n + 127) << 23;  // 2^n, n in [-126, 127]
    float two_n;
    memcpy(&two_n, &bits, sizeof bits);
    return x < lo ? 0.0f : (x > hi ? INFINITY : p * two_n);  // NaN fails both tests and stays NaN
}

// c (R, N) = [or +=] a (R, K) b (K, N); a's (r, k) at a[r lda + k], b's (k, n) at b[k ldb + n],
// c's (r, n) at c[r ldc + n]. R a multiple of MR, N of NR: whole register blocks of ops.cuh's
// gemm_micro, so every element of c is the same sum in the same order whatever the blocks around it.
template <int MR, int NR, bool ADD>
static inline __attribute__((always_inline)) void attn_mm(float* c, int ldc, const float* a, int lda, const float* b,
                                                          int ldb, int R, int N, int K) {
    for (int n0 = 0; n0 < N; n0 += NR)
        for (int r0 = 0; r0 < R; r0 += MR)
            gemm_micro<MR, NR, ADD>(c + (size_t)r0 * ldc + n0, ldc, MR, NR, a + (size_t)r0 * lda, lda, 1, b + n0, ldb, K);
}

// dst (rows, ld) = rows r0 .. r0+n-1 of head h of x (T, H, D), zero in columns D .. ld and rows
// n .. rows (the padding the matmuls read)
static inline __attribute__((always_inline)) void attn_rows_cpu(float* __restrict dst, int rows, int ld, const float* x,
                                                                size_t r0, int n, int H, int h, int D) {
    for (int r = 0; r < rows; r++) {
        float* dr = dst + (size_t)r * ld;
        const int kept = r < n ? D : 0;  // values copied; the rest of the row is padding
        if (kept) memcpy(dr, x + ((r0 + r) * H + h) * D, kept * sizeof(float));
        memset(dr + kept, 0, (ld - kept) * sizeof(float));
    }
}
// dst (D, TILE) = the same n rows transposed, zero in columns n .. TILE
static inline __attribute__((always_inline)) void attn_cols_cpu(float* __restrict dst, const float* x, size_t r0, int n,
                                                                int H, int h, int D) {
    for (int c = 0; c < n; c++) {
        const float* xr = x + ((r0 + c) * H + h) * D;
        for (int d = 0; d < D; d++) dst[d * ATTN_CPU_TILE + c] = xr[d];
    }
    for (int d = 0; d < D; d++)
        for (int c = n; c < ATTN_CPU_TILE; c++) dst[d * ATTN_CPU_TILE + c] = 0.0f;
}
// The keys query row t sees in the tile of n keys from j0 (all n unless causal: keys j <= t).
static inline __attribute__((always_inline)) int attn_seen_cpu(const AttnCpu& a, size_t t, size_t j0, int n) {
    return a.causal ? (t < j0 ? 0 : (int)attn_min_cpu(n, t + 1 - j0)) : n;
}
// Packed documents. The first key query row t sees (Tk or more: none), and the first key of a
// tile of n keys from j0 that it sees (n: none in this tile).
static inline size_t attn_first_key_cpu(const AttnCpu& a, size_t t) {
    return a.qdoc && (size_t)a.qdoc[t] > a.k0 ? (size_t)a.qdoc[t] - a.k0 : 0;
}
static inline __attribute__((always_inline)) int attn_lo_cpu(size_t first, size_t j0, int n) {
    return first > j0 ? (int)attn_min_cpu(first - j0, n) : 0;
}
// The end of the queries that see key j: the first t with qdoc[t] > k0 + j (Tq if none), by
// bisection (qdoc is non-decreasing).
static inline size_t attn_query_end_cpu(const AttnCpu& a, size_t j) {
    if (!a.qdoc) return a.Tq;
    size_t lo = 0, hi = a.Tq;
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if ((size_t)a.qdoc[mid] > a.k0 + j) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// Forward, query rows t0 .. t0+ROWS-1 of head h, key tiles in order. Per row an online softmax
// over tiles: m the running max, l = sum_j e^(s_j - m), acc = sum_j e^(s_j - m) v_j; then this
// block's lse_b = m + log l and o_b = acc / l merge into (o, lse) by log-sum-exp (see above).
template <int MR, int NR>
static inline __attribute__((always_inline)) void attention_forward_rows(const AttnCpu& a, size_t t0, int h,
                                                                         float* scratch) {
    const int D = a.D, Dp = attn_round_up(D, NR), hk = h / (a.Hq / a.Hkv), T = ATTN_CPU_TILE;
    const int nq = (int)attn_min_cpu(ATTN_CPU_ROWS, a.Tq - t0), rq = attn_round_up(nq, MR);
    float* qb = scratch;      // (rq, D) this block's query rows
    float* kt = qb + rq * D;  // (D, TILE) the key tile, transposed
    float* vb = kt + D * T;   // (TILE, Dp) the value tile
    float* s = vb + T * Dp;   // (rq, TILE) scores, then e^(s - m) (0 in the padding rows: their q is 0)
    float* acc = s + rq * T;  // (rq, Dp)
    float* m = acc + rq * Dp; // (nq) running max
    float* l = m + nq;        // (nq) running sum
    // keys the block sees: a causal block (Tq == Tk) stops at its last row's diagonal; with
    // documents, whole key tiles before the first row's document are skipped
    const size_t kend = a.causal ? attn_min_cpu(t0 + nq, a.Tk) : a.Tk, kbeg = attn_first_key_cpu(a, t0) / T * T;
    if (kbeg >= kend) return;  // no row of the block sees a key here: nothing to merge
    size_t first[ATTN_CPU_ROWS];  // each row's first key
    for (int r = 0; r < nq; r++) first[r] = attn_first_key_cpu(a, t0 + r);
    attn_rows_cpu(qb, rq, D, a.q, t0, nq, a.Hq, h, D);
    memset(acc, 0, (size_t)rq * Dp * sizeof(float));
    for (int r = 0; r < nq; r++) m[r] = -INFINITY, l[r] = 0.0f;
    for (size_t j0 = kbeg; j0 < kend; j0 += T) {
        const int nk = (int)attn_min_cpu(T, kend - j0);
        attn_cols_cpu(kt, a.k, j0, nk, a.Hkv, hk, D);
        attn_rows_cpu(vb, nk, Dp, a.v, j0, nk, a.Hkv, hk, D);
        attn_mm<MR, NR, false>(s, T, qb, D, kt, T, rq, attn_round_up(nk, NR), D);  // s = q_t . k_j
        for (int r = 0; r < nq; r++) {
            const int nv = attn_seen_cpu(a, t0 + r, j0, nk), lo = attn_lo_cpu(first[r], j0, nk);
            float* sr = s + r * T;
            if (lo >= nv) {  // no keys in this tile (masked): weights 0, the row's state unchanged
                memset(sr, 0, nk * sizeof(float));
                continue;
            }
            float mx = m[r];
#pragma omp simd reduction(max : mx)
            for (int c = lo; c < nv; c++) mx = sr[c] * a.scale > mx ? sr[c] * a.scale : mx;
            const float rescale = expf(m[r] - mx);  // 0 on the first tile, where m = -inf
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int c = 0; c < nk; c++) {
                const float p = c >= lo && c < nv ? attn_exp(sr[c] * a.scale - mx) : 0.0f;
                sr[c] = p;
                sum += p;
            }
            l[r] = l[r] * rescale + sum;
            m[r] = mx;
            float* ar = acc + r * Dp;
#pragma omp simd
            for (int d = 0; d < Dp; d++) ar[d] *= rescale;
        }
        attn_mm<MR, NR, true>(acc, Dp, s, T, vb, Dp, rq, Dp, nk);  // acc += sum_j p_j v_j
    }
    for (int r = 0; r < nq; r++) {
        if (m[r] == -INFINITY) continue;  // no keys: nothing to merge
        const size_t t = t0 + r;
        const float lb = m[r] + logf(l[r]);  // this block's log-sum-exp
        float* orow = a.o + (t * a.Hq + h) * D;
        float* L = a.lse + t * a.Hq + h;
        const float lnew = (*L == -INFINITY) ? lb : fmaxf(*L, lb) + log1pf(expf(-fabsf(*L - lb)));
        const float wa = (*L == -INFINITY) ? 0.0f : expf(*L - lnew), wb = expf(lb - lnew) / l[r];
        for (int d = 0; d < D; d++) orow[d] = orow[d] * wa + acc[r * Dp + d] * wb;
        *L = lnew;
    }
}

// Backward, first pass: dq for query rows t0 .. t0+ROWS-1 of head h, key tiles in order:
//   dq_t += scale sum_j P_tj (dO_t.v_j - delta_t) k_j,  P_tj = e^(scale q_t.k_j - lse_t).
template <int MR, int NR>
static inline __attribute__((always_inline)) void attention_backward_dq_rows(const AttnCpu& a, size_t t0, int h,
                                                                             float* scratch) {
    const int D = a.D, Dp = attn_round_up(D, NR), hk = h / (a.Hq / a.Hkv), T = ATTN_CPU_TILE;
    const int nq = (int)attn_min_cpu(ATTN_CPU_ROWS, a.Tq - t0), rq = attn_round_up(nq, MR);
    float* qb = scratch;       // (rq, D) this block's query rows
    float* ob = qb + rq * D;   // (rq, D) and their output gradients dO
    float* kt = ob + rq * D;   // (D, TILE) the key tile, transposed
    float* vt = kt + D * T;    // (D, TILE) the value tile, transposed
    float* kb = vt + D * T;    // (TILE, Dp) the key tile as rows
    float* s = kb + T * Dp;    // (rq, TILE) scores, then dS (0 in the padding rows: their q is 0)
    float* dp = s + rq * T;    // (rq, TILE) dO_t . v_j
    float* dqb = dp + rq * T;  // (rq, Dp) dq of the block's rows
    const size_t kend = a.causal ? attn_min_cpu(t0 + nq, a.Tk) : a.Tk, kbeg = attn_first_key_cpu(a, t0) / T * T;
    if (kbeg >= kend) return;  // no row of the block sees a key here (documents): dq unchanged
    size_t first[ATTN_CPU_ROWS];  // each row's first key
    for (int r = 0; r < nq; r++) first[r] = attn_first_key_cpu(a, t0 + r);
    attn_rows_cpu(qb, rq, D, a.q, t0, nq, a.Hq, h, D);
    attn_rows_cpu(ob, rq, D, a.dout, t0, nq, a.Hq, h, D);
    attn_rows_cpu(dqb, rq, Dp, a.dq, t0, nq, a.Hq, h, D);
    for (size_t j0 = kbeg; j0 < kend; j0 += T) {
        const int nk = (int)attn_min_cpu(T, kend - j0), nkp = attn_round_up(nk, NR);
        attn_cols_cpu(kt, a.k, j0, nk, a.Hkv, hk, D);
        attn_cols_cpu(vt, a.v, j0, nk, a.Hkv, hk, D);
        attn_rows_cpu(kb, nk, Dp, a.k, j0, nk, a.Hkv, hk, D);
        attn_mm<MR, NR, false>(s, T, qb, D, kt, T, rq, nkp, D);   // s = q_t . k_j
        attn_mm<MR, NR, false>(dp, T, ob, D, vt, T, rq, nkp, D);  // dp = dO_t . v_j
        for (int r = 0; r < nq; r++) {
            const size_t t = t0 + r;
            const int nv = attn_seen_cpu(a, t, j0, nk), lo = attn_lo_cpu(first[r], j0, nk);
            const float L = a.lse_in[t * a.Hq + h], dl = a.delta[t * a.Hq + h];
            float* sr = s + r * T;
            const float* dpr = dp + r * T;
            if (lo >= nv) {  // masked row
                memset(sr, 0, nk * sizeof(float));
                continue;
            }
#pragma omp simd
            for (int c = 0; c < nk; c++)
                sr[c] = c >= lo && c < nv ? attn_exp(sr[c] * a.scale - L) * (dpr[c] - dl) * a.scale : 0.0f;
        }
        attn_mm<MR, NR, true>(dqb, Dp, s, T, kb, Dp, rq, Dp, nk);  // dq_t += dS_tj k_j
    }
    for (int r = 0; r < nq; r++) memcpy(a.dq + ((t0 + r) * a.Hq + h) * D, dqb + r * Dp, D * sizeof(float));
}

// Backward, second pass: dk, dv for key rows j0 .. j0+ROWS-1 of kv head hk; for each query head
// h of its group, then query tiles in order (queries t >= j if causal):
//   dv_j += sum_t P_tj dO_t,   dk_j += scale sum_t P_tj (dO_t.v_j - delta_t) q_t.
template <int MR, int NR>
static inline __attribute__((always_inline)) void attention_backward_dkdv_rows(const AttnCpu& a, size_t j0, int hk,
                                                                               float* scratch) {
    const int D = a.D, Dp = attn_round_up(D, NR), group = a.Hq / a.Hkv, T = ATTN_CPU_TILE;
    const int nk = (int)attn_min_cpu(ATTN_CPU_ROWS, a.Tk - j0), rk = attn_round_up(nk, MR);
    float* kb = scratch;       // (rk, D) this block's key rows
    float* vb = kb + rk * D;   // (rk, D) and value rows
    float* qt = vb + rk * D;   // (D, TILE) the query tile, transposed
    float* ot = qt + D * T;    // (D, TILE) its output gradients dO, transposed
    float* qr = ot + D * T;    // (TILE, Dp) the query tile as rows
    float* orr = qr + T * Dp;  // (TILE, Dp) dO as rows
    float* p = orr + T * Dp;   // (rk, TILE) P^T: key row j, query column t (0 in the padding rows)
    float* ds = p + rk * T;    // (rk, TILE) dO_t . v_j, then dS^T
    float* dkb = ds + rk * T;  // (rk, Dp) dk of the block's rows
    float* dvb = dkb + rk * Dp;  // (rk, Dp) dv
    float* L = dvb + rk * Dp;  // (TILE) the tile's lse
    float* dl = L + T;         // (TILE) and delta
    // with documents, the queries that see key row r end at qend[r] (non-decreasing in r), so
    // the query tiles past the last row's end are skipped
    size_t qend[ATTN_CPU_ROWS];
    for (int r = 0; r < nk; r++) qend[r] = attn_query_end_cpu(a, j0 + r);
    const size_t qstop = qend[nk - 1];
    if (qstop <= (a.causal ? j0 : 0)) return;  // no query sees these keys: dk, dv unchanged
    attn_rows_cpu(kb, rk, D, a.k, j0, nk, a.Hkv, hk, D);
    attn_rows_cpu(vb, rk, D, a.v, j0, nk, a.Hkv, hk, D);
    attn_rows_cpu(dkb, rk, Dp, a.dk, j0, nk, a.Hkv, hk, D);
    attn_rows_cpu(dvb, rk, Dp, a.dv, j0, nk, a.Hkv, hk, D);
    for (int h = hk * group; h < (hk + 1) * group; h++)
        for (size_t q0 = a.causal ? j0 : 0; q0 < qstop; q0 += T) {
            const int nt = (int)attn_min_cpu(T, a.Tq - q0), ntp = attn_round_up(nt, NR);
            attn_cols_cpu(qt, a.q, q0, nt, a.Hq, h, D);
            attn_cols_cpu(ot, a.dout, q0, nt, a.Hq, h, D);
            attn_rows_cpu(qr, nt, Dp, a.q, q0, nt, a.Hq, h, D);
            attn_rows_cpu(orr, nt, Dp, a.dout, q0, nt, a.Hq, h, D);
            for (int c = 0; c < nt; c++) L[c] = a.lse_in[(q0 + c) * a.Hq + h], dl[c] = a.delta[(q0 + c) * a.Hq + h];
            attn_mm<MR, NR, false>(p, T, kb, D, qt, T, rk, ntp, D);   // p = k_j . q_t
            attn_mm<MR, NR, false>(ds, T, vb, D, ot, T, rk, ntp, D);  // ds = v_j . dO_t
            for (int r = 0; r < nk; r++) {
                const size_t j = j0 + r;
                const int lo = a.causal && j > q0 ? (int)attn_min_cpu(j - q0, nt) : 0;  // first query seeing j
                const int hi = qend[r] > q0 ? (int)attn_min_cpu(qend[r] - q0, nt) : 0;  // and the end
                float* pr = p + r * T;
                float* dsr = ds + r * T;
                if (lo >= hi) {  // masked row
                    memset(pr, 0, nt * sizeof(float));
                    memset(dsr, 0, nt * sizeof(float));
                    continue;
                }
#pragma omp simd
                for (int c = 0; c < nt; c++) {
                    const float pc = c >= lo && c < hi ? attn_exp(pr[c] * a.scale - L[c]) : 0.0f;
                    pr[c] = pc;
                    dsr[c] = pc * (dsr[c] - dl[c]) * a.scale;
                }
            }
            attn_mm<MR, NR, true>(dvb, Dp, p, T, orr, Dp, rk, Dp, nt);  // dv_j += P_tj dO_t
            attn_mm<MR, NR, true>(dkb, Dp, ds, T, qr, Dp, rk, Dp, nt);  // dk_j += dS_tj q_t
        }
    for (int r = 0; r < nk; r++) {
        memcpy(a.dk + ((j0 + r) * a.Hkv + hk) * D, dkb + r * Dp, D * sizeof(float));
        memcpy(a.dv + ((j0 + r) * a.Hkv + hk) * D, dvb + r * Dp, D * sizeof(float));
    }
}

// The three block functions once per instruction set with its register block (MR x NR as in
// ops.cuh's gemm_tile variants), and a parallel loop over (block, head) tasks that calls the one
// this CPU runs.
typedef void (*AttnRowsFn)(const AttnCpu&, size_t, int, float*);
#define ATTN_CPU_VARIANTS(BODY)                                                                              \
    static void BODY##_base(const AttnCpu& a, size_t r0, int h, float* s) { BODY<4, 16>(a, r0, h, s); }      \
    ATTN_CPU_SIMD_VARIANTS(BODY)                                                                              \
    static inline AttnRowsFn BODY##_pick() { return ATTN_CPU_PICK(BODY); }
#ifdef CPU_SIMD_VARIANTS
#define ATTN_CPU_SIMD_VARIANTS(BODY)                                                                          \
    CPU_AVX512 static void BODY##_avx512(const AttnCpu& a, size_t r0, int h, float* s) { BODY<8, 32>(a, r0, h, s); } \
    CPU_AVX2 static void BODY##_avx2(const AttnCpu& a, size_t r0, int h, float* s) { BODY<6, 16>(a, r0, h, s); }
#define ATTN_CPU_PICK(BODY) cpu_simd() == 2 ? BODY##_avx512 : cpu_simd() == 1 ? BODY##_avx2 : BODY##_base
#else
#define ATTN_CPU_SIMD_VARIANTS(BODY)
#define ATTN_CPU_PICK(BODY) BODY##_base
#endif
ATTN_CPU_VARIANTS(attention_forward_rows)
ATTN_CPU_VARIANTS(attention_backward_dq_rows)
ATTN_CPU_VARIANTS(attention_backward_dkdv_rows)

// rows (T) in blocks of ATTN_CPU_ROWS, times H heads: one task each, scheduled dynamically
// (causal blocks near the end have more keys), each thread with its own scratch
static inline void attn_cpu_run(AttnRowsFn rows, const AttnCpu& a, size_t T, int H) {
    const size_t nb = (T + ATTN_CPU_ROWS - 1) / ATTN_CPU_ROWS;
    if (nb == 0 || H <= 0) return;
#pragma omp parallel
    {
        std::vector<float> scratch(attn_cpu_scratch(a.D));
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < nb * H; i++) rows(a, (nb - 1 - i / H) * ATTN_CPU_ROWS, (int)(i % H), scratch.data());
    }
}

// One (q_i, k_j, v_j) block, merged into the running (o, lse). Before the first block of a query
// chunk o must be 0 and lse -INFINITY. lse' = log(e^lse + e^lse_b), o' = o e^(lse - lse') +
// o_b e^(lse_b - lse'), with (o_b, lse_b) this block's attention (attention_forward_rows).
// qdoc, k0: packed documents (the file's header); rows that see no key here are left as they are.
static inline void attention_forward_cpu(float* o, float* lse, const float* q, const float* k, const float* v,
                                         size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                         const int32_t* qdoc = nullptr, size_t k0 = 0) {
    AttnCpu a = {};
    a.o = o, a.lse = lse, a.q = q, a.k = k, a.v = v, a.qdoc = qdoc, a.k0 = k0;
    a.Tq = Tq, a.Tk = Tk, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.causal = causal, a.scale = 1.0f / sqrtf((float)D);
    attn_cpu_run(attention_forward_rows_pick(), a, Tq, Hq);
}

// delta (Tq, Hq) = rowsum(dO * O), once per query chunk before its backward blocks.
static inline void attention_delta_cpu(float* delta, const float* dout, const float* o, size_t Tq, int Hq, int D) {
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < Tq * Hq; r++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++) s += dout[r * D + d] * o[r * D + d];
        delta[r] = s;
    }
}

// Backward of one block. With P = exp(S - lse) and dS = P (dO V^T - delta):
//   dq (Tq, Hq, D) += scale dS K;   dk (Tk, Hkv, D) += scale dS^T Q;   dv (Tk, Hkv, D) += P^T dO.
// Two passes, each parallel over what it writes (query blocks, then key blocks), so no atomics.
static inline void attention_backward_cpu(float* dq, float* dk, float* dv, const float* dout, const float* q,
                                          const float* k, const float* v, const float* lse, const float* delta,
                                          size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                          const int32_t* qdoc = nullptr, size_t k0 = 0) {
    AttnCpu a = {};
    a.dq = dq, a.dk = dk, a.dv = dv, a.dout = dout, a.q = q, a.k = k, a.v = v, a.lse_in = lse, a.delta = delta;
    a.qdoc = qdoc, a.k0 = k0;
    a.Tq = Tq, a.Tk = Tk, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.causal = causal, a.scale = 1.0f / sqrtf((float)D);
    attn_cpu_run(attention_backward_dq_rows_pick(), a, Tq, Hq);
    attn_cpu_run(attention_backward_dkdv_rows_pick(), a, Tk, Hkv);
}

// ----------------------------------------------------------------------------
// CUDA twins. Plain fp32 kernels, one warp per output row: the readable first version that the
// tensor-core flash kernels will be checked against. Same arguments and semantics as the CPU
// functions above, with device pointers, plus the stream first.
//
// Work split, shared by the three attention kernels: a block of ATTN_ROWS warps handles
// ATTN_ROWS consecutive rows of one head (query rows for the forward pass and dq, key rows for
// dk/dv); the other side (keys, or queries) streams through shared memory in tiles of ATTN_TILE
// = 32 rows, shared by the block's warps. Inside a tile lane i computes the score of tile row i
// (a whole dot product over D), then the warp walks the tile in order, broadcasting each row's
// weight by shuffle, and every lane updates its own slice of the output row (d = lane + 32 x),
// kept in registers: DPL = D/32 rounded up to a power of two values per lane, a template
// parameter so the slice is a register array (DPL <= 16 because D <= 512).
// Tiles are stored with an odd row pitch (D | 1), so lane i reading row i hits 32 distinct banks.
// The backward kernels visit keys in order for dq and heads, then queries in order for dk/dv, as
// the CPU blocks do, starting from the values already in dq, dk, dv; the CPU sums each tile's
// share in registers before adding it, so the two agree to rounding, not bit for bit.
#ifdef __CUDACC__

#define ATTN_ROWS 8   // warps per block = output rows per block
#define ATTN_TILE 32  // rows per shared-memory tile: one per lane for the scores

static __device__ __forceinline__ float attn_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;  // the butterfly leaves the same bits in every lane
}
static __device__ __forceinline__ float attn_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
// a . b over D floats in shared memory (4 partial sums for instruction-level parallelism)
static __device__ __forceinline__ float attn_dot(const float* a, const float* b, int D) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int d = 0;
    for (; d + 4 <= D; d += 4) {
        s0 += a[d] * b[d];
        s1 += a[d + 1] * b[d + 1];
        s2 += a[d + 2] * b[d + 2];
        s3 += a[d + 3] * b[d + 3];
    }
    for (; d < D; d++) s0 += a[d] * b[d];
    return (s0 + s1) + (s2 + s3);
}
static __device__ __forceinline__ size_t attn_min(size_t a, size_t b) { return a < b ? a : b; }

// Packed documents (twins of attn_first_key_cpu and attn_query_end_cpu): the first key query row
// t sees, and the end of the queries that see key j.
static __device__ __forceinline__ size_t attn_first_key(const int32_t* qdoc, size_t k0, size_t t) {
    return qdoc && (size_t)qdoc[t] > k0 ? (size_t)qdoc[t] - k0 : 0;
}
static __device__ __forceinline__ size_t attn_query_end(const int32_t* qdoc, size_t k0, size_t Tq, size_t j) {
    if (!qdoc) return Tq;
    size_t lo = 0, hi = Tq;
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if ((size_t)qdoc[mid] > k0 + j) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// Copies rows r0 .. r0+ROWS-1 of head `h` of x (T, H, D) into dst (ROWS, pitch), zeros past T.
static __device__ __forceinline__ void attn_stage(float* dst, int pitch, int rows, const float* x, size_t r0,
                                                  size_t T, int H, int h, int D) {
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const int rr = i / D, d = i % D;
        const size_t r = r0 + rr;
        dst[rr * pitch + d] = r < T ? x[(r * H + h) * D + d] : 0.0f;
    }
}

// Forward of one block for query rows t (one per warp) of head h:
//   s_j = scale q_t.k_j (j < t+1 if causal), lse_b = log sum_j e^s_j, o_b = sum_j e^(s_j - lse_b) v_j,
//   then merged: lse' = log(e^lse + e^lse_b), o' = o e^(lse - lse') + o_b e^(lse_b - lse').
// With documents (qdoc) only keys j >= kf, the row's first key, count.
// CPU twin: attention_forward_cpu. Grid (Tq / ATTN_ROWS, Hq).
template <int DPL>
static __global__ void attention_forward_kernel(float* o, float* lse, const float* q, const float* k, const float* v,
                                         size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal, float scale,
                                         const int32_t* qdoc, size_t k0) {
    extern __shared__ float smem[];
    const int P = D | 1;
    float* qs = smem;                  // (ATTN_ROWS, D) this block's query rows
    float* ks = qs + ATTN_ROWS * D;    // (ATTN_TILE, P) key tile
    float* vs = ks + ATTN_TILE * P;    // (ATTN_TILE, P) value tile
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, hk = h / (Hq / Hkv);
    const size_t t0 = (size_t)blockIdx.x * ATTN_ROWS, t = t0 + w;
    attn_stage(qs, D, ATTN_ROWS, q, t0, Tq, Hq, h, D);
    // keys this warp's row sees, and the most any row of the block sees (t0 < Tq always). A
    // causal block has Tq == Tk; the min() only keeps a mismatched call inside k and v.
    const size_t kf = t < Tq ? attn_first_key(qdoc, k0, t) : 0;
    const size_t nk_causal = t >= Tq ? 0 : causal ? attn_min(t + 1, Tk) : Tk, nk = kf < nk_causal ? nk_causal : 0;
    const size_t nk_block = causal ? attn_min(attn_min(t0 + ATTN_ROWS, Tq), Tk) : Tk;
    const size_t kbeg = attn_first_key(qdoc, k0, t0) / ATTN_TILE * ATTN_TILE;  // block-uniform: whole tiles skipped
    float acc[DPL];  // this lane's slice of sum_j e^(s_j - m) v_j
#pragma unroll
    for (int x = 0; x < DPL; x++) acc[x] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // running max; this lane's share of sum_j e^(s_j - m)
    for (size_t j0 = kbeg; j0 < nk_block; j0 += ATTN_TILE) {
        __syncthreads();  // the previous tile is consumed (and qs is staged)
        attn_stage(ks, P, ATTN_TILE, k, j0, Tk, Hkv, hk, D);
        attn_stage(vs, P, ATTN_TILE, v, j0, Tk, Hkv, hk, D);
        __syncthreads();
        if (j0 >= nk || j0 + ATTN_TILE <= kf) continue;  // warp-uniform: past its causal limit, or before its document
        const size_t j = j0 + lane;
        const float s = j >= kf && j < nk ? attn_dot(qs + w * D, ks + lane * P, D) * scale : -INFINITY;
        const float mnew = fmaxf(m, attn_warp_max(s));  // finite: a key of the tile is visible
        const float r = expf(m - mnew);                  // 0 on the first tile, where m = -inf
        const float p = expf(s - mnew);                  // 0 for masked keys
        l = l * r + p;
        m = mnew;
#pragma unroll
        for (int x = 0; x < DPL; x++) acc[x] *= r;
        const int n = (int)attn_min(ATTN_TILE, nk - j0);
        for (int jj = 0; jj < n; jj++) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int x = 0; x < DPL; x++) {
                const int d = lane + 32 * x;
                if (d < D) acc[x] += pj * vs[jj * P + d];
            }
        }
    }
    if (nk == 0) return;  // no barriers below
    const float lsum = attn_warp_sum(l);
    const float lb = m + logf(lsum);  // this block's log-sum-exp
    float* orow = o + (t * Hq + h) * D;
    const float L = lse[t * Hq + h];
    const float lnew = (L == -INFINITY) ? lb : fmaxf(L, lb) + log1pf(expf(-fabsf(L - lb)));
    const float a = (L == -INFINITY) ? 0.0f : expf(L - lnew), b = expf(lb - lnew) / lsum;
#pragma unroll
    for (int x = 0; x < DPL; x++) {
        const int d = lane + 32 * x;
        if (d < D) orow[d] = orow[d] * a + acc[x] * b;
    }
    __syncwarp();  // every lane has read the old lse before lane 0 replaces it
    if (lane == 0) lse[t * Hq + h] = lnew;
}

// values per lane for head size D: D/32 rounded up to a power of two
static inline int attn_dpl(int D) {
    int dpl = 1;
    while (dpl * 32 < D) dpl *= 2;
    return dpl;
}
static inline void attn_check(const char* what, int Hq, int Hkv, int D) {
    if (D < 1 || D > 512 || Hq < 1 || Hkv < 1 || Hq % Hkv)
        fatal("%s: head size %d must be in 1..512 and the query heads (%d) a multiple of the kv heads (%d)", what,
              D, Hq, Hkv);
}
// Launches kernel<DPL> with ATTN_ROWS warps and `smem` bytes of dynamic shared memory (opting in
// past the default 48 KiB: D = 512 needs about 160 KiB).
template <typename Kernel, typename... Args>
static inline void attn_launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
    if (smem > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<grid, ATTN_ROWS * 32, smem, stream>>>(args...);
    CUDA_LAUNCHED();
}
#define ATTN_DISPATCH(D, KERNEL, ...)                                                            \
    switch (attn_dpl(D)) {                                                                       \
        case 1: attn_launch(KERNEL<1>, __VA_ARGS__); break;                                      \
        case 2: attn_launch(KERNEL<2>, __VA_ARGS__); break;                                      \
        case 4: attn_launch(KERNEL<4>, __VA_ARGS__); break;                                      \
        case 8: attn_launch(KERNEL<8>, __VA_ARGS__); break;                                      \
        default: attn_launch(KERNEL<16>, __VA_ARGS__); break;                                    \
    }

static inline void attention_forward_gpu(cudaStream_t stream, float* o, float* lse, const float* q, const float* k,
                                         const float* v, size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                         const int32_t* qdoc = nullptr, size_t k0 = 0) {
    attn_check("attention_forward_gpu", Hq, Hkv, D);
    if (Tq == 0 || Tk == 0) return;
    const size_t smem = (ATTN_ROWS * D + 2 * ATTN_TILE * (D | 1)) * sizeof(float);
    const dim3 grid(ceil_div(Tq, ATTN_ROWS), Hq);
    ATTN_DISPATCH(D, attention_forward_kernel, grid, smem, stream, o, lse, q, k, v, Tq, Tk, Hq, Hkv, D, causal,
                  1.0f / sqrtf((float)D), qdoc, k0);
}

// delta[r] = sum_d dout[r][d] o[r][d] for the Tq*Hq rows, one warp per row. CPU twin: attention_delta_cpu.
static __global__ void attention_delta_kernel(float* delta, const float* dout, const float* o, size_t rows, int D) {
    const size_t r = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += dout[r * D + d] * o[r * D + d];
    s = attn_warp_sum(s);
    if (lane == 0) delta[r] = s;
}

static inline void attention_delta_gpu(cudaStream_t stream, float* delta, const float* dout, const float* o,
                                       size_t Tq, int Hq, int D) {
    const size_t rows = Tq * Hq;
    if (rows == 0) return;
    attention_delta_kernel<<<ceil_div(rows, 8), 256, 0, stream>>>(delta, dout, o, rows, D);
    CUDA_LAUNCHED();
}

// Backward, first pass, for query rows t (one per warp) of head h, keys j in order:
//   dq_t += scale sum_j P_tj (dO_t.v_j - delta_t) k_j,  P_tj = e^(scale q_t.k_j - lse_t).
// CPU twin: attention_backward_cpu (its first loop). Grid (Tq / ATTN_ROWS, Hq).
template <int DPL>
static __global__ void attention_backward_dq_kernel(float* dq, const float* dout, const float* q, const float* k,
                                             const float* v, const float* lse, const float* delta, size_t Tq,
                                             size_t Tk, int Hq, int Hkv, int D, bool causal, float scale,
                                             const int32_t* qdoc, size_t k0) {
    extern __shared__ float smem[];
    const int P = D | 1;
    float* qs = smem;                   // (ATTN_ROWS, D) query rows
    float* dos = qs + ATTN_ROWS * D;    // (ATTN_ROWS, D) their output gradients
    float* ks = dos + ATTN_ROWS * D;    // (ATTN_TILE, P) key tile
    float* vs = ks + ATTN_TILE * P;     // (ATTN_TILE, P) value tile
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, hk = h / (Hq / Hkv);
    const size_t t0 = (size_t)blockIdx.x * ATTN_ROWS, t = t0 + w;
    attn_stage(qs, D, ATTN_ROWS, q, t0, Tq, Hq, h, D);
    attn_stage(dos, D, ATTN_ROWS, dout, t0, Tq, Hq, h, D);
    const size_t kf = t < Tq ? attn_first_key(qdoc, k0, t) : 0;
    const size_t nk_causal = t >= Tq ? 0 : causal ? attn_min(t + 1, Tk) : Tk, nk = kf < nk_causal ? nk_causal : 0;
    const size_t nk_block = causal ? attn_min(attn_min(t0 + ATTN_ROWS, Tq), Tk) : Tk;
    const size_t kbeg = attn_first_key(qdoc, k0, t0) / ATTN_TILE * ATTN_TILE;
    float* dqr = dq + (t * Hq + h) * D;
    float acc[DPL];  // this lane's slice of dq_t, accumulated from its current value as on the CPU
#pragma unroll
    for (int x = 0; x < DPL; x++) {
        const int d = lane + 32 * x;
        acc[x] = (t < Tq && d < D) ? dqr[d] : 0.0f;
    }
    const float L = t < Tq ? lse[t * Hq + h] : 0.0f, dl = t < Tq ? delta[t * Hq + h] : 0.0f;
    for (size_t j0 = kbeg; j0 < nk_block; j0 += ATTN_TILE) {
        __syncthreads();
        attn_stage(ks, P, ATTN_TILE, k, j0, Tk, Hkv, hk, D);
        attn_stage(vs, P, ATTN_TILE, v, j0, Tk, Hkv, hk, D);
        __syncthreads();
        if (j0 >= nk || j0 + ATTN_TILE <= kf) continue;  // warp-uniform
        float ds = 0.0f;
        if (j0 + lane >= kf && j0 + lane < nk) {
            const float s = attn_dot(qs + w * D, ks + lane * P, D);
            const float dp = attn_dot(dos + w * D, vs + lane * P, D);
            ds = expf(s * scale - L) * (dp - dl) * scale;
        }
        const int n = (int)attn_min(ATTN_TILE, nk - j0);
        for (int jj = 0; jj < n; jj++) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int x = 0; x < DPL; x++) {
                const int d = lane + 32 * x;
                if (d < D) acc[x] += dsj * ks[jj * P + d];
            }
        }
    }
    if (t >= Tq) return;
#pragma unroll
    for (int x = 0; x < DPL; x++) {
        const int d = lane + 32 * x;
        if (d < D) dqr[d] = acc[x];
    }
}

// Backward, second pass, for key rows j (one per warp) of kv head hk; for each query head h of
// its group, then query rows t in order (t >= j if causal):
//   dv_j += sum P_tj dO_t,   dk_j += scale sum P_tj (dO_t.v_j - delta_t) q_t.
// CPU twin: attention_backward_cpu (its second loop). Grid (Tk / ATTN_ROWS, Hkv).
template <int DPL>
static __global__ void attention_backward_dkdv_kernel(float* dk, float* dv, const float* dout, const float* q,
                                               const float* k, const float* v, const float* lse, const float* delta,
                                               size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                               float scale, const int32_t* qdoc, size_t k0) {
    extern __shared__ float smem[];
    const int P = D | 1;
    float* ks = smem;                   // (ATTN_ROWS, D) this block's key rows
    float* vs = ks + ATTN_ROWS * D;     // (ATTN_ROWS, D) their values
    float* qt = vs + ATTN_ROWS * D;     // (ATTN_TILE, P) query tile
    float* dot = qt + ATTN_TILE * P;    // (ATTN_TILE, P) output-gradient tile
    float* lt = dot + ATTN_TILE * P;    // (ATTN_TILE) lse of the tile's rows
    float* dlt = lt + ATTN_TILE;        // (ATTN_TILE) delta of the tile's rows
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int hk = blockIdx.y, group = Hq / Hkv;
    const size_t j0 = (size_t)blockIdx.x * ATTN_ROWS, j = j0 + w;
    attn_stage(ks, D, ATTN_ROWS, k, j0, Tk, Hkv, hk, D);
    attn_stage(vs, D, ATTN_ROWS, v, j0, Tk, Hkv, hk, D);
    float* dkr = dk + (j * Hkv + hk) * D;
    float* dvr = dv + (j * Hkv + hk) * D;
    float ak[DPL], av[DPL];  // this lane's slices of dk_j and dv_j, from their current values
#pragma unroll
    for (int x = 0; x < DPL; x++) {
        const int d = lane + 32 * x;
        ak[x] = (j < Tk && d < D) ? dkr[d] : 0.0f;
        av[x] = (j < Tk && d < D) ? dvr[d] : 0.0f;
    }
    const size_t first = causal ? j : 0;  // the first query this key row sees
    // and the end of them (documents); the block's last row ends last, so tiles past it are skipped
    const size_t qend = j < Tk ? attn_query_end(qdoc, k0, Tq, j) : 0;
    const size_t qstop = attn_query_end(qdoc, k0, Tq, attn_min(j0 + ATTN_ROWS, Tk) - 1);
    for (int h = hk * group; h < (hk + 1) * group; h++)
        for (size_t q0 = causal ? j0 : 0; q0 < qstop; q0 += ATTN_TILE) {
            __syncthreads();
            attn_stage(qt, P, ATTN_TILE, q, q0, Tq, Hq, h, D);
            attn_stage(dot, P, ATTN_TILE, dout, q0, Tq, Hq, h, D);
            if (threadIdx.x < ATTN_TILE) {
                const size_t tt = q0 + threadIdx.x;
                lt[threadIdx.x] = tt < Tq ? lse[tt * Hq + h] : 0.0f;
                dlt[threadIdx.x] = tt < Tq ? delta[tt * Hq + h] : 0.0f;
            }
            __syncthreads();
            if (j >= Tk) continue;  // warp-uniform
            const int lo = first > q0 ? (int)attn_min(first - q0, ATTN_TILE) : 0;
            const int hi = qend > q0 ? (int)attn_min(ATTN_TILE, qend - q0) : 0;
            if (lo >= hi) continue;
            float p = 0.0f, ds = 0.0f;
            if (lane >= lo && lane < hi) {
                const float s = attn_dot(ks + w * D, qt + lane * P, D);
                const float dp = attn_dot(vs + w * D, dot + lane * P, D);
                p = expf(s * scale - lt[lane]);
                ds = p * (dp - dlt[lane]) * scale;
            }
            for (int i = lo; i < hi; i++) {
                const float pi = __shfl_sync(0xffffffffu, p, i), dsi = __shfl_sync(0xffffffffu, ds, i);
#pragma unroll
                for (int x = 0; x < DPL; x++) {
                    const int d = lane + 32 * x;
                    if (d < D) {
                        av[x] += pi * dot[i * P + d];
                        ak[x] += dsi * qt[i * P + d];
                    }
                }
            }
        }
    if (j >= Tk) return;
#pragma unroll
    for (int x = 0; x < DPL; x++) {
        const int d = lane + 32 * x;
        if (d < D) {
            dkr[d] = ak[x];
            dvr[d] = av[x];
        }
    }
}

static inline void attention_backward_gpu(cudaStream_t stream, float* dq, float* dk, float* dv, const float* dout,
                                          const float* q, const float* k, const float* v, const float* lse,
                                          const float* delta, size_t Tq, size_t Tk, int Hq, int Hkv, int D,
                                          bool causal, const int32_t* qdoc = nullptr, size_t k0 = 0) {
    attn_check("attention_backward_gpu", Hq, Hkv, D);
    if (Tq == 0 || Tk == 0) return;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t smem = (2 * ATTN_ROWS * D + 2 * ATTN_TILE * (D | 1) + 2 * ATTN_TILE) * sizeof(float);
    ATTN_DISPATCH(D, attention_backward_dq_kernel, dim3(ceil_div(Tq, ATTN_ROWS), Hq), smem, stream, dq, dout, q, k,
                  v, lse, delta, Tq, Tk, Hq, Hkv, D, causal, scale, qdoc, k0);
    ATTN_DISPATCH(D, attention_backward_dkdv_kernel, dim3(ceil_div(Tk, ATTN_ROWS), Hkv), smem, stream, dk, dv,
                  dout, q, k, v, lse, delta, Tq, Tk, Hq, Hkv, D, causal, scale, qdoc, k0);
}
#endif

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

// The CPU functions tile the work as FlashAttention does, in squares of TILE queries by TILE keys
// of one head; a causal call visits only the squares at or below the diagonal, and masks only
// the diagonal one. Each square is a few small matmuls and element-wise work between them: the
// scores, the softmax (or its gradient) with the vectorizable exp below, and the products that
// add the square's share to the outputs. The scores are held key by query (s^T: one row per key,
// TILE queries along it), so every per-query statistic (running max and sum, lse, delta) is a
// vector along the row and the element-wise loops need no reductions across a row. The matmuls
// run through attn_mm, ops.cuh's register block of MR x NR accumulators (gemm_micro), on copies
// laid out for it once per call, head by head (attn_pack_cols: tile by tile transposed;
// attn_pack_rows: rows zero-padded to whole register blocks), so the loops have no edge cases.
//   forward: one task per (query tile, head); key tiles in order, an online softmax per query.
//   backward: one pass over key tiles. dk and dv of a key tile sum over the query tiles in order;
//   dq of a query row sums over key tiles, which ATTN_CPU_DQ_GROUPS tasks per kv head share out
//   (key tile j to group j mod G), each into its own copy of dq, added up in group order at the
//   end. So nothing is written by two tasks (no atomics) and every output is the same sum in the
//   same order whatever the thread count.
// The bodies are compiled once per instruction set with its register block and its TILE, a
// multiple of both MR and NR (ops.cuh, cpu_simd).
#define ATTN_CPU_DQ_GROUPS 8

// The arguments of one attention call, the copies of its inputs laid out for the tiles (per head:
// x (T, H, D) tile by tile transposed, (H, nt, D, TILE), and as rows padded to Dp = D rounded up
// to NR, (H, nt TILE, Dp), zero past row T), and the per-group copies of dq.
struct AttnCpu {
    float *o, *lse, *dq, *dk, *dv;                   // outputs
    const float *q, *k, *v, *dout, *lse_in, *delta;  // inputs
    const float *qt, *ot;                            // q, dout transposed tile by tile (Hq, ntq, D, TILE)
    const float *kr, *vr, *qr, *orr;                 // k, v (Hkv, ntk TILE, Dp); q, dout (Hq, ntq TILE, Dp)
    float* dqg;                                      // (groups, Hq, ntq TILE, Dp) dq summed per key-tile group
    size_t Tq, Tk, ntq, ntk;                         // rows, and tiles of them (the last may be partial)
    int Hq, Hkv, D, Dp, groups;
    bool causal;
    float scale;
    const int32_t* qdoc;  // (Tq) document start of each query row (global position), or null
    size_t k0;            // global position of key 0
};
static inline size_t attn_min_cpu(size_t a, size_t b) { return a < b ? a : b; }
static inline int attn_round_up(int x, int m) { return (x + m - 1) / m * m; }

// e^x for the softmax loops: ops.cuh's cpu_exp, which the compiler can vectorize (libm's expf is
// a call per element), less its overflow result. The softmax's values are s - max s <= 0 and
// s - lse, a few ulp above 0 at most, where the two are the same to the bit; above 88 (lanes that
// are zeroed after: a query of another document, or one that sees no key, whose lse is -inf) it
// gives e^88, not +inf. One select fewer a value: attention's forward and backward ran about 4%
// faster with AVX2.
static inline __attribute__((always_inline)) float attn_exp(float x) {
    const float e = cpu_exp_in_range(x < CPU_EXP_LO ? CPU_EXP_LO : (x > CPU_EXP_HI ? CPU_EXP_HI : x));
    return x < CPU_EXP_LO ? 0.0f : e;
}
// The scores' register block: c (MR, NR) = a (MR, KC) b (KC, NR), gemm_micro's sums (ops.cuh), k
// in order, every bound known when compiled. gemm_micro's accumulators are an array that its edge
// cases index at run time; storing them (no add) GCC zeroed that array and copied it through
// memory, so here they go from the registers straight to c: the score products, attention forward
// and backward ran 6-13% faster (AVX2, head sizes 32 and 64). For the products that add to c the
// same made them slower; those stay on gemm_micro.
template <int MR, int NR, int KC>
static inline __attribute__((always_inline)) void attn_scores_micro(float* c, int ldc, const float* a, int ars,
                                                                    int aks, const float* b, int ldb) {
    float acc[MR][NR] = {};
    for (int k = 0; k < KC; k++) gemm_micro_step<MR, NR>(acc, a + k * aks, ars, b + k * ldb);
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) c[r * ldc + j] = acc[r][j];
}
// One MR x NR block of attn_mm with k = KC known when compiled.
template <int MR, int NR, bool ADD, int KC>
static inline __attribute__((always_inline)) void attn_block(float* c, int ldc, const float* a, int ars, int aks,
                                                             const float* b, int ldb) {
    if (ADD) gemm_micro<MR, NR, true, false, KC>(c, ldc, MR, NR, a, ars, aks, b, ldb, KC);
    else attn_scores_micro<MR, NR, KC>(c, ldc, a, ars, aks, b, ldb);
}
// c (R, N) = [or +=] a (R, K) b (K, N); a's (r, k) at a[r ars + k aks], b's (k, n) at b[k ldb + n],
// c's (r, n) at c[r ldc + n]. R a multiple of MR, N of NR: whole register blocks of ops.cuh's
// gemm_micro, so every element of c is the same sum in the same order whatever the blocks around it.
// K is a head size or a tile's rows: the usual ones are compiled in (gemm_micro's KC).
template <int MR, int NR, bool ADD>
static inline __attribute__((always_inline)) void attn_mm(float* c, int ldc, const float* a, int ars, int aks,
                                                          const float* b, int ldb, int R, int N, int K) {
    for (int n0 = 0; n0 < N; n0 += NR)
        for (int r0 = 0; r0 < R; r0 += MR) {
            float* cb = c + (size_t)r0 * ldc + n0;
            const float* ab = a + (size_t)r0 * ars;
            switch (K) {
            case 32: attn_block<MR, NR, ADD, 32>(cb, ldc, ab, ars, aks, b + n0, ldb); break;
            case 48: attn_block<MR, NR, ADD, 48>(cb, ldc, ab, ars, aks, b + n0, ldb); break;
            case 64: attn_block<MR, NR, ADD, 64>(cb, ldc, ab, ars, aks, b + n0, ldb); break;
            case 128: attn_block<MR, NR, ADD, 128>(cb, ldc, ab, ars, aks, b + n0, ldb); break;
            default: gemm_micro<MR, NR, ADD>(cb, ldc, MR, NR, ab, ars, aks, b + n0, ldb, K);
            }
        }
}

// dst (rows, ld) = rows r0 .. r0+n-1 of head h of x (T, H, D), zero in columns D .. ld and rows
// n .. rows
static inline void attn_rows_cpu(float* __restrict dst, int rows, int ld, const float* x, size_t r0, int n, int H, int h,
                                 int D) {
    for (int r = 0; r < rows; r++) {
        float* dr = dst + (size_t)r * ld;
        const int kept = r < n ? D : 0;  // values copied; the rest of the row is padding
        if (kept) memcpy(dr, x + ((r0 + r) * H + h) * D, kept * sizeof(float));
        memset(dr + kept, 0, (ld - kept) * sizeof(float));
    }
}
// The per-call copies (AttnCpu) of x (T, H, D), nt = T / tile rounded up: dst (H, nt, D, tile)
// head by head, tile by tile transposed; dst (H, nt tile, Dp) head by head as rows. Zero past row
// T and in columns D .. Dp.
static inline void attn_pack_cols(float* dst, const float* x, size_t T, int H, int D, int tile) {
    const size_t nt = (T + tile - 1) / tile;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < H * nt; i++) {  // (head, tile)
        const int h = (int)(i / nt);
        const size_t t0 = i % nt * tile;
        float* dt = dst + i * D * tile;
        for (int d = 0; d < D; d++)
            for (int c = 0; c < tile; c++) dt[d * tile + c] = t0 + c < T ? x[((t0 + c) * H + h) * D + d] : 0.0f;
    }
}
static inline void attn_pack_rows(float* dst, int Dp, const float* x, size_t T, int H, int D, int tile) {
    const size_t nt = (T + tile - 1) / tile;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < H * nt; i++) {
        const int h = (int)(i / nt);
        const size_t t0 = i % nt * tile;
        attn_rows_cpu(dst + i * tile * Dp, tile, Dp, x, t0, (int)attn_min_cpu(tile, T - t0), H, h, D);
    }
}
// Packed documents. The first key query row t sees (Tk or more: none).
static inline size_t attn_first_key_cpu(const AttnCpu& a, size_t t) {
    return a.qdoc && (size_t)a.qdoc[t] > a.k0 ? (size_t)a.qdoc[t] - a.k0 : 0;
}
// Scores st (key by query, row pitch ld) of keys j0 .. j0+nk-1 for queries t0 .. t0+nq-1: those
// of the keys before each query's document set to -inf (weight 0).
static inline void attn_mask_docs_cpu(const AttnCpu& a, float* st, int ld, size_t t0, int nq, size_t j0, int nk) {
    for (int i = 0; i < nq; i++) {
        const size_t first = attn_first_key_cpu(a, t0 + i);
        const int lo = first > j0 ? (int)attn_min_cpu(first - j0, nk) : 0;
        for (int j = 0; j < lo; j++) st[(size_t)j * ld + i] = -INFINITY;
    }
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

// Forward, query tile qi of head h (queries t0 .. t0+TILE-1), key tiles in order. Per query i an
// online softmax over the tiles: m_i the running max, l_i = sum_j e^(s_ji - m_i), acc_i = sum_j
// e^(s_ji - m_i) v_j; then this call's lse_b = m + log l and o_b = acc / l merge into (o, lse) by
// log-sum-exp (see attention_forward_cpu).
template <int MR, int NR, int TILE>
static inline __attribute__((always_inline)) void attention_forward_tile(const AttnCpu& a, size_t qi, int h,
                                                                         float* scratch) {
    const int D = a.D, Dp = a.Dp, hk = h / (a.Hq / a.Hkv);
    const size_t t0 = qi * TILE;
    const int nq = (int)attn_min_cpu(TILE, a.Tq - t0);
    const float* qt = a.qt + ((size_t)h * a.ntq + qi) * D * TILE;  // (D, TILE) this tile's queries, transposed
    const float* kr = a.kr + (size_t)hk * a.ntk * TILE * Dp;       // (ntk TILE, Dp) this head's keys
    const float* vr = a.vr + (size_t)hk * a.ntk * TILE * Dp;       // (ntk TILE, Dp) and values
    float* st = scratch;            // (TILE, TILE) s^T: scores of key j (row) for query i, then e^(s - m)
    float* acc = st + TILE * TILE;  // (TILE, Dp)
    float* m = acc + TILE * Dp;     // (TILE) running max per query
    float* l = m + TILE;            // (TILE) running sum
    float* mx = l + TILE;           // (TILE) the max with this key tile
    float* rs = mx + TILE;          // (TILE) e^(m - mx): the rescale of l and acc
    float* sum = rs + TILE;         // (TILE) this key tile's sum
    memset(acc, 0, (size_t)TILE * Dp * sizeof(float));
    for (int i = 0; i < TILE; i++) m[i] = -INFINITY, l[i] = 0.0f;
    const size_t nkt = a.causal ? qi + 1 : a.ntk;  // key tiles seen: causal (Tq == Tk) stops at the diagonal
    // with documents (qdoc), the key tiles wholly before the first query's document are skipped,
    // and the keys before a query's document masked in the tiles before the last query's
    const size_t first0 = attn_first_key_cpu(a, t0), first_last = attn_first_key_cpu(a, t0 + nq - 1);
    const int QB = 16;  // queries per block of the softmax loops (TILE is a multiple of 16)
    for (size_t kj = first0 / TILE; kj < nkt; kj++) {
        const size_t j0 = kj * TILE;
        const int nk = (int)attn_min_cpu(TILE, a.Tk - j0), rk = attn_round_up(nk, MR);
        const bool diag = a.causal && kj == qi;  // query i sees key j only for j <= i
        attn_mm<MR, NR, false>(st, TILE, kr + j0 * Dp, Dp, 1, qt, TILE, rk, TILE, D);  // s_ji = k_j . q_i
        if (diag)  // query i sees key j only for j <= i: the others' scores are -inf, their weights 0
            for (int j = 1; j < nk; j++)
                for (int i = 0; i < j; i++) st[j * TILE + i] = -INFINITY;
        if (j0 < first_last) attn_mask_docs_cpu(a, st, TILE, t0, nq, j0, nk);
        // Down the keys for each block of QB queries, so the block's max and sum stay in registers.
        for (int i0 = 0; i0 < TILE; i0 += QB) {
            float mb[QB];  // the max of queries i0 .. i0+QB-1, then the shift of their exponents
            for (int i = 0; i < QB; i++) mb[i] = m[i0 + i];
            for (int j = 0; j < nk; j++) {
                const float* sj = st + j * TILE + i0;
#pragma omp simd
                for (int i = 0; i < QB; i++) mb[i] = sj[i] * a.scale > mb[i] ? sj[i] * a.scale : mb[i];
            }
            float sb[QB];  // their sums
            for (int i = 0; i < QB; i++) {
                mx[i0 + i] = mb[i];
                mb[i] = mb[i] == -INFINITY ? 0.0f : mb[i];  // no key seen yet: every weight is e^-inf = 0
                sb[i] = 0.0f;
            }
            for (int j = 0; j < nk; j++) {
                float* sj = st + j * TILE + i0;
#pragma omp simd
                for (int i = 0; i < QB; i++) {
                    const float p = attn_exp(sj[i] * a.scale - mb[i]);
                    sj[i] = p;
                    sb[i] += p;
                }
            }
            for (int i = 0; i < QB; i++) sum[i0 + i] = sb[i];
        }
        bool moved = false;
#pragma omp simd reduction(|| : moved)
        for (int i = 0; i < TILE; i++) {  // 0 where m was -inf (the first tile); 1 where the max stayed
            rs[i] = mx[i] == -INFINITY ? 1.0f : attn_exp(m[i] - mx[i]);
            moved = moved || rs[i] != 1.0f;
            l[i] = l[i] * rs[i] + sum[i];
            m[i] = mx[i];
        }
        if (moved)
            for (int i = 0; i < TILE; i++) {
                float* ai = acc + i * Dp;
#pragma omp simd
                for (int d = 0; d < Dp; d++) ai[d] *= rs[i];
            }
        attn_mm<MR, NR, true>(acc, Dp, st, 1, TILE, vr + j0 * Dp, Dp, TILE, Dp, nk);  // acc_i += sum_j p_ji v_j
    }
    for (int i = 0; i < nq; i++) {
        if (m[i] == -INFINITY) continue;  // no keys: nothing to merge
        const size_t t = t0 + i;
        const float lb = m[i] + logf(l[i]);  // this call's log-sum-exp
        float* orow = a.o + (t * a.Hq + h) * D;
        float* L = a.lse + t * a.Hq + h;
        const float lnew = (*L == -INFINITY) ? lb : fmaxf(*L, lb) + log1pf(expf(-fabsf(*L - lb)));
        const float wa = (*L == -INFINITY) ? 0.0f : expf(*L - lnew), wb = expf(lb - lnew) / l[i];
        for (int d = 0; d < D; d++) orow[d] = orow[d] * wa + acc[i * Dp + d] * wb;
        *L = lnew;
    }
}

// Backward, key tile kj of kv head hk (keys j0 .. j0+TILE-1): for each query head h of its group,
// the query tiles in order (from the diagonal if causal), with P = e^(scale s - lse) and
// dS = scale P (dO_t . v_j - delta_t):
//   dv_j += sum_t P_tj dO_t,  dk_j += sum_t dS_tj q_t  (this tile's rows, summed here),
//   dq_t += dS_tj k_j         (into group g's copy of dq).
template <int MR, int NR, int TILE>
static inline __attribute__((always_inline)) void attention_backward_key_tile(const AttnCpu& a, size_t kj, int hk,
                                                                              int g, float* scratch) {
    const int D = a.D, Dp = a.Dp, group = a.Hq / a.Hkv;
    const size_t j0 = kj * TILE;
    const int nk = (int)attn_min_cpu(TILE, a.Tk - j0), rk = attn_round_up(nk, MR);
    const float* kr = a.kr + ((size_t)hk * a.ntk * TILE + j0) * Dp;  // (TILE, Dp) this tile's keys
    const float* vr = a.vr + ((size_t)hk * a.ntk * TILE + j0) * Dp;  // (TILE, Dp) and values
    float* pt = scratch;            // (TILE, TILE) s^T (key j by query t), then P^T
    float* dst = pt + TILE * TILE;  // (TILE, TILE) dO_t . v_j, then dS^T
    float* dkb = dst + TILE * TILE;  // (TILE, Dp) dk of the tile's keys
    float* dvb = dkb + TILE * Dp;   // (TILE, Dp) dv
    float* L = dvb + TILE * Dp;     // (TILE) the query tile's lse (+inf past the last query: P = 0)
    float* dl = L + TILE;           // (TILE) and delta
    // with documents (qdoc), the queries that see key j end at qend[j] (Tq without; non-decreasing
    // in j): the query tiles from the last key's end on are skipped, and in the others P and dS
    // are zeroed past each key's end
    size_t qend[TILE];
    for (int j = 0; j < nk; j++) qend[j] = attn_query_end_cpu(a, j0 + j);
    const size_t ntq = a.qdoc ? (qend[nk - 1] + TILE - 1) / TILE : a.ntq;
    attn_rows_cpu(dkb, TILE, Dp, a.dk, j0, nk, a.Hkv, hk, D);
    attn_rows_cpu(dvb, TILE, Dp, a.dv, j0, nk, a.Hkv, hk, D);
    for (int h = hk * group; h < (hk + 1) * group; h++) {
        const float* qt = a.qt + (size_t)h * a.ntq * D * TILE;     // (ntq, D, TILE) this head's queries, transposed
        const float* ot = a.ot + (size_t)h * a.ntq * D * TILE;     // (ntq, D, TILE) their dO, transposed
        const float* qr = a.qr + (size_t)h * a.ntq * TILE * Dp;    // (ntq TILE, Dp) the queries as rows
        const float* orr = a.orr + (size_t)h * a.ntq * TILE * Dp;  // (ntq TILE, Dp) dO as rows
        float* dqg = a.dqg + ((size_t)g * a.Hq + h) * a.ntq * TILE * Dp;  // (ntq TILE, Dp) this group's dq
        for (size_t qi = a.causal ? kj : 0; qi < ntq; qi++) {
            const size_t q0 = qi * TILE;
            const int nt = (int)attn_min_cpu(TILE, a.Tq - q0);
            const bool diag = a.causal && qi == kj;  // query t sees key j only for t >= j
            for (int c = 0; c < TILE; c++) {
                L[c] = c < nt ? a.lse_in[(q0 + c) * a.Hq + h] : INFINITY;
                dl[c] = c < nt ? a.delta[(q0 + c) * a.Hq + h] : 0.0f;
            }
            attn_mm<MR, NR, false>(pt, TILE, kr, Dp, 1, qt + qi * D * TILE, TILE, rk, TILE, D);   // s_jt = k_j . q_t
            attn_mm<MR, NR, false>(dst, TILE, vr, Dp, 1, ot + qi * D * TILE, TILE, rk, TILE, D);  // v_j . dO_t
            for (int j = 0; j < rk; j++) {  // (rows nk .. rk: zero keys, P set to 0)
                float* pj = pt + j * TILE;
                float* dj = dst + j * TILE;
                const int lo = j >= nk ? TILE : diag ? j : 0;  // the first query that sees key j
#pragma omp simd
                for (int c = 0; c < TILE; c++) {
                    const float p = c >= lo ? attn_exp(pj[c] * a.scale - L[c]) : 0.0f;
                    pj[c] = p;
                    dj[c] = p * (dj[c] - dl[c]) * a.scale;
                }
                if (j < nk && qend[j] < q0 + nt) {  // documents: queries from qend[j] on do not see key j
                    const int hi = qend[j] > q0 ? (int)(qend[j] - q0) : 0;
                    memset(pj + hi, 0, (TILE - hi) * sizeof(float));
                    memset(dj + hi, 0, (TILE - hi) * sizeof(float));
                }
            }
            attn_mm<MR, NR, true>(dvb, Dp, pt, TILE, 1, orr + q0 * Dp, Dp, rk, Dp, nt);   // dv_j += P_tj dO_t
            attn_mm<MR, NR, true>(dkb, Dp, dst, TILE, 1, qr + q0 * Dp, Dp, rk, Dp, nt);   // dk_j += dS_tj q_t
            attn_mm<MR, NR, true>(dqg + q0 * Dp, Dp, dst, 1, TILE, kr, Dp, TILE, Dp, nk);  // dq_t += dS_tj k_j
        }
    }
    for (int r = 0; r < nk; r++) {
        memcpy(a.dk + ((j0 + r) * a.Hkv + hk) * D, dkb + r * Dp, D * sizeof(float));
        memcpy(a.dv + ((j0 + r) * a.Hkv + hk) * D, dvb + r * Dp, D * sizeof(float));
    }
}
// One backward task: group g of kv head hk, its key tiles g, g + G, g + 2G, ... in order.
// Its dq copies (one per query head of kv head hk) start at zero.
template <int MR, int NR, int TILE>
static inline __attribute__((always_inline)) void attention_backward_group(const AttnCpu& a, size_t g, int hk,
                                                                           float* scratch) {
    const int group = a.Hq / a.Hkv;
    const size_t rows = a.ntq * TILE * a.Dp;  // one head's copy
    memset(a.dqg + (g * a.Hq + (size_t)hk * group) * rows, 0, group * rows * sizeof(float));
    for (size_t kj = g; kj < a.ntk; kj += a.groups) attention_backward_key_tile<MR, NR, TILE>(a, kj, hk, (int)g, scratch);
}

// The two task functions once per instruction set with its register block (MR x NR as in
// ops.cuh's gemm_tile variants) and tile, and the set this CPU runs (cpu_simd).
typedef void (*AttnTaskFn)(const AttnCpu&, size_t, int, float*);
struct AttnCpuKernels {
    AttnTaskFn forward, backward;
    int nr, tile;
};
#define ATTN_CPU_KERNELS(SET, ATTR, MR, NR, TILE)                                                                 \
    static_assert(TILE % MR == 0 && TILE % NR == 0 && TILE % 16 == 0, "a tile is whole register blocks both ways");                  \
    ATTR static void attention_forward_tile_##SET(const AttnCpu& a, size_t i, int h, float* s) {                   \
        attention_forward_tile<MR, NR, TILE>(a, i, h, s);                                                          \
    }                                                                                                              \
    ATTR static void attention_backward_group_##SET(const AttnCpu& a, size_t g, int hk, float* s) {                \
        attention_backward_group<MR, NR, TILE>(a, g, hk, s);                                                       \
    }                                                                                                              \
    static const AttnCpuKernels attn_cpu_##SET = {attention_forward_tile_##SET, attention_backward_group_##SET, NR, \
                                                  TILE};
ATTN_CPU_KERNELS(base, , 4, 16, 64)
#ifdef CPU_SIMD_VARIANTS
ATTN_CPU_KERNELS(avx512, CPU_AVX512, 8, 32, 64)
ATTN_CPU_KERNELS(avx2, CPU_AVX2, 6, 16, 48)
#endif
static inline const AttnCpuKernels& attn_cpu_kernels() {
#ifdef CPU_SIMD_VARIANTS
    return cpu_simd() == 2 ? attn_cpu_avx512 : cpu_simd() == 1 ? attn_cpu_avx2 : attn_cpu_base;
#else
    return attn_cpu_base;
#endif
}

// n tasks (i, h) for i < n / H, h < H, scheduled dynamically from the last i (in a causal call
// the last query tiles, and the first key-tile groups, are the longest), each thread with its own
// scratch: the larger of the forward's and the backward's.
static inline void attn_cpu_run(AttnTaskFn task, const AttnCpu& a, size_t n_i, int H, bool last_first) {
    if (n_i == 0 || H <= 0) return;
    const size_t T = attn_cpu_kernels().tile;
    const size_t scratch_floats = 2 * T * T + 2 * T * a.Dp + 5 * T;
#pragma omp parallel
    {
        static thread_local std::vector<float> scratch;  // kept from call to call, grown as needed
        if (scratch.size() < scratch_floats) scratch.resize(scratch_floats);
#pragma omp for schedule(dynamic)
        for (size_t n = 0; n < n_i * H; n++)
            task(a, last_first ? n_i - 1 - n / H : n / H, (int)(n % H), scratch.data());
    }
}

// The per-call copies of the inputs and the dq groups (AttnCpu), kept from call to call and grown
// as needed: no allocation, zero-filling or page faults on every call (they were 2-3% of a step,
// on one thread while the others waited). The packing writes every value of its copy, padding
// included; each backward task zeroes its own dq copies. One set per process: attention is never
// called from two threads at once.
struct AttnCpuBuffers {
    std::vector<float> qt, ot, qr, orr, kr, vr, dqg;
};
static inline float* attn_buffer(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}
static inline AttnCpuBuffers& attn_cpu_buffers() {
    static AttnCpuBuffers b;
    return b;
}

// The call's shapes, for the set in use: its tile, and Dp = D rounded up to its NR.
static inline AttnCpu attn_cpu_args(size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal) {
    if (causal && Tq != Tk) fatal("attention: a causal block pairs a chunk with itself; Tq %zu != Tk %zu", Tq, Tk);
    const AttnCpuKernels& kern = attn_cpu_kernels();
    AttnCpu a = {};
    a.Tq = Tq, a.Tk = Tk, a.ntq = (Tq + kern.tile - 1) / kern.tile, a.ntk = (Tk + kern.tile - 1) / kern.tile;
    a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.Dp = attn_round_up(D, kern.nr);
    a.causal = causal, a.scale = 1.0f / sqrtf((float)D);
    return a;
}

// One (q_i, k_j, v_j) block, merged into the running (o, lse). Before the first block of a query
// chunk o must be 0 and lse -INFINITY. lse' = log(e^lse + e^lse_b), o' = o e^(lse - lse') +
// o_b e^(lse_b - lse'), with (o_b, lse_b) this block's attention (attention_forward_tile).
// qdoc, k0: packed documents (the file's header); rows that see no key here are left as they are.
static inline void attention_forward_cpu(float* o, float* lse, const float* q, const float* k, const float* v,
                                         size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                         const int32_t* qdoc = nullptr, size_t k0 = 0) {
    if (Tq == 0 || Tk == 0) return;
    AttnCpu a = attn_cpu_args(Tq, Tk, Hq, Hkv, D, causal);
    a.o = o, a.lse = lse, a.q = q, a.k = k, a.v = v, a.qdoc = qdoc, a.k0 = k0;
    const size_t T = attn_cpu_kernels().tile;
    AttnCpuBuffers& b = attn_cpu_buffers();
    float* qt = attn_buffer(b.qt, Hq * a.ntq * T * D);         // (Hq, ntq, D, TILE)
    float* kr = attn_buffer(b.kr, Hkv * a.ntk * T * a.Dp);     // (Hkv, ntk TILE, Dp)
    float* vr = attn_buffer(b.vr, Hkv * a.ntk * T * a.Dp);     // (Hkv, ntk TILE, Dp)
    attn_pack_cols(qt, q, Tq, Hq, D, (int)T);
    attn_pack_rows(kr, a.Dp, k, Tk, Hkv, D, (int)T);
    attn_pack_rows(vr, a.Dp, v, Tk, Hkv, D, (int)T);
    a.qt = qt, a.kr = kr, a.vr = vr;
    attn_cpu_run(attn_cpu_kernels().forward, a, a.ntq, Hq, true);
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
// One pass over the key tiles (attention_backward_key_tile), then dq += its groups' sums in order.
static inline void attention_backward_cpu(float* dq, float* dk, float* dv, const float* dout, const float* q,
                                          const float* k, const float* v, const float* lse, const float* delta,
                                          size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal,
                                          const int32_t* qdoc = nullptr, size_t k0 = 0) {
    if (Tq == 0 || Tk == 0) return;
    AttnCpu a = attn_cpu_args(Tq, Tk, Hq, Hkv, D, causal);
    a.dq = dq, a.dk = dk, a.dv = dv, a.dout = dout, a.q = q, a.k = k, a.v = v, a.lse_in = lse, a.delta = delta;
    a.qdoc = qdoc, a.k0 = k0;
    const int T = attn_cpu_kernels().tile, Dp = a.Dp;
    a.groups = (int)attn_min_cpu(ATTN_CPU_DQ_GROUPS, a.ntk);
    const size_t rows_q = a.ntq * T;  // query rows of the copies, padded to whole tiles
    AttnCpuBuffers& b = attn_cpu_buffers();
    float* qt = attn_buffer(b.qt, Hq * rows_q * D);        // (Hq, ntq, D, TILE)
    float* ot = attn_buffer(b.ot, Hq * rows_q * D);        // (Hq, ntq, D, TILE)
    float* qr = attn_buffer(b.qr, Hq * rows_q * Dp);       // (Hq, ntq TILE, Dp)
    float* orr = attn_buffer(b.orr, Hq * rows_q * Dp);     // (Hq, ntq TILE, Dp)
    float* kr = attn_buffer(b.kr, Hkv * a.ntk * T * Dp);   // (Hkv, ntk TILE, Dp)
    float* vr = attn_buffer(b.vr, Hkv * a.ntk * T * Dp);   // (Hkv, ntk TILE, Dp)
    attn_pack_cols(qt, q, Tq, Hq, D, T);
    attn_pack_cols(ot, dout, Tq, Hq, D, T);
    attn_pack_rows(qr, Dp, q, Tq, Hq, D, T);
    attn_pack_rows(orr, Dp, dout, Tq, Hq, D, T);
    attn_pack_rows(kr, Dp, k, Tk, Hkv, D, T);
    attn_pack_rows(vr, Dp, v, Tk, Hkv, D, T);
    a.qt = qt, a.ot = ot, a.qr = qr, a.orr = orr, a.kr = kr, a.vr = vr;
    a.dqg = attn_buffer(b.dqg, a.groups * Hq * rows_q * Dp);  // (groups, Hq, ntq TILE, Dp), zeroed by the tasks
    attn_cpu_run(attn_cpu_kernels().backward, a, a.groups, Hkv, false);
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < Tq * Hq; r++) {  // dq row (t, h) += its groups' sums, group by group
        const size_t t = r / Hq, h = r % Hq;
        float* out = dq + r * D;
        for (int g = 0; g < a.groups; g++) {
            const float* part = a.dqg + (((size_t)g * Hq + h) * rows_q + t) * Dp;
            for (int d = 0; d < D; d++) out[d] += part[d];
        }
    }
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
// The backward kernels visit keys in order for dq and heads, then queries in order for dk/dv,
// starting from the values already in dq, dk, dv. The CPU makes one pass over key tiles, sums
// each tile's share in registers before adding it, and sums dq per group of key tiles first, so
// the two agree to rounding, not bit for bit.
#define ATTN_ROWS 8   // warps per block = output rows per block
#define ATTN_TILE 32  // rows per shared-memory tile: one per lane for the scores

// Shared memory of one block (bytes) for head size D: the forward kernel's (its query rows, a key
// and a value tile) and the backward kernels' (the larger of the two: the dk/dv kernel's rows,
// two tiles and the tile's lse and delta). Past 48 KiB a kernel must opt in, up to what the GPU
// allows per block: 163 KiB on sm_80, 99 KiB on sm_86 and sm_89, 227 KiB on sm_90.
static inline size_t attn_fwd_smem(int D) { return (ATTN_ROWS * D + 2 * ATTN_TILE * (D | 1)) * sizeof(float); }
static inline size_t attn_bwd_smem(int D) {
    return (2 * ATTN_ROWS * D + 2 * ATTN_TILE * (D | 1) + 2 * ATTN_TILE) * sizeof(float);
}
// "" when the attention kernels for head size D fit a GPU (named `gpu`) that allows `limit` bytes
// of shared memory per block, else one line saying so, with the largest head size that fits.
static inline std::string attention_smem_check(int D, size_t limit, const std::string& gpu) {
    if (attn_bwd_smem(D) <= limit) return "";
    int fits = 0;
    for (int e = 2; e <= 512; e += 2)
        if (attn_bwd_smem(e) <= limit) fits = e;
    char b[256];
    snprintf(b, sizeof b, "head size %d: the GPU attention kernels need %.1f KiB of shared memory per block, and %s "
             "allows %.1f KiB (head sizes up to %d fit here)", D, attn_bwd_smem(D) / 1024.0, gpu.c_str(), limit / 1024.0, fits);
    return b;
}

#ifdef __CUDACC__
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
// The shared memory per block this process's GPU allows kernels that opt in (asked once per device).
static inline size_t attn_smem_limit() {
    static int device = -1, limit = 0;
    int d = 0;
    CUDA_CHECK(cudaGetDevice(&d));
    if (d != device) {
        CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, d));
        device = d;
    }
    return (size_t)limit;
}
// "" when this process's GPU runs the attention kernels for head size D, else why not (model_create
// asks at the start of a run; every attention call checks it too, before a launch could fail)
static inline std::string attention_gpu_fits(int D) {
    if (attn_bwd_smem(D) <= 48 * 1024) return "";  // every GPU since sm_35 allows that much
    int d = 0;
    CUDA_CHECK(cudaGetDevice(&d));
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, d));
    return attention_smem_check(D, attn_smem_limit(), std::string(p.name) + " (sm_" + std::to_string(p.major) +
                                                          std::to_string(p.minor) + ")");
}
static inline void attn_check(const char* what, int Hq, int Hkv, int D) {
    if (D < 1 || D > 512 || Hq < 1 || Hkv < 1 || Hq % Hkv)
        fatal("%s: head size %d must be in 1..512 and the query heads (%d) a multiple of the kv heads (%d)", what,
              D, Hq, Hkv);
    if (attn_bwd_smem(D) > 48 * 1024 && attn_bwd_smem(D) > attn_smem_limit()) fatal("%s: %s", what, attention_gpu_fits(D).c_str());
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
    const size_t smem = attn_fwd_smem(D);
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
// CPU twin: attention_backward_cpu (its dq). Grid (Tq / ATTN_ROWS, Hq).
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
// CPU twin: attention_backward_cpu (its dk and dv). Grid (Tk / ATTN_ROWS, Hkv).
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
    const size_t smem = attn_bwd_smem(D);
    ATTN_DISPATCH(D, attention_backward_dq_kernel, dim3(ceil_div(Tq, ATTN_ROWS), Hq), smem, stream, dq, dout, q, k,
                  v, lse, delta, Tq, Tk, Hq, Hkv, D, causal, scale, qdoc, k0);
    ATTN_DISPATCH(D, attention_backward_dkdv_kernel, dim3(ceil_div(Tk, ATTN_ROWS), Hkv), smem, stream, dk, dv,
                  dout, q, k, v, lse, delta, Tq, Tk, Hq, Hkv, D, causal, scale, qdoc, k0);
}
#endif

// attention.cuh: causal attention of one query chunk against one key/value chunk, the unit FPDT
// schedules. The forward pass merges each block's partial result into a running (O, LSE) by
// log-sum-exp; the backward pass recomputes P from the saved LSE. CPU reference here; the CUDA
// twins sit beside them.
//
// Layouts: q (Tq, Hq, D), k and v (Tk, Hkv, D), o (Tq, Hq, D) fp32, lse and delta (Tq, Hq) fp32.
// Query head h reads kv head h / (Hq / Hkv) (grouped-query attention). `causal` is for the
// diagonal block (same positions for queries and keys): query t sees keys 0..t only.
#pragma once
#include <cmath>
#include "common.h"

// One (q_i, k_j, v_j) block, merged into the running (o, lse). Before the first block of a query
// chunk o must be 0 and lse -INFINITY. Single pass with an online softmax per (t, h), so no score
// buffer is needed; then  lse' = log(e^lse + e^lse_b),  o' = o e^(lse - lse') + o_b e^(lse_b - lse').
static inline void attention_forward_cpu(float* o, float* lse, const float* q, const float* k, const float* v,
                                         size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal) {
    const float scale = 1.0f / sqrtf((float)D);
    const int group = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(static)
    for (size_t t = 0; t < Tq; t++)
        for (int h = 0; h < Hq; h++) {
            const float* qr = q + (t * Hq + h) * D;
            const int hk = h / group;
            float acc[512];  // D <= 512, checked by the model config
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            float m = -INFINITY, l = 0.0f;
            const size_t nk = causal ? t + 1 : Tk;
            for (size_t j = 0; j < nk; j++) {
                const float* kr = k + (j * Hkv + hk) * D;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += qr[d] * kr[d];
                s *= scale;
                if (s > m) {  // new running max: rescale what we have
                    const float r = expf(m - s);
                    l *= r;
                    for (int d = 0; d < D; d++) acc[d] *= r;
                    m = s;
                }
                const float p = expf(s - m);
                l += p;
                const float* vr = v + (j * Hkv + hk) * D;
#pragma omp simd
                for (int d = 0; d < D; d++) acc[d] += p * vr[d];
            }
            if (nk == 0) continue;
            const float lb = m + logf(l);  // this block's log-sum-exp
            float* orow = o + (t * Hq + h) * D;
            float* L = lse + t * Hq + h;
            const float lnew = (*L == -INFINITY) ? lb : fmaxf(*L, lb) + log1pf(expf(-fabsf(*L - lb)));
            const float a = (*L == -INFINITY) ? 0.0f : expf(*L - lnew), b = expf(lb - lnew) / l;
            for (int d = 0; d < D; d++) orow[d] = orow[d] * a + acc[d] * b;
            *L = lnew;
        }
}

// delta (Tq, Hq) = rowsum(dO * O), once per query chunk before its backward blocks.
static inline void attention_delta_cpu(float* delta, const float* dout, const float* o, size_t Tq, int Hq, int D) {
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < Tq * Hq; r++) {
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += dout[r * D + d] * o[r * D + d];
        delta[r] = s;
    }
}

// Backward of one block. With P = exp(S - lse) and dS = P (dO V^T - delta):
//   dq (Tq, Hq, D) += scale dS K;   dk (Tk, Hkv, D) += scale dS^T Q;   dv (Tk, Hkv, D) += P^T dO.
// Two passes, each parallel over what it writes (query rows, then key rows), so no atomics.
static inline void attention_backward_cpu(float* dq, float* dk, float* dv, const float* dout, const float* q,
                                          const float* k, const float* v, const float* lse, const float* delta,
                                          size_t Tq, size_t Tk, int Hq, int Hkv, int D, bool causal) {
    const float scale = 1.0f / sqrtf((float)D);
    const int group = Hq / Hkv;
#pragma omp parallel for collapse(2) schedule(static)
    for (size_t t = 0; t < Tq; t++)
        for (int h = 0; h < Hq; h++) {
            const float* qr = q + (t * Hq + h) * D;
            const float* dor = dout + (t * Hq + h) * D;
            float* dqr = dq + (t * Hq + h) * D;
            const int hk = h / group;
            const float L = lse[t * Hq + h], dl = delta[t * Hq + h];
            const size_t nk = causal ? t + 1 : Tk;
            for (size_t j = 0; j < nk; j++) {
                const float* kr = k + (j * Hkv + hk) * D;
                const float* vr = v + (j * Hkv + hk) * D;
                float s = 0.0f, dp = 0.0f;
#pragma omp simd reduction(+ : s, dp)
                for (int d = 0; d < D; d++) {
                    s += qr[d] * kr[d];
                    dp += dor[d] * vr[d];
                }
                const float ds = expf(s * scale - L) * (dp - dl) * scale;
#pragma omp simd
                for (int d = 0; d < D; d++) dqr[d] += ds * kr[d];
            }
        }
#pragma omp parallel for collapse(2) schedule(static)
    for (size_t j = 0; j < Tk; j++)
        for (int hk = 0; hk < Hkv; hk++) {
            const float* kr = k + (j * Hkv + hk) * D;
            const float* vr = v + (j * Hkv + hk) * D;
            float* dkr = dk + (j * Hkv + hk) * D;
            float* dvr = dv + (j * Hkv + hk) * D;
            for (int h = hk * group; h < (hk + 1) * group; h++)
                for (size_t t = causal ? j : 0; t < Tq; t++) {
                    const float* qr = q + (t * Hq + h) * D;
                    const float* dor = dout + (t * Hq + h) * D;
                    float s = 0.0f, dp = 0.0f;
#pragma omp simd reduction(+ : s, dp)
                    for (int d = 0; d < D; d++) {
                        s += qr[d] * kr[d];
                        dp += dor[d] * vr[d];
                    }
                    const float p = expf(s * scale - lse[t * Hq + h]);
                    const float ds = p * (dp - delta[t * Hq + h]) * scale;
#pragma omp simd
                    for (int d = 0; d < D; d++) {
                        dvr[d] += p * dor[d];
                        dkr[d] += ds * qr[d];
                    }
                }
        }
}

// ops.cuh: the token-wise ops of a decoder layer — matmul, LayerNorm/RMSNorm, GELU/SwiGLU, RoPE,
// embedding, residual — each as a CPU reference (plain fp32 loops, OpenMP). These loops are the
// readable specification; a CUDA twin of each goes beside it.
//
// Conventions: row-major; a Linear weight W is (OC, IC) as in PyTorch, y = x W^T + b.
// Backward functions ACCUMULATE (+=) into parameter gradients and into dinp unless said otherwise,
// so that residual branches add up without extra buffers. Every loop is parallel over an output
// index, never over a reduction, so results do not depend on the thread count.
#pragma once
#include <cmath>
#include "common.h"

// ----------------------------------------------------------------------------
// matmul: out (T, OC) = inp (T, IC) @ W (OC, IC)^T + b (OC), b may be null

static inline void matmul_forward_cpu(float* out, const float* inp, const float* w, const float* b, size_t T,
                                      int IC, int OC) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float* x = inp + t * IC;
        float* y = out + t * OC;
        for (int o = 0; o < OC; o++) {
            const float* wr = w + (size_t)o * IC;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int i = 0; i < IC; i++) acc += x[i] * wr[i];
            y[o] = acc + (b ? b[o] : 0.0f);
        }
    }
}

// dinp (T, IC) += dout @ W; dw (OC, IC) += dout^T @ inp; db (OC) += sum_t dout. dinp/db may be null.
static inline void matmul_backward_cpu(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                       const float* w, size_t T, int IC, int OC) {
    if (dinp) {
#pragma omp parallel for schedule(static)
        for (size_t t = 0; t < T; t++) {
            float* dx = dinp + t * IC;
            const float* dy = dout + t * OC;
            for (int o = 0; o < OC; o++) {
                const float g = dy[o];
                const float* wr = w + (size_t)o * IC;
#pragma omp simd
                for (int i = 0; i < IC; i++) dx[i] += g * wr[i];
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int o = 0; o < OC; o++) {
        float* dwr = dw + (size_t)o * IC;
        float bsum = 0.0f;
        for (size_t t = 0; t < T; t++) {
            const float g = dout[t * OC + o];
            const float* x = inp + t * IC;
            bsum += g;
#pragma omp simd
            for (int i = 0; i < IC; i++) dwr[i] += g * x[i];
        }
        if (db) db[o] += bsum;
    }
}

// ----------------------------------------------------------------------------
// LayerNorm: out = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps). RMSNorm (b == null and
// rms == true): out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps). mean/rstd (T) are saved.

static inline void norm_forward_cpu(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                    const float* b, size_t T, int C, bool rms, float eps) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float* x = inp + t * C;
        double m = 0.0, v = 0.0;
        if (!rms) {
            for (int i = 0; i < C; i++) m += x[i];
            m /= C;
        }
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= C;
        const float s = (float)(1.0 / sqrt(v + eps));
        float* y = out + t * C;
        for (int i = 0; i < C; i++) y[i] = (float)((x[i] - m) * s) * w[i] + (b ? b[i] : 0.0f);
        mean[t] = (float)m;
        rstd[t] = s;
    }
}

// dinp (T, C) += ..., dw (C) += ..., db (C) += ... (db null for RMSNorm)
static inline void norm_backward_cpu(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                     const float* w, const float* mean, const float* rstd, size_t T, int C,
                                     bool rms) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float* x = inp + t * C;
        const float* dy = dout + t * C;
        float* dx = dinp + t * C;
        const float m = mean[t], s = rstd[t];
        double dn_mean = 0.0, dn_n = 0.0;  // mean(dnorm), mean(dnorm * norm)
        for (int i = 0; i < C; i++) {
            const float n = (x[i] - m) * s, dn = w[i] * dy[i];
            dn_mean += dn;
            dn_n += dn * n;
        }
        dn_mean = rms ? 0.0 : dn_mean / C;
        dn_n /= C;
        for (int i = 0; i < C; i++) {
            const float n = (x[i] - m) * s, dn = w[i] * dy[i];
            dx[i] += (float)(s * (dn - dn_mean - n * dn_n));
        }
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float gw = 0.0f, gb = 0.0f;
        for (size_t t = 0; t < T; t++) {
            const float dy = dout[t * C + i];
            gw += dy * (inp[t * C + i] - mean[t]) * rstd[t];
            gb += dy;
        }
        dw[i] += gw;
        if (db) db[i] += gb;
    }
}

// ----------------------------------------------------------------------------
// Activations. GELU (tanh form): out (N) = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))).
// SwiGLU: inp (T, 2F) = [gate | up] per row, out (T, F) = silu(gate) * up.

static inline void gelu_forward_cpu(float* out, const float* inp, size_t N) {
    const float k = 0.7978845608028654f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
}
// dinp (N) = gelu'(inp) * dout  (overwrites)
static inline void gelu_backward_cpu(float* dinp, const float* inp, const float* dout, size_t N) {
    const float k = 0.7978845608028654f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        const float x = inp[i], u = k * (x + 0.044715f * x * x * x), th = tanhf(u);
        const float du = k * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
    }
}

static inline void swiglu_forward_cpu(float* out, const float* inp, size_t T, int F) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i];
            out[t * F + i] = g / (1.0f + expf(-g)) * u;
        }
}
// dinp (T, 2F) = d[gate | up] (overwrites)
static inline void swiglu_backward_cpu(float* dinp, const float* inp, const float* dout, size_t T, int F) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i], dy = dout[t * F + i];
            const float sg = 1.0f / (1.0f + expf(-g));
            dinp[t * 2 * F + i] = dy * u * sg * (1.0f + g * (1.0f - sg));
            dinp[t * 2 * F + F + i] = dy * g * sg;
        }
}

// ----------------------------------------------------------------------------
// RoPE, in place on x (T, nh, D) at global positions pos[t], interleaved pairs:
// (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a), a = pos * theta^(-2i/D). The backward
// is the inverse rotation (sign = -1) applied to the gradient. Angles in double: at position 2M
// the float angle would be off by a tenth of a radian.

static inline void rope_cpu(float* x, const int32_t* pos, size_t T, int nh, int D, float theta, int sign) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < D / 2; i++) {
            const double a = (double)pos[t] * pow((double)theta, -2.0 * i / D);
            const float c = (float)cos(a), s = (float)(sign * sin(a));
            for (int h = 0; h < nh; h++) {
                float* p = x + (t * nh + h) * D + 2 * i;
                const float x0 = p[0], x1 = p[1];
                p[0] = x0 * c - x1 * s;
                p[1] = x0 * s + x1 * c;
            }
        }
}

// ----------------------------------------------------------------------------
// Embedding: out (T, C) = wte[tok[t]]. Backward: dwte[tok[t]] += dout[t], parallel over columns
// so repeated tokens never race.

static inline void embedding_forward_cpu(float* out, const int32_t* tok, const float* wte, size_t T, int C) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) memcpy(out + t * C, wte + (size_t)tok[t] * C, C * sizeof(float));
}
static inline void embedding_backward_cpu(float* dwte, const int32_t* tok, const float* dout, size_t T, int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++)
        for (size_t t = 0; t < T; t++) dwte[(size_t)tok[t] * C + i] += dout[t * C + i];
}

// out (N) += inp (N)
static inline void add_inplace_cpu(float* out, const float* inp, size_t N) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) out[i] += inp[i];
}

// loss.cuh: the LM head's softmax cross-entropy (run chunk by chunk, so the sequence x vocab
// logits never exist in full) and the optimizer: AdamW and the global gradient norm.
// CPU references here; the CUDA twins sit beside them.
#pragma once
#include <cmath>
#include "common.h"

// For each row t of logits (T, V): loss[t] = logsumexp(logits[t]) - logits[t][target[t]],
// pred[t] = argmax; then logits is overwritten with dlogits = (softmax - onehot(target)) * dscale
// (dscale = 1/N for a mean over N tokens), ready for the head's backward matmul.
static inline void crossentropy_cpu(float* logits, float* loss, int32_t* pred, const int32_t* target, size_t T,
                                    int V, float dscale) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        float* z = logits + t * V;
        int am = 0;
        for (int i = 1; i < V; i++)
            if (z[i] > z[am]) am = i;
        const float m = z[am];
        double sum = 0.0;
        for (int i = 0; i < V; i++) sum += exp((double)(z[i] - m));
        const float lse = m + (float)log(sum);
        loss[t] = lse - z[target[t]];
        pred[t] = am;
        for (int i = 0; i < V; i++) z[i] = expf(z[i] - lse) * dscale;
        z[target[t]] -= dscale;
    }
}

// AdamW on n parameters, step t (1-based), bias-corrected; weight decay (decoupled) only where
// `decay` is set (matrices and embeddings, not norms and biases).
static inline void adamw_cpu(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
                             float eps, float wd, bool decay, int t) {
    const float c1 = 1.0f - powf(b1, (float)t), c2 = 1.0f - powf(b2, (float)t);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        const float upd = (m[i] / c1) / (sqrtf(v[i] / c2) + eps);
        p[i] -= lr * (upd + (decay ? wd * p[i] : 0.0f));
    }
}

// sum of squares of g (n), in double; fixed blocks summed in order, so the result does not depend
// on the thread count.
static inline double sumsq_cpu(const float* g, size_t n) {
    const size_t B = 65536, nb = (n + B - 1) / B;
    std::vector<double> part(nb);
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < nb; b++) {
        double s = 0.0;
        for (size_t i = b * B; i < n && i < (b + 1) * B; i++) s += (double)g[i] * g[i];
        part[b] = s;
    }
    double s = 0.0;
    for (double x : part) s += x;
    return s;
}

// g (n) *= s
static inline void scale_cpu(float* g, size_t n, float s) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) g[i] *= s;
}

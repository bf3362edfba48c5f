// loss.cuh: the LM head's softmax cross-entropy (run chunk by chunk, so the sequence x vocab
// logits never exist in full) and the optimizer: AdamW and the global gradient norm.
// CPU references here; the CUDA twins sit beside them.
#pragma once
#include <cmath>
#include "common.h"
#ifdef __CUDACC__
#include <climits>
#include "cuda_common.cuh"
#endif

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
#pragma omp parallel for simd schedule(static)  // (simd: p, g, m and v never overlap)
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        const float upd = (m[i] / c1) / (sqrtf(v[i] / c2) + eps);
        p[i] -= lr * (upd + (decay ? wd * p[i] : 0.0f));
    }
}

#define SUMSQ_BLOCK 65536  // elements per partial sum, on both backends
// doubles of scratch the GPU's sum of squares needs for n elements: one per SUMSQ_BLOCK elements
static inline size_t sumsq_gpu_scratch(size_t n) { return std::max<size_t>(1, (n + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK); }

// sum of squares of g (n), in double; fixed blocks summed in order, so the result does not depend
// on the thread count.
static inline double sumsq_cpu(const float* g, size_t n) {
    const size_t B = SUMSQ_BLOCK, nb = (n + B - 1) / B;
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

// ----------------------------------------------------------------------------
// CUDA twins: same arguments and semantics as the CPU functions above, with device pointers and
// the stream first. Every reduction has a fixed shape (block sizes are constants, partial sums
// combined in a fixed order), so results are the same bits from run to run.
#ifdef __CUDACC__

#define LOSS_THREADS 512  // threads per crossentropy block (one block per row)

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `red` is shared scratch of 32 T. Butterfly within warps, then warp 0 over the warp sums.
template <typename T>
static __device__ __forceinline__ T loss_block_sum(T x, T* red) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();  // red may still be read from a previous call
    if (lane == 0) red[w] = x;
    __syncthreads();
    x = lane < nw ? red[lane] : (T)0;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
// (value, index) with the larger value, the lower index on ties; index INT_MAX means "none".
// (With NaN logits the pick may differ from the CPU's; the loss is NaN on both.)
static __device__ __forceinline__ void loss_argmax_merge(float& v, int& i, float ov, int oi) {
    if (oi != INT_MAX && (i == INT_MAX || ov > v || (ov == v && oi < i))) {
        v = ov;
        i = oi;
    }
}
static __device__ __forceinline__ void loss_warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        loss_argmax_merge(v, i, ov, oi);
    }
}

// Row t of logits (T, V): loss[t] = logsumexp(z) - z[target], pred[t] = argmax z (lowest index on
// ties), z <- (softmax(z) - onehot(target)) dscale. One block per row. CPU twin: crossentropy_cpu.
static __global__ void crossentropy_kernel(float* logits, float* loss, int32_t* pred, const int32_t* target, int V,
                                    float dscale) {
    __shared__ float redv[32];
    __shared__ int redi[32];
    __shared__ double redd[32];
    const size_t t = blockIdx.x;
    float* z = logits + t * V;
    const int tgt = target[t];
    const float zt = z[tgt];  // read before any thread overwrites the row (the reductions below are barriers)
    // argmax: each thread scans its indices in increasing order, keeping the first maximum
    float best = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (bi == INT_MAX || z[i] > best) {
            best = z[i];
            bi = i;
        }
    loss_warp_argmax(best, bi);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    if (lane == 0) {
        redv[w] = best;
        redi[w] = bi;
    }
    __syncthreads();
    best = lane < nw ? redv[lane] : -INFINITY;
    bi = lane < nw ? redi[lane] : INT_MAX;
    loss_warp_argmax(best, bi);  // every warp gets the row's (max, argmax)
    const float m = best;
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += exp((double)(z[i] - m));
    s = loss_block_sum(s, redd);
    const float lse = m + (float)log(s);
    if (threadIdx.x == 0) {
        loss[t] = lse - zt;
        pred[t] = bi;
    }
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float g = expf(z[i] - lse) * dscale;
        if (i == tgt) g -= dscale;
        z[i] = g;
    }
}

static inline void crossentropy_gpu(cudaStream_t stream, float* logits, float* loss, int32_t* pred,
                                    const int32_t* target, size_t T, int V, float dscale) {
    if (T == 0) return;
    if (T > INT_MAX || V < 1) fatal("crossentropy_gpu: %zu rows of %d logits: expected 1..%d rows and V >= 1", T, V, INT_MAX);
    crossentropy_kernel<<<(unsigned)T, LOSS_THREADS, 0, stream>>>(logits, loss, pred, target, V, dscale);
    CUDA_LAUNCHED();
}

// Elementwise AdamW: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr ((m/c1) / (sqrt(v/c2) + eps)
// + wd p [if decay]), c1 = 1 - b1^t and c2 = 1 - b2^t computed on the host. CPU twin: adamw_cpu.
static __global__ void adamw_kernel(float* p, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
                             float eps, float wd, bool decay, float c1, float c2) {
    GRID_STRIDE_LOOP(i, n) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float upd = (mi / c1) / (sqrtf(vi / c2) + eps);
        p[i] -= lr * (upd + (decay ? wd * p[i] : 0.0f));
    }
}

static inline void adamw_gpu(cudaStream_t stream, float* p, const float* g, float* m, float* v, size_t n, float lr,
                             float b1, float b2, float eps, float wd, bool decay, int t) {
    if (n == 0) return;
    const float c1 = 1.0f - powf(b1, (float)t), c2 = 1.0f - powf(b2, (float)t);  // as adamw_cpu
    adamw_kernel<<<elementwise_grid(n), 256, 0, stream>>>(p, g, m, v, n, lr, b1, b2, eps, wd, decay, c1, c2);
    CUDA_LAUNCHED();
}

// Sum of squares, deterministically, in two kernels, blocked like sumsq_cpu: block b of
// SUMSQ_THREADS threads sums elements [b B, (b+1) B), B = SUMSQ_BLOCK = 65536, into scratch[b]
// (thread i takes b B + i + k SUMSQ_THREADS, k = 0, 1, ..., in order, then a fixed tree); one
// block then adds the partials up (thread i takes i + k 1024 in order, then a fixed tree). The
// result depends on n only, never on the GPU or on timing. It differs from sumsq_cpu only in the
// last bits of the double (trees instead of sequential sums inside a block).
#define SUMSQ_THREADS 256
#define SUMSQ_FINAL_THREADS 1024


// part[b] = sum of g[i]^2 over block b's SUMSQ_BLOCK elements. CPU twin: sumsq_cpu (first stage).
static __global__ void sumsq_partial_kernel(double* part, const float* g, size_t n) {
    __shared__ double red[32];
    const size_t lo = (size_t)blockIdx.x * SUMSQ_BLOCK, hi = lo + SUMSQ_BLOCK < n ? lo + SUMSQ_BLOCK : n;
    double s = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s += (double)g[i] * g[i];
    s = loss_block_sum(s, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
// out[0] = sum of part (nb). CPU twin: sumsq_cpu (second stage).
static __global__ void sumsq_final_kernel(double* out, const double* part, size_t nb) {
    __shared__ double red[32];
    double s = 0.0;
    for (size_t i = threadIdx.x; i < nb; i += blockDim.x) s += part[i];
    s = loss_block_sum(s, red);
    if (threadIdx.x == 0) out[0] = s;
}

// *out_dev (one double in device memory) = sum of g[i]^2 (n); scratch: sumsq_gpu_scratch(n)
// doubles of device memory. Nothing is synchronised: read out_dev once the stream gets there.
static inline void sumsq_gpu(cudaStream_t stream, const float* g, size_t n, double* out_dev, double* scratch) {
    const size_t nb = sumsq_gpu_scratch(n);
    if (nb > INT_MAX) fatal("sumsq_gpu: %zu values is more than the %d blocks of %d a grid can take", n, INT_MAX, SUMSQ_BLOCK);
    sumsq_partial_kernel<<<(unsigned)nb, SUMSQ_THREADS, 0, stream>>>(scratch, g, n);
    CUDA_LAUNCHED();
    sumsq_final_kernel<<<1, SUMSQ_FINAL_THREADS, 0, stream>>>(out_dev, scratch, nb);
    CUDA_LAUNCHED();
}

// g (n) *= s. CPU twin: scale_cpu.
static __global__ void scale_kernel(float* g, size_t n, float s) {
    GRID_STRIDE_LOOP(i, n)
        g[i] *= s;
}

static inline void scale_gpu(cudaStream_t stream, float* g, size_t n, float s) {
    if (n == 0) return;
    scale_kernel<<<elementwise_grid(n), 256, 0, stream>>>(g, n, s);
    CUDA_LAUNCHED();
}
#endif

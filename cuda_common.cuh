// cuda_common.cuh: what every CUDA twin needs: checks on every CUDA and cuBLAS call, the GPU
// context (compute, host-to-device, device-to-host and communication streams, see docs/method.md;
// the cuBLAS handle), and launch sizes.
// Only nvcc sees this file (everything CUDA sits behind #ifdef __CUDACC__).
#pragma once
#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include "common.h"

#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) fatal("CUDA error at %s:%d: %s", __FILE__, __LINE__, cudaGetErrorString(e_)); \
    } while (0)
#define CUBLAS_CHECK(call)                                                                      \
    do {                                                                                        \
        cublasStatus_t s_ = (call);                                                             \
        if (s_ != CUBLAS_STATUS_SUCCESS) fatal("cuBLAS error %d at %s:%d", (int)s_, __FILE__, __LINE__); \
    } while (0)
// after every kernel launch
#define CUDA_LAUNCHED() CUDA_CHECK(cudaGetLastError())

// The GPU half of Ctx: compute, host-to-device, device-to-host and communication (NCCL) streams,
// ordered by events.
struct GpuCtx {
    int device = 0;
    cudaStream_t compute = nullptr, h2d = nullptr, d2h = nullptr, comm = nullptr;
    cublasHandle_t blas = nullptr;
};

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// Elementwise launches: 256 threads a block and at most 65536 blocks; the kernels' grid-stride
// loops (size_t indices) cover the rest, so N may pass 2^31.
static inline unsigned elementwise_grid(size_t n) { return (unsigned)std::min<size_t>((n + 255) / 256, 65536); }
#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)
#endif

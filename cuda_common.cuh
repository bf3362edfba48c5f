// cuda_common.cuh: what every CUDA twin needs: checks on every CUDA and cuBLAS call, the GPU
// context (compute, host-to-device, device-to-host and communication streams, see docs/method.md;
// the cuBLAS handle), why there is no usable device when there is none, and launch sizes.
// Only nvcc sees this file (everything CUDA sits behind #ifdef __CUDACC__).
#pragma once
#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <glob.h>
#include <unistd.h>
#include <algorithm>
#include <string>
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
    int sharers = 1;  // ranks using this GPU (several ranks: choose_comm counts them from the GPUs' identities)
    cudaStream_t compute = nullptr, h2d = nullptr, d2h = nullptr, comm = nullptr;
    cublasHandle_t blas = nullptr;
};

// Why this process can use no CUDA device, in one line ("" when it can use one): the runtime's
// answer, the CUDA versions of the driver and of the runtime fpdt was built with (a driver older
// than the runtime is the usual cause on a machine that has a GPU), CUDA_VISIBLE_DEVICES when it
// is set, and the NVIDIA device nodes present.
static inline std::string gpu_absence() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess && n > 0) return "";
    cudaGetLastError();  // not sticky: later calls must not see it
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
    std::string why = e == cudaSuccess ? "the driver reports 0 devices" : cudaGetErrorString(e);
    why += driver ? "; driver supports CUDA " + version(driver) : "; no CUDA driver (libcuda.so.1) found";
    why += ", runtime is CUDA " + version(runtime);
    if (const char* vis = getenv("CUDA_VISIBLE_DEVICES")) why += "; CUDA_VISIBLE_DEVICES='" + std::string(vis) + "'";
    std::string nodes;
    glob_t g;
    if (glob("/dev/nvidia*", 0, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; i++) nodes += std::string(nodes.empty() ? "" : " ") + g.gl_pathv[i];
    globfree(&g);
    return why + (nodes.empty() ? "; no /dev/nvidia* device nodes" : "; device nodes: " + nodes);
}

// A GPU's identity, the same in every process that uses it whatever CUDA_VISIBLE_DEVICES shows
// it as: its UUID (as nvidia-smi -L prints it), or where the driver gives none, the host name and
// PCI bus id.
static inline std::string gpu_identity(int device) {
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, device));
    const unsigned char* u = (const unsigned char*)p.uuid.bytes;
    char id[64];
    snprintf(id, sizeof id, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2],
             u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    if (std::any_of(u, u + 16, [](unsigned char c) { return c != 0; })) return id;
    char host[128] = "", bus[32] = "";
    gethostname(host, sizeof host - 1);
    CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof bus, device));
    return std::string(host) + " " + bus;
}

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// Elementwise launches: 256 threads a block and at most 65536 blocks; the kernels' grid-stride
// loops (size_t indices) cover the rest, so N may pass 2^31.
static inline unsigned elementwise_grid(size_t n) { return (unsigned)std::min<size_t>((n + 255) / 256, 65536); }
#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)
#endif

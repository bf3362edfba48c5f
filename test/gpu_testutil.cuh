// gpu_testutil.cuh - what the CUDA tests (test/test_gpu_*.cu) share: skipping where there is no
// CUDA device (CI has none, so they pass there) and device copies of host vectors. nvcc only.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <algorithm>
#include <vector>
#include "cuda_common.cuh"

// Whether there is a CUDA device to run on. A failed query (no driver, no device) leaves a
// non-sticky error, cleared here so that later calls do not see it.
static inline bool gpu_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return false;
    }
    return true;
}

// First thing in a test body or a fixture's SetUp(): skip the test when there is no CUDA device.
#define REQUIRE_GPU()                                              \
    do {                                                           \
        if (!gpu_available()) GTEST_SKIP() << "no CUDA device";    \
    } while (0)

// A device copy of a host vector, freed when it goes out of scope. get() waits for all work on the
// device, then downloads.
template <typename T>
struct DevBuf {
    T* p = nullptr;
    size_t n = 0;
    explicit DevBuf(const std::vector<T>& h) : n(h.size()) {
        CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
        if (n) CUDA_CHECK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
    ~DevBuf() {
        if (p) cudaFree(p);
    }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
    std::vector<T> get() const {
        std::vector<T> h(n);
        CUDA_CHECK(cudaDeviceSynchronize());
        if (n) CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
};

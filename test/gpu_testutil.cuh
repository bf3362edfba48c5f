// gpu_testutil.cuh - what the CUDA tests (test/test_gpu_*.cu) share: skipping where there is no
// CUDA device (CI has none, so they pass there), failing instead where one is expected, and
// device copies of host vectors. nvcc only.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <algorithm>
#include <cstdlib>
#include <vector>
#include "cuda_common.cuh"

// Whether there is a CUDA device to run on (gpu_absence says why not, and clears the error a
// failed query leaves, so that later calls do not see it).
static inline bool gpu_available() { return gpu_absence().empty(); }

// First thing in a test body or a fixture's SetUp(): skip the test when there is no CUDA device,
// saying why. With FPDT_EXPECT_GPU set (test/gpu_check.sh sets it: a machine that is meant to have
// a GPU), no device is a failure instead, so that a run without GPU coverage cannot pass.
#define REQUIRE_GPU()                                                                                   \
    do {                                                                                                \
        const std::string why_ = gpu_absence();                                                         \
        if (!why_.empty() && getenv("FPDT_EXPECT_GPU"))                                                 \
            GTEST_FAIL() << "FPDT_EXPECT_GPU is set, but no CUDA device can be used: " << why_;         \
        if (!why_.empty()) GTEST_SKIP() << "no CUDA device: " << why_;                                  \
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

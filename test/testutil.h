// testutil.h - numeric helpers the test files share (host code: g++ and nvcc both compile it).
#pragma once

#include <gtest/gtest.h>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>
#include "common.h"

// ||a - b|| / ||b|| over n values, summed in double (0 when both are exactly zero).
template <typename A, typename B>
double rel_err(const A* a, const B* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)a[i] - (double)b[i];
        num += d * d, den += (double)b[i] * b[i];
    }
    return sqrt(num / std::max(den, 1e-300));
}

// The same for two vectors, which must be the same size (a failed expectation otherwise; the
// common prefix is compared).
template <typename A, typename B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
    EXPECT_EQ(a.size(), b.size());
    return rel_err(a.data(), b.data(), std::min(a.size(), b.size()));
}

// n values scale * N(0, 1) + shift from r: fresh, never all zeros.
static inline std::vector<float> randn(Rng* r, size_t n, float scale = 1.0f, float shift = 0.0f) {
    std::vector<float> a(n);
    for (float& x : a) x = scale * rng_normal(r) + shift;
    return a;
}

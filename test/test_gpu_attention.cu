// The CUDA twins of attention.cuh and loss.cuh against their CPU references, on fresh random
// inputs. Every test skips when there is no CUDA device (CI has none).
//
// Tolerance: relative norm ||gpu - cpu|| / ||cpu|| < kTol = 1e-5 for fp32 results. Both sides
// compute the same formulas in fp32, but in a different order (warp-shuffle and tiled reductions
// instead of sequential loops, fused multiply-adds, the GPU's expf within 2 ulp): that is a few
// roundings of ~6e-8 per output over sums of at most a few hundred terms, ~1e-6 relative in all.
// 1e-5 leaves a margin of 10 and still catches any wrong index, mask or formula, which moves
// results by 1e-3 relative or far more. Argmax predictions must match exactly; the sum of squares
// (in double on both sides) must match to 1e-10 relative; scale (one correctly rounded multiply on
// both sides) must match exactly.
//
// Ops that accumulate (+=) start from random values of the same size as what they add, so an op
// that overwrote, or added twice, would fail.
//
// Built into build/fpdt_tests by `make test` where nvcc is present; skipped without a GPU.
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <cmath>
#include <vector>
#include "attention.cuh"
#include "common.h"
#include "loss.cuh"
#include "test/gpu_testutil.cuh"
#include "test/testutil.h"

using vf = std::vector<float>;
static const double kTol = 1e-5;  // fp32, same math in a different order (see above)

// ----------------------------------------------------------------------------
// Helpers

// Every test is a TEST_F of this fixture, so it skips before its body when there is no device.
class Gpu : public ::testing::Test {
  protected:
    void SetUp() override {
        REQUIRE_GPU();
    }
};


// ----------------------------------------------------------------------------
// Attention

struct AttnCase {
    size_t Tq, Tk;
    int Hq, Hkv, D;
    bool causal;
};
// Odd lengths (not multiples of the 8-row blocks or 32-row tiles), GQA groups of 1, 2, 4 and 8,
// the head sizes the models use, one that is not a power of two (80) and the largest (512, which
// needs more than the default 48 KiB of shared memory).
static const AttnCase kCases[] = {
    {37, 100, 4, 2, 16, false}, {100, 100, 4, 2, 16, true}, {37, 100, 4, 2, 64, false},
    {100, 100, 4, 2, 64, true}, {37, 100, 8, 1, 128, false}, {100, 100, 8, 1, 128, true},
    {100, 37, 2, 2, 128, false}, {37, 37, 4, 4, 32, true},   {45, 45, 2, 1, 80, true},
    {33, 70, 2, 1, 512, false}, {70, 70, 2, 1, 512, true},
};
static std::string name(const AttnCase& c) {
    char b[128];
    snprintf(b, sizeof b, "Tq=%zu Tk=%zu Hq=%d Hkv=%d D=%d causal=%d", c.Tq, c.Tk, c.Hq, c.Hkv, c.D, (int)c.causal);
    return b;
}

// One block merged into a running (o, lse) that already holds earlier blocks (random o, finite lse).
TEST_F(Gpu, AttentionForwardBlock) {
    Rng r{101};
    for (const AttnCase& c : kCases) {
        SCOPED_TRACE(name(c));
        const vf q = randn(&r, c.Tq * c.Hq * c.D), k = randn(&r, c.Tk * c.Hkv * c.D), v = randn(&r, c.Tk * c.Hkv * c.D);
        vf o = randn(&r, c.Tq * c.Hq * c.D), lse = randn(&r, c.Tq * c.Hq, 1.0f, 4.0f);
        DevBuf<float> dq(q), dk(k), dv(v), dO(o), dL(lse);
        attention_forward_gpu(0, dO.p, dL.p, dq.p, dk.p, dv.p, c.Tq, c.Tk, c.Hq, c.Hkv, c.D, c.causal);
        attention_forward_cpu(o.data(), lse.data(), q.data(), k.data(), v.data(), c.Tq, c.Tk, c.Hq, c.Hkv, c.D,
                              c.causal);
        EXPECT_LT(rel_err(dO.get(), o), kTol);
        EXPECT_LT(rel_err(dL.get(), lse), kTol);
    }
}

// The FPDT forward of one query chunk: o = 0, lse = -inf, then an earlier key chunk (non-causal),
// then the diagonal one (causal).
TEST_F(Gpu, AttentionForwardTwoBlockMerge) {
    Rng r{102};
    const size_t T = 100;
    for (int D : {16, 64, 128}) {
        SCOPED_TRACE(D);
        const int Hq = 4, Hkv = 2;
        const vf q = randn(&r, T * Hq * D);
        const vf k0 = randn(&r, T * Hkv * D), v0 = randn(&r, T * Hkv * D);
        const vf k1 = randn(&r, T * Hkv * D), v1 = randn(&r, T * Hkv * D);
        vf o(T * Hq * D, 0.0f), lse(T * Hq, -INFINITY);
        DevBuf<float> dq(q), dk0(k0), dv0(v0), dk1(k1), dv1(v1), dO(o), dL(lse);
        attention_forward_gpu(0, dO.p, dL.p, dq.p, dk0.p, dv0.p, T, T, Hq, Hkv, D, false);
        attention_forward_gpu(0, dO.p, dL.p, dq.p, dk1.p, dv1.p, T, T, Hq, Hkv, D, true);
        attention_forward_cpu(o.data(), lse.data(), q.data(), k0.data(), v0.data(), T, T, Hq, Hkv, D, false);
        attention_forward_cpu(o.data(), lse.data(), q.data(), k1.data(), v1.data(), T, T, Hq, Hkv, D, true);
        EXPECT_LT(rel_err(dO.get(), o), kTol);
        EXPECT_LT(rel_err(dL.get(), lse), kTol);
    }
}

TEST_F(Gpu, AttentionDelta) {
    Rng r{103};
    for (int D : {16, 64, 128, 80}) {
        SCOPED_TRACE(D);
        const size_t T = 37;
        const int H = 4;
        const vf dout = randn(&r, T * H * D), o = randn(&r, T * H * D);
        vf delta = randn(&r, T * H);  // garbage that must be overwritten
        DevBuf<float> ddo(dout), dO(o), dd(delta);
        attention_delta_gpu(0, dd.p, ddo.p, dO.p, T, H, D);
        attention_delta_cpu(delta.data(), dout.data(), o.data(), T, H, D);
        EXPECT_LT(rel_err(dd.get(), delta), kTol);
    }
}

// Backward of one block with the real lse and delta of that block (from the CPU forward), so the
// probabilities are those of a softmax; dq, dk, dv start from random values.
TEST_F(Gpu, AttentionBackward) {
    Rng r{104};
    for (const AttnCase& c : kCases) {
        SCOPED_TRACE(name(c));
        const size_t nq = c.Tq * c.Hq * c.D, nk = c.Tk * c.Hkv * c.D;
        const vf q = randn(&r, nq), k = randn(&r, nk), v = randn(&r, nk), dout = randn(&r, nq);
        vf o(nq, 0.0f), lse(c.Tq * c.Hq, -INFINITY), delta(c.Tq * c.Hq);
        attention_forward_cpu(o.data(), lse.data(), q.data(), k.data(), v.data(), c.Tq, c.Tk, c.Hq, c.Hkv, c.D,
                              c.causal);
        attention_delta_cpu(delta.data(), dout.data(), o.data(), c.Tq, c.Hq, c.D);
        // about the size of what the backward adds (rms 0.15 to 0.9 at these shapes)
        vf dq = randn(&r, nq, 0.1f), dk = randn(&r, nk, 0.1f), dv = randn(&r, nk, 0.1f);
        DevBuf<float> gq(q), gk(k), gv(v), gdo(dout), gl(lse), gdl(delta), gdq(dq), gdk(dk), gdv(dv);
        attention_backward_gpu(0, gdq.p, gdk.p, gdv.p, gdo.p, gq.p, gk.p, gv.p, gl.p, gdl.p, c.Tq, c.Tk, c.Hq, c.Hkv,
                               c.D, c.causal);
        attention_backward_cpu(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                               lse.data(), delta.data(), c.Tq, c.Tk, c.Hq, c.Hkv, c.D, c.causal);
        EXPECT_LT(rel_err(gdq.get(), dq), kTol);
        EXPECT_LT(rel_err(gdk.get(), dk), kTol);
        EXPECT_LT(rel_err(gdv.get(), dv), kTol);
    }
}

// Packed documents: the kernels take the CPU functions' document starts (qdoc, k0) and agree with
// them, forward and backward, on a diagonal block (documents of 1 to 32 tokens, one starting on
// the last row) and on an earlier kv chunk that only the first documents of the queries reach.
TEST_F(Gpu, AttentionDocMask) {
    Rng r{107};
    const size_t T = 100;
    const int Hq = 4, Hkv = 2, D = 64;
    std::vector<int32_t> diag(T), past(T);
    const int starts[] = {0, 5, 37, 38, 70, 99};
    for (size_t t = 0; t < T; t++) {
        for (int s : starts)
            if ((size_t)s <= t) diag[t] = s;
        past[t] = t < 20 ? 60 : t < 50 ? 120 : 150;  // query chunk at 100..199, keys at 0..99
    }
    for (int causal : {1, 0}) {
        SCOPED_TRACE(causal);
        const std::vector<int32_t>& qdoc = causal ? diag : past;
        const size_t nq = T * Hq * D, nk = T * Hkv * D;
        const vf q = randn(&r, nq), k = randn(&r, nk), v = randn(&r, nk), dout = randn(&r, nq);
        vf o(nq, 0.0f), lse(T * Hq, -INFINITY), delta(T * Hq);
        if (!causal) lse = randn(&r, T * Hq, 0.1f, 3.0f);  // as if earlier blocks had been merged
        DevBuf<float> go(o), gl(lse);
        DevBuf<int32_t> gdoc(qdoc);
        DevBuf<float> gq(q), gk(k), gv(v);
        attention_forward_gpu(0, go.p, gl.p, gq.p, gk.p, gv.p, T, T, Hq, Hkv, D, causal, gdoc.p, 0);
        attention_forward_cpu(o.data(), lse.data(), q.data(), k.data(), v.data(), T, T, Hq, Hkv, D, causal, qdoc.data(), 0);
        EXPECT_LT(rel_err(go.get(), o), kTol);
        EXPECT_LT(rel_err(gl.get(), lse), kTol);
        attention_delta_cpu(delta.data(), dout.data(), o.data(), T, Hq, D);
        vf dq = randn(&r, nq, 0.1f), dk = randn(&r, nk, 0.1f), dv = randn(&r, nk, 0.1f);
        DevBuf<float> gdo(dout), gls(lse), gdl(delta), gdq(dq), gdk(dk), gdv(dv);
        attention_backward_gpu(0, gdq.p, gdk.p, gdv.p, gdo.p, gq.p, gk.p, gv.p, gls.p, gdl.p, T, T, Hq, Hkv, D, causal,
                               gdoc.p, 0);
        attention_backward_cpu(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(),
                               delta.data(), T, T, Hq, Hkv, D, causal, qdoc.data(), 0);
        EXPECT_LT(rel_err(gdq.get(), dq), kTol);
        EXPECT_LT(rel_err(gdk.get(), dk), kTol);
        EXPECT_LT(rel_err(gdv.get(), dv), kTol);
    }
}

// ----------------------------------------------------------------------------
// Loss and optimizer

TEST_F(Gpu, CrossEntropy) {
    Rng r{105};
    for (int V : {1000, 32003}) {
        SCOPED_TRACE(V);
        const size_t T = 37;
        const float dscale = 1.0f / 1000.0f;
        vf z = randn(&r, T * V, 2.0f);
        std::vector<int32_t> target(T);
        for (auto& t : target) t = (int32_t)(rng_u64(&r) % V);
        // ties for the maximum in some rows: the lowest index must win, as on the CPU
        for (size_t t = 0; t < T; t += 3) {
            const int a = (int)(rng_u64(&r) % V), b = (int)(rng_u64(&r) % V);
            z[t * V + a] = z[t * V + b] = 20.0f;
        }
        std::vector<int32_t> pred(T, -1);
        vf loss = randn(&r, T);  // garbage that must be overwritten
        DevBuf<float> dz(z), dl(loss);
        DevBuf<int32_t> dp(pred), dt(target);
        crossentropy_gpu(0, dz.p, dl.p, dp.p, dt.p, T, V, dscale);
        crossentropy_cpu(z.data(), loss.data(), pred.data(), target.data(), T, V, dscale);
        EXPECT_LT(rel_err(dl.get(), loss), kTol);
        EXPECT_LT(rel_err(dz.get(), z), kTol);
        EXPECT_EQ(dp.get(), pred);
    }
}

TEST_F(Gpu, AdamW) {
    Rng r{106};
    const size_t n = 100003;
    for (bool decay : {false, true})
        for (int t : {1, 50}) {
            SCOPED_TRACE(::testing::Message() << "decay=" << decay << " t=" << t);
            vf p = randn(&r, n), g = randn(&r, n), m = randn(&r, n, 0.1f), v = randn(&r, n, 0.1f);
            for (auto& x : v) x *= x;  // second moments are non-negative
            DevBuf<float> dp(p), dg(g), dm(m), dv(v);
            // a large learning rate, so the update is a visible part of p
            adamw_gpu(0, dp.p, dg.p, dm.p, dv.p, n, 0.05f, 0.9f, 0.95f, 1e-8f, 0.1f, decay, t);
            adamw_cpu(p.data(), g.data(), m.data(), v.data(), n, 0.05f, 0.9f, 0.95f, 1e-8f, 0.1f, decay, t);
            EXPECT_LT(rel_err(dp.get(), p), kTol);
            EXPECT_LT(rel_err(dm.get(), m), kTol);
            EXPECT_LT(rel_err(dv.get(), v), kTol);
        }
}

// Double sums of positive terms over the same 65536-element blocks, in trees on the GPU and in
// sequence on the CPU: they differ by far less than 1e-10 relative (at most ~65536 * 1.1e-16 in
// the worst case, ~1e-14 in practice). Two runs must give the same bits (fixed reduction shape).
TEST_F(Gpu, SumSq) {
    Rng r{107};
    for (size_t n : {(size_t)1, (size_t)65536, (size_t)1000003}) {
        SCOPED_TRACE(n);
        const vf g = randn(&r, n);
        DevBuf<float> dg(g);
        DevBuf<double> out(std::vector<double>(2, -1.0)), scratch(std::vector<double>(sumsq_gpu_scratch(n), -1.0));
        sumsq_gpu(0, dg.p, n, out.p, scratch.p);
        sumsq_gpu(0, dg.p, n, out.p + 1, scratch.p);
        const std::vector<double> s = out.get();
        const double ref = sumsq_cpu(g.data(), n);
        EXPECT_LT(fabs(s[0] - ref) / ref, 1e-10);
        EXPECT_EQ(s[0], s[1]);
    }
}

TEST_F(Gpu, Scale) {
    Rng r{108};
    const size_t n = 1000003;
    vf g = randn(&r, n);
    DevBuf<float> dg(g);
    scale_gpu(0, dg.p, n, 0.37f);
    scale_cpu(g.data(), n, 0.37f);
    EXPECT_EQ(dg.get(), g);  // one correctly rounded fp32 multiply on both sides: the same bits
}

// The CPU ops (ops.cuh, attention.cuh, loss.cuh), one at a time: every fp32 forward against a
// double-precision reference written here as plain loops, and every fp32 backward against central
// finite differences of that double reference.
//
// Method. For an op y = f(x) we fix a random R and take the scalar L = sum(y * R), so dL/dy = R is
// what the backward receives. The references below recompute f in double from the same inputs
// (fp32 values are exact in double), and fd_grad() differentiates L(x) centrally with eps = 1e-6.
//
// Tolerances, as relative norms ||a - b|| / ||b||:
//  - kGrad = 1e-4 for an fp32 analytic gradient against double finite differences. The finite
//    differences are good to ~1e-9 (truncation ~eps^2 ~ 1e-12, cancellation ~1e-16 / eps ~ 1e-10),
//    so all the difference is the fp32 arithmetic of the backward: sums of up to ~100 products,
//    ~6e-8 per rounding, ~1e-6 in all. 1e-4 leaves a 100x margin and still catches any wrong
//    formula: a missing or wrong term moves a gradient by 1e-2 relative or much more.
//  - kFwd = 1e-5 for an fp32 forward against its double reference: a few roundings per output.
// Ops documented as accumulating (+=) write into buffers pre-filled with random values, and the
// test compares what they ADDED (after - before) to the finite differences, so an op that
// overwrote would fail. Ops documented as overwriting get random garbage first, which must vanish.
// bf16 (last section): the rounding is compared bit for bit with a reference written in the test,
// the bf16 matmuls with the double reference on their widened operands (kBf16Sum, see there).
#include <gtest/gtest.h>
#include <omp.h>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <functional>
#include <vector>
#include "attention.cuh"
#include "common.h"
#include "loss.cuh"
#include "offload.h"
#include "ops.cuh"
#include "test/cli.h"
#include "test/testutil.h"

using vf = std::vector<float>;
using vd = std::vector<double>;

static const double kGrad = 1e-4;  // fp32 analytic gradient vs double finite differences
static const double kFwd = 1e-5;   // fp32 forward vs double reference

// ----------------------------------------------------------------------------
// Helpers

static vd widen(const vf& a) { return vd(a.begin(), a.end()); }

// L = sum(y * R)
static double dot(const vd& y, const vf& R) {
    EXPECT_EQ(y.size(), R.size());
    double s = 0;
    for (size_t i = 0; i < y.size(); i++) s += y[i] * R[i];
    return s;
}

// What an accumulating op added to a buffer: after - before.
static vf added(const vf& after, const vf& before) {
    vf d(after.size());
    for (size_t i = 0; i < d.size(); i++) d[i] = after[i] - before[i];
    return d;
}

template <typename T>
static std::vector<T> concat(const std::vector<T>& a, const std::vector<T>& b) {
    std::vector<T> c = a;
    c.insert(c.end(), b.begin(), b.end());
    return c;
}

// dL/dx by central differences in double. L reads x (captured by reference); each element is
// perturbed in place and restored.
static vd fd_grad(vd& x, const std::function<double()>& L, double eps = 1e-6) {
    vd g(x.size());
    for (size_t i = 0; i < x.size(); i++) {
        const double x0 = x[i];
        x[i] = x0 + eps;
        const double lp = L();
        x[i] = x0 - eps;
        const double lm = L();
        x[i] = x0;
        g[i] = (lp - lm) / (2 * eps);
    }
    return g;
}

// ----------------------------------------------------------------------------
// Double-precision references, straight from the comments in the headers.

static vd matmul_ref(const vd& x, const vd& w, const vd& b, int T, int IC, int OC) {  // b empty: none
    vd y((size_t)T * OC);
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OC; o++) {
            double s = b.empty() ? 0.0 : b[o];
            for (int i = 0; i < IC; i++) s += x[t * IC + i] * w[o * IC + i];
            y[t * OC + o] = s;
        }
    return y;
}

struct NormRef {
    vd out, mean, rstd;
};
static NormRef norm_ref(const vd& x, const vd& w, const vd& b, int T, int C, bool rms, double eps) {
    NormRef r{vd((size_t)T * C), vd(T), vd(T)};
    for (int t = 0; t < T; t++) {
        const double* xr = &x[t * C];
        double m = 0, v = 0;
        if (!rms) {
            for (int i = 0; i < C; i++) m += xr[i];
            m /= C;
        }
        for (int i = 0; i < C; i++) v += (xr[i] - m) * (xr[i] - m);
        const double s = 1.0 / sqrt(v / C + eps);
        for (int i = 0; i < C; i++) r.out[t * C + i] = (xr[i] - m) * s * w[i] + (b.empty() ? 0.0 : b[i]);
        r.mean[t] = m, r.rstd[t] = s;
    }
    return r;
}

static vd gelu_ref(const vd& x) {
    vd y(x.size());
    for (size_t i = 0; i < x.size(); i++)
        y[i] = 0.5 * x[i] * (1.0 + tanh(sqrt(2.0 / M_PI) * (x[i] + 0.044715 * x[i] * x[i] * x[i])));
    return y;
}

static vd swiglu_ref(const vd& x, int T, int F) {  // x (T, 2F) = [gate | up]
    vd y((size_t)T * F);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            const double g = x[t * 2 * F + i], u = x[t * 2 * F + F + i];
            y[t * F + i] = g / (1.0 + exp(-g)) * u;
        }
    return y;
}

// An independent float64 RoPE: the frequency of pair i written in terms of the ratio of the
// original context to the wavelength (what transformers' llama3 computes as old_context_len /
// wavelen), not in terms of bands of the wavelength as ops.cuh writes it.
struct RopeRef {
    double theta = 10000;
    int scaling = 0;  // 0 none, 1 linear, 2 llama3
    double factor = 1, low = 1, high = 4, orig = 8192;
};
static double rope_ref_freq(const RopeRef& p, int i, int D) {
    const double base = 1.0 / pow(p.theta, (2.0 * i) / D);
    if (p.scaling == 1) return base / p.factor;
    if (p.scaling == 0) return base;
    const double ratio = p.orig * base / (2 * M_PI);  // original context / wavelength
    if (ratio > p.high) return base;                  // short wavelengths: unchanged
    if (ratio < p.low) return base / p.factor;        // long ones: interpolated
    const double s = (ratio - p.low) / (p.high - p.low);
    return base * (s + (1 - s) / p.factor);
}
static vd rope_ref(const vd& x, const std::vector<int32_t>& pos, int nh, int D, const RopeRef& rp, int sign) {
    vd y = x;
    for (size_t t = 0; t < pos.size(); t++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < D / 2; i++) {
                const double a = sign * (double)pos[t] * rope_ref_freq(rp, i, D);
                const size_t p = (t * nh + h) * D + 2 * i;
                y[p] = x[p] * cos(a) - x[p + 1] * sin(a);
                y[p + 1] = x[p] * sin(a) + x[p + 1] * cos(a);
            }
    return y;
}
static RopeParams rope_of(const RopeRef& r) { return {r.theta, r.scaling, r.factor, r.low, r.high, r.orig}; }

static vd embedding_ref(const vd& wte, const std::vector<int32_t>& tok, int C) {
    vd y(tok.size() * C);
    for (size_t t = 0; t < tok.size(); t++)
        for (int i = 0; i < C; i++) y[t * C + i] = wte[(size_t)tok[t] * C + i];
    return y;
}

// Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) where query t sees key j iff see(t, j).
struct AttnRef {
    vd o, lse;
};
using Mask = std::function<bool(int t, int j)>;
static AttnRef attention_ref(const vd& q, const vd& k, const vd& v, int Tq, int Tk, int Hq, int Hkv, int D,
                             const Mask& see) {
    AttnRef r{vd((size_t)Tq * Hq * D, 0.0), vd((size_t)Tq * Hq)};
    const double scale = 1.0 / sqrt((double)D);
    vd s(Tk);
    for (int t = 0; t < Tq; t++)
        for (int h = 0; h < Hq; h++) {
            const int hk = h / (Hq / Hkv);
            double m = -INFINITY;
            for (int j = 0; j < Tk; j++) {
                if (!see(t, j)) continue;
                double d = 0;
                for (int c = 0; c < D; c++) d += q[(t * Hq + h) * D + c] * k[(j * Hkv + hk) * D + c];
                s[j] = d * scale;
                m = std::max(m, s[j]);
            }
            double sum = 0;
            for (int j = 0; j < Tk; j++)
                if (see(t, j)) sum += exp(s[j] - m);
            const double lse = m + log(sum);
            r.lse[t * Hq + h] = lse;
            for (int j = 0; j < Tk; j++)
                if (see(t, j))
                    for (int c = 0; c < D; c++)
                        r.o[(t * Hq + h) * D + c] += exp(s[j] - lse) * v[(j * Hkv + hk) * D + c];
        }
    return r;
}
static const Mask kCausal = [](int t, int j) { return j <= t; };
static const Mask kFull = [](int, int) { return true; };

// Cross-entropy averaged over N tokens: sum_t (logsumexp(z[t]) - z[t][target[t]]) / N.
static vd crossentropy_ref(const vd& z, const std::vector<int32_t>& target, int V) {  // per-token losses
    vd loss(target.size());
    for (size_t t = 0; t < target.size(); t++) {
        double m = -INFINITY, s = 0;
        for (int i = 0; i < V; i++) m = std::max(m, z[t * V + i]);
        for (int i = 0; i < V; i++) s += exp(z[t * V + i] - m);
        loss[t] = m + log(s) - z[t * V + target[t]];
    }
    return loss;
}

// AdamW step t (1-based) with bias correction and decoupled weight decay.
static void adamw_ref(vd& p, const vf& g, vd& m, vd& v, double lr, double b1, double b2, double eps, double wd,
                      bool decay, int t) {
    for (size_t i = 0; i < p.size(); i++) {
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * (double)g[i] * g[i];
        const double upd = (m[i] / (1 - pow(b1, t))) / (sqrt(v[i] / (1 - pow(b2, t))) + eps);
        p[i] -= lr * (upd + (decay ? wd * p[i] : 0.0));
    }
}

// ----------------------------------------------------------------------------
// Token-wise ops

TEST(Matmul, ForwardAndAccumulatingBackward) {
    const int T = 5, IC = 19, OC = 6;
    for (bool bias : {true, false}) {  // without bias, dinp and db are null too
        SCOPED_TRACE(bias ? "with bias, dinp, db" : "no bias, dinp = db = null");
        Rng r{11};
        vf x = randn(&r, T * IC), w = randn(&r, OC * IC), b = bias ? randn(&r, OC) : vf(), R = randn(&r, T * OC);
        vd X = widen(x), W = widen(w), B = widen(b);
        auto ref = [&] { return matmul_ref(X, W, B, T, IC, OC); };

        vf y(T * OC);
        matmul_forward_cpu(y.data(), x.data(), w.data(), bias ? b.data() : nullptr, T, IC, OC);
        EXPECT_LT(rel_err(y, ref()), kFwd);

        const vf dx0 = randn(&r, T * IC), dw0 = randn(&r, OC * IC), db0 = randn(&r, OC);
        vf dx = dx0, dw = dw0, db = db0;
        matmul_backward_cpu(bias ? dx.data() : nullptr, dw.data(), bias ? db.data() : nullptr, R.data(), x.data(),
                            w.data(), T, IC, OC);
        auto L = [&] { return dot(ref(), R); };
        EXPECT_LT(rel_err(added(dw, dw0), fd_grad(W, L)), kGrad);
        if (bias) {
            EXPECT_LT(rel_err(added(dx, dx0), fd_grad(X, L)), kGrad);
            EXPECT_LT(rel_err(added(db, db0), fd_grad(B, L)), kGrad);
        }
    }
}

TEST(Norm, LayerNormAndRMSNormForwardAndAccumulatingBackward) {
    const int T = 4, C = 24;
    const float eps = 1e-5f;
    for (bool rms : {false, true}) {
        SCOPED_TRACE(rms ? "RMSNorm" : "LayerNorm");
        Rng r{rms ? 22u : 21u};
        vf x = randn(&r, T * C, 1.5f, 0.7f), w = randn(&r, C, 0.5f, 1.0f), b = rms ? vf() : randn(&r, C);
        vf R = randn(&r, T * C);
        vd X = widen(x), W = widen(w), B = widen(b);
        auto ref = [&] { return norm_ref(X, W, B, T, C, rms, eps); };

        vf y(T * C), mean(T), rstd(T);
        norm_forward_cpu(y.data(), mean.data(), rstd.data(), x.data(), w.data(), rms ? nullptr : b.data(), T, C, rms,
                         eps);
        NormRef f = ref();
        EXPECT_LT(rel_err(y, f.out), kFwd);
        EXPECT_LT(rel_err(rstd, f.rstd), kFwd);
        if (rms)
            EXPECT_EQ(mean, vf(T, 0.0f));
        else
            EXPECT_LT(rel_err(mean, f.mean), kFwd);

        const vf dx0 = randn(&r, T * C), dw0 = randn(&r, C), db0 = randn(&r, C);
        vf dx = dx0, dw = dw0, db = db0;
        norm_backward_cpu(dx.data(), dw.data(), rms ? nullptr : db.data(), R.data(), x.data(), w.data(),
                          mean.data(), rstd.data(), T, C, rms);
        auto L = [&] { return dot(ref().out, R); };
        EXPECT_LT(rel_err(added(dx, dx0), fd_grad(X, L)), kGrad);
        EXPECT_LT(rel_err(added(dw, dw0), fd_grad(W, L)), kGrad);
        if (!rms) {
            EXPECT_LT(rel_err(added(db, db0), fd_grad(B, L)), kGrad);
        }
    }
}

TEST(Activation, GeluForwardAndOverwritingBackward) {
    const int N = 64;
    Rng r{31};
    vf x = randn(&r, N, 2.0f), R = randn(&r, N);
    vd X = widen(x);
    vf y(N);
    gelu_forward_cpu(y.data(), x.data(), N);
    EXPECT_LT(rel_err(y, gelu_ref(X)), kFwd);

    vf dx = randn(&r, N, 100.0f);  // garbage the backward must overwrite
    gelu_backward_cpu(dx.data(), x.data(), R.data(), N);
    EXPECT_LT(rel_err(dx, fd_grad(X, [&] { return dot(gelu_ref(X), R); })), kGrad);
}

TEST(Activation, SwiGLUForwardAndOverwritingBackward) {
    const int T = 3, F = 8;
    Rng r{32};
    vf x = randn(&r, T * 2 * F, 2.0f), R = randn(&r, T * F);
    vd X = widen(x);
    vf y(T * F);
    swiglu_forward_cpu(y.data(), x.data(), T, F);
    EXPECT_LT(rel_err(y, swiglu_ref(X, T, F)), kFwd);

    vf dx = randn(&r, T * 2 * F, 100.0f);  // garbage the backward must overwrite
    swiglu_backward_cpu(dx.data(), x.data(), R.data(), T, F);
    EXPECT_LT(rel_err(dx, fd_grad(X, [&] { return dot(swiglu_ref(X, T, F), R); })), kGrad);
}

// RoPE at small and large positions (2^21: where a float angle would be off by ~0.1 rad), plain
// and with each scaling: linear, and llama3 with its three bands all in use (D 32, theta 10^4:
// wavelengths 6.3 .. 4.4e4; original context 8192 over high 4 and low 1 puts the edges at 2048
// and 8192, so some pairs keep their frequency, some are blended, some divided by the factor).
TEST(Rope, ForwardBackwardAndInverseAtLargePositions) {
    const int nh = 3, D = 32;
    const std::vector<int32_t> pos = {0, 1, 7, 999983, 1000000, 2097152};
    const int T = (int)pos.size();
    RopeRef none, linear, llama3, llama3b;
    linear.scaling = 1, linear.factor = 4;
    llama3.scaling = 2, llama3.factor = 8, llama3.low = 1, llama3.high = 4, llama3.orig = 8192;
    llama3b.scaling = 2, llama3b.theta = 500000, llama3b.factor = 32, llama3b.low = 2, llama3b.high = 8, llama3b.orig = 4096;
    // the llama3 cases really have pairs in all three bands
    for (const RopeRef* p : {&llama3, &llama3b}) {
        int kept = 0, divided = 0, blended = 0;
        for (int i = 0; i < D / 2; i++) {
            const double b = 1.0 / pow(p->theta, 2.0 * i / D), f = rope_ref_freq(*p, i, D);
            kept += f == b, divided += fabs(f - b / p->factor) < 1e-18, blended += f != b && fabs(f - b / p->factor) >= 1e-18;
        }
        EXPECT_GT(kept, 0);
        EXPECT_GT(divided, 0);
        EXPECT_GT(blended, 0);
    }
    Rng r{41};
    for (const RopeRef* rp : {&none, &linear, &llama3, &llama3b}) {
        SCOPED_TRACE(::testing::Message() << "scaling " << rp->scaling << " theta " << rp->theta);
        vf x = randn(&r, T * nh * D), R = randn(&r, T * nh * D);
        vd X = widen(x);
        vf y = x;
        rope_cpu(y.data(), pos.data(), T, nh, D, rope_of(*rp), +1);
        EXPECT_LT(rel_err(y, rope_ref(X, pos, nh, D, *rp, +1)), kFwd);
        if (rp->scaling) {
            EXPECT_GT(rel_err(y, rope_ref(X, pos, nh, D, none, +1)), 1e-2) << "scaling changed nothing";
        }

        // rope(+1) then rope(-1) is the identity: a rotation and its inverse, a few fp32 roundings.
        vf back = y;
        rope_cpu(back.data(), pos.data(), T, nh, D, rope_of(*rp), -1);
        EXPECT_LT(rel_err(back, x), 1e-6);

        // Backward: the inverse rotation applied to the gradient (it is linear, so dL/dx = rope^T R).
        vf g = R;
        rope_cpu(g.data(), pos.data(), T, nh, D, rope_of(*rp), -1);
        EXPECT_LT(rel_err(g, fd_grad(X, [&] { return dot(rope_ref(X, pos, nh, D, *rp, +1), R); })), kGrad);
    }
}

// The CPU keeps cos and sin per list of positions (rope_table_cpu): a list that differs in one
// position, in its length (c is a prefix of a, and comes first), in the head size, the base or the
// scaling gets its own, and the lists kept are dropped oldest first past ROPE_TABLE_BYTES (the
// long list's tables are over half of it) and computed again when they come back.
TEST(Rope, KeptTablesFollowPositionsSizeAndScaling) {
    RopeRef none, linear, theta;
    linear.scaling = 1, linear.factor = 4;
    theta.theta = 500000;
    const std::vector<int32_t> a = {0, 5, 9, 70000}, b = {0, 5, 10, 70000}, c = {0, 5, 9};
    std::vector<int32_t> big((size_t)(ROPE_TABLE_BYTES / 2 / (64 * sizeof(float))) + 1);
    for (size_t t = 0; t < big.size(); t++) big[t] = (int32_t)(t * 3);
    struct Call {
        const std::vector<int32_t>* pos;
        int D;
        const RopeRef* rp;
    };
    const std::vector<Call> calls = {{&c, 32, &none},  {&a, 32, &none},     {&b, 32, &none},    {&a, 32, &none},
                                     {&a, 16, &none},  {&a, 32, &linear},   {&a, 32, &theta},   {&big, 64, &none},
                                     {&big, 64, &linear}, {&a, 32, &none}, {&big, 64, &none}, {&a, 32, &linear}};
    Rng r{43};
    for (size_t n = 0; n < calls.size(); n++) {
        const Call& k = calls[n];
        SCOPED_TRACE(::testing::Message() << "call " << n);
        const size_t T = k.pos->size(), rows = std::min<size_t>(T, 8);  // the rows checked (the first 8)
        const int nh = 1;
        vf x(T * nh * k.D, 0.0f), head = randn(&r, rows * nh * k.D);
        std::copy(head.begin(), head.end(), x.begin());
        rope_cpu(x.data(), k.pos->data(), T, nh, k.D, rope_of(*k.rp), +1);
        const std::vector<int32_t> pos(k.pos->begin(), k.pos->begin() + rows);
        EXPECT_LT(rel_err(vf(x.begin(), x.begin() + rows * nh * k.D), rope_ref(widen(head), pos, nh, k.D, *k.rp, +1)),
                  kFwd);
    }
}

TEST(Embedding, ForwardAndAccumulatingBackwardWithRepeatedTokens) {
    const int V = 7, C = 6;
    const std::vector<int32_t> tok = {3, 1, 3, 0, 6, 3, 2, 1, 5, 3};  // 4 never appears
    const int T = (int)tok.size();
    Rng r{51};
    vf wte = randn(&r, V * C), R = randn(&r, T * C);
    vd WTE = widen(wte);

    vf y(T * C);
    embedding_forward_cpu(y.data(), tok.data(), wte.data(), T, C);
    EXPECT_EQ(widen(y), embedding_ref(WTE, tok, C));  // a copy: exact

    const vf dw0 = randn(&r, V * C);
    vf dw = dw0;
    embedding_backward_cpu(dw.data(), tok.data(), R.data(), T, C);
    EXPECT_LT(rel_err(added(dw, dw0), fd_grad(WTE, [&] { return dot(embedding_ref(WTE, tok, C), R); })), kGrad);
    for (int i = 0; i < C; i++) EXPECT_EQ(dw[4 * C + i], dw0[4 * C + i]) << "unused row 4 must not change";
}

TEST(Residual, AddInplaceAccumulates) {
    const size_t N = 1001;
    Rng r{61};
    const vf a = randn(&r, N), b = randn(&r, N);
    vf out = a;
    add_inplace_cpu(out.data(), b.data(), N);
    for (size_t i = 0; i < N; i++) ASSERT_EQ(out[i], a[i] + b[i]) << i;  // one fp32 add: exact
}

// ----------------------------------------------------------------------------
// Attention

// One block from a fresh (o = 0, lse = -inf): forward against the double reference, delta, and the
// accumulating backward against finite differences of the reference's o.
static void check_attention_block(int Tq, int Tk, int Hq, int Hkv, int D, bool causal, uint64_t seed) {
    Rng r{seed};
    vf q = randn(&r, Tq * Hq * D), k = randn(&r, Tk * Hkv * D), v = randn(&r, Tk * Hkv * D);
    vf R = randn(&r, Tq * Hq * D);  // dO
    vd Q = widen(q), K = widen(k), V = widen(v);
    auto ref = [&] { return attention_ref(Q, K, V, Tq, Tk, Hq, Hkv, D, causal ? kCausal : kFull); };

    vf o(Tq * Hq * D, 0.0f), lse(Tq * Hq, -INFINITY);
    attention_forward_cpu(o.data(), lse.data(), q.data(), k.data(), v.data(), Tq, Tk, Hq, Hkv, D, causal);
    AttnRef f = ref();
    EXPECT_LT(rel_err(o, f.o), kFwd);
    EXPECT_LT(rel_err(lse, f.lse), kFwd);

    vf delta(Tq * Hq);
    attention_delta_cpu(delta.data(), R.data(), o.data(), Tq, Hq, D);
    vd delta_ref(Tq * Hq, 0.0);
    for (int i = 0; i < Tq * Hq; i++)
        for (int c = 0; c < D; c++) delta_ref[i] += (double)R[i * D + c] * o[i * D + c];
    EXPECT_LT(rel_err(delta, delta_ref), kFwd);

    const vf dq0 = randn(&r, q.size()), dk0 = randn(&r, k.size()), dv0 = randn(&r, v.size());
    vf dq = dq0, dk = dk0, dv = dv0;
    attention_backward_cpu(dq.data(), dk.data(), dv.data(), R.data(), q.data(), k.data(), v.data(), lse.data(),
                           delta.data(), Tq, Tk, Hq, Hkv, D, causal);
    auto L = [&] { return dot(ref().o, R); };
    EXPECT_LT(rel_err(added(dq, dq0), fd_grad(Q, L)), kGrad);
    EXPECT_LT(rel_err(added(dk, dk0), fd_grad(K, L)), kGrad);
    EXPECT_LT(rel_err(added(dv, dv0), fd_grad(V, L)), kGrad);
}

TEST(Attention, CausalBlock) { check_attention_block(12, 12, 2, 2, 16, true, 71); }
TEST(Attention, NonCausalBlock) { check_attention_block(5, 9, 2, 2, 8, false, 72); }
TEST(Attention, GroupedQueryHeads) {
    check_attention_block(7, 7, 4, 2, 8, true, 73);
    check_attention_block(5, 9, 4, 2, 16, false, 74);
}

// FPDT's log-sum-exp merge: a query chunk of Tq tokens against an earlier key chunk k0 (T0 tokens,
// all visible) and then its own chunk k1 (causal diagonal) equals one softmax over [k0 | k1] with
// that mask. The backward, run per block with the FINAL lse and delta = rowsum(dO * O), gives the
// gradients of that whole attention: dq summed over the blocks, dk and dv split by block.
TEST(Attention, LogSumExpMergeOfTwoBlocksEqualsOneSoftmax) {
    const int Tq = 6, T0 = 7, Hq = 4, Hkv = 2;
    const Mask see = [&](int t, int j) { return j < T0 || j - T0 <= t; };
    for (int D : {16, 8}) {
        SCOPED_TRACE("D = " + std::to_string(D));
        Rng r{80u + D};
        vf q = randn(&r, Tq * Hq * D), R = randn(&r, Tq * Hq * D);
        vf k0 = randn(&r, T0 * Hkv * D), v0 = randn(&r, T0 * Hkv * D);
        vf k1 = randn(&r, Tq * Hkv * D), v1 = randn(&r, Tq * Hkv * D);
        vd Q = widen(q), K = widen(concat(k0, k1)), V = widen(concat(v0, v1));
        auto ref = [&] { return attention_ref(Q, K, V, Tq, T0 + Tq, Hq, Hkv, D, see); };
        AttnRef f = ref();

        auto block0 = [&](vf& o, vf& lse) {
            attention_forward_cpu(o.data(), lse.data(), q.data(), k0.data(), v0.data(), Tq, T0, Hq, Hkv, D, false);
        };
        auto block1 = [&](vf& o, vf& lse) {
            attention_forward_cpu(o.data(), lse.data(), q.data(), k1.data(), v1.data(), Tq, Tq, Hq, Hkv, D, true);
        };
        vf o(Tq * Hq * D, 0.0f), lse(Tq * Hq, -INFINITY);
        block0(o, lse), block1(o, lse);
        EXPECT_LT(rel_err(o, f.o), kFwd);
        EXPECT_LT(rel_err(lse, f.lse), kFwd);
        {  // the merge is symmetric: the diagonal block first gives the same result
            vf o2(o.size(), 0.0f), lse2(lse.size(), -INFINITY);
            block1(o2, lse2), block0(o2, lse2);
            EXPECT_LT(rel_err(o2, f.o), kFwd);
            EXPECT_LT(rel_err(lse2, f.lse), kFwd);
        }

        vf delta(Tq * Hq);
        attention_delta_cpu(delta.data(), R.data(), o.data(), Tq, Hq, D);
        const vf dq0 = randn(&r, q.size());
        const vf dk00 = randn(&r, k0.size()), dv00 = randn(&r, v0.size());
        const vf dk10 = randn(&r, k1.size()), dv10 = randn(&r, v1.size());
        vf dq = dq0, dk0 = dk00, dv0 = dv00, dk1 = dk10, dv1 = dv10;
        attention_backward_cpu(dq.data(), dk0.data(), dv0.data(), R.data(), q.data(), k0.data(), v0.data(),
                               lse.data(), delta.data(), Tq, T0, Hq, Hkv, D, false);
        attention_backward_cpu(dq.data(), dk1.data(), dv1.data(), R.data(), q.data(), k1.data(), v1.data(),
                               lse.data(), delta.data(), Tq, Tq, Hq, Hkv, D, true);
        auto L = [&] { return dot(ref().o, R); };
        EXPECT_LT(rel_err(added(dq, dq0), fd_grad(Q, L)), kGrad);
        EXPECT_LT(rel_err(concat(added(dk0, dk00), added(dk1, dk10)), fd_grad(K, L)), kGrad);
        EXPECT_LT(rel_err(concat(added(dv0, dv00), added(dv1, dv10)), fd_grad(V, L)), kGrad);
    }
}

// ----------------------------------------------------------------------------
// Loss and optimizer

TEST(CrossEntropy, LossArgmaxAndDlogitsOfTheMean) {
    const int T = 5, V = 11, N = 8;  // this chunk holds 5 of the N = 8 tokens the mean is over
    Rng r{91};
    vf z = randn(&r, T * V, 2.0f);
    for (int i = 0; i < V; i++) z[2 * V + i] += 30.0f;  // a row with large logits: needs the max shift
    std::vector<int32_t> target(T);
    for (int32_t& t : target) t = (int32_t)(rng_u64(&r) % V);
    vd Z = widen(z);

    vf dz = z, loss(T);
    std::vector<int32_t> pred(T);
    crossentropy_cpu(dz.data(), loss.data(), pred.data(), target.data(), T, V, 1.0f / N);
    EXPECT_LT(rel_err(loss, crossentropy_ref(Z, target, V)), kFwd);
    for (int t = 0; t < T; t++)
        EXPECT_EQ(pred[t], std::max_element(z.begin() + t * V, z.begin() + (t + 1) * V) - (z.begin() + t * V));

    auto mean_loss = [&] {
        double s = 0;
        for (double l : crossentropy_ref(Z, target, V)) s += l;
        return s / N;
    };
    EXPECT_LT(rel_err(dz, fd_grad(Z, mean_loss)), kGrad);
}

// Two AdamW steps against the double reference, from a fresh state (t = 1, 2, where the bias
// correction matters most) and from the middle of a run, with weight decay on and off. The
// parameter change is compared, not the parameters: the change is ~lr, and comparing p itself
// would hide a wrong update in p's own magnitude.
TEST(AdamW, TwoStepsMatchDoubleReference) {
    const size_t n = 37;
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    for (bool decay : {true, false})
        for (int t0 : {1, 50}) {
            SCOPED_TRACE(std::string(decay ? "decay" : "no decay") + ", t = " + std::to_string(t0));
            Rng r{100u + t0 + decay};
            const vf p0 = randn(&r, n);
            vf m = t0 == 1 ? vf(n, 0.0f) : randn(&r, n, 0.1f), v(n, 0.0f);
            if (t0 > 1)
                for (size_t i = 0; i < n; i++) v[i] = m[i] * m[i] + 0.01f * fabsf(rng_normal(&r));
            vf p = p0;
            vd P = widen(p0), M = widen(m), Vv = widen(v);
            for (int t = t0; t < t0 + 2; t++) {
                const vf g = randn(&r, n);
                adamw_cpu(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, decay, t);
                adamw_ref(P, g, M, Vv, lr, b1, b2, eps, wd, decay, t);
            }
            vd dP(n);
            for (size_t i = 0; i < n; i++) dP[i] = P[i] - p0[i];
            EXPECT_LT(rel_err(added(p, p0), dP), kGrad);  // p - p0 is ~1e-2: fp32 rounding of p is ~1e-5 of it
            EXPECT_LT(rel_err(m, M), kFwd);
            EXPECT_LT(rel_err(v, Vv), kFwd);
        }
}

TEST(GradNorm, SumsqAcrossPartialBlocksAndScale) {
    Rng r{111};
    const vf g = randn(&r, 200003);  // 3 full blocks of 65536 and a partial one
    for (size_t n : {(size_t)0, (size_t)1, (size_t)65536, (size_t)200003}) {
        double s = 0;
        for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
        EXPECT_NEAR(sumsq_cpu(g.data(), n), s, 1e-12 * s) << "n = " << n;  // double sums, other order
    }
    vf h = g;
    scale_cpu(h.data(), h.size(), 0.37f);
    for (size_t i = 0; i < h.size(); i++) ASSERT_EQ(h[i], g[i] * 0.37f) << i;  // one fp32 multiply: exact
}

// "Every loop is parallel over an output index, never over a reduction, so results do not depend
// on the thread count": the reductions and backwards give the same bits with 1 and 3 threads.
TEST(Determinism, SameBitsForAnyThreadCount) {
    const int T = 9, C = 33, Hq = 4, Hkv = 2, D = 8;
    Rng r{121};
    const vf x = randn(&r, T * C), w = randn(&r, C * C), dy = randn(&r, T * C), big = randn(&r, 200003);
    const vf q = randn(&r, T * Hq * D), kv = randn(&r, T * Hkv * D), dout = randn(&r, T * Hq * D);
    const vf lse = randn(&r, T * Hq, 1.0f, 3.0f), delta = randn(&r, T * Hq);
    auto run = [&](int threads, double* ss) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        vf out(T * C), mean(T), rstd(T), dx(T * C, 0.0f), dw(C * C, 0.0f), db(C, 0.0f);
        matmul_backward_cpu(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), T, C, C);
        norm_forward_cpu(out.data(), mean.data(), rstd.data(), x.data(), w.data(), w.data(), T, C, false, 1e-5f);
        norm_backward_cpu(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(),
                          T, C, false);
        vf dq(q.size(), 0.0f), dk(kv.size(), 0.0f), dv(kv.size(), 0.0f);
        attention_backward_cpu(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), kv.data(), kv.data(),
                               lse.data(), delta.data(), T, T, Hq, Hkv, D, true);
        vf all = concat(concat(concat(out, dx), concat(dw, db)), concat(concat(dq, dk), dv));
        *ss = sumsq_cpu(big.data(), big.size());
        omp_set_num_threads(saved);
        return all;
    };
    double ss1, ss3;
    const vf one = run(1, &ss1), three = run(3, &ss3);
    ASSERT_EQ(one.size(), three.size());
    EXPECT_EQ(0, memcmp(one.data(), three.data(), one.size() * sizeof(float)));
    EXPECT_EQ(0, memcmp(&ss1, &ss3, sizeof(double)));
}

// ----------------------------------------------------------------------------
// bf16 (common.h, ops.cuh "Precision"). The rounding is checked against bf16_ref() below, written
// here from the bit layout alone: the value of a bf16 pattern is computed from its fields in double,
// and the nearer of the two candidates wins (ties to the even pattern). The bf16 matmuls are checked
// against the double reference on the widened operands.

static float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// The value of a bf16 pattern from its fields: sign, 8 exponent bits (bias 127), 7 mantissa bits.
// Exponent 255 with mantissa 0 (infinity) gives 2^128, the value IEEE rounding measures against to
// decide overflow: x rounds to infinity iff it is at least halfway from the largest bf16 to 2^128.
static double bf16_bits_value(uint16_t h) {
    const int e = (h >> 7) & 0xff, m = h & 0x7f;
    const double mag = e == 0 ? ldexp(m, -133)            // subnormal: m/128 * 2^-126
                              : ldexp(128 + m, e - 134);  // normal: (1 + m/128) * 2^(e-127)
    return (h & 0x8000) ? -mag : mag;
}

// Nearest bf16 to a finite x, ties to even. The candidates: lo = the top 16 bits (x truncated
// toward zero) and hi = lo + 1 (one bf16 ulp further from zero; consecutive patterns are
// consecutive magnitudes, a full mantissa carrying into the exponent). The distances are exact in
// double: x and both candidates are multiples of x's fp32 ulp and differ by less than 2^16 of them.
static uint16_t bf16_ref(float x) {
    const uint16_t lo = (uint16_t)(bits_of(x) >> 16), hi = (uint16_t)(lo + 1);
    const double dlo = fabs((double)x - bf16_bits_value(lo)), dhi = fabs(bf16_bits_value(hi) - (double)x);
    if (dlo != dhi) return dlo < dhi ? lo : hi;
    return (lo & 1) ? hi : lo;
}

// n values: bf16 rounding of scale * N(0, 1): fresh, never all zeros (the odd one may round to 0).
static std::vector<bf16> randn_bf16(Rng* r, size_t n, float scale = 1.0f) {
    std::vector<bf16> a(n);
    for (bf16& h : a) h = bf16_ref(scale * rng_normal(r));
    return a;
}
static vd widen(const std::vector<bf16>& a) {  // exact, through the fields (not bf16_to_float)
    vd d(a.size());
    for (size_t i = 0; i < a.size(); i++) d[i] = bf16_bits_value(a[i]);
    return d;
}

TEST(Bf16, RoundingOnHandPickedBitPatterns) {
    // A bf16 ulp is 2^16 fp32 ulps: the low 16 bits 0x8000 are a tie, 0x7fff/0x8001 just below/above.
    struct Case {
        uint32_t in;
        uint16_t out;
        const char* what;
    };
    const Case cases[] = {
        {0x3f800000u, 0x3f80, "1.0: exact"},
        {0xc0200000u, 0xc020, "-2.5: exact"},
        {0x00000000u, 0x0000, "+0"},
        {0x80000000u, 0x8000, "-0 keeps its sign"},
        {0x3f808000u, 0x3f80, "1 + 2^-8: tie between 1 (even) and 1 + 2^-7, down"},
        {0x3f818000u, 0x3f82, "1 + 3*2^-8: tie between 1 + 2^-7 (odd) and 1 + 2^-6, up"},
        {0x3f808001u, 0x3f81, "1 + 2^-8 + 2^-23: just above the tie, up"},
        {0x3f807fffu, 0x3f80, "1 + 2^-8 - 2^-23: just below the tie, down"},
        {0xbf818000u, 0xbf82, "-(1 + 3*2^-8): tie, away from zero to the even pattern"},
        {0xbf808001u, 0xbf81, "-(1 + 2^-8 + 2^-23): just above the tie in magnitude"},
        {0x3fff8000u, 0x4000, "2 - 2^-8: tie, the mantissa carries into the exponent: 2.0"},
        {0x7f7f7fffu, 0x7f7f, "just below the top tie: the largest bf16, (2 - 2^-7) * 2^127"},
        {0x7f7f8000u, 0x7f80, "tie between the largest bf16 (odd) and 2^128: infinity"},
        {0x7f7fffffu, 0x7f80, "FLT_MAX: past the largest bf16's half ulp, infinity"},
        {0xff7fffffu, 0xff80, "-FLT_MAX: -infinity"},
        {0x7f800000u, 0x7f80, "+inf"},
        {0xff800000u, 0xff80, "-inf"},
        {0x00012345u, 0x0001, "subnormal, below the tie: down"},
        {0x00018000u, 0x0002, "subnormal tie, 0x0001 odd: up"},
        {0x00008000u, 0x0000, "half the smallest bf16 subnormal: tie, to +0"},
        {0x80008000u, 0x8000, "its negative: to -0"},
        {0x00000001u, 0x0000, "the smallest fp32 subnormal: to 0"},
        {0x007fffffu, 0x0080, "the largest fp32 subnormal: up to the smallest normal, 2^-126"},
        {0x00800000u, 0x0080, "2^-126: exact"},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(::testing::Message() << c.what << std::hex << " (0x" << c.in << ")");
        const float x = f32_of(c.in);
        EXPECT_EQ(bf16_ref(x), c.out) << "the test's own reference disagrees with the table";
        EXPECT_EQ(bf16_from_float(x), c.out);
        EXPECT_EQ(bits_of(bf16_round(x)), (uint32_t)c.out << 16);
        EXPECT_EQ(bits_of(bf16_to_float(c.out)), (uint32_t)c.out << 16);  // widening puts the bits on top
    }
    // The same cases as values.
    EXPECT_EQ(bf16_round(1.0f + ldexpf(1, -8)), 1.0f);
    EXPECT_EQ(bf16_round(1.0f + 3 * ldexpf(1, -8)), 1.0f + ldexpf(1, -6));
    EXPECT_EQ(bf16_round(1.0f + ldexpf(1, -8) + ldexpf(1, -23)), 1.0f + ldexpf(1, -7));
    EXPECT_EQ(bf16_round(-2.5f), -2.5f);
    EXPECT_EQ(bf16_round(FLT_MAX), INFINITY);
    EXPECT_EQ(bf16_round(-INFINITY), -INFINITY);
    EXPECT_TRUE(std::signbit(bf16_round(-0.0f)));
    // NaN stays NaN, including payloads whose top 16 bits alone would read as infinity (0x7f800001)
    // and all-ones, where adding the rounding half-ulp would wrap the 32 bits.
    for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7fffffffu, 0xffffffffu}) {
        SCOPED_TRACE(::testing::Message() << std::hex << "NaN 0x" << nan);
        const bf16 h = bf16_from_float(f32_of(nan));
        EXPECT_TRUE(std::isnan(bf16_to_float(h))) << std::hex << "got 0x" << h;
        EXPECT_TRUE(std::isnan(bf16_round(f32_of(nan))));
    }
}

// bf16_from_float against bf16_ref on random finite fp32 bit patterns (every exponent, both signs,
// subnormals), each also with its low 16 bits set to a tie (0x8000) and to just below and above it
// (0x7fff, 0x8001), which random bits would hit only 1 time in 65536.
TEST(Bf16, RoundsToNearestEvenOnRandomBitPatterns) {
    Rng r{131};
    size_t n = 0, up = 0, ties_down = 0, ties_up = 0, bad = 0;
    for (int k = 0; k < 300000; k++) {
        const uint32_t u = (uint32_t)rng_u64(&r);
        if ((u & 0x7f800000u) == 0x7f800000u) continue;  // inf/NaN: covered above
        for (uint32_t v : {u, (u & 0xffff0000u) | 0x8000u, (u & 0xffff0000u) | 0x7fffu, (u & 0xffff0000u) | 0x8001u}) {
            const float x = f32_of(v);
            const uint16_t want = bf16_ref(x), got = bf16_from_float(x);
            n++;
            if (got != want && bad++ < 10)
                ADD_FAILURE() << std::hex << "x = 0x" << v << ": got 0x" << got << ", nearest-even is 0x" << want;
            up += want != (v >> 16);
            if ((v & 0xffffu) == 0x8000u) (want == (v >> 16) ? ties_down : ties_up)++;
        }
    }
    EXPECT_EQ(bad, 0u) << "of " << n;
    // the draw really exercised both directions and both tie outcomes
    EXPECT_GT(up, n / 4);
    EXPECT_GT(ties_down, 100000u);
    EXPECT_GT(ties_up, 100000u);
}

// The array conversions against each other and the scalar rounding, on N(0, 1) values mixed with
// raw random bit patterns (all exponents, NaN 1 in 256) and the specials; from_bf16_cpu on all
// 65536 bf16 patterns. N is not a multiple of anything, so OpenMP's chunks have ragged edges.
TEST(Bf16, ArrayConversionsAgree) {
    const size_t N = 100003;
    Rng r{132};
    vf x(N);
    for (size_t i = 0; i < N; i++) x[i] = i % 2 ? rng_normal(&r) : f32_of((uint32_t)rng_u64(&r));
    const uint32_t specials[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu,
                                 0x7f7fffffu, 0x7f7f8000u, 0x00018000u, 0x80000000u, 0x3f818000u, 0x3f808000u};
    for (size_t i = 0; i < sizeof(specials) / 4; i++) x[1000 * i + 1] = f32_of(specials[i]);

    std::vector<bf16> h(N);
    to_bf16_cpu(h.data(), x.data(), N);
    vf wide(N), rounded = x;
    from_bf16_cpu(wide.data(), h.data(), N);
    round_bf16_cpu(rounded.data(), N);
    // bit for bit: the same integer code on every path, NaN payloads included
    EXPECT_EQ(0, memcmp(rounded.data(), wide.data(), N * sizeof(float))) << "round != from(to(x))";
    size_t bad = 0, nans = 0;
    for (size_t i = 0; i < N; i++) {
        if (std::isnan(x[i])) {
            nans++;
            if (!std::isnan(wide[i]) && bad++ < 10) ADD_FAILURE() << "NaN lost at " << i;
        } else if (h[i] != bf16_ref(x[i]) && bad++ < 10) {
            ADD_FAILURE() << std::hex << "x = 0x" << bits_of(x[i]) << ": 0x" << h[i] << ", want 0x" << bf16_ref(x[i]);
        }
    }
    EXPECT_EQ(bad, 0u);
    EXPECT_GT(nans, 50u);  // ~N/512 random NaNs + 3 specials: the NaN path ran

    std::vector<bf16> all(65536);
    for (uint32_t i = 0; i < 65536; i++) all[i] = (bf16)i;
    vf f(65536);
    from_bf16_cpu(f.data(), all.data(), 65536);
    for (uint32_t i = 0; i < 65536; i++) {
        ASSERT_EQ(bits_of(f[i]), i << 16) << "widening must be exact: 0x" << std::hex << i;
        const int e = (i >> 7) & 0xff;
        if (e != 255) {  // not inf/NaN: the value its fields say
            ASSERT_EQ((double)f[i], bf16_bits_value((uint16_t)i)) << std::hex << "0x" << i;
        }
    }
}

// The bf16 CPU matmuls against the double reference on the widened operands. Tolerance kBf16Sum =
// 1e-5 (relative norm): a product of two bf16 values (8 significant bits each) has at most 16 and
// is exact in fp32, so the only error is the fp32 rounding of the sums, ~6e-8 per addition, at
// most ~1e-6 over these <= 64-term random-signed sums (~1e-7 measured). 1e-5 leaves 10x over that
// bound and still fails anything that rounds the accumulator to bf16 (2^-9 ~ 2e-3 per step) or
// misreads the operands (O(1)).
// The shapes hit the loop edges: odd T (the last row alone), OC % 4 != 0 (outputs one at a time),
// OC < 4 (no 4-wide block at all), IC not a multiple of any vector width.
TEST(MatmulBf16, ForwardAndAccumulatingBackward) {
    static const double kBf16Sum = 1e-5;  // fp32 sums of exact products; see above
    struct Shape {
        int T, IC, OC;
    };
    for (const Shape& s : {Shape{7, 37, 10}, Shape{1, 16, 3}, Shape{9, 64, 13}, Shape{6, 33, 8}})
        for (bool full : {true, false}) {  // full: bias, dinp and db; else all three null
            const int T = s.T, IC = s.IC, OC = s.OC;
            SCOPED_TRACE(::testing::Message() << "T=" << T << " IC=" << IC << " OC=" << OC << " full=" << full);
            Rng r{140u + (uint64_t)T * 100 + OC + full};
            const std::vector<bf16> x = randn_bf16(&r, (size_t)T * IC), w = randn_bf16(&r, (size_t)OC * IC);
            const std::vector<bf16> dy = randn_bf16(&r, (size_t)T * OC);
            const vf b = randn(&r, OC);
            const vd X = widen(x), W = widen(w), DY = widen(dy), B = full ? widen(b) : vd();

            vf y = randn(&r, (size_t)T * OC, 100.0f);  // garbage the forward must overwrite
            matmul_forward_cpu(y.data(), x.data(), w.data(), full ? b.data() : nullptr, T, IC, OC);
            EXPECT_LT(rel_err(y, matmul_ref(X, W, B, T, IC, OC)), kBf16Sum);

            vd dx_ref((size_t)T * IC, 0.0), dw_ref((size_t)OC * IC, 0.0), db_ref(OC, 0.0);
            for (int t = 0; t < T; t++)
                for (int o = 0; o < OC; o++) {
                    const double g = DY[t * OC + o];
                    db_ref[o] += g;
                    for (int i = 0; i < IC; i++) {
                        dx_ref[t * IC + i] += g * W[o * IC + i];
                        dw_ref[o * IC + i] += g * X[t * IC + i];
                    }
                }
            // nonzero starting values of the same size as what is added: an op that overwrote, or
            // added twice, is off by O(1)
            const vf dx0 = randn(&r, (size_t)T * IC, 3.0f), dw0 = randn(&r, (size_t)OC * IC, 3.0f),
                     db0 = randn(&r, OC, 3.0f);
            vf dx = dx0, dw = dw0, db = db0;
            matmul_backward_cpu(full ? dx.data() : nullptr, dw.data(), full ? db.data() : nullptr, dy.data(), x.data(),
                                w.data(), T, IC, OC);
            EXPECT_LT(rel_err(added(dw, dw0), dw_ref), kBf16Sum);
            if (full) {
                EXPECT_LT(rel_err(added(dx, dx0), dx_ref), kBf16Sum);
                EXPECT_LT(rel_err(added(db, db0), db_ref), kBf16Sum);
            } else {
                EXPECT_EQ(dx, dx0) << "dinp == null must not be written";
                EXPECT_EQ(db, db0) << "db == null must not be written";
            }
        }
}

// ----------------------------------------------------------------------------
// The blocked CPU loops at their edges, in every instruction-set variant this CPU can run
// (ops.cuh, cpu_simd): shapes that are not multiples of the tiles, against double references.

// Runs body once per variant level 0 .. what the CPU has, restoring the level afterwards.
static void for_each_simd_level(const std::function<void()>& body) {
#ifdef CPU_SIMD_VARIANTS
    const int top = cpu_simd_detect();
    for (int l = 0; l <= top; l++) {
        SCOPED_TRACE("cpu_simd level " + std::to_string(l));
        cpu_simd_level = l;
        body();
    }
    cpu_simd_level = top;
#else
    body();
#endif
}

// matmul of either operand type over shapes that cross GEMM_MC, GEMM_NC and GEMM_KC (and fit
// inside one tile), forward overwriting and backward accumulating, against double sums.
template <typename X>
static void check_blocked_matmul(const std::vector<X>& x, const std::vector<X>& w, const std::vector<X>& dy,
                                 const vd& X_, const vd& W, const vd& DY, const vf& b, int T, int IC, int OC,
                                 double tol) {
    vd y_ref((size_t)T * OC), dx_ref((size_t)T * IC, 0.0), dw_ref((size_t)OC * IC, 0.0), db_ref(OC, 0.0);
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OC; o++) {
            double s = b[o];
            for (int i = 0; i < IC; i++) s += X_[(size_t)t * IC + i] * W[(size_t)o * IC + i];
            y_ref[(size_t)t * OC + o] = s;
            const double g = DY[(size_t)t * OC + o];
            db_ref[o] += g;
            for (int i = 0; i < IC; i++) {
                dx_ref[(size_t)t * IC + i] += g * W[(size_t)o * IC + i];
                dw_ref[(size_t)o * IC + i] += g * X_[(size_t)t * IC + i];
            }
        }
    Rng r{777u + (uint64_t)T};
    const vf dx0 = randn(&r, (size_t)T * IC, 3.0f), dw0 = randn(&r, (size_t)OC * IC, 3.0f), db0 = randn(&r, OC, 3.0f);
    for_each_simd_level([&] {
        vf y = randn(&r, (size_t)T * OC, 100.0f);  // garbage the forward must overwrite
        matmul_forward_cpu(y.data(), x.data(), w.data(), b.data(), T, IC, OC);
        EXPECT_LT(rel_err(y, y_ref), tol);
        vf dx = dx0, dw = dw0, db = db0;
        matmul_backward_cpu(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), T, IC, OC);
        EXPECT_LT(rel_err(added(dx, dx0), dx_ref), tol);
        EXPECT_LT(rel_err(added(dw, dw0), dw_ref), tol);
        EXPECT_LT(rel_err(added(db, db0), db_ref), tol);
    });
}

TEST(MatmulBlocked, TileEdgesInEveryVariant) {
    struct Shape {
        int T, IC, OC;
    };
    for (const Shape& s : {Shape{GEMM_MC + 1, GEMM_KC + 44, GEMM_NC + 2}, Shape{3, 5, 7}, Shape{2 * GEMM_MC, 64, 33},
                           Shape{37, 2 * GEMM_KC + 1, 260}}) {
        const int T = s.T, IC = s.IC, OC = s.OC;
        SCOPED_TRACE(::testing::Message() << "T=" << T << " IC=" << IC << " OC=" << OC);
        Rng r{900u + (uint64_t)T * 7 + IC};
        {
            SCOPED_TRACE("fp32");
            const vf x = randn(&r, (size_t)T * IC), w = randn(&r, (size_t)OC * IC), dy = randn(&r, (size_t)T * OC);
            check_blocked_matmul(x, w, dy, widen(x), widen(w), widen(dy), randn(&r, OC), T, IC, OC, kFwd);
        }
        {
            SCOPED_TRACE("bf16");
            const std::vector<bf16> x = randn_bf16(&r, (size_t)T * IC), w = randn_bf16(&r, (size_t)OC * IC),
                                    dy = randn_bf16(&r, (size_t)T * OC);
            check_blocked_matmul(x, w, dy, widen(x), widen(w), widen(dy), randn(&r, OC), T, IC, OC, kFwd);
        }
    }
}

// Attention over several tiles (48 rows with AVX2, 64 otherwise: attn_cpu_kernels): lengths that
// are not multiples of either, causal diagonal tiles, Tq != Tk, grouped-query heads, D = 2 and
// D = 256, and more key tiles than dq groups (ATTN_CPU_DQ_GROUPS). The forward against
// attention_ref; the backward against the analytic gradients in double (the finite-difference
// tests above pin those formulas on small blocks):
//   P = e^(S - lse), dP = dO V^T, dS = P (dP - rowsum(dO O)), dq = scale dS K, dk = scale dS^T Q, dv = P^T dO.
// With packed documents (qdoc: each query's document start, k0: key 0's position; the header of
// attention.cuh) query t sees key j only if k0 + j >= qdoc[t] as well; a row that sees no key
// keeps its (o, lse) = (0, -inf) and gets no gradient.
static void check_tiled_attention(int Tq, int Tk, int Hq, int Hkv, int D, bool causal, uint64_t seed,
                                  const std::vector<int32_t>& qdoc = {}, size_t k0 = 0) {
    SCOPED_TRACE(::testing::Message() << "Tq=" << Tq << " Tk=" << Tk << " Hq=" << Hq << " Hkv=" << Hkv << " D=" << D
                                      << " causal=" << causal << " documents=" << !qdoc.empty());
    Rng r{seed};
    const vf q = randn(&r, (size_t)Tq * Hq * D), k = randn(&r, (size_t)Tk * Hkv * D),
             v = randn(&r, (size_t)Tk * Hkv * D), R = randn(&r, (size_t)Tq * Hq * D);
    const vd Q = widen(q), K = widen(k), V = widen(v);
    const Mask see = [&](int t, int j) {
        return (!causal || j <= t) && (qdoc.empty() || k0 + j >= (size_t)qdoc[t]);
    };
    const AttnRef f = attention_ref(Q, K, V, Tq, Tk, Hq, Hkv, D, see);
    const double scale = 1.0 / sqrt((double)D);
    vd dq_ref(q.size(), 0.0), dk_ref(k.size(), 0.0), dv_ref(v.size(), 0.0);
    for (int t = 0; t < Tq; t++)
        for (int h = 0; h < Hq; h++) {
            const int hk = h / (Hq / Hkv);
            const double* qr = &Q[((size_t)t * Hq + h) * D];
            const float* dor = &R[((size_t)t * Hq + h) * D];
            double delta = 0;
            for (int c = 0; c < D; c++) delta += (double)dor[c] * f.o[((size_t)t * Hq + h) * D + c];
            for (int j = 0; j < Tk; j++) {
                if (!see(t, j)) continue;
                const double* kr = &K[((size_t)j * Hkv + hk) * D];
                const double* vr = &V[((size_t)j * Hkv + hk) * D];
                double s = 0, dp = 0;
                for (int c = 0; c < D; c++) s += qr[c] * kr[c], dp += dor[c] * vr[c];
                const double p = exp(s * scale - f.lse[(size_t)t * Hq + h]), ds = p * (dp - delta) * scale;
                for (int c = 0; c < D; c++) {
                    dq_ref[((size_t)t * Hq + h) * D + c] += ds * kr[c];
                    dk_ref[((size_t)j * Hkv + hk) * D + c] += ds * qr[c];
                    dv_ref[((size_t)j * Hkv + hk) * D + c] += p * dor[c];
                }
            }
        }
    const vf dq0 = randn(&r, q.size()), dk0 = randn(&r, k.size()), dv0 = randn(&r, v.size());
    for_each_simd_level([&] {
        vf o(q.size(), 0.0f), lse((size_t)Tq * Hq, -INFINITY), delta((size_t)Tq * Hq);
        const int32_t* docs = qdoc.empty() ? nullptr : qdoc.data();
        attention_forward_cpu(o.data(), lse.data(), q.data(), k.data(), v.data(), Tq, Tk, Hq, Hkv, D, causal, docs, k0);
        EXPECT_LT(rel_err(o, f.o), kFwd);
        auto finite = [](auto x) {  // -inf (rows that see no key) as 0
            for (auto& e : x) e = std::isinf(e) ? 0 : e;
            return x;
        };
        EXPECT_EQ(std::count(lse.begin(), lse.end(), -INFINITY), std::count(f.lse.begin(), f.lse.end(), -INFINITY));
        EXPECT_LT(rel_err(finite(lse), finite(f.lse)), kFwd);
        attention_delta_cpu(delta.data(), R.data(), o.data(), Tq, Hq, D);
        vf dq = dq0, dk = dk0, dv = dv0;
        attention_backward_cpu(dq.data(), dk.data(), dv.data(), R.data(), q.data(), k.data(), v.data(), lse.data(),
                               delta.data(), Tq, Tk, Hq, Hkv, D, causal, docs, k0);
        EXPECT_LT(rel_err(added(dq, dq0), dq_ref), 1e-5);
        EXPECT_LT(rel_err(added(dk, dk0), dk_ref), 1e-5);
        EXPECT_LT(rel_err(added(dv, dv0), dv_ref), 1e-5);
    });
}

TEST(AttentionTiled, TileEdgesInEveryVariant) {
    check_tiled_attention(131, 131, 4, 2, 2, true, 1001);   // causal diagonals, GQA, D = 2
    check_tiled_attention(49, 69, 2, 1, 256, false, 1002);  // Tq != Tk, D = 256
    check_tiled_attention(192, 192, 2, 2, 64, true, 1003);  // whole tiles of 48 and of 64
    check_tiled_attention(129, 47, 3, 1, 8, false, 1004);   // Tq > Tk, one partial key tile
    check_tiled_attention(1, 3, 1, 1, 4, false, 1005);      // one query row
    check_tiled_attention(101, 101, 2, 1, 40, true, 1006);  // D between register widths
    check_tiled_attention(73, 129, 2, 2, 33, false, 1007);  // odd D, Tq != Tk
    check_tiled_attention(581, 581, 2, 1, 4, true, 1008);   // 10-13 key tiles: groups of dq take two
}

// Packed documents (qdoc, k0) over several tiles: whole key tiles skipped (forward) and query
// tiles (backward), the mask inside the tiles that straddle a document's start.
static std::vector<int32_t> doc_of_each(size_t t0, size_t n, const std::vector<int32_t>& starts) {
    std::vector<int32_t> qdoc(n);
    for (size_t t = 0; t < n; t++)
        for (int32_t s : starts)
            if ((size_t)s <= t0 + t) qdoc[t] = s;
    return qdoc;
}
TEST(AttentionTiled, PackedDocumentsInEveryVariant) {
    // the diagonal block: a one-token document (1), starts on a tile boundary of 48 and of 64
    // (144, 192), a BOS as the last token (299)
    check_tiled_attention(300, 300, 2, 1, 8, true, 1011, doc_of_each(0, 300, {0, 1, 70, 144, 192, 299}));
    // queries 300 .. 449 against earlier keys 100 .. 299: rows of a document that starts at 180
    // (first key 80: a whole key tile skipped), rows that see no key here (from 340 on), and keys
    // 100 .. 179 that no query sees
    check_tiled_attention(150, 200, 2, 2, 16, false, 1012, doc_of_each(300, 150, {0, 180, 340, 400}), 100);
    // no document starts inside: equal to no mask
    check_tiled_attention(131, 131, 4, 2, 2, true, 1013, doc_of_each(0, 131, {0}));
}

// Every instruction set below the one this CPU runs (FPDT_CPU_SIMD caps it, ops.cuh) passes the
// finite-difference and double-reference tests of the ops above and the PyTorch and transformers
// reference tests of the whole model: this test program again on those suites with the set
// forced (./fpdt, which some of them run, inherits it), on one thread (these small problems gain
// nothing from more, and results do not depend on the thread count: Determinism). The set this
// CPU runs passes them in the plain run; MatmulBlocked and AttentionTiled go through every set
// themselves.
TEST(SimdVariants, ReferenceTestsPassWithEachSetForced) {
#ifndef CPU_SIMD_VARIANTS
    GTEST_SKIP() << "one instruction set in this build";
#else
    if (getenv("FPDT_CPU_SIMD")) GTEST_SKIP() << "a forced run already (FPDT_CPU_SIMD set)";
    char self[4096];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    ASSERT_GT(n, 0);
    self[n] = 0;
    const std::string suites =
        "Matmul.*:MatmulBf16.*:Norm.*:Activation.*:Rope.*:Embedding.*:Residual.*:Attention.*:CrossEntropy.*:"
        "AdamW.*:GradNorm.*:Families/Reference.*:Variants/HfFixture.ImportedModelMatchesTransformers/*:"
        "Variants/HfFixture.InitStepOneMatchesTransformersOnOneAndTwoRanks/*";
    for (int l = 0; l < cpu_simd_detect(); l++) {
        SCOPED_TRACE("FPDT_CPU_SIMD=" + std::to_string(l));
        Out r = run("FPDT_CPU_SIMD=" + std::to_string(l) + " OMP_NUM_THREADS=1 " + self + " --gtest_filter='" + suites +
                    "'");
        EXPECT_EQ(r.rc, 0) << r.out;
        EXPECT_EQ(r.out.find("[  FAILED  ]"), std::string::npos) << r.out;
        EXPECT_GE(number_after(r.out, "[  PASSED  ] "), 20) << r.out;  // the suites ran
    }
#endif
}

// cpu_exp, the softmax's vectorizable e^x, against exp in double over its whole range (2
// ulp), and its edges: 0 below ln 2^-126 and for -inf, +inf above 88 and for +inf, NaN for NaN.
TEST(AttentionTiled, ExpWithinTwoUlp) {
    double worst = 0;
    for (int i = 0; i <= 2000000; i++) {
        const float x = -87.3f + (88.0f + 87.3f) * (float)i / 2000000.0f;
        const double e = exp((double)x), got = cpu_exp(x);
        const double ulp = std::nextafter((float)e, INFINITY) - (float)e;
        worst = std::max(worst, fabs(got - e) / ulp);
    }
    EXPECT_LT(worst, 2.0);
    for (float x : {-87.4f, -100.0f, -1e30f, -INFINITY}) EXPECT_EQ(cpu_exp(x), 0.0f) << x;
    for (float x : {88.01f, 1e30f, INFINITY}) EXPECT_EQ(cpu_exp(x), INFINITY) << x;
    EXPECT_TRUE(std::isnan(cpu_exp(NAN)));
    EXPECT_EQ(cpu_exp(0.0f), 1.0f);
}

// The CPU backend's copies and zero-fills (offload.h's cpu_copy, cpu_zero), split among the
// threads above 256 KiB: every byte, at sizes around the block edges.
TEST(CpuCopy, EveryByteAtEverySize) {
    for (size_t n : {(size_t)0, (size_t)1, 4 * CPU_COPY_BLOCK - 1, 4 * CPU_COPY_BLOCK, 4 * CPU_COPY_BLOCK + 3,
                     16 * CPU_COPY_BLOCK + 5}) {
        std::vector<unsigned char> src(n + 1), dst(n + 1, 0xAB);
        for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i * 131 + 7);
        cpu_copy(dst.data(), src.data(), n);
        EXPECT_EQ(memcmp(dst.data(), src.data(), n), 0) << n;
        EXPECT_EQ(dst[n], 0xAB) << n << ": written past the end";
        cpu_zero(dst.data(), n);
        EXPECT_EQ(std::count(dst.begin(), dst.begin() + n, 0), (long)n) << n;
        EXPECT_EQ(dst[n], 0xAB) << n << ": zeroed past the end";
    }
}

// attn_exp, cpu_exp less its overflow result, is cpu_exp to the bit wherever the softmax's values
// lie (x <= a few ulp above 0: s - max s, s - lse), at -inf and below cpu_exp's lower limit; NaN
// stays NaN.
TEST(AttentionTiled, SoftmaxExpIsCpuExpToTheBit) {
    std::vector<float> xs = {-INFINITY, -1e30f, -100.0f, -87.4f, CPU_EXP_LO, -0.0f, 0.0f, 1e-6f, 0.01f};
    for (int i = 0; i <= 1000000; i++) xs.push_back(-100.0f + 100.01f * (float)i / 1000000.0f);
    for (float x : xs) {
        const float a = attn_exp(x), c = cpu_exp(x);
        ASSERT_EQ(memcmp(&a, &c, sizeof a), 0) << x << ": " << a << " vs " << c;
    }
    EXPECT_TRUE(std::isnan(attn_exp(NAN)));
    // above cpu_exp's range (lanes the softmax zeroes after: a query whose lse is -inf) it stays finite
    for (float x : {88.5f, 1e30f, INFINITY}) EXPECT_EQ(attn_exp(x), cpu_exp_in_range(CPU_EXP_HI)) << x;
}

// The GPU attention kernels' shared memory per block (attention.cuh) against what GPUs allow a
// block that opts in: sm_80 163 KiB and sm_90 227 KiB hold every head size up to 512; sm_86 and
// sm_89 allow 99 KiB, which head size 512 exceeds: a run is refused at its start with a line
// naming the head size, the limit and the largest head size that fits there (checked here to be
// the largest that does).
TEST(AttentionGpuLimits, HeadSize512NeedsMoreSharedMemoryThanSm86Allows) {
    const size_t sm80 = 163 * 1024, sm86 = 99 * 1024, sm90 = 227 * 1024;
    for (int D = 2; D <= 512; D += 2) {
        EXPECT_EQ(attention_smem_check(D, sm80, "sm_80"), "") << D;
        EXPECT_EQ(attention_smem_check(D, sm90, "sm_90"), "") << D;
        EXPECT_LE(attn_fwd_smem(D), attn_bwd_smem(D)) << D;  // the backward's is the one to check
    }
    EXPECT_EQ(attention_smem_check(128, sm86, "sm_86"), "");
    const std::string why = attention_smem_check(512, sm86, "GPU X (sm_86)");
    ASSERT_NE(why, "");
    EXPECT_NE(why.find("head size 512"), std::string::npos) << why;
    EXPECT_NE(why.find("GPU X (sm_86) allows 99.0 KiB"), std::string::npos) << why;
    const size_t p = why.find("head sizes up to ");
    ASSERT_NE(p, std::string::npos) << why;
    const int fits = atoi(why.c_str() + p + 17);
    EXPECT_LE(attn_bwd_smem(fits), sm86) << why;
    EXPECT_GT(attn_bwd_smem(fits + 2), sm86) << why;
}

// The CUDA twins of ops.cuh against their CPU references, op by op, on fresh random inputs and
// awkward sizes (T not a multiple of 32, C = 64, 100 and larger, D = 16/64/128 for RoPE). Every
// test skips (GTEST_SKIP) when there is no CUDA device, so this binary passes on a CPU-only machine.
//
// Build (nvcc compiles it; the CPU references are the same headers):
//   nvcc -std=c++17 -O2 -DOMPI_SKIP_MPICXX $(mpicxx --showme:compile) -I. -Xcompiler -fopenmp
//        -c test/test_gpu_ops.cu -o build/test_gpu_ops.o
//   g++ -fopenmp build/test_gpu_ops.o -o build/gpu_ops_tests -lgtest -lgtest_main -pthread
//        -L/usr/local/cuda/lib64 -lcudart -lcublas
// (add -gencode arch=compute_90,code=sm_90 for H100/H200)
//
// Semantics are checked along with the numbers: ops that accumulate (+=) get buffers pre-filled
// with random values on both sides and we compare what each ADDED (after - before), so an op that
// overwrote would fail; ops that overwrite get random garbage on the GPU side first, which must
// vanish; a null dinp/db must leave the buffer untouched.
//
// Tolerances, as relative norms ||gpu - cpu|| / ||cpu||:
//  - kElem = 1e-5 for elementwise ops and norms: each output is a few fp32 roundings on either
//    side (CUDA's tanhf/expf are within 2 ulp of glibc's, nvcc contracts a*b+c into FMAs, the norm
//    sums a row in fp32 where the CPU uses double): ~1e-7 relative, 100x margin. A wrong formula
//    or index moves outputs by 1e-2 or more.
//  - kMatmul = 1e-4 for matmuls (and their column sums): the same fp32 products summed in a
//    different order (cuBLAS blocks and FMAs the k-loop, the CPU vectorises it), so the results
//    differ by ~sqrt(K) * 6e-8 relative, ~1e-6 for K <= 1000, plus cancellation in sums of
//    random-signed terms. 1e-4 leaves room for that and still catches any wrong transpose or
//    leading dimension (those give O(1) errors).
//  - exact (0) for copies and single additions done in the same order on both sides
//    (embedding forward/backward, add_inplace): IEEE fp32 addition is correctly rounded, so any
//    difference is a bug.
//  - bit for bit for the bf16 conversions (to/from/round_bf16): the same integer rounding on both
//    sides; only a NaN's payload may differ, it has to stay a NaN. The bf16 matmuls use kMatmul
//    (their products are exact in fp32, as the CPU twin's are; see MatmulBf16Forward).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <vector>
#include "common.h"
#include "cuda_common.cuh"
#include "ops.cuh"
#include "test/gpu_testutil.cuh"
#include "test/testutil.h"

using vf = std::vector<float>;
using vi = std::vector<int32_t>;

static const double kElem = 1e-5;    // elementwise ops and norms: a few fp32 roundings per output
static const double kMatmul = 1e-4;  // matmuls: fp32 sums in a different order

// ----------------------------------------------------------------------------
// Helpers

// n integers uniform in [0, hi)
static vi randint(Rng* r, size_t n, int32_t hi) {
    vi a(n);
    for (int32_t& x : a) x = (int32_t)(rng_u64(r) % (uint64_t)hi);
    return a;
}

// max |a - b|
static double max_abs_diff(const vf& a, const vf& b) {
    EXPECT_EQ(a.size(), b.size());
    double m = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); i++) m = std::max(m, fabs((double)a[i] - (double)b[i]));
    return m;
}
// What an accumulating op added to a buffer: after - before.
static vf added(const vf& after, const vf& before) {
    vf d(after.size());
    for (size_t i = 0; i < d.size(); i++) d[i] = after[i] - before[i];
    return d;
}

// Every test starts here: skip without a device, else a stream and a cuBLAS handle. fatal() (which
// CUDA_CHECK/CUBLAS_CHECK call) throws, so a CUDA error fails the test with its message instead of
// exiting the binary.
class GpuOps : public ::testing::Test {
  protected:
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    void SetUp() override {
        REQUIRE_GPU();
        fatal_hook() = [](const char* m) { throw std::runtime_error(m); };
        CUDA_CHECK(cudaStreamCreate(&stream));
        CUBLAS_CHECK(cublasCreate(&blas));
    }
    void TearDown() override {
        if (blas) cublasDestroy(blas);
        if (stream) cudaStreamDestroy(stream);
        fatal_hook() = nullptr;
    }
};

// ----------------------------------------------------------------------------
// matmul

struct MatShape {
    size_t T;
    int IC, OC;
};
static const std::vector<MatShape> kMatShapes = {{37, 64, 100}, {100, 100, 64}, {1, 100, 100}, {257, 64, 33}, {1000, 100, 128}};

// (the matmul tests, fp32 and bf16, are at the end: they share a body templated on the operand type)


// ----------------------------------------------------------------------------
// LayerNorm / RMSNorm

struct NormShape {
    size_t T;
    int C;
};
static const NormShape kNormShapes[] = {{37, 64}, {100, 100}, {5, 1000}, {3, 4096}, {1000, 64}};

TEST_F(GpuOps, NormForward) {
    Rng r{201};
    for (const NormShape& sh : kNormShapes)
        for (bool rms : {false, true}) {
            SCOPED_TRACE(::testing::Message() << "T=" << sh.T << " C=" << sh.C << " rms=" << rms);
            const size_t T = sh.T;
            const int C = sh.C;
            const float eps = 1e-5f;
            // a shifted, scaled input so that the mean and the variance both matter
            const vf inp = randn(&r, T * C, 2.0f, 0.5f), w = randn(&r, C, 0.5f, 1.0f), b = randn(&r, C, 0.1f);
            const float* bp = rms ? nullptr : b.data();
            vf out(T * C), mean(T), rstd(T);
            norm_forward_cpu(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), bp, T, C, rms, eps);
            DevBuf<float> d_out(randn(&r, T * C, 10.0f)), d_mean(randn(&r, T)), d_rstd(randn(&r, T));
            DevBuf<float> d_inp(inp), d_w(w), d_b(b);
            norm_forward_gpu(stream, d_out.p, d_mean.p, d_rstd.p, d_inp.p, d_w.p, rms ? nullptr : d_b.p, T, C, rms,
                             eps);
            EXPECT_LT(rel_err(d_out.get(), out), kElem);
            EXPECT_LT(rel_err(d_mean.get(), mean), kElem);  // rms: both exactly 0
            EXPECT_LT(rel_err(d_rstd.get(), rstd), kElem);
        }
}

TEST_F(GpuOps, NormBackwardAccumulates) {
    Rng r{202};
    for (const NormShape& sh : kNormShapes)
        for (bool rms : {false, true}) {
            SCOPED_TRACE(::testing::Message() << "T=" << sh.T << " C=" << sh.C << " rms=" << rms);
            const size_t T = sh.T;
            const int C = sh.C;
            const vf inp = randn(&r, T * C, 2.0f, 0.5f), w = randn(&r, C, 0.5f, 1.0f), b = randn(&r, C, 0.1f);
            vf out(T * C), mean(T), rstd(T);
            norm_forward_cpu(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), rms ? nullptr : b.data(), T,
                             C, rms, 1e-5f);
            const vf dout = randn(&r, T * C);
            const vf dinp0 = randn(&r, T * C), dw0 = randn(&r, C), db0 = randn(&r, C);
            vf dinp = dinp0, dw = dw0, db = db0;
            norm_backward_cpu(dinp.data(), dw.data(), rms ? nullptr : db.data(), dout.data(), inp.data(), w.data(),
                              mean.data(), rstd.data(), T, C, rms);
            DevBuf<float> d_dinp(dinp0), d_dw(dw0), d_db(db0), d_dout(dout), d_inp(inp), d_w(w), d_mean(mean),
                d_rstd(rstd);
            norm_backward_gpu(stream, d_dinp.p, d_dw.p, rms ? nullptr : d_db.p, d_dout.p, d_inp.p, d_w.p, d_mean.p,
                              d_rstd.p, T, C, rms);
            EXPECT_LT(rel_err(added(d_dinp.get(), dinp0), added(dinp, dinp0)), kElem);
            EXPECT_LT(rel_err(added(d_dw.get(), dw0), added(dw, dw0)), kElem);
            if (rms)
                EXPECT_EQ(max_abs_diff(d_db.get(), db0), 0.0) << "db == null must not be written";
            else
                EXPECT_LT(rel_err(added(d_db.get(), db0), added(db, db0)), kElem);
        }
}

// ----------------------------------------------------------------------------
// Activations

TEST_F(GpuOps, Gelu) {
    Rng r{301};
    for (size_t N : {(size_t)1, (size_t)1000, (size_t)100003}) {
        SCOPED_TRACE(::testing::Message() << "N=" << N);
        const vf inp = randn(&r, N, 3.0f), dout = randn(&r, N);
        vf out(N), dinp(N);
        gelu_forward_cpu(out.data(), inp.data(), N);
        gelu_backward_cpu(dinp.data(), inp.data(), dout.data(), N);
        DevBuf<float> d_out(randn(&r, N, 10.0f)), d_dinp(randn(&r, N, 10.0f)), d_inp(inp), d_dout(dout);
        gelu_forward_gpu(stream, d_out.p, d_inp.p, N);
        gelu_backward_gpu(stream, d_dinp.p, d_inp.p, d_dout.p, N);  // overwrites the garbage
        EXPECT_LT(rel_err(d_out.get(), out), kElem);
        EXPECT_LT(rel_err(d_dinp.get(), dinp), kElem);
    }
}

TEST_F(GpuOps, Swiglu) {
    Rng r{302};
    const NormShape shapes[] = {{37, 100}, {37, 64}, {1, 100}, {300, 33}};  // (T, F)
    for (const NormShape& sh : shapes) {
        const size_t T = sh.T;
        const int F = sh.C;
        SCOPED_TRACE(::testing::Message() << "T=" << T << " F=" << F);
        const vf inp = randn(&r, T * 2 * F, 2.0f), dout = randn(&r, T * F);
        vf out(T * F), dinp(T * 2 * F);
        swiglu_forward_cpu(out.data(), inp.data(), T, F);
        swiglu_backward_cpu(dinp.data(), inp.data(), dout.data(), T, F);
        DevBuf<float> d_out(randn(&r, T * F, 10.0f)), d_dinp(randn(&r, T * 2 * F, 10.0f)), d_inp(inp), d_dout(dout);
        swiglu_forward_gpu(stream, d_out.p, d_inp.p, T, F);
        swiglu_backward_gpu(stream, d_dinp.p, d_inp.p, d_dout.p, T, F);  // overwrites both halves
        EXPECT_LT(rel_err(d_out.get(), out), kElem);
        EXPECT_LT(rel_err(d_dinp.get(), dinp), kElem);
    }
}

// ----------------------------------------------------------------------------
// RoPE: forward and inverse rotations, at positions up to 2^31 - 1 (angles in double on both sides;
// pow and sin/cos agree to ~2 ulp of double, far below a float ulp of the result).

TEST_F(GpuOps, Rope) {
    Rng r{401};
    const size_t T = 37;
    const int nh = 3;
    vi pos = randint(&r, T, 1 << 24);  // up to 16M
    pos[0] = 0, pos[1] = 1, pos[2] = 2097151, pos[3] = 2000000, pos[4] = INT_MAX, pos[5] = 1 << 30;
    // plain, linear position interpolation, and llama3's bands (Llama 3.1's numbers)
    const RopeParams scalings[] = {{0, 0, 1, 1, 4, 8192}, {0, 1, 4, 1, 4, 8192}, {0, 2, 8, 1, 4, 8192}};
    for (int D : {16, 64, 128})
        for (float theta : {10000.0f, 500000.0f})
            for (RopeParams rp : scalings)
                for (int sign : {1, -1}) {
                    rp.theta = theta;
                    SCOPED_TRACE(::testing::Message() << "D=" << D << " theta=" << theta << " scaling=" << rp.scaling
                                                      << " sign=" << sign);
                    const vf x0 = randn(&r, T * nh * D);
                    vf x = x0;
                    rope_cpu(x.data(), pos.data(), T, nh, D, rp, sign);
                    DevBuf<float> d_x(x0);
                    DevBuf<int32_t> d_pos(pos);
                    rope_gpu(stream, d_x.p, d_pos.p, T, nh, D, rp, sign);
                    EXPECT_LT(rel_err(d_x.get(), x), kElem);
                }
}

// ----------------------------------------------------------------------------
// Embedding: a copy forward, in-order additions backward (tokens repeat: a 7-token vocabulary),
// so both must match bit for bit.

TEST_F(GpuOps, EmbeddingForward) {
    Rng r{501};
    for (int C : {64, 100}) {
        SCOPED_TRACE(::testing::Message() << "C=" << C);
        const size_t T = 37;
        const int V = 50;
        const vi tok = randint(&r, T, V);
        const vf wte = randn(&r, (size_t)V * C);
        vf out(T * C);
        embedding_forward_cpu(out.data(), tok.data(), wte.data(), T, C);
        DevBuf<float> d_out(randn(&r, T * C, 10.0f)), d_wte(wte);
        DevBuf<int32_t> d_tok(tok);
        embedding_forward_gpu(stream, d_out.p, d_tok.p, d_wte.p, T, C);
        EXPECT_EQ(max_abs_diff(d_out.get(), out), 0.0);
    }
}

TEST_F(GpuOps, EmbeddingBackwardAccumulates) {
    Rng r{502};
    for (int C : {64, 100}) {
        SCOPED_TRACE(::testing::Message() << "C=" << C);
        const size_t T = 300;
        const int V = 7;
        const vi tok = randint(&r, T, V);
        const vf dout = randn(&r, T * C), dwte0 = randn(&r, (size_t)V * C);
        vf dwte = dwte0;
        embedding_backward_cpu(dwte.data(), tok.data(), dout.data(), T, C);
        DevBuf<float> d_dwte(dwte0), d_dout(dout);
        DevBuf<int32_t> d_tok(tok);
        embedding_backward_gpu(stream, d_dwte.p, d_tok.p, d_dout.p, T, C);
        EXPECT_EQ(max_abs_diff(d_dwte.get(), dwte), 0.0);
    }
}

// ----------------------------------------------------------------------------
// Residual add. The last size is above 65536 blocks x 256 threads, so the grid-stride loop wraps.

TEST_F(GpuOps, AddInplace) {
    Rng r{601};
    for (size_t N : {(size_t)1, (size_t)100003, (size_t)65536 * 256 + 1001}) {
        SCOPED_TRACE(::testing::Message() << "N=" << N);
        const vf out0 = randn(&r, N), inp = randn(&r, N);
        vf out = out0;
        add_inplace_cpu(out.data(), inp.data(), N);
        DevBuf<float> d_out(out0), d_inp(inp);
        add_inplace_gpu(stream, d_out.p, d_inp.p, N);
        EXPECT_EQ(max_abs_diff(d_out.get(), out), 0.0);
    }
}

// Indices past 2^31 (2M tokens x 4096 dims is 8.6e9 elements): add_inplace over 2^31 + 3000 floats
// (2 x 8.6 GB on the device). The bulk is a byte pattern set by cudaMemset (cheap); the last 2^20 +
// 3000 elements, straddling index 2^31, get random values and are checked against the CPU, and the
// first 4096 against the pattern. Skipped when the device lacks the memory.
TEST_F(GpuOps, AddInplacePast2e31) {
    const size_t N = ((size_t)1 << 31) + 3000, M = ((size_t)1 << 20) + 3000, head = 4096;
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (free_b < 2 * N * sizeof(float) + ((size_t)1 << 30)) GTEST_SKIP() << "needs ~18 GB of free device memory";
    Rng r{602};
    float *out = nullptr, *inp = nullptr;
    CUDA_CHECK(cudaMalloc(&out, N * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&inp, N * sizeof(float)));
    CUDA_CHECK(cudaMemset(out, 0x3f, N * sizeof(float)));  // every float 0x3f3f3f3f = 0.747...
    CUDA_CHECK(cudaMemset(inp, 0x40, N * sizeof(float)));  // every float 0x40404040 = 3.0039...
    const vf tail_out0 = randn(&r, M), tail_inp = randn(&r, M);
    CUDA_CHECK(cudaMemcpy(out + (N - M), tail_out0.data(), M * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(inp + (N - M), tail_inp.data(), M * sizeof(float), cudaMemcpyHostToDevice));
    add_inplace_gpu(stream, out, inp, N);
    CUDA_CHECK(cudaDeviceSynchronize());
    vf tail(M), first(head);
    CUDA_CHECK(cudaMemcpy(tail.data(), out + (N - M), M * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(first.data(), out, head * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaFree(out));
    CUDA_CHECK(cudaFree(inp));
    vf tail_ref = tail_out0;
    add_inplace_cpu(tail_ref.data(), tail_inp.data(), M);
    EXPECT_EQ(max_abs_diff(tail, tail_ref), 0.0);
    float a, b;
    const uint32_t pa = 0x3f3f3f3fu, pb = 0x40404040u;
    memcpy(&a, &pa, 4), memcpy(&b, &pb, 4);
    EXPECT_EQ(max_abs_diff(first, vf(head, a + b)), 0.0);
}

// ----------------------------------------------------------------------------
// bf16: the conversions bit for bit (the same integer rounding on both sides), the bf16 matmuls
// (cublasGemmEx, bf16 in, fp32 accumulate and out) against the CPU bf16 twins.

static float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// n values: bf16 of scale * N(0, 1) (rounded on the CPU): fresh, never all zeros.
static std::vector<bf16> randn_bf16(Rng* r, size_t n, float scale = 1.0f) {
    const vf x = randn(r, n, scale);
    std::vector<bf16> h(n);
    to_bf16_cpu(h.data(), x.data(), n);
    return h;
}
// Where two fp32 arrays differ: the same bits, except that a NaN only has to stay a NaN. Reports
// the first few.
static size_t float_mismatches(const vf& gpu, const vf& cpu) {
    EXPECT_EQ(gpu.size(), cpu.size());
    size_t bad = 0;
    for (size_t i = 0; i < gpu.size() && i < cpu.size(); i++) {
        const bool same = std::isnan(cpu[i]) ? std::isnan(gpu[i]) : memcmp(&gpu[i], &cpu[i], 4) == 0;
        if (!same && bad++ < 5) ADD_FAILURE() << "at " << i << ": gpu " << gpu[i] << ", cpu " << cpu[i];
    }
    return bad;
}

// Inputs: raw random bit patterns (every exponent, subnormals, NaN 1 in 256), N(0, 1) values,
// values with a tie in the low 16 bits, and the edge cases (infinities, NaN payloads that truncate
// to infinity, FLT_MAX and the top tie that round to infinity, signed zeros, subnormal ties). The
// last N is past 65536 blocks x 256 threads, so the grid-stride loops wrap.
TEST_F(GpuOps, Bf16ConversionsMatchCpuBitForBit) {
    Rng r{701};
    const uint32_t specials[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xff800001u, 0xffffffffu,
                                 0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x00000000u, 0x80000000u,
                                 0x00000001u, 0x00018000u, 0x80008000u, 0x3f808000u, 0x3f818000u, 0x3fff8000u};
    for (size_t N : {(size_t)1, (size_t)100003, (size_t)65536 * 256 + 1001}) {
        SCOPED_TRACE(::testing::Message() << "N=" << N);
        vf x(N);
        for (size_t i = 0; i < N; i++) {
            const uint32_t u = (uint32_t)rng_u64(&r);
            x[i] = i % 3 == 0 ? f32_of(u) : i % 3 == 1 ? rng_normal(&r) * 1e3f : f32_of((u & 0xffff0000u) | 0x8000u);
        }
        for (size_t i = 0; i < sizeof(specials) / 4 && 7 * i + 2 < N; i++) x[7 * i + 2] = f32_of(specials[i]);
        x[N - 1] = 3e38f;  // huge: rounds to a finite bf16 (the largest is 3.39e38)
        std::vector<bf16> h(N), hb(N);
        for (size_t i = 0; i < N; i++) hb[i] = (bf16)rng_u64(&r);  // every bf16 pattern, NaNs included
        for (size_t i = 0; i < N && i < 65536; i++) hb[i] = (bf16)i;

        to_bf16_cpu(h.data(), x.data(), N);
        vf wide(N), rounded = x;
        from_bf16_cpu(wide.data(), hb.data(), N);
        round_bf16_cpu(rounded.data(), N);

        DevBuf<float> d_x(x), d_rounded(x), d_wide(randn(&r, N, 10.0f));  // garbage the widening must overwrite
        DevBuf<bf16> d_h(std::vector<bf16>(N, 0x1234)), d_hb(hb);        // garbage the rounding must overwrite
        to_bf16_gpu(stream, d_h.p, d_x.p, N);
        from_bf16_gpu(stream, d_wide.p, d_hb.p, N);
        round_bf16_gpu(stream, d_rounded.p, N);
        const std::vector<bf16> g_h = d_h.get();
        EXPECT_EQ(0, memcmp(g_h.data(), h.data(), N * sizeof(bf16))) << "to_bf16: bits differ";
        EXPECT_EQ(float_mismatches(d_wide.get(), wide), 0u) << "from_bf16";
        EXPECT_EQ(float_mismatches(d_rounded.get(), rounded), 0u) << "round_bf16";
    }
    // n = 0 launches nothing (a launch with 0 blocks would be an error) and touches nothing
    to_bf16_gpu(stream, nullptr, nullptr, 0);
    from_bf16_gpu(stream, nullptr, nullptr, 0);
    round_bf16_gpu(stream, nullptr, 0);
    CUDA_CHECK(cudaStreamSynchronize(stream));
}

// The bf16 matmuls against the CPU bf16 twins, on the fp32 shapes and some odd ones (odd T, IC
// and OC: leading dimensions that are no multiple of 8, off the tensor cores' fast path).
// Tolerance kMatmul (1e-4, relative norm): a product of two bf16 values is exact in fp32 on both
// sides, so they differ only in how the fp32 sums are ordered and rounded (the tensor cores add a
// k-block of products at once, then accumulate in fp32; the CPU sums lanes of a vector), ~1e-6 for
// K <= 1000 as for the fp32 matmuls. 1e-4 still fails a wrong transpose or leading dimension (O(1))
// and an accumulator kept in bf16 (2^-9 ~ 2e-3 per addition).
static const std::vector<MatShape> kBf16MatShapes = {{37, 64, 100}, {1, 100, 100}, {257, 64, 33},
                                                    {1000, 100, 128}, {33, 37, 13}, {7, 5, 3}};

// Random operands of either type: fp32 values, or bf16 ones (already rounded).
template <typename X> static std::vector<X> randn_as(Rng* r, size_t n, float scale = 1.0f);
template <> std::vector<float> randn_as<float>(Rng* r, size_t n, float scale) { return randn(r, n, scale); }
template <> std::vector<bf16> randn_as<bf16>(Rng* r, size_t n, float scale) { return randn_bf16(r, n, scale); }

// matmul_forward_gpu<X> against matmul_forward_cpu<X>, with and without bias; the output starts
// as garbage, which must vanish.
template <typename X>
static void check_matmul_forward(cublasHandle_t blas, cudaStream_t stream, uint64_t seed, const std::vector<MatShape>& shapes) {
    Rng r{seed};
    for (const MatShape& sh : shapes)
        for (bool bias : {true, false}) {
            SCOPED_TRACE(::testing::Message() << "T=" << sh.T << " IC=" << sh.IC << " OC=" << sh.OC
                                              << " bias=" << bias);
            const size_t T = sh.T;
            const int IC = sh.IC, OC = sh.OC;
            const std::vector<X> inp = randn_as<X>(&r, T * IC), w = randn_as<X>(&r, (size_t)OC * IC, 0.1f);
            const vf b = randn(&r, OC);
            vf out(T * OC);
            matmul_forward_cpu(out.data(), inp.data(), w.data(), bias ? b.data() : nullptr, T, IC, OC);
            DevBuf<float> d_out(randn(&r, T * OC, 10.0f)), d_b(b);
            DevBuf<X> d_inp(inp), d_w(w);
            matmul_forward_gpu(blas, stream, d_out.p, d_inp.p, d_w.p, bias ? d_b.p : nullptr, T, IC, OC);
            EXPECT_LT(rel_err(d_out.get(), out), kMatmul);
        }
}

// matmul_backward_gpu<X> against matmul_backward_cpu<X>: what each ADDED to random starting
// dinp, dw, db; null dinp / db must stay untouched.
template <typename X>
static void check_matmul_backward(cublasHandle_t blas, cudaStream_t stream, uint64_t seed, const std::vector<MatShape>& shapes) {
    Rng r{seed};
    for (const MatShape& sh : shapes)
        for (int variant = 0; variant < 4; variant++) {
            const bool with_dinp = !(variant & 1), with_db = !(variant & 2);
            SCOPED_TRACE(::testing::Message() << "T=" << sh.T << " IC=" << sh.IC << " OC=" << sh.OC
                                              << " dinp=" << with_dinp << " db=" << with_db);
            const size_t T = sh.T;
            const int IC = sh.IC, OC = sh.OC;
            const std::vector<X> dout = randn_as<X>(&r, T * OC), inp = randn_as<X>(&r, T * IC),
                                 w = randn_as<X>(&r, (size_t)OC * IC, 0.1f);
            const vf dinp0 = randn(&r, T * IC), dw0 = randn(&r, (size_t)OC * IC), db0 = randn(&r, OC);
            vf dinp = dinp0, dw = dw0, db = db0;
            matmul_backward_cpu(with_dinp ? dinp.data() : nullptr, dw.data(), with_db ? db.data() : nullptr,
                                dout.data(), inp.data(), w.data(), T, IC, OC);
            DevBuf<float> d_dinp(dinp0), d_dw(dw0), d_db(db0);
            DevBuf<X> d_dout(dout), d_inp(inp), d_w(w);
            matmul_backward_gpu(blas, stream, with_dinp ? d_dinp.p : nullptr, d_dw.p, with_db ? d_db.p : nullptr,
                                d_dout.p, d_inp.p, d_w.p, T, IC, OC);
            const vf g_dinp = d_dinp.get(), g_dw = d_dw.get(), g_db = d_db.get();
            EXPECT_LT(rel_err(added(g_dw, dw0), added(dw, dw0)), kMatmul);
            if (with_dinp)
                EXPECT_LT(rel_err(added(g_dinp, dinp0), added(dinp, dinp0)), kMatmul);
            else
                EXPECT_EQ(max_abs_diff(g_dinp, dinp0), 0.0) << "dinp == null must not be written";
            if (with_db)
                EXPECT_LT(rel_err(added(g_db, db0), added(db, db0)), kMatmul);
            else
                EXPECT_EQ(max_abs_diff(g_db, db0), 0.0) << "db == null must not be written";
        }
}

TEST_F(GpuOps, MatmulForward) { check_matmul_forward<float>(blas, stream, 101, kMatShapes); }
TEST_F(GpuOps, MatmulBackwardAccumulates) { check_matmul_backward<float>(blas, stream, 102, kMatShapes); }
TEST_F(GpuOps, MatmulBf16Forward) { check_matmul_forward<bf16>(blas, stream, 711, kBf16MatShapes); }
TEST_F(GpuOps, MatmulBf16BackwardAccumulates) { check_matmul_backward<bf16>(blas, stream, 712, kBf16MatShapes); }

// ops.cuh: the token-wise ops of a decoder layer — matmul, LayerNorm/RMSNorm, GELU/SwiGLU, RoPE,
// embedding, residual — each as a CPU reference (plain fp32 loops, OpenMP). These loops are the
// readable specification; a CUDA twin of each goes beside it.
//
// Conventions: row-major; a Linear weight W is (OC, IC) as in PyTorch, y = x W^T + b.
// Backward functions ACCUMULATE (+=) into parameter gradients and into dinp unless said otherwise,
// so that residual branches add up without extra buffers. Every loop is parallel over an output
// index, never over a reduction, so results do not depend on the thread count.
#pragma once
#include <cmath>
#include <algorithm>
#include <type_traits>
#include <vector>
#include "common.h"
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// CUDA twins. Each CPU op foo_cpu(args) has a launcher foo_gpu(stream, args) right below it with
// the same arguments (device pointers) and the same semantics (accumulate or overwrite, null
// bias/dinp/db), fp32 unless bf16 is named. Kernels write every output from one thread in a fixed order
// (no float atomics), so results are deterministic run to run.
#ifdef __CUDACC__
#include <climits>
#include "cuda_common.cuh"

// Sum over the 32 lanes of a warp, returned to every lane. The xor butterfly adds the same pairs in
// every lane (a + b == b + a exactly), so all lanes hold the same bits.
static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Column sums (db of a matmul, dw/db of a norm) run in blocks of (32, COLSUM_ROWS) threads: a block
// owns 32 adjacent columns (coalesced reads), thread y sums rows y, y + COLSUM_ROWS, ... in order,
// then thread y == 0 adds the COLSUM_ROWS partials in order. Fixed order, no atomics.
static const int COLSUM_ROWS = 16;

// cuBLAS dimensions are int.
static inline int blas_dim(size_t n, const char* what) {
    if (n > (size_t)INT_MAX) fatal("matmul: %s = %zu is larger than cuBLAS's int limit %d", what, n, INT_MAX);
    return (int)n;
}
#endif

// ----------------------------------------------------------------------------
// Precision. In bf16 mode (--precision bf16) the matmuls read bf16 operands and accumulate in
// fp32, and the sequence-sized tensors are stored in bf16 (schedule.h says which, offload.h how);
// everything else stays fp32. These three conversions are all the bf16 arithmetic there is.

HOST_DEVICE static inline float to_f32(float x) { return x; }
HOST_DEVICE static inline float to_f32(bf16 x) { return bf16_to_float(x); }
// *p = x in p's type (rounded to nearest even for bf16)
HOST_DEVICE static inline void store_as(float* p, float x) { *p = x; }
HOST_DEVICE static inline void store_as(bf16* p, float x) { *p = bf16_from_float(x); }

// out (n) = x (n) rounded to bf16
static inline void to_bf16_cpu(bf16* out, const float* x, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = bf16_from_float(x[i]);
}
// out (n) = x (n) widened to fp32 (exact)
static inline void from_bf16_cpu(float* out, const bf16* x, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_float(x[i]);
}
// x (n) = x rounded to bf16, kept in fp32: the value a bf16 store of x would give back
static inline void round_bf16_cpu(float* x, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = bf16_round(x[i]);
}
#ifdef __CUDACC__
// twins of the three above, one thread per value; the same integer rounding, so the same bits
static __global__ void to_bf16_kernel(bf16* out, const float* x, size_t n) {
    GRID_STRIDE_LOOP(i, n) out[i] = bf16_from_float(x[i]);
}
static __global__ void from_bf16_kernel(float* out, const bf16* x, size_t n) {
    GRID_STRIDE_LOOP(i, n) out[i] = bf16_to_float(x[i]);
}
static __global__ void round_bf16_kernel(float* x, size_t n) {
    GRID_STRIDE_LOOP(i, n) x[i] = bf16_round(x[i]);
}
static inline void to_bf16_gpu(cudaStream_t stream, bf16* out, const float* x, size_t n) {
    if (n == 0) return;
    to_bf16_kernel<<<elementwise_grid(n), 256, 0, stream>>>(out, x, n);
    CUDA_LAUNCHED();
}
static inline void from_bf16_gpu(cudaStream_t stream, float* out, const bf16* x, size_t n) {
    if (n == 0) return;
    from_bf16_kernel<<<elementwise_grid(n), 256, 0, stream>>>(out, x, n);
    CUDA_LAUNCHED();
}
static inline void round_bf16_gpu(cudaStream_t stream, float* x, size_t n) {
    if (n == 0) return;
    round_bf16_kernel<<<elementwise_grid(n), 256, 0, stream>>>(x, n);
    CUDA_LAUNCHED();
}
#endif

// ----------------------------------------------------------------------------
// Instruction sets. The hot CPU loops (gemm_tile, the attention blocks) are plain C++ written for
// the compiler to vectorize; they are compiled three times, for AVX-512, for AVX2 + FMA and for
// the compiler's baseline target, and the caller picks one at run time from what the CPU reports
// (cpu_simd), so one binary runs on any x86-64 machine and uses the vector units it finds. Only
// these functions get the wider instruction sets (function attributes, not -m flags), so nothing
// else can reach an instruction the CPU lacks. Elsewhere (not x86-64, or not GCC/Clang) there is
// only the baseline build. FMA rounds once where mul + add rounds twice: results differ in the
// last bits between machines, never between runs or thread counts on one machine.
#if defined(__x86_64__) && defined(__GNUC__)
#define CPU_SIMD_VARIANTS
#define CPU_AVX512 __attribute__((target("avx512f,avx512vl,fma,prefer-vector-width=512")))
#define CPU_AVX2 __attribute__((target("avx2,fma")))
// 2: AVX-512 (F + VL), 1: AVX2 + FMA, 0: neither. FPDT_CPU_SIMD=0|1|2 caps it (comparisons).
static inline int cpu_simd_detect() {
    int l = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 2
            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")       ? 1
                                                                                    : 0;
    const char* cap = getenv("FPDT_CPU_SIMD");
    if (cap && *cap >= '0' && *cap <= '2' && cap[1] == 0) l = std::min(l, *cap - '0');
    return l;
}
static int cpu_simd_level = -1;  // the variant in use; -1 until the first call (a test may lower it)
static inline int cpu_simd() {
    if (cpu_simd_level < 0) cpu_simd_level = cpu_simd_detect();
    return cpu_simd_level;
}
#endif

// Threads a parallel loop here runs on (1 in a build without OpenMP).
static inline int cpu_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
// The instruction set of the variant in use, for what bench prints.
static inline const char* cpu_simd_name() {
#ifdef CPU_SIMD_VARIANTS
    return cpu_simd() == 2 ? "AVX-512" : cpu_simd() == 1 ? "AVX2 + FMA" : "baseline x86-64";
#else
    return "baseline";
#endif
}

// The peak fp32 rate of the vector unit, measured: 12 independent chains x = x * b + c, each on a
// whole vector register of W floats (12 chains hide the latency of two pipelined FMA units),
// for `rounds` rounds. Returns the floating-point operations done (2 per element and round).
// x0 keeps the compiler from computing the result ahead.
template <int W>
static inline __attribute__((always_inline)) double cpu_fma_chains(long rounds, float x0, float* out) {
    float x[12][W];
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < W; j++) x[i][j] = x0 + 0.01f * (i * W + j);
    for (long r = 0; r < rounds; r++)
        for (int i = 0; i < 12; i++)
#pragma omp simd
            for (int j = 0; j < W; j++) x[i][j] = x[i][j] * 0.9999f + 0.0001f;
    float sum = 0.0f;
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < W; j++) sum += x[i][j];
    *out = sum;
    return 2.0 * 12 * W * rounds;
}
#ifdef CPU_SIMD_VARIANTS
CPU_AVX512 static double cpu_fma_chains_avx512(long n, float x0, float* out) { return cpu_fma_chains<16>(n, x0, out); }
CPU_AVX2 static double cpu_fma_chains_avx2(long n, float x0, float* out) { return cpu_fma_chains<8>(n, x0, out); }
#endif
static double cpu_fma_chains_base(long n, float x0, float* out) { return cpu_fma_chains<4>(n, x0, out); }
// FLOP/s of all this process's threads running the chains of the set in use at once, for about
// `seconds` in all (the best of 3 tries: a core taken away by another process only lowers a try).
static inline double cpu_peak_flops(double seconds) {
#ifdef CPU_SIMD_VARIANTS
    double (*chains)(long, float, float*) =
        cpu_simd() == 2 ? cpu_fma_chains_avx512 : cpu_simd() == 1 ? cpu_fma_chains_avx2 : cpu_fma_chains_base;
#else
    double (*chains)(long, float, float*) = cpu_fma_chains_base;
#endif
    auto now = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
    volatile float sink = 0.0f;  // the chains' results are used, so they are computed
    float out;
    long rounds = 1000;  // calibration, one thread: rounds for `seconds` / 3 per try
    double dt = 0.0;
    while (dt < 0.01) {
        rounds *= 2;
        const double t0 = now();
        chains(rounds, 1.0f, &out);
        dt = now() - t0;
        sink = out;
    }
    rounds = std::max(1000L, (long)(rounds * seconds / 3 / dt));
    double best = 0.0;
    for (int attempt = 0; attempt < 3; attempt++) {
        double flops = 0.0;
        const double t0 = now();
#pragma omp parallel reduction(+ : flops)
        {
            float mine;
            flops += chains(rounds, 1.0f, &mine);
            sink = mine;
        }
        best = std::max(best, flops / (now() - t0));
    }
    (void)sink;
    return best;
}

// e^x in fp32 for element-wise loops (the attention's softmax, SwiGLU), written so the compiler
// can vectorize it (libm's expf is a call per element): e^x = 2^n e^f with n = round(x / ln 2) and
// f = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, so f keeps its low bits), e^f by Cephes
// expf's polynomial (degree 7), and 2^n put straight into the exponent bits. Within 2 ulp of e^x
// (the GPU twins' expf: within 2 ulp too); 0 below -87.33 (where fp32 turns subnormal), +inf above
// 88 (e^88 = 1.7e38, near fp32's largest), NaN for NaN.
static const float CPU_EXP_LO = -87.33654f, CPU_EXP_HI = 88.0f;  // lo = ln 2^-126
// e^x for x in [CPU_EXP_LO, CPU_EXP_HI] (or NaN): the polynomial and the exponent bits.
static inline __attribute__((always_inline)) float cpu_exp_in_range(float x) {
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest: + 1.5 * 2^23, back
    const float f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = (p * f * f + f) + 1.0f;
    // 2^n, n in [-126, 127]; unsigned, so the shift cannot overflow whatever n a NaN gives
    const uint32_t bits = (uint32_t)((int)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof bits);
    return p * two_n;
}
static inline __attribute__((always_inline)) float cpu_exp(float x) {
    const float lo = CPU_EXP_LO, hi = CPU_EXP_HI;
    const float e = cpu_exp_in_range(x < lo ? lo : (x > hi ? hi : x));
    return x < lo ? 0.0f : (x > hi ? INFINITY : e);  // NaN fails both tests and stays NaN
}

// ----------------------------------------------------------------------------
// The CPU matrix multiply under both matmul functions:
//   C (M, N) += A (M, K) B (K, N),  A's (m, k) at a[m rsa + k csa], B's (k, n) at b[k rsb + n csb],
// C fp32 row-major (ldc), X fp32 or bf16 (widened to fp32 when packed, so bf16 products are exact
// and every sum is fp32). Blocked as BLIS blocks it: k in slices of GEMM_KC values, in order; in
// each slice C in tiles of GEMM_MC x GEMM_NC, one tile a task. A tile's B columns are copied into
// micro-panels (NR columns, k-major, zero-padded at the edges) and so are its A rows (MR rows,
// k-major) unless they can be read in place, and an MR x NR register block of C is accumulated
// as a sum of outer products, its inner loop over NR adjacent columns for the compiler to
// vectorize. Each element of C is the same sum in the same order whatever the thread count
// (tiles split the outputs, never k).
//
// The loops are compiled once per instruction set (CPU_SIMD_VARIANTS below).
// Blocking: a tile's A block (GEMM_MC x GEMM_KC, 48 KiB) stays in L2 while its B micro-panels
// (GEMM_KC x NR, 16-32 KiB) pass through L1 one at a time. Tiles are wide (GEMM_NC = 1024
// columns: all of them for every matmul of the `medium` model but the MLP's up projection), so a
// tile's A rows are read (or, transposed or bf16, packed) once per slice of k, not once per 128
// columns: the weight gradients, A = dout^T packed, ran 10-15% faster so (AVX2 and AVX-512).
static const int GEMM_MC = 48, GEMM_NC = 1024, GEMM_KC = 256;

// dst (kc, R) k-major = rows [0, rows) of src (element (r, k) at src[r rs + k cs]), zero rows to R
// (read along whichever of r and k is contiguous in src). R is a template argument so that a whole
// panel's R values per k are copied inline (with rs == 1 the compiler made them a memcpy call).
template <int R, typename X>
static inline void gemm_pack(float* __restrict dst, const X* __restrict src, size_t rs, size_t cs, int rows, int kc) {
    if (rows < R) memset(dst, 0, (size_t)kc * R * sizeof(float));
    if (cs == 1)
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < kc; k++) dst[k * R + r] = to_f32(src[r * rs + k]);
    else if (rows == R)
        for (int k = 0; k < kc; k++)
            for (int r = 0; r < R; r++) dst[k * R + r] = to_f32(src[r * rs + k * cs]);
    else
        for (int k = 0; k < kc; k++)
            for (int r = 0; r < rows; r++) dst[k * R + r] = to_f32(src[r * rs + k * cs]);
}

// acc (MR, NR) += the outer product of a's MR values (r at a[r ars]) and b's NR (j at b[j]): one k
// step of gemm_micro.
template <int MR, int NR>
static inline __attribute__((always_inline)) void gemm_micro_step(float (&acc)[MR][NR], const float* a, size_t ars,
                                                                  const float* b) {
    for (int r = 0; r < MR; r++) {
        const float x = a[r * ars];
#pragma omp simd
        for (int j = 0; j < NR; j++) acc[r][j] += x * b[j];
    }
}

// c (m, n) += a (MR, kc) b (kc, NR) for the m <= MR, n <= NR valid rows and columns, or with ADD
// false c = the product; a's (r, k) at a[r ars + k aks], b's (k, j) at b[k bks + j]. The MR x NR
// sums stay in registers, k in order. gemm_tile calls it on packed micro-panels (a k-major:
// ars 1, aks MR; bks NR), the CPU attention (attention.cuh) on rows in its scratch. UNROLL, for the
// matmul's long k (kc up to 256): c's rows prefetched first and four k steps a trip, together about
// 8% faster on medium's matmuls (each alone 2-3%); the attention's short k (a head size, a tile)
// ran 3-4% slower so. KC > 0: kc is KC (the argument is not read), known when compiled: the
// attention's products, whose k is a head size or a tile, ran 8-10% faster so (AVX2), the same
// sums in the same order.
template <int MR, int NR, bool ADD = true, bool UNROLL = false, int KC = 0>
static inline __attribute__((always_inline)) void gemm_micro(float* c, size_t ldc, int m, int n, const float* a,
                                                             size_t ars, size_t aks, const float* b, size_t bks,
                                                             int kc) {
    if (KC > 0) kc = KC;
    float acc[MR][NR] = {};
    if (UNROLL) {
        for (int r = 0; r < m; r++)  // c's rows are read at the end: on their way meanwhile
            __builtin_prefetch(c + r * ldc), __builtin_prefetch(c + r * ldc + n - 1);
        int k = 0;  // (by hand: nvcc's front end drops GCC's unroll pragma from host code)
        for (; k + 4 <= kc; k += 4) {
            gemm_micro_step<MR, NR>(acc, a + k * aks, ars, b + k * bks);
            gemm_micro_step<MR, NR>(acc, a + (k + 1) * aks, ars, b + (k + 1) * bks);
            gemm_micro_step<MR, NR>(acc, a + (k + 2) * aks, ars, b + (k + 2) * bks);
            gemm_micro_step<MR, NR>(acc, a + (k + 3) * aks, ars, b + (k + 3) * bks);
        }
        for (; k < kc; k++) gemm_micro_step<MR, NR>(acc, a + k * aks, ars, b + k * bks);
    } else {
        for (int k = 0; k < kc; k++) gemm_micro_step<MR, NR>(acc, a + k * aks, ars, b + k * bks);
    }
    for (int r = 0; r < m; r++)
#pragma omp simd
        for (int j = 0; j < n; j++) c[r * ldc + j] = ADD ? c[r * ldc + j] + acc[r][j] : acc[r][j];
}

// One C tile, rows [m0, m0 + mc) and columns [n0, n0 + nc), gets its share of one slice of k,
// [k0, k0 + kc). bpack (GEMM_KC x GEMM_NC, this thread's) holds the tile's B panel for that slice
// when pack_b is false (the previous tile of this thread had the same columns), else it is packed
// here. A's rows are read in place where they are fp32 with k contiguous (csa == 1): MR rows of
// kc values each, as a packed A panel would hold them, with no copy; otherwise (bf16, k strided,
// and the last MR rows where fewer than MR are left) they are packed into apack (GEMM_MC x GEMM_KC).
template <int MR, int NR, typename X>
static inline __attribute__((always_inline)) void gemm_tile(float* c, size_t ldc, const X* a, size_t rsa, size_t csa,
                                                            const X* b, size_t rsb, size_t csb, size_t m0, int mc,
                                                            size_t n0, int nc, size_t k0, int kc, bool pack_b,
                                                            float* apack, float* bpack) {
    static_assert(GEMM_MC % MR == 0 && GEMM_NC % NR == 0, "tiles are whole micro-panels");
    if (pack_b)
        for (int j = 0; j < nc; j += NR)
            gemm_pack<NR>(bpack + (size_t)j * kc, b + k0 * rsb + (n0 + j) * csb, csb, rsb, std::min(NR, nc - j), kc);
    const bool a_in_place = std::is_same<X, float>::value && csa == 1;
    for (int i = 0; i < mc; i += MR)
        if (!a_in_place || mc - i < MR)
            gemm_pack<MR>(apack + (size_t)i * kc, a + (m0 + i) * rsa + k0 * csa, rsa, csa, std::min(MR, mc - i), kc);
    for (int j = 0; j < nc; j += NR)  // a B micro-panel stays in L1 while the A panels stream past
        for (int i = 0; i < mc; i += MR) {
            float* ct = c + (m0 + i) * ldc + n0 + j;
            const float* bp = bpack + (size_t)j * kc;
            if (a_in_place && mc - i >= MR)
                gemm_micro<MR, NR, true, true>(ct, ldc, MR, std::min(NR, nc - j), (const float*)(a + (m0 + i) * rsa + k0), rsa, 1,
                                   bp, NR, kc);
            else
                gemm_micro<MR, NR, true, true>(ct, ldc, std::min(MR, mc - i), std::min(NR, nc - j), apack + (size_t)i * kc, 1,
                                   MR, bp, NR, kc);
        }
}

// The register block per instruction set: MR x NR accumulators in 12-16 vector registers.
#define GEMM_TILE_ARGS                                                                                          \
    float *c, size_t ldc, const X *a, size_t rsa, size_t csa, const X *b, size_t rsb, size_t csb, size_t m0,   \
        int mc, size_t n0, int nc, size_t k0, int kc, bool pack_b, float *ap, float *bp
#define GEMM_TILE_CALL c, ldc, a, rsa, csa, b, rsb, csb, m0, mc, n0, nc, k0, kc, pack_b, ap, bp
#ifdef CPU_SIMD_VARIANTS
template <typename X>
CPU_AVX512 static void gemm_tile_avx512(GEMM_TILE_ARGS) {
    gemm_tile<8, 32>(GEMM_TILE_CALL);
}
template <typename X>
CPU_AVX2 static void gemm_tile_avx2(GEMM_TILE_ARGS) {
    gemm_tile<6, 16>(GEMM_TILE_CALL);
}
#endif
template <typename X>
static void gemm_tile_base(GEMM_TILE_ARGS) {
    gemm_tile<4, 16>(GEMM_TILE_CALL);
}

// The k slices in order, each a parallel loop over the C tiles; the tiles are visited column
// panel by column panel, so a thread packs a B panel once for all the row tiles it takes there.
template <typename X>
static inline void gemm_cpu(float* c, size_t ldc, const X* a, size_t rsa, size_t csa, const X* b, size_t rsb,
                            size_t csb, size_t M, size_t N, size_t K) {
    if (M == 0 || N == 0 || K == 0) return;
    typedef void (*TileFn)(float*, size_t, const X*, size_t, size_t, const X*, size_t, size_t, size_t, int, size_t,
                           int, size_t, int, bool, float*, float*);
#ifdef CPU_SIMD_VARIANTS
    const TileFn tile = cpu_simd() == 2 ? gemm_tile_avx512<X> : cpu_simd() == 1 ? gemm_tile_avx2<X> : gemm_tile_base<X>;
#else
    const TileFn tile = gemm_tile_base<X>;
#endif
    // Tiles of GEMM_MC rows, or fewer where that would leave under 4 tiles a thread: a short
    // matrix (a chunk of 256 tokens) then still keeps every thread busy to the end. Heights are
    // multiples of 24, whole micro-panels for every MR.
    const size_t tn = (N + GEMM_NC - 1) / GEMM_NC, want = (4 * cpu_threads() + tn - 1) / tn;  // tiles across; down
    size_t mc = GEMM_MC;
    if ((M + mc - 1) / mc < want) mc = std::max<size_t>(24, ((M + want - 1) / want + 23) / 24 * 24);
    const size_t tm = (M + mc - 1) / mc;  // tiles down
#pragma omp parallel
    {
        // this thread's panels, kept from call to call: no allocation, zeroing or page faults per matmul
        static thread_local std::vector<float> ap((size_t)GEMM_MC * GEMM_KC), bp((size_t)GEMM_KC * GEMM_NC);
        for (size_t k0 = 0; k0 < K; k0 += GEMM_KC) {
            const int kc = (int)std::min<size_t>(GEMM_KC, K - k0);
            size_t packed_n0 = SIZE_MAX;  // the columns whose B panel bp holds for this slice
#pragma omp for schedule(dynamic)
            for (size_t t = 0; t < tm * tn; t++) {
                const size_t n0 = (t / tm) * GEMM_NC, m0 = (t % tm) * mc;
                tile(c, ldc, a, rsa, csa, b, rsb, csb, m0, (int)std::min(mc, M - m0), n0,
                     (int)std::min<size_t>(GEMM_NC, N - n0), k0, kc, n0 != packed_n0, ap.data(), bp.data());
                packed_n0 = n0;
            }  // (the loop's barrier: a slice is added everywhere before the next begins)
        }
    }
}

// ----------------------------------------------------------------------------
// matmul: out (T, OC) = inp (T, IC) @ W (OC, IC)^T + b (OC), b may be null

// X is float, or bf16 for bf16 operands (each product of two bf16 values is exact in fp32; the
// sums are fp32 either way). out = b (or 0), then out += inp W^T through gemm_cpu, which reads W
// (OC, IC) as the (K = IC, N = OC) matrix W^T.
template <typename X>
static inline void matmul_forward_cpu(float* out, const X* inp, const X* w, const float* b, size_t T, int IC, int OC) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int o = 0; o < OC; o++) out[t * OC + o] = b ? b[o] : 0.0f;
    gemm_cpu(out, OC, inp, IC, 1, w, 1, IC, T, OC, IC);
}
#ifdef __CUDACC__
// out (T, OC) += b (OC) broadcast over rows: the "+ b[o]" of matmul_forward_cpu.
static __global__ void matmul_bias_kernel(float* out, const float* b, size_t N, int OC) {
    GRID_STRIDE_LOOP(i, N) out[i] += b[i % OC];
}

// cuBLAS is column-major; a row-major (R, C) array is the same bytes as a column-major (C, R) one,
// its transpose. So with out' = out^T (OC, T), inp' = inp^T (IC, T), w' = w^T (IC, OC), all
// column-major, out = inp w^T becomes out' = (inp w^T)^T = w inp^T = (w')^T inp':
// gemm(op_T, op_N, m=OC, n=T, k=IC, A=w lda=IC, B=inp ldb=IC, C=out ldc=OC), beta = 0 (overwrite).
// Operands X = float or bf16, the result fp32 (cublasGemmEx). Compute types: for fp32,
// CUBLAS_COMPUTE_32F_PEDANTIC, the only one that promises standard fp32 arithmetic with fp32
// internal storage (plain CUBLAS_COMPUTE_32F only promises "at least fp32 precision", which admits
// TF32 or the BF16x9 emulation newer cuBLAS/GPUs can substitute): the fp32 path is the reference
// the bf16 path is checked against. For bf16, CUBLAS_COMPUTE_32F: tensor cores, fp32 accumulation.
template <typename X> struct BlasType;
template <> struct BlasType<float> {
    static constexpr cudaDataType_t type = CUDA_R_32F;
    static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
};
template <> struct BlasType<bf16> {
    static constexpr cudaDataType_t type = CUDA_R_16BF;
    static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
};
// C (m, n) = A' B' + beta C, column-major, A' = op(A) (m, k), B' = op(B) (k, n); fp32 C.
template <typename X>
static inline void gemm(cublasHandle_t blas, cudaStream_t stream, bool ta, bool tb, int m, int n, int k, const X* A,
                        int lda, const X* B, int ldb, float beta, float* C, int ldc) {
    const float one = 1.0f;
    CUBLAS_CHECK(cublasSetStream(blas, stream));
    CUBLAS_CHECK(cublasGemmEx(blas, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &one, A,
                              BlasType<X>::type, lda, B, BlasType<X>::type, ldb, &beta, C, CUDA_R_32F, ldc,
                              BlasType<X>::compute, CUBLAS_GEMM_DEFAULT));
}
template <typename X>
static inline void matmul_forward_gpu(cublasHandle_t blas, cudaStream_t stream, float* out, const X* inp, const X* w,
                                      const float* b, size_t T, int IC, int OC) {
    if (T == 0 || OC <= 0) return;
    gemm(blas, stream, true, false, OC, blas_dim(T, "T"), IC, w, IC, inp, IC, 0.0f, out, OC);
    if (b) {
        matmul_bias_kernel<<<elementwise_grid(T * OC), 256, 0, stream>>>(out, b, T * OC, OC);
        CUDA_LAUNCHED();
    }
}
#endif

// dinp (T, IC) += dout @ W; dw (OC, IC) += dout^T @ inp; db (OC) += sum_t dout. dinp/db may be null.
// X as in matmul_forward_cpu: fp32 or bf16 operands, fp32 sums into fp32 results.
// The CPU's column sums (a matmul's db, a norm's dw and db, the embedding's backward) take
// CPU_COLUMNS adjacent columns a task and add each column over the rows in order: the rows are read
// along, where one column at a time read a cache line per value (1.5% of a `small` step at 4096
// tokens), and every sum is the same whatever the thread count.
static const int CPU_COLUMNS = 16;

template <typename X>
static inline void matmul_backward_cpu(float* dinp, float* dw, float* db, const X* dout, const X* inp, const X* w,
                                       size_t T, int IC, int OC) {
    if (dinp) gemm_cpu(dinp, IC, dout, OC, 1, w, IC, 1, T, IC, OC);  // (T, OC) @ (OC, IC)
    gemm_cpu(dw, IC, dout, 1, OC, inp, IC, 1, OC, IC, T);            // dout^T (OC, T) @ inp (T, IC)
    if (db) {
#pragma omp parallel for schedule(static)
        for (int o0 = 0; o0 < OC; o0 += CPU_COLUMNS) {
            const int n = std::min(CPU_COLUMNS, OC - o0);
            float bsum[CPU_COLUMNS] = {};
            for (size_t t = 0; t < T; t++)
#pragma omp simd
                for (int o = 0; o < n; o++) bsum[o] += to_f32(dout[t * OC + o0 + o]);
            for (int o = 0; o < n; o++) db[o0 + o] += bsum[o];
        }
    }
}
#ifdef __CUDACC__
// db (OC) += sum_t dout (T, OC): the bsum of matmul_backward_cpu, as a column sum (see COLSUM_ROWS).
template <typename X>
static __global__ void matmul_db_kernel(float* db, const X* dout, size_t T, int OC) {
    __shared__ float part[COLSUM_ROWS][32];
    const int o = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (o < OC)
        for (size_t t = threadIdx.y; t < T; t += COLSUM_ROWS) s += to_f32(dout[t * OC + o]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && o < OC) {
        float tot = 0.0f;
        for (int y = 0; y < COLSUM_ROWS; y++) tot += part[y][threadIdx.x];
        db[o] += tot;
    }
}

// Column-major view as in matmul_forward_gpu (x' = x^T for every row-major array), beta = 1 to
// accumulate:
//   dinp = dout w        ->  dinp' (IC, T) = w' (IC, OC) dout' (OC, T):
//                            gemm(op_N, op_N, m=IC, n=T, k=OC, A=w lda=IC, B=dout ldb=OC, C=dinp ldc=IC)
//   dw = dout^T inp      ->  dw' (IC, OC) = inp' (IC, T) (dout')^T (T, OC):
//                            gemm(op_N, op_T, m=IC, n=OC, k=T, A=inp lda=IC, B=dout ldb=OC, C=dw ldc=IC)
template <typename X>
static inline void matmul_backward_gpu(cublasHandle_t blas, cudaStream_t stream, float* dinp, float* dw, float* db,
                                       const X* dout, const X* inp, const X* w, size_t T, int IC, int OC) {
    if (T == 0 || OC <= 0) return;
    const int Ti = blas_dim(T, "T");
    if (dinp) gemm(blas, stream, false, false, IC, Ti, OC, w, IC, dout, OC, 1.0f, dinp, IC);
    gemm(blas, stream, false, true, IC, OC, Ti, inp, IC, dout, OC, 1.0f, dw, IC);
    if (db) {
        matmul_db_kernel<<<ceil_div(OC, 32), dim3(32, COLSUM_ROWS), 0, stream>>>(db, dout, T, OC);
        CUDA_LAUNCHED();
    }
}
#endif

// ----------------------------------------------------------------------------
// LayerNorm: out = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps). RMSNorm (b == null and
// rms == true): out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps). mean/rstd (T) are saved.

static inline void norm_forward_cpu(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                    const float* b, size_t T, int C, bool rms, float eps) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float* x = inp + t * C;
        double m = 0.0, v = 0.0;
        if (!rms) {
            for (int i = 0; i < C; i++) m += x[i];
            m /= C;
        }
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= C;
        const float s = (float)(1.0 / sqrt(v + eps));
        float* y = out + t * C;
        for (int i = 0; i < C; i++) y[i] = (float)((x[i] - m) * s) * w[i] + (b ? b[i] : 0.0f);
        mean[t] = (float)m;
        rstd[t] = s;
    }
}
#ifdef __CUDACC__
// One warp a row: m = mean(x) (0 for rms), rstd = 1/sqrt(mean((x - m)^2) + eps),
// out = (x - m) rstd w + b. Twin of norm_forward_cpu (which sums in double; float sums of one row
// agree to ~1e-7 relative, and the two-pass variance avoids the E[x^2] - m^2 cancellation).
static __global__ void norm_forward_kernel(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                           const float* b, size_t T, int C, bool rms, float eps) {
    const size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (t >= T) return;  // the whole warp leaves together: t is per warp
    const float* x = inp + t * C;
    float m = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (int i = lane; i < C; i += 32) s += x[i];
        m = warp_sum(s) / C;
    }
    float v = 0.0f;
    for (int i = lane; i < C; i += 32) {
        const float d = x[i] - m;
        v += d * d;
    }
    v = warp_sum(v) / C;
    const float s = 1.0f / sqrtf(v + eps);  // IEEE sqrt and division (not rsqrtf's 2 ulp)
    float* y = out + t * C;
    for (int i = lane; i < C; i += 32) y[i] = (x[i] - m) * s * w[i] + (b ? b[i] : 0.0f);
    if (lane == 0) {
        mean[t] = m;
        rstd[t] = s;
    }
}

static inline void norm_forward_gpu(cudaStream_t stream, float* out, float* mean, float* rstd, const float* inp,
                                    const float* w, const float* b, size_t T, int C, bool rms, float eps) {
    if (T == 0) return;
    const int block = 256, rows_per_block = block / 32;
    norm_forward_kernel<<<ceil_div(T, rows_per_block), block, 0, stream>>>(out, mean, rstd, inp, w, b, T, C, rms,
                                                                             eps);
    CUDA_LAUNCHED();
}
#endif

// dinp (T, C) += ..., dw (C) += ..., db (C) += ... (db null for RMSNorm)
static inline void norm_backward_cpu(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                     const float* w, const float* mean, const float* rstd, size_t T, int C,
                                     bool rms) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float* x = inp + t * C;
        const float* dy = dout + t * C;
        float* dx = dinp + t * C;
        const float m = mean[t], s = rstd[t];
        double dn_mean = 0.0, dn_n = 0.0;  // mean(dnorm), mean(dnorm * norm)
        for (int i = 0; i < C; i++) {
            const float n = (x[i] - m) * s, dn = w[i] * dy[i];
            dn_mean += dn;
            dn_n += dn * n;
        }
        dn_mean = rms ? 0.0 : dn_mean / C;
        dn_n /= C;
        for (int i = 0; i < C; i++) {
            const float n = (x[i] - m) * s, dn = w[i] * dy[i];
            dx[i] += (float)(s * (dn - dn_mean - n * dn_n));
        }
    }
    // dw[i] += sum_t dy[t][i] n[t][i], db[i] += sum_t dy[t][i] (CPU_COLUMNS columns a task)
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < C; i0 += CPU_COLUMNS) {
        const int n = std::min(CPU_COLUMNS, C - i0);
        float gw[CPU_COLUMNS] = {}, gb[CPU_COLUMNS] = {};
        for (size_t t = 0; t < T; t++) {
            const float* dy = dout + t * C + i0;
            const float* x = inp + t * C + i0;
            const float m = mean[t], s = rstd[t];
#pragma omp simd
            for (int i = 0; i < n; i++) {
                gw[i] += dy[i] * (x[i] - m) * s;
                gb[i] += dy[i];
            }
        }
        for (int i = 0; i < n; i++) {
            dw[i0 + i] += gw[i];
            if (db) db[i0 + i] += gb[i];
        }
    }
}
#ifdef __CUDACC__
// One warp a row: n = (x - m) rstd, dn = w dy,
// dinp += rstd (dn - mean(dn) - n mean(dn n))  (mean(dn) taken as 0 for rms). Twin of the row loop
// of norm_backward_cpu.
static __global__ void norm_backward_dinp_kernel(float* dinp, const float* dout, const float* inp, const float* w,
                                                 const float* mean, const float* rstd, size_t T, int C, bool rms) {
    const size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (t >= T) return;  // per warp
    const float* x = inp + t * C;
    const float* dy = dout + t * C;
    float* dx = dinp + t * C;
    const float m = mean[t], s = rstd[t];
    float a = 0.0f, c = 0.0f;  // sum(dn), sum(dn n)
    for (int i = lane; i < C; i += 32) {
        const float n = (x[i] - m) * s, dn = w[i] * dy[i];
        a += dn;
        c += dn * n;
    }
    a = warp_sum(a);
    c = warp_sum(c);
    const float dn_mean = rms ? 0.0f : a / C, dn_n = c / C;
    for (int i = lane; i < C; i += 32) {
        const float n = (x[i] - m) * s, dn = w[i] * dy[i];
        dx[i] += s * (dn - dn_mean - n * dn_n);
    }
}

// dw (C) += sum_t dout (x - mean[t]) rstd[t], db (C) += sum_t dout (db may be null): the column
// loop of norm_backward_cpu, as a column sum (see COLSUM_ROWS).
static __global__ void norm_backward_dwdb_kernel(float* dw, float* db, const float* dout, const float* inp,
                                                 const float* mean, const float* rstd, size_t T, int C) {
    __shared__ float part_w[COLSUM_ROWS][32], part_b[COLSUM_ROWS][32];
    const int i = blockIdx.x * 32 + threadIdx.x;
    float gw = 0.0f, gb = 0.0f;
    if (i < C)
        for (size_t t = threadIdx.y; t < T; t += COLSUM_ROWS) {
            const float dy = dout[t * C + i];
            gw += dy * (inp[t * C + i] - mean[t]) * rstd[t];
            gb += dy;
        }
    part_w[threadIdx.y][threadIdx.x] = gw;
    part_b[threadIdx.y][threadIdx.x] = gb;
    __syncthreads();
    if (threadIdx.y == 0 && i < C) {
        float sw = 0.0f, sb = 0.0f;
        for (int y = 0; y < COLSUM_ROWS; y++) sw += part_w[y][threadIdx.x], sb += part_b[y][threadIdx.x];
        dw[i] += sw;
        if (db) db[i] += sb;
    }
}

static inline void norm_backward_gpu(cudaStream_t stream, float* dinp, float* dw, float* db, const float* dout,
                                     const float* inp, const float* w, const float* mean, const float* rstd,
                                     size_t T, int C, bool rms) {
    if (T == 0 || C <= 0) return;  // nothing to add
    const int block = 256, rows_per_block = block / 32;
    norm_backward_dinp_kernel<<<ceil_div(T, rows_per_block), block, 0, stream>>>(dinp, dout, inp, w, mean, rstd, T,
                                                                                   C, rms);
    CUDA_LAUNCHED();
    norm_backward_dwdb_kernel<<<ceil_div(C, 32), dim3(32, COLSUM_ROWS), 0, stream>>>(dw, db, dout, inp, mean, rstd,
                                                                                     T, C);
    CUDA_LAUNCHED();
}
#endif

// ----------------------------------------------------------------------------
// Activations. GELU (tanh form): out (N) = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))).
// SwiGLU: inp (T, 2F) = [gate | up] per row, out (T, F) = silu(gate) * up.

static inline void gelu_forward_cpu(float* out, const float* inp, size_t N) {
    const float k = 0.7978845608028654f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
}
#ifdef __CUDACC__
// out = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))): twin of gelu_forward_cpu.
static __global__ void gelu_forward_kernel(float* out, const float* inp, size_t N) {
    const float k = 0.7978845608028654f;
    GRID_STRIDE_LOOP(i, N) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
}
static inline void gelu_forward_gpu(cudaStream_t stream, float* out, const float* inp, size_t N) {
    if (N == 0) return;
    gelu_forward_kernel<<<elementwise_grid(N), 256, 0, stream>>>(out, inp, N);
    CUDA_LAUNCHED();
}
#endif
// dinp (N) = gelu'(inp) * dout  (overwrites)
static inline void gelu_backward_cpu(float* dinp, const float* inp, const float* dout, size_t N) {
    const float k = 0.7978845608028654f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        const float x = inp[i], u = k * (x + 0.044715f * x * x * x), th = tanhf(u);
        const float du = k * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
    }
}
#ifdef __CUDACC__
// dinp = gelu'(inp) dout (overwrites): twin of gelu_backward_cpu.
static __global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t N) {
    const float k = 0.7978845608028654f;
    GRID_STRIDE_LOOP(i, N) {
        const float x = inp[i], u = k * (x + 0.044715f * x * x * x), th = tanhf(u);
        const float du = k * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
    }
}
static inline void gelu_backward_gpu(cudaStream_t stream, float* dinp, const float* inp, const float* dout, size_t N) {
    if (N == 0) return;
    gelu_backward_kernel<<<elementwise_grid(N), 256, 0, stream>>>(dinp, inp, dout, N);
    CUDA_LAUNCHED();
}
#endif

// libm's expf, not cpu_exp: cpu_exp vectorizes these loops (about 1.5 ms less a call at medium's
// 1024 x 1024) but moves the last bits, and the default run at seed 1337 (its 64-token stage then
// at lr 3e-3) kept one passkey symbol at chance (58.5% beyond a chunk, not 83%): its trajectory
// was that sensitive (docs/default_run.md).
static inline void swiglu_forward_cpu(float* out, const float* inp, size_t T, int F) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i];
            out[t * F + i] = g / (1.0f + expf(-g)) * u;
        }
}
#ifdef __CUDACC__
// out (T, F) = silu(gate) * up with inp (T, 2F) = [gate | up]: twin of swiglu_forward_cpu.
// One thread per output element j = t F + i.
static __global__ void swiglu_forward_kernel(float* out, const float* inp, size_t T, int F) {
    GRID_STRIDE_LOOP(j, T * F) {
        const size_t t = j / F, i = j - t * F;
        const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i];
        out[j] = g / (1.0f + expf(-g)) * u;
    }
}
static inline void swiglu_forward_gpu(cudaStream_t stream, float* out, const float* inp, size_t T, int F) {
    if (T == 0 || F <= 0) return;
    swiglu_forward_kernel<<<elementwise_grid(T * F), 256, 0, stream>>>(out, inp, T, F);
    CUDA_LAUNCHED();
}
#endif
// dinp (T, 2F) = d[gate | up] (overwrites)
static inline void swiglu_backward_cpu(float* dinp, const float* inp, const float* dout, size_t T, int F) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i], dy = dout[t * F + i];
            const float sg = 1.0f / (1.0f + expf(-g));
            dinp[t * 2 * F + i] = dy * u * sg * (1.0f + g * (1.0f - sg));
            dinp[t * 2 * F + F + i] = dy * g * sg;
        }
}
#ifdef __CUDACC__
// dgate = dy up sig(g) (1 + g (1 - sig(g))), dup = dy silu(g), into dinp (T, 2F) (overwrites):
// twin of swiglu_backward_cpu. One thread per (t, i) writes both halves.
static __global__ void swiglu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t T, int F) {
    GRID_STRIDE_LOOP(j, T * F) {
        const size_t t = j / F, i = j - t * F;
        const float g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i], dy = dout[j];
        const float sg = 1.0f / (1.0f + expf(-g));
        dinp[t * 2 * F + i] = dy * u * sg * (1.0f + g * (1.0f - sg));
        dinp[t * 2 * F + F + i] = dy * g * sg;
    }
}
static inline void swiglu_backward_gpu(cudaStream_t stream, float* dinp, const float* inp, const float* dout, size_t T,
                                       int F) {
    if (T == 0 || F <= 0) return;
    swiglu_backward_kernel<<<elementwise_grid(T * F), 256, 0, stream>>>(dinp, inp, dout, T, F);
    CUDA_LAUNCHED();
}
#endif

// ----------------------------------------------------------------------------
// RoPE, in place on x (T, nh, D) at global positions pos[t], interleaved pairs:
// (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a), a = pos * inv_freq(i). The backward
// is the inverse rotation (sign = -1) applied to the gradient. Angles in double: at position 2M
// the float angle would be off by a tenth of a radian.
//
// inv_freq(i) = theta^(-2i/D), then scaled (RopeParams.scaling, the Config's rope_* fields):
//   ROPE_LINEAR (1): / factor, i.e. position interpolation: positions / factor
//   ROPE_LLAMA3 (2): Llama 3.1's bands (transformers' _compute_llama3_parameters): with the
//     wavelength w = 2 pi / inv_freq and the original context L, w < L / high_freq_factor keeps
//     its frequency, w > L / low_freq_factor is divided by factor, and in between
//     s = (L / w - low) / (high - low) blends them: inv_freq ((1 - s) / factor + s).
// (Hugging Face pairs values i and i + D/2 instead of 2i and 2i + 1; data/hf.py permutes the q
// and k rows of imported weights so that both compute the same thing.)

struct RopeParams {
    double theta;
    int scaling;  // 0 none, 1 linear, 2 llama3 (model.h's RopeScaling)
    double factor, low_freq_factor, high_freq_factor;
    double original_max_pos;
};

// From a model.h Config (a template: ops.cuh comes before Config).
template <typename Cfg>
static inline RopeParams rope_params(const Cfg& c) {
    return {c.rope_theta, c.rope_scaling, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
            (double)c.rope_original_max_pos};
}

// The rotation's angle per position for pair i of D: the same function on the host and the device.
HOST_DEVICE static inline double rope_inv_freq(const RopeParams& p, int i, int D) {
    const double inv = pow(p.theta, -2.0 * i / D);
    if (p.scaling == 1) return inv / p.factor;
    if (p.scaling != 2) return inv;
    const double wavelen = 2.0 * 3.14159265358979323846 / inv;
    const double L = p.original_max_pos;
    if (wavelen < L / p.high_freq_factor) return inv;
    if (wavelen > L / p.low_freq_factor) return inv / p.factor;
    const double s = (L / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor);
    return (1.0 - s) * inv / p.factor + s * inv;
}

// cos a and sin a (rounded to float) of every (t, pair) for one list of positions: the same for q
// and k and for every layer of a step, so the CPU computes them once per list (a chunk's) and keeps
// the lists it used last while their tables fit in ROPE_TABLE_BYTES (the newest one always: the
// memory this takes beyond the run's plan; cos and sin in double in every call were 1-2% of a CPU
// step). The pointer is good until the next call; one caller at a time, as for attention.
struct RopeTable {
    std::vector<int32_t> pos;  // (T) the positions
    RopeParams rp;
    int D;
    std::vector<float> cs;  // (T, D/2, 2) cos a, sin a
};
static const size_t ROPE_TABLE_BYTES = (size_t)64 << 20;
static inline bool rope_same(const RopeParams& a, const RopeParams& b) {
    return a.theta == b.theta && a.scaling == b.scaling && a.factor == b.factor &&
           a.low_freq_factor == b.low_freq_factor && a.high_freq_factor == b.high_freq_factor &&
           a.original_max_pos == b.original_max_pos;
}
static inline const float* rope_table_cpu(const int32_t* pos, size_t T, int D, const RopeParams& rp) {
    static std::vector<RopeTable> tables;  // the most recently used last
    for (size_t n = tables.size(); n-- > 0;) {
        const RopeTable& e = tables[n];
        if (e.D == D && e.pos.size() == T && rope_same(e.rp, rp) &&
            (T == 0 || !memcmp(e.pos.data(), pos, T * sizeof(int32_t)))) {
            std::rotate(tables.begin() + n, tables.begin() + n + 1, tables.end());
            return tables.back().cs.data();
        }
    }
    size_t bytes = T * D * sizeof(float), keep = 0;  // this list's, then the kept ones' from the newest
    for (; keep < tables.size(); keep++) {
        const size_t b = tables[tables.size() - 1 - keep].cs.size() * sizeof(float);
        if (bytes + b > ROPE_TABLE_BYTES) break;
        bytes += b;
    }
    tables.erase(tables.begin(), tables.end() - keep);
    RopeTable e{std::vector<int32_t>(pos, pos + T), rp, D, std::vector<float>(T * D)};
    double inv[256];  // inv_freq(i) for the D/2 <= 256 pairs, the same for every token
    for (int i = 0; i < D / 2; i++) inv[i] = rope_inv_freq(rp, i, D);
    float* cs = e.cs.data();
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < D / 2; i++) {
            const double a = (double)pos[t] * inv[i];
            cs[(t * (D / 2) + i) * 2] = (float)cos(a);
            cs[(t * (D / 2) + i) * 2 + 1] = (float)sin(a);
        }
    tables.push_back(std::move(e));
    return tables.back().cs.data();
}
static inline void rope_cpu(float* x, const int32_t* pos, size_t T, int nh, int D, RopeParams rp, int sign) {
    const float* cs = rope_table_cpu(pos, T, D, rp);  // (T, D/2, 2)
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (int i = 0; i < D / 2; i++) {
            const float c = cs[(t * (D / 2) + i) * 2], s = sign * cs[(t * (D / 2) + i) * 2 + 1];
            for (int h = 0; h < nh; h++) {
                float* p = x + (t * nh + h) * D + 2 * i;
                const float x0 = p[0], x1 = p[1];
                p[0] = x0 * c - x1 * s;
                p[1] = x0 * s + x1 * c;
            }
        }
}
#ifdef __CUDACC__
// (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), c = cos a, s = sign sin a, a = pos[t] inv_freq(i), all
// heads of token t: twin of rope_cpu. One thread per (t, i) pair; the angle in double exactly as
// the CPU computes it (rope_inv_freq), then rounded to float.
static __global__ void rope_kernel(float* x, const int32_t* pos, size_t T, int nh, int D, RopeParams rp, int sign) {
    const int half = D / 2;
    GRID_STRIDE_LOOP(j, T * half) {
        const size_t t = j / half;
        const int i = (int)(j - t * half);
        const double a = (double)pos[t] * rope_inv_freq(rp, i, D);
        double sn, cs;
        sincos(a, &sn, &cs);
        const float c = (float)cs, s = (float)(sign * sn);
        for (int h = 0; h < nh; h++) {
            float* p = x + (t * nh + h) * D + 2 * i;
            const float x0 = p[0], x1 = p[1];
            p[0] = x0 * c - x1 * s;
            p[1] = x0 * s + x1 * c;
        }
    }
}
static inline void rope_gpu(cudaStream_t stream, float* x, const int32_t* pos, size_t T, int nh, int D, RopeParams rp,
                            int sign) {
    if (T == 0 || D < 2 || nh <= 0) return;
    rope_kernel<<<elementwise_grid(T * (D / 2)), 256, 0, stream>>>(x, pos, T, nh, D, rp, sign);
    CUDA_LAUNCHED();
}
#endif

// ----------------------------------------------------------------------------
// Embedding: out (T, C) = wte[tok[t]]. Backward: dwte[tok[t]] += dout[t], parallel over columns
// (CPU_COLUMNS a task) so repeated tokens never race.

static inline void embedding_forward_cpu(float* out, const int32_t* tok, const float* wte, size_t T, int C) {
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) memcpy(out + t * C, wte + (size_t)tok[t] * C, C * sizeof(float));
}
#ifdef __CUDACC__
// out (T, C) = wte[tok[t]], one thread per element: twin of embedding_forward_cpu.
static __global__ void embedding_forward_kernel(float* out, const int32_t* tok, const float* wte, size_t T, int C) {
    GRID_STRIDE_LOOP(j, T * C) {
        const size_t t = j / C, i = j - t * C;
        out[j] = wte[(size_t)tok[t] * C + i];
    }
}
static inline void embedding_forward_gpu(cudaStream_t stream, float* out, const int32_t* tok, const float* wte,
                                         size_t T, int C) {
    if (T == 0 || C <= 0) return;
    embedding_forward_kernel<<<elementwise_grid(T * C), 256, 0, stream>>>(out, tok, wte, T, C);
    CUDA_LAUNCHED();
}
#endif

static inline void embedding_backward_cpu(float* dwte, const int32_t* tok, const float* dout, size_t T, int C) {
#pragma omp parallel for schedule(static)  // CPU_COLUMNS columns a task, each in t order
    for (int i0 = 0; i0 < C; i0 += CPU_COLUMNS) {
        const int n = std::min(CPU_COLUMNS, C - i0);
        for (size_t t = 0; t < T; t++) {
            float* row = dwte + (size_t)tok[t] * C + i0;
            const float* d = dout + t * C + i0;
#pragma omp simd
            for (int i = 0; i < n; i++) row[i] += d[i];
        }
    }
}
#ifdef __CUDACC__
// dwte[tok[t]][i] += dout[t][i] for t = 0..T-1 in order, one thread per column i: twin of
// embedding_backward_cpu. Repeated tokens hit the same row from the same thread, so there is no
// race, and the additions happen in the CPU's order: the result is bitwise the CPU's.
static __global__ void embedding_backward_kernel(float* dwte, const int32_t* tok, const float* dout, size_t T, int C) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    for (size_t t = 0; t < T; t++) dwte[(size_t)tok[t] * C + i] += dout[t * C + i];
}
static inline void embedding_backward_gpu(cudaStream_t stream, float* dwte, const int32_t* tok, const float* dout,
                                          size_t T, int C) {
    if (T == 0 || C <= 0) return;
    embedding_backward_kernel<<<ceil_div(C, 128), 128, 0, stream>>>(dwte, tok, dout, T, C);
    CUDA_LAUNCHED();
}
#endif

// out (N) += inp (N)
static inline void add_inplace_cpu(float* out, const float* inp, size_t N) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) out[i] += inp[i];
}
#ifdef __CUDACC__
// out (N) += inp (N): twin of add_inplace_cpu.
static __global__ void add_inplace_kernel(float* out, const float* inp, size_t N) {
    GRID_STRIDE_LOOP(i, N) out[i] += inp[i];
}
static inline void add_inplace_gpu(cudaStream_t stream, float* out, const float* inp, size_t N) {
    if (N == 0) return;
    add_inplace_kernel<<<elementwise_grid(N), 256, 0, stream>>>(out, inp, N);
    CUDA_LAUNCHED();
}
#endif

// The whole model on the GPU against the CPU backend (the specification), and the GPU's own
// chunked + offloaded schedule against its unchunked run; the Ulysses packing kernels; and the
// program on the GPU (./fpdt, mpirun): against the CPU, ranks sharing the GPU, ZeRO 1-3, replicated
// kv heads, the trace, bf16 at a realistic size, and the race stress at a realistic size
// (GpuStress). Skipped where there is no GPU (failed with FPDT_EXPECT_GPU set).
#include <gtest/gtest.h>
#include <cmath>
#include <fstream>
#include "schedule.h"
#include "test/cli.h"
#include "test/fixture.h"
#include "test/gpu_testutil.cuh"
#include "test/testutil.h"

struct GpuOnce {  // one set of streams and a cuBLAS handle for the whole test program
    GpuCtx g;
    GpuOnce() {
        CUDA_CHECK(cudaSetDevice(0));
        CUDA_CHECK(cudaStreamCreateWithFlags(&g.compute, cudaStreamNonBlocking));
        CUDA_CHECK(cudaStreamCreateWithFlags(&g.h2d, cudaStreamNonBlocking));
        CUDA_CHECK(cudaStreamCreateWithFlags(&g.d2h, cudaStreamNonBlocking));
        CUDA_CHECK(cudaStreamCreateWithFlags(&g.comm, cudaStreamNonBlocking));
        CUBLAS_CHECK(cublasCreate(&g.blas));
    }
};
static GpuCtx* gpu() {
    static GpuOnce once;
    return &once.g;
}

// What one pass reads: the weights (n_params) and the global sequence's tokens and targets (S).
struct PassInput {
    std::vector<float> w;
    std::vector<int32_t> tokens, targets;
};

// Loss and the full gradient of one pass, on either backend.
static float run_pass(const PassInput& in, const Config& cfg, size_t seq, size_t chunk, bool offload, bool on_gpu,
                      std::vector<float>* grads, bool bf16 = false) {
    Model M;
    if (on_gpu) M.ctx.gpu = true, M.ctx.g = gpu();
    RunCfg r;
    r.seq = seq, r.chunk = chunk, r.offload = offload, r.bf16 = bf16;
    model_create(&M, cfg, r, false);
    std::vector<float> w(M.n_padded, 0.0f);
    std::copy(in.w.begin(), in.w.end(), w.begin());
    dev_upload(&M.ctx, M.params, w.data(), w.size() * 4);
    model_set_token_arrays(&M, in.tokens.data(), in.targets.data());
    const float loss = model_forward_backward(&M, true);
    grads->resize(M.n_padded);
    dev_download(&M.ctx, grads->data(), M.grads, M.n_padded * 4);
    model_free(&M);
    return loss;
}

// The fixture's weights and tokens.
static PassInput fixture_input(const Fixture& fx, const Config& cfg) {
    PassInput in;
    size_t n = 0;
    const std::vector<ParamInfo> table = param_table(cfg, &n);
    in.w.resize(n);
    for (const ParamInfo& p : table) {
        const std::vector<float>& v = fx.find("param." + p.name)->f;
        std::copy(v.begin(), v.begin() + p.numel(), in.w.begin() + p.offset);
    }
    in.tokens = fx.find("tokens")->i, in.targets = fx.find("targets")->i;
    return in;
}

// Weights as a run starts them (model_init_params, on the CPU backend) and S + 1 random tokens.
static PassInput random_input(const Config& cfg, size_t S, uint64_t seed) {
    Model M;
    RunCfg r;
    r.seq = S;
    model_create(&M, cfg, r, false);
    model_init_params(&M, seed);
    PassInput in;
    in.w.assign(M.params, M.params + M.n_params);
    model_free(&M);
    Rng rng{seed};
    for (size_t t = 0; t <= S; t++) in.tokens.push_back((int32_t)(rng_u64(&rng) % (uint64_t)cfg.vocab));
    in.targets.assign(in.tokens.begin() + 1, in.tokens.end());
    in.tokens.pop_back();
    return in;
}

// A PyTorch fixture (test/make_reference.py): weights, tokens, its model's config and length S.
static bool load_fixture(const char* name, Fixture* fx, Config* cfg, size_t* S) {
    std::string err;
    const bool ok = fixture_load(std::string("test/fixtures/") + name, fx, &err);
    EXPECT_TRUE(ok) << err;
    if (!ok || !fx->find("config") || !fx->find("config_f")) return false;
    const std::vector<int32_t>& v = fx->find("config")->i;
    *cfg = Config{"", v[0], v[1], v[2], v[3], v[4], v[5], v[6], fx->find("config_f")->f[0], fx->find("config_f")->f[1], ""};
    snprintf(cfg->name, sizeof cfg->name, "%s", name);
    *S = v[7];
    return true;
}

class GpuModel : public ::testing::TestWithParam<const char*> {};

// fp32 on both sides; cuBLAS and the GPU reductions sum in other orders than the CPU loops, which
// moves results by ~1e-6 relative per op; 1e-4 over two layers and the backward pass.
TEST_P(GpuModel, LossAndGradientsMatchTheCpu) {
    REQUIRE_GPU();
    Fixture fx;
    Config cfg;
    size_t S;
    ASSERT_TRUE(load_fixture(GetParam(), &fx, &cfg, &S));
    const PassInput in = fixture_input(fx, cfg);
    std::vector<float> gc, gg, go;
    const float lc = run_pass(in, cfg, S, 0, false, false, &gc);
    const float lg = run_pass(in, cfg, S, 0, false, true, &gg);
    EXPECT_NEAR(lg, lc, 1e-5 * fabs(lc));
    EXPECT_LT(rel_err(gg, gc), 1e-4);
    // the chunked, offloaded schedule on the GPU (streams, events, pinned host store)
    for (int u : {2, 4, 8}) {
        const float lo = run_pass(in, cfg, S, S / u, true, true, &go);
        EXPECT_NEAR(lo, lg, 1e-5 * fabs(lg)) << u << " chunks";
        EXPECT_LT(rel_err(go, gg), 1e-5) << u << " chunks";
    }
}
// bf16 on both sides. The rounding is the same integer arithmetic on both (bit for bit, see the
// op tests), but cuBLAS's tensor cores sum in another order than the CPU loops, and a value next to
// a rounding boundary then lands on the neighbouring bf16 and the change spreads (see
// Reference.Bf16OffloadIsExactAndChunkingWithinBf16Rounding in test_model.cpp): GPU and CPU bf16
// are held to bf16's own bounds, 1e-3 on the loss and 3e-2 on the gradients, which a wrong operand
// layout or type misses by orders of magnitude. On the GPU itself, offload moves bf16 copies of
// values already rounded, through the copy streams' narrowing and widening, and must change
// nothing: the offloaded run equals the resident run at the same chunking (1e-6 stands for
// "identical": a single flipped rounding would show as ~1e-3).
TEST_P(GpuModel, Bf16LossAndGradientsMatchTheCpuBf16) {
    REQUIRE_GPU();
    Fixture fx;
    Config cfg;
    size_t S;
    ASSERT_TRUE(load_fixture(GetParam(), &fx, &cfg, &S));
    const PassInput in = fixture_input(fx, cfg);
    std::vector<float> gc, gg, ga, gb;
    const float lc = run_pass(in, cfg, S, 0, false, false, &gc, true);
    const float lg = run_pass(in, cfg, S, 0, false, true, &gg, true);
    EXPECT_NEAR(lg, lc, 1e-3 * fabs(lc));
    EXPECT_LT(rel_err(gg, gc), 3e-2);
    for (int u : {2, 4, 8}) {
        const float la = run_pass(in, cfg, S, S / u, false, true, &ga, true);
        const float lb = run_pass(in, cfg, S, S / u, true, true, &gb, true);
        EXPECT_NEAR(lb, la, 1e-6 * fabs(la)) << u << " chunks";
        EXPECT_LT(rel_err(gb, ga), 1e-6) << u << " chunks";
        EXPECT_LT(rel_err(gb, gg), 3e-2) << u << " chunks";
    }
}
INSTANTIATE_TEST_SUITE_P(Families, GpuModel, ::testing::Values("ref_llama_tiny.bin", "ref_gpt_tiny.bin"));

// The program on the GPU: a few steps print the CPU run's losses, and two ranks sharing the GPU
// (host-staged MPI) print the single rank's. fp32: to 1e-4 against the CPU (summation order, as
// in LossAndGradientsMatchTheCpu) and 1e-5 between rank counts (only the all-reduce order). bf16
// (the GPU's default): 1e-3 for both, since a sum in another order can flip a bf16 rounding that
// then spreads (Bf16LossAndGradientsMatchTheCpuBf16, Mpi.Bf16SameLossesAsOneProcess).
TEST(GpuTrain, StepsMatchTheCpuAndTwoRanksShareTheGpu) {
    REQUIRE_GPU();
    struct Prec {
        const char* name;
        double vs_cpu, vs_ranks;
    };
    for (const Prec& p : {Prec{"fp32", 1e-4, 1e-5}, Prec{"bf16", 1e-3, 1e-3}}) {
        const std::string args = std::string("./fpdt train --eval-every 0 --model tiny --seq 256 --chunk-size 64 "
                                             "--offload 1 --steps 5 --precision ") + p.name;
        Out cpu = run(args + " --device cpu"), gpu1 = run(args + " --device gpu");
        Out gpu2 = run(mpirun(2) + args + " --device gpu");
        ASSERT_EQ(gpu1.rc, 0) << gpu1.out;
        ASSERT_EQ(gpu2.rc, 0) << gpu2.out;
        std::vector<double> lc = losses(cpu.out), l1 = losses(gpu1.out), l2 = losses(gpu2.out);
        ASSERT_EQ(lc.size(), 5u) << cpu.out;
        ASSERT_EQ(l1.size(), 5u);
        ASSERT_EQ(l2.size(), 5u);
        for (size_t i = 0; i < 5; i++) {
            EXPECT_NEAR(l1[i], lc[i], p.vs_cpu * lc[i]) << p.name << " step " << i + 1;
            EXPECT_NEAR(l2[i], l1[i], p.vs_ranks * l1[i]) << p.name << " step " << i + 1;
        }
    }
}

// Head sizes of real models (the fixtures' are 8 and 16) through the whole model: 64 and 128 run
// the attention kernels with 2 and 4 values per lane and larger tiles, in both families, with GQA
// and with one kv head, against the CPU (the bounds of LossAndGradientsMatchTheCpu and
// Bf16LossAndGradientsMatchTheCpuBf16), and chunked + offloaded on the GPU against its unchunked run.
TEST(GpuModelHeads, HeadSize64And128MatchTheCpu) {
    REQUIRE_GPU();
    const Config cfgs[] = {
        {"llama-d64", LLAMA, 2, 256, 4, 2, 512, 260, 10000.0f, 1e-5f, "head size 64, GQA"},
        {"gpt-d128", GPT, 2, 256, 2, 2, 1024, 260, 10000.0f, 1e-5f, "head size 128"},
        {"llama-d128", LLAMA, 2, 512, 4, 1, 1024, 260, 500000.0f, 1e-5f, "head size 128, one kv head"},
    };
    const size_t S = 256;
    for (const Config& cfg : cfgs) {
        SCOPED_TRACE(cfg.name);
        const PassInput in = random_input(cfg, S, 31);
        std::vector<float> gc, gg, go, gc16, gg16;
        const float lc = run_pass(in, cfg, S, 0, false, false, &gc);
        const float lg = run_pass(in, cfg, S, 0, false, true, &gg);
        EXPECT_NEAR(lg, lc, 1e-5 * fabs(lc));
        EXPECT_LT(rel_err(gg, gc), 1e-4);
        const float lo = run_pass(in, cfg, S, S / 4, true, true, &go);
        EXPECT_NEAR(lo, lg, 1e-5 * fabs(lg));
        EXPECT_LT(rel_err(go, gg), 1e-5);
        const float lc16 = run_pass(in, cfg, S, 0, false, false, &gc16, true);
        const float lg16 = run_pass(in, cfg, S, 0, false, true, &gg16, true);
        EXPECT_NEAR(lg16, lc16, 1e-3 * fabs(lc16));
        EXPECT_LT(rel_err(gg16, gc16), 3e-2);
    }
}

// The Ulysses packing kernels against their CPU twins (ulysses.h), exactly (they copy, round to
// bf16 the same way, and sum replicated kv heads' gradients in rank order): query heads split
// over the ranks, kv heads split (Hkv >= P) and replicated (Hkv < P, one kv head read by two
// ranks), on fp32 and bf16 wires.
TEST(GpuA2a, PackAndUnpackMatchTheCpu) {
    REQUIRE_GPU();
    struct Case {
        int H, Hkv, P, D;
        size_t cl;
    };
    cudaStream_t s = gpu()->compute;
    Rng r{404};
    for (const Case& c : {Case{4, 2, 4, 16, 9}, Case{8, 8, 2, 64, 33}, Case{6, 2, 2, 32, 17}, Case{8, 1, 4, 128, 5}}) {
        const int Hl = c.H / c.P, Hkvl = c.Hkv >= c.P ? c.Hkv / c.P : 1, cols = (c.H + 2 * c.Hkv) * c.D;
        for (bool kv : {false, true}) {
            SCOPED_TRACE(::testing::Message() << "H " << c.H << " Hkv " << c.Hkv << " P " << c.P << " D " << c.D << " kv " << kv);
            const int nh = kv ? Hkvl : Hl, first = kv ? c.H : 0, nheads = kv ? c.Hkv : c.H;
            const size_t n = (size_t)c.P * c.cl * nh * c.D;
            const std::vector<float> src = randn(&r, c.cl * cols), recv = randn(&r, n), dst0 = randn(&r, c.cl * cols);
            // pack, fp32 and bf16 wires
            std::vector<float> send(n);
            a2a_pack_cpu(send.data(), src.data(), cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            DevBuf<float> d_src(src), d_send(randn(&r, n));
            a2a_pack_gpu(s, d_send.p, d_src.p, cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            EXPECT_EQ(d_send.get(), send);
            std::vector<bf16> send16(n);
            a2a_pack_cpu(send16.data(), src.data(), cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            DevBuf<bf16> d_send16(std::vector<bf16>(n, 0x7fc0));
            a2a_pack_gpu(s, d_send16.p, d_src.p, cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            EXPECT_EQ(d_send16.get(), send16);
            // unpack: adds to what dst holds (every head of this kind is read at least once)
            std::vector<float> dst = dst0;
            a2a_unpack_cpu(dst.data(), recv.data(), cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            DevBuf<float> d_dst(dst0), d_recv(recv);
            a2a_unpack_gpu(s, d_dst.p, d_recv.p, cols, first, kv, nh, c.cl, c.D, Hl, Hkvl, c.H, c.Hkv, c.P);
            EXPECT_EQ(d_dst.get(), dst);
            EXPECT_NE(dst, dst0) << nheads << " heads: the unpack added nothing";
        }
    }
}

// ----------------------------------------------------------------------------
// The program on the GPU (./fpdt, mpirun), as a run uses it.

// "loss X | ... | norm Y" of every step line: the loss to 6 decimals and the gradient norm to 6
// significant digits, as printed.
static std::vector<std::string> loss_and_norm(const std::string& out) {
    std::vector<std::string> v;
    for (const std::string& line : loss_lines(out)) {
        const size_t a = out.find(line), n = out.find("| norm ", a), e = out.find(" |", n + 7);
        v.push_back(line.substr(line.find("loss ")) + " " + out.substr(n, e - n));
    }
    return v;
}

// ZeRO 1-3 on the GPU: zero.h's event paths (gathers and reduce-scatters on the communication
// stream, compute waiting on their events). On one rank every gather and reduce-scatter is a copy,
// so each stage computes what --zero 0 does in the same order: the same losses and norms to the
// printed digits (as on the CPU). Two ranks sharing the GPU (host staging and MPI) print the
// single rank's losses to 1e-5 (fp32; only the order of the sums across ranks differs).
TEST(GpuTrain, ZeroStagesMatchZeroOff) {
    REQUIRE_GPU();
    const std::string base = "./fpdt train --device gpu --eval-every 0 --model tiny --seq 256 --chunk-size 64 "
                             "--offload 1 --steps 4 --precision fp32";
    Out ref = run(base);
    ASSERT_EQ(ref.rc, 0) << ref.out;
    const std::vector<std::string> want = loss_and_norm(ref.out);
    ASSERT_EQ(want.size(), 4u) << ref.out;
    for (int z : {1, 2, 3}) {
        Out r = run(base + " --zero " + std::to_string(z));
        ASSERT_EQ(r.rc, 0) << r.out;
        EXPECT_EQ(loss_and_norm(r.out), want) << "--zero " << z << "\n" << r.out;
    }
    for (int z : {2, 3}) {
        Out two = run(mpirun(2) + base + " --zero " + std::to_string(z));
        ASSERT_EQ(two.rc, 0) << two.out;
        const std::vector<double> l = losses(two.out), l1 = losses(ref.out);
        ASSERT_EQ(l.size(), 4u) << two.out;
        for (size_t i = 0; i < 4; i++) EXPECT_NEAR(l[i], l1[i], 1e-5 * l1[i]) << "2 ranks --zero " << z << " step " << i + 1;
    }
}

// Replicated kv heads (Hkv < P): tiny has 2 kv heads, so with 4 ranks each kv head goes to two
// ranks (the pack kernel) and their gradients come back summed (the unpack kernel). Four ranks
// sharing the GPU print the single rank's losses (fp32, 1e-5; the sums across ranks in another order).
TEST(GpuTrain, ReplicatedKvHeadsOnFourRanks) {
    REQUIRE_GPU();
    const std::string args = "./fpdt train --device gpu --eval-every 0 --model tiny --seq 256 --chunk-size 64 "
                             "--offload 1 --steps 3 --precision fp32";
    Out one = run(args), four = run(mpirun(4) + args);
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(four.rc, 0) << four.out;
    const std::vector<double> l1 = losses(one.out), l4 = losses(four.out);
    ASSERT_EQ(l1.size(), 3u) << one.out;
    ASSERT_EQ(l4.size(), 3u) << four.out;
    for (size_t i = 0; i < 3; i++) EXPECT_NEAR(l4[i], l1[i], 1e-5 * l1[i]) << "step " << i + 1;
    // the free-memory check divided the GPU among the four, and the check after step 1 counts all four
    EXPECT_NE(four.out.find("outside it "), std::string::npos) << four.out;
    EXPECT_NE(four.out.find(" for the 4 ranks on this GPU"), std::string::npos) << four.out;
}

// --trace on the GPU: the events carry the GPU's own times (CUDA events on each operation's
// stream): all four tracks are there, every event lies within the step (from its origin, ending
// after it starts), and the host store's copies run beside the compute, so some copy-in overlaps
// some compute event in time (on the CPU backend nothing overlaps). And the run's check after its
// first step: what CUDA, cuBLAS and the rest allocated outside the arena, within the headroom kept.
TEST(GpuTrain, TraceHasTheGpuTimesAndCopiesOverlapCompute) {
    REQUIRE_GPU();
    const std::string t = tmpdir() + "/t.json";
    Out r = run("./fpdt train --device gpu --eval-every 0 --model small --seq 4096 --chunk-size 1024 --offload 1 --steps 3 "
                "--trace " + t);
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_GE(number_after(r.out, "memory after step 1 (GPU): arena "), 0) << r.out;
    EXPECT_EQ(r.out.find("MORE than the headroom kept"), std::string::npos) << r.out;
    const std::vector<TraceOp> ev = read_trace(t);
    ASSERT_GT(ev.size(), 50u) << r.out;
    int per_track[N_TRACKS] = {0}, overlaps = 0;
    double end = 0;
    for (const TraceOp& e : ev) {
        ASSERT_GE(e.track, 0);
        ASSERT_LT(e.track, N_TRACKS);
        per_track[e.track]++;
        EXPECT_GE(e.ts, 0.0);
        EXPECT_GE(e.dur, 0.0);
        end = std::max(end, e.ts + e.dur);
    }
    for (int k = 0; k < N_TRACKS; k++) EXPECT_GT(per_track[k], 0) << track_names[k];
    for (const TraceOp& c : ev)
        if (c.track == TRACK_COPY_IN)
            for (const TraceOp& m : ev)
                if (m.track == TRACK_COMPUTE && c.ts < m.ts + m.dur && m.ts < c.ts + c.dur) overlaps++;
    EXPECT_GT(overlaps, 0) << "no copy-in ran beside compute";
    printf("trace: %zu events over %.1f ms, %d copy-in/compute overlaps\n", ev.size(), end / 1e3, overlaps);
}

// bf16 at a realistic size (medium: d 384, head size 64; 4096 tokens in 4 offloaded chunks of
// 1024, matmuls of 1024 rows, where cuBLAS takes its tensor-core kernels): the GPU's bf16 losses
// are the CPU's bf16 emulation's within bf16's bound (1e-3, as in
// Bf16LossAndGradientsMatchTheCpuBf16), and they are not the fp32 losses.
TEST(GpuTrain, Bf16AtARealisticSizeMatchesTheCpu) {
    REQUIRE_GPU();
    const std::string args = "./fpdt train --eval-every 0 --model medium --seq 4096 --chunk-size 1024 --offload 1 --steps 2 --precision ";
    Out gpu16 = run(args + "bf16 --device gpu"), cpu16 = run(args + "bf16 --device cpu"), gpu32 = run(args + "fp32 --device gpu");
    ASSERT_EQ(gpu16.rc, 0) << gpu16.out;
    ASSERT_EQ(cpu16.rc, 0) << cpu16.out;
    ASSERT_EQ(gpu32.rc, 0) << gpu32.out;
    const std::vector<double> g = losses(gpu16.out), c = losses(cpu16.out), f = losses(gpu32.out);
    ASSERT_EQ(g.size(), 2u) << gpu16.out;
    ASSERT_EQ(c.size(), 2u) << cpu16.out;
    ASSERT_EQ(f.size(), 2u) << gpu32.out;
    for (size_t i = 0; i < 2; i++) EXPECT_NEAR(g[i], c[i], 1e-3 * c[i]) << "step " << i + 1;
    EXPECT_NE(g[0], f[0]) << "bf16 printed the fp32 loss";
    EXPECT_NEAR(g[0], f[0], 1e-2 * f[0]);
}

// Stream races at a realistic size (issue 23): the fixtures' copies are a few KB and finish in
// microseconds, so a missing event wait goes unseen there. Here medium (6 layers, d 384) trains on
// 32768 tokens in 8 chunks of 4096 (a q or dO chunk is 6 MiB, a layer's store of them 48 MiB each),
// 3 steps, with the host store on and off, and on with --zero 3 on one rank (every layer's weights
// gathered on the communication stream and its gradients reduce-scattered there, compute waiting
// on their events). All three compute the same numbers in the same order, so they print the same
// losses and gradient norms to the last digit; a copy that lands late, or a slot overwritten
// before its copy-out has read it, changes them. In bf16 (the GPU's default: the copy streams
// also narrow and widen) and in fp32 (offload on and off).
TEST(GpuStress, OffloadAndZero3PrintTheSameLossesAtRealisticSize) {
    REQUIRE_GPU();
    const std::string base = "./fpdt train --device gpu --eval-every 0 --model medium --seq 32768 --chunk-size 4096 "
                             "--steps 3 --seed 5";
    struct Leg {
        std::string flags;
        bool fp32;
    };
    std::vector<std::string> want[2];
    for (const Leg& leg : {Leg{"--offload 1", false}, Leg{"--offload 0", false}, Leg{"--offload 1 --zero 3", false},
                           Leg{"--offload 1", true}, Leg{"--offload 0", true}}) {
        const double t0 = now_s();
        Out r = run(base + " " + leg.flags + " --precision " + (leg.fp32 ? "fp32" : "bf16"));
        ASSERT_EQ(r.rc, 0) << leg.flags << "\n" << r.out;
        const std::vector<std::string> got = loss_and_norm(r.out);
        ASSERT_EQ(got.size(), 3u) << r.out;
        if (want[leg.fp32].empty()) want[leg.fp32] = got;
        EXPECT_EQ(got, want[leg.fp32]) << leg.flags << (leg.fp32 ? " fp32" : " bf16") << "\n" << r.out;
        printf("%s %s: %s ... %s (%.1f s)\n", leg.flags.c_str(), leg.fp32 ? "fp32" : "bf16", got[0].c_str(),
               got[2].c_str(), now_s() - t0);
    }
}

// Replicas x sequence-parallel groups on the GPU (--sp, --batch): the losses of one GPU process
// with the same --batch, fp32 to 1e-5 (only the order of sums differs). Two ranks sharing this
// GPU as two replicas (MPI through host memory, ZeRO-2 over both); with 4 GPUs or more, 4 ranks
// as 2 groups of 2 over NCCL: a world communicator for the gradients and the ZeRO collectives and
// one per group for the all-to-alls (comm.h).
TEST(GpuTrain, ReplicasAndGroupsPrintOneGpusLosses) {
    REQUIRE_GPU();
    const std::string args = "./fpdt train --device gpu --eval-every 0 --model tiny --seq 256 --chunk-size 64 --offload 1 "
                             "--steps 3 --precision fp32 --batch 2";
    Out one = run(args);
    ASSERT_EQ(one.rc, 0) << one.out;
    std::vector<double> ref = losses(one.out);
    ASSERT_EQ(ref.size(), 3u) << one.out;
    std::vector<std::string> layouts = {mpirun(2) + args + " --sp 1 --zero 2"};
    int gpus = 0;
    CUDA_CHECK(cudaGetDeviceCount(&gpus));
    if (gpus >= 4) layouts.push_back(mpirun(4) + args + " --sp 2 --zero 1");
    for (const std::string& cmd : layouts) {
        Out r = run(cmd);
        ASSERT_EQ(r.rc, 0) << cmd << "\n" << r.out;
        if (cmd.find("-np 4") != std::string::npos) EXPECT_NE(r.out.find(" NCCL (2 replicas x sp 2)"), std::string::npos) << r.out;
        std::vector<double> l = losses(r.out);
        ASSERT_EQ(l.size(), 3u) << r.out;
        for (size_t i = 0; i < 3; i++) EXPECT_NEAR(l[i], ref[i], 1e-5 * ref[i]) << cmd << " step " << i + 1;
    }
}

// Run under mpirun (test/test_mpi.cpp does): the Ulysses all-to-all layout across real MPI
// processes. Every value encodes (global token, qkv column), so the heads layout can be checked
// element by element, and the way back must reproduce the input exactly (kv heads replicated on
// several ranks come back summed, once per replica). In bf16 mode the values travel as bf16, so
// they are chosen exact in bf16 (consecutive bf16 values from 1.0 up) and sent 2^-10 too large,
// less than half a bf16 ulp: they must arrive rounded back to the codes, which an fp32 wire would
// not do.
#include <gtest/gtest.h>
#include "schedule.h"
#include "test/reference.h"
#include "test/testutil.h"

static void check_layout(const char* name, bool b16) {
    const Comm& cm = comm_world();
    RunCfg r;
    r.seq = 64, r.chunk = 16, r.P = cm.size, r.rank = cm.rank, r.bf16 = b16;
    Model M;
    model_create(&M, *find_preset(name), r, false);
    const int H = M.cfg.n_head, Hkv = M.cfg.n_kv_head, D = M.D, Q3 = M.Q3;
    const int replicas = Hkv >= cm.size ? 1 : cm.size / Hkv;
    for (int c = 0; c < M.u; c++) {
        auto value = [&](size_t g, int col) {  // distinct, and exact in fp32 (and in bf16: 0x3f80 + 64 * 192 < inf)
            return b16 ? bf16_to_float((bf16)(0x3f80 + g * Q3 + col)) : (float)(g * 1000 + col);
        };
        for (size_t t = 0; t < M.cl; t++)
            for (int col = 0; col < Q3; col++)
                M.qkv[t * Q3 + col] = value(c * M.C + cm.rank * M.cl + t, col) * (b16 ? 1.0f + 0x1p-10f : 1.0f);
        std::vector<float> q(M.C * M.Hl * D), k(M.C * M.Hkvl * D), v(M.C * M.Hkvl * D);
        qkv_to_heads(&M, c, M.qkv, q.data(), k.data(), v.data());
        for (size_t tt = 0; tt < M.C; tt++)
            for (int e = 0; e < D; e++) {
                for (int m = 0; m < M.Hl; m++)
                    ASSERT_EQ(q[(tt * M.Hl + m) * D + e], value(c * M.C + tt, q_head(&M, cm.rank, m) * D + e));
                for (int m = 0; m < M.Hkvl; m++) {
                    ASSERT_EQ(k[(tt * M.Hkvl + m) * D + e], value(c * M.C + tt, (H + kv_head(&M, cm.rank, m)) * D + e));
                    ASSERT_EQ(v[(tt * M.Hkvl + m) * D + e],
                              value(c * M.C + tt, (H + Hkv + kv_head(&M, cm.rank, m)) * D + e));
                }
            }
        std::vector<float> back(M.cl * Q3, -1.0f);  // dqkv_to_seq overwrites it
        dqkv_to_seq(&M, c, q.data(), k.data(), v.data(), back.data());
        for (size_t t = 0; t < M.cl; t++)
            for (int col = 0; col < Q3; col++)
                ASSERT_EQ(back[t * Q3 + col], value(c * M.C + cm.rank * M.cl + t, col) * (col < H * D ? 1 : replicas))
                    << t << " " << col;
    }
    model_free(&M);
}

TEST(Ulysses, LayoutRoundTripsLlamaGQA) { check_layout("tiny", false); }
TEST(Ulysses, LayoutRoundTripsGpt) { check_layout("gpt-tiny", false); }
TEST(Ulysses, LayoutRoundTripsLlamaGQAOnABf16Wire) { check_layout("tiny", true); }
TEST(Ulysses, LayoutRoundTripsGptOnABf16Wire) { check_layout("gpt-tiny", true); }

// Packed documents across real ranks (this job's P = 2 or 4): the PyTorch fixture's loss and every
// gradient (summed over the ranks), in chunks of 8 (rank slices of 4 or 2 tokens: the documents
// cross rank and chunk boundaries), offloaded or not, within test_model.cpp's fp32 bound. Every
// rank finds the BOS tokens among its own tokens; the all-gather gives each the same starts.
static void check_docs(const char* file) {
    const Comm& cm = comm_world();
    Loaded L = load(file);
    const float ref = L.fx.find("loss")->f[0];
    for (bool off : {false, true}) {
        Model M;
        build(&M, L, 8, off, 0, false, 256, cm.size, cm.rank);
        EXPECT_NEAR(model_forward_backward(&M, true), ref, 1e-4 * fabs(ref)) << "offload " << off;
        comm_allreduce(M.grads, M.n_padded);
        for (const ParamInfo& p : M.table)
            EXPECT_LT(rel_err(M.grads + p.offset, L.fx.find("grad." + p.name)->f.data(), p.numel()), 1e-4)
                << p.name << ", offload " << off;
        EXPECT_EQ(M.doc_starts, L.fx.find("doc_starts")->i);
        model_free(&M);
    }
}
TEST(Docs, LlamaMatchesTheFixtureAcrossRanks) { check_docs("ref_llama_docs.bin"); }
TEST(Docs, GptMatchesTheFixtureAcrossRanks) { check_docs("ref_gpt_docs.bin"); }

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    comm_init(&argc, &argv);
    if (comm_world().rank != 0) {  // one report, from rank 0
        ::testing::TestEventListeners& l = ::testing::UnitTest::GetInstance()->listeners();
        delete l.Release(l.default_result_printer());
    }
    int rc = RUN_ALL_TESTS();
    int all = rc;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    comm_finalize();
    return all;
}

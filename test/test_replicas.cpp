// Data-parallel replicas x sequence-parallel groups (--sp, --batch) across real MPI processes
// (mpirun, one OpenMP thread per rank): the losses do not depend on the layout, a batch's gradient
// is the mean of its sequences', checkpoints move between layouts, a killed rank resumes exactly,
// the planner's per-rank bytes, and one-line errors for layouts that do not divide.
#include <gtest/gtest.h>
#include <cmath>
#include <cstring>
#include <fstream>
#include <vector>
#include "test/cli.h"

static const std::string one = "OMP_NUM_THREADS=1 ";

// The step losses of a run that must succeed with `steps` step lines.
static std::vector<double> run_losses(const std::string& cmd, size_t steps) {
    Out r = run(cmd);
    EXPECT_EQ(r.rc, 0) << cmd << "\n" << r.out;
    std::vector<double> l = losses(r.out);
    EXPECT_EQ(l.size(), steps) << cmd << "\n" << r.out;
    return l;
}

static void expect_near_all(const std::vector<double>& l, const std::vector<double>& ref, double rel, const std::string& what) {
    ASSERT_EQ(l.size(), ref.size()) << what;
    for (size_t i = 0; i < l.size(); i++) EXPECT_NEAR(l[i], ref[i], rel * ref[i]) << what << " step " << i + 1;
}

// One process with --batch 4 and 4 ranks as 2 groups of 2, 4 groups of 1 (pure data parallel) and
// 1 group of 4 print the same step losses (fp32 summation order aside: 1e-5), both families,
// chunked and offloaded; and ZeRO 1, 2 and 3 over all 4 ranks at --sp 2.
TEST(Replicas, LossesDoNotDependOnTheLayout) {
    for (const char* model : {"tiny", "gpt-tiny"}) {
        const std::string args = std::string("./fpdt train --device cpu --eval-every 0 --seq 64 --chunk-size 16 --offload 1 "
                                             "--steps 3 --batch 4 --model ") + model;
        const std::vector<double> ref = run_losses(one + args, 3);
        std::vector<std::string> layouts = {" --sp 2", " --sp 1", " --sp 4"};
        if (std::string(model) == "tiny") layouts.insert(layouts.end(), {" --sp 2 --zero 1", " --sp 2 --zero 2", " --sp 2 --zero 3"});
        for (const std::string& layout : layouts)
            expect_near_all(run_losses(mpi(4) + args + layout, 3), ref, 1e-5, std::string(model) + layout);
    }
    // the header names the layout and the batch; tokens/s counts every replica's tokens
    Out r = run(mpi(4) + "./fpdt train --device cpu --eval-every 0 --model tiny --seq 64 --chunk-size 16 --steps 1 --sp 2 --batch 4");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("ranks 4 (2 replicas x sp 2) | batch 4 (2 per replica)"), std::string::npos) << r.out;
}

// Packed documents with two replicas (4 ranks, --sp 2, --batch 2): each group shares the
// document starts of its own sequence only (an all-gather over the group, not the world), so the
// losses are one process's; the mask is on (the step line reports skipped blocks).
TEST(Replicas, PackedDocumentsAreEachGroupsOwn) {
    const std::string args = "./fpdt train --device cpu --eval-every 0 --model tiny --seq 128 --chunk-size 32 --offload 1 "
                             "--steps 2 --batch 2 --data passkey:docs:24";
    Out r = run(one + args);
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_GT(number_after(r.out, "tok, "), 0.0) << r.out;  // % of blocks skipped
    expect_near_all(run_losses(mpi(4) + args + " --sp 2", 2), losses(r.out), 1e-5, "--sp 2 --batch 2, documents");
}

// bf16 across the layouts: the bounds of Mpi.Bf16SameLossesAsOneProcess (the first step 1e-6,
// later steps 1e-3: a sum in another order can flip a bf16 rounding that then spreads).
TEST(Replicas, Bf16LossesWithinBf16Bounds) {
    const std::string args = "./fpdt train --device cpu --eval-every 0 --seq 64 --chunk-size 16 --offload 1 --steps 3 "
                             "--batch 2 --model tiny --precision bf16";
    const std::vector<double> ref = run_losses(one + args, 3), l = run_losses(mpi(4) + args + " --sp 2", 3);
    ASSERT_EQ(l.size(), 3u);
    ASSERT_EQ(ref.size(), 3u);
    EXPECT_NEAR(l[0], ref[0], 1e-6 * ref[0]);
    for (size_t i = 1; i < 3; i++) EXPECT_NEAR(l[i], ref[i], 1e-3 * ref[i]) << "step " << i + 1;
}

static std::vector<float> read_floats(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<float> v(bytes.size() / 4);
    memcpy(v.data(), bytes.data(), v.size() * 4);
    return v;
}

// --batch 2 on one process: the step's gradient is the mean of its two sequences' gradients, each
// taken alone (sequence b of step k is the data's sequence 2k + b, which a --batch 1 run trains at
// step 2k + b; learning rate 0 keeps the weights, so the second is taken at the same weights).
TEST(Replicas, BatchGradientIsTheMeanOfItsSequences) {
    const std::string d = tmpdir();
    const std::string args = one + "./fpdt train --device cpu --eval-every 0 --model tiny --seq 64 --chunk-size 16 --clip 0 --steps 2 ";
    Out g0 = run("FPDT_TEST_GRADS_OUT=" + d + "/g0 " + args + "--lr 0 --exit-after 1 --out " + d + "/o");
    ASSERT_EQ(g0.rc, 0) << g0.out;
    Out g1 = run("FPDT_TEST_GRADS_OUT=" + d + "/g1 " + args + "--lr 0 --resume --out " + d + "/o");
    ASSERT_EQ(g1.rc, 0) << g1.out;
    Out gb = run("FPDT_TEST_GRADS_OUT=" + d + "/gb " + args + "--batch 2");
    ASSERT_EQ(gb.rc, 0) << gb.out;
    const std::vector<float> a = read_floats(d + "/g0"), b = read_floats(d + "/g1"), m = read_floats(d + "/gb");
    ASSERT_GT(a.size(), 1000u);
    ASSERT_EQ(a.size(), b.size());
    ASSERT_EQ(a.size(), m.size());
    double worst = 0, scale = 0, apart = 0;
    for (size_t i = 0; i < a.size(); i++) {
        worst = std::max(worst, (double)fabs(m[i] - 0.5 * (a[i] + b[i])));
        scale = std::max(scale, (double)fabs(m[i]));
        apart = std::max(apart, (double)fabs(a[i] - b[i]));
    }
    EXPECT_LT(worst, 1e-5 * scale) << "largest difference " << worst << " at gradient scale " << scale;
    EXPECT_GT(apart, 1e-2 * scale) << "the two sequences gave the same gradient: the test could not fail";
}

// A checkpoint written by 4 ranks --sp 2 --zero 3 (each rank holding a quarter of the state)
// resumes on 2 ranks --sp 2 and on one process with the unbroken run's losses; a killed rank of a
// 4-rank --sp 2 run that saves every step ends the job, and the resume is exact.
TEST(Replicas, CheckpointsMoveBetweenLayoutsAndAKilledRankResumes) {
    const std::string args = "./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --chunk-size 16 --steps 6 --batch 2 ";
    const std::vector<double> ref = run_losses(one + args, 6);
    for (const std::string& second : {mpi(2) + args + "--sp 2", one + args}) {
        const std::string d = tmpdir();
        Out a = run(mpi(4) + args + "--sp 2 --zero 3 --exit-after 3 --out " + d);
        ASSERT_EQ(a.rc, 0) << a.out;
        EXPECT_EQ(run("ls " + d + "/ckpt_00000003/shard_3.bin").rc, 0) << "a shard per rank of the world";
        Out b = run(second + " --resume --out " + d);
        ASSERT_EQ(b.rc, 0) << b.out;
        std::vector<double> l = losses(a.out), l2 = losses(b.out);
        l.insert(l.end(), l2.begin(), l2.end());
        expect_near_all(l, ref, 1e-5, second);
    }
    // SIGKILL one rank mid-run (after a checkpoint): the job ends, non-zero; --resume continues
    // with the losses of a run that never stopped
    const std::string four = mpi(4) + "./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --chunk-size 16 --steps 20 --sp 2 --batch 2 ";
    const std::vector<double> whole = run_losses(four, 20);
    const std::string d = tmpdir();
    Out k = run(four + "--save-every 1 --out " + d + " > " + d + "/log 2>&1 & m=$!; "
                "for i in $(seq 600); do ls " + d + "/ckpt_*/manifest.txt >/dev/null 2>&1 && break; sleep 0.05; done; "
                "kill -9 $(pgrep -P $m | tail -1); wait $m; echo \"rc=$?\"");
    EXPECT_GT(number_after(k.out, "rc="), 0) << k.out;
    Out r = run(four + "--save-every 1 --resume --out " + d);
    ASSERT_EQ(r.rc, 0) << r.out;
    const double at = number_after(r.out, "resumed at step ");
    ASSERT_GE(at, 1) << r.out;
    const std::vector<double> l = losses(r.out);
    ASSERT_EQ(l.size() + (size_t)at, 20u) << r.out;
    for (size_t i = 0; i < l.size(); i++) EXPECT_NEAR(l[i], whole[at + i], 1e-6 * whole[at + i]) << "step " << at + i + 1;
}

// Layouts that do not divide, and a changed --batch on resume: one line, a non-zero exit, no hang.
TEST(Replicas, BadLayoutsAreOneLine) {
    const std::string T = "./fpdt train --device cpu --model tiny --seq 64 --chunk-size 16 --steps 2 --eval-every 0 ";
    struct Case {
        std::string cmd, expect;
    };
    const std::vector<Case> cases = {
        {mpi(4) + T + "--sp 3", "--sp 3 does not divide the 4 ranks into sequence-parallel groups"},
        {mpi(4) + T + "--sp 2 --batch 3", "--batch 3 is not a multiple of the 2 data-parallel replicas"},
        {mpi(4) + T + "--sp 2", "--batch 1 is not a multiple of the 2 data-parallel replicas"},
        {mpi(4) + "./fpdt train --device cpu --model tiny --seq 60 --chunk-size 15 --sp 2 --batch 2 --steps 1",
         "--chunk-size 15 is not a multiple of the 2 ranks of a sequence-parallel group (--sp)"},
        {mpi(4) + "./fpdt train --device cpu --model medium --seq 64 --chunk-size 16 --sp 4 --batch 1 --steps 1",
         "model medium has 6 heads, not a multiple of the 4 ranks"},
        {T + "--batch 0", "--batch 0: at least one sequence per step"},
        {"./fpdt plan --model small --seq 4096 --gpus 8 --sp 3", "--sp 3 does not divide the 8 ranks"},
    };
    for (const Case& c : cases) {
        Out r = run("timeout 60 " + c.cmd);
        EXPECT_NE(r.rc, 0) << c.cmd << "\n" << r.out;
        EXPECT_NE(r.rc, 124) << "hung: " << c.cmd;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.cmd << "\n" << r.out;
        size_t n = 0;  // said once (by rank 0), whatever mpirun adds
        for (size_t p = r.out.find("fpdt: "); p != std::string::npos; p = r.out.find("fpdt: ", p + 1)) n++;
        EXPECT_EQ(n, 1u) << c.cmd << "\n" << r.out;
    }
    const std::string d = tmpdir();
    Out a = run(one + T + "--exit-after 1 --out " + d);
    ASSERT_EQ(a.rc, 0) << a.out;
    Out b = run(one + T + "--batch 2 --resume --out " + d);
    EXPECT_NE(b.rc, 0) << b.out;
    EXPECT_NE(b.out.find("was made with data.batch 1, this run has 2 (--batch"), std::string::npos) << b.out;
}

// plan --gpus W --sp N: the ZeRO shard divides by W, the sequence's store by N. 16 ranks in groups
// of 8 hold half the sharded state of 8 ranks in one group, and the same store.
TEST(Replicas, PlanShardsOverTheWorldAndStoresOverTheGroup) {
    const std::string cfg = "./fpdt plan --model llama3-8b --seq 1048576 --chunk-size 65536 --offload 1 --zero 3";
    Out g8 = run(cfg + " --gpus 8"), g16 = run(cfg + " --gpus 16 --sp 8");
    ASSERT_EQ(g8.rc, 0) << g8.out;
    ASSERT_EQ(g16.rc, 0) << g16.out;
    EXPECT_NE(g16.out.find("16 rank(s) (2 replicas x sp 8)"), std::string::npos) << g16.out;
    for (const char* k : {"weights (this rank's shard) ", "optimizer: AdamW m "}) {
        const double a = number_after(g8.out, k), b = number_after(g16.out, k);
        ASSERT_GT(a, 0) << k << g8.out;
        EXPECT_NEAR(b, a / 2, 0.01 * a) << k;
    }
    const double s8 = number_after(g8.out, "store (sequence-sized) "), s16 = number_after(g16.out, "store (sequence-sized) ");
    ASSERT_GT(s8, 0) << g8.out;
    EXPECT_NEAR(s16, s8, 1e-3 * s8) << g16.out;
}

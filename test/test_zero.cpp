// ZeRO-2 and ZeRO-3 (zero.h) across real MPI processes (mpirun, as CI runs it): the losses of one
// process, the per-rank memory of the sharded state, and the planner's 8B x 2M-token line.
#include <gtest/gtest.h>
#include "test/cli.h"


// bf16 under ZeRO-3: the bounds of Mpi.Bf16SameLossesAsOneProcess (the first step to 1e-6, later
// ones to 1e-3), and not the fp32 losses.
TEST(Zero, Stage3Bf16SameLossesAsOneProcess) {
    const std::string args = "./fpdt train --device cpu --eval-every 0 --seq 64 --steps 3 --chunk-size 16 --offload 1 --precision bf16 --model ";
    for (const char* model : {"tiny", "gpt-tiny"}) {
        Out ref = run("OMP_NUM_THREADS=1 " + args + model);
        Out r = run(mpi(4) + args + model + " --zero 3");
        Out f32 = run(mpi(4) + args + model + " --zero 3 --precision fp32");
        ASSERT_EQ(ref.rc, 0) << ref.out;
        ASSERT_EQ(r.rc, 0) << r.out;
        ASSERT_EQ(f32.rc, 0) << f32.out;
        std::vector<double> lr = losses(ref.out), l = losses(r.out), lf = losses(f32.out);
        ASSERT_EQ(lr.size(), 3u);
        ASSERT_EQ(l.size(), 3u) << r.out;
        ASSERT_EQ(lf.size(), 3u) << f32.out;
        EXPECT_NEAR(l[0], lr[0], 1e-6 * lr[0]) << model;
        for (size_t i = 1; i < 3; i++) EXPECT_NEAR(l[i], lr[i], 1e-3 * lr[i]) << model << " step " << i + 1;
        EXPECT_NE(l[0], lf[0]) << "bf16 printed the fp32 loss";
    }
}

// The plan's breakdown is the arenas' (the same allocation sequence as train). Weights, gradients
// and optimizer state at P = 4 under --zero 3 are a quarter of P = 1's (within 10%), next to the
// stated gather and gradient buffers; and a real 4-rank --zero 3 run measures what plan predicts.
TEST(Zero, Stage3StateIsAQuarterPerRankAndPlanMatchesTheRun) {
    const std::string cfg = " --model llama3-8b --seq 65536 --chunk-size 16384 --offload 1 --precision fp32";
    Out p1 = run("./fpdt plan" + cfg + " --gpus 1"), p4 = run("./fpdt plan" + cfg + " --gpus 4 --zero 3");
    ASSERT_EQ(p1.rc, 0) << p1.out;
    ASSERT_EQ(p4.rc, 0) << p4.out;
    const double full = number_after(p1.out, "    weights ") + number_after(p1.out, "    gradients ") +
                        number_after(p1.out, "optimizer: AdamW m ") + number_after(p1.out, "optimizer: AdamW v ");
    const double shard = number_after(p4.out, "weights (this rank's shard) ") + number_after(p4.out, "gradients (this rank's shard) ") +
                         number_after(p4.out, "optimizer: AdamW m ") + number_after(p4.out, "optimizer: AdamW v ");
    ASSERT_GT(full, 0) << p1.out;
    ASSERT_GT(shard, 0) << p4.out;
    EXPECT_NEAR(shard, full / 4, 0.1 * full / 4) << p1.out << p4.out;
    // the stated buffers: two gathered layers, the gathered embedding, two gradient buffers and the
    // embedding's gradient, all far below the full state
    double buffers = 0;
    for (const char* k : {"weights: gathered layer (x2) ", "weights: gathered embedding (wte) ",
                          "gradients: layer in flight (x2) ", "gradients: embedding (wte) "}) {
        const double b = number_after(p4.out, k);
        EXPECT_GT(b, 0) << k << p4.out;
        buffers += b;
    }
    EXPECT_LT(buffers, full / 4) << p4.out;
    EXPECT_EQ(p4.out.find("    weights  "), std::string::npos) << "a full weight array under --zero 3\n" << p4.out;
    EXPECT_EQ(p4.out.find("    gradients  "), std::string::npos) << "a full gradient array under --zero 3\n" << p4.out;
    const std::string run_cfg = " --model tiny --seq 256 --chunk-size 64 --offload 1 --zero 3";
    Out t4 = run(mpi(4) + "./fpdt train --device cpu --eval-every 0 --steps 1" + run_cfg);
    Out q4 = run("./fpdt plan --gpus 4 --precision fp32" + run_cfg);
    ASSERT_EQ(t4.rc, 0) << t4.out;
    ASSERT_EQ(q4.rc, 0) << q4.out;
    const double measured = number_after(t4.out, "peak device memory "), planned = number_after(q4.out, "  device ");
    EXPECT_NEAR(measured, planned, 0.1 * planned) << t4.out << q4.out;
}

// The paper's headline: Llama-3 8B at 2M tokens on four 80 GB GPUs fits under --zero 3 (and did
// not under --zero 1).
TEST(Zero, Llama8BAt2MTokensFitsFour80GBGpus) {
    const std::string args = "./fpdt plan --model llama3-8b --seq 2097152 --chunk-size 65536 --gpus 4 --gpu-mem 80 --zero ";
    Out z3 = run(args + "3"), z1 = run(args + "1");
    ASSERT_EQ(z3.rc, 0) << z3.out;
    ASSERT_EQ(z1.rc, 0) << z1.out;
    EXPECT_NE(z3.out.find("fits: device yes"), std::string::npos) << z3.out;
    EXPECT_LT(number_after(z3.out, "fits: device yes ("), 70.0) << z3.out;
    EXPECT_NE(z1.out.find("fits: device NO"), std::string::npos) << z1.out;
}

// A 2-rank --zero 3 run that saves every step, SIGKILLed (every process) at a random moment after
// its first checkpoint, always leaves one that resumes, and the resumed run prints the losses of
// an uninterrupted run.
TEST(Zero, Stage3KilledAnywhereResumesExactly) {
    const std::string args = mpi(2) + "./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --chunk-size 16 --steps 30 --zero 3 ";
    Out whole = run(args);
    ASSERT_EQ(whole.rc, 0) << whole.out;
    std::vector<double> ref = losses(whole.out);
    ASSERT_EQ(ref.size(), 30u);
    for (int attempt = 0; attempt < 2; attempt++) {
        std::string d = tmpdir();
        Out k = run(args + "--save-every 1 --out " + d + " > " + d + "/log 2>&1 & m=$!; "
                    "for i in $(seq 600); do ls " + d + "/ckpt_*/manifest.txt >/dev/null 2>&1 && break; sleep 0.02; done; "
                    "sleep 0.$((RANDOM % 10)); kill -9 $(pgrep -P $m) $m 2>/dev/null; wait $m; ls " + d);
        Out r = run(args + "--save-every 1 --resume --out " + d);
        ASSERT_EQ(r.rc, 0) << k.out << r.out;
        const double at = number_after(r.out, "resumed at step ");
        std::vector<double> l = losses(r.out);
        if (at < 0) {  // killed after the last save: nothing left to do
            EXPECT_NE(r.out.find("nothing left to do"), std::string::npos) << r.out;
            continue;
        }
        ASSERT_EQ(l.size() + (size_t)at, 30u) << r.out;
        for (size_t i = 0; i < l.size(); i++) EXPECT_NEAR(l[i], ref[at + i], 1e-6 * ref[at + i]) << "step " << at + i + 1;
    }
}

// Sequence parallelism across real MPI processes (mpirun, as CI runs it): the same losses as one
// process, the all-to-all layout, per-rank memory, and errors and dead ranks ending the job.
#include <gtest/gtest.h>
#include <fstream>
#include "comm.h"
#include "test/cli.h"

// One thread per rank: the ranks share CI's two cores.

TEST(Mpi, LayoutRoundTripsAcrossProcesses) {
    for (int np : {2, 4}) {
        Out r = run(mpi(np) + "./build/mpi_layout --gtest_color=no");
        EXPECT_EQ(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find("[  PASSED  ] 6 tests"), std::string::npos) << r.out;
    }
}

// P = 2 and 4 print the single-process losses (to 1e-5 relative), both families, offload on and
// off, every ZeRO stage. Only the order of fp32 sums differs (all-reduce, reduce-scatter).
TEST(Mpi, SameLossesAsOneProcess) {
    for (const char* model : {"tiny", "gpt-tiny"}) {
        const std::string args = std::string("./fpdt train --device cpu --eval-every 0 --seq 64 --steps 3 --chunk-size 16 --model ") + model;
        Out ref = run("OMP_NUM_THREADS=1 " + args);
        ASSERT_EQ(ref.rc, 0) << ref.out;
        std::vector<double> lr = losses(ref.out);
        ASSERT_EQ(lr.size(), 3u);
        for (int np : {2, 4})
            for (const char* extra : {"", " --offload 1", " --zero 1", " --offload 1 --zero 1", " --zero 2", " --zero 3",
                                      " --zero 2 --offload 1", " --zero 3 --offload 1"}) {
                Out r = run(mpi(np) + args + extra);
                ASSERT_EQ(r.rc, 0) << r.out;
                if (const char* z = strstr(extra, "--zero ")) {  // the header names the stage
                    EXPECT_NE(r.out.find(std::string(" ZeRO-") + z[7]), std::string::npos) << r.out;
                }
                std::vector<double> l = losses(r.out);
                ASSERT_EQ(l.size(), 3u) << r.out;  // rank 0 alone prints step lines
                for (size_t i = 0; i < l.size(); i++)
                    EXPECT_NEAR(l[i], lr[i], 1e-5 * lr[i]) << model << " np " << np << extra << " step " << i + 1;
                EXPECT_NE(r.out.find("(max over ranks)"), std::string::npos);
            }
    }
}

// bf16 mode across ranks: the all-to-all moves the same bf16-rounded values and every row is
// computed as on one rank, so the first step's loss is the single process's (to 1e-6: only the
// loss's own sum is split). After an update the gradients were summed in another order, a weight
// can round to the neighbouring bf16 and the change spreads (see test_model.cpp,
// Bf16OffloadIsExactAndChunkingWithinBf16Rounding), so later steps are held to 1e-3. And the
// losses are bf16's, not fp32's: the first differs from the fp32 run's.
TEST(Mpi, Bf16SameLossesAsOneProcess) {
    const std::string args = "./fpdt train --device cpu --eval-every 0 --seq 64 --steps 3 --chunk-size 16 --offload 1 --model tiny";
    Out ref = run("OMP_NUM_THREADS=1 " + args + " --precision bf16");
    Out f32 = run("OMP_NUM_THREADS=1 " + args + " --precision fp32");
    Out r = run(mpi(2) + args + " --precision bf16");
    ASSERT_EQ(ref.rc, 0) << ref.out;
    ASSERT_EQ(f32.rc, 0) << f32.out;
    ASSERT_EQ(r.rc, 0) << r.out;
    std::vector<double> lr = losses(ref.out), l = losses(r.out), lf = losses(f32.out);
    ASSERT_EQ(lr.size(), 3u);
    ASSERT_EQ(l.size(), 3u) << r.out;
    ASSERT_EQ(lf.size(), 3u);
    EXPECT_NEAR(l[0], lr[0], 1e-6 * lr[0]);
    for (size_t i = 1; i < 3; i++) EXPECT_NEAR(l[i], lr[i], 1e-3 * lr[i]) << "step " << i + 1;
    EXPECT_NE(lr[0], lf[0]) << "bf16 printed the fp32 loss";
}

// Each rank's activation working set (device bytes other than weights, gradients and optimizer
// state) at P = 4 is about a quarter of P = 1's; the plan says so and a real 4-rank run measures it.
TEST(Mpi, PerRankWorkingSetIsAQuarter) {
    auto working = [](const std::string& out) {
        return number_after(out, "working set ") + number_after(out, "store chunks (device) ");
    };
    const std::string cfg = " --model small --seq 4096 --chunk-size 1024 --offload 1";
    Out p1 = run("./fpdt plan" + cfg + " --gpus 1"), p4 = run("./fpdt plan" + cfg + " --gpus 4");
    ASSERT_EQ(p1.rc, 0) << p1.out;
    ASSERT_EQ(p4.rc, 0) << p4.out;
    const double ratio = working(p4.out) / working(p1.out);
    EXPECT_GT(ratio, 0.2) << p1.out << p4.out;
    EXPECT_LT(ratio, 0.3) << p1.out << p4.out;
    Out t4 = run(mpi(4) + "./fpdt train --device cpu --eval-every 0 --steps 1 --model tiny --seq 512 --chunk-size 128 --offload 1");
    Out q4 = run("./fpdt plan --model tiny --seq 512 --chunk-size 128 --offload 1 --gpus 4 --precision fp32");
    ASSERT_EQ(t4.rc, 0) << t4.out;
    const double measured = number_after(t4.out, "peak device memory "), planned = number_after(q4.out, "  device ");
    EXPECT_NEAR(measured, planned, 0.1 * planned) << t4.out << q4.out;
}

// A shape the group cannot use: one message, from rank 0, and a non-zero exit.
TEST(Mpi, BadWorldSizeIsOneMessage) {
    Out r = run(mpi(3) + "./fpdt train --device cpu --model tiny --seq 96 --chunk-size 48");
    EXPECT_NE(r.rc, 0) << r.out;
    size_t first = r.out.find("fpdt: "), n = 0;
    for (size_t p = first; p != std::string::npos; p = r.out.find("fpdt: ", p + 1)) n++;
    EXPECT_EQ(n, 1u) << r.out;
    EXPECT_NE(r.out.find("not a multiple of the 3 ranks"), std::string::npos) << r.out;
}

// A long 2-rank run in the background, past its step 3 (cli.h): the start of the tests that then
// kill or stop one of its ranks.
static std::string two_ranks_past_step_3(const std::string& d, const std::string& flags) {
    return start_past_step_3(d, mpi(2) + "./fpdt train --device cpu --model tiny --seq 64 --steps 100000 --eval-every 0" + flags);
}

// A rank killed mid-run ends the whole job, non-zero, well within 60 s, and the report names it.
TEST(Mpi, KilledRankEndsTheJob) {
    std::string d = tmpdir();
    Out r = run(two_ranks_past_step_3(d, "") +
                "kill -9 $(pgrep -P $m | tail -1); t0=$(date +%s); wait $m; rc=$?; "
                "echo \"rc=$rc secs=$(( $(date +%s) - t0 ))\"; cat $out");
    EXPECT_GT(number_after(r.out, "rc="), 0) << r.out;
    EXPECT_LT(number_after(r.out, "secs="), 60) << r.out;
    EXPECT_NE(r.out.find("rank"), std::string::npos) << r.out;
}

// Evaluation across ranks: each rank scores the answers it holds and the counts are summed, so
// P = 2 and 4 report what one process reports for the same weights (a trained checkpoint, then
// one more step at learning rate 0, so every run evaluates exactly those weights).
TEST(Mpi, EvaluationAgreesWithOneProcess) {
    std::string d = tmpdir();
    const std::string base = "./fpdt train --device cpu --model tiny --seq 64 --chunk-size 32 ";
    Out train = run("OMP_NUM_THREADS=1 " + base + "--steps 301 --exit-after 300 --eval-every 0 --out " + d + "/ckpt");
    ASSERT_EQ(train.rc, 0) << train.out;
    auto eval_line = [&](int np) {
        std::string dir = d + "/np" + std::to_string(np);
        Out r = run("cp -r " + d + "/ckpt " + dir + " && " + (np == 1 ? std::string("OMP_NUM_THREADS=1 ") : mpi(np)) + base +
                    "--steps 301 --lr 0 --eval-every 1 --eval-seqs 16 --resume --out " + dir);
        EXPECT_EQ(r.rc, 0) << r.out;
        size_t p = r.out.find("eval step 301");
        return p == std::string::npos ? std::string("none: ") + r.out : r.out.substr(p, r.out.find('\n', p) - p);
    };
    const std::string e1 = eval_line(1);
    ASSERT_NE(e1.find("passkey"), std::string::npos) << e1;
    for (int np : {2, 4}) {
        const std::string e = eval_line(np);
        ASSERT_NE(e.find("passkey"), std::string::npos) << e;
        EXPECT_NEAR(number_after(e, "loss "), number_after(e1, "loss "), 1e-5 * number_after(e1, "loss ")) << e << "\n" << e1;
        EXPECT_EQ(e.substr(e.find("passkey")), e1.substr(e1.find("passkey"))) << np << " ranks";
    }
    // Data-parallel replicas (--sp) share the evaluation's sequences out and report one process's
    // numbers: 15 sequences over 2 replicas (one runs a pass it does not count: ZeRO-3's gathers
    // span every rank) and over 4. --init takes the same weights into a run of another --batch.
    auto init_eval = [&](const std::string& launcher, const std::string& layout) {
        Out r = run(launcher + base + "--steps 1 --lr 0 --eval-every 1 --eval-seqs 15 --init " + d + "/ckpt" + layout);
        EXPECT_EQ(r.rc, 0) << r.out;
        size_t p = r.out.find("eval step 1 ");
        return p == std::string::npos ? std::string("none: ") + r.out : r.out.substr(p, r.out.find('\n', p) - p);
    };
    const std::string i1 = init_eval("OMP_NUM_THREADS=1 ", "");
    ASSERT_NE(i1.find("passkey"), std::string::npos) << i1;
    for (const char* layout : {" --sp 2 --batch 2 --zero 3", " --sp 1 --batch 4"}) {
        const std::string e = init_eval(mpi(4), layout);
        ASSERT_NE(e.find("passkey"), std::string::npos) << e;
        EXPECT_NEAR(number_after(e, "loss "), number_after(i1, "loss "), 1e-5 * number_after(i1, "loss ")) << e << "\n" << i1;
        EXPECT_EQ(e.substr(e.find("passkey")), i1.substr(i1.find("passkey"))) << layout;
    }
}

// Checkpoint format 2 re-cuts on load: a run saved by 2 ranks with ZeRO-1 continues on 4 ranks
// without it, one saved by 4 with ZeRO-1 on one process, and one saved by 4 with ZeRO-3 (each
// rank holding only its slice of the weights) at P = 2 with ZeRO-1 and on one process, printing
// the losses of an unbroken single-process run (each rank wrote only its own shard); the header
// says what changed.
TEST(Mpi, CheckpointsResumeOnOtherRanksAndZero) {
    const std::string args = "./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --chunk-size 16 --steps 6 ";
    Out whole = run("OMP_NUM_THREADS=1 " + args);
    ASSERT_EQ(whole.rc, 0) << whole.out;
    std::vector<double> ref = losses(whole.out);
    ASSERT_EQ(ref.size(), 6u);
    struct Leg {
        std::string first, second, change;
    };
    const std::string one = "OMP_NUM_THREADS=1 " + args;
    for (const Leg& leg : {Leg{mpi(2) + args + "--zero 1", mpi(4) + args, "ZeRO stage 1 -> 0"},
                           Leg{mpi(4) + args + "--zero 1", one, "ZeRO stage 1 -> 0"},
                           Leg{mpi(4) + args + "--zero 3", mpi(2) + args + "--zero 1", "ZeRO stage 3 -> 1"},
                           Leg{mpi(4) + args + "--zero 3", one, "ZeRO stage 3 -> 0"}}) {
        std::string d = tmpdir();
        Out a = run(leg.first + " --exit-after 3 --out " + d);
        ASSERT_EQ(a.rc, 0) << a.out;
        Out ls = run("ls " + d + "/ckpt_00000003");
        EXPECT_NE(ls.out.find(leg.first.find("-np 4") != std::string::npos ? "shard_3.bin" : "shard_1.bin"), std::string::npos) << ls.out;
        Out b = run(leg.second + " --resume --out " + d);
        ASSERT_EQ(b.rc, 0) << b.out;
        std::vector<double> l = losses(a.out), l2 = losses(b.out);
        l.insert(l.end(), l2.begin(), l2.end());
        ASSERT_EQ(l.size(), 6u) << a.out << b.out;
        for (size_t i = 0; i < 6; i++) EXPECT_NEAR(l[i], ref[i], 1e-5 * ref[i]) << leg.second << " step " << i + 1;
        EXPECT_NE(b.out.find("changed since it was saved: ranks "), std::string::npos) << b.out;
        EXPECT_NE(b.out.find(leg.change), std::string::npos) << b.out;
    }
}

// An error only one rank sees (its --data file missing, its --out not the one rank 0 made, no
// GPU on its machine) prints that rank's message, naming it, and ends every rank, non-zero,
// within seconds: never a silent hang. The per-rank path comes from the launcher's rank variable.
TEST(Mpi, OneRankFailingEndsEveryRank) {
    std::string d = tmpdir();
    { std::ofstream(d + "/r0.txt") << std::string(2000, 'a'); }
    const std::string T = "./fpdt train --device cpu --model tiny --seq 64 --steps 3 --eval-every 0 ";
    struct Case {
        std::string cmd, expect;
    };
    std::vector<Case> cases = {
        {"sh -c 'exec " + T + "--data " + d + "/r${OMPI_COMM_WORLD_RANK}.txt'", "(rank 1 of 2): data: " + d + "/r1.txt: cannot open"},
        {"sh -c 'exec " + T + "--out " + d + "/o${OMPI_COMM_WORLD_RANK}'", "(rank 1 of 2): --out " + d + "/o1: this rank does not see rank 0's files"},
    };
    if (run("nvidia-smi -L").rc != 0)
        cases.push_back({"./fpdt train --device gpu --model tiny --seq 64 --steps 3", "of 2): --device gpu: no CUDA device is visible"});
    for (const Case& c : cases) {
        Out r = run("(t0=$(date +%s); timeout 60 " + mpi(2) + c.cmd + "; echo \"rc=$? secs=$(( $(date +%s) - t0 ))\")");
        EXPECT_GT(number_after(r.out, "rc="), 0) << r.out;
        EXPECT_NE(number_after(r.out, "rc="), 124) << "hung: " << r.out;
        EXPECT_LT(number_after(r.out, "secs="), 30) << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.cmd << "\n" << r.out;
    }
}

// Threads per rank when OpenMP's environment is unset: the cores this rank may use over the ranks
// on its machine, and the header says so; where the ranks' threads outnumber the cores, a passive
// wait policy, which takes effect (the program restarts itself before OpenMP reads it: libgomp
// reports it). And the point of it: 4 ranks on this machine take at most about 3x the time per
// step of one process (spinning threads on shared cores took 25x).
TEST(Mpi, ThreadsPerRankAndPassiveWait) {
    const std::string unset = "env -u OMP_NUM_THREADS -u OMP_WAIT_POLICY ";
    const std::string T = "./fpdt train --device cpu --model tiny --seq 512 --chunk-size 128 --steps 3 --eval-every 0";
    Out one = run(unset + T), four = run(unset + mpirun(4) + T);
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(four.rc, 0) << four.out;
    EXPECT_NE(four.out.find(" threads per rank: "), std::string::npos) << four.out;
    EXPECT_NE(four.out.find(" / 4 ranks on this machine"), std::string::npos) << four.out;
    auto step_ms = [](const std::string& out) {  // the fastest step after the first (warm-up)
        double best = 1e30;
        for (size_t p = out.find("step 2/"); p != std::string::npos; p = out.find("\nstep ", p + 1)) {
            const size_t e = out.find(" ms/step", p), b = out.rfind("| ", e);
            best = std::min(best, atof(out.c_str() + b + 2));
        }
        return best;
    };
    const double t1 = step_ms(one.out), t4 = step_ms(four.out);
    EXPECT_LT(t4, 3.0 * t1) << "4 ranks " << t4 << " ms/step, one process " << t1 << "\n" << four.out;
    printf("per step: one process %.1f ms, 4 ranks %.1f ms (%.2fx)\n", t1, t4, t4 / t1);
    // as many threads per rank as the machine has cores: 4 ranks' threads outnumber them anywhere
    Out spin = run("env -u OMP_WAIT_POLICY OMP_DISPLAY_ENV=true OMP_NUM_THREADS=$(nproc) " + mpirun(4) +
                   "-x OMP_NUM_THREADS -x OMP_DISPLAY_ENV ./fpdt train --device cpu --model tiny --seq 64 --steps 1 --eval-every 0");
    ASSERT_EQ(spin.rc, 0) << spin.out;
    EXPECT_NE(spin.out.find("OMP_WAIT_POLICY = 'PASSIVE'"), std::string::npos) << spin.out;
    EXPECT_NE(spin.out.find("; passive wait: "), std::string::npos) << spin.out;
}

// A rank that stops making progress (SIGSTOP) leaves the others waiting in a collective: with
// --watchdog 2 one of them names the step and the collective and the job ends, non-zero.
TEST(Mpi, WatchdogEndsAJobWithAStoppedRank) {
    std::string d = tmpdir();
    Out r = run("(" + two_ranks_past_step_3(d, " --watchdog 2") + stop_a_rank_and_wait() + ")");
    EXPECT_EQ(number_after(r.out, "rc="), 0) << "the job did not end: " << r.out;
    EXPECT_LT(number_after(r.out, "secs="), 30) << r.out;
    EXPECT_NE(r.out.find("watchdog: step "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("(--watchdog 2); ending the job"), std::string::npos) << r.out;
}

// Whether ranks share a GPU comes from the GPUs' identities (comm.h, gpu_sharing), exchanged over
// MPI, not from how many GPUs a rank sees: with one GPU per rank through CUDA_VISIBLE_DEVICES
// (Slurm --gpus-per-task=1) every rank sees a single device 0, yet each has its own (NCCL); ranks
// placed on the same GPU share it (host staging and MPI), and each counts the ranks on its GPU
// (its share of the free memory). Identities here are made up, as the runs would report them.
TEST(DeviceIdentity, SharingComesFromIdentitiesNotCounts) {
    const GpuSharing own = gpu_sharing({"GPU-0a1b", "GPU-77c2", "GPU-9e10", "GPU-d5f3"});
    EXPECT_EQ(own.first, -1);
    EXPECT_EQ(own.count, std::vector<int>({1, 1, 1, 1}));
    const GpuSharing two = gpu_sharing({"GPU-0a1b", "GPU-77c2", "GPU-0a1b", "GPU-77c2"});  // 4 ranks, 2 GPUs
    EXPECT_EQ(two.first, 0);
    EXPECT_EQ(two.second, 2);
    EXPECT_EQ(two.count, std::vector<int>({2, 2, 2, 2}));
    const GpuSharing some = gpu_sharing({"GPU-0a1b", "GPU-77c2", "GPU-77c2"});
    EXPECT_EQ(some.first, 1);
    EXPECT_EQ(some.second, 2);
    EXPECT_EQ(some.count, std::vector<int>({1, 2, 2}));
    // no UUID: host name and PCI bus id, alike on two machines' first GPUs, which are not one GPU
    const GpuSharing hosts = gpu_sharing({"node1 0000:01:00.0", "node2 0000:01:00.0"});
    EXPECT_EQ(hosts.first, -1);
    EXPECT_EQ(gpu_sharing({"GPU-0a1b"}).count, std::vector<int>({1}));
}

// A fault of the communicator (NCCL's asynchronous error, polled by the watchdog thread) ends the
// job with a line naming the rank, the step and the collective, even with --watchdog 0. Here the
// MPI side of it runs: FPDT_FAULT_COMM_ERROR=3 makes rank 1's communicator report a fault from
// step 3 on, in place of NCCL (which needs GPUs); the watchdog then aborts the job (MPI_Abort).
TEST(Mpi, CommunicatorFaultEndsTheJobNamingStepAndCollective) {
    Out r = run("(t0=$(date +%s); timeout 60 " + mpi(2) +
                "sh -c '[ \"$OMPI_COMM_WORLD_RANK\" = 1 ] && export FPDT_FAULT_COMM_ERROR=3; exec ./fpdt train --device cpu "
                "--model tiny --seq 64 --steps 100000 --eval-every 0 --watchdog 0'; "
                "echo \"rc=$? secs=$(( $(date +%s) - t0 ))\")");
    EXPECT_GT(number_after(r.out, "rc="), 0) << r.out;
    EXPECT_NE(number_after(r.out, "rc="), 124) << "hung: " << r.out;
    EXPECT_LT(number_after(r.out, "secs="), 30) << r.out;
    EXPECT_GE(number_after(r.out, "fpdt (rank 1 of 2): step "), 3) << r.out;
    EXPECT_NE(r.out.find(": communicator fault in all-"), std::string::npos) << r.out;  // all-reduce or all-to-all
    EXPECT_NE(r.out.find("injected communicator fault (FPDT_FAULT_COMM_ERROR=3); ending the job"), std::string::npos) << r.out;
}

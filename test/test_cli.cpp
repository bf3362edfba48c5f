// The real program, end to end: training, determinism, chunked/offloaded runs, checkpoints and
// resume, the trace, the planner, and every bad input getting one clear line and a non-zero exit.
#include <gtest/gtest.h>
#include <cmath>
#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include "test/cli.h"

static const std::string TINY = "./fpdt train --device cpu --model tiny --eval-every 0 ";

static void expect_close(const std::vector<double>& a, const std::vector<double>& b, double rel, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    ASSERT_FALSE(a.empty()) << what;
    for (size_t i = 0; i < a.size(); i++) EXPECT_NEAR(a[i], b[i], rel * fabs(b[i])) << what << " step " << i + 1;
}

TEST(Train, TenStepsLearnAndRepeatExactly) {
    Out a = run(TINY + "--seq 64 --steps 10 --seed 5");
    Out b = run(TINY + "--seq 64 --steps 10 --seed 5");
    ASSERT_EQ(a.rc, 0) << a.out;
    std::vector<double> la = losses(a.out);
    ASSERT_EQ(la.size(), 10u) << a.out;
    EXPECT_LT(la[9], la[0] - 0.5) << a.out;  // from ~5.6 (uniform over 260) the filler is learnt fast
    EXPECT_EQ(loss_lines(a.out), loss_lines(b.out));  // same seed, same flags: the same digits
    EXPECT_NE(a.out.find("peak device memory"), std::string::npos);
    EXPECT_NE(a.out.find("peak host memory"), std::string::npos);
}

// Several steps of the chunked schedule, offload on and off, print the unchunked run's losses:
// the weights stay equal to fp32 rounding step after step (1e-5 is the bar).
TEST(Train, ChunkedAndOffloadedPrintTheUnchunkedLosses) {
    for (const char* model : {"tiny", "gpt-tiny"}) {
        std::string base = "./fpdt train --device cpu --eval-every 0 --seq 64 --steps 4 --model " + std::string(model);
        std::vector<double> ref = losses(run(base).out);
        for (const char* extra : {" --chunk-size 16", " --chunk-size 16 --offload 1", " --chunk-size 8 --offload 1"}) {
            Out r = run(base + extra);
            ASSERT_EQ(r.rc, 0) << r.out;
            expect_close(losses(r.out), ref, 1e-5, std::string(model) + extra);
        }
    }
}

// Stopping and resuming changes nothing, in either precision (bf16's weight copy is remade from
// the restored fp32 weights, so nothing of it needs saving).
TEST(Checkpoint, StopAndResumePrintTheSameLosses) {
    for (const char* prec : {"fp32", "bf16"}) {
        std::string d1 = tmpdir(), d2 = tmpdir();
        const std::string args = TINY + "--seq 64 --steps 8 --chunk-size 32 --offload 1 --precision " + prec + " ";
        Out whole = run(args + "--out " + d1);
        Out first = run(args + "--out " + d2 + " --exit-after 4");
        Out second = run(args + "--out " + d2 + " --resume");
        ASSERT_EQ(whole.rc, 0) << whole.out;
        ASSERT_EQ(first.rc, 0) << first.out;
        ASSERT_EQ(second.rc, 0) << second.out;
        std::vector<std::string> a = loss_lines(whole.out), b = loss_lines(first.out), c = loss_lines(second.out);
        ASSERT_EQ(a.size(), 8u);
        ASSERT_EQ(b.size(), 4u);
        ASSERT_EQ(c.size(), 4u);
        b.insert(b.end(), c.begin(), c.end());
        EXPECT_EQ(a, b) << prec;  // to the last printed digit
        EXPECT_NE(first.out.find("continue with --resume"), std::string::npos);
    }
}

TEST(Checkpoint, ResumeNeedsTheSameSteps) {
    std::string d = tmpdir();
    ASSERT_EQ(run(TINY + "--seq 64 --steps 6 --exit-after 3 --out " + d).rc, 0);
    Out r = run(TINY + "--seq 64 --steps 8 --resume --out " + d);
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("was made with total_steps 6, this run has 8 (--steps"), std::string::npos) << r.out;
}

// --resume checks what the checkpoint was made with: a different --seq, --data, --doc-mask, --seed or model
// changes what every step computes, and is refused naming the field, the old and the new value.
// A checkpoint past --steps is refused too.
TEST(Checkpoint, ResumeRefusesAnotherIdentity) {
    std::string d = tmpdir();
    { std::ofstream(d + "/a.txt") << std::string(3000, 'a'); }
    { std::ofstream(d + "/b.txt") << std::string(3000, 'b'); }
    const std::string out = " --out " + d + "/o";
    ASSERT_EQ(run(TINY + "--seq 64 --steps 6 --exit-after 3 --data " + d + "/a.txt" + out).rc, 0);
    struct Case {
        std::string args, expect;
    };
    for (const Case& c : std::vector<Case>{
             {"--seq 128 --steps 6 --data " + d + "/a.txt", "was made with data.seq 64, this run has 128 (--seq"},
             {"--seq 64 --steps 6 --data " + d + "/b.txt", "was made with data.source files 1: a.txt 3000 "},
             {"--seq 64 --steps 6 --seed 1 --data " + d + "/a.txt", "was made with seed 1337, this run has 1 (--seed"},
             {"--seq 64 --steps 6 --doc-mask 0 --data " + d + "/a.txt", "| doc-mask bos 256, this run has files 1"},
             {"--seq 64 --steps 2 --data " + d + "/a.txt", "is at step 3, past --steps 2"},
         }) {
        Out r = run(TINY + c.args + " --resume" + out);
        EXPECT_NE(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
    }
    Out gm = run("./fpdt train --device cpu --model gpt-tiny --eval-every 0 --seq 64 --steps 6 --resume --data " + d + "/a.txt" + out);
    EXPECT_NE(gm.out.find("was made with model.name tiny, this run has gpt-tiny (--model"), std::string::npos) << gm.out;
    Out ok = run(TINY + "--seq 64 --steps 6 --chunk-size 32 --data " + d + "/a.txt --resume" + out);
    EXPECT_EQ(ok.rc, 0) << ok.out;
    EXPECT_NE(ok.out.find("changed since it was saved: chunk 64 -> 32"), std::string::npos) << ok.out;
}

TEST(Checkpoint, CorruptNewestFallsBackToThePrevious) {
    std::string d = tmpdir();
    const std::string args = TINY + "--seq 64 --steps 6 --save-every 2 --out " + d;
    ASSERT_EQ(run(args + " --exit-after 4").rc, 0);
    {  // flip a byte in the middle of the newest checkpoint's shard
        std::fstream f(d + "/ckpt_00000004/shard_0.bin", std::ios::in | std::ios::out | std::ios::binary);
        ASSERT_TRUE(f.good());
        f.seekp(20000);
        f.put('\x5a');
    }
    Out r = run(args + " --resume");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("checksum mismatch"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("resumed at step 2"), std::string::npos) << r.out;
}

TEST(Sample, GeneratesFromACheckpoint) {
    std::string d = tmpdir();
    ASSERT_EQ(run(TINY + "--seq 64 --steps 3 --out " + d).rc, 0);
    Out r = run("./fpdt sample --out " + d + " --prompt 'the sky' --tokens 20");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_EQ(r.out.rfind("the sky", 0), 0u) << r.out;
    EXPECT_GT(r.out.size(), 20u);
}

// The trace of one step: the four tracks, and the exact number of attention blocks the schedule
// runs: L * u(u+1)/2 in the forward pass, as many again in the backward recompute, and L * u(u+1)/2
// backward blocks. With u = 4, L = 2: 20, 20 and 20.
TEST(Trace, ChromeJsonWithTracksAndBlockCounts) {
    std::string d = tmpdir(), f = d + "/trace.json";
    Out r = run(TINY + "--seq 64 --steps 1 --chunk-size 16 --offload 1 --trace " + f);
    ASSERT_EQ(r.rc, 0) << r.out;
    Out py = run("python3 -c \"import json,sys,collections; d=json.load(open('" + f +
                 "'))['traceEvents']; c=collections.Counter((e['ph'],e.get('tid'),e['name']) for e in d); "
                 "print('tracks', sum(1 for e in d if e['ph']=='M')); "
                 "print('fwd', c[('X',0,'attention block')]); print('bwd', c[('X',0,'attention block backward')]); "
                 "print('in', sum(v for k,v in c.items() if k[1]==1)); print('out', sum(v for k,v in c.items() if k[1]==2)); "
                 "print('comm', sum(v for k,v in c.items() if k[1]==3))\"");
    ASSERT_EQ(py.rc, 0) << py.out;
    EXPECT_EQ(number_after(py.out, "tracks "), 4);
    EXPECT_EQ(number_after(py.out, "fwd "), 40);  // forward + recompute, 20 each
    EXPECT_EQ(number_after(py.out, "bwd "), 20);
    EXPECT_GT(number_after(py.out, "in "), 0);
    EXPECT_GT(number_after(py.out, "out "), 0);
    EXPECT_GT(number_after(py.out, "comm "), 0);
}

// `plan` predicts what `train` measures (the issue asks for 10%), in both precisions.
TEST(Plan, PredictsTheMeasuredPeaks) {
    for (const char* cfg : {"--model tiny --seq 256 --chunk-size 64 --offload 1 --precision fp32",
                            "--model gpt-tiny --seq 128 --precision fp32",
                            "--model small --seq 512 --chunk-size 128 --offload 1 --precision fp32",
                            "--model tiny --seq 256 --chunk-size 64 --offload 1 --precision bf16",
                            "--model small --seq 512 --chunk-size 128 --offload 1 --precision bf16"}) {
        Out p = run(std::string("./fpdt plan ") + cfg);
        Out t = run(std::string("./fpdt train --device cpu --eval-every 0 --steps 1 ") + cfg);
        ASSERT_EQ(p.rc, 0) << p.out;
        ASSERT_EQ(t.rc, 0) << t.out;
        const double pd = number_after(p.out, "  device "), ph = number_after(p.out, "  host ");
        const double td = number_after(t.out, "peak device memory "), th = number_after(t.out, "peak host memory ");
        EXPECT_NEAR(pd, td, 0.1 * td) << cfg << "\n" << p.out << t.out;
        EXPECT_NEAR(ph, th, 0.1 * th + 0.1) << cfg << "\n" << p.out << t.out;
    }
    Out big = run("./fpdt plan --model llama3-8b --seq 2097152 --chunk-size 65536 --gpus 4 --zero 1 --gpu-mem 141");
    ASSERT_EQ(big.rc, 0) << big.out;
    EXPECT_NE(big.out.find("longest sequence"), std::string::npos) << big.out;
    EXPECT_NE(big.out.find("copies hide behind attention from chunk"), std::string::npos) << big.out;
}

// A run that does not fit the device says so before allocating, with the planner's suggestion,
// and the suggested flags then run within the same limit.
TEST(Plan, OutOfDeviceMemorySuggestsAChunkThatFits) {
    const std::string args = TINY + "--seq 4096 --steps 1 --device-mem 0.01";
    Out r = run(args);
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << r.out;
    EXPECT_NE(r.out.find("device memory: this run needs"), std::string::npos) << r.out;
    const size_t at = r.out.find("the planner suggests ");
    ASSERT_NE(at, std::string::npos) << r.out;
    const std::string flags = r.out.substr(at + 21, r.out.find(" (", at) - at - 21);  // "--chunk-size C --offload 1"
    EXPECT_EQ(flags.rfind("--chunk-size ", 0), 0u) << flags;
    Out ok = run(args + " " + flags);
    ASSERT_EQ(ok.rc, 0) << flags << "\n" << ok.out;
    EXPECT_LE(number_after(ok.out, "peak device memory "), 0.01 * 1024) << ok.out;
}

// Bad input: one clear line naming the problem, a non-zero exit, never a crash.
struct Bad {
    std::string args, expect;
};
TEST(BadInput, OneClearLineAndNonZeroExit) {
    std::string d = tmpdir();
    auto write = [&](const std::string& name, std::vector<int32_t> header, std::vector<uint16_t> toks) {
        std::ofstream f(d + "/" + name, std::ios::binary);
        header.resize(256, 0);
        f.write((const char*)header.data(), 1024);
        f.write((const char*)toks.data(), toks.size() * 2);
    };
    std::vector<uint16_t> toks(200, 65);
    write("good.bin", {20240520, 1, 200}, toks);
    write("magic.bin", {12345, 1, 200}, toks);
    write("short.bin", {20240520, 1, 400}, toks);
    toks[150] = 300;
    write("range.bin", {20240520, 1, 200}, toks);
    const std::string T = "./fpdt train --device cpu --model tiny --steps 1 --eval-every 0 --seq 64 ";
    std::vector<Bad> cases = {
        {T + "--data " + d + "/missing.txt", "missing.txt"},
        {T + "--data " + d + "/magic.bin", "bad magic"},
        {T + "--data " + d + "/short.bin", "truncated"},
        {T + "--data " + d + "/range.bin", "vocab"},
        {T + "--data " + d + "/*.none", "no files match"},
        {"./fpdt train --model nosuch", "unknown model 'nosuch'"},
        {T + "--bogus 1", "unknown flag --bogus"},
        {T + "--steps many", "--steps: 'many' is not a whole number"},
        {T + "--steps", "--steps needs a value"},
        {"./fpdt train --device cpu --model tiny --seq 16", "--seq >= 32"},
        {T + "--chunk-size 24", "does not divide --seq 64"},
        {T + "--offload 1", "needs chunking"},
        {T + "--chunk-size 16 --offload 1 --host-mem 0.00001", "host memory"},
        {T + "--chunk-size 16 --device-mem 0.0005", "no chunk size fits, even offloaded"},
        {T + "--resume", "need --out"},
        {T + "--resume=0 --out " + d, "--resume takes no value"},
        {T + "--out --resume", "--out needs a value"},
        {T + "--out /proc/no/such/dir", "--out /proc/no/such/dir: cannot write"},
        {T + "--resume --out " + d + "/nothing", "no valid checkpoint"},
        {T + "--on-nonfinite maybe", "--on-nonfinite"},
        {T + "--precision fp16", "--precision: 'fp16' (expected auto, fp32 or bf16)"},
        {"./fpdt plan --model tiny --seq 64 --precision half", "--precision: 'half'"},
        {"./fpdt frobnicate", "unknown command 'frobnicate'"},
        {"./fpdt sample --out " + d + "/nothing", "no valid checkpoint"},
        {"./fpdt plan --model tiny --seq 100 --chunk-size 30", "does not divide"},
        {"./fpdt bench --device cpu --heads 4 --kv-heads 3", "--kv-heads 3 does not divide --heads 4"},
    };
    for (const Bad& c : cases) {
        Out r = run(c.args);
        EXPECT_NE(r.rc, 0) << c.args << "\n" << r.out;
        EXPECT_LT(r.rc, 128) << c.args << " died of a signal\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.args << "\n" << r.out;
    }
    Out ok = run(T + "--data " + d + "/good.bin");  // and the good shard trains
    EXPECT_EQ(ok.rc, 0) << ok.out;
}

// bench times each building block and says what it timed (no speed is asserted: that is for
// benchmarks, not tests).
TEST(Bench, TimesEachBuildingBlock) {
    Out r = run("./fpdt bench --device cpu --size 64 --seq 128 --heads 2 --head-dim 16 --reps 2");
    ASSERT_EQ(r.rc, 0) << r.out;
    for (const char* s : {"bench | cpu", "matmul fp32 N=64:", "matmul bf16 N=64:", "attention causal S=128 H=2 KV=2 D=16"})
        EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
    EXPECT_GT(number_after(r.out, "matmul fp32 N=64: "), 0) << r.out;
}

TEST(Help, ListsFlagsAndModels) {
    Out r = run("./fpdt train --help");
    EXPECT_EQ(r.rc, 0);
    for (const char* s : {"--chunk-size", "--offload", "--zero", "--trace", "--resume", "--precision", "llama3-8b", "gpt-tiny"})
        EXPECT_NE(r.out.find(s), std::string::npos) << s;
}

// Numerical faults (injected with FPDT_FAULT_NAN_STEPS): skipped with a warning, or stopped; a run
// that keeps failing stops with a clear message; checkpoints only ever hold finite state.
TEST(Faults, NonFiniteStepsAreSkippedOrStop) {
    std::string d = tmpdir();
    Out skip = run("FPDT_FAULT_NAN_STEPS=3,5 " + TINY + "--seq 64 --steps 6 --save-every 1 --out " + d);
    ASSERT_EQ(skip.rc, 0) << skip.out;
    EXPECT_NE(skip.out.find("step 3/6 | loss"), std::string::npos);
    EXPECT_NE(skip.out.find("NON-FINITE: update skipped"), std::string::npos) << skip.out;
    EXPECT_EQ(losses(skip.out).size(), 6u);
    Out stop = run("FPDT_FAULT_NAN_STEPS=2 " + TINY + "--seq 64 --steps 6 --on-nonfinite stop");
    EXPECT_NE(stop.rc, 0);
    EXPECT_NE(stop.out.find("step 2: non-finite"), std::string::npos) << stop.out;
    Out limit = run("FPDT_FAULT_NAN_STEPS=2,3,4 " + TINY + "--seq 64 --steps 6 --max-bad-steps 3");
    EXPECT_NE(limit.rc, 0);
    EXPECT_NE(limit.out.find("3 non-finite steps in a row"), std::string::npos) << limit.out;
    // the newest checkpoints (after the skipped steps) hold finite numbers and resume
    for (const char* f : {"/ckpt_00000005/shard_0.bin", "/ckpt_00000006/shard_0.bin"}) {
        FILE* fp = fopen((d + f).c_str(), "rb");
        ASSERT_NE(fp, nullptr) << f;
        fseek(fp, 0, SEEK_END);
        long n = ftell(fp);
        std::vector<float> all(n / 4);
        fseek(fp, 0, SEEK_SET);
        ASSERT_EQ(fread(all.data(), 4, all.size(), fp), all.size());
        fclose(fp);
        size_t bad = 0;
        for (size_t i = 0; i < all.size(); i++) bad += !std::isfinite(all[i]);  // params, m, v: fp32, no header
        EXPECT_EQ(bad, 0u) << f;
    }
}

// SIGKILL while a checkpoint is being written: the previous checkpoint still loads and resumes.
// A 10M-parameter model makes each write (115 MB, fsync) long enough to be caught mid-way.
TEST(Checkpoint, KilledWhileWritingKeepsThePreviousOne) {
    bool caught = false;
    for (int attempt = 0; attempt < 5 && !caught; attempt++) {
        std::string d = tmpdir();
        Out k = run("./fpdt train --device cpu --model medium --seq 32 --steps 1000 --eval-every 0 --save-every 1 --out " + d +
                    " > " + d + "/log 2>&1 & p=$!; "
                    "for i in $(seq 600); do ls " + d + "/ckpt_*[0-9]/manifest.txt >/dev/null 2>&1 && ls " + d +
                    "/*.tmp >/dev/null 2>&1 && break; sleep 0.05; done; kill -9 $p; wait $p; "
                    "ls " + d + "/*.tmp >/dev/null 2>&1 && echo KILLED_MID_WRITE; ls " + d);
        if (k.out.find("KILLED_MID_WRITE") == std::string::npos) continue;  // the write finished first: again
        caught = true;
        Out r = run("./fpdt train --device cpu --model medium --seq 32 --steps 1000 --eval-every 0 --save-every 1 "
                    "--resume --out " + d + " 2>&1 | head -3");
        EXPECT_NE(r.out.find("resumed at step"), std::string::npos) << k.out << r.out;
        EXPECT_EQ(r.out.find("warning"), std::string::npos) << r.out;  // the .tmp is never mistaken for a checkpoint
        EXPECT_NE(run("ls -d " + d + "/*.tmp").rc, 0) << "the killed save's .tmp is still there";
    }
    EXPECT_TRUE(caught) << "never caught a checkpoint mid-write in 5 tries";
}

// ----------------------------------------------------------------------------
// Reliability (issue 10): hostile paths, stale and shared --out directories, FIFOs, full disks.

// --out is never pasted into a shell: quotes and semicolons are just characters of a directory
// name (parents created too), and nothing in the program runs a shell at all.
TEST(Reliability, OutIsNeverAShellCommand) {
    std::string d = tmpdir();
    const std::string evil = d + "/x'; touch " + d + "/PWNED; echo '";
    Out r = run(TINY + "--seq 64 --steps 1 --out \"" + evil + "\"");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(access((d + "/PWNED").c_str(), F_OK), 0) << "the --out string ran as a command";
    EXPECT_EQ(access((evil + "/ckpt_00000001/manifest.txt").c_str(), F_OK), 0) << r.out;
    Out q = run(TINY + "--seq 64 --steps 1 --out \"" + d + "/it's here/deeper\"");
    EXPECT_EQ(q.rc, 0) << q.out;
    Out grep = run("grep -n 'system(\\|popen(\\|exec[lv]p*(\"/bin/sh' *.h *.cu *.cuh data/*.h");
    EXPECT_EQ(grep.out, "") << "a shell in the program's sources";
}

// The case: a fresh run into a directory holding another run's checkpoints is refused
// (it used to be rotated away by them); --overwrite deletes them and starts afresh, and --resume
// then continues the new run. A checkpoint is found by its number, whatever the name's width.
TEST(Reliability, FreshRunIntoOldCheckpointsIsRefusedOrOverwritten) {
    std::string d = tmpdir();
    const std::string out = " --out " + d + "/o";
    ASSERT_EQ(run(TINY + "--seq 64 --steps 4 --save-every 2" + out).rc, 0);
    Out refused = run(TINY + "--seq 64 --steps 4 --save-every 1 --exit-after 3 --lr 1e-3" + out);
    EXPECT_NE(refused.rc, 0);
    EXPECT_NE(refused.out.find("holds checkpoints of an earlier run (ckpt_00000004 and 1 more): continue it with --resume, "
                               "or pass --overwrite"), std::string::npos) << refused.out;
    EXPECT_EQ(count_lines(refused.out), 1) << refused.out;
    Out fresh = run(TINY + "--seq 64 --steps 4 --save-every 1 --exit-after 3 --lr 1e-3 --overwrite" + out);
    ASSERT_EQ(fresh.rc, 0) << fresh.out;
    Out ls = run("ls " + d + "/o | grep -v '^main.log$'");  // main.log: the record of both runs
    EXPECT_EQ(ls.out, "ckpt_00000002\nckpt_00000003\n");  // this run's newest two, nothing of the old run
    ASSERT_EQ(rename((d + "/o/ckpt_00000003").c_str(), (d + "/o/ckpt_3").c_str()), 0);  // any width
    Out resumed = run(TINY + "--seq 64 --steps 4 --lr 1e-3 --resume" + out);
    EXPECT_NE(resumed.out.find("resumed at step 3"), std::string::npos) << resumed.out;
    Out both = run(TINY + "--seq 64 --steps 4 --resume --overwrite" + out);
    EXPECT_NE(both.out.find("choose one"), std::string::npos) << both.out;
}

// Two runs cannot share an --out: the second is refused while the first holds its lock.
TEST(Reliability, OutIsLocked) {
    std::string d = tmpdir();
    Out r = run("(" + TINY + "--seq 64 --steps 100000 --out " + d + "/o > " + d + "/log 2>&1 & p=$!; "
                "for i in $(seq 300); do grep -q 'step 1/' " + d + "/log && break; sleep 0.1; done; " +
                TINY + "--seq 64 --steps 3 --resume --out " + d + "/o; echo rc=$?; kill $p; wait $p)");
    EXPECT_NE(r.out.find("another fpdt run is using it (pid "), std::string::npos) << r.out;
    EXPECT_GT(number_after(r.out, "rc="), 0) << r.out;
}

// A FIFO given as --data (any name) or standing where a checkpoint's files should be is an error
// (or skipped), never a hang.
TEST(Reliability, FifosAreErrorsNotHangs) {
    std::string d = tmpdir();
    for (const char* f : {"/f.txt", "/f.bin", "/f"}) ASSERT_EQ(mkfifo((d + f).c_str(), 0644), 0);
    for (const char* f : {"/f.txt", "/f.bin", "/f"}) {
        Out r = run("timeout 20 " + TINY + "--seq 64 --steps 1 --data " + d + f);
        EXPECT_NE(r.rc, 124) << f << " hung";
        EXPECT_NE(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find("not a regular file"), std::string::npos) << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
    }
    ASSERT_EQ(mkdir((d + "/o").c_str(), 0755), 0);
    ASSERT_EQ(mkfifo((d + "/o/ckpt_00000009").c_str(), 0644), 0);  // a FIFO named like a checkpoint
    ASSERT_EQ(mkdir((d + "/o/ckpt_00000008").c_str(), 0755), 0);
    ASSERT_EQ(mkfifo((d + "/o/ckpt_00000008/manifest.txt").c_str(), 0644), 0);
    for (const std::string& cmd : {TINY + "--seq 64 --steps 1 --resume --out " + d + "/o", "./fpdt sample --out " + d + "/o"}) {
        Out r = run("timeout 20 " + cmd);
        EXPECT_NE(r.rc, 124) << cmd << " hung";
        EXPECT_NE(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find("manifest.txt: not a regular file"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("no valid checkpoint"), std::string::npos) << r.out;
    }
}

// A save that does not fit is refused before it writes, saying how much room it needs; a write
// that fails midway (here a file-size limit) removes its .tmp. Either way the run ends non-zero
// and nothing partial is left. (The first needs a small tmpfs: root only, skipped otherwise.)
TEST(Reliability, FullDiskSaysHowMuchAndLeavesNoTmp) {
    std::string d = tmpdir();
    Out lim = run("ulimit -f 1000; " + TINY + "--seq 64 --steps 1 --out " + d + "/o");
    EXPECT_NE(lim.rc, 0) << lim.out;
    EXPECT_NE(lim.out.find("shard_0.bin failed: File too large (" + d + "/o/ckpt_00000001.tmp removed)"), std::string::npos) << lim.out;
    EXPECT_EQ(run("ls " + d + "/o | grep -v '^main.log$'").out, "") << "something of the failed save is left";
    const std::string mnt = d + "/small";
    ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
    if (run("mount -t tmpfs -o size=1m tmpfs " + mnt).rc != 0) GTEST_SKIP() << "cannot mount a small tmpfs here";
    Out full = run(TINY + "--seq 64 --steps 1 --out " + mnt);
    run("umount " + mnt);
    EXPECT_NE(full.rc, 0) << full.out;
    EXPECT_NE(full.out.find("saving step 1 needs 1.5 MiB (one checkpoint; the newest one before it is kept) but only 1.0 MiB are free"),
              std::string::npos) << full.out;
}

// Smaller things: numbers that would silently become 0, --help with a value, a --trace that
// cannot be written (found before training), a literal file name with glob characters, a shard
// header count of 2^31 or more, a shard that changes under a running job (the file and the step
// named), --seq past the int32 positions in plan, and the gradient norm to 6 significant digits.
TEST(Reliability, SmallerThings) {
    std::string d = tmpdir();
    const std::string T = TINY + "--seq 64 --steps 1 ";
    for (const Bad& c : std::vector<Bad>{
             {T + "--lr 1e-400", "--lr: '1e-400' is too small to be told from 0"},
             {T + "--adam-eps 1e-60", "--adam-eps: '1e-60' is too small"},
             {T + "--help=1", "--help takes no value"},
             {T + "--trace /proc/nope/t.json", "--trace /proc/nope/t.json: cannot open for writing"},
             {"./fpdt plan --model tiny --chunk-size 1 --precision fp32 --seq 2147483648", "positions past 2^31-1"},
             {"./fpdt plan --model tiny --seq 4294967297", "positions past 2^31-1"},
         }) {
        Out r = run(c.args);
        EXPECT_NE(r.rc, 0) << c.args << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.args << "\n" << r.out;
    }
    { std::ofstream(d + "/set[1].txt") << std::string(500, 'z'); }
    Out lit = run(T + "--data '" + d + "/set[1].txt'");
    EXPECT_EQ(lit.rc, 0) << lit.out;
    EXPECT_NE(lit.out.find("set[1].txt"), std::string::npos) << lit.out;
    {
        std::ofstream f(d + "/huge.bin", std::ios::binary);
        std::vector<int32_t> h(256, 0);
        h[0] = 20240520, h[1] = 1, h[2] = (int32_t)0x80000000u;  // 2^31 tokens
        f.write((const char*)h.data(), 1024);
    }
    Out huge = run(T + "--data " + d + "/huge.bin");
    EXPECT_NE(huge.out.find("its header says 2147483648 tokens"), std::string::npos) << huge.out;
    {
        std::ofstream f(d + "/s.bin", std::ios::binary);
        std::vector<int32_t> h(256, 0);
        h[0] = 20240520, h[1] = 1, h[2] = 100000;
        f.write((const char*)h.data(), 1024);
        std::vector<uint16_t> toks(100000, 97);
        f.write((const char*)toks.data(), toks.size() * 2);
    }
    Out changed = run("(" + TINY + "--seq 64 --steps 100000 --data " + d + "/s.bin > " + d + "/log 2>&1 & p=$!; "
                      "for i in $(seq 300); do grep -q 'step 2/' " + d + "/log && break; sleep 0.1; done; "
                      "truncate -s 1100 " + d + "/s.bin; timeout 30 tail --pid=$p -f /dev/null; wait $p; echo rc=$?; cat " + d + "/log)");
    EXPECT_GT(number_after(changed.out, "rc="), 0) << changed.out;
    EXPECT_NE(changed.out.find(d + "/s.bin: read of tokens ["), std::string::npos) << changed.out;
    EXPECT_NE(changed.out.find(") at step "), std::string::npos) << changed.out;
    Out norm = run(T);
    const size_t at = norm.out.find("| norm ");
    ASSERT_NE(at, std::string::npos) << norm.out;
    const std::string value = norm.out.substr(at + 7, norm.out.find(' ', at + 7) - at - 7);
    int digits = 0;
    for (size_t i = 0, lead = 1; i < value.size() && value[i] != 'e'; i++)
        if (isdigit((unsigned char)value[i]) && !(lead && value[i] == '0')) digits++, lead = 0;
    EXPECT_EQ(digits, 6) << value;
}

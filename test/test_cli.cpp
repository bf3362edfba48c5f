// The real program, end to end: training, determinism, chunked/offloaded runs, checkpoints and
// resume, the trace, the planner, and every bad input getting one clear line and a non-zero exit.
#include <gtest/gtest.h>
#include <cmath>
#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include "checkpoint.h"
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

// What the CPU keeps for the backward (--keep-attention, --keep-mlp, its defaults) changes no bit of
// a run: steps after updates, evaluations between them, two sequences a step, chunked and
// offloaded, in both precisions, print the same step and evaluation lines as recomputing all.
TEST(Train, KeepingForTheBackwardChangesNoBitOfARun) {
    const auto lines = [](const std::string& out) {  // step and eval lines, less their times
        std::string kept;
        size_t at = 0;
        while (at < out.size()) {
            size_t end = out.find('\n', at);
            if (end == std::string::npos) end = out.size();
            const std::string line = out.substr(at, end - at);
            if (line.rfind("step ", 0) == 0) kept += line.substr(0, line.rfind(" | ", line.find(" tok/s"))) + "\n";
            if (line.rfind("eval step", 0) == 0) kept += line + "\n";
            at = end + 1;
        }
        return kept;
    };
    for (const char* prec : {"fp32", "bf16"}) {
        const std::string base = "./fpdt train --device cpu --model tiny --seq 128 --chunk-size 32 --offload 1 --steps 6 "
                                 "--eval-every 2 --eval-seqs 2 --batch 2 --log-every 1 --precision " + std::string(prec);
        Out keep = run(base), recompute = run(base + " --keep-attention 0 --keep-mlp 0");
        ASSERT_EQ(keep.rc, 0) << keep.out;
        ASSERT_EQ(recompute.rc, 0) << recompute.out;
        EXPECT_NE(keep.out.find("kept for the backward: attention, mlp"), std::string::npos) << keep.out;
        EXPECT_NE(lines(keep.out).find("eval step 6"), std::string::npos) << keep.out;
        EXPECT_EQ(lines(keep.out), lines(recompute.out)) << prec;
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
// runs: L * u(u+1)/2 in the forward pass, as many again in the backward recompute unless the
// forward's are kept (--keep-attention 1, the CPU's default), and L * u(u+1)/2 backward blocks.
// With u = 4, L = 2: 20, 20 and 20.
TEST(Trace, ChromeJsonWithTracksAndBlockCounts) {
    for (int keep : {1, 0}) {
        std::string d = tmpdir(), f = d + "/trace.json";
        Out r = run(TINY + "--seq 64 --steps 1 --chunk-size 16 --offload 1 --trace " + f + (keep ? "" : " --keep-attention 0"));
        ASSERT_EQ(r.rc, 0) << r.out;
        Out py = run("python3 -c \"import json,sys,collections; d=json.load(open('" + f +
                     "'))['traceEvents']; c=collections.Counter((e['ph'],e.get('tid'),e['name']) for e in d); "
                     "print('tracks', sum(1 for e in d if e['ph']=='M')); "
                     "print('fwd', c[('X',0,'attention block')]); print('bwd', c[('X',0,'attention block backward')]); "
                     "print('in', sum(v for k,v in c.items() if k[1]==1)); print('out', sum(v for k,v in c.items() if k[1]==2)); "
                     "print('comm', sum(v for k,v in c.items() if k[1]==3))\"");
        ASSERT_EQ(py.rc, 0) << py.out;
        EXPECT_EQ(number_after(py.out, "tracks "), 4);
        EXPECT_EQ(number_after(py.out, "fwd "), keep ? 20 : 40);  // the forward (and the recompute), 20 each
        EXPECT_EQ(number_after(py.out, "bwd "), 20);
        EXPECT_GT(number_after(py.out, "in "), 0);
        EXPECT_GT(number_after(py.out, "out "), 0);
        EXPECT_GT(number_after(py.out, "comm "), 0);
    }
}

// Phase 2 of the backward pass fetches kv chunk j + 1's first query-side chunk (q, dO, lse, delta
// and dQ of chunk u - 1) as soon as j's block i = j + 1 is queued, not after j's QKV backward: on
// the GPU a copy-in waits for all compute queued before it, so fetched earlier it runs beside j's
// last block and QKV backward. The CPU backend runs everything in program order, so its trace
// shows the order: in every layer, for every j >= 1, those copy-ins come before the QKV backward
// of j - 1.
TEST(Trace, PhaseTwoFetchesTheNextKvChunksFirstQueriesBeforeTheQkvBackward) {
    const int u = 4, L = 2, COMPUTE = 0, COPY_IN = 1;  // chunks, layers; the trace's tracks (common.h)
    for (int keep : {1, 0}) {  // --keep-attention 1 (the CPU's default): q's store holds every layer's, chunk l u + i
        const std::string f = tmpdir() + "/trace.json";
        Out r = run(TINY + "--seq 256 --steps 1 --chunk-size 64 --offload 1 --trace " + f + (keep ? "" : " --keep-attention 0"));
        ASSERT_EQ(r.rc, 0) << r.out;
        const std::vector<TraceOp> ops = read_trace(f);
        ASSERT_GT(ops.size(), 100u) << r.out;
        for (int l = 0; l < L; l++) {
            std::vector<double> q_last, dq_last, qkv_bwd;  // in trace order: q / dQ copy-ins of chunk u-1, QKV backwards
            const int q_chunk = keep ? l * u + u - 1 : u - 1;
            for (const TraceOp& o : ops) {
                if (o.layer != l) continue;
                if (o.track == COPY_IN && o.chunk == q_chunk && o.name == "store: q") q_last.push_back(o.ts);
                if (o.track == COPY_IN && o.chunk == u - 1 && o.name == "store: dQ") dq_last.push_back(o.ts);
                if (o.track == COMPUTE && o.name == "qkv backward") qkv_bwd.push_back(o.ts);
            }
            ASSERT_EQ(q_last.size(), (size_t)u) << "layer " << l << ", keep " << keep;   // once per kv chunk j
            ASSERT_EQ(dq_last.size(), (size_t)u - 1) << "layer " << l << ", keep " << keep;  // j >= 1 (j = 0 starts dQ at zero)
            ASSERT_EQ(qkv_bwd.size(), (size_t)u) << "layer " << l << ", keep " << keep;
            for (int j = 1; j < u; j++) {
                EXPECT_LT(q_last[j], qkv_bwd[j - 1]) << "layer " << l << ": q of chunk " << u - 1 << " for kv chunk " << j;
                EXPECT_LT(dq_last[j - 1], qkv_bwd[j - 1]) << "layer " << l << ": dQ of chunk " << u - 1 << " for kv chunk " << j;
            }
        }
    }
}

// The CPU keeps what the backward reads (--keep-attention, --keep-mlp) by default where it fits:
// where it does not (here --host-mem between the two runs' needs), the run recomputes it and says
// so in its header; asked for on the command line, it is refused in one line naming the flags.
TEST(Plan, CpuKeepsWhatFitsAndSaysSo) {
    const std::string args = "./fpdt train --device cpu --model tiny --seq 4096 --steps 1 --eval-every 0 --host-mem 0.015";
    Out r = run(args);
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("| kept for the backward: none (the CPU's default keeps attention, mlp where they fit"), std::string::npos)
        << r.out;
    Out k = run(args + " --keep-mlp 1");
    EXPECT_NE(k.rc, 0) << k.out;
    EXPECT_NE(k.out.find("--host-mem allows"), std::string::npos) << k.out;
    EXPECT_NE(k.out.find("or --keep-attention 0 --keep-mlp 0"), std::string::npos) << k.out;
    Out d = run("./fpdt train --device cpu --model tiny --seq 4096 --steps 1 --eval-every 0");
    ASSERT_EQ(d.rc, 0) << d.out;
    EXPECT_NE(d.out.find("| kept for the backward: attention, mlp | "), std::string::npos) << d.out;
}

// `plan` predicts what `train` measures (the issue asks for 10%), in both precisions.
TEST(Plan, PredictsTheMeasuredPeaks) {
    for (const char* cfg : {"--model tiny --seq 256 --chunk-size 64 --offload 1 --precision fp32 --keep-attention 0 --keep-mlp 0",
                            "--model gpt-tiny --seq 128 --precision fp32 --keep-attention 1 --keep-mlp 1",
                            "--model small --seq 512 --chunk-size 128 --offload 1 --precision fp32 --keep-attention 1 --keep-mlp 0",
                            "--model tiny --seq 256 --chunk-size 64 --offload 1 --precision bf16 --keep-attention 0 --keep-mlp 1",
                            "--model small --seq 512 --chunk-size 128 --offload 1 --precision bf16 --keep-attention 1 --keep-mlp 1"}) {
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
    // the CPU's measured peak, and each kernel's share of it (a tiny matmul runs far below the peak:
    // even with the peak measured while another process took a core, past 200% the peak is wrong)
    EXPECT_GT(number_after(r.out, "cpu peak fp32: "), 0) << r.out;
    const size_t mm = r.out.find("matmul fp32 N=64: "), pct = r.out.find("% of peak)", mm);
    ASSERT_NE(pct, std::string::npos) << r.out;
    const double share = atof(r.out.substr(r.out.rfind('(', pct) + 1).c_str());
    EXPECT_GT(share, 0) << r.out;
    EXPECT_LT(share, 200) << r.out;
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
    const std::string resume = TINY + "--seq 64 --steps 1 --resume --out " + d + "/o", sample = "./fpdt sample --out " + d + "/o";
    Out t = run("timeout 20 " + resume);  // a run refuses the FIFO named like a checkpoint
    EXPECT_NE(t.rc, 124) << "hung";
    EXPECT_NE(t.out.find("/o/ckpt_00000009: a FIFO, not a checkpoint directory"), std::string::npos) << t.out;
    EXPECT_EQ(count_lines(t.out), 1) << t.out;
    Out s = run("timeout 20 " + sample);  // sample skips it, saying so
    EXPECT_NE(s.out.find("skipping " + d + "/o/ckpt_00000009: a FIFO"), std::string::npos) << s.out;
    ASSERT_EQ(unlink((d + "/o/ckpt_00000009").c_str()), 0);
    for (const std::string& cmd : {resume, sample}) {
        Out r = run("timeout 20 " + cmd);
        EXPECT_NE(r.rc, 124) << cmd << " hung";
        EXPECT_NE(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find("manifest.txt: not a regular file (a FIFO)"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("no valid checkpoint"), std::string::npos) << r.out;
    }
    EXPECT_NE(s.rc, 124) << "hung";
    EXPECT_NE(s.out.find("no valid checkpoint"), std::string::npos) << s.out;
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

// ----------------------------------------------------------------------------
// Reliability, round three (issue 24): nothing outside --out is deleted or written through a link,
// every file is checked before it is opened, every size before it is allocated.

// A directory outside --out with a file in it, and whether that file is still there.
static std::string victim_dir() {
    const std::string v = tmpdir() + "/victim";
    mkdir(v.c_str(), 0755);
    std::ofstream(v + "/precious.txt") << "not fpdt's";
    return v;
}
static bool intact(const std::string& victim) { return access((victim + "/precious.txt").c_str(), F_OK) == 0; }

// A symbolic link under any name fpdt takes for a checkpoint or a save's leftover (the issue's
// cases: ckpt_00000008, ckpt_00000007.tmp, ckpt_00000007.old.tmp, and a real checkpoint moved
// elsewhere and linked back) is refused by --resume, a fresh run and --overwrite, naming it, and
// nothing it points to is deleted; sample skips it, saying so.
TEST(Reliability, NothingIsDeletedThroughALink) {
    const std::string d = tmpdir() + "/o", v = victim_dir();
    const std::string T = TINY + "--seq 64 --steps 10 --save-every 1 --out " + d;
    ASSERT_EQ(run(T + " --exit-after 6").rc, 0);
    for (const char* name : {"/ckpt_00000008", "/ckpt_00000007.tmp", "/ckpt_00000007.old.tmp"}) {
        ASSERT_EQ(symlink(v.c_str(), (d + name).c_str()), 0);
        for (const std::string& flags : {std::string(" --resume"), std::string(" --overwrite")}) {
            Out r = run(T + flags);
            EXPECT_NE(r.rc, 0) << name << flags << "\n" << r.out;
            EXPECT_NE(r.out.find(d + name + ": a symbolic link, not a checkpoint directory (fpdt neither follows nor deletes it)"),
                      std::string::npos) << name << flags << "\n" << r.out;
            EXPECT_EQ(count_lines(r.out), 1) << r.out;
            EXPECT_TRUE(intact(v)) << name << flags << " deleted a file through the link";
        }
        if (std::string(name) == "/ckpt_00000008")
            for (const std::string& reader : {"./fpdt sample --tokens 2 --out " + d, TINY + "--seq 64 --steps 1 --init " + d}) {
                Out s = run(reader);
                EXPECT_EQ(s.rc, 0) << s.out;
                EXPECT_NE(s.out.find("warning: skipping " + d + name + ": a symbolic link"), std::string::npos) << s.out;
            }
        ASSERT_EQ(unlink((d + name).c_str()), 0);
    }
    // the newest checkpoint moved to "another disk" and linked back: refused, not passed over and emptied
    ASSERT_EQ(rename((d + "/ckpt_00000006").c_str(), (v + "/ckpt_00000006").c_str()), 0);
    ASSERT_EQ(symlink((v + "/ckpt_00000006").c_str(), (d + "/ckpt_00000006").c_str()), 0);
    Out r = run(T + " --resume");
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("ckpt_00000006: a symbolic link"), std::string::npos) << r.out;
    EXPECT_EQ(access((v + "/ckpt_00000006/manifest.txt").c_str(), F_OK), 0) << "the moved checkpoint was emptied";
    EXPECT_EQ(access((v + "/ckpt_00000006/shard_0.bin").c_str(), F_OK), 0) << "the moved checkpoint was emptied";
}

// A copy of ckpt_5 named ckpt_00000009 is not taken for step 9: --resume says it skips it and
// continues from ckpt_6; when the run reaches step 9 it stops rather than delete the copy.
TEST(Reliability, ManifestStepMustMatchTheName) {
    const std::string d = tmpdir() + "/o";
    const std::string T = TINY + "--seq 64 --steps 10 --save-every 1 --out " + d;
    ASSERT_EQ(run(T + " --exit-after 6").rc, 0);
    ASSERT_EQ(run("cp -r " + d + "/ckpt_00000005 " + d + "/ckpt_00000009").rc, 0);
    Out r = run(T + " --resume --exit-after 8");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("warning: skipping " + d + "/ckpt_00000009: its manifest is of step 5, its name says step 9"),
              std::string::npos) << r.out;
    EXPECT_NE(r.out.find("resumed at step 6"), std::string::npos) << r.out;
    Out s = run(T + " --resume");
    EXPECT_NE(s.rc, 0) << s.out;
    EXPECT_NE(s.out.find("cannot save step 9: " + d + "/ckpt_00000009 holds a checkpoint of step 5, which fpdt does not delete"),
              std::string::npos) << s.out;
    EXPECT_EQ(access((d + "/ckpt_00000009/manifest.txt").c_str(), F_OK), 0) << "the copy was deleted";
    EXPECT_EQ(access((d + "/ckpt_00000008/manifest.txt").c_str(), F_OK), 0) << "the newest valid checkpoint went";
}

// Every file fpdt opens is refused with one line when it is a FIFO (which would block forever)
// or, inside --out, a link: the run's log, the lock file, the probe files, the --trace output
// and its temporary, all before the first step. A FIFO given as --trace is not replaced by the
// trace (as root, --trace /dev/null was replaced by a file).
TEST(Reliability, SpecialFilesWhereOutputsGo) {
    const std::string d = tmpdir(), v = victim_dir();
    struct Case {
        std::string make, path, args, expect;  // `make PATH` puts the special file there
    };
    const std::string ln = "ln -s " + v + "/precious.txt";
    for (const Case& c : std::vector<Case>{
             {"mkfifo", d + "/c/.fpdt.lock", "--out " + d + "/c", d + "/c/.fpdt.lock: not a regular file (a FIFO)"},
             {ln, d + "/i/.fpdt.lock", "--out " + d + "/i", d + "/i/.fpdt.lock: not a regular file (a symbolic link)"},
             {ln, d + "/e/.fpdt_probe_0.tmp", "--out " + d + "/e", "e/.fpdt_probe_0.tmp: not a regular file (a symbolic link)"},
             {"mkfifo", d + "/a/main.log", "--out " + d + "/a", d + "/a/main.log: not a regular file (a FIFO)"},
             {ln, d + "/b/main.log", "--out " + d + "/b", d + "/b/main.log: not a regular file (a symbolic link)"},
             {"mkfifo", d + "/f/t.json", "--trace " + d + "/f/t.json", d + "/f/t.json: not a regular file (a FIFO)"},
             {ln, d + "/g/t.json.tmp", "--trace " + d + "/g/t.json", "t.json.tmp: not a regular file (a symbolic link)"},
             {"mknod -m 666 %s c 1 3", d + "/h/t.json", "--trace " + d + "/h/t.json", d + "/h/t.json: not a regular file (a character device)"},
         }) {
        const std::string& path = c.path;
        const std::string make = c.make.find("%s") == std::string::npos ? c.make + " " + path
                                 : c.make.substr(0, c.make.find("%s")) + path + c.make.substr(c.make.find("%s") + 2);
        Out made = run("mkdir -p " + path.substr(0, path.rfind('/')) + " && " + make);
        if (c.make.rfind("mknod", 0) == 0 && made.rc != 0) continue;  // a device node (a /dev/null twin): root only
        ASSERT_EQ(made.rc, 0) << make;
        Out r = run("timeout 30 " + TINY + "--seq 64 --steps 2 " + c.args);
        EXPECT_NE(r.rc, 124) << make << ": hung";
        EXPECT_NE(r.rc, 0) << make << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << make << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << make << "\n" << r.out;
        struct stat st;
        EXPECT_EQ(lstat(path.c_str(), &st), 0);
        EXPECT_FALSE(S_ISREG(st.st_mode)) << path << " was replaced";
    }
    EXPECT_EQ(run("cat " + v + "/precious.txt").out, "not fpdt's") << "written through a link";
}

// A forged but self-consistent checkpoint of 2.7e11 parameters (vocab 2^24, d 2^14), with a
// sparse shard of the size it claims: sample and --init refuse it naming the sizes, before
// allocating (it used to end in std::bad_alloc, SIGABRT).
TEST(Reliability, ForgedSizesAreRefusedBeforeAllocation) {
    const std::string d = tmpdir() + "/forged", c = d + "/ckpt_00000001";
    ASSERT_EQ(run("mkdir -p " + c).rc, 0);
    Manifest m;
    m.cfg = *find_preset("tiny");
    snprintf(m.cfg.name, sizeof m.cfg.name, "forged");
    m.cfg.vocab = 1 << 24, m.cfg.d_model = 1 << 14, m.cfg.n_head = m.cfg.n_kv_head = 128, m.cfg.head_dim = 128, m.cfg.n_layer = 1;
    m.cfg.tie_embeddings = true;
    m.step = 1, m.total_steps = 10, m.seq = 64, m.source = "passkey 2", m.optimizer = 0;
    size_t n = 0;
    param_table(m.cfg, &n);
    ASSERT_GT(n, 2.7e11);
    m.n_params = n;
    m.shards.push_back({0, n, 0});
    std::ofstream(c + "/manifest.txt") << manifest_text(m);
    std::ofstream(c + "/shard_0.bin").close();
    ASSERT_EQ(truncate((c + "/shard_0.bin").c_str(), (off_t)(n * 4)), 0) << "no sparse files here";
    for (const std::string& cmd : {"./fpdt sample --out " + d, TINY + "--seq 64 --steps 1 --init " + d}) {
        Out r = run(cmd);
        EXPECT_EQ(r.rc, 1) << cmd << "\n" << r.out;
        EXPECT_NE(r.out.find(c + ": loading " + std::to_string(n) + " parameters needs 10"), std::string::npos) << cmd << "\n" << r.out;
        EXPECT_NE(r.out.find(" GiB of host memory, more than this machine has ("), std::string::npos) << cmd << "\n" << r.out;
        EXPECT_LE(count_lines(r.out), 2) << r.out;  // the checkpoint skipped, then no valid one
    }
}

// plan's products of counts are 64-bit: (layers + 1) x chunks passes 2^31 at --seq 715827883
// in chunks of 1 token (it used to wrap to 17592185962496 MiB); the host bytes grow by the same
// few hundred bytes per token on both sides of that edge and up to the int32 position limit.
TEST(Reliability, PlanCountsPast2To31) {
    auto host_mib = [](long long seq) {
        Out r = run("./fpdt plan --model tiny --precision fp32 --chunk-size 1 --host-mem 1e6 --seq " + std::to_string(seq));
        EXPECT_EQ(r.rc, 0) << r.out;
        return number_after(r.out, "  host ");
    };
    const double a = host_mib(715827882), b = host_mib(715827883), top = host_mib(2147483647);
    const double per_token = a / 715827882 * 1048576;
    EXPECT_GT(per_token, 100);
    EXPECT_LT(per_token, 4000);
    EXPECT_NEAR(b, a, 0.11) << "one more token, one more chunk";
    EXPECT_NEAR(top / 2147483647 * 1048576, per_token, 1) << top;
    Out longest = run("./fpdt plan --model tiny --precision fp32 --chunk-size 1 --host-mem 1e6 --seq 64");
    EXPECT_NE(longest.out.find("longest sequence that fits at chunk 1: 2147483647 tokens (2147483647 chunks), the int32 position limit"),
              std::string::npos) << longest.out;
}

// What --resume may change is named in the run header, the optimizer's settings included (a run
// may lower its learning rate when it resumes); a changed --rope-theta or --rope-scale is refused
// naming that flag, not --model; --watchdog is checked on one process too.
TEST(Reliability, ResumeNamesWhatChanged) {
    const std::string d = tmpdir() + "/o", T = TINY + "--seq 64 --steps 6 --out " + d;
    ASSERT_EQ(run(T + " --exit-after 3").rc, 0);
    Out r = run(T + " --resume --exit-after 4 --lr 1e-3 --warmup 2 --min-lr-frac 0.2 --weight-decay 0.05 --clip 0.5 "
                    "--beta1 0.8 --beta2 0.9 --adam-eps 1e-7");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("resumed at step 3 (changed since it was saved: lr 0.003 -> 0.001, warmup 1 -> 2, min-lr-frac 1 -> "
                         "0.2, weight-decay 0 -> 0.05, clip 1 -> 0.5, beta1 0.9 -> 0.8, beta2 0.95 -> 0.9, adam-eps 1e-08 -> 1e-07)"),
              std::string::npos) << r.out;
    for (const Bad& c : std::vector<Bad>{
             {T + " --resume --rope-theta 5000", "was made with model.rope_theta 10000, this run has 5000 (--rope-theta; "},
             {T + " --resume --rope-scale 2", "was made with model.rope_scaling none, this run has linear (--rope-scale; "},
             {TINY + "--seq 64 --steps 1 --watchdog nan", "--watchdog: 'nan' is not a whole number"},
         }) {
        Out b = run(c.args);
        EXPECT_NE(b.rc, 0) << c.args << "\n" << b.out;
        EXPECT_NE(b.out.find(c.expect), std::string::npos) << c.args << "\n" << b.out;
        EXPECT_EQ(count_lines(b.out), 1) << c.args << "\n" << b.out;
    }
}

// No std::bad_alloc reaches the user: a checkpoint whose 2^29 parameters the machine could hold
// but this process may not (ulimit -v) is one line, not an abort; and sample's logits at a
// temperature (positions x vocab) are compared with the machine's memory before allocating.
TEST(Reliability, OutOfMemoryIsOneLine) {
    const std::string d = tmpdir() + "/big", c = d + "/ckpt_00000001";
    ASSERT_EQ(run("mkdir -p " + c).rc, 0);
    Manifest m;
    m.cfg = *find_preset("tiny");
    m.cfg.vocab = 1 << 20, m.cfg.d_model = 512, m.cfg.n_head = m.cfg.n_kv_head = 8, m.cfg.head_dim = 64, m.cfg.n_layer = 1;
    m.cfg.tie_embeddings = true;
    m.step = 1, m.total_steps = 10, m.seq = 64, m.source = "passkey 2", m.optimizer = 0;
    size_t n = 0;
    param_table(m.cfg, &n);
    m.n_params = n;
    m.shards.push_back({0, n, 0});
    std::ofstream(c + "/manifest.txt") << manifest_text(m);
    std::ofstream(c + "/shard_0.bin").close();
    ASSERT_EQ(truncate((c + "/shard_0.bin").c_str(), (off_t)(n * 4)), 0);
    for (const std::string& cmd : {"./fpdt sample --out " + d, TINY + "--seq 64 --steps 1 --init " + d}) {
        Out r = run("ulimit -v 1500000; " + cmd);
        EXPECT_EQ(r.rc, 1) << cmd << "\n" << r.out;
        EXPECT_NE(r.out.find("fpdt: out of memory: an allocation failed"), std::string::npos) << cmd << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << cmd << "\n" << r.out;
    }
    // a real checkpoint of a model with a 2^18 vocab (2M parameters), sampled at a temperature
    // over 2^20 positions: 2^38 logits
    const std::string e = tmpdir() + "/wide";
    m.cfg.vocab = 1 << 18, m.cfg.d_model = 8, m.cfg.n_head = m.cfg.n_kv_head = 1, m.cfg.head_dim = 8;
    param_table(m.cfg, &n);
    std::vector<float> w(n, 0.01f);
    m.n_params = n, m.shards = {{0, n, fnv1a(FNV_OFFSET, w.data(), n * 4)}};
    ASSERT_EQ(run("mkdir -p " + e + "/ckpt_00000001").rc, 0);
    std::ofstream(e + "/ckpt_00000001/manifest.txt") << manifest_text(m);
    std::ofstream(e + "/ckpt_00000001/shard_0.bin", std::ios::binary).write((const char*)w.data(), n * 4);
    Out s = run("./fpdt sample --out " + e + " --prompt-ids 1 --tokens 1048576 --temperature 1");
    EXPECT_EQ(s.rc, 1) << s.out;
    EXPECT_NE(s.out.find("--temperature: the logits of 1048592 positions needs 1024.0 GiB of host memory, more than this machine has"),
              std::string::npos) << s.out;
    EXPECT_EQ(count_lines(s.out), 1) << s.out;
}

// A run whose arenas this machine cannot hold is refused before allocating, naming both sizes.
TEST(Reliability, ARunTooBigForTheMachineIsRefused) {
    Out r = run("./fpdt train --device cpu --model llama3-70b --seq 64 --steps 1 --eval-every 0");
    EXPECT_EQ(r.rc, 1) << r.out;
    EXPECT_NE(r.out.find("host memory: this run's arenas needs "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" GiB of host memory, more than this machine has ("), std::string::npos) << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

// plan states the headroom a GPU run keeps outside its device arena (CUDA's kernels and cuBLAS;
// NCCL's buffers too with several ranks), and a GPU fits only with it: a --gpu-mem above the
// arena but below arena + headroom does not fit, one above both does.
TEST(Plan, ShowsTheGpuHeadroomAndFitsWithIt) {
    const std::string cfg = "./fpdt plan --model tiny --seq 256 --chunk-size 64";
    Out one = run(cfg), four = run(cfg + " --gpus 4");
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(four.rc, 0) << four.out;
    const double arena = number_after(one.out, "  device "), room = number_after(one.out, "headroom outside the device arena ");
    const double room4 = number_after(four.out, "headroom outside the device arena ");
    EXPECT_GT(room, 0) << one.out;
    EXPECT_GT(room4, room) << four.out;
    EXPECT_EQ(one.out.find("NCCL"), std::string::npos) << one.out;
    EXPECT_NE(four.out.find(", NCCL "), std::string::npos) << four.out;
    EXPECT_NE(one.out.find("(stated, not yet measured)"), std::string::npos) << one.out;
    auto gib = [](double mib) { return std::to_string(mib / 1024.0); };
    Out tight = run(cfg + " --gpu-mem " + gib(arena + room / 2)), roomy = run(cfg + " --gpu-mem " + gib(arena + room + 1));
    EXPECT_NE(tight.out.find("fits: device NO ("), std::string::npos) << tight.out;
    EXPECT_NE(tight.out.find("no sequence fits at chunk 64"), std::string::npos) << tight.out;
    EXPECT_NE(roomy.out.find("fits: device yes ("), std::string::npos) << roomy.out;
    EXPECT_NE(roomy.out.find(" headroom of "), std::string::npos) << roomy.out;
}

// --device gpu where no GPU can be used: one line saying why. The CUDA build names the runtime's
// answer, the driver's and the runtime's CUDA versions and the device nodes (what tells a missing
// driver from one too old for the runtime); the CPU-only build says it was built without nvcc.
TEST(BadInput, DeviceGpuWithoutAGpuSaysWhy) {
    if (run("nvidia-smi -L").rc == 0) GTEST_SKIP() << "a GPU is visible here";
    Out r = run(TINY + "--seq 64 --steps 1 --device gpu");
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << r.out;
    std::ifstream kind("build/kind");
    std::string k;
    kind >> k;
    if (k == "cuda") {
        EXPECT_NE(r.out.find("--device gpu: no CUDA device is visible ("), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("runtime is CUDA "), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("device nodes"), std::string::npos) << r.out;
    } else {
        EXPECT_NE(r.out.find("CPU-only ./fpdt (built without nvcc)"), std::string::npos) << r.out;
    }
}

// test/gpu_check.sh on a machine without a GPU (this one, CI) fails, with one line that says so,
// and its summary table, instead of passing with no GPU test run; it builds nothing first. (On a
// GPU machine it runs for minutes: not here.)
TEST(GpuCheck, FailsWithAClearLineWithoutAGpu) {
    if (run("nvidia-smi -L || ls /dev/nvidia0").rc == 0) GTEST_SKIP() << "a GPU is visible here";
    const std::string d = tmpdir();
    for (const char* how : {"", " --prebuilt"}) {
        Out r = run("OUT=" + d + " bash test/gpu_check.sh" + how);
        EXPECT_EQ(r.rc, 1) << r.out;
        EXPECT_NE(r.out.find("gpu_check: FAILED: no GPU on this machine"), std::string::npos) << r.out;
        EXPECT_NE(r.out.find("\npreflight    FAILED"), std::string::npos) << r.out;
        EXPECT_EQ(r.out.find("building"), std::string::npos) << r.out;
    }
    Out bad = run("bash test/gpu_check.sh --fast");
    EXPECT_EQ(bad.rc, 2) << bad.out;
    EXPECT_NE(bad.out.find("unknown argument '--fast'"), std::string::npos) << bad.out;
}

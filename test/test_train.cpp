// The training loop's own behaviour, run through the real ./fpdt: the short start of context
// extension (--start-seq), and what a run prints and logs (--log-every, OUT/main.log).
#include <gtest/gtest.h>
#include <fstream>
#include <sstream>
#include "test/cli.h"

static const std::string TINY = "./fpdt train --device cpu --model tiny --eval-every 0 ";

// The start phase is a plain run at the short sequence in as many chunks: its steps print the
// losses of a run at --seq 64 --chunk-size 16 with the same --steps (the learning-rate schedule depends on --steps alone), and the
// main phase continues from its weights and AdamW state, chunked and offloaded.
TEST(Curriculum, StartIsAShortRunAndTheMainPhaseContinuesIt) {
    Out a = run(TINY + "--seq 256 --chunk-size 64 --start-seq 64 --start-steps 8 --steps 10 --seed 3");
    Out b = run(TINY + "--seq 64 --chunk-size 16 --offload 1 --steps 10 --seed 3");
    ASSERT_EQ(a.rc, 0) << a.out;
    ASSERT_EQ(b.rc, 0) << b.out;
    std::vector<std::string> la = loss_lines(a.out), lb = loss_lines(b.out);
    ASSERT_EQ(la.size(), 10u) << a.out;
    ASSERT_EQ(lb.size(), 10u) << b.out;
    for (int i = 0; i < 8; i++) EXPECT_EQ(la[i], lb[i]) << "step " << i + 1;
    EXPECT_NE(la[8], lb[8]);  // from step 9 on the sequence is longer
    EXPECT_NE(a.out.find("start: steps 1-8 at seq 64 (chunk 16: 4 chunks, offload on, lr 0.003)"), std::string::npos) << a.out;
    EXPECT_NE(a.out.find("seq 64 -> 256 from step 9 | chunk 64 (4 chunks) | offload on"), std::string::npos) << a.out;
    // the main phase learns on from the start's weights: its loss is no fresh model's (~5.6)
    std::vector<double> l = losses(a.out);
    EXPECT_LT(l[8], l[0] - 0.3) << a.out;
}

// Stopping inside the start phase and resuming crosses the switch exactly as a run that never
// stopped.
TEST(Curriculum, ResumeAcrossTheSwitchIsExact) {
    const std::string d = tmpdir();
    const std::string args = TINY + "--seq 256 --chunk-size 64 --start-seq 64 --start-steps 3 --steps 5 --seed 4 ";
    Out whole = run(args);
    ASSERT_EQ(run(args + "--exit-after 2 --out " + d).rc, 0);
    Out rest = run(args + "--resume --out " + d);
    ASSERT_EQ(rest.rc, 0) << rest.out;
    std::vector<std::string> lw = loss_lines(whole.out), lr = loss_lines(rest.out);
    ASSERT_EQ(lw.size(), 5u) << whole.out;
    ASSERT_EQ(lr.size(), 3u) << rest.out;
    for (int i = 0; i < 3; i++) EXPECT_EQ(lr[i], lw[i + 2]) << "step " << i + 3;
}

// Several stages (--start-seq 32,64): each runs in turn, in as many chunks as --seq, and switches
// to the next with the weights and AdamW state; the first is a plain run at its sequence.
TEST(Curriculum, StagesRunInTurn) {
    const std::string args = TINY + "--seq 256 --chunk-size 64 --start-seq 32,64 --start-steps 3,6 --steps 8 --seed 5 ";
    Out a = run(args);
    Out b = run(TINY + "--seq 32 --chunk-size 8 --offload 1 --steps 8 --seed 5");
    ASSERT_EQ(a.rc, 0) << a.out;
    ASSERT_EQ(b.rc, 0) << b.out;
    std::vector<std::string> la = loss_lines(a.out), lb = loss_lines(b.out);
    ASSERT_EQ(la.size(), 8u) << a.out;
    for (int i = 0; i < 3; i++) EXPECT_EQ(la[i], lb[i]) << "step " << i + 1;
    EXPECT_NE(la[3], lb[3]);  // from step 4 on the sequence is longer
    EXPECT_NE(a.out.find("start: steps 1-3 at seq 32 (chunk 8: 4 chunks, offload on, lr 0.003), steps 4-6 at seq 64 (chunk "
                         "16: 4 chunks, offload on, lr 0.003), then seq 256 from step 7"),
              std::string::npos) << a.out;
    EXPECT_NE(a.out.find("seq 32 -> 64 from step 4 | chunk 16 (4 chunks) | offload on"), std::string::npos) << a.out;
    EXPECT_NE(a.out.find("seq 64 -> 256 from step 7 | chunk 64 (4 chunks) | offload on"), std::string::npos) << a.out;
    // stopped in the second stage, resumed: the rest as the run that never stopped, across the switch
    const std::string d = tmpdir();
    ASSERT_EQ(run(args + "--exit-after 5 --out " + d).rc, 0);
    Out rest = run(args + "--resume --out " + d);
    ASSERT_EQ(rest.rc, 0) << rest.out;
    std::vector<std::string> lr = loss_lines(rest.out);
    ASSERT_EQ(lr.size(), 3u) << rest.out;
    for (int i = 0; i < 3; i++) EXPECT_EQ(lr[i], la[i + 5]) << "step " << i + 6;
    // a stage that gets no steps is left out of the header, the switches and the identity
    Out skip = run(TINY + "--seq 256 --chunk-size 64 --start-seq 32,64,128 --start-steps 2,2,3 --steps 4 --seed 5");
    ASSERT_EQ(skip.rc, 0) << skip.out;
    EXPECT_NE(skip.out.find("start: steps 1-2 at seq 32 (chunk 8: 4 chunks, offload on, lr 0.003), steps 3-3 at seq 128 "
                            "(chunk 32: 4 chunks, offload on, lr 0.003), then seq 256 from step 4"),
              std::string::npos) << skip.out;
    EXPECT_NE(skip.out.find("seq 32 -> 128 from step 3"), std::string::npos) << skip.out;
    // other stages are another run: --resume refuses the checkpoint, naming the start
    Out other = run(TINY + "--seq 256 --chunk-size 64 --start-seq 32,128 --start-steps 3,6 --steps 8 --seed 5 --resume --out " + d);
    EXPECT_NE(other.rc, 0);
    EXPECT_NE(other.out.find("start-seq 32 for 3 steps, 64 for 3 steps"), std::string::npos) << other.out;
}

// --start-lr: each stage trains at its own peak learning rate (after the warmup), the main phase at
// --lr; the header names each; a resume may change them and says so; a wrong count is one line.
TEST(Curriculum, EachStageAtItsLearningRate) {
    const std::string args = TINY + "--seq 256 --chunk-size 64 --start-seq 32,64 --start-steps 2,4 --steps 6 --warmup 0 "
                                    "--lr 3e-3 --log-every 1 --seed 6 ";
    Out a = run(args + "--start-lr 1e-3,2e-3");
    ASSERT_EQ(a.rc, 0) << a.out;
    EXPECT_NE(a.out.find("steps 1-2 at seq 32 (chunk 8: 4 chunks, offload on, lr 0.001), steps 3-4 at seq 64 (chunk 16: 4 "
                         "chunks, offload on, lr 0.002)"),
              std::string::npos) << a.out;
    const char* want[6] = {"lr 1.000e-03", "lr 1.000e-03", "lr 2.000e-03", "lr 2.000e-03", "lr 3.000e-03", "lr 3.000e-03"};
    std::vector<std::string> steps;
    for (size_t p = a.out.find("step 1/6"); p != std::string::npos; p = a.out.find("\nstep ", p + 1)) steps.push_back(a.out.substr(p, 80));
    ASSERT_EQ(steps.size(), 6u) << a.out;
    for (int k = 0; k < 6; k++) EXPECT_NE(steps[k].find(want[k]), std::string::npos) << steps[k];
    // stopped in the first stage, resumed with other stage rates: the header names the change
    const std::string d = tmpdir();
    ASSERT_EQ(run(args + "--start-lr 1e-3,2e-3 --exit-after 1 --out " + d).rc, 0);
    Out rest = run(args + "--start-lr 5e-4,2e-3 --resume --out " + d);
    ASSERT_EQ(rest.rc, 0) << rest.out;
    EXPECT_NE(rest.out.find("start-lr 0.001,0.002 -> 0.0005,0.002"), std::string::npos) << rest.out;
    Out bad = run(args + "--start-lr 1e-3");
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("--start-lr: 1 value for 2 --start-seq lengths"), std::string::npos) << bad.out;
    EXPECT_EQ(count_lines(bad.out), 1) << bad.out;
    bad = run(args + "--start-lr 1e-3,x");
    EXPECT_NE(bad.out.find("--start-lr: 'x' is not a number"), std::string::npos) << bad.out;
}

TEST(Curriculum, BadStartIsOneLine) {
    Out r = run(TINY + "--seq 256 --chunk-size 64 --start-seq 96 --steps 2");  // 96 is not 4 chunks: one chunk
    EXPECT_EQ(r.rc, 0) << r.out;
    r = run(TINY + "--seq 256 --start-steps 2 --steps 2");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("--start-steps needs --start-seq"), std::string::npos) << r.out;
    r = run(TINY + "--seq 256 --start-seq 512 --steps 2");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("--start-seq"), std::string::npos) << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << r.out;
    for (const auto& c : std::vector<std::pair<std::string, std::string>>{
             {"--start-seq 64,32 --start-steps 1,2", "--start-seq: '64,32' (expected one length, or lengths that grow"},
             {"--start-seq 32,64", "--start-steps: 0 values for 2 --start-seq lengths"},
             {"--start-seq 32,64 --start-steps 2", "--start-steps: 1 value for 2 --start-seq lengths"},
             {"--start-seq 32,64 --start-steps 2,1", "--start-steps: '2,1' (expected last steps that do not decrease)"},
             {"--start-seq 32,x --start-steps 1,2", "--start-seq: 'x' is not a whole number"}}) {
        r = run(TINY + "--seq 256 --steps 2 " + c.first);
        EXPECT_NE(r.rc, 0) << c.first;
        EXPECT_NE(r.out.find(c.second), std::string::npos) << c.first << ": " << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
    }
}

// stdout shows the first 10 steps, every --log-every'th and the last; main.log has every line.
TEST(Log, StepLinesEveryNAndAllInMainLog) {
    const std::string d = tmpdir();
    Out r = run(TINY + "--seq 64 --steps 25 --log-every 10 --out " + d);
    ASSERT_EQ(r.rc, 0) << r.out;
    std::vector<double> shown = losses(r.out);
    EXPECT_EQ(shown.size(), 12u) << r.out;  // 1-10, 20, 25
    EXPECT_NE(r.out.find("step 20/25 | loss"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("step 25/25 | loss"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("step 15/25 | loss"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" elapsed, "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" left"), std::string::npos) << r.out;
    std::ifstream f(d + "/main.log");
    ASSERT_TRUE(f.good());
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string log = ss.str();
    EXPECT_EQ(losses(log).size(), 25u) << log;
    EXPECT_EQ(log.rfind("command: ./fpdt train", 0), 0u) << log;
    EXPECT_NE(log.find("done: 25 steps"), std::string::npos) << log;
    // the auto interval: about 50 lines whatever --steps is
    r = run(TINY + "--seq 32 --steps 200 --eval-every 0");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_EQ(losses(r.out).size(), 10u + 50u - 2u) << r.out;  // 1-10, then every 4th: 12 .. 200
}

// The defaults are the default run: several offloaded chunks of a long sequence after a short start.
TEST(Defaults, TheDefaultRunIsChunkedAndOffloaded) {
    Out r = run("./fpdt train --device cpu --steps 1 --eval-every 0 --start-steps 0");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("seq 4096 | chunk 1024 (4 chunks) | offload on"), std::string::npos) << r.out;
    r = run("./fpdt train --help");
    EXPECT_NE(r.out.find("--start-seq"), std::string::npos);
    EXPECT_NE(r.out.find("--log-every"), std::string::npos);
}

// --doc-mask 1 on data without a BOS inside the window (one text file) prints the losses of --doc-mask 0 to the last digit, and its step
// lines report one document and no block skipped.
TEST(DocMask, WithoutBosInTheWindowEqualsOff) {
    const std::string d = tmpdir(), text = d + "/one.txt";
    std::ofstream(text) << std::string(3000, 'a') + "the quick brown fox jumps over the lazy dog. " + std::string(500, 'z');
    for (const std::string& data : {text}) {
        const std::string args = TINY + "--seq 64 --chunk-size 16 --steps 3 --data " + data;
        Out off = run(args + " --doc-mask 0"), on = run(args + " --doc-mask 1");
        ASSERT_EQ(off.rc, 0) << off.out;
        ASSERT_EQ(on.rc, 0) << on.out;
        EXPECT_EQ(loss_lines(on.out), loss_lines(off.out)) << on.out << off.out;
        EXPECT_EQ(loss_lines(on.out).size(), 3u);
        EXPECT_NE(on.out.find("| docs 1, mean 64 tok, 0.0% of blocks skipped"), std::string::npos) << on.out;
        EXPECT_EQ(off.out.find("| docs "), std::string::npos) << off.out;
    }
}

// Packed passkey documents: on by default, the step lines report the documents and the blocks
// skipped, and two ranks (each finding the BOS tokens among its own, then sharing them) print
// the losses of one; the trace marks the skipped blocks, and the planner counts them for
// documents of one length. A bad spec is one line.
TEST(DocMask, PackedDocumentsSkipBlocksAndRanksAgree) {
    const std::string args = TINY + "--seq 256 --chunk-size 32 --steps 2 --data passkey:docs:24", d = tmpdir();
    Out one = run("OMP_NUM_THREADS=1 " + args + " --trace " + d + "/t.json"), two = run(mpi(2) + args);
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(two.rc, 0) << two.out;
    EXPECT_NE(one.out.find("doc-mask 1: attention within documents"), std::string::npos) << one.out;
    const double skipped = number_after(one.out, "tok, ");
    EXPECT_GT(skipped, 40.0) << one.out;  // documents of ~24 tokens in chunks of 32: most of the 36 blocks
    std::vector<double> l1 = losses(one.out), l2 = losses(two.out);
    ASSERT_EQ(l1.size(), 2u);
    ASSERT_EQ(l2.size(), 2u) << two.out;
    for (int i = 0; i < 2; i++) EXPECT_NEAR(l2[i], l1[i], 1e-5 * l1[i]) << "step " << i + 1;
    std::ifstream tf(d + "/t.json");
    const std::string trace((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
    EXPECT_NE(trace.find("\"attention block skipped\""), std::string::npos);
    Out plan = run("./fpdt plan --model tiny --seq 16384 --chunk-size 2048 --doc-len 1024");
    EXPECT_NE(plan.out.find("documents of 1024 tokens (--doc-mask 1): 28 of 36 attention blocks skipped"), std::string::npos)
        << plan.out;
    Out bad = run(TINY + "--seq 64 --steps 1 --data passkey:docs:x");
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("passkey:docs:N"), std::string::npos) << bad.out;
    EXPECT_EQ(count_lines(bad.out), 1) << bad.out;
    bad = run(TINY + "--seq 64 --steps 1 --doc-bos 5");  // passkey: the mask is off
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("--doc-bos names the token that starts a document: it needs --doc-mask 1"), std::string::npos) << bad.out;
    EXPECT_EQ(count_lines(bad.out), 1) << bad.out;
}

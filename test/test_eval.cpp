// ./fpdt eval end to end: it gives train's evaluation on the same windows, its position buckets
// average back to its mean, two ranks give one rank's numbers, it runs past the trained length
// with --rope-scale, the needle grid, bad input as one line, and plot.py drawing a real run.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include "test/cli.h"

// The checkpoint every test here evaluates: a tiny model trained 20 steps on the passkey task at
// 256 tokens in 4 chunks (made once; its train output is kept for the comparison).
struct Trained {
    std::string dir, out;
};
static const Trained& trained() {
    static Trained t;
    if (t.dir.empty()) {
        t.dir = tmpdir();
        t.out = run("./fpdt train --device cpu --model tiny --seq 256 --chunk-size 64 --steps 20 --eval-every 20 "
                    "--eval-seqs 8 --out " + t.dir).out;
    }
    return t;
}

// The CSV of eval --csv as rows of fields (header left out).
static std::vector<std::vector<std::string>> csv_rows(const std::string& path) {
    std::ifstream f(path);
    std::vector<std::vector<std::string>> rows;
    std::string line;
    std::getline(f, line);
    while (std::getline(f, line)) {
        std::vector<std::string> row;
        std::stringstream s(line);
        for (std::string x; std::getline(s, x, ',');) row.push_back(x);
        rows.push_back(row);
    }
    return rows;
}

// From an "eval ..." line: everything after "| loss " (the loss and, for passkey, the retrieval).
static std::string eval_tail(const std::string& out, const std::string& head) {
    const size_t p = out.find(head);
    if (p == std::string::npos) return "";
    const size_t l = out.find("| loss ", p), e = out.find('\n', p);
    return l < e ? out.substr(l, e - l) : "";
}

static const std::string EVAL = "./fpdt eval --device cpu ";

// Same checkpoint, same held-out sequences (the passkey task's, and a text file's last windows),
// same chunking: the same loss and retrieval as train's final evaluation. The CSV's position
// buckets, weighted by their token counts, give back the mean.
TEST(Eval, GivesTrainsEvaluationAndBucketsAverageToTheMean) {
    const Trained& t = trained();
    ASSERT_NE(eval_tail(t.out, "eval step 20 "), "") << t.out;
    const std::string csv = tmpdir() + "/e.csv";
    Out e = run(EVAL + "--init " + t.dir + " --chunk-size 64 --eval-seqs 8 --csv " + csv);
    ASSERT_EQ(e.rc, 0) << e.out;
    EXPECT_EQ(eval_tail(e.out, "eval | seq 256"), eval_tail(t.out, "eval step 20 ")) << e.out;
    EXPECT_NE(e.out.find("loss by position: <64 "), std::string::npos) << e.out;
    double mean = -1, sum = 0, tokens = 0;
    int buckets = 0;
    for (const auto& r : csv_rows(csv)) {
        ASSERT_EQ(r.size(), 6u);
        if (r[1] == "loss") mean = atof(r[4].c_str());
        if (r[1] == "loss_by_position") sum += atof(r[4].c_str()) * atof(r[5].c_str()), tokens += atof(r[5].c_str()), buckets++;
    }
    EXPECT_EQ(buckets, 3);  // [0, 64), [64, 128), [128, 256)
    EXPECT_EQ(tokens, 8 * 256);
    EXPECT_NEAR(sum / tokens, mean, 1e-6 * mean);
    EXPECT_NEAR(mean, number_after(e.out, "| loss "), 1e-6);

    // a text file: train evaluates its last windows, and so does eval (and says which)
    const std::string d = tmpdir(), text = d + "/t.txt";
    {
        std::ofstream f(text);
        for (int i = 0; i < 300; i++) f << "line " << i << ": the grass is green and the sea is deep.\n";
    }
    Out tr = run("./fpdt train --device cpu --model tiny --seq 128 --chunk-size 32 --steps 4 --eval-every 4 --eval-seqs 3 "
                 "--data " + text + " --out " + d + "/run");
    ASSERT_EQ(tr.rc, 0) << tr.out;
    Out ev = run(EVAL + "--init " + d + "/run --data " + text + " --chunk-size 32 --eval-seqs 3");
    ASSERT_EQ(ev.rc, 0) << ev.out;
    EXPECT_EQ(eval_tail(ev.out, "eval | seq 128"), eval_tail(tr.out, "eval step 4 ")) << tr.out << ev.out;
    struct stat st;
    ASSERT_EQ(stat(text.c_str(), &st), 0);
    const long n = (long)st.st_size;  // byte-level: a token a byte; window j starts at n - 129 - 128 j
    EXPECT_NE(ev.out.find("3 windows, stream tokens [" + std::to_string(n - 1 - 3 * 128) + ", " + std::to_string(n) + ")"),
              std::string::npos) << ev.out;
    EXPECT_NE(ev.out.find("the end, which training (from the start) reads last"), std::string::npos) << ev.out;
}

// Packed documents: eval masks attention between documents as train does (on by default for
// passkey:docs and files), so it gives train's final evaluation; --doc-mask 0 gives another loss.
TEST(Eval, PackedDocumentsAsTrainMasksThem) {
    const std::string d = tmpdir(), data = " --data passkey:docs:24 --chunk-size 32 --eval-seqs 2";
    Out tr = run("./fpdt train --device cpu --model tiny --seq 128 --steps 2 --eval-every 2 --out " + d + data);
    ASSERT_EQ(tr.rc, 0) << tr.out;
    Out ev = run(EVAL + "--init " + d + data), off = run(EVAL + "--init " + d + data + " --doc-mask 0");
    ASSERT_EQ(ev.rc, 0) << ev.out;
    ASSERT_EQ(off.rc, 0) << off.out;
    EXPECT_NE(ev.out.find("doc-mask 1: attention within documents"), std::string::npos) << ev.out;
    EXPECT_EQ(eval_tail(ev.out, "eval | seq 128"), eval_tail(tr.out, "eval step 2 ")) << tr.out << ev.out;
    EXPECT_NE(number_after(off.out, "| loss "), number_after(ev.out, "| loss ")) << off.out;
}

// mpirun -np 2 ./fpdt eval prints one process's numbers (each rank holds half of every chunk).
TEST(Eval, TwoRanksEqualOne) {
    const Trained& t = trained();
    const std::string args = "--init " + t.dir + " --chunk-size 64 --eval-seqs 4 --seq 512 ";
    Out one = run(EVAL + args);
    Out two = run(mpi(2) + EVAL + args);
    ASSERT_EQ(one.rc, 0) << one.out;
    ASSERT_EQ(two.rc, 0) << two.out;
    EXPECT_NE(two.out.find("ranks 2"), std::string::npos) << two.out;
    EXPECT_NEAR(number_after(two.out, "| loss "), number_after(one.out, "| loss "), 2e-6);
    const std::string a = eval_tail(one.out, "eval | seq 512"), b = eval_tail(two.out, "eval | seq 512");
    ASSERT_NE(a, "");
    EXPECT_EQ(a.substr(a.find(" | passkey")), b.substr(b.find(" | passkey")));  // the answers, exactly
    for (const char* bucket : {"<64 ", "<128 ", "<256 ", "<512 "}) {
        const std::string key = std::string("loss by position:");
        const double x = number_after(one.out.substr(one.out.find(key)), bucket), y = number_after(two.out.substr(two.out.find(key)), bucket);
        EXPECT_GT(x, 0) << bucket;
        EXPECT_NEAR(x, y, 1e-4) << bucket;  // printed to 4 decimals
    }
}

// Four times the trained length, positions interpolated by 4: runs chunked and offloaded and
// reports every bucket up to 1024.
TEST(Eval, FourTimesTheLengthWithRopeScale) {
    const Trained& t = trained();
    Out e = run(EVAL + "--init " + t.dir + " --seq 1024 --chunk-size 256 --rope-scale 4 --eval-seqs 2");
    ASSERT_EQ(e.rc, 0) << e.out;
    EXPECT_NE(e.out.find("seq 1024 | chunk 256 (4 chunks) | offload on"), std::string::npos) << e.out;
    EXPECT_NE(e.out.find("positions / 4"), std::string::npos) << e.out;
    EXPECT_NE(e.out.find(" <1K "), std::string::npos) << e.out;
    const double loss = number_after(e.out, "| loss ");
    EXPECT_TRUE(std::isfinite(loss) && loss > 0) << e.out;
}

// The grid: lengths 128 and 256 x depths 0% .. 100%, a table of 11 rows and a CSV of 22 cells,
// each the share of 2 sequences' 5 answer symbols; on the passkey task and on a file's text.
TEST(Eval, NeedleGrid) {
    const Trained& t = trained();
    const std::string d = tmpdir(), text = d + "/t.txt";
    {
        std::ofstream f(text);
        for (int i = 0; i < 100; i++) f << "the sun is yellow. here we go. ";
    }
    for (const std::string& data : {std::string("passkey"), text}) {
        const std::string csv = d + "/n.csv";
        Out e = run(EVAL + "--init " + t.dir + " --needle --seq 256 --chunk-size 64 --eval-seqs 2 --data " + data + " --csv " + csv);
        ASSERT_EQ(e.rc, 0) << e.out;
        EXPECT_NE(e.out.find("depth     128    256\n"), std::string::npos) << e.out;
        EXPECT_NE(e.out.find("\n 100% "), std::string::npos) << e.out;
        auto rows = csv_rows(csv);
        ASSERT_EQ(rows.size(), 22u) << data;
        std::map<std::string, int> cells;
        for (const auto& r : rows) {
            ASSERT_EQ(r.size(), 4u);
            cells[r[0] + "," + r[1]]++;
            const double acc = atof(r[2].c_str());
            EXPECT_TRUE(acc >= 0 && acc <= 1) << r[2];
            EXPECT_EQ(r[3], "10");  // 2 sequences x 5 symbols
        }
        EXPECT_EQ(cells.size(), 22u);
        EXPECT_EQ(cells.count("128,0.0") + cells.count("256,1.0"), 2u);
    }
}

// Each bad input: one line naming the problem, and a non-zero exit.
TEST(Eval, BadInputIsOneLine) {
    const Trained& t = trained();
    const std::string d = tmpdir(), file = d + "/file";
    { std::ofstream(file) << "not a checkpoint"; }
    struct Case {
        std::string args, says;
    } cases[] = {
        {"--seq 256", "eval needs --init DIR"},
        {"--init " + d + "/nothing", "no such directory"},
        {"--init " + file, "a file, not a directory"},
        {"--init " + d, "no valid checkpoint"},
        {"--init " + t.dir + " --seq 250 --chunk-size 64", "250"},
        {"--init " + t.dir + " --needle --seq 384", "--seq must be one of them"},
        {"--init " + t.dir + " --needle --seq 64", "powers of two from 128"},
        {"--init " + t.dir + " --csv " + d + "/no/such/dir/e.csv", "--csv"},
        {"--init " + t.dir + " --eval-seqs 0", "--eval-seqs"},
    };
    for (const Case& c : cases) {
        Out e = run(EVAL + c.args);
        EXPECT_NE(e.rc, 0) << c.args << "\n" << e.out;
        EXPECT_EQ(count_lines(e.out), 1) << c.args << "\n" << e.out;
        EXPECT_NE(e.out.find(c.says), std::string::npos) << c.args << "\n" << e.out;
    }
}

// plot.py on a real run's main.log, two eval CSVs and a needle CSV: three PNGs, not empty.
TEST(Eval, PlotScriptDrawsARealRun) {
    if (run("python3 -c 'import matplotlib'").rc != 0) GTEST_SKIP() << "python3 lacks matplotlib (pip install matplotlib)";
    const Trained& t = trained();
    const std::string d = tmpdir();
    ASSERT_EQ(run(EVAL + "--init " + t.dir + " --eval-seqs 2 --csv " + d + "/a.csv").rc, 0);
    ASSERT_EQ(run(EVAL + "--init " + t.dir + " --eval-seqs 2 --seq 512 --rope-scale 2 --csv " + d + "/b.csv").rc, 0);
    ASSERT_EQ(run(EVAL + "--init " + t.dir + " --eval-seqs 1 --needle --seq 256 --csv " + d + "/n.csv").rc, 0);
    Out p = run("python3 plot.py --out " + d + "/png --log " + t.dir + "/main.log --eval " + d + "/a.csv 'x2 rope=" + d +
                "/b.csv' --needle " + d + "/n.csv");
    ASSERT_EQ(p.rc, 0) << p.out;
    for (const char* png : {"run.png", "loss_by_position.png", "needle.png"}) {
        struct stat st;
        ASSERT_EQ(stat((d + "/png/" + png).c_str(), &st), 0) << png << "\n" << p.out;
        EXPECT_GT(st.st_size, 10000) << png;
    }
    Out bad = run("python3 plot.py --out " + d + "/png --needle " + d + "/a.csv");
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("not a CSV of ./fpdt eval --needle"), std::string::npos) << bad.out;
}

// test_data.cpp: the data sources (data/data.h) on real files in a fresh temporary directory.
// Build: g++ -std=c++17 -O2 -DOMPI_SKIP_MPICXX -I. test/test_data.cpp -lgtest -lgtest_main -pthread
#include <gtest/gtest.h>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <random>

#include "data/data.h"

// ----------------------------------------------------------------------------
// Helpers

// A fresh temporary directory, removed with everything in it at the end of the test.
struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/fpdt_test_data_XXXXXX";
        char* p = mkdtemp(tmpl);
        if (!p) abort();
        path = p;
    }
    ~TempDir() {
        nftw(path.c_str(), [](const char* f, const struct stat*, int, struct FTW*) { return ::remove(f); }, 16,
             FTW_DEPTH | FTW_PHYS);
    }
    std::string file(const std::string& name) const { return path + "/" + name; }
};

// Fresh random inputs each run; the seed is printed with any failure so a run can be repeated.
static uint64_t test_seed() {
    static uint64_t s = std::random_device{}() * 0x100000001ULL ^ std::random_device{}();
    return s;
}

static void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
    FILE* f = fopen(path.c_str(), "wb");
    ASSERT_TRUE(f != nullptr) << path;
    if (!bytes.empty()) {
        ASSERT_EQ(fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
    }
    fclose(f);
}
static void write_text(const std::string& path, const std::string& s) {
    write_bytes(path, std::vector<uint8_t>(s.begin(), s.end()));
}
static void put_le(std::vector<uint8_t>* b, uint32_t v, int bytes) {
    for (int i = 0; i < bytes; i++) b->push_back((uint8_t)(v >> (8 * i)));
}

// An llm.c shard: header (magic, version, count) then tokens of 2 or 4 bytes. count < 0 means
// "the true count"; extra bytes are appended after the tokens (to make a bad file).
static void write_shard(const std::string& path, int32_t magic, int32_t version, const std::vector<int32_t>& toks,
                        int64_t count = -1, size_t extra = 0) {
    int tb = magic == SHARD_MAGIC_U32 ? 4 : 2;
    std::vector<uint8_t> b;
    put_le(&b, (uint32_t)magic, 4);
    put_le(&b, (uint32_t)version, 4);
    put_le(&b, (uint32_t)(count < 0 ? (int64_t)toks.size() : count), 4);
    b.resize(SHARD_HEADER_BYTES, 0);
    for (int32_t t : toks) put_le(&b, (uint32_t)t, tb);
    for (size_t i = 0; i < extra; i++) b.push_back(0xAB);
    write_bytes(path, b);
}

static std::vector<int32_t> random_tokens(std::mt19937_64* rng, size_t n, uint32_t vocab) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = (int32_t)((*rng)() % vocab);  // raw engine output: fine for a test
    return t;
}

// The whole sequence (seq+1 tokens) of one step.
static std::vector<int32_t> read_all(DataSource* d, uint64_t step, size_t seq) {
    std::vector<int32_t> out(seq + 1, -1);
    d->read(step, 0, seq + 1, out.data());
    return out;
}

// The expected window of step k over a stream of N tokens: [o, o+seq+1), o = k*seq mod (N-seq).
// Training step k reads from (k seq) mod (N - seq); held-out sequence j (step HELD_OUT_STEP0 + j)
// counts back from the end, the last window first.
static std::vector<int32_t> expected_window(const std::vector<int32_t>& stream, uint64_t step, size_t seq) {
    const uint64_t m = stream.size() - seq;
    uint64_t o = (uint64_t)((unsigned __int128)step * seq % m);
    if (step >= HELD_OUT_STEP0) o = m - 1 - (uint64_t)((unsigned __int128)(step - HELD_OUT_STEP0) * seq % m);
    return std::vector<int32_t>(stream.begin() + o, stream.begin() + o + seq + 1);
}

// Opens and expects failure; returns the message.
static std::string open_error(const std::string& spec, int vocab, size_t seq) {
    std::string err;
    DataSource* d = data_open(spec, vocab, seq, 1, &err);
    EXPECT_EQ(d, nullptr) << "expected '" << spec << "' to fail";
    delete d;
    EXPECT_EQ(err.find('\n'), std::string::npos) << "one line: " << err;
    return err;
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "message: " << (msg)

// ----------------------------------------------------------------------------
// Tokenizer

TEST(Tokenizer, BytesAndSpecials) {
    std::string s = "Hi \xff\x00\x80!";
    s += '\0';
    std::vector<int32_t> t = encode_bytes(s);
    ASSERT_EQ(t.size(), s.size());
    for (size_t i = 0; i < s.size(); i++) {
        EXPECT_EQ(t[i], (int32_t)(uint8_t)s[i]);
        EXPECT_EQ(decode_token(t[i]), std::string(1, s[i]));
    }
    EXPECT_EQ(t[3], 255);  // bytes are unsigned
    EXPECT_EQ(decode_token(TOK_BOS), "<BOS>");
    EXPECT_EQ(decode_token(TOK_KEY), "<KEY>");
    EXPECT_EQ(decode_token(TOK_QUERY), "<QUERY>");
    EXPECT_EQ(decode_token(TOK_PAD), "<PAD>");
    EXPECT_EQ(BYTE_VOCAB, TOK_PAD + 1);
}

// ----------------------------------------------------------------------------
// Shards

TEST(Shards, RoundTripUint16) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed());
    TempDir dir;
    const int vocab = 50257;
    const size_t seq = 100;
    std::vector<int32_t> toks = random_tokens(&rng, 1000, vocab);
    write_shard(dir.file("a.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks);
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("a.bin"), vocab, seq, 7, &err));
    ASSERT_TRUE(d) << err;
    EXPECT_HAS(d->describe(), "1000 tokens");
    EXPECT_EQ(read_all(d.get(), 0, seq), std::vector<int32_t>(toks.begin(), toks.begin() + seq + 1));
    for (uint64_t k : {1, 2, 5, 9, 10, 11, 123})
        EXPECT_EQ(read_all(d.get(), k, seq), expected_window(toks, k, seq)) << "step " << k;
    std::vector<size_t> pos, dist;
    EXPECT_FALSE(d->answer(0, &pos, &dist));  // plain data has no answer
}

TEST(Shards, RoundTripUint32) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 1);
    TempDir dir;
    const int vocab = 128256;  // above 65535: needs the 4-byte path
    const size_t seq = 64;
    std::vector<int32_t> toks = random_tokens(&rng, 500, vocab);
    toks[3] = vocab - 1;  // the largest legal id
    write_shard(dir.file("llama.bin"), SHARD_MAGIC_U32, SHARD_VERSION_U32, toks);
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("llama.bin"), vocab, seq, 7, &err));
    ASSERT_TRUE(d) << err;
    for (uint64_t k = 0; k < 20; k++) EXPECT_EQ(read_all(d.get(), k, seq), expected_window(toks, k, seq));
}

TEST(Shards, GlobConcatenatesInSortedOrder) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 2);
    TempDir dir;
    const int vocab = 1000;
    const size_t seq = 50;
    // written out of order and with different sizes (one smaller than a window) on purpose
    std::vector<int32_t> t2 = random_tokens(&rng, 70, vocab), t0 = random_tokens(&rng, 33, vocab),
                         t1 = random_tokens(&rng, 120, vocab);
    write_shard(dir.file("shard_02.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, t2);
    write_shard(dir.file("shard_00.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, t0);
    write_shard(dir.file("shard_01.bin"), SHARD_MAGIC_U32, SHARD_VERSION_U32, t1);  // kinds may mix
    write_text(dir.file("notes.txt"), "not matched by the glob");
    std::vector<int32_t> stream = t0;
    stream.insert(stream.end(), t1.begin(), t1.end());
    stream.insert(stream.end(), t2.begin(), t2.end());

    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("shard_*.bin"), vocab, seq, 7, &err));
    ASSERT_TRUE(d) << err;
    EXPECT_HAS(d->describe(), "3 shards, 223 tokens");
    // enough steps to wrap around the stream several times
    for (uint64_t k = 0; k < 40; k++)
        EXPECT_EQ(read_all(d.get(), k, seq), expected_window(stream, k, seq)) << "step " << k;
}

TEST(Shards, WindowWalksAndWraps) {
    TempDir dir;
    // token i is i, so a window's first token is its offset
    std::vector<int32_t> toks(50);
    for (int i = 0; i < 50; i++) toks[i] = i + 1;  // (+1: never zeros)
    write_shard(dir.file("w.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks);
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("w.bin"), 100, 16, 7, &err));
    ASSERT_TRUE(d) << err;
    // o = (k*16) mod (50-16=34): 0, 16, 32, 14, 30, 12, ...; every window fits: o+17 <= 50
    const int expect_o[] = {0, 16, 32, 14, 30, 12, 28, 10};
    for (int k = 0; k < 8; k++) {
        std::vector<int32_t> w = read_all(d.get(), k, 16);
        EXPECT_EQ(w.front(), expect_o[k] + 1) << "step " << k;
        EXPECT_EQ(w.back(), expect_o[k] + 17) << "step " << k;
    }
    // held out: the last window first, then back by seq, wrapping; training reads them last
    EXPECT_EQ(read_all(d.get(), HELD_OUT_STEP0, 16).back(), 50);
    EXPECT_EQ(read_all(d.get(), HELD_OUT_STEP0 + 1, 16).back(), 34);
    for (uint64_t j = 0; j < 6; j++) EXPECT_EQ(read_all(d.get(), HELD_OUT_STEP0 + j, 16), expected_window(toks, HELD_OUT_STEP0 + j, 16));
    // a huge step number: the product must not overflow 64 bits into a wrong window
    uint64_t big = (1ULL << 62) + 3;
    EXPECT_EQ(read_all(d.get(), big, 16), expected_window(toks, big, 16));
    // exactly seq+1 tokens: every step reads the whole stream
    write_shard(dir.file("x.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, std::vector<int32_t>(toks.begin(), toks.begin() + 17));
    std::unique_ptr<DataSource> e(data_open(dir.file("x.bin"), 100, 16, 7, &err));
    ASSERT_TRUE(e) << err;
    EXPECT_EQ(read_all(e.get(), 5, 16), std::vector<int32_t>(toks.begin(), toks.begin() + 17));
}

// A rank that reads [start, start+n) must see exactly the slice of what a rank reading all sees.
static void check_subranges(DataSource* d, size_t seq, std::mt19937_64* rng, int trials, uint64_t step0 = 0) {
    for (int t = 0; t < trials; t++) {
        uint64_t step = step0 + (*rng)() % 1000;
        std::vector<int32_t> all = read_all(d, step, seq);
        size_t start = (*rng)() % (seq + 2);  // start may be seq+1 (then n is 0)
        size_t n = (*rng)() % (seq + 2 - start);
        std::vector<int32_t> part(n + 1, -7);  // one guard element past the end
        d->read(step, start, n, part.data());
        ASSERT_EQ(part[n], -7) << "wrote past n";
        part.pop_back();
        ASSERT_EQ(part, std::vector<int32_t>(all.begin() + start, all.begin() + start + n))
            << "step " << step << " start " << start << " n " << n;
    }
}

TEST(Shards, SubRangeEqualsSliceOfFullRead) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 3);
    TempDir dir;
    for (int i = 0; i < 4; i++)
        write_shard(dir.file("s" + std::to_string(i) + ".bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16,
                    random_tokens(&rng, 40 + rng() % 100, 50257));
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("s*.bin"), 50257, 90, 7, &err));
    ASSERT_TRUE(d) << err;
    check_subranges(d.get(), 90, &rng, 300);
}

TEST(ReadDeath, OutsideTheSequenceExits) {
    TempDir dir;
    write_text(dir.file("t.txt"), "some text that is long enough for a small window");
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("t.txt"), 260, 8, 7, &err));
    ASSERT_TRUE(d) << err;
    std::vector<int32_t> out(20);
    EXPECT_EXIT(d->read(0, 5, 5, out.data()), ::testing::ExitedWithCode(1), "outside the sequence of 9 tokens");
}

// ----------------------------------------------------------------------------
// Errors: nullptr and one line that names the file or value.

TEST(Errors, MissingFile) {
    TempDir dir;
    std::string e = open_error(dir.file("nope.bin"), 50257, 16);
    EXPECT_HAS(e, "nope.bin");
    EXPECT_HAS(e, "No such file");
    e = open_error(dir.file("nope.txt"), 300, 16);
    EXPECT_HAS(e, "nope.txt");
}

TEST(Errors, Unreadable) {
    TempDir dir;
    // a directory is never a valid data file (works as root too)
    mkdir(dir.file("d.bin").c_str(), 0755);
    std::string e = open_error(dir.file("d.bin"), 50257, 16);
    EXPECT_HAS(e, "d.bin");
    EXPECT_HAS(e, "not a regular file");
    // permission denied: root reads anything, so only as a normal user
    if (geteuid() != 0) {
        write_shard(dir.file("locked.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, std::vector<int32_t>(100, 5));
        chmod(dir.file("locked.bin").c_str(), 0);
        e = open_error(dir.file("locked.bin"), 50257, 16);
        EXPECT_HAS(e, "locked.bin");
        EXPECT_HAS(e, "cannot open");
    }
}

TEST(Errors, BadHeader) {
    TempDir dir;
    std::vector<int32_t> toks(100, 42);
    write_shard(dir.file("magic.bin"), 12345, 1, toks);
    std::string e = open_error(dir.file("magic.bin"), 50257, 16);
    EXPECT_HAS(e, "magic.bin");
    EXPECT_HAS(e, "bad magic 12345 (expected 20240520 or 20240801)");

    write_shard(dir.file("ver.bin"), SHARD_MAGIC_U16, 7, toks);  // the uint32 version with the uint16 magic
    e = open_error(dir.file("ver.bin"), 50257, 16);
    EXPECT_HAS(e, "ver.bin");
    EXPECT_HAS(e, "bad version 7");
    EXPECT_HAS(e, "expected 1");

    write_shard(dir.file("ver32.bin"), SHARD_MAGIC_U32, 1, toks);
    e = open_error(dir.file("ver32.bin"), 50257, 16);
    EXPECT_HAS(e, "expected 7");

    write_shard(dir.file("zero.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, {}, 0);
    e = open_error(dir.file("zero.bin"), 50257, 16);
    EXPECT_HAS(e, "zero.bin");
    EXPECT_HAS(e, "0 tokens");

    write_bytes(dir.file("tiny.bin"), std::vector<uint8_t>(100, 1));
    e = open_error(dir.file("tiny.bin"), 50257, 16);
    EXPECT_HAS(e, "tiny.bin");
    EXPECT_HAS(e, "100 bytes");
}

TEST(Errors, WrongSize) {
    TempDir dir;
    std::vector<int32_t> toks(100, 42);
    write_shard(dir.file("trunc.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks, 150);  // says 150, has 100
    std::string e = open_error(dir.file("trunc.bin"), 50257, 16);
    EXPECT_HAS(e, "trunc.bin");
    EXPECT_HAS(e, "1224 bytes");  // 1024 + 100*2, what it is
    EXPECT_HAS(e, "1324 bytes");  // 1024 + 150*2, what the header says
    EXPECT_HAS(e, "truncated");

    write_shard(dir.file("trail.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks, -1, 3);
    e = open_error(dir.file("trail.bin"), 50257, 16);
    EXPECT_HAS(e, "trail.bin");
    EXPECT_HAS(e, "1227 bytes");
    EXPECT_HAS(e, "1224 bytes");
    EXPECT_HAS(e, "trailing");
}

TEST(Errors, TokenAboveVocab) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 4);
    TempDir dir;
    // big enough that the bad id lies past the first 1 MiB scan chunk
    std::vector<int32_t> toks = random_tokens(&rng, 700000, 1000);
    toks[654321] = 1000;
    write_shard(dir.file("ids.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks);
    std::string e = open_error(dir.file("ids.bin"), 1000, 16);
    EXPECT_HAS(e, "ids.bin");
    EXPECT_HAS(e, "token 654321");
    EXPECT_HAS(e, "id 1000");
    EXPECT_HAS(e, "vocab size 1000");
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("ids.bin"), 1001, 16, 7, &err));  // one more fits
    EXPECT_TRUE(d) << err;
}

TEST(Errors, TooFewTokensForSeq) {
    TempDir dir;
    write_shard(dir.file("short.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, std::vector<int32_t>(64, 9));
    std::string e = open_error(dir.file("short.bin"), 50257, 64);
    EXPECT_HAS(e, "short.bin has 64 tokens; --seq 64 needs at least 65");
    write_text(dir.file("short.txt"), "abc");
    e = open_error(dir.file("short.txt"), 300, 3);
    EXPECT_HAS(e, "short.txt has 3 tokens; --seq 3 needs at least 4");
}

TEST(Errors, TextNeedsByteVocab) {
    TempDir dir;
    write_text(dir.file("t.txt"), "hello there, a text file");
    std::string e = open_error(dir.file("t.txt"), 259, 8);
    EXPECT_HAS(e, "t.txt");
    EXPECT_HAS(e, "vocab >= 260");
    EXPECT_HAS(e, "259");
}

TEST(Errors, MixedGlob) {
    TempDir dir;
    write_shard(dir.file("m1.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, std::vector<int32_t>(100, 3));
    write_text(dir.file("m2.txt"), "some text");
    std::string e = open_error(dir.file("m*"), 50257, 16);
    EXPECT_HAS(e, "m1.bin");
    EXPECT_HAS(e, "m2.txt");
    EXPECT_HAS(e, "both");
}

TEST(Errors, GlobMatchesNothing) {
    TempDir dir;
    std::string e = open_error(dir.file("none_*.bin"), 50257, 16);
    EXPECT_HAS(e, "no files match");
    EXPECT_HAS(e, "none_*.bin");
}

TEST(Errors, UnknownTask) {
    std::string e = open_error("paskey", 300, 64);
    EXPECT_HAS(e, "'paskey'");
    EXPECT_HAS(e, "passkey");
}

TEST(Errors, EmptyText) {
    TempDir dir;
    write_text(dir.file("e1.txt"), "");
    write_text(dir.file("e2.txt"), "");
    std::string e = open_error(dir.file("e*.txt"), 300, 8);
    EXPECT_HAS(e, "empty");
    e = open_error(dir.file("e1.txt"), 300, 8);
    EXPECT_HAS(e, "e1.txt is empty");
}

TEST(Errors, BadArguments) {
    EXPECT_HAS(open_error("passkey", 300, 0), "--seq");
    EXPECT_HAS(open_error("passkey", 0, 64), "vocab 0");
}

// ----------------------------------------------------------------------------
// Plain text

TEST(Text, BytesAndBosBetweenFiles) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 5);
    TempDir dir;
    std::string a = "First file: \xc3\xa9t\xc3\xa9.\n", b, c = "third";
    for (int i = 0; i < 40; i++) b += (char)(1 + rng() % 255);  // any bytes, fresh each run
    write_text(dir.file("t1.txt"), a);
    write_text(dir.file("t2.txt"), b);
    write_text(dir.file("t2b.txt"), "");  // empty: skipped, no double BOS
    write_text(dir.file("t3.txt"), c);
    std::vector<int32_t> stream = encode_bytes(a);
    stream.push_back(TOK_BOS);
    for (int32_t t : encode_bytes(b)) stream.push_back(t);
    stream.push_back(TOK_BOS);
    for (int32_t t : encode_bytes(c)) stream.push_back(t);

    const size_t seq = 30;
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("t*.txt"), BYTE_VOCAB, seq, 7, &err));
    ASSERT_TRUE(d) << err;
    EXPECT_HAS(d->describe(), "3 text files");
    EXPECT_HAS(d->describe(), std::to_string(stream.size()) + " tokens");
    for (uint64_t k = 0; k < 12; k++)
        EXPECT_EQ(read_all(d.get(), k, seq), expected_window(stream, k, seq)) << "step " << k;
    check_subranges(d.get(), seq, &rng, 200);

    // a single text file has no BOS at all, and a name without .txt is text too
    write_text(dir.file("README"), a + b);
    std::unique_ptr<DataSource> e(data_open(dir.file("README"), 300, seq, 7, &err));
    ASSERT_TRUE(e) << err;
    std::vector<int32_t> ab = encode_bytes(a + b);
    EXPECT_EQ(read_all(e.get(), 0, seq), std::vector<int32_t>(ab.begin(), ab.begin() + seq + 1));
}

// ----------------------------------------------------------------------------
// The passkey task

static std::unique_ptr<DataSource> passkey(size_t seq, uint64_t seed) {
    std::string err;
    std::unique_ptr<DataSource> d(data_open("passkey", BYTE_VOCAB, seq, seed, &err));
    EXPECT_TRUE(d) << err;
    return d;
}

// Which of the five key alphabets holds byte t: 0..4, or -1 for none.
static int passkey_alphabet(int32_t t) {
    if (t < 0 || t >= 256 || t == 0) return -1;
    for (int a = 0; a < 5; a++)
        if (strchr(PASSKEY_SYMBOLS[a], (char)t)) return a;
    return -1;
}

// What one passkey sequence holds, after checking what every step must hold (BOS at 0 and only
// there, one key at a legal depth followed by one symbol from each alphabet, the final question
// filling the last 10 tokens with each key symbol after its marker, answer() consistent with it,
// every question after the key and repeating its symbols, no two inserts overlapping, and key
// symbols and markers nowhere else).
struct PasskeySeq {
    size_t key = 0;
    std::vector<size_t> queries;  // every TOK_QUERY, ascending; the last is the final question
};
static const size_t KEY_LEN = 6, QUESTION_LEN = 10;  // TOK_KEY k1..k5; TOK_QUERY k1 < k2 = k3 > k4 @ k5
static bool passkey_mark(int32_t t) {
    for (int j = 1; j < 5; j++)
        if (t == PASSKEY_MARKS[j]) return true;
    return false;
}
static void check_passkey_seq(DataSource* d, uint64_t step, size_t seq, PasskeySeq* out) {
    SCOPED_TRACE("step " + std::to_string(step) + " seq " + std::to_string(seq));
    std::vector<int32_t> x = read_all(d, step, seq);
    ASSERT_EQ(x[0], TOK_BOS);
    std::vector<size_t> keys, queries;
    for (size_t i = 0; i < x.size(); i++) {
        ASSERT_TRUE(x[i] >= 0 && x[i] < BYTE_VOCAB) << x[i] << " at " << i;
        ASSERT_NE(x[i], TOK_PAD) << i;
        if (x[i] == TOK_BOS) {
            ASSERT_EQ(i, 0u);
        }
        if (x[i] == TOK_KEY) keys.push_back(i);
        if (x[i] == TOK_QUERY) queries.push_back(i);
    }
    ASSERT_EQ(keys.size(), 1u);
    ASSERT_GE(queries.size(), 1u);
    const size_t key = keys[0];
    ASSERT_GE(key, 1u);
    ASSERT_LE(key, seq + 1 - KEY_LEN - QUESTION_LEN);
    ASSERT_EQ(queries.back(), seq + 1 - QUESTION_LEN);  // the final question fills the last 10 tokens
    // symbol j of the key is from alphabet j-1
    for (size_t j = 1; j <= 5; j++) ASSERT_EQ(passkey_alphabet(x[key + j]), (int)j - 1) << "symbol " << j;
    // every question comes after the key's insert, repeats its symbols each after its marker, and
    // overlaps no other insert
    std::vector<bool> in_insert(x.size(), false);
    for (size_t j = 0; j < KEY_LEN; j++) in_insert[key + j] = true;
    for (size_t qi = 0; qi < queries.size(); qi++) {
        size_t q = queries[qi];
        ASSERT_GE(q, key + KEY_LEN) << "question at " << q << " before the key's insert ends";
        ASSERT_LE(q + QUESTION_LEN, seq + 1);
        if (qi + 1 < queries.size()) {
            ASSERT_LE(q + QUESTION_LEN, queries[qi + 1]) << "questions at " << q << " overlap";
        }
        for (size_t j = 1; j <= 5; j++) {
            ASSERT_EQ(x[q + 2 * j - 1], x[key + j]) << "question at " << q << ", symbol " << j;
            if (j > 1) {
                ASSERT_EQ(x[q + 2 * j - 2], PASSKEY_MARKS[j - 1]) << "question at " << q << ", marker " << j;
            }
        }
        for (size_t j = 0; j < QUESTION_LEN; j++) {
            ASSERT_FALSE(in_insert[q + j]) << q + j;
            in_insert[q + j] = true;
        }
    }
    // outside the inserts: filler only, never a key symbol or a marker
    for (size_t i = 1; i < x.size(); i++)
        if (!in_insert[i]) {
            ASSERT_EQ(passkey_alphabet(x[i]), -1) << "key symbol " << (char)x[i] << " in the filler at " << i;
            ASSERT_FALSE(passkey_mark(x[i])) << "marker " << (char)x[i] << " in the filler at " << i;
        }
    // answer(): the 5 symbol positions of the final question, each with the distance key -> question
    const size_t q = seq + 1 - QUESTION_LEN;
    std::vector<size_t> pos, dist;
    ASSERT_TRUE(d->answer(step, &pos, &dist));
    ASSERT_EQ(pos, (std::vector<size_t>{q + 1, q + 3, q + 5, q + 7, q + 9}));
    ASSERT_EQ(pos.back(), seq);
    ASSERT_EQ(dist, std::vector<size_t>(5, q - key));
    for (size_t j = 0; j < 5; j++) ASSERT_EQ(x[pos[j]], x[key + 1 + j]);
    out->key = key;
    out->queries = queries;
}

TEST(Passkey, Deterministic) {
    const size_t seq = 1000;
    std::unique_ptr<DataSource> a = passkey(seq, test_seed()), b = passkey(seq, test_seed());
    std::unique_ptr<DataSource> c = passkey(seq, test_seed() + 1);
    EXPECT_HAS(a->describe(), "passkey");
    for (uint64_t k0 : {(uint64_t)0, PASSKEY_EVAL_STEP0}) {
        for (uint64_t k = k0; k < k0 + 20; k++) {
            std::vector<int32_t> x = read_all(a.get(), k, seq);
            EXPECT_EQ(x, read_all(a.get(), k, seq));      // again, same object
            EXPECT_EQ(x, read_all(b.get(), k, seq));      // same seed, another object
            EXPECT_NE(x, read_all(a.get(), k + 1, seq));  // the next step differs
            EXPECT_NE(x, read_all(c.get(), k, seq));      // another seed differs
        }
    }
    // the held-out sequences are not the training sequences
    EXPECT_NE(read_all(a.get(), 0, seq), read_all(a.get(), PASSKEY_EVAL_STEP0, seq));
}

TEST(Passkey, EvalLayoutAndAnswer) {
    const size_t seq = 4096;
    std::unique_ptr<DataSource> d = passkey(seq, test_seed());
    size_t min_key = seq, max_key = 0;
    std::vector<int> seen[5];  // how often each symbol of each alphabet occurs in the key
    for (auto& v : seen) v.assign(10, 0);
    for (uint64_t k = 0; k < 200; k++) {
        uint64_t step = PASSKEY_EVAL_STEP0 + k;
        PasskeySeq s;
        check_passkey_seq(d.get(), step, seq, &s);
        if (HasFatalFailure()) return;
        // held out: exactly one question, the final one
        ASSERT_EQ(s.queries, std::vector<size_t>{seq + 1 - QUESTION_LEN}) << "step " << step;
        min_key = std::min(min_key, s.key);
        max_key = std::max(max_key, s.key);
        std::vector<int32_t> x = read_all(d.get(), step, seq);
        for (int j = 0; j < 5; j++) seen[j][strchr(PASSKEY_SYMBOLS[j], (char)x[s.key + 1 + j]) - PASSKEY_SYMBOLS[j]]++;
    }
    // the key depth is spread over the sequence (200 uniform draws over ~4085 places)
    EXPECT_LT(min_key, seq / 4);
    EXPECT_GT(max_key, 3 * seq / 4);
    // each symbol draws on its whole alphabet (200 draws over 10: each symbol ~20 times)
    for (int j = 0; j < 5; j++)
        for (int v = 0; v < 10; v++) EXPECT_GT(seen[j][v], 0) << "symbol " << j << " never " << PASSKEY_SYMBOLS[j][v];
}

TEST(Passkey, TrainingHasPracticeQuestions) {
    const size_t seq = 4096;
    std::unique_ptr<DataSource> d = passkey(seq, test_seed());
    int with_several = 0;  // sequences with at least 3 practice questions
    size_t most = 0, farthest = 0;  // over the long spans
    for (uint64_t k = 0; k < 200; k++) {
        PasskeySeq s;
        check_passkey_seq(d.get(), k, seq, &s);
        if (HasFatalFailure()) return;
        const size_t practice = s.queries.size() - 1, lo = s.key + KEY_LEN, hi = seq + 1 - QUESTION_LEN;
        for (size_t q = 0; q + 1 < s.queries.size(); q++) {  // in order, inside the span, never overlapping
            ASSERT_GE(s.queries[q], lo);
            ASSERT_GE(s.queries[q + 1], s.queries[q] + QUESTION_LEN);
        }
        if ((hi - lo) / 64 > 8) {
            // a long span: question m at a distance in [32 2^m, 48 2^m) after the key, as many as fit
            for (size_t m = 0; m < practice; m++) {
                ASSERT_GE(s.queries[m] - lo, 32u << m) << "step " << k << " question " << m;
                ASSERT_LT(s.queries[m] - lo, 48u << m) << "step " << k << " question " << m;
            }
            ASSERT_GT(lo + (48u << practice) - 1 + QUESTION_LEN, hi) << "step " << k << ": room for one more question";
            if (practice) farthest = std::max(farthest, s.queries[practice - 1] - lo);
            most = std::max(most, practice);
        } else {
            ASSERT_LE(practice, 8u) << "step " << k << " key " << s.key;  // a short span: up to 8 tries
        }
        with_several += practice >= 3;
    }
    // a key at a uniform depth leaves room for several questions in most sequences; only a key in
    // the last ~5% of the sequence leaves fewer than 3
    EXPECT_GE(with_several, 170) << "of 200 training sequences";
    EXPECT_EQ(most, 7u);            // a shallow key: questions from 32 to 2048-3071 tokens after it
    EXPECT_GE(farthest, 2048u);     // practice at the distances the held-out question asks about
}

TEST(Passkey, FillerIsText) {
    const size_t seq = 2000;
    std::unique_ptr<DataSource> d = passkey(seq, test_seed());
    for (uint64_t step : {(uint64_t)3, PASSKEY_EVAL_STEP0 + 3}) {
        std::vector<int32_t> x = read_all(d.get(), step, seq);
        // mask out the inserts (the key, the questions)
        std::vector<bool> insert(x.size(), false);
        for (size_t i = 0; i < x.size(); i++)
            if (x[i] == TOK_KEY || x[i] == TOK_QUERY)
                for (size_t j = 0; j < (x[i] == TOK_KEY ? KEY_LEN : QUESTION_LEN) && i + j < x.size(); j++) insert[i + j] = true;
        std::string s;
        for (size_t i = 1; i < x.size(); i++)
            if (!insert[i]) s += (char)x[i];
        // easy lowercase sentences, and nothing from a key alphabet
        for (char ch : s) ASSERT_TRUE(ch == ' ' || ch == '.' || (ch >= 'a' && ch <= 'z')) << (int)ch;
        EXPECT_NE(s.find(". the "), std::string::npos) << s.substr(0, 200);
        EXPECT_GT(s.size(), seq / 2);
    }
}

TEST(Passkey, SubRangeEqualsSliceOfFullRead) {
    SCOPED_TRACE("seed " + std::to_string(test_seed()));
    std::mt19937_64 rng(test_seed() + 6);
    for (size_t seq : {32, 33, 257, 5000}) {
        std::unique_ptr<DataSource> d = passkey(seq, test_seed());
        check_subranges(d.get(), seq, &rng, 300, 0);                   // training: with practice
        check_subranges(d.get(), seq, &rng, 300, PASSKEY_EVAL_STEP0);  // held out
    }
}

TEST(Passkey, SmallestSeq) {
    // seq 32: the key may start at 1..17 and must never touch the question at 23
    std::unique_ptr<DataSource> d = passkey(32, test_seed());
    int practiced = 0;
    for (uint64_t k0 : {(uint64_t)0, PASSKEY_EVAL_STEP0}) {
        for (uint64_t k = k0; k < k0 + 500; k++) {
            PasskeySeq s;
            check_passkey_seq(d.get(), k, 32, &s);
            if (HasFatalFailure()) return;
            std::vector<int32_t> x = read_all(d.get(), k, 32);
            ASSERT_EQ(x[23], TOK_QUERY);
            std::vector<size_t> dist;
            ASSERT_TRUE(d->answer(k, nullptr, &dist));
            ASSERT_EQ(dist.size(), 5u);
            ASSERT_EQ(x[23 - dist[0]], TOK_KEY);
            ASSERT_GE(dist[0], 6u);  // key + 5 symbols end before the question
            if (k >= PASSKEY_EVAL_STEP0) {
                ASSERT_EQ(s.queries.size(), 1u) << "step " << k;
            }
            practiced += s.queries.size() > 1;
        }
    }
    EXPECT_GT(practiced, 0);  // even at seq 32 a shallow key leaves room for practice
}

TEST(Passkey, Errors) {
    std::string e = open_error("passkey", BYTE_VOCAB, 31);
    EXPECT_HAS(e, "--seq >= 32");
    EXPECT_HAS(e, "31");
    e = open_error("passkey", 256, 64);
    EXPECT_HAS(e, "vocab >= 260");
    EXPECT_HAS(e, "256");
}

// passkey:docs: independent documents, each BOS first (and nowhere else), its key inside it and
// its question at its end; a rank's sub-range read is the slice of the whole; bad specs are one line.
TEST(PasskeyDocs, DocumentsKeysAndQuestions) {
    std::mt19937_64 rng(test_seed() + 9);
    for (size_t seq : {32, 300, 4096})
        for (size_t mean : {20, 100, 1024}) {
            std::string err;
            std::unique_ptr<DataSource> d(data_open("passkey:docs:" + std::to_string(mean), BYTE_VOCAB, seq, test_seed(), &err));
            ASSERT_TRUE(d) << err;
            check_subranges(d.get(), seq, &rng, 50, 0);
            PasskeyDocs* pd = (PasskeyDocs*)d.get();
            for (uint64_t k = 0; k < 20; k++) {
                std::vector<int32_t> x = read_all(d.get(), k, seq);
                std::vector<PasskeyDocs::Doc> docs = pd->plan(k);
                size_t covered = 0, bos = 0;
                for (const PasskeyDocs::Doc& doc : docs) {
                    ASSERT_EQ(doc.start, covered);
                    covered += doc.len;
                    ASSERT_EQ(x[doc.start], TOK_BOS);
                    if (docs.size() > 1) {
                        ASSERT_GE(doc.len, PasskeyDocs::MIN_LEN);
                    }
                    if (doc.len < PasskeyDocs::MIN_LEN) continue;
                    ASSERT_EQ(x[doc.key], TOK_KEY);
                    const size_t q = doc.start + doc.len - 10;  // TOK_QUERY k1 < k2 = k3 > k4 @ k5
                    ASSERT_EQ(x[q], TOK_QUERY);
                    for (int s = 1; s <= 5; s++) ASSERT_EQ(x[doc.key + s], x[q + 2 * s - 1]);
                }
                for (int32_t t : x) bos += t == TOK_BOS;
                ASSERT_EQ(covered, seq + 1);
                ASSERT_EQ(bos, docs.size());
                std::vector<size_t> pos, dist;
                ASSERT_TRUE(d->answer(k, &pos, &dist));
                for (size_t a = 0; a < pos.size(); a++) {  // symbol k's answer is the key's symbol k
                    const size_t k = a % 5, q = pos[a] - 2 * k - 1;
                    ASSERT_EQ(x[pos[a]], x[q - dist[a] + 1 + k]);
                }
                if (seq >= 2 * mean && mean >= 100) {
                    EXPECT_GT(docs.size(), 1u);
                }
            }
        }
    EXPECT_HAS(open_error("passkey:docs:8", BYTE_VOCAB, 64), "N >= 20");
    EXPECT_HAS(open_error("passkey:docsx", BYTE_VOCAB, 64), "passkey:docs:N");
    EXPECT_HAS(open_error("passkey:docs:", BYTE_VOCAB, 64), "passkey:docs:N");
}

// A shard rewritten under a running job with ids the model cannot take is an error naming the
// file and the step, not an out-of-range embedding row; the identity names the file, its size
// and a fingerprint that changes with its bytes.
TEST(Shard, RewrittenMidRunNamesTheFileAndStep) {
    TempDir dir;
    std::vector<int32_t> toks(50, 7);
    write_shard(dir.file("w.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks);
    std::string err;
    std::unique_ptr<DataSource> d(data_open(dir.file("w.bin"), 100, 16, 7, &err));
    ASSERT_TRUE(d) << err;
    const std::string id = d->identity();
    EXPECT_EQ(id.rfind("files 1: w.bin 1124 ", 0), 0u) << id;
    toks[3] = 500;  // past the vocab of 100
    write_shard(dir.file("w.bin"), SHARD_MAGIC_U16, SHARD_VERSION_U16, toks);  // same size, same inode
    fatal_throws();
    std::vector<int32_t> out(17);
    try {
        d->read(4, 0, 17, out.data());  // step 5's window starts at 4*16 mod 34 = 30: token 3 is not in it
        d->read(0, 0, 17, out.data());
        ADD_FAILURE() << "no error";
    } catch (const FpdtError& e) {
        EXPECT_NE(e.msg.find(dir.file("w.bin") + " changed since it was opened: token 3 is now id 500"), std::string::npos) << e.msg;
        EXPECT_NE(e.msg.find("(read at step 1)"), std::string::npos) << e.msg;
    }
    fatal_hook() = nullptr;
    std::unique_ptr<DataSource> e(data_open(dir.file("w.bin"), 1000, 16, 7, &err));
    ASSERT_TRUE(e) << err;
    EXPECT_NE(e->identity(), id);
}

// The needle grid's placement: the passkey task with a fixed depth puts its key at that fraction
// of the places it can take (1 .. seq-15: the key's 6 tokens end before the question's 10) and
// changes nothing else; NeedleInText writes the same key and question into a text window and
// reports the distance back to it.
TEST(Needle, KeyAtTheDepthAndNothingElseMoves) {
    const size_t seq = 512;
    for (double depth : {0.0, 0.3, 0.5, 1.0}) {
        std::unique_ptr<DataSource> a = passkey(seq, test_seed()), b = passkey(seq, test_seed());
        static_cast<PasskeyTask*>(b.get())->depth = depth;
        for (uint64_t step = HELD_OUT_STEP0; step < HELD_OUT_STEP0 + 5; step++) {
            PasskeySeq s;
            check_passkey_seq(b.get(), step, seq, &s);
            if (HasFatalFailure()) return;
            EXPECT_EQ(s.key, 1 + (size_t)llround(depth * (seq - 16))) << depth;
            std::vector<int32_t> x = read_all(a.get(), step, seq), y = read_all(b.get(), step, seq);
            EXPECT_EQ(std::vector<int32_t>(x.end() - 10, x.end()), std::vector<int32_t>(y.end() - 10, y.end()));  // same question
            std::vector<size_t> pos, dist;
            ASSERT_TRUE(b->answer(step, &pos, &dist));
            EXPECT_EQ(dist[0], seq - 9 - s.key);
        }
    }
    EXPECT_EQ(passkey(seq, 1)->identity(), "passkey 3");  // the training sequences are unchanged
}

TEST(Needle, InTextWindows) {
    TempDir dir;
    std::string text;
    while (text.size() < 3000) text += "a plain sentence of text, without any key. ";
    write_text(dir.file("t.txt"), text);
    const size_t seq = 256;
    const size_t query = seq - 9;  // TOK_QUERY k1 < k2 = k3 > k4 @ k5 fills the last 10 of the seq+1 tokens
    for (double depth : {0.0, 0.6, 1.0}) {
        std::string err;
        DataSource* base = data_open(dir.file("t.txt"), BYTE_VOCAB, seq, 9, &err);
        ASSERT_TRUE(base) << err;
        std::unique_ptr<DataSource> plain(data_open(dir.file("t.txt"), BYTE_VOCAB, seq, 9, &err));
        std::unique_ptr<DataSource> d(new NeedleInText(base, 9, seq, depth));
        std::mt19937_64 rng(test_seed());
        check_subranges(d.get(), seq, &rng, 50, HELD_OUT_STEP0);
        for (uint64_t step = HELD_OUT_STEP0; step < HELD_OUT_STEP0 + 4; step++) {
            std::vector<int32_t> x = read_all(d.get(), step, seq), t = read_all(plain.get(), step, seq);
            const size_t key = 1 + (size_t)llround(depth * (seq - 16));
            ASSERT_EQ(x[key], TOK_KEY);
            ASSERT_EQ(x[query], TOK_QUERY);
            for (size_t j = 1; j <= 5; j++) {
                EXPECT_EQ(x[key + j], x[query + 2 * j - 1]);
                EXPECT_EQ(passkey_alphabet(x[key + j]), (int)j - 1);
                if (j > 1) {
                    EXPECT_EQ(x[query + 2 * j - 2], (int32_t)PASSKEY_MARKS[j - 1]);
                }
            }
            for (size_t i = 0; i <= seq; i++) {  // the text elsewhere is the window's own
                if ((i < key || i >= key + 6) && i < query) {
                    EXPECT_EQ(x[i], t[i]) << i;
                }
            }
            std::vector<size_t> pos, dist;
            ASSERT_TRUE(d->answer(step, &pos, &dist));
            EXPECT_EQ(pos, (std::vector<size_t>{query + 1, query + 3, query + 5, query + 7, query + 9}));
            EXPECT_EQ(dist[0], query - key);
        }
    }
}

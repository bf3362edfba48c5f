// fuzz_shard.cpp: libFuzzer target for data_open (data/data.h) on untrusted files.
// Build and run: `make fuzz` (clang++ -fsanitize=fuzzer,address,undefined).
//
// Input: byte 0 picks the vocab, byte 1 the seq length; the rest is the file. It is written to
// a .bin (parsed as an llm.c shard) and to a .txt (byte-level text), both in one temp directory
// made once per process and rewritten every iteration, and opened as each of them (and as a glob
// matching both kinds, which must be refused). Bad files must come back as nullptr plus a
// message; a file that opens must read any window of any step, with every token in range.
// Crashes, leaks (memory or file descriptors) and UB are the sanitizers' or the traps' business.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "data/data.h"

static std::string g_dir, g_bin, g_txt;

static void cleanup() {
    if (!g_dir.empty()) unlink(g_bin.c_str()), unlink(g_txt.c_str()), rmdir(g_dir.c_str());
}

static void write_file(const std::string& path, const uint8_t* p, size_t n) {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) abort();
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) abort();
        p += w, n -= (size_t)w;
    }
    close(fd);
}

// The lowest free descriptor number: unchanged by a call that leaks none.
static int lowest_free_fd() {
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) abort();
    close(fd);
    return fd;
}

static void check(bool ok) {
    if (!ok) __builtin_trap();
}

// Opens `spec`; on success reads a few windows and checks them; always checks the error contract.
static void exercise(const std::string& spec, int vocab, size_t seq, uint64_t seed, bool shard) {
    std::string err;
    DataSource* ds = data_open(spec, vocab, seq, seed, &err);
    if (!ds) {
        check(!err.empty());  // every refusal says why
        return;
    }
    check(err.empty());
    check(!ds->describe().empty());
    std::vector<int32_t> out(seq + 1);
    const uint64_t steps[] = {0, 1, 7, seed, UINT64_MAX};
    const int32_t hi = shard ? vocab : TOK_BOS + 1;  // text: bytes and BOS only
    for (uint64_t step : steps) {
        ds->read(step, 0, seq + 1, out.data());  // the whole sequence
        for (int32_t t : out) check(t >= 0 && t < hi);
        std::vector<int32_t> part(seq + 1);  // and the same tokens again, piecewise
        size_t cut = (size_t)(step % (seq + 1));
        ds->read(step, 0, cut, part.data());
        ds->read(step, cut, seq + 1 - cut, part.data() + cut);
        check(part == out);
        ds->read(step, seq + 1, 0, part.data());  // an empty read at the very end
    }
    std::vector<size_t> pos, dist;
    check(!ds->answer(0, &pos, &dist));  // files are plain data
    delete ds;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (g_dir.empty()) {
        char tmpl[] = "/tmp/fpdt_fuzz_shard_XXXXXX";
        if (!mkdtemp(tmpl)) abort();
        g_dir = tmpl, g_bin = g_dir + "/in.bin", g_txt = g_dir + "/in.txt";
        atexit(cleanup);
    }
    if (size < 2) return 0;
    static const int vocabs[] = {256, 260, 50257, 128256};  // bytes only; byte-level; GPT-2; Llama 3
    const int vocab = vocabs[data[0] & 3];
    const size_t seq = (size_t)(data[1] % 24);  // 0 must be refused; 1.. up to a few windows' worth
    const uint64_t seed = data[0] >> 2;
    data += 2, size -= 2;
    const int fd0 = lowest_free_fd();  // per call: the fuzzer's own descriptors come and go between calls

    write_file(g_bin, data, size);
    write_file(g_txt, data, size);
    exercise(g_bin, vocab, seq, seed, true);
    exercise(g_txt, vocab, seq, seed, false);
    exercise(g_dir + "/in.*", vocab, seq, seed, false);  // .bin and .txt together: refused
    check(lowest_free_fd() == fd0);                      // no descriptor leaked, on any path
    return 0;
}

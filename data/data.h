// data.h: where the training tokens come from.
//
// A sequence is seq+1 tokens: inputs are tokens [0, seq), targets are tokens [1, seq+1). Sources
// number their sequences; the `step` argument below is that number (train.h: training step k with
// --batch B trains sequences k B .. k B + B - 1, whatever replica runs them). In a sequence-parallel
// job each rank needs only its own slices of a sequence, so a DataSource hands out any range
// [start, start+n) of sequence k, reading only that range (files) or generating only that range
// (synthetic tasks). Everything is a pure function of (seed, step): a resumed run, or another
// rank, sees exactly the same tokens.
//
// Sources (data_open's `spec`):
//   "passkey"      a built-in synthetic retrieval task: a 5-symbol key hidden at a random depth in
//                  filler text, asked for at the very end (needs the far past; see PasskeyTask)
//   "passkey:docs[:N]"  packed documents: independent passkey documents of random lengths (mean N,
//                  default 1024), each starting with TOK_BOS (see PasskeyDocs; for --doc-mask)
//   x.bin, *.bin   llm.c token shards (1024-byte header, then uint16 or uint32 tokens)
//   x.txt, *.txt   any other file is plain text, tokenized byte-level (files joined by TOK_BOS)
// A glob is expanded with glob(3) and sorted; several files form one stream, concatenated.
//
// Header-only: included from the .cu trainer and from the tests. Free functions are
// static inline, classes define their members in-class.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <glob.h>
#include "../common.h"
#include <sys/stat.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// Byte-level tokenizer: tokens 0..255 are the bytes themselves; the specials follow.

enum : int32_t { TOK_BOS = 256, TOK_KEY = 257, TOK_QUERY = 258, TOK_PAD = 259 };
constexpr int BYTE_VOCAB = 260;  // smallest vocab that can hold byte-level text and the tasks' specials

static inline std::vector<int32_t> encode_bytes(const std::string& s) {
    std::vector<int32_t> out(s.size());
    for (size_t i = 0; i < s.size(); i++) out[i] = (uint8_t)s[i];  // bytes, never negative chars
    return out;
}

// bytes as-is; specials by name; anything else (a shard's BPE id, say) as "<#id>"
static inline std::string decode_token(int32_t t) {
    if (t >= 0 && t < 256) return std::string(1, (char)(uint8_t)t);
    switch (t) {
        case TOK_BOS: return "<BOS>";
        case TOK_KEY: return "<KEY>";
        case TOK_QUERY: return "<QUERY>";
        case TOK_PAD: return "<PAD>";
    }
    return "<#" + std::to_string(t) + ">";
}

// ----------------------------------------------------------------------------
// The interface the trainer sees.

// Steps from here on are held-out sequences, what evaluation reads (train's and ./fpdt eval's):
// the passkey task's ask once, at the end, with no practice; a file stream's are its last windows.
constexpr uint64_t HELD_OUT_STEP0 = 1ull << 40;

struct DataSource {
    virtual ~DataSource() {}
    // Fills out[0..n) with tokens [start, start+n) of the sequence (seq+1 tokens) of step `step`.
    // Deterministic in (seed, step); reads only what is asked. start+n <= seq+1 always.
    virtual void read(uint64_t step, size_t start, size_t n, int32_t* out) = 0;
    // One line, e.g. "passkey task (seed 1337)" or "3 shards, 1234567 tokens (data/tiny_*.bin)".
    virtual std::string describe() const = 0;
    // One line that changes whenever the tokens would: "passkey", or for files their sorted names
    // (without directories), sizes and a fingerprint of their first and last bytes. A checkpoint
    // stores it (data.source), and --resume refuses another.
    virtual std::string identity() const = 0;
    // Tasks with a retrieval answer: the positions (indices into the seq+1 tokens) whose tokens are
    // answers, and for each the distance in tokens between where its key was hidden and where it
    // is asked. Returns false for plain data.
    virtual bool answer(uint64_t step, std::vector<size_t>* positions, std::vector<size_t>* distances) {
        (void)step, (void)positions, (void)distances;
        return false;
    }
};

// ----------------------------------------------------------------------------
// Small helpers

// Errors while opening become one line in *err; data_open then returns nullptr.
static inline bool data_fail(std::string* err, const std::string& msg) {
    if (err) *err = msg;
    return false;
}

// Errors after opening (a file shrank or vanished under a running job) cannot be returned through
// read(); they are one line on stderr and a non-zero exit, never silent garbage.
[[noreturn]] static inline void data_fatal(const std::string& msg) { fatal("%s", msg.c_str()); }

// pread() until all n bytes are in, or false (with errno, or 0 at an early end of file).
static inline bool data_pread_all(int fd, void* buf, size_t n, uint64_t offset) {
    uint8_t* p = (uint8_t*)buf;
    while (n > 0) {
        ssize_t got = pread(fd, p, n, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got == 0) errno = 0;
            return false;
        }
        p += got;
        n -= (size_t)got;
        offset += (uint64_t)got;
    }
    return true;
}

// Little-endian unsigned integer of 1, 2 or 4 bytes; explicit so the format is the same on any host.
static inline uint32_t data_le(const uint8_t* p, int bytes) {
    uint32_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static inline bool data_ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ----------------------------------------------------------------------------
// File streams: llm.c shards or plain text, several files concatenated into one token stream.
//
// llm.c shard layout (dev/data/data_common.py): 256 little-endian int32 header, then the tokens.
//   header[0] magic: 20240520 (GPT-2: uint16 tokens, version 1) or 20240801 (Llama 3: uint32, version 7)
//   header[1] version, header[2] number of tokens.

constexpr int32_t SHARD_MAGIC_U16 = 20240520, SHARD_VERSION_U16 = 1;
constexpr int32_t SHARD_MAGIC_U32 = 20240801, SHARD_VERSION_U32 = 7;
constexpr size_t SHARD_HEADER_BYTES = 256 * sizeof(int32_t);

struct FileStream : DataSource {
    // The stream is a list of segments: a range of one file's tokens, or one TOK_BOS between text
    // files. Segment i covers stream tokens [begin, begin+count).
    struct Segment {
        uint64_t begin, count;
        int fd;                // -1: the segment is one TOK_BOS
        int token_bytes;       // 1 (text), 2 or 4 (shards)
        uint64_t data_offset;  // byte offset of the first token in the file (0 text, 1024 shards)
        std::string path;      // for messages
    };
    std::vector<Segment> segments;
    std::vector<int> fds;  // owned; closed in the destructor
    uint64_t total = 0;    // N, tokens in the stream
    size_t seq = 0;
    int vocab = 0;           // every token read is checked against it (a file rewritten mid-run)
    std::string description;
    std::string ident;       // identity()
    std::vector<uint8_t> buf;  // staging for raw bytes of one read

    FileStream() {}
    FileStream(const FileStream&) = delete;
    FileStream& operator=(const FileStream&) = delete;
    ~FileStream() override {
        for (int fd : fds) close(fd);
    }

    void add_file(int fd, const std::string& path, uint64_t count, int token_bytes, uint64_t data_offset) {
        segments.push_back({total, count, fd, token_bytes, data_offset, path});
        total += count;
    }
    void add_bos() {
        segments.push_back({total, 1, -1, 0, 0, "<BOS>"});
        total += 1;
    }

    // Step k's sequence is stream tokens [o, o+seq+1) with o = (k*seq) mod (N - seq): consecutive
    // steps walk through the data, and wrap. The product is taken in 128 bits so that a huge step
    // number cannot overflow into a different window. Held-out sequence j (step HELD_OUT_STEP0 + j)
    // is counted back from the end instead: o = N - seq - 1 - (j*seq) mod (N - seq), the last
    // window first, so a run that reads less than the whole stream never trains on them.
    uint64_t window_start(uint64_t step) const {
        uint64_t m = total - seq;  // >= 1, checked at open
        if (step >= HELD_OUT_STEP0) return m - 1 - (uint64_t)((unsigned __int128)(step - HELD_OUT_STEP0) * seq % m);
        return (uint64_t)((unsigned __int128)step * seq % m);
    }

    void read(uint64_t step, size_t start, size_t n, int32_t* out) override {
        if (start > seq + 1 || n > seq + 1 - start)
            data_fatal("data: read of tokens [" + std::to_string(start) + ", " + std::to_string(start + n) +
                       ") is outside the sequence of " + std::to_string(seq + 1) + " tokens");
        uint64_t lo = window_start(step) + start, hi = lo + n;  // stream range to read
        // first segment that ends after lo (segments are sorted by begin)
        size_t i = std::upper_bound(segments.begin(), segments.end(), lo,
                                    [](uint64_t v, const Segment& s) { return v < s.begin; }) -
                   segments.begin() - 1;
        while (lo < hi) {
            const Segment& s = segments[i];
            uint64_t a = lo - s.begin, b = std::min(hi, s.begin + s.count) - s.begin;  // [a,b) within s
            size_t m = (size_t)(b - a);
            if (s.fd < 0) {
                for (size_t j = 0; j < m; j++) out[j] = TOK_BOS;
            } else {
                buf.resize(m * (size_t)s.token_bytes);
                if (!data_pread_all(s.fd, buf.data(), buf.size(), s.data_offset + a * (uint64_t)s.token_bytes))
                    data_fatal("data: " + s.path + ": read of tokens [" + std::to_string(a) + ", " +
                               std::to_string(b) + ") at step " + std::to_string(step + 1) + " failed (" +
                               (errno ? strerror(errno) : "file is shorter than when it was opened") + ")");
                for (size_t j = 0; j < m; j++) {
                    const uint32_t id = data_le(&buf[j * s.token_bytes], s.token_bytes);
                    if (id >= (uint32_t)vocab)
                        data_fatal("data: " + s.path + " changed since it was opened: token " + std::to_string(a + j) +
                                   " is now id " + std::to_string(id) + ", not below the vocab size " +
                                   std::to_string(vocab) + " (read at step " + std::to_string(step + 1) + ")");
                    out[j] = (int32_t)id;
                }
            }
            out += m;
            lo += m;
            i++;
        }
    }

    std::string describe() const override { return description; }
    std::string identity() const override { return ident; }
};

// Opens `path` for reading, only if it is a regular file (common.h's open_regular: a FIFO or a
// device is refused before anything could block on it); *size its length in bytes.
static inline bool data_open_regular(const std::string& path, int* fd_out, uint64_t* size, std::string* err) {
    const std::string e = open_regular(path, Open::Read, true, fd_out, size);
    if (e.empty()) return true;
    if (e.find(": not a regular file") != std::string::npos)
        return data_fail(err, "data: " + e + "; expected a .bin shard or a text file");
    return data_fail(err, "data: " + path + ": cannot open (" + e.substr(path.size() + 2) + ")");
}

// Opens one llm.c shard and checks everything once: header, exact size, and every token < vocab
// (streamed through a small buffer, nothing kept). On success the fd stays open for pread.
static inline bool data_open_shard(const std::string& path, int vocab, int* fd_out, uint64_t* count_out,
                                   int* token_bytes_out, std::string* err) {
    int fd;
    uint64_t size;
    if (!data_open_regular(path, &fd, &size, err)) return false;
    auto fail = [&](const std::string& msg) {
        close(fd);
        return data_fail(err, "data: " + path + ": " + msg);
    };
    if (size < SHARD_HEADER_BYTES)
        return fail(std::to_string(size) + " bytes, too small for the 1024-byte llm.c shard header");
    uint8_t header[SHARD_HEADER_BYTES];
    if (!data_pread_all(fd, header, SHARD_HEADER_BYTES, 0)) return fail("cannot read the header");
    int32_t magic = (int32_t)data_le(header + 0, 4);
    int32_t version = (int32_t)data_le(header + 4, 4);
    const uint32_t count = data_le(header + 8, 4);  // int32 in llm.c's writer; read unsigned, up to 2^32-1
    int token_bytes, want_version;
    if (magic == SHARD_MAGIC_U16) {
        token_bytes = 2;
        want_version = SHARD_VERSION_U16;
    } else if (magic == SHARD_MAGIC_U32) {
        token_bytes = 4;
        want_version = SHARD_VERSION_U32;
    } else {
        return fail("bad magic " + std::to_string(magic) + " (expected " + std::to_string(SHARD_MAGIC_U16) +
                    " or " + std::to_string(SHARD_MAGIC_U32) + ")");
    }
    if (version != want_version)
        return fail("bad version " + std::to_string(version) + " for magic " + std::to_string(magic) +
                    " (expected " + std::to_string(want_version) + ")");
    if (count == 0) return fail("header says 0 tokens (expected more than 0)");
    uint64_t want_size = SHARD_HEADER_BYTES + (uint64_t)count * token_bytes;
    if (size != want_size)
        return fail("file is " + std::to_string(size) + " bytes but its header says " + std::to_string(count) +
                    " tokens of " + std::to_string(token_bytes) + " bytes, i.e. " + std::to_string(want_size) +
                    " bytes (" + (size < want_size ? "truncated" : "trailing bytes") + ")");
    // scan the tokens once, 1 MiB at a time
    std::vector<uint8_t> chunk(1 << 20);
    const uint64_t per_chunk = chunk.size() / token_bytes;
    for (uint64_t t0 = 0; t0 < (uint64_t)count; t0 += per_chunk) {
        uint64_t m = std::min(per_chunk, (uint64_t)count - t0);
        if (!data_pread_all(fd, chunk.data(), m * token_bytes, SHARD_HEADER_BYTES + t0 * token_bytes))
            return fail("cannot read tokens (" + std::string(errno ? strerror(errno) : "early end of file") + ")");
        for (uint64_t j = 0; j < m; j++) {
            uint32_t id = data_le(&chunk[j * token_bytes], token_bytes);
            if (id >= (uint32_t)vocab)
                return fail("token " + std::to_string(t0 + j) + " is id " + std::to_string(id) +
                            ", not below the vocab size " + std::to_string(vocab));
        }
    }
    *fd_out = fd;
    *count_out = (uint64_t)count;
    *token_bytes_out = token_bytes;
    return true;
}

// ----------------------------------------------------------------------------
// The built-in "passkey" task: synthetic long-context retrieval.
//
// The seq+1 tokens of step k:
//   [0]                   TOK_BOS
//   [key, key+6)          TOK_KEY k1 k2 k3 k4 k5                  key at a uniform random depth
//   [seq-9, seq+1)        TOK_QUERY k1 < k2 = k3 > k4 @ k5        the question at the very end
//   everywhere else       filler: easy lowercase sentences
// Key symbol i is drawn from its own alphabet of ten (PASSKEY_SYMBOLS[i]: digits, capitals,
// punctuation), none of which occur in the filler, so the answers (k1..k5 in the question) can
// only be predicted by finding the key in the past. In the question each symbol follows a marker
// of its own (TOK_QUERY, then PASSKEY_MARKS): a model fetches symbol i by matching marker i
// against alphabet i, a token it sees in every question. Without the markers the cue for symbol
// i+1 is symbol i itself, ten rare tokens whose shared alphabet the model must first discover, and
// a 2-layer model learned the five symbols one after another, each after a plateau of its own
// (docs/default_run.md). Training sequences (step < PASSKEY_EVAL_STEP0) also repeat the question
// after the key ("practice"): one retrieval per sequence is too little signal for a small model to
// learn from in minutes on a CPU. On a short span after the key (up to 8 slots of 64 tokens) up to
// 8 questions at random places. On a longer one the questions are spaced geometrically, the m-th
// at a distance in [32 2^m, 48 2^m) after the key (32, 64, 128, ... up to the end): an answer can
// be copied from the question before it as well as from the key, so evenly spaced questions would
// only ever teach copying from 64 tokens back; spaced this way each needs a look at least a
// quarter of its distance back, at every scale the sequence holds (at 4096 tokens up to 2000 and
// more). Held-out sequences (steps from PASSKEY_EVAL_STEP0 on) hold the one question at the end,
// so evaluation measures retrieval from the key itself, at the distance answer() reports.
// Every token is an O(1) function of (seed, step, position): a rank reading [start, start+n)
// agrees exactly with a rank reading everything.

static const char* const PASSKEY_SYMBOLS[5] = {"0123456789", "ABCDEFGHIJ", "KLMNOPQRST", "UVWXYZ!#$%", "&()*+,-/:;"};
static const char PASSKEY_MARKS[5] = {0, '<', '=', '>', '@'};  // before symbols 2-5 of a question (1: TOK_QUERY)
constexpr uint64_t PASSKEY_EVAL_STEP0 = HELD_OUT_STEP0;  // held-out sequences: steps from here on

struct PasskeyTask : DataSource {
    uint64_t seed;
    size_t seq;
    std::string pattern;  // the filler, a fixed cycle of short sentences
    double depth = -1;    // the needle grid (./fpdt eval --needle): the key at this fraction of the
                          // sequence (0: right after BOS, 1: just before the question); < 0: random

    static constexpr size_t DIGITS = 5;
    static constexpr size_t KEY_LEN = 1 + DIGITS;       // TOK_KEY, then the symbols
    static constexpr size_t QUESTION_LEN = 2 * DIGITS;  // each symbol after its marker
    static constexpr size_t PRACTICE = 8;         // practice questions tried per training sequence,
    static constexpr size_t PRACTICE_EVERY = 64;  // on a span of up to PRACTICE slots of this many tokens;
    static constexpr size_t PRACTICE_FIRST = 32;  // on a longer one at distances from 32, doubling

    PasskeyTask(uint64_t seed_, size_t seq_) : seed(seed_), seq(seq_) {
        // A fixed pseudo-random sequence of sentences (its own fixed seed: the same filler for every
        // run), long enough that the cycle is not a trivial short repeat.
        const char* const sentences[] = {
            "the grass is green. ", "the sky is blue. ", "the sun is yellow. ", "here we go. ",
            "there and back again. ", "the sea is deep. ", "snow is white. ", "the night is dark. ",
        };
        Rng state{0x5eed5eed5eedULL};
        for (int i = 0; i < 256; i++) pattern += sentences[rng_u64(&state) % 8];
    }

    // What step k hides: the filler offset, where the key goes, its symbols, the practice gap.
    struct Plan {
        uint64_t offset;
        size_t key;
        int32_t symbols[DIGITS];
        std::vector<size_t> practice;  // positions of the practice questions (training sequences)
    };
    size_t query_pos() const { return seq + 1 - QUESTION_LEN; }  // TOK_QUERY; the question fills the end
    Plan plan(uint64_t step) const {
        Rng state{seed ^ (step * 0xD1B54A32D192ED03ULL)};  // distinct stream per (seed, step)
        rng_u64(&state);  // one warm-up draw
        Plan p;
        p.offset = rng_u64(&state) % pattern.size();
        p.key = 1 + (size_t)(rng_u64(&state) % (query_pos() - KEY_LEN));  // uniform in [1, seq+1-16]
        if (depth >= 0) p.key = 1 + (size_t)llround(depth * (double)(query_pos() - KEY_LEN - 1));  // the needle's depth
        for (size_t d = 0; d < DIGITS; d++) p.symbols[d] = PASSKEY_SYMBOLS[d][rng_u64(&state) % 10];
        // practice questions in [lo, hi) after the key, never overlapping (see above)
        const size_t lo = p.key + KEY_LEN, hi = query_pos();
        const size_t span = hi > lo ? hi - lo : 0, slots = span / PRACTICE_EVERY;
        if (step >= PASSKEY_EVAL_STEP0) return p;  // held out: no practice
        if (slots > PRACTICE) {  // a long span: one question per doubling of the distance
            for (size_t g = PRACTICE_FIRST;; g *= 2) {
                const size_t q = lo + g + (size_t)(rng_u64(&state) % (g / 2));
                if (q + QUESTION_LEN > hi) break;
                p.practice.push_back(q);
            }
            return p;
        }
        for (size_t m = 0; m < PRACTICE && span >= QUESTION_LEN; m++) {  // a short one: up to 8 random tries
            size_t q = lo + (size_t)(rng_u64(&state) % (span - QUESTION_LEN + 1));
            bool clear = true;
            for (size_t o : p.practice) clear &= (q + QUESTION_LEN <= o || o + QUESTION_LEN <= q);
            if (clear) p.practice.push_back(q);
        }
        return p;
    }
    
    void read(uint64_t step, size_t start, size_t n, int32_t* out) override {
        if (start > seq + 1 || n > seq + 1 - start)
            data_fatal("data: read of tokens [" + std::to_string(start) + ", " + std::to_string(start + n) +
                       ") is outside the sequence of " + std::to_string(seq + 1) + " tokens");
        Plan p = plan(step);
        size_t len = pattern.size(), k = (size_t)((start + p.offset) % len);
        for (size_t i = 0; i < n; i++) {  // filler everywhere, BOS at 0
            out[i] = (uint8_t)pattern[k];
            if (++k == len) k = 0;
        }
        if (start == 0 && n > 0) out[0] = TOK_BOS;
        auto put = [&](size_t pos, int32_t token) {  // where it falls inside [start, start+n)
            if (pos >= start && pos < start + n) out[pos - start] = token;
        };
        key(p, put);
        for (size_t q : p.practice) question(p, q, put);
        question(p, query_pos(), put);
    }

    // The key at p.key: TOK_KEY, then the symbols.
    template <typename Put>
    static void key(const Plan& p, Put put) {
        put(p.key, TOK_KEY);
        for (size_t d = 0; d < DIGITS; d++) put(p.key + 1 + d, p.symbols[d]);
    }
    // The question at pos: each symbol after its marker.
    template <typename Put>
    static void question(const Plan& p, size_t pos, Put put) {
        for (size_t d = 0; d < DIGITS; d++) {
            put(pos + 2 * d, d == 0 ? (int32_t)TOK_QUERY : (int32_t)PASSKEY_MARKS[d]);
            put(pos + 2 * d + 1, p.symbols[d]);
        }
    }

    std::string identity() const override { return "passkey 3"; }  // 3: a marker before each asked symbol
    std::string describe() const override {
        return "passkey task (seed " + std::to_string(seed) + "): find a 5-symbol key hidden in " +
               std::to_string(seq + 1) + " tokens";
    }

    // The final question's five answer positions; the distance from the key to that question.
    bool answer(uint64_t step, std::vector<size_t>* positions, std::vector<size_t>* distances) override {
        Plan p = plan(step);
        if (positions) positions->clear();
        if (distances) distances->clear();
        for (size_t d = 0; d < DIGITS; d++) {
            if (positions) positions->push_back(query_pos() + 2 * d + 1);
            if (distances) distances->push_back(query_pos() - p.key);
        }
        return true;
    }
};

// The packed variant, "passkey:docs[:N]": the seq+1 tokens of step k are independent documents
// of random lengths, uniform in [N/2, 3N/2] (the last takes what is left), each one
//   [0]                  TOK_BOS
//   [key, key+6)         TOK_KEY k1 k2 k3 k4 k5                at a uniform random depth
//   [len-10, len)        TOK_QUERY k1 < k2 = k3 > k4 @ k5      its question at its very end (as passkey's)
//   everywhere else      the filler, from a random offset of its own
// with its own key symbols. With --doc-mask 1 a document's answers can come from its own key only;
// the tests use it to show that nothing leaks between documents, the benchmark to show the skip.
struct PasskeyDocs : DataSource {
    PasskeyTask task;  // its filler, alphabets and insert layout
    size_t mean;
    static constexpr size_t MIN_LEN = PasskeyTask::KEY_LEN + PasskeyTask::QUESTION_LEN + 4;  // BOS, key, filler, question

    PasskeyDocs(uint64_t seed_, size_t seq_, size_t mean_) : task(seed_, seq_), mean(mean_) {}
    struct Doc {
        size_t start, len, key;
        uint64_t offset;
        int32_t symbols[PasskeyTask::DIGITS];
    };
    std::vector<Doc> plan(uint64_t step) const {
        Rng state{task.seed ^ (step * 0x9E3779B97F4A7C15ULL) ^ 0xD0C5ULL};
        rng_u64(&state);
        std::vector<Doc> docs;
        const size_t total = task.seq + 1, lo = std::max(MIN_LEN, mean / 2), span = std::max<size_t>(1, mean + 1);
        for (size_t pos = 0; pos < total;) {
            Doc d;
            d.start = pos;
            d.len = lo + (size_t)(rng_u64(&state) % span);  // [N/2, 3N/2]
            if (d.len > total - pos || total - pos - d.len < MIN_LEN) d.len = total - pos;  // the last takes the rest
            d.offset = rng_u64(&state) % task.pattern.size();
            const size_t room = d.len > PasskeyTask::KEY_LEN + PasskeyTask::QUESTION_LEN + 1
                                    ? d.len - PasskeyTask::KEY_LEN - PasskeyTask::QUESTION_LEN - 1 : 1;
            d.key = d.start + 1 + (size_t)(rng_u64(&state) % room);
            for (size_t k = 0; k < PasskeyTask::DIGITS; k++) d.symbols[k] = PASSKEY_SYMBOLS[k][rng_u64(&state) % 10];
            docs.push_back(d);
            pos += d.len;
        }
        return docs;
    }
    void read(uint64_t step, size_t start, size_t n, int32_t* out) override {
        if (start > task.seq + 1 || n > task.seq + 1 - start)
            data_fatal("data: read of tokens [" + std::to_string(start) + ", " + std::to_string(start + n) +
                       ") is outside the sequence of " + std::to_string(task.seq + 1) + " tokens");
        for (const Doc& d : plan(step)) {
            const size_t a = std::max(start, d.start), b = std::min(start + n, d.start + d.len);
            for (size_t p = a; p < b; p++) out[p - start] = (uint8_t)task.pattern[(d.offset + p - d.start) % task.pattern.size()];
            auto put = [&](size_t p, int32_t t) {
                if (p >= a && p < b) out[p - start] = t;
            };
            put(d.start, TOK_BOS);
            if (d.len < MIN_LEN) continue;  // a sequence shorter than one document: filler only
            PasskeyTask::Plan qp{};  // the document's key as the task's writers take it
            qp.key = d.key;
            for (size_t k = 0; k < PasskeyTask::DIGITS; k++) qp.symbols[k] = d.symbols[k];
            PasskeyTask::key(qp, put);
            PasskeyTask::question(qp, d.start + d.len - PasskeyTask::QUESTION_LEN, put);
        }
    }
    std::string identity() const override { return "passkey docs " + std::to_string(mean); }
    std::string describe() const override {
        return "packed passkey documents (seed " + std::to_string(task.seed) + "): about " + std::to_string(mean) +
               " tokens each, a 5-symbol key hidden in each, asked at its end";
    }
    // Every document's answers (a sequence's last document's too: it ends at token seq).
    bool answer(uint64_t step, std::vector<size_t>* positions, std::vector<size_t>* distances) override {
        if (positions) positions->clear();
        if (distances) distances->clear();
        for (const Doc& d : plan(step)) {
            if (d.len < MIN_LEN) continue;
            const size_t q = d.start + d.len - PasskeyTask::QUESTION_LEN;
            for (size_t k = 0; k < PasskeyTask::DIGITS; k++) {
                if (positions) positions->push_back(q + 2 * k + 1);
                if (distances) distances->push_back(q - d.key);
            }
        }
        return true;
    }
};

// The needle grid on a file's text (./fpdt eval --needle --data FILE): the held-out windows of a
// byte-level stream with the passkey task's key written at a given depth (the same fraction as
// PasskeyTask::depth) and its question at the end, the symbols drawn from (seed, step). Owns the
// stream it reads.
struct NeedleInText : DataSource {
    DataSource* text;
    uint64_t seed;
    size_t seq;
    double depth;
    static constexpr size_t KEY_LEN = PasskeyTask::KEY_LEN, QUESTION_LEN = PasskeyTask::QUESTION_LEN;

    NeedleInText(DataSource* text_, uint64_t seed_, size_t seq_, double depth_)
        : text(text_), seed(seed_), seq(seq_), depth(depth_) {}
    ~NeedleInText() override { delete text; }
    size_t query_pos() const { return seq + 1 - QUESTION_LEN; }  // the question fills the end, as in PasskeyTask
    size_t key_pos() const { return 1 + (size_t)llround(depth * (double)(query_pos() - KEY_LEN - 1)); }
    PasskeyTask::Plan plan(uint64_t step) const {
        Rng state{seed ^ (step * 0xD1B54A32D192ED03ULL)};
        PasskeyTask::Plan p{};
        p.key = key_pos();
        for (size_t d = 0; d < PasskeyTask::DIGITS; d++) p.symbols[d] = PASSKEY_SYMBOLS[d][rng_u64(&state) % 10];
        return p;
    }
    void read(uint64_t step, size_t start, size_t n, int32_t* out) override {
        text->read(step, start, n, out);
        const PasskeyTask::Plan p = plan(step);
        auto put = [&](size_t pos, int32_t token) {  // where it falls inside [start, start+n)
            if (pos >= start && pos < start + n) out[pos - start] = token;
        };
        PasskeyTask::key(p, put);
        PasskeyTask::question(p, query_pos(), put);
    }
    std::string describe() const override { return text->describe() + " with a passkey needle"; }
    std::string identity() const override { return text->identity(); }
    bool answer(uint64_t step, std::vector<size_t>* positions, std::vector<size_t>* distances) override {
        (void)step;
        positions->clear(), distances->clear();
        for (size_t d = 0; d < PasskeyTask::DIGITS; d++)
            positions->push_back(query_pos() + 2 * d + 1), distances->push_back(query_pos() - key_pos());
        return true;
    }
};

// FileStream::identity(): "files N: name size fingerprint, ..." over the sorted paths, names
// without their directories (the data may move), each with its size in bytes and an FNV-1a 64
// of its first and last 4 KiB; past 8 files, the first and the last and one hash over all. One
// line: bytes outside printable ASCII become %XX.
static inline std::string data_files_identity(const std::vector<std::string>& paths,
                                              const std::vector<FileStream::Segment>& segments) {
    std::vector<std::string> items;
    uint64_t all = 0xcbf29ce484222325ull;
    auto mix = [](uint64_t h, const void* p, size_t n) {
        for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t*)p)[i]) * 0x100000001B3ull;
        return h;
    };
    for (const std::string& p : paths) {
        int fd = -1;
        for (const FileStream::Segment& s : segments)
            if (s.path == p) fd = s.fd;
        struct stat st;
        uint64_t size = fd >= 0 && fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0, h = 0xcbf29ce484222325ull;
        std::vector<uint8_t> b(std::min<uint64_t>(size, 4096));
        if (fd >= 0 && data_pread_all(fd, b.data(), b.size(), 0)) h = mix(h, b.data(), b.size());
        if (fd >= 0 && data_pread_all(fd, b.data(), b.size(), size - b.size())) h = mix(h, b.data(), b.size());
        std::string name = p.substr(p.rfind('/') == std::string::npos ? 0 : p.rfind('/') + 1), safe;
        for (unsigned char ch : name) {
            char e[8];
            snprintf(e, sizeof e, "%%%02X", ch);
            safe += ch > 0x20 && ch < 0x7f && ch != '%' && ch != ',' ? std::string(1, (char)ch) : std::string(e);
        }
        char f[64];
        snprintf(f, sizeof f, " %llu %016llx", (unsigned long long)size, (unsigned long long)h);
        items.push_back(safe + f);
        all = mix(all, items.back().data(), items.back().size() + 1);
    }
    std::string id = "files " + std::to_string(paths.size()) + ": ";
    if (items.size() <= 8)
        for (size_t i = 0; i < items.size(); i++) id += (i ? ", " : "") + items[i];
    else {
        char h[32];
        snprintf(h, sizeof h, "%016llx", (unsigned long long)all);
        id += items.front() + " .. " + items.back() + ", all " + h;
    }
    return id;
}

// ----------------------------------------------------------------------------
// data_open: the spec is a built-in task's name, a file path, or a glob.
// Returns nullptr with one line in *err on any problem; the caller owns (deletes) the result.

inline DataSource* data_open(const std::string& spec, int vocab, size_t seq, uint64_t seed, std::string* err) {
    if (seq == 0) {
        data_fail(err, "data: --seq must be positive");
        return nullptr;
    }
    if (vocab <= 0) {
        data_fail(err, "data: vocab " + std::to_string(vocab) + " must be positive");
        return nullptr;
    }

    // built-in tasks
    if (spec == "passkey") {
        if (vocab < BYTE_VOCAB) {
            data_fail(err, "data: passkey needs vocab >= " + std::to_string(BYTE_VOCAB) +
                               " (bytes + special tokens), got " + std::to_string(vocab));
            return nullptr;
        }
        if (seq < 32) {
            data_fail(err, "data: passkey needs --seq >= 32 (key, query and filler must fit), got " +
                               std::to_string(seq));
            return nullptr;
        }
        return new PasskeyTask(seed, seq);
    }
    if (spec.rfind("passkey:docs", 0) == 0) {
        const std::string tail = spec.substr(12);
        char* end = nullptr;
        const long long mean = tail.empty() ? 1024 : tail[0] == ':' ? strtoll(tail.c_str() + 1, &end, 10) : -1;
        if (mean < (long long)PasskeyDocs::MIN_LEN || (end && *end) || tail == ":") {
            data_fail(err, "data: '" + spec + "': expected passkey:docs or passkey:docs:N with N >= " +
                               std::to_string(PasskeyDocs::MIN_LEN) + " (the mean document length in tokens)");
            return nullptr;
        }
        if (vocab < BYTE_VOCAB) {
            data_fail(err, "data: passkey:docs needs vocab >= " + std::to_string(BYTE_VOCAB) + ", got " + std::to_string(vocab));
            return nullptr;
        }
        return new PasskeyDocs(seed, seq, (size_t)mean);
    }

    // files: one path, or a glob (sorted bytewise, whatever the locale)
    std::vector<std::string> paths;
    struct stat literal;
    if (spec.find_first_of("*?[") != std::string::npos && stat(spec.c_str(), &literal) != 0) {  // a file of that name first
        glob_t g;
        int rc = glob(spec.c_str(), 0, nullptr, &g);
        if (rc == 0)
            for (size_t i = 0; i < g.gl_pathc; i++) paths.push_back(g.gl_pathv[i]);
        globfree(&g);
        if (rc != 0 || paths.empty()) {
            data_fail(err, "data: no files match '" + spec + "'");
            return nullptr;
        }
        std::sort(paths.begin(), paths.end());
    } else {
        struct stat st;
        if (stat(spec.c_str(), &st) != 0 && spec.find_first_of("/.") == std::string::npos) {
            // a bare word that is not a file: most likely a mistyped task name
            data_fail(err, "data: '" + spec + "' is neither a built-in task (passkey) nor an existing file");
            return nullptr;
        }
        paths.push_back(spec);
    }

    size_t n_bin = 0;
    for (const std::string& p : paths) n_bin += data_ends_with(p, ".bin");
    if (n_bin != 0 && n_bin != paths.size()) {
        std::string a, b;  // one example of each kind for the message
        for (const std::string& p : paths) (data_ends_with(p, ".bin") ? a : b) = p;
        data_fail(err, "data: '" + spec + "' matches both .bin shards (" + a + ") and text files (" + b +
                           "); expected one kind");
        return nullptr;
    }
    bool shards = n_bin > 0;
    if (!shards && vocab < BYTE_VOCAB) {
        data_fail(err, "data: " + paths[0] + " is text, tokenized byte-level, which needs vocab >= " +
                           std::to_string(BYTE_VOCAB) + " (bytes + BOS); got " + std::to_string(vocab));
        return nullptr;
    }

    FileStream* fs = new FileStream();
    fs->seq = seq;
    fs->vocab = vocab;
    size_t used_files = 0;
    for (const std::string& p : paths) {
        int fd;
        uint64_t count;
        if (shards) {
            int token_bytes = 0;
            if (!data_open_shard(p, vocab, &fd, &count, &token_bytes, err)) {
                delete fs;
                return nullptr;
            }
            fs->fds.push_back(fd);
            fs->add_file(fd, p, count, token_bytes, SHARD_HEADER_BYTES);
        } else {
            if (!data_open_regular(p, &fd, &count, err)) {
                delete fs;
                return nullptr;
            }
            if (count == 0) {  // empty text files are skipped
                close(fd);
                continue;
            }
            fs->fds.push_back(fd);
            if (used_files > 0) fs->add_bos();
            fs->add_file(fd, p, count, 1, 0);
        }
        used_files++;
    }
    if (fs->total == 0) {
        data_fail(err, paths.size() == 1 ? "data: " + spec + " is empty (expected text)"
                                         : "data: '" + spec + "': all " + std::to_string(paths.size()) +
                                               " text files are empty");
        delete fs;
        return nullptr;
    }
    if (fs->total < (uint64_t)seq + 1) {
        data_fail(err, "data: " + spec + " has " + std::to_string(fs->total) + " tokens; --seq " +
                           std::to_string(seq) + " needs at least " + std::to_string(seq + 1));
        delete fs;
        return nullptr;
    }
    fs->ident = data_files_identity(paths, fs->segments);
    fs->description = std::to_string(used_files) + (shards ? " shard" : " text file") + (used_files == 1 ? "" : "s") +
                      ", " + std::to_string(fs->total) + " tokens (" + spec + ")";
    return fs;
}

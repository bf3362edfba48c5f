// checkpoint.h: saving and loading training state, checkpoint format 2 (README "Checkpoints").
//
// A checkpoint is a directory OUT/ckpt_<step>/ (the step zero-padded to at least 8 digits; any
// width is read). Rank r writes shard_<r>.bin: its slice [lo, hi) of the flat parameters, then of
// AdamW m, then of v (little-endian fp32). Rank 0 gathers the shards' FNV-1a checksums and writes
// manifest.txt last: the run's identity (model config, seq, seed, steps, data source), the slices
// and their checksums, and a checksum of the manifest itself. Everything is written into
// OUT/ckpt_<step>.tmp/, fsynced, renamed into place, and the rename fsynced: a kill at any moment
// leaves the previous complete checkpoint or the new one, and a damaged one is found on load.
// Loading re-cuts: any number of ranks, ZeRO on or off, reads a checkpoint written by any other.
//
// Also here: the --out directory's lock (one run at a time), the listing (names parsed by their
// number), and rotation (the newest two checkpoints of this run's identity are kept; nothing
// else in --out is ever deleted). Old single-file checkpoints (ckpt_NNNNNNNN.bin) are not read.
#pragma once
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <algorithm>
#include <string>
#include <utility>
#include <vector>
#include "model.h"

static const uint64_t FNV_OFFSET = 0xcbf29ce484222325ull;
static inline uint64_t fnv1a(uint64_t h, const void* p, size_t n) {
    const uint8_t* b = (const uint8_t*)p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

// What manifest.txt holds. The identity fields (what the losses depend on) are checked on --resume.
struct CkptShard {
    uint64_t lo, hi, sum;  // slice [lo, hi) of the flat arrays; FNV-1a 64 of the shard file
};
struct Manifest {
    uint64_t step = 0, total_steps = 0, seed = 0, seq = 0, n_params = 0;
    uint64_t batch = 1;  // --batch: sequences per step (a manifest without the line was made with 1)
    Config cfg = {};
    std::string source;  // DataSource::identity(); "none" for an imported model
    int optimizer = 1;   // 1: shards hold params, m, v; 0: params only
    std::vector<CkptShard> shards;
};

// Rank r's slice of n values among P ranks: [r k, min(n, (r+1) k)), k = ceil(n / P); the same cut
// as ZeRO-1's optimizer shards.
static inline void ckpt_slice(uint64_t n, int P, int r, uint64_t* lo, uint64_t* hi) {
    const uint64_t k = (n + P - 1) / P;
    *lo = std::min(n, (uint64_t)r * k);
    *hi = std::min(n, (uint64_t)(r + 1) * k);
}

static inline uint64_t ckpt_shard_bytes(const Manifest& m, const CkptShard& s) {
    return (s.hi - s.lo) * sizeof(float) * (m.optimizer ? 3 : 1);
}

// ----------------------------------------------------------------------------
// manifest.txt: text lines `key value`, in a fixed order (COMMON spec, README).

static inline std::string ckpt_float(float x) {
    char b[32];
    snprintf(b, sizeof b, "%.9g", x);
    return b;
}
static inline const char* rope_scaling_name(int s) { return s == ROPE_LINEAR ? "linear" : s == ROPE_LLAMA3 ? "llama3" : "none"; }

// The fields before the shard lines, in order, as text. data.batch is written only when it is not
// 1 (so a run without --batch writes what earlier versions wrote); with all, always (comparisons).
static inline std::vector<std::pair<std::string, std::string>> manifest_fields(const Manifest& m, bool all = false) {
    const Config& c = m.cfg;
    auto s = [](uint64_t v) { return std::to_string(v); };
    std::vector<std::pair<std::string, std::string>> f = {{"fpdt-checkpoint", "2"},
            {"step", s(m.step)},
            {"total_steps", s(m.total_steps)},
            {"seed", s(m.seed)},
            {"model.name", c.name},
            {"model.family", c.family == GPT ? "gpt" : "llama"},
            {"model.n_layer", s(c.n_layer)},
            {"model.d_model", s(c.d_model)},
            {"model.n_head", s(c.n_head)},
            {"model.n_kv_head", s(c.n_kv_head)},
            {"model.head_dim", s(head_dim(c))},
            {"model.ffn", s(c.ffn)},
            {"model.vocab", s(c.vocab)},
            {"model.rope_theta", ckpt_float(c.rope_theta)},
            {"model.norm_eps", ckpt_float(c.norm_eps)},
            {"model.tie_embeddings", c.tie_embeddings ? "1" : "0"},
            {"model.rope_scaling", rope_scaling_name(c.rope_scaling)},
            {"model.rope_factor", ckpt_float(c.rope_factor)},
            {"model.rope_low_freq_factor", ckpt_float(c.rope_low_freq_factor)},
            {"model.rope_high_freq_factor", ckpt_float(c.rope_high_freq_factor)},
            {"model.rope_original_max_pos", s(c.rope_original_max_pos)},
            {"data.seq", s(m.seq)},
            {"data.source", m.source},
            {"data.batch", s(m.batch)},
            {"n_params", s(m.n_params)},
            {"optimizer", s(m.optimizer)},
            {"shards", s(m.shards.size())}};
    if (m.batch == 1 && !all)
        for (size_t i = 0; i < f.size(); i++)
            if (f[i].first == "data.batch") f.erase(f.begin() + i);
    return f;
}

static inline std::string manifest_text(const Manifest& m) {
    std::string t;
    for (const auto& kv : manifest_fields(m)) t += kv.first + " " + kv.second + "\n";
    char b[128];
    for (size_t r = 0; r < m.shards.size(); r++) {
        snprintf(b, sizeof b, "shard %zu %llu %llu %016llx\n", r, (unsigned long long)m.shards[r].lo,
                 (unsigned long long)m.shards[r].hi, (unsigned long long)m.shards[r].sum);
        t += b;
    }
    snprintf(b, sizeof b, "end %016llx\n", (unsigned long long)fnv1a(FNV_OFFSET, t.data(), t.size()));
    return t + b;
}

// The first identity field (model, seq, seed, steps, data) in which two manifests differ, as
// "FIELD: OLD vs NEW" pieces; empty when they agree.
static inline bool manifest_identity_differs(const Manifest& a, const Manifest& b, std::string* field,
                                             std::string* va, std::string* vb) {
    auto fa = manifest_fields(a, true), fb = manifest_fields(b, true);
    for (size_t i = 0; i < fa.size(); i++) {
        const std::string& k = fa[i].first;
        const bool identity = k == "total_steps" || k == "seed" || k.rfind("model.", 0) == 0 || k.rfind("data.", 0) == 0;
        if (identity && fa[i].second != fb[i].second) {
            *field = k, *va = fa[i].second, *vb = fb[i].second;
            return true;
        }
    }
    return false;
}

// Whole decimal number in [lo, hi], digits only.
static inline bool ckpt_parse_u64(const std::string& s, uint64_t lo, uint64_t hi, uint64_t* out) {
    if (s.empty() || s.size() > 19) return false;
    uint64_t v = 0;
    for (char ch : s) {
        if (ch < '0' || ch > '9') return false;
        v = v * 10 + (uint64_t)(ch - '0');
    }
    if (v < lo || v > hi) return false;
    *out = v;
    return true;
}
static inline bool ckpt_parse_float(const std::string& s, float* out) {
    if (s.empty() || s.size() > 40 || isspace((unsigned char)s[0])) return false;
    char* end = nullptr;
    const double v = strtod(s.c_str(), &end);
    if (*end || !std::isfinite(v) || v <= 0 || v > 3e38) return false;
    *out = (float)v;
    return true;
}
static inline bool ckpt_parse_hex(const std::string& s, uint64_t* out) {
    if (s.size() != 16) return false;
    uint64_t v = 0;
    for (char ch : s) {
        const int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
        if (d < 0) return false;
        v = v * 16 + (uint64_t)d;
    }
    *out = v;
    return true;
}

// Parses and checks manifest.txt's text (named `path` in messages): every field's syntax and
// range, the model's parameter count against n_params, the slices covering [0, n_params) in
// order, and the closing checksum. Returns "" or the first bad field in one line. Allocates only
// in proportion to the text.
static inline std::string parse_manifest(const std::string& text, const std::string& path, Manifest* m) {
    *m = Manifest();
    std::vector<std::string> lines;
    for (size_t a = 0; a < text.size();) {
        const size_t b = text.find('\n', a);
        if (b == std::string::npos) return path + ": the last line is not complete (partly written?)";
        lines.push_back(text.substr(a, b - a));
        a = b + 1;
    }
    size_t li = 0;
    std::string key, val;
    auto next = [&](const char* want) {  // the next line must be `want value`
        if (li >= lines.size()) return false;
        const std::string& l = lines[li++];
        const size_t sp = l.find(' ');
        key = l.substr(0, sp), val = sp == std::string::npos ? "" : l.substr(sp + 1);
        return key == want;
    };
    auto bad = [&](const char* want, const char* expect) {
        if (key != want) return path + ": line " + std::to_string(li) + ": expected the field '" + want + "', found '" + key.substr(0, 40) + "'";
        return path + ": " + want + " '" + val.substr(0, 80) + "' (expected " + expect + ")";
    };
#define CKPT_U64(KEY, LO, HI, DST)                                                              \
    do {                                                                                         \
        uint64_t v_;                                                                             \
        if (!next(KEY) || !ckpt_parse_u64(val, LO, HI, &v_)) return bad(KEY, "a whole number from " #LO " to " #HI); \
        DST = v_;                                                                                \
    } while (0)
#define CKPT_F32(KEY, DST)                                                                        \
    do {                                                                                          \
        if (!next(KEY) || !ckpt_parse_float(val, &DST)) return bad(KEY, "a positive finite number"); \
    } while (0)
    const uint64_t BIG = (uint64_t)1 << 62;
    Config& c = m->cfg;
    c.note = "";
    if (!next("fpdt-checkpoint") || val != "2") return bad("fpdt-checkpoint", "2: this reads checkpoint format 2");
    CKPT_U64("step", 0, BIG, m->step);
    CKPT_U64("total_steps", 0, BIG, m->total_steps);
    if (m->total_steps && m->step > m->total_steps)
        return path + ": step " + std::to_string(m->step) + " is past total_steps " + std::to_string(m->total_steps);
    CKPT_U64("seed", 0, BIG, m->seed);
    if (!next("model.name") || val.empty() || val.size() >= sizeof c.name || val.find_first_of(" \t\r") != std::string::npos)
        return bad("model.name", "a name of 1 to 31 characters without spaces");
    snprintf(c.name, sizeof c.name, "%s", val.c_str());
    if (!next("model.family") || (val != "gpt" && val != "llama")) return bad("model.family", "gpt or llama");
    c.family = val == "gpt" ? GPT : LLAMA;
    CKPT_U64("model.n_layer", 1, 4096, c.n_layer);
    CKPT_U64("model.d_model", 1, 1 << 17, c.d_model);
    CKPT_U64("model.n_head", 1, 4096, c.n_head);
    CKPT_U64("model.n_kv_head", 1, 4096, c.n_kv_head);
    if (c.n_head % c.n_kv_head) return path + ": model.n_kv_head " + std::to_string(c.n_kv_head) + " does not divide model.n_head " + std::to_string(c.n_head);
    CKPT_U64("model.head_dim", 1, 4096, c.head_dim);
    CKPT_U64("model.ffn", 1, 1 << 20, c.ffn);
    CKPT_U64("model.vocab", 1, 1 << 24, c.vocab);
    CKPT_F32("model.rope_theta", c.rope_theta);
    CKPT_F32("model.norm_eps", c.norm_eps);
    if (!next("model.tie_embeddings") || (val != "0" && val != "1")) return bad("model.tie_embeddings", "0 or 1");
    c.tie_embeddings = val == "1";
    if (!next("model.rope_scaling") || (val != "none" && val != "linear" && val != "llama3"))
        return bad("model.rope_scaling", "none, linear or llama3");
    c.rope_scaling = val == "linear" ? ROPE_LINEAR : val == "llama3" ? ROPE_LLAMA3 : ROPE_NONE;
    CKPT_F32("model.rope_factor", c.rope_factor);
    CKPT_F32("model.rope_low_freq_factor", c.rope_low_freq_factor);
    CKPT_F32("model.rope_high_freq_factor", c.rope_high_freq_factor);
    CKPT_U64("model.rope_original_max_pos", 1, INT32_MAX, c.rope_original_max_pos);
    CKPT_U64("data.seq", 0, (uint64_t)1 << 40, m->seq);
    if (!next("data.source") || val.empty()) return bad("data.source", "the data's identity");
    for (char ch : val)
        if ((unsigned char)ch < 0x20 || ch == 0x7f) return bad("data.source", "printable characters");
    m->source = val;
    if (li < lines.size() && lines[li].rfind("data.batch ", 0) == 0) CKPT_U64("data.batch", 1, 1 << 30, m->batch);  // older manifests: 1
    CKPT_U64("n_params", 1, (uint64_t)1 << 40, m->n_params);
    size_t count = 0;
    param_table(c, &count);
    if (count != m->n_params)
        return path + ": n_params " + std::to_string(m->n_params) + " does not match its model (" + std::to_string(count) + " parameters)";
    CKPT_U64("optimizer", 0, 1, m->optimizer);
    uint64_t nshard = 0;
    CKPT_U64("shards", 1, 1 << 20, nshard);
    if (nshard > lines.size()) return path + ": shards " + std::to_string(nshard) + " but only " + std::to_string(lines.size()) + " lines";
    for (uint64_t r = 0; r < nshard; r++) {
        if (!next("shard")) return bad("shard", "a shard line");
        char rs[24], los[24], his[24], sums[24], extra;
        CkptShard s;
        uint64_t idx;
        if (val.size() > 100 || sscanf(val.c_str(), "%23s %23s %23s %23s %c", rs, los, his, sums, &extra) != 4 ||
            !ckpt_parse_u64(rs, 0, BIG, &idx) || !ckpt_parse_u64(los, 0, BIG, &s.lo) || !ckpt_parse_u64(his, 0, BIG, &s.hi) ||
            !ckpt_parse_hex(sums, &s.sum) || idx != r)
            return path + ": shard line " + std::to_string(r) + " '" + val.substr(0, 80) + "' (expected '" + std::to_string(r) + " LO HI CHECKSUM')";
        const uint64_t want_lo = r ? m->shards.back().hi : 0;
        if (s.lo != want_lo || s.hi < s.lo || s.hi > m->n_params)
            return path + ": shard " + std::to_string(r) + " covers [" + los + ", " + his + "), expected to start at " +
                   std::to_string(want_lo) + " and end by n_params " + std::to_string(m->n_params);
        m->shards.push_back(s);
    }
    if (m->shards.back().hi != m->n_params)
        return path + ": the shards end at " + std::to_string(m->shards.back().hi) + ", not at n_params " + std::to_string(m->n_params);
    uint64_t sum;
    if (!next("end") || !ckpt_parse_hex(val, &sum)) return bad("end", "16 hex digits");
    if (li != lines.size()) return path + ": text after the end line";
    const size_t body = text.size() - lines.back().size() - 1;
    if (fnv1a(FNV_OFFSET, text.data(), body) != sum) return path + ": checksum mismatch (corrupt or partly written)";
#undef CKPT_U64
#undef CKPT_F32
    return "";
}

// ----------------------------------------------------------------------------
// Files. A checkpoint is a directory of regular files that fpdt wrote: every file in it is opened
// with common.h's open_regular without following a symbolic link, so a FIFO, a device or a link
// in its place is an error (the checkpoint is skipped), never a hang or a read from elsewhere.

static inline bool ckpt_read_all(int fd, void* buf, size_t n) {
    char* p = (char*)buf;
    while (n) {
        const ssize_t got = read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return false;
        p += got, n -= (size_t)got;
    }
    return true;
}
static inline bool ckpt_write_all(int fd, const void* buf, size_t n) {
    const char* p = (const char*)buf;
    while (n) {
        const ssize_t put = write(fd, p, n);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return false;
        p += put, n -= (size_t)put;
    }
    return true;
}

static inline bool ckpt_parse_name(const std::string& name, uint64_t* step);

// Reads and checks DIR/manifest.txt. With check_name, a directory named ckpt_<step> must hold the
// manifest of that step (a copy or a rename of another step's checkpoint is not taken for it).
static inline std::string read_manifest(const std::string& dir, Manifest* m, bool check_name = true) {
    const std::string path = dir + "/manifest.txt";
    int fd = -1;
    uint64_t size = 0;
    std::string err = open_regular(path, Open::Read, false, &fd, &size);
    if (!err.empty()) return err;
    if (size > ((uint64_t)64 << 20)) {
        close(fd);
        return path + ": " + std::to_string(size) + " bytes, too large for a manifest";
    }
    std::string text(size, '\0');
    const bool ok = ckpt_read_all(fd, &text[0], size);
    close(fd);
    if (!ok) return path + ": read failed";
    if (!(err = parse_manifest(text, path, m)).empty()) return err;
    uint64_t named;
    const std::string base = dir.substr(dir.find_last_of('/') == std::string::npos ? 0 : dir.find_last_of('/') + 1);
    if (check_name && ckpt_parse_name(base, &named) && named != m->step)
        return dir + ": its manifest is of step " + std::to_string(m->step) + ", its name says step " + std::to_string(named) +
               " (a copy or a rename of another checkpoint?)";
    return "";
}

static inline std::string ckpt_shard_path(const std::string& dir, size_t r) { return dir + "/shard_" + std::to_string(r) + ".bin"; }

// Every shard file exists, is a regular file, and has the size its slice needs. Nothing is read.
static inline std::string check_shard_sizes(const std::string& dir, const Manifest& m) {
    for (size_t r = 0; r < m.shards.size(); r++) {
        const std::string p = ckpt_shard_path(dir, r);
        struct stat st;
        if (lstat(p.c_str(), &st) != 0) return p + ": " + strerror(errno);
        if (!S_ISREG(st.st_mode)) return p + ": not a regular file (" + file_kind(st.st_mode) + ")";
        const uint64_t want = ckpt_shard_bytes(m, m.shards[r]);
        if ((uint64_t)st.st_size != want)
            return p + ": " + std::to_string(st.st_size) + " bytes, expected " + std::to_string(want) + " (truncated?)";
    }
    return "";
}

// Reads [p_lo, p_hi) of the parameters and [m_lo, m_hi) of AdamW m and v (when the checkpoint
// has them; m_lo == m_hi asks for none) out of the shards, checking each shard's checksum as it
// streams through. Only the wanted ranges are kept in memory.
static inline std::string read_checkpoint_state(const std::string& dir, const Manifest& man, uint64_t p_lo, uint64_t p_hi,
                                                uint64_t m_lo, uint64_t m_hi, std::vector<float>* params,
                                                std::vector<float>* m, std::vector<float>* v) {
    std::string err = check_shard_sizes(dir, man);
    if (!err.empty()) return err;
    // the sizes come from the manifest (forged, the shards can be sparse files of any size)
    const double bytes = ((double)(p_hi - p_lo) + 2.0 * (double)(m_hi - m_lo)) * sizeof(float) + (1 << 20);
    if (!(err = check_host_bytes(dir + ": loading " + std::to_string(p_hi - p_lo) + " parameters" +
                                 (m_hi > m_lo ? " and their AdamW moments" : ""), bytes)).empty())
        return err;
    params->assign(p_hi - p_lo, 0.0f);
    m->assign(m_hi - m_lo, 0.0f);
    v->assign(m_hi - m_lo, 0.0f);
    std::vector<float> buf(1 << 18);  // 1 MiB at a time
    for (size_t r = 0; r < man.shards.size(); r++) {
        const CkptShard& s = man.shards[r];
        const uint64_t n = s.hi - s.lo;
        const std::string p = ckpt_shard_path(dir, r);
        int fd = -1;
        uint64_t size = 0;
        if (!(err = open_regular(p, Open::Read, false, &fd, &size)).empty()) return err;
        if (size != ckpt_shard_bytes(man, s)) {
            close(fd);
            return p + ": changed size while being read";
        }
        uint64_t h = FNV_OFFSET;
        // the file is params[lo:hi], m[lo:hi], v[lo:hi]: array a, element lo + i
        const int arrays = man.optimizer ? 3 : 1;
        for (int a = 0; a < arrays && err.empty(); a++) {
            const uint64_t want_lo = a == 0 ? p_lo : m_lo, want_hi = a == 0 ? p_hi : m_hi;
            float* dst = a == 0 ? params->data() : a == 1 ? m->data() : v->data();
            for (uint64_t i = 0; i < n;) {
                const uint64_t k = std::min<uint64_t>(buf.size(), n - i);
                if (!ckpt_read_all(fd, buf.data(), k * sizeof(float))) {
                    err = p + ": read failed";
                    break;
                }
                h = fnv1a(h, buf.data(), k * sizeof(float));
                const uint64_t g0 = s.lo + i, g1 = g0 + k;  // global indices of buf
                const uint64_t c0 = std::max(g0, want_lo), c1 = std::min(g1, want_hi);
                if (c0 < c1) memcpy(dst + (c0 - want_lo), buf.data() + (c0 - g0), (c1 - c0) * sizeof(float));
                i += k;
            }
        }
        close(fd);
        if (!err.empty()) return err;
        if (h != s.sum) return p + ": checksum mismatch (corrupt or partly written)";
    }
    return "";
}

// ----------------------------------------------------------------------------
// The state moving between the model and the files: the only places that know where params, m
// and v live and how they are split across ranks (a ZeRO-3 change edits these three).

// This rank's slice [lo, hi) of the flat arrays (the one it writes), downloaded: params, m, v.
static inline void ckpt_params_slice_host(Model* M, uint64_t lo, uint64_t hi, std::vector<float>* w, std::vector<float>* m,
                                          std::vector<float>* v) {
    const uint64_t k = hi - lo, mo = M->run.zero ? lo - (uint64_t)M->run.world_rank * M->shard_n : lo;  // offset in opt_m/opt_v
    w->resize(k), m->resize(k), v->resize(k);
    if (!k) return;
    dev_download(&M->ctx, w->data(), M->params + (M->run.zero >= 3 ? mo : lo), k * sizeof(float));  // ZeRO-3: the shard
    dev_download(&M->ctx, m->data(), M->opt_m + mo, k * sizeof(float));
    dev_download(&M->ctx, v->data(), M->opt_v + mo, k * sizeof(float));
}

// Everything this rank holds, downloaded: its weights (all of them, or its shard under ZeRO-3)
// and its moments (shard_n each). ckpt_state_to_model puts it back into a model of another run
// shape (train.h's model_reshape: the parameter layout does not depend on the sequence).
static inline void ckpt_model_to_host(Model* M, std::vector<float>* w, std::vector<float>* m, std::vector<float>* v) {
    w->resize(M->run.zero >= 3 ? M->shard_n : M->n_padded), m->resize(M->shard_n), v->resize(M->shard_n);
    dev_download(&M->ctx, w->data(), M->params, w->size() * sizeof(float));
    dev_download(&M->ctx, m->data(), M->opt_m, m->size() * sizeof(float));
    dev_download(&M->ctx, v->data(), M->opt_v, v->size() * sizeof(float));
}

// What this rank loads: the parameters [p_lo, p_hi) (today every rank holds them all) and the
// moments [m_lo, m_hi) it updates (its ZeRO-1 shard, or all of them).
static inline void ckpt_load_ranges(const Model* M, uint64_t* p_lo, uint64_t* p_hi, uint64_t* m_lo, uint64_t* m_hi) {
    const uint64_t n = M->n_params;
    *p_lo = 0, *p_hi = n;
    *m_lo = std::min(n, M->run.zero ? (uint64_t)M->run.world_rank * M->shard_n : 0);
    *m_hi = std::min(n, *m_lo + M->shard_n);
    if (M->run.zero >= 3) *p_lo = *m_lo, *p_hi = *m_hi;  // ZeRO-3 holds the weights of its slice only (zero.h)
}

// Loaded state into the model: params [p_lo, p_hi) and moments [m_lo, m_hi) of ckpt_load_ranges
// (the padding past n_params stays zero), or what ckpt_model_to_host took from a model.
static inline void ckpt_state_to_model(Model* M, const std::vector<float>& params, const std::vector<float>& m,
                                       const std::vector<float>& v) {
    std::vector<float> pm(M->shard_n, 0.0f), pv(M->shard_n, 0.0f);
    std::copy(m.begin(), m.end(), pm.begin());
    std::copy(v.begin(), v.end(), pv.begin());
    if (M->run.zero >= 3) {  // this rank's slice of the weights, padded like the moments
        std::vector<float> pw(M->shard_n, 0.0f);
        std::copy(params.begin(), params.end(), pw.begin());
        dev_upload(&M->ctx, M->params, pw.data(), M->shard_n * sizeof(float));
    } else {
        dev_upload(&M->ctx, M->params, params.data(), params.size() * sizeof(float));
    }
    dev_upload(&M->ctx, M->opt_m, pm.data(), M->shard_n * sizeof(float));
    dev_upload(&M->ctx, M->opt_v, pv.data(), M->shard_n * sizeof(float));
}

// A checkpoint's weights (all n_params of them) into the model (this rank's slice under ZeRO-3),
// the optimizer's moments zero: what train --init and eval start from.
static inline void ckpt_params_to_model(Model* M, const std::vector<float>& all) {
    uint64_t p_lo, p_hi, m_lo, m_hi;
    ckpt_load_ranges(M, &p_lo, &p_hi, &m_lo, &m_hi);
    const std::vector<float> mine(all.begin() + p_lo, all.begin() + p_hi), zeros(m_hi - m_lo, 0.0f);
    ckpt_state_to_model(M, mine, zeros, zeros);
}

// ----------------------------------------------------------------------------
// The directory: names, listing, removal, the lock.

static inline std::string ckpt_dir_path(const std::string& out, uint64_t step) {
    char b[64];
    snprintf(b, sizeof b, "/ckpt_%08llu", (unsigned long long)step);
    return out + b;
}

// "ckpt_<digits>" (any width) -> its step.
static inline bool ckpt_parse_name(const std::string& name, uint64_t* step) {
    return name.rfind("ckpt_", 0) == 0 && ckpt_parse_u64(name.substr(5), 0, (uint64_t)1 << 62, step);
}

// What a name in --out is to fpdt: a checkpoint ckpt_<digits> (a directory), a save's leftover
// ckpt_<digits>.tmp or ckpt_<digits>.old.tmp (a directory), an old single-file checkpoint
// ckpt_<digits>.bin (a regular file), or none of these.
enum class CkptName { None, Dir, Tmp, OldBin };
static inline CkptName ckpt_name_kind(const std::string& n) {
    uint64_t step;
    auto ends = [&](const char* x) { return n.size() > strlen(x) && n.compare(n.size() - strlen(x), strlen(x), x) == 0; };
    auto stem = [&](const char* x) { return n.substr(0, n.size() - strlen(x)); };
    if (ckpt_parse_name(n, &step)) return CkptName::Dir;
    if (ends(".old.tmp") && ckpt_parse_name(stem(".old.tmp"), &step)) return CkptName::Tmp;
    if (ends(".tmp") && ckpt_parse_name(stem(".tmp"), &step)) return CkptName::Tmp;
    if (ends(".bin") && ckpt_parse_name(stem(".bin"), &step)) return CkptName::OldBin;
    return CkptName::None;
}

// The names in out that ckpt_name_kind knows, sorted.
static inline std::vector<std::string> checkpoint_like_names(const std::string& out) {
    std::vector<std::string> names;
    DIR* d = opendir(out.c_str());
    if (!d) return names;
    while (dirent* e = readdir(d))
        if (ckpt_name_kind(e->d_name) != CkptName::None) names.push_back(e->d_name);
    closedir(d);
    std::sort(names.begin(), names.end());
    return names;
}

// Each name in out that fpdt would take for a checkpoint (or, unless dirs_only, a save's
// leftover or an old single-file checkpoint) but that is not of the kind fpdt makes: a symbolic
// link, a FIFO, a file where a directory belongs. One line each: fpdt neither reads, follows nor
// deletes them.
static inline std::vector<std::string> foreign_checkpoint_names(const std::string& out, bool dirs_only = false) {
    std::vector<std::string> bad;
    for (const std::string& n : checkpoint_like_names(out)) {
        struct stat st;
        const CkptName kind = ckpt_name_kind(n);
        if ((dirs_only && kind != CkptName::Dir) || lstat((out + "/" + n).c_str(), &st) != 0) continue;
        if (kind == CkptName::OldBin ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode))
            bad.push_back(out + "/" + n + ": " + file_kind(st.st_mode) + ", not a checkpoint " +
                          (kind == CkptName::OldBin ? "file" : "directory") + " (fpdt neither follows nor deletes it)");
    }
    return bad;
}

// The checkpoint directories in out (real directories: lstat), newest (highest step) first:
// (step, path).
static inline std::vector<std::pair<uint64_t, std::string>> list_checkpoints(const std::string& out) {
    std::vector<std::pair<uint64_t, std::string>> list;
    for (const std::string& n : checkpoint_like_names(out)) {
        uint64_t step;
        struct stat st;
        const std::string p = out + "/" + n;
        if (ckpt_parse_name(n, &step) && lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) list.push_back({step, p});
    }
    std::sort(list.begin(), list.end(), [](const std::pair<uint64_t, std::string>& a, const std::pair<uint64_t, std::string>& b) {
        return a.first != b.first ? a.first > b.first : a.second > b.second;
    });
    return list;
}

// The files fpdt writes into a checkpoint directory: manifest.txt, run.txt, shard_<r>.bin.
static inline bool ckpt_own_file(const std::string& n) {
    uint64_t r;
    return n == "manifest.txt" || n == "run.txt" ||
           (n.size() > 10 && n.rfind("shard_", 0) == 0 && n.compare(n.size() - 4, 4, ".bin") == 0 &&
            ckpt_parse_u64(n.substr(6, n.size() - 10), 0, 1 << 20, &r));
}

// Opens out/name as a directory without following a symbolic link (od: out, opened): *fd, or ""
// with *fd = -1 when nothing has that name, or why not.
static inline std::string ckpt_open_dir(int od, const std::string& out, const std::string& name, int* fd) {
    *fd = -1;
    struct stat st;
    if (fstatat(od, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? "" : out + "/" + name + ": " + strerror(errno);
    if (!S_ISDIR(st.st_mode)) return out + "/" + name + ": " + file_kind(st.st_mode) + ", not a checkpoint directory";
    if ((*fd = openat(od, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0)
        return out + "/" + name + ": " + strerror(errno);
    return "";
}

// Removes the checkpoint directory out/name (or a save's .tmp). It is opened relative to out
// without following a link, and removed only when everything in it is one of fpdt's own regular
// files (checked before anything is unlinked); otherwise nothing is touched. Returns "" (also
// when nothing has that name) or why it was left as it is. check_only: only says whether it could.
static inline std::string ckpt_remove_dir(const std::string& out, const std::string& name, bool check_only = false) {
    const int od = open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (od < 0) return out + ": " + strerror(errno);
    int dfd;
    std::string err = ckpt_open_dir(od, out, name, &dfd);
    DIR* d = dfd >= 0 ? fdopendir(dfd) : nullptr;
    if (dfd >= 0 && !d) close(dfd), err = out + "/" + name + ": " + strerror(errno);
    std::vector<std::string> files;
    for (dirent* e; d && err.empty() && (e = readdir(d));) {
        const std::string n = e->d_name;
        struct stat st;
        if (n == "." || n == "..") continue;
        const bool known = fstatat(dfd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
        if (!ckpt_own_file(n) || !known || !S_ISREG(st.st_mode))
            err = out + "/" + name + " holds " + n + (known && !S_ISREG(st.st_mode) ? std::string(" (") + file_kind(st.st_mode) + ")" : "") +
                  ", which fpdt did not write: left as it is";
        files.push_back(n);
    }
    for (size_t i = 0; i < files.size() && err.empty() && !check_only; i++)
        if (unlinkat(dfd, files[i].c_str(), 0) != 0) err = out + "/" + name + "/" + files[i] + ": " + strerror(errno);
    if (d) closedir(d);  // and dfd
    if (d && err.empty() && !check_only && unlinkat(od, name.c_str(), AT_REMOVEDIR) != 0) err = out + "/" + name + ": " + strerror(errno);
    close(od);
    return err;
}

// Removes what a killed save left behind: ckpt_<step>.tmp/ and ckpt_<step>.old.tmp/ directories
// (a save renames only complete checkpoints into place, so these are never one). Called under
// the --out lock, so no other run is writing them. Returns "" or the first that could not go.
static inline std::string remove_stale_tmp(const std::string& out) {
    for (const std::string& n : checkpoint_like_names(out)) {
        const std::string err = ckpt_name_kind(n) == CkptName::Tmp ? ckpt_remove_dir(out, n) : "";
        if (!err.empty()) return "--out " + out + ": cannot remove a killed save's leftover: " + err;
    }
    return "";
}

// --overwrite: removes every checkpoint in out (ckpt_<step>/ directories, their leftovers, old
// ckpt_<step>.bin files); nothing else, and nothing through a link. Returns "" or what could not
// be removed.
static inline std::string remove_checkpoints(const std::string& out) {
    for (const std::string& n : checkpoint_like_names(out)) {
        struct stat st;
        const std::string p = out + "/" + n;
        std::string err;
        if (ckpt_name_kind(n) != CkptName::OldBin) err = ckpt_remove_dir(out, n);
        else if (lstat(p.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) err = p + ": " + file_kind(st.st_mode) + ", not a checkpoint file";
        else if (unlink(p.c_str()) != 0 && errno != ENOENT) err = p + ": " + strerror(errno);
        if (!err.empty()) return "--overwrite: cannot remove " + err;
    }
    return "";
}

// Rotation before a save of `step`: this run's checkpoints (its identity, each named for its own
// step) older than `step`, beyond the newest of them, are removed; one holding anything fpdt did
// not write is left, with a warning.
static inline void rotate_checkpoints(const std::string& out, uint64_t step, const Manifest& id) {
    std::vector<std::string> mine;  // this run's, older than this step, newest first
    for (const auto& c : list_checkpoints(out)) {
        Manifest m;
        std::string f, a, b;
        if (c.first < step && read_manifest(c.second, &m).empty() && !manifest_identity_differs(m, id, &f, &a, &b))
            mine.push_back(c.second.substr(out.size() + 1));
    }
    for (size_t i = 1; i < mine.size(); i++) {
        const std::string e = ckpt_remove_dir(out, mine[i]);
        if (!e.empty()) fprintf(stderr, "fpdt: warning: not rotated: %s\n", e.c_str());
    }
}

// ----------------------------------------------------------------------------
// Saving (every rank). `id` holds this run's identity (step, shards and n_params are filled in
// here); `settings` is one informational line for run.txt (ranks, chunk, offload, ZeRO,
// precision, the optimizer's settings), which --resume reports changes against. Returns the
// checkpoint's path.

// Writes a new regular file `name` in the directory dirfd (dir in messages), never through a
// link, from the pieces, and fsyncs it. Returns "" or one line.
static inline std::string ckpt_write_file(int dirfd, const std::string& dir, const std::string& name,
                                          const std::vector<std::pair<const void*, size_t>>& pieces) {
    int fd;
    std::string err = open_regular(name, Open::Write, false, &fd, nullptr, dirfd);
    if (!err.empty()) return "writing " + dir + "/" + err;
    bool ok = true;
    for (const auto& p : pieces) ok = ok && ckpt_write_all(fd, p.first, p.second);
    ok = ok && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    return ok ? "" : "writing " + dir + "/" + name + " failed: " + strerror(errno);
}

static inline std::string save_checkpoint(Model* M, const std::string& out, uint64_t step, Manifest id,
                                          const std::string& settings) {
    const Comm& cm = comm_world();
    const uint64_t n = M->n_params;
    const std::string final_dir = ckpt_dir_path(out, step), tmp = final_dir + ".tmp";
    const std::string name = final_dir.substr(out.size() + 1), tmp_name = name + ".tmp", aside_name = name + ".old.tmp";
    uint64_t lo, hi;
    ckpt_slice(n, cm.size, cm.rank, &lo, &hi);
    std::vector<float> w, m, v;
    ckpt_params_slice_host(M, lo, hi, &w, &m, &v);
    double bad = -1;  // never write a state that cannot be resumed
    for (uint64_t i = 0; i < hi - lo && bad < 0; i++)
        if (!std::isfinite(w[i]) || !std::isfinite(m[i]) || !std::isfinite(v[i])) bad = (double)(lo + i);
    comm_allreduce_max(&bad, 1);
    if (bad >= 0) fatal_all("refusing to write %s: parameter %.0f or its AdamW moments are not finite", final_dir.c_str(), bad);
    id.step = step, id.n_params = n, id.optimizer = 1;
    const uint64_t bytes = 3 * n * sizeof(float) + 65536;
    // rank 0 checks that what holds this step's name is fpdt's to replace, makes room (this run's
    // older checkpoints beyond the newest one go), checks the free space, and makes the .tmp
    // directory. Nothing is followed or deleted through a link (ckpt_remove_dir).
    std::string err;
    const std::string cannot = "--out " + out + ": cannot save step " + std::to_string(step) + ": ";
    if (cm.rank == 0) {
        struct stat st;
        struct statvfs fs;
        Manifest there;
        std::string f, a, b, e;
        if (lstat(final_dir.c_str(), &st) == 0) {  // a damaged checkpoint a resume skipped is replaced; nothing else
            if (!S_ISDIR(st.st_mode))
                err = cannot + final_dir + ": " + file_kind(st.st_mode) + ", not a checkpoint directory (fpdt neither "
                      "follows nor deletes it): move it out of --out, then --resume";
            else if (read_manifest(final_dir, &there, false).empty() && (there.step != step || manifest_identity_differs(there, id, &f, &a, &b)))
                err = cannot + final_dir + " holds a checkpoint of " + (there.step != step ? "step " + std::to_string(there.step)
                      : "another run (" + f + " " + a + ")") + ", which fpdt does not delete (move it out of --out, then --resume)";
            else if (!(e = ckpt_remove_dir(out, name, true)).empty())
                err = cannot + e;
        }
        if (err.empty() && (!(e = ckpt_remove_dir(out, tmp_name)).empty() || !(e = ckpt_remove_dir(out, aside_name)).empty()))
            err = cannot + "a stale leftover: " + e;
        if (err.empty()) rotate_checkpoints(out, step, id);
        if (err.empty() && statvfs(out.c_str(), &fs) == 0 && (uint64_t)fs.f_bavail * fs.f_frsize < bytes) {
            char buf[512];
            snprintf(buf, sizeof buf, "--out %s: saving step %llu needs %.1f MiB (one checkpoint; the newest one before it is kept) "
                     "but only %.1f MiB are free", out.c_str(), (unsigned long long)step, bytes / 1048576.0,
                     (double)fs.f_bavail * fs.f_frsize / 1048576.0);
            err = buf;
        }
        if (err.empty() && mkdir(tmp.c_str(), 0755) != 0) err = "--out " + out + ": cannot create " + tmp + ": " + strerror(errno);
    }
    fatal_any(err);
    comm_barrier();  // the .tmp directory exists
    // every rank writes its shard, into the .tmp directory opened without following a link
    uint64_t sum = FNV_OFFSET;
    for (const std::vector<float>* a : {&w, &m, &v}) sum = fnv1a(sum, a->data(), a->size() * sizeof(float));
    int od = open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC), tfd = -1;
    err = od < 0 ? out + ": " + strerror(errno) : ckpt_open_dir(od, out, tmp_name, &tfd);
    if (err.empty() && tfd < 0) err = tmp + ": " + strerror(ENOENT);
    if (err.empty())
        err = ckpt_write_file(tfd, tmp, "shard_" + std::to_string(cm.rank) + ".bin",
                              {{w.data(), w.size() * sizeof(float)}, {m.data(), m.size() * sizeof(float)}, {v.data(), v.size() * sizeof(float)}});
    if (!err.empty()) err = "--out " + out + ": " + err;
    std::vector<uint64_t> sums(cm.size);
    comm_gather_u64(sum, sums.data());
    double failed = err.empty() ? 0 : 1;  // a failed shard: rank 0 removes the .tmp, then all stop
    comm_allreduce_max(&failed, 1);
    if (failed > 0) {
        if (cm.rank == 0) ckpt_remove_dir(out, tmp_name);
        comm_barrier();
        fatal_any(err.empty() ? std::string() : err + " (" + tmp + " removed)");
        fatal_all("--out %s: saving step %llu failed on another rank", out.c_str(), (unsigned long long)step);
    }
    if (cm.rank == 0) {
        for (int r = 0; r < cm.size; r++) {
            uint64_t a, b;
            ckpt_slice(n, cm.size, r, &a, &b);
            id.shards.push_back({a, b, sums[r]});
        }
        const std::string text = manifest_text(id), info = settings + "\n";
        // run.txt (informational), then the manifest last: a directory without a valid manifest
        // is not a checkpoint
        err = ckpt_write_file(tfd, tmp, "run.txt", {{info.data(), info.size()}});
        if (err.empty()) err = ckpt_write_file(tfd, tmp, "manifest.txt", {{text.data(), text.size()}});
        if (!err.empty()) err = "--out " + out + ": " + err;
        fsync(tfd);
        // a damaged checkpoint of the same step (checked above) moves aside first
        struct stat st;
        if (err.empty() && fstatat(od, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && renameat(od, name.c_str(), od, aside_name.c_str()) != 0)
            err = "--out " + out + ": cannot move the old " + final_dir + " aside: " + strerror(errno);
        if (err.empty() && renameat(od, tmp_name.c_str(), od, name.c_str()) != 0)
            err = "--out " + out + ": cannot rename " + tmp + ": " + strerror(errno);
        if (err.empty()) {
            fsync(od);
            const std::string e = ckpt_remove_dir(out, aside_name);
            if (!e.empty()) fprintf(stderr, "fpdt: warning: %s\n", e.c_str());
        } else {
            ckpt_remove_dir(out, tmp_name), err += " (" + tmp + " removed)";
        }
    }
    if (tfd >= 0) close(tfd);
    if (od >= 0) close(od);
    fatal_any(err);
    return final_dir;
}

// ----------------------------------------------------------------------------
// Loading.

// The flag a manifest field comes from, for messages.
static inline const char* manifest_field_flag(const std::string& k) {
    return k == "total_steps" ? "--steps" : k == "seed" ? "--seed" : k == "data.seq" ? "--seq" : k == "data.source" ? "--data"
         : k == "data.batch" ? "--batch" : k == "model.rope_theta" ? "--rope-theta"
         : k == "model.rope_scaling" || k == "model.rope_factor" ? "--rope-scale" : "--model";
}

// run.txt's line (the settings a checkpoint was saved with), or "" when it cannot be read.
static inline std::string read_run_settings(const std::string& dir) {
    int fd = -1;
    uint64_t size = 0;
    if (!open_regular(dir + "/run.txt", Open::Read, false, &fd, &size).empty()) return "";
    std::string s(std::min<uint64_t>(size, 4096), '\0');
    const bool ok = ckpt_read_all(fd, &s[0], s.size());
    close(fd);
    return ok ? s.substr(0, s.find('\n')) : "";
}

// The newest checkpoint in out that reads back whole (manifest, shard sizes and checksums), with
// all its parameters; a damaged newer one is reported and skipped. Returns its path, or "" when
// there is none. One process (./fpdt sample).
static inline std::string find_checkpoint(const std::string& out, Manifest* m, std::vector<float>* params) {
    for (const std::string& b : foreign_checkpoint_names(out, true)) fprintf(stderr, "fpdt: warning: skipping %s\n", b.c_str());
    for (const auto& c : list_checkpoints(out)) {
        std::vector<float> mm, vv;
        std::string err = read_manifest(c.second, m);
        if (err.empty()) err = read_checkpoint_state(c.second, *m, 0, m->n_params, 0, 0, params, &mm, &vv);
        if (err.empty()) return c.second;
        fprintf(stderr, "fpdt: warning: skipping %s\n", err.c_str());
    }
    return "";
}

// --resume: loads the newest valid checkpoint in out into M. Every rank reads the parameters it
// holds and the slice of the moments it updates, whatever ranks and ZeRO setting wrote them. A
// damaged checkpoint (on any rank) is reported and the one before it tried; one made by a run of
// another identity (`id`: model, seq, seed, steps, data) is refused with the field, the old and
// the new value. Returns its path; *man its manifest. None valid is an error.
static inline std::string load_checkpoint(Model* M, const std::string& out, const Manifest& id, Manifest* man) {
    const Comm& cm = comm_world();
    std::vector<std::pair<uint64_t, std::string>> list = list_checkpoints(out);
    double count = cm.rank == 0 ? (double)list.size() : 0;  // rank 0's listing for everyone
    comm_allreduce(&count, 1);
    std::vector<double> steps((size_t)count, 0.0);
    for (size_t i = 0; i < steps.size() && cm.rank == 0; i++) steps[i] = (double)list[i].first;
    comm_allreduce(steps.data(), steps.size());
    for (double s : steps) {
        std::string path = ckpt_dir_path(out, (uint64_t)s), skip, refuse, f, was, now;
        for (const auto& c : list)
            if ((double)c.first == s) path = c.second;  // its name as listed (any width)
        skip = read_manifest(path, man);
        if (skip.empty()) {
            if (!man->optimizer)
                refuse = "--resume: " + path + " holds parameters only (optimizer 0, an imported model): it can start a run, not continue one";
            else if (man->step > id.total_steps)
                refuse = "--resume: " + path + " is at step " + std::to_string(man->step) + ", past --steps " + std::to_string(id.total_steps);
            else if (manifest_identity_differs(*man, id, &f, &was, &now))
                refuse = "--resume: " + path + " was made with " + f + " " + was + ", this run has " + now + " (" +
                         manifest_field_flag(f) + "; resuming would change what the run computes)";
        }
        fatal_any(refuse);
        std::vector<float> params, m, v;
        uint64_t p_lo, p_hi, m_lo, m_hi;
        ckpt_load_ranges(M, &p_lo, &p_hi, &m_lo, &m_hi);
        if (skip.empty()) skip = read_checkpoint_state(path, *man, p_lo, p_hi, m_lo, m_hi, &params, &m, &v);
        double failed[2] = {cm.rank == 0 && !skip.empty() ? 1.0 : 0.0, skip.empty() ? 0.0 : 1.0};  // rank 0's, anyone's
        comm_allreduce_max(failed, 2);
        if (!failed[1]) {
            ckpt_state_to_model(M, params, m, v);
            return path;
        }
        if (cm.rank == 0 && !skip.empty()) fprintf(stderr, "fpdt: warning: skipping %s\n", skip.c_str());
        else if (!failed[0] && !skip.empty()) fprintf(stderr, "fpdt (rank %d of %d): warning: skipping %s\n", cm.rank, cm.size, skip.c_str());
    }
    fatal_all("--resume: no valid checkpoint (a ckpt_<step>/ directory with its manifest.txt) in --out %s", out.c_str());
}

// --out's lock: rank 0 holds an flock on OUT/.fpdt.lock for the whole run, so two runs cannot
// share a directory. Returns "" or why not.
static inline std::string lock_out_dir(const std::string& out) {
    const std::string p = out + "/.fpdt.lock";
    int fd;
    const std::string err = open_regular(p, Open::Lock, false, &fd);
    if (!err.empty()) return "--out " + out + ": cannot open its lock file " + err;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = {0};
        (void)!pread(fd, pid, sizeof pid - 1, 0);
        close(fd);
        return "--out " + out + ": another fpdt run is using it (pid " + std::string(pid, strcspn(pid, "\n")) +
               " holds " + p + "); wait for it to end or choose another --out";
    }
    const std::string me = std::to_string(getpid()) + "\n";
    if (ftruncate(fd, 0) == 0) (void)!pwrite(fd, me.data(), me.size(), 0);
    return "";  // fd stays open (and locked) until the process ends
}

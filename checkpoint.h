// checkpoint.h: saving and loading training state. DIR/ckpt_NNNNNNNN.bin = header, weights,
// AdamW m and v (fp32; gathered from the ranks under ZeRO-1), with an FNV-1a checksum over the
// header and all that follows it. Written to a .tmp file, flushed to disk, then renamed: a crash
// mid-write leaves the previous checkpoint intact, and a corrupt file is detected on load.
#pragma once
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>
#include "model.h"

struct CkptHeader {
    char magic[8];       // "FPDTCKP1"
    char model[32];      // preset name
    int32_t dims[8];     // family, n_layer, d_model, n_head, n_kv_head, ffn, vocab, 0
    uint64_t n_params;   // floats per array
    uint64_t step;       // completed steps
    uint64_t seed;       // the run's seed (data and init are pure functions of it and the step)
    uint64_t total_steps;
    uint64_t checksum;   // FNV-1a 64 of this header (checksum field 0) and the payload
    uint64_t reserved[4];
};

static inline uint64_t fnv1a(uint64_t h, const void* p, size_t n) {
    const uint8_t* b = (const uint8_t*)p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

// FNV-1a over the header (with its checksum field zeroed) and the payload's pieces in order.
static inline uint64_t ckpt_checksum(CkptHeader h, std::initializer_list<std::pair<const float*, size_t>> payload) {
    h.checksum = 0;
    uint64_t c = fnv1a(0xcbf29ce484222325ull, &h, sizeof h);
    for (const auto& piece : payload) c = fnv1a(c, piece.first, piece.second * sizeof(float));
    return c;
}

static inline void config_dims(const Config& c, int32_t* d) {
    int32_t v[8] = {c.family, c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.ffn, c.vocab, 0};
    memcpy(d, v, sizeof v);
}

static inline std::string ckpt_path(const std::string& dir, uint64_t step) {
    char b[64];
    snprintf(b, sizeof b, "/ckpt_%08llu.bin", (unsigned long long)step);
    return dir + b;
}

// Newest first: the checkpoint files in dir.
static inline std::vector<std::string> list_checkpoints(const std::string& dir) {
    std::vector<std::string> out;
    DIR* d = opendir(dir.c_str());
    if (!d) return out;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.rfind("ckpt_", 0) == 0 && n.size() == 17 && n.compare(13, 4, ".bin") == 0) out.push_back(dir + "/" + n);
    }
    closedir(d);
    std::sort(out.rbegin(), out.rend());
    return out;
}

// Everything the file needs, gathered on rank 0 (ZeRO-1 shards come home first).
static inline void save_checkpoint(Model* M, const std::string& dir, uint64_t step, uint64_t seed, uint64_t total) {
    const Comm& cm = comm_world();
    const size_t n = M->n_params, k = M->shard_n;
    std::vector<float> w(n), m(k), v(k), all(cm.rank == 0 ? M->n_padded : 0);
    dev_download(&M->ctx, w.data(), M->params, n * sizeof(float));
    dev_download(&M->ctx, m.data(), M->opt_m, k * sizeof(float));
    dev_download(&M->ctx, v.data(), M->opt_v, k * sizeof(float));
    if (M->run.zero) {  // the shards come home to rank 0
        comm_gather(m.data(), all.data(), k);
        m.assign(all.begin(), all.begin() + (cm.rank == 0 ? n : 0));
        comm_gather(v.data(), all.data(), k);
        v.assign(all.begin(), all.begin() + (cm.rank == 0 ? n : 0));
    }
    if (cm.rank != 0) return;
    for (size_t i = 0; i < n; i++)  // never write a state that cannot be resumed
        if (!std::isfinite(w[i]) || !std::isfinite(m[i]) || !std::isfinite(v[i]))
            fatal("refusing to write %s: parameter %zu or its AdamW moments are not finite", ckpt_path(dir, step).c_str(), i);
    const float *pw = w.data(), *pm = m.data(), *pv = v.data();
    CkptHeader h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, "FPDTCKP1", 8);
    snprintf(h.model, sizeof h.model, "%s", M->cfg.name);
    config_dims(M->cfg, h.dims);
    h.n_params = n, h.step = step, h.seed = seed, h.total_steps = total;
    h.checksum = ckpt_checksum(h, {{pw, n}, {pm, n}, {pv, n}});
    mkdir(dir.c_str(), 0755);
    std::string path = ckpt_path(dir, step), tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) fatal("--out %s: cannot write %s: %s", dir.c_str(), tmp.c_str(), strerror(errno));
    bool ok = fwrite(&h, sizeof h, 1, f) == 1 && fwrite(pw, 4, n, f) == n && fwrite(pm, 4, n, f) == n &&
              fwrite(pv, 4, n, f) == n && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0)
        fatal("--out %s: writing %s failed: %s", dir.c_str(), path.c_str(), strerror(errno));
    int dfd = open(dir.c_str(), O_RDONLY);  // make the rename itself durable
    if (dfd >= 0) fsync(dfd), close(dfd);
    std::vector<std::string> files = list_checkpoints(dir);  // keep the newest two
    for (size_t i = 2; i < files.size(); i++) remove(files[i].c_str());
}

// Reads and verifies one checkpoint from an open file (named `path` in messages). Returns "" or
// what is wrong with it; never trusts a size it has not checked against the file.
static inline std::string read_checkpoint_file(FILE* f, const std::string& path, CkptHeader* h, std::vector<float>* data) {
    std::string err;
    if (fread(h, sizeof *h, 1, f) != 1) err = path + ": too short for a checkpoint header";
    else if (memcmp(h->magic, "FPDTCKP1", 8) != 0) err = path + ": not an fpdt checkpoint (bad magic)";
    else if (h->n_params == 0 || h->n_params > ((uint64_t)1 << 40)) err = path + ": implausible parameter count";
    else {
        fseek(f, 0, SEEK_END);
        const uint64_t size = (uint64_t)ftell(f), want = sizeof *h + 3 * h->n_params * 4;
        fseek(f, sizeof *h, SEEK_SET);
        if (size != want) err = path + ": size " + std::to_string(size) + " bytes, expected " + std::to_string(want) + " (truncated?)";
        else {
            data->resize(3 * h->n_params);
            if (fread(data->data(), 4, data->size(), f) != data->size()) err = path + ": read failed";
            else if (ckpt_checksum(*h, {{data->data(), data->size()}}) != h->checksum)
                err = path + ": checksum mismatch (corrupt or partly written)";
        }
    }
    return err;
}

static inline std::string read_checkpoint(const std::string& path, CkptHeader* h, std::vector<float>* data) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return path + ": cannot open: " + strerror(errno);
    std::string err = read_checkpoint_file(f, path, h, data);
    fclose(f);
    return err;
}

// Loads the newest valid checkpoint in dir into M; returns its step. A corrupt newest file is
// reported and the one before it used.
// The newest checkpoint in dir that reads back whole; a corrupt newer one is reported and skipped.
// Returns false when there is none.
static inline bool find_checkpoint(const std::string& dir, CkptHeader* h, std::vector<float>* data, std::string* path) {
    for (const std::string& p : list_checkpoints(dir)) {
        std::string err = read_checkpoint(p, h, data);
        if (err.empty()) {
            *path = p;
            return true;
        }
        if (comm_world().rank == 0) fprintf(stderr, "fpdt: warning: skipping %s\n", err.c_str());
    }
    return false;
}

// Whether a checkpoint holds this model's parameters.
static inline bool checkpoint_fits(const CkptHeader& h, const Model* M) {
    int32_t dims[8];
    config_dims(M->cfg, dims);
    return memcmp(h.dims, dims, sizeof dims) == 0 && h.n_params == M->n_params;
}

// Loads the newest valid checkpoint in dir into M (this rank's shard of the moments under
// ZeRO-1); returns its step.
static inline uint64_t load_checkpoint(Model* M, const std::string& dir, CkptHeader* out) {
    CkptHeader h;
    std::vector<float> data;
    std::string p;
    if (!find_checkpoint(dir, &h, &data, &p)) fatal_all("--resume: no valid checkpoint (ckpt_*.bin) in --out %s", dir.c_str());
    if (!checkpoint_fits(h, M))
        fatal_all("--resume: %s holds model '%.*s', not --model %s", p.c_str(), (int)sizeof h.model, h.model, M->cfg.name);
    const size_t n = M->n_params, lo = M->run.zero ? (size_t)M->run.rank * M->shard_n : 0;
    std::vector<float> m(M->shard_n, 0.0f), v(M->shard_n, 0.0f);  // this rank's part of the moments
    for (size_t i = 0; i < M->shard_n && lo + i < n; i++) m[i] = data[n + lo + i], v[i] = data[2 * n + lo + i];
    dev_upload(&M->ctx, M->params, data.data(), n * sizeof(float));
    dev_upload(&M->ctx, M->opt_m, m.data(), M->shard_n * sizeof(float));
    dev_upload(&M->ctx, M->opt_v, v.data(), M->shard_n * sizeof(float));
    *out = h;
    return h.step;
}


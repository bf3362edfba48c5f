// cmdline.h: what the commands share. Flags (--name value pairs, every value checked), the run's
// record (stdout and OUT/main.log), the device, the ranks and the precision, the default chunk,
// and the model's starting point (--init, --rope-theta, --rope-scale).
#pragma once
#include <omp.h>
#include <climits>
#include <map>
#include <string>
#include <vector>
#include "checkpoint.h"
#include "comm.h"
#include "data/data.h"
#include "model.h"
#include "offload.h"

// ----------------------------------------------------------------------------
// Command line: --name value pairs (and bare --help). Every value is checked; anything unknown is
// an error naming the flag.

struct Args {
    std::map<std::string, std::string> kv;
    bool help = false;

    bool has(const char* k) const { return kv.count(k) > 0; }
    std::string str(const char* k, const std::string& def) const { return has(k) ? kv.at(k) : def; }
    long long integer(const char* k, long long def, long long lo, long long hi) const {
        if (!has(k)) return def;
        const std::string& s = kv.at(k);
        char* end = nullptr;
        errno = 0;
        long long v = strtoll(s.c_str(), &end, 10);
        if (s.empty() || *end || errno) fatal_all("--%s: '%s' is not a whole number", k, s.c_str());
        if (v < lo || v > hi) fatal_all("--%s: %lld is out of range (expected %lld to %lld)", k, v, lo, hi);
        return v;
    }
    double real(const char* k, double def, double lo, double hi) const {
        if (!has(k)) return def;
        const std::string& s = kv.at(k);
        char* end = nullptr;
        errno = 0;
        double v = strtod(s.c_str(), &end);
        if (s.empty() || *end || !std::isfinite(v)) fatal_all("--%s: '%s' is not a number", k, s.c_str());
        // a value that is not zero but would be taken as 0 (it underflows a double, or the float it is stored in)
        if ((v == 0 && errno == ERANGE) || (v != 0 && (float)v == 0))
            fatal_all("--%s: '%s' is too small to be told from 0; write 0 if 0 is meant", k, s.c_str());
        if (v < lo || v > hi) fatal_all("--%s: %g is out of range (expected %g to %g)", k, v, lo, hi);
        return v;
    }
    bool flag01(const char* k, bool def) const { return integer(k, def, 0, 1) != 0; }
    // A comma-separated list, each item checked as integer() or real() checks one ("64,1024").
    template <typename T, typename One>
    std::vector<T> list(const char* k, const std::vector<T>& def, One one_value) const {
        if (!has(k)) return def;
        std::vector<T> v;
        const std::string& s = kv.at(k);
        for (size_t i = 0;; i = s.find(',', i) + 1) {
            Args one;
            one.kv[k] = s.substr(i, s.find(',', i) - i);
            v.push_back(one_value(one));
            if (s.find(',', i) == std::string::npos) break;
        }
        return v;
    }
    std::vector<long long> integers(const char* k, const std::vector<long long>& def, long long lo, long long hi) const {
        return list<long long>(k, def, [&](const Args& one) { return one.integer(k, 0, lo, hi); });
    }
    std::vector<double> reals(const char* k, const std::vector<double>& def, double lo, double hi) const {
        return list<double>(k, def, [&](const Args& one) { return one.real(k, 0, lo, hi); });
    }
};

// Flags that take no value.
static bool is_switch(const std::string& k) { return k == "resume" || k == "overwrite" || k == "help" || k == "needle"; }

static Args parse_args(int argc, char** argv, const std::vector<std::string>& allowed) {
    Args a;
    for (int i = 2; i < argc; i++) {
        std::string s = argv[i];
        if (s == "-h" || s == "--help") {
            a.help = true;
            continue;
        }
        if (s.rfind("--", 0) != 0) fatal_all("unexpected argument '%s' (flags look like --name value)", s.c_str());
        std::string k = s.substr(2), v;
        size_t eq = k.find('=');
        if (eq != std::string::npos) v = k.substr(eq + 1), k = k.substr(0, eq);
        bool known = false;
        for (const std::string& x : allowed) known |= (x == k);
        if (!known) fatal_all("unknown flag --%s for '%s' (see ./fpdt %s --help)", k.c_str(), argv[1], argv[1]);
        if (is_switch(k) && eq != std::string::npos) fatal_all("--%s takes no value", k.c_str());
        if (k == "help") {
            a.help = true;
            continue;
        }
        if (eq == std::string::npos) {
            if (is_switch(k)) v = "1";
            else if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) v = argv[++i];
            else fatal_all("--%s needs a value", k.c_str());
        }
        a.kv[k] = v;
    }
    return a;
}

static const Config& model_arg(const Args& a, const char* def) {
    std::string name = a.str("model", def);
    const Config* c = find_preset(name);
    if (!c) {
        std::string names;
        for (const Config& p : presets) names += std::string(names.empty() ? "" : ", ") + p.name;
        fatal_all("--model: unknown model '%s' (known: %s)", name.c_str(), names.c_str());
    }
    return *c;
}

static void print_models() {
    printf("models (--model):\n");
    for (const Config& c : presets) {
        size_t n = 0;
        param_table(c, &n);
        printf("  %-11s %-5s %2d layers, d %5d, %2d heads, %d kv heads, ffn %5d, vocab %6d, %8.1fM params  %s\n",
               c.name, c.family == GPT ? "gpt" : "llama", c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.ffn,
               c.vocab, n / 1e6, c.note);
    }
}

// ----------------------------------------------------------------------------
// The run's record. Rank 0 prints to stdout and, with --out, appends every line to OUT/main.log,
// including the step lines that stdout shows only every --log-every steps.

struct RunLog {
    FILE* file = nullptr;  // OUT/main.log, or null
};
static RunLog& run_log() {
    static RunLog L;
    return L;
}

// One line (no trailing newline in fmt) to the log file and, if show, to stdout. Rank 0 only.
static void log_line(bool show, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(bool show, const char* fmt, ...) {
    if (comm_world().rank != 0) return;
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (show) printf("%s\n", buf), fflush(stdout);
    if (run_log().file) fprintf(run_log().file, "%s\n", buf), fflush(run_log().file);
}

// "1:05" or "2:03:07"
static std::string clock_str(double seconds) {
    const long t = (long)std::max(0.0, seconds + 0.5);
    char b[32];
    if (t >= 3600) snprintf(b, sizeof b, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(b, sizeof b, "%ld:%02ld", t / 60, t % 60);
    return b;
}

// --log-every 0 (auto): every step of the first 10, then about 50 lines over the run.
static int auto_log_every(int steps) { return std::max(1, (steps + 49) / 50); }
static bool shown_step(int step, int steps, int every, bool special) {
    return special || step <= 10 || step == steps || step % every == 0;
}

// ----------------------------------------------------------------------------
// Device, ranks and precision

// --precision: true for bf16. auto is bf16 on the GPU (tensor cores, half the offload traffic) and
// fp32 on the CPU (the readable reference; bf16 there is an exact emulation, for tests).
static bool precision_bf16(const Args& a, bool gpu) {
    std::string p = a.str("precision", "auto");
    if (p != "auto" && p != "fp32" && p != "bf16") fatal_all("--precision: '%s' (expected auto, fp32 or bf16)", p.c_str());
    return p == "bf16" || (p == "auto" && gpu);
}

// GPUs visible to this process; always 0 in the CPU-only build (made by g++ where there is no nvcc).
static int gpu_count() {
#ifdef __CUDACC__
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: the CPU it is
        return 0;
    }
    return n;
#else
    return 0;
#endif
}

// --device: cpu, gpu, or (default) the GPU when there is one. On the GPU each rank takes device
// local_rank % count (several ranks may share one: their all-to-alls go through MPI on host memory).
static bool choose_device(const Args& a, Ctx* ctx) {
    std::string dev = a.str("device", "auto");
    if (dev != "auto" && dev != "cpu" && dev != "gpu") fatal_all("--device: '%s' (expected auto, cpu or gpu)", dev.c_str());
#ifndef __CUDACC__
    if (dev == "gpu")
        fatal("--device gpu: no CUDA device is visible to this CPU-only ./fpdt (built without nvcc): rebuild with the "
              "CUDA toolkit, or use --device cpu");
    (void)ctx;
    return false;
#else
    const int n = dev == "cpu" ? 0 : gpu_count();
    if (dev == "gpu" && n == 0)  // a machine of its own may lack it: this rank alone ends the job
        fatal("--device gpu: no CUDA device is visible (%s); use --device cpu", gpu_absence().c_str());
    if (n == 0) return false;
    static GpuCtx gpu_ctx;  // one per process: its streams live as long as the program
    GpuCtx* g = &gpu_ctx;
    g->device = comm_world().local_rank % n;
    CUDA_CHECK(cudaSetDevice(g->device));
    // The copy streams also run the small bf16 narrowing/widening kernels of the host store: at
    // the highest priority, so that the link is not left idle behind the attention kernels.
    int least = 0, greatest = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&g->compute, cudaStreamNonBlocking, least));
    CUDA_CHECK(cudaStreamCreateWithPriority(&g->h2d, cudaStreamNonBlocking, greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&g->d2h, cudaStreamNonBlocking, greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&g->comm, cudaStreamNonBlocking, greatest));  // NCCL's kernels
    CUBLAS_CHECK(cublasCreate(&g->blas));
    ctx->gpu = true;
    ctx->g = g;
    ctx->gpu_mark = gpu_mark;
    return true;
#endif
}

// --comm: how GPU buffers move between ranks. NCCL needs a GPU per rank; ranks sharing a GPU
// (NCCL refuses that) go through host memory and MPI. Which ranks share one is decided from the
// GPUs' identities, exchanged over MPI (comm.h, gpu_sharing), not from how many GPUs a rank sees.
static bool choose_comm(const Args& a, const Ctx& ctx) {
    std::string c = a.str("comm", "auto");
    if (c != "auto" && c != "nccl" && c != "mpi") fatal_all("--comm: '%s' (expected auto, nccl or mpi)", c.c_str());
    const Comm& cm = comm_world();
    if (cm.size == 1) return false;
    // Every rank must take the same road (NCCL's set-up is collective): agree on it first.
    double v[2] = {ctx.gpu ? 1.0 : 0.0, ctx.gpu ? -1.0 : 0.0}, mn[2];
    comm_allreduce_min(v, mn, 2);
    const bool all_gpu = mn[0] > 0, any_gpu = mn[1] < 0;
    if (any_gpu && !all_gpu) fatal_all("some ranks found no GPU: run every rank on a GPU, or all with --device cpu");
    if (!all_gpu) return false;
#ifdef __CUDACC__
    const std::vector<std::string> ids = comm_allgather_str(gpu_identity(ctx.g->device));
    const GpuSharing share = gpu_sharing(ids);
    ctx.g->sharers = share.count[cm.rank];  // the free-memory check divides the GPU among them (model_create)
    const bool own_gpu = share.first < 0;
    if (c == "mpi" || (c == "auto" && !own_gpu)) return false;
    if (!own_gpu)
        fatal_all("--comm nccl: ranks %d and %d share GPU %s (NCCL needs a GPU per rank); use --comm mpi", share.first,
                  share.second, ids[share.first].c_str());
    comm_nccl_init();
    return true;
#else
    return false;  // not reached: the CPU-only build never chooses a GPU
#endif
}

static std::string device_name(const Ctx& ctx) {
    if (!ctx.gpu) {
        const char* why = getenv("FPDT_THREADS_CHOSEN");
        return "cpu (" + std::to_string(omp_get_max_threads()) + " threads per rank" + (why ? std::string(": ") + why : "") + ")";
    }
#ifndef __CUDACC__
    return "gpu";  // not reached: the CPU-only build never chooses a GPU
#else
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, ctx.g->device));
    return std::string("gpu ") + std::to_string(ctx.g->device) + " (" + p.name + ")";
#endif
}

// ----------------------------------------------------------------------------
// The run's shape and starting weights: the default chunk, --rope-theta/--rope-scale, --init

// The default chunk: the largest divisor of seq that is at most cap and a multiple of the P ranks
// (seq itself when seq <= cap, or when no divisor of at least 64 tokens is found).
static size_t default_chunk(size_t seq, int P, size_t cap) {
    if (seq <= cap) return seq;
    for (size_t c = cap; c >= 64; c--)
        if (seq % c == 0 && c % P == 0) return c;
    return seq;
}

// --rope-theta and --rope-scale change the model's RoPE (context extension); the checkpoint
// carries the result.
static void apply_rope_flags(const Args& a, Config* c) {
    if (a.has("rope-theta")) c->rope_theta = (float)a.real("rope-theta", c->rope_theta, 1.0, 1e12);
    if (!a.has("rope-scale")) return;
    const double f = a.real("rope-scale", 1.0, 1.0, 1e6);
    if (c->rope_scaling == ROPE_LLAMA3)
        fatal_all("--rope-scale: model %s already uses llama3 RoPE scaling (factor %g); linear interpolation "
                  "does not combine with it", c->name, c->rope_factor);
    if (c->rope_scaling == ROPE_LINEAR) c->rope_factor *= (float)f;  // interpolating an interpolated model
    else if (f != 1.0) c->rope_scaling = ROPE_LINEAR, c->rope_factor = (float)f;
}

// --doc-mask 0|1 and --doc-bos ID (train and eval): the token that starts a document, or -1 for
// one document (the mask off). On by default for files and passkey:docs, off for the passkey
// task (one document a sequence).
static int32_t doc_bos_flags(const Args& a, int vocab) {
    const int32_t bos = (int32_t)a.integer("doc-bos", TOK_BOS, 0, vocab - 1);
    const int32_t doc_bos = a.flag01("doc-mask", a.str("data", "passkey") != "passkey") ? bos : -1;
    if (a.has("doc-bos") && doc_bos < 0) fatal_all("--doc-bos names the token that starts a document: it needs --doc-mask 1");
    return doc_bos;
}

// --init DIR: a ckpt_<step>/ directory, or the newest valid one in DIR (a damaged newer one is
// reported and skipped): its manifest (the model it describes) and all its parameters. Returns
// its path, or "" with *err set.
static std::string init_checkpoint(const std::string& dir, Manifest* man, std::vector<float>* params, std::string* err) {
    struct stat st;
    if (stat((dir + "/manifest.txt").c_str(), &st) == 0) {  // a checkpoint itself
        std::vector<float> m, v;
        *err = read_manifest(dir, man);
        if (err->empty()) *err = read_checkpoint_state(dir, *man, 0, man->n_params, 0, 0, params, &m, &v);
        if (!err->empty()) *err = "--init: " + *err;
        return err->empty() ? dir : "";
    }
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
        *err = "--init " + dir + (stat(dir.c_str(), &st) == 0 ? ": a file, not a directory" : ": no such directory") +
               " (expected a ckpt_<step>/ directory or one holding them)";
        return "";
    }
    const std::string path = find_checkpoint(dir, man, params);
    if (path.empty()) *err = "--init " + dir + ": no valid checkpoint (a ckpt_<step>/ directory with its manifest.txt) there";
    return path;
}

// --init with --model: the preset must describe the checkpoint's model; the first field that
// differs is named (the name itself may differ).
static void check_init_model(const Config& preset, const Config& init, const std::string& path) {
    Manifest a, b;
    a.cfg = preset, b.cfg = init;
    auto fa = manifest_fields(a), fb = manifest_fields(b);
    for (size_t i = 0; i < fa.size(); i++)
        if (fa[i].first.rfind("model.", 0) == 0 && fa[i].first != "model.name" && fa[i].second != fb[i].second)
            fatal_all("--model %s disagrees with --init %s: %s is %s there, %s in the preset (leave out --model: the "
                      "checkpoint carries its model)", preset.name, path.c_str(), fa[i].first.c_str(), fb[i].second.c_str(),
                      fa[i].second.c_str());
}

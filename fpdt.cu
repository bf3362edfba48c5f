// fpdt.cu: the program. Command line, training loop, evaluation, checkpoints, sampling, planning.
//
//   ./fpdt train [flags]     train (see --help); mpirun -np P ./fpdt train ... for P ranks
//   ./fpdt sample --out DIR  generate from a saved checkpoint
//   ./fpdt plan --model M --seq S   predicted memory and the break-even chunk size
//
// Sections: command line; evaluation; train; sample; plan; main. Checkpoints are in checkpoint.h.
#include <omp.h>
#include <sched.h>
#include <csignal>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>
#include "checkpoint.h"
#include "data/data.h"
#include "model.h"

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
};

// Flags that take no value.
static bool is_switch(const std::string& k) { return k == "resume" || k == "overwrite" || k == "help"; }

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
// Evaluation: mean loss over held-out sequences, and for the passkey task the retrieval accuracy
// of the answer symbols, by the distance between each key and its question (buckets 4x apart).

static void read_into(Model* M, DataSource* data, uint64_t step) {
    model_set_tokens(M, [&](size_t start, size_t n, int32_t* out) { data->read(step, start, n, out); });
}

static const uint64_t EVAL_STEP0 = PASSKEY_EVAL_STEP0;  // held-out sequences, far from the training steps
static const int NBUCKET = 11;                  // distance < 16, < 64, ... , < 4M, more
static int distance_bucket(size_t dist) {
    int b = 0;
    for (size_t edge = 16; dist >= edge && b < NBUCKET - 1; edge *= 4) b++;
    return b;
}

static void evaluate(Model* M, DataSource* data, int nseq, int step) {
    std::vector<double> acc(4 + 2 * NBUCKET, 0.0);  // loss sum, answers, right and total beyond a chunk; per bucket: right, total
    bool task = false;
    for (int k = 0; k < nseq; k++) {
        read_into(M, data, EVAL_STEP0 + k);
        acc[0] += model_forward_backward(M, false);
        std::vector<size_t> ans, dist;
        if (!data->answer(EVAL_STEP0 + k, &ans, &dist)) continue;
        task = true;
        for (size_t a = 0; a < ans.size(); a++) {  // token p is predicted at input p - 1; who holds it?
            const size_t t = ans[a] - 1, c = t / M->C, o = t % M->C;
            const int b = distance_bucket(dist[a]);
            if ((int)(o / M->cl) != M->run.rank) continue;
            int32_t truth;
            data->read(EVAL_STEP0 + k, ans[a], 1, &truth);
            const bool right = M->preds[c * M->cl + o % M->cl] == truth;
            acc[4 + 2 * b] += right;
            acc[5 + 2 * b] += 1;
            if (dist[a] >= M->C && M->u > 1) acc[2] += right, acc[3] += 1;  // the key sat in an earlier chunk
        }
    }
    comm_allreduce(acc.data() + 2, 2 + 2 * NBUCKET);  // each rank counted the answers it holds
    if (comm_world().rank != 0) return;
    for (int b = 0; b < NBUCKET; b++) acc[1] += acc[5 + 2 * b];
    std::string line = "eval step " + std::to_string(step) + " | seq " + std::to_string(M->run.seq);
    char b[128];
    snprintf(b, sizeof b, " | loss %.6f", acc[0] / nseq);
    line += b;
    if (task) {
        double right = 0;
        for (int k = 0; k < NBUCKET; k++) right += acc[4 + 2 * k];
        snprintf(b, sizeof b, " | passkey %.1f%% of %.0f", 100 * right / acc[1], acc[1]), line += b;
        if (acc[3] > 0) snprintf(b, sizeof b, " | key in an earlier chunk: %.1f%% of %.0f", 100 * acc[2] / acc[3], acc[3]), line += b;
        line += " | by distance:";
        const char* names[NBUCKET] = {"<16", "<64", "<256", "<1K", "<4K", "<16K", "<64K", "<256K", "<1M", "<4M", ">=4M"};
        for (int k = 0; k < NBUCKET; k++)
            if (acc[5 + 2 * k] > 0) snprintf(b, sizeof b, " %s %.0f%%", names[k], 100 * acc[4 + 2 * k] / acc[5 + 2 * k]), line += b;
    }
    log_line(true, "%s", line.c_str());
}

// ----------------------------------------------------------------------------
// train

static const std::vector<std::string> train_flags = {
    "model", "seq", "chunk-size", "offload", "steps", "lr", "warmup", "min-lr-frac", "weight-decay", "clip", "seed",
    "beta1", "beta2", "adam-eps",
    "data", "device", "out", "save-every", "resume", "exit-after", "eval-every", "eval-seqs", "trace", "zero",
    "device-mem", "host-mem", "on-nonfinite", "max-bad-steps", "comm", "precision", "start-seq", "start-steps",
    "log-every", "overwrite", "watchdog", "rope-theta", "rope-scale", "init", "help"};

static void train_help() {
    printf(
        "usage: ./fpdt train [flags]        (P ranks: mpirun -np P ./fpdt train [flags])\n"
        "  --model NAME        model preset (default small; list below)\n"
        "  --seq N             sequence length in tokens, global (default 4096; on a GPU 65536)\n"
        "  --chunk-size C      FPDT chunk length, global; must divide --seq (default: the largest divisor\n"
        "                      of --seq up to 1024, on a GPU 16384; --seq itself when that is shorter)\n"
        "  --offload 0|1       keep sequence-sized tensors in host memory (default 1 when chunked)\n"
        "  --start-seq N       train the first --start-steps steps at this shorter sequence (in as many\n"
        "                      chunks as --seq has), then at --seq (context extension); 0 = off\n"
        "                      (default 256 when --seq is left at its default)\n"
        "  --start-steps K     steps at --start-seq (default 95%% of --steps)\n"
        "  --zero 0|1|2|3      ZeRO stage: shard across ranks 1 the optimizer state, 2 and the gradients,\n"
        "                      3 and the weights (gathered layer by layer) (default 0)\n"
        "  --steps N           total steps; the learning-rate schedule depends on it alone (default 6000)\n"
        "  --lr X              peak learning rate (default 3e-3)\n"
        "  --warmup N          linear warmup steps (default: steps/20)\n"
        "  --min-lr-frac X     cosine decays to lr*X (default 0.1)\n"
        "  --weight-decay X    AdamW decoupled weight decay on matrices (default 0.1)\n"
        "  --clip X            clip the global gradient norm to X, 0 = off (default 1.0)\n"
        "  --beta1 X, --beta2 X, --adam-eps X   AdamW moments' decay rates and epsilon (default 0.9, 0.95, 1e-8)\n"
        "  --seed N            seed for the weights and the data (default 1337)\n"
        "  --data SPEC         'passkey' (built-in task), a text file, a glob, or llm.c .bin shards (default passkey)\n"
        "  --device auto|cpu|gpu   auto (default): the GPU when one is visible, else the CPU\n"
        "  --comm auto|nccl|mpi  GPU ranks: NCCL when each has its own GPU (auto), else MPI on host memory\n"
        "  --precision auto|fp32|bf16   bf16: bf16 matmul operands and stored activations, fp32 sums, fp32\n"
        "                      master weights and optimizer; auto (default): bf16 on the GPU, fp32 on the CPU\n"
        "  --out DIR           checkpoint directory (default: none, nothing is saved)\n"
        "  --save-every N      checkpoint every N steps and at the end (needs --out)\n"
        "  --exit-after N      stop after step N with a checkpoint (a time-boxed job); continue with --resume\n"
        "  --resume            continue from the newest valid checkpoint in --out\n"
        "  --overwrite         start afresh in an --out that holds checkpoints: they are deleted first\n"
        "                      (without it, a run that is not --resume refuses such an --out)\n"
        "  --eval-every N      evaluate every N steps, at the end of --start-steps and at the end, 0 = never\n"
        "                      (default 500)\n"
        "  --log-every N       print every Nth step line (the first 10 and the last always); 0 = about 50\n"
        "                      lines a run (default). With --out, OUT/main.log gets every line\n"
        "  --eval-seqs N       held-out sequences per evaluation (default 64)\n"
        "  --trace FILE        write one step's schedule (the second at --seq) as Chrome trace JSON (Perfetto)\n"
        "  --device-mem GiB    refuse to start if the device arena would exceed this\n"
        "  --host-mem GiB      refuse to start if the host arena would exceed this\n"
        "  --on-nonfinite skip|stop   a NaN/Inf loss or gradient: skip the step (default) or stop\n"
        "  --max-bad-steps N   stop after N non-finite steps in a row (default 5)\n"
        "  --watchdog S        several ranks: a rank waiting S seconds inside one MPI collective ends the job,\n"
        "                      naming the step and the collective; 0 = off (default 1800)\n"
        "  --init DIR          start from the weights of a checkpoint (an imported model: data/hf.py import), the\n"
        "                      newest valid one in DIR or DIR itself: its model, a fresh optimizer, step 1\n"
        "  --rope-theta X      RoPE base (default: the model's); stored in the checkpoints\n"
        "  --rope-scale F      linear RoPE position interpolation: positions / F, for context extension\n"
        "                      (default 1: off); stored in the checkpoints\n\n");
    print_models();
}

// --precision: true for bf16. auto is bf16 on the GPU (tensor cores, half the offload traffic) and
// fp32 on the CPU (the readable reference; bf16 there is an exact emulation, for tests).
static bool precision_bf16(const Args& a, bool gpu) {
    std::string p = a.str("precision", "auto");
    if (p != "auto" && p != "fp32" && p != "bf16") fatal_all("--precision: '%s' (expected auto, fp32 or bf16)", p.c_str());
    return p == "bf16" || (p == "auto" && gpu);
}

// --on-nonfinite: true for stop, false for skip
static bool stop_on_nonfinite(const Args& a) {
    std::string m = a.str("on-nonfinite", "skip");
    if (m != "skip" && m != "stop") fatal_all("--on-nonfinite: '%s' (expected skip or stop)", m.c_str());
    return m == "stop";
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
        fatal("--device gpu: no CUDA device is visible (driver and GPU needed); use --device cpu");
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

// --comm: how GPU buffers move between ranks. NCCL needs a GPU per rank on each machine; ranks
// sharing a GPU (more ranks than GPUs here) go through host memory and MPI.
static bool choose_comm(const Args& a, const Ctx& ctx) {
    std::string c = a.str("comm", "auto");
    if (c != "auto" && c != "nccl" && c != "mpi") fatal_all("--comm: '%s' (expected auto, nccl or mpi)", c.c_str());
    const Comm& cm = comm_world();
    if (cm.size == 1) return false;
    // Every rank must take the same road (NCCL's set-up is collective): agree on it first.
    double v[3] = {ctx.gpu ? 1.0 : 0.0, cm.local_size <= gpu_count() ? 1.0 : 0.0, ctx.gpu ? -1.0 : 0.0}, mn[3];
    MPI_CHECK(MPI_Allreduce(v, mn, 3, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD));
    const bool all_gpu = mn[0] > 0, own_gpu = mn[1] > 0, any_gpu = mn[2] < 0;
    if (any_gpu && !all_gpu) fatal_all("some ranks found no GPU: run every rank on a GPU, or all with --device cpu");
    if (!all_gpu || c == "mpi") return false;
    if (c == "nccl" && !own_gpu)
        fatal_all("--comm nccl: more ranks on a machine than it has GPUs (NCCL needs a GPU per rank); use --comm mpi");
    if (!own_gpu) return false;
#ifdef __CUDACC__
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

// The default chunk: the largest divisor of seq that is at most cap and a multiple of the P ranks
// (seq itself when seq <= cap, or when no divisor of at least 64 tokens is found).
static size_t default_chunk(size_t seq, int P, size_t cap) {
    if (seq <= cap) return seq;
    for (size_t c = cap; c >= 64; c--)
        if (seq % c == 0 && c % P == 0) return c;
    return seq;
}

// Rebuilds M for another run shape (the sequence length of a curriculum phase) and carries its
// weights and AdamW state over; the parameter layout does not depend on the sequence.
static void model_reshape(Model* M, const Config& cfg, const RunCfg& r) {
    std::vector<float> w, m, v;  // what this rank holds (checkpoint.h)
    ckpt_model_to_host(M, &w, &m, &v);
    Model N;
    N.ctx = M->ctx, N.nccl = M->nccl;
    model_free(M);  // first, so the two never hold memory at once
    model_create(&N, cfg, r, false);
    ckpt_state_to_model(&N, w, m, v);
    *M = N;
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

// --out, before anything is computed: rank 0 creates it (parents too, no shell), locks it for this
// run, clears what a killed save left, and refuses a fresh run into a directory with checkpoints
// unless --overwrite; then every rank checks that it sees rank 0's files there and can write its
// own (each rank writes its own checkpoint shard, so --out must be shared). Any rank's problem
// ends every rank.
static void prepare_out(const std::string& out, bool resume, bool overwrite) {
    const Comm& cm = comm_world();
    char token[64] = {0};  // rank 0's probe file holds it; the others must read it back
    snprintf(token, sizeof token, "%d %.6f", (int)getpid(), now_s());
    comm_broadcast(token, sizeof token);
    const std::string probe0 = out + "/.fpdt_probe_0.tmp";
    std::string err;
    if (cm.rank == 0) {
        err = make_dirs(out);
        if (!err.empty()) err = "--out " + out + ": cannot write there (" + err + ")";
        if (err.empty()) err = lock_out_dir(out);
        if (err.empty()) remove_stale_tmp(out);
        std::vector<std::string> old = err.empty() ? checkpoint_like_names(out) : std::vector<std::string>();
        if (!old.empty() && !resume && !overwrite)
            err = "--out " + out + " holds checkpoints of an earlier run (" + old.back() +
                  (old.size() > 1 ? " and " + std::to_string(old.size() - 1) + " more" : std::string()) +
                  "): continue it with --resume, or pass --overwrite to delete them and start afresh";
        if (err.empty() && overwrite) err = remove_checkpoints(out);
        if (err.empty()) {
            FILE* f = fopen(probe0.c_str(), "wb");
            if (!f || fputs(token, f) < 0) err = "--out " + out + ": cannot write there: " + strerror(errno);
            if (f && fclose(f) != 0 && err.empty()) err = "--out " + out + ": cannot write there: " + strerror(errno);
        }
    }
    fatal_any(err);
    comm_barrier();
    if (cm.rank != 0) {
        char seen[64] = {0};
        FILE* f = fopen(probe0.c_str(), "rb");
        const bool same = f && fread(seen, 1, sizeof seen - 1, f) > 0 && strcmp(seen, token) == 0;
        if (f) fclose(f);
        const std::string mine = out + "/.fpdt_probe_" + std::to_string(cm.rank) + ".tmp";
        FILE* g = same ? fopen(mine.c_str(), "wb") : nullptr;
        if (!same)
            err = "--out " + out + ": this rank does not see rank 0's files there (every rank writes its own "
                  "checkpoint shard: --out must be a directory all ranks share)";
        else if (!g || fclose(g) != 0) err = "--out " + out + ": cannot write there: " + strerror(errno);
        remove(mine.c_str());
    }
    fatal_any(err);
    if (cm.rank == 0) remove(probe0.c_str());
}

// The settings that may change across a --resume (what the losses do not depend on), one line.
static std::string run_settings(const RunCfg& r, size_t chunk) {
    return "ranks " + std::to_string(r.P) + " | chunk " + std::to_string(chunk) + " | offload " + (r.offload ? "on" : "off") +
           " | ZeRO stage " + std::to_string(r.zero) + " | precision " + (r.bf16 ? "bf16" : "fp32");
}

// " (since the checkpoint: ranks 1 -> 2, ...)" for the settings that differ; "" when none do.
static std::string settings_changes(const std::string& was, const std::string& now) {
    auto split = [](const std::string& s) {
        std::vector<std::string> v;
        for (size_t a = 0; a < s.size();) {
            size_t b = s.find(" | ", a);
            if (b == std::string::npos) b = s.size();
            v.push_back(s.substr(a, b - a));
            a = b + 3;
        }
        return v;
    };
    std::vector<std::string> a = split(was), b = split(now);
    std::string out;
    for (size_t i = 0; i < a.size() && a.size() == b.size(); i++) {
        const size_t sp = b[i].rfind(' ');
        if (a[i] != b[i] && sp != std::string::npos && a[i].compare(0, sp + 1, b[i], 0, sp + 1) == 0)
            out += (out.empty() ? "" : ", ") + b[i].substr(0, sp) + " " + a[i].substr(sp + 1) + " -> " + b[i].substr(sp + 1);
    }
    return out.empty() ? "" : " (changed since it was saved: " + out + ")";
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
        *err = "--init " + dir + ": no such directory (expected a ckpt_<step>/ directory or one holding them)";
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

static int cmd_train(int argc, char** argv) {
    Args a = parse_args(argc, argv, train_flags);
    if (a.help) {
        train_help();
        return 0;
    }
    const Comm& cm = comm_world();
    Config cfg = model_arg(a, "small");
    // --init: the weights and the model of an imported or earlier checkpoint (fresh optimizer, step 1)
    std::string init_path;
    std::vector<float> init_params;
    if (a.has("init")) {
        Manifest im;
        std::string ierr;
        init_path = init_checkpoint(a.str("init", ""), &im, &init_params, &ierr);
        fatal_any(ierr);
        if (a.has("model")) check_init_model(cfg, im.cfg, init_path);
        cfg = im.cfg;
    }
    apply_rope_flags(a, &cfg);
    Model M;
    choose_device(a, &M.ctx);
    M.nccl = choose_comm(a, M.ctx);
    // The defaults are the default run: FPDT itself (several chunks, offloaded) on a sequence long
    // enough to need it, reached from a short start as context extension does.
    RunCfg r;
    const bool gpu = M.ctx.gpu;
    r.P = cm.size, r.rank = cm.rank;
    r.seq = a.integer("seq", gpu ? 65536 : 4096, 1, 1ll << 40);
    r.chunk = a.integer("chunk-size", default_chunk(r.seq, r.P, gpu ? 16384 : 1024), 1, 1ll << 40);
    r.offload = a.flag01("offload", r.chunk < r.seq);
    r.zero = (int)a.integer("zero", 0, 0, 3);
    r.bf16 = precision_bf16(a, M.ctx.gpu);
    r.device_cap = (size_t)(a.real("device-mem", 0, 0, 1e6) * 1073741824.0);
    r.host_cap = (size_t)(a.real("host-mem", 0, 0, 1e6) * 1073741824.0);
    const int steps = (int)a.integer("steps", 6000, 1, 1 << 30);
    // The short start: its own RunCfg, in as many chunks as the main phase where they divide it
    // (so the start runs FPDT too, and a key in an earlier chunk is within its reach).
    const size_t start_seq = a.integer("start-seq", a.has("seq") ? 0 : (gpu ? 4096 : 256), 0, r.seq);
    const int start_steps = start_seq ? (int)a.integer("start-steps", (int)(steps * 95ll / 100), 0, steps) : 0;
    if (a.has("start-steps") && !start_seq) fatal_all("--start-steps needs --start-seq N (the shorter sequence to start at)");
    RunCfg r0 = r;
    r0.seq = start_seq;
    const size_t u = r.seq / std::max<size_t>(r.chunk, 1);
    r0.chunk = start_seq && start_seq % u == 0 && (start_seq / u) % r.P == 0 ? start_seq / u : start_seq;
    r0.offload = r.offload && r0.chunk < start_seq;
    AdamW opt;
    const float lr = (float)a.real("lr", 3e-3, 0, 10);
    opt.wd = (float)a.real("weight-decay", 0.1, 0, 10);
    opt.clip = (float)a.real("clip", 1.0, 0, 1e9);
    opt.beta1 = (float)a.real("beta1", 0.9, 0, 0.999999);
    opt.beta2 = (float)a.real("beta2", 0.95, 0, 0.999999);
    opt.eps = (float)a.real("adam-eps", 1e-8, 1e-30, 1);
    const int warmup = (int)a.integer("warmup", std::max(1, steps / 20), 0, steps);
    const float min_frac = (float)a.real("min-lr-frac", 0.1, 0, 1);
    const uint64_t seed = a.integer("seed", 1337, 0, LLONG_MAX);
    const std::string out = a.str("out", "");
    const int save_every = (int)a.integer("save-every", 0, 0, 1 << 30);
    const int exit_after = (int)a.integer("exit-after", 0, 0, 1 << 30);
    const int eval_every = (int)a.integer("eval-every", 500, 0, 1 << 30);
    const int eval_seqs = (int)a.integer("eval-seqs", 64, 1, 1 << 20);
    const std::string trace_path = a.str("trace", "");
    const bool stop_on_bad = stop_on_nonfinite(a);
    const int max_bad = (int)a.integer("max-bad-steps", 5, 1, 1 << 30);
    if (cm.size > 1) comm_watchdog_start((double)a.integer("watchdog", 1800, 0, 1 << 30));
    // Fault injection for tests: FPDT_FAULT_NAN_STEPS="3,4" poisons a gradient at those steps.
    std::set<int> fault_steps;
    for (const char* p = getenv("FPDT_FAULT_NAN_STEPS"); p && *p; p += strcspn(p, ","), p += (*p == ',')) fault_steps.insert(atoi(p));
    const bool resume = a.has("resume");
    if ((save_every || exit_after || resume || a.has("overwrite")) && out.empty())
        fatal_all("--save-every, --exit-after, --resume and --overwrite need --out DIR");
    if (resume && a.has("overwrite")) fatal_all("--resume continues the checkpoints in --out, --overwrite deletes them: choose one");
    const int log_every = (int)a.integer("log-every", 0, 0, 1 << 30);
    std::string err = check_shape(cfg, r);
    if (!err.empty()) fatal_all("%s", err.c_str());
    if (start_steps && !(err = check_shape(cfg, r0)).empty()) fatal_all("--start-seq %zu: %s", start_seq, err.c_str());
    if (!out.empty()) prepare_out(out, resume, a.has("overwrite"));  // now, not at the first save hours later
    if (!trace_path.empty()) {  // rank 0 writes it, after step 2: find out now whether it can
        std::string terr;
        if (cm.rank == 0) {
            FILE* f = fopen((trace_path + ".tmp").c_str(), "w");
            if (!f) terr = "--trace " + trace_path + ": cannot open for writing: " + strerror(errno);
            else fclose(f), remove((trace_path + ".tmp").c_str());
        }
        fatal_any(terr);
    }
    DataSource* data = data_open(a.str("data", "passkey"), cfg.vocab, r.seq, seed, &err);
    fatal_any(data ? "" : err);  // a file missing on one machine is an error on one rank only
    DataSource* data0 = start_steps ? data_open(a.str("data", "passkey"), cfg.vocab, start_seq, seed, &err) : nullptr;
    fatal_any(!start_steps || data0 ? "" : "--start-seq " + std::to_string(start_seq) + ": " + err);
    if (!out.empty() && cm.rank == 0) {
        const std::string path = out + "/main.log";
        run_log().file = fopen(path.c_str(), "a");
        if (!run_log().file) fatal("--out %s: cannot write %s: %s", out.c_str(), path.c_str(), strerror(errno));
        std::string cmd = "command:";
        for (int i = 0; i < argc; i++) cmd += std::string(" ") + argv[i];
        log_line(false, "%s", cmd.c_str());
    }

    Trace trace;
    M.ctx.trace = &trace;
    model_create(&M, cfg, r, false);  // the main phase's model first: a run that cannot fit fails now
    model_init_params(&M, seed);
    if (!init_path.empty()) {  // the imported weights (this rank's slice under ZeRO-3), fresh AdamW moments
        uint64_t p_lo, p_hi, m_lo, m_hi;
        ckpt_load_ranges(&M, &p_lo, &p_hi, &m_lo, &m_hi);
        const std::vector<float> mine(init_params.begin() + p_lo, init_params.begin() + p_hi), zeros(m_hi - m_lo, 0.0f);
        ckpt_state_to_model(&M, mine, zeros, zeros);
    }
    int start = 0;
    Manifest id;  // this run's identity, stored in its checkpoints and checked on --resume
    id.cfg = cfg, id.seq = r.seq, id.seed = seed, id.total_steps = steps, id.source = data->identity();
    if (start_steps) id.source += " | start-seq " + std::to_string(start_seq) + " for " + std::to_string(start_steps) + " steps";
    const std::string settings = run_settings(r, M.C);
    std::string changed;  // what differs from the settings the checkpoint was saved with
    if (resume) {
        Manifest man;
        const std::string path = load_checkpoint(&M, out, id, &man);
        start = (int)man.step;
        changed = settings_changes(read_run_settings(path), settings);
        if (start == steps && cm.rank == 0) printf("resume: the checkpoint is at step %d: nothing left to do\n", start);
    }
    const bool in_start = start < start_steps;
    const size_t main_dev = M.dev.cap, main_host = M.host.cap;
    if (in_start) model_reshape(&M, cfg, r0);
    if (cm.rank == 0) {
        log_line(true, "fpdt train | model %s (%s, %d layers, d %d, %d/%d heads, %.2fM params) | data %s", cfg.name,
                 cfg.family == GPT ? "gpt" : "llama", cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head,
                 M.n_params / 1e6, data->describe().c_str());
        const size_t C = r.chunk;
        log_line(true, "seq %zu | chunk %zu (%zu chunks) | offload %s | ranks %d%s | device %s, %s | steps %d%s", r.seq, C,
                 r.seq / C, r.offload ? "on" : "off", r.P, (std::string(r.zero ? " ZeRO-" + std::to_string(r.zero) : "") + (M.nccl ? " NCCL" : "")).c_str(),
                 device_name(M.ctx).c_str(), r.bf16 ? "bf16" : "fp32", steps,
                 resume ? (" | resumed at step " + std::to_string(start) + changed).c_str()
                 : !init_path.empty() ? (" | weights from " + init_path).c_str() : "");
        if (start_steps)
            log_line(true, "start: steps 1-%d at seq %zu (chunk %zu: %zu chunk%s, offload %s), then seq %zu from step %d",
                     start_steps, start_seq, r0.chunk, start_seq / r0.chunk, start_seq / r0.chunk == 1 ? "" : "s",
                     r0.offload ? "on" : "off", r.seq, start_steps + 1);
        log_line(true, "memory (arenas, this rank): device %.1f MiB, host %.1f MiB at seq %zu, taken once at start%s",
                 main_dev / 1048576.0, main_host / 1048576.0, r.seq, start_steps ? " (and again after the start)" : "");
    }
    const int end = exit_after ? std::min(exit_after, steps) : steps;
    // the step traced: this run's second step at --seq (past the warm-up and any short start)
    const int trace_step = std::max(0, std::min(std::max(start, start_steps) + 1, end - 1));
    const int every = log_every ? log_every : auto_log_every(steps);
    double t_total = now_s(), tokens_done = 0;
    double step_s[2] = {0, 0};  // each phase's recent time per step (start, main), for the estimate
    int bad_run = 0, step = start;
    for (step = start; step < steps; step++) {
        if (exit_after && step >= exit_after) break;
        if (step == start_steps && step > 0 && M.run.seq != r.seq) {  // the start is over: on to --seq
            model_reshape(&M, cfg, r);
            log_line(true, "seq %zu -> %zu from step %d | chunk %zu (%d chunks) | offload %s", start_seq, r.seq, step + 1, M.C,
                     M.u, r.offload ? "on" : "off");
        }
        DataSource* src = step < start_steps ? data0 : data;
        const int phase = step < start_steps ? 0 : 1;
        // learning rate: linear warmup, then cosine down to lr * min_frac at the last step
        float lr_t = lr;
        if (step < warmup) lr_t = lr * (step + 1) / warmup;
        else if (steps > warmup) {
            const float p = (float)(step - warmup) / (float)std::max(1, steps - 1 - warmup);
            lr_t = lr * (min_frac + (1 - min_frac) * 0.5f * (1 + cosf(3.14159265f * std::min(1.0f, p))));
        }
        opt.lr = lr_t;
        watchdog().step = step + 1;
        trace.on = !trace_path.empty() && step == trace_step;
        trace.origin = now_s();
#ifdef __CUDACC__
        if (trace.on && M.ctx.gpu) trace_gpu_start(&M.ctx);
#endif
        const double t0 = now_s();
        read_into(&M, src, step);
        const float loss = model_forward_backward(&M, true);
        if (fault_steps.count(step + 1) && cm.rank == 0) dev_fill(&M.ctx, M.grads ? M.grads : M.grad_shard, NAN, 1);  // as a blow-up would
        bool finite = std::isfinite(loss);
        float norm = NAN;
        if (finite) norm = model_update(&M, opt, step + 1, &finite);
        if (const char* gpath = getenv("FPDT_TEST_GRADS_OUT"))  // test hook: the summed gradient of the first step
            if (step == start && cm.rank == 0) {  // (unclipped with --clip 0; whole with --zero 0)
                if (!M.grads) fatal("FPDT_TEST_GRADS_OUT needs --zero 0 or 1: under ZeRO-2 and 3 no rank holds the whole gradient");
                std::vector<float> gr(M.n_params);
                dev_download(&M.ctx, gr.data(), M.grads, M.n_params * sizeof(float));
                FILE* gf = fopen(gpath, "wb");
                if (!gf || fwrite(gr.data(), 4, gr.size(), gf) != gr.size() || fclose(gf) != 0)
                    fatal("FPDT_TEST_GRADS_OUT %s: cannot write", gpath);
            }
        dev_sync(&M.ctx);  // the update's kernels belong to this step's time
        const double dt = now_s() - t0;
        if (trace.on) {
#ifdef __CUDACC__
            if (M.ctx.gpu) trace_gpu_finish(&M.ctx);
#endif
            if (cm.rank == 0) trace_write(&trace, trace_path.c_str(), cm.rank);
            trace.on = false;
            trace.events.clear();
        }
        tokens_done += M.run.seq;
        // time left: this phase's steps at its recent pace; the main phase, before it has run, at
        // the start's pace scaled by the sequence (a guess the first main steps replace)
        step_s[phase] = step_s[phase] ? 0.9 * step_s[phase] + 0.1 * dt : dt;
        const int left0 = std::max(0, start_steps - step - 1), left1 = steps - std::max(step + 1, start_steps);
        const double main_s = step_s[1] ? step_s[1] : step_s[0] * r.seq / std::max<size_t>(start_seq, 1);
        const double left_s = left0 * step_s[0] + left1 * main_s;
        log_line(shown_step(step + 1, steps, every, !finite || step + 1 == start_steps || step + 1 == end),
                 "step %d/%d | loss %.6f | lr %.3e | norm %.6g | %.0f tok/s | %.1f ms/step | %s elapsed, %s left%s",
                 step + 1, steps, loss, lr_t, norm, M.run.seq / dt, dt * 1e3, clock_str(now_s() - t_total).c_str(),
                 clock_str(left_s).c_str(), finite ? "" : " | NON-FINITE: update skipped");
        if (!finite) {
            // the update was skipped: weights and optimizer state are those of the last good
            // step, so nothing non-finite can reach a checkpoint
            if (stop_on_bad) fatal_all("step %d: non-finite loss or gradient norm (--on-nonfinite stop)", step + 1);
            if (++bad_run >= max_bad)
                fatal_all("step %d: %d non-finite steps in a row; stopping (lower --lr, check the data)", step + 1, bad_run);
        } else {
            bad_run = 0;
        }
        const bool last = step + 1 == steps || step + 1 == exit_after;
        if (eval_every && ((step + 1) % eval_every == 0 || last || step + 1 == start_steps))
            evaluate(&M, src, eval_seqs, step + 1);
        if (!out.empty() && ((save_every && (step + 1) % save_every == 0) || last)) {
            const std::string saved = save_checkpoint(&M, out, step + 1, id, settings);
            log_line(true, "saved %s", saved.c_str());
        }
    }
    t_total = now_s() - t_total;
    double peaks[2] = {(double)M.dev.peak, (double)M.host.peak};
    comm_allreduce_max(peaks, 2);
    log_line(true, "done: %d steps in %.1f s, %.0f tok/s | peak device memory %.1f MiB | peak host memory %.1f MiB%s",
             step - start, t_total, tokens_done / std::max(t_total, 1e-9), peaks[0] / 1048576.0, peaks[1] / 1048576.0,
             r.P > 1 ? " (max over ranks)" : "");
    if (exit_after && step < steps) log_line(true, "exit-after %d: stopped; continue with --resume", exit_after);
    if (run_log().file) fclose(run_log().file), run_log().file = nullptr;
    delete data;
    delete data0;
    model_free(&M);
    return 0;
}

// ----------------------------------------------------------------------------
// sample: greedy (or temperature) generation from the newest checkpoint in --out. Simple on
// purpose: the whole window is recomputed for every new token.

// The prompt: --prompt-ids (a real tokenizer's ids, BOS included: data/tokenize.py --encode), or
// for a byte-level model TOK_BOS and the bytes of --prompt.
static std::vector<int32_t> sample_prompt(const Args& a, const char* model, int vocab) {
    std::vector<int32_t> seq;
    if (a.has("prompt") && a.has("prompt-ids")) fatal("--prompt and --prompt-ids: give one of them");
    if (a.has("prompt-ids")) {
        const std::string s = a.str("prompt-ids", "");
        for (size_t i = 0; i < s.size();) {
            if (s[i] == ',' || s[i] == ' ') {
                i++;
                continue;
            }
            char* end = nullptr;
            errno = 0;
            const long v = strtol(s.c_str() + i, &end, 10);
            if (end == s.c_str() + i || errno || (*end && *end != ',' && *end != ' ') || v < 0 || v >= vocab)
                fatal("--prompt-ids: '%s' is not a token id of model %s (vocab %d)", s.substr(i, s.find_first_of(", ", i) - i).c_str(), model, vocab);
            seq.push_back((int32_t)v);
            i = end - s.c_str();
        }
        if (seq.empty()) fatal("--prompt-ids: no ids in '%s'", s.c_str());
        return seq;
    }
    if (vocab != BYTE_VOCAB)
        fatal("model %s has a vocab of %d, not fpdt's byte vocab (%d): give the prompt as --prompt-ids (python3 "
              "data/tokenize.py --tokenizer TOK --encode TEXT prints them)", model, vocab, BYTE_VOCAB);
    seq = encode_bytes(a.str("prompt", ""));
    seq.insert(seq.begin(), TOK_BOS);
    return seq;
}

static int cmd_sample(int argc, char** argv) {
    Args a = parse_args(argc, argv, {"out", "prompt", "prompt-ids", "ids", "tokens", "temperature", "seed", "help"});
    if (a.help) {
        printf("usage: ./fpdt sample --out DIR [--prompt TEXT | --prompt-ids I,J,...] [--ids 0|1] [--tokens N]\n"
               "                    [--temperature T] [--seed N]\n"
               "  generates from the newest checkpoint in DIR; temperature 0 (default) is greedy.\n"
               "  A byte-level model (vocab 260) reads --prompt and prints text; any other model (a real\n"
               "  tokenizer's) reads --prompt-ids and prints token ids (--ids 1 forces ids). Between ids\n"
               "  and text: python3 data/tokenize.py --tokenizer TOK --encode TEXT / --decode -\n");
        return 0;
    }
    if (comm_world().size > 1) fatal_all("sample runs as one process (no mpirun)");
    if (!a.has("out")) fatal_all("sample needs --out DIR (the directory a training run saved to)");
    std::string dir = a.str("out", "");
    Manifest man;
    std::vector<float> blob;
    const std::string path = find_checkpoint(dir, &man, &blob);
    if (path.empty()) fatal("--out %s: no valid checkpoint (a ckpt_<step>/ directory with its manifest.txt) there", dir.c_str());
    const Config* cfg = &man.cfg;  // the checkpoint describes its own model
    const int ntok = (int)a.integer("tokens", 64, 1, 1 << 20);
    const float temp = (float)a.real("temperature", 0.0, 0.0, 100.0);
    const bool ids = a.flag01("ids", cfg->vocab != BYTE_VOCAB);
    std::vector<int32_t> seq = sample_prompt(a, cfg->name, cfg->vocab);
    const int32_t pad = cfg->vocab > TOK_PAD ? TOK_PAD : 0;  // unseen (causal): any valid id will do
    RunCfg r;
    r.seq = align_up(seq.size() + ntok, 16);
    Model M;
    std::string err = check_shape(*cfg, r);
    if (!err.empty()) fatal("%s: %s", path.c_str(), err.c_str());
    model_create(&M, *cfg, r, false);
    if (M.n_params != man.n_params)  // parse_manifest checked this against the same table
        fatal("%s: its %llu parameters do not fit its model", path.c_str(), (unsigned long long)man.n_params);
    dev_upload(&M.ctx, M.params, blob.data(), man.n_params * sizeof(float));
    std::vector<float> logits(temp > 0 ? r.seq * cfg->vocab : 0);  // greedy reads the predictions
    M.logits_out = temp > 0 ? logits.data() : nullptr;
    Rng rng{(uint64_t)a.integer("seed", 1, 0, LLONG_MAX)};
    for (size_t i = 0; i < seq.size(); i++)  // the prompt, as what follows it will print
        if (ids) printf("%s%d", i ? " " : "", seq[i]);
        else if (i > 0 || seq[i] != TOK_BOS) printf("%s", decode_token(seq[i]).c_str());
    for (int k = 0; k < ntok; k++) {
        std::vector<int32_t> window(r.seq + 1, pad);  // the padding after the end cannot be seen (causal)
        std::copy(seq.begin(), seq.end(), window.begin());
        model_set_tokens(&M, [&](size_t s, size_t n, int32_t* o) { memcpy(o, window.data() + s, n * 4); });
        model_forward_backward(&M, false);
        const size_t t = seq.size() - 1;
        int32_t next = M.preds[t];
        if (temp > 0) {
            const float* z = logits.data() + t * cfg->vocab;
            std::vector<double> p(cfg->vocab);
            double sum = 0, mx = *std::max_element(z, z + cfg->vocab);
            for (int i = 0; i < cfg->vocab; i++) sum += (p[i] = exp((z[i] - mx) / temp));
            double x = rng_uniform(&rng) * sum;
            for (next = 0; next < cfg->vocab - 1 && (x -= p[next]) > 0; next++) {}
        }
        seq.push_back(next);
        if (ids) printf(" %d", next);
        else printf("%s", decode_token(next).c_str());
        fflush(stdout);
    }
    printf("\n");
    model_free(&M);
    return 0;
}

// ----------------------------------------------------------------------------
// plan: what a run will take, from the same allocation sequence a real run makes (count only).

static void plan_sizes(const Config& c, RunCfg r, size_t* dev, size_t* host, Model* keep = nullptr) {
    Model M;
    model_create(&M, c, r, true);
    *dev = M.dev.peak, *host = M.host.peak;
    if (keep) *keep = M;
}

static int cmd_plan(int argc, char** argv) {
    Args a = parse_args(argc, argv, {"model", "seq", "chunk-size", "gpus", "offload", "zero", "gpu-mem", "host-mem",
                                     "tflops", "link-gbps", "precision", "help"});
    if (a.help || !a.has("model") || !a.has("seq")) {
        printf("usage: ./fpdt plan --model NAME --seq N [--chunk-size C] [--gpus P] [--offload 0|1] [--zero 0-3]\n"
               "                   [--gpu-mem GiB] [--host-mem GiB] [--tflops X] [--link-gbps Y] [--precision fp32|bf16]\n"
               "  predicted peak device and host bytes per rank (the same allocation sequence as ./fpdt train),\n"
               "  the longest sequence that fits, and the smallest chunk at which copies hide behind attention.\n"
               "  Defaults: one GPU, offload 1 when chunked (train defaults to 0: pass --offload to match a run),\n"
               "  80 GiB GPU, 512 GiB host, 400 TFLOP/s, 50 GB/s, bf16 (a GPU run's default precision).\n\n");
        print_models();
        return a.help ? 0 : 1;
    }
    const Config& c = model_arg(a, "small");
    RunCfg r;
    r.seq = a.integer("seq", 0, 1, 1ll << 40);
    r.chunk = a.integer("chunk-size", r.seq, 1, 1ll << 40);
    r.P = (int)a.integer("gpus", 1, 1, 1 << 16);
    r.offload = a.flag01("offload", r.chunk < r.seq);
    r.zero = (int)a.integer("zero", 0, 0, 3);
    r.bf16 = precision_bf16(a, true);  // a plan is for a GPU run
    const double gpu_mem = a.real("gpu-mem", 80, 0, 1e6) * 1073741824.0, host_mem = a.real("host-mem", 512, 0, 1e9) * 1073741824.0;
    const double flops = a.real("tflops", 400, 1e-3, 1e6) * 1e12, bw = a.real("link-gbps", 50, 1e-3, 1e6) * 1e9;
    std::string err = check_shape(c, r);
    if (!err.empty()) fatal_all("%s", err.c_str());
    size_t dev, host;
    Model M;
    plan_sizes(c, r, &dev, &host, &M);
    std::map<std::string, size_t> parts[2];
    for (auto& it : M.dev.items) parts[0][it.first.rfind("store:", 0) == 0 ? "store chunks (device)" : it.first] += it.second;
    for (auto& it : M.host.items) parts[1][it.first.rfind("store:", 0) == 0 ? "store (sequence-sized)" : it.first] += it.second;
    printf("plan: model %s, seq %zu, chunk %zu (%d chunks), %d rank(s), offload %s, ZeRO stage %d, %s\n", c.name, r.seq,
           M.C, M.u, r.P, r.offload ? "on" : "off", r.zero, r.bf16 ? "bf16" : "fp32");
    printf("  bytes per rank:\n");
    const char* where[2] = {"device", "host"};
    for (int k = 0; k < 2; k++) {
        printf("  %-6s %10.1f MiB\n", where[k], (k ? host : dev) / 1048576.0);
        for (auto& it : parts[k]) printf("    %-42s %10.1f MiB\n", it.first.c_str(), it.second / 1048576.0);
    }
    printf("  fits: device %s (%.1f of %.1f GiB), host %s (%.1f of %.1f GiB)\n", dev <= gpu_mem ? "yes" : "NO",
           dev / 1073741824.0, gpu_mem / 1073741824.0, host <= host_mem ? "yes" : "NO", host / 1073741824.0,
           host_mem / 1073741824.0);
    // Longest sequence at this chunk size: device bytes do not grow with S once offloaded, host
    // bytes grow linearly; search over multiples of the chunk.
    size_t lo = 0, hi = 1;
    auto fits = [&](size_t units) {
        RunCfg t = r;
        t.seq = units * M.C;
        t.offload = r.offload && units > 1;
        size_t dv, hs;
        plan_sizes(c, t, &dv, &hs);
        return dv <= gpu_mem && hs <= host_mem;
    };
    const size_t max_units = (size_t)INT32_MAX / M.C;  // positions are int32 (RoPE)
    while (hi <= max_units && fits(hi)) lo = hi, hi *= 2;
    hi = std::min(hi, max_units + 1);
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        (fits(mid) ? lo : hi) = mid;
    }
    if (lo) printf("  longest sequence that fits at chunk %zu: %zu tokens (%zu chunks)%s\n", M.C, lo * M.C, lo,
                   lo == max_units ? ", the int32 position limit, not memory" : "");
    else printf("  no sequence fits at chunk %zu with these memory limits\n", M.C);
    // Break-even chunk: one attention block (C x C for Hl heads) must take at least as long as
    // the copies it waits on. Forward: fetch k_j, v_j (2 C Hkvl D values) vs 4 C^2 Hl D FLOPs.
    // Backward inner step: q_i, dO_i (C Hl D each), dQ_i in and out (fp32) and lse, delta (C Hl
    // each, fp32) vs 10 C^2 Hl D. b: bytes of a stored q, k, v or dO value.
    const double Hl = M.Hl, Hkvl = M.Hkvl, D = M.D, b = r.bf16 ? 2 : 4;
    const double cf = 2 * Hkvl * D * b * flops / (4 * Hl * D * bw);
    const double cb = (2 * Hl * D * b + 2 * Hl * D * 4 + 2 * Hl * 4) * flops / (10 * Hl * D * bw);
    printf("  copies hide behind attention from chunk %.0f tokens (forward %.0f, backward %.0f) at %.0f TFLOP/s, %.0f GB/s\n",
           std::max(cf, cb), cf, cb, flops / 1e12, bw / 1e9);
    return 0;
}

// ----------------------------------------------------------------------------
// bench: the building blocks of a step on this device, each timed as the median of --reps runs
// after one warm-up, in the PyTorch peer's FLOP conventions (bench/peer_compare.sh): a matmul is
// 2 M N K FLOPs, causal attention forward 2 S^2 H D, its backward 2.5 times that.

static std::string now_iso() {  // the date a benchmark ran, UTC
    char b[32];
    const time_t t = time(nullptr);
    strftime(b, sizeof b, "%Y-%m-%d %H:%M UTC", gmtime(&t));
    return b;
}

static double median_seconds(Ctx* ctx, int reps, const std::function<void()>& fn) {
    fn();
    dev_sync(ctx);
    std::vector<double> t;
    for (int r = 0; r < reps; r++) {
        const double t0 = now_s();
        fn();
        dev_sync(ctx);
        t.push_back(now_s() - t0);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static int cmd_bench(int argc, char** argv) {
    Args a = parse_args(argc, argv, {"device", "size", "seq", "heads", "kv-heads", "head-dim", "reps", "help"});
    if (a.help) {
        printf("usage: ./fpdt bench [--device auto|cpu|gpu] [--size N] [--seq S] [--heads H] [--kv-heads K]\n"
               "                    [--head-dim D] [--reps R]\n"
               "  times an N x N x N matmul (fp32 and bf16 operands), one causal attention block of S tokens\n"
               "  (forward; backward with delta) and, on a GPU, pinned copies of its q each way. On the CPU\n"
               "  it first measures the vector unit's peak fp32 rate and gives each kernel's share of it.\n"
               "  Defaults on a GPU: N 8192, S 8192, H 32, K = H, D 128 (the peer's attention case);\n"
               "  on the CPU: N 512, S 1024, H 4, D 64. R 5.\n");
        return 0;
    }
    Ctx ctx;
    const bool on_gpu = choose_device(a, &ctx);
    const size_t N = a.integer("size", on_gpu ? 8192 : 512, 1, 1 << 16);
    const size_t S = a.integer("seq", on_gpu ? 8192 : 1024, 1, 1 << 22);
    const int H = (int)a.integer("heads", on_gpu ? 32 : 4, 1, 1024);
    const int KV = (int)a.integer("kv-heads", H, 1, 1024);
    const int D = (int)a.integer("head-dim", on_gpu ? 128 : 64, 2, 512);
    const int reps = (int)a.integer("reps", 5, 1, 1000);
    if (H % KV) fatal_all("--kv-heads %d does not divide --heads %d", KV, H);
    if (D % 2) fatal_all("--head-dim %d must be even", D);
    const size_t qn = S * H * D, kn = S * KV * D;
    // device buffers (shapes in the comments), taken like the model's: a dry run, then one allocation
    Arena dev = arena_new("device", Mem::Device), host = arena_new("host", Mem::Pinned);
    float *A, *B, *Cm, *q, *k, *v, *o, *lse, *dout, *delta, *dq, *dk, *dv, *pinned;
    bf16 *Ab, *Bb;
    auto layout = [&]() {
        A = arena_alloc<float>(&dev, N * N, "bench"), B = arena_alloc<float>(&dev, N * N, "bench");  // (N, N) each
        Cm = arena_alloc<float>(&dev, N * N, "bench");                                                // (N, N)
        Ab = arena_alloc<bf16>(&dev, N * N, "bench"), Bb = arena_alloc<bf16>(&dev, N * N, "bench");   // (N, N) each
        q = arena_alloc<float>(&dev, qn, "bench"), o = arena_alloc<float>(&dev, qn, "bench");         // (S, H, D)
        dout = arena_alloc<float>(&dev, qn, "bench"), dq = arena_alloc<float>(&dev, qn, "bench");     // (S, H, D)
        k = arena_alloc<float>(&dev, kn, "bench"), v = arena_alloc<float>(&dev, kn, "bench");         // (S, K, D)
        dk = arena_alloc<float>(&dev, kn, "bench"), dv = arena_alloc<float>(&dev, kn, "bench");       // (S, K, D)
        lse = arena_alloc<float>(&dev, S * H, "bench"), delta = arena_alloc<float>(&dev, S * H, "bench");  // (S, H)
        pinned = arena_alloc<float>(&host, on_gpu ? qn : 1, "bench");                                 // (S, H, D)
    };
    dev.count_only = host.count_only = true;
    layout();  // dry run: how much of each
    const size_t need_dev = dev.peak, need_host = host.peak;
    dev = arena_new("device", Mem::Device), host = arena_new("host", Mem::Pinned);
    dev.cap = need_dev, host.cap = need_host;
    arena_back(&ctx, &dev);
    arena_back(&ctx, &host);
    layout();
    auto randn = [&](float* d, size_t n, uint64_t seed) {  // fresh N(0, 1) values, uploaded
        Rng r{seed};
        std::vector<float> h(n);
        for (float& x : h) x = rng_normal(&r);
        dev_upload(&ctx, d, h.data(), n * sizeof(float));
    };
    randn(A, N * N, 1), randn(B, N * N, 2), randn(q, qn, 3), randn(k, kn, 4), randn(v, kn, 5), randn(dout, qn, 6);
    OP(&ctx, to_bf16, Ab, A, N * N);
    OP(&ctx, to_bf16, Bb, B, N * N);
    printf("bench | %s | reps %d, median after one warm-up | %s\n", device_name(ctx).c_str(), reps, now_iso().c_str());
    // on the CPU: the vector unit's measured peak, and each kernel's share of it
    const double peak = on_gpu ? 0.0 : cpu_peak_flops(0.3);
    if (!on_gpu)
        printf("cpu peak fp32: %.3g TFLOP/s (%s, %d threads: an FMA loop on every thread)\n", peak / 1e12,
               cpu_simd_name(), omp_get_max_threads());
    auto share = [&](double flops_per_s) {
        char buf[32] = "";
        const double pct = 100 * flops_per_s / peak;
        if (peak > 0) snprintf(buf, sizeof buf, pct >= 10 ? " (%.0f%% of peak)" : " (%.2g%% of peak)", pct);
        return std::string(buf);
    };

    const double mm = 2.0 * N * N * N;
    const double t32 = median_seconds(&ctx, reps, [&] { MATMUL(&ctx, matmul_forward, Cm, A, B, nullptr, N, (int)N, (int)N); });
    const double t16 = median_seconds(&ctx, reps, [&] {
        MATMUL(&ctx, matmul_forward, Cm, (const bf16*)Ab, (const bf16*)Bb, nullptr, N, (int)N, (int)N);
    });
    printf("matmul fp32 N=%zu: %.3f ms, %.3g TFLOP/s%s\n", N, t32 * 1e3, mm / t32 / 1e12, share(mm / t32).c_str());
    printf("matmul bf16 N=%zu: %.3f ms, %.3g TFLOP/s%s (fp32 sums)\n", N, t16 * 1e3, mm / t16 / 1e12,
           share(mm / t16).c_str());

    const double af = 2.0 * S * S * H * D;
    const double tf = median_seconds(&ctx, reps, [&] {
        dev_zero(&ctx, o, qn * sizeof(float));
        dev_fill(&ctx, lse, -INFINITY, S * H);
        OP(&ctx, attention_forward, o, lse, q, k, v, S, S, H, KV, D, true);
    });
    const double tb = median_seconds(&ctx, reps, [&] {
        dev_zero(&ctx, dq, qn * sizeof(float));
        dev_zero(&ctx, dk, kn * sizeof(float));
        dev_zero(&ctx, dv, kn * sizeof(float));
        OP(&ctx, attention_delta, delta, dout, o, S, H, D);
        OP(&ctx, attention_backward, dq, dk, dv, dout, q, k, v, lse, delta, S, S, H, KV, D, true);
    });
    printf("attention causal S=%zu H=%d KV=%d D=%d fp32: fwd %.3f ms %.3g TFLOP/s%s, bwd %.3f ms %.3g TFLOP/s%s\n", S,
           H, KV, D, tf * 1e3, af / tf / 1e12, share(af / tf).c_str(), tb * 1e3, 2.5 * af / tb / 1e12,
           share(2.5 * af / tb).c_str());
#ifdef __CUDACC__
    if (on_gpu) {
        const size_t bytes = qn * sizeof(float);
        const double th = median_seconds(&ctx, reps, [&] {
            CUDA_CHECK(cudaMemcpyAsync(q, pinned, bytes, cudaMemcpyHostToDevice, ctx.g->h2d));
        });
        const double td = median_seconds(&ctx, reps, [&] {
            CUDA_CHECK(cudaMemcpyAsync(pinned, q, bytes, cudaMemcpyDeviceToHost, ctx.g->d2h));
        });
        printf("copy pinned %.1f MiB: host->device %.1f GB/s, device->host %.1f GB/s\n", bytes / 1048576.0,
               bytes / th / 1e9, bytes / td / 1e9);
    }
#endif
    arena_unback(&ctx, &dev);
    arena_unback(&ctx, &host);
    return 0;
}

// ----------------------------------------------------------------------------

static void usage() {
    printf("fpdt: train GPT- and Llama-style models on very long sequences with the Fully Pipelined\n"
           "Distributed Transformer (chunked attention, host offload, Ulysses sequence parallelism).\n\n"
           "usage: ./fpdt train  [flags]   train (./fpdt train --help); mpirun -np P ./fpdt train ... for P ranks\n"
           "       ./fpdt sample --out DIR  generate from a checkpoint\n"
           "       ./fpdt plan --model M --seq S [--chunk-size C] [--gpus P]   memory and chunk-size plan\n"
           "       ./fpdt bench [--device gpu]   time the building blocks (matmul, attention, copies)\n");
}

// Threads per rank, chosen before the OpenMP runtime starts: when OMP_NUM_THREADS is unset, the
// cores this process may use (its affinity) divided by the ranks on this machine (the launcher's
// count), at least 1; when the ranks' threads outnumber those cores and OMP_WAIT_POLICY is unset,
// a passive wait policy (spinning threads would take the cores from the ranks doing the work).
// libgomp reads its environment when it loads, before main: a changed wait policy needs the
// program to start again (exec, same pid, before MPI_Init). FPDT_THREADS_CHOSEN carries the
// reason to the run header.
static void choose_threads(char** argv) {
    if (getenv("FPDT_THREADS_CHOSEN")) return;  // chosen already: this is the re-started program
    cpu_set_t set;
    const int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    int local = 1;  // ranks on this machine, as the launcher says
    for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"})
        if (getenv(v) && atoi(getenv(v)) > 0) {
            local = atoi(getenv(v));
            break;
        }
    const char* user = getenv("OMP_NUM_THREADS");
    const int threads = user && atoi(user) > 0 ? atoi(user) : std::max(1, cores / local);
    std::string why = user ? "OMP_NUM_THREADS=" + std::string(user)
                           : std::to_string(cores) + " core" + (cores == 1 ? "" : "s") + " / " + std::to_string(local) + " rank" +
                                 (local == 1 ? "" : "s") + " on this machine";
    const bool passive = !getenv("OMP_WAIT_POLICY") && threads > 1 && (long)threads * local > cores;
    if (passive) why += "; passive wait: " + std::to_string((long)threads * local) + " threads share " + std::to_string(cores) + " cores";
    setenv("FPDT_THREADS_CHOSEN", why.c_str(), 1);
    if (!user) setenv("OMP_NUM_THREADS", std::to_string(threads).c_str(), 1);
    if (passive) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        execv("/proc/self/exe", argv);  // returns only on failure: then the count below still holds
    }
    omp_set_num_threads(threads);
}

int main(int argc, char** argv) {
    choose_threads(argv);
    signal(SIGXFSZ, SIG_IGN);  // a file-size limit makes a write fail (an error message), not kill the run
    comm_init(&argc, &argv);
    int rc = 1;
    std::string cmd = argc > 1 ? argv[1] : "train";
    if (argc < 2) {
        static char train[] = "train";
        static char* av[] = {argv[0], train, nullptr};
        argv = av, argc = 2;
    }
    if (cmd == "train") rc = cmd_train(argc, argv);
    else if (cmd == "sample") rc = cmd_sample(argc, argv);
    else if (cmd == "plan") rc = cmd_plan(argc, argv);
    else if (cmd == "bench") rc = cmd_bench(argc, argv);
    else if (cmd == "-h" || cmd == "--help" || cmd == "help") usage(), rc = 0;
    else fatal_all("unknown command '%s' (expected train, sample, plan or bench; see ./fpdt --help)", cmd.c_str());
    comm_finalize();
    return rc;
}

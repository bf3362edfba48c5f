// train.h: the train command. The flags and their help; --out's preparation and what a resume
// may change; then cmd_train as a short list of named steps over one struct Train (at the end).
// Evaluation during training is eval.h's evaluate(), the one the eval command runs.
#pragma once
#include <cmath>
#include <set>
#include <string>
#include <vector>
#include "checkpoint.h"
#include "cmdline.h"
#include "data/data.h"
#include "eval.h"
#include "schedule.h"

// ----------------------------------------------------------------------------
// train

static const std::vector<std::string> train_flags = {
    "model", "seq", "chunk-size", "offload", "steps", "lr", "start-lr", "warmup", "min-lr-frac", "weight-decay", "clip", "seed",
    "beta1", "beta2", "adam-eps",
    "data", "device", "out", "save-every", "resume", "exit-after", "eval-every", "eval-seqs", "trace", "zero",
    "device-mem", "host-mem", "on-nonfinite", "max-bad-steps", "comm", "precision", "start-seq", "start-steps",
    "log-every", "overwrite", "watchdog", "rope-theta", "rope-scale", "init", "sp", "batch", "doc-mask", "doc-bos",
    "keep-attention", "keep-mlp", "help"};

static void train_help() {
    printf(
        "usage: ./fpdt train [flags]        (W ranks: mpirun -np W ./fpdt train [flags])\n"
        "  --model NAME        model preset (default small; list below)\n"
        "  --seq N             sequence length in tokens, global (default 4096; on a GPU 65536)\n"
        "  --chunk-size C      FPDT chunk length, global; must divide --seq (default: the largest divisor\n"
        "                      of --seq up to 1024, on a GPU 16384; --seq itself when that is shorter)\n"
        "  --offload 0|1       keep sequence-sized tensors in host memory (default 1 when chunked)\n"
        "  --keep-attention 0|1  keep every layer's q, k, v, attention output and log-sum-exp from the forward\n"
        "                      pass (in the host store when offloaded), so that the backward runs neither the\n"
        "                      QKV projection nor attention's forward again: the same result to the bit, for\n"
        "                      S ((Hq + 2 Hkv) D b + (Hq D + Hq) 4) bytes more a layer, b = 2 when offloaded\n"
        "                      in bf16, else 4 (default 1 on the CPU; 0 on a GPU, where host memory bounds S)\n"
        "  --keep-mlp 0|1      likewise keep every layer's x_mid and MLP pre-activations, so that the backward\n"
        "                      runs neither the output projection nor the MLP's first matmul again: the same\n"
        "                      result to the bit, for S (d + 2 ffn) x 4 bytes more a layer (llama; gpt:\n"
        "                      d + ffn) (default 1 on the CPU, 0 on a GPU; the CPU's defaults are off where\n"
        "                      they would not fit this machine's memory or --host-mem, and the header says so)\n"
        "  --start-seq N[,N2..]  train first at these shorter sequences, one stage each, growing (each in as\n"
        "                      many chunks as --seq has), then at --seq (context extension); 0 = off\n"
        "                      (default 64,1024,2048 when --seq is left at its default; on a GPU 4096)\n"
        "  --start-steps K[,K2..]  the last step of each stage (default: 92%%,95%%,97%% of --steps; for one\n"
        "                      stage 95%%)\n"
        "  --start-lr X[,X2..]  each stage's peak learning rate, one per --start-seq length (default: --lr;\n"
        "                      the CPU default run's 64-token stage --lr / 3)\n"
        "  --sp N              ranks per sequence-parallel group (the all-to-alls stay inside it); the W\n"
        "                      ranks form W / N data-parallel replicas of it (default: every rank, N = W)\n"
        "  --batch B           sequences per optimizer step, all replicas together; each replica runs its\n"
        "                      B / (W / N) one after the other, accumulating gradients (default 1)\n"
        "  --zero 0|1|2|3      ZeRO stage: shard across all ranks 1 the optimizer state, 2 and the gradients,\n"
        "                      3 and the weights (gathered layer by layer) (default 0)\n"
        "  --steps N           total steps; the learning-rate schedule depends on it alone (default 6500)\n"
        "  --lr X              peak learning rate (default 3e-3)\n"
        "  --warmup N          linear warmup steps (default: steps/20)\n"
        "  --min-lr-frac X     cosine decays to lr*X (default 1: constant after warmup)\n"
        "  --weight-decay X    AdamW decoupled weight decay on matrices (default 0; 0.1 is usual on text)\n"
        "  --clip X            clip the global gradient norm to X, 0 = off (default 1.0)\n"
        "  --beta1 X, --beta2 X, --adam-eps X   AdamW moments' decay rates and epsilon (default 0.9, 0.95, 1e-8)\n"
        "  --seed N            seed for the weights and the data (default 1337)\n"
        "  --data SPEC         'passkey' (built-in task), 'passkey:docs[:N]' (packed passkey documents of mean\n"
        "                      length N, default 1024), a text file, a glob, or llm.c .bin shards (default passkey)\n"
        "  --doc-mask 0|1      packed documents: a document starts at every BOS token (and at the first token);\n"
        "                      attention stays inside a document, RoPE positions restart at 0 in each\n"
        "                      (default 1 for files and passkey:docs, 0 for passkey: one document)\n"
        "  --doc-bos ID        the token that starts a document (default 256, the byte-level BOS; a BPE\n"
        "                      shard's own BOS id, e.g. 128000 for Llama 3's tokenizer)\n"
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
        "  --eval-every N      evaluate every N steps, at the end of each start stage and at the end, 0 = never\n"
        "                      (default 500)\n"
        "  --log-every N       print every Nth step line (the first 10 and the last always); 0 = about 50\n"
        "                      lines a run (default). With --out, OUT/main.log gets every line\n"
        "  --eval-seqs N       held-out sequences per evaluation (default 64)\n"
        "  --trace FILE        write one step's schedule (the second at --seq) as Chrome trace JSON (Perfetto)\n"
        "  --device-mem GiB    refuse to start if the device arena would exceed this\n"
        "  --host-mem GiB      refuse to start if the host arena would exceed this\n"
        "  --on-nonfinite skip|stop   a NaN/Inf loss or gradient: skip the step (default) or stop\n"
        "  --max-bad-steps N   stop after N non-finite steps in a row (default 5)\n"
        "  --watchdog S        several ranks: a rank waiting S seconds inside one MPI collective, or whose\n"
        "                      oldest NCCL collective has not completed in S seconds, ends the job, naming the\n"
        "                      step and the collective; 0 = no limit (NCCL errors still end it) (default 1800)\n"
        "  --init DIR          start from the weights of a checkpoint (an imported model: data/hf.py import), the\n"
        "                      newest valid one in DIR or DIR itself: its model, a fresh optimizer, step 1\n"
        "  --rope-theta X      RoPE base (default: the model's); stored in the checkpoints\n"
        "  --rope-scale F      linear RoPE position interpolation: positions / F, for context extension\n"
        "                      (default 1: off); stored in the checkpoints\n\n");
    print_models();
}

// --on-nonfinite: true for stop, false for skip
static bool stop_on_nonfinite(const Args& a) {
    std::string m = a.str("on-nonfinite", "skip");
    if (m != "skip" && m != "stop") fatal_all("--on-nonfinite: '%s' (expected skip or stop)", m.c_str());
    return m == "stop";
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

// --out, before anything is computed: rank 0 creates it (parents too, no shell), locks it for this
// run, refuses names it would take for checkpoints that are not of the kind it makes (a link, a
// FIFO: it neither follows nor deletes them), clears what a killed save left, and refuses a fresh
// run into a directory with checkpoints unless --overwrite; then every rank checks that it sees
// rank 0's files there and can write its own (each rank writes its own checkpoint shard, so --out
// must be shared). Any rank's problem ends every rank. The probe files are opened without
// following a link and removed only when this run made them.
static void prepare_out(const std::string& out, bool resume, bool overwrite) {
    const Comm& cm = comm_world();
    char token[64] = {0};  // rank 0's probe file holds it; the others must read it back
    snprintf(token, sizeof token, "%d %.6f", (int)getpid(), now_s());
    comm_broadcast(token, sizeof token);
    const std::string probe0 = out + "/.fpdt_probe_0.tmp";
    std::string err;
    int fd = -1;
    if (cm.rank == 0) {
        err = make_dirs(out);
        if (!err.empty()) err = "--out " + out + ": cannot write there (" + err + ")";
        if (err.empty()) err = lock_out_dir(out);
        const std::vector<std::string> foreign = err.empty() ? foreign_checkpoint_names(out) : std::vector<std::string>();
        if (!foreign.empty()) err = "--out " + out + ": " + foreign[0] + ": move it out of --out";
        if (err.empty()) err = remove_stale_tmp(out);
        std::vector<std::string> old = err.empty() ? checkpoint_like_names(out) : std::vector<std::string>();
        if (!old.empty() && !resume && !overwrite)
            err = "--out " + out + " holds checkpoints of an earlier run (" + old.back() +
                  (old.size() > 1 ? " and " + std::to_string(old.size() - 1) + " more" : std::string()) +
                  "): continue it with --resume, or pass --overwrite to delete them and start afresh";
        if (err.empty() && overwrite) err = remove_checkpoints(out);
        if (err.empty() && !(err = open_regular(probe0, Open::Write, false, &fd)).empty()) err = "--out " + out + ": cannot write there: " + err;
        if (fd >= 0 && (!ckpt_write_all(fd, token, strlen(token)) || close(fd) != 0))
            err = "--out " + out + ": cannot write there: " + strerror(errno);
    }
    fatal_any(err);
    comm_barrier();
    if (cm.rank != 0) {
        char seen[64] = {0};
        uint64_t size = 0;
        const bool same = open_regular(probe0, Open::Read, false, &fd, &size).empty() && read(fd, seen, sizeof seen - 1) > 0 &&
                          strcmp(seen, token) == 0;
        if (fd >= 0) close(fd);
        const std::string mine = out + "/.fpdt_probe_" + std::to_string(cm.rank) + ".tmp";
        if (!same)
            err = "--out " + out + ": this rank does not see rank 0's files there (every rank writes its own "
                  "checkpoint shard: --out must be a directory all ranks share)";
        else if (!(err = open_regular(mine, Open::Write, false, &fd)).empty())
            err = "--out " + out + ": cannot write there: " + err;
        else
            close(fd), remove(mine.c_str());
    }
    fatal_any(err);
    if (cm.rank == 0) remove(probe0.c_str());
}

// The settings that may change across a --resume, one line of "name value" items: how the run is
// cut (what the losses do not depend on: ranks, sequence-parallel group, chunk, offload, ZeRO,
// precision), and the optimizer's (a run may lower its learning rate when it resumes; the header
// then says so).
static std::string run_settings(const RunCfg& r, size_t chunk, const AdamW& opt, float lr, int warmup, float min_frac) {
    char o[256];
    snprintf(o, sizeof o, " | lr %g | warmup %d | min-lr-frac %g | weight-decay %g | clip %g | beta1 %g | beta2 %g | adam-eps %g",
             lr, warmup, min_frac, opt.wd, opt.clip, opt.beta1, opt.beta2, opt.eps);
    return "ranks " + std::to_string(r.world) + " | sp " + std::to_string(r.P) + " | chunk " + std::to_string(chunk) +
           " | offload " + (r.offload ? "on" : "off") + " | ZeRO stage " + std::to_string(r.zero) + " | precision " +
           (r.bf16 ? "bf16" : "fp32") + o;
}

// " (changed since it was saved: ranks 1 -> 2, lr 0.003 -> 0.001)" for the settings that differ,
// matched by name (a checkpoint from before a setting was recorded lacks it); "" when none do.
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
    std::string out;
    for (const std::string& n : split(now))
        for (const std::string& w : split(was)) {
            const size_t sp = n.rfind(' ');
            if (w != n && sp != std::string::npos && w.compare(0, sp + 1, n, 0, sp + 1) == 0)
                out += (out.empty() ? "" : ", ") + n.substr(0, sp) + " " + w.substr(sp + 1) + " -> " + n.substr(sp + 1);
        }
    return out.empty() ? "" : " (changed since it was saved: " + out + ")";
}

// ----------------------------------------------------------------------------
// The train command, as named steps over one struct: read flags -> choose device and ranks ->
// shape -> outputs -> data -> model (planned and fitted) -> init or resume -> the loop -> summary.

struct Train {
    Args a;
    // the model and its starting weights
    Config cfg;
    std::string init_path;          // --init: the checkpoint the weights come from ("": fresh)
    std::vector<float> init_params; // (n_params) its weights
    // the run's shape: the main phase, and the shorter stages of the start before it (none: no start)
    RunCfg r;
    struct Stage {
        size_t seq = 0;   // --start-seq's entry
        int end = 0;      // --start-steps' entry: the stage runs steps up to this one (1-based, inclusive)
        RunCfg shape;     // seq, and its chunk and offload (see set_run_shape)
        float lr = 0;     // --start-lr's entry: its peak learning rate
        DataSource* data = nullptr;  // its sequences
    };
    std::vector<Stage> stages;
    int steps = 0, start_steps = 0;  // start_steps: the last stage's end (0: no start)
    // the optimizer and the learning-rate schedule
    AdamW opt;
    float lr = 0, min_frac = 0;
    int warmup = 0;
    uint64_t seed = 0;
    // outputs, evaluation, faults
    std::string out, trace_path;
    bool resume = false, overwrite = false, stop_on_bad = false;
    int save_every = 0, exit_after = 0, eval_every = 0, eval_seqs = 0, max_bad = 0, log_every = 0;
    std::set<int> fault_steps;  // test hook FPDT_FAULT_NAN_STEPS="3,4": a gradient poisoned at those steps
    // what the run holds
    Model M;
    Trace trace;
    DataSource* data = nullptr;  // the main phase's sequences (each stage holds its own)
    Manifest id;                // this run's identity, stored in its checkpoints and checked on --resume
    std::string settings;       // what may change across a resume (run_settings)
    std::string changed;        // what did change since the checkpoint ("": nothing, or no resume)
    std::string keep_note;      // why the CPU's default --keep-attention/--keep-mlp are off ("" when they are not)
    int start = 0;              // the first step to run (0, or the checkpoint's step)
    size_t main_dev = 0, main_host = 0;  // the main phase's arenas, for the header
    // the loop's record
    double t_total = 0, tokens_done = 0;
    std::vector<double> step_s;  // each stage's recent time per step, the main phase's last (0: not yet run)
    std::vector<int> steps_run;  // each stage's steps run so far in this process
    int bad_run = 0;            // non-finite steps in a row
};

// The flags that do not depend on the device (all of them but the shape's). False: --help was printed.
static bool read_train_flags(Train* T, int argc, char** argv) {
    T->a = parse_args(argc, argv, train_flags);
    const Args& a = T->a;
    if (a.help) return train_help(), false;
    T->cfg = model_arg(a, "small");
    if (a.has("init")) {  // the weights and the model of an imported or earlier checkpoint (fresh optimizer, step 1)
        Manifest im;
        std::string ierr;
        T->init_path = init_checkpoint(a.str("init", ""), &im, &T->init_params, &ierr);
        fatal_any(ierr);
        if (a.has("model")) check_init_model(T->cfg, im.cfg, T->init_path);
        T->cfg = im.cfg;
    }
    apply_rope_flags(a, &T->cfg);
    T->steps = (int)a.integer("steps", 6500, 1, 1 << 30);
    T->lr = (float)a.real("lr", 3e-3, 0, 10);
    T->opt.wd = (float)a.real("weight-decay", 0, 0, 10);  // 0.1 slowed the default run's first retrievals (docs/default_run.md)
    T->opt.clip = (float)a.real("clip", 1.0, 0, 1e9);
    T->opt.beta1 = (float)a.real("beta1", 0.9, 0, 0.999999);
    T->opt.beta2 = (float)a.real("beta2", 0.95, 0, 0.999999);
    T->opt.eps = (float)a.real("adam-eps", 1e-8, 1e-30, 1);
    T->warmup = (int)a.integer("warmup", std::max(1, T->steps / 20), 0, T->steps);
    T->min_frac = (float)a.real("min-lr-frac", 1, 0, 1);  // 1: constant after warmup; the last, long stages need the full rate
    T->seed = a.integer("seed", 1337, 0, LLONG_MAX);
    T->out = a.str("out", "");
    T->save_every = (int)a.integer("save-every", 0, 0, 1 << 30);
    T->exit_after = (int)a.integer("exit-after", 0, 0, 1 << 30);
    T->eval_every = (int)a.integer("eval-every", 500, 0, 1 << 30);
    T->eval_seqs = (int)a.integer("eval-seqs", 64, 1, 1 << 20);
    T->trace_path = a.str("trace", "");
    T->stop_on_bad = stop_on_nonfinite(a);
    T->max_bad = (int)a.integer("max-bad-steps", 5, 1, 1 << 30);
    const long long watchdog_s = a.integer("watchdog", 1800, 0, 1 << 30);  // checked on one process too
    if (comm_world().size > 1) comm_watchdog_start((double)watchdog_s);
    for (const char* p = getenv("FPDT_FAULT_NAN_STEPS"); p && *p; p += strcspn(p, ","), p += (*p == ','))
        T->fault_steps.insert(atoi(p));
    T->resume = a.has("resume"), T->overwrite = a.has("overwrite");
    if ((T->save_every || T->exit_after || T->resume || T->overwrite) && T->out.empty())
        fatal_all("--save-every, --exit-after, --resume and --overwrite need --out DIR");
    if (T->resume && T->overwrite) fatal_all("--resume continues the checkpoints in --out, --overwrite deletes them: choose one");
    T->log_every = (int)a.integer("log-every", 0, 0, 1 << 30);
    return true;
}

// Which stage of the start step (0-based) belongs to; stages.size() for the main phase.
static size_t stage_at(const Train* T, int step) {
    size_t i = 0;
    while (i < T->stages.size() && step >= T->stages[i].end) i++;
    return i;
}
// Whether step (0-based) is the last of a stage of the start.
static bool ends_stage(const Train* T, int step) {
    const size_t i = stage_at(T, step);
    return i < T->stages.size() && step + 1 == T->stages[i].end;
}
static const RunCfg& shape_at(const Train* T, int step) {
    const size_t i = stage_at(T, step);
    return i < T->stages.size() ? T->stages[i].shape : T->r;
}
static DataSource* data_at(const Train* T, int step) {
    const size_t i = stage_at(T, step);
    return i < T->stages.size() ? T->stages[i].data : T->data;
}

// The run's shape, main phase and the stages of the start. The defaults are the default run: FPDT
// itself (several chunks, offloaded) on a sequence long enough to need it, reached from shorter
// sequences as context extension does: on the CPU 64 tokens, where a 2-layer model learns to
// retrieve in seconds, then 1024 and 2048, a few cheap steps each that carry retrieval to far
// distances, then the last 3% of the steps at --seq (docs/default_run.md). Each stage runs in as many
// chunks as the main phase where they divide it, so it runs FPDT too and a key in an earlier
// chunk is within its reach.
// The world's layout first: --sp splits the ranks into sequence-parallel groups (comm.h).
static void set_run_shape(Train* T) {
    const Args& a = T->a;
    const bool gpu = T->M.ctx.gpu;
    RunCfg& r = T->r;
    const Comm& cm = comm_world();
    r.world = cm.size, r.world_rank = cm.rank;
    r.P = (int)a.integer("sp", cm.size, 1, 1 << 20);
    r.batch = (int)a.integer("batch", 1, 0, 1 << 30);
    std::string err = check_layout(r.world, r.P, r.batch);
    if (!err.empty()) fatal_all("%s", err.c_str());
    comm_split_groups(r.P);
    r.rank = cm.sp_rank;
    r.seq = a.integer("seq", gpu ? 65536 : 4096, 1, 1ll << 40);
    r.chunk = a.integer("chunk-size", default_chunk(r.seq, r.P, gpu ? 16384 : 1024), 1, 1ll << 40);
    r.offload = a.flag01("offload", r.chunk < r.seq);
    r.zero = (int)a.integer("zero", 0, 0, 3);
    r.bf16 = precision_bf16(a, gpu);
    r.keep_attn = a.flag01("keep-attention", !gpu);
    r.keep_mlp = a.flag01("keep-mlp", !gpu);
    r.doc_bos = doc_bos_flags(a, T->cfg.vocab);
    r.device_cap = (size_t)(a.real("device-mem", 0, 0, 1e6) * 1073741824.0);
    r.host_cap = (size_t)(a.real("host-mem", 0, 0, 1e6) * 1073741824.0);
    const std::vector<long long> no_start = {0}, cpu_start = {64, 1024, 2048}, gpu_start = {4096};
    std::vector<long long> seqs = a.integers("start-seq", a.has("seq") ? no_start : gpu ? gpu_start : cpu_start, 0, r.seq);
    if (seqs == no_start) seqs.clear();
    if (a.has("start-steps") && seqs.empty()) fatal_all("--start-steps needs --start-seq N (the shorter sequence to start at)");
    for (size_t i = 0; i < seqs.size(); i++)
        if (seqs[i] == 0 || (i > 0 && seqs[i] <= seqs[i - 1]))
            fatal_all("--start-seq: '%s' (expected one length, or lengths that grow, each at least 1)", a.str("start-seq", "").c_str());
    const bool cpu_default = !a.has("start-seq") && !gpu && !seqs.empty();  // the CPU default run's three stages
    // --start-steps and --start-lr give one value per stage
    auto one_per_stage = [&](const char* flag, size_t n, const char* each) {
        if (n != seqs.size())
            fatal_all("%s: %zu value%s for %zu --start-seq length%s (expected %s%s)", flag, n, n == 1 ? "" : "s", seqs.size(),
                      seqs.size() == 1 ? "" : "s", each,
                      a.has("start-seq") ? "" : gpu ? "; --start-seq is 4096 by default here" : "; --start-seq is 64,1024,2048 by default here");
    };
    // the stages' last steps: one stage 95% of --steps; the default run's three 92%, 95% and 97%
    std::vector<long long> ends;
    if (seqs.size() == 1) ends = {T->steps * 95ll / 100};
    if (cpu_default) ends = {T->steps * 92ll / 100, T->steps * 95ll / 100, T->steps * 97ll / 100};
    ends = a.integers("start-steps", ends, 0, T->steps);
    if (a.has("start-steps") && ends == std::vector<long long>{0}) seqs.clear(), ends.clear();  // 0: no start
    one_per_stage("--start-steps", ends.size(), "the last step of each");
    for (size_t i = 1; i < ends.size(); i++)
        if (ends[i] < ends[i - 1]) fatal_all("--start-steps: '%s' (expected last steps that do not decrease)", a.str("start-steps", "").c_str());
    if (!(err = check_shape(T->cfg, r)).empty()) fatal_all("%s", err.c_str());
    // The CPU's defaults keep what the backward reads (--keep-attention, --keep-mlp) where that fits
    // this machine's memory and --host-mem; where it does not, they recompute it as a GPU run does,
    // and the header says so. Either flag on the command line is taken as it is.
    if (!gpu && (r.keep_attn || r.keep_mlp) && !a.has("keep-attention") && !a.has("keep-mlp")) {
        Model K;
        model_create(&K, T->cfg, r, true);  // what the run would take, counted only
        const double need = ((double)K.dev.peak + (double)K.host.peak) * std::max(1, comm_world().local_size);
        if ((r.host_cap && K.host.peak > r.host_cap) || !check_host_bytes("", need).empty()) {
            r.keep_attn = r.keep_mlp = false;
            T->keep_note = " (the CPU's default keeps attention, mlp where they fit: not within this machine's memory or --host-mem)";
        }
    }
    const size_t u = r.seq / std::max<size_t>(r.chunk, 1);
    // each stage's peak learning rate: --lr, but a third of it for the CPU default run's 64-token
    // stage, where 3e-3 left one or two of the five passkey symbols unlearned in two seeds of
    // three and 1e-3 learned all five in each (docs/default_run.md)
    std::vector<double> lrs(seqs.size(), T->lr);
    if (cpu_default && !seqs.empty()) lrs[0] = T->lr / 3;
    lrs = a.reals("start-lr", lrs, 0, 10);
    one_per_stage("--start-lr", lrs.size(), "the peak learning rate of each");
    for (size_t i = 0; i < seqs.size(); i++) {
        if (ends[i] == (i ? ends[i - 1] : 0)) continue;  // a stage of no steps (short runs: --steps 20) is left out
        Train::Stage st;
        st.seq = (size_t)seqs[i], st.end = (int)ends[i], st.lr = (float)lrs[i];
        st.shape = r;
        st.shape.seq = st.seq;
        st.shape.chunk = st.seq % u == 0 && (st.seq / u) % r.P == 0 ? st.seq / u : st.seq;
        st.shape.offload = r.offload && st.shape.chunk < st.seq;
        if (!(err = check_shape(T->cfg, st.shape)).empty()) fatal_all("--start-seq %zu: %s", st.seq, err.c_str());
        T->stages.push_back(st);
    }
    T->start_steps = T->stages.empty() ? 0 : T->stages.back().end;
    T->step_s.assign(T->stages.size() + 1, 0.0);
    T->steps_run.assign(T->stages.size() + 1, 0);
}

// --out and --trace, before anything is computed: a run that cannot write them fails now, not
// at its first save hours later.
static void prepare_outputs(Train* T) {
    if (!T->out.empty()) prepare_out(T->out, T->resume, T->overwrite);
    if (T->trace_path.empty()) return;
    std::string terr;  // rank 0 writes it, after step 2: find out now whether it can (common.h)
    if (comm_world().rank == 0) {
        FILE* f = trace_open_tmp(T->trace_path, &terr);
        if (f) fclose(f), remove((T->trace_path + ".tmp").c_str());
    }
    fatal_any(terr);
}

// OUT/main.log (rank 0), opened for appending, its first line the command. A regular file only,
// never through a link (a FIFO there would block the run forever).
static void open_run_log(const Train* T, int argc, char** argv) {
    if (T->out.empty() || comm_world().rank != 0) return;
    std::string err;
    run_log().file = fopen_regular(T->out + "/main.log", Open::Append, false, &err);
    if (!run_log().file) fatal("--out %s: cannot write %s", T->out.c_str(), err.c_str());
    std::string cmd = "command:";
    for (int i = 0; i < argc; i++) cmd += std::string(" ") + argv[i];
    log_line(false, "%s", cmd.c_str());
}

// The data: the main phase's sequences and each stage's of the start. A file missing on
// one machine is an error on one rank only: fatal_any ends them all.
static void open_train_data(Train* T) {
    std::string err;
    const std::string spec = T->a.str("data", "passkey");
    T->data = data_open(spec, T->cfg.vocab, T->r.seq, T->seed, &err);
    fatal_any(T->data ? "" : err);
    for (Train::Stage& st : T->stages) {
        st.data = data_open(spec, T->cfg.vocab, st.seq, T->seed, &err);
        fatal_any(st.data ? "" : "--start-seq " + std::to_string(st.seq) + ": " + err);
    }
}

// The main phase's model first (planned and fitted in model_create: a run that cannot fit fails
// now), with fresh weights or --init's (this rank's slice under ZeRO-3) and fresh AdamW moments.
static void create_train_model(Train* T) {
    Model* M = &T->M;
    M->ctx.trace = &T->trace;
    model_create(M, T->cfg, T->r, false);
    model_init_params(M, T->seed);
    if (!T->init_path.empty()) ckpt_params_to_model(M, T->init_params);
    T->main_dev = M->dev.cap, T->main_host = M->host.cap;
}

// The run's identity, then --resume's checkpoint (its step and what changed since it was saved),
// then the shape of the start's stage the run is (still) in.
static void init_or_resume(Train* T) {
    Model* M = &T->M;
    Manifest& id = T->id;
    id.cfg = T->cfg, id.seq = T->r.seq, id.seed = T->seed, id.total_steps = T->steps, id.source = T->data->identity();
    id.batch = T->r.batch;
    if (T->r.doc_bos >= 0) id.source += " | doc-mask bos " + std::to_string(T->r.doc_bos);
    for (size_t i = 0; i < T->stages.size(); i++)  // " | start-seq 64 for 3960 steps, 1024 for 220 steps"
        id.source += (i ? ", " : " | start-seq ") + std::to_string(T->stages[i].seq) + " for " +
                     std::to_string(T->stages[i].end - (i ? T->stages[i - 1].end : 0)) + " steps";
    T->settings = run_settings(T->r, M->C, T->opt, T->lr, T->warmup, T->min_frac);
    if (!T->stages.empty()) {  // the stages' learning rates may change on a resume too
        std::string lrs;
        for (const Train::Stage& st : T->stages) lrs += (lrs.empty() ? "" : ",") + fmt_g(st.lr);
        T->settings += " | start-lr " + lrs;
    }
    if (T->resume) {
        Manifest man;
        const std::string path = load_checkpoint(M, T->out, id, &man);
        T->start = (int)man.step;
        T->changed = settings_changes(read_run_settings(path), T->settings);
        if (T->start == T->steps && comm_world().rank == 0)
            printf("resume: the checkpoint is at step %d: nothing left to do\n", T->start);
    }
    if (T->start < T->start_steps) model_reshape(M, T->cfg, shape_at(T, T->start));
}

static void print_train_header(const Train* T) {
    if (comm_world().rank != 0) return;
    const Config& cfg = T->cfg;
    const RunCfg& r = T->r;
    const Model& M = T->M;
    log_line(true, "fpdt train | model %s (%s, %d layers, d %d, %d/%d heads, %.2fM params) | data %s", cfg.name,
             cfg.family == GPT ? "gpt" : "llama", cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, M.n_params / 1e6,
             T->data->describe().c_str());
    std::string ranks = std::string(r.zero ? " ZeRO-" + std::to_string(r.zero) : "") + (M.nccl ? " NCCL" : "");
    if (r.world > 1)  // the layout: W ranks = R replicas x N per sequence-parallel group
        ranks += " (" + std::to_string(r.world / r.P) + " replica" + (r.world / r.P > 1 ? "s" : "") + " x sp " + std::to_string(r.P) + ")";
    if (r.batch > 1) ranks += " | batch " + std::to_string(r.batch) + " (" + std::to_string(r.batch / (r.world / r.P)) + " per replica)";
    const std::string since = T->resume ? " | resumed at step " + std::to_string(T->start) + T->changed
                              : !T->init_path.empty() ? " | weights from " + T->init_path : "";
    const char* kept = r.keep_attn && r.keep_mlp ? "attention, mlp" : r.keep_attn ? "attention" : r.keep_mlp ? "mlp" : "none";
    log_line(true, "seq %zu | chunk %zu (%zu chunks) | offload %s | kept for the backward: %s%s | ranks %d%s | device %s, %s | steps %d%s%s",
             r.seq, r.chunk, r.seq / r.chunk, r.offload ? "on" : "off", kept, T->keep_note.c_str(), r.world, ranks.c_str(),
             device_name(M.ctx).c_str(),
             r.bf16 ? "bf16" : "fp32", T->steps, r.doc_bos >= 0 ? " | doc-mask 1: attention within documents" : "",
             since.c_str());
    if (T->start_steps) {  // "start: steps 1-3960 at seq 64 (chunk 16: 4 chunks, offload on), steps 3961-..."
        std::string line = "start:";
        for (size_t i = 0; i < T->stages.size(); i++) {
            const Train::Stage& st = T->stages[i];
            const size_t n = st.seq / st.shape.chunk;
            char b[160];
            snprintf(b, sizeof b, " steps %d-%d at seq %zu (chunk %zu: %zu chunk%s, offload %s, lr %g),",
                     i ? T->stages[i - 1].end + 1 : 1, st.end, st.seq, st.shape.chunk, n, n == 1 ? "" : "s",
                     st.shape.offload ? "on" : "off", st.lr);
            line += b;
        }
        log_line(true, "%s then seq %zu from step %d", line.c_str(), r.seq, T->start_steps + 1);
    }
    log_line(true, "memory (arenas, this rank): device %.1f MiB, host %.1f MiB at seq %zu, taken once at start%s",
             T->main_dev / 1048576.0, T->main_host / 1048576.0, r.seq, T->start_steps ? " (and again after the start)" : "");
}

// Learning rate at step (0-based): linear warmup, then cosine down to peak * min_frac at the last
// step, the peak being the stage's (--start-lr) during the start and --lr after it.
static float lr_at(const Train* T, int step) {
    const size_t i = stage_at(T, step);
    const float peak = i < T->stages.size() ? T->stages[i].lr : T->lr;  // the stage's (--start-lr) or --lr
    if (step < T->warmup) return peak * (step + 1) / T->warmup;
    if (T->steps <= T->warmup) return peak;
    const float p = (float)(step - T->warmup) / (float)std::max(1, T->steps - 1 - T->warmup);
    return peak * (T->min_frac + (1 - T->min_frac) * 0.5f * (1 + cosf(3.14159265f * std::min(1.0f, p))));
}

// A stage of the start is over at this step: on to the next stage's sequence, or --seq, weights
// and optimizer state carried over.
static void next_stage_if_due(Train* T, int step) {
    const RunCfg& next = shape_at(T, step);
    if (step == 0 || T->M.run.seq == next.seq) return;
    const size_t from = T->M.run.seq;
    model_reshape(&T->M, T->cfg, next);
    log_line(true, "seq %zu -> %zu from step %d | chunk %zu (%d chunks) | offload %s", from, next.seq, step + 1, T->M.C,
             T->M.u, next.offload ? "on" : "off");
}

// Test hook FPDT_TEST_GRADS_OUT=FILE: the summed gradient of the run's first step (unclipped with
// --clip 0; whole under ZeRO 0 and 1) written as raw fp32.
static void write_test_grads(Model* M) {
    const char* gpath = getenv("FPDT_TEST_GRADS_OUT");
    if (!gpath || comm_world().rank != 0) return;
    if (!M->grads) fatal("FPDT_TEST_GRADS_OUT needs --zero 0 or 1: under ZeRO-2 and 3 no rank holds the whole gradient");
    std::vector<float> gr(M->n_params);
    dev_download(&M->ctx, gr.data(), M->grads, M->n_params * sizeof(float));
    std::string err;
    FILE* gf = fopen_regular(gpath, Open::Write, true, &err);
    if (!gf || fwrite(gr.data(), 4, gr.size(), gf) != gr.size() || fclose(gf) != 0)
        fatal("FPDT_TEST_GRADS_OUT %s: cannot write%s", gpath, err.empty() ? "" : (" (" + err + ")").c_str());
}

struct StepResult {
    float loss, norm, lr;
    bool finite;
    double seconds;
};

// Sequence b of step k is the data's sequence k B + b, whatever the layout: replica r runs b in
// [r B/R, (r+1) B/R), one after the other, accumulating gradients (zero.h says how, by stage).
// Returns the step's loss, the mean over its B sequences (each group's rank 0 adds its own; the
// sum runs over the world), so it does not depend on W, --sp or R.
static float forward_backward_batch(Train* T, int step) {
    Model* M = &T->M;
    const Comm& cm = comm_world();
    const int B = T->r.batch, per = B / cm.replicas;
    double loss = 0;
    for (int j = 0; j < per; j++) {
        read_into(M, data_at(T, step), (uint64_t)step * B + (uint64_t)cm.replica * per + j);
        const float l = model_forward_backward(M, true, j > 0);
        if (cm.sp_rank == 0) loss += l;
    }
    comm_allreduce(&loss, 1);
    return (float)(loss / B);
}

// One optimizer step: the step's sequences in, forward and backward, the update (skipped when the
// loss or the gradient is not finite). Traces the step chosen for --trace.
static StepResult train_step(Train* T, int step, bool traced) {
    Model* M = &T->M;
    StepResult s;
    s.lr = T->opt.lr = lr_at(T, step);
    watchdog().step = step + 1;
    T->trace.on = traced;
    T->trace.origin = now_s();
#ifdef __CUDACC__
    if (traced && M->ctx.gpu) trace_gpu_start(&M->ctx);
#endif
    const double t0 = now_s();
    s.loss = forward_backward_batch(T, step);
    if (T->fault_steps.count(step + 1) && comm_world().rank == 0)
        dev_fill(&M->ctx, M->grads ? M->grads : M->grad_shard, NAN, 1);  // as a blow-up would
    s.finite = std::isfinite(s.loss);
    s.norm = NAN;
    if (s.finite) s.norm = model_update(M, T->opt, step + 1, &s.finite);
    if (step == T->start) write_test_grads(M);
    dev_sync(&M->ctx);  // the update's kernels belong to this step's time
    s.seconds = now_s() - t0;
    if (traced) {
#ifdef __CUDACC__
        if (M->ctx.gpu) trace_gpu_finish(&M->ctx);
#endif
        if (comm_world().rank == 0) trace_write(&T->trace, T->trace_path.c_str(), comm_world().rank);
        T->trace.on = false;
        T->trace.events.clear();
    }
    T->tokens_done += (double)M->run.seq * T->r.batch;  // every replica's tokens
    return s;
}

// The step's line (every --log-every steps on stdout, every step in main.log), with the time
// left: each stage's steps at its recent pace; a stage that has not run yet at the pace of the
// stage before it scaled by the sequence (a guess its first steps replace). With --doc-mask 1 it
// ends with the documents of the step's last sequence on this rank's replica: their count, mean
// length and the share of attention blocks skipped.
static void log_step(Train* T, int step, const StepResult& s, int end) {
    const size_t now = stage_at(T, step), n = T->stages.size();
    // a stage's first step warms up (page faults, first touches): its second replaces it, then a running mean
    T->step_s[now] = T->steps_run[now]++ < 2 ? s.seconds : 0.9 * T->step_s[now] + 0.1 * s.seconds;
    double left_s = 0, pace = 0;
    size_t paced_seq = 1;
    for (size_t i = 0; i <= n; i++) {
        const size_t seq = i < n ? T->stages[i].seq : T->r.seq;
        const int lo = i ? T->stages[i - 1].end : 0, hi = i < n ? T->stages[i].end : T->steps;
        if (T->step_s[i]) pace = T->step_s[i], paced_seq = seq;
        left_s += std::max(0, hi - std::max(lo, step + 1)) * pace * seq / paced_seq;
    }
    const int every = T->log_every ? T->log_every : auto_log_every(T->steps);
    char docs[96] = "";
    if (T->M.run.doc_bos >= 0)
        snprintf(docs, sizeof docs, " | docs %zu, mean %.0f tok, %.1f%% of blocks skipped", T->M.doc_starts.size(),
                 (double)T->M.run.seq / T->M.doc_starts.size(), 100 * docs_skipped_share(T->M.first_kv));
    log_line(shown_step(step + 1, T->steps, every, !s.finite || ends_stage(T, step) || step + 1 == end),
             "step %d/%d | loss %.6f | lr %.3e | norm %.6g | %.0f tok/s | %.1f ms/step | %s elapsed, %s left%s%s", step + 1,
             T->steps, s.loss, s.lr, s.norm, (double)T->M.run.seq * T->r.batch / s.seconds, s.seconds * 1e3,
             clock_str(now_s() - T->t_total).c_str(), clock_str(left_s).c_str(), docs, s.finite ? "" : " | NON-FINITE: update skipped");
}

// After the run's first step, and the first of each stage and of --seq after a start (a new arena): on a GPU,
// what was allocated outside the arena since it was taken (CUDA's kernels, cuBLAS, NCCL) against
// the headroom kept for it (model.h, gpu_memory_after_step). Rank 0 prints its line; another rank
// whose allocations went past the headroom says so, naming itself.
static void check_gpu_memory(const Train* T, int step) {
    if (!T->M.ctx.gpu || (step != T->start && !(step > 0 && ends_stage(T, step - 1)))) return;
    bool over = false;
    const std::string line = gpu_memory_after_step(&T->M, step + 1, &over);
    const Comm& cm = comm_world();
    if (cm.rank == 0) log_line(true, "%s", line.c_str());
    else if (over) fprintf(stderr, "fpdt (rank %d of %d): %s\n", cm.rank, cm.size, line.c_str());
}

// A skipped update left the weights and optimizer state of the last good step, so nothing
// non-finite can reach a checkpoint; --on-nonfinite stop, or --max-bad-steps in a row, ends the run.
static void check_finite(Train* T, int step, bool finite) {
    if (finite) {
        T->bad_run = 0;
        return;
    }
    if (T->stop_on_bad) fatal_all("step %d: non-finite loss or gradient norm (--on-nonfinite stop)", step + 1);
    if (++T->bad_run >= T->max_bad)
        fatal_all("step %d: %d non-finite steps in a row; stopping (lower --lr, check the data)", step + 1, T->bad_run);
}

// After step (0-based): evaluate every --eval-every steps, at the end of each stage of the start
// and at the end; save every --save-every steps and at the end.
static void evaluate_and_save(Train* T, int step) {
    const bool last = step + 1 == T->steps || step + 1 == T->exit_after;
    if (T->eval_every && ((step + 1) % T->eval_every == 0 || last || ends_stage(T, step))) {
        const EvalResult R = evaluate(&T->M, data_at(T, step), T->eval_seqs);
        log_line(true, "eval step %d | seq %zu%s", step + 1, T->M.run.seq, eval_summary(R).c_str());
    }
    if (!T->out.empty() && ((T->save_every && (step + 1) % T->save_every == 0) || last)) {
        const std::string saved = save_checkpoint(&T->M, T->out, step + 1, T->id, T->settings);
        log_line(true, "saved %s", saved.c_str());
    }
}

static void print_train_summary(Train* T, int step) {
    const double t_total = now_s() - T->t_total;
    double peaks[2] = {(double)T->M.dev.peak, (double)T->M.host.peak};
    comm_allreduce_max(peaks, 2);
    log_line(true, "done: %d steps in %.1f s, %.0f tok/s | peak device memory %.1f MiB | peak host memory %.1f MiB%s",
             step - T->start, t_total, T->tokens_done / std::max(t_total, 1e-9), peaks[0] / 1048576.0,
             peaks[1] / 1048576.0, T->r.world > 1 ? " (max over ranks)" : "");
    if (T->exit_after && step < T->steps) log_line(true, "exit-after %d: stopped; continue with --resume", T->exit_after);
}

static void close_train(Train* T) {
    if (run_log().file) fclose(run_log().file), run_log().file = nullptr;
    delete T->data;
    for (Train::Stage& st : T->stages) delete st.data;
    model_free(&T->M);
}

static int cmd_train(int argc, char** argv) {
    Train T;
    if (!read_train_flags(&T, argc, argv)) return 0;  // --help
    choose_device(T.a, &T.M.ctx);
    set_run_shape(&T);  // splits the ranks into groups: before NCCL's communicators are made
    T.M.nccl = choose_comm(T.a, T.M.ctx);
    prepare_outputs(&T);
    open_train_data(&T);
    open_run_log(&T, argc, argv);
    create_train_model(&T);
    init_or_resume(&T);
    print_train_header(&T);
    const int end = T.exit_after ? std::min(T.exit_after, T.steps) : T.steps;
    // the step traced: this run's second step at --seq (past the warm-up and any short start)
    const int trace_step = std::max(0, std::min(std::max(T.start, T.start_steps) + 1, end - 1));
    T.t_total = now_s();
    int step = T.start;
    for (; step < end; step++) {
        next_stage_if_due(&T, step);
        const StepResult s = train_step(&T, step, !T.trace_path.empty() && step == trace_step);
        log_step(&T, step, s, end);
        check_gpu_memory(&T, step);
        check_finite(&T, step, s.finite);
        evaluate_and_save(&T, step);
    }
    print_train_summary(&T, step);
    close_train(&T);
    return 0;
}

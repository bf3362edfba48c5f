// fpdt.cu: the program, the one file make compiles. main() and the smaller commands:
//
//   ./fpdt train [flags]     train (see --help); mpirun -np P ./fpdt train ... for P ranks (train.h)
//   ./fpdt eval --init DIR   a checkpoint's loss by position, retrieval, the needle grid (eval.h)
//   ./fpdt sample --out DIR  generate from a saved checkpoint
//   ./fpdt plan --model M --seq S   predicted memory and the break-even chunk size
//   ./fpdt bench             the kernels' speed on this machine
//
// Sections: sample; plan; bench; main. What the commands share (flags, the run's log, the device
// and ranks) is in cmdline.h; checkpoints are in checkpoint.h.
#include <omp.h>
#include <sched.h>
#include <csignal>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>
#include "checkpoint.h"
#include "cmdline.h"
#include "data/data.h"
#include "eval.h"
#include "schedule.h"
#include "train.h"

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
    if (temp > 0 && !(err = check_host_bytes("--temperature: the logits of " + std::to_string(r.seq) + " positions", (double)r.seq * cfg->vocab * 4)).empty())
        fatal("%s (lower --tokens or sample greedily)", err.c_str());
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
    Args a = parse_args(argc, argv, {"model", "seq", "chunk-size", "gpus", "sp", "offload", "zero", "gpu-mem", "host-mem",
                                     "tflops", "link-gbps", "precision", "doc-len", "keep-attention", "keep-mlp", "help"});
    if (a.help || !a.has("model") || !a.has("seq")) {
        printf("usage: ./fpdt plan --model NAME --seq N [--chunk-size C] [--gpus W] [--sp N] [--offload 0|1] [--zero 0-3]\n"
               "                   [--gpu-mem GiB] [--host-mem GiB] [--tflops X] [--link-gbps Y] [--precision fp32|bf16]\n"
               "                   [--doc-len L] [--keep-attention 0|1] [--keep-mlp 0|1]\n"
               "  predicted peak device and host bytes per rank (the same allocation sequence as ./fpdt train),\n"
               "  the headroom a GPU run keeps outside its device arena (CUDA's kernels, cuBLAS, NCCL), the\n"
               "  longest sequence that fits, and the smallest chunk at which copies hide behind attention.\n"
               "  --gpus W ranks in all, in sequence-parallel groups of --sp N (default N = W): the ZeRO shards\n"
               "  divide by W, the sequence's store by N. With --doc-len L, the attention blocks --doc-mask 1\n"
               "  skips on documents of L tokens each.\n"
               "  Defaults: one GPU, offload 1 when chunked (train defaults to 0: pass --offload to match a run),\n"
               "  80 GiB GPU, 512 GiB host, 400 TFLOP/s, 50 GB/s, bf16, --keep-attention 0 and --keep-mlp 0 (a GPU\n"
               "  run's defaults).\n\n");
        print_models();
        return a.help ? 0 : 1;
    }
    const Config& c = model_arg(a, "small");
    RunCfg r;
    r.seq = a.integer("seq", 0, 1, 1ll << 40);
    r.chunk = a.integer("chunk-size", r.seq, 1, 1ll << 40);
    r.world = (int)a.integer("gpus", 1, 1, 1 << 16);
    r.P = (int)a.integer("sp", r.world, 1, 1 << 16);
    std::string err = check_layout(r.world, r.P, r.world);  // a batch that fits any layout: bytes per rank do not depend on it
    if (!err.empty()) fatal_all("%s", err.c_str());
    r.offload = a.flag01("offload", r.chunk < r.seq);
    r.zero = (int)a.integer("zero", 0, 0, 3);
    r.bf16 = precision_bf16(a, true);  // a plan is for a GPU run
    r.keep_attn = a.flag01("keep-attention", false);  // as a GPU run's default
    r.keep_mlp = a.flag01("keep-mlp", false);
    const double gpu_mem = a.real("gpu-mem", 80, 0, 1e6) * 1073741824.0, host_mem = a.real("host-mem", 512, 0, 1e9) * 1073741824.0;
    const double flops = a.real("tflops", 400, 1e-3, 1e6) * 1e12, bw = a.real("link-gbps", 50, 1e-3, 1e6) * 1e9;
    if (!(err = check_shape(c, r)).empty()) fatal_all("%s", err.c_str());
    size_t dev, host;
    Model M;
    plan_sizes(c, r, &dev, &host, &M);
    std::map<std::string, size_t> parts[2];
    for (auto& it : M.dev.items) parts[0][it.first.rfind("store:", 0) == 0 ? "store chunks (device)" : it.first] += it.second;
    for (auto& it : M.host.items) parts[1][it.first.rfind("store:", 0) == 0 ? "store (sequence-sized)" : it.first] += it.second;
    const std::string groups = r.P < r.world ? " (" + std::to_string(r.world / r.P) + " replicas x sp " + std::to_string(r.P) + ")" : "";
    printf("plan: model %s, seq %zu, chunk %zu (%d chunks), %d rank(s)%s, offload %s, ZeRO stage %d, %s\n", c.name, r.seq,
           M.C, M.u, r.world, groups.c_str(), r.offload ? "on" : "off", r.zero, r.bf16 ? "bf16" : "fp32");
    printf("  bytes per rank:\n");
    const char* where[2] = {"device", "host"};
    for (int k = 0; k < 2; k++) {
        printf("  %-6s %10.1f MiB\n", where[k], (k ? host : dev) / 1048576.0);
        for (auto& it : parts[k]) printf("    %-42s %10.1f MiB\n", it.first.c_str(), it.second / 1048576.0);
    }
    // what a GPU run allocates after its arena (CUDA's kernels, cuBLAS, with several ranks NCCL): kept aside
    const size_t room = gpu_headroom(r.P > 1);
    printf("  headroom outside the device arena %.1f MiB: CUDA's kernels and cuBLAS %.1f", room / 1048576.0,
           GPU_HEADROOM_KERNELS / 1048576.0);
    if (r.P > 1) printf(", NCCL %.1f", GPU_HEADROOM_NCCL / 1048576.0);
    printf(" (stated, not yet measured)\n");
    printf("  fits: device %s (%.1f + %.1f headroom of %.1f GiB), host %s (%.1f of %.1f GiB)\n",
           dev + room <= gpu_mem ? "yes" : "NO", dev / 1073741824.0, room / 1073741824.0, gpu_mem / 1073741824.0,
           host <= host_mem ? "yes" : "NO", host / 1073741824.0, host_mem / 1073741824.0);
    // Longest sequence at this chunk size: device bytes do not grow with S once offloaded, host
    // bytes grow linearly; search over multiples of the chunk.
    size_t lo = 0, hi = 1;
    auto fits = [&](size_t units) {
        RunCfg t = r;
        t.seq = units * M.C;
        t.offload = r.offload && units > 1;
        size_t dv, hs;
        plan_sizes(c, t, &dv, &hs);
        return dv + room <= gpu_mem && hs <= host_mem;
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
    if (a.has("doc-len")) {  // packed documents of one length: the (query chunk, kv chunk) blocks the mask empties
        const size_t len = a.integer("doc-len", 0, 1, 1ll << 40);
        std::vector<int32_t> starts;
        for (size_t p = 0; p < r.seq; p += len) starts.push_back((int32_t)p);
        const std::vector<int> first = docs_first_kv(starts, r.seq, M.C);
        const double share = docs_skipped_share(first), total = M.u * (M.u + 1) / 2.0;
        printf("  documents of %zu tokens (--doc-mask 1): %.0f of %.0f attention blocks skipped per layer and pass (%.1f%%),"
               " and their key/value copies\n", len, share * total, total, 100 * share);
    }
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
           "       ./fpdt eval --init DIR [--seq S] [--needle]   a checkpoint's held-out loss by position,\n"
           "                                 retrieval by distance, the needle grid (./fpdt eval --help)\n"
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
    try {  // every size from the input is checked before it is allocated; this catches what was not
        if (cmd == "train") rc = cmd_train(argc, argv);
        else if (cmd == "eval") rc = cmd_eval(argc, argv);
        else if (cmd == "sample") rc = cmd_sample(argc, argv);
        else if (cmd == "plan") rc = cmd_plan(argc, argv);
        else if (cmd == "bench") rc = cmd_bench(argc, argv);
        else if (cmd == "-h" || cmd == "--help" || cmd == "help") usage(), rc = 0;
        else fatal_all("unknown command '%s' (expected train, eval, sample, plan or bench; see ./fpdt --help)", cmd.c_str());
    } catch (const std::bad_alloc&) {
        fatal("out of memory: an allocation failed (this machine has %.1f GiB; a ulimit or cgroup may allow less); "
              "./fpdt plan shows what a run needs", machine_memory_bytes() / 1073741824.0);
    }
    comm_finalize();
    return rc;
}

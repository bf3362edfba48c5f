// eval.h: evaluation. evaluate(), the one pass over held-out sequences that train (every
// --eval-every steps) and the eval command both run: the mean loss, the loss by position, and for
// a retrieval task the answers right by the distance back to their key. Then the eval command
// itself: a checkpoint at any length (forward only, chunked and offloaded like training, RoPE
// overrides), and the needle grid (context length x depth of the key).
#pragma once
#include <cmath>
#include <string>
#include <vector>
#include "checkpoint.h"
#include "cmdline.h"
#include "data/data.h"
#include "schedule.h"

// ----------------------------------------------------------------------------
// evaluate()

static std::string fmt_g(double v) {
    char b[32];
    snprintf(b, sizeof b, "%g", v);
    return b;
}
// 64, 1K, 4K, 1M: a power-of-two count as the buckets name it
static std::string short_count(size_t n) {
    if (n >= (1u << 20) && n % (1u << 20) == 0) return std::to_string(n >> 20) + "M";
    if (n >= 1024 && n % 1024 == 0) return std::to_string(n >> 10) + "K";
    return std::to_string(n);
}

static void read_into(Model* M, DataSource* data, uint64_t step) {
    model_set_tokens(M, [&](size_t start, size_t n, int32_t* out) { data->read(step, start, n, out); });
}

static const int NBUCKET = 11;  // distance < 16, < 64, ... , < 4M, more
static const char* const distance_names[NBUCKET] = {"<16", "<64", "<256", "<1K", "<4K", "<16K", "<64K", "<256K", "<1M", "<4M", ">=4M"};
static int distance_bucket(size_t dist) {
    int b = 0;
    for (size_t edge = 16; dist >= edge && b < NBUCKET - 1; edge *= 4) b++;
    return b;
}
static size_t distance_edge(int b) { return b < NBUCKET - 1 ? (size_t)16 << (2 * b) : SIZE_MAX; }  // bucket b is [edge(b-1), edge(b))

// Loss by position: the input positions [0, 64), [64, 128), [128, 256), ... up to the sequence's end.
static int position_bucket(size_t t) {
    int b = 0;
    for (size_t edge = 64; t >= edge; edge *= 2) b++;
    return b;
}
static size_t position_edge(int b, size_t seq) { return std::min(seq, (size_t)64 << b); }  // bucket b ends here

struct EvalResult {
    int nseq = 0;
    size_t seq = 0;
    double loss = 0;                           // the sequences' mean losses, summed
    std::vector<double> pos_loss, pos_tokens;  // per position bucket: token losses summed, tokens
    bool task = false;                         // the data asks for answers (answer() holds)
    std::vector<double> right, asked;          // per distance bucket: answer symbols right, asked
    double far_right = 0, far_asked = 0;       // those whose key sat in an earlier chunk
    double mean() const { return loss / std::max(nseq, 1); }
};

// Forward passes over the held-out sequences 0..nseq-1 of data (steps HELD_OUT_STEP0 + k), dealt
// out over the data-parallel replicas (replica r takes k = r, r + R, ...). Each group's rank 0
// counts its sequences' losses, every rank the tokens and answers it holds, and the sums over the
// world are what one process reports. Under ZeRO-3 every pass gathers weights from the whole
// world, so a replica whose sequences have run out runs a pass it does not count.
static EvalResult evaluate(Model* M, DataSource* data, int nseq) {
    EvalResult R;
    R.nseq = nseq, R.seq = M->run.seq;
    const Comm& cm = comm_world();
    const int npos = position_bucket(R.seq - 1) + 1;
    // summed over ranks, in one piece: per position bucket loss and tokens, per distance bucket
    // right and asked, then right and asked beyond a chunk, the losses, and whether there was a task
    std::vector<double> sums(2 * npos + 2 * NBUCKET + 4, 0.0);
    double *pos = sums.data(), *dist_acc = pos + 2 * npos, *far = dist_acc + 2 * NBUCKET, *loss_task = far + 2;
    const int passes = (nseq + cm.replicas - 1) / cm.replicas;
    for (int j = 0; j < passes; j++) {
        const int k = j * cm.replicas + cm.replica;
        if (k >= nseq && M->run.zero < 3) break;
        const uint64_t step = HELD_OUT_STEP0 + std::min(k, nseq - 1);
        read_into(M, data, step);
        const float loss = model_forward_backward(M, false);
        if (k >= nseq) continue;
        if (cm.sp_rank == 0) loss_task[0] += loss;
        for (size_t i = 0; i < M->Sl; i++) {  // local input i of chunk i / cl is global position c C + rank cl + o
            const size_t c = i / M->cl, t = c * M->C + M->run.rank * M->cl + i % M->cl;
            const int b = position_bucket(t);
            pos[2 * b] += M->token_loss[i], pos[2 * b + 1] += 1;
        }
        std::vector<size_t> ans, dist;
        if (!data->answer(step, &ans, &dist)) continue;
        loss_task[1] = 1;
        for (size_t a = 0; a < ans.size(); a++) {  // token p is predicted at input p - 1; who holds it?
            const size_t t = ans[a] - 1, c = t / M->C, o = t % M->C;
            if ((int)(o / M->cl) != M->run.rank) continue;
            int32_t truth;
            data->read(step, ans[a], 1, &truth);
            const bool right = M->preds[c * M->cl + o % M->cl] == truth;
            const int b = distance_bucket(dist[a]);
            dist_acc[2 * b] += right, dist_acc[2 * b + 1] += 1;
            if (dist[a] >= M->C && M->u > 1) far[0] += right, far[1] += 1;  // the key sat in an earlier chunk
        }
    }
    comm_allreduce(sums.data(), sums.size());
    for (int b = 0; b < npos; b++) R.pos_loss.push_back(pos[2 * b]), R.pos_tokens.push_back(pos[2 * b + 1]);
    for (int b = 0; b < NBUCKET; b++) R.right.push_back(dist_acc[2 * b]), R.asked.push_back(dist_acc[2 * b + 1]);
    R.far_right = far[0], R.far_asked = far[1];
    R.loss = loss_task[0], R.task = loss_task[1] > 0;
    return R;
}

// " | loss X" and, for a task, " | passkey P% of N | key in an earlier chunk: ... | by distance: ..."
static std::string eval_summary(const EvalResult& R) {
    char b[128];
    snprintf(b, sizeof b, " | loss %.6f", R.mean());
    std::string line = b;
    if (!R.task) return line;
    double right = 0, asked = 0;
    for (int k = 0; k < NBUCKET; k++) right += R.right[k], asked += R.asked[k];
    snprintf(b, sizeof b, " | passkey %.1f%% of %.0f", 100 * right / asked, asked), line += b;
    if (R.far_asked > 0)
        snprintf(b, sizeof b, " | key in an earlier chunk: %.1f%% of %.0f", 100 * R.far_right / R.far_asked, R.far_asked), line += b;
    line += " | by distance:";
    for (int k = 0; k < NBUCKET; k++)
        if (R.asked[k] > 0) snprintf(b, sizeof b, " %s %.0f%%", distance_names[k], 100 * R.right[k] / R.asked[k]), line += b;
    return line;
}

// ----------------------------------------------------------------------------
// The eval command

static const std::vector<std::string> eval_flags = {"init", "data", "seq", "chunk-size", "offload", "rope-theta", "rope-scale",
                                                    "eval-seqs", "csv", "needle", "seed", "device", "precision", "comm",
                                                    "doc-mask", "doc-bos", "help"};

static void eval_help() {
    printf(
        "usage: ./fpdt eval --init DIR [flags]        (P ranks: mpirun -np P ./fpdt eval ...)\n"
        "  Forward passes only, chunked and offloaded like training, at any length. Prints the mean loss\n"
        "  over held-out sequences, the loss by position (buckets that double from 64 tokens) and, for the\n"
        "  passkey task, the answers right by the distance back to their key.\n"
        "  --init DIR          the weights: a ckpt_<step>/ directory or the newest valid one in DIR\n"
        "  --data SPEC         passkey (held-out sequences) or files (their last windows; default passkey)\n"
        "  --seq S             sequence length (default: the checkpoint's training length)\n"
        "  --chunk-size C      FPDT chunk length; must divide S (default: the largest divisor up to 1024,\n"
        "                      on a GPU 16384)\n"
        "  --offload 0|1       sequence-sized tensors in host memory (default 1 when chunked)\n"
        "  --rope-theta X      RoPE base instead of the checkpoint's\n"
        "  --rope-scale F      linear RoPE position interpolation (positions / F), on top of the checkpoint's\n"
        "  --eval-seqs N       held-out sequences (default 64; --needle: per grid cell)\n"
        "  --needle            the needle grid instead: context lengths 128, 256, ... up to S (a power of\n"
        "                      two) x key depths 0%%, 10%%, ... 100%%; passkey, or a key written into a\n"
        "                      byte-level file's text\n"
        "  --csv FILE          also write the results as rows\n"
        "  --seed N            the data's seed (default: the checkpoint's run's, else 1337)\n"
        "  --device, --precision, --comm, --doc-mask, --doc-bos   as for train (--doc-mask: on for files)\n");
}

struct Eval {
    Args a;
    Manifest man;              // the checkpoint's
    std::string path;          // the checkpoint
    std::vector<float> params; // (n_params) its weights
    Config cfg;                // its model, with the RoPE flags applied
    RunCfg r;
    std::string spec, csv;
    uint64_t seed = 0;
    int nseq = 0;
    Ctx ctx;
    bool nccl = false;
};

// The model for run shape r with the checkpoint's weights (nothing else of the state is used).
static void eval_model(Eval* E, Model* M, const RunCfg& r) {
    M->ctx = E->ctx, M->nccl = E->nccl;
    model_create(M, E->cfg, r, false);
    ckpt_params_to_model(M, E->params);
}

static void eval_read_flags(Eval* E) {
    const Args& a = E->a;
    if (!a.has("init")) fatal_all("eval needs --init DIR (a checkpoint, a run's --out, or a data/hf.py import)");
    std::string err;
    E->path = init_checkpoint(a.str("init", ""), &E->man, &E->params, &err);
    fatal_any(err);
    E->cfg = E->man.cfg;
    apply_rope_flags(a, &E->cfg);
    E->spec = a.str("data", "passkey");
    E->seed = a.integer("seed", E->man.seq ? E->man.seed : 1337, 0, LLONG_MAX);
    E->nseq = (int)a.integer("eval-seqs", 64, 1, 1 << 20);
    E->csv = a.str("csv", "");
    choose_device(a, &E->ctx);
    E->nccl = choose_comm(a, E->ctx);
    RunCfg& r = E->r;
    r.P = comm_world().size, r.rank = comm_world().rank;
    if (!a.has("seq") && !E->man.seq)
        fatal_all("--init %s: an imported model has no training length: give --seq", E->path.c_str());
    r.seq = a.integer("seq", E->man.seq, 1, 1ll << 40);
    r.chunk = a.integer("chunk-size", default_chunk(r.seq, r.P, E->ctx.gpu ? 16384 : 1024), 1, 1ll << 40);
    r.offload = a.flag01("offload", r.chunk < r.seq);
    r.bf16 = precision_bf16(a, E->ctx.gpu);
    r.doc_bos = doc_bos_flags(a, E->cfg.vocab);
    err = check_shape(E->cfg, r);
    if (!err.empty()) fatal_all("%s", err.c_str());
    if (!E->csv.empty() && comm_world().rank == 0) {  // find out now, not after the passes
        FILE* f = fopen(E->csv.c_str(), "w");
        if (!f) err = "--csv " + E->csv + ": cannot open for writing: " + strerror(errno);
        else fclose(f);
    }
    fatal_any(err);
}

static void print_eval_header(const Eval* E, const Model& M, const std::string& data) {
    const Config& c = E->cfg;
    const RunCfg& r = E->r;
    log_line(true, "fpdt eval | model %s (%s, %d layers, d %d, %d/%d heads, %.2fM params) | weights %s | data %s", c.name,
             c.family == GPT ? "gpt" : "llama", c.n_layer, c.d_model, c.n_head, c.n_kv_head, M.n_params / 1e6,
             E->path.c_str(), data.c_str());
    const std::string rope = c.rope_scaling == ROPE_LINEAR ? ", positions / " + fmt_g(c.rope_factor)
                             : c.rope_scaling == ROPE_LLAMA3 ? ", llama3 scaling " + fmt_g(c.rope_factor) : "";
    log_line(true, "seq %zu | chunk %zu (%zu chunks) | offload %s | ranks %d | device %s, %s | rope theta %s%s%s", r.seq,
             r.chunk, r.seq / r.chunk, r.offload ? "on" : "off", r.P, device_name(M.ctx).c_str(), r.bf16 ? "bf16" : "fp32",
             fmt_g(c.rope_theta).c_str(), rope.c_str(), r.doc_bos >= 0 ? " | doc-mask 1: attention within documents" : "");
}

// Which sequences were read: the passkey task's held-out ones, or a file stream's last windows.
static std::string held_out_what(DataSource* data, int nseq, size_t seq) {
    FileStream* fs = dynamic_cast<FileStream*>(data);
    if (!fs) return std::to_string(nseq) + " held-out sequences";
    const uint64_t span = (uint64_t)nseq * seq;  // window j starts at N - seq - 1 - j seq (FileStream::window_start)
    if (span + 1 > fs->total)
        return std::to_string(nseq) + " windows counted back from the stream's end; they wrap around its " +
               std::to_string(fs->total) + " tokens, so training reads some of them first";
    return std::to_string(nseq) + " windows, stream tokens [" + std::to_string(fs->total - 1 - span) + ", " + std::to_string(fs->total) +
           ") of " + std::to_string(fs->total) + ": the end, which training (from the start) reads last";
}

static void write_eval_csv(const Eval* E, const EvalResult& R, size_t chunk) {
    if (E->csv.empty() || comm_world().rank != 0) return;
    FILE* f = fopen(E->csv.c_str(), "w");
    if (!f) fatal("--csv %s: cannot open for writing: %s", E->csv.c_str(), strerror(errno));
    const size_t S = R.seq;
    fprintf(f, "seq,metric,lo,hi,value,count\n");
    fprintf(f, "%zu,loss,0,%zu,%.9g,%.0f\n", S, S, R.mean(), (double)R.nseq * S);
    for (size_t b = 0; b < R.pos_loss.size(); b++)
        fprintf(f, "%zu,loss_by_position,%zu,%zu,%.9g,%.0f\n", S, b ? position_edge(b - 1, S) : 0, position_edge(b, S),
                R.pos_loss[b] / R.pos_tokens[b], R.pos_tokens[b]);
    for (int b = 0; R.task && b < NBUCKET; b++)
        if (R.asked[b] > 0)
            fprintf(f, "%zu,retrieval,%zu,%zu,%.9g,%.0f\n", S, b ? distance_edge(b - 1) : 0, std::min(distance_edge(b), S + 1),
                    R.right[b] / R.asked[b], R.asked[b]);
    if (R.far_asked > 0) fprintf(f, "%zu,retrieval_earlier_chunk,%zu,%zu,%.9g,%.0f\n", S, chunk, S + 1, R.far_right / R.far_asked, R.far_asked);
    if (fclose(f) != 0) fatal("--csv %s: cannot write: %s", E->csv.c_str(), strerror(errno));
}

// One evaluation at --seq: the mean loss, the loss by position, retrieval by distance.
static void eval_at_seq(Eval* E) {
    std::string err;
    DataSource* data = data_open(E->spec, E->cfg.vocab, E->r.seq, E->seed, &err);
    fatal_any(data ? "" : err);
    Model M;
    eval_model(E, &M, E->r);
    print_eval_header(E, M, data->describe());
    const double t0 = now_s();
    const EvalResult R = evaluate(&M, data, E->nseq);
    log_line(true, "eval | seq %zu | %s%s", E->r.seq, held_out_what(data, E->nseq, E->r.seq).c_str(), eval_summary(R).c_str());
    std::string line = "loss by position:";
    for (size_t b = 0; b < R.pos_loss.size(); b++) {
        char s[64];
        snprintf(s, sizeof s, " <%s %.4f", short_count(position_edge(b, R.seq)).c_str(), R.pos_loss[b] / R.pos_tokens[b]);
        line += s;
    }
    log_line(true, "%s", line.c_str());
    log_line(true, "done: %d sequences of %zu tokens in %.1f s", E->nseq, E->r.seq, now_s() - t0);
    write_eval_csv(E, R, M.C);
    delete data;
    model_free(&M);
}

// The needle grid: for each length L = 128, 256, ... up to --seq (chunked like --seq where L is
// longer than its chunk, else one chunk) and each depth 0%, 10%, ... 100%, the share of the key's
// symbols answered right at the end, over --eval-seqs held-out sequences.
static void eval_needle(Eval* E) {
    const size_t S = E->r.seq;
    if (S < 128 || (S & (S - 1)))
        fatal_all("eval --needle: --seq %zu: the grid's lengths are the powers of two from 128 up to --seq, so --seq must be one of them (128, 256, ...)", S);
    const bool text = E->spec != "passkey";
    if (text && E->cfg.vocab != BYTE_VOCAB)
        fatal_all("eval --needle --data %s: the needle is written with the byte vocabulary's KEY and QUERY tokens; model %s has vocab %d, not %d",
                  E->spec.c_str(), E->cfg.name, E->cfg.vocab, BYTE_VOCAB);
    std::vector<size_t> lens;
    for (size_t L = 128; L <= S; L *= 2) lens.push_back(L);
    std::vector<RunCfg> shapes;
    for (size_t L : lens) {  // every shape checked before any pass runs
        RunCfg r = E->r;
        r.seq = L, r.chunk = std::min(E->r.chunk, L), r.offload = E->r.offload && r.chunk < L;
        const std::string err = check_shape(E->cfg, r);
        if (!err.empty()) fatal_all("eval --needle: length %zu (chunk %zu): %s", L, r.chunk, err.c_str());
        shapes.push_back(r);
    }
    const int ND = 11;
    std::vector<double> acc(lens.size() * ND), asked(lens.size() * ND);
    bool header = false;
    const double t0 = now_s();
    for (size_t li = 0; li < lens.size(); li++) {
        Model M;
        eval_model(E, &M, shapes[li]);
        for (int di = 0; di < ND; di++) {
            std::string err;
            DataSource* base = data_open(E->spec, E->cfg.vocab, lens[li], E->seed, &err);
            fatal_any(base ? "" : "eval --needle: length " + std::to_string(lens[li]) + ": " + err);
            DataSource* data = base;
            if (text) data = new NeedleInText(base, E->seed, lens[li], di / 10.0);
            else static_cast<PasskeyTask*>(base)->depth = di / 10.0;
            if (!header) print_eval_header(E, M, "needle grid over " + data->describe()), header = true;
            const EvalResult R = evaluate(&M, data, E->nseq);
            double right = 0, n = 0;
            for (int b = 0; b < NBUCKET; b++) right += R.right[b], n += R.asked[b];
            acc[li * ND + di] = right / n, asked[li * ND + di] = n;
            delete data;
        }
        model_free(&M);
    }
    std::string line = "needle grid: answer symbols right (chance 10%), " + std::to_string(E->nseq) +
                       " held-out sequences a cell | depth of the key (rows) x context length (columns)";
    log_line(true, "%s", line.c_str());
    line = "depth ";
    for (size_t L : lens) line += " " + std::string(6 - std::min<size_t>(6, short_count(L).size()), ' ') + short_count(L);
    log_line(true, "%s", line.c_str());
    for (int di = 0; di < ND; di++) {
        char s[32];
        snprintf(s, sizeof s, "%4d%% ", di * 10);
        line = s;
        for (size_t li = 0; li < lens.size(); li++) snprintf(s, sizeof s, " %5.0f%%", 100 * acc[li * ND + di]), line += s;
        log_line(true, "%s", line.c_str());
    }
    log_line(true, "done: %zu x %d cells in %.1f s", lens.size(), ND, now_s() - t0);
    if (E->csv.empty() || comm_world().rank != 0) return;
    FILE* f = fopen(E->csv.c_str(), "w");
    if (!f) fatal("--csv %s: cannot open for writing: %s", E->csv.c_str(), strerror(errno));
    fprintf(f, "seq,depth,accuracy,answers\n");
    for (size_t li = 0; li < lens.size(); li++)
        for (int di = 0; di < ND; di++) fprintf(f, "%zu,%.1f,%.9g,%.0f\n", lens[li], di / 10.0, acc[li * ND + di], asked[li * ND + di]);
    if (fclose(f) != 0) fatal("--csv %s: cannot write: %s", E->csv.c_str(), strerror(errno));
}

static int cmd_eval(int argc, char** argv) {
    Eval E;
    E.a = parse_args(argc, argv, eval_flags);
    if (E.a.help) return eval_help(), 0;
    eval_read_flags(&E);
    if (E.a.has("needle")) eval_needle(&E);
    else eval_at_seq(&E);
    return 0;
}

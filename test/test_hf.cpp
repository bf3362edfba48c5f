// Pretrained Hugging Face Llama models in and out (data/hf.py), real tokenizers (data/tokenize.py),
// and starting a run from an imported model (./fpdt train --init). The fixtures are tiny random
// LlamaForCausalLM models made by test/make_hf_fixture.py with transformers: their logits, loss
// and every parameter gradient, computed by transformers, are what fpdt must reproduce.
//
// The scripts need python3 with numpy and safetensors (tokenize.py: tokenizers; the round trip
// through transformers: torch and transformers): without them the tests skip and say so.
#include <gtest/gtest.h>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include "checkpoint.h"
#include "data/data.h"
#include "schedule.h"
#include "test/cli.h"
#include "test/fixture.h"
#include "test/testutil.h"

static bool python_has(const std::string& modules) {
    static std::map<std::string, bool> known;
    if (!known.count(modules)) known[modules] = run("python3 -c 'import " + modules + "'").rc == 0;
    return known[modules];
}
#define NEED_PYTHON(modules)                                                                             \
    do {                                                                                                 \
        if (!python_has(modules)) GTEST_SKIP() << "python3 lacks " << modules << " (pip install it)";   \
    } while (0)

static std::string read_text(const std::string& path) {
    std::ifstream f(path);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

// The model configuration of a format-2 manifest, read here independently of checkpoint.h (a
// check of what data/hf.py writes), and the shard's parameters.
struct Imported {
    Config cfg{};
    std::vector<float> params;
    std::map<std::string, std::string> kv;
};
static Imported read_imported(const std::string& ckpt) {
    Imported I;
    std::istringstream in(read_text(ckpt + "/manifest.txt"));
    std::string line;
    while (std::getline(in, line)) {
        size_t sp = line.find(' ');
        if (sp != std::string::npos && !I.kv.count(line.substr(0, sp))) I.kv[line.substr(0, sp)] = line.substr(sp + 1);
    }
    auto i = [&](const char* k) { return atoi(I.kv["model." + std::string(k)].c_str()); };
    auto f = [&](const char* k) { return strtof(I.kv["model." + std::string(k)].c_str(), nullptr); };
    Config& c = I.cfg;
    snprintf(c.name, sizeof c.name, "%s", I.kv["model.name"].c_str());
    c.family = I.kv["model.family"] == "gpt" ? GPT : LLAMA;
    c.n_layer = i("n_layer"), c.d_model = i("d_model"), c.n_head = i("n_head"), c.n_kv_head = i("n_kv_head");
    c.head_dim = i("head_dim"), c.ffn = i("ffn"), c.vocab = i("vocab");
    c.rope_theta = f("rope_theta"), c.norm_eps = f("norm_eps"), c.note = "";
    c.tie_embeddings = i("tie_embeddings") != 0;
    const std::string s = I.kv["model.rope_scaling"];
    c.rope_scaling = s == "linear" ? ROPE_LINEAR : s == "llama3" ? ROPE_LLAMA3 : ROPE_NONE;
    c.rope_factor = f("rope_factor"), c.rope_low_freq_factor = f("rope_low_freq_factor");
    c.rope_high_freq_factor = f("rope_high_freq_factor"), c.rope_original_max_pos = i("rope_original_max_pos");
    I.params.resize(atoll(I.kv["n_params"].c_str()));
    FILE* fp = fopen((ckpt + "/shard_0.bin").c_str(), "rb");
    EXPECT_NE(fp, nullptr) << ckpt;
    if (fp) {
        EXPECT_EQ(fread(I.params.data(), 4, I.params.size(), fp), I.params.size());
        fclose(fp);
    }
    return I;
}

static std::string fixture_dir(const char* variant) { return std::string("test/fixtures/") + variant; }

// python3 data/hf.py import FIXTURE DIR; returns DIR/ckpt_00000000.
static std::string import_fixture(const char* variant, std::string* dir_out = nullptr) {
    const std::string d = tmpdir() + "/imported";
    Out r = run("python3 data/hf.py import " + fixture_dir(variant) + " " + d);
    EXPECT_EQ(r.rc, 0) << r.out;
    if (dir_out) *dir_out = d;
    return d + "/ckpt_00000000";
}

class HfFixture : public ::testing::TestWithParam<const char*> {};

// fpdt on the imported weights against transformers (float64, stored fp32): loss, logits and
// every gradient to 1e-4 relative, unchunked and chunked with offload (and the head and MLP in
// row blocks that leave remainders). The llama3 RoPE bands, the q/k permutation, GQA, head_dim
// != d/H and the tied or untied head all enter: any of them wrong moves the loss by 1e-2 or more.
TEST_P(HfFixture, ImportedModelMatchesTransformers) {
    NEED_PYTHON("numpy, safetensors");
    fatal_throws();
    Imported I = read_imported(import_fixture(GetParam()));
    Fixture fx;
    std::string err;
    ASSERT_TRUE(fixture_load(fixture_dir(GetParam()) + "/reference.bin", &fx, &err)) << err;
    const std::vector<int32_t>& tok = fx.find("tokens")->i;
    const size_t S = tok.size() - 1;
    const float want = fx.find("loss")->f[0];
    struct Case {
        size_t chunk;
        bool offload;
        size_t rows;
    };
    for (Case k : {Case{0, false, 0}, Case{S / 4, true, 5}, Case{S / 2, false, 0}}) {
        SCOPED_TRACE(::testing::Message() << GetParam() << " chunk " << k.chunk << " offload " << k.offload);
        RunCfg r;
        r.seq = S, r.chunk = k.chunk, r.offload = k.offload, r.head_rows = r.mlp_rows = k.rows;
        Model M;
        model_create(&M, I.cfg, r, false);
        ASSERT_EQ(M.n_params, I.params.size());
        memcpy(M.params, I.params.data(), I.params.size() * 4);
        model_set_token_arrays(&M, tok.data(), tok.data() + 1);
        std::vector<float> logits(S * I.cfg.vocab);
        M.logits_out = logits.data();
        const float loss = model_forward_backward(&M, true);
        EXPECT_NEAR(loss, want, 1e-4 * want);
        EXPECT_LT(rel_err(logits.data(), fx.find("logits")->f.data(), logits.size()), 1e-4);
        for (const ParamInfo& p : M.table) {
            const FixtureTensor* g = fx.find("grad." + p.name);
            ASSERT_NE(g, nullptr) << p.name;
            ASSERT_EQ(g->numel(), p.numel()) << p.name;
            EXPECT_LT(rel_err(M.grads + p.offset, g->f.data(), p.numel()), 1e-4) << p.name;
        }
        model_free(&M);
    }
}

// The manifest carries the whole model: what config.json said, in fpdt's fields.
TEST_P(HfFixture, ManifestCarriesTheModel) {
    NEED_PYTHON("numpy, safetensors");
    Imported I = read_imported(import_fixture(GetParam()));
    const bool tied = std::string(GetParam()) == "hf_tied";
    EXPECT_EQ(I.kv["fpdt-checkpoint"], "2");
    EXPECT_EQ(I.kv["step"], "0");
    EXPECT_EQ(I.kv["optimizer"], "0");
    EXPECT_EQ(I.kv["model.name"], GetParam());
    EXPECT_EQ(I.cfg.n_layer, 2);
    EXPECT_EQ(I.cfg.d_model, 24);
    EXPECT_EQ(I.cfg.n_head, 4);
    EXPECT_EQ(I.cfg.n_kv_head, 2);
    EXPECT_EQ(I.cfg.head_dim, 8);
    EXPECT_EQ(I.cfg.ffn, 40);
    EXPECT_EQ(I.cfg.vocab, 272);
    EXPECT_EQ(I.cfg.tie_embeddings, tied);
    EXPECT_EQ(I.cfg.rope_scaling, ROPE_LLAMA3);
    EXPECT_EQ(I.cfg.rope_factor, 4.0f);
    EXPECT_EQ(I.cfg.rope_low_freq_factor, 1.0f);
    EXPECT_EQ(I.cfg.rope_high_freq_factor, 8.0f);
    EXPECT_EQ(I.cfg.rope_original_max_pos, 1024);
    EXPECT_EQ(I.cfg.rope_theta, 10000.0f);
    EXPECT_EQ(I.cfg.norm_eps, 1e-5f);
    size_t n = 0;
    param_table(I.cfg, &n);
    EXPECT_EQ(n, I.params.size());
}

// Export of the imported step-0 checkpoint gives back every tensor of the original, bit for bit
// (and nothing else): the q/k permutation and its inverse, the stacking and the splitting.
TEST_P(HfFixture, ExportOfTheImportIsBitExact) {
    NEED_PYTHON("numpy, safetensors");
    std::string d;
    import_fixture(GetParam(), &d);
    const std::string out = tmpdir() + "/exported";
    Out e = run("python3 data/hf.py export " + d + " " + out);
    ASSERT_EQ(e.rc, 0) << e.out;
    Out c = run("python3 -c \"\nimport glob, numpy as np\nfrom safetensors.numpy import load_file\n"
                "a = load_file('" + out + "/model.safetensors')\nb = {}\n"
                "for f in glob.glob('" + fixture_dir(GetParam()) + "/*.safetensors'): b.update(load_file(f))\n"
                "diff = sorted(set(a) ^ set(b)) + [k for k in b if k in a and not (a[k].dtype == b[k].dtype and "
                "a[k].shape == b[k].shape and np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)))]\n"
                "print('differ:', diff if diff else 'none', 'of', len(b))\n\"");
    ASSERT_EQ(c.rc, 0) << c.out;
    EXPECT_NE(c.out.find("differ: none of "), std::string::npos) << c.out;
    EXPECT_EQ(number_after(c.out, "differ: none of "), std::string(GetParam()) == "hf_tied" ? 20 : 21) << c.out;
}

INSTANTIATE_TEST_SUITE_P(Variants, HfFixture, ::testing::Values("hf_tied", "hf_untied"));

// data/hf.py's vectorized FNV-1a 64 is checkpoint.h's, byte for byte, on lengths around its
// word and block edges.
TEST(HfScript, ChecksumIsCheckpointFnv1a) {
    NEED_PYTHON("numpy");
    const std::string d = tmpdir();
    for (size_t n : {0, 1, 63, 64, 65, 1000, 100003}) {
        std::vector<uint8_t> b(n);
        Rng r{n + 1};
        for (uint8_t& x : b) x = (uint8_t)rng_u64(&r);
        const std::string path = d + "/bytes";
        FILE* f = fopen(path.c_str(), "wb");
        ASSERT_NE(f, nullptr);
        if (n) fwrite(b.data(), 1, n, f);
        fclose(f);
        Out o = run("python3 -c \"import sys; sys.path.append('data'); import hf; print(hf.Fnv1a64().update(open('" + path +
                    "', 'rb').read()).hexdigest())\"");
        ASSERT_EQ(o.rc, 0) << o.out;
        char want[32];
        snprintf(want, sizeof want, "%016llx", (unsigned long long)fnv1a(0xcbf29ce484222325ull, b.data(), n));
        EXPECT_EQ(o.out.substr(0, 16), want) << n << " bytes";
    }
}

// A copy of the tied fixture in d/name with one thing changed: `python` edits c (its config.json)
// and t (its tensors) in place.
static std::string fixture_variant(const std::string& d, const std::string& name, const std::string& python) {
    const std::string v = d + "/" + name;
    Out r = run("mkdir -p " + v + " && cp " + fixture_dir("hf_tied") + "/config.json " + fixture_dir("hf_tied") +
                "/model.safetensors " + v + " && cd " + v +
                " && python3 -c \"\nimport json, numpy as np\nfrom safetensors.numpy import load_file, save_file\n"
                "c = json.load(open('config.json'))\nt = load_file('model.safetensors')\n" + python +
                "\njson.dump(c, open('config.json', 'w'))\nsave_file(t, 'model.safetensors')\n\"");
    EXPECT_EQ(r.rc, 0) << name << ": " << r.out;
    return v;
}

// Bad input to hf.py: one clear line naming the problem, a non-zero exit, nothing written.
TEST(HfScript, BadInputIsOneClearLine) {
    NEED_PYTHON("numpy, safetensors");
    const std::string d = tmpdir();
    // variants of the tied fixture, each with one thing wrong
    auto variant = [&](const std::string& name, const std::string& python) { return fixture_variant(d, name, python); };
    const std::string trunc = variant("truncated", "");
    (void)!system(("truncate -s 40000 " + trunc + "/model.safetensors").c_str());
    (void)!system(("mkdir -p " + d + "/empty").c_str());
    const std::string noweights = variant("noweights", "");
    (void)!system(("rm " + noweights + "/model.safetensors").c_str());
    struct Bad {
        std::string dir, expect;
    };
    std::vector<Bad> cases = {
        {d + "/empty", "no config.json"},
        {d + "/nosuch", "not a directory"},
        {variant("qwen", "c['architectures'] = ['Qwen2ForCausalLM']; c['model_type'] = 'qwen2'"), "architectures: Qwen2ForCausalLM"},
        {variant("attnbias", "c['attention_bias'] = True"), "attention_bias"},
        {variant("qbias", "t['model.layers.0.self_attn.q_proj.bias'] = np.zeros(32, np.float32)"), "model.layers.0.self_attn.q_proj.bias is a bias"},
        {variant("window", "c['sliding_window'] = 4096"), "sliding_window"},
        {variant("moe", "c['num_local_experts'] = 8"), "num_local_experts"},
        {variant("gelu", "c['hidden_act'] = 'gelu'"), "hidden_act"},
        {variant("yarn", "c['rope_parameters']['rope_type'] = 'yarn'"), "rope_parameters.rope_type: 'yarn'"},
        {variant("missing", "del t['model.layers.1.mlp.up_proj.weight']"), "model.layers.1.mlp.up_proj.weight is missing"},
        {variant("shape", "c['intermediate_size'] = 48"), "has shape [40, 24], config.json says [48, 24]"},
        {noweights, "no model.safetensors"},
        {trunc, "not a valid safetensors file"},
    };
    for (const Bad& c : cases) {
        const std::string out = d + "/out_" + std::to_string(&c - cases.data());
        Out r = run("python3 data/hf.py import " + c.dir + " " + out);
        EXPECT_NE(r.rc, 0) << c.dir << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.dir << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.dir << "\n" << r.out;
        EXPECT_NE(run("ls " + out + "/ckpt_00000000/manifest.txt").rc, 0) << c.dir << ": wrote a checkpoint anyway";
    }
    // export of something that is not a checkpoint, or a corrupt one, or into a sharded model's directory
    std::string imp;
    import_fixture("hf_tied", &imp);
    (void)!system(("cp -r " + imp + "/ckpt_00000000 " + d + "/corrupt && printf 'x' | dd of=" + d +
                   "/corrupt/shard_0.bin bs=1 seek=100 conv=notrunc 2>/dev/null").c_str());
    (void)!system(("cp -r " + fixture_dir("hf_untied") + " " + d + "/sharded").c_str());
    Out sh = run("python3 data/hf.py export " + imp + " " + d + "/sharded");
    EXPECT_NE(sh.rc, 0) << sh.out;
    EXPECT_NE(sh.out.find("holds model.safetensors.index.json"), std::string::npos) << sh.out;
    EXPECT_EQ(count_lines(sh.out), 1) << sh.out;
    for (const Bad& c : std::vector<Bad>{{d + "/empty", "no valid checkpoint"},
                                         {d + "/corrupt", "checksum mismatch"},
                                         {fixture_dir("hf_tied") + "/config.json", "not a format-2 checkpoint"}}) {
        Out r = run("python3 data/hf.py export " + c.dir + " " + d + "/exp");
        EXPECT_NE(run("ls " + d + "/exp/model.safetensors").rc, 0) << c.dir << ": exported anyway";
        EXPECT_NE(r.rc, 0) << c.dir << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.dir << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.dir << "\n" << r.out;
    }
}

// ----------------------------------------------------------------------------
// data/tokenize.py with a byte-level BPE trained here by `tokenizers` (no download): 260 ids, so
// that the tiny preset trains on the shard; BOS <|begin_of_text|> and EOS <|end_of_text|>.

static std::string make_tokenizer(const std::string& d) {
    Out r = run("cd " + d + " && python3 -c \"\n"
                "import random\n"
                "from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders\n"
                "t = Tokenizer(models.BPE())\n"
                "t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)\n"
                "t.decoder = decoders.ByteLevel()\n"
                "tr = trainers.BpeTrainer(vocab_size=260, special_tokens=['<|begin_of_text|>', '<|end_of_text|>'],\n"
                "                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())\n"
                "random.seed(7)\n"
                "words = ['the', 'quick', 'brown', 'fox', 'long', 'context', 'h\\u00e9llo', 'na\\u00efve', '\\u6f22\\u5b57']\n"
                "docs = [' '.join(random.choice(words) for _ in range(n)) + '\\n' for n in (300, 40, 5)]\n"
                "docs.append(''.join(random.choice(words) + random.choice([' ', '\\n', '\\n\\n', '  ']) for _ in range(250000)))\n"
                "t.train_from_iterator(docs[:3], tr)\n"
                "t.save('tokenizer.json')\n"
                "for i, doc in enumerate(docs): open('doc%d.txt' % i, 'w', encoding='utf-8', newline='').write(doc)\n"
                "print(t.get_vocab_size())\n\"");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("260"), std::string::npos) << r.out;
    return d + "/tokenizer.json";
}

static std::vector<uint32_t> read_u32_shard(const std::string& path, std::vector<int32_t>* header) {
    std::vector<uint32_t> tok;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return tok;
    header->resize(256);
    if (fread(header->data(), 4, 256, f) == 256) {
        tok.resize((*header)[2] > 0 ? (*header)[2] : 0);
        tok.resize(fread(tok.data(), 4, tok.size(), f));
    }
    fclose(f);
    return tok;
}

// The shard: llm.c's uint32 header, BOS doc EOS for every file in order (a glob's sorted), the
// ids of each document decode (--decode, from stdin) to exactly its text, including a 1.4 MB
// document read in 1 MiB pieces; --encode gives the same ids; and ./fpdt trains on it.
TEST(Tokenize, RoundTripBosEosAndAShardFpdtReads) {
    NEED_PYTHON("tokenizers");
    const std::string d = tmpdir(), tok = make_tokenizer(d);
    Out r = run("python3 data/tokenize.py --tokenizer " + d + " --piece-mb 1 " + d + "/all.bin '" + d + "/doc*.txt'");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("tokenize: 4/4 files"), std::string::npos) << r.out;  // the progress line
    std::vector<int32_t> h;
    std::vector<uint32_t> t = read_u32_shard(d + "/all.bin", &h);
    ASSERT_EQ(h.size(), 256u);
    EXPECT_EQ(h[0], 20240801);
    EXPECT_EQ(h[1], 7);
    ASSERT_EQ((size_t)h[2], t.size());
    std::vector<std::vector<uint32_t>> docs;
    for (size_t i = 0; i < t.size(); i++) {
        ASSERT_LT(t[i], 260u);
        if (t[i] == 0) docs.emplace_back();
        else if (t[i] != 1) {
            ASSERT_FALSE(docs.empty()) << "the shard does not start with BOS";
            docs.back().push_back(t[i]);
        } else {
            ASSERT_TRUE(i + 1 == t.size() || t[i + 1] == 0) << "EOS not followed by BOS at " << i;
        }
    }
    ASSERT_EQ(docs.size(), 4u);
    EXPECT_EQ(t.back(), 1u);
    for (size_t k = 0; k < docs.size(); k++) {
        const std::string ids = d + "/ids" + std::to_string(k) + ".txt";
        std::ofstream f(ids);
        for (uint32_t x : docs[k]) f << x << ' ';
        f.close();
        Out dec = run("python3 data/tokenize.py --tokenizer " + tok + " --decode - < " + ids + " > " + ids + ".out");
        ASSERT_EQ(dec.rc, 0) << dec.out;
        const std::string want = read_text(d + "/doc" + std::to_string(k) + ".txt");
        EXPECT_GT(want.size(), 0u);
        EXPECT_TRUE(read_text(ids + ".out") == want + "\n") << "document " << k << " did not round-trip";
    }
    EXPECT_GT(read_text(d + "/doc3.txt").size(), (size_t)1 << 20);  // really more than one piece
    Out enc = run("python3 data/tokenize.py --tokenizer " + tok + " --encode \"$(cat " + d + "/doc2.txt)\"");
    ASSERT_EQ(enc.rc, 0) << enc.out;
    std::string want = "0";
    for (uint32_t x : docs[2]) want += "," + std::to_string(x);
    EXPECT_EQ(enc.out, want.substr(0, want.rfind(',')) + "\n") << "(--encode of the text less its last newline)";
    Out train = run("./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --steps 2 --data " + d + "/all.bin");
    ASSERT_EQ(train.rc, 0) << train.out;
    EXPECT_EQ(losses(train.out).size(), 2u) << train.out;
    EXPECT_NE(train.out.find("1 shard, " + std::to_string(t.size()) + " tokens"), std::string::npos) << train.out;
}

TEST(Tokenize, BadInputIsOneClearLine) {
    NEED_PYTHON("tokenizers");
    const std::string d = tmpdir(), tok = make_tokenizer(d);
    (void)!system(("printf 'not json' > " + d + "/bad.json && printf '\\377\\376' > " + d + "/latin.txt").c_str());
    const std::string T = "python3 data/tokenize.py --tokenizer " + tok + " ";
    struct Bad {
        std::string args, expect;
    };
    for (const Bad& c : std::vector<Bad>{
             {"python3 data/tokenize.py --tokenizer " + d + "/none.json out.bin x", "no such file"},
             {"python3 data/tokenize.py --tokenizer " + d + "/bad.json " + d + "/o.bin " + d + "/doc0.txt", "not a tokenizer.json"},
             {"python3 data/tokenize.py --tokenizer /tmp " + d + "/o.bin " + d + "/doc0.txt", "no tokenizer.json in that directory"},
             {T + d + "/o.bin " + d + "/missing.txt", "missing.txt: no such file"},
             {T + d + "/o.bin '" + d + "/*.none'", "no files match"},
             {T + d + "/o.txt " + d + "/doc0.txt", "must end in .bin"},
             {T + d + "/o.bin " + d + "/latin.txt", "not UTF-8"},
             {T + d + "/o.bin", "needs OUT.bin and at least one input"},
             {T + "--decode '1 2 x'", "'x' is not a token id"},
             {T + "--decode '1 999'", "id 999 is outside the vocab of 260"},
             {T + "--bos '<nope>' " + d + "/o.bin " + d + "/doc0.txt", "--bos <nope>"},
         }) {
        Out r = run(c.args);
        EXPECT_NE(r.rc, 0) << c.args << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.args << "\n" << r.out;
    }
    EXPECT_NE(run("ls " + d + "/o.bin").rc, 0) << "a failed run left a shard";
}

// ----------------------------------------------------------------------------
// The RoPE flags change the model (a base or an interpolation factor of 1 changes nothing), and
// sample's prompt ids: bytes models keep printing text, --ids 1 prints ids, bad ids are one line.

TEST(RopeFlags, ChangeTheLossAndCheckTheirValues) {
    const std::string T = "./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --steps 2 ";
    Out base = run(T), same = run(T + "--rope-theta 10000 --rope-scale 1"), theta = run(T + "--rope-theta 500000"),
        scale = run(T + "--rope-scale 4");
    for (const Out* o : {&base, &same, &theta, &scale}) ASSERT_EQ(o->rc, 0) << o->out;
    EXPECT_EQ(loss_lines(same.out), loss_lines(base.out));
    EXPECT_NE(losses(theta.out)[1], losses(base.out)[1]);
    EXPECT_NE(losses(scale.out)[1], losses(base.out)[1]);
    EXPECT_NE(losses(scale.out)[1], losses(theta.out)[1]);
    for (const char* bad : {"--rope-theta 0.5", "--rope-scale 0.5", "--rope-scale x"}) {
        Out r = run(T + bad);
        EXPECT_NE(r.rc, 0) << bad;
        EXPECT_NE(r.out.find(std::string(bad).substr(0, 12)), std::string::npos) << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
    }
}

TEST(Sample, PromptIdsAndIdsOutput) {
    const std::string d = tmpdir();
    Out t = run("./fpdt train --device cpu --model tiny --eval-every 0 --seq 64 --steps 2 --out " + d);
    ASSERT_EQ(t.rc, 0) << t.out;
    Out text = run("./fpdt sample --out " + d + " --prompt ab --tokens 6");
    Out ids = run("./fpdt sample --out " + d + " --prompt-ids 256,97,98 --tokens 6 --ids 1");
    ASSERT_EQ(text.rc, 0) << text.out;
    ASSERT_EQ(ids.rc, 0) << ids.out;
    EXPECT_EQ(text.out.substr(0, 2), "ab");
    // the same generation, as ids: the prompt, then one id per token
    std::istringstream in(ids.out);
    std::vector<int> v;
    for (int x; in >> x;) v.push_back(x);
    ASSERT_EQ(v.size(), 9u) << ids.out;
    EXPECT_EQ(v[0], 256);
    EXPECT_EQ(v[1], 97);
    EXPECT_EQ(v[2], 98);
    std::string decoded = "ab";
    for (size_t i = 3; i < v.size(); i++) decoded += decode_token(v[i]);
    EXPECT_EQ(text.out, decoded + "\n");
    for (const char* bad : {" --prompt-ids 256,x", " --prompt-ids 256,260", " --prompt-ids ,", " --prompt a --prompt-ids 1"}) {
        Out r = run("./fpdt sample --out " + d + bad);
        EXPECT_NE(r.rc, 0) << bad;
        EXPECT_NE(r.out.find("--prompt"), std::string::npos) << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
    }
}

// ----------------------------------------------------------------------------
// ./fpdt train --init: the imported model as a real run starts it, on one process and two.

// An llm.c uint32 shard of these tokens.
static void write_u32_shard(const std::string& path, const std::vector<int32_t>& tok) {
    std::vector<int32_t> h(256, 0);
    h[0] = 20240801, h[1] = 7, h[2] = (int32_t)tok.size();
    FILE* f = fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    fwrite(h.data(), 4, 256, f);
    fwrite(tok.data(), 4, tok.size(), f);
    fclose(f);
}

static const std::string INIT_RUN = "./fpdt train --device cpu --precision fp32 --eval-every 0 --seq 64 ";

// Step 1 of `--init` on the fixture's tokens with --lr 0 prints transformers' loss, and its summed
// gradient (the FPDT_TEST_GRADS_OUT hook, --clip 0) is transformers' gradient, to 1e-4: unchunked,
// chunked with offload, and over 2 ranks (Ulysses: 2 of the 4 query heads and 1 of the 2 kv heads
// each) with ZeRO-1 off.
TEST_P(HfFixture, InitStepOneMatchesTransformersOnOneAndTwoRanks) {
    NEED_PYTHON("numpy, safetensors");
    std::string d;
    const std::string ckpt = import_fixture(GetParam(), &d);
    Imported I = read_imported(ckpt);
    Fixture fx;
    std::string err;
    ASSERT_TRUE(fixture_load(fixture_dir(GetParam()) + "/reference.bin", &fx, &err)) << err;
    const std::string t = tmpdir(), shard = t + "/tokens.bin", grads = t + "/grads.bin";
    write_u32_shard(shard, fx.find("tokens")->i);
    const float want = fx.find("loss")->f[0];
    struct How {
        std::string launch, chunking;
        bool grads;  // ZeRO-1 leaves each rank a shard of the gradient: the loss alone is checked
    };
    const std::string two = mpirun(2) + "-x OMP_NUM_THREADS=1 -x FPDT_TEST_GRADS_OUT ";
    for (const How& h : {How{"", "", true}, How{"", "--chunk-size 16 --offload 1 ", true},
                         How{two, "--chunk-size 16 --offload 1 ", true}, How{two, "--chunk-size 32 --zero 1 ", false}}) {
        const std::string how = h.launch, chunking = h.chunking;
        remove(grads.c_str());
        Out r = run("OMP_NUM_THREADS=1 FPDT_TEST_GRADS_OUT=" + grads + " " + how + INIT_RUN + chunking + "--init " + d +
                    " --steps 1 --lr 0 --clip 0 --data " + shard);
        SCOPED_TRACE(how + chunking);
        ASSERT_EQ(r.rc, 0) << r.out;
        EXPECT_NE(r.out.find("weights from " + ckpt), std::string::npos) << r.out;
        std::vector<double> l = losses(r.out);
        ASSERT_EQ(l.size(), 1u) << r.out;
        EXPECT_NEAR(l[0], want, 1e-4 * want) << r.out;
        if (!h.grads) continue;
        std::vector<float> g(I.params.size());
        FILE* f = fopen(grads.c_str(), "rb");
        ASSERT_NE(f, nullptr) << "no gradient written\n" << r.out;
        EXPECT_EQ(fread(g.data(), 4, g.size(), f), g.size());
        fclose(f);
        size_t n = 0;
        for (const ParamInfo& p : param_table(I.cfg, &n)) {
            const FixtureTensor* ref = fx.find("grad." + p.name);
            ASSERT_NE(ref, nullptr) << p.name;
            EXPECT_LT(rel_err(g.data() + p.offset, ref->f.data(), p.numel()), 1e-4) << p.name;
        }
    }
}

// transformers' loss (float32 model, eager attention) on the window of 65 tokens from `start` of
// a uint32 shard, for the model in hf_dir.
static double transformers_loss(const std::string& hf_dir, const std::string& shard, size_t start) {
    Out p = run("python3 -c \"\nimport numpy as np, torch, transformers\n"
                "m = transformers.AutoModelForCausalLM.from_pretrained('" + hf_dir + "', attn_implementation='eager').float()\n"
                "t = torch.tensor(np.fromfile('" + shard + "', dtype='<u4', offset=1024).astype(np.int64)[" +
                std::to_string(start) + ":" + std::to_string(start + 65) + "])\n"
                "with torch.no_grad():\n"
                "    z = m(t[None, :64]).logits[0]\n"
                "print('loss %.6f' % torch.nn.functional.cross_entropy(z.double(), t[1:]).item())\n\" 2>&1 | grep -v Warning");
    EXPECT_EQ(p.rc, 0) << p.out;
    EXPECT_NE(p.out.find("loss "), std::string::npos) << p.out;
    return number_after(p.out, "loss ");
}

// Where torch and transformers are installed: train a few steps from the import, export the
// checkpoint after step 3, load it with AutoModelForCausalLM, and its loss on step 4's window is
// the loss fpdt printed for step 4 (computed from the same weights).
TEST_P(HfFixture, ExportAfterTrainingGivesFpdtsLossInTransformers) {
    NEED_PYTHON("numpy, safetensors");
    if (!python_has("torch, transformers")) GTEST_SKIP() << "python3 lacks torch and transformers: the round trip through transformers is not checked";
    std::string d;
    import_fixture(GetParam(), &d);
    const std::string t = tmpdir(), shard = t + "/tokens.bin", out = t + "/run", hf = t + "/hf";
    std::vector<int32_t> tok(64 * 6 + 1);
    Rng rng{99};
    for (int32_t& x : tok) x = (int32_t)(rng_u64(&rng) % 272);
    write_u32_shard(shard, tok);
    Out r = run(INIT_RUN + "--init " + d + " --steps 4 --lr 1e-2 --warmup 0 --save-every 3 --data " + shard + " --out " + out);
    ASSERT_EQ(r.rc, 0) << r.out;
    std::vector<double> l = losses(r.out);
    ASSERT_EQ(l.size(), 4u) << r.out;
    EXPECT_LT(l[3], l[0]) << "training did not move the weights: " << r.out;
    Out e = run("python3 data/hf.py export " + out + "/ckpt_00000003 " + hf);
    ASSERT_EQ(e.rc, 0) << e.out;
    const size_t start = 3 * 64 % (tok.size() - 64);  // data/data.h: step k's window starts at k S mod (N - S)
    EXPECT_NEAR(transformers_loss(hf, shard, start), l[3], 1e-4 * l[3]) << r.out;
}

// Context extension: a model without RoPE scaling, fine-tuned with --rope-theta and --rope-scale
// (linear interpolation), exports rope_theta and a linear rope_scaling that transformers applies
// as fpdt did: the same loss after training.
TEST(HfScript, RopeFlagsExportToTransformers) {
    NEED_PYTHON("numpy, safetensors");
    if (!python_has("torch, transformers")) GTEST_SKIP() << "python3 lacks torch and transformers: the round trip through transformers is not checked";
    const std::string t = tmpdir(), plain = t + "/plain", d = t + "/imp", shard = t + "/tokens.bin", out = t + "/run", hf = t + "/hf";
    Out v = run("mkdir -p " + plain + " && cp " + fixture_dir("hf_tied") + "/* " + plain + " && cd " + plain +
                " && python3 -c \"\nimport json\nc = json.load(open('config.json'))\n"
                "c['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 10000.0}\njson.dump(c, open('config.json', 'w'))\n\"");
    ASSERT_EQ(v.rc, 0) << v.out;
    Out i = run("python3 data/hf.py import " + plain + " " + d);
    ASSERT_EQ(i.rc, 0) << i.out;
    EXPECT_NE(i.out.find("rope none"), std::string::npos) << i.out;
    std::vector<int32_t> tok(64 * 6 + 1);
    Rng rng{17};
    for (int32_t& x : tok) x = (int32_t)(rng_u64(&rng) % 272);
    write_u32_shard(shard, tok);
    Out r = run(INIT_RUN + "--init " + d + " --rope-theta 20000 --rope-scale 2 --steps 3 --lr 1e-2 --warmup 0 --save-every 2 --data " +
                shard + " --out " + out);
    ASSERT_EQ(r.rc, 0) << r.out;
    std::vector<double> l = losses(r.out);
    ASSERT_EQ(l.size(), 3u) << r.out;
    Out e = run("python3 data/hf.py export " + out + "/ckpt_00000002 " + hf + " && grep -A 3 rope " + hf + "/config.json");
    ASSERT_EQ(e.rc, 0) << e.out;
    EXPECT_NE(e.out.find("\"rope_theta\": 20000"), std::string::npos) << e.out;
    EXPECT_NE(e.out.find("\"linear\""), std::string::npos) << e.out;
    const double hl = transformers_loss(hf, shard, 2 * 64 % (tok.size() - 64));
    EXPECT_NEAR(hl, l[2], 1e-4 * l[2]) << r.out;
    // and without the flags the loss differs: they really changed the model
    Out p = run(INIT_RUN + "--init " + d + " --steps 3 --lr 1e-2 --warmup 0 --data " + shard);
    ASSERT_EQ(p.rc, 0) << p.out;
    EXPECT_GT(fabs(losses(p.out)[2] - l[2]), 1e-3) << p.out << r.out;
}

// --init's rules: --model must agree (naming the field that does not), a bad DIR is one line,
// an imported model cannot be --resume'd itself, and --init with --out and --resume continues a
// run exactly (a time-boxed job restarted with the same flags).
TEST(Init, ModelMustAgreeAndResumeContinues) {
    NEED_PYTHON("numpy, safetensors");
    std::string d;
    import_fixture("hf_tied", &d);
    const std::string t = tmpdir(), shard = t + "/tokens.bin";
    std::vector<int32_t> tok(64 * 4 + 1);
    Rng rng{5};
    for (int32_t& x : tok) x = (int32_t)(rng_u64(&rng) % 272);
    write_u32_shard(shard, tok);
    const std::string R = INIT_RUN + "--steps 3 --data " + shard + " ";
    struct Bad {
        std::string args, expect;
    };
    for (const Bad& c : std::vector<Bad>{
             {R + "--init " + d + " --model tiny", "--model tiny disagrees with --init " + d + "/ckpt_00000000: model.d_model is 24 there, 64 in the preset"},
             {R + "--init " + t + "/nosuch", "--init " + t + "/nosuch: no such directory"},
             {R + "--init " + t, "no valid checkpoint"},
             {R + "--init " + d + " --resume --out " + d, "holds parameters only"},
             {R + "--init " + d + " --rope-scale 2", "already uses llama3 RoPE scaling"},
         }) {
        Out r = run(c.args);
        EXPECT_NE(r.rc, 0) << c.args << "\n" << r.out;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(count_lines(r.out), 1) << c.args << "\n" << r.out;
    }
    // bf16 works from an import too: within bf16's rounding of the fp32 run's first loss
    Out f32 = run(R + "--init " + d + " --steps 1"), b16 = run(R + "--init " + d + " --steps 1 --precision bf16");
    ASSERT_EQ(f32.rc, 0) << f32.out;
    ASSERT_EQ(b16.rc, 0) << b16.out;
    ASSERT_EQ(losses(b16.out).size(), 1u) << b16.out;
    EXPECT_NEAR(losses(b16.out)[0], losses(f32.out)[0], 5e-3 * losses(f32.out)[0]);
    EXPECT_NE(b16.out.find("bf16"), std::string::npos) << b16.out;
    Out whole = run(R + "--init " + d);
    Out part = run(R + "--init " + d + " --out " + t + "/o --exit-after 2");
    Out rest = run(R + "--init " + d + " --out " + t + "/o --resume");
    for (const Out* o : {&whole, &part, &rest}) ASSERT_EQ(o->rc, 0) << o->out;
    std::vector<std::string> a = loss_lines(whole.out), b = loss_lines(part.out), c = loss_lines(rest.out);
    b.insert(b.end(), c.begin(), c.end());
    EXPECT_EQ(a, b);
    // the run's checkpoints carry the imported model, and sample builds it from them (ids out)
    Out s = run("./fpdt sample --out " + t + "/o --prompt-ids 1,2,3 --tokens 4");
    ASSERT_EQ(s.rc, 0) << s.out;
    EXPECT_EQ(s.out.substr(0, 6), "1 2 3 ") << s.out;
    std::istringstream in(s.out);
    int x, n = 0;
    while (in >> x) {
        n++;
        EXPECT_LT(x, 272);
    }
    EXPECT_EQ(n, 7) << s.out;
    Out bytes = run("./fpdt sample --out " + t + "/o --prompt hello");
    EXPECT_NE(bytes.rc, 0);
    EXPECT_NE(bytes.out.find("--prompt-ids"), std::string::npos) << bytes.out;
}

// ----------------------------------------------------------------------------
// The Python tools fail as carefully as ./fpdt (issue 24): any failure is one line `hf.py: ...` /
// `tokenize.py: ...` and a non-zero exit, never a traceback or a hang; a config or manifest field
// of the wrong type or outside fpdt's limits is refused before anything is read or allocated;
// every input must be a regular file; nothing half-written is left behind.

// r is a failure of `tool` told in one line holding `expect`, within the time limit.
static void expect_one_line(const Out& r, const std::string& tool, const std::string& expect, const std::string& what) {
    EXPECT_NE(r.rc, 124) << what << ": hung";
    EXPECT_NE(r.rc, 0) << what << "\n" << r.out;
    EXPECT_EQ(r.out.rfind(tool + ": ", 0), 0u) << what << "\n" << r.out;
    EXPECT_NE(r.out.find(expect), std::string::npos) << what << "\n" << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << what << "\n" << r.out;
}
// No temporary (*.tmp) anywhere under dir.
static bool no_tmp_left(const std::string& dir) { return run("find " + dir + " -name '*.tmp*'").out.empty(); }

// The tied fixture with `from` replaced by `to` in its config.json (no Python needed to make it).
static std::string config_variant(const std::string& d, const std::string& name, const std::string& from, const std::string& to) {
    const std::string v = d + "/" + name;
    std::string text = read_text(fixture_dir("hf_tied") + "/config.json");
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) text.replace(at, from.size(), to);
    EXPECT_EQ(run("mkdir -p " + v + " && cp " + fixture_dir("hf_tied") + "/model.safetensors " + v).rc, 0);
    std::ofstream(v + "/config.json") << text;
    return v;
}

// DIR/ckpt_<step> holding m's manifest and, unless sparse_bytes, these parameters (the checksum
// made right); with sparse_bytes a sparse shard of that size (nothing read before it is refused).
static void write_checkpoint_dir(const std::string& dir, Manifest m, const std::vector<float>& params, uint64_t sparse_bytes = 0) {
    char name[32];
    snprintf(name, sizeof name, "/ckpt_%08llu", (unsigned long long)m.step);
    const std::string c = dir + name;
    ASSERT_EQ(run("mkdir -p " + c).rc, 0);
    const uint64_t n = sparse_bytes ? m.n_params : params.size();
    m.n_params = n, m.optimizer = 0;
    m.shards = {{0, n, sparse_bytes ? 0 : fnv1a(FNV_OFFSET, params.data(), params.size() * 4)}};
    std::ofstream(c + "/manifest.txt") << manifest_text(m);
    std::ofstream f(c + "/shard_0.bin", std::ios::binary);
    f.write((const char*)params.data(), params.size() * 4);
    f.close();
    if (sparse_bytes) {
        ASSERT_EQ(truncate((c + "/shard_0.bin").c_str(), (off_t)sparse_bytes), 0);
    }
}

TEST(HfScript, ImportFailuresAreOneLineAndLeaveNothing) {
    NEED_PYTHON("numpy, safetensors");
    const std::string d = tmpdir(), v = d + "/victim";
    ASSERT_EQ(run("mkdir -p " + v + " && echo keep > " + v + "/precious.txt && echo x > " + d + "/afile").rc, 0);
    const std::string index = d + "/index", fifo = d + "/fifo", fifocfg = d + "/fifocfg";
    ASSERT_EQ(run("mkdir -p " + index + " " + fifo + " " + fifocfg + " && cp " + fixture_dir("hf_tied") + "/config.json " +
                  index + " && cp " + fixture_dir("hf_tied") + "/config.json " + fifo +
                  " && echo '{\"weight_map\": [\"a\"]}' > " + index + "/model.safetensors.index.json && mkfifo " + fifo +
                  "/model.safetensors && mkfifo " + fifocfg + "/config.json").rc, 0);
    struct Case {
        std::string dir, out, expect;
    };
    const std::string out = d + "/out";
    const std::string nan = fixture_variant(d, "nan", "t['model.norm.weight'][3] = np.nan");
    const std::vector<Case> cases = {
        {config_variant(d, "kvstr", "\"num_key_value_heads\": 2", "\"num_key_value_heads\": \"2\""), out, "num_key_value_heads: '2' is not a whole number"},
        {config_variant(d, "ropestr", "\"rope_parameters\": {", "\"rope_scaling\": \"linear\", \"unused\": {"), out, "rope_scaling: 'linear' is not an object"},
        {config_variant(d, "epsstr", "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": \"abc\""), out, "rms_norm_eps: 'abc' is not a finite number"},
        {config_variant(d, "eps0", "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0"), out, "rms_norm_eps: 0: must be a positive number"},
        {config_variant(d, "epsneg", "\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": -1e-05"), out, "rms_norm_eps: -1e-05: must be a positive"},
        {config_variant(d, "tiestr", "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": \"false\""), out, "tie_word_embeddings: 'false' is not true or false"},
        {config_variant(d, "huge", "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000"), out, "num_hidden_layers: 1000000000 is out of range (fpdt takes 1 to 4096)"},
        {config_variant(d, "l4097", "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 4097"), out, "num_hidden_layers: 4097 is out of range"},
        {config_variant(d, "wide", "\"vocab_size\": 272", "\"vocab_size\": 16777216, \"hidden_size\": 32768"), out,
         "importing tensor wte (549755813888 values; read, converted and written) needs "},
        {index, out, "weight_map: ['a'] is not an object"},
        {fifo, out, fifo + "/model.safetensors: not a regular file (a FIFO)"},
        {fifocfg, out, fifocfg + "/config.json: not a regular file (a FIFO)"},
        {nan, out, "tensor lnf_w has non-finite values"},
        {fixture_variant(d, "inf", "t['model.layers.0.mlp.up_proj.weight'][0, 0] = np.inf"), out, "tensor h.0.fc_w has non-finite values"},
        {fixture_variant(d, "i32", "t['model.norm.weight'] = np.ones(24, np.int32)"), out, "tensor model.norm.weight has dtype I32"},
        {nan, d + "/afile", d + "/afile: not a directory"},
        {nan, d + "/afile/under", "cannot create " + d + "/afile/under: Not a directory"},
        {nan, "/proc/fpdt_hf_test", "cannot create /proc/fpdt_hf_test"},
    };
    for (const Case& c : cases) {
        Out r = run("timeout 60 python3 data/hf.py import " + c.dir + " " + c.out);
        expect_one_line(r, "hf.py", c.expect, c.dir + " -> " + c.out);
        EXPECT_NE(access((c.out + "/ckpt_00000000").c_str(), F_OK), 0) << c.dir << ": wrote a checkpoint anyway";
    }
    EXPECT_TRUE(no_tmp_left(d)) << run("find " + d + " -name '*.tmp*'").out;
    // a full disk (a file-size limit: Python ignores SIGXFSZ) names the file it could not write
    Out full = run("ulimit -f 40; python3 data/hf.py import " + fixture_dir("hf_tied") + " " + out);
    expect_one_line(full, "hf.py", "cannot write " + out + "/ckpt_00000000.tmp/shard_0.bin: File too large", "ulimit -f");
    EXPECT_TRUE(no_tmp_left(out));
    // a link where the temporary goes is refused, and nothing it points to is touched
    ASSERT_EQ(symlink(v.c_str(), (out + "/ckpt_00000000.tmp").c_str()), 0);
    Out link = run("python3 data/hf.py import " + fixture_dir("hf_tied") + " " + out);
    expect_one_line(link, "hf.py", out + "/ckpt_00000000.tmp: a symbolic link where this tool writes its temporary", "link");
    EXPECT_EQ(read_text(v + "/precious.txt"), "keep\n");
    // --debug: the traceback too, then the same line
    Out dbg = run("python3 data/hf.py import " + d + "/kvstr " + out + " --debug");
    EXPECT_NE(dbg.out.find("Traceback"), std::string::npos) << dbg.out;
    EXPECT_NE(dbg.out.find("hf.py: " + d + "/kvstr/config.json: num_key_value_heads: '2' is not a whole number\n"), std::string::npos) << dbg.out;
}

TEST(HfScript, ExportFailuresAreOneLineAndLeaveNothing) {
    NEED_PYTHON("numpy, safetensors");
    std::string imp;
    import_fixture("hf_tied", &imp);
    const std::string d = tmpdir(), ckpt = imp + "/ckpt_00000000", out = d + "/exp";
    ASSERT_EQ(run("echo x > " + d + "/afile && mkdir -p " + d + "/dirthere/model.safetensors").rc, 0);
    Manifest m;
    ASSERT_EQ(read_manifest(ckpt, &m), "");
    std::vector<float> params(m.n_params);
    {
        std::ifstream f(ckpt + "/shard_0.bin", std::ios::binary);
        f.read((char*)params.data(), params.size() * 4);
    }
    // a checkpoint with a NaN weight, checksums right; one re-signed with 10^8 layers; a forged one
    // of 2.7e11 parameters over a sparse shard
    std::vector<float> bad = params;
    bad[7] = NAN;
    write_checkpoint_dir(d + "/nan", m, bad);
    Manifest deep = m;
    deep.cfg.n_layer = 100000000;
    write_checkpoint_dir(d + "/deep", deep, params);
    Manifest huge = m;
    huge.cfg.vocab = 1 << 24, huge.cfg.d_model = 1 << 14, huge.cfg.n_head = huge.cfg.n_kv_head = 128, huge.cfg.head_dim = 128;
    huge.cfg.ffn = 64, huge.cfg.n_layer = 1, huge.cfg.tie_embeddings = true;
    size_t n = 0;
    param_table(huge.cfg, &n);
    huge.n_params = n;
    write_checkpoint_dir(d + "/huge", huge, {}, (uint64_t)n * 4);
    ASSERT_EQ(run("mkdir -p " + d + "/fifo/ckpt_00000001 && mkfifo " + d + "/fifo/ckpt_00000001/manifest.txt").rc, 0);
    struct Case {
        std::string ckpt, out, expect;
    };
    for (const Case& c : std::vector<Case>{
             {d + "/nan/ckpt_00000000", out, "tensor model.embed_tokens.weight has non-finite values"},
             {d + "/deep/ckpt_00000000", out, "model.n_layer '100000000' (expected a whole number from 1 to 4096)"},
             {d + "/huge/ckpt_00000000", out, "exporting " + std::to_string(n) + " parameters needs "},
             {d + "/fifo/ckpt_00000001", out, "manifest.txt: not a regular file (a FIFO)"},
             {ckpt, d + "/afile", d + "/afile: not a directory"},
             {ckpt, d + "/afile/under", "cannot create " + d + "/afile/under: Not a directory"},
             {ckpt, "/proc/fpdt_hf_test", "cannot create /proc/fpdt_hf_test"},
             {ckpt, d + "/dirthere", d + "/dirthere/model.safetensors: a directory is there; only a regular file is replaced"},
         }) {
        Out r = run("timeout 60 python3 data/hf.py export " + c.ckpt + " " + c.out);
        expect_one_line(r, "hf.py", c.expect, c.ckpt + " -> " + c.out);
        EXPECT_NE(access((c.out + "/config.json").c_str(), F_OK), 0) << c.ckpt << ": exported anyway";
    }
    Out full = run("ulimit -f 40; python3 data/hf.py export " + ckpt + " " + out);
    expect_one_line(full, "hf.py", "cannot write " + out + "/model.safetensors.tmp: ", "ulimit -f");
    EXPECT_TRUE(no_tmp_left(d)) << run("find " + d + " -name '*.tmp*'").out;
    EXPECT_NE(access((out + "/config.json").c_str(), F_OK), 0);
    // in a directory of checkpoints: a link named like one, and a copy whose manifest is of
    // another step, are skipped with a line each, and the valid one is exported
    ASSERT_EQ(run("cp -r " + ckpt + " " + imp + "/ckpt_00000003 && ln -s " + d + "/nan/ckpt_00000000 " + imp + "/ckpt_00000005").rc, 0);
    Out skip = run("python3 data/hf.py export " + imp + " " + out);
    EXPECT_EQ(skip.rc, 0) << skip.out;
    EXPECT_NE(skip.out.find("hf.py: warning: skipping " + imp + "/ckpt_00000005: a symbolic link, not a checkpoint directory"),
              std::string::npos) << skip.out;
    EXPECT_NE(skip.out.find("skipping " + imp + "/ckpt_00000003: its manifest is of step 0, its name says step 3"), std::string::npos) << skip.out;
    EXPECT_NE(skip.out.find("from " + imp + "/ckpt_00000000 (step 0"), std::string::npos) << skip.out;
}

// tokenize.py: the output in a missing folder, where a folder of its name is, onto a full disk
// (the output named, not an input), through a link; FIFOs as the input, the tokenizer or its config.
TEST(Tokenize, EveryFailureIsOneLineAndLeavesNothing) {
    NEED_PYTHON("tokenizers");
    const std::string d = tmpdir(), tok = make_tokenizer(d), v = d + "/victim";
    ASSERT_EQ(run("mkdir -p " + d + "/o.bin " + d + "/fifotok " + d + "/fifocfg " + v + " && echo keep > " + v +
                  "/precious.txt && mkfifo " + d + "/in.fifo " + d + "/fifotok/tokenizer.json " + d +
                  "/fifocfg/tokenizer_config.json && cp " + tok + " " + d + "/fifocfg/ && ln -s " + v +
                  "/precious.txt " + d + "/l.bin.tmp").rc, 0);
    const std::string T = "timeout 60 python3 data/tokenize.py --tokenizer " + tok + " ", doc = " " + d + "/doc0.txt";
    struct Bad {
        std::string args, expect;
    };
    for (const Bad& c : std::vector<Bad>{
             {T + d + "/nodir/x.bin" + doc, "cannot write " + d + "/nodir/x.bin.tmp: No such file or directory"},
             {T + d + "/o.bin" + doc, d + "/o.bin: a directory is there; only a regular file is replaced"},
             {T + d + "/l.bin" + doc, d + "/l.bin.tmp: a symbolic link where this tool writes its temporary"},
             {T + d + "/x.bin " + d + "/in.fifo", d + "/in.fifo: not a regular file (a FIFO)"},
             {"timeout 60 python3 data/tokenize.py --tokenizer " + d + "/fifotok " + d + "/x.bin" + doc, "tokenizer.json: not a regular file (a FIFO)"},
             {"timeout 60 python3 data/tokenize.py --tokenizer " + d + "/fifocfg " + d + "/x.bin" + doc, "tokenizer_config.json: not a regular file (a FIFO)"},
             {T + "--piece-mb x " + d + "/x.bin" + doc, "--piece-mb: invalid int value: 'x'"},
             {"ulimit -f 100; " + T + d + "/x.bin " + d + "/doc3.txt", "cannot write " + d + "/x.bin.tmp: File too large"},
         }) {
        Out r = run(c.args);
        expect_one_line(r, "tokenize.py", c.expect, c.args);
    }
    EXPECT_EQ(read_text(v + "/precious.txt"), "keep\n");
    EXPECT_NE(access((d + "/x.bin").c_str(), F_OK), 0);
    EXPECT_EQ(run("find " + d + " -name '*.tmp*' ! -name l.bin.tmp").out, "");
}

// A read-only filesystem and a full one (small tmpfs mounts: root only, skipped otherwise): each
// tool's output fails in one line naming it and leaves nothing.
TEST(HfScript, ReadOnlyAndFullFilesystems) {
    NEED_PYTHON("numpy, safetensors, tokenizers");
    std::string imp;
    import_fixture("hf_tied", &imp);
    const std::string d = tmpdir(), tok = make_tokenizer(d), ro = d + "/ro", full = d + "/full";
    ASSERT_EQ(run("mkdir -p " + ro + " " + full).rc, 0);
    if (run("mount -t tmpfs -o ro,size=1m tmpfs " + ro + " && mount -t tmpfs -o size=48k tmpfs " + full).rc != 0) {
        run("umount " + ro);
        GTEST_SKIP() << "cannot mount a small tmpfs here";
    }
    struct Bad {
        std::string args, tool, expect;
    };
    std::vector<Bad> cases;
    for (const std::string& m : {ro, full}) {
        const std::string why = m == ro ? "Read-only file system" : "No space left on device";
        cases.push_back({"python3 data/hf.py import " + fixture_dir("hf_tied") + " " + m + "/imp", "hf.py", m + "/imp: " + why});
        cases.push_back({"python3 data/hf.py export " + imp + " " + m, "hf.py", why});
        cases.push_back({"python3 data/tokenize.py --tokenizer " + tok + " " + m + "/x.bin " + d + "/doc3.txt", "tokenize.py",
                         "cannot write " + m + "/x.bin.tmp: " + why});
    }
    cases[3].expect = "cannot write " + full + "/imp/ckpt_00000000.tmp/shard_0.bin: No space left on device";
    std::vector<Out> outs;
    for (const Bad& c : cases) outs.push_back(run("timeout 60 " + c.args));
    const std::string left = run("find " + ro + " " + full + " -mindepth 1 ! -name imp").out;
    run("umount " + ro + "; umount " + full);
    for (size_t i = 0; i < cases.size(); i++) expect_one_line(outs[i], cases[i].tool, cases[i].expect, cases[i].args);
    EXPECT_EQ(left, "") << "left behind";
}

// data/make_shard.py (the standard library only) goes through the same handler.
TEST(MakeShard, FailuresAreOneLineAndLeaveNothing) {
    const std::string d = tmpdir();
    ASSERT_EQ(run("echo hello > " + d + "/a.txt && mkfifo " + d + "/f && mkdir " + d + "/dir.bin").rc, 0);
    const std::string M = "timeout 60 python3 data/make_shard.py ";
    struct Bad {
        std::string args, expect;
    };
    for (const Bad& c : std::vector<Bad>{
             {M + d + "/o.bin " + d + "/f", d + "/f: not a regular file (a FIFO)"},
             {M + d + "/o.bin " + d + "/none.txt", d + "/none.txt: no such file"},
             {M + d + "/dir.bin " + d + "/a.txt", d + "/dir.bin: a directory is there"},
             {M + d + "/nodir/o.bin " + d + "/a.txt", "cannot write " + d + "/nodir/o.bin.tmp: No such file or directory"},
             {"ulimit -f 1; " + M + d + "/o.bin " + d + "/a.txt", "cannot write " + d + "/o.bin.tmp: File too large"},
         }) {
        Out r = run(c.args);
        expect_one_line(r, "make_shard.py", c.expect, c.args);
    }
    EXPECT_TRUE(no_tmp_left(d));
    Out ok = run(M + d + "/o.bin " + d + "/a.txt");
    EXPECT_EQ(ok.rc, 0) << ok.out;
}

// test_checkpoint.cpp: checkpoint format 2 (checkpoint.h) in one process: the manifest's text
// round trip, every field checked before anything is allocated, the listing by number, save and
// load through the real functions (re-cut across ranks is in test_mpi.cpp, the CLI in test_cli.cpp).
#include <gtest/gtest.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fstream>
#include "checkpoint.h"

namespace {
struct Dir {
    std::string path;
    Dir() {
        char t[] = "/tmp/fpdt_test_ckpt_XXXXXX";
        if (!mkdtemp(t)) abort();
        path = t;
    }
    ~Dir() {
        nftw(path.c_str(), [](const char* f, const struct stat*, int, struct FTW*) { return ::remove(f); }, 16, FTW_DEPTH | FTW_PHYS);
    }
};

Manifest tiny_manifest(int shards) {
    Manifest m;
    m.cfg = *find_preset("tiny");
    m.step = 3, m.total_steps = 10, m.seed = 1337, m.seq = 64, m.source = "passkey";
    size_t n = 0;
    param_table(m.cfg, &n);
    m.n_params = n;
    for (int r = 0; r < shards; r++) {
        uint64_t lo, hi;
        ckpt_slice(n, shards, r, &lo, &hi);
        m.shards.push_back({lo, hi, 0x1234567890abcdefull + r});
    }
    return m;
}

// The manifest text with one line's value replaced (and the end checksum made right again, so
// that the field itself is what is checked).
std::string with_field(const std::string& text, const std::string& key, const std::string& value) {
    std::string out;
    for (size_t a = 0; a < text.size();) {
        size_t b = text.find('\n', a);
        std::string line = text.substr(a, b - a);
        a = b + 1;
        if (line.rfind("end ", 0) == 0) break;
        if (line.rfind(key + " ", 0) == 0) line = key + " " + value;
        out += line + "\n";
    }
    char e[40];
    snprintf(e, sizeof e, "end %016llx\n", (unsigned long long)fnv1a(FNV_OFFSET, out.data(), out.size()));
    return out + e;
}
}  // namespace

TEST(CheckpointFormat, ManifestRoundTrips) {
    for (int shards : {1, 3, 7}) {
        Manifest m = tiny_manifest(shards), back;
        const std::string text = manifest_text(m);
        ASSERT_EQ(parse_manifest(text, "m", &back), "") << text;
        EXPECT_EQ(manifest_text(back), text);
        std::string f, a, b;
        EXPECT_FALSE(manifest_identity_differs(m, back, &f, &a, &b)) << f;
        EXPECT_EQ(back.shards.size(), (size_t)shards);
        EXPECT_EQ(back.shards.back().hi, m.n_params);
    }
    // the slices are ZeRO-1's: ceil(n / P) each, the last one shorter
    uint64_t lo, hi;
    ckpt_slice(10, 4, 3, &lo, &hi);
    EXPECT_EQ(lo, 9u);
    EXPECT_EQ(hi, 10u);
    ckpt_slice(2, 4, 3, &lo, &hi);  // more ranks than values: empty slices
    EXPECT_EQ(lo, hi);
}

// Every field is checked, with the field named, before any size from the file is trusted: a
// forged parameter count of 2^36 is refused by the model's own count, not allocated.
TEST(CheckpointFormat, EveryBadFieldIsNamed) {
    const std::string good = manifest_text(tiny_manifest(2));
    struct Case {
        std::string key, value, expect;
    };
    const std::vector<Case> cases = {
        {"fpdt-checkpoint", "1", "fpdt-checkpoint"},
        {"step", "-1", "step"},
        {"step", "11", "past total_steps"},
        {"seed", "99999999999999999999999", "seed"},
        {"model.name", "two words", "model.name"},
        {"model.family", "bert", "model.family"},
        {"model.n_layer", "0", "model.n_layer"},
        {"model.n_kv_head", "3", "does not divide model.n_head"},
        {"model.rope_theta", "nan", "model.rope_theta"},
        {"model.norm_eps", "-1", "model.norm_eps"},
        {"model.tie_embeddings", "2", "model.tie_embeddings"},
        {"model.rope_scaling", "yarn", "model.rope_scaling"},
        {"data.seq", "x", "data.seq"},
        {"n_params", "68719476736", "does not match its model"},
        {"optimizer", "2", "optimizer"},
        {"shards", "0", "shards"},
        {"shards", "1000000", "shards"},
        {"shard", "0 0 5 0123456789abcdef", "shard"},
    };
    for (const Case& c : cases) {
        Manifest m;
        const std::string err = parse_manifest(with_field(good, c.key, c.value), "M", &m);
        EXPECT_NE(err.find(c.expect), std::string::npos) << c.key << " " << c.value << ": " << err;
        EXPECT_EQ(err.find('\n'), std::string::npos) << err;
    }
    Manifest m;
    std::string flipped = good;
    flipped[good.find("seed 1337") + 5] = '2';  // a change the end line does not cover
    EXPECT_NE(parse_manifest(flipped, "M", &m).find("checksum mismatch"), std::string::npos);
    EXPECT_NE(parse_manifest(good.substr(0, good.size() - 1), "M", &m).find("not complete"), std::string::npos);
    EXPECT_NE(parse_manifest(good + "x 1\n", "M", &m).find("after the end"), std::string::npos);
    EXPECT_NE(parse_manifest("", "M", &m), "");
}

// A FIFO where the manifest or a shard should be is refused by stat(), never opened (which would
// block forever); a shard of the wrong size is refused before it is read.
TEST(CheckpointFormat, FifosAndWrongSizesAreErrorsNotHangs) {
    Dir d;
    const std::string c = d.path + "/ckpt_00000003";
    ASSERT_EQ(mkdir(c.c_str(), 0755), 0);
    ASSERT_EQ(mkfifo((c + "/manifest.txt").c_str(), 0644), 0);
    Manifest m;
    EXPECT_NE(read_manifest(c, &m).find("not a regular file"), std::string::npos);
    unlink((c + "/manifest.txt").c_str());
    m = tiny_manifest(2);
    { std::ofstream(c + "/manifest.txt") << manifest_text(m); }
    ASSERT_EQ(mkfifo((c + "/shard_0.bin").c_str(), 0644), 0);
    EXPECT_NE(check_shard_sizes(c, m).find("shard_0.bin: not a regular file"), std::string::npos);
    unlink((c + "/shard_0.bin").c_str());
    { std::ofstream(c + "/shard_0.bin") << "short"; }
    EXPECT_NE(check_shard_sizes(c, m).find("truncated"), std::string::npos);
}

// Names are parsed by their number, whatever the width; nothing else counts.
TEST(CheckpointFormat, ListingByNumberOfAnyWidth) {
    Dir d;
    for (const char* n : {"ckpt_5", "ckpt_00000010", "ckpt_100000000", "ckpt_12345678901", "ckpt_7.tmp", "ckpt_x", "ckpt_", "other"})
        ASSERT_EQ(mkdir((d.path + "/" + n).c_str(), 0755), 0) << n;
    ASSERT_EQ(mkfifo((d.path + "/ckpt_99999999999").c_str(), 0644), 0);  // not a directory: not listed
    std::vector<uint64_t> steps;
    for (const auto& c : list_checkpoints(d.path)) steps.push_back(c.first);
    EXPECT_EQ(steps, (std::vector<uint64_t>{12345678901ull, 100000000, 10, 5}));
}

// save_checkpoint then load_checkpoint through a real model: the state comes back bit for bit,
// into a model with ZeRO on as well as off; the rotation keeps this run's newest two and never
// touches another run's checkpoint or other files.
TEST(CheckpointFormat, SaveLoadAndRotation) {
    Dir d;
    RunCfg r;
    r.seq = 32;
    Model A;
    model_create(&A, *find_preset("tiny"), r, false);
    model_init_params(&A, 7);
    std::vector<float> m(A.shard_n), v(A.shard_n);
    for (size_t i = 0; i < A.n_params; i++) m[i] = 0.001f * (float)(i % 97), v[i] = 0.002f * (float)(i % 89);
    dev_upload(&A.ctx, A.opt_m, m.data(), m.size() * 4);
    dev_upload(&A.ctx, A.opt_v, v.data(), v.size() * 4);
    Manifest id = tiny_manifest(1);
    id.seq = 32, id.shards.clear();
    Manifest other = id;
    other.seed = 1;  // another run's identity
    save_checkpoint(&A, d.path, 2, other, "x");
    { std::ofstream(d.path + "/notes.txt") << "mine"; }
    for (uint64_t s : {3, 4, 5, 6}) save_checkpoint(&A, d.path, s, id, "ranks 1");
    std::vector<uint64_t> steps;
    for (const auto& c : list_checkpoints(d.path)) steps.push_back(c.first);
    EXPECT_EQ(steps, (std::vector<uint64_t>{6, 5, 2}));
    EXPECT_EQ(access((d.path + "/notes.txt").c_str(), F_OK), 0);
    for (bool zero : {false, true}) {
        RunCfg rz = r;
        rz.zero = zero;
        Model B;
        model_create(&B, *find_preset("tiny"), rz, false);
        model_init_params(&B, 99);
        Manifest man;
        id.total_steps = 10;
        const std::string p = load_checkpoint(&B, d.path, id, &man);
        EXPECT_EQ(man.step, 6u);
        EXPECT_EQ(p, d.path + "/ckpt_00000006");
        std::vector<float> wa(A.n_params), wb(A.n_params), mb(A.n_params), vb(A.n_params);
        dev_download(&A.ctx, wa.data(), A.params, wa.size() * 4);
        dev_download(&B.ctx, wb.data(), B.params, wb.size() * 4);
        dev_download(&B.ctx, mb.data(), B.opt_m, mb.size() * 4);
        dev_download(&B.ctx, vb.data(), B.opt_v, vb.size() * 4);
        EXPECT_EQ(memcmp(wa.data(), wb.data(), wa.size() * 4), 0);
        EXPECT_EQ(memcmp(m.data(), mb.data(), mb.size() * 4), 0);
        EXPECT_EQ(memcmp(v.data(), vb.data(), vb.size() * 4), 0);
        model_free(&B);
    }
    model_free(&A);
}

// The fuzzer's seeds (test/fuzz_seeds.py, written from Python as an importer would) are valid
// manifests, so that `make fuzz` starts past the field order and the checksum.
TEST(CheckpointFormat, FuzzSeedsAreValidManifests) {
    Dir d;
    ASSERT_EQ(system(("python3 test/fuzz_seeds.py " + d.path).c_str()), 0);
    for (const char* name : {"llama", "gpt"}) {
        std::ifstream f(d.path + "/checkpoint/" + name);
        const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        Manifest m;
        EXPECT_EQ(parse_manifest(text, name, &m), "") << text;
    }
}

// Every path that deletes (a save's stale .tmp and .old.tmp, a damaged checkpoint of the same step
// moved aside, rotation, --overwrite, the start's clean-up of a killed save) never follows a
// symbolic link and removes nothing but fpdt's own files: a link under each name is refused,
// naming it, and what it points to is untouched; a checkpoint holding something fpdt did not
// write is left as it is by rotation (with a warning), not emptied.
TEST(CheckpointFormat, NothingIsDeletedThroughALink) {
    fatal_throws();
    Dir d, victim;
    { std::ofstream(victim.path + "/precious.txt") << "x"; }
    auto intact = [&] { return access((victim.path + "/precious.txt").c_str(), F_OK) == 0; };
    RunCfg r;
    r.seq = 32;
    Model A;
    model_create(&A, *find_preset("tiny"), r, false);
    model_init_params(&A, 7);
    Manifest id = tiny_manifest(1);
    id.seq = 32, id.shards.clear();
    auto save_error = [&](uint64_t step) {
        try {
            save_checkpoint(&A, d.path, step, id, "x");
        } catch (const FpdtError& e) {
            return e.msg;
        }
        return std::string();
    };
    for (const std::string name : {"ckpt_00000004.tmp", "ckpt_00000004.old.tmp", "ckpt_00000004"}) {
        const std::string link = d.path + "/" + name;
        ASSERT_EQ(symlink(victim.path.c_str(), link.c_str()), 0);
        EXPECT_NE(save_error(4).find(link + ": a symbolic link, not a checkpoint directory"), std::string::npos) << name;
        EXPECT_NE(remove_checkpoints(d.path).find(link + ": a symbolic link"), std::string::npos) << name;
        if (name != "ckpt_00000004") {
            EXPECT_NE(remove_stale_tmp(d.path).find(link + ": a symbolic link"), std::string::npos) << name;
        }
        EXPECT_EQ(foreign_checkpoint_names(d.path).size(), 1u) << name;
        EXPECT_TRUE(intact()) << name;
        ASSERT_EQ(unlink(link.c_str()), 0);
    }
    // rotation: ckpt_1 holds a file fpdt did not write, ckpt_2's shard is a link: both are left
    for (uint64_t s : {1, 2}) EXPECT_EQ(save_error(s), "");
    { std::ofstream(d.path + "/ckpt_00000001/notes.txt") << "mine"; }
    const std::string shard2 = d.path + "/ckpt_00000002/shard_0.bin";
    ASSERT_EQ(rename(shard2.c_str(), (victim.path + "/shard_0.bin").c_str()), 0);
    ASSERT_EQ(symlink((victim.path + "/shard_0.bin").c_str(), shard2.c_str()), 0);
    Manifest m2;  // read, such a checkpoint is refused: a checkpoint is a directory of regular files
    EXPECT_EQ(read_manifest(d.path + "/ckpt_00000002", &m2), "");
    EXPECT_NE(check_shard_sizes(d.path + "/ckpt_00000002", m2).find("shard_0.bin: not a regular file (a symbolic link)"), std::string::npos);
    for (uint64_t s : {3, 4, 5}) EXPECT_EQ(save_error(s), "");
    EXPECT_EQ(access((d.path + "/ckpt_00000001/notes.txt").c_str(), F_OK), 0);
    EXPECT_EQ(access((d.path + "/ckpt_00000001/manifest.txt").c_str(), F_OK), 0);
    struct stat st;
    EXPECT_EQ(lstat(shard2.c_str(), &st), 0);
    EXPECT_EQ(access((victim.path + "/shard_0.bin").c_str(), F_OK), 0);
    EXPECT_EQ(access((d.path + "/ckpt_00000003").c_str(), F_OK), -1) << "ckpt_3 is fpdt's alone: rotated";
    EXPECT_NE(remove_checkpoints(d.path).find("holds"), std::string::npos);
    EXPECT_TRUE(intact());
    model_free(&A);
}

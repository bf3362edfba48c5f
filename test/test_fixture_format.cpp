// test_fixture_format.cpp - checks that the reference fixtures written by
// test/make_reference.py load through test/fixture.h, hold the expected
// config and every expected tensor with the right shape, and that corrupted
// or truncated copies are rejected with an error.
//
// Build & run from the repo root (or set FPDT_REPO to it):
//   g++ -std=c++17 -I. test/test_fixture_format.cpp -lgtest -lgtest_main -pthread -o /tmp/t && /tmp/t
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <utility>

#include "test/fixture.h"

namespace {

std::string repo_path(const std::string& rel) {
    const char* root = std::getenv("FPDT_REPO");
    return std::string(root && *root ? root : ".") + "/" + rel;
}

struct Cfg {
    int family, n_layer, d, n_head, n_kv_head, ffn, vocab, seq;
};

// Every tensor the fixture must hold, in file order, derived from the config.
std::vector<std::pair<std::string, std::vector<int64_t>>> expected_tensors(const Cfg& c) {
    const bool gpt = c.family == 0;
    const int64_t D = c.d / c.n_head, d = c.d, F = c.ffn, V = c.vocab;
    const int64_t qkv = (c.n_head + 2 * c.n_kv_head) * D;
    std::vector<std::pair<std::string, std::vector<int64_t>>> params = {{"wte", {V, d}}};
    for (int l = 0; l < c.n_layer; l++) {
        const std::string p = "h." + std::to_string(l) + ".";
        params.push_back({p + "ln1_w", {d}});
        if (gpt) params.push_back({p + "ln1_b", {d}});
        params.push_back({p + "qkv_w", {qkv, d}});
        if (gpt) params.push_back({p + "qkv_b", {qkv}});
        params.push_back({p + "o_w", {d, c.n_head * D}});
        if (gpt) params.push_back({p + "o_b", {d}});
        params.push_back({p + "ln2_w", {d}});
        if (gpt) params.push_back({p + "ln2_b", {d}});
        params.push_back({p + "fc_w", {gpt ? F : 2 * F, d}});
        if (gpt) params.push_back({p + "fc_b", {F}});
        params.push_back({p + "proj_w", {d, F}});
        if (gpt) params.push_back({p + "proj_b", {d}});
    }
    params.push_back({"lnf_w", {d}});
    if (gpt) params.push_back({"lnf_b", {d}});
    if (!gpt) params.push_back({"lm_head", {V, d}});

    std::vector<std::pair<std::string, std::vector<int64_t>>> out = {
        {"config", {8}}, {"config_f", {2}}, {"tokens", {c.seq}}, {"targets", {c.seq}}};
    for (auto& p : params) out.push_back({"param." + p.first, p.second});
    out.push_back({"logits", {c.seq, V}});
    out.push_back({"loss", {1}});
    for (auto& p : params) out.push_back({"grad." + p.first, p.second});
    return out;
}

void check_fixture(const std::string& rel, const Cfg& want) {
    Fixture fx;
    std::string err;
    ASSERT_TRUE(fixture_load(repo_path(rel), &fx, &err)) << err;

    const FixtureTensor* cfg = fx.find("config");
    ASSERT_NE(cfg, nullptr);
    ASSERT_TRUE(cfg->is_int);
    ASSERT_EQ(cfg->i.size(), 8u);
    const std::vector<int32_t> want_cfg = {want.family, want.n_layer, want.d,     want.n_head,
                                           want.n_kv_head, want.ffn,  want.vocab, want.seq};
    EXPECT_EQ(cfg->i, want_cfg);

    const FixtureTensor* cfg_f = fx.find("config_f");
    ASSERT_NE(cfg_f, nullptr);
    ASSERT_EQ(cfg_f->f.size(), 2u);
    EXPECT_FLOAT_EQ(cfg_f->f[0], 10000.0f);
    EXPECT_FLOAT_EQ(cfg_f->f[1], 1e-5f);

    // Exactly the expected tensors, in order, with the right shapes and dtypes.
    const auto expected = expected_tensors(want);
    ASSERT_EQ(fx.tensors.size(), expected.size());
    for (size_t k = 0; k < expected.size(); k++) {
        const FixtureTensor& t = fx.tensors[k];
        EXPECT_EQ(t.name, expected[k].first) << "record " << k;
        EXPECT_EQ(t.shape, expected[k].second) << t.name;
        const bool want_int = t.name == "config" || t.name == "tokens" || t.name == "targets";
        EXPECT_EQ(t.is_int, want_int) << t.name;
        EXPECT_EQ(want_int ? t.i.size() : t.f.size(), t.numel()) << t.name;
        for (float v : t.f) ASSERT_TRUE(std::isfinite(v)) << t.name;
    }
    for (const char* name : {"tokens", "targets"})
        for (int32_t id : fx.find(name)->i) EXPECT_TRUE(id >= 0 && id < want.vocab) << name;
    const float loss = fx.find("loss")->f[0];
    EXPECT_GT(loss, 0.0f);
    EXPECT_LT(loss, 50.0f);
}

std::vector<char> read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

bool load_bytes(const std::vector<char>& bytes, std::string* err) {
    const std::string path = testing::TempDir() + "fpdt_fixture_corrupt.bin";
    std::ofstream(path, std::ios::binary).write(bytes.data(), (std::streamsize)bytes.size());
    Fixture fx;
    const bool ok = fixture_load(path, &fx, err);
    std::remove(path.c_str());
    return ok;
}

}  // namespace

TEST(FixtureFormat, LlamaTiny) { check_fixture("test/fixtures/ref_llama_tiny.bin", {1, 2, 64, 4, 2, 176, 260, 32}); }

TEST(FixtureFormat, GptTiny) { check_fixture("test/fixtures/ref_gpt_tiny.bin", {0, 2, 64, 4, 4, 256, 260, 32}); }

TEST(FixtureFormat, RejectsBadFiles) {
    const std::vector<char> good = read_all(repo_path("test/fixtures/ref_llama_tiny.bin"));
    ASSERT_GT(good.size(), 100u);
    std::string err;
    ASSERT_TRUE(load_bytes(good, &err)) << err;

    Fixture fx;
    err.clear();
    EXPECT_FALSE(fixture_load(repo_path("test/fixtures/does_not_exist.bin"), &fx, &err));
    EXPECT_FALSE(err.empty());

    std::vector<char> bad_magic = good;
    bad_magic[0] = 'X';
    err.clear();
    EXPECT_FALSE(load_bytes(bad_magic, &err));
    EXPECT_FALSE(err.empty());

    // Cut inside the last record's data, and inside the first record's header.
    for (size_t len : {good.size() - 3, (size_t)10, (size_t)5}) {
        err.clear();
        EXPECT_FALSE(load_bytes(std::vector<char>(good.begin(), good.begin() + len), &err)) << len;
        EXPECT_FALSE(err.empty()) << len;
    }

    std::vector<char> bad_dtype = good;  // first record: 4 + len("config") bytes, then dtype
    bad_dtype[8 + 4 + 6] = 7;
    err.clear();
    EXPECT_FALSE(load_bytes(bad_dtype, &err));
    EXPECT_FALSE(err.empty());
}

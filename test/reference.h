// reference.h: the PyTorch reference fixtures (test/make_reference.py) as fpdt models: a
// fixture's config, and a model for one rank built with its weights and tokens.
#pragma once
#include <gtest/gtest.h>
#include <cstdlib>
#include <string>
#include "model.h"
#include "test/fixture.h"

static std::string repo() {
    const char* r = getenv("FPDT_REPO");
    return r ? r : ".";
}

struct Loaded {
    Fixture fx;
    Config cfg;
    size_t seq;
};

static Loaded load(const char* file) {
    Loaded L;
    std::string err;
    EXPECT_TRUE(fixture_load(repo() + "/test/fixtures/" + file, &L.fx, &err)) << err;
    const FixtureTensor* c = L.fx.find("config");
    const FixtureTensor* cf = L.fx.find("config_f");
    const std::vector<int32_t>& v = c->i;
    L.cfg = Config{"", v[0], v[1], v[2], v[3], v[4], v[5], v[6], cf->f[0], cf->f[1], ""};
    snprintf(L.cfg.name, sizeof L.cfg.name, "%s", file);
    L.seq = v[7];
    return L;
}

// Builds the model for one rank (P, rank: the sequence-parallel group), with the fixture's weights
// and tokens.
static void build(Model* M, const Loaded& L, size_t chunk, bool offload, size_t rows = 0, bool bf16 = false,
                  int32_t doc_bos = -1, int P = 1, int rank = 0, bool keep_attn = false, bool keep_mlp = false) {
    RunCfg r;
    r.P = P, r.rank = rank, r.keep_attn = keep_attn, r.keep_mlp = keep_mlp;
    r.seq = L.seq, r.chunk = chunk, r.offload = offload, r.head_rows = rows, r.mlp_rows = rows, r.bf16 = bf16;
    r.doc_bos = doc_bos;
    model_create(M, L.cfg, r, false);
    for (const ParamInfo& p : M->table) {
        const FixtureTensor* t = L.fx.find("param." + p.name);
        ASSERT_NE(t, nullptr) << p.name;
        ASSERT_EQ(t->numel(), p.numel()) << p.name;
        memcpy(M->params + p.offset, t->f.data(), p.numel() * 4);
    }
    model_set_token_arrays(M, L.fx.find("tokens")->i.data(), L.fx.find("targets")->i.data());
}


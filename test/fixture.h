// fixture.h - header-only reader for the reference fixtures written by
// test/make_reference.py (PyTorch float64 forward+backward, stored float32).
//
// File format (little-endian): 8-byte magic "FPDTREF1", then records until EOF:
//   int32 name_len; name bytes (no NUL); int32 dtype (0 = float32, 1 = int32);
//   int32 ndim; ndim x int64 dims; prod(dims) values of that dtype.
//
// Usage:
//   Fixture fx; std::string err;
//   if (!fixture_load("test/fixtures/ref_llama_tiny.bin", &fx, &err)) { ... err ... }
//   const FixtureTensor* wte = fx.find("param.wte");   // nullptr if absent
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

struct FixtureTensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> f;    // values when !is_int
    std::vector<int32_t> i;  // values when is_int
    bool is_int = false;
    size_t numel() const {
        size_t n = 1;
        for (int64_t d : shape) n *= (size_t)d;
        return n;
    }
};

struct Fixture {
    std::vector<FixtureTensor> tensors;
    const FixtureTensor* find(const std::string& name) const {
        for (const FixtureTensor& t : tensors)
            if (t.name == name) return &t;
        return nullptr;
    }
};

// Reads exactly n bytes at the cursor; false if the buffer is too short.
static inline bool fixture_read_bytes_(const std::vector<char>& buf, size_t* pos, void* dst, size_t n) {
    if (n > buf.size() - *pos) return false;
    std::memcpy(dst, buf.data() + *pos, n);
    *pos += n;
    return true;
}

// Loads a whole fixture file into *out. On failure returns false, sets *err
// (if non-null) and leaves *out empty. Assumes a little-endian host.
static inline bool fixture_load(const std::string& path, Fixture* out, std::string* err) {
    auto fail = [&](const std::string& msg) {
        out->tensors.clear();
        if (err) *err = path + ": " + msg;
        return false;
    };
    out->tensors.clear();

    std::FILE* fp = std::fopen(path.c_str(), "rb");
    if (!fp) return fail("cannot open file");
    std::vector<char> buf;
    char chunk[1 << 16];
    size_t got;
    while ((got = std::fread(chunk, 1, sizeof(chunk), fp)) > 0) buf.insert(buf.end(), chunk, chunk + got);
    bool read_error = std::ferror(fp) != 0;
    std::fclose(fp);
    if (read_error) return fail("read error");

    size_t pos = 0;
    char magic[8];
    if (!fixture_read_bytes_(buf, &pos, magic, 8) || std::memcmp(magic, "FPDTREF1", 8) != 0)
        return fail("bad magic (expected FPDTREF1)");

    while (pos < buf.size()) {
        FixtureTensor t;
        const std::string at = "record " + std::to_string(out->tensors.size());
        int32_t name_len = 0, dtype = 0, ndim = 0;
        if (!fixture_read_bytes_(buf, &pos, &name_len, 4)) return fail(at + ": truncated name length");
        if (name_len <= 0 || name_len > 4096) return fail(at + ": bad name length " + std::to_string(name_len));
        t.name.resize((size_t)name_len);
        if (!fixture_read_bytes_(buf, &pos, &t.name[0], (size_t)name_len)) return fail(at + ": truncated name");
        const std::string where = at + " '" + t.name + "'";
        if (!fixture_read_bytes_(buf, &pos, &dtype, 4)) return fail(where + ": truncated dtype");
        if (dtype != 0 && dtype != 1) return fail(where + ": bad dtype " + std::to_string(dtype));
        t.is_int = dtype == 1;
        if (!fixture_read_bytes_(buf, &pos, &ndim, 4)) return fail(where + ": truncated ndim");
        if (ndim < 0 || ndim > 8) return fail(where + ": bad ndim " + std::to_string(ndim));
        t.shape.resize((size_t)ndim);
        size_t numel = 1;
        for (int32_t k = 0; k < ndim; k++) {
            if (!fixture_read_bytes_(buf, &pos, &t.shape[k], 8)) return fail(where + ": truncated dims");
            if (t.shape[k] < 0 || t.shape[k] > (int64_t)buf.size()) return fail(where + ": bad dim");
            numel *= (size_t)t.shape[k];
            if (numel > buf.size()) return fail(where + ": data larger than file");
        }
        const size_t bytes = numel * 4;
        if (bytes > buf.size() - pos) return fail(where + ": truncated data");
        if (t.is_int) {
            t.i.resize(numel);
            fixture_read_bytes_(buf, &pos, t.i.data(), bytes);
        } else {
            t.f.resize(numel);
            fixture_read_bytes_(buf, &pos, t.f.data(), bytes);
        }
        out->tensors.push_back(std::move(t));
    }
    if (out->tensors.empty()) return fail("no records");
    return true;
}

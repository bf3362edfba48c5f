// fuzz_checkpoint.cpp: libFuzzer target for parse_manifest (checkpoint.h) on untrusted bytes: the
// manifest.txt of a checkpoint (format 2), the one piece of a checkpoint whose fields size what a
// reader allocates and reads. Build and run: `make fuzz` (clang++ -fsanitize=fuzzer,address,
// undefined), with test/fuzz_checkpoint.dict (the keys) and a seed corpus holding valid manifests
// (test/fuzz_seeds.py), so that the fuzzer starts past the field order and the checksum.
//
// A bad manifest must come back as a message; one that is accepted must be self-consistent: its
// parameter count is its model's, and its slices cover [0, n_params) in order. Crashes, leaks, UB
// and huge allocations are the sanitizers' business.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text((const char*)data, size);
    Manifest m;
    const std::string err = parse_manifest(text, "fuzz/manifest.txt", &m);
    if (!err.empty()) {
        if (err.find('\n') != std::string::npos) __builtin_trap();  // one line
        return 0;
    }
    size_t count = 0;
    param_table(m.cfg, &count);
    if (count != m.n_params || m.shards.empty() || m.shards.front().lo != 0 || m.shards.back().hi != m.n_params)
        __builtin_trap();
    for (size_t r = 1; r < m.shards.size(); r++)
        if (m.shards[r].lo != m.shards[r - 1].hi || m.shards[r].hi < m.shards[r].lo) __builtin_trap();
    if (m.total_steps && m.step > m.total_steps) __builtin_trap();
    return 0;
}

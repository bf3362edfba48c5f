// fuzz_checkpoint.cpp: libFuzzer target for read_checkpoint_file (checkpoint.h) on untrusted bytes.
// Build and run: `make fuzz` (clang++ -fsanitize=fuzzer,address,undefined), with
// test/fuzz_checkpoint.dict (the magic) and a seed corpus holding one small valid checkpoint, so
// that the fuzzer starts past the magic, size and checksum checks.
//
// The input is the whole file, read through fmemopen(). A bad file must come back as a message;
// one that is accepted must be self-consistent. Crashes, leaks and UB are the sanitizers' business.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    // fmemopen() may refuse a zero-length buffer; an empty file is /dev/null.
    FILE* f = size ? fmemopen((void*)data, size, "rb") : fopen("/dev/null", "rb");
    if (!f) __builtin_trap();
    CkptHeader h;
    std::vector<float> payload;
    std::string err = read_checkpoint_file(f, "fuzz.bin", &h, &payload);
    fclose(f);
    if (err.empty() &&
        (payload.size() != 3 * h.n_params || size != sizeof h + payload.size() * sizeof(float)))
        __builtin_trap();  // accepted, so header and payload must agree with the file
    return 0;
}

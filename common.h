// common.h: the small things every other file needs: fatal errors, checks, arenas that count
// bytes, a deterministic RNG, timers, and the Chrome trace recorder.
#pragma once
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

// Functions both the host and the GPU run.
#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

// ----------------------------------------------------------------------------
// bf16: the top half of an fp32 (8 exponent bits, 7 mantissa bits), kept as uint16_t on both
// backends. Rounding is to nearest, ties to even, in integer arithmetic, so the CPU and the GPU
// produce the same bits; NaN stays NaN, and what rounds past the largest bf16 becomes infinity.

typedef uint16_t bf16;

HOST_DEVICE static inline uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}
HOST_DEVICE static inline float bf16_to_float(bf16 h) {
    const uint32_t u = (uint32_t)h << 16;
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}
HOST_DEVICE static inline bf16 bf16_from_float(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN: keep it (quiet)
    u += 0x7fffu + ((u >> 16) & 1u);  // half an ulp, and the tie goes to the even neighbour
    return (bf16)(u >> 16);
}
HOST_DEVICE static inline float bf16_round(float f) { return bf16_to_float(bf16_from_float(f)); }

// ----------------------------------------------------------------------------
// Errors. Bad input gets one clear line and a non-zero exit. fatal() is replaceable so that
// tests can turn it into an exception and check the message; the multi-process build replaces it
// with one that aborts every rank (comm.h).

struct FpdtError {
    std::string msg;
};
static inline void (*&fatal_hook())(const char*) {
    static void (*hook)(const char*) = nullptr;
    return hook;
}
[[noreturn]] static inline void fatal(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (fatal_hook()) fatal_hook()(buf);  // may throw or abort the job; if it returns we exit
    fprintf(stderr, "fpdt: %s\n", buf);
    fflush(stderr);
    exit(1);
}
// Tests call this so that fatal() throws instead of exiting.
static inline void fatal_throws() {
    fatal_hook() = [](const char* m) { throw FpdtError{m}; };
}

// ----------------------------------------------------------------------------
// Files. Every path fpdt opens goes through open_regular: anything but a regular file (a FIFO, a
// device, a socket, a directory) is refused with one line before it is opened, so nothing can
// block on it; O_NONBLOCK covers one swapped in between the check and the open, and fstat checks
// what was opened. With follow false a symbolic link is refused as well (the files inside --out:
// fpdt never reads, writes or deletes through a link there). dirfd: relative to that directory.

enum class Open { Read, Write, Append, Lock };  // Write creates or truncates; Append creates; Lock: read-write, creates

static inline const char* file_kind(mode_t m) {
    return S_ISLNK(m) ? "a symbolic link" : S_ISFIFO(m) ? "a FIFO" : S_ISCHR(m) ? "a character device"
         : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" : S_ISDIR(m) ? "a directory" : "not a plain file";
}

// Opens path (relative to dirfd) as `how` says; *fd the descriptor (blocking again), *size the
// file's length. Returns "" or "PATH: what is wrong".
static inline std::string open_regular(const std::string& path, Open how, bool follow, int* fd, uint64_t* size = nullptr,
                                       int dirfd = AT_FDCWD) {
    *fd = -1;
    struct stat st;
    if (fstatat(dirfd, path.c_str(), &st, follow ? 0 : AT_SYMLINK_NOFOLLOW) == 0) {
        if (!S_ISREG(st.st_mode)) return path + ": not a regular file (" + file_kind(st.st_mode) + ")";
    } else if (how == Open::Read || errno != ENOENT) {
        return path + ": " + strerror(errno);
    }
    const int mode = how == Open::Read ? O_RDONLY : how == Open::Write ? O_WRONLY | O_CREAT | O_TRUNC
                   : how == Open::Append ? O_WRONLY | O_CREAT | O_APPEND : O_RDWR | O_CREAT;
    const int f = openat(dirfd, path.c_str(), mode | O_NONBLOCK | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW), 0644);
    if (f < 0) {
        if (errno == ELOOP && !follow) return path + ": not a regular file (a symbolic link)";
        if (errno == ENXIO) return path + ": not a regular file (a FIFO or a socket)";
        return path + ": " + strerror(errno);
    }
    if (fstat(f, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(f);
        return path + ": not a regular file (" + file_kind(st.st_mode) + ")";
    }
    fcntl(f, F_SETFL, fcntl(f, F_GETFL) & ~O_NONBLOCK);
    *fd = f;
    if (size) *size = (uint64_t)st.st_size;
    return "";
}

// The same as a stdio stream (mode "r", "w" or "a"), or nullptr with *err set.
static inline FILE* fopen_regular(const std::string& path, Open how, bool follow, std::string* err) {
    int fd;
    *err = open_regular(path, how, follow, &fd);
    if (!err->empty()) return nullptr;
    FILE* f = fdopen(fd, how == Open::Read ? "r" : how == Open::Append ? "a" : "w");
    if (!f) *err = path + ": " + strerror(errno), close(fd);
    return f;
}

// ----------------------------------------------------------------------------
// Sizes from untrusted input (a checkpoint's manifest, a model's shape) are compared with the
// memory this machine has before anything of that size is allocated.

static inline uint64_t machine_memory_bytes() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : UINT64_MAX;
}

// "" when `bytes` of host memory for `what` can be had here (the machine's memory, and `cap`
// when it is not 0: --host-mem), else one line with both sizes.
static inline std::string check_host_bytes(const std::string& what, double bytes, uint64_t cap = 0, const char* cap_name = "--host-mem") {
    const uint64_t have = machine_memory_bytes();
    char b[512];
    if (cap && bytes > (double)cap)
        snprintf(b, sizeof b, "%s needs %.1f GiB of host memory, more than %s allows (%.1f GiB)", what.c_str(),
                 bytes / 1073741824.0, cap_name, cap / 1073741824.0);
    else if (bytes > (double)have)
        snprintf(b, sizeof b, "%s needs %.1f GiB of host memory, more than this machine has (%.1f GiB)", what.c_str(),
                 bytes / 1073741824.0, have / 1073741824.0);
    else
        return "";
    return b;
}

// mkdir -p without a shell: creates path and its missing parents (mode 0755). Returns "" or why not.
static inline std::string make_dirs(const std::string& path) {
    for (size_t i = 1; i <= path.size(); i++) {
        if (i < path.size() && path[i] != '/') continue;
        const std::string p = path.substr(0, i);
        if (mkdir(p.c_str(), 0755) != 0 && errno != EEXIST) return p + ": cannot create: " + strerror(errno);
    }
    struct stat st;
    if (stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return path + ": not a directory";
    return "";
}

// ----------------------------------------------------------------------------
// Arenas: one big allocation, sized once from the plan, handed out by a bump pointer. Nothing big
// is allocated inside a step, so the arena's high-water mark is the run's peak memory, and the
// planner can predict it by running the same allocation sequence with count_only set.

enum class Mem { Host, Device, Pinned };

struct Arena {
    const char* name = "";
    Mem kind = Mem::Host;
    char* base = nullptr;
    size_t cap = 0, used = 0, peak = 0;
    bool count_only = false;  // the planner's dry run: count bytes, allocate nothing
    std::vector<std::pair<std::string, size_t>> items;  // what was allocated, for messages and `plan`
};

static inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// An empty arena. A layout runs twice, each time in fresh arenas: a dry run (count_only) to count
// the bytes, then the real one with cap set to that count.
static inline Arena arena_new(const char* name, Mem kind) {
    Arena a;
    a.name = name, a.kind = kind;
    return a;
}

// Takes `bytes` from the arena; `what` names the buffer in the error when it does not fit.
static inline void* arena_take(Arena* a, size_t bytes, const char* what) {
    size_t n = align_up(bytes, 256);
    if (n < bytes || a->used + n < a->used) fatal("%s: the %s arena would pass 2^64 bytes", what, a->name);
    a->items.push_back({what, n});
    if (a->count_only) {
        a->used += n;
        if (a->used > a->peak) a->peak = a->used;
        return nullptr;
    }
    if (a->used + n > a->cap)  // the arenas are sized by a dry run of the same sequence: a bug
        fatal("internal: the %s arena is smaller than its plan: %s needs %.1f MiB, %.1f of %.1f MiB are left",
              a->name, what, n / 1048576.0, (a->cap - a->used) / 1048576.0, a->cap / 1048576.0);
    void* p = a->base + a->used;
    a->used += n;
    if (a->used > a->peak) a->peak = a->used;
    return p;
}
template <typename T>
static inline T* arena_alloc(Arena* a, size_t count, const char* what) {
    return (T*)arena_take(a, count * sizeof(T), what);
}

// ----------------------------------------------------------------------------
// Deterministic random numbers (splitmix64 + Box-Muller), the same on every machine and compiler.

struct Rng {
    uint64_t s;
};
static inline uint64_t rng_u64(Rng* r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline float rng_uniform(Rng* r) { return (rng_u64(r) >> 40) * (1.0f / 16777216.0f); }  // [0,1)
static inline float rng_normal(Rng* r) {
    double u1 = ((rng_u64(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double u2 = (rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ----------------------------------------------------------------------------
// Time.

static inline double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ----------------------------------------------------------------------------
// Trace: Chrome trace-event JSON ("X" complete events), one track (tid) per stream, so Perfetto
// or chrome://tracing shows the compute, copy-in, copy-out and communication streams side by side.

enum Track { TRACK_COMPUTE = 0, TRACK_COPY_IN = 1, TRACK_COPY_OUT = 2, TRACK_COMM = 3, N_TRACKS = 4 };
static const char* const track_names[N_TRACKS] = {"compute", "copy-in (host to device)",
                                                  "copy-out (device to host)", "communication"};

struct CUevent_st;  // cudaEvent_t, for the GPU's timings (offload.h)
struct TraceEvent {
    std::string name;
    int track;
    double t0, t1;  // seconds from the start of the step
    size_t bytes;
    int layer;
    int64_t chunk;  // (a layer_in chunk is a layer's: (L+1) u of them can pass 2^31)
    CUevent_st* ev[2];  // GPU: events around the work on its stream; their times replace t0, t1
};
struct Trace {
    bool on = false;
    double origin = 0;
    CUevent_st* origin_ev = nullptr;  // GPU: recorded when the traced step starts
    std::vector<TraceEvent> events;
};

static inline void trace_add(Trace* t, const char* name, int track, double t0, double t1, size_t bytes,
                             int layer, int64_t chunk, CUevent_st* e0 = nullptr, CUevent_st* e1 = nullptr) {
    if (t && t->on) t->events.push_back({name, track, t0 - t->origin, t1 - t->origin, bytes, layer, chunk, {e0, e1}});
}

// --trace FILE is written as FILE.tmp and renamed over FILE: FILE must be a regular file or not
// there yet (a FIFO, a device or a link in its place is refused, never replaced), and FILE.tmp
// is opened without following a link. Returns the open FILE.tmp, or nullptr with *err set.
static inline FILE* trace_open_tmp(const std::string& path, std::string* err) {
    struct stat st;
    if (lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
        *err = "--trace " + path + ": not a regular file (" + file_kind(st.st_mode) + "): fpdt replaces only a regular file";
        return nullptr;
    }
    FILE* f = fopen_regular(path + ".tmp", Open::Write, false, err);
    if (!f) *err = "--trace " + path + ": cannot open for writing: " + *err;
    return f;
}

static inline void trace_write(const Trace* t, const char* path, int rank) {
    std::string tmp = std::string(path) + ".tmp", err;
    FILE* f = trace_open_tmp(path, &err);
    if (!f) fatal("%s", err.c_str());
    fprintf(f, "{\"traceEvents\":[\n");
    for (int k = 0; k < N_TRACKS; k++)
        fprintf(f, "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":%d,\"tid\":%d,\"args\":{\"name\":\"%s\"}},\n",
                rank, k, track_names[k]);
    for (size_t i = 0; i < t->events.size(); i++) {
        const TraceEvent& e = t->events[i];
        fprintf(f,
                "{\"ph\":\"X\",\"name\":\"%s\",\"pid\":%d,\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f,"
                "\"args\":{\"bytes\":%zu,\"layer\":%d,\"chunk\":%lld}}%s\n",
                e.name.c_str(), rank, e.track, e.t0 * 1e6, (e.t1 - e.t0) * 1e6, e.bytes, e.layer, (long long)e.chunk,
                i + 1 < t->events.size() ? "," : "");
    }
    fprintf(f, "],\"displayTimeUnit\":\"ms\"}\n");
    if (fclose(f) != 0 || rename(tmp.c_str(), path) != 0) fatal("--trace %s: write failed", path);
}

// ----------------------------------------------------------------------------
// The execution context every op and copy receives: which backend runs the math, the GPU's
// streams (compute, copy-in, copy-out, communication), and the trace.

struct GpuCtx;  // cuda_common.cuh: streams, cuBLAS handle (only nvcc-built code touches it)
struct Ctx {
    bool gpu = false;
    GpuCtx* g = nullptr;
    Trace* trace = nullptr;
    int layer = -1;  // for trace labels
    // GPU (set by the nvcc build): opens (begin) or closes an NVTX range for Nsight and, while
    // tracing, records an event on the track's stream
    void (*gpu_mark)(Ctx*, int track, const char* name, bool begin, CUevent_st** ev) = nullptr;
};

// One operation on a track. On the CPU backend the region's wall time is the operation's; on the
// GPU the region only issues work, so events on the track's stream time it instead.
struct TraceScope {
    Ctx* ctx;
    const char* name;
    int track;
    int64_t chunk;
    size_t bytes;
    double t0;
    CUevent_st* ev[2] = {};
    TraceScope(Ctx* c, const char* n, int tr, int64_t ch, size_t b = 0)
        : ctx(c), name(n), track(tr), chunk(ch), bytes(b), t0(c->trace && c->trace->on ? now_s() : 0) {
        if (ctx->gpu_mark) ctx->gpu_mark(ctx, track, name, true, &ev[0]);
    }
    ~TraceScope() {
        if (ctx->gpu_mark) ctx->gpu_mark(ctx, track, name, false, &ev[1]);
        if (ctx->trace && ctx->trace->on)
            trace_add(ctx->trace, name, track, t0, now_s(), bytes, ctx->layer, chunk, ev[0], ev[1]);
    }
};

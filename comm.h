// comm.h: the ranks and their two communicators. One process is one rank; launch W of them with
// `mpirun -np W ./fpdt ...` (or srun). The W ranks of the world split into sequence-parallel
// groups of N consecutive ranks (--sp N; comm_split_groups): rank w is rank w % N of group
// (replica) w / N, so with the usual launchers a group stays inside a node. Two communicators:
//   the world      every rank: the gradient reduction, the ZeRO gathers and reduce-scatters (the
//                  state is sharded over all W ranks), errors, checkpoints, evaluation's sums
//   the group      the N ranks of this rank's sequence-parallel group: the Ulysses all-to-alls
//                  and the sum of one sequence's loss
// Every MPI and NCCL call of the program is here, named by the communicator it runs on. MPI moves CPU buffers (the CPU backend, and CI's real
// multi-process tests). NCCL moves GPU buffers when every rank has a GPU of its own (its unique
// id travels over MPI); ranks sharing a GPU (NCCL refuses that) stage GPU buffers through host
// memory and MPI (ulysses.h, zero.h). Without mpirun the program is a group of one and MPI is not touched
// at all, so `./fpdt train` needs no launcher.
//
// Errors: a problem every rank sees alike (a bad flag, a bad shape) is reported once, by rank 0,
// and every rank exits 1. A problem only one rank sees aborts the whole job (MPI_Abort) with a
// message naming the rank, so a dead or failing rank never leaves the others hanging; so does a
// fault of the NCCL communicator, which the watchdog thread polls for.
#pragma once
#include <mpi.h>
#include <unistd.h>
#include <atomic>
#include <climits>
#include <string>
#include <thread>
#include <vector>
#include "common.h"
#ifdef __CUDACC__
#include <nccl.h>
#include <mutex>
#include "cuda_common.cuh"  // CUDA_CHECK
#endif

#define MPI_CHECK(call)                                                                \
    do {                                                                               \
        int err_ = (call);                                                             \
        if (err_ != MPI_SUCCESS) {                                                     \
            char s_[MPI_MAX_ERROR_STRING];                                             \
            int n_ = 0;                                                                \
            MPI_Error_string(err_, s_, &n_);                                           \
            fatal("MPI error at %s:%d: %s", __FILE__, __LINE__, s_);                   \
        }                                                                              \
    } while (0)

struct Comm {
    int rank = 0, size = 1, local_rank = 0, local_size = 1;  // in the world; local: the ranks on this machine
    bool mpi = false;  // MPI_Init was called (launched by mpirun/srun)
    // this rank's sequence-parallel group (comm_split_groups; until then the whole world)
    int sp_rank = 0, sp_size = 1;   // this rank in its group, and the group's ranks (--sp)
    int replica = 0, replicas = 1;  // the group's index, and how many groups (data-parallel replicas)
    MPI_Comm sp_mpi = MPI_COMM_WORLD;  // the group's communicator (the world's is MPI_COMM_WORLD)
};

static inline Comm& comm_world() {
    static Comm c;
    return c;
}

// True when a launcher started us (then MPI must be initialised so the ranks can talk).
static inline bool launched_by_mpi() {
    const char* vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "MPI_LOCALNRANKS"};
    for (const char* v : vars)
        if (getenv(v)) return true;
    return false;
}

static inline void comm_fatal_hook(const char* msg) {
    Comm& c = comm_world();
    if (c.size > 1) {
        fprintf(stderr, "fpdt (rank %d of %d): %s\n", c.rank, c.size, msg);
        fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}

// ----------------------------------------------------------------------------
// Watchdog (--watchdog S): a rank that waits inside one MPI collective for longer than S seconds
// (another rank stopped, hung, or stuck in a collective of its own) prints the step and the
// collective, naming itself, and exits 1, upon which the launcher ends the job. Only time spent
// inside a collective counts, so a long computation or checkpoint write between them does not.
// The same thread polls the communicator where one is set (poll: NCCL's asynchronous errors, and
// an NCCL collective in flight for longer than S seconds; comm_nccl_init sets it): on a fault it
// prints the step and the collective, aborts the communicator (abort_comm: ncclCommAbort, which
// frees a GPU spinning in the collective) and then the job (MPI_Abort).

struct Watchdog {
    std::atomic<const char*> what{nullptr};  // the collective this rank is in, or null
    std::atomic<const char*> last{"none"};   // the collective this rank entered or issued last
    std::atomic<double> since{0};            // when it entered it
    std::atomic<long long> step{0};          // the step being computed (for the message)
    double timeout = 0;                      // 0: off
    // "" or the communicator's fault in one line, naming the collective; called every second
    std::atomic<std::string (*)(double timeout)> poll{nullptr};
    std::atomic<void (*)()> abort_comm{nullptr};
    bool started = false;
};
static inline Watchdog& watchdog() {
    static Watchdog w;
    return w;
}
struct CommWait {  // marks the time inside one collective
    explicit CommWait(const char* what) {
        watchdog().since = now_s();
        watchdog().what = what;
        watchdog().last = what;
    }
    ~CommWait() { watchdog().what = nullptr; }
};
#define MPI_COLLECTIVE(what, call) \
    do {                           \
        CommWait wait_(what);      \
        MPI_CHECK(call);           \
    } while (0)

// FPDT_FAULT_COMM_ERROR=N (tests): from step N on, this rank's communicator reports a fault, as
// ncclCommGetAsyncError reports a broken link, so that the watchdog's way of ending the job on a
// communicator fault runs where there is no GPU and no NCCL.
static inline std::string comm_fault_poll(double) {
    const char* at = getenv("FPDT_FAULT_COMM_ERROR");
    if (!at || atoll(at) <= 0 || watchdog().step < atoll(at)) return "";
    return std::string(watchdog().last.load()) + ": injected communicator fault (FPDT_FAULT_COMM_ERROR=" + at + ")";
}

// Starts the watchdog thread (several ranks; once). seconds: the --watchdog limit, 0 = no limit
// (communicator faults are still caught).
static inline void comm_watchdog_start(double seconds) {
    Watchdog& w = watchdog();
    if (w.started) return;
    w.started = true;
    w.timeout = seconds;
    if (getenv("FPDT_FAULT_COMM_ERROR") && !w.poll) w.poll = comm_fault_poll;
    std::thread([] {
        Watchdog& w = watchdog();
        const Comm& c = comm_world();
        for (;;) {
            sleep(1);
            const char* what = w.what;
            const double waited = now_s() - w.since;
            if (w.timeout > 0 && what && waited > w.timeout) {
                fprintf(stderr, "fpdt (rank %d of %d): watchdog: step %lld: waited %.0f s in %s for the other ranks "
                        "(--watchdog %.0f); ending the job\n", c.rank, c.size, w.step.load(), waited, what, w.timeout);
                fflush(stderr);
                _exit(1);
            }
            std::string (*poll)(double) = w.poll;
            const std::string fault = poll ? poll(w.timeout) : "";
            if (fault.empty()) continue;
            fprintf(stderr, "fpdt (rank %d of %d): step %lld: communicator fault in %s; ending the job\n", c.rank, c.size,
                    w.step.load(), fault.c_str());
            fflush(stderr);
            if (void (*abort_comm)() = w.abort_comm) abort_comm();
            MPI_Abort(MPI_COMM_WORLD, 1);
            _exit(1);
        }
    }).detach();
}

static inline void comm_init(int* argc, char*** argv) {
    Comm& c = comm_world();
    if (!launched_by_mpi()) return;
    MPI_CHECK(MPI_Init(argc, argv));
    c.mpi = true;
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c.rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c.size));
    MPI_Comm local;
    MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c.rank, MPI_INFO_NULL, &local));
    MPI_CHECK(MPI_Comm_rank(local, &c.local_rank));
    MPI_CHECK(MPI_Comm_size(local, &c.local_size));
    MPI_CHECK(MPI_Comm_free(&local));
    c.sp_rank = c.rank, c.sp_size = c.size;
    if (!fatal_hook()) fatal_hook() = comm_fatal_hook;
}

// Splits the world into sequence-parallel groups of sp consecutive ranks (sp divides the world
// size; the caller says so in one line first). Every rank calls it once, before any group work.
static inline void comm_split_groups(int sp) {
    Comm& c = comm_world();
    c.sp_size = sp, c.sp_rank = c.rank % sp, c.replica = c.rank / sp, c.replicas = c.size / sp;
    if (c.size == 1 || sp == c.size) return;  // the group is the world
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, c.replica, c.rank, &c.sp_mpi));
}

static inline void comm_finalize() {
    Comm& c = comm_world();
    if (c.mpi && c.sp_mpi != MPI_COMM_WORLD) MPI_Comm_free(&c.sp_mpi);
    if (c.mpi) MPI_Finalize();
}

// An error every rank finds the same way: rank 0 says it once, every rank exits 1.
[[noreturn]] static inline void fatal_all(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    Comm& c = comm_world();
    if (c.size == 1 || fatal_hook() != comm_fatal_hook) fatal("%s", buf);
    if (c.rank == 0) fprintf(stderr, "fpdt: %s\n", buf);
    fflush(stderr);
    MPI_Finalize();
    exit(1);
}

// An error that some ranks may see and others not (a file missing on one machine, a GPU's own
// free memory): every rank calls this at the same point with its own error ("" when fine). When
// any rank has one, the lowest such rank prints it, naming itself, and every rank exits 1. A
// collective, so every rank must reach it; an error found where the others may be elsewhere goes
// through fatal(), which aborts the job (comm_fatal_hook).
static inline void fatal_any(const std::string& err) {
    Comm& c = comm_world();
    if (c.size == 1 || fatal_hook() != comm_fatal_hook) {
        if (!err.empty()) fatal("%s", err.c_str());
        return;
    }
    int mine = err.empty() ? INT_MAX : c.rank, first = INT_MAX;
    MPI_COLLECTIVE("all-reduce (errors)", MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (first == INT_MAX) return;
    if (c.rank == first) fprintf(stderr, "fpdt (rank %d of %d): %s\n", c.rank, c.size, err.c_str());
    fflush(stderr);
    MPI_Barrier(MPI_COMM_WORLD);  // the message is out before any rank exits
    MPI_Finalize();
    exit(1);
}

static inline int mpi_count(size_t n) {
    if (n > (size_t)INT_MAX) fatal("a message of %zu elements is too large for one MPI call", n);
    return (int)n;
}

// ----------------------------------------------------------------------------
// The group (this rank's sequence-parallel group of N ranks)

// recv (N, n) = block r of every group rank's send (N, n): group rank r's send block s goes to
// group rank s. Values of `elem` bytes: 4 (fp32) or 2 (bf16).
static inline void comm_alltoall(const void* send, void* recv, size_t n, size_t elem) {
    Comm& c = comm_world();
    if (c.sp_size == 1) {
        if (recv != send) memcpy(recv, send, n * elem);
        return;
    }
    MPI_Datatype t = elem == 2 ? MPI_UINT16_T : MPI_FLOAT;
    MPI_COLLECTIVE("all-to-all", MPI_Alltoall(send, mpi_count(n), t, recv, mpi_count(n), t, c.sp_mpi));
}
// buf (n) summed over the group (one sequence's loss: each group rank holds its tokens' part)
static inline void comm_sp_allreduce(double* buf, size_t n) {
    if (comm_world().sp_size == 1) return;
    MPI_COLLECTIVE("all-reduce (group)", MPI_Allreduce(MPI_IN_PLACE, buf, mpi_count(n), MPI_DOUBLE, MPI_SUM, comm_world().sp_mpi));
}
// Every group rank's list of int32 (any length, a few per rank) joined in group-rank order, on
// every rank of the group (one sequence's document starts: each rank finds those among its tokens).
static inline std::vector<int32_t> comm_sp_allgather_i32(const std::vector<int32_t>& mine) {
    const Comm& c = comm_world();
    if (c.sp_size == 1) return mine;
    std::vector<int> counts(c.sp_size), at(c.sp_size, 0);
    int n = mpi_count(mine.size());
    MPI_COLLECTIVE("all-gather (counts)", MPI_Allgather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, c.sp_mpi));
    for (int r = 1; r < c.sp_size; r++) at[r] = at[r - 1] + counts[r - 1];
    std::vector<int32_t> all(at[c.sp_size - 1] + counts[c.sp_size - 1]);
    MPI_COLLECTIVE("all-gather (document starts)",
                   MPI_Allgatherv(mine.data(), n, MPI_INT32_T, all.data(), counts.data(), at.data(), MPI_INT32_T, c.sp_mpi));
    return all;
}

// ----------------------------------------------------------------------------
// The world (every rank)

static inline void comm_allreduce(float* buf, size_t n) {
    if (comm_world().size == 1) return;
    for (size_t o = 0; o < n; o += (size_t)1 << 30)
        MPI_COLLECTIVE("all-reduce", MPI_Allreduce(MPI_IN_PLACE, buf + o, mpi_count(std::min(n - o, (size_t)1 << 30)), MPI_FLOAT,
                                MPI_SUM, MPI_COMM_WORLD));
}
static inline void comm_allreduce(double* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("all-reduce", MPI_Allreduce(MPI_IN_PLACE, buf, mpi_count(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
}
static inline void comm_allreduce_min(const double* v, double* out, size_t n) {
    if (comm_world().size == 1) return (void)memcpy(out, v, n * sizeof(double));
    MPI_COLLECTIVE("all-reduce (min)", MPI_Allreduce(v, out, mpi_count(n), MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD));
}
static inline void comm_allreduce_max(double* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("all-reduce (max)", MPI_Allreduce(MPI_IN_PLACE, buf, mpi_count(n), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
}

// ZeRO-1: buf (W * n) is summed across the world and rank r keeps block r in shard (n).
static inline void comm_reduce_scatter(const float* buf, float* shard, size_t n) {
    if (comm_world().size == 1) {
        memcpy(shard, buf, n * sizeof(float));
        return;
    }
    MPI_COLLECTIVE("reduce-scatter", MPI_Reduce_scatter_block(buf, shard, mpi_count(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
}
// buf (W * n) = every rank's block; this rank's block is already in place at buf + rank * n.
static inline void comm_allgather(float* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("all-gather", MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, mpi_count(n), MPI_FLOAT, MPI_COMM_WORLD));
}
// ZeRO-2/3, one tensor group: buf (the group's range) summed across the world; rank r's part
// (counts[r] values, the parts contiguous and in rank order) lands in its out.
static inline void comm_reduce_scatterv(const float* buf, float* out, const int* counts) {
    if (comm_world().size == 1) return (void)memcpy(out, buf, counts[0] * sizeof(float));
    MPI_COLLECTIVE("reduce-scatter (ZeRO gradients)", MPI_Reduce_scatter(buf, out, counts, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
}
// ZeRO-3, one tensor group: every rank's part (counts[r] values at displs[r]) into buf; mine is
// this rank's.
static inline void comm_allgatherv(const float* mine, float* buf, const int* counts, const int* displs) {
    const Comm& c = comm_world();
    if (c.size == 1) return (void)memcpy(buf + displs[0], mine, counts[0] * sizeof(float));
    MPI_COLLECTIVE("all-gather (ZeRO-3 weights)", MPI_Allgatherv(mine, counts[c.rank], MPI_FLOAT, buf, counts, displs, MPI_FLOAT, MPI_COMM_WORLD));
}
// Rank 0's buf (n bytes) to every rank.
static inline void comm_broadcast(void* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("broadcast", MPI_Bcast(buf, mpi_count(n), MPI_BYTE, 0, MPI_COMM_WORLD));
}
// rank 0 receives every rank's n floats into all (P * n)
static inline void comm_gather(const float* mine, float* all, size_t n) {
    if (comm_world().size == 1) {
        memcpy(all, mine, n * sizeof(float));
        return;
    }
    MPI_COLLECTIVE("gather", MPI_Gather(mine, mpi_count(n), MPI_FLOAT, all, mpi_count(n), MPI_FLOAT, 0, MPI_COMM_WORLD));
}
// rank 0 receives every rank's value into all (P)
static inline void comm_gather_u64(uint64_t mine, uint64_t* all) {
    if (comm_world().size == 1) {
        all[0] = mine;
        return;
    }
    MPI_COLLECTIVE("gather (checksums)", MPI_Gather(&mine, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD));
}
static inline void comm_barrier() {
    if (comm_world().size > 1) MPI_COLLECTIVE("barrier", MPI_Barrier(MPI_COMM_WORLD));
}
// Every rank's string (up to 255 bytes), in rank order.
static inline std::vector<std::string> comm_allgather_str(const std::string& mine) {
    const int W = 256;
    std::vector<char> all((size_t)comm_world().size * W, 0), me(W, 0);
    snprintf(me.data(), W, "%s", mine.c_str());
    if (comm_world().size == 1) memcpy(all.data(), me.data(), W);
    else MPI_COLLECTIVE("all-gather (names)", MPI_Allgather(me.data(), W, MPI_CHAR, all.data(), W, MPI_CHAR, MPI_COMM_WORLD));
    std::vector<std::string> v;
    for (int r = 0; r < comm_world().size; r++) v.push_back(std::string(all.data() + (size_t)r * W));
    return v;
}

// Which ranks share a GPU, decided from the GPUs' identities (ids[r]: rank r's GPU's UUID, which
// every process that uses that GPU sees alike), not from counts: a launcher that gives each rank a
// GPU of its own through CUDA_VISIBLE_DEVICES shows every rank one device, its own, as device 0.
// count[r]: the ranks (r included) on rank r's GPU; first, second: the lowest two ranks found on
// one GPU (-1 when every rank has its own, which is what NCCL needs).
struct GpuSharing {
    std::vector<int> count;
    int first = -1, second = -1;
};
static inline GpuSharing gpu_sharing(const std::vector<std::string>& ids) {
    GpuSharing s;
    s.count.assign(ids.size(), 0);
    for (size_t r = 0; r < ids.size(); r++)
        for (size_t q = 0; q < ids.size(); q++)
            if (ids[q] == ids[r]) {
                s.count[r]++;
                if (q > r && s.first < 0) s.first = (int)r, s.second = (int)q;
            }
    return s;
}

#ifdef __CUDACC__
// ----------------------------------------------------------------------------
// NCCL for GPU buffers, on the given stream (no host synchronisation).

#define NCCL_CHECK(call)                                                                            \
    do {                                                                                            \
        ncclResult_t r_ = (call);                                                                   \
        if (r_ != ncclSuccess) fatal("NCCL error at %s:%d: %s", __FILE__, __LINE__, ncclGetErrorString(r_)); \
    } while (0)

// The two NCCL communicators, as the MPI ones above; null: GPU buffers go through MPI on host memory.
static inline ncclComm_t& nccl_world() {  // every rank: gradients and the ZeRO collectives
    static ncclComm_t c = nullptr;
    return c;
}
static inline ncclComm_t& nccl_sp() {  // this rank's sequence-parallel group: the all-to-alls
    static ncclComm_t c = nullptr;
    return c;
}

// The NCCL collectives in flight, oldest first, so that the watchdog can name one that does not
// complete: every issue site records an event on the communication stream behind its calls
// (comm_nccl_issued), and the watchdog thread drops the entries whose event has completed. The
// collectives run in order on that one stream, so when the ring is full the oldest entry can be
// dropped: the newer ones cannot complete before it.
struct NcclInFlight {
    static const int N = 64;
    std::mutex mu;
    int device = 0;
    cudaEvent_t ev[N] = {};
    const char* what[N] = {};
    unsigned long long head = 0, tail = 0;  // entries [head, tail) (mod N) are in flight
    unsigned long long watched = ~0ull;     // the entry at the front when the watchdog last looked,
    double watched_since = 0;               // and since when it has been there
};
static inline NcclInFlight& nccl_in_flight() {
    static NcclInFlight f;
    return f;
}

// After the NCCL calls of one collective on stream s.
static inline void comm_nccl_issued(const char* what, cudaStream_t s) {
    NcclInFlight& f = nccl_in_flight();
    std::lock_guard<std::mutex> lock(f.mu);
    if (f.tail - f.head == NcclInFlight::N) f.head++;
    CUDA_CHECK(cudaEventRecord(f.ev[f.tail % NcclInFlight::N], s));
    f.what[f.tail % NcclInFlight::N] = what;
    f.tail++;
    watchdog().last = what;
}

// The watchdog's poll (its thread, every second): NCCL's asynchronous error (a broken link, a
// rank that died with the others inside a collective), or a collective that has been the oldest in
// flight for more than `timeout` seconds (a rank stopped or hung; 0: no limit). "" when neither.
static inline std::string comm_nccl_poll(double timeout) {
    NcclInFlight& f = nccl_in_flight();
    static bool device_set = false;  // this thread's current device: the one the events belong to
    if (!device_set) device_set = cudaSetDevice(f.device) == cudaSuccess;
    ncclResult_t async = ncclSuccess;  // the world's communicator, then the group's if it has its own
    ncclComm_t bad = nccl_world();
    ncclResult_t asked = ncclCommGetAsyncError(bad, &async);
    if (asked == ncclSuccess && (async == ncclSuccess || async == ncclInProgress) && nccl_sp() != nccl_world())
        bad = nccl_sp(), asked = ncclCommGetAsyncError(bad, &async);
    std::lock_guard<std::mutex> lock(f.mu);
    while (f.head < f.tail && cudaEventQuery(f.ev[f.head % NcclInFlight::N]) == cudaSuccess) f.head++;
    const std::string what = std::string("NCCL ") + (f.head < f.tail ? f.what[f.head % NcclInFlight::N] : watchdog().last.load());
    if (asked != ncclSuccess) async = asked;
    if (async != ncclSuccess && async != ncclInProgress)
        return what + ": " + ncclGetErrorString(async) + " (" + ncclGetLastError(bad) + ")";
    if (f.head == f.tail || timeout <= 0) return "";
    if (f.watched != f.head) f.watched = f.head, f.watched_since = now_s();
    const double waited = now_s() - f.watched_since;
    if (waited <= timeout) return "";
    char b[256];
    snprintf(b, sizeof b, ": not completed after %.0f s (--watchdog %.0f): another rank stopped or hung, or a link is down",
             waited, timeout);
    return what + b;
}

// Every rank, after cudaSetDevice and comm_split_groups: world rank 0 makes the world's unique
// id, group rank 0 its group's, and MPI hands each to the others. One group: the same communicator.
// The watchdog then polls them.
static inline void comm_nccl_init() {
    Comm& c = comm_world();
    ncclUniqueId id;
    if (c.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    comm_broadcast(&id, sizeof id);
    NCCL_CHECK(ncclCommInitRank(&nccl_world(), c.size, id, c.rank));
    if (c.sp_size == c.size) {
        nccl_sp() = nccl_world();
    } else {
        if (c.sp_rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
        MPI_COLLECTIVE("broadcast (NCCL id of the group)", MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, c.sp_mpi));
        NCCL_CHECK(ncclCommInitRank(&nccl_sp(), c.sp_size, id, c.sp_rank));
    }
    NcclInFlight& f = nccl_in_flight();
    CUDA_CHECK(cudaGetDevice(&f.device));
    for (cudaEvent_t& e : f.ev) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    watchdog().abort_comm = [] {
        if (nccl_sp() != nccl_world()) ncclCommAbort(nccl_sp());
        ncclCommAbort(nccl_world());
    };
    watchdog().poll = comm_nccl_poll;
}

// The world's collectives on GPU buffers, on stream s: the twins of the MPI ones above.
// buf (W * n) summed over the world; rank r keeps block r in shard (n)
static inline void comm_reduce_scatter_nccl(const float* buf, float* shard, size_t n, cudaStream_t s) {
    NCCL_CHECK(ncclReduceScatter(buf, shard, n, ncclFloat, ncclSum, nccl_world(), s));
}
static inline void comm_allreduce_nccl(float* buf, size_t n, cudaStream_t s) {
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, nccl_world(), s));
}
// buf (W * n) = every rank's block; this rank's is in place at buf + rank * n
static inline void comm_allgather_nccl(float* buf, size_t n, cudaStream_t s) {
    NCCL_CHECK(ncclAllGather(buf + (size_t)comm_world().rank * n, buf, n, ncclFloat, nccl_world(), s));
}
// comm_reduce_scatterv's twin: each rank's part (counts[r] at displs[r] of buf) reduced to that
// rank, into out on this one (grouped ncclReduce, one per rank that owns a part)
static inline void comm_reduce_scatterv_nccl(float* buf, float* out, const int* counts, const int* displs, cudaStream_t s) {
    const Comm& c = comm_world();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c.size; r++)
        if (counts[r])
            NCCL_CHECK(ncclReduce(buf + displs[r], r == c.rank ? out : buf + displs[r], counts[r], ncclFloat, ncclSum, r, nccl_world(), s));
    NCCL_CHECK(ncclGroupEnd());
}
// comm_allgatherv's twin: every rank's part from its owner (grouped ncclBroadcast); mine is this rank's
static inline void comm_allgatherv_nccl(const float* mine, float* buf, const int* counts, const int* displs, cudaStream_t s) {
    const Comm& c = comm_world();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c.size; r++)
        if (counts[r])
            NCCL_CHECK(ncclBroadcast(r == c.rank ? mine : buf + displs[r], buf + displs[r], counts[r], ncclFloat, r, nccl_world(), s));
    NCCL_CHECK(ncclGroupEnd());
}

// recv (N, n) = block r of every group rank's send (N, n), as grouped point-to-point transfers
// inside the sequence-parallel group
static inline void comm_alltoall_nccl(const void* send, void* recv, size_t n, size_t elem, cudaStream_t s) {
    const Comm& c = comm_world();
    const ncclDataType_t t = elem == 2 ? ncclBfloat16 : ncclFloat;
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c.sp_size; r++) {
        NCCL_CHECK(ncclSend((const char*)send + r * n * elem, n, t, r, nccl_sp(), s));
        NCCL_CHECK(ncclRecv((char*)recv + r * n * elem, n, t, r, nccl_sp(), s));
    }
    NCCL_CHECK(ncclGroupEnd());
}
#endif

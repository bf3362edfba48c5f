// comm.h: the sequence-parallel group. One process is one rank; launch P of them with
// `mpirun -np P ./fpdt ...` (or srun). MPI moves CPU buffers (the CPU backend, and CI's real
// multi-process tests). NCCL moves GPU buffers when every rank has a GPU of its own (its unique
// id travels over MPI); ranks sharing a GPU (NCCL refuses that) stage GPU buffers through host
// memory and MPI (ulysses.h, zero.h). Without mpirun the program is a group of one and MPI is not touched
// at all, so `./fpdt train` needs no launcher.
//
// Errors: a problem every rank sees alike (a bad flag, a bad shape) is reported once, by rank 0,
// and every rank exits 1. A problem only one rank sees aborts the whole job (MPI_Abort) with a
// message naming the rank, so a dead or failing rank never leaves the others hanging.
#pragma once
#include <mpi.h>
#include <unistd.h>
#include <atomic>
#include <climits>
#include <thread>
#include <vector>
#include "common.h"
#ifdef __CUDACC__
#include <nccl.h>
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
    int rank = 0, size = 1, local_rank = 0, local_size = 1;  // local: the ranks on this machine
    bool mpi = false;  // MPI_Init was called (launched by mpirun/srun)
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

struct Watchdog {
    std::atomic<const char*> what{nullptr};  // the collective this rank is in, or null
    std::atomic<double> since{0};            // when it entered it
    std::atomic<long long> step{0};          // the step being computed (for the message)
    double timeout = 0;                      // 0: off
};
static inline Watchdog& watchdog() {
    static Watchdog w;
    return w;
}
struct CommWait {  // marks the time inside one collective
    explicit CommWait(const char* what) {
        watchdog().since = now_s();
        watchdog().what = what;
    }
    ~CommWait() { watchdog().what = nullptr; }
};
#define MPI_COLLECTIVE(what, call) \
    do {                           \
        CommWait wait_(what);      \
        MPI_CHECK(call);           \
    } while (0)

static inline void comm_watchdog_start(double seconds) {
    Watchdog& w = watchdog();
    if (w.timeout > 0 || seconds <= 0) return;
    w.timeout = seconds;
    std::thread([] {
        Watchdog& w = watchdog();
        for (;;) {
            sleep(1);
            const char* what = w.what;
            const double waited = now_s() - w.since;
            if (what && waited > w.timeout) {
                fprintf(stderr, "fpdt (rank %d of %d): watchdog: step %lld: waited %.0f s in %s for the other ranks "
                        "(--watchdog %.0f); ending the job\n", comm_world().rank, comm_world().size, w.step.load(), waited, what, w.timeout);
                fflush(stderr);
                _exit(1);
            }
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
    if (!fatal_hook()) fatal_hook() = comm_fatal_hook;
}

static inline void comm_finalize() {
    if (comm_world().mpi) MPI_Finalize();
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

// recv (P, n) = block r of every rank's send (P, n): rank r's send block s goes to rank s.
// recv (P, n) = block r of every rank's send (P, n); values of `elem` bytes: 4 (fp32) or 2 (bf16).
static inline void comm_alltoall(const void* send, void* recv, size_t n, size_t elem) {
    Comm& c = comm_world();
    if (c.size == 1) {
        if (recv != send) memcpy(recv, send, n * elem);
        return;
    }
    MPI_Datatype t = elem == 2 ? MPI_UINT16_T : MPI_FLOAT;
    MPI_COLLECTIVE("all-to-all", MPI_Alltoall(send, mpi_count(n), t, recv, mpi_count(n), t, MPI_COMM_WORLD));
}

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
static inline void comm_allreduce_max(double* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("all-reduce (max)", MPI_Allreduce(MPI_IN_PLACE, buf, mpi_count(n), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
}

// ZeRO-1: buf (P * n) is summed across ranks and rank r keeps block r in shard (n).
static inline void comm_reduce_scatter(const float* buf, float* shard, size_t n) {
    if (comm_world().size == 1) {
        memcpy(shard, buf, n * sizeof(float));
        return;
    }
    MPI_COLLECTIVE("reduce-scatter", MPI_Reduce_scatter_block(buf, shard, mpi_count(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
}
// buf (P * n) = every rank's block; this rank's block is already in place at buf + rank * n.
static inline void comm_allgather(float* buf, size_t n) {
    if (comm_world().size == 1) return;
    MPI_COLLECTIVE("all-gather", MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, mpi_count(n), MPI_FLOAT, MPI_COMM_WORLD));
}
// Every rank's list of int32 (any length, a few per rank) joined in rank order, on every rank:
// the count first, then the values.
static inline std::vector<int32_t> comm_allgather_i32(const std::vector<int32_t>& mine) {
    const Comm& c = comm_world();
    if (c.size == 1) return mine;
    std::vector<int> counts(c.size), at(c.size, 0);
    int n = mpi_count(mine.size());
    MPI_COLLECTIVE("all-gather (counts)", MPI_Allgather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, MPI_COMM_WORLD));
    for (int r = 1; r < c.size; r++) at[r] = at[r - 1] + counts[r - 1];
    std::vector<int32_t> all(at[c.size - 1] + counts[c.size - 1]);
    MPI_COLLECTIVE("all-gather (document starts)", MPI_Allgatherv(mine.data(), n, MPI_INT32_T, all.data(), counts.data(),
                                                                   at.data(), MPI_INT32_T, MPI_COMM_WORLD));
    return all;
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

#ifdef __CUDACC__
// ----------------------------------------------------------------------------
// NCCL for GPU buffers, on the given stream (no host synchronisation).

#define NCCL_CHECK(call)                                                                            \
    do {                                                                                            \
        ncclResult_t r_ = (call);                                                                   \
        if (r_ != ncclSuccess) fatal("NCCL error at %s:%d: %s", __FILE__, __LINE__, ncclGetErrorString(r_)); \
    } while (0)

static inline ncclComm_t& nccl_comm() {  // null: GPU buffers go through MPI on host memory
    static ncclComm_t c = nullptr;
    return c;
}

// Every rank, after cudaSetDevice: rank 0 makes the unique id, MPI hands it to the others.
static inline void comm_nccl_init() {
    Comm& c = comm_world();
    ncclUniqueId id;
    if (c.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    comm_broadcast(&id, sizeof id);
    NCCL_CHECK(ncclCommInitRank(&nccl_comm(), c.size, id, c.rank));
}

// recv (P, n) = block r of every rank's send (P, n), as grouped point-to-point transfers
static inline void comm_alltoall_nccl(const void* send, void* recv, size_t n, size_t elem, cudaStream_t s) {
    const Comm& c = comm_world();
    const ncclDataType_t t = elem == 2 ? ncclBfloat16 : ncclFloat;
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c.size; r++) {
        NCCL_CHECK(ncclSend((const char*)send + r * n * elem, n, t, r, nccl_comm(), s));
        NCCL_CHECK(ncclRecv((char*)recv + r * n * elem, n, t, r, nccl_comm(), s));
    }
    NCCL_CHECK(ncclGroupEnd());
}
#endif

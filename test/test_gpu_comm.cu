// NCCL and the watchdog on the GPU (comm.h): the collectives fpdt issues, the watchdog's ring of
// collectives in flight, and runs of two ranks over NCCL against one process. NCCL refuses two
// ranks of one communicator on one GPU, so on a machine with one GPU the collectives run on a
// communicator of one rank (the calls, the streams and the events; not the transfers between
// GPUs) and the tests that need two GPUs skip, saying so. Skipped where there is no GPU (failed
// with FPDT_EXPECT_GPU set).
#include <gtest/gtest.h>
#include <cuda_runtime.h>
#include <vector>
#include "comm.h"
#include "ops.cuh"
#include "test/cli.h"
#include "test/gpu_testutil.cuh"
#include "test/testutil.h"

static int gpu_count_here() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) cudaGetLastError(), n = 0;
    return n;
}
#define REQUIRE_GPUS(n)                                                                                         \
    do {                                                                                                        \
        REQUIRE_GPU();                                                                                          \
        if (gpu_count_here() < (n))                                                                             \
            GTEST_SKIP() << "needs " << (n) << " GPUs (NCCL refuses two ranks on one GPU); this machine has "   \
                         << gpu_count_here();                                                                   \
    } while (0)

// Spins until *flag (host memory the GPU reads) is set: holds a stream, as a peer that never
// arrives holds a collective.
static __global__ void wait_for_flag(volatile int* flag) {
    while (*flag == 0) {}
}

// A communicator of one rank (this process): the all-to-all with fp32 and bf16 elements, the
// all-reduce, reduce-scatter and all-gather of model_update, and ZeRO's grouped reduce and
// broadcast, each computing what it must with one rank (its own input); the watchdog's ring
// records each collective and drains once they are done, with no fault to report; and a
// collective stuck behind a stream that does not move is named once it has been the oldest in
// flight for longer than the limit, and no longer once it completes.
TEST(GpuNccl, OneRankCollectivesAndTheWatchdogRing) {
    REQUIRE_GPU();
    ASSERT_EQ(comm_world().size, 1);
    CUDA_CHECK(cudaSetDevice(0));
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    comm_nccl_init();
    ASSERT_NE(nccl_world(), nullptr);
    Rng r{505};
    const size_t n = 1000;
    const std::vector<float> a = randn(&r, n);
    DevBuf<float> send(a), recv(randn(&r, n)), out(randn(&r, n));
    comm_alltoall_nccl(send.p, recv.p, n, sizeof(float), s);
    comm_nccl_issued("all-to-all (test)", s);
    EXPECT_EQ(recv.get(), a);
    std::vector<bf16> h16(n);
    for (size_t i = 0; i < n; i++) h16[i] = bf16_from_float(a[i]);
    DevBuf<bf16> send16(h16), recv16(std::vector<bf16>(n, 0));
    comm_alltoall_nccl(send16.p, recv16.p, n, sizeof(bf16), s);
    comm_nccl_issued("all-to-all bf16 (test)", s);
    EXPECT_EQ(recv16.get(), h16);
    NCCL_CHECK(ncclAllReduce(send.p, out.p, n, ncclFloat, ncclSum, nccl_world(), s));
    comm_nccl_issued("all-reduce (test)", s);
    EXPECT_EQ(out.get(), a);
    DevBuf<float> shard(randn(&r, n));
    NCCL_CHECK(ncclReduceScatter(send.p, shard.p, n, ncclFloat, ncclSum, nccl_world(), s));
    EXPECT_EQ(shard.get(), a);
    DevBuf<float> gathered(randn(&r, n));
    NCCL_CHECK(ncclAllGather(send.p, gathered.p, n, ncclFloat, nccl_world(), s));
    EXPECT_EQ(gathered.get(), a);
    DevBuf<float> reduced(randn(&r, n)), bcast(randn(&r, n));
    NCCL_CHECK(ncclGroupStart());
    NCCL_CHECK(ncclReduce(send.p, reduced.p, n, ncclFloat, ncclSum, 0, nccl_world(), s));
    NCCL_CHECK(ncclBroadcast(send.p, bcast.p, n, ncclFloat, 0, nccl_world(), s));
    NCCL_CHECK(ncclGroupEnd());
    comm_nccl_issued("reduce + broadcast (test)", s);
    EXPECT_EQ(reduced.get(), a);
    EXPECT_EQ(bcast.get(), a);
    CUDA_CHECK(cudaStreamSynchronize(s));
    EXPECT_EQ(comm_nccl_poll(1.0), "");
    EXPECT_EQ(nccl_in_flight().head, nccl_in_flight().tail) << "done collectives still in flight";
    // stuck: the stream waits for a flag nobody sets yet
    int* flag = nullptr;
    CUDA_CHECK(cudaHostAlloc((void**)&flag, sizeof(int), cudaHostAllocMapped));
    *flag = 0;
    int* dflag = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer((void**)&dflag, flag, 0));
    wait_for_flag<<<1, 1, 0, s>>>(dflag);
    CUDA_LAUNCHED();
    NCCL_CHECK(ncclAllReduce(send.p, out.p, n, ncclFloat, ncclSum, nccl_world(), s));
    comm_nccl_issued("all-reduce (stuck test)", s);
    EXPECT_EQ(comm_nccl_poll(1.0), "");  // the first look starts its clock
    sleep(2);
    const std::string stuck = comm_nccl_poll(1.0);
    EXPECT_NE(stuck.find("NCCL all-reduce (stuck test): not completed after "), std::string::npos) << stuck;
    EXPECT_EQ(comm_nccl_poll(0), "") << "no limit, no fault";
    *(volatile int*)flag = 1;
    CUDA_CHECK(cudaStreamSynchronize(s));
    EXPECT_EQ(comm_nccl_poll(1.0), "");
    CUDA_CHECK(cudaFreeHost(flag));
    CUDA_CHECK(cudaStreamDestroy(s));
    // back to no communicator, as the other tests in this program expect
    watchdog().poll = nullptr, watchdog().abort_comm = nullptr;
    NCCL_CHECK(ncclCommDestroy(nccl_world()));
    nccl_world() = nullptr;
}

// Two ranks with a GPU each, over NCCL (the all-to-alls, the gradient all-reduce or
// reduce-scatter and all-gather, ZeRO's grouped reduces and broadcasts) print the single process's
// losses (fp32, 1e-5: only the order of the sums across ranks differs), and say NCCL in the header.
TEST(GpuNccl, TwoRanksOverNcclMatchOneProcess) {
    REQUIRE_GPUS(2);
    const std::string base = "./fpdt train --device gpu --eval-every 0 --model tiny --seq 256 --chunk-size 64 --steps 3 "
                             "--precision fp32";
    Out ref = run(base + " --offload 1");
    ASSERT_EQ(ref.rc, 0) << ref.out;
    const std::vector<double> l1 = losses(ref.out);
    ASSERT_EQ(l1.size(), 3u) << ref.out;
    for (const char* extra : {"--offload 1", "--offload 0", "--offload 1 --zero 1", "--offload 1 --zero 2",
                              "--offload 1 --zero 3", "--offload 0 --zero 3"}) {
        Out r = run(mpirun(2) + base + " --comm nccl " + extra);
        ASSERT_EQ(r.rc, 0) << extra << "\n" << r.out;
        EXPECT_NE(r.out.find(" NCCL |"), std::string::npos) << r.out;
        const std::vector<double> l = losses(r.out);
        ASSERT_EQ(l.size(), 3u) << r.out;
        for (size_t i = 0; i < 3; i++) EXPECT_NEAR(l[i], l1[i], 1e-5 * l1[i]) << extra << " step " << i + 1;
    }
}

// One GPU per rank through CUDA_VISIBLE_DEVICES (as Slurm's --gpus-per-task=1 does): each rank
// sees its own GPU as device 0, and the run still goes over NCCL (the GPUs' identities differ).
TEST(GpuNccl, OneGpuPerRankThroughVisibleDevicesUsesNccl) {
    REQUIRE_GPUS(2);
    Out r = run(mpirun(2) + "sh -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec ./fpdt train --device gpu "
                            "--eval-every 0 --model tiny --seq 256 --chunk-size 64 --steps 2'");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("ranks 2 NCCL"), std::string::npos) << r.out;
}

// A rank stopped (SIGSTOP) while the other waits in NCCL: the other's watchdog names the step and
// the collective it waits in and ends the job, non-zero, within seconds of --watchdog 3.
TEST(GpuNccl, StoppedRankEndsTheJobNamingTheCollective) {
    REQUIRE_GPUS(2);
    const std::string d = tmpdir();
    Out r = run("(" + start_past_step_3(d, mpirun(2) + "./fpdt train --device gpu --comm nccl --model tiny --seq 256 "
                                          "--chunk-size 64 --steps 100000 --eval-every 0 --watchdog 3") +
                stop_a_rank_and_wait() + ")");
    EXPECT_EQ(number_after(r.out, "rc="), 0) << "the job did not end: " << r.out;
    EXPECT_LT(number_after(r.out, "secs="), 30) << r.out;
    EXPECT_NE(r.out.find("(--watchdog 3)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("ending the job"), std::string::npos) << r.out;
}

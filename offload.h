// offload.h: memory on either backend, and the host store.
//
// Memory: the arenas' backing (host memory standing in for the device on the CPU backend;
// cudaMalloc and pinned cudaHostAlloc on the GPU), and the few fills and copies the schedule
// does outside the ops, each with its CUDA twin.
//
// The host store: every tensor whose size grows with the sequence (layer inputs, the gradient
// flowing back, one layer's Q/K/V, dO, LSE, delta, dQ; with --keep-attention and --keep-mlp
// every layer's Q/K/V and what the backward reads) is kept as a run of per-chunk tensors in a
// ChunkStore. With offload on, the chunks live in the pinned host arena and pass through a few
// device "slots" (two for double buffering, plus one for the chunk being produced); with offload
// off they live in the device arena and the same calls hand out direct pointers.
// The schedule (schedule.h) only ever calls:
//   store_prefetch(s, chunk, slot)   start bringing a chunk to the device (host-to-device stream)
//   store_use(s, chunk, slot)        make compute wait for it; the device pointer
//   store_produce(s, chunk, slot)    hand out a slot for compute to write a chunk's new value in
//   store_put(s, chunk, slot)        send that value home (device-to-host stream)
// Slots, by name (the schedule never writes a bare slot number):
//   slot_of(i)   chunk i of a store read in order: chunks alternate between slots 0 and 1, so
//                chunk i+1 is fetched into one while chunk i is read from the other
//   slot_of(i, flip)  the same alternation, swapped when flip is 1: for a store read in several
//                runs, each run starting in the slot the run before did not end in (phase 2's
//                query side), so a run's first chunk can come in while the last one's is in use
//   SLOT_NEW     slot 2: the chunk being produced (a layer output, q/k/v, lse, dO, delta), while
//                slots 0 and 1 still hold chunks being read
//   SLOT_SINGLE  slot 0, for a store read one chunk at a time, nothing fetched ahead (phase 2 of
//                the backward reads chunk j's layer input and gradient once per kv chunk j)
// A store may keep its host copy in bf16 (--precision bf16, offloaded): slots stay fp32, and the
// copies narrow (slot -> bf16 wire buffer -> host) and widen (host -> wire -> slot) on the copy
// streams. The schedule rounds such values to bf16 before it puts them, so the narrowing is
// exact and offload on or off computes the same numbers.
// On the CPU backend the copies are memcpy (cpu_copy: shared among the threads), done in order.
// On the GPU they are cudaMemcpyAsync on the copy streams, ordered by events only (no host
// synchronisation):
//   prefetch: copy-in waits for compute and the slot's last copy-out to be done with the slot,
//             and for the copy-out of the chunk it fetches (`chunk_put`), then copies, then
//             records `ready`;
//   use: compute waits for `ready`;
//   produce: compute waits for the slot's last copy-out and copy-in before overwriting it;
//   put: copy-out waits for compute to have produced the value and for any copy-in still
//        reading the host chunk, copies, records `put_done` and `chunk_put`.
#pragma once
#include "common.h"
#include "ops.cuh"  // the bf16 conversions
#ifdef __CUDACC__
#include <nvtx3/nvToolsExt.h>
#include "cuda_common.cuh"
#endif

// ----------------------------------------------------------------------------
// Arena backing

static inline void arena_back(Ctx* ctx, Arena* a) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        cudaError_t e = a->kind == Mem::Device ? cudaMalloc((void**)&a->base, a->cap)
                                               : cudaHostAlloc((void**)&a->base, a->cap, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            cudaGetLastError();  // clear it: we report it ourselves
            size_t freeb = 0, total = 0;
            cudaMemGetInfo(&freeb, &total);
            fatal("%s memory: this run needs %.1f MiB (%s); %s (%.1f MiB free of %.1f). Try a smaller "
                  "--chunk-size, --offload 1, more ranks, or see ./fpdt plan", a->name, a->cap / 1048576.0,
                  a->items.empty() ? "" : a->items[0].first.c_str(), cudaGetErrorString(e), freeb / 1048576.0,
                  total / 1048576.0);
        }
        if (a->kind == Mem::Device) {
            CUDA_CHECK(cudaMemset(a->base, 0, a->cap));
            CUDA_CHECK(cudaDeviceSynchronize());  // cudaMemset may return before it is done
        } else {
            memset(a->base, 0, a->cap);
        }
        return;
    }
#endif
    (void)ctx;
    a->base = (char*)calloc(a->cap, 1);
    if (!a->base) fatal("out of memory: could not allocate the %.1f MiB %s arena", a->cap / 1048576.0, a->name);
}

static inline void arena_unback(Ctx* ctx, Arena* a) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        if (a->base) CUDA_CHECK(a->kind == Mem::Device ? cudaFree(a->base) : cudaFreeHost(a->base));
        a->base = nullptr;
        return;
    }
#endif
    (void)ctx;
    free(a->base);
    a->base = nullptr;
}

// ----------------------------------------------------------------------------
// Fills and copies. `dev` pointers are in the device arena, `host` pointers in ordinary or pinned
// host memory. Uploads and downloads are synchronous: they are for set-up, checkpoints, the
// once-per-step reads, and the MPI staging of ranks that share a GPU (the one place they run inside
// the chunk loops; NCCL does not need them).

#ifdef __CUDACC__
// x (n) = v; twin of the loop in dev_fill
static __global__ void fill_kernel(float* x, float v, size_t n) {
    GRID_STRIDE_LOOP(i, n) x[i] = v;
}
// pos (n) = first + i; twin of the loop in dev_iota
static __global__ void iota_kernel(int32_t* pos, int32_t first, size_t n) {
    GRID_STRIDE_LOOP(i, n) pos[i] = first + (int32_t)i;
}
#endif

// The CPU backend's copies and zero-fills: above 256 KiB, in blocks shared among the threads (on
// one thread the others wait: such copies were 3% of a small 4096 step, all on one core).
// op(offset, bytes) on each block of [0, bytes).
static const size_t CPU_COPY_BLOCK = 64 * 1024;
template <typename Op>
static inline void cpu_in_blocks(size_t bytes, Op op) {
    if (bytes < 4 * CPU_COPY_BLOCK) return op(0, bytes);
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < bytes; b += CPU_COPY_BLOCK) op(b, std::min(CPU_COPY_BLOCK, bytes - b));
}
static inline void cpu_copy(void* dst, const void* src, size_t bytes) {
    cpu_in_blocks(bytes, [=](size_t b, size_t n) { memcpy((char*)dst + b, (const char*)src + b, n); });
}
static inline void cpu_zero(void* dst, size_t bytes) {
    cpu_in_blocks(bytes, [=](size_t b, size_t n) { memset((char*)dst + b, 0, n); });
}

static inline void dev_zero(Ctx* ctx, void* dev, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaMemsetAsync(dev, 0, bytes, ctx->g->compute));
        return;
    }
#endif
    (void)ctx;
    cpu_zero(dev, bytes);
}

static inline void dev_fill(Ctx* ctx, float* dev, float v, size_t n) {
#ifdef __CUDACC__
    if (n == 0) return;
    if (ctx->gpu) {
        fill_kernel<<<elementwise_grid(n), 256, 0, ctx->g->compute>>>(dev, v, n);
        CUDA_LAUNCHED();
        return;
    }
#endif
    (void)ctx;
    for (size_t i = 0; i < n; i++) dev[i] = v;
}

static inline void dev_iota(Ctx* ctx, int32_t* dev, int32_t first, size_t n) {
#ifdef __CUDACC__
    if (n == 0) return;
    if (ctx->gpu) {
        iota_kernel<<<elementwise_grid(n), 256, 0, ctx->g->compute>>>(dev, first, n);
        CUDA_LAUNCHED();
        return;
    }
#endif
    (void)ctx;
    for (size_t i = 0; i < n; i++) dev[i] = first + (int32_t)i;
}

// device to device, in order on the compute stream
static inline void dev_copy(Ctx* ctx, void* dst, const void* src, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->g->compute));
        return;
    }
#endif
    (void)ctx;
    cpu_copy(dst, src, bytes);
}

// device to host without blocking the host (pinned destination), in order on the compute stream
static inline void dev_to_host_async(Ctx* ctx, void* host, const void* dev, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, ctx->g->compute));
        return;
    }
#endif
    (void)ctx;
    memcpy(host, dev, bytes);
}

// host (pinned, not written again before the end of the pass) to device, in order on the compute stream
static inline void dev_upload_async(Ctx* ctx, void* dev, const void* host, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->g->compute));
        return;
    }
#endif
    (void)ctx;
    memcpy(dev, host, bytes);
}

static inline void dev_upload(Ctx* ctx, void* dev, const void* host, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaDeviceSynchronize());  // nothing queued still uses the destination
        CUDA_CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaDeviceSynchronize());  // from pageable memory it may return before landing
        return;
    }
#endif
    (void)ctx;
    memcpy(dev, host, bytes);
}

static inline void dev_download(Ctx* ctx, void* host, const void* dev, size_t bytes) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        CUDA_CHECK(cudaDeviceSynchronize());  // every stream's work on it is done
        CUDA_CHECK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
        return;
    }
#endif
    (void)ctx;
    memcpy(host, dev, bytes);
}

// Waits for everything queued (the end of a step; checkpoints).
static inline void dev_sync(Ctx* ctx) {
#ifdef __CUDACC__
    if (ctx->gpu) CUDA_CHECK(cudaDeviceSynchronize());
#endif
    (void)ctx;
}

// ----------------------------------------------------------------------------
// The host store

enum { SLOT_SINGLE = 0, SLOT_NEW = 2 };            // see the header
static inline int slot_of(int chunk, int flip = 0) { return (chunk + flip) % 2; }

struct CUevent_st;
struct ChunkStore {
    const char* name = "";
    size_t chunk_bytes = 0;  // bytes per chunk on the device (in a slot)
    size_t host_bytes = 0;   // bytes per chunk where the data lives (half of chunk_bytes when compact)
    size_t nchunks = 0;      // 64 bits: (layers + 1) x chunks for the layer inputs can pass 2^31
    bool on_host = false;  // offloaded: data in the host arena, staged through slots
    bool compact = false;  // on_host with fp32 slots and a bf16 host copy
    char* data = nullptr;  // (nchunks, host_bytes), host arena if on_host, else device arena
    char* slot[3] = {};    // device staging buffers (only when on_host)
    bf16 *wire_in = nullptr, *wire_out = nullptr;  // (chunk_bytes / 4) device: the bf16 side of the copies (compact)
    int nslots = 0;
    int64_t in_slot[3] = {-1, -1, -1};  // which chunk a slot was last filled with (for checks)
    // GPU events (cudaEvent_t is CUevent_st*; declared in every build so that code compiled by g++
    // and by nvcc agrees on the layout of this struct and of Model): per slot, its copy-in landed
    // and its last copy-out finished; per chunk, its last copy-out finished (a fetch of that chunk
    // waits for it, and for nothing else on the copy-out stream)
    CUevent_st *ready[3] = {}, *put_done[3] = {};
    std::vector<CUevent_st*> chunk_put;
};

// Takes the store's memory: the chunks from the host arena (offload) or the device arena, and
// nslots device staging buffers when offloaded. bf16: an offloaded store of fp32 values keeps its
// host copy in bf16 (the values must be bf16-rounded when put); without offload it changes nothing.
static inline void store_init(Ctx* ctx, ChunkStore* s, const char* name, size_t chunk_bytes, size_t nchunks,
                              bool offload, int nslots, Arena* dev, Arena* host, bool bf16_host = false) {
    s->name = name;
    s->chunk_bytes = chunk_bytes;
    s->nchunks = nchunks;
    s->on_host = offload;
    s->compact = offload && bf16_host;
    s->host_bytes = s->compact ? chunk_bytes / 2 : chunk_bytes;
    s->nslots = nslots;
    s->data = (char*)arena_take(offload ? host : dev, s->host_bytes * nchunks, name);
    if (offload)
        for (int k = 0; k < nslots; k++) s->slot[k] = (char*)arena_take(dev, chunk_bytes, name);
    if (s->compact) {  // (the CPU backend converts straight between slot and host, but takes them too,
                       // so that its arenas, which tests and the planner read, are the GPU's)
        s->wire_in = (bf16*)arena_take(dev, s->host_bytes, name);
        s->wire_out = (bf16*)arena_take(dev, s->host_bytes, name);
    }
#ifdef __CUDACC__
    if (ctx->gpu && offload && !dev->count_only) {
        for (int k = 0; k < nslots; k++) {
            CUDA_CHECK(cudaEventCreateWithFlags(&s->ready[k], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&s->put_done[k], cudaEventDisableTiming));
        }
        s->chunk_put.assign(nchunks, nullptr);
        for (CUevent_st*& e : s->chunk_put) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
#endif
    (void)ctx;
}

static inline void store_free(Ctx* ctx, ChunkStore* s) {
#ifdef __CUDACC__
    if (ctx->gpu) {
        for (CUevent_st** e : {&s->ready[0], &s->ready[1], &s->ready[2], &s->put_done[0], &s->put_done[1], &s->put_done[2]})
            if (*e) {
                CUDA_CHECK(cudaEventDestroy(*e));
                *e = nullptr;
            }
        for (CUevent_st* e : s->chunk_put) CUDA_CHECK(cudaEventDestroy(e));
        s->chunk_put.clear();
    }
#endif
    (void)ctx, (void)s;
}

static inline char* store_host_ptr(ChunkStore* s, int64_t chunk) {
    if (chunk < 0 || (size_t)chunk >= s->nchunks) fatal("internal: store %s has no chunk %lld", s->name, (long long)chunk);
    return s->data + (size_t)chunk * s->host_bytes;
}

#ifdef __CUDACC__
// An event recorded now on `from`, waited for by `to`: `to` runs nothing more until `from` has
// done everything queued so far.
static inline void stream_after(cudaStream_t to, cudaStream_t from) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(e, from));
    CUDA_CHECK(cudaStreamWaitEvent(to, e, 0));
    CUDA_CHECK(cudaEventDestroy(e));  // safe: destruction is deferred until the event completes
}
#endif

static inline void store_prefetch(Ctx* ctx, ChunkStore* s, int64_t chunk, int slot) {
    if (!s->on_host) return;
    s->in_slot[slot] = chunk;
#ifdef __CUDACC__
    if (ctx->gpu) {
        GpuCtx* g = ctx->g;
        store_host_ptr(s, chunk);                                         // (checks the chunk number)
        stream_after(g->h2d, g->compute);                                 // compute is done with the slot,
        CUDA_CHECK(cudaStreamWaitEvent(g->h2d, s->put_done[slot], 0));    // so is its last copy-out,
        CUDA_CHECK(cudaStreamWaitEvent(g->h2d, s->chunk_put[chunk], 0));  // and the host copy is complete
                                                                          // (an event never recorded waits for nothing)
        TraceScope ts(ctx, s->name, TRACK_COPY_IN, chunk, s->host_bytes);
        if (s->compact) {  // bf16 over the link, widened on the copy stream (it owns wire_in)
            CUDA_CHECK(cudaMemcpyAsync(s->wire_in, store_host_ptr(s, chunk), s->host_bytes, cudaMemcpyHostToDevice, g->h2d));
            from_bf16_gpu(g->h2d, (float*)s->slot[slot], s->wire_in, s->chunk_bytes / 4);
        } else {
            CUDA_CHECK(cudaMemcpyAsync(s->slot[slot], store_host_ptr(s, chunk), s->chunk_bytes, cudaMemcpyHostToDevice, g->h2d));
        }
        CUDA_CHECK(cudaEventRecord(s->ready[slot], g->h2d));
        return;
    }
#endif
    TraceScope ts(ctx, s->name, TRACK_COPY_IN, chunk, s->host_bytes);
    if (s->compact) from_bf16_cpu((float*)s->slot[slot], (const bf16*)store_host_ptr(s, chunk), s->chunk_bytes / 4);
    else cpu_copy(s->slot[slot], store_host_ptr(s, chunk), s->chunk_bytes);
}

template <typename T = float>
static inline T* store_use(Ctx* ctx, ChunkStore* s, int64_t chunk, int slot) {
    if (!s->on_host) return (T*)store_host_ptr(s, chunk);
    if (s->in_slot[slot] != chunk) fatal("internal: %s chunk %lld used before it was prefetched", s->name, (long long)chunk);
#ifdef __CUDACC__
    if (ctx->gpu) CUDA_CHECK(cudaStreamWaitEvent(ctx->g->compute, s->ready[slot], 0));
#endif
    (void)ctx;
    return (T*)s->slot[slot];
}

template <typename T = float>
static inline T* store_produce(Ctx* ctx, ChunkStore* s, int64_t chunk, int slot) {
    if (!s->on_host) return (T*)store_host_ptr(s, chunk);
    s->in_slot[slot] = chunk;
#ifdef __CUDACC__
    if (ctx->gpu) {  // the slot's last copy-out has read it, and no copy-in is still writing it
        CUDA_CHECK(cudaStreamWaitEvent(ctx->g->compute, s->put_done[slot], 0));
        CUDA_CHECK(cudaStreamWaitEvent(ctx->g->compute, s->ready[slot], 0));
    }
#endif
    (void)ctx;
    return (T*)s->slot[slot];
}

static inline void store_put(Ctx* ctx, ChunkStore* s, int64_t chunk, int slot) {
    if (!s->on_host) return;
#ifdef __CUDACC__
    if (ctx->gpu) {
        GpuCtx* g = ctx->g;
        stream_after(g->d2h, g->compute);  // the value has been produced
        for (int k = 0; k < s->nslots; k++)  // and no copy-in still reads the host chunk it replaces
            if (s->in_slot[k] == chunk) CUDA_CHECK(cudaStreamWaitEvent(g->d2h, s->ready[k], 0));
        TraceScope ts(ctx, s->name, TRACK_COPY_OUT, chunk, s->host_bytes);
        if (s->compact) {  // narrowed on the copy stream (it owns wire_out), bf16 over the link
            to_bf16_gpu(g->d2h, s->wire_out, (const float*)s->slot[slot], s->chunk_bytes / 4);
            CUDA_CHECK(cudaMemcpyAsync(store_host_ptr(s, chunk), s->wire_out, s->host_bytes, cudaMemcpyDeviceToHost, g->d2h));
        } else {
            CUDA_CHECK(cudaMemcpyAsync(store_host_ptr(s, chunk), s->slot[slot], s->chunk_bytes, cudaMemcpyDeviceToHost, g->d2h));
        }
        CUDA_CHECK(cudaEventRecord(s->put_done[slot], g->d2h));
        CUDA_CHECK(cudaEventRecord(s->chunk_put[chunk], g->d2h));
        return;
    }
#endif
    TraceScope ts(ctx, s->name, TRACK_COPY_OUT, chunk, s->host_bytes);
    if (s->compact) to_bf16_cpu((bf16*)store_host_ptr(s, chunk), (const float*)s->slot[slot], s->chunk_bytes / 4);
    else cpu_copy(store_host_ptr(s, chunk), s->slot[slot], s->chunk_bytes);
}

// A chunk's value from ordinary host memory (set-up: the tokens of a step).
static inline void store_write(Ctx* ctx, ChunkStore* s, int64_t chunk, const void* src) {
    if (s->compact) fatal("internal: store_write to the bf16 store %s", s->name);
    if (s->on_host) {
        dev_sync(ctx);  // no copy still reading the old value
        memcpy(store_host_ptr(s, chunk), src, s->chunk_bytes);
    } else {
        dev_upload(ctx, store_host_ptr(s, chunk), src, s->chunk_bytes);
    }
}

#ifdef __CUDACC__
// ----------------------------------------------------------------------------
// GPU side of the trace: NVTX ranges for Nsight Systems, and events on the streams whose times
// replace the host's issue times in the --trace file.

static inline cudaStream_t track_stream(Ctx* ctx, int track) {
    return track == TRACK_COPY_IN ? ctx->g->h2d : track == TRACK_COPY_OUT ? ctx->g->d2h : ctx->g->compute;
}

static inline void gpu_mark(Ctx* ctx, int track, const char* name, bool begin, CUevent_st** ev) {
    if (begin) nvtxRangePushA(name);
    else nvtxRangePop();
    if (!(ctx->trace && ctx->trace->on)) return;
    CUDA_CHECK(cudaEventCreate(ev));
    CUDA_CHECK(cudaEventRecord(*ev, track_stream(ctx, track)));
}

// At the start of the traced step, with every stream idle.
static inline void trace_gpu_start(Ctx* ctx) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaEventCreate(&ctx->trace->origin_ev));
    CUDA_CHECK(cudaEventRecord(ctx->trace->origin_ev, ctx->g->compute));
}

// After the step: every event's time from the origin replaces the host times.
static inline void trace_gpu_finish(Ctx* ctx) {
    Trace* t = ctx->trace;
    CUDA_CHECK(cudaDeviceSynchronize());
    for (TraceEvent& e : t->events) {
        if (!e.ev[0] || !e.ev[1]) continue;
        float a = 0, b = 0;
        CUDA_CHECK(cudaEventElapsedTime(&a, t->origin_ev, e.ev[0]));
        CUDA_CHECK(cudaEventElapsedTime(&b, t->origin_ev, e.ev[1]));
        e.t0 = a / 1e3, e.t1 = b / 1e3;
        CUDA_CHECK(cudaEventDestroy(e.ev[0]));
        CUDA_CHECK(cudaEventDestroy(e.ev[1]));
        e.ev[0] = e.ev[1] = nullptr;
    }
    CUDA_CHECK(cudaEventDestroy(t->origin_ev));
    t->origin_ev = nullptr;
}
#endif

// offload.h: the host store. Every tensor whose size grows with the sequence (layer inputs, the
// gradient flowing back, one layer's Q/K/V, dO, LSE, delta, dQ) is kept as a run of per-chunk
// tensors in a ChunkStore. With offload on, the chunks live in the pinned host arena and pass
// through a few device "slots" (two for double buffering, plus one for the chunk being produced);
// with offload off they live in the device arena and the same calls hand out direct pointers.
//
// The schedule (model.h) only ever calls:
//   store_prefetch(s, chunk, slot)   start bringing a chunk to the device (host-to-device stream)
//   store_use(s, chunk, slot)        wait for it, get the device pointer
//   store_out(s, chunk, slot)        where to write a chunk's new value on the device
//   store_put(s, chunk, slot)        send that value home (device-to-host stream)
// On the CPU backend the copies are memcpy, done in order; on the GPU they map onto the copy
// streams and CUDA events, which is why prefetch and use are separate calls.
#pragma once
#include "common.h"

struct ChunkStore {
    const char* name = "";
    size_t chunk_bytes = 0;  // bytes per chunk
    int nchunks = 0;
    bool on_host = false;  // offloaded: data in the host arena, staged through slots
    char* data = nullptr;  // (nchunks, chunk_bytes), host arena if on_host, else device arena
    char* slot[3] = {};    // device staging buffers (only when on_host)
    int nslots = 0;
    int in_slot[3] = {-1, -1, -1};  // which chunk a slot was last filled with (for checks)
};

// Takes the store's memory: the chunks from the host arena (offload) or the device arena, and
// nslots device staging buffers when offloaded.
static inline void store_init(ChunkStore* s, const char* name, size_t chunk_bytes, int nchunks, bool offload,
                              int nslots, Arena* dev, Arena* host) {
    s->name = name;
    s->chunk_bytes = chunk_bytes;
    s->nchunks = nchunks;
    s->on_host = offload;
    s->nslots = nslots;
    s->data = (char*)arena_take(offload ? host : dev, chunk_bytes * nchunks, name);
    if (offload)
        for (int k = 0; k < nslots; k++) s->slot[k] = (char*)arena_take(dev, chunk_bytes, name);
}

static inline char* store_host_ptr(ChunkStore* s, int chunk) {
    if (chunk < 0 || chunk >= s->nchunks) fatal("internal: store %s has no chunk %d", s->name, chunk);
    return s->data + (size_t)chunk * s->chunk_bytes;
}

static inline void store_prefetch(Ctx* ctx, ChunkStore* s, int chunk, int slot) {
    if (!s->on_host) return;
    TraceScope ts(ctx, s->name, TRACK_COPY_IN, chunk, s->chunk_bytes);
    memcpy(s->slot[slot], store_host_ptr(s, chunk), s->chunk_bytes);
    s->in_slot[slot] = chunk;
}

template <typename T = float>
static inline T* store_use(Ctx* ctx, ChunkStore* s, int chunk, int slot) {
    if (!s->on_host) return (T*)store_host_ptr(s, chunk);
    if (s->in_slot[slot] != chunk) fatal("internal: %s chunk %d used before it was prefetched", s->name, chunk);
    (void)ctx;
    return (T*)s->slot[slot];
}

// prefetch + use, for the places where there is nothing to overlap with
template <typename T = float>
static inline T* store_get(Ctx* ctx, ChunkStore* s, int chunk, int slot) {
    store_prefetch(ctx, s, chunk, slot);
    return store_use<T>(ctx, s, chunk, slot);
}

template <typename T = float>
static inline T* store_out(ChunkStore* s, int chunk, int slot) {
    if (!s->on_host) return (T*)store_host_ptr(s, chunk);
    s->in_slot[slot] = chunk;
    return (T*)s->slot[slot];
}

static inline void store_put(Ctx* ctx, ChunkStore* s, int chunk, int slot) {
    if (!s->on_host) return;
    TraceScope ts(ctx, s->name, TRACK_COPY_OUT, chunk, s->chunk_bytes);
    memcpy(store_host_ptr(s, chunk), s->slot[slot], s->chunk_bytes);
}

// What the fp32 walk (linattn/chunk_walk.cuh) and the tensor-core walk
// (linattn/walk_mma.cuh) share: a walk block's coordinates and token range
// (on linattn/coords.cuh), and where its starting state comes from and its
// final state goes.
#pragma once
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"
#include "linattn/coords.cuh"

namespace linattn {

// One walk block: (sequence-head, value tile) from grid x, partition from
// grid y, and the partition's tokens [t_begin, t_end) within the sequence.
struct WalkBlock {
    bool active;
    int64_t sh;
    int64_t head;
    int tile;
    int part;
    SeqRange r;
    int64_t t_begin;
    int64_t t_end;
};

__device__ __forceinline__ WalkBlock walk_block(const LinattnForwardParams& p) {
    WalkBlock b;
    const SeqHeadTile g = seq_head_tile(p.m_tiles, p.heads);
    b.tile = g.tile;
    b.sh = g.sh;
    b.head = g.head;
    b.part = (int)blockIdx.y;
    b.r = seq_range(p.cu_seqlens, (int64_t)g.seq, p.tokens);
    b.t_begin = (int64_t)b.part * p.part_len;
    b.t_end = b.r.len < b.t_begin + p.part_len ? b.r.len : b.t_begin + p.part_len;
    // Partitions past the end of a (shorter) sequence have nothing to do; the
    // state combine never reads their slots. Partition 0 always runs so that an
    // empty sequence still passes its initial state through.
    b.active = b.part == 0 || b.t_begin < b.r.len;
    return b;
}

// The block's starting state (full d x m rows; null: zeros).
__device__ __forceinline__ void walk_state_source(const LinattnForwardParams& p, const WalkBlock& b, const float*& s,
                                                  const float*& z) {
    const int64_t dm = p.d * p.m;
    s = nullptr;
    z = nullptr;
    if (p.state_load == LINATTN_STATE_INITIAL) {
        s = ptr<const float>(p.state_in_s) + b.sh * dm;
        z = ptr<const float>(p.state_in_z) + b.sh * p.d;
    } else if (p.state_load == LINATTN_STATE_WORK_PART || p.state_load == LINATTN_STATE_WORK_TOTAL) {
        const int64_t slot = b.sh * p.num_parts + (p.state_load == LINATTN_STATE_WORK_PART ? b.part : 0);
        s = ptr<const float>(p.work_s) + slot * dm;
        z = ptr<const float>(p.work_z) + slot * p.d;
    }
}

// Where the block's final state goes (null: not stored).
__device__ __forceinline__ void walk_state_sink(const LinattnForwardParams& p, const WalkBlock& b, float*& s, float*& z) {
    const int64_t dm = p.d * p.m;
    s = nullptr;
    z = nullptr;
    if (p.state_store == LINATTN_STORE_FINAL) {
        s = ptr<float>(p.state_out_s) + b.sh * dm;
        z = ptr<float>(p.state_out_z) + b.sh * p.d;
    } else if (p.state_store != LINATTN_STORE_NONE) {
        const int64_t slot = b.sh * p.num_parts + b.part;
        s = ptr<float>(p.work_s) + slot * dm;
        z = ptr<float>(p.work_z) + slot * p.d;
    }
}

}  // namespace linattn

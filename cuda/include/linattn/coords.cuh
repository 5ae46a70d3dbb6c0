// Block and sequence coordinates shared by the forward walks
// (linattn/walk_common.cuh) and the backward walks (linattn/backward_walk.cuh):
// grid x enumerates (sequence, head) pairs times tiles, tile fastest, and a
// sequence's tokens come from the batch (fixed length) or from cu_seqlens
// (packed varlen).
#pragma once
#include <cstdint>
#include "linattn/params.h"
#include "linattn/dtype.cuh"

namespace linattn {

// Where one sequence's tokens are: batch index, first token, length.
struct SeqRange {
    int64_t batch;
    int64_t start;
    int64_t len;
};

// Sequence s's tokens. The forward walks index cu_seqlens with an int64_t
// s, the backward walks with the unsigned one from seq_head_tile: the same
// values, but ptxas allocates differently (with int64_t the backward's
// prepdq_f16 spills 28 bytes on sm_90), so each keeps the index type its
// register budget was tuned with.
template <typename Index>
__device__ __forceinline__ SeqRange seq_range(linattn_ptr cu_seqlens, Index s, int64_t tokens) {
    SeqRange r;
    if (cu_seqlens != 0) {
        const int64_t* cu = ptr<const int64_t>(cu_seqlens);
        r.batch = 0;
        r.start = cu[s];
        r.len = cu[s + 1] - cu[s];
    } else {
        r.batch = s;
        r.start = 0;
        r.len = tokens;
    }
    return r;
}

// This block's sequence-head sh = seq * heads + head and its tile, from
// blockIdx.x = sh * tiles + tile.
struct SeqHeadTile {
    int64_t sh;
    int64_t head;
    unsigned seq;
    int tile;
};

__device__ __forceinline__ SeqHeadTile seq_head_tile(int tiles, int64_t heads) {
    // 32-bit index math: the plans keep seq-heads x tiles within the grid's
    // 2^31 - 1 (64-bit division is a called subroutine on the GPU).
    const unsigned bx = blockIdx.x;
    const unsigned sh32 = bx / (unsigned)tiles;
    const unsigned seq = sh32 / (unsigned)heads;
    SeqHeadTile g;
    g.tile = (int)(bx - sh32 * (unsigned)tiles);
    g.sh = sh32;
    g.seq = seq;
    g.head = sh32 - seq * (unsigned)heads;
    return g;
}

}  // namespace linattn

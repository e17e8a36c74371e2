// Host-side launch choices of torch.ops.balcony.decode_attention on CUDA, from the shapes: whether the
// kernel takes the head dimension, which tensors are copied to a contiguous layout first, and how the
// cache is cut into splits. One definition for csrc/cuda/decode_attention.cu and for the CPU execution
// harness's entry (csrc/harness/run_decode_attention.cpp), so the harness launches exactly what the op
// launches. Torch-free and CUDA-free: integer arithmetic on shapes, strides and addresses.
#pragma once
#include <algorithm>
#include <cstdint>

#include "balcony/pack.h"

namespace balcony::cuda {

// Whether the CUDA kernel takes head dimension D: a multiple of the 16-byte pack and at most 256
// (the op raises otherwise).
inline bool decode_attention_head_dim_ok(int64_t D, int64_t elem_bytes) {
  return D % pack_elems(elem_bytes) == 0 && D <= 256;
}

// Whether a tensor is used in place: a 16-byte aligned base and every stride but the innermost
// (`strides[0 .. dims - 2]`) a multiple of the pack (pack_aligned, balcony/pack.h). Otherwise the op
// copies it to a contiguous tensor.
inline bool decode_attention_packed(const void* data, const int64_t* strides, int dims, int64_t pack) {
  return pack_aligned(pack, data, strides, dims - 1);
}

// Blocks of the split kernel per (sequence, kv head): one per 8 query heads of the group.
inline int64_t decode_attention_head_groups(int64_t G) { return (G + 7) / 8; }

constexpr int64_t kDecodeMinChunk = 64;      // the automatic choice keeps splits at least this long
constexpr int64_t kDecodeMaxSplits = 65535;  // grid.x limit the op enforces (it raises above)

// Automatic split count (num_splits <= 0): enough blocks to fill the GPU a few times over, with
// splits of at least kDecodeMinChunk positions.
// NOTE: each block streams its split with 4 warps; below ~64 positions per split the query load
// and the partial write/merge outweigh the K/V reads.
inline int64_t decode_attention_auto_splits(int64_t sm_count, int64_t B, int64_t Hkv, int64_t G, int64_t S) {
  const int64_t blocks = std::max<int64_t>(1, B * Hkv * decode_attention_head_groups(G));
  const int64_t want = (4 * sm_count + blocks - 1) / blocks;
  const int64_t most = std::max<int64_t>(1, (S + kDecodeMinChunk - 1) / kDecodeMinChunk);
  return std::max<int64_t>(1, std::min(want, most));
}

struct DecodeAttentionSplits {
  int64_t num_splits;  // > 1: partials in float32 scratch part_ml [B,Hq,splits,2] and part_o [B,Hq,splits,D], merged
  int64_t chunk;       // positions per split: split j covers [j * chunk, min((j + 1) * chunk, len))
};

// The splits the op launches: `requested` when > 0, else the automatic choice; clamped to [1, max(1, S)];
// chunk = ceil(S / num_splits). A num_splits above kDecodeMaxSplits is an error for the caller.
inline DecodeAttentionSplits decode_attention_splits(int64_t requested, int64_t sm_count, int64_t B, int64_t Hkv,
                                                     int64_t G, int64_t S) {
  int64_t splits = requested > 0 ? requested : decode_attention_auto_splits(sm_count, B, Hkv, G, S);
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, std::max<int64_t>(1, S)));
  return {splits, (S + splits - 1) / splits};
}

}  // namespace balcony::cuda

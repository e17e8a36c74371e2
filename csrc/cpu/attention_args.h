// Argument packs of the attention-side CPU kernels (rope_append, decode_attention) and the decode
// block and scratch sizes, shared by the kernel headers (compiled once per capability) and the op
// entry points. Plain data, torch-free.
// Strides are in elements; the last dimension of every tensor is contiguous.
#pragma once
#include <cstdint>

namespace balcony::cpu {

// Positions scored per online-softmax step (a multiple of the widest vector: one transposed
// reduction per 16 scores).
// NOTE: a block reads its K rows (scores) and then its V rows (P V), which take about a third of
// the time: the V stream asks for twice the K stream's bandwidth in bursts. Past the L3 on one Zen 5
// core, Llama-8B heads read 17 GB/s with blocks of 32 positions, 19.5 with 16 (bfloat16; float32
// 11 -> 14, SmolLM2 heads float32 18 -> 21).
constexpr int64_t kDecodeBlock = 16;

// Floats of scratch one decode_attention task needs (the op gives each thread this much): the query
// group, its accumulators, scores, running max and sum, and the probabilities in bfloat16.
inline int64_t decode_attention_scratch_floats(int64_t G, int64_t D) {
  return G * (2 * D + kDecodeBlock + kDecodeBlock / 2 + 2);
}

struct RopeAppendArgs {
  void* query;  // [B,T,Hq,D], strides q_sb, q_st, q_sh; rotated in place
  int64_t q_sb, q_st, q_sh;
  const void* key;  // [B,T,Hkv,D]
  int64_t k_sb, k_st, k_sh;
  const void* value;  // [B,T,Hkv,D]
  int64_t v_sb, v_st, v_sh;
  void* key_cache;    // [B,Hkv,S,D], contiguous
  void* value_cache;  // [B,Hkv,S,D], contiguous
  const int64_t* positions;  // [B,T], contiguous; negative = padding, else < S and < P (checked by the caller)
  const float* cos;          // [P, R/2], contiguous: the first R <= D dimensions of a head are rotated
  const float* sin;
  int64_t T, Hq, Hkv, D, S;
  int64_t rot_half;  // R/2 (D/2: full rotary)
};

// Split-KV decode attention. Task (b, kv head h, split j) covers positions
// [lo + j * chunk, min(lo + (j + 1) * chunk, seq_lens[b])) for the G = Hq / Hkv query heads h*G .. h*G+G-1,
// where lo = 0, or seq_lens[b] - window with a sliding window shorter than the row (the last `window`
// positions only).
struct DecodeAttentionArgs {
  const void* query;  // [B,Hq,D], strides q_sb, q_sh
  int64_t q_sb, q_sh;
  const void* key_cache;  // [B,Hkv,S,D], strides k_sb, k_sh, k_ss
  int64_t k_sb, k_sh, k_ss;
  const void* value_cache;
  int64_t v_sb, v_sh, v_ss;
  const int64_t* seq_lens;  // [B]
  int64_t Hkv, G, D;
  int64_t num_splits, chunk;
  int64_t window;  // 0: every position; > 0: the last `window` positions of each row
  float scale;
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: off
  void* out;  // [B,Hq,D] contiguous; written directly when num_splits == 1
  // num_splits > 1: per (b, query head, split) the running max and sum of exp ([B,Hq,splits,2])
  // and the unnormalised output ([B,Hq,splits,D]), merged by decode_attention_merge.
  float* part_ml;
  float* part_o;
};

}  // namespace balcony::cpu

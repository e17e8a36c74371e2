// Harness entry for balcony/decode_attention.cuh: split-KV decode attention (split kernel, plus the
// merge kernel when num_splits > 1). Parameters as DecodeAttentionParams (filled like
// csrc/cuda/decode_attention.cu: the caller picks num_splits and chunk), plus element offsets. The
// float32 scratch buffers part_ml / part_o are needed only with several splits.
#include "balcony/decode_attention.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(decode_attention) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    balcony::cuda::DecodeAttentionParams<T> p{};
    p.query = c.ptr<T>("query", c.i("q_offset", 0));
    p.q_sb = c.i("q_sb"), p.q_sh = c.i("q_sh");
    p.key_cache = c.ptr<T>("key_cache", c.i("k_offset", 0));
    p.k_sb = c.i("k_sb"), p.k_sh = c.i("k_sh"), p.k_ss = c.i("k_ss");
    p.value_cache = c.ptr<T>("value_cache", c.i("v_offset", 0));
    p.v_sb = c.i("v_sb"), p.v_sh = c.i("v_sh"), p.v_ss = c.i("v_ss");
    p.seq_lens = c.raw("seq_lens", false);
    p.seq_lens_64 = c.i("seq_lens_64") != 0;
    p.Hkv = int(c.i("Hkv"));
    p.G = int(c.i("G"));
    p.D = int(c.i("D"));
    p.S = int(c.i("S"));
    p.num_splits = int(c.i("num_splits"));
    p.chunk = int(c.i("chunk"));
    p.scale = float(c.f("scale"));
    p.out = c.ptr<T>("out");
    p.part_ml = c.ptr<float>("part_ml", 0, true);
    p.part_o = c.ptr<float>("part_o", 0, true);
    return balcony::cuda::launch_decode_attention<T>(p, int(c.i("B")), nullptr);
  });
}

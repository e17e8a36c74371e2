// Harness entry for balcony/rope_append.cuh: rotary embedding of query and key, key/value appended to
// the caches. Parameters as RopeAppendParams (filled like csrc/cuda/rope_append.cu), plus element
// offsets into the buffers. With `qkv` = 1, key and value are views into the `query` buffer (a fused
// QKV projection's output) at k_offset / v_offset instead of buffers of their own.
#include "balcony/rope_append.cuh"
#include "runner.h"

BALCONY_HARNESS_ENTRY(rope_append) {
  return balcony_harness::dispatch_float(c.str("dtype"), [&](auto tag) {
    using T = decltype(tag);
    const bool fused = c.i("qkv", 0) != 0;
    balcony::cuda::RopeAppendParams<T> p{};
    p.query = c.ptr<T>("query", c.i("q_offset", 0));
    p.q_sb = c.i("q_sb"), p.q_st = c.i("q_st"), p.q_sh = c.i("q_sh");
    p.key = c.ptr<T>(fused ? "query" : "key", c.i("k_offset", 0));
    p.k_sb = c.i("k_sb"), p.k_st = c.i("k_st"), p.k_sh = c.i("k_sh");
    p.value = c.ptr<T>(fused ? "query" : "value", c.i("v_offset", 0));
    p.v_sb = c.i("v_sb"), p.v_st = c.i("v_st"), p.v_sh = c.i("v_sh");
    p.key_cache = c.ptr<T>("key_cache", c.i("cache_offset", 0));
    p.value_cache = c.ptr<T>("value_cache", c.i("cache_offset", 0));
    p.positions = c.ptr<const long long>("positions");
    p.cos = c.ptr<const float>("cos", c.i("table_offset", 0));
    p.sin = c.ptr<const float>("sin", c.i("table_offset", 0));
    p.T_len = int(c.i("T"));
    p.Hq = int(c.i("Hq"));
    p.Hkv = int(c.i("Hkv"));
    p.D = int(c.i("D"));
    p.S = int(c.i("S"));
    p.P = int(c.i("P"));
    p.rot_half = int(c.i("rot_half", c.i("D") / 2));
    return balcony::cuda::launch_rope_append<T>(p, int(c.i("tokens")), nullptr);
  });
}

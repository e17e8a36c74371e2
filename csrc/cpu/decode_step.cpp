// One decode step of a (sub-)model on CPU in a single native call (its matrix products: linear_rows.h).
//
// balcony::decode_step runs, for a batch of one new token per sequence: the embedding, the base
// decoder layers up to the deepest exit any sequence asks for, the balcony layer and exit norm of
// every exit in use (or the final norm for the full model), the shared LM head and the next-token
// choice. Activations are float32 (weights float32 or bfloat16, widened on load); the KV caches are
// float32 [B, Hkv, S, D], one per layer slot (base layers 0..L-1, then one per exit).
//
// Sequences leave at their own exits: every layer runs over all rows (the weights are read once
// per step whatever the row count), but a row past its exit has its cache position masked (-1:
// nothing is written) and its attention length set to 0, so its caches and outputs are exactly
// those of running it alone. The hidden state after each exit depth is written to `kept` for every
// row that reached that depth (the input of a later KV catch-up).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../torch_utils.h"
#include "balcony/layer_layout.h"
#include "capability.h"
#include "kernels.h"
#include "cpu_ops.h"
#include "linear_rows.h"

namespace balcony {
namespace {


const float* opt_f32(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void norm_rows(const float* x, int64_t x_stride, const at::Tensor& w, float* out, int64_t out_stride, int64_t rows,
               int64_t hidden, float eps) {
  auto kernel = BALCONY_CPU_DISPATCH(rms_norm);
  kernel(ScalarKind::F32, x, x_stride, w.data_ptr<float>(), out, out_stride, nullptr, 0, hidden, eps, 0, rows);
}

struct Dims {
  int64_t B, H, Hq, Hkv, D, I, V, S;
};

struct Work {  // views into the caller's float32 workspace
  float *x, *xn, *xe, *q, *k, *v, *gu, *act, *fin, *sample_scratch;
  float *attn, *part_ml, *part_o, *attn_scratch;  // attention output and its split-KV buffers
  int64_t *lpos, *llen;  // per-layer masked positions and attention lengths [B] each
  int64_t max_splits;
  static int64_t splits_bound(int64_t threads) { return 5 * threads + 1; }  // >= any automatic choice
  static int64_t floats(const Dims& d, int64_t threads) {
    const int64_t ms = splits_bound(threads), G = d.Hq / std::max<int64_t>(1, d.Hkv);
    return d.B * (4 * d.H + 2 * d.Hq * d.D + 2 * d.Hkv * d.D + 3 * d.I) + 4 * d.B + threads * d.V +
           d.B * d.Hq * ms * (2 + d.D) + threads * decode_attention_cpu_scratch_floats(G, d.D);
  }
  Work(float* ws, const Dims& d, int64_t threads) {
    lpos = reinterpret_cast<int64_t*>(ws);  // first, so the int64 views are 8-byte aligned
    llen = lpos + d.B;
    x = ws + 4 * d.B, xn = x + d.B * d.H, xe = xn + d.B * d.H, fin = xe + d.B * d.H;
    q = fin + d.B * d.H, k = q + d.B * d.Hq * d.D, v = k + d.B * d.Hkv * d.D;
    gu = v + d.B * d.Hkv * d.D, act = gu + 2 * d.B * d.I, sample_scratch = act + d.B * d.I;
    max_splits = splits_bound(threads);
    attn = sample_scratch + threads * d.V, part_ml = attn + d.B * d.Hq * d.D;
    part_o = part_ml + d.B * d.Hq * max_splits * 2, attn_scratch = part_o + d.B * d.Hq * max_splits * d.D;
  }
};

using RopeAppendFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&);

enum Activation : int64_t { SILU = 0, GELU_TANH = 1 };  // of the MLP's gate (decode_step's `activation`)

// act[r, i] = gelu_tanh(gu[r, i]) * gu[r, I + i] (PyTorch's gelu(approximate="tanh"); Gemma's MLP)
void gelu_tanh_and_mul(const float* gu, float* act, int64_t rows, int64_t I) {
  constexpr float kBeta = 0.7978845608028654f, kKappa = 0.044715f;  // sqrt(2 / pi)
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gu[r * 2 * I + i];
        act[r * I + i] = 0.5f * g * (1.0f + std::tanh(kBeta * (g + kKappa * g * g * g))) * gu[r * 2 * I + I + i];
      }
  });
}

void add_rows(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// q or k [rows, heads * D] normed per head (a norm of D entries) or over each row (heads * D entries)
void qk_norm(float* t, const at::Tensor& norm, int64_t rows, int64_t heads, int64_t D, float eps) {
  if (norm.numel() == D)
    norm_rows(t, D, norm, t, D, rows * heads, D, eps);
  else if (norm.numel())
    norm_rows(t, heads * D, norm, t, heads * D, rows, heads * D, eps);
}

// One decoder layer over all B rows, the residual stream in w.x (updated in place); the norms a
// layer lacks are the identity (balcony/layer_layout.h).
void run_layer(const Dims& d, const Work& w, const at::Tensor* lw, at::Tensor& key_cache, at::Tensor& value_cache,
               const at::Tensor& pos, const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin, float eps,
               double scale, int64_t activation, int64_t window, double softcap) {
  static auto rope = c10::Dispatcher::singleton().findSchemaOrThrow("balcony::rope_append", "").typed<RopeAppendFn>();
  const int64_t B = d.B, H = d.H, QD = d.Hq * d.D, KD = d.Hkv * d.D, I = d.I;
  auto normed = [&](const at::Tensor& norm) -> const float* {  // the sublayer's input
    if (!norm.numel()) return w.x;
    norm_rows(w.x, H, norm, w.xn, H, B, H, eps);
    return w.xn;
  };
  auto add_out = [&](const float* a, int64_t a_cols, const at::Tensor& weight, const at::Tensor& out_norm) {
    if (!out_norm.numel()) return linear_into(a, a_cols, B, weight, nullptr, w.x, H, true);
    linear_into(a, a_cols, B, weight, nullptr, w.xn, H, false);
    norm_rows(w.xn, H, out_norm, w.xn, H, B, H, eps);
    add_rows(w.x, w.xn, B * H);
  };
  const float* a = normed(lw[INPUT_NORM]);
  linear_into(a, H, B, lw[Q_PROJ], opt_f32(lw[Q_BIAS]), w.q, QD, false);
  linear_into(a, H, B, lw[K_PROJ], opt_f32(lw[K_BIAS]), w.k, KD, false);
  linear_into(a, H, B, lw[V_PROJ], opt_f32(lw[V_BIAS]), w.v, KD, false);
  qk_norm(w.q, lw[Q_NORM], B, d.Hq, d.D, eps);
  qk_norm(w.k, lw[K_NORM], B, d.Hkv, d.D, eps);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor q = at::from_blob(w.q, {B, 1, d.Hq, d.D}, f32);
  at::Tensor k = at::from_blob(w.k, {B, 1, d.Hkv, d.D}, f32);
  at::Tensor v = at::from_blob(w.v, {B, 1, d.Hkv, d.D}, f32);
  rope.call(q, k, v, key_cache, value_cache, pos.view({B, 1}), cos, sin);
  int64_t span = 0;  // the most positions a row attends to
  for (int64_t b = 0; b < B; ++b) span = std::max(span, w.llen[b]);
  if (window > 0) span = std::min(span, window);
  const int64_t splits = std::min(decode_attention_cpu_splits(B, d.Hkv, span, 0), w.max_splits);
  decode_attention_cpu_into(q.view({B, d.Hq, d.D}), key_cache, value_cache, w.llen, span, scale, splits, w.attn,
                            w.part_ml, w.part_o, w.attn_scratch, window, softcap);
  add_out(w.attn, QD, lw[O_PROJ], lw[ATTN_OUT_NORM]);
  a = normed(lw[POST_NORM]);
  linear_into(a, H, B, lw[GATE_PROJ], nullptr, w.gu, 2 * I, false);
  linear_into(a, H, B, lw[UP_PROJ], nullptr, w.gu + I, 2 * I, false);
  if (activation == GELU_TANH)
    gelu_tanh_and_mul(w.gu, w.act, B, I);
  else
    BALCONY_CPU_DISPATCH(silu_and_mul)(ScalarKind::F32, w.gu, 2 * I, w.act, I, I, 0, B);
  add_out(w.act, I, lw[DOWN_PROJ], lw[MLP_OUT_NORM]);
}

void check_layer(const std::vector<at::Tensor>& lw, int64_t at, const Dims& d, const char* what, int64_t index) {
  auto mat = [&](int64_t s, int64_t n, int64_t k, const char* name) {
    const at::Tensor& t = lw[at + s];
    // (weight_cols raises for a dtype that is no weight format, naming the formats)
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.is_contiguous() && weight_cols(t, name) == k, "decode_step: ",
                what, " ", index, " ", name, " must be a contiguous [", n, ", ", k, "] matrix (float32, bfloat16) or "
                "its Q8 / Q4 / Q4_1 blocks (balcony/dtypes.h), got ", t.scalar_type(), " ", t.sizes());
  };
  auto vec = [&](int64_t s, int64_t n, const char* name, int64_t or_n = -1) {  // (every vector may be absent)
    const at::Tensor& t = lw[at + s];
    if (t.numel() == 0) return;
    TORCH_CHECK(t.dim() == 1 && (t.size(0) == n || t.size(0) == or_n) && t.is_contiguous() &&
                    t.scalar_type() == at::kFloat,
                "decode_step: ", what, " ", index, " ", name, " must be a contiguous float32 [", n, "]",
                or_n > 0 ? " or [" + std::to_string(or_n) + "]" : std::string(), ", got ", t.scalar_type(), " ",
                t.sizes());
  };
  vec(INPUT_NORM, d.H, "input norm");
  mat(Q_PROJ, d.Hq * d.D, d.H, "q_proj");
  vec(Q_BIAS, d.Hq * d.D, "q bias");
  mat(K_PROJ, d.Hkv * d.D, d.H, "k_proj");
  vec(K_BIAS, d.Hkv * d.D, "k bias");
  mat(V_PROJ, d.Hkv * d.D, d.H, "v_proj");
  vec(V_BIAS, d.Hkv * d.D, "v bias");
  vec(Q_NORM, d.D, "q norm", d.Hq * d.D);
  vec(K_NORM, d.D, "k norm", d.Hkv * d.D);
  mat(O_PROJ, d.H, d.Hq * d.D, "o_proj");
  vec(POST_NORM, d.H, "post-attention norm");
  mat(GATE_PROJ, d.I, d.H, "gate_proj");
  mat(UP_PROJ, d.I, d.H, "up_proj");
  mat(DOWN_PROJ, d.H, d.I, "down_proj");
  vec(ATTN_OUT_NORM, d.H, "attention-output norm");
  vec(MLP_OUT_NORM, d.H, "MLP-output norm");
}

}  // namespace

void decode_step_cpu(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& exit_of_row,
                           c10::IntArrayRef exit_depths, const at::Tensor& embed, at::TensorList base_weights,
                           at::TensorList exit_weights, const at::Tensor& final_norm, const at::Tensor& head,
                           at::TensorList key_caches, at::TensorList value_caches, at::TensorList kept,
                           const at::Tensor& cos, const at::Tensor& sin, c10::IntArrayRef slot_rope,
                           c10::IntArrayRef slot_window, double eps,
                           double scale, double embed_scale, int64_t activation, double attn_softcap,
                           double logit_softcap,
                           at::Tensor& workspace, at::Tensor& logits, const at::Tensor& temperature,
                           const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& uniform,
                           at::Tensor& next_tokens) {
  BALCONY_CHECK_DEVICE(tokens, at::kCPU);
  const int64_t L = static_cast<int64_t>(base_weights.size()) / kPerLayer;
  const int64_t E = static_cast<int64_t>(exit_depths.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(base_weights.size()) == L * kPerLayer, "decode_step: base_weights must "
              "hold ", kPerLayer, " tensors per layer, got ", base_weights.size());
  TORCH_CHECK(static_cast<int64_t>(exit_weights.size()) == E * (kPerLayer + 1), "decode_step: exit_weights must hold ",
              kPerLayer + 1, " tensors per exit (layer + exit norm), got ", exit_weights.size(), " for ", E, " exits");
  TORCH_CHECK(static_cast<int64_t>(key_caches.size()) == L + E && value_caches.size() == key_caches.size(),
              "decode_step: expected ", L + E, " key and value caches (one per layer, then one per exit), got ",
              key_caches.size(), " and ", value_caches.size());
  TORCH_CHECK(static_cast<int64_t>(kept.size()) == E, "decode_step: expected ", E, " kept-hidden buffers, got ",
              kept.size());
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "decode_step: tokens must be int64 [B], got ",
              tokens.scalar_type(), " ", tokens.sizes());
  const int64_t B = tokens.size(0);
  for (const at::Tensor* t : {&positions, &exit_of_row})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->is_contiguous(),
                "decode_step: positions and exit_of_row must be contiguous int64 [", B, "], got ", t->scalar_type(),
                " ", t->sizes());
  TORCH_CHECK(embed.dim() == 2 && head.dim() == 2, "decode_step: embed and head must be 2-D");
  Dims d{};
  d.B = B, d.H = embed.size(1), d.V = head.size(0);
  d.Hkv = key_caches[0].size(1), d.S = key_caches[0].size(2), d.D = key_caches[0].size(3);
  d.Hq = base_weights[Q_PROJ].size(0) / d.D;
  d.I = base_weights[GATE_PROJ].size(0);
  TORCH_CHECK(weight_cols(head, "decode_step: head") == d.H && head.is_contiguous(), "decode_step: head must be contiguous [V, ", d.H, "], got ",
              head.sizes());
  TORCH_CHECK(final_norm.numel() == d.H && final_norm.scalar_type() == at::kFloat, "decode_step: final_norm must be "
              "float32 [", d.H, "]");
  for (int64_t i = 0; i < L; ++i) check_layer(base_weights.vec(), i * kPerLayer, d, "layer", i);
  std::vector<at::Tensor> ew = exit_weights.vec();
  for (int64_t e = 0; e < E; ++e) {
    check_layer(ew, e * (kPerLayer + 1), d, "exit", exit_depths[e]);
    TORCH_CHECK(ew[e * (kPerLayer + 1) + kPerLayer].numel() == d.H, "decode_step: exit ", exit_depths[e],
                " norm must have ", d.H, " entries");
    TORCH_CHECK(exit_depths[e] >= 1 && exit_depths[e] < L, "decode_step: exit depth ", exit_depths[e],
                " out of range 1..", L - 1);
    TORCH_CHECK(kept[e].dim() == 3 && kept[e].size(0) == B && kept[e].size(1) == d.S && kept[e].size(2) == d.H &&
                    kept[e].scalar_type() == at::kFloat && kept[e].is_contiguous(),
                "decode_step: kept[", e, "] must be contiguous float32 [", B, ", ", d.S, ", ", d.H, "], got ",
                kept[e].sizes());
  }
  for (int64_t s = 0; s < L + E; ++s)
    for (const at::Tensor* c : {&key_caches[s], &value_caches[s]})
      TORCH_CHECK(c->dim() == 4 && c->size(0) == B && c->size(1) == d.Hkv && c->size(2) == d.S &&
                      c->size(3) == d.D && c->scalar_type() == at::kFloat,
                  "decode_step: cache ", s, " must be float32 [", B, ", ", d.Hkv, ", ", d.S, ", ", d.D, "], got ",
                  c->scalar_type(), " ", c->sizes());
  TORCH_CHECK(attn_softcap >= 0 && logit_softcap >= 0, "decode_step: soft-caps must be >= 0 (0: off), got ",
              attn_softcap, " and ", logit_softcap);
  TORCH_CHECK(activation == SILU || activation == GELU_TANH, "decode_step: activation must be 0 (SiLU) or 1 (GELU "
              "with the tanh approximation), got ", activation);
  const int64_t R = cos.dim() == 3 ? cos.size(0) : 1;
  TORCH_CHECK((cos.dim() == 2 || cos.dim() == 3) && sin.sizes() == cos.sizes(), "decode_step: cos and sin must be "
              "[P, R/2] (R <= D the rotated dimensions) or one table per rotary kind [K, P, R/2], alike; got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(slot_rope.empty() ? R == 1 : static_cast<int64_t>(slot_rope.size()) == L + E, "decode_step: slot_rope "
              "must name the rotary table of each of the ", L + E, " cache slots (or be empty with one table), got ",
              slot_rope.size(), " entries for ", R, " tables");
  for (int64_t r : slot_rope)
    TORCH_CHECK(r >= 0 && r < R, "decode_step: slot_rope entry ", r, " is not one of the ", R, " rotary tables");
  TORCH_CHECK(slot_window.empty() || static_cast<int64_t>(slot_window.size()) == L + E, "decode_step: slot_window "
              "must give the sliding window (0: none) of each of the ", L + E, " cache slots, or be empty, got ",
              slot_window.size(), " entries");
  for (int64_t x : slot_window)
    TORCH_CHECK(x >= 0, "decode_step: a sliding window must be >= 0 positions (0: none), got ", x);
  auto window_of = [&](int64_t slot) { return slot_window.empty() ? int64_t{0} : slot_window[slot]; };
  auto table = [&](const at::Tensor& t, int64_t slot) {
    return t.dim() == 2 ? t : t.select(0, slot_rope.empty() ? 0 : slot_rope[slot]);
  };
  const int64_t need = Work::floats(d, at::get_num_threads());
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= need,
              "decode_step: workspace must be contiguous float32 with at least ", need,
              " elements (decode_step_workspace), got ", workspace.numel());
  TORCH_CHECK(next_tokens.scalar_type() == at::kLong && next_tokens.dim() == 1 && next_tokens.size(0) == B &&
                  next_tokens.is_contiguous(),
              "decode_step: next_tokens must be contiguous int64 [", B, "], got ", next_tokens.sizes());
  const SampleArgs sample_args = check_sample_tokens_args(logits, temperature, top_k, top_p, uniform);
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(0) == B &&
                  logits.size(1) == d.V && logits.is_contiguous(),
              "decode_step: logits must be contiguous float32 [", B, ", ", d.V, "], got ", logits.sizes());

  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* ex = exit_of_row.data_ptr<int64_t>();
  int64_t deepest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tok[b] >= 0 && tok[b] < embed.size(0), "decode_step: token ", tok[b], " of row ", b,
                " is outside the vocabulary of ", embed.size(0));
    TORCH_CHECK(pos[b] >= 0 && pos[b] < d.S, "decode_step: position ", pos[b], " of row ", b,
                " is past the cache (", d.S, " slots)");
    const bool known = ex[b] == 0 || ex[b] == L || std::find(exit_depths.begin(), exit_depths.end(), ex[b]) != exit_depths.end();
    TORCH_CHECK(known, "decode_step: row ", b, " asks for exit ", ex[b], ", which is neither attached (",
                exit_depths, "), the full depth ", L, ", nor 0 (an idle row)");
    deepest = std::max(deepest, ex[b]);
  }

  Work w(workspace.data_ptr<float>(), d, at::get_num_threads());

  // embedding, widened to float32 (and scaled, where the family scales it: Gemma)
  const auto ekind = cpu_scalar_kind(embed, "embed");
  const float escale = static_cast<float>(embed_scale);
  for (int64_t b = 0; b < B; ++b) {
    float* x = w.x + b * d.H;
    if (ekind == ScalarKind::BF16) {
      const auto* row = reinterpret_cast<const bf16_t*>(embed.data_ptr()) + tok[b] * embed.stride(0);
      for (int64_t h = 0; h < d.H; ++h) x[h] = to_float(row[h]);
    } else {
      const float* row = embed.data_ptr<float>() + tok[b] * embed.stride(0);
      std::copy(row, row + d.H, x);
    }
    if (escale != 1.0f)
      for (int64_t h = 0; h < d.H; ++h) x[h] *= escale;
  }

  const at::Tensor lpos = at::from_blob(w.lpos, {B}, tokens.options());
  const at::Tensor llen = at::from_blob(w.llen, {B}, tokens.options());
  int64_t* lp = w.lpos;
  int64_t* ll = w.llen;
  auto mask_rows = [&](auto active) {
    for (int64_t b = 0; b < B; ++b) {
      const bool on = active(b);
      lp[b] = on ? pos[b] : -1;
      ll[b] = on ? pos[b] + 1 : 0;
    }
  };
  std::vector<at::Tensor> kc = key_caches.vec(), vc = value_caches.vec();
  const float feps = static_cast<float>(eps);
  const at::Tensor* bw = base_weights.data();
  for (int64_t i = 0; i < deepest && i < L; ++i) {
    mask_rows([&](int64_t b) { return ex[b] > i; });
    run_layer(d, w, bw + i * kPerLayer, kc[i], vc[i], lpos, llen, table(cos, i), table(sin, i), feps, scale,
              activation, window_of(i), attn_softcap);
    const int64_t depth = i + 1;
    for (int64_t e = 0; e < E; ++e) {
      if (exit_depths[e] != depth) continue;
      float* kp = kept[e].data_ptr<float>();
      bool any = false;
      for (int64_t b = 0; b < B; ++b) {
        if (ex[b] < depth) continue;
        std::copy(w.x + b * d.H, w.x + (b + 1) * d.H, kp + (b * d.S + pos[b]) * d.H);
        any = any || ex[b] == depth;
      }
      if (!any) continue;
      // the rows leaving here: balcony layer + exit norm on a copy of the residual stream
      Work we = w;
      we.x = w.xe;
      std::copy(w.x, w.x + B * d.H, w.xe);
      mask_rows([&](int64_t b) { return ex[b] == depth; });
      const at::Tensor* xw = ew.data() + e * (kPerLayer + 1);
      run_layer(d, we, xw, kc[L + e], vc[L + e], lpos, llen, table(cos, L + e), table(sin, L + e), feps, scale,
                activation, window_of(L + e), attn_softcap);
      for (int64_t b = 0; b < B; ++b)
        if (ex[b] == depth) norm_rows(w.xe + b * d.H, d.H, xw[kPerLayer], w.fin + b * d.H, d.H, 1, d.H, feps);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    if (ex[b] == L) norm_rows(w.x + b * d.H, d.H, final_norm, w.fin + b * d.H, d.H, 1, d.H, feps);
  linear_into(w.fin, d.H, B, head, nullptr, logits.data_ptr<float>(), d.V, false);
  if (logit_softcap > 0) {  // soft-capped logits (Gemma 2)
    float* lg = logits.data_ptr<float>();
    const float cap = static_cast<float>(logit_softcap);
    at::parallel_for(0, B * d.V, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) lg[i] = cap * std::tanh(lg[i] / cap);
    });
  }
  sample_tokens_cpu_into(sample_args, next_tokens.data_ptr<int64_t>(), w.sample_scratch);
}

int64_t decode_step_workspace(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t inter, int64_t vocab) {
  Dims d{};
  d.B = batch, d.H = hidden, d.Hq = heads, d.Hkv = kv_heads, d.D = head_dim, d.I = inter, d.V = vocab;
  return Work::floats(d, at::get_num_threads());
}

TORCH_LIBRARY_IMPL(balcony, CPU, m) {
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace balcony

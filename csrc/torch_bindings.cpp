// The one library definition: every schema of torch.ops.balcony, with a comment per op.
// Implementations register themselves per backend (TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu). Python-side fake (meta) kernels and autograd live in balcony_ext/ops.py;
// plain-PyTorch references (the specification) in balcony_ext/reference.py.
#include <torch/library.h>

#include <string>

#include "cpu/capability.h"
#include "cpu/cpu_ops.h"

namespace {

std::string get_cpu_capability() { return balcony::cpu::capability_name(balcony::cpu::capability()); }

std::string max_cpu_capability() { return balcony::cpu::capability_name(balcony::cpu::max_supported_capability()); }

void set_cpu_capability(const std::string& name) {
  balcony::cpu::Capability c;
  TORCH_CHECK(balcony::cpu::parse_capability(name.c_str(), &c), "unknown CPU capability '", name,
              "'; expected 'default', 'avx2', 'avx512' or 'avx512bf16'");
  TORCH_CHECK(balcony::cpu::set_capability(c), "this CPU does not support '", name, "' (the most it supports is '",
              max_cpu_capability(), "')");
}

bool built_with_cuda() {
#if defined(BALCONY_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(balcony, m) {
  // out = weight * x * rsqrt(mean(x^2, -1) + eps), computed in float32. input [..., H], weight [H].
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  // Gradients of rms_norm with respect to input and weight.
  m.def("rms_norm_backward(Tensor grad_out, Tensor input, Tensor weight, float eps) -> (Tensor, Tensor)");
  // In place: residual = input + residual; input = rms_norm(residual, weight, eps).
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");

  // Rotary embedding (rotate-half layout) on query in place and on key, then key and value
  // written into the caches at their positions. query [B,T,Hq,D], key/value [B,T,Hkv,D],
  // key_cache/value_cache [B,Hkv,S,D], positions [B,T] int64 (rope position = cache slot;
  // a negative position marks padding: nothing is rotated or written), cos/sin [P, R/2] float32: the
  // first R <= D dimensions of each head rotated, the rest unchanged (partial rotary).
  m.def(
      "rope_append(Tensor(a!) query, Tensor key, Tensor value, Tensor(b!) key_cache, Tensor(c!) value_cache, "
      "Tensor positions, Tensor cos, Tensor sin) -> ()");

  // One query token per sequence against its KV cache: query [B,Hq,D], caches [B,Hkv,S,D],
  // seq_lens [B] (int32 or int64; entries [0, len) are attended), Hq a multiple of Hkv.
  // Split along the sequence (num_splits 0 = choose) with a stable online-softmax merge.
  // window > 0: each sequence attends to its last `window` entries only (sliding-window layers);
  // softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2). 0: off.
  m.def(
      "decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor seq_lens, float scale, "
      "int num_splits=0, int window=0, float softcap=0.0) -> Tensor");

  // SwiGLU activation: input [..., 2I] = [gate | up] -> silu(gate) * up, [..., I].
  m.def("silu_and_mul(Tensor input) -> Tensor");
  // The same into a preallocated contiguous out [..., I] (no allocation: decode loops, and large
  // outputs whose fresh pages would otherwise be faulted in on every call).
  m.def("silu_and_mul_out(Tensor input, Tensor(a!) out) -> ()");
  m.def("silu_and_mul_backward(Tensor grad_out, Tensor input) -> Tensor");

  // KL(p_teacher || p_student) for self-distillation without materialising the student logits:
  // student [N,H], weight [V,H] (the LM head), teacher [N,H] hidden states (teacher_is_logits
  // False) or [N,V] logits (True). reduction "sum" or "mean" (over the N tokens); chunk_size
  // tokens per chunk (0 = choose). Returns (loss float32 scalar, grad of loss wrt student
  // [N,H] when compute_grad, else an empty tensor).
  m.def(
      "fused_linear_kl(Tensor student, Tensor weight, Tensor teacher, bool teacher_is_logits, str reduction, "
      "int chunk_size, bool compute_grad) -> (Tensor, Tensor)");

  // Next token per row of logits [B,V]: temperature[B] <= 0 means greedy (argmax); otherwise
  // softmax(logits / temperature), keep the top_k[B] most likely (0 = all), then the smallest
  // set of those whose mass reaches top_p[B] of theirs, and pick by inverse CDF in vocabulary
  // order with uniform[B] in [0, 1). Returns int64 [B].
  m.def(
      "sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniform) -> Tensor");

  // out[M,N] (+)= x[M,K] @ weight[N,K]^T (+ bias[N]) for the few rows of a decode step: x, bias and
  // out float32, weight float32 or bfloat16 (read once, at memory bandwidth). accumulate adds to out.
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, bool accumulate) -> ()");

  // One decode step of a Balcony model for one new token per sequence, in one native call: embedding,
  // base layers up to the deepest exit in use, each row's balcony layer + exit norm (or the final
  // norm at exit_of_row == L; 0 = an idle row, no layer runs), the LM head into logits [B,V], and the next tokens into next_tokens [B] (as sample_tokens).
  // Weight lists: the tensors of balcony/layer_layout.h per decoder layer, in its order (input norm, q,
  // q bias, k, k bias, v, v bias, q norm, k norm, o, post-attention norm, gate, up, down, attention-output
  // norm, MLP-output norm; empty tensors for absent ones; balcony_ext/weights.py names the same fields), exits add their norm. Caches: float32 [B,Hkv,S,D] per slot (L base layers, then one per exit); kept:
  // float32 [B,S,H] per exit, receives the hidden state after that depth at each row's position.
  // cos/sin: [P, R/2] (R <= D rotated dimensions), or [K, P, R/2] with slot_rope naming each slot's table (Gemma 3: per attention
  // type); slot_window: each slot's sliding window (0: none; empty: none anywhere), a row attending to
  // its last `window` positions; embed_scale multiplies the embedding (Gemma); activation: 0 SiLU, 1
  // GELU (tanh) on the gate; attn_softcap / logit_softcap > 0: scores / logits become cap * tanh(x / cap)
  // (Gemma 2; 0: off).
  m.def(
      "decode_step(Tensor tokens, Tensor positions, Tensor exit_of_row, int[] exit_depths, Tensor embed, "
      "Tensor[] base_weights, Tensor[] exit_weights, Tensor final_norm, Tensor head, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor(c!)[] kept, Tensor cos, Tensor sin, int[] slot_rope, "
      "int[] slot_window, float eps, float scale, float embed_scale, int activation, float attn_softcap, "
      "float logit_softcap, "
      "Tensor(d!) workspace, Tensor(e!) logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniform, "
      "Tensor(f!) next_tokens) -> ()");
  // Float32 elements of decode_step's workspace for these sizes (and the current thread count).
  m.def("decode_step_workspace(int batch, int hidden, int heads, int kv_heads, int head_dim, int inter, int vocab) -> int",
        &balcony::decode_step_workspace);

  // The CPU instruction set the kernels use: "default", "avx2", "avx512" or "avx512bf16".
  m.def("get_cpu_capability() -> str", &get_cpu_capability);
  m.def("max_cpu_capability() -> str", &max_cpu_capability);
  m.def("set_cpu_capability(str name) -> ()", &set_cpu_capability);
  // Whether this build contains the CUDA kernels.
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

// Importable as the Python module balcony_ext._C: loading it runs the registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "balcony native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

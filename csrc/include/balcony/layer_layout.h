// The tensors of one decoder layer in the weight lists of the native decode step, in argument order.
// The Python side names the same fields in the same order (balcony_ext/weights.py, LayerWeights); a
// test holds the two lists to each other. Absent tensors (biases, q/k norms, norms a family does not
// have) are empty tensors. An exit's list adds its norm after its layer's fields.
//
// A layer computes  x += ATTN_OUT_NORM(o_proj(attention(INPUT_NORM(x))))
//                   x += MLP_OUT_NORM(down_proj(silu(gate_proj(h)) * up_proj(h))),  h = POST_NORM(x)
// where an absent norm is the identity: Llama has the input and post-attention (pre-MLP) norms, OLMo 2
// only the two output norms. Q_NORM / K_NORM are per head (head_dim entries, Qwen 3) or over each
// row's whole projection (heads x head_dim entries, OLMo 2).
#pragma once

#include <cstdint>

namespace balcony {

enum LayerField : int64_t {
  INPUT_NORM,
  Q_PROJ,
  Q_BIAS,
  K_PROJ,
  K_BIAS,
  V_PROJ,
  V_BIAS,
  Q_NORM,
  K_NORM,
  O_PROJ,
  POST_NORM,
  GATE_PROJ,
  UP_PROJ,
  DOWN_PROJ,
  ATTN_OUT_NORM,
  MLP_OUT_NORM,
  kPerLayer,  // tensors per decoder layer
};

}  // namespace balcony

// The tensors of one decoder layer in the weight lists of the native decode step, in argument order.
// The Python side names the same fields in the same order (balcony_ext/weights.py, LayerWeights); a
// test holds the two lists to each other. Absent tensors (biases, q/k norms) are empty tensors. An
// exit's list adds its norm after its layer's fields.
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
  kPerLayer,  // tensors per decoder layer
};

}  // namespace balcony

// Shared by the CPU kernels that read routed experts' kernels: one layer's [G, K, N] kernels,
// in place, from a layer's [G, K, N] array or from the whole [L, G, K, N] stack.
#pragma once

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace dsv3 {

// The [G, K, N] kernels of layer `layer` of w ([G, K, N] or [L, G, K, N]), `per_layer`
// = G·K·N floats. A layer index out of range is clamped (as XLA clamps a dynamic slice's
// start).
inline const float* LayerKernels(xla::ffi::AnyBuffer w, xla::ffi::Buffer<xla::ffi::S32> layer,
                                 int64_t per_layer) {
  const auto dims = w.dimensions();
  if (dims.size() == 3) return w.typed_data<float>();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, dims[0] - 1);
  return w.typed_data<float>() + l * per_layer;
}

}  // namespace dsv3

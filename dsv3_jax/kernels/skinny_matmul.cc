// Y [M, N] = X [M, K] · W [K, N], float32, for a few rows M (decode steps' projections), as an
// XLA FFI handler (the product: skinny_product.h). Given a norm weight [K] (else [0]), X's rows
// are normalized first (RMSNorm with `eps`): the norm before a projection without XLA's four
// thunks. Built and registered by dsv3_jax/cpu_kernels.py; called by dsv3_jax/skinny_matmul.py.
#include <cstdint>
#include <cstring>
#include <vector>

#include "skinny_product.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> norm, ffi::ResultBuffer<ffi::F32> y, float eps) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  float* out = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(out, 0, M * N * sizeof(float));
    return ffi::Error::Success();
  }
  const float *xs = x.typed_data(), *ws = w.typed_data();
  thread_local std::vector<float> normed;
  if (norm.element_count() > 0) {
    normed.resize(M * K);
    dsv3::RmsNormRows(xs, M, K, norm.typed_data(), eps, normed.data());
    xs = normed.data();
  }
  dsv3::SkinnyProduct(pool, xs, M, K, ws, N, out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3SkinnyMatmul, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

// Y [M, N] = X [M, K] · W [K, N], float32, for a few rows M (decode steps' projections), as an
// XLA FFI handler: W's columns are split into blocks over XLA's intra-op pool, each block one
// sgemm (blas.h) that streams its part of W once. Built and registered by
// dsv3_jax/cpu_kernels.py; called by dsv3_jax/skinny_matmul.py.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "blas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fewest columns per block, a multiple of 16 floats (whole 64-byte lines of each Y row).
constexpr int64_t kMinColumns = 64;

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  float* out = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(out, 0, M * N * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t threads = dsv3::Threads(pool);
  const int64_t blocks = std::clamp<int64_t>(N / kMinColumns, 1, threads);
  const float *xs = x.typed_data(), *ws = w.typed_data();
  dsv3::Parallel(pool, blocks, [&](int64_t b) {
    // block edges on 16-column boundaries, the last block to N
    const int64_t n0 = N * b / blocks / 16 * 16;
    const int64_t n1 = b + 1 == blocks ? N : N * (b + 1) / blocks / 16 * 16;
    if (n1 > n0)
      dsv3::Sgemm(CblasNoTrans, CblasNoTrans, M, n1 - n0, K, 1.0f, xs, K, ws + n0, N, 0.0f,
                  out + n0, N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3SkinnyMatmul, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

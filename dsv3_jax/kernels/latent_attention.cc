// Absorbed MLA decode attention over the latent cache, float32, as an XLA FFI handler: per
// sequence b, scores = q_latent · c_kvᵀ + q_pe · k_peᵀ (two OpenBLAS sgemm into one buffer),
// scaled, masked to the keys at or before each query's position, exp(s − max), then
// out = exp-weights · c_kv / Σ exp-weights. Built and registered by dsv3_jax/cpu_kernels.py;
// called by dsv3_jax/latent_attention.py (dimension key there).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cblas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// c_kv [B, S, C], k_pe [B, S, R], q_latent [B, N, T, C], q_pe [B, N, T, R], positions [B, T]
// → out [B, N, T, C]. Rows of one sequence (its N·T queries) are split into pieces so that
// every thread has work even at batch 1.
ffi::Error LatentAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c_kv,
                           ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> q_latent,
                           ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto cd = c_kv.dimensions(), qd = q_latent.dimensions();
  const int64_t B = cd[0], S = cd[1], C = cd[2], R = k_pe.dimensions()[2];
  const int64_t N = qd[1], T = qd[2], rows = N * T;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t pieces = std::min<int64_t>(rows, std::max<int64_t>(1, (2 * threads + B - 1) / B));
  dsv3::Parallel(pool, B * pieces, [&](int64_t unit) {
    const int64_t b = unit / pieces, p = unit % pieces;
    const int64_t r0 = rows * p / pieces, r1 = rows * (p + 1) / pieces, n = r1 - r0;
    if (n == 0) return;
    std::vector<float> scores(n * S);
    const float* ckv = c_kv.typed_data() + b * S * C;
    const float* kpe = k_pe.typed_data() + b * S * R;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, S, C, scale,
                      q_latent.typed_data() + (b * rows + r0) * C, C, ckv, C, 0.0f,
                      scores.data(), S);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, S, R, scale,
                      q_pe.typed_data() + (b * rows + r0) * R, R, kpe, R, 1.0f,
                      scores.data(), S);
    std::vector<float> sums(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = (r0 + i) % T;
      const int64_t visible = std::clamp<int64_t>(positions.typed_data()[b * T + t] + 1, 0, S);
      float* row = scores.data() + i * S;
      if (visible == 0) {  // sees no slot (a position < 0): all of them alike, as the JAX path
        std::fill(row, row + S, 1.0f);
        sums[i] = static_cast<float>(S);
        continue;
      }
      float top = std::numeric_limits<float>::lowest();
      for (int64_t s = 0; s < visible; ++s) top = std::max(top, row[s]);
      float sum = 0.0f;
      for (int64_t s = 0; s < visible; ++s) sum += (row[s] = std::exp(row[s] - top));
      std::fill(row + visible, row + S, 0.0f);
      sums[i] = sum;
    }
    float* o = out->typed_data() + (b * rows + r0) * C;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, S, 1.0f, scores.data(),
                      S, ckv, C, 0.0f, o, C);
    for (int64_t i = 0; i < n; ++i) {
      const float inv = 1.0f / sums[i];  // ≥ 1: the row's largest weight is exp(0)
      for (int64_t c = 0; c < C; ++c) o[i * C + c] *= inv;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3LatentAttention, LatentAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

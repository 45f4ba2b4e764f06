// Y [M, N] = X [M, K] · W [K, N], float32, for a few rows M (decode steps' projections), as an
// XLA FFI handler over XLA's intra-op pool, each piece one sgemm (blas.h) that streams its
// part of W once: for at most kFewRows rows W's rows in contiguous chunks (row_chunks.h), each
// a partial product, summed in chunk order; otherwise W's columns in blocks. Given a norm
// weight [K] (else [0]), X's rows are normalized first (RMSNorm with `eps`): the norm before a
// projection without XLA's four thunks. Built and registered by
// dsv3_jax/cpu_kernels.py; called by dsv3_jax/skinny_matmul.py.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "blas.h"
#include "parallel.h"
#include "row_chunks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fewest columns per block, a multiple of 16 floats (whole 64-byte lines of each Y row).
constexpr int64_t kMinColumns = 64;

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
  const int64_t chunks = dsv3::RowChunks(K, N, M);
  if (chunks > 1) {
    thread_local std::vector<float> partials;  // chunks 1, 2, …: [M, N] each
    partials.resize((chunks - 1) * M * N);
    float* partial = partials.data();
    dsv3::Parallel(pool, chunks, [&](int64_t c) {
      const auto [k0, k1] = dsv3::ChunkRows(K, c, chunks);
      dsv3::Sgemm(CblasNoTrans, CblasNoTrans, M, N, k1 - k0, 1.0f, xs + k0, K, ws + k0 * N, N,
                  0.0f, c == 0 ? out : partial + (c - 1) * M * N, N);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      const float* p = partial + (c - 1) * M * N;
      for (int64_t i = 0; i < M * N; ++i) out[i] += p[i];
    }
    return ffi::Error::Success();
  }
  const int64_t blocks = std::clamp<int64_t>(N / kMinColumns, 1, dsv3::Threads(pool));
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

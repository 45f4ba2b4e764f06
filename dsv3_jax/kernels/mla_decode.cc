// An MLA layer's absorbed decode step, float32, as one XLA FFI handler: the block's input
// norm, the projections from x (one fused kernel, `mla.absorbed_kernels`' "x"), the query's
// norm and up-projection ("q_b"), the new latents normalized and rotated and written into the
// cache in place (its buffers aliased to the outputs), the queries rotated and absorbed
// (q_nope · k per head), the attention over the latent cache (latent_attend.h), the values
// (out_latent · v per head) and o_proj. Replaces four kernel calls and ~12 XLA thunks of a
// decode step's attention. Built and registered by dsv3_jax/cpu_kernels.py; called by
// dsv3_jax/mla_decode.py (dimension key and formula there).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "latent_attend.h"
#include "parallel.h"
#include "skinny_product.h"
#include "stream_product.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The per-head products are split over the pool from this many multiply-adds on (the bench
// config's 8 heads at batch 8: 131 K; V3's 128 heads: 8 M a row); below it (the bench's 16 K
// at batch 1) a fork and join costs as much as the product (warm bench steps, both ways
// alternated: batch 1 alike, batch 8 3.50 / 3.98 / 3.55 against 3.65 / 4.10 / 3.55 ms).
constexpr int64_t kParallelHeadWork = 1 << 16;

// out = x's interleaved pairs (x0, x1) rotated: (x0·cos − x1·sin, x0·sin + x1·cos), R / 2
// pairs (rope.apply_rope; cos and sin already scaled by the attention factor).
void Rotate(const float* x, const float* cos, const float* sin, int64_t R, float* out) {
  for (int64_t i = 0; i < R / 2; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    out[2 * i] = x0 * cos[i] - x1 * sin[i];
    out[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
  }
}

// work(n) for each head n < N (`multiply_adds` in all): over the pool when there is enough.
template <typename Work>
void PerHead(ffi::ThreadPool& pool, int64_t N, int64_t multiply_adds, const Work& work) {
  if (multiply_adds >= kParallelHeadWork) {
    dsv3::Parallel(pool, N, work);
  } else {
    for (int64_t n = 0; n < N; ++n) work(n);
  }
}

ffi::Error MlaDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> norm,
                     ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> q_norm,
                     ffi::Buffer<ffi::F32> w_qb, ffi::Buffer<ffi::F32> kv_norm,
                     ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> w_o,
                     ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                     ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> positions,
                     ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> c_kv, ffi::ResultBuffer<ffi::F32> k_pe,
                     float eps, float scale) {
  const auto xd = x.dimensions(), kd = k.dimensions(), cd = c_kv->dimensions();
  const int64_t B = xd[0], T = xd[1], D = xd[2], rows = B * T;
  const int64_t X = w_x.dimensions()[1], Q = q_norm.element_count();
  const int64_t N = kd[0], H = kd[1], C = kd[2], A = v.dimensions()[2];
  const int64_t S = cd[cd.size() - 2], R = k_pe->dimensions()[cd.size() - 1];
  const int64_t NQ = N * (H + R);  // a query row: [q_nope (N, H) | q_pe (N, R)]
  float* out = y->typed_data();
  if (rows == 0) return ffi::Error::Success();

  // x through the block's norm (when given), then its fused projection px [rows, X]:
  // [q_a (Q) | kv_a (C) | k_pe (R)], or without q compression [q (NQ) | kv_a | k_pe]
  const float* xs = x.typed_data();
  thread_local std::vector<float> normed, px, cq, q, q_latent, q_pe, latent, values;
  if (norm.element_count() > 0) {
    normed.resize(rows * D);
    dsv3::RmsNormRows(xs, rows, D, norm.typed_data(), eps, normed.data());
    xs = normed.data();
  }
  px.resize(rows * X);
  dsv3::SkinnyProduct(pool, xs, rows, D, w_x.typed_data(), X, px.data());
  const float* query = px.data();  // rows ld_query apart
  int64_t ld_query = X, kv_at = NQ;
  if (Q > 0) {  // c_q = RMSNorm(q_a), then its up-projection [rows, NQ]
    cq.resize(rows * Q);
    for (int64_t r = 0; r < rows; ++r)
      dsv3::RmsNormRows(px.data() + r * X, 1, Q, q_norm.typed_data(), eps, cq.data() + r * Q);
    q.resize(rows * NQ);
    dsv3::SkinnyProduct(pool, cq.data(), rows, Q, w_qb.typed_data(), NQ, q.data());
    query = q.data(), ld_query = NQ, kv_at = Q;
  }

  // the new latents into the cache (in place: the outputs alias the cache operands) at
  // index[b] + t, a window past the end moved back to fit (as dynamic_update_slice)
  float *ckv = c_kv->typed_data(), *kpe = k_pe->typed_data();
  const float *cs = cos.typed_data(), *sn = sin.typed_data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = std::clamp<int64_t>(index.typed_data()[b], 0, S - T);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = b * T + t, slot = b * S + start + t;
      const float* p = px.data() + r * X + kv_at;
      dsv3::RmsNormRows(p, 1, C, kv_norm.typed_data(), eps, ckv + slot * C);
      Rotate(p + C, cs + r * (R / 2), sn + r * (R / 2), R, kpe + slot * R);
    }
  }

  // the queries per head, [B, N, T, ·]: q_pe rotated, q_nope absorbed into the latent space
  // (pool threads run the per-head work: they see these buffers through pointers, their own
  // thread_local vectors being others)
  q_latent.resize(B * N * T * C);
  q_pe.resize(B * N * T * R);
  latent.resize(B * N * T * C);
  values.resize(rows * N * A);
  float *ql = q_latent.data(), *qp = q_pe.data(), *lat = latent.data(), *vals = values.data();
  const float *kk = k.typed_data(), *vv = v.typed_data();
  PerHead(pool, N, rows * N * H * C, [&](int64_t n) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (r / T * N + n) * T + r % T;
      const float* row = query + r * ld_query;
      Rotate(row + N * H + n * R, cs + r * (R / 2), sn + r * (R / 2), R, qp + at * R);
      dsv3::StreamRow(row + n * H, H, kk + n * H * C, C, C, ql + at * C);
    }
  });

  dsv3::latent::AttendLatent(pool, ckv, kpe, ql, qp, positions.typed_data(), B, S, C, R, N, T,
                             scale, lat);

  // the values per head, [rows, N·A], then o_proj
  PerHead(pool, N, rows * N * C * A, [&](int64_t n) {
    for (int64_t r = 0; r < rows; ++r)
      dsv3::StreamRow(lat + ((r / T * N + n) * T + r % T) * C, C, vv + n * C * A, A, A,
                      vals + (r * N + n) * A);
  });
  dsv3::SkinnyProduct(pool, vals, rows, N * A, w_o.typed_data(), D, out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3MlaDecode, MlaDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm [D] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_x [D, X]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_norm [Q] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_qb [Q, NQ] or [0, 0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kv_norm [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [N, H, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [N, C, A]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_o [N·A, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [B, T, R/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin [B, T, R/2]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c_kv [B, S, C] or [S, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pe [B, S, R] or [S, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [B, T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_kv, aliased
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k_pe, aliased
                                  .Attr<float>("eps")
                                  .Attr<float>("scale"));

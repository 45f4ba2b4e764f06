// Causal attention within each sequence, float32, forward and backward, as XLA FFI handlers.
// Built and registered by dsv3_jax/cpu_kernels.py; called by dsv3_jax/fused_attention.py
// (dimension key and formulas there).
//
// q_nope, k_nope [B, N, T, H], q_pe [B, T, N, R], k_pe [B, T, R] (one rope key for all heads),
// v [B, N, T, A], positions [B, T]: scores are q_nope·k_nope + q_pe·k_pe, and query t of a
// sequence sees key s when s <= t and positions[s] <= positions[t] (itself always). Queries go
// in blocks of kQueryBlock rows; a block's scores against the keys it can reach ([0, t1)) are
// two sgemms (nope, rope) into a per-unit buffer, softmaxed in place, and multiplied by the
// values: the [T, T] scores are never stored. The forward also returns each query's
// log-sum-exp, from which the backward rebuilds the probabilities block by block
// (FlashAttention's recomputation).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "blas.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dsv3::ExpShifted;
using dsv3::kLanes;
using dsv3::MaxOf;
using dsv3::Padded;

constexpr int64_t kQueryBlock = 64;

// Where one (sequence, head)'s operands start, and their row strides.
struct Head {
  const float *qn, *qp, *kn, *kp, *v;
  const int32_t* pos;
  int64_t ldqp;  // q_pe rows are [B, T, N, R]: N·R apart
};

struct Shape {
  int64_t B, N, T, H, R, A;

  Head At(int64_t head, const float* qn, const float* qp, const float* kn, const float* kp,
          const float* v, const int32_t* pos) const {
    const int64_t b = head / N, n = head % N;
    return {qn + head * T * H, qp + (b * T * N + n) * R, kn + head * T * H, kp + b * T * R,
            v + head * T * A, pos + b * T, N * R};
  }
};

Shape ShapeOf(ffi::Buffer<ffi::F32>& q_nope, ffi::Buffer<ffi::F32>& q_pe,
              ffi::Buffer<ffi::F32>& v) {
  const auto d = q_nope.dimensions();
  return {d[0], d[1], d[2], d[3], q_pe.dimensions()[3], v.dimensions()[3]};
}

// P [rows, ld] = scale · (q_nope k_nopeᵀ + q_pe k_peᵀ) for queries [t0, t0 + rows), keys
// [0, n).
void Scores(const Shape& d, const Head& h, int64_t t0, int64_t rows, int64_t n, float scale,
            float* P, int64_t ld) {
  dsv3::Sgemm(CblasNoTrans, CblasTrans, rows, n, d.H, scale,
              h.qn + t0 * d.H, d.H, h.kn, d.H, 0.0f, P, ld);
  dsv3::Sgemm(CblasNoTrans, CblasTrans, rows, n, d.R, scale,
              h.qp + t0 * h.ldqp, h.ldqp, h.kp, d.R, 1.0f, P, ld);
}

// Rows of P [rows, ld] (query t = t0 + r; ld a multiple of kLanes) hold scale · q_t · k_s
// for s < n; each becomes exp(· − shift_t) where s is visible to t, else 0, up to ld. With
// lse == nullptr the shift is the row's max and lse_out/inv_sum receive its log-sum-exp and
// 1 / sum; otherwise the shift is lse[t].
void Softmax(float* P, int64_t rows, int64_t ld, int64_t t0, const int32_t* pos,
             const float* lse, float* lse_out, float* inv_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = P + r * ld;
    const int64_t t = t0 + r;
    const int32_t pt = pos[t];
    const int64_t seen = Padded(t + 1);  // whole lanes covering 0..t
    for (int64_t s = 0; s <= t; ++s) row[s] = pos[s] <= pt ? row[s] : -INFINITY;
    std::fill(row + t + 1, row + seen, -INFINITY);
    const float shift = lse ? lse[t] : MaxOf(row, seen);
    const float sum = ExpShifted(row, seen, shift);
    std::fill(row + seen, row + ld, 0.0f);
    if (!lse) {
      lse_out[t] = shift + std::log(sum);
      inv_sum[r] = 1.0f / sum;
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                   ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::F32> k_nope,
                   ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale) {
  const Shape d = ShapeOf(q_nope, q_pe, v);
  const int64_t blocks = (d.T + kQueryBlock - 1) / kQueryBlock;
  // the last blocks (the most keys) first, for balance
  dsv3::Parallel(pool, d.B * d.N * blocks, [&](int64_t u) {
    const int64_t head = u / blocks, block = blocks - 1 - u % blocks;
    const int64_t t0 = block * kQueryBlock, t1 = std::min(d.T, t0 + kQueryBlock);
    const int64_t rows = t1 - t0, n = t1, ld = Padded(n);
    const Head h = d.At(head, q_nope.typed_data(), q_pe.typed_data(), k_nope.typed_data(),
                        k_pe.typed_data(), v.typed_data(), positions.typed_data());
    float* O = out->typed_data() + (head * d.T + t0) * d.A;
    std::vector<float> P(rows * ld), inv(rows);
    Scores(d, h, t0, rows, n, scale, P.data(), ld);
    Softmax(P.data(), rows, ld, t0, h.pos, nullptr, lse->typed_data() + head * d.T,
            inv.data());
    dsv3::Sgemm(CblasNoTrans, CblasNoTrans, rows, d.A, n, 1.0f, P.data(),
                ld, h.v, d.A, 0.0f, O, d.A);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t a = 0; a < d.A; ++a) O[r * d.A + a] *= inv[r];
  });
  return ffi::Error::Success();
}

// One unit per (sequence, head): its key and value gradients accumulate over the query
// blocks. The rope key is shared by the heads: its gradient is returned per head
// ([B, N, T, R]) for the caller to sum.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                    ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::F32> k_nope,
                    ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq_nope, ffi::ResultBuffer<ffi::F32> dq_pe,
                    ffi::ResultBuffer<ffi::F32> dk_nope, ffi::ResultBuffer<ffi::F32> dk_pe,
                    ffi::ResultBuffer<ffi::F32> dv, float scale) {
  const Shape d = ShapeOf(q_nope, q_pe, v);
  const int64_t blocks = (d.T + kQueryBlock - 1) / kQueryBlock;
  dsv3::Parallel(pool, d.B * d.N, [&](int64_t head) {
    const Head h = d.At(head, q_nope.typed_data(), q_pe.typed_data(), k_nope.typed_data(),
                        k_pe.typed_data(), v.typed_data(), positions.typed_data());
    const float* O = out.typed_data() + head * d.T * d.A;
    const float* dO = dout.typed_data() + head * d.T * d.A;
    const float* L = lse.typed_data() + head * d.T;
    // the gradients share the operands' layouts (dq_pe [B, T, N, R] too)
    float* dQn = dq_nope->typed_data() + (h.qn - q_nope.typed_data());
    float* dQp = dq_pe->typed_data() + (h.qp - q_pe.typed_data());
    float* dKn = dk_nope->typed_data() + head * d.T * d.H;
    float* dKp = dk_pe->typed_data() + head * d.T * d.R;
    float* dV = dv->typed_data() + head * d.T * d.A;
    std::fill(dKn, dKn + d.T * d.H, 0.0f);
    std::fill(dKp, dKp + d.T * d.R, 0.0f);
    std::fill(dV, dV + d.T * d.A, 0.0f);
    const int64_t most = std::min(d.T, kQueryBlock);
    std::vector<float> P(most * Padded(d.T)), dP(most * Padded(d.T)), delta(most);
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t t0 = block * kQueryBlock, t1 = std::min(d.T, t0 + kQueryBlock);
      const int64_t rows = t1 - t0, n = t1, ld = Padded(n);
      const float* dOb = dO + t0 * d.A;
      // P = exp(scores − lse), masked
      Scores(d, h, t0, rows, n, scale, P.data(), ld);
      Softmax(P.data(), rows, ld, t0, h.pos, L, nullptr, nullptr);
      // dV[:n] += Pᵀ dO;  dP = dO Vᵀ
      dsv3::Sgemm(CblasTrans, CblasNoTrans, n, d.A, rows, 1.0f, P.data(),
                  ld, dOb, d.A, 1.0f, dV, d.A);
      dsv3::Sgemm(CblasNoTrans, CblasTrans, rows, n, d.A, 1.0f, dOb, d.A,
                  h.v, d.A, 0.0f, dP.data(), ld);
      // dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale, into dP
      for (int64_t r = 0; r < rows; ++r) {
        float sum = 0.0f;
        for (int64_t a = 0; a < d.A; ++a) sum += dOb[r * d.A + a] * O[(t0 + r) * d.A + a];
        delta[r] = sum;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* p = P.data() + r * ld;
        float* g = dP.data() + r * ld;
        const float dr = delta[r];
        for (int64_t s = 0; s < n; ++s) g[s] = p[s] * (g[s] - dr) * scale;
      }
      // the query rows' gradients = dS k[:n];  the keys' gradients [:n] += dSᵀ q rows
      dsv3::Sgemm(CblasNoTrans, CblasNoTrans, rows, d.H, n, 1.0f,
                  dP.data(), ld, h.kn, d.H, 0.0f, dQn + t0 * d.H, d.H);
      dsv3::Sgemm(CblasNoTrans, CblasNoTrans, rows, d.R, n, 1.0f,
                  dP.data(), ld, h.kp, d.R, 0.0f, dQp + t0 * h.ldqp, h.ldqp);
      dsv3::Sgemm(CblasTrans, CblasNoTrans, n, d.H, rows, 1.0f,
                  dP.data(), ld, h.qn + t0 * d.H, d.H, 1.0f, dKn, d.H);
      dsv3::Sgemm(CblasTrans, CblasNoTrans, n, d.R, rows, 1.0f,
                  dP.data(), ld, h.qp + t0 * h.ldqp, h.ldqp, 1.0f, dKp, d.R);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3CausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3CausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

// Grouped GEMMs over rows sorted by group (ragged_dot and its two transposes), float32, on the
// CPU through a BLAS sgemm (blas.h), as XLA FFI handlers. Built and registered by
// dsv3_jax/cpu_kernels.py; called by dsv3_jax/grouped_gemm.py (dimension key there).
//
// Rows [start_g, start_g + sizes[g]) of the row operands belong to group g (start_g the sum of
// the sizes before it); the kernels are read in place, as layer `layer` of an [L, G, ...]
// stack when given one. Output rows past the groups, and the kernel gradient of an empty
// group, are zero.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "blas.h"
#include "expert_stacks.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// About this many rows per unit of row-splitting work: enough for sgemm to run near its peak.
constexpr int64_t kRowsPerUnit = 256;

// (start, rows) of each group, the sizes clamped so that no group reads past `rows`.
std::vector<std::pair<int64_t, int64_t>> Groups(ffi::Buffer<ffi::S32> sizes, int64_t rows) {
  const int64_t G = sizes.element_count();
  std::vector<std::pair<int64_t, int64_t>> out(G);
  int64_t start = 0;
  for (int64_t g = 0; g < G; ++g) {
    int64_t n = std::max<int64_t>(0, sizes.typed_data()[g]);
    n = std::min(n, rows - start);
    out[g] = {start, n};
    start += n;
  }
  return out;
}

// A piece of a group's rows: the unit of row-splitting work.
struct Unit {
  int64_t group, start, rows;
};

// Each group's rows in near-equal pieces of about kRowsPerUnit.
std::vector<Unit> RowUnits(const std::vector<std::pair<int64_t, int64_t>>& groups) {
  std::vector<Unit> units;
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g) {
    auto [start, rows] = groups[g];
    const int64_t pieces = (rows + kRowsPerUnit - 1) / kRowsPerUnit;
    for (int64_t i = 0; i < pieces; ++i) {
      const int64_t a = rows * i / pieces, b = rows * (i + 1) / pieces;
      units.push_back({g, start + a, b - a});
    }
  }
  return units;
}

// The groups' indices, the most rows first (for balance when each is one unit of work).
std::vector<int64_t> LargestFirst(const std::vector<std::pair<int64_t, int64_t>>& groups) {
  std::vector<int64_t> order(groups.size());
  for (size_t g = 0; g < order.size(); ++g) order[g] = g;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return groups[a].second > groups[b].second; });
  return order;
}

// The rows after the groups' (the sum of their sizes).
int64_t Filled(const std::vector<std::pair<int64_t, int64_t>>& groups) {
  return groups.empty() ? 0 : groups.back().first + groups.back().second;
}

// transpose 0: out[M, N] = x_g [M_g, K] · w_g [K, N]        x [M, K]
// transpose 1: out[M, K] = x_g [M_g, N] · w_gᵀ               x [M, N]
ffi::Error RowsTimesKernels(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                            ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::S32> layer,
                            ffi::Result<ffi::AnyBuffer> out, int64_t transpose) {
  const auto wd = w.dimensions();
  const int64_t K = wd[wd.size() - 2], N = wd[wd.size() - 1], G = wd[wd.size() - 3];
  const int64_t M = x.dimensions()[0];
  const int64_t in = transpose ? N : K, width = transpose ? K : N;
  const float* kernels = dsv3::LayerKernels(w, layer, G * K * N);
  const float* xs = x.typed_data<float>();
  float* ys = out->typed_data<float>();
  auto groups = Groups(sizes, M);
  const int64_t filled = Filled(groups);
  const std::vector<Unit> units = RowUnits(groups);
  dsv3::Parallel(pool, units.size(), [&](int64_t u) {
    const Unit& t = units[u];
    dsv3::Sgemm(CblasNoTrans, transpose ? CblasTrans : CblasNoTrans,
                t.rows, width, in, 1.0f, xs + t.start * in, in,
                kernels + t.group * K * N, N, 0.0f, ys + t.start * width, width);
  });
  if (filled < M) std::memset(ys + filled * width, 0, (M - filled) * width * sizeof(float));
  return ffi::Error::Success();
}

// out[G, K, N] = a_gᵀ [K, M_g] · b_g [M_g, N]     a [M, K], b [M, N]
ffi::Error KernelGradients(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Buffer<ffi::S32> sizes, ffi::Result<ffi::AnyBuffer> out) {
  const auto od = out->dimensions();
  const int64_t G = od[0], K = od[1], N = od[2];
  const int64_t M = a.dimensions()[0];
  const float* as = a.typed_data<float>();
  const float* bs = b.typed_data<float>();
  float* outs = out->typed_data<float>();
  auto groups = Groups(sizes, M);
  // one unit per group (its whole [K, N] gradient), the largest first for balance
  const std::vector<int64_t> order = LargestFirst(groups);
  dsv3::Parallel(pool, G, [&](int64_t u) {
    const int64_t g = order[u];
    auto [start, rows] = groups[g];
    float* o = outs + g * K * N;
    if (rows == 0) {
      std::memset(o, 0, K * N * sizeof(float));
      return;
    }
    dsv3::Sgemm(CblasTrans, CblasNoTrans, K, N, rows, 1.0f,
                as + start * K, K, bs + start * N, N, 0.0f, o, N);
  });
  return ffi::Error::Success();
}

// SwiGLU hidden units of rows sorted by group, the gate and up GEMMs and the activation in one
// pass per piece of rows while it is in cache:
//   g = x_g · gate_g,  u = x_g · up_g,  h = silu(g) ⊙ u ⊙ scale_row      x [M, D]; [M, F] each
// g and u are returned for the backward pass; rows past the groups are zero.
ffi::Error SwigluHidden(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gate,
                        ffi::AnyBuffer up, ffi::Buffer<ffi::S32> sizes,
                        ffi::Buffer<ffi::S32> layer, ffi::AnyBuffer scale,
                        ffi::Result<ffi::AnyBuffer> h, ffi::Result<ffi::AnyBuffer> g,
                        ffi::Result<ffi::AnyBuffer> u) {
  const auto wd = gate.dimensions();
  const int64_t D = wd[wd.size() - 2], F = wd[wd.size() - 1], G = wd[wd.size() - 3];
  const int64_t M = x.dimensions()[0];
  const float* wg = dsv3::LayerKernels(gate, layer, G * D * F);
  const float* wu = dsv3::LayerKernels(up, layer, G * D * F);
  const float* xs = x.typed_data<float>();
  const float* ss = scale.typed_data<float>();
  float *hs = h->typed_data<float>(), *gs = g->typed_data<float>(), *us = u->typed_data<float>();
  const auto groups = Groups(sizes, M);
  const auto units = RowUnits(groups);
  const int64_t filled = Filled(groups);
  dsv3::Parallel(pool, units.size(), [&](int64_t i) {
    const Unit& t = units[i];
    float *gt = gs + t.start * F, *ut = us + t.start * F, *ht = hs + t.start * F;
    dsv3::Sgemm(CblasNoTrans, CblasNoTrans, t.rows, F, D, 1.0f,
                xs + t.start * D, D, wg + t.group * D * F, F, 0.0f, gt, F);
    dsv3::Sgemm(CblasNoTrans, CblasNoTrans, t.rows, F, D, 1.0f,
                xs + t.start * D, D, wu + t.group * D * F, F, 0.0f, ut, F);
    for (int64_t r = 0; r < t.rows; ++r) {
      const float s = ss[t.start + r];
      for (int64_t f = 0; f < F; f += dsv3::kLanes) {
        const int64_t n = std::min(dsv3::kLanes, F - f), o = r * F + f;
        const dsv3::Floats gv = dsv3::Load(gt + o, n);
        dsv3::Store(ht + o, dsv3::SwigluActivation(gv, dsv3::Load(ut + o, n), s), n);
      }
    }
  });
  for (float* out : {hs, gs, us})
    if (filled < M) std::memset(out + filled * F, 0, (M - filled) * F * sizeof(float));
  return ffi::Error::Success();
}

// SwigluHidden's backward from dh [M, F] and the g, u it returned:
//   du = dh ⊙ scale ⊙ silu(g),  dg = dh ⊙ scale ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),
//   dscale_row = Σ_f dh ⊙ silu(g) ⊙ u,  dx = dg · gate_gᵀ + du · up_gᵀ    (per piece of rows)
//   dgate_g = x_gᵀ · dg_g,  dup_g = x_gᵀ · du_g                          (per group)
ffi::Error SwigluHiddenGrads(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                             ffi::AnyBuffer u, ffi::AnyBuffer scale, ffi::AnyBuffer dh,
                             ffi::AnyBuffer gate, ffi::AnyBuffer up,
                             ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::S32> layer,
                             ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgate,
                             ffi::Result<ffi::AnyBuffer> dup,
                             ffi::Result<ffi::AnyBuffer> dscale) {
  const auto wd = gate.dimensions();
  const int64_t D = wd[wd.size() - 2], F = wd[wd.size() - 1], G = wd[wd.size() - 3];
  const int64_t M = x.dimensions()[0];
  const float* wg = dsv3::LayerKernels(gate, layer, G * D * F);
  const float* wu = dsv3::LayerKernels(up, layer, G * D * F);
  const float *xs = x.typed_data<float>(), *gs = g.typed_data<float>();
  const float *us = u.typed_data<float>(), *ss = scale.typed_data<float>();
  const float* dhs = dh.typed_data<float>();
  float* dxs = dx->typed_data<float>();
  float* dss = dscale->typed_data<float>();
  const auto groups = Groups(sizes, M);
  const auto units = RowUnits(groups);
  const int64_t filled = Filled(groups);
  // scratch for dg, du: every filled row is written before it is read
  std::unique_ptr<float[]> dG(new float[filled * F]), dU(new float[filled * F]);
  dsv3::Parallel(pool, units.size(), [&](int64_t i) {
    const Unit& t = units[i];
    for (int64_t r = t.start; r < t.start + t.rows; ++r) {
      const float s = ss[r];
      dsv3::Floats sums{};
      for (int64_t f = 0; f < F; f += dsv3::kLanes) {
        const int64_t n = std::min(dsv3::kLanes, F - f), o = r * F + f;
        const dsv3::Floats gv = dsv3::Load(gs + o, n), uv = dsv3::Load(us + o, n);
        const dsv3::Floats d = dsv3::Load(dhs + o, n), sg = dsv3::Sigmoid(gv);
        const dsv3::Floats silu = gv * sg;
        sums += d * silu * uv;  // lanes past F load as 0
        dsv3::Store(&dU[o], d * s * silu, n);
        dsv3::Store(&dG[o], d * s * uv * sg * (1.0f + gv * (1.0f - sg)), n);
      }
      dss[r] = dsv3::Sum(sums);
    }
    dsv3::Sgemm(CblasNoTrans, CblasTrans, t.rows, D, F, 1.0f,
                &dG[t.start * F], F, wg + t.group * D * F, F, 0.0f, dxs + t.start * D, D);
    dsv3::Sgemm(CblasNoTrans, CblasTrans, t.rows, D, F, 1.0f,
                &dU[t.start * F], F, wu + t.group * D * F, F, 1.0f, dxs + t.start * D, D);
  });
  if (filled < M) {
    std::memset(dxs + filled * D, 0, (M - filled) * D * sizeof(float));
    std::memset(dss + filled, 0, (M - filled) * sizeof(float));
  }
  std::vector<int64_t> order = LargestFirst(groups);
  float *dgs = dgate->typed_data<float>(), *dus = dup->typed_data<float>();
  dsv3::Parallel(pool, 2 * G, [&](int64_t i) {  // (group, gate or up)
    const int64_t grp = order[i / 2];
    auto [start, rows] = groups[grp];
    float* out = (i % 2 ? dus : dgs) + grp * D * F;
    if (rows == 0) {
      std::memset(out, 0, D * F * sizeof(float));
      return;
    }
    dsv3::Sgemm(CblasTrans, CblasNoTrans, D, F, rows, 1.0f,
                xs + start * D, D, (i % 2 ? dU : dG).get() + start * F, F, 0.0f, out, F);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3RaggedRowsTimesKernels, RowsTimesKernels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3RaggedKernelGradients, KernelGradients,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3SwigluHidden, SwigluHidden,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3SwigluHiddenGrads, SwigluHiddenGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

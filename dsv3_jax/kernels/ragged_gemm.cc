// Grouped GEMMs over rows sorted by group (ragged_dot and its two transposes), float32, on the
// CPU through OpenBLAS's sgemm, as XLA FFI handlers. Built and registered by
// dsv3_jax/cpu_kernels.py; called by dsv3_jax/grouped_gemm.py (dimension key there).
//
// Rows [start_g, start_g + sizes[g]) of the row operands belong to group g (start_g the sum of
// the sizes before it); the kernels are read in place, as layer `layer` of an [L, G, ...]
// stack when given one. Output rows past the groups, and the kernel gradient of an empty
// group, are zero.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cblas.h"
#include "parallel.h"
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

// The [G, K, N] kernels of layer `layer` of w ([G, K, N] or [L, G, K, N]).
// A layer index out of range is clamped (as XLA clamps a dynamic slice's start).
const float* Kernels(ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer, int64_t per_layer) {
  const auto dims = w.dimensions();
  if (dims.size() == 3) return w.typed_data<float>();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, dims[0] - 1);
  return w.typed_data<float>() + l * per_layer;
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
  const float* kernels = Kernels(w, layer, G * K * N);
  const float* xs = x.typed_data<float>();
  float* ys = out->typed_data<float>();
  auto groups = Groups(sizes, M);
  const int64_t filled = G ? groups[G - 1].first + groups[G - 1].second : 0;
  struct Unit {
    int64_t group, start, rows;
  };
  std::vector<Unit> units;
  for (int64_t g = 0; g < G; ++g) {
    auto [start, rows] = groups[g];
    const int64_t pieces = (rows + kRowsPerUnit - 1) / kRowsPerUnit;
    for (int64_t i = 0; i < pieces; ++i) {  // near-equal pieces of the group's rows
      const int64_t a = rows * i / pieces, b = rows * (i + 1) / pieces;
      units.push_back({g, start + a, b - a});
    }
  }
  dsv3::Parallel(pool, units.size(), [&](int64_t u) {
    const Unit& t = units[u];
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose ? CblasTrans : CblasNoTrans,
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
  std::vector<int64_t> order(G);
  for (int64_t g = 0; g < G; ++g) order[g] = g;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return groups[a].second > groups[b].second; });
  dsv3::Parallel(pool, G, [&](int64_t u) {
    const int64_t g = order[u];
    auto [start, rows] = groups[g];
    float* o = outs + g * K * N;
    if (rows == 0) {
      std::memset(o, 0, K * N * sizeof(float));
      return;
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, K, N, rows, 1.0f,
                      as + start * K, K, bs + start * N, N, 0.0f, o, N);
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

// A DeepSeekMoE layer on a few tokens (a decode step), float32, as one XLA FFI handler: the
// norm before it (when given its weight), the router (sigmoid scores, the correction bias for
// selection, group-limited top-k, the weights from the unbiased scores), the chosen experts'
// SwiGLUs and the shared expert's, and the combine. Replaces the ~30 XLA thunks and five
// kernel calls of a decode step's MoE layer. Built and registered by dsv3_jax/cpu_kernels.py;
// called by dsv3_jax/few_token_moe.py (dimension key and routing there).
//
// Work: the assignments (token, k) sorted by expert (stable: by token, then k), then one split
// over XLA's intra-op pool in two parts. An expert with few rows streams its kernels once, and
// a stream runs fastest contiguous: each kernel is cut into chunks of whole rows
// (`row_chunks.h`), and a chunk's product is a partial sum. First the gate and up products per
// (expert, chunk of D); then per (expert, chunk of F) the activation of those hidden units,
// silu(g) · u · weight, from the summed partials, and its share of the down product. Each
// token's output accumulates its k outputs in k order (each its chunks' partial outputs), then
// the shared expert's (an expert with S hidden units over all tokens). The chunks depend on
// the shapes and the routing only, never on the threads: the sums are the same on any machine.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "blas.h"
#include "expert_stacks.h"
#include "parallel.h"
#include "row_chunks.h"
#include "stream_product.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The index of the largest of v[i] for candidates i in [0, n) with !taken[i]; the lowest such
// index among equals (jax.lax.top_k's order).
int64_t Largest(const float* v, const std::vector<char>& taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

// logits [N, E] = x [N, D] · router [D, E], the router's rows streamed once, each into every
// token's row of logits (an sgemm call of this size cost ~4 µs, most of a decode step's router).
void Logits(const float* x, const float* router, int64_t N, int64_t D, int64_t E,
            float* logits) {
  std::fill_n(logits, N * E, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const float* w = router + d * E;
    for (int64_t n = 0; n < N; ++n) {
      const float xv = x[n * D + d];
      float* o = logits + n * E;
      for (int64_t e = 0; e < E; e += dsv3::kLanes) {
        const int64_t m = std::min(dsv3::kLanes, E - e);
        dsv3::Store(o + e, dsv3::Load(o + e, m) + xv * dsv3::Load(w + e, m), m);
      }
    }
  }
}

struct Routing {
  int64_t groups, topk_group, top_k;
  bool norm;
  float scaling;
};

// One token's experts [K] and weights [K] from its scores [E] and the bias [E] (moe.route);
// biased [E], group_scores [groups] and taken are scratch.
void Route(const float* scores, const float* bias, int64_t E, const Routing& r, int32_t* experts,
           float* weights, std::vector<float>& biased, std::vector<float>& group_scores,
           std::vector<char>& taken) {
  for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + bias[e];
  if (r.groups > 1) {  // keep the topk_group groups whose top-2 biased scores sum highest
    const int64_t per = E / r.groups, top = std::min<int64_t>(2, per);
    for (int64_t g = 0; g < r.groups; ++g) {
      taken.assign(per, 0);
      float sum = 0.0f;
      for (int64_t t = 0; t < top; ++t) {
        const int64_t i = Largest(biased.data() + g * per, taken, per);
        taken[i] = 1;
        sum = t == 0 ? biased[g * per + i] : sum + biased[g * per + i];
      }
      group_scores[g] = sum;
    }
    taken.assign(r.groups, 0);
    for (int64_t t = 0; t < r.topk_group; ++t) taken[Largest(group_scores.data(), taken,
                                                             r.groups)] = 1;
    for (int64_t g = 0; g < r.groups; ++g)
      if (!taken[g])
        std::fill_n(biased.data() + g * per, per, -std::numeric_limits<float>::infinity());
  }
  taken.assign(E, 0);
  float sum = 0.0f;
  for (int64_t k = 0; k < r.top_k; ++k) {
    const int64_t e = Largest(biased.data(), taken, E);
    taken[e] = 1;
    experts[k] = static_cast<int32_t>(e);
    weights[k] = scores[e];
    sum = k == 0 ? weights[k] : sum + weights[k];
  }
  for (int64_t k = 0; k < r.top_k; ++k)
    weights[k] = (r.norm ? weights[k] / (sum + 1e-20f) : weights[k]) * r.scaling;
}

// One expert's share of the work: `rows` rows (sorted assignments, or every token for the
// shared expert) through kernels gate/up [D, F] and down [F, D], with its partial sums.
struct Expert {
  const float *gate, *up, *down;
  int64_t F, rows;
  const float* x;      // [rows, D] its input rows
  const float* scale;  // [rows] routing weights; nullptr: 1
  int64_t up_chunks, down_chunks;
  std::vector<float> g, u;  // [up_chunks, rows, F] partial gate and up products
  std::vector<float> out;   // [down_chunks, rows, D] partial outputs
};

ffi::Error FewTokenMoe(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> router, ffi::Buffer<ffi::F32> bias,
                       ffi::AnyBuffer gate, ffi::AnyBuffer up, ffi::AnyBuffer down,
                       ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> shared_gate,
                       ffi::Buffer<ffi::F32> shared_up, ffi::Buffer<ffi::F32> shared_down,
                       ffi::Buffer<ffi::F32> norm, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::S32> chosen, ffi::ResultBuffer<ffi::F32> scores,
                       int64_t groups, int64_t topk_group,
                       int64_t top_k, bool norm_topk_prob, float scaling, float eps) {
  const int64_t N = x.dimensions()[0], D = x.dimensions()[1];
  const int64_t E = router.dimensions()[1];
  const auto gd = gate.dimensions();
  const int64_t F = gd[gd.size() - 1], Fs = shared_gate.dimensions()[1];
  const int64_t K = top_k, A = N * K;
  const float* xs = x.typed_data();
  std::vector<float> normed;  // the tokens through the layer's norm, when given one
  if (norm.element_count() > 0) {
    normed.resize(N * D);
    dsv3::RmsNormRows(xs, N, D, norm.typed_data(), eps, normed.data());
    xs = normed.data();
  }
  float* out = y->typed_data();
  float* s = scores->typed_data();
  int32_t* ex = chosen->typed_data();
  if (N == 0) return ffi::Error::Success();

  // the router: scores = sigmoid(x · router), then each token's experts and weights
  Logits(xs, router.typed_data(), N, D, E, s);
  for (int64_t i = 0; i < N * E; i += dsv3::kLanes) {
    const int64_t n = std::min(dsv3::kLanes, N * E - i);
    dsv3::Store(s + i, dsv3::Sigmoid(dsv3::Load(s + i, n)), n);
  }
  const Routing routing{groups, topk_group, K, norm_topk_prob, scaling};
  std::vector<float> weights(A), biased(E), group_scores(groups);
  std::vector<char> taken(E);
  for (int64_t n = 0; n < N; ++n)
    Route(s + n * E, bias.typed_data(), E, routing, ex + n * K, weights.data() + n * K, biased,
          group_scores, taken);

  // the assignments sorted by expert (stable), their input rows and weights gathered
  std::vector<int64_t> count(E + 1, 0), slot(A);
  for (int64_t a = 0; a < A; ++a) ++count[ex[a] + 1];
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];  // count[e]: expert e's first row
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  std::vector<float> rows(A * D), scale(A);
  for (int64_t a = 0; a < A; ++a) {
    const int64_t r = next[ex[a]]++;
    slot[a] = r;
    std::memcpy(&rows[r * D], xs + a / K * D, D * sizeof(float));
    scale[r] = weights[a];
  }
  const int64_t per_expert = D * F;
  const float* wg = dsv3::LayerKernels(gate, layer, E * per_expert);
  const float* wu = dsv3::LayerKernels(up, layer, E * per_expert);
  const float* wd = dsv3::LayerKernels(down, layer, E * per_expert);
  std::vector<Expert> experts;
  std::vector<int64_t> expert_of(E, -1);  // each chosen expert's index in `experts`
  auto add = [&](const float* g, const float* u, const float* d, int64_t width, int64_t n,
                 const float* in, const float* sc) {
    Expert t{g, u, d, width, n, in, sc, dsv3::RowChunks(D, width, n),
             dsv3::RowChunks(width, D, n)};
    t.g.resize(t.up_chunks * n * width);
    t.u.resize(t.up_chunks * n * width);
    t.out.resize(t.down_chunks * n * D);
    experts.push_back(std::move(t));
  };
  for (int64_t e = 0; e < E; ++e) {
    const int64_t start = count[e], n = count[e + 1] - count[e];
    if (n == 0) continue;
    expert_of[e] = experts.size();
    add(wg + e * per_expert, wu + e * per_expert, wd + e * per_expert, F, n, &rows[start * D],
        &scale[start]);
  }
  if (Fs > 0)
    add(shared_gate.typed_data(), shared_up.typed_data(), shared_down.typed_data(), Fs, N, xs,
        nullptr);

  // one split over the pool: first every (expert, chunk of D) of the gate and up products,
  // then every (expert, chunk of F) of the activation and down product. A participant takes
  // the units in order, so when it takes an expert's down unit all of that expert's gate and
  // up units are taken (by running participants): it waits for them to finish, never for a
  // unit not yet started (one barrier fewer than two splits)
  std::vector<std::pair<int64_t, int64_t>> units;
  for (int64_t i = 0; i < static_cast<int64_t>(experts.size()); ++i)
    for (int64_t c = 0; c < experts[i].up_chunks; ++c) units.push_back({i, c});
  const int64_t up_units = units.size();
  for (int64_t i = 0; i < static_cast<int64_t>(experts.size()); ++i)
    for (int64_t c = 0; c < experts[i].down_chunks; ++c) units.push_back({i, c});
  std::unique_ptr<std::atomic<int64_t>[]> ups_done(new std::atomic<int64_t>[experts.size()]);
  for (size_t i = 0; i < experts.size(); ++i) ups_done[i].store(0);
  dsv3::Parallel(pool, units.size(), [&](int64_t unit) {
    const int64_t i = units[unit].first, c = units[unit].second;
    Expert& t = experts[i];
    const int64_t size = t.rows * t.F;
    if (unit < up_units) {
      const auto [d0, d1] = dsv3::ChunkRows(D, c, t.up_chunks);
      dsv3::FewRowProduct(t.x + d0, D, t.rows, d1 - d0, t.gate + d0 * t.F, t.F, t.F,
                          &t.g[c * size], t.F);
      dsv3::FewRowProduct(t.x + d0, D, t.rows, d1 - d0, t.up + d0 * t.F, t.F, t.F,
                          &t.u[c * size], t.F);
      ups_done[i].fetch_add(1, std::memory_order_release);
      return;
    }
    dsv3::AwaitCount(ups_done[i], t.up_chunks);
    const auto [f0, f1] = dsv3::ChunkRows(t.F, c, t.down_chunks);
    const int64_t w = f1 - f0;
    thread_local std::vector<float> hidden;
    hidden.resize(t.rows * w);
    for (int64_t r = 0; r < t.rows; ++r) {
      const float sc = t.scale ? t.scale[r] : 1.0f;
      for (int64_t f = 0; f < w; f += dsv3::kLanes) {
        const int64_t n = std::min(dsv3::kLanes, w - f), at = r * t.F + f0 + f;
        dsv3::Floats g = dsv3::Load(&t.g[at], n), u = dsv3::Load(&t.u[at], n);
        for (int64_t p = 1; p < t.up_chunks; ++p) {
          g += dsv3::Load(&t.g[p * size + at], n);
          u += dsv3::Load(&t.u[p * size + at], n);
        }
        dsv3::Store(&hidden[r * w + f], dsv3::SwigluActivation(g, u, sc), n);
      }
    }
    dsv3::FewRowProduct(hidden.data(), w, t.rows, w, t.down + f0 * D, D, D,
                        &t.out[c * t.rows * D], D);
  });
  // an expert's row r of output: its chunks' partial outputs summed
  auto output = [&](const Expert& t, int64_t r, float* o, bool first) {
    for (int64_t c = 0; c < t.down_chunks; ++c) {
      const float* p = &t.out[(c * t.rows + r) * D];
      if (first && c == 0) std::memcpy(o, p, D * sizeof(float));
      else for (int64_t d = 0; d < D; ++d) o[d] += p[d];
    }
  };
  // each token: its k outputs in k order, then the shared expert's
  for (int64_t n = 0; n < N; ++n) {
    float* o = out + n * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ex[n * K + k];
      output(experts[expert_of[e]], slot[n * K + k] - count[e], o, k == 0);
    }
    if (Fs > 0) output(experts.back(), n, o, false);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3FewTokenMoe, FewTokenMoe,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("topk_group")
                                  .Attr<int64_t>("top_k")
                                  .Attr<bool>("norm_topk_prob")
                                  .Attr<float>("scaling")
                                  .Attr<float>("eps"));

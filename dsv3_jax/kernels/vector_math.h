// Shared by the CPU kernels: float32 vectors as wide as the building machine's registers (GCC/
// Clang vector extensions: sixteen lanes with AVX-512, else eight) and the math the kernels'
// elementwise steps need.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dsv3 {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef float Floats8 __attribute__((vector_size(32)));  // eight lanes: Sum4's shuffles

// v's lanes summed in pairs (i, i + 8) into eight; v itself with eight lanes.
inline Floats8 Fold8(Floats v) {
#if defined(__AVX512F__)
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return v;
#endif
}

// exp(x) per lane to float32 rounding (Cody-Waite reduction, degree-6 polynomial on
// [-ln2/2, ln2/2]): 0 below -87 (-inf included), inputs above 88 taken as 88.
inline Floats Exp(Floats x) {
  Floats y = x < -87.0f ? Floats{} - 87.0f : x;
  y = y > 88.0f ? Floats{} + 88.0f : y;
  const Floats z = y * 1.44269504088896341f + 0.5f;
  Floats n = __builtin_convertvector(__builtin_convertvector(z, Ints), Floats);  // trunc
  n += __builtin_convertvector(n > z, Floats);  // floor: −1 (true) where trunc rounded up
  const Floats r = (y - n * 0.693359375f) + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Floats two_n = (Floats)((__builtin_convertvector(n, Ints) + 127) << 23);
  return x < -87.0f ? Floats{} : p * two_n;
}

// 1 / (1 + exp(-x)) per lane.
inline Floats Sigmoid(Floats x) { return 1.0f / (1.0f + Exp(-x)); }

// A SwiGLU's hidden units from its gate and up products, scaled (an expert's routing weight):
// silu(g) · u · scale, as the XLA paths compute them (grouped GEMMs, the few-token MoE).
inline Floats SwigluActivation(Floats g, Floats u, float scale) {
  return g * Sigmoid(g) * u * scale;
}

// The sum of v's lanes, in lane order.
inline float Sum(Floats v) {
  float sum = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }

// The first n (≤ kLanes) lanes from p, the rest 0; and the first n lanes of v stored to p.
inline Floats Load(const float* p, int64_t n) {
  if (n == kLanes) return Load(p);
  Floats v{};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

inline void Store(float* p, Floats v, int64_t n) {
  if (n == kLanes) return Store(p, v);
  std::memcpy(p, &v, n * sizeof(float));
}

// n rounded up to whole lanes (the row stride of a buffer read and written by whole lanes).
inline int64_t Padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The largest of x[0, n), n a positive multiple of kLanes.
inline float MaxOf(const float* x, int64_t n) {
  Floats m = Load(x);
  for (int64_t s = kLanes; s < n; s += kLanes) {
    const Floats v = Load(x + s);
    m = m < v ? v : m;
  }
  float top = m[0];
  for (int64_t i = 1; i < kLanes; ++i) top = top < m[i] ? m[i] : top;
  return top;
}

// x[s] = exp(x[s] − shift) for s < n (a multiple of kLanes), in place; returns their sum.
inline float ExpShifted(float* x, int64_t n, float shift) {
  Floats sums{};
  for (int64_t s = 0; s < n; s += kLanes) {
    const Floats e = Exp(Load(x + s) - shift);
    Store(x + s, e);
    sums += e;
  }
  return Sum(sums);
}

// out[m] = x[m] / sqrt(mean(x[m]²) + eps) · weight for rows m < M of x [M, K] (layers.RMSNorm
// in float32; out may not alias x).
inline void RmsNormRows(const float* x, int64_t M, int64_t K, const float* weight, float eps,
                        float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    Floats squares{};
    for (int64_t k = 0; k < K; k += kLanes) {
      const Floats v = Load(row + k, std::min(kLanes, K - k));
      squares += v * v;
    }
    const float inverse = 1.0f / std::sqrt(Sum(squares) / static_cast<float>(K) + eps);
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = weight[k] * (row[k] * inverse);
  }
}

}  // namespace dsv3

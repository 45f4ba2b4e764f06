// Shared by the CPU kernels: the single-threaded sgemm they call. OpenBLAS's (the
// `scipy-openblas32` wheel, linked, kept single-threaded) unless `Dsv3UseSgemm` (blas.cc,
// called by dsv3_jax/cpu_kernels.py when the library is loaded) installs another CBLAS sgemm
// with the same interface: MKL's, with MKL's sequential threading layer.
#pragma once

#include <atomic>
#include <cstdint>

#include "cblas.h"

namespace dsv3 {

// CBLAS sgemm with 32-bit sizes (LP64) and the standard enum values (101 row-major, 111 / 112
// no-transpose / transpose), which OpenBLAS and MKL share.
using SgemmFunction = void (*)(int, int, int, int, int, int, float, const float*, int,
                               const float*, int, float, float*, int);

inline void OpenBlasSgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                          const float* a, int lda, const float* b, int ldb, float beta,
                          float* c, int ldc) {
  scipy_cblas_sgemm(static_cast<CBLAS_ORDER>(order), static_cast<CBLAS_TRANSPOSE>(ta),
                    static_cast<CBLAS_TRANSPOSE>(tb), m, n, k, alpha, a, lda, b, ldb, beta, c,
                    ldc);
}

// OpenBLAS runs single-threaded: the parallelism is XLA's own intra-op pool (parallel.h), so
// the kernel never competes with XLA's workers for the cores.
inline const bool kSingleThreaded = [] {
  scipy_openblas_set_num_threads(1);
  return true;
}();

// The sgemm in use: set when the library is loaded, before any kernel runs (atomic: a
// process that sets it again, as the tests do, never races a running kernel).
inline std::atomic<SgemmFunction> sgemm_in_use{&OpenBlasSgemm};

// Whether the sgemm in use is MKL's (anything but OpenBLAS's): the kernels whose best product
// differs by BLAS ask.
inline bool SgemmIsMkl() {
  return sgemm_in_use.load(std::memory_order_relaxed) != &OpenBlasSgemm;
}

// C = alpha · op(A) · op(B) + beta · C, row-major.
inline void Sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k,
                  float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float beta, float* c, int64_t ldc) {
  sgemm_in_use.load(std::memory_order_relaxed)(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda,
                                                b, ldb, beta, c, ldc);
}

}  // namespace dsv3

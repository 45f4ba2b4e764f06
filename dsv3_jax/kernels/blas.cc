// Which sgemm the CPU kernels call (blas.h): set by dsv3_jax/cpu_kernels.py after loading the
// library, before any kernel runs; null restores OpenBLAS's.
#include "blas.h"

extern "C" void Dsv3UseSgemm(void* sgemm) {
  dsv3::sgemm_in_use.store(sgemm ? reinterpret_cast<dsv3::SgemmFunction>(sgemm)
                                 : &dsv3::OpenBlasSgemm);
}

// Absorbed MLA decode attention over the latent cache, float32, as an XLA FFI handler (the
// work: latent_attend.h). Built and registered by dsv3_jax/cpu_kernels.py; called by
// dsv3_jax/latent_attention.py (dimension key there).
#include <cstdint>

#include "latent_attend.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error LatentAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c_kv,
                           ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> q_latent,
                           ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  // a one-sequence cache may come without its batch axis ([S, C], `LatentCache.squeeze`)
  const auto cd = c_kv.dimensions(), qd = q_latent.dimensions();
  dsv3::latent::AttendLatent(pool, c_kv.typed_data(), k_pe.typed_data(), q_latent.typed_data(),
                             q_pe.typed_data(), positions.typed_data(), qd[0], cd[cd.size() - 2],
                             cd[cd.size() - 1], k_pe.dimensions()[k_pe.dimensions().size() - 1],
                             qd[1], qd[2], scale, out->typed_data());
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

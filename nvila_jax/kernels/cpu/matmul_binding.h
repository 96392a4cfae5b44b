// The XLA FFI signature shared by the matmul kernels (rows_matmul, blas_matmul): x, w -> out, with XLA's
// intra-op thread pool and the `transposed` attribute (w [N, K] instead of [K, N]).
#pragma once

#include "xla/ffi/api/ffi.h"

namespace nvila {

inline auto MatmulBinding() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<bool>("transposed");
}

}  // namespace nvila

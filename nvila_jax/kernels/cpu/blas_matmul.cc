// x [M, K] times w [K, N] (or w [N, K] with transposed=true) in float32 with OpenBLAS's SGEMM, for products
// of many rows: prefill and the vision encoder. On the project's AVX-512 VM, XLA's CPU GEMM (YNNPACK) runs
// these shapes at 250-300 GFLOP/s and OpenBLAS at 290-330 (BENCHMARKS.md, "Inference"). OpenBLAS runs
// single-threaded in each thread of XLA's intra-op pool, on one block of rows (or of columns, when N is the
// longer side) each: its own thread pool would compete with XLA's for the same cores. The library is
// scipy-openblas32, a copy of OpenBLAS of its own (numpy's is another), so its one-thread setting touches
// nothing else in the process.
//
// A second entry point adds the product to an [M, N] operand (a residual stream: x + h @ w): SGEMM's
// beta = 1 on that operand's buffer, which XLA passes as the output (input_output_aliases), so the sum needs
// no pass of its own over memory.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "matmul_binding.h"
#include "parallel.h"
#include "cblas.h"  // scipy-openblas32's, on the include path given by kernels/blas_matmul.py
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kColumnAlign = 16;  // one AVX-512 vector of float32: column blocks start on a vector

// out = x @ w, plus `add` [M, N] when given (read from out itself when XLA aliased the two, as it should).
ffi::Error Product(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, const float* add,
                   ffi::ResultBuffer<ffi::F32>& out, bool transposed) {
  static const bool single_threaded = (scipy_openblas_set_num_threads(1), true);
  (void)single_threaded;
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[transposed ? 1 : 0]) {
    return ffi::Error::InvalidArgument("blas_matmul expects x [M, K] and w [K, N], or w [N, K] when transposed");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[transposed ? 0 : 1];
  constexpr int64_t kMaxDim = std::numeric_limits<blasint>::max();
  if (m > kMaxDim || n > kMaxDim || k > kMaxDim) {
    return ffi::Error::InvalidArgument("blas_matmul: a dimension exceeds OpenBLAS's 32-bit index");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  if (add != nullptr && add != op) std::copy(add, add + m * n, op);
  const float beta = add != nullptr ? 1.0f : 0.0f;  // SGEMM reads C only when beta is not 0
  const CBLAS_TRANSPOSE w_op = transposed ? CblasTrans : CblasNoTrans;
  const blasint ldw = transposed ? k : n;
  if (m * k == 0 || n == 0) {
    if (add == nullptr) std::fill(op, op + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = nvila::Threads(pool);  // one block each: a GEMM call is long, and packs its panels
  if (m >= n) {  // blocks of rows: each thread reads all of w and its rows of x
    nvila::ForRanges(pool, m, 1, threads, [&](int64_t, int64_t m0, int64_t m1) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, w_op, m1 - m0, n, k, 1.0f, xp + m0 * k, k, wp, ldw, beta,
                        op + m0 * n, n);
    });
  } else {  // blocks of columns: each thread reads all of x and its columns of w
    nvila::ForRanges(pool, n, kColumnAlign, threads, [&](int64_t, int64_t n0, int64_t n1) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, w_op, m, n1 - n0, k, 1.0f, xp, k,
                        wp + (transposed ? n0 * k : n0), ldw, beta, op + n0, n);
    });
  }
  return ffi::Error::Success();
}

ffi::Error BlasMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  return Product(pool, x, w, nullptr, out, transposed);
}

ffi::Error BlasMatmulAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> add, ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  if (add.element_count() != out->element_count()) {
    return ffi::Error::InvalidArgument("blas_matmul_add expects the added operand in the product's shape [M, N]");
  }
  return Product(pool, x, w, add.typed_data(), out, transposed);
}

}  // namespace

extern "C" int nvila_blas_matmul_supported() { return 1; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaBlasMatmul, BlasMatmul, nvila::MatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaBlasMatmulAdd, BlasMatmulAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

// x [M, K] @ w [K, N] for a few rows (M <= 16, float32) on AVX-512 CPUs: the weight-streaming product of
// batched decoding. A GEMM library packs the weight and reads it at a fraction of the memory bandwidth when
// M is small; here the weight is read once, in its stored layout. K is walked in blocks of kRowBlock rows;
// within a block each weight row is one sequential stream across the column range, and the accumulators of
// a 32-column tile (two 16-float vectors per input row) stay in registers. Columns are split over XLA's
// intra-op thread pool.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kTile = 32;
constexpr int64_t kMaxRows = 8;  // register budget: 2 * kMaxRows accumulators

template <int M>
__attribute__((target("avx512f"))) void RowGroup(const float* x, const float* w, float* out, int64_t k_total,
                                                 int64_t n_total, int64_t n0, int64_t n1) {
  const int64_t full_end = n0 + (n1 - n0) / kTile * kTile;
  for (int m = 0; m < M; ++m) std::memset(out + m * n_total + n0, 0, (n1 - n0) * sizeof(float));
  for (int64_t k0 = 0; k0 < k_total; k0 += kRowBlock) {
    const int64_t rows = k_total - k0 < kRowBlock ? k_total - k0 : kRowBlock;
    for (int64_t n = n0; n < full_end; n += kTile) {
      __m512 lo[M], hi[M];
      for (int m = 0; m < M; ++m) {
        lo[m] = _mm512_loadu_ps(out + m * n_total + n);
        hi[m] = _mm512_loadu_ps(out + m * n_total + n + 16);
      }
      const float* wp = w + k0 * n_total + n;
      for (int64_t k = 0; k < rows; ++k, wp += n_total) {
        const __m512 w_lo = _mm512_loadu_ps(wp), w_hi = _mm512_loadu_ps(wp + 16);
        _mm_prefetch(reinterpret_cast<const char*>(wp + 8 * kTile), _MM_HINT_T0);
        for (int m = 0; m < M; ++m) {
          const __m512 s = _mm512_set1_ps(x[m * k_total + k0 + k]);
          lo[m] = _mm512_fmadd_ps(s, w_lo, lo[m]);
          hi[m] = _mm512_fmadd_ps(s, w_hi, hi[m]);
        }
      }
      for (int m = 0; m < M; ++m) {
        _mm512_storeu_ps(out + m * n_total + n, lo[m]);
        _mm512_storeu_ps(out + m * n_total + n + 16, hi[m]);
      }
    }
    for (int64_t n = full_end; n < n1; ++n) {  // columns past the last whole tile
      for (int m = 0; m < M; ++m) {
        float s = out[m * n_total + n];
        for (int64_t k = k0; k < k0 + rows; ++k) s += x[m * k_total + k] * w[k * n_total + n];
        out[m * n_total + n] = s;
      }
    }
  }
}

void Columns(const float* x, const float* w, float* out, int64_t m_total, int64_t k_total, int64_t n_total,
             int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < m_total; r += kMaxRows) {
    const float* xr = x + r * k_total;
    float* outr = out + r * n_total;
    switch (m_total - r < kMaxRows ? m_total - r : kMaxRows) {
      case 1: RowGroup<1>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 2: RowGroup<2>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 3: RowGroup<3>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 4: RowGroup<4>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 5: RowGroup<5>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 6: RowGroup<6>(xr, w, outr, k_total, n_total, n0, n1); break;
      case 7: RowGroup<7>(xr, w, outr, k_total, n_total, n0, n1); break;
      default: RowGroup<8>(xr, w, outr, k_total, n_total, n0, n1); break;
    }
  }
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("rows_matmul expects x [M, K] and w [K, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t threads = nvila::Threads(pool), per = ((n + threads - 1) / threads + kTile - 1) / kTile * kTile;
  nvila::ParallelFor(pool, (n + per - 1) / per, [=](int64_t p) {
    const int64_t n0 = p * per, n1 = n0 + per < n ? n0 + per : n;
    Columns(xp, wp, op, m, k, n, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int nvila_rows_matmul_supported() { return __builtin_cpu_supports("avx512f"); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

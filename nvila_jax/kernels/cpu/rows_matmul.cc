// x [M, K] times a weight for a few rows (M <= 16, float32) on AVX-512 CPUs: the weight-streaming product of
// decoding, bound by reading the weight. A GEMM library packs the weight and reads it at a fraction of the
// memory bandwidth when M is small; here it is read once, in its stored layout, either
//  - w [K, N] (a dense layer's kernel): K in blocks of kRowBlock rows; the accumulators of a column tile stay
//    in registers while the tile's rows are read, and the same tile kPrefetchRows rows further on is
//    prefetched (the hardware prefetcher alone does not follow these short row segments); or
//  - w [N, K] with transposed=true (a tied LM head, the [vocab, hidden] embedding table; up to 8 rows): groups
//    of whole rows of w, each a sequential stream, dotted with every x row, the next group prefetched.
// Work is split over XLA's intra-op thread pool by columns, or by K (partial sums added at the end) where a
// thread's share of a w [K, N] row would be too short to stream.
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "matmul_binding.h"
#include "parallel.h"
#include "vector_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 16;
constexpr int kMaxTransposedRows = 8;  // beyond, the x rows of a long K outgrow L1 (one load per x row per FMA)
// Rows of w read together (each a separate stream) and the prefetch distance, in rows. Measured on a
// batch-8 Qwen2.5-0.5B step's products (24.9 GB/s at 16/16): 8/8 25.7-26.6 GB/s, 4/4 25.8, 8/16 25.8,
// 32/32 20.6; without the prefetch 21.6.
constexpr int64_t kRowBlock = 8;
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kMinSegmentBytes = 8192;
// Parts per thread of a product, claimed as threads come: a thread that wakes late (tens of microseconds on a
// VM, against products of 20-700) takes what is left instead of the others waiting for it. Measured: 2 per
// thread ~2% faster batch-8 decode steps than 1; 4 slower (shorter streams of weight rows).
constexpr int64_t kPartsPerThread = 2;
constexpr int64_t kColumnTile = 32;  // ProductKN's widest column tile: two vectors
constexpr int kMaxGroup = 8;         // rows of w [N, K] per DotsNK group at most

inline void Prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

// out[:, n0:n1] (+)= x[:, k_begin:k_end] @ w[k_begin:k_end, n0:n1] for w [K, N], added to out when
// `accumulate`. Tiles of V vectors: two while 2 * M accumulators fit the registers, one beyond, so that up to
// 16 rows share one pass over the weight.
template <int M>
__attribute__((target("avx512f"))) void ProductKN(const float* x, const float* w, float* out, int64_t k_total,
                                                  int64_t n_total, int64_t k_begin, int64_t k_end, int64_t n0,
                                                  int64_t n1, bool accumulate) {
  constexpr int V = M <= 8 ? 2 : 1;
  constexpr int64_t tile = 16 * V;
  const int64_t full_end = n0 + (n1 - n0) / tile * tile;
  if (!accumulate) {
    for (int m = 0; m < M; ++m) std::memset(out + m * n_total + n0, 0, (n1 - n0) * sizeof(float));
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kRowBlock) {
    const int64_t rows = k_end - k0 < kRowBlock ? k_end - k0 : kRowBlock;
    for (int64_t n = n0; n < full_end; n += tile) {
      __m512 acc[M][V];
      for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) acc[m][v] = _mm512_loadu_ps(out + m * n_total + n + 16 * v);
      const float* wp = w + k0 * n_total + n;
      for (int64_t k = 0; k < rows; ++k, wp += n_total) {
        __m512 wv[V];
        for (int v = 0; v < V; ++v) {
          wv[v] = _mm512_loadu_ps(wp + 16 * v);
          Prefetch(wp + kPrefetchRows * n_total + 16 * v);  // may point past w: a prefetch never faults
        }
        for (int m = 0; m < M; ++m) {
          const __m512 s = _mm512_set1_ps(x[m * k_total + k0 + k]);
          for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(s, wv[v], acc[m][v]);
        }
      }
      for (int m = 0; m < M; ++m)
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + m * n_total + n + 16 * v, acc[m][v]);
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

// out[:, n:n+G] = x @ w[n:n+G, :]^T for w [N, K]: G whole rows of w against every x row, accumulated over K
// in vectors (the last one masked) and reduced at the end.
template <int M, int G>
__attribute__((target("avx512f"))) void DotsNK(const float* x, const float* w, float* out, int64_t k_total,
                                               int64_t n_total, int64_t n) {
  __m512 acc[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  const float* wn = w + n * k_total;
  for (int64_t k = 0; k < k_total; k += 16) {
    const __mmask16 mask = nvila::FirstLanes(k_total - k);
    __m512 wv[G];
    for (int g = 0; g < G; ++g) {
      wv[g] = _mm512_maskz_loadu_ps(mask, wn + g * k_total + k);
      Prefetch(wn + (G + g) * k_total + k);  // the next group's rows
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * k_total + k);
      for (int g = 0; g < G; ++g) acc[m][g] = _mm512_fmadd_ps(xv, wv[g], acc[m][g]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) out[m * n_total + n + g] = _mm512_reduce_add_ps(acc[m][g]);
}

// Groups of G rows of w, as many as the 32 registers hold beside M * G accumulators and one x vector.
template <int M>
void ProductNK(const float* x, const float* w, float* out, int64_t k_total, int64_t n_total, int64_t n0,
               int64_t n1) {
  constexpr int G = 31 / (M + 1) < kMaxGroup ? 31 / (M + 1) : kMaxGroup;
  int64_t n = n0;
  for (; n + G <= n1; n += G) DotsNK<M, G>(x, w, out, k_total, n_total, n);
  for (; n < n1; ++n) DotsNK<M, 1>(x, w, out, k_total, n_total, n);
}

using KNFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                      bool);
using NKFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <size_t... I>
constexpr std::array<KNFn, sizeof...(I)> KNTable(std::index_sequence<I...>) { return {&ProductKN<I + 1>...}; }
template <size_t... I>
constexpr std::array<NKFn, sizeof...(I)> NKTable(std::index_sequence<I...>) { return {&ProductNK<I + 1>...}; }

constexpr auto kProductKN = KNTable(std::make_index_sequence<kMaxRows>{});  // [M - 1]
constexpr auto kProductNK = NKTable(std::make_index_sequence<kMaxTransposedRows>{});

// Splits the product over the pool: by columns when every part still streams rows of kMinSegmentBytes,
// otherwise by K, each thread summing the K ranges it claims into its own buffer (the caller's is `out`),
// the buffers added at the end.
void ProductKNSplit(ffi::ThreadPool& pool, const float* x, const float* w, float* out, int64_t m, int64_t k,
                    int64_t n) {
  const KNFn product = kProductKN[m - 1];
  const int64_t threads = nvila::Threads(pool), parts = threads * kPartsPerThread;
  if (threads == 1 || n * int64_t{sizeof(float)} / parts >= kMinSegmentBytes) {
    nvila::ForRanges(pool, n, kColumnTile, parts,
                     [&](int64_t, int64_t n0, int64_t n1) { product(x, w, out, k, n, 0, k, n0, n1, false); });
    return;
  }
  std::unique_ptr<float[]> partial(new float[(threads - 1) * m * n]);  // each written before it is read
  std::vector<char> used(threads, 0);
  nvila::ForRanges(pool, k, kRowBlock, parts, [&](int64_t worker, int64_t k0, int64_t k1) {
    product(x, w, worker == 0 ? out : partial.get() + (worker - 1) * m * n, k, n, k0, k1, 0, n, used[worker]);
    used[worker] = 1;
  });
  if (!used[0]) std::memset(out, 0, m * n * sizeof(float));
  for (int64_t t = 1; t < threads; ++t) {
    if (!used[t]) continue;
    const float* src = partial.get() + (t - 1) * m * n;
    for (int64_t i = 0; i < m * n; ++i) out[i] += src[i];
  }
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[transposed ? 1 : 0] || xd[0] < 1 ||
      xd[0] > (transposed ? kMaxTransposedRows : kMaxRows)) {
    return ffi::Error::InvalidArgument("rows_matmul expects x [1..16, K] and w [K, N], or x [1..8, K] and w [N, K]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[transposed ? 0 : 1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  if (!transposed) {
    ProductKNSplit(pool, xp, wp, op, m, k, n);
    return ffi::Error::Success();
  }
  const NKFn product = kProductNK[m - 1];
  nvila::ForRanges(pool, n, kMaxGroup, nvila::Threads(pool) * kPartsPerThread,
                   [&](int64_t, int64_t n0, int64_t n1) { product(xp, wp, op, k, n, n0, n1); });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int nvila_rows_matmul_supported() { return __builtin_cpu_supports("avx512f"); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaRowsMatmul, RowsMatmul, nvila::MatmulBinding());

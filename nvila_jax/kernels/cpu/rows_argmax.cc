// The greedy choice of a decode step on AVX-512 CPUs: per row of logits [B, V] (float32) the index of the
// first maximum, with the ids in `suppressed` [V] (bool) counted as -inf and the first NaN winning where there
// is one, exactly jnp.argmax(jnp.where(suppressed, -inf, logits), axis=-1). One pass per chunk of a row
// (its maximum and first NaN, then the first index of that maximum, still in cache), chunks over XLA's
// intra-op pool, combined in order. XLA runs the same as several full-size passes (the masked copy, the NaN
// test, the maximum broadcast back, the index selection): ~5 ms of a batch-8 step over a 152k vocabulary.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vector_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinChunk = 16384;  // logits per part at least: below, waking a thread costs more

struct ChunkResult {
  float max;
  int64_t max_index;  // first index of `max` in the chunk
  int64_t nan_index;  // first NaN in the chunk, -1 if none
};

// Logits x[i, i + 16) with the suppressed ids set to -inf (lanes outside `valid` are 0 and must be ignored).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Masked(const float* x, const bool* suppressed, int64_t i,
                                                        __mmask16 valid) {
  const __m512 v = _mm512_maskz_loadu_ps(valid, x + i);
  const __m512i s = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, suppressed + i));
  return _mm512_mask_mov_ps(v, _mm512_test_epi32_mask(s, s), _mm512_set1_ps(-INFINITY));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) ChunkResult ScanChunk(const float* x, const bool* suppressed,
                                                                           int64_t begin, int64_t end) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 valid = nvila::FirstLanes(end - i);
    const __m512 v = Masked(x, suppressed, i, valid);
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
    if (nan) return {0.0f, 0, i + __builtin_ctz(nan)};
    best = _mm512_mask_max_ps(best, valid, best, v);
  }
  const float top = _mm512_reduce_max_ps(best);
  const __m512 topv = _mm512_set1_ps(top);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 valid = nvila::FirstLanes(end - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, Masked(x, suppressed, i, valid), topv, _CMP_EQ_OQ);
    if (hit) return {top, i + __builtin_ctz(hit), -1};
  }
  return {top, begin, -1};  // unreachable: the maximum is one of the chunk's values
}

ffi::Error RowsArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::PRED> suppressed,
                      ffi::ResultBuffer<ffi::S32> out) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1 || suppressed.element_count() != d[1]) {
    return ffi::Error::InvalidArgument("rows_argmax expects logits [B, V >= 1] and suppressed [V]");
  }
  const int64_t rows = d[0], vocab = d[1];
  const int64_t want = (2 * nvila::Threads(pool) + rows - 1) / rows;  // two parts per thread in all
  const int64_t by_size = (vocab + kMinChunk - 1) / kMinChunk;
  const int64_t chunks = want < by_size ? want : by_size;
  const int64_t per = ((vocab + chunks - 1) / chunks + 15) / 16 * 16;
  std::vector<ChunkResult> parts(rows * chunks);
  const float* x = logits.typed_data();
  const bool* s = suppressed.typed_data();
  nvila::ParallelFor(pool, rows * chunks, [&](int64_t p) {
    const int64_t row = p / chunks, begin = p % chunks * per, end = begin + per < vocab ? begin + per : vocab;
    parts[p] = begin < end ? ScanChunk(x + row * vocab, s, begin, end) : ChunkResult{-INFINITY, vocab, -1};
  });
  int32_t* o = out->typed_data();
  for (int64_t row = 0; row < rows; ++row) {
    const ChunkResult* r = parts.data() + row * chunks;
    int64_t chosen = r[0].nan_index >= 0 ? r[0].nan_index : r[0].max_index;
    float top = r[0].max;
    bool nan = r[0].nan_index >= 0;
    for (int64_t c = 1; c < chunks && !nan; ++c) {
      if (r[c].nan_index >= 0) {
        chosen = r[c].nan_index, nan = true;
      } else if (r[c].max > top) {
        chosen = r[c].max_index, top = r[c].max;
      }
    }
    o[row] = static_cast<int32_t>(chosen);
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" int nvila_rows_argmax_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaRowsArgmax, RowsArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

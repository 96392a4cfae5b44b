// Grouped-query attention forward (flash style, float32) for CPUs with AVX-512: the prefill and vision
// attention of inference. XLA's CPU attention pays three passes over every logit block and a GEMM call per
// small product; here, per key block, every 12-row chunk of a work item's queries gets its logits and softmax
// update while the block's keys (transposed once per call, shared by every query row and head of the group)
// stay in L1, then its P V while the block's values do; under a causal mask a diagonal block is computed
// only up to each chunk's last visible key.
//
// Semantics (those of nvila_jax.models.layers.AttentionMask): a query sees a key when both have the same
// non-zero segment id and, if causal, the key's slot is not after the query's; a query that sees no key
// gives zeros. Work items are (batch row, KV head, block of query positions), claimed dynamically by XLA's
// intra-op threads, last query blocks (the most keys under a causal mask) first.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "aligned_vector.h"
#include "parallel.h"
#include "vector_exp.h"
#include "vector_lanes.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 12;      // query rows whose logits are computed together (divisible by every kPV)
constexpr int64_t kQKRows = 6;      // rows per logits micro-kernel: 6 x 4 accumulators
constexpr int64_t kKeyGroup = 64;   // keys per logits micro-kernel column group (4 vectors)
constexpr int64_t kKeyBlock = 128;  // keys per block (a multiple of 16)
constexpr int64_t kItemRows = 384;  // query rows (positions x heads of a group) per work item, about
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// s[r][0:16 V] = q_r . kt[:, 0:16 V] for R rows and V vectors of keys; kt is a part of the key block
// transposed ([d][kKeyBlock]), s has rows of lds logits.
template <int R, int V>
__attribute__((target("avx512f"))) void LogitsGroup(const float* const* q, const float* kt, int64_t d, float* s,
                                                    int64_t lds) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) acc[r][i] = _mm512_setzero_ps();
  const float* kp = kt;
  for (int64_t e = 0; e < d; ++e, kp += kKeyBlock) {
    __m512 k[V];
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) k[i] = _mm512_loadu_ps(kp + 16 * i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r][e]);
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) acc[r][i] = _mm512_fmadd_ps(qb, k[i], acc[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(s + r * lds + 16 * i, acc[r][i]);
}

// s[r][0:nk_pad] = q_r . kt[:, 0:nk_pad] for R rows (nk_pad a multiple of 16): groups of kKeyGroup keys, then
// the 1-3 vectors left.
template <int R>
__attribute__((target("avx512f"))) void Logits(const float* const* q, const float* kt, int64_t nk_pad, int64_t d,
                                               float* s) {
  int64_t n = 0;
  for (; n + kKeyGroup <= nk_pad; n += kKeyGroup) LogitsGroup<R, kKeyGroup / 16>(q, kt + n, d, s + n, nk_pad);
  switch ((nk_pad - n) / 16) {
    case 1: LogitsGroup<R, 1>(q, kt + n, d, s + n, nk_pad); break;
    case 2: LogitsGroup<R, 2>(q, kt + n, d, s + n, nk_pad); break;
    case 3: LogitsGroup<R, 3>(q, kt + n, d, s + n, nk_pad); break;
    default: break;
  }
}

// Vector i of the NV over a row of values: a plain load, or a masked one (lanes `last`) for a partial last one.
template <int NV, bool Tail>
__attribute__((target("avx512f"))) inline __m512 RowVector(const float* a, int i, __mmask16 last) {
  return Tail && i == NV - 1 ? _mm512_maskz_loadu_ps(last, a) : _mm512_loadu_ps(a);
}

// Stores vector i of the NV over a row of values the same way (RowVector's counterpart).
template <int NV, bool Tail>
__attribute__((target("avx512f"))) inline void StoreRowVector(float* a, int i, __mmask16 last, __m512 v) {
  if (Tail && i == NV - 1) {
    _mm512_mask_storeu_ps(a, last, v);
  } else {
    _mm512_storeu_ps(a, v);
  }
}

// o[r] = o[r] * corr[r] + p[r][0:nk] @ v[0:nk] for R rows of NV vectors (d <= 16 NV); v holds nk contiguous
// rows of d values. Only a partial last vector (Tail: d not a multiple of 16) is loaded and stored under a
// mask: masked loads in the key loop made the whole kernel ~10% slower on the project's AVX-512 VM.
template <int R, int NV, bool Tail>
__attribute__((target("avx512f"))) void AccumulatePV(const float* p, int64_t ldp, const float* v, int64_t nk,
                                                     const float* corr, float* o, int64_t d) {
  const __mmask16 last = nvila::FirstLanes(d - 16 * (NV - 1));
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_mul_ps(RowVector<NV, Tail>(o + r * d + 16 * i, i, last), c);
  }
  for (int64_t j = 0; j < nk; ++j, v += d) {
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) vv[i] = RowVector<NV, Tail>(v + 16 * i, i, last);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(pb, vv[i], acc[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) StoreRowVector<NV, Tail>(o + r * d + 16 * i, i, last, acc[r][i]);
}

// The kChunk rows of a chunk through AccumulatePV in groups that fit the 24-accumulator register budget.
template <int NV, bool Tail>
__attribute__((target("avx512f"))) void ChunkPV(const float* p, int64_t ldp, const float* v, int64_t nk,
                                                const float* corr, float* o, int64_t d) {
  constexpr int R = 24 / NV >= 6 ? 6 : 24 / NV;  // 6, 4 or 3: each divides kChunk
  for (int64_t r = 0; r < kChunk; r += R)
    AccumulatePV<R, NV, Tail>(p + r * ldp, ldp, v, nk, corr + r, o + r * d, d);
}

using ChunkPVFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t);
template <bool Tail>
constexpr ChunkPVFn kChunkPV[8] = {ChunkPV<1, Tail>, ChunkPV<2, Tail>, ChunkPV<3, Tail>, ChunkPV<4, Tail>,
                                   ChunkPV<5, Tail>, ChunkPV<6, Tail>, ChunkPV<7, Tail>, ChunkPV<8, Tail>};

// The PV routine for head size d (1 to 128).
inline ChunkPVFn ChunkPVFor(int64_t d) {
  return d % 16 ? kChunkPV<true>[(d + 15) / 16 - 1] : kChunkPV<false>[d / 16 - 1];
}

// Online-softmax update of one row over a key block: s (logits, nk_pad wide) becomes the row's unnormalised
// probabilities; `visible` holds one 16-key mask per vector, or is null when every key is visible. Returns
// the factor the row's accumulated output must be multiplied by.
__attribute__((target("avx512f"))) float SoftmaxRow(float* s, int64_t nk_pad, const __mmask16* visible, float scale,
                                                    float& run_max, float& denom) {
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t n = 0; n < nk_pad; n += 16) {
    const __m512 x = _mm512_loadu_ps(s + n);
    mx = visible ? _mm512_mask_max_ps(mx, visible[n / 16], mx, x) : _mm512_max_ps(mx, x);
  }
  const float block_max = _mm512_reduce_max_ps(mx);
  if (block_max == kNegInf) {  // this row sees nothing in the block
    std::memset(s, 0, nk_pad * sizeof(float));
    return 1.0f;
  }
  const float new_max = std::max(run_max, block_max);
  // exp((run_max - new_max) * scale), 1 when the maximum stays (most blocks after the first few)
  const float corr = run_max == kNegInf ? 0.0f : run_max == new_max ? 1.0f : std::exp((run_max - new_max) * scale);
  const __m512 m = _mm512_set1_ps(new_max * scale), sc = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t n = 0; n < nk_pad; n += 16) {
    __m512 p = nvila::ExpNonPositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + n), sc, m));
    if (visible) p = _mm512_maskz_mov_ps(visible[n / 16], p);
    _mm512_storeu_ps(s + n, p);
    sum = _mm512_add_ps(sum, p);
  }
  denom = denom * corr + _mm512_reduce_add_ps(sum);
  run_max = new_max;
  return corr;
}

// Ranges of a set of positions' segments and slots, over those with a non-zero segment.
struct Range {
  int32_t seg_min = std::numeric_limits<int32_t>::max(), seg_max = 0;
  int32_t slot_min = std::numeric_limits<int32_t>::max(), slot_max = std::numeric_limits<int32_t>::min();
  bool all_valid = true;  // every position has a non-zero segment

  void Add(int32_t seg, int32_t slot) {
    if (seg <= 0) {
      all_valid = false;
      return;
    }
    seg_min = std::min(seg_min, seg), seg_max = std::max(seg_max, seg);
    slot_min = std::min(slot_min, slot), slot_max = std::max(slot_max, slot);
  }
  bool any() const { return seg_max > 0; }
};

enum class Visibility { kNone, kAll, kSome };

Visibility Classify(const Range& q, const Range& kv, bool whole_block, bool causal) {
  if (!q.any() || !kv.any() || kv.seg_max < q.seg_min || kv.seg_min > q.seg_max) return Visibility::kNone;
  if (causal && kv.slot_min > q.slot_max) return Visibility::kNone;
  const bool one_segment = q.seg_min == q.seg_max && kv.seg_min == kv.seg_max && q.seg_min == kv.seg_min;
  if (whole_block && q.all_valid && kv.all_valid && one_segment && (!causal || kv.slot_max <= q.slot_min))
    return Visibility::kAll;
  return Visibility::kSome;
}

// n rounded up to whole vectors of 16: the row length of a chunk's logits over n keys.
inline int64_t WholeVectors(int64_t n) { return (n + 15) / 16 * 16; }

struct KeyBlock {
  const int32_t* seg;   // segments of the block's keys, 0 past the last key
  const int32_t* slot;  // their slots
};

// Under a causal mask, the keys of a block that a chunk of queries can see end at the last key with a
// non-zero segment and a slot not after the chunk's last query: only that many keys (a diagonal block's
// first part) are computed. nk_pad: the block's keys rounded up to 16.
__attribute__((target("avx512f"))) int64_t CausalWidth(const KeyBlock& keys, const Range& chunk, int64_t nk_pad) {
  const __m512i last_slot = _mm512_set1_epi32(chunk.slot_max);
  for (int64_t n = nk_pad - 16; n >= 0; n -= 16) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(keys.seg + n), _mm512_setzero_si512()) &
                           _mm512_cmple_epi32_mask(_mm512_loadu_si512(keys.slot + n), last_slot);
    if (seen) return n + 32 - __builtin_clz(static_cast<uint32_t>(seen));
  }
  return 0;
}

// The two halves of 64-bit pairs interleaved: steps of the 16 x 16 transpose below.
__attribute__((target("avx512f"))) inline __m512 PairsLo(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
__attribute__((target("avx512f"))) inline __m512 PairsHi(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// r[i][j] <- r[j][i] for a 16 x 16 float block held in 16 registers (64 shuffles).
__attribute__((target("avx512f"))) inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = PairsLo(t[i], t[i + 2]);
    r[i + 1] = PairsHi(t[i], t[i + 2]);
    r[i + 2] = PairsLo(t[i + 1], t[i + 3]);
    r[i + 3] = PairsHi(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// One (batch row, KV head)'s keys [s][d] -> key blocks transposed, [block][d][kKeyBlock], zero past the
// last key: 16 keys x 16 dimensions at a time through registers.
__attribute__((target("avx512f"))) void PackKeys(const float* keys, int64_t s, int64_t d, float* kt) {
  const int64_t padded = (s + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  for (int64_t j0 = 0; j0 < padded; j0 += 16) {
    float* block = kt + (j0 / kKeyBlock) * d * kKeyBlock + j0 % kKeyBlock;
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
      const __mmask16 dims = nvila::FirstLanes(d - e0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = j0 + i < s ? _mm512_maskz_loadu_ps(dims, keys + (j0 + i) * d + e0) : _mm512_setzero_ps();
      }
      Transpose16x16(r);
      for (int64_t e = 0; e < 16 && e0 + e < d; ++e) _mm512_storeu_ps(block + (e0 + e) * kKeyBlock, r[e]);
    }
  }
}

struct Problem {
  const float* q;
  const int32_t *q_seg, *kv_seg, *q_slot, *kv_slot;
  float* out;
  const float* kt;  // keys transposed per block: [B][KVH][block][d][kKeyBlock], zero past the last key; or
                    // null: each item transposes its blocks as it goes (one chunk of rows reads them once)
  const float* k;   // keys, head-major: [B][KVH][S][d]
  const float* v;   // values, head-major: [B][KVH][S][d]
  int64_t b, t, h, s, kvh, d;
  float scale;
  bool causal;
};

// One work item: query positions [p0, p1) of batch row ib, query heads of KV head ih.
__attribute__((target("avx512f"))) void AttendItem(const Problem& P, int64_t ib, int64_t ih, int64_t p0, int64_t p1) {
  const int64_t g = P.h / P.kvh, d = P.d, rows = (p1 - p0) * g;
  const int64_t padded_rows = (rows + kChunk - 1) / kChunk * kChunk;
  const ChunkPVFn chunk_pv = ChunkPVFor(d);
  // Row r is query position p0 + r / g, head ih * g + r % g; padding rows repeat the last row (discarded).
  // Per-thread buffers, reused across items and calls (fresh allocations of this size cost page faults).
  // Those read a vector at a time start on a cache line.
  thread_local std::vector<const float*> q_row;
  thread_local std::vector<int32_t> row_seg, row_slot;
  thread_local nvila::LineAlignedVector<int32_t> key_seg, key_slot;
  thread_local std::vector<float> run_max, denom, corr;
  thread_local nvila::LineAlignedVector<float> o, s, block_kt;
  thread_local std::vector<__mmask16> visible;
  thread_local std::vector<Range> chunk_range;
  thread_local std::vector<int64_t> chunk_width;
  q_row.resize(padded_rows), row_seg.resize(padded_rows), row_slot.resize(padded_rows);
  for (int64_t r = 0; r < padded_rows; ++r) {
    const int64_t rr = std::min(r, rows - 1), pos = p0 + rr / g, head = ih * g + rr % g;
    q_row[r] = P.q + ((ib * P.t + pos) * P.h + head) * d;
    row_seg[r] = P.q_seg[ib * P.t + pos];
    row_slot[r] = P.q_slot[ib * P.t + pos];
  }
  const int64_t chunks = padded_rows / kChunk;
  chunk_range.assign(chunks, Range());
  for (int64_t r = 0; r < padded_rows; ++r) chunk_range[r / kChunk].Add(row_seg[r], row_slot[r]);

  o.assign(padded_rows * d, 0.0f), run_max.assign(padded_rows, kNegInf), denom.assign(padded_rows, 0.0f);
  s.resize(padded_rows * kKeyBlock), corr.resize(padded_rows), key_seg.resize(kKeyBlock), key_slot.resize(kKeyBlock);
  visible.resize(kChunk * kKeyBlock / 16), chunk_width.resize(chunks);
  for (int64_t k0 = 0; k0 < P.s; k0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, P.s - k0), nk_pad = WholeVectors(nk);
    Range keys;
    for (int64_t j = 0; j < nk_pad; ++j) {  // padding keys: segment 0, never visible
      key_seg[j] = j < nk ? P.kv_seg[ib * P.s + k0 + j] : 0;
      key_slot[j] = j < nk ? P.kv_slot[ib * P.s + k0 + j] : 0;
      keys.Add(key_seg[j], key_slot[j]);
    }
    const float* kt;
    if (P.kt != nullptr) {
      kt = P.kt + ((ib * P.kvh + ih) * ((P.s + kKeyBlock - 1) / kKeyBlock) + k0 / kKeyBlock) * d * kKeyBlock;
    } else {
      block_kt.resize(d * kKeyBlock);
      PackKeys(P.k + ((ib * P.kvh + ih) * P.s + k0) * d, nk, d, block_kt.data());
      kt = block_kt.data();
    }
    const KeyBlock keys_in_block{key_seg.data(), key_slot.data()};
    // First every chunk's logits and softmax update against the block's keys (kept in L1 meanwhile), then
    // every chunk's P V against its values.
    for (int64_t c = 0; c < chunks; ++c) {
      chunk_width[c] = 0;
      const Visibility vis = Classify(chunk_range[c], keys, nk == nk_pad, P.causal);
      if (vis == Visibility::kNone) continue;
      const int64_t width =
          vis == Visibility::kSome && P.causal ? CausalWidth(keys_in_block, chunk_range[c], nk_pad) : nk;
      if (width == 0) continue;
      chunk_width[c] = width;
      const int64_t width_pad = WholeVectors(width);
      const int64_t r0 = c * kChunk;
      float* sc = &s[r0 * kKeyBlock];
      for (int64_t r = 0; r < kChunk; r += kQKRows)
        Logits<kQKRows>(&q_row[r0 + r], kt, width_pad, d, &sc[r * width_pad]);
      if (vis == Visibility::kSome) {
        for (int64_t r = 0; r < kChunk; ++r) {
          const __m512i qs = _mm512_set1_epi32(row_seg[r0 + r]), ql = _mm512_set1_epi32(row_slot[r0 + r]);
          for (int64_t n = 0; n < width_pad; n += 16) {
            const __m512i ks = _mm512_loadu_si512(&key_seg[n]), kl = _mm512_loadu_si512(&key_slot[n]);
            __mmask16 m = _mm512_cmpeq_epi32_mask(ks, qs) & _mm512_cmpgt_epi32_mask(ks, _mm512_setzero_si512());
            if (P.causal) m &= _mm512_cmple_epi32_mask(kl, ql);
            visible[r * (width_pad / 16) + n / 16] = m;
          }
        }
      }
      for (int64_t r = 0; r < kChunk; ++r)
        corr[r0 + r] = SoftmaxRow(&sc[r * width_pad], width_pad,
                                  vis == Visibility::kSome ? &visible[r * (width_pad / 16)] : nullptr, P.scale,
                                  run_max[r0 + r], denom[r0 + r]);
    }
    const float* v0 = P.v + ((ib * P.kvh + ih) * P.s + k0) * d;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t width = chunk_width[c], r0 = c * kChunk;
      if (width > 0) chunk_pv(&s[r0 * kKeyBlock], WholeVectors(width), v0, width, &corr[r0], &o[r0 * d], d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = p0 + r / g, head = ih * g + r % g;
    float* dst = P.out + ((ib * P.t + pos) * P.h + head) * d;
    const float inv = denom[r] > 0.0f ? 1.0f / denom[r] : 0.0f;
    for (int64_t e = 0; e < d; ++e) dst[e] = o[r * d + e] * inv;
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> q_slot,
                     ffi::Buffer<ffi::S32> kv_slot, ffi::ResultBuffer<ffi::F32> out, float scale, int32_t causal) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[3] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] || kd[1] == 0 || qd[2] % kd[1] != 0) {
    return ffi::Error::InvalidArgument("attention expects q [B, T, H, D] and k, v [B, KVH, S, D] with KVH dividing H");
  }
  if (qd[3] < 1 || qd[3] > 128) return ffi::Error::InvalidArgument("attention supports head sizes 1 to 128");
  const int64_t b = qd[0], t = qd[1], h = qd[2], kvh = kd[1], s = kd[2], d = qd[3];
  if (q_seg.element_count() != b * t || q_slot.element_count() != b * t || kv_seg.element_count() != b * s ||
      kv_slot.element_count() != b * s) {
    return ffi::Error::InvalidArgument("attention expects segments and slots of shapes [B, T] and [B, S]");
  }
  // Keys transposed once per (batch row, KV head) when several chunks of query rows read them (prefill); a
  // decode step's rows (one chunk) transpose each block as they read it, in cache. The buffer belongs to the
  // calling thread and is reused by its later calls (no page faults per call). Values are read in place.
  const int64_t g = h / kvh, key_blocks = (s + kKeyBlock - 1) / kKeyBlock;
  const float* kp = k.typed_data();
  float* kt = nullptr;
  if (t * g > kChunk) {
    thread_local nvila::LineAlignedVector<float> packed;
    const int64_t kt_size = b * kvh * key_blocks * d * kKeyBlock;
    if (packed.size() < static_cast<size_t>(kt_size)) packed.resize(kt_size);
    kt = packed.data();
    nvila::ParallelFor(pool, b * kvh,
                       [&](int64_t bh) { PackKeys(kp + bh * s * d, s, d, kt + bh * key_blocks * d * kKeyBlock); });
  }
  const Problem P{q.typed_data(),       q_seg.typed_data(), kv_seg.typed_data(), q_slot.typed_data(),
                  kv_slot.typed_data(), out->typed_data(),  kt,                  kp,
                  v.typed_data(),       b,                  t,                   h,
                  s,                    kvh,                d,                   scale,
                  causal != 0};
  // Query positions per item: about kItemRows rows, a whole number of chunks where the group size allows.
  const int64_t unit = kChunk / std::gcd(g, kChunk);
  const int64_t positions = std::max<int64_t>(unit, kItemRows / g / unit * unit);
  const int64_t q_blocks = (t + positions - 1) / positions;
  nvila::ParallelFor(pool, b * kvh * q_blocks, [&P, q_blocks, kvh, positions](int64_t item) {
    const int64_t qb = q_blocks - 1 - item / (P.b * kvh), rest = item % (P.b * kvh);
    const int64_t p0 = qb * positions, p1 = std::min(p0 + positions, P.t);
    AttendItem(P, rest / kvh, rest % kvh, p0, p1);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int nvila_attention_supported() { return __builtin_cpu_supports("avx512f"); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvilaAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal"));

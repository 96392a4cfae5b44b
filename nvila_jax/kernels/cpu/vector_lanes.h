// Lane masks for the AVX-512 kernels' ragged edges (the last vector of a row, a head, a panel).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace nvila {

// The first n of a vector's 16 float lanes: all of them when n >= 16, none when n <= 0.
inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
}

}  // namespace nvila

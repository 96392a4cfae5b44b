// std::vector storage that starts on a 64-byte cache line, for the CPU kernels' reusable buffers: a vector load
// from a row that starts on a line never straddles two (glibc's malloc gives 16-byte alignment, and its
// large blocks start 16 bytes into a page, so every 64-byte load from such a buffer would touch two lines).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace nvila {

template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

template <typename T>
using LineAlignedVector = std::vector<T, LineAligned<T>>;

}  // namespace nvila

// Work split over XLA's intra-op thread pool, shared by the CPU kernels.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace nvila {

// Threads of the pool (at least 1): what a kernel splits its work for.
inline int64_t Threads(xla::ffi::ThreadPool& pool) { return pool.num_threads() > 0 ? pool.num_threads() : 1; }

// Runs body(part) for part in [0, parts). Parts are claimed from a shared counter by the caller and by the
// tasks it schedules, so the caller finishes the work itself when the pool has no free thread (never waiting
// on a task that cannot start), and uneven parts balance themselves. The counters live on the heap: a task
// may start after the call has returned, find nothing left and exit.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, parts, body] {
    for (int64_t p; (p = shared->next.fetch_add(1)) < parts;) {
      body(p);
      shared->done.fetch_add(1);
    }
  };
  const int64_t threads = Threads(pool), helpers = (parts < threads ? parts : threads) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));  // each task owns a copy
  work();
  while (shared->done.load() < parts) std::this_thread::yield();
}

// Splits [0, total) into one range per thread, each a multiple of `align` long (the last one cut short),
// and runs body(part, begin, end) for each over the pool. Returns the number of parts.
template <typename Body>
int64_t ForRanges(xla::ffi::ThreadPool& pool, int64_t total, int64_t align, const Body& body) {
  const int64_t threads = Threads(pool);
  const int64_t per = ((total + threads - 1) / threads + align - 1) / align * align, parts = (total + per - 1) / per;
  ParallelFor(pool, parts, [&](int64_t p) { body(p, p * per, p * per + per < total ? p * per + per : total); });
  return parts;
}

}  // namespace nvila

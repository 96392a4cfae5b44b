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

// Runs body(worker, part) for part in [0, parts). Parts are claimed from a shared counter by the caller
// (worker 0) and by the tasks it schedules (workers 1..), so the caller finishes the work itself when the
// pool has no free thread (never waiting on a task that cannot start), uneven parts balance themselves, and a
// task that starts late takes only what is left. The counters live on the heap: a task may start after the
// call has returned, find nothing left and exit.
template <typename Body>
void ParallelForWorkers(xla::ffi::ThreadPool& pool, int64_t parts, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, parts, body](int64_t worker) {
    for (int64_t p; (p = shared->next.fetch_add(1)) < parts;) {
      body(worker, p);
      shared->done.fetch_add(1);
    }
  };
  const int64_t threads = Threads(pool), helpers = (parts < threads ? parts : threads) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work, t] { work(t + 1); });  // each task owns a copy
  work(0);
  while (shared->done.load() < parts) std::this_thread::yield();
}

// Runs body(part) for part in [0, parts) over the pool (see ParallelForWorkers).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, const Body& body) {
  ParallelForWorkers(pool, parts, [&body](int64_t, int64_t p) { body(p); });
}

// Splits [0, total) into `parts` ranges (fewer when total is short), each a multiple of `align` long (the
// last one cut short), and runs body(worker, begin, end) for each over the pool.
template <typename Body>
void ForRanges(xla::ffi::ThreadPool& pool, int64_t total, int64_t align, int64_t parts, const Body& body) {
  const int64_t per = ((total + parts - 1) / parts + align - 1) / align * align, count = (total + per - 1) / per;
  ParallelForWorkers(pool, count, [&](int64_t worker, int64_t p) {
    body(worker, p * per, p * per + per < total ? p * per + per : total);
  });
}

}  // namespace nvila

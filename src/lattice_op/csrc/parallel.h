// Parallel-for interface of the lattice core. The core never creates threads on its own: the
// caller hands it a Parallel. The TensorFlow adapter fills one from TF's intra-op thread pool;
// StdThreadParallel below serves standalone use (C++ tests, a future NumPy binding).
#ifndef CRF3D_PARALLEL_H_
#define CRF3D_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace crf3d {

using RangeFn = std::function<void(int64_t begin, int64_t end)>;

class Parallel {
 public:
  virtual ~Parallel() = default;
  // Number of threads that may run work concurrently (>= 1).
  virtual int num_threads() const = 0;
  // Calls fn on disjoint ranges that cover [0, n), possibly concurrently, and returns when all
  // are done. cost_per_unit is a rough count of cycles per unit of work, used to decide how
  // finely to split.
  virtual void For(int64_t n, int64_t cost_per_unit, const RangeFn& fn) const = 0;
};

// Splits [0, n) into at most num_threads contiguous ranges, one std::thread each.
class StdThreadParallel final : public Parallel {
 public:
  // Below about 100k cycles of work, starting and joining a thread costs more than it saves.
  static constexpr int64_t kMinCyclesPerThread = 100000;

  explicit StdThreadParallel(int threads = 0)
      : threads_(threads > 0 ? threads
                             : std::max(1, static_cast<int>(std::thread::hardware_concurrency()))) {}
  int num_threads() const override { return threads_; }
  void For(int64_t n, int64_t cost_per_unit, const RangeFn& fn) const override {
    if (n <= 0) return;
    const int64_t by_cost =
        std::max<int64_t>(1, n * std::max<int64_t>(1, cost_per_unit) / kMinCyclesPerThread);
    const int64_t parts = std::min<int64_t>({static_cast<int64_t>(threads_), n, by_cost});
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(parts - 1));
    for (int64_t p = 1; p < parts; ++p) {
      pool.emplace_back([&fn, n, parts, p] { fn(n * p / parts, n * (p + 1) / parts); });
    }
    fn(0, n / parts);
    for (auto& t : pool) t.join();
  }

 private:
  int threads_;
};

}  // namespace crf3d

#endif  // CRF3D_PARALLEL_H_

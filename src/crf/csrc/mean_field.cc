// Mean-field inference in one call; see mean_field.h.
#include "mean_field.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <sstream>

namespace crf3d {

namespace {

// Voxels per block of the fused pass: its K-wide rows stay in the L1 cache between steps.
constexpr int64_t kBlock = 256;

// Eight floats (or int32s) at a time, in GCC's vector extension: one AVX register in the AVX2
// clone below, two SSE registers in the default one.
typedef float Floats __attribute__((vector_size(32)));
typedef int32_t Ints __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// exp(x) for finite x <= 0, in place, to about 2 ulp: x = n ln2 + r with n = round(x / ln2)
// and |r| <= ln2 / 2, exp(r) by the degree-7 polynomial of the classic single-precision exp
// (Cephes), and 2^n assembled in the exponent bits. Inputs below -87 give exp(-87) (1.6e-38)
// instead of a denormal or zero.
inline void ExpNonPositive(Floats& x) {
  const Floats lowest = Floats{} - 87.0f;
  x = x < lowest ? lowest : x;
  // round to nearest by adding and removing 1.5 * 2^23 (|x / ln2| < 2^22)
  const Floats n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Floats r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  x = p * (Floats)bits;  // the vector cast reinterprets the bits
}

__attribute__((target_clones("avx2", "default"))) void ExpInPlace(float* v, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Floats x;
    std::memcpy(&x, v + j, sizeof(x));
    ExpNonPositive(x);
    std::memcpy(v + j, &x, sizeof(x));
  }
  if (j < n) {  // the tail, padded with zeros
    Floats x = {};
    std::memcpy(&x, v + j, static_cast<size_t>(n - j) * sizeof(float));
    ExpNonPositive(x);
    std::memcpy(v + j, &x, static_cast<size_t>(n - j) * sizeof(float));
  }
}

// The state and buffers of one inference.
struct MeanField {
  int64_t k = 0;
  int64_t per_item = 0;
  bool symmetric = false;
  const float* unaries = nullptr;
  float* logits = nullptr;
  float* probabilities = nullptr;
  const float* w1 = nullptr;
  const float* w2 = nullptr;
  const float* mu = nullptr;
  // Per voxel (bilateral) and per voxel of one item (spatial): the scale of a filter's output
  // ("mean": 1 / (K 1)), and of its input too ("symmetric": (K 1)^(-1/2) both).
  std::vector<float> scale_b, scale_s;
  float* q_b = nullptr;  // bilateral input [n, K]
  float* q_s = nullptr;  // spatial input [n, K] ("symmetric"; "mean" shares q_b)
  const float* a = nullptr;  // bilateral output
  const float* g = nullptr;  // spatial output

  // Softmax of the logits rows of voxels [i0, i0 + count) (rows at `rows`), written as the next
  // iteration's filter inputs, or as the probabilities after the last iteration. tmp holds
  // count * K floats and may be `rows` itself.
  void Emit(const float* rows, int64_t i0, int64_t count, bool last, float* tmp) const {
    for (int64_t v = 0; v < count; ++v) {
      const float* row = rows + v * k;
      float top = row[0];
      for (int64_t l = 1; l < k; ++l) top = std::max(top, row[l]);
      for (int64_t l = 0; l < k; ++l) tmp[v * k + l] = row[l] - top;
    }
    ExpInPlace(tmp, count * k);
    int64_t item_voxel = i0 % per_item;
    for (int64_t v = 0; v < count; ++v) {
      float* q = tmp + v * k;
      float sum = 0.0f;
      for (int64_t l = 0; l < k; ++l) sum += q[l];
      const float inv = 1.0f / sum;
      const int64_t i = i0 + v;
      if (last) {
        for (int64_t l = 0; l < k; ++l) probabilities[i * k + l] = q[l] * inv;
      } else if (symmetric) {
        const float sb = inv * scale_b[static_cast<size_t>(i)];
        const float ss = inv * scale_s[static_cast<size_t>(item_voxel)];
        for (int64_t l = 0; l < k; ++l) {
          q_b[i * k + l] = q[l] * sb;
          q_s[i * k + l] = q[l] * ss;
        }
      } else {
        for (int64_t l = 0; l < k; ++l) q_b[i * k + l] = q[l] * inv;
      }
      if (++item_voxel == per_item) item_voxel = 0;
    }
  }

  // L = U - mu (w1 A(Q) + w2 G(Q)) for voxels [i0, i0 + count) (into tmp, and into `logits`
  // after the last iteration only: the memory traffic is what this pass costs), then Emit.
  void Update(int64_t i0, int64_t count, bool last, float* tmp, float* message) const {
    int64_t item_voxel = i0 % per_item;
    for (int64_t v = 0; v < count; ++v) {
      const int64_t i = i0 + v;
      const float ob = scale_b[static_cast<size_t>(i)];
      const float os = scale_s[static_cast<size_t>(item_voxel)];
      const float* ai = a + i * k;
      const float* gi = g + i * k;
      for (int64_t l = 0; l < k; ++l) message[l] = w1[l] * ai[l] * ob + w2[l] * gi[l] * os;
      float* row = tmp + v * k;
      const float* u = unaries + i * k;
      for (int64_t l = 0; l < k; ++l) {
        const float* mu_l = mu + l * k;
        float pairwise = 0.0f;
        for (int64_t j = 0; j < k; ++j) pairwise += mu_l[j] * message[j];
        row[l] = u[l] - pairwise;
      }
      if (++item_voxel == per_item) item_voxel = 0;
    }
    if (last && logits != nullptr) {
      std::memcpy(logits + i0 * k, tmp, static_cast<size_t>(count * k) * sizeof(float));
    }
    Emit(tmp, i0, count, last, tmp);
  }
};

// Runs fn(i0, count, tmp, message) over blocks of kBlock voxels of [0, n) in parallel.
template <typename Fn>
void ForBlocks(int64_t n, int64_t k, int64_t cost_per_voxel, const Parallel& par, const Fn& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  par.For(blocks, kBlock * cost_per_voxel, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(static_cast<size_t>(kBlock * k)), message(static_cast<size_t>(k));
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t i0 = blk * kBlock;
      fn(i0, std::min(kBlock, n - i0), tmp.data(), message.data());
    }
  });
}

}  // namespace

Status MeanFieldInference(const Grid& grid, const float* unaries, const LatticeView& lat,
                          const std::vector<AxisTaps<float>>& spatial, const MeanFieldParams& params,
                          float* logits, float* probabilities, const Parallel& par) {
  const int64_t k = grid.channels;
  const int64_t n = grid.voxels();
  if (lat.num_voxels != n) {
    std::ostringstream m;
    m << "mean field: the lattice covers " << lat.num_voxels << " voxels, the unaries " << n;
    return Status::Invalid(m.str());
  }
  if (params.num_iterations < 1) return Status::Invalid("mean field: num_iterations must be >= 1");
  Status s = CheckTaps(grid, spatial);
  if (!s.ok()) return s;
  if (n == 0) return Status::Ok();
  for (int64_t l = 0; l < k * k; ++l) {
    const bool weight_ok = l >= k || (std::isfinite(params.bilateral_weight[l]) &&
                                      std::isfinite(params.spatial_weight[l]));
    if (!weight_ok || !std::isfinite(params.compatibility[l])) {
      return Status::Invalid(
          "mean field: bilateral_weight, spatial_weight and compatibility must be finite");
    }
  }

  MeanField mf;
  mf.k = k;
  mf.per_item = grid.voxels_per_item();
  mf.symmetric = params.symmetric;
  mf.unaries = unaries;
  mf.logits = logits;
  mf.probabilities = probabilities;
  mf.w1 = params.bilateral_weight;
  mf.w2 = params.spatial_weight;
  mf.mu = params.compatibility;

  // Buffers of [n, K]: the bilateral input and both outputs. The output `probabilities` is
  // written only by the last pass, so until then it holds the spatial filter's input
  // ("symmetric") or its scratch ("mean"); with "symmetric" the spatial scratch is the
  // bilateral input, once that is filtered. Left uninitialised: every pass writes them whole.
  const size_t size = static_cast<size_t>(grid.size());
  std::unique_ptr<float[]> q_b(new float[size]), a(new float[size]), g(new float[size]);
  mf.q_b = q_b.get();
  mf.q_s = mf.symmetric ? probabilities : q_b.get();
  mf.a = a.get();
  mf.g = g.get();
  float* spatial_scratch = mf.symmetric ? q_b.get() : probabilities;

  // Normalisers from the filters of ones: "mean" scales a filter's output by 1 / (K 1),
  // "symmetric" its input and its output by (K 1)^(-1/2).
  std::unique_ptr<float[]> scratch(
      new float[static_cast<size_t>(FilterScratchSize(lat, static_cast<int>(k)))]);
  mf.scale_b.resize(static_cast<size_t>(n));
  s = Filter(lat, nullptr, 1, false, mf.scale_b.data(), scratch.get(), par);
  if (!s.ok()) return s;
  par.For(n, 20, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float& x = mf.scale_b[static_cast<size_t>(i)];
      x = mf.symmetric ? 1.0f / std::sqrt(x + 1e-20f) : 1.0f / x;
    }
  });
  mf.scale_s = SeparableOnes(grid, spatial);
  for (float& x : mf.scale_s) x = mf.symmetric ? 1.0f / std::sqrt(x) : 1.0f / x;

  std::atomic<bool> finite{true};
  ForBlocks(n, k, 30 * k, par, [&](int64_t i0, int64_t count, float* tmp, float*) {
    float sum = 0.0f;  // NaN or Inf anywhere in the block makes it NaN or Inf
    for (int64_t j = i0 * k; j < (i0 + count) * k; ++j) sum += 0.0f * unaries[j];
    if (!std::isfinite(sum)) finite.store(false, std::memory_order_relaxed);
    mf.Emit(unaries + i0 * k, i0, count, false, tmp);
  });
  if (!finite.load()) {
    const int64_t at = FirstNonFinite(unaries, n * k);
    std::ostringstream m;
    m << "mean field: unaries contain NaN or Inf (batch item " << at / k / mf.per_item
      << ", voxel " << at / k % mf.per_item << " of it in row-major order, class " << at % k
      << "); non-finite input is an error (docs/reliability.md)";
    return Status::Invalid(m.str());
  }
  for (int t = 0; t < params.num_iterations; ++t) {
    const bool last = t + 1 == params.num_iterations;
    s = Filter(lat, q_b.get(), static_cast<int>(k), false, a.get(), scratch.get(), par);
    if (!s.ok()) return s;
    s = SeparableCorrelate(grid, spatial, mf.q_s, g.get(), spatial_scratch, par);
    if (!s.ok()) return s;
    ForBlocks(n, k, 4 * k * k + 40 * k, par,
              [&](int64_t i0, int64_t count, float* tmp, float* message) {
                mf.Update(i0, count, last, tmp, message);
              });
  }
  return Status::Ok();
}

}  // namespace crf3d

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

// Channels that the spatial filter runs on for K classes (see MeanField::spatial_channels): K - 1
// for K = 2 and 3, where the filter's share of the work drops by a half or a third; K otherwise.
// Measured (kernel CPU time, 1 thread, medians of alternating runs): the PROMISE12 phantom
// (K = 2) 0.48 -> 0.42 s, the BraTS phantom (K = 5) 0.0-4% slower with K - 1 (its filter of 4
// channels took 10% less than of 5, less than the per-voxel derivation and the setup's extra
// filter cost), so K >= 4 filters every class as before.
constexpr int64_t SpatialChannels(int64_t k) { return k == 2 || k == 3 ? k - 1 : k; }

// Channels of a lattice row in the fused form for K classes (kK > 0 when fixed at compile time):
// up to 8 classes take a row of 8 floats, the classes then zeros, so that a row is whole vector
// operations; each class's lane computes exactly what a row of K floats would.
constexpr int LatticeRow(int kK) { return kK > 0 && kK <= 8 ? 8 : kK; }
inline int64_t LatticeRow(int64_t k) { return k <= 8 ? 8 : k; }

// The state and buffers of one inference.
//
// Two forms of the bilateral filter. A lattice with splat lists runs Filter on the whole
// [n, K] input and writes its output `a`. A lattice without them (the usual one for large
// volumes: docs/lattice_op.md, "Two forms of the splat") runs Filter's three steps inside the
// passes over the voxels (permutohedral.h, SplatVoxel / BlurPartSums / SliceVoxel): each pass
// splats the next iteration's Q as soon as it is computed, and slices the lattice for the
// voxels it updates, so that neither the filter's input nor its output makes a round trip
// through memory, and `a` is not allocated. Same arithmetic in the same order: the same result
// bit for bit.
struct MeanField {
  int64_t k = 0;
  int64_t n = 0;
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
  // The spatial filter runs on the first S = K - 1 classes only for K = 2 and 3 (S = K
  // otherwise; SpatialChannels): the classes' spatial inputs add up to a field known in advance
  // (Q sums to 1 over the classes: 1 with "mean", scale_s with "symmetric"), so the filter of
  // that field less the other classes' outputs is the last class's output, and the filter, whose
  // cost is proportional to its channels, does 1/K less work. spatial_total is that field
  // filtered, per voxel of one item (empty when S = K).
  int64_t spatial_channels = 0;
  std::vector<float> spatial_total;
  float* q_b = nullptr;  // bilateral input [n, K] (written in the unfused form only)
  float* q_s = nullptr;  // spatial input [n, S] (q_b itself where the two are the same rows)
  const float* a = nullptr;  // bilateral output (the unfused form)
  const float* g = nullptr;  // spatial output [n, S]
  // The fused form (lat != nullptr): the blurred lattice values that the update slices, and
  // the parts' splat sums [parts, M, K] that the next iteration's Q goes into.
  const LatticeView* lat = nullptr;
  float alpha = 1.0f;
  const float* blurred = nullptr;
  float* part_sums = nullptr;

  // Softmax of the logits rows of voxels [i0, i0 + count) (rows at `rows`), written as the next
  // iteration's filter inputs, or as the probabilities after the last iteration. tmp holds
  // count * K floats and may be `rows` itself; sums (fused form, not after the last
  // iteration): the [M, K] splat sums of the part that holds these voxels, which the bilateral
  // input rows are added into. Returns false for a lattice index out of range.
  template <int kK>
  bool Emit(const float* rows, int64_t i0, int64_t count, bool last, float* tmp,
            float* sums) const {
    const int64_t K = kK > 0 ? kK : k;
    const int64_t S = kK > 0 ? SpatialChannels(kK) : spatial_channels;
    for (int64_t v = 0; v < count; ++v) {
      const float* row = rows + v * K;
      float top = row[0];
      for (int64_t l = 1; l < K; ++l) top = std::max(top, row[l]);
      for (int64_t l = 0; l < K; ++l) tmp[v * K + l] = row[l] - top;
    }
    ExpInPlace(tmp, count * K);
    int64_t item_voxel = i0 % per_item;
    bool ok = true;
    // a bilateral input row padded to the lattice row (zeros past the K classes)
    float padded[kK > 0 ? LatticeRow(kK) : 1] = {};
    for (int64_t v = 0; v < count; ++v) {
      float* q = tmp + v * K;
      float sum = 0.0f;
      for (int64_t l = 0; l < K; ++l) sum += q[l];
      const float inv = 1.0f / sum;
      const int64_t i = i0 + v;
      if (last) {
        for (int64_t l = 0; l < K; ++l) probabilities[i * K + l] = q[l] * inv;
      } else {
        const float sb = symmetric ? inv * scale_b[static_cast<size_t>(i)] : inv;
        const float ss = symmetric ? inv * scale_s[static_cast<size_t>(item_voxel)] : inv;
        float* bilateral = sums != nullptr && kK > 0 ? padded : q_b + i * K;
        for (int64_t l = 0; l < K; ++l) bilateral[l] = q[l] * sb;
        if (q_s != q_b) {  // (shared: the bilateral row is the spatial one, ss == sb)
          for (int64_t l = 0; l < S; ++l) q_s[i * S + l] = q[l] * ss;
        }
        if (sums != nullptr) Splat<kK>(i, bilateral, padded, sums, &ok);
      }
      if (++item_voxel == per_item) item_voxel = 0;
    }
    return ok;
  }

  // Adds voxel i's bilateral input row (K floats at `row`; `padded` may be `row` itself) into
  // the splat sums.
  template <int kK>
  void Splat(int64_t i, const float* row, float* padded, float* sums, bool* ok) const {
    if (kK > 0) {
      if (row != padded) std::memcpy(padded, row, sizeof(float) * kK);
      *ok = SplatVoxel<LatticeRow(kK)>(*lat, i, padded, LatticeRow(kK), sums) && *ok;
    } else {
      *ok = SplatVoxel<0>(*lat, i, row, static_cast<int>(k), sums) && *ok;
    }
  }

  // L = U - mu (w1 A(Q) + w2 G(Q)) for voxels [i0, i0 + count) (into tmp, and into `logits`
  // after the last iteration only: the memory traffic is what this pass costs), then Emit.
  // A(Q) comes from `a`, or in the fused form is sliced here from `blurred`. scratch holds 2 K
  // floats.
  template <int kK>
  bool Update(int64_t i0, int64_t count, bool last, float* tmp, float* scratch,
              float* sums) const {
    const int64_t K = kK > 0 ? kK : k;
    const int64_t S = kK > 0 ? SpatialChannels(kK) : spatial_channels;
    float* message = scratch;
    float* sliced = scratch + K;  // LatticeRow(K) floats
    int64_t item_voxel = i0 % per_item;
    bool ok = true;
    for (int64_t v = 0; v < count; ++v) {
      const int64_t i = i0 + v;
      const float ob = scale_b[static_cast<size_t>(i)];
      const float os = scale_s[static_cast<size_t>(item_voxel)];
      const float* ai = a + i * K;
      if (lat != nullptr) {
        ok = SliceVoxel<LatticeRow(kK)>(*lat, i, blurred, static_cast<int>(LatticeRow(K)), alpha,
                                        sliced) &&
             ok;
        ai = sliced;
      }
      const float* gi = g + i * S;
      float spatial_sum = 0.0f;
      for (int64_t l = 0; l < S; ++l) {
        message[l] = w1[l] * ai[l] * ob + w2[l] * gi[l] * os;
        spatial_sum += gi[l];
      }
      if (S < K) {  // the last class: the filtered total less the other classes
        const float g_last = spatial_total[static_cast<size_t>(item_voxel)] - spatial_sum;
        message[K - 1] = w1[K - 1] * ai[K - 1] * ob + w2[K - 1] * g_last * os;
      }
      float* row = tmp + v * K;
      const float* u = unaries + i * K;
      for (int64_t l = 0; l < K; ++l) {
        const float* mu_l = mu + l * K;
        float pairwise = 0.0f;
        for (int64_t j = 0; j < K; ++j) pairwise += mu_l[j] * message[j];
        row[l] = u[l] - pairwise;
      }
      if (++item_voxel == per_item) item_voxel = 0;
    }
    if (last && logits != nullptr) {
      std::memcpy(logits + i0 * K, tmp, static_cast<size_t>(count * K) * sizeof(float));
    }
    return Emit<kK>(tmp, i0, count, last, tmp, sums) && ok;
  }

  // One pass over all voxels: the first (from the unaries; first = true) or an update
  // (last: the final one). Returns false for a lattice index out of range; sets *nonfinite
  // for NaN or Inf in the unaries (first pass only).
  template <int kK>
  bool Pass(bool first, bool last, const Parallel& par, std::atomic<bool>* nonfinite) const {
    std::atomic<bool> bad{false};
    const int64_t cost = first ? 30 * k : 4 * k * k + 40 * k;
    auto run = [&](int64_t lo, int64_t hi, float* sums, float* tmp, float* scratch) {
      bool ok = true;
      for (int64_t i0 = lo; i0 < hi; i0 += kBlock) {
        const int64_t count = std::min(kBlock, hi - i0);
        if (first) {
          float sum = 0.0f;  // NaN or Inf anywhere in the block makes it NaN or Inf
          for (int64_t j = i0 * k; j < (i0 + count) * k; ++j) sum += 0.0f * unaries[j];
          if (!std::isfinite(sum)) nonfinite->store(true, std::memory_order_relaxed);
          ok = Emit<kK>(unaries + i0 * k, i0, count, false, tmp, sums) && ok;
        } else {
          ok = Update<kK>(i0, count, last, tmp, scratch, sums) && ok;
        }
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
    };
    if (lat != nullptr && !last) {
      // The splat's parts: each thread fills the sums of the parts it runs, voxel by voxel in
      // order, so the sums do not depend on the thread count.
      const int64_t m = lat->num_points;
      const int64_t parts = SplatParts(n, lat->d, m);
      par.For(parts, (n / parts + 1) * (cost + 10 * (lat->d + 1) * k), [&](int64_t b, int64_t e) {
        std::vector<float> tmp(static_cast<size_t>(kBlock * k));
        std::vector<float> scratch(static_cast<size_t>(k + LatticeRow(k)));
        for (int64_t t = b; t < e; ++t) {
          float* sums = part_sums + t * m * LatticeRow(k);
          std::fill(sums, sums + m * LatticeRow(k), 0.0f);
          run(SplatPartBegin(n, parts, t), SplatPartBegin(n, parts, t + 1), sums, tmp.data(),
              scratch.data());
        }
      });
    } else {
      const int64_t blocks = (n + kBlock - 1) / kBlock;
      par.For(blocks, kBlock * cost, [&](int64_t b, int64_t e) {
        std::vector<float> tmp(static_cast<size_t>(kBlock * k));
        std::vector<float> scratch(static_cast<size_t>(k + LatticeRow(k)));
        run(b * kBlock, std::min(n, e * kBlock), nullptr, tmp.data(), scratch.data());
      });
    }
    return !bad.load();
  }

  bool RunPass(bool first, bool last, const Parallel& par, std::atomic<bool>* nonfinite) const {
    switch (k) {  // every K <= 8 fixed at compile time: LatticeRow(k) assumes it
      case 1: return Pass<1>(first, last, par, nonfinite);
      case 2: return Pass<2>(first, last, par, nonfinite);
      case 3: return Pass<3>(first, last, par, nonfinite);
      case 4: return Pass<4>(first, last, par, nonfinite);
      case 5: return Pass<5>(first, last, par, nonfinite);
      case 6: return Pass<6>(first, last, par, nonfinite);
      case 7: return Pass<7>(first, last, par, nonfinite);
      case 8: return Pass<8>(first, last, par, nonfinite);
      default: return Pass<0>(first, last, par, nonfinite);
    }
  }
};

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
  mf.n = n;
  mf.per_item = grid.voxels_per_item();
  mf.symmetric = params.symmetric;
  mf.unaries = unaries;
  mf.logits = logits;
  mf.probabilities = probabilities;
  mf.w1 = params.bilateral_weight;
  mf.w2 = params.spatial_weight;
  mf.mu = params.compatibility;
  const bool fused = lat.splat_offsets == nullptr && !params.unfused;

  // Normalisers from the filters of ones: "mean" scales a filter's output by 1 / (K 1),
  // "symmetric" its input and its output by (K 1)^(-1/2). The filter of ones also checks every
  // index of the lattice, so the passes below meet none out of range.
  {
    std::unique_ptr<float[]> ones_scratch(
        new float[static_cast<size_t>(FilterScratchSize(lat, 1))]);
    mf.scale_b.resize(static_cast<size_t>(n));
    s = Filter(lat, nullptr, 1, false, mf.scale_b.data(), ones_scratch.get(), par);
    if (!s.ok()) return s;
  }
  par.For(n, 20, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float& x = mf.scale_b[static_cast<size_t>(i)];
      x = mf.symmetric ? 1.0f / std::sqrt(x + 1e-20f) : 1.0f / x;
    }
  });
  mf.scale_s = SeparableOnes(grid, spatial);
  mf.spatial_channels = SpatialChannels(k);
  if (mf.spatial_channels < k) mf.spatial_total = mf.scale_s;  // "mean": the filter of ones
  for (float& x : mf.scale_s) x = mf.symmetric ? 1.0f / std::sqrt(x) : 1.0f / x;
  Grid spatial_grid = grid;
  spatial_grid.channels = mf.spatial_channels;
  if (mf.spatial_channels < k && mf.symmetric) {  // "symmetric": the filter of scale_s
    Grid item = grid;
    item.batch = 1;
    item.channels = 1;
    std::vector<float> item_scratch(mf.scale_s.size());
    s = SeparableCorrelate(item, spatial, mf.scale_s.data(), mf.spatial_total.data(),
                           item_scratch.data(), par);
    if (!s.ok()) return s;
  }

  // Buffers of [n, K]: the bilateral input, the spatial output (of which [n, S] is used) and
  // (unfused form) the bilateral output. The output `probabilities` is written only by the last
  // pass, so until then it holds the spatial filter's input [n, S], and the spatial scratch is
  // the bilateral input, once that is filtered (or splatted; the fused form with K <= 8 does not
  // write it). With "mean" and every class filtered, where the bilateral input rows are written
  // (the unfused form, K > 8), they are the spatial input too, and `probabilities` the scratch.
  // Left uninitialised: every pass writes them whole.
  const size_t size = static_cast<size_t>(grid.size());
  std::unique_ptr<float[]> q_b(new float[size]), g(new float[size]), a;
  const bool shared = !mf.symmetric && mf.spatial_channels == k && (!fused || k > 8);
  mf.q_b = q_b.get();
  mf.q_s = shared ? q_b.get() : probabilities;
  mf.g = g.get();
  float* spatial_scratch = shared ? probabilities : q_b.get();
  // The bilateral filter's scratch: the parts' splat sums and the blur's two buffers (fused),
  // or Filter's scratch.
  const int64_t m = lat.num_points;
  const int64_t row = LatticeRow(k);
  const int64_t scratch_size =
      fused ? SplatParts(n, lat.d, m) * m * row + BlurPartSumsScratchSize(lat, static_cast<int>(row))
            : FilterScratchSize(lat, static_cast<int>(k));
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(scratch_size)]);
  if (fused) {
    mf.lat = &lat;
    mf.alpha = SliceAlpha(lat.d);
    mf.part_sums = scratch.get();
  } else {
    a.reset(new float[size]);
    mf.a = a.get();
  }
  float* blur_scratch = fused ? scratch.get() + SplatParts(n, lat.d, m) * m * row : nullptr;
  const Status out_of_range = Status::Invalid(
      "mean field: a lattice index is out of range; pass the tensors of one lattice build "
      "unchanged");

  std::atomic<bool> nonfinite{false};
  if (!mf.RunPass(true, false, par, &nonfinite)) return out_of_range;
  if (nonfinite.load()) {
    const int64_t at = FirstNonFinite(unaries, n * k);
    std::ostringstream msg;
    msg << "mean field: unaries contain NaN or Inf (batch item " << at / k / mf.per_item
        << ", voxel " << at / k % mf.per_item << " of it in row-major order, class " << at % k
        << "); non-finite input is an error (docs/reliability.md)";
    return Status::Invalid(msg.str());
  }
  for (int t = 0; t < params.num_iterations; ++t) {
    const bool last = t + 1 == params.num_iterations;
    if (fused) {
      s = BlurPartSums(lat, static_cast<int>(row), mf.part_sums, blur_scratch, &mf.blurred, par);
    } else {
      s = Filter(lat, q_b.get(), static_cast<int>(k), false, a.get(), scratch.get(), par);
    }
    if (!s.ok()) return s;
    s = SeparableCorrelate(spatial_grid, spatial, mf.q_s, g.get(), spatial_scratch, par);
    if (!s.ok()) return s;
    if (!mf.RunPass(false, last, par, nullptr)) return out_of_range;
  }
  return Status::Ok();
}

}  // namespace crf3d

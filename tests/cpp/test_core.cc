// The framework-free core (src/lattice_op/csrc) against references computed here, in double
// precision, without TensorFlow or a test framework: `make test-core` builds and runs it. Each
// check prints one line; the exit status is the number of failed checks (0: all passed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gaussian.h"
#include "mean_field.h"
#include "parallel.h"
#include "permutohedral.h"

namespace {

int failures = 0;

void Check(bool ok, const std::string& what, const std::string& detail) {
  std::printf("%s  %s (%s)\n", ok ? "ok  " : "FAIL", what.c_str(), detail.c_str());
  if (!ok) ++failures;
}

std::string Format(const char* fmt, double a, double b) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return buf;
}

// A lattice built by the core, owning its arrays (as the TF op's outputs would).
struct OwnedLattice {
  int64_t n = 0;
  int d = 0;
  int64_t m = 0;
  std::vector<int32_t> vertex_index, nbrs, offsets, voxels;
  std::vector<float> vertex_weight, weights;

  int blur_passes = 1;

  OwnedLattice(const std::vector<float>& features, int64_t voxels_count, int dims,
               const crf3d::Parallel& par, int passes = 1)
      : n(voxels_count), d(dims), blur_passes(passes) {
    const int64_t entries = n * (d + 1);
    vertex_index.resize(static_cast<size_t>(entries));
    vertex_weight.resize(static_cast<size_t>(entries));
    crf3d::LatticeBuilder builder;
    const crf3d::Status s = builder.Build(features.data(), n, d, int64_t{1} << 28, 0,
                                          vertex_index.data(), vertex_weight.data(), par,
                                          blur_passes);
    if (!s.ok()) {
      std::printf("FAIL  lattice build: %s\n", s.message.c_str());
      ++failures;
      return;
    }
    m = builder.num_points();
    nbrs.assign(static_cast<size_t>((d + 1) * m * 2), 0);
    builder.BlurNeighbours(m, 0, nbrs.data(), par);
    offsets.assign(static_cast<size_t>(m + 1), 0);
    voxels.resize(static_cast<size_t>(entries));
    weights.resize(static_cast<size_t>(entries));
    crf3d::BuildSplatCsr(vertex_index.data(), vertex_weight.data(), n, d, m, offsets.data(),
                         voxels.data(), weights.data(), par);
  }

  // View() without the splat lists (the splat then sums per part; SplatSums).
  bool lists = true;

  crf3d::LatticeView View() const {
    crf3d::LatticeView lat;
    lat.num_voxels = n;
    lat.d = d;
    lat.num_points = m;
    lat.vertex_index = vertex_index.data();
    lat.vertex_weight = vertex_weight.data();
    lat.blur_neighbours = nbrs.data();
    if (lists) {
      lat.splat_offsets = offsets.data();
      lat.splat_voxels = voxels.data();
      lat.splat_weights = weights.data();
    }
    lat.blur_passes = blur_passes;
    return lat;
  }

  // K v (or K^T v); values null: the filter of ones.
  std::vector<float> Filter(const float* values, int channels, bool reverse,
                            const crf3d::Parallel& par) const {
    const crf3d::LatticeView lat = View();
    std::vector<float> out(static_cast<size_t>(n * channels));
    std::vector<float> scratch(static_cast<size_t>(crf3d::FilterScratchSize(lat, channels)));
    const crf3d::Status s =
        crf3d::Filter(lat, values, channels, reverse, out.data(), scratch.data(), par);
    if (!s.ok()) {
      std::printf("FAIL  filter: %s\n", s.message.c_str());
      ++failures;
    }
    return out;
  }
};

// Features of a grid: position index * step per axis, then `extra` random channels.
std::vector<float> GridFeatures(const std::vector<int64_t>& shape, double step, int extra,
                                double extra_scale, std::mt19937& rng, int* dims) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const int axes = static_cast<int>(shape.size());
  *dims = axes + extra;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::vector<float> f(static_cast<size_t>(n * *dims));
  for (int64_t i = 0; i < n; ++i) {
    int64_t rest = i;
    for (int a = axes - 1; a >= 0; --a) {
      f[static_cast<size_t>(i * *dims + a)] = static_cast<float>(step * (rest % shape[a]));
      rest /= shape[a];
    }
    for (int k = 0; k < extra; ++k) {
      f[static_cast<size_t>(i * *dims + axes + k)] = static_cast<float>(extra_scale * normal(rng));
    }
  }
  return f;
}

// 1. The normalised lattice filter K v / K 1 against the exact normalised Gaussian
// sum_j exp(-|f_i - f_j|^2 / 2) v_j / sum_j exp(-|f_i - f_j|^2 / 2), brute force in double.
// Tolerance: the lattice is an approximation, not a rounding of the exact filter (its kernel is
// a few percent wider than the Gaussian, and its splat/slice interpolate linearly), so the bound
// is the one tests/test_lattice_accuracy.py states and measures for F <= 3 on values in [-1, 1]
// (range R = 2): max error <= 0.12 R, RMS <= 0.025 R; and, so that a filter that did nothing
// fails, RMS(lattice - exact) <= 0.2 RMS(values - exact).
void CheckAgainstBruteForce(const std::vector<int64_t>& shape, int extra, uint32_t seed) {
  std::mt19937 rng(seed);
  int d = 0;
  const std::vector<float> f = GridFeatures(shape, 0.5, extra, 0.6, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const int channels = 2;
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n * channels));
  for (float& x : v) x = uniform(rng);
  const crf3d::StdThreadParallel par(2);
  const OwnedLattice lattice(f, n, d, par);
  const std::vector<float> kv = lattice.Filter(v.data(), channels, false, par);
  const std::vector<float> k1 = lattice.Filter(nullptr, 1, false, par);
  double max_err = 0.0, sq_err = 0.0, sq_untouched = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double norm = 0.0, sums[2] = {0.0, 0.0};
    for (int64_t j = 0; j < n; ++j) {
      double d2 = 0.0;
      for (int k = 0; k < d; ++k) {
        const double diff = static_cast<double>(f[static_cast<size_t>(i * d + k)]) -
                            f[static_cast<size_t>(j * d + k)];
        d2 += diff * diff;
      }
      const double w = std::exp(-0.5 * d2);
      norm += w;
      for (int c = 0; c < channels; ++c) sums[c] += w * v[static_cast<size_t>(j * channels + c)];
    }
    for (int c = 0; c < channels; ++c) {
      const double exact = sums[c] / norm;
      const double approx = static_cast<double>(kv[static_cast<size_t>(i * channels + c)]) /
                            k1[static_cast<size_t>(i)];
      max_err = std::max(max_err, std::abs(approx - exact));
      sq_err += (approx - exact) * (approx - exact);
      const double untouched = v[static_cast<size_t>(i * channels + c)] - exact;
      sq_untouched += untouched * untouched;
    }
  }
  const double rms = std::sqrt(sq_err / static_cast<double>(n * channels));
  const double rms_untouched = std::sqrt(sq_untouched / static_cast<double>(n * channels));
  const double range = 2.0;
  std::string what = "normalised lattice filter vs brute-force Gaussian, " +
                     std::to_string(shape.size()) + "-D grid, F = " + std::to_string(d);
  Check(max_err <= 0.12 * range && rms <= 0.025 * range, what,
        Format("max error %.4f, RMS %.4f; bounds 0.24, 0.05", max_err, rms));
  Check(rms <= 0.2 * rms_untouched, what + ": it filters",
        Format("RMS error %.4f vs %.4f unfiltered", rms, rms_untouched));
}

// 2. K^T is the adjoint of K: <K x, y> = <x, K^T y>, both sides summed in double. K = S^T B S
// with B = B_F ... B_0; K^T = S^T B_0 ... B_F S. Each side is computed in float: the relative
// gap is float rounding of sums of a few hundred terms (~1e-6), far below 1e-4.
void CheckAdjoint() {
  std::mt19937 rng(5);
  int d = 0;
  const std::vector<int64_t> shape = {9, 8, 7};
  const std::vector<float> f = GridFeatures(shape, 0.7, 1, 0.8, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const int channels = 3;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * channels)), y(x.size());
  for (float& a : x) a = normal(rng);
  for (float& a : y) a = normal(rng);
  const crf3d::StdThreadParallel par(2);
  const OwnedLattice lattice(f, n, d, par);
  const std::vector<float> kx = lattice.Filter(x.data(), channels, false, par);
  const std::vector<float> kty = lattice.Filter(y.data(), channels, true, par);
  const std::vector<float> ky = lattice.Filter(y.data(), channels, false, par);
  double left = 0.0, right = 0.0, scale = 0.0, asym = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    left += static_cast<double>(kx[i]) * y[i];
    right += static_cast<double>(x[i]) * kty[i];
    scale += std::abs(static_cast<double>(kx[i]) * y[i]);
    asym += static_cast<double>(x[i]) * ky[i];
  }
  const double gap = std::abs(left - right) / scale;
  Check(gap <= 1e-4, "blur/slice adjoint: <K x, y> = <x, K^T y>",
        Format("relative gap %.2e; bound 1e-4 (|<x, K y> - <K x, y>| / scale = %.2e)", gap,
               std::abs(asym - left) / scale));
}

// 3. Build, splat, blur and slice give bit-identical results with 1 and 3 threads (36,000
// voxels: with 3 threads the build hashes in 2 chunks of >= 16k voxels and merges them, which
// renumbers the lattice points but must not change a filtered value).
void CheckThreadCount() {
  std::mt19937 rng(9);
  int d = 0;
  const std::vector<float> f = GridFeatures({40, 30, 30}, 0.4, 2, 0.7, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n * 2));
  for (float& a : v) a = normal(rng);
  const crf3d::StdThreadParallel one(1), three(3);
  const OwnedLattice a(f, n, d, one), b(f, n, d, three);
  const std::vector<float> out_a = a.Filter(v.data(), 2, false, one);
  const std::vector<float> out_b = b.Filter(v.data(), 2, false, three);
  Check(out_a == out_b && a.m == b.m, "filter output independent of the thread count",
        Format("%.0f voxels, %.0f lattice points", static_cast<double>(n),
               static_cast<double>(a.m)));
}

// 3a. The splat without lists (parts' sums) against the splat with lists on the same lattice:
// the same sums in another order, so equal to float rounding, forward and adjoint, for C = 1
// (the filter of ones, no values), 3 and 6 (the generic path); bit-identical for 1 and 3
// threads; and a NaN is reported at its index as with lists. 36,000 voxels: 4 parts.
void CheckSplatWithoutLists() {
  std::mt19937 rng(21);
  int d = 0;
  const std::vector<float> f = GridFeatures({40, 30, 30}, 0.25, 1, 0.5, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const crf3d::StdThreadParallel one(1), three(3);
  OwnedLattice with(f, n, d, three);
  OwnedLattice without(f, n, d, three);
  without.lists = false;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  double worst = 0.0;
  bool same_threads = true;
  for (int channels : {1, 3, 6}) {
    std::vector<float> v(static_cast<size_t>(n * channels));
    for (float& a : v) a = normal(rng);
    for (bool reverse : {false, true}) {
      const float* values = channels == 1 && !reverse ? nullptr : v.data();
      const std::vector<float> a = with.Filter(values, channels, reverse, three);
      const std::vector<float> b = without.Filter(values, channels, reverse, three);
      const std::vector<float> c = without.Filter(values, channels, reverse, one);
      double scale = 0.0, gap = 0.0;
      for (size_t i = 0; i < a.size(); ++i) {
        scale = std::max(scale, std::abs(static_cast<double>(a[i])));
        gap = std::max(gap, std::abs(static_cast<double>(a[i]) - b[i]));
      }
      worst = std::max(worst, gap / scale);
      same_threads = same_threads && b == c;
    }
  }
  Check(worst <= 1e-5 && crf3d::SplatParts(n, d, with.m) == 4,
        "splat without lists = splat with lists (C = 1, 3, 6; forward and adjoint)",
        Format("max |diff| / max |out| = %.2g, %.0f parts", worst,
               static_cast<double>(crf3d::SplatParts(n, d, with.m))));
  Check(same_threads, "splat without lists: output independent of the thread count",
        "1 and 3 threads, bit for bit");
  std::vector<float> v(static_cast<size_t>(n * 2));
  for (float& a : v) a = normal(rng);
  v[static_cast<size_t>(n + 5)] = std::nanf("");
  const crf3d::LatticeView lat = without.View();
  std::vector<float> out(v.size()), scratch(static_cast<size_t>(crf3d::FilterScratchSize(lat, 2)));
  int64_t first = -2;
  const crf3d::Status s =
      crf3d::Filter(lat, v.data(), 2, false, out.data(), scratch.data(), three, &first);
  Check(!s.ok() && first == n + 5, "splat without lists: a NaN is reported at its index",
        Format("reported %.0f, expected %.0f", static_cast<double>(first),
               static_cast<double>(n + 5)));
  // the build's choice: lists only when 32 (M + 1) > entries (180,000 entries: up to 5624
  // points without lists, 180,000 / 32 = 5625 = M + 1 being the last one allowed)
  Check(!crf3d::SplatNeedsLists(36000, 4, 5624) && crf3d::SplatNeedsLists(36000, 4, 5625) &&
            !crf3d::SplatNeedsLists(n, d, with.m),
        "SplatNeedsLists: no lists for a lattice far smaller than its entries",
        Format("this lattice: %.0f points for %.0f entries, no lists", static_cast<double>(with.m),
               static_cast<double>(n * (d + 1))));
}

// 3a'. The parts of the splat without lists (SplatParts) and the choice of the lists
// (SplatNeedsLists), against values worked out by hand, and against the memory bound they are
// meant to keep; then the splat without lists on a lattice whose parts the memory bound cuts
// (fewer than one per 8192 voxels) against the splat with lists.
void CheckSplatPartsRule() {
  struct Case {
    int64_t n;
    int d;
    int64_t m;
    int64_t parts;
    bool lists;
  };
  // parts = max(1, min(16, n / 8192, n (d+1) / (4 (m+1)))), lists when the last is below 8.
  const Case cases[] = {
      {8928000, 7, 1416126, 12, false},  // the BraTS-sized reference: 71,424,000 / 5,664,508
      {8928000, 7, 268846, 16, false},   // dense_crf's BraTS case: 66 by memory
      {8928000, 7, 2500000, 7, true},    // 71,424,000 / 10,000,004 = 7.1
      {20160, 4, 500, 2, false},         // 20,160 / 8192 = 2 parts (the voxel count binds)
      {5000, 4, 100, 1, false},          // fewer than 8192 voxels: one part
      {36000, 4, 20000, 2, true},        // 180,000 / 80,004 = 2.2
      {1000, 2, 5000, 1, true},          // 3000 / 20,004 = 0: at least one part
  };
  bool ok = true;
  std::string detail;
  for (const Case& c : cases) {
    const int64_t parts = crf3d::SplatParts(c.n, c.d, c.m);
    const bool lists = crf3d::SplatNeedsLists(c.n, c.d, c.m);
    if (parts != c.parts || lists != c.lists) {
      ok = false;
      detail += Format("n=%.0f: %.0f parts", static_cast<double>(c.n), static_cast<double>(parts));
    }
  }
  Check(ok, "SplatParts / SplatNeedsLists: the hand-worked cases",
        detail.empty() ? "7 cases" : detail);
  // Without lists, the parts' sums for C = 8 never take more memory than the lists would have.
  bool within = true;
  for (int64_t n : {10000, 65536, 100000, 1000000, 9000000}) {
    for (int d : {2, 4, 7}) {
      for (int64_t m = 1; m < n * (d + 1); m = m * 3 + 1) {
        if (crf3d::SplatNeedsLists(n, d, m)) continue;
        const int64_t parts = crf3d::SplatParts(n, d, m);
        within = within && parts * (m + 1) * 8 <= 2 * n * (d + 1) && parts >= 1 &&
                 parts <= crf3d::kMaxSplatParts;
      }
    }
  }
  Check(within, "SplatParts: without lists, P (M + 1) 8 floats <= the lists' 2 N (F + 1) words",
        "n up to 9e6, F = 2, 4, 7, M in steps of x3");
  // A finer lattice (features step 0.5): the memory bound cuts the parts below n / 8192 = 4.
  std::mt19937 rng(22);
  int d = 0;
  const std::vector<float> f = GridFeatures({40, 30, 30}, 0.5, 1, 0.5, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const crf3d::StdThreadParallel one(1), three(3);
  OwnedLattice with(f, n, d, three);
  OwnedLattice without(f, n, d, three);
  without.lists = false;
  const int64_t parts = crf3d::SplatParts(n, d, with.m);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n * 3));
  for (float& a : v) a = normal(rng);
  double worst = 0.0;
  bool same_threads = true;
  for (bool reverse : {false, true}) {
    const std::vector<float> a = with.Filter(v.data(), 3, reverse, three);
    const std::vector<float> b = without.Filter(v.data(), 3, reverse, three);
    const std::vector<float> c = without.Filter(v.data(), 3, reverse, one);
    double scale = 0.0, gap = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      scale = std::max(scale, std::abs(static_cast<double>(a[i])));
      gap = std::max(gap, std::abs(static_cast<double>(a[i]) - b[i]));
    }
    worst = std::max(worst, gap / scale);
    same_threads = same_threads && b == c;
  }
  Check(worst <= 1e-5 && same_threads && parts > 1 && parts < 4,
        "splat without lists, parts cut by memory = splat with lists (1 and 3 threads alike)",
        Format("max |diff| / max |out| = %.2g, %.0f parts", worst, static_cast<double>(parts)));
}

// 3b. The lattice's structure against a reference built here from the public embedding, with a
// std::map for the hash table: for thread counts 1, 2, 3 and 7 on sizes that split the build
// into several chunks (16k voxels or more each; the chunk tables are then merged in parallel
// into hash shards) and make every table grow many times. Point numbers may differ between
// thread counts, so the check goes through the keys: entries share a lattice point exactly when
// their vertex keys are equal, the weights are Embedding::Embed's bit for bit, each point's blur
// neighbours are the points at key +- u_j (or absent), and each point's splat list holds its
// entries in entry order. The lattice is built as the second batch item (index_base > 0, more
// points in total than its own) as the TF op does.
//
// The build packs the keys into 64-bit codes when the features' ranges allow it and uses the wide
// keys otherwise, or when a simplex falls outside the packing after all (then it reruns). The
// keys argument says which form the build must end with: "packed", "wide" (the ranges are too
// wide to pack, or max_bits = 0 forbids it) or "fallback" (packing's bounds narrowed by inset, so
// the packed build meets a simplex outside them and reruns with the wide keys).
void CheckStructure(const std::vector<int64_t>& shape, int extra, uint32_t seed,
                    const std::string& keys = "packed", double extra_scale = 0.8,
                    int max_bits = 64, int64_t inset = 0) {
  std::mt19937 rng(seed);
  int d = 0;
  const std::vector<float> f = GridFeatures(shape, 0.45, extra, extra_scale, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const int d1 = d + 1;
  // Reference: shift by the channel minima (as Build does), embed, list the vertex keys.
  std::vector<float> lo(static_cast<size_t>(d), 1e30f);
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < d; ++k) {
      lo[static_cast<size_t>(k)] = std::min(lo[static_cast<size_t>(k)], f[static_cast<size_t>(i * d + k)]);
    }
  }
  const crf3d::Embedding emb(d);
  std::vector<std::vector<int32_t>> entry_key(static_cast<size_t>(n * d1));
  std::vector<float> entry_weight(static_cast<size_t>(n * d1));
  {
    std::vector<float> x(static_cast<size_t>(d)), elevated(static_cast<size_t>(d1)),
        bary(static_cast<size_t>(d1 + 1));
    std::vector<int32_t> rem0(static_cast<size_t>(d1)), rank(static_cast<size_t>(d1));
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < d; ++k) {
        x[static_cast<size_t>(k)] = f[static_cast<size_t>(i * d + k)] - lo[static_cast<size_t>(k)];
      }
      emb.Embed(x.data(), elevated.data(), rem0.data(), rank.data(), bary.data());
      for (int k = 0; k < d1; ++k) {
        std::vector<int32_t>& key = entry_key[static_cast<size_t>(i * d1 + k)];
        key.resize(static_cast<size_t>(d));
        crf3d::Embedding::VertexKey(d, rem0.data(), rank.data(), k, key.data());
        entry_weight[static_cast<size_t>(i * d1 + k)] = bary[static_cast<size_t>(k)];
      }
    }
  }
  const int32_t base = 3;  // points of an earlier batch item
  const int64_t after = 2;  // and of a later one
  for (int threads : {1, 2, 3, 7}) {
    const crf3d::StdThreadParallel par(threads);
    std::vector<int32_t> vi(static_cast<size_t>(n * d1));
    std::vector<float> vw(static_cast<size_t>(n * d1));
    crf3d::LatticeBuilder builder;
    builder.set_max_packed_bits(max_bits);
    builder.set_packed_bounds_inset(inset);
    const crf3d::Status status =
        builder.Build(f.data(), n, d, int64_t{1} << 28, base, vi.data(), vw.data(), par);
    const int64_t m = builder.num_points();
    const int64_t total = base + m + after;
    std::vector<int32_t> nbrs(static_cast<size_t>(d1 * total * 2), -7);
    if (status.ok()) builder.BlurNeighbours(total, base, nbrs.data(), par);
    std::string problem = status.ok() ? "" : status.message;
    if (problem.empty() && builder.packed_keys() != (keys == "packed")) {
      problem = std::string("the build ended with ") + (builder.packed_keys() ? "packed" : "wide") +
                " keys, expected " + (keys == "packed" ? "packed" : "wide");
    }
    // Keys <-> points, both ways.
    std::map<std::vector<int32_t>, int32_t> point_of;
    std::vector<const std::vector<int32_t>*> key_of(static_cast<size_t>(m), nullptr);
    for (int64_t e = 0; e < n * d1 && problem.empty(); ++e) {
      const int32_t p = vi[static_cast<size_t>(e)] - base;
      const std::vector<int32_t>& key = entry_key[static_cast<size_t>(e)];
      if (p < 0 || p >= m) {
        problem = "vertex_index out of range at entry " + std::to_string(e);
      } else if (point_of.emplace(key, p).first->second != p) {  // emplace keeps an earlier one
        problem = "entry " + std::to_string(e) + ": key's point differs from an earlier entry's";
      } else if (key_of[static_cast<size_t>(p)] != nullptr && *key_of[static_cast<size_t>(p)] != key) {
        problem = "point " + std::to_string(p) + " has two keys";
      } else {
        key_of[static_cast<size_t>(p)] = &key;
      }
      if (problem.empty() && vw[static_cast<size_t>(e)] != entry_weight[static_cast<size_t>(e)]) {
        problem = "weight of entry " + std::to_string(e) + " differs from Embedding::Embed's";
      }
    }
    if (problem.empty() && static_cast<int64_t>(point_of.size()) != m) problem = "unused points";
    // Blur neighbours: key +- u_j, u_j = (d+1) e_j - (1, ..., 1) (e_d: the implied coordinate).
    for (int64_t p = 0; p < m && problem.empty(); ++p) {
      for (int j = 0; j < d1 && problem.empty(); ++j) {
        for (int sign = 0; sign < 2; ++sign) {
          std::vector<int32_t> key = *key_of[static_cast<size_t>(p)];
          for (int k = 0; k < d; ++k) key[static_cast<size_t>(k)] += sign ? -1 : 1;
          if (j < d) key[static_cast<size_t>(j)] += sign ? d + 1 : -(d + 1);
          const auto it = point_of.find(key);
          const int64_t expected = it == point_of.end() ? total : it->second + base;
          if (nbrs[static_cast<size_t>((j * total + base + p) * 2 + sign)] != expected) {
            problem = "blur neighbour of point " + std::to_string(p) + ", direction " +
                      std::to_string(j) + (sign ? " +" : " -");
          }
        }
      }
    }
    // Rows of the other batch items are left alone.
    for (int j = 0; j < d1 && problem.empty(); ++j) {
      for (int64_t r : {int64_t{0}, int64_t{base - 1}, base + m, total - 1}) {
        if (nbrs[static_cast<size_t>((j * total + r) * 2)] != -7) problem = "wrote another item's row";
      }
    }
    // Splat lists (indices relative to this item: subtract base first).
    if (problem.empty()) {
      std::vector<int32_t> local(vi);
      for (int32_t& x : local) x -= base;
      std::vector<int32_t> offsets(static_cast<size_t>(m + 1)), voxels(local.size());
      std::vector<float> weights(local.size());
      crf3d::BuildSplatCsr(local.data(), vw.data(), n, d, m, offsets.data(), voxels.data(),
                           weights.data(), par);
      std::vector<std::vector<int64_t>> lists(static_cast<size_t>(m));
      for (int64_t e = 0; e < n * d1; ++e) lists[static_cast<size_t>(local[static_cast<size_t>(e)])].push_back(e);
      for (int64_t p = 0; p < m && problem.empty(); ++p) {
        const std::vector<int64_t>& list = lists[static_cast<size_t>(p)];
        if (offsets[static_cast<size_t>(p) + 1] - offsets[static_cast<size_t>(p)] != static_cast<int32_t>(list.size())) {
          problem = "splat list length of point " + std::to_string(p);
          break;
        }
        for (size_t q = 0; q < list.size(); ++q) {
          const size_t at = static_cast<size_t>(offsets[static_cast<size_t>(p)]) + q;
          if (voxels[at] != list[q] / d1 || weights[at] != vw[static_cast<size_t>(list[q])]) {
            problem = "splat list of point " + std::to_string(p);
          }
        }
      }
    }
    char detail[200];
    std::snprintf(detail, sizeof(detail), "%lld voxels, %lld points, %d thread(s)%s%s",
                  static_cast<long long>(n), static_cast<long long>(m), threads,
                  problem.empty() ? "" : ": ", problem.c_str());
    Check(problem.empty(),
          "lattice structure vs std::map reference, F = " + std::to_string(d) + ", " + keys +
              " keys",
          detail);
  }
}

// 4. Lattice points of tiny cases counted by hand. In one dimension the embedding maps f to
// (x, -x) with x = f * 2 / sqrt(3) (Embedding's scale for d = 1: sqrt(2/3) * (d + 1) /
// sqrt(1 * 2)), and the lattice points are (k, -k) for every integer k, so a voxel at x lands on
// floor(x) and floor(x) + 1. x = 0.3, 0.6 -> {0, 1}; 1.5 -> {1, 2}; 4.2 -> {4, 5}: 5 points.
// One voxel in F dimensions: its simplex has F + 1 distinct vertices.
// 3c. The packed keys (KeyPacking): codes against the keys they stand for, and the packed build
// against the wide one.
void CheckPacked() {
  // (a) Fields for F = 7 with remainder-0 bounds of different widths (and one negative range):
  // random keys anywhere in the box the fields promise (vertex keys and blur neighbours:
  // [lo - d - 1, hi + 2d]) pack one-to-one, and a step's code change is the sum of its
  // coordinates' units.
  {
    const int d = 7;
    const int64_t lo[d] = {-300, -5, 0, 17, -1000, 2, -64};
    const int64_t hi[d] = {250, 40, 7, 17, -900, 66, 63};
    crf3d::KeyPacking packing;
    const bool fits = packing.Fit(d, lo, hi);
    std::mt19937 rng(21);
    std::map<uint64_t, std::vector<int32_t>> seen;
    std::string problem = fits ? "" : "did not fit";
    for (int t = 0; t < 20000 && problem.empty(); ++t) {
      std::vector<int32_t> key(d), moved(d);
      for (int i = 0; i < d; ++i) {
        std::uniform_int_distribution<int64_t> in(lo[i] - d - 1, hi[i] + 2 * d);
        key[static_cast<size_t>(i)] = static_cast<int32_t>(in(rng));
      }
      const uint64_t code = packing.Pack(key.data());
      const auto it = seen.emplace(code, key).first;
      if (it->second != key) problem = "two keys share a code";
      // a step that stays in the box: each coordinate moved by -1 .. d, within its range
      uint64_t expected = code;
      for (int i = 0; i < d; ++i) {
        std::uniform_int_distribution<int64_t> to(lo[i] - d - 1, hi[i] + 2 * d);
        moved[static_cast<size_t>(i)] = static_cast<int32_t>(to(rng));
        expected += static_cast<uint64_t>(moved[static_cast<size_t>(i)] - key[static_cast<size_t>(i)]) *
                    packing.unit(i);
      }
      if (packing.Pack(moved.data()) != expected) problem = "code of a moved key";
    }
    // InRange: every bound itself is inside, one past it is not.
    std::vector<int32_t> rem0(d + 1);
    for (int i = 0; i < d && problem.empty(); ++i) {
      for (int j = 0; j < d; ++j) rem0[static_cast<size_t>(j)] = static_cast<int32_t>(lo[j]);
      const bool at_lo = packing.InRange(rem0.data());
      rem0[static_cast<size_t>(i)] = static_cast<int32_t>(lo[i] - 1);
      const bool below = packing.InRange(rem0.data());
      rem0[static_cast<size_t>(i)] = static_cast<int32_t>(hi[i]);
      const bool at_hi = packing.InRange(rem0.data());
      rem0[static_cast<size_t>(i)] = static_cast<int32_t>(hi[i] + 1);
      const bool above = packing.InRange(rem0.data());
      if (!at_lo || below || !at_hi || above) problem = "InRange at coordinate " + std::to_string(i);
    }
    Check(problem.empty(), "packed keys: one code per key, steps by addition, range check",
          std::to_string(packing.bits()) + " bits" + (problem.empty() ? "" : ": " + problem));
    // 8 fields of 2^9 + 3d + 2 values each need 8 x 10 bits: more than a word.
    int64_t wide_lo[8], wide_hi[8];
    for (int i = 0; i < 8; ++i) wide_lo[i] = 0, wide_hi[i] = 511;
    crf3d::KeyPacking too_wide;
    const bool no = too_wide.Fit(8, wide_lo, wide_hi);
    std::vector<int32_t> origin(9, 0);
    Check(!no && !too_wide.InRange(origin.data()), "packed keys: 8 fields of 10 bits do not fit",
          "refused at " + std::to_string(too_wide.bits()) + " bits");
  }
  // (b) The packed build against the wide one on a grid with 4 random channels (F = 7): with one
  // chunk the arrays are equal entry for entry (same points in the same order); with several,
  // point numbers may differ but the filter's output is bit for bit the same.
  std::mt19937 rng(5);
  int d = 0;
  const std::vector<float> f = GridFeatures({12, 40, 90}, 0.6, 4, 0.9, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const int d1 = d + 1;
  const int channels = 3;
  std::vector<float> values(static_cast<size_t>(n * channels));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& v : values) v = uniform(rng);
  for (int threads : {1, 3}) {
    const crf3d::StdThreadParallel par(threads);
    std::vector<int32_t> vi[2], nbrs[2];
    std::vector<float> vw[2], out[2];
    bool packed[2] = {false, false};
    std::string problem;
    for (int form = 0; form < 2; ++form) {  // 0: packed, 1: wide
      vi[form].resize(static_cast<size_t>(n * d1));
      vw[form].resize(static_cast<size_t>(n * d1));
      crf3d::LatticeBuilder builder;
      builder.set_max_packed_bits(form == 0 ? 64 : 0);
      const crf3d::Status s = builder.Build(f.data(), n, d, int64_t{1} << 28, 0, vi[form].data(),
                                            vw[form].data(), par);
      if (!s.ok()) {
        problem = s.message;
        break;
      }
      packed[form] = builder.packed_keys();
      const int64_t m = builder.num_points();
      nbrs[form].assign(static_cast<size_t>(d1 * m * 2), 0);
      builder.BlurNeighbours(m, 0, nbrs[form].data(), par);
      crf3d::LatticeView lat;
      lat.num_voxels = n;
      lat.d = d;
      lat.num_points = m;
      lat.vertex_index = vi[form].data();
      lat.vertex_weight = vw[form].data();
      lat.blur_neighbours = nbrs[form].data();
      out[form].resize(values.size());
      std::vector<float> scratch(static_cast<size_t>(crf3d::FilterScratchSize(lat, channels)));
      const crf3d::Status fs = crf3d::Filter(lat, values.data(), channels, false,
                                             out[form].data(), scratch.data(), par);
      if (!fs.ok()) problem = fs.message;
    }
    if (problem.empty() && !(packed[0] && !packed[1])) problem = "not one packed and one wide build";
    if (problem.empty() && vw[0] != vw[1]) problem = "vertex weights differ";
    if (problem.empty() && nbrs[0].size() != nbrs[1].size()) problem = "point counts differ";
    if (problem.empty() && threads == 1 && (vi[0] != vi[1] || nbrs[0] != nbrs[1])) {
      problem = "vertex_index or blur_neighbours differ with one chunk";
    }
    if (problem.empty() && out[0] != out[1]) problem = "filter outputs differ";
    Check(problem.empty(),
          "packed build == wide build, F = 7, " + std::to_string(threads) + " thread(s)",
          std::to_string(n) + " voxels, " + std::to_string(nbrs[0].size() / (2 * d1)) +
              " points" + (problem.empty() ? "" : ": " + problem));
  }
}

void CheckPointCounts() {
  const crf3d::StdThreadParallel par(1);
  const double to_f = std::sqrt(3.0) / 2.0;
  const std::vector<float> line = {static_cast<float>(0.3 * to_f), static_cast<float>(0.6 * to_f),
                                   static_cast<float>(1.5 * to_f), static_cast<float>(4.2 * to_f)};
  const OwnedLattice one_d(line, 4, 1, par);
  Check(one_d.m == 5, "lattice points, 1-D, x = 0.3, 0.6, 1.5, 4.2",
        Format("%.0f points, expected %.0f", static_cast<double>(one_d.m), 5.0));
  for (int d = 2; d <= 7; ++d) {
    std::vector<float> single(static_cast<size_t>(d));
    for (int k = 0; k < d; ++k) single[static_cast<size_t>(k)] = 0.37f * static_cast<float>(k + 1);
    const OwnedLattice lattice(single, 1, d, par);
    std::vector<float> twice(single);
    twice.insert(twice.end(), single.begin(), single.end());
    const OwnedLattice doubled(twice, 2, d, par);
    Check(lattice.m == d + 1 && doubled.m == d + 1,
          "lattice points of one voxel (and of two equal ones), F = " + std::to_string(d),
          Format("%.0f and %.0f points", static_cast<double>(lattice.m),
                 static_cast<double>(doubled.m)));
  }
}

// Direct separable correlation in double: out[i] = sum over offsets inside the grid of
// prod_a taps_a[o_a + r_a] * in[i + o], a loop over every voxel and every offset combination.
std::vector<double> DirectSeparable(const crf3d::Grid& grid, const std::vector<double>& in,
                                    const std::vector<std::vector<double>>& taps) {
  const std::vector<int64_t>& s = grid.spatial;  // three axes
  const int64_t c = grid.channels;
  std::vector<double> out(in.size(), 0.0);
  const int64_t r0 = static_cast<int64_t>(taps[0].size()) / 2;
  const int64_t r1 = static_cast<int64_t>(taps[1].size()) / 2;
  const int64_t r2 = static_cast<int64_t>(taps[2].size()) / 2;
  auto at = [&](int64_t b, int64_t i, int64_t j, int64_t k) {
    return ((b * s[0] + i) * s[1] + j) * s[2] + k;
  };
  for (int64_t b = 0; b < grid.batch; ++b)
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t j = 0; j < s[1]; ++j)
        for (int64_t k = 0; k < s[2]; ++k)
          for (int64_t o0 = -r0; o0 <= r0; ++o0)
            for (int64_t o1 = -r1; o1 <= r1; ++o1)
              for (int64_t o2 = -r2; o2 <= r2; ++o2) {
                const int64_t x = i + o0, y = j + o1, z = k + o2;
                if (x < 0 || x >= s[0] || y < 0 || y >= s[1] || z < 0 || z >= s[2]) continue;
                const double w = taps[0][static_cast<size_t>(o0 + r0)] *
                                 taps[1][static_cast<size_t>(o1 + r1)] *
                                 taps[2][static_cast<size_t>(o2 + r2)];
                for (int64_t ch = 0; ch < c; ++ch) {
                  out[static_cast<size_t>(at(b, i, j, k) * c + ch)] +=
                      w * in[static_cast<size_t>(at(b, x, y, z) * c + ch)];
                }
              }
  return out;
}

template <typename T>
std::vector<crf3d::AxisTaps<T>> ToAxes(const std::vector<std::vector<double>>& taps) {
  std::vector<crf3d::AxisTaps<T>> axes;
  for (const auto& t : taps) {
    crf3d::AxisTaps<T> axis;
    axis.radius = static_cast<int>(t.size()) / 2;
    axis.taps.assign(t.begin(), t.end());
    axes.push_back(axis);
  }
  return axes;
}

// 5. The separable filter (float and double) and its taps' gradient against direct loops.
// Tolerances: double agrees to rounding (1e-12 of the largest output); float to 1e-5 of it
// (each output sums at most 5 x 11 x 3 products, each step rounded at 6e-8). Each tap's gradient
// sums a whole grid of products (6720 values), so its bound is ten times wider.
// The gradient: the filter is linear in each axis's taps, so d sum(g * out) / d taps_a[k] is
// sum(g * out with axis a's taps replaced by the unit vector e_k).
template <typename T>
void CheckSeparable(const char* type, double tolerance) {
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.0, 1.0);
  crf3d::Grid grid;
  grid.batch = 2;
  grid.spatial = {6, 4, 70};  // axis 1 shorter than its radius; rows of 70 * 2 > 64 values
  grid.channels = 2;
  const std::vector<std::vector<double>> taps = {
      {0.2, -0.5, 1.0, 0.7, 0.1}, {0.3, 0.9, -0.4, 1.0, 0.6, 0.2, -0.8, 0.5, 0.4, 0.1, 0.3},
      {0.4, 1.0, 0.25}};
  std::vector<double> in(static_cast<size_t>(grid.size())), g(in.size());
  for (double& x : in) x = normal(rng);
  for (double& x : g) x = normal(rng);
  const std::vector<T> in_t(in.begin(), in.end()), g_t(g.begin(), g.end());
  std::vector<T> out(in.size()), scratch(2 * in.size());
  const crf3d::StdThreadParallel par(2);
  const std::vector<crf3d::AxisTaps<T>> axes = ToAxes<T>(taps);
  crf3d::Status s = crf3d::SeparableCorrelate<T>(grid, axes, in_t.data(), out.data(),
                                                 scratch.data(), par);
  const std::vector<double> expected = DirectSeparable(grid, in, taps);
  double max_err = 0.0, scale = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    max_err = std::max(max_err, std::abs(static_cast<double>(out[i]) - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
  }
  Check(s.ok() && max_err <= tolerance * scale,
        std::string("separable filter vs direct loop, 3-D, ") + type,
        Format("max error %.2e of max |out| %.2f", max_err, scale));

  std::vector<T> grad(taps[0].size() + taps[1].size() + taps[2].size());
  s = crf3d::SeparableTapsGradient<T>(grid, axes, in_t.data(), g_t.data(), grad.data(),
                                      scratch.data(), par);
  double grad_err = 0.0, grad_scale = 0.0;
  size_t at = 0;
  for (size_t a = 0; a < taps.size(); ++a) {
    for (size_t k = 0; k < taps[a].size(); ++k, ++at) {
      std::vector<std::vector<double>> unit = taps;
      std::fill(unit[a].begin(), unit[a].end(), 0.0);
      unit[a][k] = 1.0;
      const std::vector<double> partial = DirectSeparable(grid, in, unit);
      double dot = 0.0;
      for (size_t i = 0; i < g.size(); ++i) dot += g[i] * partial[i];
      grad_err = std::max(grad_err, std::abs(static_cast<double>(grad[at]) - dot));
      grad_scale = std::max(grad_scale, std::abs(dot));
    }
  }
  Check(s.ok() && grad_err <= tolerance * grad_scale * 10,
        std::string("separable filter's taps gradient vs direct loop, ") + type,
        Format("max error %.2e of max |gradient| %.2f", grad_err, grad_scale));
}

// 6. The NaN / Inf check (first_nonfinite) of the lattice filter and the separable filter: a
// single NaN, +Inf or -Inf value is reported at its own flat index, placed by hand at the first
// entry, in the middle and at the last entry; finite values give output bit-identical to a call
// without the check and report -1; finite values whose sums overflow float (3e38 each) are not
// reported (the check is about the input, not about the filter's range).
void CheckNonFinite() {
  const crf3d::StdThreadParallel par(2);
  std::mt19937 rng(11);
  int d = 0;
  const std::vector<float> f = GridFeatures({9, 8, 7}, 0.5, 1, 0.6, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const int channels = 3;
  const OwnedLattice lattice(f, n, d, par);
  const crf3d::LatticeView lat = lattice.View();
  crf3d::Grid grid;
  grid.batch = 1;
  grid.spatial = {9, 8, 7};
  grid.channels = channels;
  // radius 0 on axis 1 with tap 1: that axis is skipped; the last pass runs along axis 2 (rows of
  // 3 values, filtered whole)
  const std::vector<std::vector<double>> taps = {{0.5, 1.0, 0.5}, {1.0}, {0.25, 1.0, 0.25}};
  const std::vector<crf3d::AxisTaps<float>> axes = ToAxes<float>(taps);
  const std::vector<crf3d::AxisTaps<float>> identity = ToAxes<float>({{1.0}, {1.0}, {1.0}});
  // only axis 0 filtered: its pass, the last, cuts rows of 8 x 7 x 3 > 64 values into strips
  const std::vector<crf3d::AxisTaps<float>> strips = ToAxes<float>({{0.5, 1.0, 0.5}, {1.0}, {1.0}});
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n * channels));
  for (float& x : v) x = normal(rng);
  std::vector<float> out(v.size()), plain(v.size()), scratch(static_cast<size_t>(
                                                       crf3d::FilterScratchSize(lat, channels)));
  std::vector<float> sep_scratch(v.size());
  auto lattice_first = [&](const std::vector<float>& values, std::vector<float>* result) {
    int64_t first = -2;
    const crf3d::Status s = crf3d::Filter(lat, values.data(), channels, false, result->data(),
                                          scratch.data(), par, &first);
    return s.ok() == (first < 0) ? first : int64_t{-3};
  };
  auto separable_first = [&](const std::vector<crf3d::AxisTaps<float>>& a,
                             const std::vector<float>& values, std::vector<float>* result) {
    int64_t first = -2;
    const crf3d::Status s = crf3d::SeparableCorrelate<float>(
        grid, a, values.data(), result->data(), sep_scratch.data(), par, &first);
    return s.ok() == (first < 0) ? first : int64_t{-3};
  };
  const float bad_values[3] = {std::nanf(""), INFINITY, -INFINITY};
  const int64_t places[3] = {0, static_cast<int64_t>(v.size()) / 2 + 1,
                             static_cast<int64_t>(v.size()) - 1};
  bool all_found = true;
  std::string missed;
  for (float bad : bad_values) {
    for (int64_t at : places) {
      std::vector<float> w(v);
      w[static_cast<size_t>(at)] = bad;
      const int64_t got[4] = {lattice_first(w, &out), separable_first(axes, w, &out),
                              separable_first(identity, w, &out), separable_first(strips, w, &out)};
      for (int k = 0; k < 4; ++k) {
        if (got[k] != at) {
          all_found = false;
          missed = Format("value %g at %.0f", static_cast<double>(bad), static_cast<double>(at));
        }
      }
    }
  }
  Check(all_found, "NaN / +Inf / -Inf values reported at their index (lattice, separable)",
        all_found ? "9 placements x 4 filters" : missed);

  bool finite_ok = lattice_first(v, &out) == -1;
  crf3d::Filter(lat, v.data(), channels, false, plain.data(), scratch.data(), par);
  finite_ok = finite_ok && out == plain;
  finite_ok = finite_ok && separable_first(axes, v, &out) == -1;
  crf3d::SeparableCorrelate<float>(grid, axes, v.data(), plain.data(), sep_scratch.data(), par);
  finite_ok = finite_ok && out == plain;
  Check(finite_ok, "finite values: no report, output bit-identical to the unchecked filter",
        Format("%.0f values, %.0f channels", static_cast<double>(v.size()), channels));

  const std::vector<float> huge(v.size(), 3e38f);
  const int64_t lat_huge = lattice_first(huge, &out);
  bool overflowed = false;
  for (float x : out) overflowed = overflowed || !std::isfinite(x);
  const int64_t sep_huge = separable_first(axes, huge, &out);
  Check(lat_huge == -1 && sep_huge == -1 && overflowed,
        "finite values that overflow in the filter are not reported",
        Format("lattice %.0f, separable %.0f", static_cast<double>(lat_huge),
               static_cast<double>(sep_huge)));
}

// 5. The mean-field kernel's fused bilateral filter (mean_field.cc: on a lattice without splat
// lists the splat and the slice run inside its passes over the voxels, permutohedral.h's
// SplatVoxel / BlurPartSums / SliceVoxel) against the same kernel running whole Filter calls
// (MeanFieldParams::unfused): the same steps in the same order, so logits and probabilities
// must be equal bit for bit, for both normalisations, for K on the padded fast paths (2, 5, 6)
// and the generic one (9), and with 1 or 3 threads. Against the lattice with splat lists (a
// different order of additions) they agree to float rounding.
void CheckFusedMeanField() {
  std::mt19937 rng(31);
  const std::vector<int64_t> shape = {24, 30, 40};  // 28800 voxels: 3 splat parts
  int d = 0;
  const std::vector<float> f = GridFeatures(shape, 0.3, 2, 0.7, rng, &d);
  const int64_t n = static_cast<int64_t>(f.size()) / d;
  const crf3d::StdThreadParallel one(1), three(3);
  OwnedLattice lattice(f, n, d, three);
  std::vector<crf3d::AxisTaps<float>> axes(3);
  for (auto& axis : axes) {
    axis.radius = 2;
    for (int o = -2; o <= 2; ++o) axis.taps.push_back(std::exp(-0.5f * static_cast<float>(o * o)));
  }
  bool identical = true, threads_identical = true;
  double worst_lists = 0.0;
  std::string detail;
  for (int k : {2, 5, 6, 9}) {
    crf3d::Grid grid;
    grid.spatial = shape;
    grid.channels = k;
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> unaries(static_cast<size_t>(n * k));
    for (float& u : unaries) u = normal(rng);
    std::vector<float> w1(static_cast<size_t>(k)), w2(static_cast<size_t>(k));
    std::vector<float> mu(static_cast<size_t>(k * k));
    std::uniform_real_distribution<float> uniform(0.5f, 2.0f);
    for (float& w : w1) w = uniform(rng);
    for (float& w : w2) w = uniform(rng);
    for (float& m : mu) m = uniform(rng);
    for (bool symmetric : {false, true}) {
      auto run = [&](bool lists, bool unfused, const crf3d::Parallel& par, std::vector<float>* logits,
                     std::vector<float>* probs) {
        lattice.lists = lists;
        crf3d::MeanFieldParams params;
        params.num_iterations = 3;
        params.symmetric = symmetric;
        params.bilateral_weight = w1.data();
        params.spatial_weight = w2.data();
        params.compatibility = mu.data();
        params.unfused = unfused;
        logits->assign(unaries.size(), 0.0f);
        probs->assign(unaries.size(), 0.0f);
        const crf3d::Status s = crf3d::MeanFieldInference(grid, unaries.data(), lattice.View(),
                                                          axes, params, logits->data(),
                                                          probs->data(), par);
        if (!s.ok()) {
          std::printf("FAIL  mean field: %s\n", s.message.c_str());
          ++failures;
        }
      };
      std::vector<float> fl, fp, ul, up, tl, tp, ll, lp;
      run(false, false, three, &fl, &fp);
      run(false, true, three, &ul, &up);
      run(false, false, one, &tl, &tp);
      run(true, false, three, &ll, &lp);
      if (fl != ul || fp != up) {
        identical = false;
        detail = "K = " + std::to_string(k) + (symmetric ? ", symmetric" : ", mean");
      }
      threads_identical = threads_identical && fl == tl && fp == tp;
      double change = 0.0;
      for (size_t i = 0; i < fl.size(); ++i) {
        worst_lists = std::max(worst_lists, static_cast<double>(std::abs(fl[i] - ll[i])));
        change = std::max(change, static_cast<double>(std::abs(fl[i] - unaries[i])));
      }
      identical = identical && change > 0.5;  // the CRF did change the logits
    }
  }
  lattice.lists = true;
  Check(identical, "mean field: fused bilateral filter == whole Filter calls, bit for bit",
        identical ? "K = 2, 5, 6, 9, mean and symmetric, 3 iterations" : "differs at " + detail);
  Check(threads_identical, "mean field (fused): 1 thread == 3 threads, bit for bit",
        "K = 2, 5, 6, 9");
  Check(worst_lists <= 1e-4, "mean field: without splat lists ~ with them (float rounding)",
        Format("max |logit difference| %.2e; bound %.0e", worst_lists, 1e-4));
}


// 6. The mean-field kernel for every class count it treats differently (mean_field.cc: K <= 8
// on lattice rows padded to 8 floats, K = 9 on the generic path; for K = 2 and 3 the spatial
// filter on the first K - 1 classes, the last class's spatial message derived from the filtered
// total), against the mean field computed here in double: Q = softmax(U), then per
// iteration L = U - mu (w1 A(Q) + w2 G(Q)) with A the core's lattice Filter (float, the only
// precision it has; inputs rounded to float) and G the separable filter in double on all K
// classes, both normalised by their filters of ones ("mean" and "symmetric"). K = 1..9, two
// batch items of 5 x 7 x 9 voxels (630 voxels: two blocks of 256 and a partial one, items that
// end inside a block), with and without splat lists (1 and 3 threads without: bit for bit the
// same). Tolerance: float rounding over 3 iterations (the errors measured are about 1.5e-6 on
// logits of size ~10 and 2.5e-7 on probabilities): 1e-5 and 2e-6; and the CRF must have moved
// some logit by more than 0.5.
void CheckMeanFieldRowWidths() {
  std::mt19937 rng(47);
  const std::vector<int64_t> shape = {5, 7, 9};
  const int64_t per_item = 5 * 7 * 9;
  int d = 0;
  // two items on one lattice (the reference filters with the same lattice)
  std::vector<float> f = GridFeatures(shape, 0.8, 1, 0.9, rng, &d);
  const std::vector<float> second = GridFeatures(shape, 0.8, 1, 0.9, rng, &d);
  f.insert(f.end(), second.begin(), second.end());
  const int64_t n = 2 * per_item;
  const crf3d::StdThreadParallel one(1), three(3);
  OwnedLattice lattice(f, n, d, three);
  std::vector<crf3d::AxisTaps<float>> axes(3);
  std::vector<crf3d::AxisTaps<double>> axes64(3);
  for (int a = 0; a < 3; ++a) {
    axes[a].radius = axes64[a].radius = 2;
    for (int o = -2; o <= 2; ++o) {
      const double t = std::exp(-0.5 * o * o / (1.0 + a));
      axes[a].taps.push_back(static_cast<float>(t));
      axes64[a].taps.push_back(static_cast<float>(t));  // the float taps, in double
    }
  }
  double worst_logit = 0.0, worst_prob = 0.0, least_change = 1e30;
  bool threads_identical = true;
  const int iterations = 3;
  for (int k = 1; k <= 9; ++k) {
    crf3d::Grid grid;
    grid.batch = 2;
    grid.spatial = shape;
    grid.channels = k;
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::uniform_real_distribution<float> uniform(0.5f, 2.0f);
    std::vector<float> unaries(static_cast<size_t>(n * k));
    for (float& u : unaries) u = normal(rng);
    std::vector<float> w1(static_cast<size_t>(k)), w2(static_cast<size_t>(k));
    std::vector<float> mu(static_cast<size_t>(k * k));
    for (float& w : w1) w = uniform(rng);
    for (float& w : w2) w = uniform(rng);
    for (float& m : mu) m = uniform(rng);
    for (bool symmetric : {false, true}) {
      // the reference, in double
      lattice.lists = true;
      std::vector<float> ones_b = lattice.Filter(nullptr, 1, false, three);
      const std::vector<double> ones_s = crf3d::SeparableOnes<double>(grid, axes64);
      auto scale = [&](double x) { return symmetric ? 1.0 / std::sqrt(x) : 1.0 / x; };
      std::vector<double> logits(unaries.begin(), unaries.end()), q(logits.size());
      auto softmax = [&]() {
        for (int64_t i = 0; i < n; ++i) {
          double top = logits[static_cast<size_t>(i * k)], sum = 0.0;
          for (int l = 1; l < k; ++l) top = std::max(top, logits[static_cast<size_t>(i * k + l)]);
          for (int l = 0; l < k; ++l) {
            const size_t at = static_cast<size_t>(i * k + l);
            q[at] = std::exp(logits[at] - top);
            sum += q[at];
          }
          for (int l = 0; l < k; ++l) q[static_cast<size_t>(i * k + l)] /= sum;
        }
      };
      softmax();
      std::vector<float> in_b(q.size());
      std::vector<double> in_s(q.size()), g(q.size()), sep_scratch(q.size());
      for (int t = 0; t < iterations; ++t) {
        for (int64_t i = 0; i < n; ++i) {
          const double sb = symmetric ? scale(ones_b[static_cast<size_t>(i)]) : 1.0;
          const double ss = symmetric ? scale(ones_s[static_cast<size_t>(i % per_item)]) : 1.0;
          for (int l = 0; l < k; ++l) {
            const size_t at = static_cast<size_t>(i * k + l);
            in_b[at] = static_cast<float>(q[at] * sb);
            in_s[at] = q[at] * ss;
          }
        }
        const std::vector<float> a = lattice.Filter(in_b.data(), k, false, three);
        crf3d::SeparableCorrelate<double>(grid, axes64, in_s.data(), g.data(), sep_scratch.data(),
                                          three);
        for (int64_t i = 0; i < n; ++i) {
          const double ob = scale(ones_b[static_cast<size_t>(i)]);
          const double os = scale(ones_s[static_cast<size_t>(i % per_item)]);
          std::vector<double> message(static_cast<size_t>(k));
          for (int l = 0; l < k; ++l) {
            const size_t at = static_cast<size_t>(i * k + l);
            message[static_cast<size_t>(l)] = w1[static_cast<size_t>(l)] * a[at] * ob +
                                              w2[static_cast<size_t>(l)] * g[at] * os;
          }
          for (int l = 0; l < k; ++l) {
            double pairwise = 0.0;
            for (int j = 0; j < k; ++j) {
              pairwise += mu[static_cast<size_t>(l * k + j)] * message[static_cast<size_t>(j)];
            }
            const size_t at = static_cast<size_t>(i * k + l);
            logits[at] = unaries[at] - pairwise;
          }
        }
        softmax();
      }
      double change = 0.0;
      for (size_t i = 0; i < logits.size(); ++i) {
        change = std::max(change, std::abs(logits[i] - unaries[i]));
      }
      least_change = std::min(least_change, k > 1 ? change : 1e30);  // K = 1: mu is one number
      // the kernel: with lists (whole Filter calls), without (fused; 3 and 1 threads)
      std::vector<float> fused_l, fused_p;
      for (int form = 0; form < 3; ++form) {
        lattice.lists = form == 0;
        crf3d::MeanFieldParams params;
        params.num_iterations = iterations;
        params.symmetric = symmetric;
        params.bilateral_weight = w1.data();
        params.spatial_weight = w2.data();
        params.compatibility = mu.data();
        std::vector<float> out_l(unaries.size()), out_p(unaries.size());
        const crf3d::Status s =
            crf3d::MeanFieldInference(grid, unaries.data(), lattice.View(), axes, params,
                                      out_l.data(), out_p.data(), form == 2 ? one : three);
        if (!s.ok()) {
          std::printf("FAIL  mean field: %s\n", s.message.c_str());
          ++failures;
          continue;
        }
        if (form == 1) {
          fused_l = out_l;
          fused_p = out_p;
        }
        if (form == 2) threads_identical = threads_identical && out_l == fused_l && out_p == fused_p;
        for (size_t i = 0; i < logits.size(); ++i) {
          worst_logit = std::max(worst_logit, std::abs(out_l[i] - logits[i]));
          worst_prob = std::max(worst_prob, std::abs(out_p[i] - q[i]));
        }
      }
    }
  }
  lattice.lists = true;
  Check(worst_logit <= 1e-5 && worst_prob <= 2e-6,
        "mean field: K = 1..9, with and without splat lists ~ the mean field in double",
        Format("max |logit error| %.2e (bound 1e-5), max |probability error| %.2e (bound 2e-6)",
               worst_logit, worst_prob));
  Check(least_change > 0.5, "mean field: K = 2..9, the CRF moved the logits",
        Format("smallest max |change| %.2f (> %.1f)", least_change, 0.5));
  Check(threads_identical, "mean field: K = 1..9, 1 thread == 3 threads, bit for bit",
        "without splat lists, mean and symmetric");
}
}  // namespace

// 4. The accuracy setting blur_passes = k (permutohedral.cc, Embedding::Embedding): k blur
// sweeps on a lattice finer by sqrt((3k + 1) / 4) keep the same unit-variance Gaussian. Checked
// on a dense 1-D sampling (0.05 apart), where the lattice's kernel is exact on average for
// k = 1: the impulse response's standard deviation stays within [0.95, 1.10] feature units for
// k = 1, 2, 3 (its value by the derivation: 1), the embedding scales grow by the stated factor,
// and K^T stays the adjoint of K with k = 2 (the sweeps run in reverse order).
void CheckBlurPasses() {
  const int64_t n = 401;
  std::vector<float> f(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) f[static_cast<size_t>(i)] = static_cast<float>(0.05 * (i - 200));
  std::vector<float> impulse(static_cast<size_t>(n), 0.0f);
  impulse[200] = 1.0f;
  const crf3d::StdThreadParallel par(2);
  for (int k = 1; k <= 3; ++k) {
    const OwnedLattice lattice(f, n, 1, par, k);
    const std::vector<float> out = lattice.Filter(impulse.data(), 1, false, par);
    double mass = 0.0, first = 0.0, second = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      mass += out[static_cast<size_t>(i)];
      first += out[static_cast<size_t>(i)] * static_cast<double>(f[static_cast<size_t>(i)]);
      second += out[static_cast<size_t>(i)] * static_cast<double>(f[static_cast<size_t>(i)]) *
                f[static_cast<size_t>(i)];
    }
    const double sigma = std::sqrt(second / mass), mean = first / mass;
    Check(sigma >= 0.95 && sigma <= 1.10 && std::abs(mean) <= 0.1,
          "blur_passes " + std::to_string(k) + ": unit Gaussian",
          Format("impulse response sigma %.4f (bounds [0.95, 1.10]), mean %.4f (|.| <= 0.1)",
                 sigma, mean));
    const double ratio = static_cast<double>(crf3d::Embedding(4, k).scale()[2]) /
                         crf3d::Embedding(4, 1).scale()[2];
    Check(std::abs(ratio - std::sqrt((3.0 * k + 1.0) / 4.0)) <= 1e-6,
          "blur_passes " + std::to_string(k) + ": lattice finer by sqrt((3k+1)/4)",
          Format("scale ratio %.7f, expected %.7f", ratio, std::sqrt((3.0 * k + 1.0) / 4.0)));
  }
  std::mt19937 rng(21);
  int d = 0;
  const std::vector<float> g = GridFeatures({7, 6, 5}, 0.6, 2, 0.8, rng, &d);
  const int64_t voxels = static_cast<int64_t>(g.size()) / d;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(voxels * 2)), y(x.size());
  for (float& a : x) a = normal(rng);
  for (float& a : y) a = normal(rng);
  const OwnedLattice lattice(g, voxels, d, par, 2);
  const std::vector<float> kx = lattice.Filter(x.data(), 2, false, par);
  const std::vector<float> kty = lattice.Filter(y.data(), 2, true, par);
  double left = 0.0, right = 0.0, scale = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    left += static_cast<double>(kx[i]) * y[i];
    right += static_cast<double>(x[i]) * kty[i];
    scale += std::abs(static_cast<double>(kx[i]) * y[i]);
  }
  Check(std::abs(left - right) / scale <= 1e-4, "blur_passes 2: <K x, y> = <x, K^T y>",
        Format("relative gap %.2e of %.3g; bound 1e-4", std::abs(left - right) / scale, scale));
}

int main() {
  CheckAgainstBruteForce({12, 11}, 1, 1);
  CheckAgainstBruteForce({6, 5, 7}, 0, 2);
  CheckAdjoint();
  CheckThreadCount();
  CheckSplatWithoutLists();
  CheckSplatPartsRule();
  CheckStructure({30, 40, 100}, 1, 11);  // F = 4: 7 chunks with 7 threads
  CheckStructure({20, 30, 60}, 4, 12);   // F = 7 (the BraTS feature count)
  CheckStructure({16, 32, 70}, 7, 13, "wide");  // F = 10: the generic path; too wide to pack
  CheckStructure({40000}, 0, 14);  // F = 1: the generic path with packed keys
  // The wide keys where packing would fit: forbidden (max_bits 0), and as the rerun after a
  // simplex fell outside the packing's bounds (narrowed for the test).
  CheckStructure({30, 40, 100}, 1, 11, "wide", 0.8, 0);
  CheckStructure({20, 30, 60}, 4, 12, "wide", 0.8, 0);
  CheckStructure({30, 40, 100}, 1, 11, "fallback", 0.8, 64, 30);
  CheckStructure({20, 30, 60}, 4, 12, "fallback", 0.8, 64, 40);
  // Ranges that need more than 64 bits at F = 7 (extra channels spread 40x wider).
  CheckStructure({20, 30, 60}, 4, 12, "wide", 32.0);
  CheckPacked();
  CheckPointCounts();
  CheckSeparable<double>("double", 1e-12);
  CheckSeparable<float>("float", 1e-5);
  CheckNonFinite();
  CheckBlurPasses();
  CheckFusedMeanField();
  CheckMeanFieldRowWidths();
  std::printf("%s: %d check(s) failed\n", failures == 0 ? "passed" : "FAILED", failures);
  return failures == 0 ? 0 : 1;
}

// The permutohedral lattice core; see permutohedral.h for the algorithm and its conventions.
#include "permutohedral.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <sstream>
#include <type_traits>
#include <utility>

namespace crf3d {

namespace {

// Tuning numbers of the build (measured on the benchmark references, docs/benchmarks.md).
// A chunk of the parallel embed + hash fills a hash table of its own that is then merged
// serially into chunk 0's: below about 16k voxels per chunk the merge costs more than the
// parallel embedding saves.
constexpr int64_t kMinVoxelsPerChunk = 16384;
// The merge of chunk tables into shards prefetches the home slot of the point this many
// insertions ahead: enough misses in flight to overlap, few enough to stay in L1.
constexpr int64_t kMergeAhead = 16;
// Entries of the embed's cache of recently used points (packed keys; a power of two, 16 bytes
// each).
#ifndef CRF3D_RECENT_POINTS
#define CRF3D_RECENT_POINTS 65536
#endif
constexpr size_t kRecentPoints = CRF3D_RECENT_POINTS;

}  // namespace

// ---------------------------------------------------------------------------------------------
// embed
// ---------------------------------------------------------------------------------------------

Embedding::Embedding(int d, int blur_passes) : d_(d), scale_(static_cast<size_t>(d)) {
  // Feature channel i is lifted onto H_d = {x in R^{d+1}: sum(x) = 0} along the vector
  // e_i = (1, ..., 1, -(i+1), 0, ..., 0) (i+1 ones; EmbedImpl applies it), Adams et al.'s
  // basis. These d vectors are orthogonal with |e_i|^2 = (i+1)(i+2), so dividing channel i by
  // sqrt((i+1)(i+2)) makes the lift an isometry: feature distances are distances in H_d.
  //
  // inv_std then sets how many lattice units one feature unit (one standard deviation of the
  // Gaussian) spans. The lattice points are the x in Z^{d+1} whose coordinates are all congruent
  // modulo d+1; direction j steps by u_j = (d+1) e_j - (1, ..., 1), and sum_j u_j u_j^T =
  // (d+1)^2 I on H_d. The blur's stencil [1/2, 1, 1/2] is, normalised, [1/4, 1/2, 1/4]: variance
  // 1/2 step^2 along u_j. Over the d+1 directions that is a variance of (d+1)^2 / 2 (lattice
  // units^2) along every axis of H_d. The barycentric splat and slice spread each value over a
  // simplex as well: in one dimension each is a linear interpolation over one step (variance
  // step^2 / 6, step^2 = d (d+1) = 2), together (d+1)^2 / 6, and Adams et al. use that term for
  // every d. Total variance (d+1)^2 (1/2 + 1/6) = (2/3) (d+1)^2, so a unit of feature space must
  // span sqrt(2/3) (d+1) lattice units for the whole filter to be a unit-variance Gaussian
  // (for d = 1 exactly, on average over where the voxels fall between lattice points; for
  // larger d the lattice's kernel comes out a few percent wider, as the accuracy tests state).
  //
  // With blur_passes = k the sweep of blurs runs k times: the blur's variance becomes
  // k (d+1)^2 / 2 while the splat's and slice's stays (d+1)^2 / 6, so a feature unit must span
  // sqrt(k / 2 + 1 / 6) (d+1) lattice units for the same unit-variance Gaussian. The lattice is
  // then finer relative to the Gaussian by sqrt((3k + 1) / 4), and the interpolation, the
  // least Gaussian part of the kernel, carries 1 / (3k + 1) of its variance instead of 1/4.
  const double inv_std = blur_passes == 1 ? std::sqrt(2.0 / 3.0) * (d + 1)
                                          : std::sqrt(blur_passes / 2.0 + 1.0 / 6.0) * (d + 1);
  for (int i = 0; i < d; ++i) {
    scale_[static_cast<size_t>(i)] = static_cast<float>(inv_std / std::sqrt((i + 1.0) * (i + 2.0)));
  }
  alpha_ = static_cast<float>(1.0 / (1.0 + std::pow(2.0, -d)));
}

double Embedding::max_feature_span() const {
  // |elevated| <= 2 * span * sum(scale); keep it below 2^kMaxCoordinateBits so that single
  // precision (24-bit significand) still resolves an eighth of a lattice unit (2^-3: 20 + 3 < 24).
  constexpr int kMaxCoordinateBits = 20;
  double sum = 0.0;
  for (float s : scale_) sum += s;
  return std::ldexp(1.0, kMaxCoordinateBits) / (2.0 * sum);
}

namespace {

// floor(v) and ceil(v), exactly, for |v| < 2^31: truncation toward zero, then one step down or
// up where it went the wrong way (a few instructions without SSE4.1's rounding instruction,
// where std::floor and std::ceil are a longer sequence each).
inline void FloorCeil(float v, float* lo, float* up) {
  const float t = static_cast<float>(static_cast<int32_t>(v));
  *lo = t > v ? t - 1.0f : t;
  *up = t < v ? t + 1.0f : t;
}

// The ranks of EmbedImpl for d = D fixed at compile time, four coordinates at a time (GCC / Clang
// vector extensions, plain SSE2 on x86-64): for each x in turn, its comparisons with all y at
// once. The same counts as the pairwise loop, in about a third of the instructions.
using Float4 = float __attribute__((vector_size(16)));
using Int4 = int32_t __attribute__((vector_size(16)));

template <int D>
inline void RankFixed(const float* diff, int32_t* rank) {
  constexpr int kBlocks = (D + 4) / 4;  // blocks of four coordinates covering 0..D
  float padded[4 * kBlocks] = {};
  for (int i = 0; i <= D; ++i) padded[i] = diff[i];
  Float4 y[kBlocks];
  Int4 count[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    y[b] = Float4{padded[4 * b], padded[4 * b + 1], padded[4 * b + 2], padded[4 * b + 3]};
    count[b] = Int4{0, 0, 0, 0};
  }
  for (int x = 0; x <= D; ++x) {
    const Float4 dx = {diff[x], diff[x], diff[x], diff[x]};
    for (int b = 0; b < kBlocks; ++b) {
      const Int4 lane = {4 * b, 4 * b + 1, 4 * b + 2, 4 * b + 3};
      // Lane y gains one when (y < x and diff[y] < diff[x]) or (x < y <= D and
      // diff[y] <= diff[x]): the pairwise rule seen from y.
      const Int4 hit = ((dx > y[b]) & (lane < x)) | ((dx >= y[b]) & (lane > x) & (lane <= D));
      count[b] -= hit;  // a hit is -1
    }
  }
  for (int i = 0; i <= D; ++i) rank[i] = count[i / 4][i % 4];
}

// The remainder-0 point of EmbedImpl for d = D fixed at compile time and bounded coordinates
// (kBounded), four coordinates at a time: the same float operations per coordinate as the scalar
// loop (FloorCeil, the two candidates, the nearer one), with masks in place of its branches,
// whose outcome is random. Returns the sum of the D+1 coordinates.
template <int D>
inline int32_t Rem0Fixed(const float* elevated, int32_t* rem0) {
  constexpr int kBlocks = (D + 4) / 4;
  float padded[4 * kBlocks] = {};
  for (int i = 0; i <= D; ++i) padded[i] = elevated[i];
  const float down = 1.0f / static_cast<float>(D + 1);
  const Float4 down4 = {down, down, down, down};
  constexpr auto kD1 = static_cast<float>(D + 1);
  const Float4 d1 = {kD1, kD1, kD1, kD1};
  const Float4 one = {1.0f, 1.0f, 1.0f, 1.0f};
  const Int4 one_bits = (Int4)one;  // a cast between vector types keeps the bits
  int32_t out[4 * kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    Float4 e;
    std::memcpy(&e, padded + 4 * b, sizeof(e));
    const Float4 v = e * down4;
    const Float4 t = __builtin_convertvector(__builtin_convertvector(v, Int4), Float4);
    const Float4 v_lo = t - (Float4)((t > v) & one_bits);
    const Float4 v_up = t + (Float4)((t < v) & one_bits);
    const Float4 up = v_up * d1;
    const Float4 lo = v_lo * d1;
    const Int4 take_up = (up - e) < (e - lo);
    const Int4 chosen = (take_up & (Int4)up) | (~take_up & (Int4)lo);
    const Int4 r = __builtin_convertvector((Float4)chosen, Int4);
    std::memcpy(out + 4 * b, &r, sizeof(r));
  }
  int32_t sum = 0;
  for (int i = 0; i <= D; ++i) {
    rem0[i] = out[i];
    sum += out[i];
  }
  return sum;
}

// Embedding::Embed with d fixed at compile time when D > 0 (so that its loops unroll), read from
// `dim` when D == 0. kBounded: the caller guarantees |f * scale| * (d+1) < 2^30 (Build's span
// check), so floor and ceil may go through int32 (FloorCeil; same results as std::floor and
// std::ceil).
template <int D, bool kBounded>
inline void EmbedImpl(int dim, const float* scale, const float* f, float* elevated, int32_t* rem0,
                      int32_t* rank, float* bary) {
  const int d = D > 0 ? D : dim;
  // Lift onto the hyperplane sum(x) = 0 of R^{d+1}.
  float running = 0.0f;
  for (int j = d; j > 0; --j) {
    const float cf = f[j - 1] * scale[j - 1];
    elevated[j] = running - static_cast<float>(j) * cf;
    running += cf;
  }
  elevated[0] = running;

  // Nearest point of the remainder-0 sublattice (coordinates that are multiples of d+1).
  const float down = 1.0f / static_cast<float>(d + 1);
  int32_t sum = 0;
  if (D > 0 && kBounded) {
    sum = Rem0Fixed<(D > 0 ? D : 1)>(elevated, rem0);
  } else {
    for (int i = 0; i <= d; ++i) {
      const float v = elevated[i] * down;
      float v_lo, v_up;
      if (kBounded) {
        FloorCeil(v, &v_lo, &v_up);
      } else {
        v_lo = std::floor(v);
        v_up = std::ceil(v);
      }
      const float up = v_up * static_cast<float>(d + 1);
      const float lo = v_lo * static_cast<float>(d + 1);
      rem0[i] = static_cast<int32_t>((up - elevated[i] < elevated[i] - lo) ? up : lo);
      sum += rem0[i];
    }
  }
  sum /= (d + 1);

  // Rank the differential; it orders the simplex's vertices: rank[x] counts the y > x with
  // diff[x] < diff[y] and the y < x with diff[y] >= diff[x] (ties go to the earlier coordinate).
  // (Comparisons counted without branches: their outcome is unpredictable.)
  if (D > 0) {
    float diff[D > 0 ? D + 1 : 1];
    for (int i = 0; i <= d; ++i) diff[i] = elevated[i] - static_cast<float>(rem0[i]);
    RankFixed<D>(diff, rank);
  } else {
    for (int i = 0; i <= d; ++i) {
      rank[i] = 0;
      bary[i] = elevated[i] - static_cast<float>(rem0[i]);  // bary is scratch until below
    }
    for (int i = 0; i < d; ++i) {
      for (int j = i + 1; j <= d; ++j) {
        const int32_t less = bary[i] < bary[j];
        rank[i] += less;
        rank[j] += 1 - less;
      }
    }
  }
  // Bring the point back onto the hyperplane when the rounding left it off.
  for (int i = 0; i <= d; ++i) {
    rank[i] += sum;
    if (rank[i] < 0) {
      rank[i] += d + 1;
      rem0[i] += d + 1;
    } else if (rank[i] > d) {
      rank[i] -= d + 1;
      rem0[i] -= d + 1;
    }
  }

  // Barycentric weights of the d+1 vertices.
  for (int i = 0; i <= d + 1; ++i) bary[i] = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = (elevated[i] - static_cast<float>(rem0[i])) * down;
    bary[d - rank[i]] += v;
    bary[d - rank[i] + 1] -= v;
  }
  bary[0] += 1.0f + bary[d + 1];
}

}  // namespace

void Embedding::Embed(const float* f, float* elevated, int32_t* rem0, int32_t* rank,
                      float* bary) const {
  EmbedImpl<0, false>(d_, scale_.data(), f, elevated, rem0, rank, bary);
}

// ---------------------------------------------------------------------------------------------
// hash table of lattice points
// ---------------------------------------------------------------------------------------------

KeyTable::KeyTable(int d, int64_t max_points)
    : d_(d), max_points_(max_points), coefficients_(static_cast<size_t>(d)) {
  // Odd pseudo-random coefficients from a SplitMix64 sequence: fixed, so a key's hash is too.
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (uint64_t& c : coefficients_) {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    c = (z ^ (z >> 31)) | 1u;
    coefficient_sum_ += c;
  }
  Rehash(kInitialSlots);
}

uint64_t KeyTable::Linear(const int32_t* key) const {
  uint64_t h = 0;
  for (int i = 0; i < d_; ++i) {
    h += static_cast<uint64_t>(static_cast<int64_t>(key[i])) * coefficients_[static_cast<size_t>(i)];
  }
  return h;
}

void KeyTable::Rehash(size_t capacity) {
  slots_.assign(capacity, 0);
  mask_ = capacity - 1;
  for (int64_t p = 0; p < size(); ++p) {
    const uint64_t h = Hash(key(p));
    uint64_t s = h & mask_;
    while (slots_[s] != 0) s = (s + 1) & mask_;
    slots_[s] = Entry(h, static_cast<int32_t>(p));
  }
}

void KeyTable::Reserve(int64_t points) {
  keys_.reserve(static_cast<size_t>(points * d_));
  size_t capacity = slots_.size();
  while (capacity < static_cast<size_t>(2 * points)) capacity *= 2;
  if (capacity != slots_.size()) Rehash(capacity);
}

int32_t KeyTable::Insert(const int32_t* key, uint64_t h, uint64_t s) {
  if (size() >= max_points_) return -1;
  const auto p = static_cast<int32_t>(size());
  keys_.insert(keys_.end(), key, key + d_);
  ++size_;
  slots_[s] = Entry(h, p);
  if (2 * static_cast<size_t>(size_) > slots_.size()) Rehash(2 * slots_.size());  // load <= 1/2
  return p;
}

// ---------------------------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------------------------

namespace {

// Per-range summary of the features: channel minima and maxima, first non-finite value.
struct FeatureStats {
  std::vector<float> lo, hi;
  int64_t first_bad = -1;  // flat index of the first NaN or Inf
};

// One pass of min / max per channel with D channels fixed at compile time (0: d at run time).
// Non-finite values are not looked for one by one: |v| <= FLT_MAX fails exactly for NaN and
// +-Inf, so a running AND of that test says whether the (rare) second scan that finds the first
// one is needed.
template <int D>
FeatureStats SummariseImpl(const float* f, int64_t begin, int64_t end, int dim) {
  const int d = D > 0 ? D : dim;
  FeatureStats s;
  s.lo.assign(static_cast<size_t>(d), std::numeric_limits<float>::infinity());
  s.hi.assign(static_cast<size_t>(d), -std::numeric_limits<float>::infinity());
  constexpr float kMax = std::numeric_limits<float>::max();
  bool finite = true;
  float lo_local[D > 0 ? D : 1], hi_local[D > 0 ? D : 1];
  float* lo = D > 0 ? lo_local : s.lo.data();
  float* hi = D > 0 ? hi_local : s.hi.data();
  for (int k = 0; k < d; ++k) {
    lo[k] = std::numeric_limits<float>::infinity();
    hi[k] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t i = begin; i < end; ++i) {
    const float* row = f + i * d;
    for (int k = 0; k < d; ++k) {
      const float v = row[k];
      finite &= std::fabs(v) <= kMax;
      lo[k] = v < lo[k] ? v : lo[k];
      hi[k] = v > hi[k] ? v : hi[k];
    }
  }
  if (D > 0) {
    std::copy(lo, lo + d, s.lo.begin());
    std::copy(hi, hi + d, s.hi.begin());
  }
  if (!finite) {
    const int64_t at = FirstNonFinite(f + begin * d, (end - begin) * d);
    s.first_bad = begin * d + at;
  }
  return s;
}

FeatureStats Summarise(const float* f, int64_t begin, int64_t end, int d) {
  switch (d) {
    case 3: return SummariseImpl<3>(f, begin, end, d);
    case 4: return SummariseImpl<4>(f, begin, end, d);
    case 5: return SummariseImpl<5>(f, begin, end, d);
    case 6: return SummariseImpl<6>(f, begin, end, d);
    case 7: return SummariseImpl<7>(f, begin, end, d);
    default: return SummariseImpl<0>(f, begin, end, d);
  }
}

// What EmbedRange met: all voxels hashed, the table at max_points, or (packed keys only) a
// simplex outside the KeyPacking's fields, which sends the build back to the wide keys.
enum class EmbedResult { kOk, kFull, kOutOfRange };

// The two key forms' tables, for the code that runs on either (embed, merge, blur neighbours).
inline uint64_t PointHash(const KeyTable& t, int64_t p) { return t.Hash(t.key(p)); }
inline uint64_t PointHash(const PackedKeyTable& t, int64_t p) {
  return PackedKeyTable::Hash(t.code(p));
}
// Inserts point p of `from`, of hash h, into `to` (or finds it there).
inline int32_t InsertPoint(KeyTable& to, const KeyTable& from, int64_t p, uint64_t h) {
  return to.FindOrInsert(from.key(p), h);
}
inline int32_t InsertPoint(PackedKeyTable& to, const PackedKeyTable& from, int64_t p,
                           uint64_t h) {
  return to.FindOrInsert(from.code(p), h);
}
template <class Table>
Table NewTable(int d, int64_t max_points) {
  if constexpr (std::is_same_v<Table, PackedKeyTable>) {
    (void)d;
    return PackedKeyTable(max_points);
  } else {
    return KeyTable(d, max_points);
  }
}

// Embeds voxels [begin, end) and inserts their simplex vertices into table (a KeyTable, or a
// PackedKeyTable with the fields of `packing`). Writes local point indices plus index_base.
template <int D, class Table>
EmbedResult EmbedRangeImpl(const float* features, int64_t begin, int64_t end,
                           const Embedding& emb, const std::vector<float>& shift,
                           const KeyPacking& packing, Table& table, int32_t index_base,
                           int32_t* vertex_index, float* vertex_weight) {
  constexpr bool kPacked = std::is_same_v<Table, PackedKeyTable>;
  const int d = D > 0 ? D : emb.dim();
  const int d1 = d + 1;
  // Voxels go through in groups whose vertex keys are hashed and prefetched before any is
  // inserted (in order), so the table's cache misses overlap. Neighbouring voxels of a smooth
  // image often fall in the same simplex (same remainder-0 vertex and rank): such a voxel
  // takes its predecessor's lattice points without touching the table.
  const int group = std::max(1, KeyTable::kMaxBatch / d1);
  std::vector<float> f(static_cast<size_t>(d)), elevated(static_cast<size_t>(d1)),
      bary(static_cast<size_t>(d1 + 1));
  std::vector<int32_t> simplex(static_cast<size_t>(2 * d1)), previous(static_cast<size_t>(2 * d1)),
      by_rank(static_cast<size_t>(d1));
  int32_t* rem0 = simplex.data();
  int32_t* rank = simplex.data() + d1;
  bool have_previous = false;
  // Wide keys: the keys themselves and the linear hash; packed: the codes, and the code change
  // of each step from vertex k to k + 1 by the coordinate it moves (step[d]: the implied one).
  uint64_t coefficient_sum = 0;
  std::vector<int32_t> keys;
  std::vector<uint64_t> codes, step;
  if constexpr (kPacked) {
    codes.resize(static_cast<size_t>(group * d1));
    step.resize(static_cast<size_t>(d1));
    for (int c = 0; c < d1; ++c) {
      step[static_cast<size_t>(c)] =
          packing.ones() - (c < d ? static_cast<uint64_t>(d1) * packing.unit(c) : 0);
    }
  } else {
    coefficient_sum = table.coefficient_sum();
    keys.resize(static_cast<size_t>(group * d1 * d));
  }
  std::vector<uint64_t> hashes(static_cast<size_t>(group * d1));
  std::vector<char> repeat(static_cast<size_t>(group));
  // Packed keys: the points found or inserted last, direct-mapped by hash (a hash stands for its
  // key). Neighbouring voxels share most of their simplices' vertices, so most lookups end here
  // instead of in the table.
  struct Recent {
    uint64_t hash;
    int32_t index;  // -1: empty
  };
  std::vector<Recent> recent(kPacked ? kRecentPoints : 0, Recent{0, -1});
  constexpr uint64_t kRecentMask = kRecentPoints - 1;
  for (int64_t g0 = begin; g0 < end; g0 += group) {
    const int64_t g1 = std::min<int64_t>(end, g0 + group);
    for (int64_t i = g0; i < g1; ++i) {
      // The filter is invariant to a common shift of the features; removing the minimum
      // keeps lattice coordinates small and exact.
      for (int k = 0; k < d; ++k) {
        f[static_cast<size_t>(k)] = features[i * d + k] - shift[static_cast<size_t>(k)];
      }
      EmbedImpl<D, true>(d, emb.scale(), f.data(), elevated.data(), rem0, rank, bary.data());
      for (int k = 0; k < d1; ++k) vertex_weight[i * d1 + k] = bary[static_cast<size_t>(k)];
      const bool same =
          have_previous && std::equal(simplex.begin(), simplex.begin() + 2 * d1, previous.begin());
      repeat[static_cast<size_t>(i - g0)] = same;
      if (same) continue;
      std::copy(simplex.begin(), simplex.begin() + 2 * d1, previous.begin());
      have_previous = true;
      // Vertex k + 1 is vertex k plus (1, ..., 1) minus (d+1) at the coordinate of rank d - k
      // (the implied last coordinate has no hash coefficient and no field).
      for (int k = 0; k < d1; ++k) by_rank[static_cast<size_t>(rank[k])] = k;
      if constexpr (kPacked) {
        if (!packing.InRange<D>(rem0)) return EmbedResult::kOutOfRange;
        uint64_t code = packing.Pack<D>(rem0);
        for (int k = 0; k < d1; ++k) {
          const int64_t slot = (i - g0) * d1 + k;
          codes[static_cast<size_t>(slot)] = code;
          const uint64_t h = PackedKeyTable::Hash(code);
          hashes[static_cast<size_t>(slot)] = h;
          __builtin_prefetch(&recent[h & kRecentMask]);
          code += step[static_cast<size_t>(by_rank[static_cast<size_t>(d - k)])];
        }
      } else {
        uint64_t linear = table.Linear(rem0);
        // The keys follow the same steps (Embedding::VertexKey, one step at a time): vertex 0
        // is rem0, vertex k + 1 is vertex k plus one in every coordinate, less d+1 in the moved
        // one.
        int32_t* key = keys.data() + (i - g0) * d1 * d;
        std::copy(rem0, rem0 + d, key);
        for (int k = 0; k < d1; ++k, key += d) {
          const int64_t slot = (i - g0) * d1 + k;
          hashes[static_cast<size_t>(slot)] = KeyTable::Mix(linear);
          table.Prefetch(hashes[static_cast<size_t>(slot)]);
          const int moved = by_rank[static_cast<size_t>(d - k)];
          linear += coefficient_sum -
                    (moved < d ? static_cast<uint64_t>(d1) * table.coefficient(moved) : 0);
          if (k == d) break;
          for (int c = 0; c < d; ++c) key[d + c] = key[c] + 1;
          if (moved < d) key[d + moved] -= d1;
        }
      }
    }
    if constexpr (kPacked) {
      // Second pass: the cache entries prefetched above are in; the table's home slot is
      // prefetched for the vertices the cache does not hold.
      for (int64_t i = g0; i < g1; ++i) {
        if (repeat[static_cast<size_t>(i - g0)]) continue;
        for (int k = 0; k < d1; ++k) {
          const uint64_t h = hashes[static_cast<size_t>((i - g0) * d1 + k)];
          if (recent[h & kRecentMask].hash != h) table.Prefetch(h);
        }
      }
    }
    for (int64_t i = g0; i < g1; ++i) {
      int32_t* out = vertex_index + i * d1;
      if (repeat[static_cast<size_t>(i - g0)]) {
        for (int k = 0; k < d1; ++k) out[k] = out[k - d1];
        continue;
      }
      for (int k = 0; k < d1; ++k) {
        const int64_t slot = (i - g0) * d1 + k;
        int32_t p;
        if constexpr (kPacked) {
          const uint64_t h = hashes[static_cast<size_t>(slot)];
          Recent& r = recent[h & kRecentMask];
          if (r.hash == h && r.index >= 0) {
            p = r.index;
          } else {
            p = table.FindOrInsert(codes[static_cast<size_t>(slot)], h);
            r = Recent{h, p};
          }
        } else {
          p = table.template FindOrInsert<D>(keys.data() + slot * d,
                                             hashes[static_cast<size_t>(slot)]);
        }
        if (p < 0) return EmbedResult::kFull;
        out[k] = p + index_base;
      }
    }
  }
  return EmbedResult::kOk;
}

// EmbedRangeImpl with the feature count fixed at compile time for the common small ones.
template <class Table>
EmbedResult EmbedRange(const float* features, int64_t begin, int64_t end, const Embedding& emb,
                       const std::vector<float>& shift, const KeyPacking& packing, Table& table,
                       int32_t index_base, int32_t* vertex_index, float* vertex_weight) {
  switch (emb.dim()) {
#define CRF3D_EMBED_CASE(D)                                                                \
  case D:                                                                                  \
    return EmbedRangeImpl<D>(features, begin, end, emb, shift, packing, table, index_base, \
                             vertex_index, vertex_weight);
    CRF3D_EMBED_CASE(2)
    CRF3D_EMBED_CASE(3)
    CRF3D_EMBED_CASE(4)
    CRF3D_EMBED_CASE(5)
    CRF3D_EMBED_CASE(6)
    CRF3D_EMBED_CASE(7)
    CRF3D_EMBED_CASE(8)
#undef CRF3D_EMBED_CASE
    default:
      return EmbedRangeImpl<0>(features, begin, end, emb, shift, packing, table, index_base,
                               vertex_index, vertex_weight);
  }
}

std::string TooManyPoints(int64_t max_points, int64_t n, int d) {
  std::ostringstream m;
  m << "features: the lattice needs more than " << max_points << " points for " << n
    << " voxels with " << d << " feature channels, more than the memory budget allows; the "
    << "features vary too much at this scale (use wider kernels, i.e. larger theta)";
  return m.str();
}

// Bounds of the remainder-0 points of features shifted to [0, span[k]] per channel, for
// KeyPacking::Fit. Elevated coordinate j is sum_{i > j} c_i - j c_j with c_i = f[i-1] scale[i-1]
// in [0, span[i-1] scale[i-1]] (EmbedImpl); its nearest remainder-0 coordinate is within
// (d+1) / 2 of it and the step back onto the hyperplane moves it by d+1 at most. The margin
// adds a generous allowance for float rounding; KeyPacking::InRange checks every simplex, so a
// bound that came out too tight costs a rerun with the wide keys, never a wrong lattice.
void Rem0Bounds(const Embedding& emb, const std::vector<double>& span, int64_t* rem0_lo,
                int64_t* rem0_hi) {
  const int d = emb.dim();
  std::vector<double> top(static_cast<size_t>(d) + 1, 0.0);  // c_i's largest value, i = 1..d
  for (int i = 1; i <= d; ++i) {
    top[static_cast<size_t>(i)] =
        std::max(0.0, span[static_cast<size_t>(i) - 1]) * emb.scale()[i - 1];
  }
  double above = 0.0;  // sum_{i > j} of top[i]
  for (int j = d; j >= 0; --j) {
    const double lo = j > 0 ? -j * top[static_cast<size_t>(j)] : 0.0;
    const double hi = above;
    const double margin = 2.0 * (d + 1) + 2.0 + 1e-4 * (std::fabs(lo) + std::fabs(hi));
    if (j < d) {
      rem0_lo[j] = static_cast<int64_t>(std::floor(lo - margin));
      rem0_hi[j] = static_cast<int64_t>(std::ceil(hi + margin));
    }
    if (j > 0) above += top[static_cast<size_t>(j)];
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// packed keys
// ---------------------------------------------------------------------------------------------

bool KeyPacking::Fit(int d, const int64_t* rem0_lo, const int64_t* rem0_hi, int max_bits) {
  d_ = d;
  bits_ = 0;
  ones_ = 0;
  base_.assign(static_cast<size_t>(d), 0);
  shift_.assign(static_cast<size_t>(d), 0);
  rem0_lo_.assign(static_cast<size_t>(d), 0);
  rem0_hi_.assign(static_cast<size_t>(d), -1);  // until it fits: every simplex out of range
  int shift = 0;
  for (int i = 0; i < d; ++i) {
    constexpr int64_t kLimit = int64_t{1} << 31;
    if (rem0_lo[i] > rem0_hi[i] || rem0_lo[i] < -kLimit || rem0_hi[i] >= kLimit) return false;
    // Vertex keys lie in [rem0_lo - d, rem0_hi + d]; a blur neighbour moves each coordinate by
    // -1 or +d: the field holds [rem0_lo - d - 1, rem0_hi + 2d].
    base_[static_cast<size_t>(i)] = rem0_lo[i] - d - 1;
    const auto top = static_cast<uint64_t>(rem0_hi[i] - rem0_lo[i] + 3 * d + 1);
    const int width = 64 - __builtin_clzll(top);
    shift_[static_cast<size_t>(i)] = shift;
    shift += width;
    if (shift > max_bits || shift > 64) {
      bits_ = shift;
      return false;
    }
  }
  for (int i = 0; i < d; ++i) {
    rem0_lo_[static_cast<size_t>(i)] = static_cast<int32_t>(rem0_lo[i]);
    rem0_hi_[static_cast<size_t>(i)] = static_cast<int32_t>(rem0_hi[i]);
    ones_ += unit(i);
  }
  bits_ = shift;
  return true;
}

PackedKeyTable::PackedKeyTable(int64_t max_points) : max_points_(max_points) {
  Rehash(KeyTable::kInitialSlots);
}

void PackedKeyTable::Rehash(size_t capacity) {
  slots_.assign(capacity, Slot{0, 0, 0});
  mask_ = capacity - 1;
  for (size_t p = 0; p < codes_.size(); ++p) {
    const uint64_t h = Hash(codes_[p]);
    uint64_t s = h & mask_;
    while (slots_[s].index != 0) s = (s + 1) & mask_;
    slots_[s] = Slot{h, static_cast<uint32_t>(p) + 1, 0};
  }
}

void PackedKeyTable::Reserve(int64_t points) {
  codes_.reserve(static_cast<size_t>(points));
  size_t capacity = slots_.size();
  while (capacity < static_cast<size_t>(2 * points)) capacity *= 2;
  if (capacity != slots_.size()) Rehash(capacity);
}

int32_t PackedKeyTable::Insert(uint64_t code, uint64_t h, uint64_t s) {
  if (size() >= max_points_) return -1;
  const auto p = static_cast<int32_t>(size());
  codes_.push_back(code);
  slots_[s] = Slot{h, static_cast<uint32_t>(p) + 1, 0};
  if (2 * codes_.size() > slots_.size()) Rehash(2 * slots_.size());  // load <= 1/2
  return p;
}

// ---------------------------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------------------------

Status LatticeBuilder::Build(const float* features, int64_t n, int d, int64_t max_points,
                             int32_t index_base, int32_t* vertex_index, float* vertex_weight,
                             const Parallel& par, int blur_passes) {
  d_ = d;
  packed_ = false;
  shards_.clear();
  packed_shards_.clear();
  shard_begin_.clear();
  if (blur_passes < 1) return Status::Invalid("lattice: blur_passes must be >= 1");
  const Embedding emb(d, blur_passes);
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(par.num_threads(), n / kMinVoxelsPerChunk));
  auto chunk_begin = [&](int64_t c) { return n * c / chunks; };

  // 1. Feature ranges and finiteness.
  std::vector<FeatureStats> stats(static_cast<size_t>(chunks));
  par.For(chunks, 4 * d * (n / chunks + 1), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      stats[static_cast<size_t>(c)] = Summarise(features, chunk_begin(c), chunk_begin(c + 1), d);
    }
  });
  std::vector<float> lo(static_cast<size_t>(d), std::numeric_limits<float>::infinity());
  std::vector<float> hi(static_cast<size_t>(d), -std::numeric_limits<float>::infinity());
  for (const FeatureStats& s : stats) {
    if (s.first_bad >= 0) {
      std::ostringstream m;
      m << "features contains NaN or Inf (voxel " << s.first_bad / d << ", channel "
        << s.first_bad % d << " of the batch item)";
      return Status::Invalid(m.str());
    }
    for (int k = 0; k < d; ++k) {
      lo[static_cast<size_t>(k)] = std::min(lo[static_cast<size_t>(k)], s.lo[static_cast<size_t>(k)]);
      hi[static_cast<size_t>(k)] = std::max(hi[static_cast<size_t>(k)], s.hi[static_cast<size_t>(k)]);
    }
  }
  const double max_span = emb.max_feature_span();
  std::vector<double> span(static_cast<size_t>(d));
  for (int k = 0; k < d; ++k) {
    span[static_cast<size_t>(k)] =
        static_cast<double>(hi[static_cast<size_t>(k)]) - lo[static_cast<size_t>(k)];
    if (span[static_cast<size_t>(k)] > max_span) {
      std::ostringstream m;
      m << "features channel " << k << " spans " << span[static_cast<size_t>(k)]
        << " (max - min), beyond the " << max_span
        << " the lattice resolves in single precision for " << d
        << " channels; features must be divided by the kernel widths (theta)";
      return Status::Invalid(m.str());
    }
  }

  // 2. Embed and hash, with keys packed into 64-bit codes when the features' ranges allow it
  // (KeyPacking), else, or when a simplex falls outside the packing after all, with the wide
  // keys. Both give the same lattice: the same points, weights and (with one chunk) numbering.
  if (max_packed_bits_ > 0) {
    std::vector<int64_t> rem0_lo(static_cast<size_t>(d)), rem0_hi(static_cast<size_t>(d));
    Rem0Bounds(emb, span, rem0_lo.data(), rem0_hi.data());
    for (int k = 0; k < d; ++k) {
      rem0_lo[static_cast<size_t>(k)] += packed_bounds_inset_;
      rem0_hi[static_cast<size_t>(k)] -= packed_bounds_inset_;
    }
    if (packing_.Fit(d, rem0_lo.data(), rem0_hi.data(), max_packed_bits_)) {
      bool out_of_range = false;
      const Status s = EmbedAndHash(features, n, emb, lo, max_points, index_base, vertex_index,
                                    vertex_weight, par, packed_shards_, &out_of_range);
      if (!out_of_range) {
        packed_ = s.ok();
        return s;
      }
      packed_shards_.clear();
      shard_begin_.clear();
    }
  }
  bool unused = false;
  return EmbedAndHash(features, n, emb, lo, max_points, index_base, vertex_index, vertex_weight,
                      par, shards_, &unused);
}

template <class Table>
Status LatticeBuilder::EmbedAndHash(const float* features, int64_t n, const Embedding& emb,
                                    const std::vector<float>& lo, int64_t max_points,
                                    int32_t index_base, int32_t* vertex_index,
                                    float* vertex_weight, const Parallel& par,
                                    std::vector<Table>& shards_out, bool* out_of_range) {
  const int d = emb.dim();
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(par.num_threads(), n / kMinVoxelsPerChunk));
  auto chunk_begin = [&](int64_t c) { return n * c / chunks; };
  *out_of_range = false;
  // Each chunk fills a table of its own in parallel. With one chunk that table is the lattice;
  // otherwise the chunk tables are merged in parallel into as many hash shards, so that point
  // numbering depends only on the chunk count.
  if (chunks == 1) {
    shards_out.push_back(NewTable<Table>(d, max_points));
    const EmbedResult r = EmbedRange(features, 0, n, emb, lo, packing_, shards_out[0],
                                     index_base, vertex_index, vertex_weight);
    if (r != EmbedResult::kOk) {
      shards_out.clear();
      *out_of_range = r == EmbedResult::kOutOfRange;
      return Status::Exhausted(TooManyPoints(max_points, n, d));
    }
    shard_begin_ = {0, shards_out[0].size()};
    return Status::Ok();
  }
  const int shards = static_cast<int>(std::min<int64_t>(chunks, 1 << 16));
  std::vector<Table> local;
  local.reserve(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) local.push_back(NewTable<Table>(d, max_points));
  // Per chunk: the shard of each of its points; its point numbers grouped by shard, in
  // increasing order within a shard (a counting sort), group s starting at
  // shard_start[c * (shards + 1) + s]; and room for each point's number within its shard.
  std::vector<std::vector<uint16_t>> shard_of(static_cast<size_t>(chunks));
  std::vector<std::vector<int32_t>> by_shard(static_cast<size_t>(chunks));
  std::vector<std::vector<int32_t>> to_shard(static_cast<size_t>(chunks));
  std::vector<int64_t> shard_start(static_cast<size_t>(chunks * (shards + 1)), 0);
  std::vector<char> full(static_cast<size_t>(chunks), 0), outside(static_cast<size_t>(chunks), 0);
  par.For(chunks, 200 * d * d * (n / chunks + 1), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      try {  // an exception must not escape a worker thread
        Table& t = local[static_cast<size_t>(c)];
        const EmbedResult r = EmbedRange(features, chunk_begin(c), chunk_begin(c + 1), emb, lo,
                                         packing_, t, 0, vertex_index, vertex_weight);
        full[static_cast<size_t>(c)] = r != EmbedResult::kOk;
        outside[static_cast<size_t>(c)] = r == EmbedResult::kOutOfRange;
        if (full[static_cast<size_t>(c)]) continue;
        std::vector<uint16_t>& of = shard_of[static_cast<size_t>(c)];
        of.resize(static_cast<size_t>(t.size()));
        int64_t* start = shard_start.data() + c * (shards + 1);
        for (int64_t p = 0; p < t.size(); ++p) {
          const int s = KeyTable::Shard(PointHash(t, p), shards);
          of[static_cast<size_t>(p)] = static_cast<uint16_t>(s);
          ++start[s + 1];
        }
        for (int s = 0; s < shards; ++s) start[s + 1] += start[s];
        std::vector<int32_t>& order = by_shard[static_cast<size_t>(c)];
        order.resize(static_cast<size_t>(t.size()));
        std::vector<int64_t> next(start, start + shards);
        for (int64_t p = 0; p < t.size(); ++p) {
          order[static_cast<size_t>(next[of[static_cast<size_t>(p)]]++)] = static_cast<int32_t>(p);
        }
        to_shard[static_cast<size_t>(c)].resize(static_cast<size_t>(t.size()));
        t.ReleaseSlots();  // the merge reads the chunk's keys only
      } catch (const std::bad_alloc&) {
        full[static_cast<size_t>(c)] = 1;
      }
    }
  });
  if (std::find(outside.begin(), outside.end(), 1) != outside.end()) {
    *out_of_range = true;
    return Status::Exhausted(TooManyPoints(max_points, n, d));
  }
  if (std::find(full.begin(), full.end(), 1) != full.end()) {
    return Status::Exhausted(TooManyPoints(max_points, n, d));
  }
  // The merge: shard s takes, chunk by chunk in order, the chunk points whose hash falls in it
  // (so its numbering is fixed by the chunk count alone); to_shard[c][p] is chunk c's point p's
  // number within its shard. Shards touch disjoint entries, so they run concurrently.
  shards_out.reserve(static_cast<size_t>(shards));
  for (int s = 0; s < shards; ++s) shards_out.push_back(NewTable<Table>(d, max_points));
  std::vector<char> shard_full(static_cast<size_t>(shards), 0);
  const int64_t points_per_shard = n * (d + 1) / (chunks * shards) + 1;  // a rough guess
  par.For(shards, 150 * d * points_per_shard, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      try {
        Table& t = shards_out[static_cast<size_t>(s)];
        // Chunks are contiguous slabs of voxels and share few points: the sum of the counts
        // is close to the shard's final size.
        int64_t expected = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t* start = shard_start.data() + c * (shards + 1);
          expected += start[s + 1] - start[s];
        }
        t.Reserve(std::min(expected, max_points));
        for (int64_t c = 0; c < chunks && !shard_full[static_cast<size_t>(s)]; ++c) {
          const Table& from = local[static_cast<size_t>(c)];
          const int64_t* start = shard_start.data() + c * (shards + 1);
          const int32_t* order = by_shard[static_cast<size_t>(c)].data();
          std::vector<int32_t>& map = to_shard[static_cast<size_t>(c)];
          // The shard's home slots are prefetched kMergeAhead points ahead (the table was
          // reserved above, so its mask does not change under the prefetches).
          const int64_t q_end = start[s + 1];
          for (int64_t q = start[s]; q < std::min(q_end, start[s] + kMergeAhead); ++q) {
            t.Prefetch(PointHash(from, order[q]));
          }
          for (int64_t q = start[s]; q < q_end; ++q) {
            if (q + kMergeAhead < q_end) t.Prefetch(PointHash(from, order[q + kMergeAhead]));
            const int32_t p = order[q];
            const int32_t i = InsertPoint(t, from, p, PointHash(from, p));
            if (i < 0) {
              shard_full[static_cast<size_t>(s)] = 1;
              break;
            }
            map[static_cast<size_t>(p)] = i;
          }
        }
      } catch (const std::bad_alloc&) {
        shard_full[static_cast<size_t>(s)] = 1;
      }
    }
  });
  local.clear();
  by_shard.clear();
  if (std::find(shard_full.begin(), shard_full.end(), 1) != shard_full.end()) {
    shards_out.clear();
    return Status::Exhausted(TooManyPoints(max_points, n, d));
  }
  shard_begin_.assign(static_cast<size_t>(shards) + 1, 0);
  for (int s = 0; s < shards; ++s) {
    shard_begin_[static_cast<size_t>(s) + 1] =
        shard_begin_[static_cast<size_t>(s)] + shards_out[static_cast<size_t>(s)].size();
  }
  if (shard_begin_.back() > max_points) {
    shards_out.clear();
    shard_begin_.clear();
    return Status::Exhausted(TooManyPoints(max_points, n, d));
  }
  // Chunk-local point numbers in vertex_index become lattice numbers: first each chunk point's
  // number (in place of its number within its shard), then one gather per entry.
  const int64_t d1 = d + 1;
  par.For(chunks, 4 * d1 * (n / chunks + 1), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const std::vector<uint16_t>& of = shard_of[static_cast<size_t>(c)];
      std::vector<int32_t>& map = to_shard[static_cast<size_t>(c)];
      for (size_t p = 0; p < map.size(); ++p) {
        map[p] = static_cast<int32_t>(shard_begin_[of[p]] + map[p]) + index_base;
      }
      const int32_t* global = map.data();
      for (int64_t i = chunk_begin(c) * d1; i < chunk_begin(c + 1) * d1; ++i) {
        vertex_index[i] = global[vertex_index[i]];
      }
    }
  });
  return Status::Ok();
}

namespace {

// Marks every backward neighbour of points [0, m) absent (the forward lookups below then fill
// the ones that exist).
void MarkBackwardAbsent(int d, int64_t m, int64_t total_points, int32_t index_base, int32_t* nbrs,
                        const Parallel& par) {
  const auto absent = static_cast<int32_t>(total_points);
  par.For(m, 2 * (d + 1), [&](int64_t b, int64_t e) {
    for (int j = 0; j <= d; ++j) {
      int32_t* row = nbrs + (j * total_points + index_base) * 2;
      for (int64_t p = b; p < e; ++p) row[2 * p] = absent;
    }
  });
}

// LatticeBuilder::BlurNeighbours for the points [0, shard_begin.back()) of hash-sharded tables,
// with d fixed at compile time when D > 0.
//
// Only the step forward is looked up: q = p + u_j exists exactly when p = q - u_j does, so a
// found q gives both p's forward neighbour and q's backward one (each backward slot has one
// writer, the unique point one step behind it, so ranges on different threads never write the
// same slot). A first pass marks every backward slot absent.
template <int D, bool kSharded>
void BlurNeighboursImpl(const std::vector<KeyTable>& shards, const std::vector<int64_t>& begin,
                        int dim, int64_t total_points, int32_t index_base, int32_t* nbrs,
                        const Parallel& par) {
  const int d = D > 0 ? D : dim;
  const int64_t m = begin.back();
  const int count_shards = static_cast<int>(shards.size());
  const auto absent = static_cast<int32_t>(total_points);
  MarkBackwardAbsent(d, m, total_points, index_base, nbrs, par);
  const uint64_t coefficient_sum = shards[0].coefficient_sum();
  // Forward neighbour keys of a few points at a time are looked up as one batch: (d+1) per
  // point, direction j of point p0 + q / (d+1) in slot q. Three passes over the batch overlap
  // the cache misses of its lookups: prefetch the home slots, then the keys they point at,
  // then compare.
  const int per_batch = std::max(1, KeyTable::kMaxBatch / (d + 1));
  par.For(m, 30 * d * (d + 1), [&](int64_t b, int64_t e) {
    std::vector<int32_t> keys(static_cast<size_t>(KeyTable::kMaxBatch) * d);
    uint64_t hashes[KeyTable::kMaxBatch];
    int shard[KeyTable::kMaxBatch];
    int s = static_cast<int>(std::upper_bound(begin.begin(), begin.end(), b) - begin.begin()) - 1;
    for (int64_t p0 = b; p0 < e; p0 += per_batch) {
      const int64_t p1 = std::min<int64_t>(e, p0 + per_batch);
      int count = 0;
      for (int64_t p = p0; p < p1; ++p) {
        while (p >= begin[static_cast<size_t>(s) + 1]) ++s;
        const KeyTable& table = shards[static_cast<size_t>(s)];
        const int32_t* key = table.key(p - begin[static_cast<size_t>(s)]);
        const uint64_t linear = table.Linear(key);
        // One step forward along direction j adds (d+1) e_j - (1, ..., 1); for j == d the d+1
        // lands on the implied last coordinate (no hash coefficient).
        for (int j = 0; j <= d; ++j, ++count) {
          int32_t* out = keys.data() + static_cast<int64_t>(count) * d;
          for (int k = 0; k < d; ++k) out[k] = key[k] - 1;
          if (j < d) out[j] = key[j] + d;
          const uint64_t step =
              (j < d ? static_cast<uint64_t>(d + 1) * table.coefficient(j) : 0) - coefficient_sum;
          hashes[count] = KeyTable::Mix(linear + step);
          shard[count] = kSharded ? KeyTable::Shard(hashes[count], count_shards) : 0;
        }
      }
      for (int q = 0; q < count; ++q) shards[static_cast<size_t>(shard[q])].Prefetch(hashes[q]);
      for (int q = 0; q < count; ++q) shards[static_cast<size_t>(shard[q])].PrefetchKey(hashes[q]);
      int q = 0;
      for (int64_t p = p0; p < p1; ++p) {
        for (int j = 0; j <= d; ++j, ++q) {
          int32_t* row = nbrs + (j * total_points + index_base) * 2;
          const int32_t found = shards[static_cast<size_t>(shard[q])].Find<D>(
              keys.data() + static_cast<int64_t>(q) * d, hashes[q]);
          if (found < 0) {
            row[2 * p + 1] = absent;
          } else {
            const int64_t g = begin[static_cast<size_t>(shard[q])] + found;
            row[2 * p + 1] = static_cast<int32_t>(g) + index_base;
            row[2 * g] = static_cast<int32_t>(p) + index_base;
          }
        }
      }
    }
  });
}


// BlurNeighboursImpl for packed keys: a neighbour's code is the point's plus a constant per
// direction (KeyPacking), and a lookup reads only the slot.
template <bool kSharded>
void BlurNeighboursPackedImpl(const std::vector<PackedKeyTable>& shards,
                              const std::vector<int64_t>& begin, const KeyPacking& packing,
                              int d, int64_t total_points, int32_t index_base, int32_t* nbrs,
                              const Parallel& par) {
  const int64_t m = begin.back();
  const int count_shards = static_cast<int>(shards.size());
  const auto absent = static_cast<int32_t>(total_points);
  MarkBackwardAbsent(d, m, total_points, index_base, nbrs, par);
  // One step forward along direction j adds (d+1) e_j - (1, ..., 1) (j == d: the implied
  // coordinate, no field).
  std::vector<uint64_t> forward(static_cast<size_t>(d) + 1);
  for (int j = 0; j <= d; ++j) {
    forward[static_cast<size_t>(j)] =
        (j < d ? static_cast<uint64_t>(d + 1) * packing.unit(j) : 0) - packing.ones();
  }
  const int per_batch = std::max(1, KeyTable::kMaxBatch / (d + 1));
  par.For(m, 20 * (d + 1), [&](int64_t b, int64_t e) {
    uint64_t hashes[KeyTable::kMaxBatch];
    int shard[KeyTable::kMaxBatch];
    int s = static_cast<int>(std::upper_bound(begin.begin(), begin.end(), b) - begin.begin()) - 1;
    for (int64_t p0 = b; p0 < e; p0 += per_batch) {
      const int64_t p1 = std::min<int64_t>(e, p0 + per_batch);
      int count = 0;
      for (int64_t p = p0; p < p1; ++p) {
        while (p >= begin[static_cast<size_t>(s) + 1]) ++s;
        const uint64_t code = shards[static_cast<size_t>(s)].code(p - begin[static_cast<size_t>(s)]);
        for (int j = 0; j <= d; ++j, ++count) {
          hashes[count] = PackedKeyTable::Hash(code + forward[static_cast<size_t>(j)]);
          shard[count] = kSharded ? KeyTable::Shard(hashes[count], count_shards) : 0;
          shards[static_cast<size_t>(shard[count])].Prefetch(hashes[count]);
        }
      }
      int q = 0;
      for (int64_t p = p0; p < p1; ++p) {
        for (int j = 0; j <= d; ++j, ++q) {
          int32_t* row = nbrs + (j * total_points + index_base) * 2;
          const int32_t found = shards[static_cast<size_t>(shard[q])].Find(hashes[q]);
          if (found < 0) {
            row[2 * p + 1] = absent;
          } else {
            const int64_t g = begin[static_cast<size_t>(shard[q])] + found;
            row[2 * p + 1] = static_cast<int32_t>(g) + index_base;
            row[2 * g] = static_cast<int32_t>(p) + index_base;
          }
        }
      }
    }
  });
}

}  // namespace

void LatticeBuilder::BlurNeighbours(int64_t total_points, int32_t index_base, int32_t* nbrs,
                                    const Parallel& par) const {
  if (num_points() == 0) return;
  if (packed_) {
    (packed_shards_.size() > 1 ? BlurNeighboursPackedImpl<true> : BlurNeighboursPackedImpl<false>)(
        packed_shards_, shard_begin_, packing_, d_, total_points, index_base, nbrs, par);
    return;
  }
  const bool sharded = shards_.size() > 1;
  switch (d_) {
#define CRF3D_BLUR_CASE(D)                                                                     \
  case D:                                                                                      \
    (sharded ? BlurNeighboursImpl<D, true> : BlurNeighboursImpl<D, false>)(                    \
        shards_, shard_begin_, d_, total_points, index_base, nbrs, par);                       \
    return;
    CRF3D_BLUR_CASE(2)
    CRF3D_BLUR_CASE(3)
    CRF3D_BLUR_CASE(4)
    CRF3D_BLUR_CASE(5)
    CRF3D_BLUR_CASE(6)
    CRF3D_BLUR_CASE(7)
    CRF3D_BLUR_CASE(8)
#undef CRF3D_BLUR_CASE
    default:
      (sharded ? BlurNeighboursImpl<0, true> : BlurNeighboursImpl<0, false>)(
          shards_, shard_begin_, d_, total_points, index_base, nbrs, par);
  }
}

void BuildSplatCsr(const int32_t* vertex_index, const float* vertex_weight, int64_t num_voxels,
                   int d, int64_t num_points, int32_t* offsets, int32_t* voxels, float* weights,
                   const Parallel& par) {
  // A counting sort in parts: part t counts the entries of its contiguous range of voxels per
  // point, the offsets give each (point, part) its place, then each part writes its entries in
  // order. Every list comes out in increasing entry order whatever the number of parts, with no
  // atomics and no sort. The lists hold each entry's voxel and weight, so that the splat reads
  // them in order instead of gathering weights from the voxel-ordered arrays.
  const int64_t d1 = d + 1;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(par.num_threads()), int64_t{kMaxSplatParts},
                            num_voxels / kMinVoxelsPerSplatPart}));
  auto part_begin = [&](int64_t t) { return num_voxels * t / parts; };
  // Each part zeroes its own cursors (a serial zeroing would be parts * M stores on one thread).
  std::unique_ptr<int32_t[]> cursor_storage(new int32_t[static_cast<size_t>(parts * num_points)]);
  int32_t* const cursor = cursor_storage.get();
  par.For(parts, 4 * d1 * (num_voxels / parts + 1), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* count = cursor + t * num_points;
      std::fill(count, count + num_points, 0);
      for (int64_t i = part_begin(t) * d1; i < part_begin(t + 1) * d1; ++i) ++count[vertex_index[i]];
    }
  });
  // The offsets, a prefix sum over (point, part), in blocks of points: each block's total in
  // parallel, a serial prefix over the few block totals, then each block its own prefix.
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(4 * static_cast<int64_t>(par.num_threads()), num_points / 4096));
  auto block_begin = [&](int64_t k) { return num_points * k / blocks; };
  std::vector<int64_t> block_start(static_cast<size_t>(blocks) + 1, 0);
  par.For(blocks, 2 * parts * (num_points / blocks + 1), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int64_t total = 0;
      for (int64_t p = block_begin(k); p < block_begin(k + 1); ++p) {
        for (int64_t t = 0; t < parts; ++t) total += cursor[t * num_points + p];
      }
      block_start[static_cast<size_t>(k) + 1] = total;
    }
  });
  for (int64_t k = 0; k < blocks; ++k) block_start[static_cast<size_t>(k) + 1] += block_start[static_cast<size_t>(k)];
  par.For(blocks, 3 * parts * (num_points / blocks + 1), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      auto start = static_cast<int32_t>(block_start[static_cast<size_t>(k)]);
      for (int64_t p = block_begin(k); p < block_begin(k + 1); ++p) {
        offsets[p] = start;
        for (int64_t t = 0; t < parts; ++t) {
          int32_t& c = cursor[t * num_points + p];
          const int32_t count = c;
          c = start;
          start += count;
        }
      }
    }
  });
  offsets[num_points] = static_cast<int32_t>(block_start.back());
  par.For(parts, 8 * d1 * (num_voxels / parts + 1), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* next = cursor + t * num_points;
      for (int64_t i = part_begin(t); i < part_begin(t + 1); ++i) {
        for (int64_t k = 0; k < d1; ++k) {
          const int32_t q = next[vertex_index[i * d1 + k]]++;
          voxels[q] = static_cast<int32_t>(i);
          weights[q] = vertex_weight[i * d1 + k];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// splat, blur, slice
// ---------------------------------------------------------------------------------------------

namespace {

// Each phase below takes kChannels > 0 to fix the channel count at compile time (the fast paths)
// and reads `channels` when kChannels == 0. A phase returns false when it met an index out of
// range (inconsistent lattice arrays); it then leaves the offending entries out.

// Splat: each lattice point gathers the barycentric-weighted values of the voxels of its CSR
// list into its row of `lattice_values` ([M + 1, C]). values == nullptr: the filter of ones
// (the weights alone, no voxel is read; C = 1). Adams et al.'s splatting.
// With `nonfinite` given, each range also sums 0 * every row it wrote (NaN exactly when a row
// holds a NaN or Inf) and sets *nonfinite when that sum is not 0.
template <int kChannels>
bool Splat(const LatticeView& lat, const float* values, int channels, float* lattice_values,
           const Parallel& par, std::atomic<bool>* nonfinite) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int64_t m = lat.num_points;
  const int64_t n_entries = lat.num_voxels * (lat.d + 1);
  const int64_t per_point = m > 0 ? n_entries / m + 1 : 1;
  const auto voxels_u = static_cast<uint64_t>(lat.num_voxels);
  std::atomic<bool> bad{false};
  par.For(m, 4 * per_point * (C + 2), [&](int64_t b, int64_t e) {
    bool ok = true;
    float probe = 0.0f;  // stays 0 unless a row holds a NaN or Inf (and nonfinite is given)
    for (int64_t p = b; p < e; ++p) {
      float* row = lattice_values + p * C;
      for (int64_t c = 0; c < C; ++c) row[c] = 0.0f;
      const int64_t lo = lat.splat_offsets[p];
      const int64_t hi = lat.splat_offsets[p + 1];
      if (lo < 0 || hi < lo || hi > n_entries) {
        ok = false;
        continue;
      }
      if (values == nullptr) {  // a filter of ones: the weights alone, no voxel is read
        for (int64_t q = lo; q < hi; ++q) row[0] += lat.splat_weights[q];
        continue;
      }
      for (int64_t q = lo; q < hi; ++q) {
        const int32_t voxel = lat.splat_voxels[q];
        if (static_cast<uint64_t>(static_cast<int64_t>(voxel)) >= voxels_u) {
          ok = false;
          continue;
        }
        const float w = lat.splat_weights[q];
        const float* v = values + static_cast<int64_t>(voxel) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += w * v[c];
      }
      if (nonfinite != nullptr) {
        for (int64_t c = 0; c < C; ++c) probe += 0.0f * row[c];
      }
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
    if (probe != 0.0f) nonfinite->store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

// The splat without lists (LatticeView without splat_offsets): part t of SplatParts adds the
// entries of its contiguous range of voxels, in order, into sums[t] ([M + 1, C]; part 0's sums
// are `lattice_values` itself), then each point adds the parts' rows in part order. Same
// result as Splat up to the order of the additions; the same nonfinite probe.
template <int kChannels>
bool SplatSums(const LatticeView& lat, const float* values, int channels, float* lattice_values,
               float* part_sums, const Parallel& par, std::atomic<bool>* nonfinite) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int64_t m = lat.num_points;
  const int64_t n = lat.num_voxels;
  const int d1 = lat.d + 1;
  const int64_t parts = SplatParts(n, lat.d, m);
  auto sums = [&](int64_t t) { return t == 0 ? lattice_values : part_sums + (t - 1) * m * C; };
  std::atomic<bool> bad{false};
  par.For(parts, (m * C + (n / parts + 1) * d1 * (2 * C + 4)), [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t t = b; t < e; ++t) {
      float* acc = sums(t);
      std::fill(acc, acc + m * C, 0.0f);
      const int64_t lo = n * t / parts, hi = n * (t + 1) / parts;
      for (int64_t i = lo; i < hi; ++i) {
        const float* v = values == nullptr ? nullptr : values + i * C;
        ok = SplatVoxel<kChannels>(lat, i, v, channels, acc) && ok;
      }
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  if (bad.load()) return false;
  par.For(m, 2 * C * parts + 4, [&](int64_t b, int64_t e) {
    float probe = 0.0f;
    for (int64_t p = b; p < e; ++p) {
      float* row = lattice_values + p * C;
      for (int64_t t = 1; t < parts; ++t) {
        const float* add = sums(t) + p * C;
        for (int64_t c = 0; c < C; ++c) row[c] += add[c];
      }
      if (nonfinite != nullptr) {
        for (int64_t c = 0; c < C; ++c) probe += 0.0f * row[c];
      }
    }
    if (probe != 0.0f) nonfinite->store(true, std::memory_order_relaxed);
  });
  return true;
}

// Blur along lattice direction j: dst[p] = src[p] + (src[p - u_j] + src[p + u_j]) / 2, the
// [1/2, 1, 1/2] stencil between a point and its two neighbours along u_j = (d+1) e_j - 1
// (row M, always zero, stands for an absent neighbour). Adams et al.'s blurring.
template <int kChannels>
bool BlurDirection(const LatticeView& lat, int j, int channels, const float* src, float* dst,
                   const Parallel& par) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int64_t m = lat.num_points;
  const auto m_u = static_cast<uint64_t>(m);
  const int32_t* nb = lat.blur_neighbours + static_cast<int64_t>(j) * m * 2;
  std::atomic<bool> bad{false};
  par.For(m, 6 * C + 8, [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t p = b; p < e; ++p) {
      int64_t n1 = nb[2 * p];
      int64_t n2 = nb[2 * p + 1];
      if (static_cast<uint64_t>(n1) > m_u || static_cast<uint64_t>(n2) > m_u) {
        ok = false;
        n1 = n2 = m;
      }
      const float* a = src + p * C;
      const float* x = src + n1 * C;
      const float* y = src + n2 * C;
      float* out = dst + p * C;
      for (int64_t c = 0; c < C; ++c) out[c] = a[c] + 0.5f * (x[c] + y[c]);
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

// Slice: each voxel reads back its d+1 lattice points with its barycentric weights, times
// alpha = 1 / (1 + 2^-d) (Krahenbuhl's normalisation). Adams et al.'s slicing.
template <int kChannels>
bool Slice(const LatticeView& lat, const float* lattice_values, int channels, float* out,
           const Parallel& par) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int d1 = lat.d + 1;
  const float alpha = SliceAlpha(lat.d);
  std::atomic<bool> bad{false};
  par.For(lat.num_voxels, d1 * (3 * C + 4), [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t i = b; i < e; ++i) {
      ok = SliceVoxel<kChannels>(lat, i, lattice_values, channels, alpha, out + i * C) && ok;
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

// The whole filter, S^T (B_d ... B_0)^k S (or, reversed, S^T (B_0 ... B_d)^k S), k =
// lat.blur_passes: splat into one half of
// the scratch, blur back and forth between the halves, slice from the last one written.
// With first_nonfinite given, values holding a NaN or Inf stop the filter after the splat
// (*first_nonfinite >= 0; see Filter).
template <int kChannels>
bool FilterImpl(const LatticeView& lat, const float* values, int channels, bool reverse,
                float* out, float* scratch, const Parallel& par, int64_t* first_nonfinite) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int d1 = lat.d + 1;
  const int64_t m = lat.num_points;
  float* cur = scratch;
  float* next = scratch + (m + 1) * C;
  // Row m of both buffers is the absent neighbour: always zero.
  for (int64_t c = 0; c < C; ++c) cur[m * C + c] = next[m * C + c] = 0.0f;
  std::atomic<bool> nonfinite{false};
  const bool check = first_nonfinite != nullptr && values != nullptr;
  std::atomic<bool>* probe = check ? &nonfinite : nullptr;
  bool ok = lat.splat_offsets != nullptr
                ? Splat<kChannels>(lat, values, channels, cur, par, probe)
                : SplatSums<kChannels>(lat, values, channels, cur, scratch + 2 * (m + 1) * C, par,
                                       probe);
  if (check) {
    *first_nonfinite = nonfinite.load() ? FirstNonFinite(values, lat.num_voxels * C) : -1;
    if (*first_nonfinite >= 0) return ok;
  }
  for (int pass = 0; pass < lat.blur_passes; ++pass) {
    for (int s = 0; s < d1; ++s) {
      ok = BlurDirection<kChannels>(lat, reverse ? d1 - 1 - s : s, channels, cur, next, par) && ok;
      std::swap(cur, next);
    }
  }
  return Slice<kChannels>(lat, cur, channels, out, par) && ok;
}

}  // namespace

float SliceAlpha(int d) { return Embedding(d).alpha(); }

Status BlurPartSums(const LatticeView& lat, int channels, const float* part_sums, float* scratch,
                    const float** blurred, const Parallel& par) {
  *blurred = nullptr;
  if (lat.splat_offsets != nullptr) {
    return Status::Invalid("lattice: BlurPartSums is the splat without lists; this lattice has them");
  }
  if (lat.blur_passes < 1) return Status::Invalid("lattice: blur_passes must be >= 1");
  const int64_t C = channels;
  const int64_t m = lat.num_points;
  const int64_t parts = SplatParts(lat.num_voxels, lat.d, m);
  float* cur = scratch;
  float* next = scratch + (m + 1) * C;
  // Row m of both buffers is the absent neighbour: always zero.
  for (int64_t c = 0; c < C; ++c) cur[m * C + c] = next[m * C + c] = 0.0f;
  // Part 0's sums, then the others added in part order: SplatSums's additions, in its order.
  par.For(m, 2 * C * parts + 4, [&](int64_t b, int64_t e) {
    std::copy(part_sums + b * C, part_sums + e * C, cur + b * C);
    for (int64_t p = b; p < e; ++p) {
      float* row = cur + p * C;
      for (int64_t t = 1; t < parts; ++t) {
        const float* add = part_sums + t * m * C + p * C;
        for (int64_t c = 0; c < C; ++c) row[c] += add[c];
      }
    }
  });
  bool ok = true;
  const int d1 = lat.d + 1;
  for (int pass = 0; pass < lat.blur_passes; ++pass) {
    for (int s = 0; s < d1; ++s) {
      switch (channels) {
        case 2: ok = BlurDirection<2>(lat, s, channels, cur, next, par) && ok; break;
        case 3: ok = BlurDirection<3>(lat, s, channels, cur, next, par) && ok; break;
        case 4: ok = BlurDirection<4>(lat, s, channels, cur, next, par) && ok; break;
        case 5: ok = BlurDirection<5>(lat, s, channels, cur, next, par) && ok; break;
        case 8: ok = BlurDirection<8>(lat, s, channels, cur, next, par) && ok; break;
        default: ok = BlurDirection<0>(lat, s, channels, cur, next, par) && ok; break;
      }
      std::swap(cur, next);
    }
  }
  if (!ok) {
    return Status::Invalid(
        "lattice: an index in blur_neighbours is out of range; pass the tensors of one lattice "
        "build unchanged");
  }
  *blurred = cur;
  return Status::Ok();
}

Status Filter(const LatticeView& lat, const float* values, int channels, bool reverse,
              float* out, float* scratch, const Parallel& par, int64_t* first_nonfinite) {
  if (first_nonfinite != nullptr) *first_nonfinite = -1;
  if (values == nullptr && channels != 1) {
    return Status::Invalid("lattice: a filter of ones (no values) has one channel");
  }
  if (lat.blur_passes < 1) return Status::Invalid("lattice: blur_passes must be >= 1");
  if ((lat.splat_offsets == nullptr) != (lat.splat_voxels == nullptr) ||
      (lat.splat_offsets == nullptr) != (lat.splat_weights == nullptr)) {
    return Status::Invalid(
        "lattice: splat_offsets, splat_voxels and splat_weights must all be given or all be "
        "empty; pass the tensors of one lattice build unchanged");
  }
  if (lat.splat_offsets != nullptr && lat.num_points > 0 &&
      (lat.splat_offsets[0] != 0 ||
       lat.splat_offsets[lat.num_points] != lat.num_voxels * (lat.d + 1))) {
    return Status::Invalid(
        "lattice: splat_offsets must start at 0 and end at the number of vertex entries; pass "
        "the tensors of one lattice build unchanged");
  }
  int64_t* const nf = first_nonfinite;
  bool ok = false;
  switch (channels) {
    case 1: ok = FilterImpl<1>(lat, values, channels, reverse, out, scratch, par, nf); break;
    case 2: ok = FilterImpl<2>(lat, values, channels, reverse, out, scratch, par, nf); break;
    case 3: ok = FilterImpl<3>(lat, values, channels, reverse, out, scratch, par, nf); break;
    case 4: ok = FilterImpl<4>(lat, values, channels, reverse, out, scratch, par, nf); break;
    case 5: ok = FilterImpl<5>(lat, values, channels, reverse, out, scratch, par, nf); break;
    case 8: ok = FilterImpl<8>(lat, values, channels, reverse, out, scratch, par, nf); break;
    default: ok = FilterImpl<0>(lat, values, channels, reverse, out, scratch, par, nf); break;
  }
  if (!ok) {
    return Status::Invalid(
        "lattice: an index in vertex_index, blur_neighbours or splat_voxels is out of range; "
        "pass the tensors of one lattice build unchanged");
  }
  if (first_nonfinite != nullptr && *first_nonfinite >= 0) {
    std::ostringstream m;
    m << "lattice: values contains NaN or Inf (flat index " << *first_nonfinite << ")";
    return Status::Invalid(m.str());
  }
  return Status::Ok();
}

}  // namespace crf3d

// The permutohedral lattice (Adams, Baek & Davis 2010) for high-dimensional Gaussian filtering:
// one framework-free description shared by every binding (the TensorFlow op today).
//
// A lattice is built once from N feature vectors f_i in R^d (positions and intensities already
// divided by their kernel widths) and then applied to any number of value arrays v [N, C]:
//
//   embed   each f_i is lifted onto the hyperplane H_d of R^{d+1} and located in its enclosing
//           simplex: d+1 lattice points (vertex_index) and barycentric weights (vertex_weight)
//           (Embedding::Embed; LatticeBuilder::Build numbers the points with a hash table,
//           LatticeBuilder::BlurNeighbours and BuildSplatCsr write the lists the filter reads);
//   splat   each lattice point gathers the weighted values of the voxels around it (Splat);
//   blur    a [1/2, 1, 1/2] stencil runs along each of the d+1 lattice directions in turn
//           (BlurDirection);
//   slice   each voxel reads back the weighted values of its d+1 lattice points (Slice).
// Filter runs splat, blur and slice, the three steps of Adams et al.'s filtering. The accuracy
// setting blur_passes = k (Embedding, LatticeView) repeats the sweep of blurs k times on a lattice
// finer by sqrt((3k + 1) / 4): the same Gaussian, a smaller approximation error, more points.
//
// The result approximates alpha_d * c * sum_j exp(-|f_i - f_j|^2 / 2) v_j with alpha_d =
// 1 / (1 + 2^-d) (Krahenbuhl's normalisation) and a scale c that depends on how densely the
// features sample the lattice: callers normalise by the filter of ones. The self term (j = i)
// is included. The operator is S^T B_d ... B_0 S; each B_k is symmetric, so the adjoint is the
// same filter with the blur directions in reverse order.
//
// Everything a filter call needs is in plain arrays (LatticeView), so the lattice can live in
// ordinary framework tensors: no hidden state between calls.
#ifndef CRF3D_PERMUTOHEDRAL_H_
#define CRF3D_PERMUTOHEDRAL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"

namespace crf3d {

struct Status {
  enum class Code { kOk, kInvalidArgument, kResourceExhausted };
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
  static Status Ok() { return {}; }
  static Status Invalid(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status Exhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
};

// Flat index of the first NaN or Inf among x[0], ..., x[n-1], or -1 when every value is finite.
// A serial scan: the filters call it only after their own pass has seen a non-finite value, to
// say where it is.
template <typename T>
int64_t FirstNonFinite(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return i;
  }
  return -1;
}

// Constants of the d-dimensional embedding, derived once per lattice.
class Embedding {
 public:
  // blur_passes k >= 1: the filter blurs along every direction k times (Filter), and the
  // embedding spans sqrt(k / 2 + 1 / 6) (d+1) lattice units per feature unit instead of
  // sqrt(2/3) (d+1), so that the whole filter keeps the same unit-variance Gaussian on a lattice
  // finer by sqrt((3k + 1) / 4) (derivation at the constructor; docs/lattice_op.md, "Accuracy
  // setting"). k = 1 is Adams et al.'s lattice, bit for bit.
  explicit Embedding(int d, int blur_passes = 1);
  int dim() const { return d_; }
  // Locates feature vector f (length d) in the lattice: writes the remainder-0 vertex rem0
  // (d+1 coordinates), the rank of each coordinate (d+1) and the barycentric weights of the
  // d+1 enclosing vertices (d+2 floats of scratch, the first d+1 meaningful). elevated is
  // scratch of d+1 floats.
  void Embed(const float* f, float* elevated, int32_t* rem0, int32_t* rank, float* bary) const;
  // Key (d coordinates; the last one is implied by the zero sum) of vertex k in 0..d of the
  // simplex described by rem0 and rank, in d dimensions (static, so that a caller that knows d
  // at compile time gets the loop unrolled).
  static void VertexKey(int d, const int32_t* rem0, const int32_t* rank, int k, int32_t* key) {
    for (int i = 0; i < d; ++i) key[i] = rem0[i] + (rank[i] <= d - k ? k : k - (d + 1));
  }
  // Widest span (max - min) of one feature channel for which the lattice coordinates stay
  // exact in single precision.
  double max_feature_span() const;
  // The slice normalisation 1 / (1 + 2^-d).
  float alpha() const { return alpha_; }
  // Per feature channel: the embedding scale (d floats).
  const float* scale() const { return scale_.data(); }

 private:
  int d_;
  std::vector<float> scale_;  // per feature channel: embedding scale (incl. the blur's std)
  float alpha_;
};

// Open-addressing hash table (linear probing, load <= 1/2) from lattice keys (d int32
// coordinates) to dense indices 0..size()-1, in order of first insertion. A slot holds the
// upper half of the key's hash beside its index, so most mismatches never touch the keys.
class KeyTable {
 public:
  // Most keys a batched lookup takes at once: enough lookups in flight to overlap their cache misses
  // (the prefetches of a batch are issued before its first comparison), few enough that the
  // batch's keys and hashes stay in L1.
  static constexpr int kMaxBatch = 128;
  // Slots of a new table (a power of two); it doubles whenever it is half full.
  static constexpr size_t kInitialSlots = 64;

  explicit KeyTable(int d, int64_t max_points);
  // A key's hash is Mix(sum_i key[i] * coefficient(i)): the sum is linear in the key, so the
  // hashes of a simplex's vertices and of a point's blur neighbours follow from one another by
  // an addition (see EmbedRange and BlurNeighbours) instead of a pass over d coordinates each.
  uint64_t coefficient(int i) const { return coefficients_[static_cast<size_t>(i)]; }
  // The sum of the d coefficients: the hash change of adding (1, ..., 1) to a key.
  uint64_t coefficient_sum() const { return coefficient_sum_; }
  uint64_t Linear(const int32_t* key) const;
  static uint64_t Mix(uint64_t linear) {
    linear ^= linear >> 33;
    linear *= 0xFF51AFD7ED558CCDull;
    linear ^= linear >> 33;
    linear *= 0xC4CEB9FE1A85EC53ull;
    return linear ^ (linear >> 33);
  }
  uint64_t Hash(const int32_t* key) const { return Mix(Linear(key)); }
  // Starts loading the home slot of hash h (a hint that overlaps cache misses).
  void Prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & mask_]); }
  // Index of key (whose hash is h), inserted if absent; -1 when that would exceed max_points.
  // D > 0 fixes the key length d at compile time (D == d; the comparison then unrolls), D == 0
  // reads it from the table.
  template <int D = 0>
  int32_t FindOrInsert(const int32_t* key, uint64_t h) {
    uint64_t s = h & mask_;
    for (uint64_t e = slots_[s]; e != 0; e = slots_[s]) {
      if (SameTag(e, h) && Equal<D>(Index(e), key)) return Index(e);
      s = (s + 1) & mask_;
    }
    return Insert(key, h, s);
  }
  // Index of key (whose hash is h), or -1 if absent. Safe to call concurrently once insertion
  // is over.
  template <int D = 0>
  int32_t Find(const int32_t* key, uint64_t h) const {
    uint64_t s = h & mask_;
    for (uint64_t e = slots_[s]; e != 0; e = slots_[s]) {
      if (SameTag(e, h) && Equal<D>(Index(e), key)) return Index(e);
      s = (s + 1) & mask_;
    }
    return -1;
  }
  int64_t size() const { return size_; }
  const int32_t* key(int64_t i) const { return keys_.data() + i * d_; }
  void Reserve(int64_t points);
  // Starts loading the key that the home slot of hash h points at (the second prefetch of a
  // batched lookup, after Prefetch(h) has brought the slot in).
  void PrefetchKey(uint64_t h) const {
    const uint64_t e = slots_[h & mask_];
    if (e != 0) __builtin_prefetch(keys_.data() + static_cast<int64_t>(Index(e)) * d_);
  }
  // Frees the slots and keeps the keys: key(i) and size() still answer, lookups no longer do.
  void ReleaseSlots() {
    std::vector<uint64_t>().swap(slots_);
    mask_ = 0;
  }
  // Which of `shards` hash-sharded tables holds a key of hash h: the upper 32 bits (the slot
  // tag) scaled to [0, shards). The slot index within a table comes from the low bits, so the
  // two stay independent.
  static int Shard(uint64_t h, int shards) {
    return static_cast<int>(((h >> 32) * static_cast<uint64_t>(shards)) >> 32);
  }

 private:
  static uint64_t Entry(uint64_t h, int32_t index) {
    return (h & 0xFFFFFFFF00000000ull) | (static_cast<uint64_t>(index) + 1);
  }
  static int32_t Index(uint64_t entry) { return static_cast<int32_t>((entry & 0xFFFFFFFFull) - 1); }
  static bool SameTag(uint64_t entry, uint64_t h) { return (entry ^ h) >> 32 == 0; }
  template <int D>
  bool Equal(int32_t index, const int32_t* key) const {
    const int d = D > 0 ? D : d_;
    const int32_t* k = keys_.data() + static_cast<int64_t>(index) * d;
    // Differences ORed together: no early exit, so that a fixed D compiles to straight-line
    // code (a tag match is almost always a key match).
    int32_t diff = 0;
    for (int i = 0; i < d; ++i) diff |= k[i] ^ key[i];
    return diff == 0;
  }
  // Appends key as a new point in empty slot s; -1 when the table is at max_points.
  int32_t Insert(const int32_t* key, uint64_t h, uint64_t s);
  void Rehash(size_t capacity);
  int d_;
  int64_t max_points_;
  std::vector<uint64_t> coefficients_;  // odd, one per key coordinate
  uint64_t coefficient_sum_ = 0;
  int64_t size_ = 0;
  std::vector<int32_t> keys_;
  std::vector<uint64_t> slots_;  // power-of-two capacity; 0 marks an empty slot
  uint64_t mask_ = 0;
};

// The build's narrow key form: the d stored coordinates of a lattice key packed into one 64-bit
// code, coordinate i in a field of its own (its value minus base_i, shifted left by shift_i). The
// fields are sized from the features' ranges (Fit), with room for every vertex key of the lattice
// and for every blur neighbour (one step along u_j moves a coordinate by -1 or +d), so that
//   - the code is one-to-one on that box, and
//   - code(key + delta) = code(key) + sum_i delta_i 2^shift_i (modulo 2^64, exactly): a vertex's
//     or neighbour's code follows from another's by one addition, as the wide hash's linear
//     sum does.
// Keys whose fields would take more than 64 bits in all use the wide form (KeyTable).
class KeyPacking {
 public:
  // Fields for stored coordinates i < d whose remainder-0 points lie in [rem0_lo[i],
  // rem0_hi[i]] (so their vertex keys in [rem0_lo[i] - d, rem0_hi[i] + d]); false, leaving the
  // packing unusable, when the fields need more than max_bits bits together.
  bool Fit(int d, const int64_t* rem0_lo, const int64_t* rem0_hi, int max_bits = 64);
  int bits() const { return bits_; }
  // Whether the simplex of this remainder-0 point (d+1 coordinates, the first d stored) has all
  // its vertex keys inside the fields (D > 0: d fixed at compile time).
  template <int D = 0>
  bool InRange(const int32_t* rem0) const {
    const int d = D > 0 ? D : d_;
    bool inside = true;
    for (int i = 0; i < d; ++i) {
      inside &= rem0[i] >= rem0_lo_[static_cast<size_t>(i)];
      inside &= rem0[i] <= rem0_hi_[static_cast<size_t>(i)];
    }
    return inside;
  }
  // The code of a key (d coordinates) inside the fields.
  template <int D = 0>
  uint64_t Pack(const int32_t* key) const {
    const int d = D > 0 ? D : d_;
    uint64_t code = 0;
    for (int i = 0; i < d; ++i) {
      code += static_cast<uint64_t>(static_cast<int64_t>(key[i]) - base_[static_cast<size_t>(i)])
              << shift_[static_cast<size_t>(i)];
    }
    return code;
  }
  // The code change of adding 1 to stored coordinate i (i < d), and of adding (1, ..., 1).
  uint64_t unit(int i) const { return uint64_t{1} << shift_[static_cast<size_t>(i)]; }
  uint64_t ones() const { return ones_; }

 private:
  int d_ = 0;
  int bits_ = 0;
  std::vector<int64_t> base_;  // a field holds coordinate - base (>= 0)
  std::vector<int> shift_;
  std::vector<int32_t> rem0_lo_, rem0_hi_;
  uint64_t ones_ = 0;
};

// Open-addressing hash table (linear probing, load <= 1/2) from packed keys (KeyPacking) to dense
// indices 0..size()-1, in order of first insertion. The hash KeyTable::Mix is a bijection of 64-bit
// words, so equal hashes mean equal codes: a slot holds the hash beside the index and a lookup
// reads no key (one cache miss where KeyTable's takes two: the slot, then the key).
class PackedKeyTable {
 public:
  explicit PackedKeyTable(int64_t max_points);
  static uint64_t Hash(uint64_t code) { return KeyTable::Mix(code); }
  void Prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & mask_]); }
  // Index of the key with this code (h = Hash(code)), inserted if absent; -1 when that would
  // exceed max_points.
  int32_t FindOrInsert(uint64_t code, uint64_t h) {
    uint64_t s = h & mask_;
    for (;;) {
      const Slot& e = slots_[s];
      if (e.index == 0) return Insert(code, h, s);
      if (e.hash == h) return static_cast<int32_t>(e.index - 1);
      s = (s + 1) & mask_;
    }
  }
  // Index of the key of hash h, or -1 if absent. Safe to call concurrently once insertion is
  // over.
  int32_t Find(uint64_t h) const {
    uint64_t s = h & mask_;
    for (;;) {
      const Slot& e = slots_[s];
      if (e.index == 0) return -1;
      if (e.hash == h) return static_cast<int32_t>(e.index - 1);
      s = (s + 1) & mask_;
    }
  }
  int64_t size() const { return static_cast<int64_t>(codes_.size()); }
  uint64_t code(int64_t i) const { return codes_[static_cast<size_t>(i)]; }
  void Reserve(int64_t points);
  // Frees the slots and keeps the codes: code(i) and size() still answer, lookups no longer do.
  void ReleaseSlots() {
    std::vector<Slot>().swap(slots_);
    mask_ = 0;
  }

 private:
  struct Slot {
    uint64_t hash;
    uint32_t index;  // point index + 1; 0 marks an empty slot
    uint32_t unused;
  };
  int32_t Insert(uint64_t code, uint64_t h, uint64_t s);
  void Rehash(size_t capacity);
  int64_t max_points_;
  std::vector<uint64_t> codes_;
  std::vector<Slot> slots_;  // power-of-two capacity
  uint64_t mask_ = 0;
};

// The lattice of one batch item.
class LatticeBuilder {
 public:
  // features: [n, d] row-major, finite. Writes vertex_index [n, d+1] (indices local to this
  // lattice, offset by index_base) and vertex_weight [n, d+1]. Fails with kResourceExhausted
  // when the lattice would exceed max_points, and with kInvalidArgument for non-finite or too
  // widely spread features (channel names in messages are 0-based).
  // blur_passes: the Embedding's (the filters of this lattice must run as many passes).
  Status Build(const float* features, int64_t n, int d, int64_t max_points, int32_t index_base,
               int32_t* vertex_index, float* vertex_weight, const Parallel& par,
               int blur_passes = 1);
  int64_t num_points() const { return shard_begin_.empty() ? 0 : shard_begin_.back(); }
  // Fills rows [index_base, index_base + num_points()) of each direction's block of the blur
  // neighbour table nbrs [d+1, total_points, 2] (the - and + neighbour); an absent neighbour is
  // written as total_points, the index of an always-zero row.
  void BlurNeighbours(int64_t total_points, int32_t index_base, int32_t* nbrs,
                      const Parallel& par) const;
  // Whether the last Build packed its keys into 64-bit codes (KeyPacking) or used the wide form.
  bool packed_keys() const { return packed_; }
  // Most bits the packed keys may take (64, the default); 0 forces the wide form (for tests that
  // compare the two).
  void set_max_packed_bits(int bits) { max_packed_bits_ = bits; }
  // For tests of the fallback: narrows the packing's remainder-0 bounds by `inset` on each side,
  // so that simplices fall outside it and the build reruns with the wide keys.
  void set_packed_bounds_inset(int64_t inset) { packed_bounds_inset_ = inset; }

 private:
  template <class Table>
  Status EmbedAndHash(const float* features, int64_t n, const Embedding& emb,
                      const std::vector<float>& lo, int64_t max_points, int32_t index_base,
                      int32_t* vertex_index, float* vertex_weight, const Parallel& par,
                      std::vector<Table>& shards, bool* out_of_range);
  int d_ = 0;
  int max_packed_bits_ = 64;
  int64_t packed_bounds_inset_ = 0;
  bool packed_ = false;
  KeyPacking packing_;
  // The lattice points with packed keys, sharded as shards_ below (used when packed_).
  std::vector<PackedKeyTable> packed_shards_;
  // The lattice points, sharded by hash (KeyTable::Shard): one table when the build ran as one
  // chunk, one per chunk otherwise (merged in parallel, a shard per thread). Point i of shard s
  // is point shard_begin_[s] + i of the lattice.
  std::vector<KeyTable> shards_;
  std::vector<int64_t> shard_begin_;  // shards_.size() + 1 entries
};

// Most parts of BuildSplatCsr's counting sort, whatever the thread count: each part keeps a
// cursor per lattice point (4 bytes), which the op's memory budget counts per point. Also the
// most parts of a splat without lists (SplatParts).
constexpr int kMaxSplatParts = 16;
// A part of the splat lists' counting sort counts per lattice point, so each part costs M
// cursors; parts of fewer voxels than this do not pay for theirs. The splat without lists cuts
// its parts by the same number.
constexpr int64_t kMinVoxelsPerSplatPart = 8192;
// The splat without lists is taken only if the memory rule below leaves it at least this many
// parts (the parts are what its threads share; below this the lists' gather scales better).
constexpr int64_t kMinSplatPartsWithoutLists = 8;

// The splat has two forms.
//   With lists (BuildSplatCsr): each lattice point gathers the entries of its CSR list. The
//     lists cost 8 bytes per vertex entry (voxel and weight), as much as vertex_index and
//     vertex_weight themselves.
//   Without lists: the voxels are cut into SplatParts contiguous parts; each part adds its
//     entries, in order, into a [M, C] sum of its own, and the parts' sums are added in part
//     order. This costs (parts - 1) * (M + 1) * C floats of scratch per filter call and
//     nothing per entry, so it is the form of choice when the lattice is much smaller than the
//     entries (a bilateral lattice of wide spatial widths: M is a few percent of the voxels).
// Both sum in a fixed order that does not depend on the thread count.
//
// Parts of the splat without lists: one per kMinVoxelsPerSplatPart voxels, at most
// kMaxSplatParts, and at most as many as keep the parts' sums within the lists' memory for any
// C up to 8: P parts' sums take at most P (M + 1) 8 floats, the lists 2 num_voxels (d + 1)
// words, so P <= num_voxels (d + 1) / (4 (M + 1)). A function of the lattice's sizes alone, not
// of the thread count, so the sums' order is fixed. At least 1.
inline int64_t SplatParts(int64_t num_voxels, int d, int64_t num_points) {
  const int64_t by_memory = num_voxels * (d + 1) / (4 * (num_points + 1));
  return std::max<int64_t>(
      1, std::min<int64_t>({kMaxSplatParts, num_voxels / kMinVoxelsPerSplatPart, by_memory}));
}

// The build lists the entries only when the memory rule leaves the splat without lists fewer
// than kMinSplatPartsWithoutLists parts: 32 (M + 1) > num_voxels (d + 1). (Until issue 14 the
// rule was 64 (M + 1) > num_voxels (d + 1), which kept 16 parts' sums within the lists; with the
// parts fitted to the lattice, a BraTS-sized lattice of 1.4 M points for 8.9 M voxels, F = 7,
// splats without lists in 12 parts.)
inline bool SplatNeedsLists(int64_t num_voxels, int d, int64_t num_points) {
  return num_voxels * (d + 1) / (4 * (num_points + 1)) < kMinSplatPartsWithoutLists;
}

// Transposes the vertex entries (voxel i, vertex k; flat number i * (d+1) + k) into CSR lists
// per lattice point: entries offsets[m] .. offsets[m+1] of voxels / weights are the voxel and
// barycentric weight of each entry that touches lattice point m, in increasing entry order (so
// every splat sums in the same order, whatever the thread count). vertex_index and
// vertex_weight are [num_voxels, d+1], index values in [0, num_points).
void BuildSplatCsr(const int32_t* vertex_index, const float* vertex_weight, int64_t num_voxels,
                   int d, int64_t num_points, int32_t* offsets, int32_t* voxels, float* weights,
                   const Parallel& par);

// A built lattice as the filter reads it; all arrays belong to the caller.
struct LatticeView {
  int64_t num_voxels = 0;                    // B * N
  int d = 0;                                 // feature channels
  int64_t num_points = 0;                    // M, lattice points of all batch items
  const int32_t* vertex_index = nullptr;     // [num_voxels, d+1], values in [0, M)
  const float* vertex_weight = nullptr;      // [num_voxels, d+1]
  const int32_t* blur_neighbours = nullptr;  // [d+1, M, 2], values in [0, M]
  // The splat lists (BuildSplatCsr), or all three null: the splat without lists.
  const int32_t* splat_offsets = nullptr;    // [M+1]
  const int32_t* splat_voxels = nullptr;     // [num_voxels * (d+1)], values in [0, num_voxels)
  const float* splat_weights = nullptr;      // [num_voxels * (d+1)]
  int blur_passes = 1;  // sweeps over the d+1 directions: the lattice's build setting (>= 1)
};

// Floats of scratch that Filter needs for `channels` value channels: two [M+1, C] buffers for
// the blur, and without splat lists the sums of all parts but the first.
inline int64_t FilterScratchSize(const LatticeView& lat, int channels) {
  const int64_t parts =
      lat.splat_offsets == nullptr ? SplatParts(lat.num_voxels, lat.d, lat.num_points) : 1;
  return (1 + parts) * (lat.num_points + 1) * static_cast<int64_t>(channels);
}

// out = K values (reverse = false) or K^T values (reverse = true), K = S^T (B_d ... B_0)^k S with
// k = lat.blur_passes (the adjoint runs (B_0 ... B_d)^k); values and out are
// [num_voxels, channels]. values may be null with channels = 1 for the filter of ones (the
// splat then sums the weights alone). scratch holds FilterScratchSize floats. Fails with
// kInvalidArgument when the lattice arrays are inconsistent (indices out of range).
//
// first_nonfinite (optional): the NaN and Inf check. When it is given, the splat, which reads
// every value, also adds 0 * (each lattice point's sum), which is NaN exactly when some value it
// gathered is NaN or Inf (or the sum overflowed); only then are the values scanned for the
// first non-finite one. If there is one, its flat index goes to *first_nonfinite and Filter
// fails with kInvalidArgument before the blur (out is then not written); otherwise
// *first_nonfinite is -1 and the filter runs as without the check (an overflow of finite
// values is left as it is).
Status Filter(const LatticeView& lat, const float* values, int channels, bool reverse,
              float* out, float* scratch, const Parallel& par,
              int64_t* first_nonfinite = nullptr);

// The filter (reverse = false) of a lattice without splat lists in its three steps, for a
// caller that splats each voxel's values in the pass that computes them and slices in the pass
// that uses the result, instead of writing both to memory and reading them back (an iterative
// solver that filters what it has just computed, step after step). Filter runs the same steps
// with the same arithmetic in the same order, so the result is the same bit for bit:
//   1. splat: for each part t < P = SplatParts(num_voxels, d, M), voxels SplatPartBegin(n, P, t)
//      .. SplatPartBegin(n, P, t + 1): zero the part's [M, C] sums, then add its voxels one by one
//      in increasing order (SplatVoxel);
//   2. BlurPartSums: the parts' sums added in part order, then the blur;
//   3. slice: SliceVoxel per voxel, with alpha = SliceAlpha(d).
inline int64_t SplatPartBegin(int64_t num_voxels, int64_t parts, int64_t part) {
  return num_voxels * part / parts;
}

// The slice's normalisation 1 / (1 + 2^-d) (Embedding::alpha).
float SliceAlpha(int d);

// Four floats in GCC's vector extension (one SSE register): rows of 8 channels are added as two
// such vectors below; each lane computes what the scalar loop would, bit for bit.
typedef float Float4x __attribute__((vector_size(16)));

// Adds voxel i's values v[0..C) (C = kChannels when > 0, else channels), times its barycentric
// weights, into the rows of its d+1 lattice points in sums [M, C]; v == nullptr adds the
// weights alone (C = 1). Returns false, leaving the entry out, for an index out of range.
template <int kChannels>
inline bool SplatVoxel(const LatticeView& lat, int64_t i, const float* v, int channels,
                       float* sums) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int d1 = lat.d + 1;
  const int32_t* index = lat.vertex_index + i * d1;
  const float* weight = lat.vertex_weight + i * d1;
  const auto m_u = static_cast<uint64_t>(lat.num_points);
  bool ok = true;
  for (int k = 0; k < d1; ++k) {
    const int32_t p = index[k];
    if (static_cast<uint64_t>(static_cast<int64_t>(p)) >= m_u) {
      ok = false;
      continue;
    }
    float* row = sums + static_cast<int64_t>(p) * C;
    if constexpr (kChannels == 8) {
      if (v != nullptr) {
        Float4x r0, r1, x0, x1;
        std::memcpy(&r0, row, sizeof(r0));
        std::memcpy(&r1, row + 4, sizeof(r1));
        std::memcpy(&x0, v, sizeof(x0));
        std::memcpy(&x1, v + 4, sizeof(x1));
        r0 += weight[k] * x0;
        r1 += weight[k] * x1;
        std::memcpy(row, &r0, sizeof(r0));
        std::memcpy(row + 4, &r1, sizeof(r1));
        continue;
      }
    }
    if (v == nullptr) {
      row[0] += weight[k];
    } else {
      for (int64_t c = 0; c < C; ++c) row[c] += weight[k] * v[c];
    }
  }
  return ok;
}

// out[0..C) = alpha * sum over voxel i's d+1 vertices of weight * lattice_values[vertex row].
// Returns false, leaving the vertex out, for an index out of range.
template <int kChannels>
inline bool SliceVoxel(const LatticeView& lat, int64_t i, const float* lattice_values,
                       int channels, float alpha, float* out) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int d1 = lat.d + 1;
  const auto m_u = static_cast<uint64_t>(lat.num_points);
  bool ok = true;
  if constexpr (kChannels == 8) {
    Float4x acc0 = {}, acc1 = {};
    for (int k = 0; k < d1; ++k) {
      const int32_t p = lat.vertex_index[i * d1 + k];
      if (static_cast<uint64_t>(static_cast<int64_t>(p)) >= m_u) {
        ok = false;
        continue;
      }
      const float w = alpha * lat.vertex_weight[i * d1 + k];
      const float* src = lattice_values + static_cast<int64_t>(p) * 8;
      Float4x x0, x1;
      std::memcpy(&x0, src, sizeof(x0));
      std::memcpy(&x1, src + 4, sizeof(x1));
      acc0 += w * x0;
      acc1 += w * x1;
    }
    std::memcpy(out, &acc0, sizeof(acc0));
    std::memcpy(out + 4, &acc1, sizeof(acc1));
    return ok;
  }
  for (int64_t c = 0; c < C; ++c) out[c] = 0.0f;
  for (int k = 0; k < d1; ++k) {
    const int32_t p = lat.vertex_index[i * d1 + k];
    if (static_cast<uint64_t>(static_cast<int64_t>(p)) >= m_u) {
      ok = false;
      continue;
    }
    const float w = alpha * lat.vertex_weight[i * d1 + k];
    const float* src = lattice_values + static_cast<int64_t>(p) * C;
    for (int64_t c = 0; c < C; ++c) out[c] += w * src[c];
  }
  return ok;
}

// Floats of scratch BlurPartSums needs for `channels` channels: two [M+1, C] buffers.
inline int64_t BlurPartSumsScratchSize(const LatticeView& lat, int channels) {
  return 2 * (lat.num_points + 1) * static_cast<int64_t>(channels);
}

// Step 2: part_sums holds SplatParts(num_voxels, d, M) blocks of [M, C], part t's at t * M * C.
// Writes the blurred lattice values [M+1, C] into scratch (BlurPartSumsScratchSize floats) and
// sets *blurred to them (one of scratch's two buffers). Fails with kInvalidArgument for a blur
// neighbour out of range, or for a lattice with splat lists.
Status BlurPartSums(const LatticeView& lat, int channels, const float* part_sums, float* scratch,
                    const float** blurred, const Parallel& par);

}  // namespace crf3d

#endif  // CRF3D_PERMUTOHEDRAL_H_

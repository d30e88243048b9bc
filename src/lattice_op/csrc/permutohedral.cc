// The permutohedral lattice core; see permutohedral.h for the algorithm and its conventions.
#include "permutohedral.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <sstream>
#include <utility>

namespace crf3d {

// ---------------------------------------------------------------------------------------------
// embed
// ---------------------------------------------------------------------------------------------

Embedding::Embedding(int d) : d_(d), scale_(static_cast<size_t>(d)) {
  // Features are lifted onto H_d with the basis of Adams et al.; the extra factor makes one
  // [1/2, 1, 1/2] blur along each of the d+1 lattice directions a Gaussian of unit standard
  // deviation in feature space.
  const double inv_std = std::sqrt(2.0 / 3.0) * (d + 1);
  for (int i = 0; i < d; ++i) {
    scale_[static_cast<size_t>(i)] = static_cast<float>(inv_std / std::sqrt((i + 1.0) * (i + 2.0)));
  }
  alpha_ = static_cast<float>(1.0 / (1.0 + std::pow(2.0, -d)));
}

double Embedding::max_feature_span() const {
  // |elevated| <= 2 * span * sum(scale); keep it below 2^20 so that single precision still
  // resolves an eighth of a lattice unit.
  double sum = 0.0;
  for (float s : scale_) sum += s;
  return std::ldexp(1.0, 20) / (2.0 * sum);
}

void Embedding::Embed(const float* f, float* elevated, int32_t* rem0, int32_t* rank,
                      float* bary) const {
  const int d = d_;
  // Lift onto the hyperplane sum(x) = 0 of R^{d+1}.
  float running = 0.0f;
  for (int j = d; j > 0; --j) {
    const float cf = f[j - 1] * scale_[static_cast<size_t>(j - 1)];
    elevated[j] = running - static_cast<float>(j) * cf;
    running += cf;
  }
  elevated[0] = running;

  // Nearest point of the remainder-0 sublattice (coordinates that are multiples of d+1).
  const float down = 1.0f / static_cast<float>(d + 1);
  int32_t sum = 0;
  for (int i = 0; i <= d; ++i) {
    const float v = elevated[i] * down;
    const float up = std::ceil(v) * static_cast<float>(d + 1);
    const float lo = std::floor(v) * static_cast<float>(d + 1);
    rem0[i] = static_cast<int32_t>((up - elevated[i] < elevated[i] - lo) ? up : lo);
    sum += rem0[i];
  }
  sum /= (d + 1);

  // Rank the differential; it orders the simplex's vertices.
  for (int i = 0; i <= d; ++i) rank[i] = 0;
  for (int i = 0; i < d; ++i) {
    const float di = elevated[i] - static_cast<float>(rem0[i]);
    for (int j = i + 1; j <= d; ++j) {
      if (di < elevated[j] - static_cast<float>(rem0[j])) {
        ++rank[i];
      } else {
        ++rank[j];
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

// ---------------------------------------------------------------------------------------------
// hash table of lattice points
// ---------------------------------------------------------------------------------------------

KeyTable::KeyTable(int d, int64_t max_points) : d_(d), max_points_(max_points) { Rehash(64); }

uint64_t KeyTable::Hash(const int32_t* key) const {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < d_; ++i) {
    h ^= static_cast<uint32_t>(key[i]);
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  return h;
}

bool KeyTable::Equal(int32_t index, const int32_t* key) const {
  const int32_t* k = keys_.data() + static_cast<int64_t>(index) * d_;
  for (int i = 0; i < d_; ++i) {
    if (k[i] != key[i]) return false;
  }
  return true;
}

void KeyTable::Rehash(size_t capacity) {
  slots_.assign(capacity, -1);
  mask_ = capacity - 1;
  for (size_t p = 0; p < hashes_.size(); ++p) {
    uint64_t s = hashes_[p] & mask_;
    while (slots_[s] >= 0) s = (s + 1) & mask_;
    slots_[s] = static_cast<int32_t>(p);
  }
}

void KeyTable::Reserve(int64_t points) {
  keys_.reserve(static_cast<size_t>(points * d_));
  hashes_.reserve(static_cast<size_t>(points));
  size_t capacity = slots_.size();
  while (capacity < static_cast<size_t>(2 * points)) capacity *= 2;
  if (capacity != slots_.size()) Rehash(capacity);
}

int32_t KeyTable::FindOrInsert(const int32_t* key) {
  const uint64_t h = Hash(key);
  uint64_t s = h & mask_;
  while (slots_[s] >= 0) {
    const int32_t p = slots_[s];
    if (hashes_[static_cast<size_t>(p)] == h && Equal(p, key)) return p;
    s = (s + 1) & mask_;
  }
  if (size() >= max_points_) return -1;
  const auto p = static_cast<int32_t>(size());
  keys_.insert(keys_.end(), key, key + d_);
  hashes_.push_back(h);
  slots_[s] = p;
  if (2 * hashes_.size() > slots_.size()) Rehash(2 * slots_.size());  // load factor <= 1/2
  return p;
}

int32_t KeyTable::Find(const int32_t* key) const {
  const uint64_t h = Hash(key);
  uint64_t s = h & mask_;
  while (slots_[s] >= 0) {
    const int32_t p = slots_[s];
    if (hashes_[static_cast<size_t>(p)] == h && Equal(p, key)) return p;
    s = (s + 1) & mask_;
  }
  return -1;
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

FeatureStats Summarise(const float* f, int64_t begin, int64_t end, int d) {
  FeatureStats s;
  s.lo.assign(static_cast<size_t>(d), std::numeric_limits<float>::infinity());
  s.hi.assign(static_cast<size_t>(d), -std::numeric_limits<float>::infinity());
  for (int64_t i = begin; i < end; ++i) {
    for (int k = 0; k < d; ++k) {
      const float v = f[i * d + k];
      if (!std::isfinite(v)) {
        if (s.first_bad < 0) s.first_bad = i * d + k;
        continue;
      }
      s.lo[static_cast<size_t>(k)] = std::min(s.lo[static_cast<size_t>(k)], v);
      s.hi[static_cast<size_t>(k)] = std::max(s.hi[static_cast<size_t>(k)], v);
    }
  }
  return s;
}

// Embeds voxels [begin, end) and inserts their simplex vertices into table. Writes local point
// indices plus index_base. False when the table hit its size limit.
bool EmbedRange(const float* features, int64_t begin, int64_t end, const Embedding& emb,
                const std::vector<float>& shift, KeyTable& table, int32_t index_base,
                int32_t* vertex_index, float* vertex_weight) {
  const int d = emb.dim();
  const int d1 = d + 1;
  std::vector<float> f(static_cast<size_t>(d)), elevated(static_cast<size_t>(d1)),
      bary(static_cast<size_t>(d1 + 1));
  std::vector<int32_t> rem0(static_cast<size_t>(d1)), rank(static_cast<size_t>(d1)),
      key(static_cast<size_t>(d1));
  for (int64_t i = begin; i < end; ++i) {
    // The filter is invariant to a common shift of the features; removing the minimum keeps
    // lattice coordinates small and exact.
    for (int k = 0; k < d; ++k) f[static_cast<size_t>(k)] = features[i * d + k] - shift[static_cast<size_t>(k)];
    emb.Embed(f.data(), elevated.data(), rem0.data(), rank.data(), bary.data());
    for (int k = 0; k < d1; ++k) {
      emb.VertexKey(rem0.data(), rank.data(), k, key.data());
      const int32_t p = table.FindOrInsert(key.data());
      if (p < 0) return false;
      vertex_index[i * d1 + k] = p + index_base;
      vertex_weight[i * d1 + k] = bary[static_cast<size_t>(k)];
    }
  }
  return true;
}

std::string TooManyPoints(int64_t max_points, int64_t n, int d) {
  std::ostringstream m;
  m << "features: the lattice needs more than " << max_points << " points for " << n
    << " voxels with " << d << " feature channels, more than the memory budget allows; the "
    << "features vary too much at this scale (use wider kernels, i.e. larger theta)";
  return m.str();
}

}  // namespace

Status LatticeBuilder::Build(const float* features, int64_t n, int d, int64_t max_points,
                             int32_t index_base, int32_t* vertex_index, float* vertex_weight,
                             const Parallel& par) {
  d_ = d;
  table_ = nullptr;
  table_storage_.clear();
  const Embedding emb(d);
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(par.num_threads(), n / 16384));
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
  for (int k = 0; k < d; ++k) {
    const double span = static_cast<double>(hi[static_cast<size_t>(k)]) - lo[static_cast<size_t>(k)];
    if (span > max_span) {
      std::ostringstream m;
      m << "features channel " << k << " spans " << span << " (max - min), beyond the "
        << max_span << " the lattice resolves in single precision for " << d
        << " channels; features must be divided by the kernel widths (theta)";
      return Status::Invalid(m.str());
    }
  }

  // 2. Embed and hash. Each chunk fills a table of its own in parallel; the chunk tables are
  // then merged in order, so point numbering depends only on the chunk count.
  if (chunks == 1) {
    table_storage_.emplace_back(d, max_points);
    if (!EmbedRange(features, 0, n, emb, lo, table_storage_[0], index_base, vertex_index,
                    vertex_weight)) {
      return Status::Exhausted(TooManyPoints(max_points, n, d));
    }
    table_ = &table_storage_[0];
    return Status::Ok();
  }
  std::vector<KeyTable> local;
  local.reserve(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) local.emplace_back(d, max_points);
  std::vector<char> full(static_cast<size_t>(chunks), 0);
  par.For(chunks, 200 * d * d * (n / chunks + 1), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      try {  // an exception must not escape a worker thread
        full[static_cast<size_t>(c)] =
            !EmbedRange(features, chunk_begin(c), chunk_begin(c + 1), emb, lo,
                        local[static_cast<size_t>(c)], 0, vertex_index, vertex_weight);
      } catch (const std::bad_alloc&) {
        full[static_cast<size_t>(c)] = 1;
      }
    }
  });
  if (std::find(full.begin(), full.end(), 1) != full.end()) {
    return Status::Exhausted(TooManyPoints(max_points, n, d));
  }
  table_storage_.emplace_back(d, max_points);
  KeyTable& global = table_storage_[0];
  global.Reserve(local[0].size() * 5 / 4);
  std::vector<std::vector<int32_t>> to_global(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    const KeyTable& t = local[static_cast<size_t>(c)];
    std::vector<int32_t>& map = to_global[static_cast<size_t>(c)];
    map.resize(static_cast<size_t>(t.size()));
    for (int64_t p = 0; p < t.size(); ++p) {
      const int32_t g = global.FindOrInsert(t.key(p));
      if (g < 0) return Status::Exhausted(TooManyPoints(max_points, n, d));
      map[static_cast<size_t>(p)] = g + index_base;
    }
    local[static_cast<size_t>(c)] = KeyTable(d, 0);  // free the chunk's table
  }
  const int64_t d1 = d + 1;
  par.For(chunks, 4 * d1 * (n / chunks + 1), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const std::vector<int32_t>& map = to_global[static_cast<size_t>(c)];
      for (int64_t i = chunk_begin(c) * d1; i < chunk_begin(c + 1) * d1; ++i) {
        vertex_index[i] = map[static_cast<size_t>(vertex_index[i])];
      }
    }
  });
  table_ = &global;
  return Status::Ok();
}

void LatticeBuilder::BlurNeighbours(int64_t total_points, int32_t index_base, int32_t* nbrs,
                                    const Parallel& par) const {
  const int d = d_;
  const int64_t m = num_points();
  const auto absent = static_cast<int32_t>(total_points);
  par.For(m, 60 * d * (d + 1), [&](int64_t b, int64_t e) {
    std::vector<int32_t> plus(static_cast<size_t>(d)), minus(static_cast<size_t>(d));
    for (int64_t p = b; p < e; ++p) {
      const int32_t* key = table_->key(p);
      for (int j = 0; j <= d; ++j) {
        // One step along direction j adds (d+1) e_j - (1, ..., 1).
        for (int k = 0; k < d; ++k) {
          plus[static_cast<size_t>(k)] = key[k] - 1;
          minus[static_cast<size_t>(k)] = key[k] + 1;
        }
        if (j < d) {  // for j == d the +d lands on the implied last coordinate
          plus[static_cast<size_t>(j)] = key[j] + d;
          minus[static_cast<size_t>(j)] = key[j] - d;
        }
        const int32_t a = table_->Find(minus.data());
        const int32_t c = table_->Find(plus.data());
        int32_t* out = nbrs + (j * total_points + index_base + p) * 2;
        out[0] = a < 0 ? absent : a + index_base;
        out[1] = c < 0 ? absent : c + index_base;
      }
    }
  });
}

void BuildSplatCsr(const int32_t* vertex_index, int64_t num_entries, int64_t num_points,
                   int32_t* offsets, int32_t* entries, const Parallel& par) {
  std::unique_ptr<std::atomic<int32_t>[]> cursor(new std::atomic<int32_t>[static_cast<size_t>(num_points)]);
  par.For(num_points, 2, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) cursor[p].store(0, std::memory_order_relaxed);
  });
  par.For(num_entries, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) cursor[vertex_index[i]].fetch_add(1, std::memory_order_relaxed);
  });
  offsets[0] = 0;
  for (int64_t p = 0; p < num_points; ++p) {
    const int32_t count = cursor[p].load(std::memory_order_relaxed);
    cursor[p].store(offsets[p], std::memory_order_relaxed);
    offsets[p + 1] = offsets[p] + count;
  }
  par.For(num_entries, 10, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      entries[cursor[vertex_index[i]].fetch_add(1, std::memory_order_relaxed)] = static_cast<int32_t>(i);
    }
  });
  // Concurrent filling leaves each list in arbitrary order; sort for reproducible sums.
  const int64_t per_point = num_points > 0 ? num_entries / num_points + 1 : 1;
  par.For(num_points, 20 * per_point, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) std::sort(entries + offsets[p], entries + offsets[p + 1]);
  });
}

// ---------------------------------------------------------------------------------------------
// splat, blur, slice
// ---------------------------------------------------------------------------------------------

namespace {

// kChannels > 0 fixes the channel count at compile time (the fast paths); 0 reads `channels`.
template <int kChannels>
bool FilterImpl(const LatticeView& lat, const float* values, int channels, bool reverse,
                float* out, float* scratch, const Parallel& par) {
  const int64_t C = kChannels > 0 ? kChannels : channels;
  const int d1 = lat.d + 1;
  const int64_t m = lat.num_points;
  const int64_t n_entries = lat.num_voxels * d1;
  const auto m_u = static_cast<uint64_t>(m);
  const auto entries_u = static_cast<uint64_t>(n_entries);
  std::atomic<bool> bad{false};
  float* cur = scratch;
  float* next = scratch + (m + 1) * C;
  // Row m of both buffers is the absent neighbour: always zero.
  for (int64_t c = 0; c < C; ++c) cur[m * C + c] = next[m * C + c] = 0.0f;

  // splat: each lattice point gathers from the voxels of its CSR list.
  const int64_t per_point = m > 0 ? n_entries / m + 1 : 1;
  par.For(m, 4 * per_point * (C + 2), [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t p = b; p < e; ++p) {
      float* row = cur + p * C;
      for (int64_t c = 0; c < C; ++c) row[c] = 0.0f;
      const int64_t lo = lat.splat_offsets[p];
      const int64_t hi = lat.splat_offsets[p + 1];
      if (lo < 0 || hi < lo || hi > n_entries) {
        ok = false;
        continue;
      }
      for (int64_t q = lo; q < hi; ++q) {
        const int32_t entry = lat.splat_entries[q];
        if (static_cast<uint64_t>(static_cast<int64_t>(entry)) >= entries_u) {
          ok = false;
          continue;
        }
        const float w = lat.vertex_weight[entry];
        const float* v = values + (entry / d1) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += w * v[c];
      }
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });

  // blur: [1/2, 1, 1/2] along each lattice direction, in reverse order for the adjoint.
  for (int s = 0; s < d1; ++s) {
    const int j = reverse ? d1 - 1 - s : s;
    const int32_t* nb = lat.blur_neighbours + static_cast<int64_t>(j) * m * 2;
    par.For(m, 6 * C + 8, [&](int64_t b, int64_t e) {
      bool ok = true;
      for (int64_t p = b; p < e; ++p) {
        int64_t n1 = nb[2 * p];
        int64_t n2 = nb[2 * p + 1];
        if (static_cast<uint64_t>(n1) > m_u || static_cast<uint64_t>(n2) > m_u) {
          ok = false;
          n1 = n2 = m;
        }
        const float* a = cur + p * C;
        const float* x = cur + n1 * C;
        const float* y = cur + n2 * C;
        float* dst = next + p * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = a[c] + 0.5f * (x[c] + y[c]);
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
    });
    std::swap(cur, next);
  }

  // slice: each voxel reads its d+1 lattice points back.
  const float alpha = Embedding(lat.d).alpha();
  par.For(lat.num_voxels, d1 * (3 * C + 4), [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t i = b; i < e; ++i) {
      float* o = out + i * C;
      for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
      for (int k = 0; k < d1; ++k) {
        const int32_t p = lat.vertex_index[i * d1 + k];
        if (static_cast<uint64_t>(static_cast<int64_t>(p)) >= m_u) {
          ok = false;
          continue;
        }
        const float w = alpha * lat.vertex_weight[i * d1 + k];
        const float* src = cur + static_cast<int64_t>(p) * C;
        for (int64_t c = 0; c < C; ++c) o[c] += w * src[c];
      }
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

}  // namespace

Status Filter(const LatticeView& lat, const float* values, int channels, bool reverse,
              float* out, float* scratch, const Parallel& par) {
  if (lat.num_points > 0 &&
      (lat.splat_offsets[0] != 0 ||
       lat.splat_offsets[lat.num_points] != lat.num_voxels * (lat.d + 1))) {
    return Status::Invalid(
        "lattice: splat_offsets must start at 0 and end at the number of vertex entries; pass "
        "the tensors of one lattice build unchanged");
  }
  bool ok = false;
  switch (channels) {
    case 1: ok = FilterImpl<1>(lat, values, channels, reverse, out, scratch, par); break;
    case 2: ok = FilterImpl<2>(lat, values, channels, reverse, out, scratch, par); break;
    case 3: ok = FilterImpl<3>(lat, values, channels, reverse, out, scratch, par); break;
    case 4: ok = FilterImpl<4>(lat, values, channels, reverse, out, scratch, par); break;
    case 5: ok = FilterImpl<5>(lat, values, channels, reverse, out, scratch, par); break;
    case 8: ok = FilterImpl<8>(lat, values, channels, reverse, out, scratch, par); break;
    default: ok = FilterImpl<0>(lat, values, channels, reverse, out, scratch, par); break;
  }
  if (!ok) {
    return Status::Invalid(
        "lattice: an index in vertex_index, blur_neighbours or splat_entries is out of range; "
        "pass the tensors of one lattice build unchanged");
  }
  return Status::Ok();
}

}  // namespace crf3d

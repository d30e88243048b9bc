// Separable correlation of channels-last grids; see gaussian.h.
#include "gaussian.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace crf3d {

namespace {

// A block of one axis (L rows of `inner` contiguous floats) whose rows are this short is
// filtered whole: its interior rows (those every tap reaches) are one contiguous run. Longer
// rows are cut into column strips of kStrip floats, so that the rows of a strip stay in cache.
constexpr int64_t kShortRow = 64;  // floats
constexpr int64_t kStrip = 256;    // floats

// d[x] = sum_{o = lo..hi} t[o] * s[x + o * stride] for x < n: each output is summed in
// registers over the taps (16 outputs at a time) and stored once. Compiled for AVX2 as well
// where the CPU has it.
__attribute__((target_clones("avx2", "default"))) void Correlate(float* __restrict d,
                                                                const float* __restrict s,
                                                                int64_t stride, const float* t,
                                                                int64_t lo, int64_t hi,
                                                                int64_t n) {
  constexpr int64_t kLanes = 16;
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes) {
    float acc[kLanes] = {};
    for (int64_t o = lo; o <= hi; ++o) {
      const float to = t[o];
      const float* so = s + x + o * stride;
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += to * so[j];
    }
    for (int64_t j = 0; j < kLanes; ++j) d[x + j] = acc[j];
  }
  for (; x < n; ++x) {
    float acc = 0.0f;
    for (int64_t o = lo; o <= hi; ++o) acc += t[o] * s[x + o * stride];
    d[x] = acc;
  }
}

// Rows [i0, i1) of one block or strip (row stride `inner`, `width` floats each): row i gets
// the taps that stay inside 0..L-1.
void CorrelateRows(const float* s, float* d, int64_t length, int64_t inner, int64_t width,
                   const float* t, int64_t reach, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    Correlate(d + i * inner, s + i * inner, inner, t, std::max(-reach, -i),
              std::min(reach, length - 1 - i), width);
  }
}

// One pass along an axis: src and dst are [outer, L, inner]; t points at the middle tap.
void AxisPass(const float* src, float* dst, int64_t outer, int64_t length, int64_t inner,
              const float* t, int radius, const Parallel& par) {
  const int64_t block = length * inner;
  const int64_t reach = std::min<int64_t>(radius, length - 1);
  const int64_t taps = 2 * reach + 1;
  if (inner <= kShortRow) {
    par.For(outer, block * taps, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const float* s = src + o * block;
        float* d = dst + o * block;
        // interior rows reach..L-1-reach as one run; the rows near either end one by one
        const int64_t first = std::min(reach, length);
        const int64_t last = std::max(first, length - reach);
        CorrelateRows(s, d, length, inner, inner, t, reach, 0, first);
        if (last > first) {
          Correlate(d + first * inner, s + first * inner, inner, t, -reach, reach,
                    (last - first) * inner);
        }
        CorrelateRows(s, d, length, inner, inner, t, reach, last, length);
      }
    });
    return;
  }
  const int64_t strips = (inner + kStrip - 1) / kStrip;
  par.For(outer * strips, length * kStrip * taps, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t o = w / strips;
      const int64_t c0 = (w % strips) * kStrip;
      CorrelateRows(src + o * block + c0, dst + o * block + c0, length, inner,
                    std::min(kStrip, inner - c0), t, reach, 0, length);
    }
  });
}

bool IsIdentity(const AxisTaps& axis) { return axis.radius == 0 && axis.taps[0] == 1.0f; }

}  // namespace

Status CheckTaps(const Grid& grid, const std::vector<AxisTaps>& axes) {
  if (axes.size() != grid.spatial.size()) {
    std::ostringstream m;
    m << "separable filter: " << axes.size() << " tap vectors for a grid with "
      << grid.spatial.size() << " spatial axes; one per axis is needed";
    return Status::Invalid(m.str());
  }
  for (size_t a = 0; a < axes.size(); ++a) {
    const AxisTaps& axis = axes[a];
    if (axis.radius < 0 || axis.taps.size() != static_cast<size_t>(2 * axis.radius + 1)) {
      std::ostringstream m;
      m << "separable filter: axis " << a << " has radius " << axis.radius << " and "
        << axis.taps.size() << " taps; 2 * radius + 1 taps are needed";
      return Status::Invalid(m.str());
    }
    for (float tap : axis.taps) {
      if (!std::isfinite(tap)) {
        std::ostringstream m;
        m << "separable filter: axis " << a << " has a tap that is not finite (" << tap << ")";
        return Status::Invalid(m.str());
      }
    }
  }
  return Status::Ok();
}

Status SeparableCorrelate(const Grid& grid, const std::vector<AxisTaps>& axes, const float* in,
                          float* out, float* scratch, const Parallel& par) {
  Status s = CheckTaps(grid, axes);
  if (!s.ok()) return s;
  std::vector<int> active;
  for (size_t a = 0; a < axes.size(); ++a) {
    if (!IsIdentity(axes[a])) active.push_back(static_cast<int>(a));
  }
  const int64_t total = grid.size();
  if (active.empty()) {
    std::memcpy(out, in, static_cast<size_t>(total) * sizeof(float));
    return Status::Ok();
  }
  const int passes = static_cast<int>(active.size());
  const float* src = in;
  for (int p = 0; p < passes; ++p) {
    const int a = active[static_cast<size_t>(p)];
    // the last pass writes out; earlier ones alternate so that none reads what it writes
    float* dst = (passes - 1 - p) % 2 == 0 ? out : scratch;
    int64_t outer = grid.batch;
    for (int i = 0; i < a; ++i) outer *= grid.spatial[static_cast<size_t>(i)];
    int64_t inner = grid.channels;
    for (size_t i = static_cast<size_t>(a) + 1; i < grid.spatial.size(); ++i) {
      inner *= grid.spatial[i];
    }
    const AxisTaps& axis = axes[static_cast<size_t>(a)];
    AxisPass(src, dst, outer, grid.spatial[static_cast<size_t>(a)], inner,
             axis.taps.data() + axis.radius, axis.radius, par);
    src = dst;
  }
  return Status::Ok();
}

std::vector<float> SeparableOnes(const Grid& grid, const std::vector<AxisTaps>& axes) {
  // 1-D filters of ones per axis, in double
  const size_t dims = grid.spatial.size();
  std::vector<std::vector<double>> profiles(dims);
  for (size_t a = 0; a < dims; ++a) {
    const int64_t length = grid.spatial[a];
    const AxisTaps& axis = axes[a];
    profiles[a].assign(static_cast<size_t>(length), 0.0);
    for (int64_t i = 0; i < length; ++i) {
      for (int64_t o = std::max<int64_t>(-axis.radius, -i);
           o <= std::min<int64_t>(axis.radius, length - 1 - i); ++o) {
        profiles[a][static_cast<size_t>(i)] += axis.taps[static_cast<size_t>(o + axis.radius)];
      }
    }
  }
  // row by row along the last axis; `index` counts over the leading axes
  const int64_t row = grid.spatial[dims - 1];
  const int64_t rows = grid.voxels_per_item() / std::max<int64_t>(row, 1);
  std::vector<float> ones(static_cast<size_t>(grid.voxels_per_item()));
  std::vector<int64_t> index(dims, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double factor = 1.0;
    for (size_t a = 0; a + 1 < dims; ++a) factor *= profiles[a][static_cast<size_t>(index[a])];
    for (int64_t x = 0; x < row; ++x) {
      ones[static_cast<size_t>(r * row + x)] =
          static_cast<float>(factor * profiles[dims - 1][static_cast<size_t>(x)]);
    }
    for (size_t a = dims - 1; a-- > 0;) {  // next row: increment the leading axes' counter
      if (++index[a] < grid.spatial[a]) break;
      index[a] = 0;
    }
  }
  return ones;
}

}  // namespace crf3d

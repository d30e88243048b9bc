// Separable correlation of channels-last grids; see gaussian.h.
#include "gaussian.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <sstream>

namespace crf3d {

namespace {

// A block of one axis (L rows of `inner` contiguous values) whose rows are this short is
// filtered whole: its interior rows (those every tap reaches) are one contiguous run. Longer
// rows are cut into column strips of kStrip values, so that the rows of a strip stay in cache.
constexpr int64_t kShortRow = 64;  // values
constexpr int64_t kStrip = 256;    // values
// Outputs summed together in registers by Correlate (and partial sums kept by LagDot): 16
// floats are two AVX registers, enough independent additions to hide the adder's latency.
constexpr int64_t kLanes = 16;
// Values per work unit of the taps' gradient: its partial sums are kept per unit and added in
// unit order, so the result does not depend on how units are shared between threads.
constexpr int64_t kGradientUnit = int64_t{1} << 14;

// d[x] = sum_{o = lo..hi} t[o] * s[x + o * stride] for x < n: each output is summed in
// registers over the taps (kLanes outputs at a time) and stored once.
template <typename T>
inline __attribute__((always_inline)) void CorrelateBody(T* __restrict d, const T* __restrict s,
                                                        int64_t stride, const T* t, int64_t lo,
                                                        int64_t hi, int64_t n) {
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes) {
    T acc[kLanes] = {};
    for (int64_t o = lo; o <= hi; ++o) {
      const T to = t[o];
      const T* so = s + x + o * stride;
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += to * so[j];
    }
    for (int64_t j = 0; j < kLanes; ++j) d[x + j] = acc[j];
  }
  for (; x < n; ++x) {
    T acc = 0;
    for (int64_t o = lo; o <= hi; ++o) acc += t[o] * s[x + o * stride];
    d[x] = acc;
  }
}

// CorrelateBody compiled for AVX2 as well where the CPU has it (the loader picks the clone).
__attribute__((target_clones("avx2", "default"))) void Correlate(float* __restrict d,
                                                                const float* __restrict s,
                                                                int64_t stride, const float* t,
                                                                int64_t lo, int64_t hi,
                                                                int64_t n) {
  CorrelateBody(d, s, stride, t, lo, hi, n);
}
__attribute__((target_clones("avx2", "default"))) void Correlate(double* __restrict d,
                                                                const double* __restrict s,
                                                                int64_t stride, const double* t,
                                                                int64_t lo, int64_t hi,
                                                                int64_t n) {
  CorrelateBody(d, s, stride, t, lo, hi, n);
}

// sum_{x < n} a[x] * b[x], kLanes partial sums in T, added up in double.
template <typename T>
inline __attribute__((always_inline)) double LagDotBody(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[x + j] * b[x + j];
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += static_cast<double>(acc[j]);
  for (; x < n; ++x) sum += static_cast<double>(a[x]) * static_cast<double>(b[x]);
  return sum;
}

__attribute__((target_clones("avx2", "default"))) double LagDot(const float* a, const float* b,
                                                               int64_t n) {
  return LagDotBody(a, b, n);
}
__attribute__((target_clones("avx2", "default"))) double LagDot(const double* a, const double* b,
                                                               int64_t n) {
  return LagDotBody(a, b, n);
}

// Rows [i0, i1) of one block or strip (row stride `inner`, `width` values each): row i gets
// the taps that stay inside 0..L-1.
template <typename T>
void CorrelateRows(const T* s, T* d, int64_t length, int64_t inner, int64_t width, const T* t,
                   int64_t reach, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    Correlate(d + i * inner, s + i * inner, inner, t, std::max(-reach, -i),
              std::min(reach, length - 1 - i), width);
  }
}

// 0 when x[0..n) is finite, NaN otherwise (a NaN or Inf makes 0 * x NaN); kLanes partial sums,
// so that the loop vectorises.
template <typename T>
T ZeroIfFinite(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += T(0) * x[i + j];
  }
  T probe = 0;
  for (int64_t j = 0; j < kLanes; ++j) probe += acc[j];
  for (; i < n; ++i) probe += T(0) * x[i];
  return probe;
}

// One pass along an axis: src and dst are [outer, L, inner]; t points at the middle tap. With
// `nonfinite` given, each work unit also reads back what it just wrote (still in cache) and sets
// *nonfinite if that holds a NaN or Inf.
template <typename T>
void AxisPass(const T* src, T* dst, int64_t outer, int64_t length, int64_t inner, const T* t,
              int radius, const Parallel& par, std::atomic<bool>* nonfinite) {
  const int64_t block = length * inner;
  const int64_t reach = std::min<int64_t>(radius, length - 1);
  const int64_t taps = 2 * reach + 1;
  if (inner <= kShortRow) {
    par.For(outer, block * taps, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const T* s = src + o * block;
        T* d = dst + o * block;
        // interior rows reach..L-1-reach as one run; the rows near either end one by one
        const int64_t first = std::min(reach, length);
        const int64_t last = std::max(first, length - reach);
        CorrelateRows(s, d, length, inner, inner, t, reach, 0, first);
        if (last > first) {
          Correlate(d + first * inner, s + first * inner, inner, t, -reach, reach,
                    (last - first) * inner);
        }
        CorrelateRows(s, d, length, inner, inner, t, reach, last, length);
        if (nonfinite != nullptr && ZeroIfFinite(d, block) != T(0)) {
          nonfinite->store(true, std::memory_order_relaxed);
        }
      }
    });
    return;
  }
  const int64_t strips = (inner + kStrip - 1) / kStrip;
  par.For(outer * strips, length * kStrip * taps, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t o = w / strips;
      const int64_t c0 = (w % strips) * kStrip;
      const int64_t width = std::min(kStrip, inner - c0);
      T* d = dst + o * block + c0;
      CorrelateRows(src + o * block + c0, d, length, inner, width, t, reach, 0, length);
      if (nonfinite == nullptr) continue;
      T probe = 0;
      for (int64_t i = 0; i < length; ++i) probe += ZeroIfFinite(d + i * inner, width);
      if (probe != T(0)) nonfinite->store(true, std::memory_order_relaxed);
    }
  });
}

template <typename T>
bool IsIdentity(const AxisTaps<T>& axis) {
  return axis.radius == 0 && axis.taps[0] == T(1);
}

// [outer, L, inner] view of axis a of the grid.
void AxisShape(const Grid& grid, size_t a, int64_t* outer, int64_t* length, int64_t* inner) {
  *outer = grid.batch;
  for (size_t i = 0; i < a; ++i) *outer *= grid.spatial[i];
  *inner = grid.channels;
  for (size_t i = a + 1; i < grid.spatial.size(); ++i) *inner *= grid.spatial[i];
  *length = grid.spatial[a];
}

}  // namespace

template <typename T>
Status CheckTaps(const Grid& grid, const std::vector<AxisTaps<T>>& axes) {
  if (axes.size() != grid.spatial.size()) {
    std::ostringstream m;
    m << "separable filter: " << axes.size() << " tap vectors for a grid with "
      << grid.spatial.size() << " spatial axes; one per axis is needed";
    return Status::Invalid(m.str());
  }
  for (size_t a = 0; a < axes.size(); ++a) {
    const AxisTaps<T>& axis = axes[a];
    if (axis.radius < 0 || axis.taps.size() != static_cast<size_t>(2 * axis.radius + 1)) {
      std::ostringstream m;
      m << "separable filter: axis " << a << " has radius " << axis.radius << " and "
        << axis.taps.size() << " taps; 2 * radius + 1 taps are needed";
      return Status::Invalid(m.str());
    }
    for (T tap : axis.taps) {
      if (!std::isfinite(tap)) {
        std::ostringstream m;
        m << "separable filter: axis " << a << " has a tap that is not finite (" << tap << ")";
        return Status::Invalid(m.str());
      }
    }
  }
  return Status::Ok();
}

template <typename T>
Status SeparableCorrelate(const Grid& grid, const std::vector<AxisTaps<T>>& axes, const T* in,
                          T* out, T* scratch, const Parallel& par, int64_t* first_nonfinite) {
  if (first_nonfinite != nullptr) *first_nonfinite = -1;
  Status s = CheckTaps(grid, axes);
  if (!s.ok()) return s;
  std::vector<int> active;
  for (size_t a = 0; a < axes.size(); ++a) {
    if (!IsIdentity(axes[a])) active.push_back(static_cast<int>(a));
  }
  const int64_t total = grid.size();
  bool nonfinite = false;
  if (active.empty()) {
    if (total > 0) std::memcpy(out, in, static_cast<size_t>(total) * sizeof(T));
    nonfinite = first_nonfinite != nullptr;  // no pass to ride on: scan the values
  }
  const int passes = static_cast<int>(active.size());
  const T* src = in;
  std::atomic<bool> last_nonfinite{false};
  for (int p = 0; p < passes; ++p) {
    const size_t a = static_cast<size_t>(active[static_cast<size_t>(p)]);
    // the last pass writes out; earlier ones alternate so that none reads what it writes
    T* dst = (passes - 1 - p) % 2 == 0 ? out : scratch;
    int64_t outer = 0, length = 0, inner = 0;
    AxisShape(grid, a, &outer, &length, &inner);
    const AxisTaps<T>& axis = axes[a];
    // Every pass gives each voxel its centre tap times its own value, so a NaN or Inf value
    // leaves its voxel non-finite through every pass: checking the last pass's output suffices.
    std::atomic<bool>* check = first_nonfinite != nullptr && p + 1 == passes ? &last_nonfinite
                                                                             : nullptr;
    AxisPass(src, dst, outer, length, inner, axis.taps.data() + axis.radius, axis.radius, par,
             check);
    src = dst;
  }
  if (nonfinite || last_nonfinite.load()) {
    *first_nonfinite = FirstNonFinite(in, total);
    if (*first_nonfinite >= 0) {
      std::ostringstream m;
      m << "separable filter: values contains NaN or Inf (flat index " << *first_nonfinite << ")";
      return Status::Invalid(m.str());
    }
  }
  return Status::Ok();
}

template <typename T>
Status SeparableTapsGradient(const Grid& grid, const std::vector<AxisTaps<T>>& axes,
                             const T* values, const T* grad, T* taps_grad, T* scratch,
                             const Parallel& par) {
  Status s = CheckTaps(grid, axes);
  if (!s.ok()) return s;
  const int64_t total = grid.size();
  T* filtered = scratch;         // values filtered along every axis but the current one
  T* pass = scratch + total;     // SeparableCorrelate's scratch
  int64_t at = 0;
  for (size_t a = 0; a < axes.size(); ++a) {
    const int64_t radius = axes[a].radius;
    T* out = taps_grad + at;
    at += 2 * radius + 1;
    std::fill(out, out + 2 * radius + 1, T(0));
    if (total == 0) continue;
    std::vector<AxisTaps<T>> others = axes;
    others[a] = AxisTaps<T>{0, {T(1)}};
    s = SeparableCorrelate(grid, others, values, filtered, pass, par);
    if (!s.ok()) return s;
    int64_t outer = 0, length = 0, inner = 0;
    AxisShape(grid, a, &outer, &length, &inner);
    const int64_t reach = std::min<int64_t>(radius, length - 1);
    const int64_t lags = 2 * reach + 1;
    // Work units: a group of consecutive outer blocks times a strip of columns. When a row fits
    // one strip, the rows of a block are contiguous, so each lag of a block is one long dot
    // product; otherwise one dot product per row of the strip.
    const bool whole_rows = inner <= kStrip;
    const int64_t strips = whole_rows ? 1 : (inner + kStrip - 1) / kStrip;
    const int64_t width = whole_rows ? inner : kStrip;
    const int64_t group = std::max<int64_t>(1, kGradientUnit / std::max<int64_t>(1, length * width));
    const int64_t groups = (outer + group - 1) / group;
    const int64_t units = groups * strips;
    const int64_t block = length * inner;
    std::vector<double> partial(static_cast<size_t>(units * lags), 0.0);
    par.For(units, group * length * width * lags, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        const int64_t o0 = (u / strips) * group;
        const int64_t o1 = std::min(outer, o0 + group);
        const int64_t c0 = (u % strips) * kStrip;
        const int64_t w = std::min(width, inner - c0);
        double* sums = partial.data() + u * lags;
        for (int64_t lag = -reach; lag <= reach; ++lag) {
          const int64_t i0 = std::max<int64_t>(0, -lag);
          const int64_t i1 = std::min(length, length - lag);
          double sum = 0.0;
          for (int64_t ob = o0; ob < o1; ++ob) {
            const T* g = grad + ob * block + c0;
            const T* y = filtered + ob * block + c0;
            if (whole_rows) {
              sum += LagDot(g + i0 * inner, y + (i0 + lag) * inner, (i1 - i0) * inner);
            } else {
              for (int64_t i = i0; i < i1; ++i) sum += LagDot(g + i * inner, y + (i + lag) * inner, w);
            }
          }
          sums[lag + reach] = sum;
        }
      }
    });
    for (int64_t lag = 0; lag < lags; ++lag) {
      double sum = 0.0;
      for (int64_t u = 0; u < units; ++u) sum += partial[static_cast<size_t>(u * lags + lag)];
      out[radius - reach + lag] = static_cast<T>(sum);
    }
  }
  return Status::Ok();
}

template <typename T>
std::vector<T> SeparableOnes(const Grid& grid, const std::vector<AxisTaps<T>>& axes) {
  // 1-D filters of ones per axis, in double
  const size_t dims = grid.spatial.size();
  std::vector<std::vector<double>> profiles(dims);
  for (size_t a = 0; a < dims; ++a) {
    const int64_t length = grid.spatial[a];
    const AxisTaps<T>& axis = axes[a];
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
  std::vector<T> ones(static_cast<size_t>(grid.voxels_per_item()));
  std::vector<int64_t> index(dims, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double factor = 1.0;
    for (size_t a = 0; a + 1 < dims; ++a) factor *= profiles[a][static_cast<size_t>(index[a])];
    for (int64_t x = 0; x < row; ++x) {
      ones[static_cast<size_t>(r * row + x)] =
          static_cast<T>(factor * profiles[dims - 1][static_cast<size_t>(x)]);
    }
    for (size_t a = dims - 1; a-- > 0;) {  // next row: increment the leading axes' counter
      if (++index[a] < grid.spatial[a]) break;
      index[a] = 0;
    }
  }
  return ones;
}

template Status CheckTaps<float>(const Grid&, const std::vector<AxisTaps<float>>&);
template Status CheckTaps<double>(const Grid&, const std::vector<AxisTaps<double>>&);
template Status SeparableCorrelate<float>(const Grid&, const std::vector<AxisTaps<float>>&,
                                          const float*, float*, float*, const Parallel&,
                                          int64_t*);
template Status SeparableCorrelate<double>(const Grid&, const std::vector<AxisTaps<double>>&,
                                           const double*, double*, double*, const Parallel&,
                                           int64_t*);
template Status SeparableTapsGradient<float>(const Grid&, const std::vector<AxisTaps<float>>&,
                                             const float*, const float*, float*, float*,
                                             const Parallel&);
template Status SeparableTapsGradient<double>(const Grid&, const std::vector<AxisTaps<double>>&,
                                              const double*, const double*, double*, double*,
                                              const Parallel&);
template std::vector<float> SeparableOnes<float>(const Grid&, const std::vector<AxisTaps<float>>&);
template std::vector<double> SeparableOnes<double>(const Grid&,
                                                   const std::vector<AxisTaps<double>>&);

}  // namespace crf3d

// Separable filtering of channels-last grids: a Gaussian (or any separable) kernel as an exact,
// truncated sum, one 1-D kernel per spatial axis, and zero outside the volume.
//
// For a grid [batch, *spatial, channels] and one tap vector per spatial axis,
//
//   out[b, i, c] = sum over offsets o with |o_a| <= r_a and i + o inside the grid of
//                  prod_a taps_a[o_a + r_a] * in[b, i + o, c]
//
// (a correlation; with symmetric taps it is also a convolution). Axis by axis: each pass reads
// L rows of one axis and writes L rows, so the cost is sum_a (2 r_a + 1) multiply-adds per value
// whatever the number of axes. The operator is the matrix of a product of per-axis banded
// matrices C_a (they commute); its adjoint is the same filter with each axis's taps reversed.
// Its derivative with respect to axis a's taps is a lagged inner product (SeparableTapsGradient).
//
// Everything is compiled for float and double (T).
#ifndef CRF3D_GAUSSIAN_H_
#define CRF3D_GAUSSIAN_H_

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "permutohedral.h"

namespace crf3d {

// Shape of a row-major [batch, *spatial, channels] array.
struct Grid {
  int64_t batch = 1;
  std::vector<int64_t> spatial;
  int64_t channels = 1;
  int64_t voxels_per_item() const {
    int64_t n = 1;
    for (int64_t s : spatial) n *= s;
    return n;
  }
  int64_t voxels() const { return batch * voxels_per_item(); }
  int64_t size() const { return voxels() * channels; }
};

// The 1-D kernel of one spatial axis: taps[o + radius] weighs the value o voxels further along
// the axis (o in -radius..radius).
template <typename T>
struct AxisTaps {
  int radius = 0;
  std::vector<T> taps;  // 2 * radius + 1 entries
};

// Checks that there is one AxisTaps per spatial axis, each with 2 radius + 1 finite taps.
template <typename T>
Status CheckTaps(const Grid& grid, const std::vector<AxisTaps<T>>& axes);

// out = the separable correlation above. in, out and scratch hold grid.size() values each and
// must not overlap. Axes whose kernel is the single tap 1 are skipped.
//
// first_nonfinite (optional): the NaN and Inf check. When it is given, the last pass also reads
// back what it wrote, while it is still in cache; a NaN or Inf value leaves its own voxel
// non-finite (its centre tap), so only then are the values scanned for the first non-finite one.
// If there is one, its flat index goes to *first_nonfinite and the call fails with
// kInvalidArgument (out is then not meaningful); otherwise *first_nonfinite is -1 and out is as
// without the check (an overflow of finite values is left as it is).
template <typename T>
Status SeparableCorrelate(const Grid& grid, const std::vector<AxisTaps<T>>& axes, const T* in,
                          T* out, T* scratch, const Parallel& par,
                          int64_t* first_nonfinite = nullptr);

// The derivative of sum(grad * SeparableCorrelate(values)) with respect to every tap:
// taps_grad[at_a + o + r_a] = sum_{i, c} grad[i, c] * y_a[i + o e_a, c], where y_a is values
// filtered along every axis but a and at_a is where axis a's taps start in the concatenation of
// all axes' taps (sum_a 2 r_a + 1 entries). Taps that never meet a voxel (|o| >= L_a) get 0.
// Summed in double, in an order fixed by the grid alone (not by the thread count). scratch
// holds 2 grid.size() values.
template <typename T>
Status SeparableTapsGradient(const Grid& grid, const std::vector<AxisTaps<T>>& axes,
                             const T* values, const T* grad, T* taps_grad, T* scratch,
                             const Parallel& par);

// The filter of ones of one batch item, [prod(spatial)]: the product over axes of the 1-D sums
// sum_{o: 0 <= i_a + o < L_a} taps_a[o + r_a], computed in double and rounded once.
template <typename T>
std::vector<T> SeparableOnes(const Grid& grid, const std::vector<AxisTaps<T>>& axes);

extern template Status CheckTaps<float>(const Grid&, const std::vector<AxisTaps<float>>&);
extern template Status CheckTaps<double>(const Grid&, const std::vector<AxisTaps<double>>&);
extern template Status SeparableCorrelate<float>(const Grid&, const std::vector<AxisTaps<float>>&,
                                                 const float*, float*, float*, const Parallel&,
                                                 int64_t*);
extern template Status SeparableCorrelate<double>(const Grid&,
                                                  const std::vector<AxisTaps<double>>&,
                                                  const double*, double*, double*,
                                                  const Parallel&, int64_t*);
extern template Status SeparableTapsGradient<float>(const Grid&,
                                                    const std::vector<AxisTaps<float>>&,
                                                    const float*, const float*, float*, float*,
                                                    const Parallel&);
extern template Status SeparableTapsGradient<double>(const Grid&,
                                                     const std::vector<AxisTaps<double>>&,
                                                     const double*, const double*, double*,
                                                     double*, const Parallel&);
extern template std::vector<float> SeparableOnes<float>(const Grid&,
                                                        const std::vector<AxisTaps<float>>&);
extern template std::vector<double> SeparableOnes<double>(const Grid&,
                                                          const std::vector<AxisTaps<double>>&);

}  // namespace crf3d

#endif  // CRF3D_GAUSSIAN_H_

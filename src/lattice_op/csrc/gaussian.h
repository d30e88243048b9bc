// Separable filtering of channels-last grids: the CRF's smoothness (spatial) kernel as an exact,
// truncated Gaussian, one 1-D kernel per spatial axis, and zero outside the volume.
//
// For a grid [batch, *spatial, channels] and one tap vector per spatial axis,
//
//   out[b, i, c] = sum over offsets o with |o_a| <= r_a and i + o inside the grid of
//                  prod_a taps_a[o_a + r_a] * in[b, i + o, c]
//
// (a correlation; with symmetric taps it is also a convolution). Axis by axis: each pass reads
// L rows of one axis and writes L rows, so the cost is sum_a (2 r_a + 1) multiply-adds per value
// whatever the number of axes. The operator is the matrix of a product of per-axis banded
// matrices; its adjoint is the same filter with each axis's taps reversed.
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
struct AxisTaps {
  int radius = 0;
  std::vector<float> taps;  // 2 * radius + 1 entries
};

// Checks that there is one AxisTaps per spatial axis, each with 2 radius + 1 finite taps.
Status CheckTaps(const Grid& grid, const std::vector<AxisTaps>& axes);

// out = the separable correlation above. in, out and scratch hold grid.size() floats each and
// must not overlap. Axes whose kernel is the single tap 1 are skipped.
Status SeparableCorrelate(const Grid& grid, const std::vector<AxisTaps>& axes, const float* in,
                          float* out, float* scratch, const Parallel& par);

// The filter of ones of one batch item, [prod(spatial)]: the product over axes of the 1-D sums
// sum_{o: 0 <= i_a + o < L_a} taps_a[o + r_a], computed in double and rounded once.
std::vector<float> SeparableOnes(const Grid& grid, const std::vector<AxisTaps>& axes);

}  // namespace crf3d

#endif  // CRF3D_GAUSSIAN_H_

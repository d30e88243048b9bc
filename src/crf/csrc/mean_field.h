// Mean-field inference of the fully connected CRF in one call (no gradients): the fast path of
// dense-CRF post-processing. The same update as src/crf/functional.py's mean_field:
//
//   Q = softmax(U)
//   repeat T times:
//     m_l = w1[l] * A(Q)_l + w2[l] * G(Q)_l        A: the bilateral lattice, G: separable spatial
//     L   = U - mu m                               (mu: K x K compatibility)
//     Q   = softmax(L)
//
// with both filters normalised, "mean": A(Q) = K Q / K 1, or "symmetric":
// A(Q) = n K (n Q), n = (K 1)^(-1/2). Each iteration makes three passes over the voxels (the
// lattice filter, the separable filter, and one fused pass for weighting, compatibility,
// unaries, softmax and the next iteration's normalisation), where a composition of framework
// ops makes a dozen. On a lattice without splat lists the lattice filter's splat and slice
// ride on the fused pass, leaving only its blur (over the lattice points) as a pass of its own.
#ifndef CRF3D_MEAN_FIELD_H_
#define CRF3D_MEAN_FIELD_H_

#include <cstdint>
#include <vector>

#include "gaussian.h"
#include "parallel.h"
#include "permutohedral.h"

namespace crf3d {

struct MeanFieldParams {
  int num_iterations = 5;
  bool symmetric = false;                    // normalisation: symmetric (true) or mean
  const float* bilateral_weight = nullptr;   // [K] w1
  const float* spatial_weight = nullptr;     // [K] w2
  const float* compatibility = nullptr;      // [K, K] mu, row-major: mu[l * K + l']
  // Run the bilateral filter as whole Filter calls even on a lattice without splat lists (the
  // form that every lattice with lists runs); for tests and measurements: the result is the
  // same bit for bit (see mean_field.cc).
  bool unfused = false;
};

// grid: [batch, *spatial, K] (grid.channels is the number of classes K >= 1); unaries, logits
// and probabilities hold grid.size() floats; lat is the bilateral lattice of the same voxels;
// spatial holds one tap vector per spatial axis. Writes the refined logits L (unless logits is
// null) and Q = softmax(L) of the last iteration. Fails with kInvalidArgument for inconsistent
// lattice arrays or taps, and for NaN or Inf in the unaries, weights or compatibility.
// Allocates 2 grid.size() + SplatParts(n, F, M) M R + 2 (M + 1) R + 2 n floats of scratch for a
// lattice of M points without splat lists (R = 8 for K <= 8, else K), and
// 3 grid.size() + 2 (M + 1) K + 2 n with them; for K = 2 and 3, 2 more per voxel of one item.
Status MeanFieldInference(const Grid& grid, const float* unaries, const LatticeView& lat,
                          const std::vector<AxisTaps<float>>& spatial, const MeanFieldParams& params,
                          float* logits, float* probabilities, const Parallel& par);

}  // namespace crf3d

#endif  // CRF3D_MEAN_FIELD_H_

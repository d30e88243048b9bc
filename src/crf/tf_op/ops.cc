// Registration and shape function of the fused mean-field op. Kernel: kernels.cc; the
// algorithm: ../csrc/mean_field.cc (framework-free, over the lattice core of
// src/lattice_op/csrc).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace crf3d {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("Crf3dMeanField")
    .Input("unaries: float")
    .Input("vertex_index: int32")
    .Input("vertex_weight: float")
    .Input("blur_neighbours: int32")
    .Input("splat_offsets: int32")
    .Input("splat_voxels: int32")
    .Input("splat_weights: float")
    .Input("bilateral_weight: float")
    .Input("spatial_weight: float")
    .Input("compatibility: float")
    .Input("spatial_taps: float")
    .Input("spatial_radii: int32")
    .Attr("num_iterations: int >= 1")
    .Attr("normalisation: {'mean', 'symmetric'}")
    .Attr("output_logits: bool = true")
    .Output("logits: float")
    .Output("probabilities: float")
    .SetShapeFn([](InferenceContext* c) -> Status {
      bool output_logits = true;
      TF_RETURN_IF_ERROR(c->GetAttr("output_logits", &output_logits));
      c->set_output(0, output_logits ? c->input(0) : c->Vector(0));
      c->set_output(1, c->input(0));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Mean-field inference of the fully connected CRF in one kernel (inference only, no gradient):
unaries [B, *spatial, K] (logits), the bilateral lattice of the same voxels (the six tensors of
Crf3dLatticeBuild), weights w1, w2 [K], compatibility mu [K, K], and the separable spatial
kernel as in Crf3dSeparableFilter: spatial_radii [n] one radius per spatial axis, spatial_taps
[sum_a 2 r_a + 1] every axis's taps in turn. Returns the refined logits (an empty vector when
output_logits is false) and their softmax after num_iterations iterations, both filters
normalised by their filters of ones ("mean" or "symmetric").
)doc");

}  // namespace crf3d

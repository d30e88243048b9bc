// Registration and shape functions of the lattice and separable-filter ops. Their kernels are in
// kernels.cc; the algorithms in ../csrc (framework-free).
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace crf3d {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Shapes are checked here only where they are known; every check is repeated with a message
// that names the tensor in the kernels, so unknown dimensions are always accepted.
REGISTER_OP("Crf3dLatticeBuild")
    .Input("features: float")
    .Attr("blur_passes: int >= 1 = 1")
    .Output("vertex_index: int32")
    .Output("vertex_weight: float")
    .Output("blur_neighbours: int32")
    .Output("splat_offsets: int32")
    .Output("splat_voxels: int32")
    .Output("splat_weights: float")
    .SetShapeFn([](InferenceContext* c) -> Status {
      ShapeHandle features = c->input(0);
      ShapeHandle vertex = c->UnknownShape();
      DimensionHandle d1 = c->UnknownDim();
      if (c->RankKnown(features) && c->Rank(features) >= 1) {
        DimensionHandle f = c->Dim(features, -1);
        if (c->ValueKnown(f)) d1 = c->MakeDim(c->Value(f) + 1);
        TF_RETURN_IF_ERROR(c->ReplaceDim(features, -1, d1, &vertex));
      }
      c->set_output(0, vertex);
      c->set_output(1, vertex);
      c->set_output(2, c->MakeShape({d1, c->UnknownDim(), c->MakeDim(2)}));
      // the splat lists: [M+1] and [B*N*(F+1)], or all three [0] (known only at run time)
      c->set_output(3, c->Vector(c->UnknownDim()));
      c->set_output(4, c->Vector(c->UnknownDim()));
      c->set_output(5, c->Vector(c->UnknownDim()));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Builds the permutohedral lattice of each batch item from features [B, *spatial, F] (already
divided by the kernel widths). vertex_index / vertex_weight [B, *spatial, F+1]: the enclosing
lattice points of each voxel and their barycentric weights; blur_neighbours [F+1, M, 2]: the
two neighbours of each of the M lattice points along each direction (M marks an absent one);
splat_offsets [M+1], splat_voxels and splat_weights [B*N*(F+1)]: per lattice point (CSR), the
voxel and barycentric weight of each entry that touches it; all three are empty ([0]) when
32 (M+1) <= B*N*(F+1), and the filter then splats without them. blur_passes k: the accuracy
setting; the lattice is finer by sqrt((3k+1)/4) and its filters must blur k times (the same attr
on Crf3dLatticeFilter); 1 is Adams et al.'s lattice.
)doc");

REGISTER_OP("Crf3dLatticeFilter")
    .Input("values: float")
    .Input("features: float")
    .Input("vertex_index: int32")
    .Input("vertex_weight: float")
    .Input("blur_neighbours: int32")
    .Input("splat_offsets: int32")
    .Input("splat_voxels: int32")
    .Input("splat_weights: float")
    .Attr("reverse: bool = false")
    .Attr("check_finite: bool = true")
    .Attr("blur_passes: int >= 1 = 1")
    .Output("output: float")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
Filters values [B, *spatial, C] with a lattice from Crf3dLatticeBuild: splat, blur along the
F+1 lattice directions (in reverse order when reverse is true, which gives the adjoint), slice.
features [B, *spatial, F] are the features the lattice was built from: the kernel only checks
their shape; the registered gradient uses them for the gradient with respect to the features.
check_finite: values holding NaN or Inf are an InvalidArgument error that gives the index of
the first one (checked during the splat, which reads every value); false lets them through
(the registered gradient filters incoming gradients so). blur_passes: the sweeps of blurs, the
value the lattice was built with.
)doc");

REGISTER_OP("Crf3dSeparableFilter")
    .Input("values: T")
    .Input("taps: T")
    .Input("radii: int32")
    .Attr("T: {float, double}")
    .Attr("adjoint: bool = false")
    .Attr("check_finite: bool = true")
    .Output("output: T")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
Separable correlation of values [B, *spatial, C], zero outside the grid: radii [n] holds one
radius r_a per spatial axis and taps [sum_a 2 r_a + 1] the 2 r_a + 1 taps of every axis in
turn; tap o + r_a weighs the value o voxels further along axis a. With symmetric Gaussian taps
this is an exact, truncated Gaussian filter. adjoint: each axis's taps reversed, the adjoint
(the values' gradient). check_finite: values holding NaN or Inf are an InvalidArgument error
that gives the index of the first one (checked on the last pass's output, still in cache);
false lets them through (the registered gradient filters incoming gradients so).
)doc");

REGISTER_OP("Crf3dSeparableFilterTapsGrad")
    .Input("values: T")
    .Input("grad: T")
    .Input("taps: T")
    .Input("radii: int32")
    .Attr("T: {float, double}")
    .Output("taps_grad: T")
    .SetShapeFn([](InferenceContext* c) -> Status {
      c->set_output(0, c->input(2));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
The gradient of sum(grad * Crf3dSeparableFilter(values, taps, radii)) with respect to taps
(same shape as taps): for axis a and offset o, sum over voxels and channels of grad times
values shifted by o along a and filtered along every other axis. Summed in double.
)doc");

}  // namespace crf3d

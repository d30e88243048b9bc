// CPU kernels of the lattice and separable-filter ops: validation, allocation and the call into
// the framework-free core (../csrc). Registrations and shape functions: ops.cc.
#include <algorithm>
#include <limits>
#include <new>
#include <vector>

#include "adapter.h"
#include "gaussian.h"
#include "permutohedral.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace crf3d {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using tf_adapter::CheckGridShape;
using tf_adapter::GridOf;
using tf_adapter::MemoryBudget;
using tf_adapter::NonFiniteError;
using tf_adapter::ReadLattice;
using tf_adapter::ReadTaps;
using tf_adapter::ShapeText;
using tf_adapter::TfParallel;
using tf_adapter::ToTf;
namespace errors = ::tensorflow::errors;

class LatticeBuildOp : public OpKernel {
 public:
  explicit LatticeBuildOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("blur_passes", &blur_passes_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const TensorShape& shape = features.shape();
    OP_REQUIRES(ctx, shape.dims() >= 3,
                errors::InvalidArgument(
                    "features must have shape [batch, *spatial, channels] with at least one "
                    "spatial dimension (rank >= 3); got shape ",
                    ShapeText(shape)));
    const int64_t batch = shape.dim_size(0);
    const int64_t d = shape.dim_size(shape.dims() - 1);
    const int64_t n = shape.num_elements() / std::max<int64_t>(1, batch * d);
    OP_REQUIRES(ctx, d >= 1,
                errors::InvalidArgument("features has 0 channels (shape ", ShapeText(shape),
                                        "); at least one feature channel is needed"));
    OP_REQUIRES(ctx, batch >= 1 && shape.num_elements() > 0,
                errors::InvalidArgument("features has no voxels (shape ", ShapeText(shape),
                                        "); batch and spatial sizes must be >= 1"));
    const int64_t d1 = d + 1;
    const int64_t entries = batch * n * d1;
    OP_REQUIRES(ctx, entries <= std::numeric_limits<int32_t>::max(),
                errors::ResourceExhausted(
                    "features: batch * voxels * (channels + 1) = ", entries,
                    " lattice entries exceed the int32 index range (2^31 - 1); filter fewer "
                    "or smaller images at a time"));

    // Memory: the per-entry arrays (index, weight, splat list) are fixed by the input; what is
    // left of the budget bounds the number of lattice points.
    const int64_t budget = MemoryBudget();
    // Per entry: vertex_index, vertex_weight, splat_voxels and splat_weights. Per point: its
    // key and two hash slots (wide keys: d int32 and two 8-byte slots; packed keys: one 8-byte
    // code and two 16-byte slots; the larger of the two), blur neighbours, CSR offset and up to
    // kMaxSplatParts counting-sort cursors.
    const int64_t fixed = entries * 16 + shape.num_elements() * 4;
    const int64_t key = std::max<int64_t>(d * 4 + 2 * 8, 8 + 2 * 16);
    const int64_t per_point = key + d1 * 8 + 4 + kMaxSplatParts * 4;
    OP_REQUIRES(ctx, fixed < budget,
                errors::ResourceExhausted("features of shape ", ShapeText(shape), " need ",
                                          fixed, " bytes of lattice entries, more than the ",
                                          budget, "-byte memory budget"));
    const int64_t max_points = std::min<int64_t>((budget - fixed) / per_point,
                                                 std::numeric_limits<int32_t>::max() - 1);

    TensorShape vertex_shape = shape;
    vertex_shape.set_dim(shape.dims() - 1, d1);
    Tensor* vertex_index = nullptr;
    Tensor* vertex_weight = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, vertex_shape, &vertex_index));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, vertex_shape, &vertex_weight));
    int32_t* vi = vertex_index->flat<int32_t>().data();
    float* vw = vertex_weight->flat<float>().data();
    const float* f = features.flat<float>().data();

    const TfParallel par(ctx);
    std::vector<LatticeBuilder> builders(static_cast<size_t>(batch));
    std::vector<int32_t> base(static_cast<size_t>(batch) + 1, 0);
    try {
      for (int64_t b = 0; b < batch; ++b) {
        const crf3d::Status s =
            builders[b].Build(f + b * n * d, n, static_cast<int>(d), max_points - base[b],
                              base[b], vi + b * n * d1, vw + b * n * d1, par, blur_passes_);
        OP_REQUIRES_OK(ctx, ToTf(s));
        base[b + 1] = base[b] + static_cast<int32_t>(builders[b].num_points());
      }
    } catch (const std::bad_alloc&) {
      ctx->SetStatus(errors::ResourceExhausted("features of shape ", ShapeText(shape),
                                               ": out of memory while building the lattice"));
      return;
    }
    const int64_t m = base[batch];

    Tensor* nbrs = nullptr;
    Tensor* offsets = nullptr;
    Tensor* splat_voxels = nullptr;
    Tensor* splat_weights = nullptr;
    // The splat lists only where the splat needs them (SplatNeedsLists); otherwise the three
    // splat outputs are empty and the filter splats without lists.
    const bool lists = SplatNeedsLists(batch * n, static_cast<int>(d), m);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({d1, m, 2}), &nbrs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({lists ? m + 1 : 0}), &offsets));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({lists ? entries : 0}), &splat_voxels));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(5, TensorShape({lists ? entries : 0}), &splat_weights));
    for (int64_t b = 0; b < batch; ++b) {
      builders[b].BlurNeighbours(m, base[b], nbrs->flat<int32_t>().data(), par);
    }
    builders.clear();
    if (!lists) return;
    try {
      BuildSplatCsr(vi, vw, batch * n, static_cast<int>(d), m, offsets->flat<int32_t>().data(),
                    splat_voxels->flat<int32_t>().data(), splat_weights->flat<float>().data(), par);
    } catch (const std::bad_alloc&) {
      ctx->SetStatus(errors::ResourceExhausted("features of shape ", ShapeText(shape),
                                               ": out of memory while listing splat entries"));
    }
  }

 private:
  int blur_passes_ = 1;
};

class LatticeFilterOp : public OpKernel {
 public:
  explicit LatticeFilterOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("check_finite", &check_finite_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("blur_passes", &blur_passes_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values = ctx->input(0);
    const Tensor& features = ctx->input(1);
    const TensorShape& vs = values.shape();
    OP_REQUIRES(ctx, vs.dims() >= 3,
                errors::InvalidArgument(
                    "values must have shape [batch, *spatial, channels] with at least one "
                    "spatial dimension (rank >= 3); got shape ",
                    ShapeText(vs)));
    const int64_t channels = vs.dim_size(vs.dims() - 1);
    OP_REQUIRES(ctx, channels >= 1,
                errors::InvalidArgument("values has 0 channels (shape ", ShapeText(vs),
                                        "); at least one value channel is needed"));
    OP_REQUIRES(ctx, channels <= std::numeric_limits<int>::max(),
                errors::InvalidArgument("values has too many channels: ", channels));
    LatticeView lat;
    OP_REQUIRES_OK(ctx, ReadLattice(ctx, 2, vs, "values", &lat));
    lat.blur_passes = blur_passes_;
    const TensorShape& fs = features.shape();
    const TensorShape& is = ctx->input(2).shape();
    bool features_match = fs.dims() == is.dims() && fs.dim_size(fs.dims() - 1) == lat.d;
    for (int i = 0; features_match && i < is.dims() - 1; ++i) {
      features_match = fs.dim_size(i) == is.dim_size(i);
    }
    OP_REQUIRES(ctx, features_match,
                errors::InvalidArgument("features of shape ", ShapeText(fs),
                                        " are not the features this lattice was built from "
                                        "(vertex_index has shape ",
                                        ShapeText(is), ", so features need ", lat.d,
                                        " channels on the same grid)"));

    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, vs, &output));
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT,
                                           TensorShape({FilterScratchSize(lat, static_cast<int>(channels))}),
                                           &scratch));
    int64_t first_nonfinite = -1;
    const crf3d::Status s =
        Filter(lat, values.flat<float>().data(), static_cast<int>(channels), reverse_,
               output->flat<float>().data(), scratch.flat<float>().data(), TfParallel(ctx),
               check_finite_ ? &first_nonfinite : nullptr);
    OP_REQUIRES(ctx, first_nonfinite < 0, NonFiniteError("values", vs, first_nonfinite));
    OP_REQUIRES_OK(ctx, ToTf(s));
  }

 private:
  bool reverse_ = false;
  bool check_finite_ = true;
  int blur_passes_ = 1;
};

template <typename T>
class SeparableFilterOp : public OpKernel {
 public:
  explicit SeparableFilterOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("adjoint", &adjoint_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("check_finite", &check_finite_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values = ctx->input(0);
    const TensorShape& shape = values.shape();
    OP_REQUIRES_OK(ctx, CheckGridShape(shape, "values"));
    const Grid grid = GridOf(shape);
    std::vector<AxisTaps<T>> axes;
    OP_REQUIRES_OK(ctx, ReadTaps<T>(ctx->input(1), ctx->input(2),
                                    static_cast<int>(grid.spatial.size()), adjoint_,
                                    "separable filter", &axes));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &output));
    if (shape.num_elements() == 0) return;
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value, shape,
                                           &scratch));
    int64_t first_nonfinite = -1;
    const crf3d::Status s = SeparableCorrelate<T>(
        grid, axes, values.flat<T>().data(), output->flat<T>().data(), scratch.flat<T>().data(),
        TfParallel(ctx), check_finite_ ? &first_nonfinite : nullptr);
    OP_REQUIRES(ctx, first_nonfinite < 0, NonFiniteError("values", shape, first_nonfinite));
    OP_REQUIRES_OK(ctx, ToTf(s));
  }

 private:
  bool adjoint_ = false;
  bool check_finite_ = true;
};

template <typename T>
class SeparableFilterTapsGradOp : public OpKernel {
 public:
  explicit SeparableFilterTapsGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values = ctx->input(0);
    const Tensor& grad = ctx->input(1);
    const TensorShape& shape = values.shape();
    OP_REQUIRES_OK(ctx, CheckGridShape(shape, "values"));
    OP_REQUIRES(ctx, grad.shape() == shape,
                errors::InvalidArgument("grad must have the shape of values ", ShapeText(shape),
                                        "; got ", ShapeText(grad.shape())));
    const Grid grid = GridOf(shape);
    std::vector<AxisTaps<T>> axes;
    OP_REQUIRES_OK(ctx, ReadTaps<T>(ctx->input(2), ctx->input(3),
                                    static_cast<int>(grid.spatial.size()), false,
                                    "separable filter", &axes));
    Tensor* taps_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &taps_grad));
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                           TensorShape({2 * shape.num_elements()}), &scratch));
    OP_REQUIRES_OK(ctx, ToTf(SeparableTapsGradient<T>(
                            grid, axes, values.flat<T>().data(), grad.flat<T>().data(),
                            taps_grad->flat<T>().data(), scratch.flat<T>().data(),
                            TfParallel(ctx))));
  }
};

REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeBuild").Device(::tensorflow::DEVICE_CPU),
                        LatticeBuildOp);
REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeFilter").Device(::tensorflow::DEVICE_CPU),
                        LatticeFilterOp);
#define CRF3D_REGISTER_SEPARABLE(T)                                                         \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Crf3dSeparableFilter").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      SeparableFilterOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(Name("Crf3dSeparableFilterTapsGrad")                              \
                              .Device(::tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<T>("T"),                                      \
                          SeparableFilterTapsGradOp<T>);
CRF3D_REGISTER_SEPARABLE(float)
CRF3D_REGISTER_SEPARABLE(double)
#undef CRF3D_REGISTER_SEPARABLE

}  // namespace crf3d

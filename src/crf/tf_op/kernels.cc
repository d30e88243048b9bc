// CPU kernel of the fused mean-field op: validation, allocation and the call into the
// framework-free core (../csrc/mean_field.cc). Registration and shape function: ops.cc.
#include <new>
#include <string>
#include <vector>

#include "adapter.h"
#include "gaussian.h"
#include "mean_field.h"
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
using tf_adapter::ReadLattice;
using tf_adapter::ReadTaps;
using tf_adapter::ShapeText;
using tf_adapter::TfParallel;
using tf_adapter::ToTf;
namespace errors = ::tensorflow::errors;

class MeanFieldOp : public OpKernel {
 public:
  explicit MeanFieldOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_iterations", &iterations_));
    std::string normalisation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("normalisation", &normalisation));
    symmetric_ = normalisation == "symmetric";
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_logits", &output_logits_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& unaries = ctx->input(0);
    const TensorShape& shape = unaries.shape();
    OP_REQUIRES_OK(ctx, CheckGridShape(shape, "unaries"));
    OP_REQUIRES(ctx, shape.num_elements() > 0,
                errors::InvalidArgument("unaries has no voxels (shape ", ShapeText(shape), ")"));
    const Grid grid = GridOf(shape);
    const int64_t k = grid.channels;
    LatticeView lat;
    OP_REQUIRES_OK(ctx, ReadLattice(ctx, 1, shape, "unaries", &lat));
    const Tensor& w1 = ctx->input(7);
    const Tensor& w2 = ctx->input(8);
    const Tensor& mu = ctx->input(9);
    std::vector<AxisTaps<float>> axes;
    OP_REQUIRES_OK(ctx, ReadTaps<float>(ctx->input(10), ctx->input(11),
                                        static_cast<int>(grid.spatial.size()), false,
                                        "spatial kernel", &axes));
    OP_REQUIRES(ctx, w1.shape() == TensorShape({k}) && w2.shape() == TensorShape({k}),
                errors::InvalidArgument("bilateral_weight and spatial_weight must have shape [",
                                        k, "] (one per class); got ", ShapeText(w1.shape()),
                                        " and ", ShapeText(w2.shape())));
    OP_REQUIRES(ctx, mu.shape() == TensorShape({k, k}),
                errors::InvalidArgument("compatibility must have shape [", k, ", ", k,
                                        "]; got ", ShapeText(mu.shape())));
    Tensor* logits = nullptr;
    Tensor* probabilities = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, output_logits_ ? shape : TensorShape({0}),
                                             &logits));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, shape, &probabilities));
    MeanFieldParams params;
    params.num_iterations = iterations_;
    params.symmetric = symmetric_;
    params.bilateral_weight = w1.flat<float>().data();
    params.spatial_weight = w2.flat<float>().data();
    params.compatibility = mu.flat<float>().data();
    try {
      OP_REQUIRES_OK(ctx, ToTf(MeanFieldInference(grid, unaries.flat<float>().data(), lat, axes,
                                                  params,
                                                  output_logits_ ? logits->flat<float>().data()
                                                                 : nullptr,
                                                  probabilities->flat<float>().data(),
                                                  TfParallel(ctx))));
    } catch (const std::bad_alloc&) {
      ctx->SetStatus(errors::ResourceExhausted("unaries of shape ", ShapeText(shape),
                                               ": out of memory for the mean-field buffers"));
    }
  }

 private:
  int iterations_ = 1;
  bool symmetric_ = false;
  bool output_logits_ = true;
};

REGISTER_KERNEL_BUILDER(Name("Crf3dMeanField").Device(::tensorflow::DEVICE_CPU), MeanFieldOp);

}  // namespace crf3d

// CPU kernels of the lattice ops: validation, allocation and the call into the core. The
// algorithm itself lives in permutohedral.cc.
#include <unistd.h>

#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "permutohedral.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace crf3d {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

namespace {

// The core's parallel-for, served by TensorFlow's intra-op thread pool.
class TfParallel final : public Parallel {
 public:
  explicit TfParallel(OpKernelContext* ctx)
      : pool_(ctx->device()->tensorflow_cpu_worker_threads()->workers) {}
  int num_threads() const override { return pool_->NumThreads(); }
  void For(int64_t n, int64_t cost_per_unit, const RangeFn& fn) const override {
    if (n <= 0) return;
    pool_->ParallelFor(n, cost_per_unit, [&fn](int64_t b, int64_t e) { fn(b, e); });
  }

 private:
  ::tensorflow::thread::ThreadPool* pool_;
};

::tensorflow::Status ToTf(const crf3d::Status& s) {
  switch (s.code) {
    case crf3d::Status::Code::kOk:
      return ::tensorflow::OkStatus();
    case crf3d::Status::Code::kInvalidArgument:
      return errors::InvalidArgument(s.message);
    case crf3d::Status::Code::kResourceExhausted:
      return errors::ResourceExhausted(s.message);
  }
  return errors::Internal(s.message);
}

// Bytes the lattice may take: CRF3D_LATTICE_MAX_BYTES if set, else the machine's memory.
int64_t MemoryBudget() {
  if (const char* env = std::getenv("CRF3D_LATTICE_MAX_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v > 0) return static_cast<int64_t>(v);
  }
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<int64_t>(pages) * page;
  return std::numeric_limits<int64_t>::max();
}

std::string ShapeText(const TensorShape& s) { return s.DebugString(); }

}  // namespace

class LatticeBuildOp : public OpKernel {
 public:
  explicit LatticeBuildOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

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
    // key, two hash slots, blur neighbours, CSR offset and up to 16 counting-sort cursors.
    const int64_t fixed = entries * 16 + shape.num_elements() * 4;
    const int64_t per_point = d * 4 + 16 + d1 * 8 + 4 + 16 * 4;
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
                              base[b], vi + b * n * d1, vw + b * n * d1, par);
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({d1, m, 2}), &nbrs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({m + 1}), &offsets));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({entries}), &splat_voxels));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({entries}), &splat_weights));
    for (int64_t b = 0; b < batch; ++b) {
      builders[b].BlurNeighbours(m, base[b], nbrs->flat<int32_t>().data(), par);
    }
    builders.clear();
    try {
      BuildSplatCsr(vi, vw, batch * n, static_cast<int>(d), m, offsets->flat<int32_t>().data(),
                    splat_voxels->flat<int32_t>().data(), splat_weights->flat<float>().data(), par);
    } catch (const std::bad_alloc&) {
      ctx->SetStatus(errors::ResourceExhausted("features of shape ", ShapeText(shape),
                                               ": out of memory while listing splat entries"));
    }
  }
};

class LatticeFilterOp : public OpKernel {
 public:
  explicit LatticeFilterOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values = ctx->input(0);
    const Tensor& features = ctx->input(1);
    const Tensor& vertex_index = ctx->input(2);
    const Tensor& vertex_weight = ctx->input(3);
    const Tensor& nbrs = ctx->input(4);
    const Tensor& offsets = ctx->input(5);
    const Tensor& splat_voxels = ctx->input(6);
    const Tensor& splat_weights = ctx->input(7);
    const TensorShape& vs = values.shape();
    const TensorShape& is = vertex_index.shape();
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
    bool same_grid = is.dims() == vs.dims();
    for (int i = 0; same_grid && i < vs.dims() - 1; ++i) {
      same_grid = is.dim_size(i) == vs.dim_size(i);
    }
    OP_REQUIRES(ctx, same_grid,
                errors::InvalidArgument(
                    "values of shape ", ShapeText(vs),
                    " do not match the lattice's batch and spatial shape (vertex_index has "
                    "shape ",
                    ShapeText(is), ")"));
    const int64_t d1 = is.dim_size(is.dims() - 1);
    const TensorShape& fs = features.shape();
    bool features_match = fs.dims() == is.dims() && fs.dim_size(fs.dims() - 1) == d1 - 1;
    for (int i = 0; features_match && i < is.dims() - 1; ++i) {
      features_match = fs.dim_size(i) == is.dim_size(i);
    }
    OP_REQUIRES(ctx, features_match,
                errors::InvalidArgument("features of shape ", ShapeText(fs),
                                        " are not the features this lattice was built from "
                                        "(vertex_index has shape ",
                                        ShapeText(is), ", so features need ", d1 - 1,
                                        " channels on the same grid)"));
    OP_REQUIRES(ctx, d1 >= 2 && vertex_weight.shape() == is,
                errors::InvalidArgument("vertex_weight must have the shape of vertex_index ",
                                        ShapeText(is), "; got ",
                                        ShapeText(vertex_weight.shape())));
    OP_REQUIRES(ctx,
                nbrs.dims() == 3 && nbrs.dim_size(0) == d1 && nbrs.dim_size(2) == 2,
                errors::InvalidArgument("blur_neighbours must have shape [", d1,
                                        ", points, 2]; got ", ShapeText(nbrs.shape())));
    const int64_t m = nbrs.dim_size(1);
    OP_REQUIRES(ctx, offsets.dims() == 1 && offsets.dim_size(0) == m + 1,
                errors::InvalidArgument("splat_offsets must have shape [", m + 1, "]; got ",
                                        ShapeText(offsets.shape())));
    const int64_t voxels = is.num_elements() / d1;
    OP_REQUIRES(ctx, splat_voxels.dims() == 1 && splat_voxels.dim_size(0) == voxels * d1,
                errors::InvalidArgument("splat_voxels must have shape [", voxels * d1,
                                        "]; got ", ShapeText(splat_voxels.shape())));
    OP_REQUIRES(ctx, splat_weights.shape() == splat_voxels.shape(),
                errors::InvalidArgument("splat_weights must have shape [", voxels * d1,
                                        "]; got ", ShapeText(splat_weights.shape())));

    LatticeView lat;
    lat.num_voxels = voxels;
    lat.d = static_cast<int>(d1 - 1);
    lat.num_points = m;
    lat.vertex_index = vertex_index.flat<int32_t>().data();
    lat.vertex_weight = vertex_weight.flat<float>().data();
    lat.blur_neighbours = nbrs.flat<int32_t>().data();
    lat.splat_offsets = offsets.flat<int32_t>().data();
    lat.splat_voxels = splat_voxels.flat<int32_t>().data();
    lat.splat_weights = splat_weights.flat<float>().data();

    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, vs, &output));
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT,
                                           TensorShape({FilterScratchSize(lat, static_cast<int>(channels))}),
                                           &scratch));
    OP_REQUIRES_OK(ctx, ToTf(Filter(lat, values.flat<float>().data(), static_cast<int>(channels),
                                    reverse_, output->flat<float>().data(),
                                    scratch.flat<float>().data(), TfParallel(ctx))));
  }

 private:
  bool reverse_ = false;
};

REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeBuild").Device(::tensorflow::DEVICE_CPU),
                        LatticeBuildOp);
REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeFilter").Device(::tensorflow::DEVICE_CPU),
                        LatticeFilterOp);

}  // namespace crf3d

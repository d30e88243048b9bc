// CPU kernels of the lattice ops: validation, allocation and the call into the core. The
// algorithm itself lives in permutohedral.cc.
#include <unistd.h>

#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "gaussian.h"
#include "mean_field.h"
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

// Checks the six lattice tensors at inputs first .. first + 5 (vertex_index, vertex_weight,
// blur_neighbours, splat_offsets, splat_voxels, splat_weights) against a [B, *spatial, C]
// tensor of shape `grid` (named `what` in messages) and points *lat at them.
::tensorflow::Status ReadLattice(OpKernelContext* ctx, int first, const TensorShape& grid,
                                 const char* what, LatticeView* lat) {
  const Tensor& vertex_index = ctx->input(first);
  const Tensor& vertex_weight = ctx->input(first + 1);
  const Tensor& nbrs = ctx->input(first + 2);
  const Tensor& offsets = ctx->input(first + 3);
  const Tensor& splat_voxels = ctx->input(first + 4);
  const Tensor& splat_weights = ctx->input(first + 5);
  const TensorShape& is = vertex_index.shape();
  bool same_grid = is.dims() == grid.dims() && is.dims() >= 2;
  for (int i = 0; same_grid && i < grid.dims() - 1; ++i) {
    same_grid = is.dim_size(i) == grid.dim_size(i);
  }
  if (!same_grid) {
    return errors::InvalidArgument(what, " of shape ", ShapeText(grid),
                                   " do not match the lattice's batch and spatial shape "
                                   "(vertex_index has shape ",
                                   ShapeText(is), ")");
  }
  const int64_t d1 = is.dim_size(is.dims() - 1);
  if (d1 < 2 || vertex_weight.shape() != is) {
    return errors::InvalidArgument("vertex_weight must have the shape of vertex_index ",
                                   ShapeText(is), "; got ", ShapeText(vertex_weight.shape()));
  }
  if (nbrs.dims() != 3 || nbrs.dim_size(0) != d1 || nbrs.dim_size(2) != 2) {
    return errors::InvalidArgument("blur_neighbours must have shape [", d1,
                                   ", points, 2]; got ", ShapeText(nbrs.shape()));
  }
  const int64_t m = nbrs.dim_size(1);
  if (offsets.dims() != 1 || offsets.dim_size(0) != m + 1) {
    return errors::InvalidArgument("splat_offsets must have shape [", m + 1, "]; got ",
                                   ShapeText(offsets.shape()));
  }
  const int64_t voxels = is.num_elements() / d1;
  if (splat_voxels.dims() != 1 || splat_voxels.dim_size(0) != voxels * d1) {
    return errors::InvalidArgument("splat_voxels must have shape [", voxels * d1, "]; got ",
                                   ShapeText(splat_voxels.shape()));
  }
  if (splat_weights.shape() != splat_voxels.shape()) {
    return errors::InvalidArgument("splat_weights must have shape [", voxels * d1, "]; got ",
                                   ShapeText(splat_weights.shape()));
  }
  lat->num_voxels = voxels;
  lat->d = static_cast<int>(d1 - 1);
  lat->num_points = m;
  lat->vertex_index = vertex_index.flat<int32_t>().data();
  lat->vertex_weight = vertex_weight.flat<float>().data();
  lat->blur_neighbours = nbrs.flat<int32_t>().data();
  lat->splat_offsets = offsets.flat<int32_t>().data();
  lat->splat_voxels = splat_voxels.flat<int32_t>().data();
  lat->splat_weights = splat_weights.flat<float>().data();
  return ::tensorflow::OkStatus();
}

// The per-axis kernels of a separable filter from an op's attributes: radii [n] and the taps of
// every axis one after the other (sum of 2 r + 1 floats).
::tensorflow::Status ParseTaps(const std::vector<float>& taps, const std::vector<int>& radii,
                               int spatial_dims, const char* what, std::vector<AxisTaps>* axes) {
  if (static_cast<int>(radii.size()) != spatial_dims) {
    return errors::InvalidArgument(what, ": ", radii.size(), " radii for ", spatial_dims,
                                   " spatial axes; one radius per spatial axis is needed");
  }
  size_t at = 0;
  axes->clear();
  for (int r : radii) {
    if (r < 0) return errors::InvalidArgument(what, ": radii must be >= 0; got ", r);
    const size_t count = 2 * static_cast<size_t>(r) + 1;
    if (at + count > taps.size()) break;
    AxisTaps axis;
    axis.radius = r;
    axis.taps.assign(taps.begin() + static_cast<std::ptrdiff_t>(at),
                     taps.begin() + static_cast<std::ptrdiff_t>(at + count));
    axes->push_back(std::move(axis));
    at += count;
  }
  if (axes->size() != radii.size() || at != taps.size()) {
    size_t needed = 0;
    for (int r : radii) needed += 2 * static_cast<size_t>(std::max(r, 0)) + 1;
    return errors::InvalidArgument(what, ": the radii need ", needed,
                                   " taps (2 r + 1 per axis); got ", taps.size());
  }
  return ::tensorflow::OkStatus();
}

// Reads a [batch, *spatial, channels] shape into a Grid (rank >= 3, checked by the caller).
Grid GridOf(const TensorShape& shape) {
  Grid grid;
  grid.batch = shape.dim_size(0);
  for (int i = 1; i < shape.dims() - 1; ++i) grid.spatial.push_back(shape.dim_size(i));
  grid.channels = shape.dim_size(shape.dims() - 1);
  return grid;
}

::tensorflow::Status CheckGridShape(const TensorShape& shape, const char* what) {
  if (shape.dims() < 3) {
    return errors::InvalidArgument(what,
                                   " must have shape [batch, *spatial, channels] with at least "
                                   "one spatial dimension (rank >= 3); got shape ",
                                   ShapeText(shape));
  }
  if (shape.dim_size(shape.dims() - 1) < 1) {
    return errors::InvalidArgument(what, " has 0 channels (shape ", ShapeText(shape), ")");
  }
  return ::tensorflow::OkStatus();
}
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
    OP_REQUIRES_OK(ctx, ToTf(Filter(lat, values.flat<float>().data(), static_cast<int>(channels),
                                    reverse_, output->flat<float>().data(),
                                    scratch.flat<float>().data(), TfParallel(ctx))));
  }

 private:
  bool reverse_ = false;
};

class SeparableFilterOp : public OpKernel {
 public:
  explicit SeparableFilterOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("taps", &taps_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("radii", &radii_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& values = ctx->input(0);
    const TensorShape& shape = values.shape();
    OP_REQUIRES_OK(ctx, CheckGridShape(shape, "values"));
    const Grid grid = GridOf(shape);
    std::vector<AxisTaps> axes;
    OP_REQUIRES_OK(ctx, ParseTaps(taps_, radii_, static_cast<int>(grid.spatial.size()),
                                  "separable filter", &axes));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &output));
    if (shape.num_elements() == 0) return;
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT, shape, &scratch));
    OP_REQUIRES_OK(ctx, ToTf(SeparableCorrelate(grid, axes, values.flat<float>().data(),
                                                output->flat<float>().data(),
                                                scratch.flat<float>().data(), TfParallel(ctx))));
  }

 private:
  std::vector<float> taps_;
  std::vector<int> radii_;
};

class MeanFieldOp : public OpKernel {
 public:
  explicit MeanFieldOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_taps", &taps_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_radii", &radii_));
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
    std::vector<AxisTaps> axes;
    OP_REQUIRES_OK(ctx, ParseTaps(taps_, radii_, static_cast<int>(grid.spatial.size()),
                                  "spatial kernel", &axes));
    const Tensor& w1 = ctx->input(7);
    const Tensor& w2 = ctx->input(8);
    const Tensor& mu = ctx->input(9);
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
  std::vector<float> taps_;
  std::vector<int> radii_;
  int iterations_ = 1;
  bool symmetric_ = false;
  bool output_logits_ = true;
};

REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeBuild").Device(::tensorflow::DEVICE_CPU),
                        LatticeBuildOp);
REGISTER_KERNEL_BUILDER(Name("Crf3dLatticeFilter").Device(::tensorflow::DEVICE_CPU),
                        LatticeFilterOp);
REGISTER_KERNEL_BUILDER(Name("Crf3dSeparableFilter").Device(::tensorflow::DEVICE_CPU),
                        SeparableFilterOp);
REGISTER_KERNEL_BUILDER(Name("Crf3dMeanField").Device(::tensorflow::DEVICE_CPU), MeanFieldOp);

}  // namespace crf3d

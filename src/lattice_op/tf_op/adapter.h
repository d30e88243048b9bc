// What every TensorFlow kernel over the framework-free core shares: the core's parallel-for on
// TensorFlow's intra-op threads, its Status as TensorFlow's, and the checks that read the
// lattice tensors, grid shapes and separable taps from a kernel's inputs with messages that
// name the tensor. Header-only, so that any op library that links the core can include it.
#ifndef CRF3D_TF_OP_ADAPTER_H_
#define CRF3D_TF_OP_ADAPTER_H_

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "gaussian.h"
#include "parallel.h"
#include "permutohedral.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace crf3d {
namespace tf_adapter {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

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

inline ::tensorflow::Status ToTf(const crf3d::Status& s) {
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
inline int64_t MemoryBudget() {
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

inline std::string ShapeText(const TensorShape& s) { return s.DebugString(); }

// The error for a NaN or Inf at flat index `flat` of a tensor of shape `shape` named `what`:
// "values contains NaN or Inf at [b, i, j, k, c] (shape [...]) ...".
inline ::tensorflow::Status NonFiniteError(const char* what, const TensorShape& shape,
                                           int64_t flat) {
  std::string index;
  int64_t rest = flat;
  std::vector<int64_t> coords(static_cast<size_t>(shape.dims()), 0);
  for (int i = shape.dims() - 1; i >= 0; --i) {
    const int64_t size = std::max<int64_t>(1, shape.dim_size(i));
    coords[static_cast<size_t>(i)] = rest % size;
    rest /= size;
  }
  for (size_t i = 0; i < coords.size(); ++i) {
    index += (i == 0 ? "" : ", ") + std::to_string(coords[i]);
  }
  return errors::InvalidArgument(what, " contains NaN or Inf at [", index, "] (shape ",
                                 ShapeText(shape),
                                 "); non-finite input is an error (docs/reliability.md)");
}

// Checks the six lattice tensors at inputs first .. first + 5 (vertex_index, vertex_weight,
// blur_neighbours, splat_offsets, splat_voxels, splat_weights) against a [B, *spatial, C]
// tensor of shape `grid` (named `what` in messages) and points *lat at them.
inline ::tensorflow::Status ReadLattice(OpKernelContext* ctx, int first, const TensorShape& grid,
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
  const int64_t voxels = is.num_elements() / d1;
  const bool no_lists = offsets.dims() == 1 && offsets.dim_size(0) == 0;
  if (no_lists) {  // a lattice whose splat needs no lists: all three splat tensors are empty
    if (splat_voxels.NumElements() != 0 || splat_weights.NumElements() != 0) {
      return errors::InvalidArgument(
          "splat_offsets is empty, so splat_voxels and splat_weights must be empty too; got "
          "shapes ",
          ShapeText(splat_voxels.shape()), " and ", ShapeText(splat_weights.shape()),
          " (pass the tensors of one lattice build unchanged)");
    }
  } else if (offsets.dims() != 1 || offsets.dim_size(0) != m + 1) {
    return errors::InvalidArgument("splat_offsets must have shape [", m + 1, "]; got ",
                                   ShapeText(offsets.shape()));
  }
  if (!no_lists && (splat_voxels.dims() != 1 || splat_voxels.dim_size(0) != voxels * d1)) {
    return errors::InvalidArgument("splat_voxels must have shape [", voxels * d1, "]; got ",
                                   ShapeText(splat_voxels.shape()));
  }
  if (!no_lists && splat_weights.shape() != splat_voxels.shape()) {
    return errors::InvalidArgument("splat_weights must have shape [", voxels * d1, "]; got ",
                                   ShapeText(splat_weights.shape()));
  }
  lat->num_voxels = voxels;
  lat->d = static_cast<int>(d1 - 1);
  lat->num_points = m;
  lat->vertex_index = vertex_index.flat<int32_t>().data();
  lat->vertex_weight = vertex_weight.flat<float>().data();
  lat->blur_neighbours = nbrs.flat<int32_t>().data();
  lat->splat_offsets = no_lists ? nullptr : offsets.flat<int32_t>().data();
  lat->splat_voxels = no_lists ? nullptr : splat_voxels.flat<int32_t>().data();
  lat->splat_weights = no_lists ? nullptr : splat_weights.flat<float>().data();
  return ::tensorflow::OkStatus();
}

// The per-axis kernels of a separable filter from two input tensors: radii int32 [n] (one per
// spatial axis) and taps T [sum_a 2 r_a + 1] (every axis's taps one after the other). With
// reverse, each axis's taps come out in reverse order (the filter's adjoint).
template <typename T>
::tensorflow::Status ReadTaps(const Tensor& taps, const Tensor& radii, int spatial_dims,
                              bool reverse, const char* what, std::vector<AxisTaps<T>>* axes) {
  if (taps.dims() != 1 || radii.dims() != 1) {
    return errors::InvalidArgument(what, ": taps and radii must be vectors; got shapes ",
                                   ShapeText(taps.shape()), " and ", ShapeText(radii.shape()));
  }
  const int64_t count = radii.dim_size(0);
  if (count != spatial_dims) {
    return errors::InvalidArgument(what, ": ", count, " radii for ", spatial_dims,
                                   " spatial axes; one radius per spatial axis is needed");
  }
  const auto r = radii.flat<int32_t>();
  const auto t = taps.flat<T>();
  int64_t needed = 0;
  for (int64_t a = 0; a < count; ++a) {
    if (r(a) < 0) return errors::InvalidArgument(what, ": radii must be >= 0; got ", r(a));
    needed += 2 * static_cast<int64_t>(r(a)) + 1;
  }
  if (needed != t.size()) {
    return errors::InvalidArgument(what, ": the radii need ", needed,
                                   " taps (2 r + 1 per axis); got ", t.size());
  }
  axes->clear();
  int64_t at = 0;
  for (int64_t a = 0; a < count; ++a) {
    AxisTaps<T> axis;
    axis.radius = r(a);
    const int64_t length = 2 * static_cast<int64_t>(r(a)) + 1;
    axis.taps.assign(t.data() + at, t.data() + at + length);
    if (reverse) std::reverse(axis.taps.begin(), axis.taps.end());
    axes->push_back(std::move(axis));
    at += length;
  }
  return ::tensorflow::OkStatus();
}

// Reads a [batch, *spatial, channels] shape into a Grid (rank >= 3, checked by the caller).
inline Grid GridOf(const TensorShape& shape) {
  Grid grid;
  grid.batch = shape.dim_size(0);
  for (int i = 1; i < shape.dims() - 1; ++i) grid.spatial.push_back(shape.dim_size(i));
  grid.channels = shape.dim_size(shape.dims() - 1);
  return grid;
}

inline ::tensorflow::Status CheckGridShape(const TensorShape& shape, const char* what) {
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

}  // namespace tf_adapter
}  // namespace crf3d

#endif  // CRF3D_TF_OP_ADAPTER_H_

// What every family's bindings share: Python arrays turned into what the kernels read (host
// arrays and __cuda_array_interface__ ones), the argument checks and their errors.
#ifndef FUSED_CONTRASTIVE_PYBIND_ARRAYS_H_
#define FUSED_CONTRASTIVE_PYBIND_ARRAYS_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/common/distance.h"
#include "core/common/dtypes.h"
#include "core/common/parallel.h"
#include "core/common/reduction.h"

namespace fused_contrastive {
namespace bindings {

namespace py = pybind11;

// Errors name the argument as Python callers spell it (`what`, `ref_what`): a
// wrong dtype is a TypeError, a wrong value or shape a ValueError.
DType DTypeFromName(const std::string& name, const char* what);
DType DTypeOfArray(const py::array& a, const char* what);
void CheckFloatDType(DType t, const char* what);
void CheckSameDType(const char* what, DType t, const char* ref_what, DType ref);
void CheckMargin(double margin, const char* what = "margin");
void CheckSimilarLabel(int similar_label);
Reduction ReductionFromName(const std::string& name);
Distance DistanceFromName(const std::string& name);

// 'a', 'b', 'c': the names of `values` (an enum's kAll… list), for messages.
template <typename Value, size_t N>
std::string QuotedNames(const Value (&values)[N], const char* (*name)(Value)) {
  std::string list;
  for (Value v : values) list += std::string(list.empty() ? "'" : ", '") + name(v) + "'";
  return list;
}

std::string ShapeString(const std::vector<int64_t>& shape);
std::vector<int64_t> ShapeOf(const py::array& a);
void CheckSameShape(const char* what, const std::vector<int64_t>& shape, const char* ref_what,
                    const std::vector<int64_t>& ref_shape);

// Elements of an array of `shape` whose bytes (elements * itemsize, itemsize
// > 0) fit in int64. NumPy vets its own shapes; a __cuda_array_interface__ is
// a plain dict, where a negative extent or a product that wraps would pass a
// huge array off as a small or empty one.
int64_t CheckedElementCount(const std::vector<int64_t>& shape, int64_t itemsize, const char* what);

// The kernels read raw pointers as the dtype's element type: every array must
// be in native byte order (dtypes are matched by name, which ignores it),
// aligned to its element type (the CPU kernel contract) and C-contiguous.
// NumPy copies only when one of these does not hold. Anything that cannot
// become an array is a TypeError naming the argument, never a null array.
py::array KernelArray(const py::handle& obj, const char* what);

// A per-row operand (sample weights, upstream gradients): a 0-d array for all
// rows or one value per row, of the dtype of the values it scales.
void CheckPerRow(const char* what, DType type, const std::vector<int64_t>& shape,
                 const char* values_what, DType values_type, const char* rows_what,
                 const std::vector<int64_t>& rows_shape);
py::array PerRowKernelArray(const py::object& obj, const char* what, DType values_type,
                            const char* values_what, const std::vector<int64_t>& rows_shape,
                            const char* rows_what);

// No sample weights mean one scalar weight of 1.
py::object WeightsOrOne(const py::object& sample_weight, const py::dtype& dtype);

// An argument as the checks see it, so that host and device arguments go
// through the same checks.
struct Operand {
  DType type;
  std::vector<int64_t> shape;
  const void* data;
};

Operand HostOperand(const py::array& a, const char* what);

// The ReductionArgs that every family's reduced-kernel arguments embed
// (ReducedLossArgs, ReducedEmbeddingArgs, InBatchReducedArgs), filled here
// alone for the module's five reduced entry points. weights: checked by
// CheckPerRow (0-d: one weight for all rows).
template <typename ReducedArgs>
void FillReduction(const Operand& weights, Reduction reduction, double loss_scale, void* loss,
                   double* reduction_scale, ReducedArgs* args) {
  args->reduction = ReductionArgs{weights.data, weights.shape.empty(), reduction, loss_scale,
                                  loss,         reduction_scale};
}

#if FC_WITH_CUDA
// A device buffer described by the __cuda_array_interface__ protocol (CuPy,
// PyTorch, Numba, JAX...). 16-bit brain floats have no typestr of their own:
// pass them as uint16 arrays with dtype="bfloat16".
struct DeviceBuffer {
  void* data;
  bool readonly;
  std::vector<int64_t> shape;
  py::dtype dtype;  // as the array describes itself (typestr)
  int64_t elements;
  int64_t bytes;
};

struct DeviceArray : DeviceBuffer {
  DType type;  // what the kernels read it as
};

// Any C-contiguous CUDA array, untyped. Unlike NumPy for host arrays, nothing
// upstream vouches for the interface's shape, strides or pointer.
DeviceBuffer DeviceBufferOf(const py::object& obj, const char* what);

// dtype_override (None or a dtype name) names the dtype where the typestr
// cannot ("bfloat16" on uint16).
DeviceArray FromCudaArrayInterface(const py::object& obj, const char* what,
                                   const py::object& dtype_override);

Operand DeviceOperand(const DeviceArray& a);

void CheckWritable(const DeviceBuffer& out, const char* what);

// A writable output of `shape` and of the dtype `type` of `type_what`.
void CheckDeviceOutput(const DeviceArray& out, const char* what, const std::vector<int64_t>& shape,
                       const char* shape_what, DType type, const char* type_what);

// The loss of a reduced kernel: one writable value of the dtype `type` of `type_what`.
void CheckReducedLoss(const DeviceArray& loss, DType type, const char* type_what);

// A kernel's workspace: at least `needed` writable bytes, where the kernels
// keep float64 values whatever the workspace's typestr.
void CheckWorkspace(const DeviceBuffer& ws, int64_t needed, const char* needed_what);

// reduction_scale and workspace of the reduced kernels: one writable float64
// and a workspace as CheckWorkspace wants it.
void CheckReducedScratch(const DeviceArray& s, const DeviceBuffer& ws, int64_t needed,
                         const char* needed_what);

// Python passes a cudaStream_t as an int (0: the legacy default stream).
inline void* StreamOf(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

void ThrowIfFailed(const GpuStatus& status);
#endif  // FC_WITH_CUDA

}  // namespace bindings
}  // namespace fused_contrastive

#endif  // FUSED_CONTRASTIVE_PYBIND_ARRAYS_H_

// Array conversion and argument checks shared by the three families' bindings: host arrays
// through NumPy, device arrays through __cuda_array_interface__.
#include "pybind/arrays.h"

#include <limits>
#include <optional>
#include <stdexcept>

#include "core/common/formula.h"

namespace fused_contrastive {
namespace bindings {

DType DTypeFromName(const std::string& name, const char* what) {
  for (DType t : kAllDTypes) {
    if (name == DTypeName(t)) return t;
  }
  throw py::type_error(std::string(what) + ": unsupported dtype " + name);
}

DType DTypeOfArray(const py::array& a, const char* what) {
  return DTypeFromName(py::str(a.dtype().attr("name")), what);
}

void CheckFloatDType(DType t, const char* what) {
  if (!IsDistanceDType(t)) {
    throw py::type_error(std::string(what) +
                         " must be float16, bfloat16, float32 or float64, got " + DTypeName(t));
  }
}

void CheckSameDType(const char* what, DType t, const char* ref_what, DType ref) {
  if (t != ref) {
    throw py::type_error(std::string(what) + " must have the dtype of " + ref_what + " (" +
                         DTypeName(ref) + "), got " + DTypeName(t));
  }
}

void CheckMargin(double margin, const char* what) {
  if (!IsValidMargin(margin)) {
    throw py::value_error(std::string(what) + " must be finite and non-negative, got " +
                          std::to_string(margin));
  }
}

void CheckSimilarLabel(int similar_label) {
  if (!IsValidSimilarLabel(similar_label)) {
    throw py::value_error("similar_label must be 0 or 1, got " + std::to_string(similar_label));
  }
}

Reduction ReductionFromName(const std::string& name) {
  Reduction reduction;
  if (!ParseReduction(name, &reduction)) {
    throw py::value_error("reduction must be 'sum', 'mean' or 'weighted_mean', got " + name);
  }
  return reduction;
}

Distance DistanceFromName(const std::string& name) {
  Distance distance;
  if (ParseDistance(name, &distance)) return distance;
  throw py::value_error("distance must be one of " + QuotedNames(kAllDistances, DistanceName) +
                        ", got '" + name + "'");
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return py::str(py::tuple(py::cast(shape)));
}

std::vector<int64_t> ShapeOf(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

void CheckSameShape(const char* what, const std::vector<int64_t>& shape, const char* ref_what,
                    const std::vector<int64_t>& ref_shape) {
  if (shape != ref_shape) {
    throw py::value_error(std::string(ref_what) + " and " + what +
                          " must have the same shape, got " + ref_what + " " +
                          ShapeString(ref_shape) + " and " + what + " " + ShapeString(shape));
  }
}

int64_t CheckedElementCount(const std::vector<int64_t>& shape, int64_t itemsize, const char* what) {
  int64_t bytes = itemsize;
  for (int64_t extent : shape) {
    if (extent < 0) {
      throw py::value_error(std::string(what) + ": negative extent in shape " + ShapeString(shape));
    }
    if (extent != 0 && bytes > std::numeric_limits<int64_t>::max() / extent) {
      throw py::value_error(std::string(what) + ": shape " + ShapeString(shape) +
                            " holds more bytes than int64 can count");
    }
    bytes *= extent;
  }
  return bytes / itemsize;
}

py::array KernelArray(const py::handle& obj, const char* what) {
  const py::module_ numpy = py::module_::import("numpy");
  try {
    const py::array a = numpy.attr("asarray")(obj);
    const py::object native = a.dtype().attr("newbyteorder")("=");
    // NumPy calls an empty array aligned wherever it points (a view at an
    // odd offset of a buffer): the kernels still form typed pointers and
    // references from it, so it gets a fresh, aligned allocation.
    if (a.size() == 0) return numpy.attr("empty")(a.attr("shape"), native);
    return numpy.attr("require")(a, native, "CA");
  } catch (py::error_already_set& e) {
    // Interrupts and exhausted memory say nothing about the argument.
    if (!e.matches(PyExc_Exception) || e.matches(PyExc_MemoryError)) throw;
    py::raise_from(e, PyExc_TypeError,
                   (std::string(what) + " cannot be converted to a NumPy array").c_str());
    throw py::error_already_set();
  }
}

void CheckPerRow(const char* what, DType type, const std::vector<int64_t>& shape,
                 const char* values_what, DType values_type, const char* rows_what,
                 const std::vector<int64_t>& rows_shape) {
  CheckSameDType(what, type, values_what, values_type);
  if (!shape.empty()) CheckSameShape(what, shape, rows_what, rows_shape);
}

py::array PerRowKernelArray(const py::object& obj, const char* what, DType values_type,
                            const char* values_what, const std::vector<int64_t>& rows_shape,
                            const char* rows_what) {
  const py::array a = KernelArray(obj, what);
  CheckPerRow(what, DTypeOfArray(a, what), ShapeOf(a), values_what, values_type, rows_what,
              rows_shape);
  return a;
}

py::object WeightsOrOne(const py::object& sample_weight, const py::dtype& dtype) {
  return sample_weight.is_none() ? py::module_::import("numpy").attr("ones")(py::tuple(), dtype)
                                 : sample_weight;
}

Operand HostOperand(const py::array& a, const char* what) {
  return Operand{DTypeOfArray(a, what), ShapeOf(a), a.data()};
}

#if FC_WITH_CUDA
DeviceBuffer DeviceBufferOf(const py::object& obj, const char* what) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    throw py::type_error(std::string(what) +
                         " must expose __cuda_array_interface__ (a CUDA array)");
  }
  DeviceBuffer out;
  std::optional<std::vector<int64_t>> strides;
  try {
    const py::dict cai = obj.attr("__cuda_array_interface__");
    const py::tuple data = cai["data"];
    out.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
    out.readonly = data[1].cast<bool>();
    out.shape = cai["shape"].cast<std::vector<int64_t>>();
    out.dtype = py::dtype(cai["typestr"].cast<std::string>());
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      strides = cai["strides"].cast<std::vector<int64_t>>();
    }
  } catch (const py::cast_error& e) {
    throw py::type_error(std::string(what) + ": malformed __cuda_array_interface__: " + e.what());
  }
  const int64_t itemsize = out.dtype.itemsize();
  if (itemsize <= 0) throw py::type_error(std::string(what) + ": typestr has no element size");
  // Device bytes cannot be swapped on the way in, as host arrays are.
  if (!out.dtype.attr("isnative").cast<bool>()) {
    throw py::type_error(std::string(what) + ": typestr " + std::string(py::str(out.dtype)) +
                         " is not in native byte order");
  }
  out.elements = CheckedElementCount(out.shape, itemsize, what);
  out.bytes = out.elements * itemsize;
  if (out.data == nullptr && out.elements > 0) {
    throw py::value_error(std::string(what) + ": null data pointer for a non-empty array");
  }
  if (reinterpret_cast<uintptr_t>(out.data) % itemsize != 0) {
    throw py::value_error(std::string(what) + ": data pointer is not aligned to its " +
                          std::to_string(itemsize) + "-byte elements");
  }
  if (strides && strides->size() != out.shape.size()) {
    throw py::value_error(std::string(what) + ": strides and shape differ in length");
  }
  // Strides, when given, must describe the C-contiguous layout; an empty
  // array has no element to misplace.
  if (strides && out.elements > 0) {
    int64_t expected = itemsize;
    for (size_t k = out.shape.size(); k-- > 0;) {
      if (out.shape[k] > 1 && (*strides)[k] != expected) {
        throw py::value_error(std::string(what) + " must be C-contiguous");
      }
      expected *= out.shape[k];
    }
  }
  return out;
}

DeviceArray FromCudaArrayInterface(const py::object& obj, const char* what,
                                   const py::object& dtype_override) {
  DeviceArray out{DeviceBufferOf(obj, what), DType::kBool};
  const std::string name = dtype_override.is_none() ? std::string(py::str(out.dtype.attr("name")))
                                                    : dtype_override.cast<std::string>();
  out.type = DTypeFromName(name, what);
  if (!dtype_override.is_none() &&
      out.dtype.itemsize() != py::dtype(name == "bfloat16" ? "uint16" : name).itemsize()) {
    throw py::type_error(std::string(what) + ": dtype override " + name +
                         " does not match the element size of the array");
  }
  return out;
}

Operand DeviceOperand(const DeviceArray& a) { return Operand{a.type, a.shape, a.data}; }

void CheckWritable(const DeviceBuffer& out, const char* what) {
  if (out.readonly) throw py::value_error(std::string(what) + " must be writable");
}

void CheckDeviceOutput(const DeviceArray& out, const char* what, const std::vector<int64_t>& shape,
                       const char* shape_what, DType type, const char* type_what) {
  CheckSameShape(what, out.shape, shape_what, shape);
  CheckSameDType(what, out.type, type_what, type);
  CheckWritable(out, what);
}

void CheckReducedLoss(const DeviceArray& loss, DType type, const char* type_what) {
  if (loss.elements != 1) throw py::value_error("loss must hold one value");
  CheckSameDType("loss", loss.type, type_what, type);
  CheckWritable(loss, "loss");
}

void CheckWorkspace(const DeviceBuffer& ws, int64_t needed, const char* needed_what) {
  if (ws.bytes < needed) {
    throw py::value_error(std::string("workspace is smaller than ") + needed_what);
  }
  if (reinterpret_cast<uintptr_t>(ws.data) % alignof(double) != 0) {
    throw py::value_error("workspace must be aligned to 8 bytes");
  }
  if (ws.readonly) throw py::value_error("workspace must be writable");
}

void CheckReducedScratch(const DeviceArray& s, const DeviceBuffer& ws, int64_t needed,
                         const char* needed_what) {
  if (s.type != DType::kFloat64 || s.elements != 1) {
    throw py::value_error("reduction_scale must hold one float64");
  }
  if (s.readonly || ws.readonly) {
    throw py::value_error("reduction_scale and workspace must be writable");
  }
  CheckWorkspace(ws, needed, needed_what);
}

void ThrowIfFailed(const GpuStatus& status) {
  if (!status.ok()) throw std::runtime_error(std::string("CUDA launch failed: ") + status.error);
}
#endif  // FC_WITH_CUDA

}  // namespace bindings
}  // namespace fused_contrastive

// pybind11 access to the raw kernels, so they can be tested and benchmarked
// where TensorFlow is absent (the GPU check machine has none).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/distances/kernels.h"
#include "core/pairs/kernels.h"
#include "core/in_batch/kernels.h"

namespace py = pybind11;

namespace fused_contrastive {
namespace {

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

void CheckMargin(double margin, const char* what = "margin") {
  if (!IsValidMargin(margin)) {
    throw py::value_error(std::string(what) + " must be finite and non-negative, got " +
                          std::to_string(margin));
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return py::str(py::tuple(py::cast(shape)));
}

void CheckSameShape(const char* what, const std::vector<int64_t>& shape, const char* ref_what,
                    const std::vector<int64_t>& ref_shape) {
  if (shape != ref_shape) {
    throw py::value_error(std::string(ref_what) + " and " + what +
                          " must have the same shape, got " + ref_what + " " +
                          ShapeString(ref_shape) + " and " + what + " " + ShapeString(shape));
  }
}

std::vector<int64_t> ShapeOf(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// Elements of an array of `shape` whose bytes (elements * itemsize, itemsize
// > 0) fit in int64. NumPy vets its own shapes; a __cuda_array_interface__ is
// a plain dict, where a negative extent or a product that wraps would pass a
// huge array off as a small or empty one.
int64_t CheckedElementCount(const std::vector<int64_t>& shape, int64_t itemsize,
                            const char* what) {
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

// The kernels read raw pointers as the dtype's element type: every array must
// be in native byte order (dtypes are matched by name, which ignores it),
// aligned to its element type (the CPU kernel contract) and C-contiguous.
// NumPy copies only when one of these does not hold. Anything that cannot
// become an array is a TypeError naming the argument, never a null array.
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

void CheckSimilarLabel(int similar_label) {
  if (!IsValidSimilarLabel(similar_label)) {
    throw py::value_error("similar_label must be 0 or 1, got " + std::to_string(similar_label));
  }
}

// A per-row operand (sample weights, upstream gradients): a 0-d array for all
// rows or one value per row, of the dtype of the values it scales.
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

// No sample weights mean one scalar weight of 1.
py::object WeightsOrOne(const py::object& sample_weight, const py::dtype& dtype) {
  return sample_weight.is_none() ? py::module_::import("numpy").attr("ones")(py::tuple(), dtype)
                                 : sample_weight;
}

py::tuple ContrastiveLossCpuNumpy(py::array labels, py::array distances, double margin,
                                  int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  labels = KernelArray(labels, "labels");
  distances = KernelArray(distances, "distances");
  const DType label_type = DTypeOfArray(labels, "labels");
  const DType distance_type = DTypeOfArray(distances, "distances");
  CheckFloatDType(distance_type, "distances");
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  py::array loss(distances.dtype(), shape);
  py::array grad(distances.dtype(), shape);
  const LossInputs in{label_type,    distance_type,
                      labels.data(), distances.data(),
                      CheckedElementCount(shape, distances.itemsize(), "distances"),
                      margin,        similar_label};
  void* out_loss = loss.mutable_data();
  void* out_grad = grad.mutable_data();
  {
    py::gil_scoped_release release;
    ContrastiveLossCpu(in, out_loss, out_grad, SerialFor);
  }
  return py::make_tuple(loss, grad);
}

Reduction ReductionFromName(const std::string& name) {
  Reduction reduction;
  if (!ParseReduction(name, &reduction)) {
    throw py::value_error("reduction must be 'sum', 'mean' or 'weighted_mean', got " + name);
  }
  return reduction;
}

py::tuple ContrastiveLossReducedCpuNumpy(py::array labels, py::array distances,
                                         const py::object& sample_weight, double margin,
                                         const std::string& reduction, double loss_scale,
                                         int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  labels = KernelArray(labels, "labels");
  distances = KernelArray(distances, "distances");
  ReducedLossArgs args;
  args.in.label_type = DTypeOfArray(labels, "labels");
  args.in.distance_type = DTypeOfArray(distances, "distances");
  CheckFloatDType(args.in.distance_type, "distances");
  const std::vector<int64_t> shape = ShapeOf(distances);
  CheckSameShape("distances", shape, "labels", ShapeOf(labels));
  const py::array weights =
      PerRowKernelArray(WeightsOrOne(sample_weight, distances.dtype()), "sample_weight",
                        args.in.distance_type, "distances", ShapeOf(labels), "labels");
  args.reduction.scalar_weight = weights.ndim() == 0;
  py::array loss(distances.dtype(), std::vector<int64_t>{});
  py::array grad(distances.dtype(), shape);
  double reduction_scale = 0;
  args.in.labels = labels.data();
  args.in.distances = distances.data();
  args.in.n = CheckedElementCount(shape, distances.itemsize(), "distances");
  args.in.margin = margin;
  args.in.similar_label = similar_label;
  args.reduction.weights = weights.data();
  args.reduction.kind = ReductionFromName(reduction);
  args.reduction.loss_scale = loss_scale;
  args.reduction.loss = loss.mutable_data();
  args.grad = grad.mutable_data();
  args.reduction.reduction_scale = &reduction_scale;
  {
    py::gil_scoped_release release;
    ContrastiveLossReducedCpu(args, SerialFor);
  }
  return py::make_tuple(loss, grad, reduction_scale);
}

Distance DistanceFromName(const std::string& name) {
  Distance distance;
  if (ParseDistance(name, &distance)) return distance;
  std::string valid;
  for (Distance k : kAllDistances) {
    valid += std::string(valid.empty() ? "'" : ", '") + DistanceName(k) + "'";
  }
  throw py::value_error("distance must be one of " + valid + ", got '" + name + "'");
}

// An argument as the embedding checks see it, so that host and device
// arguments go through the same checks.
struct Operand {
  DType type;
  std::vector<int64_t> shape;
  const void* data;
};

Operand HostOperand(const py::array& a, const char* what) {
  return Operand{DTypeOfArray(a, what), ShapeOf(a), a.data()};
}

// Embeddings are [..., D]: per-row operands (labels, weights, upstream) take
// the leading axes, which messages name so.
constexpr const char* kRowsWhat = "embeddings_a.shape[:-1]";

struct PairShape {
  std::vector<int64_t> rows_shape;
  int64_t rows;
  int64_t dim;
};

// Embeddings a and b: one floating dtype, one shape of rank >= 1 whose last
// axis (the embedding) is not empty.
PairShape CheckEmbeddings(const Operand& a, const Operand& b) {
  CheckFloatDType(a.type, "embeddings_a");
  CheckSameDType("embeddings_b", b.type, "embeddings_a", a.type);
  CheckSameShape("embeddings_b", b.shape, "embeddings_a", a.shape);
  if (a.shape.empty() || a.shape.back() < 1) {
    throw py::value_error("embeddings must have rank >= 1 and a non-empty last axis, got shape " +
                          ShapeString(a.shape));
  }
  const int64_t dim = a.shape.back();
  return PairShape{std::vector<int64_t>(a.shape.begin(), a.shape.end() - 1),
                   CheckedElementCount(a.shape, 1, "embeddings_a") / dim, dim};
}

// The loss kernels' inputs: checked embeddings and one label per row.
EmbeddingInputs CheckedEmbeddingInputs(const Operand& labels, const Operand& a, const Operand& b,
                                       double margin, Distance distance, int similar_label,
                                       PairShape* pair) {
  *pair = CheckEmbeddings(a, b);
  CheckSameShape("labels", labels.shape, kRowsWhat, pair->rows_shape);
  return EmbeddingInputs{labels.type, a.type,    labels.data, a.data, b.data,       pair->rows,
                         pair->dim,   pair->dim, margin,      similar_label, distance};
}

std::vector<int64_t> CoefficientsShape(const PairShape& pair, Distance distance) {
  std::vector<int64_t> shape = pair.rows_shape;
  shape.push_back(NumRowCoefficients(distance));
  return shape;
}

void CheckCoefficients(const Operand& coefficients, const PairShape& pair, Distance distance) {
  if (coefficients.type != DType::kFloat64) {
    throw py::type_error(std::string("coefficients must be float64, got ") +
                         DTypeName(coefficients.type));
  }
  const std::vector<int64_t> want = CoefficientsShape(pair, distance);
  if (coefficients.shape != want) {
    throw py::value_error("coefficients must have shape " + ShapeString(want) + " (" + kRowsWhat +
                          " + (" + std::to_string(want.back()) + ",) for distance '" +
                          DistanceName(distance) + "'), got " + ShapeString(coefficients.shape));
  }
}

py::tuple EmbeddingLossCpuNumpy(py::array labels, py::array embeddings_a, py::array embeddings_b,
                                double margin, const std::string& distance, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  labels = KernelArray(labels, "labels");
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  PairShape pair;
  const EmbeddingInputs in = CheckedEmbeddingInputs(
      HostOperand(labels, "labels"), HostOperand(embeddings_a, "embeddings_a"),
      HostOperand(embeddings_b, "embeddings_b"), margin, k, similar_label, &pair);
  py::array loss(embeddings_a.dtype(), pair.rows_shape);
  py::array_t<double> coefficients(CoefficientsShape(pair, k));
  void* out_loss = loss.mutable_data();
  double* out_coefficients = coefficients.mutable_data();
  {
    py::gil_scoped_release release;
    EmbeddingLossCpu(in, out_loss, out_coefficients, SerialFor);
  }
  return py::make_tuple(loss, coefficients);
}

py::tuple EmbeddingGradCpuNumpy(py::array embeddings_a, py::array embeddings_b,
                                py::array coefficients, const py::object& upstream,
                                const std::string& distance) {
  const Distance k = DistanceFromName(distance);
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  coefficients = KernelArray(coefficients, "coefficients");
  const Operand a = HostOperand(embeddings_a, "embeddings_a");
  const PairShape pair = CheckEmbeddings(a, HostOperand(embeddings_b, "embeddings_b"));
  CheckCoefficients(HostOperand(coefficients, "coefficients"), pair, k);
  const py::array up =
      PerRowKernelArray(upstream, "upstream", a.type, "embeddings_a", pair.rows_shape, kRowsWhat);
  py::array grad_a(embeddings_a.dtype(), a.shape);
  py::array grad_b(embeddings_a.dtype(), a.shape);
  const EmbeddingGradArgs args{a.type,
                               a.data,
                               embeddings_b.data(),
                               pair.rows,
                               pair.dim,
                               pair.dim,
                               k,
                               static_cast<const double*>(coefficients.data()),
                               up.data(),
                               up.ndim() == 0,
                               grad_a.mutable_data(),
                               grad_b.mutable_data()};
  {
    py::gil_scoped_release release;
    EmbeddingGradCpu(args, SerialFor);
  }
  return py::make_tuple(grad_a, grad_b);
}

py::tuple EmbeddingLossReducedCpuNumpy(py::array labels, py::array embeddings_a,
                                       py::array embeddings_b, const py::object& sample_weight,
                                       double margin, const std::string& distance,
                                       const std::string& reduction, double loss_scale,
                                       int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  ReducedEmbeddingArgs args;
  args.reduction.kind = ReductionFromName(reduction);
  labels = KernelArray(labels, "labels");
  embeddings_a = KernelArray(embeddings_a, "embeddings_a");
  embeddings_b = KernelArray(embeddings_b, "embeddings_b");
  PairShape pair;
  args.in = CheckedEmbeddingInputs(
      HostOperand(labels, "labels"), HostOperand(embeddings_a, "embeddings_a"),
      HostOperand(embeddings_b, "embeddings_b"), margin, k, similar_label, &pair);
  const py::array weights =
      PerRowKernelArray(WeightsOrOne(sample_weight, embeddings_a.dtype()), "sample_weight",
                        args.in.embedding_type, "embeddings_a", pair.rows_shape, "labels");
  py::array loss(embeddings_a.dtype(), std::vector<int64_t>{});
  py::array grad_a(embeddings_a.dtype(), ShapeOf(embeddings_a));
  py::array grad_b(embeddings_a.dtype(), ShapeOf(embeddings_a));
  double reduction_scale = 0;
  args.reduction.weights = weights.data();
  args.reduction.scalar_weight = weights.ndim() == 0;
  args.reduction.loss_scale = loss_scale;
  args.reduction.loss = loss.mutable_data();
  args.grad_a = grad_a.mutable_data();
  args.grad_b = grad_b.mutable_data();
  args.reduction.reduction_scale = &reduction_scale;
  {
    py::gil_scoped_release release;
    EmbeddingLossReducedCpu(args, SerialFor);
  }
  return py::make_tuple(loss, grad_a, grad_b, reduction_scale);
}

// The in-batch entries' options (host and CUDA alike): InBatchArgs with the
// margins, distance, pair weighting and block cap set, no operand yet.
InBatchArgs InBatchOptions(double margin, double positive_margin, const std::string& distance,
                           const std::string& pair_weighting, int64_t max_block_rows) {
  CheckMargin(margin);
  CheckMargin(positive_margin, "positive_margin");
  if (max_block_rows < 0) {
    throw py::value_error("max_block_rows must be >= 0 (0: the kernel's choice), got " +
                          std::to_string(max_block_rows));
  }
  const Distance k = DistanceFromName(distance);
  if (!IsInBatchDistance(k)) {
    throw py::value_error("the in-batch loss has no '" + distance + "' distance");
  }
  PairWeighting weighting;
  if (!ParsePairWeighting(pair_weighting, &weighting)) {
    throw py::value_error("pair_weighting must be 'uniform' or 'balanced', got '" +
                          pair_weighting + "'");
  }
  return InBatchArgs{DType::kFloat32, nullptr, nullptr, 0,       0,       margin, positive_margin,
                     k,               weighting, max_block_rows, nullptr, nullptr, nullptr};
}

// Embeddings [B, D] of float32 or float64: sets args' type, rows and dim.
void CheckInBatchEmbeddings(const Operand& embeddings, InBatchArgs* args) {
  if (!IsInBatchDType(embeddings.type)) {
    throw py::type_error(std::string("embeddings must be float32 or float64, got ") +
                         DTypeName(embeddings.type));
  }
  if (embeddings.shape.size() != 2) {
    throw py::value_error("embeddings must have shape [B, D], got " +
                          ShapeString(embeddings.shape));
  }
  args->type = embeddings.type;
  args->embeddings = embeddings.data;
  args->rows = embeddings.shape[0];
  args->dim = embeddings.shape[1];
}

// Class labels [B]: int64, or int32 too where the caller widens them (the
// kernels read int64).
void CheckInBatchLabels(const Operand& labels, const InBatchArgs& args, bool int32_ok) {
  if (labels.type != DType::kInt64 && !(int32_ok && labels.type == DType::kInt32)) {
    throw py::type_error(std::string("labels must be ") + (int32_ok ? "int32 or int64" : "int64") +
                         " class ids, got " + DTypeName(labels.type));
  }
  CheckSameShape("labels", labels.shape, "embeddings.shape[:1]", {args.rows});
}

// The upstream gradient: [B], of the embeddings' dtype.
void CheckInBatchUpstream(const Operand& upstream, const InBatchArgs& args) {
  CheckSameDType("upstream", upstream.type, "embeddings", args.type);
  CheckSameShape("upstream", upstream.shape, "embeddings.shape[:1]", {args.rows});
}

// The in-batch kernels' checked host arguments: embeddings [B, D]
// float32/float64, class labels [B] (made int64), margins and names; the
// upstream gradient, when given, [B] of the embeddings' dtype.
struct InBatchOperands {
  InBatchArgs args;
  py::array labels;
  py::array embeddings;
  py::array upstream;
};

InBatchOperands CheckedInBatchArgs(const py::object& labels, const py::object& embeddings,
                                   const py::object& upstream, double margin,
                                   double positive_margin, const std::string& distance,
                                   const std::string& pair_weighting, int64_t max_block_rows) {
  InBatchOperands out;
  out.args = InBatchOptions(margin, positive_margin, distance, pair_weighting, max_block_rows);
  out.embeddings = KernelArray(embeddings, "embeddings");
  CheckInBatchEmbeddings(HostOperand(out.embeddings, "embeddings"), &out.args);
  out.labels = KernelArray(labels, "labels");
  CheckInBatchLabels(HostOperand(out.labels, "labels"), out.args, /*int32_ok=*/true);
  out.labels = KernelArray(out.labels.attr("astype")("int64"), "labels");
  out.args.labels = static_cast<const int64_t*>(out.labels.data());
  if (!upstream.is_none()) {
    out.upstream = KernelArray(upstream, "upstream");
    CheckInBatchUpstream(HostOperand(out.upstream, "upstream"), out.args);
    out.args.upstream = out.upstream.data();
  }
  return out;
}

py::tuple InBatchLossCpuNumpy(const py::object& labels, const py::object& embeddings,
                              const py::object& upstream, double margin, double positive_margin,
                              const std::string& distance, const std::string& pair_weighting,
                              int64_t max_block_rows) {
  InBatchOperands in = CheckedInBatchArgs(labels, embeddings, upstream, margin, positive_margin,
                                          distance, pair_weighting, max_block_rows);
  py::array loss(in.embeddings.dtype(), std::vector<int64_t>{in.args.rows});
  py::object grad = py::none();
  in.args.loss = loss.mutable_data();
  if (!upstream.is_none()) {
    py::array g(in.embeddings.dtype(), ShapeOf(in.embeddings));
    in.args.grad = g.mutable_data();
    grad = g;
  }
  {
    py::gil_scoped_release release;
    InBatchLossCpu(in.args, SerialFor);
  }
  return py::make_tuple(loss, grad);
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

// The arrays both CUDA entry points take, checked: labels and distances of one
// shape, grad like distances, loss like distances (per-sample) or one value
// (reduced), outputs of the distances' dtype and writable.
struct CudaLossArrays {
  DeviceArray labels, distances, loss, grad;
};

CudaLossArrays ReadCudaLossArrays(const py::object& labels, const py::object& distances,
                                  const py::object& loss, const py::object& grad,
                                  const py::object& labels_dtype,
                                  const py::object& distances_dtype, bool reduced) {
  CudaLossArrays a{FromCudaArrayInterface(labels, "labels", labels_dtype),
                   FromCudaArrayInterface(distances, "distances", distances_dtype),
                   FromCudaArrayInterface(loss, "loss", distances_dtype),
                   FromCudaArrayInterface(grad, "grad", distances_dtype)};
  CheckFloatDType(a.distances.type, "distances");
  CheckSameShape("distances", a.distances.shape, "labels", a.labels.shape);
  CheckSameShape("grad", a.grad.shape, "distances", a.distances.shape);
  if (reduced) {
    if (a.loss.elements != 1) throw py::value_error("loss must hold one value");
  } else {
    CheckSameShape("loss", a.loss.shape, "distances", a.distances.shape);
  }
  if (a.loss.type != a.distances.type || a.grad.type != a.distances.type) {
    throw py::type_error("loss and grad must have the dtype of distances");
  }
  if (a.loss.readonly || a.grad.readonly) throw py::value_error("loss and grad must be writable");
  return a;
}

// A kernel's workspace: at least `needed` writable bytes, where the kernels
// keep float64 values whatever the workspace's typestr.
void CheckWorkspace(const DeviceBuffer& ws, int64_t needed, const char* needed_what) {
  if (ws.bytes < needed) {
    throw py::value_error(std::string("workspace is smaller than ") + needed_what);
  }
  if (reinterpret_cast<uintptr_t>(ws.data) % alignof(double) != 0) {
    throw py::value_error("workspace must be aligned to 8 bytes");
  }
  if (ws.readonly) throw py::value_error("workspace must be writable");
}

// reduction_scale and workspace of the reduced kernels: one writable float64
// and a workspace as CheckWorkspace wants it.
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

void ContrastiveLossCuda(const py::object& labels, const py::object& distances,
                         const py::object& loss, const py::object& grad, double margin,
                         uintptr_t stream, const py::object& labels_dtype,
                         const py::object& distances_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, false);
  const LossInputs in{a.labels.type,        a.distances.type, a.labels.data, a.distances.data,
                      a.distances.elements, margin,           similar_label};
  ThrowIfFailed(
      ContrastiveLossGpu(in, a.loss.data, a.grad.data, reinterpret_cast<void*>(stream)));
}

void ContrastiveLossReducedCuda(const py::object& labels, const py::object& distances,
                                const py::object& sample_weight, const py::object& loss,
                                const py::object& grad, const py::object& reduction_scale,
                                const py::object& workspace, double margin,
                                const std::string& reduction, double loss_scale, uintptr_t stream,
                                const py::object& labels_dtype,
                                const py::object& distances_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const CudaLossArrays a =
      ReadCudaLossArrays(labels, distances, loss, grad, labels_dtype, distances_dtype, true);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", distances_dtype);
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  if (!w.shape.empty()) CheckSameShape("sample_weight", w.shape, "distances", a.distances.shape);
  if (w.type != a.distances.type) {
    throw py::type_error("sample_weight must have the dtype of distances");
  }
  const int64_t n = a.distances.elements;
  CheckReducedScratch(s, ws, ContrastiveLossReducedGpuWorkspace(n), "reduced_workspace_bytes(n)");
  ReducedLossArgs args;
  args.in = LossInputs{a.labels.type, a.distances.type, a.labels.data, a.distances.data,
                       n,             margin,           similar_label};
  args.reduction.weights = w.data;
  args.reduction.scalar_weight = w.shape.empty();
  args.reduction.kind = ReductionFromName(reduction);
  args.reduction.loss_scale = loss_scale;
  args.reduction.loss = a.loss.data;
  args.grad = a.grad.data;
  args.reduction.reduction_scale = static_cast<double*>(s.data);
  ThrowIfFailed(ContrastiveLossReducedGpu(args, ws.data, reinterpret_cast<void*>(stream)));
}

Operand DeviceOperand(const DeviceArray& a) { return Operand{a.type, a.shape, a.data}; }

void CheckWritable(const DeviceBuffer& out, const char* what) {
  if (out.readonly) throw py::value_error(std::string(what) + " must be writable");
}

// An output of the embeddings' dtype.
void CheckDeviceOutput(const DeviceArray& out, const char* what, const std::vector<int64_t>& shape,
                       const char* shape_what, DType type, const char* type_what = "embeddings_a") {
  CheckSameShape(what, out.shape, shape_what, shape);
  CheckSameDType(what, out.type, type_what, type);
  CheckWritable(out, what);
}

void EmbeddingLossCuda(const py::object& labels, const py::object& embeddings_a,
                       const py::object& embeddings_b, const py::object& loss,
                       const py::object& coefficients, double margin, const std::string& distance,
                       uintptr_t stream, const py::object& labels_dtype,
                       const py::object& embeddings_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", labels_dtype);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray out = FromCudaArrayInterface(loss, "loss", embeddings_dtype);
  const DeviceArray c = FromCudaArrayInterface(coefficients, "coefficients", py::none());
  PairShape pair;
  const EmbeddingInputs in = CheckedEmbeddingInputs(DeviceOperand(y), DeviceOperand(a),
                                                    DeviceOperand(b), margin, k, similar_label,
                                                    &pair);
  CheckDeviceOutput(out, "loss", pair.rows_shape, kRowsWhat, a.type);
  CheckCoefficients(DeviceOperand(c), pair, k);
  CheckWritable(c, "coefficients");
  ThrowIfFailed(EmbeddingLossGpu(in, out.data, static_cast<double*>(c.data),
                                 reinterpret_cast<void*>(stream)));
}

void EmbeddingGradCuda(const py::object& embeddings_a, const py::object& embeddings_b,
                       const py::object& coefficients, const py::object& upstream,
                       const py::object& grad_a, const py::object& grad_b,
                       const std::string& distance, uintptr_t stream,
                       const py::object& embeddings_dtype) {
  const Distance k = DistanceFromName(distance);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray c = FromCudaArrayInterface(coefficients, "coefficients", py::none());
  const DeviceArray u = FromCudaArrayInterface(upstream, "upstream", embeddings_dtype);
  const DeviceArray ga = FromCudaArrayInterface(grad_a, "grad_a", embeddings_dtype);
  const DeviceArray gb = FromCudaArrayInterface(grad_b, "grad_b", embeddings_dtype);
  const PairShape pair = CheckEmbeddings(DeviceOperand(a), DeviceOperand(b));
  CheckCoefficients(DeviceOperand(c), pair, k);
  CheckPerRow("upstream", u.type, u.shape, "embeddings_a", a.type, kRowsWhat, pair.rows_shape);
  CheckDeviceOutput(ga, "grad_a", a.shape, "embeddings_a", a.type);
  CheckDeviceOutput(gb, "grad_b", a.shape, "embeddings_a", a.type);
  const EmbeddingGradArgs args{a.type,    a.data, b.data, pair.rows, pair.dim, pair.dim, k,
                               static_cast<const double*>(c.data), u.data, u.shape.empty(),
                               ga.data,   gb.data};
  ThrowIfFailed(EmbeddingGradGpu(args, reinterpret_cast<void*>(stream)));
}

void EmbeddingLossReducedCuda(const py::object& labels, const py::object& embeddings_a,
                              const py::object& embeddings_b, const py::object& sample_weight,
                              const py::object& loss, const py::object& grad_a,
                              const py::object& grad_b, const py::object& reduction_scale,
                              const py::object& workspace, double margin,
                              const std::string& distance, const std::string& reduction,
                              double loss_scale, uintptr_t stream, const py::object& labels_dtype,
                              const py::object& embeddings_dtype, int similar_label) {
  CheckMargin(margin);
  CheckSimilarLabel(similar_label);
  const Distance k = DistanceFromName(distance);
  ReducedEmbeddingArgs args;
  args.reduction.kind = ReductionFromName(reduction);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", labels_dtype);
  const DeviceArray a = FromCudaArrayInterface(embeddings_a, "embeddings_a", embeddings_dtype);
  const DeviceArray b = FromCudaArrayInterface(embeddings_b, "embeddings_b", embeddings_dtype);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", embeddings_dtype);
  const DeviceArray out = FromCudaArrayInterface(loss, "loss", embeddings_dtype);
  const DeviceArray ga = FromCudaArrayInterface(grad_a, "grad_a", embeddings_dtype);
  const DeviceArray gb = FromCudaArrayInterface(grad_b, "grad_b", embeddings_dtype);
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  PairShape pair;
  args.in = CheckedEmbeddingInputs(DeviceOperand(y), DeviceOperand(a), DeviceOperand(b), margin, k,
                                   similar_label, &pair);
  CheckPerRow("sample_weight", w.type, w.shape, "embeddings_a", a.type, "labels", pair.rows_shape);
  if (out.elements != 1) throw py::value_error("loss must hold one value");
  CheckSameDType("loss", out.type, "embeddings_a", a.type);
  CheckWritable(out, "loss");
  CheckDeviceOutput(ga, "grad_a", a.shape, "embeddings_a", a.type);
  CheckDeviceOutput(gb, "grad_b", a.shape, "embeddings_a", a.type);
  CheckReducedScratch(s, ws, EmbeddingLossReducedGpuWorkspace(pair.rows),
                      "embedding_reduced_workspace_bytes(rows)");
  args.reduction.weights = w.data;
  args.reduction.scalar_weight = w.shape.empty();
  args.reduction.loss_scale = loss_scale;
  args.reduction.loss = out.data;
  args.grad_a = ga.data;
  args.grad_b = gb.data;
  args.reduction.reduction_scale = static_cast<double*>(s.data);
  ThrowIfFailed(EmbeddingLossReducedGpu(args, ws.data, reinterpret_cast<void*>(stream)));
}

// The in-batch CUDA entries' embeddings and labels (int64: the kernels read
// them in place), checked as the CPU entry checks its own.
InBatchArgs CheckedInBatchCudaArgs(const py::object& labels, const py::object& embeddings,
                                   double margin, double positive_margin,
                                   const std::string& distance, const std::string& pair_weighting,
                                   int64_t max_block_rows) {
  InBatchArgs args =
      InBatchOptions(margin, positive_margin, distance, pair_weighting, max_block_rows);
  const DeviceArray e = FromCudaArrayInterface(embeddings, "embeddings", py::none());
  CheckInBatchEmbeddings(DeviceOperand(e), &args);
  const DeviceArray y = FromCudaArrayInterface(labels, "labels", py::none());
  CheckInBatchLabels(DeviceOperand(y), args, /*int32_ok=*/false);
  args.labels = static_cast<const int64_t*>(y.data);
  return args;
}

// Workspace sizes without arrays, from what they depend on (the cosine
// distance's includes a scaled copy of the embeddings: dim counts).
InBatchArgs InBatchSizeArgs(int64_t rows, const std::string& dtype, int64_t max_block_rows,
                            int64_t dim, const std::string& distance) {
  if (rows < 0) throw py::value_error("rows must be non-negative");
  if (dim < 0) throw py::value_error("dim must be non-negative");
  const DType type = DTypeFromName(dtype, "dtype");
  if (!IsInBatchDType(type)) throw py::type_error("dtype must be float32 or float64");
  InBatchArgs args = InBatchOptions(1.0, 0.0, distance, "uniform", max_block_rows);
  args.type = type;
  args.rows = rows;
  args.dim = dim;
  return args;
}

int64_t InBatchWorkspaceBytes(int64_t rows, const std::string& dtype, int64_t max_block_rows,
                              int64_t dim, const std::string& distance) {
  return InBatchLossGpuWorkspace(InBatchSizeArgs(rows, dtype, max_block_rows, dim, distance));
}

int64_t InBatchReducedWorkspaceBytes(int64_t rows, const std::string& dtype,
                                     int64_t max_block_rows, int64_t dim,
                                     const std::string& distance) {
  InBatchReducedArgs args{};
  args.in = InBatchSizeArgs(rows, dtype, max_block_rows, dim, distance);
  return InBatchLossReducedGpuWorkspace(args);
}

// The kernels' GEMMs come from TiledGemmGpu: this module has no cuBLAS.
void InBatchLossCuda(const py::object& labels, const py::object& embeddings,
                     const py::object& upstream, const py::object& loss, const py::object& grad,
                     const py::object& workspace, double margin, double positive_margin,
                     const std::string& distance, const std::string& pair_weighting,
                     int64_t max_block_rows, uintptr_t stream) {
  InBatchArgs args = CheckedInBatchCudaArgs(labels, embeddings, margin, positive_margin, distance,
                                            pair_weighting, max_block_rows);
  const std::vector<int64_t> rows_shape{args.rows};
  const std::vector<int64_t> shape{args.rows, args.dim};
  if (upstream.is_none() != grad.is_none()) {
    throw py::value_error("upstream and grad must be given together");
  }
  if (loss.is_none() && grad.is_none()) {
    throw py::value_error("nothing to compute: loss and grad are both None");
  }
  if (!loss.is_none()) {
    const DeviceArray l = FromCudaArrayInterface(loss, "loss", py::none());
    CheckDeviceOutput(l, "loss", rows_shape, "embeddings.shape[:1]", args.type, "embeddings");
    args.loss = l.data;
  }
  if (!upstream.is_none()) {
    const DeviceArray u = FromCudaArrayInterface(upstream, "upstream", py::none());
    CheckInBatchUpstream(DeviceOperand(u), args);
    const DeviceArray g = FromCudaArrayInterface(grad, "grad", py::none());
    CheckDeviceOutput(g, "grad", shape, "embeddings", args.type, "embeddings");
    args.upstream = u.data;
    args.grad = g.data;
  }
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  CheckWorkspace(ws, InBatchLossGpuWorkspace(args),
                 "in_batch_workspace_bytes(rows, dtype, max_block_rows, dim, distance)");
  void* s = reinterpret_cast<void*>(stream);
  ThrowIfFailed(InBatchLossGpu(args, ws.data, TiledGemmGpu(args.type, s), s));
}

void InBatchLossReducedCuda(const py::object& labels, const py::object& embeddings,
                            const py::object& sample_weight, const py::object& loss,
                            const py::object& grad, const py::object& reduction_scale,
                            const py::object& workspace, double margin, double positive_margin,
                            const std::string& distance, const std::string& pair_weighting,
                            const std::string& reduction, double loss_scale,
                            int64_t max_block_rows, uintptr_t stream) {
  InBatchReducedArgs args;
  args.in = CheckedInBatchCudaArgs(labels, embeddings, margin, positive_margin, distance,
                                   pair_weighting, max_block_rows);
  args.reduction.kind = ReductionFromName(reduction);
  const DeviceArray w = FromCudaArrayInterface(sample_weight, "sample_weight", py::none());
  const DeviceArray l = FromCudaArrayInterface(loss, "loss", py::none());
  const DeviceArray g = FromCudaArrayInterface(grad, "grad", py::none());
  const DeviceArray s = FromCudaArrayInterface(reduction_scale, "reduction_scale", py::none());
  const DeviceBuffer ws = DeviceBufferOf(workspace, "workspace");
  CheckPerRow("sample_weight", w.type, w.shape, "embeddings", args.in.type, "embeddings.shape[:1]",
              {args.in.rows});
  if (l.elements != 1) throw py::value_error("loss must hold one value");
  CheckSameDType("loss", l.type, "embeddings", args.in.type);
  CheckWritable(l, "loss");
  CheckDeviceOutput(g, "grad", {args.in.rows, args.in.dim}, "embeddings", args.in.type,
                    "embeddings");
  CheckReducedScratch(s, ws, InBatchLossReducedGpuWorkspace(args),
                      "in_batch_reduced_workspace_bytes(rows, dtype, max_block_rows, dim, distance)");
  args.reduction.weights = w.data;
  args.reduction.scalar_weight = w.shape.empty();
  args.reduction.loss_scale = loss_scale;
  args.reduction.loss = l.data;
  args.grad = g.data;
  args.reduction.reduction_scale = static_cast<double*>(s.data);
  void* st = reinterpret_cast<void*>(stream);
  ThrowIfFailed(InBatchLossReducedGpu(args, ws.data, TiledGemmGpu(args.in.type, st), st));
}

void ScaleCuda(const py::object& gradient, const py::object& scale, const py::object& out,
               uintptr_t stream, const py::object& dtype) {
  const DeviceArray g = FromCudaArrayInterface(gradient, "gradient", dtype);
  const DeviceArray s = FromCudaArrayInterface(scale, "scale", dtype);
  const DeviceArray o = FromCudaArrayInterface(out, "out", dtype);
  CheckFloatDType(g.type, "gradient");
  CheckSameShape("out", o.shape, "gradient", g.shape);
  if (s.elements != 1 || s.type != g.type || o.type != g.type) {
    throw py::value_error("scale must be one value of the gradient's dtype, out that dtype");
  }
  if (o.readonly) throw py::value_error("out must be writable");
  ThrowIfFailed(
      ScaleGpu(g.type, g.data, s.data, g.elements, o.data, reinterpret_cast<void*>(stream)));
}
#endif

}  // namespace
}  // namespace fused_contrastive

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Raw fused contrastive-loss kernels on NumPy arrays (no TensorFlow needed).";
  // The values per row the embedding loss writes for its gradient, by distance.
  py::dict row_coefficients;
  for (fused_contrastive::Distance k : fused_contrastive::kAllDistances) {
    row_coefficients[fused_contrastive::DistanceName(k)] =
        fused_contrastive::NumRowCoefficients(k);
  }
  m.attr("row_coefficients") = row_coefficients;
  m.def("contrastive_loss_cpu", &fused_contrastive::ContrastiveLossCpuNumpy, py::arg("labels"),
        py::arg("distances"), py::arg("margin") = 1.0, py::arg("similar_label") = 1,
        "Per-sample loss and d(loss)/d(distance) on the CPU, single-threaded; returns "
        "(loss, grad).");
  m.def("contrastive_loss_reduced_cpu", &fused_contrastive::ContrastiveLossReducedCpuNumpy,
        py::arg("labels"), py::arg("distances"), py::arg("sample_weight") = py::none(),
        py::arg("margin") = 1.0, py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0,
        py::arg("similar_label") = 1,
        "The fused-reduction kernel on the CPU, single-threaded; returns (loss, grad, "
        "reduction_scale). reduction: 'sum', 'mean' or 'weighted_mean'; sample_weight: None, a "
        "scalar array or one weight per element, of the distances' dtype.");
  m.def("embedding_loss_cpu", &fused_contrastive::EmbeddingLossCpuNumpy, py::arg("labels"),
        py::arg("embeddings_a"), py::arg("embeddings_b"), py::arg("margin") = 1.0,
        py::arg("distance") = "euclidean", py::arg("similar_label") = 1,
        "Per-row loss of embedding pairs a, b [..., D] (labels [...]) on the CPU, "
        "single-threaded; returns (loss [...], coefficients [..., K] float64), the coefficients "
        "embedding_grad_cpu takes. distance: 'euclidean', 'cosine' or 'manhattan'.");
  m.def("embedding_grad_cpu", &fused_contrastive::EmbeddingGradCpuNumpy,
        py::arg("embeddings_a"), py::arg("embeddings_b"), py::arg("coefficients"),
        py::arg("upstream"), py::arg("distance") = "euclidean",
        "Backward of embedding_loss_cpu: (grad_a, grad_b) for upstream d(total)/d(loss), a 0-d "
        "array or one value per row of the embeddings' dtype.");
  m.def("embedding_loss_reduced_cpu", &fused_contrastive::EmbeddingLossReducedCpuNumpy,
        py::arg("labels"), py::arg("embeddings_a"), py::arg("embeddings_b"),
        py::arg("sample_weight") = py::none(), py::arg("margin") = 1.0,
        py::arg("distance") = "euclidean", py::arg("reduction") = "mean",
        py::arg("loss_scale") = 1.0, py::arg("similar_label") = 1,
        "The fused-reduction kernel on embedding pairs, single-threaded; returns (loss, grad_a, "
        "grad_b, reduction_scale). sample_weight: None, a scalar array or one weight per row, of "
        "the embeddings' dtype.");
  m.def("in_batch_loss_cpu", &fused_contrastive::InBatchLossCpuNumpy, py::arg("labels"),
        py::arg("embeddings"), py::arg("upstream") = py::none(), py::arg("margin") = 1.0,
        py::arg("positive_margin") = 0.0, py::arg("distance") = "euclidean",
        py::arg("pair_weighting") = "uniform", py::arg("max_block_rows") = 0,
        "The in-batch all-pairs loss of embeddings [B, D] with class labels [B] on the CPU, "
        "single-threaded; returns (loss [B], grad [B, D] or None). grad is d(sum(upstream * "
        "loss))/d(embeddings), computed when upstream ([B], the embeddings' dtype) is given.");
  m.def("in_batch_cpu_isa", &fused_contrastive::InBatchCpuIsa,
        "The instruction set the in-batch CPU kernel runs with here: 'avx2' or 'generic'.");
#if FC_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("reduced_workspace_bytes", &fused_contrastive::ContrastiveLossReducedGpuWorkspace,
        py::arg("n"), "Device scratch bytes contrastive_loss_reduced_cuda needs for n elements.");
  m.def("contrastive_loss_reduced_cuda", &fused_contrastive::ContrastiveLossReducedCuda,
        py::arg("labels"), py::arg("distances"), py::arg("sample_weight"), py::arg("loss"),
        py::arg("grad"), py::arg("reduction_scale"), py::arg("workspace"),
        py::arg("margin") = 1.0, py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0,
        py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("distances_dtype") = py::none(), py::arg("similar_label") = 1,
        "The fused-reduction kernel on CUDA arrays; writes loss (one value), grad and "
        "reduction_scale (one float64). sample_weight: a 0-d array or one weight per element.");
  m.def("scale_cuda", &fused_contrastive::ScaleCuda, py::arg("gradient"), py::arg("scale"),
        py::arg("out"), py::arg("stream") = 0, py::arg("dtype") = py::none(),
        "out = gradient * scale[0] on CUDA arrays (the reduced op's backward).");
  m.def("contrastive_loss_cuda", &fused_contrastive::ContrastiveLossCuda, py::arg("labels"),
        py::arg("distances"), py::arg("loss"), py::arg("grad"), py::arg("margin") = 1.0,
        py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("distances_dtype") = py::none(), py::arg("similar_label") = 1,
        "Enqueues the CUDA kernel on `stream` (a cudaStream_t as int; 0 = legacy default stream). "
        "All arrays are CUDA arrays (__cuda_array_interface__); loss and grad are written. "
        "labels_dtype/distances_dtype name the dtype when the typestr cannot (\"bfloat16\" on "
        "uint16).");
  m.def("embedding_reduced_workspace_bytes", &fused_contrastive::EmbeddingLossReducedGpuWorkspace,
        py::arg("rows"),
        "Device scratch bytes embedding_loss_reduced_cuda needs for `rows` embedding pairs.");
  m.def("embedding_loss_cuda", &fused_contrastive::EmbeddingLossCuda, py::arg("labels"),
        py::arg("embeddings_a"), py::arg("embeddings_b"), py::arg("loss"),
        py::arg("coefficients"), py::arg("margin") = 1.0, py::arg("distance") = "euclidean",
        py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("embeddings_dtype") = py::none(), py::arg("similar_label") = 1,
        "embedding_loss_cpu on CUDA arrays, enqueued on `stream`: writes loss [...] and "
        "coefficients [..., K] (float64). embeddings_dtype names the embeddings', loss's dtype "
        "when the typestr cannot (\"bfloat16\" on uint16).");
  m.def("embedding_grad_cuda", &fused_contrastive::EmbeddingGradCuda, py::arg("embeddings_a"),
        py::arg("embeddings_b"), py::arg("coefficients"), py::arg("upstream"),
        py::arg("grad_a"), py::arg("grad_b"), py::arg("distance") = "euclidean",
        py::arg("stream") = 0, py::arg("embeddings_dtype") = py::none(),
        "embedding_grad_cpu on CUDA arrays: writes grad_a and grad_b. upstream: a 0-d array or "
        "one value per row.");
  m.def("embedding_loss_reduced_cuda", &fused_contrastive::EmbeddingLossReducedCuda,
        py::arg("labels"), py::arg("embeddings_a"), py::arg("embeddings_b"),
        py::arg("sample_weight"), py::arg("loss"), py::arg("grad_a"), py::arg("grad_b"),
        py::arg("reduction_scale"), py::arg("workspace"), py::arg("margin") = 1.0,
        py::arg("distance") = "euclidean", py::arg("reduction") = "mean",
        py::arg("loss_scale") = 1.0, py::arg("stream") = 0, py::arg("labels_dtype") = py::none(),
        py::arg("embeddings_dtype") = py::none(), py::arg("similar_label") = 1,
        "embedding_loss_reduced_cpu on CUDA arrays: writes loss (one value), grad_a, grad_b and "
        "reduction_scale (one float64). sample_weight: a 0-d array or one weight per row.");
  m.def("in_batch_workspace_bytes", &fused_contrastive::InBatchWorkspaceBytes, py::arg("rows"),
        py::arg("dtype") = "float32", py::arg("max_block_rows") = 0, py::arg("dim") = 0,
        py::arg("distance") = "euclidean",
        "Device scratch bytes in_batch_loss_cuda needs for `rows` embeddings of `dtype` "
        "(cosine: of `dim` values each).");
  m.def("in_batch_reduced_workspace_bytes", &fused_contrastive::InBatchReducedWorkspaceBytes,
        py::arg("rows"), py::arg("dtype") = "float32", py::arg("max_block_rows") = 0,
        py::arg("dim") = 0, py::arg("distance") = "euclidean",
        "Device scratch bytes in_batch_loss_reduced_cuda needs for `rows` embeddings of `dtype` "
        "(cosine: of `dim` values each).");
  m.def("in_batch_loss_cuda", &fused_contrastive::InBatchLossCuda, py::arg("labels"),
        py::arg("embeddings"), py::arg("upstream"), py::arg("loss"), py::arg("grad"),
        py::arg("workspace"), py::arg("margin") = 1.0, py::arg("positive_margin") = 0.0,
        py::arg("distance") = "euclidean", py::arg("pair_weighting") = "uniform",
        py::arg("max_block_rows") = 0, py::arg("stream") = 0,
        "in_batch_loss_cpu on CUDA arrays (labels int64 [B], embeddings [B, D]), enqueued on "
        "`stream`, with a plain tiled GEMM in place of cuBLAS: writes loss [B] unless None and, "
        "with upstream [B], grad [B, D] (upstream and grad are None together).");
  m.def("in_batch_loss_reduced_cuda", &fused_contrastive::InBatchLossReducedCuda,
        py::arg("labels"), py::arg("embeddings"), py::arg("sample_weight"), py::arg("loss"),
        py::arg("grad"), py::arg("reduction_scale"), py::arg("workspace"),
        py::arg("margin") = 1.0, py::arg("positive_margin") = 0.0,
        py::arg("distance") = "euclidean", py::arg("pair_weighting") = "uniform",
        py::arg("reduction") = "mean", py::arg("loss_scale") = 1.0,
        py::arg("max_block_rows") = 0, py::arg("stream") = 0,
        "The in-batch loss with the Keras reduction fused in, on CUDA arrays: writes loss (one "
        "value), grad [B, D] and reduction_scale (one float64). sample_weight: a 0-d array or "
        "one weight per row, of the embeddings' dtype.");
#else
  m.attr("has_cuda") = false;
#endif
}

// XLA lowerings of the loss from pair embeddings. The HLO (every backend but
// XLA's CPU) is the formula of core/pairs/math.h on XlaOps, rows as the
// kernels loop over them. On XLA's CPU backend the ops are host calls of the
// fused CPU kernels (ffi/pairs.cc), which read a and b once per
// op: XLA's code for the HLO reads them once for the row sums and again for
// the gradients, about twice the time, as the ops are memory bound.
#include <initializer_list>
#include <vector>

#include "core/pairs/math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/pairs.h"
#include "tf/xla/hlo.h"
#include "xla/hlo/builder/lib/arithmetic.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::TensorShape;

// Embeddings a and b [..., D] as [rows, D] matrices in the compute type: the
// embedding ops' kernels loop over rows, and so does their HLO.
struct EmbeddingRows {
  TensorShape shape;      // [..., D], or the stacked pair's [..., 2, D]
  TensorShape row_shape;  // [...]
  bool stacked;           // a and b are the halves of one stacked pair input
  int64_t rows, dim;
  xla::PrimitiveType out_type, compute;
  xla::XlaOp a, b;

  // One value per row ([rows]) repeated along the row ([rows, D]).
  xla::XlaOp AlongRows(xla::XlaOp per_row) const {
    return xla::BroadcastInDim(per_row, {rows, dim}, {0});
  }
};

// The shapes and types of embeddings a, b at inputs `first` and `first` + 1,
// whose shapes the caller checked; a and b unset. With `stacked`, input
// `first` is the stacked pair [..., 2, D].
EmbeddingRows EmbeddingRowShapes(tensorflow::XlaOpKernelContext* ctx, int first, bool stacked) {
  EmbeddingRows e;
  e.shape = ctx->InputShape(first);
  e.row_shape = e.shape;
  e.row_shape.RemoveLastDims(stacked ? 2 : 1);
  e.stacked = stacked;
  e.rows = e.row_shape.num_elements();
  e.dim = e.shape.dim_size(e.shape.dims() - 1);
  e.out_type = ctx->input_xla_type(first);
  e.compute = XlaComputeType(e.out_type);
  return e;
}

// EmbeddingRowShapes, with a and b read.
EmbeddingRows ReadEmbeddingRows(tensorflow::XlaOpKernelContext* ctx, int first, bool stacked) {
  EmbeddingRows e = EmbeddingRowShapes(ctx, first, stacked);
  if (stacked) {
    const xla::XlaOp pairs =
        xla::Reshape(xla::ConvertElementType(ctx->Input(first), e.compute), {e.rows, 2, e.dim});
    e.a = xla::Reshape(xla::SliceInDim(pairs, 0, 1, 1, 1), {e.rows, e.dim});
    e.b = xla::Reshape(xla::SliceInDim(pairs, 1, 2, 1, 1), {e.rows, e.dim});
    return e;
  }
  e.a = xla::Reshape(xla::ConvertElementType(ctx->Input(first), e.compute), {e.rows, e.dim});
  e.b = xla::Reshape(xla::ConvertElementType(ctx->Input(first + 1), e.compute), {e.rows, e.dim});
  return e;
}

// The labels and embeddings of a loss-computing op (positions Io), checked as
// the OpKernels check them.
template <typename Io>
absl::Status CheckLossShapes(tensorflow::XlaOpKernelContext* ctx) {
  const TensorShape labels = ctx->InputShape(Io::kLabels);
  const TensorShape a = ctx->InputShape(Io::kEmbeddings);
  if constexpr (Io::kStacked) {
    return CheckEmbeddingShapes(labels, a, nullptr);
  } else {
    const TensorShape b = ctx->InputShape(Io::kB);
    return CheckEmbeddingShapes(labels, a, &b);
  }
}

// A loss-computing op's inputs: labels [...] (as [rows]), the embeddings and
// the margin.
struct EmbeddingComputeInputs {
  EmbeddingRows e;
  xla::XlaOp y, margin;
};

template <typename Io>
absl::Status ReadEmbeddingInputs(tensorflow::XlaOpKernelContext* ctx, EmbeddingComputeInputs* in) {
  TF_RETURN_IF_ERROR(CheckLossShapes<Io>(ctx));
  in->e = ReadEmbeddingRows(ctx, Io::kEmbeddings, Io::kStacked);
  TF_RETURN_IF_ERROR(
      ReadLabelsAndMargin(ctx, Io::kLabels, Io::kMargin, in->e.compute, &in->y, &in->margin));
  in->y = xla::Reshape(in->y, {in->e.rows});
  return absl::OkStatus();
}

// A per-row input in `type`, as [rows] or a scalar.
xla::XlaOp PerRow(tensorflow::XlaOpKernelContext* ctx, int input, const EmbeddingRows& e,
                  xla::PrimitiveType type) {
  const xla::XlaOp x = xla::ConvertElementType(ctx->Input(input), type);
  return ctx->InputShape(input).dims() == 0 ? x : xla::Reshape(x, {e.rows});
}

// The row sums of a and b ([rows, D] each, in `type`): sums[j] for j below
// NumRowSums(K), [rows] each.
template <Distance K>
void RowSumsOf(xla::XlaOp a, xla::XlaOp b, xla::PrimitiveType type, xla::XlaOp* sums) {
  xla::XlaBuilder* builder = a.builder();
  xla::XlaOp terms[kMaxRowSums];
  distance_terms<K>(a, b, terms[0], terms[1], terms[2]);
  for (int j = 0; j < NumRowSums(K); ++j) {
    sums[j] = xla::Reduce(terms[j], xla::Zero(builder, type),
                          xla::CreateScalarAddComputation(type, builder), {1});
  }
}

// Cosine's row values sums[0..5) from its sums sums[0..3) as the kernels take
// them (CosineScaling): the sums as they are and scales 1, except in rows
// whose Σa² or Σb² leaves [kLow, kHigh], summed again at the scales s_a, s_b.
// That second read of the rows runs only when some row needs it.
absl::Status ScaleCosineRows(const EmbeddingRows& e, xla::XlaOp* sums) {
  const xla::PrimitiveType type = e.compute;
  const bool f64 = type == xla::F64;
  const double low = f64 ? CosineScaling<double>::kLow : CosineScaling<float>::kLow;
  const double high = f64 ? CosineScaling<double>::kHigh : CosineScaling<float>::kHigh;
  const auto out_of_range = [&](xla::XlaOp norm2_a, xla::XlaOp norm2_b) {
    const auto outside = [&](xla::XlaOp x) {
      return xla::Or(xla::Lt(x, xla::ScalarLike(x, low)), xla::Gt(x, xla::ScalarLike(x, high)));
    };
    return xla::Or(outside(norm2_a), outside(norm2_b));
  };
  // The five row values as one [5, rows] result.
  const auto values = [&](std::initializer_list<xla::XlaOp> rows) {
    std::vector<xla::XlaOp> parts;
    for (const xla::XlaOp& row : rows) parts.push_back(xla::Reshape(row, {1, e.rows}));
    return xla::ConcatInDim(parts.front().builder(), parts, 0);
  };
  // x: a, b, then the three sums.
  const auto rescaled = [&](const std::vector<xla::XlaOp>& x) {
    const xla::XlaOp s_a = CosineScales(RowMaxAbs(x[0], type), type);
    const xla::XlaOp s_b = CosineScales(RowMaxAbs(x[1], type), type);
    xla::XlaOp scaled[kMaxRowSums];
    RowSumsOf<Distance::kCosine>(x[0] * e.AlongRows(s_a), x[1] * e.AlongRows(s_b), type, scaled);
    const xla::XlaOp redo = out_of_range(x[3], x[4]);
    const xla::XlaOp one = xla::FullLike(s_a, 1);
    return values({xla::Select(redo, scaled[0], x[2]), xla::Select(redo, scaled[1], x[3]),
                   xla::Select(redo, scaled[2], x[4]), xla::Select(redo, s_a, one),
                   xla::Select(redo, s_b, one)});
  };
  const auto as_is = [&](const std::vector<xla::XlaOp>& x) {
    const xla::XlaOp one = xla::FullLike(x[0], 1);
    return values({x[0], x[1], x[2], one, one});
  };
  TF_ASSIGN_OR_RETURN(
      const xla::XlaOp all,
      Choose(xla::Any(out_of_range(sums[1], sums[2])),
             BranchOf{"cosine_rescaled", {e.a, e.b, sums[0], sums[1], sums[2]}, type, rescaled},
             BranchOf{"cosine_as_is", {sums[0], sums[1], sums[2]}, type, as_is}, type));
  for (int j = 0; j < kMaxRowValues; ++j) {
    sums[j] = xla::Reshape(xla::SliceInDim(all, j, j + 1, 1, 0), {e.rows});
  }
  return absl::OkStatus();
}

// Each row's loss and gradient coefficients ([rows] each) for g = d(loss)/d(d):
// the sums of distance_terms<K> along the rows, in the compute type.
template <Distance K>
absl::Status RowLossAndCoefficients(const EmbeddingComputeInputs& in, int similar_label,
                                    xla::XlaOp* loss, xla::XlaOp* coef) {
  xla::XlaOp sums[kMaxRowValues];
  RowSumsOf<K>(in.e.a, in.e.b, in.e.compute, sums);
  if constexpr (K == Distance::kCosine) TF_RETURN_IF_ERROR(ScaleCosineRows(in.e, sums));
  row_loss_and_coefficients<K>(sums, in.y, in.margin, similar_label, loss, coef);
  return absl::OkStatus();
}

// Sets outputs `first` and `first` + 1 to the gradients `grads` of a and b
// ([rows, D] each, out type), or for a stacked pair output `first` to both
// stacked again as [..., 2, D].
void SetGradientOutputs(tensorflow::XlaOpKernelContext* ctx, const EmbeddingRows& e,
                        const xla::XlaOp* grads, int first) {
  if (e.stacked) {
    const xla::XlaOp both = xla::ConcatInDim(
        ctx->builder(),
        {xla::Reshape(grads[0], {e.rows, 1, e.dim}), xla::Reshape(grads[1], {e.rows, 1, e.dim})},
        1);
    ctx->SetOutput(first, xla::Reshape(both, e.shape.dim_sizes()));
    return;
  }
  for (int i = 0; i < 2; ++i) {
    ctx->SetOutput(first + i, xla::Reshape(grads[i], e.shape.dim_sizes()));
  }
}

// Sets the gradient outputs from `first` on (SetGradientOutputs) from the
// rows' coefficients ([rows] each, compute type).
template <Distance K>
void SetEmbeddingGradients(tensorflow::XlaOpKernelContext* ctx, const EmbeddingRows& e,
                           const xla::XlaOp* row_coef, int first) {
  xla::XlaOp coef[kMaxRowValues], grads[2];
  for (int j = 0; j < NumRowCoefficients(K); ++j) coef[j] = e.AlongRows(row_coef[j]);
  element_gradient<K>(coef, e.a, e.b, &grads[0], &grads[1]);
  for (xla::XlaOp& grad : grads) grad = xla::ConvertElementType(grad, e.out_type);
  SetGradientOutputs(ctx, e, grads, first);
}

// --- The HLO lowerings ----------------------------------------------------------------

class EmbeddingLossXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingLossXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  using Io = EmbeddingLossIo;

  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    EmbeddingComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs<Io>(ctx, &in));
    const EmbeddingRows& e = in.e;
    xla::XlaOp loss, coef[kMaxRowValues];
    OP_REQUIRES_OK(ctx, RowLossAndCoefficients<K>(in, similar_label_, &loss, coef));
    ctx->SetOutput(Io::kLoss, xla::Reshape(xla::ConvertElementType(loss, e.out_type),
                                           e.row_shape.dim_sizes()));
    // [rows, K], row-major as the kernels write it.
    std::vector<xla::XlaOp> columns;
    for (int j = 0; j < NumRowCoefficients(K); ++j) {
      columns.push_back(xla::Reshape(xla::ConvertElementType(coef[j], xla::F64), {e.rows, 1}));
    }
    TensorShape coefficient_shape = e.row_shape;
    coefficient_shape.AddDim(NumRowCoefficients(K));
    ctx->SetOutput(Io::kCoefficients, xla::Reshape(xla::ConcatInDim(ctx->builder(), columns, 1),
                                                   coefficient_shape.dim_sizes()));
  }

 protected:
  // The host lowerings below read them too.
  int similar_label_;
  Distance distance_;
};

// The grad op's shapes, checked as the OpKernel checks them; *rows: [...].
absl::Status CheckGradInputs(tensorflow::XlaOpKernelContext* ctx, Distance distance,
                             TensorShape* rows) {
  using Io = EmbeddingGradIo;
  return CheckGradShapes(ctx->InputShape(Io::kA), ctx->InputShape(Io::kB),
                         ctx->InputShape(Io::kCoefficients), ctx->InputShape(Io::kUpstream),
                         distance, rows);
}

class EmbeddingGradXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingGradXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  using Io = EmbeddingGradIo;

  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    TensorShape rows;
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, K, &rows));
    const EmbeddingRows e = ReadEmbeddingRows(ctx, Io::kA, /*stacked=*/false);
    constexpr int kCoefficients = NumRowCoefficients(K);
    // coefficient * upstream in float64, then the compute type, as the kernels.
    const xla::XlaOp upstream = PerRow(ctx, Io::kUpstream, e, xla::F64);
    const xla::XlaOp all =
        xla::Reshape(ctx->Input(Io::kCoefficients), {e.rows, int64_t{kCoefficients}});
    xla::XlaOp coef[kMaxRowValues];
    for (int j = 0; j < kCoefficients; ++j) {
      const xla::XlaOp column = xla::Reshape(xla::SliceInDim(all, j, j + 1, 1, 1), {e.rows});
      // Only the coefficients scale with the upstream gradient, not cosine's scales.
      coef[j] = xla::ConvertElementType(j < NumRowSums(K) ? column * upstream : column, e.compute);
    }
    SetEmbeddingGradients<K>(ctx, e, coef, Io::kGradA);
  }

 protected:
  // The host lowering below reads it too.
  Distance distance_;
};

// Both reduced ops (Io: on a and b, or on the stacked pair): sums as the
// reduced op on distances sums them, over rows.
template <typename Io>
class EmbeddingLossReducedXlaOp : public tensorflow::XlaOpKernel {
 public:
  explicit EmbeddingLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
    OP_REQUIRES_OK(ctx, ReadSimilarLabel(ctx, &similar_label_));
    OP_REQUIRES_OK(ctx, ReadDistance(ctx, &distance_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    VisitDistance(distance_, [&](auto k) { Compile<decltype(k)::value>(ctx); });
  }

 private:
  template <Distance K>
  void Compile(tensorflow::XlaOpKernelContext* ctx) {
    EmbeddingComputeInputs in;
    OP_REQUIRES_OK(ctx, ReadEmbeddingInputs<Io>(ctx, &in));
    const EmbeddingRows& e = in.e;
    const TensorShape weight_shape = ctx->InputShape(Io::kWeights);
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", weight_shape, e.row_shape));
    const xla::XlaOp w = PerRow(ctx, Io::kWeights, e, e.compute);
    const bool scalar_weight = weight_shape.dims() == 0;
    const xla::XlaOp scale =
        ReductionScale(ctx, reduction_, w, scalar_weight, e.rows, Io::kLossScale);
    xla::XlaOp loss, coef[kMaxRowValues];
    OP_REQUIRES_OK(ctx, RowLossAndCoefficients<K>(in, similar_label_, &loss, coef));
    ctx->SetOutput(Io::kLoss, ReducedLoss(BlockedSum(loss * w, e.rows, e.compute), scale, e.compute,
                                          e.out_type));
    const xla::XlaOp factor = w * xla::ConvertElementType(scale, e.compute);
    for (int j = 0; j < NumRowSums(K); ++j) coef[j] = coef[j] * factor;
    SetEmbeddingGradients<K>(ctx, e, coef, Io::kGrads);
    ctx->SetOutput(Io::kReductionScale, scale);
  }

 protected:
  // The host lowering below reads them too.
  Reduction reduction_;
  int similar_label_;
  Distance distance_;
};

// --- The host lowerings (XLA's CPU backend) -------------------------------------------
// The calls' operands are the ops' inputs, their results the ops' outputs, in
// order: a and b as [rows, D] (the stacked pair as [rows, 2, D]), labels and
// per-row inputs as [rows] or scalars.

// Embeddings a and b (inputs `first`, `first` + 1) as [rows, D], in their dtype.
std::vector<xla::XlaOp> EmbeddingMatrices(tensorflow::XlaOpKernelContext* ctx,
                                          const EmbeddingRows& e, int first) {
  return {xla::Reshape(ctx->Input(first), {e.rows, e.dim}),
          xla::Reshape(ctx->Input(first + 1), {e.rows, e.dim})};
}

xla::Shape EmbeddingMatrixShape(const EmbeddingRows& e) {
  return xla::ShapeUtil::MakeShape(e.out_type, {e.rows, e.dim});
}

// A loss-computing op's checks, as its HLO lowering checks, and the call's
// first operands: labels [rows] and the embeddings.
template <typename Io>
absl::Status HostLossOperands(tensorflow::XlaOpKernelContext* ctx, EmbeddingRows* e,
                              std::vector<xla::XlaOp>* operands) {
  bool constant_margin;
  TF_RETURN_IF_ERROR(CheckLossShapes<Io>(ctx));
  TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, Io::kMargin, &constant_margin));
  *e = EmbeddingRowShapes(ctx, Io::kEmbeddings, Io::kStacked);
  *operands =
      Io::kStacked
          ? std::vector<xla::XlaOp>{xla::Reshape(ctx->Input(Io::kEmbeddings), {e->rows, 2, e->dim})}
          : EmbeddingMatrices(ctx, *e, Io::kEmbeddings);
  operands->insert(operands->begin(),
                   PerRow(ctx, Io::kLabels, *e, ctx->input_xla_type(Io::kLabels)));
  return absl::OkStatus();
}

class EmbeddingLossHostXlaOp : public EmbeddingLossXlaOp {
 public:
  using EmbeddingLossXlaOp::EmbeddingLossXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = EmbeddingLossIo;
    if (HloOnCpu()) return EmbeddingLossXlaOp::Compile(ctx);
    EmbeddingRows e;
    std::vector<xla::XlaOp> operands;
    OP_REQUIRES_OK(ctx, HostLossOperands<Io>(ctx, &e, &operands));
    operands.push_back(ctx->Input(Io::kMargin));
    const int64_t coefficients = NumRowCoefficients(distance_);
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kEmbeddingTarget, operands,
                 {xla::ShapeUtil::MakeShape(e.out_type, {e.rows}),
                  xla::ShapeUtil::MakeShape(xla::F64, {e.rows, coefficients})},
                 {{"distance", static_cast<int>(distance_)}, {"similar_label", similar_label_}});
    TensorShape coefficient_shape = e.row_shape;
    coefficient_shape.AddDim(coefficients);
    ctx->SetOutput(Io::kLoss, xla::Reshape(out[Io::kLoss], e.row_shape.dim_sizes()));
    ctx->SetOutput(Io::kCoefficients,
                   xla::Reshape(out[Io::kCoefficients], coefficient_shape.dim_sizes()));
  }
};

class EmbeddingGradHostXlaOp : public EmbeddingGradXlaOp {
 public:
  using EmbeddingGradXlaOp::EmbeddingGradXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = EmbeddingGradIo;
    if (HloOnCpu()) return EmbeddingGradXlaOp::Compile(ctx);
    TensorShape rows;
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, distance_, &rows));
    const EmbeddingRows e = EmbeddingRowShapes(ctx, Io::kA, /*stacked=*/false);
    std::vector<xla::XlaOp> operands = EmbeddingMatrices(ctx, e, Io::kA);
    operands.push_back(xla::Reshape(ctx->Input(Io::kCoefficients),
                                    {e.rows, int64_t{NumRowCoefficients(distance_)}}));
    operands.push_back(PerRow(ctx, Io::kUpstream, e, e.out_type));
    const std::vector<xla::XlaOp> out = HostCall(ctx, kEmbeddingGradTarget, operands,
                                                 {EmbeddingMatrixShape(e), EmbeddingMatrixShape(e)},
                                                 {{"distance", static_cast<int>(distance_)}});
    SetGradientOutputs(ctx, e, out.data(), Io::kGradA);
  }
};

template <typename Io>
class EmbeddingLossReducedHostXlaOp : public EmbeddingLossReducedXlaOp<Io> {
 public:
  using EmbeddingLossReducedXlaOp<Io>::EmbeddingLossReducedXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    if (HloOnCpu()) return EmbeddingLossReducedXlaOp<Io>::Compile(ctx);
    EmbeddingRows e;
    std::vector<xla::XlaOp> operands;
    OP_REQUIRES_OK(ctx, HostLossOperands<Io>(ctx, &e, &operands));
    OP_REQUIRES_OK(ctx, CheckPerRow("sample_weight", ctx->InputShape(Io::kWeights), e.row_shape));
    operands.insert(operands.end(), {PerRow(ctx, Io::kWeights, e, e.out_type),
                                     ctx->Input(Io::kMargin), ctx->Input(Io::kLossScale)});
    std::vector<xla::Shape> shapes = {xla::ShapeUtil::MakeShape(e.out_type, {})};
    if (Io::kStacked) {
      shapes.push_back(xla::ShapeUtil::MakeShape(e.out_type, {e.rows, 2, e.dim}));
    } else {
      shapes.insert(shapes.end(), {EmbeddingMatrixShape(e), EmbeddingMatrixShape(e)});
    }
    shapes.push_back(xla::ShapeUtil::MakeShape(xla::F64, {}));
    const std::vector<xla::XlaOp> out = HostCall(
        ctx, Io::kStacked ? kEmbeddingPairReducedTarget : kEmbeddingReducedTarget, operands, shapes,
        {{"distance", static_cast<int>(this->distance_)},
         {"reduction", static_cast<int>(this->reduction_)},
         {"similar_label", this->similar_label_}});
    ctx->SetOutput(Io::kLoss, out[Io::kLoss]);
    if (Io::kStacked) {
      ctx->SetOutput(Io::kGrads, xla::Reshape(out[Io::kGrads], e.shape.dim_sizes()));
    } else {
      SetGradientOutputs(ctx, e, &out[Io::kGrads], Io::kGrads);
    }
    ctx->SetOutput(Io::kReductionScale, out[Io::kReductionScale]);
  }
};

}  // namespace

constexpr XlaKernels kEmbeddingLossXla = {
    {"EmbeddingLossXlaOp", Create<EmbeddingLossXlaOp>},
    {"EmbeddingLossHostXlaOp", Create<EmbeddingLossHostXlaOp>}};
constexpr XlaKernels kEmbeddingGradXla = {
    {"EmbeddingGradXlaOp", Create<EmbeddingGradXlaOp>},
    {"EmbeddingGradHostXlaOp", Create<EmbeddingGradHostXlaOp>}};
constexpr XlaKernels kEmbeddingReducedXla = {
    {"EmbeddingLossReducedXlaOp", Create<EmbeddingLossReducedXlaOp<EmbeddingReducedIo>>},
    {"EmbeddingLossReducedHostXlaOp", Create<EmbeddingLossReducedHostXlaOp<EmbeddingReducedIo>>}};
constexpr XlaKernels kEmbeddingPairReducedXla = {
    {"EmbeddingLossReducedXlaOp", Create<EmbeddingLossReducedXlaOp<EmbeddingPairReducedIo>>},
    {"EmbeddingLossReducedHostXlaOp",
     Create<EmbeddingLossReducedHostXlaOp<EmbeddingPairReducedIo>>}};

}  // namespace fused_contrastive

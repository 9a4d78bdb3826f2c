// XLA lowerings of the in-batch all-pairs loss. On XLA's CPU backend they are
// host calls of InBatchLossCpu (ffi/in_batch.cc): the kernel's
// exact path for cancelling pairs and its symmetric sweep (each unordered
// pair of blocks once, half the HLO's products) are out of the HLO's reach,
// and its results do not depend on the thread count, so the calls give the
// OpKernels' bits. The other backends (GPU) get the HLO lowering, the
// While loops of xla/in_batch_sweep.h.
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/base/casts.h"
#include "absl/strings/str_cat.h"
#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/in_batch.h"
#include "tf/xla/hlo.h"
#include "tf/xla/in_batch_sweep.h"

namespace fused_contrastive {
namespace {

using ::tensorflow::TensorShape;

// The shapes checked as the OpKernels check them, the anchor range where it
// is a constant, and the type; the ops unset.
template <typename Io>
absl::Status InBatchShapes(tensorflow::XlaOpKernelContext* ctx, int64_t max_block_rows,
                           InBatchInputs* in) {
  const TensorShape e = ctx->InputShape(Io::kEmbeddings);
  TF_RETURN_IF_ERROR(CheckInBatchShapes(ctx->InputShape(Io::kLabels), e));
  TF_RETURN_IF_ERROR(CheckInBatchAnchors(ctx->InputShape(Io::kAnchors)));
  in->rows = e.dim_size(0);
  in->dim = e.dim_size(1);
  std::vector<int64_t> anchors;
  if (ctx->ConstantInputAsIntVector(Io::kAnchors, &anchors).ok()) {
    InBatchArgs probe;
    probe.rows = in->rows;
    TF_RETURN_IF_ERROR(CheckedInBatchAnchors(anchors.data(), &probe));
  }
  in->block = InBatchBlockRows(in->rows, max_block_rows);
  in->type = ctx->input_xla_type(Io::kEmbeddings);
  return absl::OkStatus();
}

// --- The HLO lowerings ----------------------------------------------------------------

// The attrs all three in-batch lowerings read, and the dispatch on the
// distance.
class InBatchXlaOpBase : public tensorflow::XlaOpKernel {
 public:
  explicit InBatchXlaOpBase(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadInBatchAttrs(ctx, &attrs_));
  }

 protected:
  // f(DistanceTag<K>{}) for the op's distance and dtype, which the op
  // definitions restrict to what the kernels support.
  template <typename F>
  void Dispatch(tensorflow::XlaOpKernelContext* ctx, F&& f) {
    DType type;
    const bool supported = FromTf(ctx->input_type(InBatchLossIo::kEmbeddings), &type) &&
                           VisitInBatchKernel(type, attrs_.distance, [&](auto, auto k) { f(k); });
    OP_REQUIRES(ctx, supported,
                absl::InternalError("in-batch contrastive loss: unsupported dtype or distance"));
  }

  // Labels, embeddings and margins at the positions of Io.
  template <typename Io>
  absl::Status ReadInputs(tensorflow::XlaOpKernelContext* ctx, InBatchInputs* in) const {
    TF_RETURN_IF_ERROR(InBatchShapes<Io>(ctx, attrs_.max_block_rows, in));
    in->labels = ctx->Input(Io::kLabels);
    in->e = ctx->Input(Io::kEmbeddings);
    in->anchors = ctx->Input(Io::kAnchors);
    TF_RETURN_IF_ERROR(ReadMargin(ctx, Io::kMargin, in->type, &in->margin));
    return ReadMargin(ctx, Io::kPositiveMargin, in->type, &in->positive_margin, "positive_margin");
  }

  // For the host lowerings below: the checks of ReadInputs, the call's
  // operands (the op's inputs, in order) and the attrs every handler reads,
  // which XLA passes as int32 (miner_epsilon: its float bits).
  template <typename Io>
  absl::Status HostOperands(tensorflow::XlaOpKernelContext* ctx, InBatchInputs* in,
                            std::vector<xla::XlaOp>* operands,
                            std::vector<std::pair<const char*, int>>* attrs) const {
    if (attrs_.max_block_rows > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "in-batch contrastive loss: max_block_rows must be at most ",
          std::numeric_limits<int32_t>::max(), " under XLA, got ", attrs_.max_block_rows));
    }
    TF_RETURN_IF_ERROR(InBatchShapes<Io>(ctx, attrs_.max_block_rows, in));
    bool constant;
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, Io::kMargin, &constant));
    TF_RETURN_IF_ERROR(CheckConstantMargin(ctx, Io::kPositiveMargin, &constant, "positive_margin"));
    operands->clear();
    for (int i = 0; i < ctx->num_inputs(); ++i) operands->push_back(ctx->Input(i));
    *attrs = {{"distance", static_cast<int>(attrs_.distance)},
              {"pair_weighting", static_cast<int>(attrs_.weighting)},
              {"max_block_rows", static_cast<int>(attrs_.max_block_rows)},
              {"miner", static_cast<int>(attrs_.miner)},
              {"miner_epsilon_bits", absl::bit_cast<int32_t>(attrs_.miner_epsilon)}};
    return absl::OkStatus();
  }

  InBatchAttrs attrs_;
};

class InBatchLossXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchLossIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      xla::XlaOp loss;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, attrs_.miner,
                                                attrs_.miner_epsilon, nullptr, &loss, nullptr));
      ctx->SetOutput(Io::kLoss, loss);
    });
  }
};

class InBatchGradXlaOp : public InBatchXlaOpBase {
 public:
  using InBatchXlaOpBase::InBatchXlaOpBase;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchGradIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      OP_REQUIRES_OK(
          ctx, CheckInBatchUpstream(ctx->InputShape(Io::kLabels), ctx->InputShape(Io::kUpstream)));
      const xla::XlaOp upstream = ctx->Input(Io::kUpstream);
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, attrs_.miner,
                                                attrs_.miner_epsilon, &upstream, &loss, &grad));
      ctx->SetOutput(Io::kGrad, grad);
      ctx->SetOutput(Io::kLoss, loss);
    });
  }
};

// The reduced op: each anchor's upstream gradient g_i = weight_i ·
// reduction_scale, as InBatchLossReducedCpu sets it, and the loss reduced as
// the reduced embedding op reduces its rows.
class InBatchLossReducedXlaOp : public InBatchXlaOpBase {
 public:
  explicit InBatchLossReducedXlaOp(tensorflow::OpKernelConstruction* ctx) : InBatchXlaOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadReduction(ctx, &reduction_));
  }

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchReducedIo;
    Dispatch(ctx, [&](auto k) {
      InBatchInputs in;
      OP_REQUIRES_OK(ctx, ReadInputs<Io>(ctx, &in));
      const TensorShape weight_shape = ctx->InputShape(Io::kWeights);
      OP_REQUIRES_OK(ctx, CheckInBatchWeights(weight_shape, -1, in.rows));
      const bool scalar_weight = weight_shape.dims() == 0;
      // One weight per anchor, or one for all: g_i of the rows, 0 for partners.
      const int64_t weights = scalar_weight ? in.rows : weight_shape.dim_size(0);
      xla::XlaOp begin, end;
      AnchorEnds(in.anchors, &begin, &end);
      const xla::XlaOp w = ctx->Input(Io::kWeights);
      const xla::XlaOp scale =
          ReductionScale(ctx, reduction_, w, scalar_weight, weights, Io::kLossScale,
                         xla::ConvertElementType(end - begin, xla::F64));
      xla::XlaOp upstream =
          xla::ConvertElementType(xla::ConvertElementType(w, xla::F64) * scale, in.type);
      upstream =
          scalar_weight
              ? xla::Broadcast(upstream, {in.rows})
              : xla::DynamicUpdateSlice(
                    xla::Zeros(ctx->builder(), xla::ShapeUtil::MakeShape(in.type, {in.rows})),
                    upstream, {begin});
      xla::XlaOp loss, grad;
      OP_REQUIRES_OK(
          ctx, InBatchSweep<decltype(k)::value>(in, attrs_.weighting, attrs_.miner,
                                                attrs_.miner_epsilon, &upstream, &loss, &grad));
      const xla::XlaOp weighted =
          scalar_weight
              ? xla::Select(IsAnchor(in.anchors, xla::Iota(ctx->builder(), xla::S64, in.rows)),
                            loss * w, xla::ZerosLike(loss))
              : xla::DynamicSlice(loss, {begin}, {weights}) * w;
      // A weight per anchor must match the anchor count, known at run time.
      xla::XlaOp valid = AnchorsValid(in.anchors, in.rows);
      if (!scalar_weight) {
        valid = xla::And(valid, xla::Eq(end - begin, xla::ScalarLike(begin, weights)));
      }
      ctx->SetOutput(Io::kLoss, NanUnless(valid,
                                          ReducedLoss(BlockedSum(weighted, weights, in.type), scale,
                                                      in.type, in.type),
                                          in.type));
      ctx->SetOutput(Io::kGrad, NanUnless(valid, grad, in.type));
      ctx->SetOutput(Io::kReductionScale, scale);
    });
  }

 protected:
  // The host lowering below reads it too.
  Reduction reduction_;
};

// --- The host lowerings (XLA's CPU backend) -------------------------------------------

class InBatchLossHostXlaOp : public InBatchLossXlaOp {
 public:
  using InBatchLossXlaOp::InBatchLossXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchLossIo;
    if (HloOnCpu()) return InBatchLossXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    ctx->SetOutput(Io::kLoss,
                   HostCall(ctx, kInBatchTarget, operands,
                            {xla::ShapeUtil::MakeShape(in.type, {in.rows})}, attrs)[Io::kLoss]);
  }
};

class InBatchGradHostXlaOp : public InBatchGradXlaOp {
 public:
  using InBatchGradXlaOp::InBatchGradXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchGradIo;
    if (HloOnCpu()) return InBatchGradXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(
        ctx, CheckInBatchUpstream(ctx->InputShape(Io::kLabels), ctx->InputShape(Io::kUpstream)));
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kInBatchGradTarget, operands,
                 {xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim}),
                  xla::ShapeUtil::MakeShape(in.type, {in.rows})},
                 attrs);
    for (int i : {Io::kGrad, Io::kLoss}) ctx->SetOutput(i, out[i]);
  }
};

class InBatchLossReducedHostXlaOp : public InBatchLossReducedXlaOp {
 public:
  using InBatchLossReducedXlaOp::InBatchLossReducedXlaOp;

  void Compile(tensorflow::XlaOpKernelContext* ctx) override {
    using Io = InBatchReducedIo;
    if (HloOnCpu()) return InBatchLossReducedXlaOp::Compile(ctx);
    InBatchInputs in;
    std::vector<xla::XlaOp> operands;
    std::vector<std::pair<const char*, int>> attrs;
    OP_REQUIRES_OK(ctx, HostOperands<Io>(ctx, &in, &operands, &attrs));
    OP_REQUIRES_OK(ctx, CheckInBatchWeights(ctx->InputShape(Io::kWeights), -1, in.rows));
    attrs.emplace_back("reduction", static_cast<int>(reduction_));
    const std::vector<xla::XlaOp> out =
        HostCall(ctx, kInBatchReducedTarget, operands,
                 {xla::ShapeUtil::MakeShape(in.type, {}),
                  xla::ShapeUtil::MakeShape(in.type, {in.rows, in.dim}),
                  xla::ShapeUtil::MakeShape(xla::F64, {})},
                 attrs);
    for (int i : {Io::kLoss, Io::kGrad, Io::kReductionScale}) ctx->SetOutput(i, out[i]);
  }
};

}  // namespace

constexpr XlaKernels kInBatchLossXla = {{"InBatchLossXlaOp", Create<InBatchLossXlaOp>},
                                        {"InBatchLossHostXlaOp", Create<InBatchLossHostXlaOp>}};
constexpr XlaKernels kInBatchGradXla = {{"InBatchGradXlaOp", Create<InBatchGradXlaOp>},
                                        {"InBatchGradHostXlaOp", Create<InBatchGradHostXlaOp>}};
constexpr XlaKernels kInBatchReducedXla = {
    {"InBatchLossReducedXlaOp", Create<InBatchLossReducedXlaOp>},
    {"InBatchLossReducedHostXlaOp", Create<InBatchLossReducedHostXlaOp>}};

}  // namespace fused_contrastive

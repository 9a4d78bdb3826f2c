#include <algorithm>

#include "core/common/cpu_reduce.h"
#include "core/pairs/kernels.h"
#include "core/pairs/math.h"

namespace fused_contrastive {
namespace {

template <typename C>
using RowValues = C[kMaxRowValues];

// The sums of one row, of its elements times scale_a and scale_b (cosine;
// the others take no scales): chunks of kRowSumChunk elements summed in the
// compute type, vectorised along the row by `omp simd`, and the chunks' sums
// added in double. The order of the lane-wise partial sums is fixed for a
// given binary, so results are deterministic and independent of the thread
// count.
template <Distance K, typename T, typename C = ComputeType<T>>
void ScaledRowSums(const T* a, const T* b, int64_t dim, C scale_a, C scale_b, C* sums) {
  double total[kMaxRowSums] = {};
  for (int64_t start = 0; start < dim; start += kRowSumChunk) {
    const int64_t end = std::min(dim, start + kRowSumChunk);
    C s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int64_t k = start; k < end; ++k) {
      C x = Convert<C>::from(a[k]), y = Convert<C>::from(b[k]), t0, t1, t2;
      if constexpr (K == Distance::kCosine) {
        x *= scale_a;
        y *= scale_b;
      }
      distance_terms<K>(x, y, t0, t1, t2);
      s0 += t0;
      if constexpr (NumRowSums(K) > 1) {
        s1 += t1;
        s2 += t2;
      }
    }
    total[0] += s0;
    total[1] += s1;
    total[2] += s2;
  }
  for (int j = 0; j < kMaxRowSums; ++j) sums[j] = static_cast<C>(total[j]);
}

// A row's values (NumRowValues): its sums, and for cosine the scales they
// were taken at, rows outside CosineScaling's range summed again scaled.
template <Distance K, typename T, typename C = ComputeType<T>>
void RowSums(const T* a, const T* b, int64_t dim, RowValues<C>& values) {
  ScaledRowSums<K>(a, b, dim, C(1), C(1), values);
  if constexpr (K == Distance::kCosine) {
    values[3] = values[4] = C(1);
    if (!cosine_sums_out_of_range(values)) return;
    C max_a = 0, max_b = 0;
    for (int64_t k = 0; k < dim; ++k) {
      max_a = std::max(max_a, ElementOps<C>::abs(Convert<C>::from(a[k])));
      max_b = std::max(max_b, ElementOps<C>::abs(Convert<C>::from(b[k])));
    }
    values[3] = cosine_scale(max_a);
    values[4] = cosine_scale(max_b);
    ScaledRowSums<K>(a, b, dim, values[3], values[4], values);
  }
}

template <Distance K, typename T, typename C = ComputeType<T>>
void RowGradient(const RowValues<C>& coef, const T* a, const T* b, int64_t dim, T* grad_a,
                 T* grad_b) {
  const C c[kMaxRowValues] = {coef[0], coef[1], coef[2], coef[3], coef[4]};
#pragma omp simd
  for (int64_t k = 0; k < dim; ++k) {
    C ga, gb;
    element_gradient<K>(c, Convert<C>::from(a[k]), Convert<C>::from(b[k]), &ga, &gb);
    grad_a[k] = Store<T>::to(ga);
    grad_b[k] = Store<T>::to(gb);
  }
}

// Rows per block of the reduced kernel's sum (a multiple of kFloatSumChunk).
constexpr int64_t kRowBlock = 256;

// Per-row cost for the thread pools: reads both rows, writes `stored` bytes.
template <typename T>
ElementCost RowCost(int64_t dim, double extra_loaded, double stored) {
  return ElementCost{2.0 * dim * sizeof(T) + extra_loaded, stored, 6.0 * dim};
}

}  // namespace

bool EmbeddingLossCpu(const EmbeddingInputs& in, void* loss, double* coefficients,
                      const ParallelFor& parallel_for) {
  return VisitEmbeddingKernel(
      in.label_type, in.embedding_type, in.distance, [&](auto l_tag, auto t_tag, auto k_tag) {
        using L = typename decltype(l_tag)::type;
        using T = typename decltype(t_tag)::type;
        using C = ComputeType<T>;
        constexpr Distance K = decltype(k_tag)::value;
        constexpr int kCoefficients = NumRowCoefficients(K);
        const auto* y = static_cast<const L*>(in.labels);
        const auto* a = static_cast<const T*>(in.a);
        const auto* b = static_cast<const T*>(in.b);
        auto* out = static_cast<T*>(loss);
        const int64_t dim = in.dim;
        const int64_t stride = in.row_stride;
        const C margin = static_cast<C>(in.margin);
        const int similar_label = in.similar_label;
        const ElementCost cost = RowCost<T>(dim, sizeof(L), sizeof(T) + 8.0 * kCoefficients);
        parallel_for(in.rows, cost, [=](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            RowValues<C> sums, coef = {};
            C row_loss;
            RowSums<K>(a + r * stride, b + r * stride, dim, sums);
            row_loss_and_coefficients<K>(sums, Convert<C>::from(y[r]), margin, similar_label,
                                         &row_loss, coef);
            out[r] = Store<T>::to(row_loss);
            for (int j = 0; j < kCoefficients; ++j) coefficients[r * kCoefficients + j] = coef[j];
          }
        });
      });
}

bool EmbeddingGradCpu(const EmbeddingGradArgs& g, const ParallelFor& parallel_for) {
  return VisitEmbeddingTypeAndDistance(g.type, g.distance, [&](auto t_tag, auto k_tag) {
    using T = typename decltype(t_tag)::type;
    using C = ComputeType<T>;
    constexpr Distance K = decltype(k_tag)::value;
    constexpr int kCoefficients = NumRowCoefficients(K);
    const auto* a = static_cast<const T*>(g.a);
    const auto* b = static_cast<const T*>(g.b);
    const auto* upstream = static_cast<const T*>(g.upstream);
    auto* grad_a = static_cast<T*>(g.grad_a);
    auto* grad_b = static_cast<T*>(g.grad_b);
    const double* coefficients = g.coefficients;
    const bool scalar_upstream = g.scalar_upstream;
    const int64_t dim = g.dim;
    const int64_t stride = g.row_stride;
    const ElementCost cost =
        RowCost<T>(dim, sizeof(T) + 8.0 * kCoefficients, 2.0 * dim * sizeof(T));
    parallel_for(g.rows, cost, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const double u = Convert<double>::from(upstream[scalar_upstream ? 0 : r]);
        RowValues<C> coef = {};
        for (int j = 0; j < kCoefficients; ++j) {
          // Only the coefficients scale with the upstream gradient, not cosine's scales.
          const double c = coefficients[r * kCoefficients + j];
          coef[j] = static_cast<C>(j < NumRowSums(K) ? c * u : c);
        }
        RowGradient<K>(coef, a + r * stride, b + r * stride, dim, grad_a + r * stride,
                       grad_b + r * stride);
      }
    });
  });
}

bool EmbeddingLossReducedCpu(const ReducedEmbeddingArgs& args, const ParallelFor& parallel_for) {
  const EmbeddingInputs& in = args.in;
  return VisitEmbeddingKernel(
      in.label_type, in.embedding_type, in.distance, [&](auto l_tag, auto t_tag, auto k_tag) {
        using L = typename decltype(l_tag)::type;
        using T = typename decltype(t_tag)::type;
        using C = ComputeType<T>;
        constexpr Distance K = decltype(k_tag)::value;
        const auto* y = static_cast<const L*>(in.labels);
        const auto* a = static_cast<const T*>(in.a);
        const auto* b = static_cast<const T*>(in.b);
        const ReductionArgs& reduction = args.reduction;
        const auto* w = static_cast<const T*>(reduction.weights);
        auto* grad_a = static_cast<T*>(args.grad_a);
        auto* grad_b = static_cast<T*>(args.grad_b);
        const int64_t dim = in.dim;
        const int64_t stride = in.row_stride;
        const double scale = CpuReductionScale<T>(reduction, in.rows, parallel_for);
        *reduction.reduction_scale = scale;
        const C scale_c = static_cast<C>(scale);
        const C margin = static_cast<C>(in.margin);
        const C scalar_weight = reduction.scalar_weight ? Convert<C>::from(w[0]) : C(0);
        const ElementCost cost = RowCost<T>(dim, sizeof(L) + sizeof(T), 2.0 * dim * sizeof(T));
        // Per-row losses are summed in the compute type in chunks of
        // kFloatSumChunk rows, the chunks in double, as ContrastiveLossReducedCpu.
        const double sum =
            BlockedSum(in.rows, kRowBlock, cost, parallel_for, [&](int64_t begin, int64_t end) {
              double total = 0;
              for (int64_t chunk = begin; chunk < end; chunk += kFloatSumChunk) {
                C chunk_sum = 0;
                for (int64_t r = chunk; r < std::min(end, chunk + kFloatSumChunk); ++r) {
                  RowValues<C> sums, coef = {};
                  C row_loss;
                  RowSums<K>(a + r * stride, b + r * stride, dim, sums);
                  row_loss_and_coefficients<K>(sums, Convert<C>::from(y[r]), margin,
                                               in.similar_label, &row_loss, coef);
                  const C weight = reduction.scalar_weight ? scalar_weight : Convert<C>::from(w[r]);
                  chunk_sum += row_loss * weight;
                  const C factor = weight * scale_c;
                  for (int j = 0; j < NumRowSums(K); ++j) coef[j] *= factor;
                  RowGradient<K>(coef, a + r * stride, b + r * stride, dim, grad_a + r * stride,
                                 grad_b + r * stride);
                }
                total += static_cast<double>(chunk_sum);
              }
              return total;
            });
        *static_cast<T*>(reduction.loss) = Store<T>::to(static_cast<C>(sum * scale));
      });
}

}  // namespace fused_contrastive

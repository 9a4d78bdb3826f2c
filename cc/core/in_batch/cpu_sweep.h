// The CPU kernel of the in-batch loss, compiled once per instruction set
// (cpu_generic.cc, cpu_avx2.cc) inside the namespace
// FC_IN_BATCH_ISA; cpu.cc picks one at run time. Not a public header.
//
// The sweep: rows are cut into blocks of R; every unordered pair of blocks
// (I, J) is one task: S = E_I·E_Jᵀ (an R×R GEMM), then one pass over S gives
// the pairs' terms, added to the sums of rows i and j, and overwrites S with
// the gradient's M_IJ, and two more GEMMs add −M_IJ·E_J to grad_I and
// −M_IJᵀ·E_I to grad_J. Tasks run in round-robin stages in which no two
// tasks share a block, so a stage needs no locks and every row's sums are
// added in the same order whatever the thread count. Block pairs (I, I) come
// last, each a task of its own.
//
// When the anchors are a slice of the rows (the other rows are partners
// only), the anchor rows are blocked as above, the partner rows before and
// after them in blocks of their own, and each (anchor block, partner block)
// pair, the anchors here in blocks of the partners' size, is one more task,
// in Latin-square stages (stage s pairs anchor block t
// with partner block (t + s) mod n when there are fewer anchor blocks, and
// the other way round): again no two tasks of a stage share a block. Pairs
// of two partners are never computed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "core/in_batch/kernels.h"

namespace fused_contrastive {
namespace FC_IN_BATCH_ISA {
namespace {

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using ConstRows = Eigen::Map<const RowMatrix<T>>;
template <typename T>
using Rows = Eigen::Map<RowMatrix<T>>;

// Rows per block: large enough for the GEMMs to run near peak (measured with
// Eigen on AVX2: 128×128×128 products reach about 70% of the core's peak),
// small enough that each stage has a task per thread at moderate B.
int64_t BlockRows(int64_t rows, int64_t cap) {
  int64_t block = 256;
  while (block > 32 && rows < 8 * block) block /= 2;
  if (cap > 0) block = std::min(block, cap);
  return std::max<int64_t>(block, 1);
}

// Round-robin schedule of the unordered pairs of `blocks` blocks: stage s of
// n − 1 (n = blocks rounded up to even) pairs every block with another one
// once; a pair with the padding block n − 1 (blocks odd) is dropped. Each
// task's pair is computed when it runs: stored, the schedule would take
// 16·(blocks/2)² bytes, quadratic in B for small blocks.
class PairSchedule {
 public:
  explicit PairSchedule(int64_t blocks) : n_(blocks + blocks % 2), padded_(blocks % 2 != 0) {}

  int64_t Stages() const { return std::max<int64_t>(n_ - 1, 0); }
  int64_t Tasks() const { return n_ / 2 - (padded_ ? 1 : 0); }

  // Task t of stage s; (s, n − 1) first when block n − 1 is real.
  std::pair<int64_t, int64_t> Task(int64_t s, int64_t t) const {
    const int64_t k = padded_ ? t + 1 : t;
    if (k == 0) return {s, n_ - 1};
    const int64_t a = (s + k) % (n_ - 1);
    const int64_t b = (s - k + n_ - 1) % (n_ - 1);
    return {std::min(a, b), std::max(a, b)};
  }

 private:
  int64_t n_;
  bool padded_;
};

// Rows [first, first + count): a block.
struct Block {
  int64_t first, count;
};

// [begin, end) cut into blocks of at most `rows`, appended to `blocks`.
void AppendBlocks(int64_t begin, int64_t end, int64_t rows, std::vector<Block>* blocks) {
  for (int64_t first = begin; first < end; first += rows) {
    blocks->push_back({first, std::min(rows, end - first)});
  }
}

// Dense class ids (equal labels, equal ids; int32 so that the tile loop
// compares lanes as wide as float's) and, per row, the number of other rows
// with its label. Sorting: O(B log B).
void ClassIds(const int64_t* labels, int64_t rows, std::vector<int32_t>* classes,
              std::vector<int64_t>* positives) {
  std::vector<int64_t> order(rows);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [labels](int64_t x, int64_t y) { return labels[x] < labels[y]; });
  classes->resize(rows);
  positives->resize(rows);
  int32_t id = 0;
  for (int64_t first = 0; first < rows; ++id) {
    int64_t last = first;
    while (last < rows && labels[order[last]] == labels[order[first]]) ++last;
    for (int64_t k = first; k < last; ++k) {
      (*classes)[order[k]] = id;
      (*positives)[order[k]] = last - first - 1;
    }
    first = last;
  }
}

template <typename T>
T SquaredNorm(const T* row, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < dim; ++k) sum += row[k] * row[k];
  return sum;
}

// Each row's counts of nonzero positive and negative terms (active_term),
// for the "active" weighting: a forward sweep counts them, the gradient sweep
// takes them as given (its pair coefficients need every row's weights).
struct ActiveCounts {
  std::vector<double> positive, negative;
};

template <typename T, Distance K, bool kGrad>
class Sweep {
 public:
  // counts: the rows' ActiveCounts when the weighting is "active" and a
  // gradient is wanted; a forward sweep with that weighting counts them
  // itself (active_counts()).
  Sweep(const InBatchArgs& args, const ParallelFor& parallel_for,
        const ActiveCounts* counts = nullptr)
      : args_(args),
        parallel_for_(parallel_for),
        e_(static_cast<const T*>(args.embeddings)),
        rows_(args.rows),
        dim_(args.dim),
        anchor_begin_(args.anchor_begin),
        anchor_end_(args.anchor_end),
        grad_rows_(args.grad_rows),
        margin_(static_cast<T>(args.margin)),
        positive_margin_(static_cast<T>(args.positive_margin)),
        norm2_(rows_),
        stat_(rows_),
        positive_weight_(rows_),
        negative_weight_(rows_),
        positive_coefficient_(kGrad ? rows_ : 0),
        negative_coefficient_(kGrad ? rows_ : 0),
        positive_sum_(rows_, 0.0),
        negative_sum_(rows_, 0.0),
        diagonal_(kGrad ? rows_ : 0, 0.0),
        given_counts_(counts),
        counting_(!kGrad && args.weighting == PairWeighting::kActive) {
    if (counting_) {
      counts_.positive.assign(rows_, 0.0);
      counts_.negative.assign(rows_, 0.0);
    }
  }

  const ActiveCounts& active_counts() const { return counts_; }

  void Run() {
    PrepareRows();
    // Anchor blocks sized by the anchors (all rows: as without partners),
    // partner blocks by all rows: the products stay large when few anchors
    // meet many partners.
    std::vector<Block> anchors, partners;
    AppendBlocks(anchor_begin_, anchor_end_,
                 BlockRows(anchor_end_ - anchor_begin_, args_.max_block_rows), &anchors);
    const int64_t partner_rows = BlockRows(rows_, args_.max_block_rows);
    AppendBlocks(0, anchor_begin_, partner_rows, &partners);
    AppendBlocks(anchor_end_, grad_rows_, partner_rows, &partners);
    AppendBlocks(grad_rows_, rows_, partner_rows, &partners);
    const int64_t na = anchors.size(), np = partners.size();
    const PairSchedule schedule(na);
    for (int64_t stage = 0; stage < schedule.Stages(); ++stage) {
      parallel_for_(schedule.Tasks(), TileCost(anchors[0], anchors[0]),
                    [&](int64_t first, int64_t last) {
                      for (int64_t t = first; t < last; ++t) {
                        const std::pair<int64_t, int64_t> pair = schedule.Task(stage, t);
                        Tile<false>(anchors[pair.first], anchors[pair.second]);
                      }
                    });
    }
    if (na > 0) {
      parallel_for_(na, TileCost(anchors[0], anchors[0]), [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) Tile<true>(anchors[b], anchors[b]);
      });
    }
    // Against partners, anchor blocks as large as the partners' (the anchors'
    // own blocks shrink below 2,048 anchors to keep their stages busy; here
    // the partner blocks make the stages).
    std::vector<Block> wide;
    AppendBlocks(anchor_begin_, anchor_end_, partner_rows, &wide);
    const int64_t nw = wide.size();
    for (int64_t stage = 0; nw > 0 && np > 0 && stage < std::max(nw, np); ++stage) {
      parallel_for_(std::min(nw, np), TileCost(wide[0], partners[0]),
                    [&](int64_t first, int64_t last) {
                      for (int64_t t = first; t < last; ++t) {
                        const int64_t a = nw <= np ? t : (t + stage) % nw;
                        const int64_t p = nw <= np ? (t + stage) % np : t;
                        Tile<false>(wide[a], partners[p], partners[p].first < grad_rows_);
                      }
                    });
    }
    Finish();
  }

 private:
  // Rows of extreme scale, divided by 2^k for the cosine distance
  // (cosine_row_exponent); e_ then points at the scaled copy. Others are
  // read in place: no copy unless a row needs it.
  void ScaleRows() {
    exponent_.assign(rows_, 0);
    const ElementCost cost{dim_ * sizeof(T) + 0.0, 4, 1.0 * dim_};
    parallel_for_(rows_, cost, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        T max_abs = 0;
        for (int64_t k = 0; k < dim_; ++k) max_abs = std::max(max_abs, std::abs(e_[i * dim_ + k]));
        exponent_[i] = cosine_row_exponent(max_abs);
      }
    });
    if (std::all_of(exponent_.begin(), exponent_.end(), [](int k) { return k == 0; })) {
      exponent_.clear();
      return;
    }
    scaled_.resize(rows_ * dim_);
    parallel_for_(rows_, cost, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        for (int64_t k = 0; k < dim_; ++k) {
          scaled_[i * dim_ + k] = std::ldexp(e_[i * dim_ + k], -exponent_[i]);
        }
      }
    });
    e_ = scaled_.data();
  }

  void PrepareRows() {
    if constexpr (K == Distance::kCosine) ScaleRows();
    std::vector<int64_t> positives;
    ClassIds(args_.labels, rows_, &classes_, &positives);
    const T* g = static_cast<const T*>(args_.upstream);
    parallel_for_(rows_, ElementCost{dim_ * sizeof(T) + 16.0, 32, 2.0 * dim_},
                  [&](int64_t first, int64_t last) {
                    for (int64_t i = first; i < last; ++i) {
                      norm2_[i] = SquaredNorm(e_ + i * dim_, dim_);
                      stat_[i] = row_statistic<K>(norm2_[i]);
                      // A partner's weights are 0: its pairs with anchors
                      // then carry only the anchor's half of A_ij.
                      positive_weight_[i] = negative_weight_[i] = 0;
                      // A counting sweep's "active" weights come in Finish.
                      if (IsAnchor(i) && !counting_) {
                        Weights(i, static_cast<double>(positives[i]));
                      }
                      if constexpr (kGrad) {
                        // A partner's upstream is not read (its loss is 0).
                        const double gi = IsAnchor(i) ? static_cast<double>(g[i]) : 0.0;
                        positive_coefficient_[i] = static_cast<T>(positive_weight_[i] * gi);
                        negative_coefficient_[i] = static_cast<T>(negative_weight_[i] * gi);
                        std::fill_n(grad() + i * dim_, dim_, T(0));
                      }
                    }
                  });
  }

  T* grad() const { return static_cast<T*>(args_.grad); }

  void Weights(int64_t i, double positives) {
    const ActiveCounts* counts = counting_ ? &counts_ : given_counts_;
    pair_weights(args_.weighting, static_cast<double>(rows_), positives,
                 counts ? counts->positive[i] : 0.0, counts ? counts->negative[i] : 0.0,
                 &positive_weight_[i], &negative_weight_[i]);
  }

  bool IsAnchor(int64_t i) const { return i >= anchor_begin_ && i < anchor_end_; }

  ElementCost TileCost(Block bi, Block bj) const {
    return {(bi.count + bj.count) * dim_ * sizeof(T) + 0.0, 0,
            (kGrad ? 6.0 : 2.0) * bi.count * bj.count * dim_};
  }

  // The pairs of block bi's rows with block bj's rows; bi holds anchors, and
  // bj == bi for a diagonal tile. column_grad: whether bj's rows need their
  // gradient (not a memory's).
  template <bool kDiagonal>
  void Tile(Block bi, Block bj, bool column_grad = true) {
    const int64_t i0 = bi.first, ni = bi.count;
    const int64_t j0 = bj.first, nj = bj.count;
    thread_local std::vector<T> scratch;
    thread_local std::vector<T> columns;
    scratch.resize(ni * nj);
    // The two count arrays only where this sweep counts.
    columns.assign((counting_ ? 5 : 3) * nj, T(0));
    Rows<T> s(scratch.data(), ni, nj);
    const ConstRows<T> ei(e_ + i0 * dim_, ni, dim_);
    const ConstRows<T> ej(e_ + j0 * dim_, nj, dim_);
    s.noalias() = ei * ej.transpose();
    T* column_positive = columns.data();
    T* column_negative = columns.data() + nj;
    Columns columns_of_tile{columns.data(), columns.data() + nj, columns.data() + 2 * nj,
                            counting_ ? columns.data() + 3 * nj : nullptr,
                            counting_ ? columns.data() + 4 * nj : nullptr};
    int64_t active = 0;  // nonzero entries of M
    for (int64_t r = 0; r < ni; ++r) {
      const int64_t i = i0 + r;
      T* row = scratch.data() + r * nj;
      if (K == Distance::kEuclidean && RowCancels(row, i, kDiagonal ? r : -1, j0, nj)) {
        active += ExactRow<kDiagonal>(row, i, j0, nj, columns_of_tile);
      } else if (counting_) {
        active += FastRow<kDiagonal, true>(row, i, j0, nj, columns_of_tile);
      } else {
        active += FastRow<kDiagonal, false>(row, i, j0, nj, columns_of_tile);
      }
    }
    if constexpr (!kDiagonal) {
      for (int64_t c = 0; c < nj; ++c) {
        positive_sum_[j0 + c] += columns_of_tile.positive[c];
        negative_sum_[j0 + c] += columns_of_tile.negative[c];
        if (kGrad) diagonal_[j0 + c] += columns_of_tile.diagonal[c];
        if (counting_) {
          counts_.positive[j0 + c] += columns_of_tile.positive_active[c];
          counts_.negative[j0 + c] += columns_of_tile.negative_active[c];
        }
      }
    }
    if constexpr (kGrad) {
      // The hinge leaves most pairs without gradient once negatives are beyond
      // the margin (a trained model, well-separated classes): when at most a
      // quarter of M is nonzero, adding those pairs' rows one by one beats the
      // dense products (measured break-even near a third on AVX2).
      if (4 * active <= ni * nj) {
        SparseGradient<kDiagonal>(scratch.data(), i0, ni, j0, nj, column_grad);
      } else {
        Rows<T> gi(grad() + i0 * dim_, ni, dim_);
        gi.noalias() -= s * ej;
        if (!kDiagonal && column_grad) {
          Rows<T> gj(grad() + j0 * dim_, nj, dim_);
          gj.noalias() -= s.transpose() * ei;
        }
      }
    }
  }

  // Whether any pair of row i (column `self` of the tile, or none) with the
  // tile's columns needs the exact path.
  bool RowCancels(const T* row, int64_t i, int64_t self, int64_t j0, int64_t nj) const {
    const T ni = norm2_[i];
    const T* nj_norm2 = norm2_.data() + j0;
    int cancels = 0;
#pragma omp simd reduction(| : cancels)
    for (int64_t c = 0; c < nj; ++c) {
      cancels |= c != self &&
                 gram_distance_cancels(euclidean_squared(row[c], ni, nj_norm2[c]), ni, nj_norm2[c]);
    }
    return cancels != 0;
  }

  // A tile's per-column sums (the pairs' other order, for a tile of two
  // blocks): terms, q's part, and with counting_ the nonzero terms.
  struct Columns {
    T *positive, *negative, *diagonal, *positive_active, *negative_active;
  };

  // A pair's terms, and with a gradient its M and the part of q it adds.
  struct Pair {
    T positive, negative, m, diagonal;
  };

  // From masks, not branches (so that GCC vectorises the tile loop):
  // positive = 1 for a pair with equal labels, negative = 1 for one with
  // different labels, both 0 for a row with itself. coefficient_sum: the
  // pair's g_i·w_i + g_j·w_j, positive and negative.
  Pair PairValues(T positive, T negative, T s, T d, T positive_coefficient_sum,
                  T negative_coefficient_sum, T stat_i, T stat_j) const {
    T tp, sp, tn, sn;
    positive_term(d, positive_margin_, &tp, &sp);
    negative_term(d, margin_, &tn, &sn);
    Pair p;
    p.positive = masked(positive, tp);
    p.negative = masked(negative, tn);
    if constexpr (kGrad) {
      const T coefficient = masked(positive, positive_coefficient_sum * sp) +
                            masked(negative, negative_coefficient_sum * sn);
      p.m = gram_coefficient<K>(coefficient, d, stat_i, stat_j);
      p.diagonal = diagonal_term<K>(p.m, s);
    } else {
      p.m = p.diagonal = T(0);
    }
    return p;
  }

  Pair PairValues(int64_t i, int64_t j, T s, T d) const {
    const T positive = i == j ? T(0) : (classes_[i] == classes_[j] ? T(1) : T(0));
    const T negative = i == j ? T(0) : T(1) - positive;
    return PairValues(positive, negative, s, d, CoefficientSum(positive_coefficient_, i, j),
                      CoefficientSum(negative_coefficient_, i, j), stat_[i], stat_[j]);
  }

  static T CoefficientSum(const std::vector<T>& coefficients, int64_t i, int64_t j) {
    return kGrad ? coefficients[i] + coefficients[j] : T(0);
  }

  // A pair's active_term()s in its column's counts (a tile of two blocks
  // stands for both orders); the terms by value, as active_term takes them.
  static void CountColumn(T positive, T negative, int64_t c, const Columns& columns) {
    columns.positive_active[c] += active_term(positive);
    columns.negative_active[c] += active_term(negative);
  }

  // FastRow and ExactRow return the row's number of nonzero M entries.
  // kCount: the sweep counts nonzero terms (counting_).
  template <bool kDiagonal, bool kCount>
  int64_t FastRow(T* row, int64_t i, int64_t j0, int64_t nj, const Columns& columns) {
    const int64_t self = kDiagonal ? i - j0 : -1;
    T positive = 0, negative = 0, diagonal = 0, positive_active = 0, negative_active = 0;
    int active = 0;
    const T stat_i = stat_[i];
    const T* stat_j = stat_.data() + j0;
    const int32_t class_i = classes_[i];
    const int32_t* class_j = classes_.data() + j0;
    const T pc_i = kGrad ? positive_coefficient_[i] : T(0);
    const T nc_i = kGrad ? negative_coefficient_[i] : T(0);
    const T* pc_j = kGrad ? positive_coefficient_.data() + j0 : nullptr;
    const T* nc_j = kGrad ? negative_coefficient_.data() + j0 : nullptr;
#pragma omp simd reduction(+ : positive, negative, diagonal, positive_active, negative_active, \
                               active)
    for (int64_t c = 0; c < nj; ++c) {
      const T s = row[c];
      const T d = pair_distance<K>(s, stat_i, stat_j[c]);
      const T valid = c == self ? T(0) : T(1);
      const T is_positive = class_j[c] == class_i ? valid : T(0);
      T pc = 0, nc = 0;
      if constexpr (kGrad) {
        pc = pc_i + pc_j[c];
        nc = nc_i + nc_j[c];
      }
      const Pair p = PairValues(is_positive, valid - is_positive, s, d, pc, nc, stat_i, stat_j[c]);
      positive += p.positive;
      negative += p.negative;
      diagonal += p.diagonal;
      if (!kDiagonal) {
        columns.positive[c] += p.positive;
        columns.negative[c] += p.negative;
        columns.diagonal[c] += p.diagonal;
      }
      if constexpr (kCount) {
        positive_active += active_term(p.positive);
        negative_active += active_term(p.negative);
        if (!kDiagonal) CountColumn(p.positive, p.negative, c, columns);
      }
      row[c] = p.m;
      active += p.m != T(0) ? 1 : 0;
    }
    AddRow(i, positive, negative, diagonal, positive_active, negative_active);
    return active;
  }

  // The row of a tile with a pair whose Gram distance cancels: such pairs get
  // d from e_i − e_j, and their gradient directly, (A/d)·(e_i − e_j) to row
  // i (and its opposite to row j when the tile stands for both orders).
  template <bool kDiagonal>
  int64_t ExactRow(T* row, int64_t i, int64_t j0, int64_t nj, const Columns& columns) {
    T positive = 0, negative = 0, diagonal = 0, positive_active = 0, negative_active = 0;
    int64_t active = 0;
    const T* ei = e_ + i * dim_;
    for (int64_t c = 0; c < nj; ++c) {
      const int64_t j = j0 + c;
      const T s = row[c];
      row[c] = T(0);
      if (j == i) continue;
      const bool exact =
          gram_distance_cancels(euclidean_squared(s, norm2_[i], norm2_[j]), norm2_[i], norm2_[j]);
      const T* ej = e_ + j * dim_;
      T d;
      if (exact) {
        T squared = 0;
#pragma omp simd reduction(+ : squared)
        for (int64_t k = 0; k < dim_; ++k) squared += (ei[k] - ej[k]) * (ei[k] - ej[k]);
        d = ElementOps<T>::sqrt(squared);
      } else {
        d = pair_distance<K>(s, stat_[i], stat_[j]);
      }
      Pair p = PairValues(i, j, s, d);
      positive += p.positive;
      negative += p.negative;
      if (!kDiagonal) {
        columns.positive[c] += p.positive;
        columns.negative[c] += p.negative;
      }
      if (counting_) {
        positive_active += active_term(p.positive);
        negative_active += active_term(p.negative);
        if (!kDiagonal) CountColumn(p.positive, p.negative, c, columns);
      }
      if (!kGrad) continue;
      if (!exact) {
        diagonal += p.diagonal;
        if (!kDiagonal) columns.diagonal[c] += p.diagonal;
        row[c] = p.m;
        active += p.m != T(0) ? 1 : 0;
        continue;
      }
      // p.m is already A/d (0 at d = 0) for the Euclidean distance.
      T* gi = grad() + i * dim_;
      T* gj = grad() + j * dim_;
      const T m = p.m;
      for (int64_t k = 0; k < dim_; ++k) {
        const T step = m * (ei[k] - ej[k]);
        gi[k] += step;
        if (!kDiagonal) gj[k] -= step;
      }
    }
    AddRow(i, positive, negative, diagonal, positive_active, negative_active);
    return active;
  }

  // grad_I −= M·E_J (and grad_J −= Mᵀ·E_I when column_grad) from M's nonzero
  // entries only.
  template <bool kDiagonal>
  void SparseGradient(const T* m, int64_t i0, int64_t ni, int64_t j0, int64_t nj,
                      bool column_grad) {
    for (int64_t r = 0; r < ni; ++r) {
      T* gi = grad() + (i0 + r) * dim_;
      const T* ei = e_ + (i0 + r) * dim_;
      for (int64_t c = 0; c < nj; ++c) {
        const T v = m[r * nj + c];
        if (v == T(0)) continue;
        const T* ej = e_ + (j0 + c) * dim_;
#pragma omp simd
        for (int64_t k = 0; k < dim_; ++k) gi[k] -= v * ej[k];
        if (!kDiagonal && column_grad) {
          T* gj = grad() + (j0 + c) * dim_;
#pragma omp simd
          for (int64_t k = 0; k < dim_; ++k) gj[k] -= v * ei[k];
        }
      }
    }
  }

  void AddRow(int64_t i, T positive, T negative, T diagonal, T positive_active, T negative_active) {
    positive_sum_[i] += positive;
    negative_sum_[i] += negative;
    if (kGrad) diagonal_[i] += diagonal;
    if (counting_) {
      counts_.positive[i] += positive_active;
      counts_.negative[i] += negative_active;
    }
  }

  void Finish() {
    T* loss = static_cast<T*>(args_.loss);
    parallel_for_(rows_, ElementCost{dim_ * sizeof(T) + 40.0, dim_ * sizeof(T) + 0.0, 2.0 * dim_},
                  [&](int64_t first, int64_t last) {
                    for (int64_t i = first; i < last; ++i) {
                      // The positives count is not read by "active".
                      if (counting_ && IsAnchor(i)) Weights(i, 0.0);
                      // A partner's sums hold its pairs with anchors: not a loss.
                      if (loss != nullptr) {
                        loss[i] = IsAnchor(i)
                                      ? static_cast<T>(positive_weight_[i] * positive_sum_[i] +
                                                       negative_weight_[i] * negative_sum_[i])
                                      : T(0);
                      }
                      if constexpr (kGrad) {
                        T* gi = grad() + i * dim_;
                        // No gradient past grad_rows (what the exact path
                        // added there is dropped too).
                        if (i >= grad_rows_) {
                          std::fill_n(gi, dim_, T(0));
                          continue;
                        }
                        const T q = diagonal_factor<K>(stat_[i]) * static_cast<T>(diagonal_[i]);
                        const T* ei = e_ + i * dim_;
#pragma omp simd
                        for (int64_t k = 0; k < dim_; ++k) gi[k] += q * ei[k];
                        // The gradient of a scaled row, back to the input's scale.
                        const int exponent = exponent_.empty() ? 0 : exponent_[i];
                        if (exponent != 0) {
                          for (int64_t k = 0; k < dim_; ++k) gi[k] = std::ldexp(gi[k], -exponent);
                        }
                      }
                    }
                  });
  }

  const InBatchArgs& args_;
  const ParallelFor& parallel_for_;
  const T* e_;
  const int64_t rows_;
  const int64_t dim_;
  const int64_t anchor_begin_;
  const int64_t anchor_end_;
  const int64_t grad_rows_;
  const T margin_;
  const T positive_margin_;
  // Cosine rows of extreme scale (ScaleRows): each row's k, empty when no
  // row is scaled, and the scaled copy of the embeddings.
  std::vector<int> exponent_;
  std::vector<T> scaled_;
  std::vector<int32_t> classes_;
  std::vector<T> norm2_;
  std::vector<T> stat_;
  // Per-anchor pair weights (pair_weights), and times the upstream gradient.
  std::vector<double> positive_weight_;
  std::vector<double> negative_weight_;
  std::vector<T> positive_coefficient_;
  std::vector<T> negative_coefficient_;
  std::vector<double> positive_sum_;
  std::vector<double> negative_sum_;
  std::vector<double> diagonal_;
  const ActiveCounts* given_counts_;
  const bool counting_;
  ActiveCounts counts_;
};

}  // namespace

bool InBatchLoss(const InBatchArgs& args, const ParallelFor& parallel_for) {
  return VisitInBatchKernel(args.type, args.distance, [&](auto t_tag, auto k_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr Distance K = decltype(k_tag)::value;
    // The unused rows' outputs are 0; the sweep sees the used rows only.
    const int64_t used = args.used_rows, rows = args.rows;
    if (args.loss != nullptr)
      std::fill(static_cast<T*>(args.loss) + used, static_cast<T*>(args.loss) + rows, T(0));
    if (args.grad != nullptr) {
      std::fill(static_cast<T*>(args.grad) + used * args.dim,
                static_cast<T*>(args.grad) + rows * args.dim, T(0));
      // "active": a forward sweep counts the nonzero terms first. It writes
      // the loss too, so that the forward op's and this op's loss bits agree
      // (the counting sweep's sums may round apart from the gradient sweep's).
      const bool active = args.weighting == PairWeighting::kActive;
      ActiveCounts counts;
      InBatchArgs sweep = UsedRowsOnly(args);
      if (active) {
        InBatchArgs forward = sweep;
        forward.upstream = nullptr;
        forward.grad = nullptr;
        Sweep<T, K, false> counter(forward, parallel_for);
        counter.Run();
        counts = counter.active_counts();
        sweep.loss = nullptr;
      }
      Sweep<T, K, true>(sweep, parallel_for, active ? &counts : nullptr).Run();
    } else {
      Sweep<T, K, false>(UsedRowsOnly(args), parallel_for).Run();
    }
  });
}

}  // namespace FC_IN_BATCH_ISA
}  // namespace fused_contrastive

// The CPU kernel of the in-batch loss, compiled once per instruction set
// (cpu_generic.cc, cpu_avx2.cc, cpu_avx512.cc) inside the namespace
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
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/in_batch/cpu_blocks.h"
#include "core/in_batch/cpu_mining.h"
#include "core/in_batch/kernels.h"

namespace fused_contrastive {
namespace FC_IN_BATCH_ISA {
namespace {

// What a sweep does besides its loss or gradient: kStats only collects the
// miner's statistics; kMultiSimilarityFirst is multi_similarity's forward
// sweep when positive pairs are few (RunMultiSimilarityFirst).
enum class Role { kLoss, kStats, kMultiSimilarityFirst };

// Each row's counts of positive and negative pairs for the weights that
// need them: nonzero terms (active_term) for "active", kept pairs under a
// miner (counted_pair). A forward sweep counts them, the gradient sweep takes
// them as given (its pair coefficients need every row's weights).
struct PairCounts {
  std::vector<double> positive, negative;
  // 1 for rows with a pair on the exact path (ExactRow): the gradient sweep,
  // over the same tiles and products, checks only these (RowCancels). Empty:
  // every row.
  std::vector<uint8_t> exact;
};

template <typename T, Distance K, bool kGrad>
class Sweep {
 public:
  // counts: the rows' PairCounts when the weights need them (CountsPairs())
  // and a gradient is wanted; a forward sweep counts them itself
  // (pair_counts()). stats: the miner's statistics, which a sweep of
  // another role collects (miner_stats()).
  Sweep(const InBatchArgs& args, const ParallelFor& parallel_for,
        const PairCounts* counts = nullptr, const MinerStats<T>* stats = nullptr,
        Role role = Role::kLoss)
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
        stats_(stats),
        collecting_(role != Role::kLoss),
        negatives_in_pass_(role == Role::kMultiSimilarityFirst),
        counting_(!kGrad && CountsPairs(args) && role != Role::kStats),
        count_active_(args.weighting == PairWeighting::kActive ? T(1) : T(0)),
        epsilon_(static_cast<T>(args.miner_epsilon)) {
    if (counting_) {
      counts_.positive.assign(rows_, 0.0);
      counts_.negative.assign(rows_, 0.0);
      counts_.exact.assign(rows_, 0);
    }
    if (collecting_) collected_ = MinerStats<T>(rows_);
  }

  // Whether the weights need PairCounts from a counting sweep.
  static bool CountsPairs(const InBatchArgs& args) {
    return args.weighting == PairWeighting::kActive || args.miner != Miner::kNone;
  }

  const PairCounts& pair_counts() const { return counts_; }
  const MinerStats<T>& miner_stats() const { return collected_; }
  // The rows as the sweep used them (cosine: scaled, CosineExponents).
  PreparedRows<T> prepared_rows() const { return {e_, dim_, stat_.data(), exponent_}; }

  // The tiles, then (unless the sweep collects statistics) Finish.
  void Run() {
    PrepareRows();
    RunTiles();
    if (!collecting_) Finish();
  }

  // multi_similarity's forward sweep where positive pairs are few (at most a
  // 16th of the pairs; each anchor's rows of its class): the hardest
  // positives straight from those rows first, so that the sweep keeps its
  // negatives as it goes (d < hardest positive + epsilon) and finds the
  // hardest negatives; its rows keep no positive (kNegatives).
  // Then the kept positives (d > hardest negative − epsilon) from the rows
  // of each class, and Finish: the loss and the counts of three sweeps in
  // two passes over the class rows and one sweep. Distances of the class
  // rows from their own product, as ExactRow gets them.
  void RunMultiSimilarityFirst() {
    PrepareRows();
    const ClassRows by_class = RowsByClass(classes_);
    own_ = MinerStats<T>(rows_);
    ForEachPositivePair(by_class, [&](int64_t i, T d) {
      own_.positive_d[i] = std::isnan(d) || d > own_.positive_d[i] ? d : own_.positive_d[i];
    });
    stats_ = &own_;
    RunTiles();
    ForEachPositivePair(by_class, [&](int64_t i, T d) {
      const T keep = multi_similarity_keeps(true, d, collected_.negative_d[i], epsilon_);
      T term, slope;
      positive_term(d, positive_margin_, &term, &slope);
      positive_sum_[i] += masked(keep, term);
      counts_.positive[i] += counted_pair(count_active_, keep, masked(keep, term));
    });
    Finish();
    own_.negative_d = collected_.negative_d;
  }

  // multi_similarity's statistics after RunMultiSimilarityFirst.
  const MinerStats<T>& multi_similarity_stats() const { return own_; }

 private:
  void RunTiles() {
    ForEachTile(
        anchor_begin_, anchor_end_, grad_rows_, rows_, args_.max_block_rows, parallel_for_,
        [&](Block bi, Block bj) { return TileCost(bi, bj); },
        [&](Block bi, Block bj, bool diagonal, bool column_grad) {
          if (diagonal) {
            Tile<true>(bi, bj);
          } else {
            Tile<false>(bi, bj, column_grad);
          }
        });
  }

 public:
  // The loss and the gradient's last part from the sums; Run calls it
  // unless the sweep collects statistics.
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

 private:
  void PrepareRows() {
    if constexpr (K == Distance::kCosine)
      e_ = ScaleRows(e_, rows_, dim_, parallel_for_, &exponent_, &scaled_);
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
                      // A counting sweep's weights come in Finish.
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
    const PairCounts* counts = counting_ ? &counts_ : given_counts_;
    const double counted_positives = counts ? counts->positive[i] : 0.0;
    const double counted_negatives = counts ? counts->negative[i] : 0.0;
    if (args_.miner != Miner::kNone) {
      mined_pair_weights(args_.weighting, counted_positives, counted_negatives,
                         &positive_weight_[i], &negative_weight_[i]);
    } else {
      pair_weights(args_.weighting, static_cast<double>(rows_), positives, counted_positives,
                   counted_negatives, &positive_weight_[i], &negative_weight_[i]);
    }
  }

  bool IsAnchor(int64_t i) const { return i >= anchor_begin_ && i < anchor_end_; }

  // Whether row i may have a pair on the exact path (PairCounts::exact).
  bool MayCancel(int64_t i) const {
    return given_counts_ == nullptr || given_counts_->exact.empty() || given_counts_->exact[i];
  }

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
    thread_local std::vector<T> hardest_negatives;  // the rows', then the columns'
    scratch.resize(ni * nj);
    // The two count arrays only where this sweep counts.
    columns.assign((counting_ ? 5 : 3) * nj, T(0));
    if (negatives_in_pass_) {
      hardest_negatives.assign(ni + nj, std::numeric_limits<T>::infinity());
    }
    Rows<T> s(scratch.data(), ni, nj);
    const ConstRows<T> ei(e_ + i0 * dim_, ni, dim_);
    const ConstRows<T> ej(e_ + j0 * dim_, nj, dim_);
    s.noalias() = ei * ej.transpose();
    Columns columns_of_tile{columns.data(),
                            columns.data() + nj,
                            columns.data() + 2 * nj,
                            counting_ ? columns.data() + 3 * nj : nullptr,
                            counting_ ? columns.data() + 4 * nj : nullptr,
                            negatives_in_pass_ ? hardest_negatives.data() + ni : nullptr};
    int64_t active = 0;  // nonzero entries of M
    // batch_hard runs no sweep after the statistics (BatchHardLoss).
    const auto rows = [&](auto miner) {
      constexpr Miner M = decltype(miner)::value;
      for (int64_t r = 0; r < ni; ++r) {
        const int64_t i = i0 + r;
        T* row = scratch.data() + r * nj;
        const bool exact = K == Distance::kEuclidean && MayCancel(i) &&
                           RowCancels(row, norm2_[i], norm2_.data() + j0, kDiagonal ? r : -1, nj);
        if constexpr (!kGrad && M == Miner::kMultiSimilarity) {
          if (negatives_in_pass_) {
            T* hardest = &hardest_negatives[r];
            active +=
                exact ? ExactRow<kDiagonal, M, true>(row, i, j0, nj, columns_of_tile, hardest)
                      : FastRow<kDiagonal, true, M, true>(row, i, j0, nj, columns_of_tile, hardest);
            continue;
          }
        }
        if (exact) {
          active += ExactRow<kDiagonal, M>(row, i, j0, nj, columns_of_tile);
        } else if (!kGrad && counting_) {
          active += FastRow<kDiagonal, !kGrad, M>(row, i, j0, nj, columns_of_tile);
        } else {
          active += FastRow<kDiagonal, false, M>(row, i, j0, nj, columns_of_tile);
        }
      }
    };
    if (args_.miner == Miner::kMultiSimilarity && stats_ != nullptr) {
      rows(std::integral_constant<Miner, Miner::kMultiSimilarity>{});
    } else {
      rows(std::integral_constant<Miner, Miner::kNone>{});
    }
    if constexpr (!kDiagonal) {
      for (int64_t c = 0; c < nj; ++c) {
        positive_sum_[j0 + c] += columns_of_tile.positive[c];
        negative_sum_[j0 + c] += columns_of_tile.negative[c];
        if (kGrad) diagonal_[j0 + c] += columns_of_tile.diagonal[c];
        if (counting_) {
          counts_.positive[j0 + c] += columns_of_tile.positive_counted[c];
          counts_.negative[j0 + c] += columns_of_tile.negative_counted[c];
        }
      }
    }
    if (negatives_in_pass_) {
      for (int64_t r = 0; r < ni; ++r) collected_.Offer(false, i0 + r, hardest_negatives[r], j0);
      if (!kDiagonal && IsAnchor(j0)) {
        for (int64_t c = 0; c < nj; ++c) {
          collected_.Offer(false, j0 + c, hardest_negatives[ni + c], i0);
        }
      }
    } else if (collecting_) {
      Offer<kDiagonal>(scratch.data(), i0, ni, j0, nj);
    }
    if constexpr (kGrad) {
      // The hinge leaves most pairs without gradient once negatives are past the margin (a
      // trained model): when at most a quarter of M is nonzero, adding those pairs' rows one
      // by one beats the dense products (measured break-even near a third on AVX2).
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

  // The distance of rows i and j from their Gram entry s, or from e_i − e_j
  // where the Gram distance cancels (*exact; Euclidean only).
  T ExactPathDistance(int64_t i, int64_t j, T s, bool* exact) const {
    *exact = false;
    if constexpr (K == Distance::kCosine) return pair_distance<K>(s, stat_[i], stat_[j]);
    *exact =
        gram_distance_cancels(euclidean_squared(s, norm2_[i], norm2_[j]), norm2_[i], norm2_[j]);
    if (!*exact) return pair_distance<K>(s, stat_[i], stat_[j]);
    return ElementOps<T>::sqrt(SquaredDistance(e_ + i * dim_, e_ + j * dim_, dim_));
  }

  // f(i, d) for each anchor i and each other row of its class, d their
  // distance, in increasing row order (ForEachClassPair).
  template <typename F>
  void ForEachPositivePair(const ClassRows& by_class, F&& f) {
    ForEachClassPair<T>(
        by_class, classes_, e_, dim_, parallel_for_, [&](int64_t i) { return IsAnchor(i); },
        [&](int64_t i, int64_t j, T s) {
          bool exact;
          f(i, ExactPathDistance(i, j, s, &exact));
        });
  }

  // A statistics sweep's tile, its rows' distances in `tile`: each anchor
  // row and, when the columns are anchors too, each column offers its
  // hardest pairs.
  template <bool kDiagonal>
  void Offer(const T* tile, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    const bool values_only = args_.miner == Miner::kMultiSimilarity;
    for (int64_t r = 0; r < ni; ++r) {
      OfferRow(tile + r * nj, classes_[i0 + r], classes_.data() + j0, kDiagonal ? r : -1, i0 + r,
               j0, nj, values_only, &collected_);
    }
    if (kDiagonal || !IsAnchor(j0)) return;
    const int32_t* class_i = classes_.data() + i0;
    const int32_t* class_j = classes_.data() + j0;
    if (values_only) {
      OfferColumnValues(tile, class_i, class_j, i0, ni, j0, nj, &collected_);
    } else {
      OfferColumns(tile, class_i, class_j, i0, ni, j0, nj, &collected_);
    }
  }

  // A tile's per-column sums (the pairs' other order, for a tile of two
  // blocks): terms, q's part, and with counting_ the counted pairs.
  struct Columns {
    T *positive, *negative, *diagonal, *positive_counted, *negative_counted;
    T* hardest_negative;  // kNegatives: the smallest negative d so far, NaN kept
  };

  // A pair's terms for row i's sums and for column j's (they differ only
  // under a miner), and with a gradient its M and the part of q it adds;
  // through pointers to scalars, not as a struct: under omp simd GCC 12
  // keeps a struct local to the loop in memory, one per lane, when its
  // address is taken or it is returned in memory (over 16 bytes), and leaves
  // the loop scalar (the forward sweep then took 2-4.5x its time, B = 4096,
  // D = 128).
  //
  // From masks, not branches (so that GCC vectorises the tile loop): the
  // pair's positive and negative masks for row i's sums and for column j's
  // are 1 where that anchor counts the pair (equal labels for a positive,
  // and kept by the miner), else 0 (always 0 for a row with itself).
  // coefficient_sum: the pair's g_i·w_i + g_j·w_j over the anchors that keep
  // it, positive and negative.
  void PairValues(T positive, T negative, T column_positive, T column_negative, T s, T d,
                  T positive_coefficient_sum, T negative_coefficient_sum, T stat_i, T stat_j,
                  T* positive_term_out, T* negative_term_out, T* column_positive_term,
                  T* column_negative_term, T* m, T* diagonal) const {
    T tp, sp, tn, sn;
    positive_term(d, positive_margin_, &tp, &sp);
    negative_term(d, margin_, &tn, &sn);
    *positive_term_out = masked(positive, tp);
    *negative_term_out = masked(negative, tn);
    *column_positive_term = masked(column_positive, tp);
    *column_negative_term = masked(column_negative, tn);
    if constexpr (kGrad) {
      const T coefficient = masked(positive + column_positive, positive_coefficient_sum * sp) +
                            masked(negative + column_negative, negative_coefficient_sum * sn);
      *m = gram_coefficient<K>(coefficient, d, stat_i, stat_j);
      *diagonal = diagonal_term<K>(*m, s);
    } else {
      *m = *diagonal = T(0);
    }
  }

  // A pair's counted_pair()s (masks, then terms) in its column's counts (a
  // tile of two blocks stands for both orders); values, for the reason
  // PairValues gives (with a struct by reference, the counting sweep took
  // 4.7x the plain forward sweep's time, cosine, B = 4096, D = 128; 1.06x
  // with values). The row's counts are the loop's reductions, inline: a
  // pointer to a reduction variable stops the vectorisation too.
  // kPositives false: the positives' count is left alone (no positive is
  // kept), one stream less in the tile loop.
  template <bool kPositives = true>
  static void CountColumn(T active, T positive_mask, T negative_mask, T positive, T negative,
                          T* positive_counted, T* negative_counted) {
    if constexpr (kPositives) *positive_counted += counted_pair(active, positive_mask, positive);
    *negative_counted += counted_pair(active, negative_mask, negative);
  }

  // FastRow and ExactRow return the row's number of nonzero M entries.
  // kCount: the sweep counts pairs (counting_); M: the miner; kNegatives
  // (negatives_in_pass_): no positive is kept (RunMultiSimilarityFirst takes
  // them from the class rows), the row's smallest negative d (NaN if one is
  // NaN) goes to *hardest_negative and the columns' to
  // columns.hardest_negative, and no distance is kept in the tile (nothing
  // reads it again). The loop's streams are what its sums need: the first
  // sweep's pass took 2.6x the unmined forward pass with all of them.
  template <bool kDiagonal, bool kCount, Miner M, bool kNegatives = false>
  int64_t FastRow(T* row, int64_t i, int64_t j0, int64_t nj, const Columns& columns,
                  T* hardest_negative = nullptr) {
    const int64_t self = kDiagonal ? i - j0 : -1;
    T positive = 0, negative = 0, diagonal = 0, positive_counted = 0, negative_counted = 0;
    // Of T, as every other value of the loop (exact below 2^24 columns): an
    // int count beside double values left the loop scalar in the AVX-512
    // build (GCC 12: "multiple types in double reduction").
    T active = 0;
    const T stat_i = stat_[i];
    const T* stat_j = stat_.data() + j0;
    const int32_t class_i = classes_[i];
    const int32_t* class_j = classes_.data() + j0;
    const T pc_i = kGrad ? positive_coefficient_[i] : T(0);
    const T nc_i = kGrad ? negative_coefficient_[i] : T(0);
    const T* pc_j = kGrad ? positive_coefficient_.data() + j0 : nullptr;
    const T* nc_j = kGrad ? negative_coefficient_.data() + j0 : nullptr;
    const MinerView<T> miner = ViewOf(stats_, epsilon_);
    const T count_active = count_active_;
    // The columns' pointers as locals: read through `columns` in the loop,
    // GCC 12 reloads them at every column in the AVX-512 build, takes the
    // stores for gathers and leaves the loop scalar (3x the miners' step).
    T* const column_positive = columns.positive;
    T* const column_negative = columns.negative;
    T* const column_diagonal = columns.diagonal;
    T* const column_positive_counted = columns.positive_counted;
    T* const column_negative_counted = columns.negative_counted;
    T* const column_hardest_negative = columns.hardest_negative;
    const T inf = std::numeric_limits<T>::infinity();
    T smallest_negative = inf, nan_negatives = 0;
#pragma omp simd reduction(+ : positive, negative, diagonal, positive_counted, negative_counted, \
                               active, nan_negatives) reduction(min : smallest_negative)
    for (int64_t c = 0; c < nj; ++c) {
      const T s = row[c];
      const T d = pair_distance<K>(s, stat_i, stat_j[c]);
      const T valid = c == self ? T(0) : T(1);
      const T same_class = class_j[c] == class_i ? valid : T(0);
      T kp, kn, kcp, kcn;
      PairMasks<M, kNegatives>(miner, i, j0 + c, valid, same_class, d, &kp, &kn, &kcp, &kcn);
      if constexpr (kNegatives) {
        // As OfferRow and OfferColumnValues, on the values this pass has.
        const T is_negative = valid - same_class;
        const T nan = d != d ? T(1) : T(0);
        smallest_negative = std::min(smallest_negative, is_negative != T(0) ? d : inf);
        nan_negatives += nan * is_negative;
        if (!kDiagonal) {
          column_hardest_negative[c] =
              HarderValue<false>(column_hardest_negative[c], d, is_negative);
        }
      }
      T pc = 0, nc = 0;
      if constexpr (kGrad) {
        pc = kp * pc_i + kcp * pc_j[c];
        nc = kn * nc_i + kcn * nc_j[c];
      }
      T tp, tn, tcp, tcn, m, q;
      PairValues(kp, kn, kcp, kcn, s, d, pc, nc, stat_i, stat_j[c], &tp, &tn, &tcp, &tcn, &m, &q);
      positive += tp;
      negative += tn;
      if (!kDiagonal) {
        if constexpr (!kNegatives) column_positive[c] += tcp;
        column_negative[c] += tcn;
      }
      if constexpr (kCount) {
        positive_counted += counted_pair(count_active, kp, tp);
        negative_counted += counted_pair(count_active, kn, tn);
        if (!kDiagonal) {
          CountColumn<!kNegatives>(count_active, kcp, kcn, tcp, tcn, column_positive_counted + c,
                                   column_negative_counted + c);
        }
      }
      if constexpr (kGrad) {
        diagonal += q;
        if (!kDiagonal) column_diagonal[c] += q;
        row[c] = m;
        active += m != T(0) ? T(1) : T(0);
      } else if constexpr (!kNegatives) {
        row[c] = d;  // for Offer
      }
    }
    if constexpr (kNegatives) {
      *hardest_negative =
          nan_negatives != T(0) ? std::numeric_limits<T>::quiet_NaN() : smallest_negative;
    }
    AddRow(i, positive, negative, diagonal, positive_counted, negative_counted);
    return static_cast<int64_t>(active);
  }

  // The row of a tile with a pair whose Gram distance cancels: such pairs get
  // d from e_i − e_j, and their gradient directly, (A/d)·(e_i − e_j) to row
  // i (and its opposite to row j when the tile stands for both orders).
  template <bool kDiagonal, Miner M, bool kNegatives = false>
  int64_t ExactRow(T* row, int64_t i, int64_t j0, int64_t nj, const Columns& columns,
                   T* hardest_negative = nullptr) {
    T positive = 0, negative = 0, diagonal = 0, positive_counted = 0, negative_counted = 0;
    T smallest_negative = std::numeric_limits<T>::infinity();
    int64_t active = 0;
    const T* ei = e_ + i * dim_;
    const T count_active = count_active_;
    for (int64_t c = 0; c < nj; ++c) {
      const int64_t j = j0 + c;
      const T s = row[c];
      row[c] = T(0);
      if (j == i) continue;
      bool exact;
      const T d = ExactPathDistance(i, j, s, &exact);
      if (exact && counting_) counts_.exact[i] = counts_.exact[j] = 1;
      const T same_class = classes_[i] == classes_[j] ? T(1) : T(0);
      T kp, kn, kcp, kcn;
      PairMasks<M, kNegatives>(ViewOf(stats_, epsilon_), i, j, T(1), same_class, d, &kp, &kn, &kcp,
                               &kcn);
      if constexpr (kNegatives) {
        smallest_negative = HarderValue<false>(smallest_negative, d, T(1) - same_class);
        if (!kDiagonal) {
          columns.hardest_negative[c] =
              HarderValue<false>(columns.hardest_negative[c], d, T(1) - same_class);
        }
      }
      const T pc = kGrad ? kp * positive_coefficient_[i] + kcp * positive_coefficient_[j] : T(0);
      const T nc = kGrad ? kn * negative_coefficient_[i] + kcn * negative_coefficient_[j] : T(0);
      T tp, tn, tcp, tcn, m, q;
      PairValues(kp, kn, kcp, kcn, s, d, pc, nc, stat_[i], stat_[j], &tp, &tn, &tcp, &tcn, &m, &q);
      positive += tp;
      negative += tn;
      if (!kDiagonal) {
        columns.positive[c] += tcp;
        columns.negative[c] += tcn;
      }
      if (counting_) {
        positive_counted += counted_pair(count_active, kp, tp);
        negative_counted += counted_pair(count_active, kn, tn);
        if (!kDiagonal) {
          CountColumn(count_active, kcp, kcn, tcp, tcn, columns.positive_counted + c,
                      columns.negative_counted + c);
        }
      }
      if (!kGrad) {
        row[c] = d;
        continue;
      }
      if (!exact) {
        diagonal += q;
        if (!kDiagonal) columns.diagonal[c] += q;
        row[c] = m;
        active += m != T(0) ? 1 : 0;
        continue;
      }
      // m is already A/d (0 at d = 0) for the Euclidean distance.
      T* gi = grad() + i * dim_;
      T* gj = grad() + j * dim_;
      for (int64_t k = 0; k < dim_; ++k) {
        const T step = m * (ei[k] - e_[j * dim_ + k]);
        gi[k] += step;
        if (!kDiagonal) gj[k] -= step;
      }
    }
    if constexpr (kNegatives) *hardest_negative = smallest_negative;
    AddRow(i, positive, negative, diagonal, positive_counted, negative_counted);
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

  void AddRow(int64_t i, T positive, T negative, T diagonal, T positive_counted,
              T negative_counted) {
    positive_sum_[i] += positive;
    negative_sum_[i] += negative;
    if (kGrad) diagonal_[i] += diagonal;
    if (counting_) {
      counts_.positive[i] += positive_counted;
      counts_.negative[i] += negative_counted;
    }
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
  const PairCounts* given_counts_;
  MinerStats<T> collected_;
  MinerStats<T> own_;  // RunMultiSimilarityFirst's
  const MinerStats<T>* stats_;
  const bool collecting_;
  // The keeping and counting pass finds the hardest negatives too
  // (multi_similarity's first sweep, which needs no hardest positives from
  // the tiles): the tile is not read again by Offer.
  const bool negatives_in_pass_;
  const bool counting_;
  const T count_active_;  // 1 for "active", else 0 (counted_pair)
  const T epsilon_;
  PairCounts counts_;
};

}  // namespace
}  // namespace FC_IN_BATCH_ISA
}  // namespace fused_contrastive

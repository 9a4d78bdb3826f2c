// The CPU in-batch kernel's blocks of rows, its schedule of block pairs, its
// per-row preparations and the products of a class's rows (cpu_sweep.h), in
// the namespace of the instruction set the including file is built for. Not
// a public header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "core/common/parallel.h"
#include "core/in_batch/kernels.h"
#include "core/in_batch/math.h"

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

// ‖a − b‖², summed directly (the sweeps' exact path, where the Gram form
// cancels; batch_hard's kept pairs).
template <typename T>
T SquaredDistance(const T* a, const T* b, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < dim; ++k) sum += (a[k] - b[k]) * (a[k] - b[k]);
  return sum;
}

template <typename T>
T Dot(const T* a, const T* b, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < dim; ++k) sum += a[k] * b[k];
  return sum;
}

// Whether any pair in a tile's row (products `row`, the row's squared norm
// norm2_i, the columns' norm2_j; column `self` is the row itself, or −1)
// needs the exact path: its Gram distance cancels.
template <typename T>
bool RowCancels(const T* row, T norm2_i, const T* norm2_j, int64_t self, int64_t nj) {
  int cancels = 0;
#pragma omp simd reduction(| : cancels)
  for (int64_t c = 0; c < nj; ++c) {
    cancels |= c != self && gram_distance_cancels(euclidean_squared(row[c], norm2_i, norm2_j[c]),
                                                  norm2_i, norm2_j[c]);
  }
  return cancels != 0;
}

// Calls tile(bi, bj, diagonal, column_grad) for every tile of the sweep
// over anchors [begin, end) of `rows` rows (partners from grad_rows on need
// no gradient), cost(bi, bj) its ElementCost, in the schedule of
// cpu_sweep.h's header: stages of the anchor blocks' pairs, the diagonal
// blocks, then the (anchor block, partner block) pairs.
template <typename CostFn, typename TileFn>
void ForEachTile(int64_t begin, int64_t end, int64_t grad_rows, int64_t rows,
                 int64_t max_block_rows, const ParallelFor& parallel_for, CostFn&& cost,
                 TileFn&& tile) {
  // Anchor blocks sized by the anchors (all rows: as without partners),
  // partner blocks by all rows: the products stay large when few anchors
  // meet many partners.
  std::vector<Block> anchors, partners;
  AppendBlocks(begin, end, BlockRows(end - begin, max_block_rows), &anchors);
  const int64_t partner_rows = BlockRows(rows, max_block_rows);
  AppendBlocks(0, begin, partner_rows, &partners);
  AppendBlocks(end, grad_rows, partner_rows, &partners);
  AppendBlocks(grad_rows, rows, partner_rows, &partners);
  const int64_t na = anchors.size(), np = partners.size();
  const PairSchedule schedule(na);
  for (int64_t stage = 0; stage < schedule.Stages(); ++stage) {
    parallel_for(schedule.Tasks(), cost(anchors[0], anchors[0]), [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const std::pair<int64_t, int64_t> pair = schedule.Task(stage, t);
        tile(anchors[pair.first], anchors[pair.second], false, true);
      }
    });
  }
  if (na > 0) {
    parallel_for(na, cost(anchors[0], anchors[0]), [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) tile(anchors[b], anchors[b], true, true);
    });
  }
  // Against partners, anchor blocks as large as the partners' (the anchors'
  // own blocks shrink below 2,048 anchors to keep their stages busy; here
  // the partner blocks make the stages).
  std::vector<Block> wide;
  AppendBlocks(begin, end, partner_rows, &wide);
  const int64_t nw = wide.size();
  for (int64_t stage = 0; nw > 0 && np > 0 && stage < std::max(nw, np); ++stage) {
    parallel_for(std::min(nw, np), cost(wide[0], partners[0]), [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t a = nw <= np ? t : (t + stage) % nw;
        const int64_t p = nw <= np ? (t + stage) % np : t;
        tile(wide[a], partners[p], false, partners[p].first < grad_rows);
      }
    });
  }
}

// Whether at most a 16th of the anchors' pairs are positive (rows of their
// class): multi_similarity then finds the positives from each class's rows.
inline bool FewPositivePairs(const InBatchArgs& args) {
  std::vector<int32_t> classes;
  std::vector<int64_t> positives;
  ClassIds(args.labels, args.rows, &classes, &positives);
  int64_t count = 0;
  for (int64_t i = args.anchor_begin; i < args.anchor_end; ++i) count += positives[i];
  return 16 * count <= (args.anchor_end - args.anchor_begin) * args.rows;
}

// The rows of each class (ClassIds' dense ids): class k's are
// order[start[k]] .. order[start[k + 1] - 1], in increasing row order.
struct ClassRows {
  std::vector<int64_t> order, start;
};

inline ClassRows RowsByClass(const std::vector<int32_t>& classes) {
  ClassRows out;
  int32_t count = 0;
  for (int32_t c : classes) count = std::max(count, c + 1);
  out.start.assign(count + 1, 0);
  for (int32_t c : classes) ++out.start[c + 1];
  for (int32_t k = 0; k < count; ++k) out.start[k + 1] += out.start[k];
  out.order.resize(classes.size());
  std::vector<int64_t> next(out.start.begin(), out.start.end() - 1);
  for (int64_t i = 0; i < static_cast<int64_t>(classes.size()); ++i) {
    out.order[next[classes[i]]++] = i;
  }
  return out;
}

// f(i, j, s) for each row i with is_anchor(i) and each other row j of its
// class, s = e_i·e_j, in increasing row order: one product per block of a
// class's anchors (at most 128) against the class's rows, the blocks in
// parallel.
template <typename T, typename IsAnchor, typename F>
void ForEachClassPair(const ClassRows& by_class, const std::vector<int32_t>& classes, const T* e,
                      int64_t dim, const ParallelFor& parallel_for, IsAnchor&& is_anchor, F&& f) {
  std::vector<std::pair<int64_t, int64_t>> blocks;  // ranges of `anchors`
  std::vector<int64_t> anchors;                     // by_class.order without partners
  for (size_t k = 0; k + 1 < by_class.start.size(); ++k) {
    const int64_t first = anchors.size();
    for (int64_t p = by_class.start[k]; p < by_class.start[k + 1]; ++p) {
      if (is_anchor(by_class.order[p])) anchors.push_back(by_class.order[p]);
    }
    for (int64_t a = first; a < static_cast<int64_t>(anchors.size()); a += 128) {
      blocks.push_back({a, std::min<int64_t>(a + 128, anchors.size())});
    }
  }
  const ElementCost cost{128.0 * dim * sizeof(T), 0, 2.0 * 128 * 128 * dim};
  parallel_for(blocks.size(), cost, [&](int64_t first, int64_t last) {
    thread_local RowMatrix<T> a, p, s;
    for (int64_t b = first; b < last; ++b) {
      const int64_t na = blocks[b].second - blocks[b].first;
      const int32_t k = classes[anchors[blocks[b].first]];
      const int64_t* members = by_class.order.data() + by_class.start[k];
      const int64_t np = by_class.start[k + 1] - by_class.start[k];
      a.resize(na, dim);
      p.resize(np, dim);
      for (int64_t r = 0; r < na; ++r)
        a.row(r) = ConstRows<T>(e + anchors[blocks[b].first + r] * dim, 1, dim);
      for (int64_t r = 0; r < np; ++r) p.row(r) = ConstRows<T>(e + members[r] * dim, 1, dim);
      s.noalias() = a * p.transpose();
      for (int64_t r = 0; r < na; ++r) {
        const int64_t i = anchors[blocks[b].first + r];
        for (int64_t c = 0; c < np; ++c) {
          if (members[c] != i) f(i, members[c], s(r, c));
        }
      }
    }
  });
}

// Rows of extreme scale, divided by 2^k for the cosine distance
// (cosine_row_exponent, k in *exponent, cleared when no row needs it): the
// rows to use, `e` itself or *scaled, the copy. Others are read in place: no
// copy unless a row needs it.
template <typename T>
const T* ScaleRows(const T* e, int64_t rows, int64_t dim, const ParallelFor& parallel_for,
                   std::vector<int>* exponent, std::vector<T>* scaled) {
  exponent->assign(rows, 0);
  const ElementCost cost{dim * sizeof(T) + 0.0, 4, 1.0 * dim};
  parallel_for(rows, cost, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      T max_abs = 0;
      for (int64_t k = 0; k < dim; ++k) max_abs = std::max(max_abs, std::abs(e[i * dim + k]));
      (*exponent)[i] = cosine_row_exponent(max_abs);
    }
  });
  if (std::all_of(exponent->begin(), exponent->end(), [](int k) { return k == 0; })) {
    exponent->clear();
    return e;
  }
  scaled->resize(rows * dim);
  parallel_for(rows, cost, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      for (int64_t k = 0; k < dim; ++k) {
        (*scaled)[i * dim + k] = std::ldexp(e[i * dim + k], -(*exponent)[i]);
      }
    }
  });
  return scaled->data();
}

}  // namespace
}  // namespace FC_IN_BATCH_ISA
}  // namespace fused_contrastive

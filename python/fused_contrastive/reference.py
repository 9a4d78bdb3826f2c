"""The contrastive loss in plain TensorFlow ops.

It is the oracle for the tests, the baseline for the benchmarks and the
fallback where the compiled op cannot run. It computes what the fused op
computes: float16/bfloat16 in float32, labels used linearly.
"""

import types

import numpy as np
import tensorflow as tf

from fused_contrastive import _array_math
from fused_contrastive._inputs import (
    InBatchOptions,
    against_partners,
    prepare_embedding_inputs,
    prepare_in_batch_inputs,
    prepare_inputs,
    prepare_references,
    validate_distance,
    validate_margin,
    validate_similar_label,
)


# TensorFlow as _array_math's array namespace.
TF_OPS = types.SimpleNamespace(
    where=tf.where,
    ones_like=tf.ones_like,
    zeros_like=tf.zeros_like,
    sum=tf.reduce_sum,
    max=tf.reduce_max,
    abs=tf.abs,
    sign=tf.sign,
    sqrt=tf.sqrt,
    isfinite=tf.math.is_finite,
    stop_gradient=tf.stop_gradient,
    cast=tf.cast,
    equal=tf.equal,
    logical_not=tf.logical_not,
)


def compute_dtype(dtype):
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _in_compute_dtype(labels, distances, margin, similar_label):
    """Similarity y (the label, or 1 - label when similar_label is 0),
    distances and margin in the compute dtype."""
    dtype = compute_dtype(distances.dtype)
    # A Python float margin goes straight to the compute dtype: tf.cast would
    # first make it a float32 tensor and round it.
    margin = _as_dtype(margin, dtype)
    y = tf.cast(labels, dtype)
    if similar_label == 0:
        y = 1.0 - y
    return y, tf.cast(distances, dtype), margin


def reference_loss(labels, distances, margin, similar_label=1):
    """Per-sample loss on prepared inputs (see contrastive_loss_reference)."""
    y, d, m = _in_compute_dtype(labels, distances, margin, similar_label)
    hinge = tf.maximum(m - d, 0.0)
    loss = _weighted(y, tf.square(d)) + _weighted(1.0 - y, tf.square(hinge))
    return tf.cast(loss, distances.dtype)


def _weighted(w, x):
    """w * x, exactly 0 where w is 0 and x is not NaN (even for an infinite x,
    where 0 * inf is NaN), as ElementOps::weighted in cc/core/common/element_ops.h."""
    return tf.where(tf.logical_and(tf.equal(w, 0.0), tf.equal(x, x)), tf.zeros_like(x), w * x)


def _as_dtype(value, dtype):
    """A margin (a number, or a float64 tensor) in dtype; a number goes there
    directly, as tf.cast would first round it to float32."""
    return tf.cast(value, dtype) if tf.is_tensor(value) else tf.constant(value, dtype)


def _safe(x, ok):
    return _array_math.safe(TF_OPS, x, ok)


def reference_distance(a, b, distance):
    """Distance between the rows of a and b (compute dtype): see _array_math.distance."""
    return _array_math.distance(TF_OPS, a, b, distance)


def reference_embedding_loss(labels, embeddings_a, embeddings_b, margin, distance, similar_label=1):
    """Per-pair loss on prepared inputs (see contrastive_loss_from_embeddings_reference)."""
    dtype = compute_dtype(embeddings_a.dtype)
    d = reference_distance(tf.cast(embeddings_a, dtype), tf.cast(embeddings_b, dtype), distance)
    return tf.cast(reference_loss(labels, d, margin, similar_label), embeddings_a.dtype)


def reference_second_derivative(labels, distances, margin, similar_label=1):
    """d2(loss)/d(distance)2 = 2y + 2(1-y)[d < margin], in the distance dtype."""
    y, d, m = _in_compute_dtype(labels, distances, margin, similar_label)
    inside = tf.cast(d < m, y.dtype)
    return tf.cast(2.0 * y + 2.0 * (1.0 - y) * inside, distances.dtype)


def contrastive_loss_reference(y_true, y_pred, margin=1.0, similar_label=1):
    """Pure-TensorFlow per-sample contrastive loss; differentiable by autodiff.

    Same arguments, checks and shapes as `fused_contrastive.contrastive_loss`.

    >>> print(contrastive_loss_reference([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5])
    ...       .numpy().round(4))
    [0.81 0.49 1.69 0.49 0.   0.25]
    """
    margin = validate_margin(margin)
    similar_label = validate_similar_label(similar_label)
    labels, distances = prepare_inputs(y_true, y_pred)
    return reference_loss(labels, distances, margin, similar_label)


def contrastive_loss_from_embeddings_reference(
    y_true, embeddings_a, embeddings_b, margin=1.0, distance="euclidean", similar_label=1
):
    """Pure-TensorFlow per-pair contrastive loss from the pairs' embeddings;
    differentiable by autodiff (to any order), finite at zero distance.

    Same arguments, checks and shapes as
    `fused_contrastive.contrastive_loss_from_embeddings`.

    >>> print(contrastive_loss_from_embeddings_reference(
    ...     [1, 0], [[0.0, 3.0], [1.0, 1.0]], [[4.0, 0.0], [1.0, 1.0]], margin=2.0).numpy())
    [25.  4.]
    """
    margin = validate_margin(margin)
    distance = validate_distance(distance)
    similar_label = validate_similar_label(similar_label)
    labels, a, b = prepare_embedding_inputs(y_true, embeddings_a, embeddings_b)
    return reference_embedding_loss(labels, a, b, margin, distance, similar_label)


def in_batch_contrastive_loss_reference(
    labels,
    embeddings,
    margin=1.0,
    positive_margin=0.0,
    distance="euclidean",
    pair_weighting="uniform",
    reference_labels=None,
    reference_embeddings=None,
    miner=None,
    miner_epsilon=0.1,
):
    """Per-anchor contrastive loss over every ordered pair (i, j), j != i, of a
    batch, in plain TF ops; it holds B x B matrices (the fused op will not).
    With references [R] and [R, D], each anchor also pairs with every
    reference (B x (B + R) matrices), as in in_batch_contrastive_loss.

    Pairs with equal class labels are positive, with term max(d - positive_margin,
    0)^2, the others negative, with term max(margin - d, 0)^2. "uniform": the
    anchor's loss is the sum of its B - 1 terms / (B - 1); "balanced": the mean of
    its positive terms plus the mean of its negative terms; "active": the mean
    of its nonzero positive terms plus the mean of its nonzero negative terms (a
    mean over no pairs is 0). d is "euclidean" (from the Gram matrix; 0 with a
    zero gradient for equal embeddings) or "cosine" (1 - cosine similarity; a zero vector has
    similarity 0). A miner keeps some pairs only, as in
    in_batch_contrastive_loss. Returns [B] in the embeddings' dtype (16-bit
    computed in float32).

    >>> print(in_batch_contrastive_loss_reference(
    ...     [0, 0, 1], [[0.0, 0.0], [0.0, 0.5], [0.0, 2.0]], margin=1.0).numpy())
    [0.125 0.125 0.   ]
    """
    options = InBatchOptions.checked(
        margin, positive_margin, distance, pair_weighting, miner=miner, miner_epsilon=miner_epsilon
    )
    labels, embeddings = prepare_in_batch_inputs(labels, embeddings)
    references = prepare_references(reference_labels, reference_embeddings, embeddings)
    return against_partners(
        labels,
        embeddings,
        references,
        lambda y, e, anchors: reference_in_batch_loss(y, e, options, anchors),
    )


def _power_of_two_scaled_rows(e):
    """Rows of e (float32 or float64) divided by 2^k, 2^k <= their largest
    magnitude < 2^(k+1): exact, so the cosine distance keeps its bits, while
    the sums of squares neither overflow (|e| ~ 1e19 in float32) nor
    underflow (1e-20). Rows without a finite normal magnitude stay as they
    are. The scale is a constant to autodiff: the distance does not depend
    on it."""
    bits, exponent_mask = (
        (tf.int32, 0x7F800000) if e.dtype == tf.float32 else (tf.int64, 0x7FF0000000000000)
    )
    largest = tf.reduce_max(tf.abs(e), axis=1, keepdims=True)
    power = tf.bitcast(
        tf.bitwise.bitwise_and(tf.bitcast(largest, bits), tf.constant(exponent_mask, bits)), e.dtype
    )
    usable = tf.logical_and(power > 0, tf.math.is_finite(power))
    return e / tf.stop_gradient(tf.where(usable, power, tf.ones_like(power)))


def _hardest(d, mask, largest):
    """Per row, the column of the hardest pair under `mask` (largest or
    smallest d; a NaN is harder than any number; ties to the lowest column),
    and its d (NaN when it is NaN; -inf or inf for a row without any)."""
    columns = tf.range(tf.shape(d, out_type=tf.int64)[1])[None, :]
    none = tf.cast(tf.shape(d)[1], tf.int64)
    nan = tf.logical_and(mask, tf.math.is_nan(d))
    number = tf.logical_and(mask, tf.logical_not(nan))
    empty = tf.fill(tf.shape(d), tf.constant(-np.inf if largest else np.inf, d.dtype))
    reduce = tf.reduce_max if largest else tf.reduce_min
    best = reduce(tf.where(number, d, empty), axis=1)
    first = lambda m: tf.reduce_min(tf.where(m, columns, none), axis=1)  # noqa: E731
    first_nan = first(nan)
    has_nan = first_nan < none
    column = tf.where(has_nan, first_nan, first(tf.logical_and(number, tf.equal(d, best[:, None]))))
    return column, tf.where(has_nan, tf.fill(tf.shape(best), tf.constant(np.nan, d.dtype)), best)


def _mined(d, positive, negative, options):
    """The positive and negative pairs options.miner keeps (no gradient: d is
    a constant here). batch_hard: each anchor's hardest positive and hardest
    negative; multi_similarity: the positives with d > (hardest negative) -
    epsilon and the negatives with d < (hardest positive) + epsilon, as
    negated comparisons, so that NaNs keep pairs (core/in_batch/math.h)."""
    positive_column, hardest_positive = _hardest(d, positive, largest=True)
    negative_column, hardest_negative = _hardest(d, negative, largest=False)
    if options.miner == "batch_hard":
        columns = tf.range(tf.shape(d, out_type=tf.int64)[1])[None, :]
        return (
            tf.logical_and(positive, tf.equal(columns, positive_column[:, None])),
            tf.logical_and(negative, tf.equal(columns, negative_column[:, None])),
        )
    epsilon = tf.constant(options.op_miner_epsilon, d.dtype)
    return (
        tf.logical_and(positive, tf.logical_not(d <= hardest_negative[:, None] - epsilon)),
        tf.logical_and(negative, tf.logical_not(d >= hardest_positive[:, None] + epsilon)),
    )


def reference_in_batch_loss(labels, embeddings, options, anchors=None):
    """Per-row in-batch loss on prepared inputs and InBatchOptions (see
    in_batch_contrastive_loss_reference); max_block_rows plays no part.
    anchors: None (every row) or int64 [begin, end, grad, used]: only rows
    [begin, end) are anchors, each paired with every other of the first `used`
    rows; the others get loss 0, and rows from `grad` on no gradient."""
    dtype = compute_dtype(embeddings.dtype)
    e = tf.cast(embeddings, dtype)
    all_rows = tf.shape(e, out_type=tf.int64)[0]
    if anchors is not None:
        e = tf.concat([e[: anchors[2]], tf.stop_gradient(e[anchors[2] : anchors[3]])], 0)
        labels = labels[: anchors[3]]
    if options.distance == "cosine":
        e = _power_of_two_scaled_rows(e)
    rows = tf.shape(e, out_type=tf.int64)[0]
    if anchors is None:
        begin, end = tf.constant(0, tf.int64), rows
        gram = tf.matmul(e, e, transpose_b=True)
        # From the products themselves, so that equal rows get d = 0 exactly.
        norms2 = tf.linalg.diag_part(gram)
    else:
        # [A, B] products only; float32 equal rows then get d of a few ulp.
        begin, end = anchors[0], anchors[1]
        gram = tf.matmul(e[begin:end], e, transpose_b=True)
        norms2 = tf.reduce_sum(e * e, axis=1)
    anchor_norms2 = norms2[begin:end]
    if options.distance == "euclidean":
        squared = tf.maximum(anchor_norms2[:, None] + norms2[None, :] - 2.0 * gram, 0.0)
        # NaN stays NaN (the kernels' rule): a NaN partner makes the loss NaN.
        nonzero = tf.not_equal(squared, 0.0)
        d = tf.where(nonzero, tf.sqrt(_safe(squared, nonzero)), tf.zeros_like(squared))
    else:
        norms = tf.sqrt(norms2)
        ok = tf.not_equal(tf.stop_gradient(norms[begin:end, None] * norms[None, :]), 0.0)
        root = tf.sqrt(_safe(norms2, norms2 > 0))
        product = root[begin:end, None] * root[None, :]
        d = 1.0 - tf.where(ok, gram / _safe(product, ok), tf.zeros_like(gram))
    others = tf.not_equal(
        tf.range(begin, end)[:, None], tf.range(tf.shape(e, out_type=tf.int64)[0])[None, :]
    )
    same = tf.equal(labels[begin:end, None], labels[None, :])
    positive = tf.logical_and(same, others)
    negative = tf.logical_and(tf.logical_not(same), others)
    if options.miner is not None:
        positive, negative = _mined(tf.stop_gradient(d), positive, negative, options)
    pos_terms = tf.square(tf.maximum(d - _as_dtype(options.positive_margin, dtype), 0.0))
    neg_terms = tf.square(tf.maximum(_as_dtype(options.margin, dtype) - d, 0.0))
    zeros = tf.zeros_like(d)
    pos_sum = tf.reduce_sum(tf.where(positive, pos_terms, zeros), axis=1)
    neg_sum = tf.reduce_sum(tf.where(negative, neg_terms, zeros), axis=1)
    count = lambda mask: tf.reduce_sum(tf.cast(mask, dtype), axis=1)  # noqa: E731
    if options.pair_weighting == "uniform" and options.miner is None:
        loss = tf.math.divide_no_nan(pos_sum + neg_sum, tf.cast(rows - 1, dtype))
    elif options.pair_weighting == "uniform":  # the mean over the kept pairs
        loss = tf.math.divide_no_nan(pos_sum + neg_sum, count(positive) + count(negative))
    else:
        if options.pair_weighting == "active":
            # Only the nonzero terms (NaN ones too) are counted; tf.not_equal
            # has no gradient, so neither have the counts.
            positive = tf.logical_and(positive, tf.not_equal(pos_terms, 0.0))
            negative = tf.logical_and(negative, tf.not_equal(neg_terms, 0.0))
        loss = tf.math.divide_no_nan(pos_sum, count(positive)) + tf.math.divide_no_nan(
            neg_sum, count(negative)
        )
    if anchors is not None:
        loss = tf.pad(loss, [[begin, all_rows - end]])
    return tf.cast(loss, embeddings.dtype)

"""The ops of the in-batch all-pairs loss (the InBatch* ops): their wrappers and
registered gradients."""

import tensorflow as tf

from fused_contrastive import reference
from fused_contrastive._distances_ops import scale_gradient
from fused_contrastive._inputs import InBatchOptions, all_anchors
from fused_contrastive._library import (
    IN_BATCH_GRAD_OP_NAME,
    IN_BATCH_OP_NAME,
    constant_scale,
    no_second_order,
    op_library,
    reference_gradients,
    scalar,
)
from fused_contrastive._private_api import could_possibly_record, should_record


def class_ids(labels):
    """Class labels as the in-batch ops take them: int64 ids equal exactly
    where the labels compare equal. Float labels (Keras passes y_true as
    floats) become the bits of their float64 value, with -0 made +0, and NaN
    labels ids of their own (NaN equals nothing, as in the reference): NaN bit
    patterns with the row number as payload, which no number has. No assert:
    XLA could not raise it anyway."""
    if labels.dtype.is_integer:
        return tf.cast(labels, tf.int64)
    x = tf.cast(labels, tf.float64)
    x = tf.where(tf.equal(x, 0.0), tf.zeros_like(x), x)
    rows = tf.range(1, tf.size(x, out_type=tf.int64) + 1, dtype=tf.int64)
    nan_ids = tf.bitwise.bitwise_or(rows, tf.constant(0x7FF8000000000000, tf.int64))
    return tf.where(tf.math.is_nan(x), nan_ids, tf.bitcast(x, tf.int64))


def _in_batch_compute(labels, embeddings):
    """int64 class ids, and the embeddings in the ops' dtype (16-bit ones in
    float32, as everywhere in the package)."""
    return class_ids(labels), tf.cast(embeddings, reference.compute_dtype(embeddings.dtype))


def _reference_gradient(labels, embeddings, anchors, options, upstream):
    """The gradient while a tape records the backward pass itself (see
    reference_gradients)."""
    return reference_gradients(
        lambda e: reference.reference_in_batch_loss(labels, e, options, anchors),
        [embeddings],
        upstream,
    )[0]


def _attrs(options):
    """The ops' attrs for `options` (an InBatchOptions)."""
    return {
        "distance": options.distance,
        "pair_weighting": options.pair_weighting,
        "max_block_rows": options.op_max_block_rows,
        "miner": options.op_miner,
        "miner_epsilon": options.op_miner_epsilon,
    }


def in_batch_loss(labels, embeddings, options, anchors=None):
    """Runs the in-batch op on prepared inputs and checked InBatchOptions: the
    loss [B] of each row, 0 for rows outside `anchors` (int64 [begin, end,
    grad, used], see all_anchors; None: every row is an anchor)."""
    ids, e = _in_batch_compute(labels, embeddings)
    anchors = all_anchors(e) if anchors is None else anchors
    inputs = (ids, e, anchors, scalar(options.margin), scalar(options.positive_margin))
    if should_record([e]):
        loss = _loss_and_gradient_sweep(inputs, options)
    else:
        loss = op_library.fused_contrastive_in_batch_contrastive_loss(*inputs, **_attrs(options))
    return tf.cast(loss, embeddings.dtype)


def _loss_and_gradient_sweep(inputs, options):
    """The loss while a tape watches the embeddings: the gradient op's one
    sweep gives the loss and the gradient of the anchors' loss sum, which
    serves any upstream gradient equal on every anchor (a mean or sum of the
    losses, the usual case) scaled by it. Another upstream (sample weights)
    takes a second sweep, as without this."""
    ids, e, anchors, margin, positive_margin = inputs

    def grad_op(upstream):
        return op_library.fused_contrastive_in_batch_contrastive_loss_grad(
            ids, e, anchors, upstream, margin, positive_margin, **_attrs(options)
        )

    @tf.custom_gradient
    def fused(e):
        grad_of_sum, loss = grad_op(tf.ones_like(e[:, 0]))

        def backward(upstream):
            if could_possibly_record():
                return _reference_gradient(ids, e, anchors, options, upstream)
            on_anchors = upstream[anchors[0] : anchors[1]]
            first = on_anchors[:1]  # none without anchors: the gradient is 0 then
            return tf.cond(
                tf.reduce_all(tf.equal(on_anchors, first)),
                lambda: scale_gradient(grad_of_sum, tf.reduce_sum(first)),
                lambda: grad_op(upstream)[0],
            )

        return loss, backward

    return fused(e)


def reduced_in_batch_loss(
    labels, embeddings, sample_weight, options, reduction, loss_scale, anchors=None
):
    """The reduced in-batch loss, with the Keras reduction fused in: one sweep
    writes the fully scaled gradient (see _pairs_ops.reduced_embedding_loss).
    sample_weight: a scalar or one per anchor, of the embeddings' dtype;
    anchors as in in_batch_loss."""
    ids, e = _in_batch_compute(labels, embeddings)
    weights = tf.cast(sample_weight, e.dtype)
    anchors = all_anchors(e) if anchors is None else anchors

    @tf.custom_gradient
    def fused(e):
        loss, grad, scale = op_library.fused_contrastive_in_batch_contrastive_loss_reduced(
            ids,
            e,
            anchors,
            weights,
            scalar(options.margin),
            scalar(options.positive_margin),
            scalar(loss_scale),
            reduction=reduction,
            **_attrs(options),
        )

        def backward(upstream):
            if could_possibly_record():
                # g_i of each anchor, 0 for partners: the reference's loss of
                # a partner row is 0 anyway.
                g = weights * constant_scale(scale, e.dtype) * upstream
                begin = anchors[0]
                count = anchors[1] - begin
                per_row = tf.pad(
                    g * tf.ones([count], e.dtype),
                    [[begin, tf.shape(e, out_type=tf.int64)[0] - anchors[1]]],
                )
                return _reference_gradient(ids, e, anchors, options, per_row)
            return scale_gradient(grad, upstream)

        return loss, backward

    return tf.cast(fused(e), embeddings.dtype)


@tf.RegisterGradient(IN_BATCH_OP_NAME)
def _in_batch_loss_grad(op, grad_loss):
    labels, e, anchors, margin, positive_margin = op.inputs
    options = InBatchOptions(
        margin,
        positive_margin,
        op.get_attr("distance").decode(),
        op.get_attr("pair_weighting").decode(),
        op.get_attr("max_block_rows") or None,
        miner=None if op.get_attr("miner") == b"none" else op.get_attr("miner").decode(),
        miner_epsilon=op.get_attr("miner_epsilon"),
    )
    if could_possibly_record():
        grad = _reference_gradient(labels, e, anchors, options, grad_loss)
    else:
        grad = op_library.fused_contrastive_in_batch_contrastive_loss_grad(
            labels, e, anchors, grad_loss, margin, positive_margin, **_attrs(options)
        )[0]
    # Labels, anchors and margins get no gradient.
    return [None, grad, None, None, None]


@tf.RegisterGradient(IN_BATCH_GRAD_OP_NAME)
def _in_batch_grad_grad(op, *_):
    raise no_second_order(op, "in-batch", "in_batch_contrastive_loss_reference")

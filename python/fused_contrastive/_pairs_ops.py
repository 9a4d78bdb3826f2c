"""The ops of the loss from pair embeddings (the Embedding* ops): their wrappers
and registered gradients."""

import tensorflow as tf

from fused_contrastive import reference
from fused_contrastive._distances_ops import scale_gradient
from fused_contrastive._inputs import stacked_operands
from fused_contrastive._library import (
    EMBEDDING_GRAD_OP_NAME,
    EMBEDDING_OP_NAME,
    constant_scale,
    no_second_order,
    op_library,
    reference_gradients,
    scalar,
)
from fused_contrastive._private_api import could_possibly_record


def embedding_loss(labels, embeddings_a, embeddings_b, margin, distance, similar_label=1):
    """Runs the embedding op on prepared inputs: the per-pair loss (its gradient
    reuses the row coefficients the op writes beside it)."""
    return op_library.fused_contrastive_embedding_contrastive_loss(
        labels,
        embeddings_a,
        embeddings_b,
        scalar(margin),
        distance=distance,
        similar_label=similar_label,
    )[0]


def reduced_embedding_loss(
    labels,
    embeddings_a,
    embeddings_b,
    sample_weight,
    margin,
    reduction,
    loss_scale,
    distance,
    similar_label=1,
):
    """The reduced loss from the embedding op with the Keras reduction fused in.

    The op writes the fully scaled gradients of both embeddings in the same
    pass; backward multiplies them by the upstream scalar (nothing on CPU when
    it is 1). Meant for calls a tape records: otherwise the gradients are
    written for nothing. Arguments as _distances_ops.reduced_loss_outputs.
    """
    op = op_library.fused_contrastive_embedding_contrastive_loss_reduced
    loss_args = (labels, sample_weight, margin, reduction, loss_scale, distance, similar_label)
    return _fused_reduced(op, [embeddings_a, embeddings_b], lambda a, b: (a, b), *loss_args)


def reduced_pair_loss(
    labels, pairs, sample_weight, margin, reduction, loss_scale, distance, similar_label=1
):
    """reduced_embedding_loss on the stacked pairs [..., 2, D] a Keras model
    outputs. Where the graph shows the pair's two halves (stacked_operands),
    the two-tensor op reads them; otherwise the pair op reads the pairs, and
    writes their gradient, in place (no unstack before it, no stack of the two
    gradients after it)."""
    operands = stacked_operands(pairs)
    if operands is not None:
        return reduced_embedding_loss(
            labels, *operands, sample_weight, margin, reduction, loss_scale, distance, similar_label
        )
    op = op_library.fused_contrastive_embedding_pair_contrastive_loss_reduced
    loss_args = (labels, sample_weight, margin, reduction, loss_scale, distance, similar_label)
    return _fused_reduced(op, [pairs], lambda p: (p[..., 0, :], p[..., 1, :]), *loss_args)


def _fused_reduced(
    op,
    operands,
    halves,
    labels,
    sample_weight,
    margin,
    reduction,
    loss_scale,
    distance,
    similar_label,
):
    """Runs a reduced embedding op (outputs: loss, the gradient of each operand,
    the reduction scale) on `operands`, the embeddings it differentiates;
    `halves(*operands)` are the two embeddings of each pair, for the reference."""

    # custom_gradient hides the gradient outputs from the tape, which would
    # otherwise hand the backward pass zero tensors as large as the embeddings.
    @tf.custom_gradient
    def fused(*operands):
        loss, *grads, scale = op(
            labels,
            *operands,
            sample_weight,
            scalar(margin),
            scalar(loss_scale),
            distance=distance,
            reduction=reduction,
            similar_label=similar_label,
        )

        def reference_loss(*operands):
            losses = reference.reference_embedding_loss(
                labels, *halves(*operands), margin, distance, similar_label
            )
            return tf.reduce_sum(losses * sample_weight) * constant_scale(scale, losses.dtype)

        def backward(upstream):
            if could_possibly_record():
                return reference_gradients(reference_loss, list(operands), upstream)
            return [scale_gradient(grad, upstream) for grad in grads]

        return loss, backward

    return fused(*operands)


@tf.RegisterGradient(EMBEDDING_OP_NAME)
def _embedding_loss_grad(op, grad_loss, _):
    # row_coefficients are an implementation detail: only the backward below
    # reads them, so no gradient flows into them.
    labels, a, b, margin = op.inputs
    distance = op.get_attr("distance").decode()
    if could_possibly_record():
        grad_a, grad_b = reference_gradients(
            lambda a, b: reference.reference_embedding_loss(
                labels, a, b, margin, distance, op.get_attr("similar_label")
            ),
            [a, b],
            grad_loss,
        )
    else:
        grad_a, grad_b = op_library.fused_contrastive_embedding_contrastive_loss_grad(
            a, b, op.outputs[1], grad_loss, distance=distance
        )
    # Labels and margin get no gradient.
    return [None, grad_a, grad_b, None]


@tf.RegisterGradient(EMBEDDING_GRAD_OP_NAME)
def _embedding_grad_grad(op, *_):
    raise no_second_order(op, "embedding", "contrastive_loss_from_embeddings_reference")

"""The ops of the loss on distances (ContrastiveLoss, ContrastiveLossReduced) and
ScaleGradient, every reduced op's backward: their wrappers and registered gradients."""

import tensorflow as tf

from fused_contrastive import reference
from fused_contrastive._library import OP_NAME, REDUCED_OP_NAME, SCALE_OP_NAME, op_library, scalar


def loss_and_grad(labels, distances, margin, similar_label=1):
    """Runs the fused op on prepared inputs: (per-sample loss, d(loss)/d(distance))."""
    return op_library.fused_contrastive_contrastive_loss(
        labels, distances, scalar(margin), similar_label=similar_label
    )


def reduced_loss_outputs(
    labels, distances, sample_weight, margin, reduction, loss_scale, similar_label=1
):
    """Runs the fused-reduction op on prepared inputs: (reduced loss, its gradient
    with respect to the distances, reduction_scale).

    reduction is "sum", "mean" or "weighted_mean"; sample_weight a scalar or a
    tensor of the distances' shape and dtype; loss_scale multiplies the result.
    """
    return op_library.fused_contrastive_contrastive_loss_reduced(
        labels,
        distances,
        sample_weight,
        scalar(margin),
        scalar(loss_scale),
        reduction=reduction,
        similar_label=similar_label,
    )


def reduced_loss(*args, **kwargs):
    """The reduced loss of reduced_loss_outputs."""
    return reduced_loss_outputs(*args, **kwargs)[0]


def scale_gradient(gradient, scale):
    """gradient * scale for a scalar scale of its dtype (the reduced ops' backward)."""
    return op_library.fused_contrastive_scale_gradient(gradient, scale)


def _is_known_zero(grad):
    """True when a gradient is the zero tensor TensorFlow's tape makes up for an
    op output nothing depends on.

    The tape fills unconnected outputs with zeros instead of passing None (a
    list of exempt ops is compiled into TensorFlow), so without this check every
    first-order backward pass would also compute the second-order term.
    """
    if grad is None:
        return True
    if tf.executing_eagerly():
        if grad.device.endswith("CPU:0"):  # zero-copy view: cheaper than two TF ops
            return not grad.numpy().any()
        return not bool(tf.reduce_any(tf.not_equal(grad, 0)))
    if grad.op.type == "ZerosLike":
        return True
    if grad.op.type == "Fill":  # zeros of a shape known only at run time
        value = tf.get_static_value(grad.op.inputs[1])
        return value is not None and value == 0
    value = tf.get_static_value(grad)  # small zeros are a Const
    return value is not None and not value.any()


@tf.RegisterGradient(OP_NAME)
def _contrastive_loss_grad(op, grad_loss, grad_dloss):
    # First order reuses the derivative the forward pass saved. A gradient
    # flowing into that derivative output (second-order autodiff, e.g. a
    # Hessian) needs d2(loss)/d(distance)2, which only then touches the inputs.
    labels, distances, margin = op.inputs
    grad = grad_loss * op.outputs[1]
    if not _is_known_zero(grad_dloss):
        grad += grad_dloss * reference.reference_second_derivative(
            labels, distances, margin, op.get_attr("similar_label")
        )
    # Labels and margin get no gradient (as documented in README).
    return [None, grad, None]


@tf.RegisterGradient(REDUCED_OP_NAME)
def _reduced_loss_grad(op, grad_loss, grad_dloss, _):
    # The forward pass wrote the fully scaled per-sample gradient; backward only
    # multiplies it by the upstream scalar (skipped on CPU when that is 1).
    labels, distances, weights, margin, _ = op.inputs
    grad = scale_gradient(op.outputs[1], grad_loss)
    if not _is_known_zero(grad_dloss):
        # dloss_ddistances = w * reduction_scale * dloss/dd: its derivative.
        scale = weights * tf.cast(op.outputs[2], weights.dtype)
        grad += (
            grad_dloss
            * scale
            * reference.reference_second_derivative(
                labels, distances, margin, op.get_attr("similar_label")
            )
        )
    # Labels, sample weights, margin and loss scale get no gradient.
    return [None, grad, None, None, None]


@tf.RegisterGradient(SCALE_OP_NAME)
def _scale_gradient_grad(op, upstream):
    # Reached only by higher-order differentiation through a reduced op.
    gradient, scale = op.inputs
    return [scale_gradient(upstream, scale), tf.reduce_sum(upstream * gradient)]

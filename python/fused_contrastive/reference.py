"""The contrastive loss in plain TensorFlow ops.

It is the oracle for the tests, the baseline for the benchmarks and the
fallback where the compiled op cannot run. It computes what the fused op
computes: float16/bfloat16 in float32, labels used linearly.
"""

import tensorflow as tf

from fused_contrastive._inputs import prepare_inputs, validate_margin


def compute_dtype(dtype):
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _in_compute_dtype(labels, distances, margin):
    dtype = compute_dtype(distances.dtype)
    # A Python float margin goes straight to the compute dtype: tf.cast would
    # first make it a float32 tensor and round it.
    margin = tf.cast(margin, dtype) if tf.is_tensor(margin) else tf.constant(margin, dtype)
    return tf.cast(labels, dtype), tf.cast(distances, dtype), margin


def reference_loss(labels, distances, margin):
    """Per-sample loss on prepared inputs (see contrastive_loss_reference)."""
    y, d, m = _in_compute_dtype(labels, distances, margin)
    hinge = tf.maximum(m - d, 0.0)
    loss = y * tf.square(d) + (1.0 - y) * tf.square(hinge)
    return tf.cast(loss, distances.dtype)


def reference_second_derivative(labels, distances, margin):
    """d2(loss)/d(distance)2 = 2y + 2(1-y)[d < margin], in the distance dtype."""
    y, d, m = _in_compute_dtype(labels, distances, margin)
    inside = tf.cast(d < m, y.dtype)
    return tf.cast(2.0 * y + 2.0 * (1.0 - y) * inside, distances.dtype)


def contrastive_loss_reference(y_true, y_pred, margin=1.0):
    """Pure-TensorFlow per-sample contrastive loss; differentiable by autodiff.

    Same arguments, checks and shapes as `fused_contrastive.contrastive_loss`.
    """
    margin = validate_margin(margin)
    labels, distances = prepare_inputs(y_true, y_pred)
    return reference_loss(labels, distances, margin)

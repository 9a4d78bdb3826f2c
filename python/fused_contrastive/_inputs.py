"""Input checks and shape alignment shared by the fused op and the reference."""

import math
import numbers

import tensorflow as tf

LABEL_DTYPES = (tf.bool, tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64)
DISTANCE_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def _dtype_names(dtypes):
    return ", ".join(d.name for d in dtypes)


def validate_margin(margin):
    """Returns margin as a Python float, or a float64 tensor for tensor margins.

    Number margins are checked here, at construction time; tensor margins (a
    variable driving a margin schedule, say) are checked by the op when it runs.
    """
    if isinstance(margin, (tf.Tensor, tf.Variable)):
        if margin.shape.rank not in (None, 0):
            raise ValueError(f"margin must be a scalar, got shape {margin.shape}")
        return tf.cast(margin, tf.float64)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {margin!r} ({type(margin).__name__})")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and non-negative, got {margin}")
    return margin


def validate_similar_label(similar_label):
    """The label value that marks a similar pair: 1 (TF Addons) or 0 (the Hadsell
    paper, keras.io's Siamese example)."""
    if isinstance(similar_label, bool) or not isinstance(similar_label, numbers.Integral):
        raise TypeError(f"similar_label must be 0 or 1, got {similar_label!r} "
                        f"({type(similar_label).__name__})")
    if similar_label not in (0, 1):
        raise ValueError(f"similar_label must be 0 or 1, got {similar_label}")
    return int(similar_label)


def reject_ragged(*values):
    """Ragged inputs have no per-sample alignment the op could check cheaply."""
    if any(isinstance(v, tf.RaggedTensor) for v in values):
        raise TypeError(
            "contrastive loss: ragged y_true/y_pred are not supported. Flatten both first, "
            "e.g. contrastive_loss(y_true.flat_values, y_pred.flat_values) and "
            "y_pred.with_flat_values(...) to restore the rows, or use .to_tensor()")


def number_margin(margin, owner):
    """validate_margin for a margin that must be a number (it is saved in a config)."""
    margin = validate_margin(margin)
    if tf.is_tensor(margin):
        raise TypeError(f"{owner} needs a number margin (it is saved in its config); use "
                        "fused_contrastive.contrastive_loss for tensor margins")
    return margin


def _squeeze_last(x):
    return tf.squeeze(x, axis=-1)


def _last_extent(x):
    return tf.concat([[0], tf.shape(x)], 0)[-1]  # 0 for a scalar


def squeeze_extra_unit_axis(x, other):
    """x without its last axis when x has one more axis than `other` and that
    axis is 1, decided at run time (ranks unknown when traced)."""
    if x.shape.rank is not None and (x.shape.rank == 0 or x.shape[-1] not in (1, None)):
        return x  # it has no unit axis to lose (and tf.squeeze would fail to trace)
    extra = tf.logical_and(tf.equal(tf.rank(x), tf.rank(other) + 1),
                           tf.equal(_last_extent(x), 1))
    return tf.cond(extra, lambda: _squeeze_last(x), lambda: tf.identity(x))


def prepare_inputs(y_true, y_pred):
    """Converts and checks labels and distances; aligns a trailing unit axis.

    A model's [B, 1] output against [B] labels (or the reverse) gives B
    per-sample losses, as Keras' own losses do. TF Addons broadcast that pair to
    [B, B] (its issue 1757); every other shape mismatch is an error, never a
    broadcast.
    """
    reject_ragged(y_true, y_pred)
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.dtype not in DISTANCE_DTYPES:
        raise TypeError(
            f"contrastive loss: y_pred (distances) must have dtype {_dtype_names(DISTANCE_DTYPES)}; "
            f"got {y_pred.dtype.name}")
    y_true = tf.convert_to_tensor(y_true)
    if y_true.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"contrastive loss: y_true (labels) must have dtype {_dtype_names(LABEL_DTYPES)}; "
            f"got {y_true.dtype.name}")
    true_rank, pred_rank = y_true.shape.rank, y_pred.shape.rank
    if true_rank is not None and pred_rank is not None:
        if pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
            y_pred = _squeeze_last(y_pred)
        elif true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
            y_true = _squeeze_last(y_true)
    else:
        y_pred, y_true = (squeeze_extra_unit_axis(y_pred, y_true),
                          squeeze_extra_unit_axis(y_true, y_pred))
    if not y_true.shape.is_compatible_with(y_pred.shape):
        raise tf.errors.InvalidArgumentError(
            None, None,
            "contrastive loss: labels and distances must have the same shape, got labels "
            f"{y_true.shape} and distances {y_pred.shape}")
    return y_true, y_pred

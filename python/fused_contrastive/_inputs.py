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


def number_margin(margin, owner):
    """validate_margin for a margin that must be a number (it is saved in a config)."""
    margin = validate_margin(margin)
    if tf.is_tensor(margin):
        raise TypeError(f"{owner} needs a number margin (it is saved in its config); use "
                        "fused_contrastive.contrastive_loss for tensor margins")
    return margin


def _squeeze_last(x):
    return tf.squeeze(x, axis=-1)


def prepare_inputs(y_true, y_pred):
    """Converts and checks labels and distances; aligns a trailing unit axis.

    A model's [B, 1] output against [B] labels (or the reverse) gives B
    per-sample losses, as Keras' own losses do. TF Addons broadcast that pair to
    [B, B] (its issue 1757); every other shape mismatch is an error, never a
    broadcast.
    """
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
    if not y_true.shape.is_compatible_with(y_pred.shape):
        raise tf.errors.InvalidArgumentError(
            None, None,
            "contrastive loss: labels and distances must have the same shape, got labels "
            f"{y_true.shape} and distances {y_pred.shape}")
    return y_true, y_pred

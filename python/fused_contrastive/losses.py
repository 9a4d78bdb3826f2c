"""The public loss: a function and a Keras 3 Loss class."""

import keras
import tensorflow as tf

from fused_contrastive import _ops
from fused_contrastive._inputs import (number_margin, prepare_inputs, reject_ragged,
                                       squeeze_extra_unit_axis, validate_margin,
                                       validate_similar_label)
from fused_contrastive.reference import reference_loss


def contrastive_loss(y_true, y_pred, margin=1.0, similar_label=1):
    """Per-sample contrastive loss `y*d^2 + (1-y)*max(margin-d, 0)^2`.

    Args:
      y_true: labels, 1 for similar pairs and 0 for dissimilar ones (bool, int32,
        int64 or float; soft labels in [0, 1] are used linearly); see
        `similar_label` for the opposite convention.
      y_pred: distances between the two embeddings of each pair (float16,
        bfloat16, float32 or float64), the same shape as `y_true`. A trailing
        axis of size 1 on either side is squeezed, so a model's [B, 1] output
        pairs with [B] labels.
      margin: non-negative, finite number (or scalar tensor) that dissimilar
        pairs should exceed.
      similar_label: the label of a similar pair: 1 (TF Addons, the default) or
        0 (the Hadsell paper and keras.io's Siamese example). With 0, a label y
        acts as 1 - y.

    Returns:
      The per-sample loss, with the shape and dtype of `y_pred`. Its gradient
      flows to `y_pred` only; labels and margin get none.

    The numbers of TF Addons' own test (`test_zero_loss`, `test_unweighted`):

    >>> print(contrastive_loss([0, 0, 1, 1, 0, 1], [1.0, 1.4, 0.0, 0.0, 1.2, 0.0]).numpy())
    [0. 0. 0. 0. 0. 0.]
    >>> print(contrastive_loss([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]).numpy().round(4))
    [0.81 0.49 1.69 0.49 0.   0.25]
    >>> print(contrastive_loss([1, 1, 0, 0, 1, 0], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5],
    ...                        similar_label=0).numpy().round(4))
    [0.81 0.49 1.69 0.49 0.   0.25]
    """
    margin = validate_margin(margin)
    similar_label = validate_similar_label(similar_label)
    labels, distances = prepare_inputs(y_true, y_pred)
    if _ops.using_reference():
        return reference_loss(labels, distances, margin, similar_label)
    loss, _ = _ops.loss_and_grad(labels, distances, margin, similar_label)
    return loss


# Keras reduction -> the fused op's (None: Keras reduces the per-sample losses).
_FUSED_REDUCTIONS = {"sum": "sum", "sum_over_batch_size": "mean", "mean": "mean",
                     "mean_with_sample_weight": "weighted_mean"}


def _align_weights(weights, distances):
    """sample_weight as the fused op takes it (a scalar, or the shape of the
    distances after Keras' squeeze of a trailing unit axis), else None."""
    if distances.shape.rank is None:
        # Keras' reduction cannot run on a loss of unknown rank (a tf.function
        # retraced with relaxed shapes); the op checks the shapes at run time.
        return weights if weights.shape.rank == 0 else squeeze_extra_unit_axis(weights, distances)
    if weights.shape.rank == 0:
        # Keras squeezes [1] losses against a scalar weight and returns that
        # scalar unreduced (w * loss, no divisor): its rule, not ours to change.
        return None if distances.shape.as_list() == [1] else weights
    if (weights.shape.rank == distances.shape.rank + 1 and weights.shape[-1] == 1):
        weights = tf.squeeze(weights, -1)
    if weights.shape.is_fully_defined() and weights.shape == distances.shape:
        return weights
    return None


@keras.saving.register_keras_serializable(package="fused_contrastive")
class ContrastiveLoss(keras.losses.Loss):
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) as a Keras 3 loss.

    A drop-in for `tfa.losses.ContrastiveLoss`: `y_true` are pair labels (1 =
    similar), `y_pred` the distances between the pair's embeddings. Importing
    `fused_contrastive` also lets Keras load models saved with TF Addons' loss
    (`"Addons>ContrastiveLoss"`) as this class.

    Args:
      margin: non-negative, finite number; dissimilar pairs closer than it are
        penalised.
      reduction: any Keras 3 reduction: "sum_over_batch_size" (default), "sum",
        "mean", "mean_with_sample_weight", "none" or None. Keras 2's "auto" (what
        TF Addons code may pass) means "sum_over_batch_size".
      name: name of the loss.
      dtype: dtype the loss computes in; defaults to `keras.backend.floatx()`.
      similar_label: the label of a similar pair, 1 (TF Addons) or 0 (the
        Hadsell paper, keras.io's Siamese example).

    TF Addons' `test_sum_reduction` numbers:

    >>> loss = ContrastiveLoss(reduction="sum")
    >>> round(float(loss([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5])), 4)
    3.73
    """

    def __init__(self, margin=1.0, reduction="sum_over_batch_size", name="contrastive_loss",
                 dtype=None, similar_label=1):
        if reduction == "auto":
            reduction = "sum_over_batch_size"
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = number_margin(margin, type(self).__name__)
        self.similar_label = validate_similar_label(similar_label)

    def __call__(self, y_true, y_pred, sample_weight=None):
        reject_ragged(y_true, y_pred)
        reduced = self._fused_reduction(y_true, y_pred, sample_weight)
        if reduced is None:
            return super().__call__(y_true, y_pred, sample_weight)
        return reduced

    def call(self, y_true, y_pred):
        return contrastive_loss(y_true, y_pred, self.margin, self.similar_label)

    def _fused_reduction(self, y_true, y_pred, sample_weight):
        """The reduced loss from the fused-reduction op, or None where Keras' own
        reduction must run: reduction "none", masks, weights that need
        broadcasting, scalar or statically empty losses (which Keras returns
        unreduced), [1] losses with a scalar weight (likewise), and the
        pure-TensorFlow fallback."""
        mode = _FUSED_REDUCTIONS.get(self.reduction)
        if (mode is None or _ops.using_reference()
                or getattr(y_pred, "_keras_mask", None) is not None):
            return None
        with tf.name_scope(self.name):
            # Converted as Keras' own __call__ converts them.
            labels, distances = prepare_inputs(keras.ops.convert_to_tensor(y_true, self.dtype),
                                               keras.ops.convert_to_tensor(y_pred, self.dtype))
            rank = distances.shape.rank
            if rank == 0 or (rank == 1 and distances.shape[0] == 0):
                return None
            if sample_weight is None:
                weights = _ops.scalar(1.0, distances.dtype)
                if mode == "weighted_mean":  # Keras divides by the count then
                    mode = "mean"
            else:
                weights = _align_weights(keras.ops.convert_to_tensor(sample_weight, self.dtype),
                                         distances)
                if weights is None:
                    return None
            loss_scale = 1.0
            if mode != "sum":  # Keras' scale_loss_for_distribution
                loss_scale /= tf.distribute.get_strategy().num_replicas_in_sync
            return _ops.reduced_loss(labels, distances, weights, self.margin, mode, loss_scale,
                                     self.similar_label)

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, similar_label=self.similar_label,
                      dtype=self._dtype_policy.name)
        return config


# Models compiled with tfa.losses.ContrastiveLoss name it "Addons>ContrastiveLoss"
# in their files; its config (margin, reduction, name) is this class's. An
# alias in the custom objects, not a second registration, so that this class
# still saves under its own name.
keras.saving.get_custom_objects()["Addons>ContrastiveLoss"] = ContrastiveLoss

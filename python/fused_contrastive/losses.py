"""The public loss: a function and a Keras 3 Loss class."""

import keras
import tensorflow as tf

from fused_contrastive import _ops
from fused_contrastive._inputs import number_margin, prepare_inputs, validate_margin
from fused_contrastive.reference import reference_loss


def contrastive_loss(y_true, y_pred, margin=1.0):
    """Per-sample contrastive loss `y*d^2 + (1-y)*max(margin-d, 0)^2`.

    Args:
      y_true: labels, 1 for similar pairs and 0 for dissimilar ones (bool, int32,
        int64 or float; soft labels in [0, 1] are used linearly).
      y_pred: distances between the two embeddings of each pair (float16,
        bfloat16, float32 or float64), the same shape as `y_true`. A trailing
        axis of size 1 on either side is squeezed, so a model's [B, 1] output
        pairs with [B] labels.
      margin: non-negative, finite number (or scalar tensor) that dissimilar
        pairs should exceed.

    Returns:
      The per-sample loss, with the shape and dtype of `y_pred`. Its gradient
      flows to `y_pred` only; labels and margin get none.
    """
    margin = validate_margin(margin)
    labels, distances = prepare_inputs(y_true, y_pred)
    if _ops.using_reference():
        return reference_loss(labels, distances, margin)
    loss, _ = _ops.loss_and_grad(labels, distances, margin)
    return loss


# Keras reduction -> the fused op's (None: Keras reduces the per-sample losses).
_FUSED_REDUCTIONS = {"sum": "sum", "sum_over_batch_size": "mean", "mean": "mean",
                     "mean_with_sample_weight": "weighted_mean"}


def _align_weights(weights, distances):
    """sample_weight as the fused op takes it (a scalar, or the shape of the
    distances after Keras' squeeze of a trailing unit axis), else None."""
    if weights.shape.rank == 0:
        return weights
    if (weights.shape.rank == distances.shape.rank + 1 and weights.shape[-1] == 1):
        weights = tf.squeeze(weights, -1)
    if weights.shape.is_fully_defined() and weights.shape == distances.shape:
        return weights
    return None


@keras.saving.register_keras_serializable(package="fused_contrastive")
class ContrastiveLoss(keras.losses.Loss):
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) as a Keras 3 loss.

    A drop-in for `tfa.losses.ContrastiveLoss`: `y_true` are pair labels (1 =
    similar), `y_pred` the distances between the pair's embeddings.

    Args:
      margin: non-negative, finite number; dissimilar pairs closer than it are
        penalised.
      reduction: any Keras 3 reduction: "sum_over_batch_size" (default), "sum",
        "mean", "mean_with_sample_weight", "none" or None. Keras 2's "auto" (what
        TF Addons code may pass) means "sum_over_batch_size".
      name: name of the loss.
      dtype: dtype the loss computes in; defaults to `keras.backend.floatx()`.
    """

    def __init__(self, margin=1.0, reduction="sum_over_batch_size", name="contrastive_loss",
                 dtype=None):
        if reduction == "auto":
            reduction = "sum_over_batch_size"
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = number_margin(margin, type(self).__name__)

    def __call__(self, y_true, y_pred, sample_weight=None):
        reduced = self._fused_reduction(y_true, y_pred, sample_weight)
        if reduced is None:
            return super().__call__(y_true, y_pred, sample_weight)
        return reduced

    def call(self, y_true, y_pred):
        return contrastive_loss(y_true, y_pred, self.margin)

    def _fused_reduction(self, y_true, y_pred, sample_weight):
        """The reduced loss from the fused-reduction op, or None where Keras' own
        reduction must run: reduction "none", masks, weights that need
        broadcasting, scalar or statically empty losses (which Keras returns
        unreduced), and the pure-TensorFlow fallback."""
        mode = _FUSED_REDUCTIONS.get(self.reduction)
        if (mode is None or _ops.using_reference()
                or getattr(y_pred, "_keras_mask", None) is not None):
            return None
        with tf.name_scope(self.name):
            # Converted as Keras' own __call__ converts them.
            labels, distances = prepare_inputs(keras.ops.convert_to_tensor(y_true, self.dtype),
                                               keras.ops.convert_to_tensor(y_pred, self.dtype))
            if distances.shape.rank in (None, 0) or distances.shape.as_list() == [0]:
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
            return _ops.reduced_loss(labels, distances, weights, self.margin, mode, loss_scale)

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, dtype=self._dtype_policy.name)
        return config

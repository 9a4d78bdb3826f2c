"""`ContrastiveLoss` for Keras 2 (`tf_keras`), for TensorFlow >= 2.16 users who
set TF_USE_LEGACY_KERAS=1. Importing this module needs the optional `tf_keras`
package; `fused_contrastive.ContrastiveLoss` is this class when that variable is
set, as `tf.keras` is then tf_keras."""

import tensorflow as tf
import tf_keras

from fused_contrastive.in_batch import InBatchLossMixin
from fused_contrastive.losses import ContrastiveLossMixin
from fused_contrastive.pairs import PairAccuracyMixin, PairDistanceMixin, pair_accuracy
from fused_contrastive.retrieval import RetrievalMetricsMixin


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class ContrastiveLoss(ContrastiveLossMixin, tf_keras.losses.Loss):
    """Contrastive loss as a Keras 2 loss; see `fused_contrastive.losses.ContrastiveLoss`.

    Args:
      margin: non-negative, finite number.
      reduction: a `tf.keras.losses.Reduction` value, `AUTO` included. Defaults
        to `SUM_OVER_BATCH_SIZE`, as in TF Addons.
      name: name of the loss.
      similar_label: the label of a similar pair, 1 (TF Addons) or 0.
      distance: None (`y_pred` are distances) or "euclidean", "cosine" or
        "manhattan" (`y_pred` are the pairs' embeddings stacked, `[..., 2, D]`).
    """

    def __init__(
        self,
        margin=1.0,
        reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
        name="contrastive_loss",
        similar_label=1,
        distance=None,
    ):
        super().__init__(reduction=reduction, name=name)
        self._set_options(margin, similar_label, distance)


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class InBatchContrastiveLoss(InBatchLossMixin, tf_keras.losses.Loss):
    """The in-batch all-pairs contrastive loss as a Keras 2 loss; see
    `fused_contrastive.losses.InBatchContrastiveLoss` (`y_true` class labels
    [B], `y_pred` embeddings [B, D]). tf_keras reduces the per-anchor losses.
    """

    def __init__(
        self,
        margin=1.0,
        positive_margin=0.0,
        distance="euclidean",
        pair_weighting="uniform",
        reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
        name="in_batch_contrastive_loss",
        max_block_rows=None,
        gather_across_replicas=False,
        memory_size=0,
        memory_warmup_steps=0,
        miner=None,
        miner_epsilon=0.1,
    ):
        super().__init__(reduction=reduction, name=name)
        self._set_options(
            margin,
            positive_margin,
            distance,
            pair_weighting,
            max_block_rows,
            gather_across_replicas,
            memory_size,
            memory_warmup_steps,
            miner,
            miner_epsilon,
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        reduction = self._get_reduction() if self.reduction != "none" else "none"
        mode = {"sum": "sum", "sum_over_batch_size": "mean"}.get(reduction)
        # tf_keras scales a mean by 1/replicas after the loss (its
        # LossesContainer): the global reduction undoes it in advance.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        reduced = self._global_reduction(
            y_true, y_pred, sample_weight, mode, replicas if mode == "mean" else 1.0
        )
        if reduced is None:
            reduced = super().__call__(y_true, y_pred, sample_weight)
        self._remember(y_true, y_pred)
        return reduced


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class PairDistance(PairDistanceMixin, tf_keras.layers.Layer):
    """Stacked pairs `[..., 2, D]` to their distance `[...]` as a Keras 2 layer;
    see `fused_contrastive.pairs.PairDistance`."""

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-2]


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class PairAccuracy(PairAccuracyMixin, tf_keras.metrics.Mean):
    """Pair accuracy at a distance threshold for stacked pairs `[..., 2, D]` as
    a Keras 2 metric; see `fused_contrastive.pairs.PairAccuracy`."""

    def __init__(
        self, threshold=0.5, distance="euclidean", similar_label=1, name="pair_accuracy", dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        self._set_options(threshold, distance, similar_label)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(pair_accuracy(y_true, y_pred, **self._options()), sample_weight)

    def get_config(self):
        return {**super().get_config(), **self._options()}


class RetrievalMetrics(RetrievalMetricsMixin, tf_keras.callbacks.Callback):
    """Retrieval metrics logged each epoch, as a Keras 2 callback; see
    `fused_contrastive.retrieval.RetrievalMetrics`."""


# Models saved with tfa.losses.ContrastiveLoss load as this class (see losses.py).
tf_keras.utils.get_custom_objects()["Addons>ContrastiveLoss"] = ContrastiveLoss

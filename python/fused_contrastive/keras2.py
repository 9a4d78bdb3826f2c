"""`ContrastiveLoss` for Keras 2 (`tf_keras`), for TensorFlow >= 2.16 users who
set TF_USE_LEGACY_KERAS=1. Importing this module needs the optional `tf_keras`
package; `fused_contrastive.ContrastiveLoss` is this class when that variable is
set, as `tf.keras` is then tf_keras."""

import tensorflow as tf
import tf_keras

from fused_contrastive._inputs import number_margin, validate_distance, validate_similar_label
from fused_contrastive.losses import (
    in_batch_options,
    per_anchor_loss,
    per_pair_loss,
    set_in_batch_options,
)
from fused_contrastive.pairs import (
    pair_accuracy,
    pair_accuracy_options,
    pair_distance,
    set_pair_accuracy_options,
)


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class ContrastiveLoss(tf_keras.losses.Loss):
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
        self.margin = number_margin(margin, type(self).__name__)
        self.similar_label = validate_similar_label(similar_label)
        self.distance = None if distance is None else validate_distance(distance)

    def call(self, y_true, y_pred):
        return per_pair_loss(y_true, y_pred, self.margin, self.similar_label, self.distance)

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "similar_label": self.similar_label,
            "distance": self.distance,
        }


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class InBatchContrastiveLoss(tf_keras.losses.Loss):
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
    ):
        super().__init__(reduction=reduction, name=name)
        set_in_batch_options(
            self, margin, positive_margin, distance, pair_weighting, max_block_rows
        )

    def call(self, y_true, y_pred):
        return per_anchor_loss(self, y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), **in_batch_options(self)}


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class PairDistance(tf_keras.layers.Layer):
    """Stacked pairs `[..., 2, D]` to their distance `[...]` as a Keras 2 layer;
    see `fused_contrastive.pairs.PairDistance`."""

    def __init__(self, distance="euclidean", **kwargs):
        super().__init__(**kwargs)
        self.distance = validate_distance(distance)

    def call(self, pairs):
        return pair_distance(pairs, self.distance)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-2]

    def get_config(self):
        return {**super().get_config(), "distance": self.distance}


@tf_keras.utils.register_keras_serializable(package="fused_contrastive")
class PairAccuracy(tf_keras.metrics.Mean):
    """Pair accuracy at a distance threshold for stacked pairs `[..., 2, D]` as
    a Keras 2 metric; see `fused_contrastive.pairs.PairAccuracy`."""

    def __init__(
        self, threshold=0.5, distance="euclidean", similar_label=1, name="pair_accuracy", dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        set_pair_accuracy_options(self, threshold, distance, similar_label)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(
            pair_accuracy(y_true, y_pred, **pair_accuracy_options(self)), sample_weight
        )

    def get_config(self):
        return {**super().get_config(), **pair_accuracy_options(self)}


# Models saved with tfa.losses.ContrastiveLoss load as this class (see losses.py).
tf_keras.utils.get_custom_objects()["Addons>ContrastiveLoss"] = ContrastiveLoss

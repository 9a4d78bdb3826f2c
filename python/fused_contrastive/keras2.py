"""`ContrastiveLoss` for Keras 2 (`tf_keras`), for TensorFlow >= 2.16 users who
set TF_USE_LEGACY_KERAS=1. Importing this module needs the optional `tf_keras`
package; `fused_contrastive.ContrastiveLoss` is this class when that variable is
set, as `tf.keras` is then tf_keras."""

import tf_keras

from fused_contrastive._inputs import number_margin, validate_distance, validate_similar_label
from fused_contrastive.losses import per_pair_loss


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

    def __init__(self, margin=1.0, reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
                 name="contrastive_loss", similar_label=1, distance=None):
        super().__init__(reduction=reduction, name=name)
        self.margin = number_margin(margin, type(self).__name__)
        self.similar_label = validate_similar_label(similar_label)
        self.distance = None if distance is None else validate_distance(distance)

    def call(self, y_true, y_pred):
        return per_pair_loss(y_true, y_pred, self.margin, self.similar_label, self.distance)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin,
                "similar_label": self.similar_label, "distance": self.distance}


# Models saved with tfa.losses.ContrastiveLoss load as this class (see losses.py).
tf_keras.utils.get_custom_objects()["Addons>ContrastiveLoss"] = ContrastiveLoss

"""What a model that outputs stacked pairs `[..., 2, D]` needs besides the loss:
the pair's distance at inference (`PairDistance`, a Keras 3 layer) and pair
accuracy at a distance threshold (`PairAccuracy`, a Keras 3 metric). The
tf_keras versions (fused_contrastive.keras2) share the functions and mixins
below."""

import keras
import tensorflow as tf

from fused_contrastive import _array_math
from fused_contrastive._inputs import (
    prepare_embedding_inputs,
    split_pairs,
    validate_distance,
    validate_similar_label,
)
from fused_contrastive._private_api import set_metric_direction
from fused_contrastive._keras_backend import jax_functions, on_jax
from fused_contrastive._options import validate_threshold
from fused_contrastive.reference import TF_OPS, compute_dtype, reference_distance


def pair_distance(pairs, distance="euclidean"):
    """The distance between the two embeddings of each pair of `pairs`
    `[..., 2, D]`: shape `[...]`, the dtype of `pairs` (16-bit computed in
    float32), with the package's definitions (see
    `contrastive_loss_from_embeddings`)."""
    distance = validate_distance(distance)
    pairs = tf.convert_to_tensor(pairs)
    a, b = split_pairs(pairs)
    dtype = compute_dtype(a.dtype)
    return tf.cast(reference_distance(tf.cast(a, dtype), tf.cast(b, dtype), distance), pairs.dtype)


def pair_accuracy(y_true, pairs, threshold=0.5, distance="euclidean", similar_label=1):
    """Per pair, 1.0 where the pair's distance says what its label says, else
    0.0: a pair is predicted similar when its distance is below `threshold`;
    labels are pair labels as the loss takes them (`similar_label` marks a
    similar pair; soft labels count as the nearer of 0 and 1).

    >>> pairs = [[[0.0, 0.0], [0.0, 0.3]], [[0.0, 0.0], [0.0, 0.8]]]
    >>> print(pair_accuracy([1, 1], pairs).numpy(), pair_accuracy([0, 0], pairs).numpy())
    [1. 0.] [0. 1.]
    """
    distance = validate_distance(distance)
    pairs = tf.convert_to_tensor(pairs)
    labels, a, b = prepare_embedding_inputs(y_true, *split_pairs(pairs))
    dtype = compute_dtype(a.dtype)
    d = reference_distance(tf.cast(a, dtype), tf.cast(b, dtype), distance)
    return _array_math.pair_accuracy(TF_OPS, labels, d, threshold, similar_label)


class PairDistanceMixin:
    """What both PairDistance layers (Keras 3 here, tf_keras in keras2.py)
    share: the distance, checked and saved in the config, and the call. It
    comes before the Keras base class, whose methods it extends."""

    def __init__(self, distance="euclidean", **kwargs):
        super().__init__(**kwargs)
        self.distance = validate_distance(distance)

    def call(self, pairs):
        return pair_distance(pairs, self.distance)

    def get_config(self):
        return {**super().get_config(), "distance": self.distance}


class PairAccuracyMixin:
    """What both PairAccuracy metrics (Keras 3 here, tf_keras in keras2.py)
    share: their options, checked, and passed to pair_accuracy and saved in the
    config as keyword arguments."""

    def _set_options(self, threshold, distance, similar_label):
        self.threshold = validate_threshold(threshold)
        self.distance = validate_distance(distance)
        self.similar_label = validate_similar_label(similar_label)

    def _options(self):
        return {
            "threshold": self.threshold,
            "distance": self.distance,
            "similar_label": self.similar_label,
        }


@keras.saving.register_keras_serializable(package="fused_contrastive")
class PairDistance(PairDistanceMixin, keras.layers.Layer):
    """The distance between the two embeddings of each pair: `[..., 2, D]`, what
    a model trained with `ContrastiveLoss(distance=...)` outputs, to `[...]`.

    >>> print(PairDistance("manhattan")(tf.constant([[[0.0, 3.0], [1.0, 1.0]]])).numpy())
    [3.]
    """

    def call(self, pairs):
        if on_jax():
            return jax_functions().pair_distance(pairs, self.distance)
        return super().call(pairs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-2]


@keras.saving.register_keras_serializable(package="fused_contrastive")
class PairAccuracy(PairAccuracyMixin, keras.metrics.MeanMetricWrapper):
    """Pair accuracy of a model that outputs stacked pairs `[..., 2, D]`: the
    fraction of pairs whose distance is below `threshold` exactly when their
    label marks them similar (see `pair_accuracy`). Keras' `"accuracy"`
    cannot compare `[B]` labels with `[B, 2, D]` outputs.

    Args:
      threshold: finite, non-negative distance below which a pair counts as
        similar.
      distance: "euclidean", "cosine" or "manhattan", as in the loss.
      similar_label: the label of a similar pair, 1 (TF Addons) or 0.
      name, dtype: as for any Keras metric.
    """

    def __init__(
        self, threshold=0.5, distance="euclidean", similar_label=1, name="pair_accuracy", dtype=None
    ):
        self._set_options(threshold, distance, similar_label)
        function = jax_functions().pair_accuracy if on_jax() else pair_accuracy
        super().__init__(function, name=name, dtype=dtype, **self._options())
        set_metric_direction(self, "up")  # as Keras' accuracy metrics

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, **self._options()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

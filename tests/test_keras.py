"""The Keras 3 ContrastiveLoss: reductions, weights, config, training, saving."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import random_distances, random_labels

import keras
from fused_contrastive import ContrastiveLoss, contrastive_loss_reference


def _expected(per_sample, weights, reduction):
    weighted = per_sample * weights
    if reduction in ("none", None):
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean_with_sample_weight":
        return weighted.sum() / weights.sum()
    return weighted.sum() / per_sample.size  # sum_over_batch_size and mean


@pytest.mark.parametrize("reduction",
                         ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none",
                          None])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_keras_reduction(rng, reduction, weighted):
    y = random_labels(rng, (32,), "float32")
    d = random_distances(rng, (32, 1), "float32")
    weights = rng.uniform(0.1, 2.0, size=32) if weighted else np.ones(32)
    per_sample = contrastive_loss_reference(y, d, 1.5).numpy().astype(np.float64)
    loss = ContrastiveLoss(margin=1.5, reduction=reduction)(
        y, d, sample_weight=tf.constant(weights, tf.float32) if weighted else None)
    np.testing.assert_allclose(loss, _expected(per_sample, weights, reduction), rtol=1e-5)


def test_config_round_trip():
    loss = ContrastiveLoss(margin=0.7, reduction="sum", name="pairs", dtype="float64")
    config = loss.get_config()
    assert config["margin"] == 0.7
    restored = ContrastiveLoss.from_config(config)
    assert (restored.margin, restored.reduction, restored.name, restored.dtype) == (
        0.7, "sum", "pairs", "float64")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, ContrastiveLoss) and again.margin == 0.7


def test_registered_under_package_name():
    assert keras.saving.get_registered_object("fused_contrastive>ContrastiveLoss") is ContrastiveLoss


@pytest.mark.parametrize("margin", [-0.5, float("nan"), float("inf")])
def test_bad_margin_raises_at_construction(margin):
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=margin)


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        ContrastiveLoss(reduction="median")


def test_dtype_float64_computes_in_float64(rng):
    y = random_labels(rng, (10,), "float64")
    d = random_distances(rng, (10,), "float64")
    loss = ContrastiveLoss(dtype="float64", reduction="none")(y, d)
    assert loss.dtype == tf.float64
    np.testing.assert_array_equal(loss, contrastive_loss_reference(y, d))


def _siamese_data(rng, n=512, dim=8):
    a = rng.normal(size=(n, dim)).astype("float32")
    similar = rng.integers(0, 2, size=n)
    b = np.where(similar[:, None] == 1, a + 0.1 * rng.normal(size=(n, dim)),
                 rng.normal(size=(n, dim))).astype("float32")
    return a, b, similar.astype("float32")


@keras.saving.register_keras_serializable(package="fused_contrastive_tests")
class PairDistance(keras.layers.Layer):
    """Euclidean distance between two embeddings, [B, 1]; epsilon keeps d/dx finite at 0."""

    def call(self, a, b):
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(a - b), axis=-1, keepdims=True) + 1e-9)


def _siamese_model(dim=8, margin=1.0):
    left, right = keras.Input((dim,)), keras.Input((dim,))
    embed = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])
    model = keras.Model([left, right], PairDistance()(embed(left), embed(right)))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=ContrastiveLoss(margin=margin),
                  jit_compile=False)
    return model


def test_fit_reduces_the_loss(rng):
    keras.utils.set_random_seed(1)
    a, b, y = _siamese_data(rng)
    model = _siamese_model()
    history = model.fit([a, b], y, epochs=8, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    assert np.isfinite(model.evaluate([a, b], y, verbose=0))


def test_keras_file_round_trip_keeps_the_margin(rng, tmp_path):
    keras.utils.set_random_seed(2)
    a, b, y = _siamese_data(rng, n=64)
    model = _siamese_model(margin=2.5)
    model.fit([a, b], y, epochs=1, verbose=0)
    path = tmp_path / "siamese.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, ContrastiveLoss) and loaded.loss.margin == 2.5
    np.testing.assert_allclose(loaded.evaluate([a, b], y, verbose=0),
                               model.evaluate([a, b], y, verbose=0), rtol=1e-6)

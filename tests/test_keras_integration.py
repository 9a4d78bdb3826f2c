"""Keras 3 end to end: fit/evaluate/predict, masks, saving in one process and
loading in another, mixed precision, and TF Addons' documented usage."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import distance_model, pair_data, run_python

import keras
from fused_contrastive import ContrastiveLoss, contrastive_loss_reference


def test_fit_evaluate_predict(rng):
    keras.utils.set_random_seed(4)
    x, y = pair_data(rng)
    model = distance_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=ContrastiveLoss(margin=1.0),
                  jit_compile=False)
    losses = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    distances = model.predict(x, verbose=0)
    assert distances.shape == (256, 1)
    expected = float(tf.reduce_mean(contrastive_loss_reference(y, distances)))
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=256, verbose=0), expected,
                               rtol=1e-5)


@keras.saving.register_keras_serializable(package="fused_contrastive_tests")
class ReferenceContrastiveLoss(keras.losses.Loss):
    """The same loss through plain TF ops, as a yardstick for Keras' own handling."""

    def call(self, y_true, y_pred):
        return contrastive_loss_reference(y_true, y_pred)


def test_masked_timesteps_are_handled_like_any_keras_loss(rng):
    keras.utils.set_random_seed(5)
    x = rng.normal(size=(16, 7, 3)).astype("float32")
    x[:, 4:, :] = 0.0  # padding: masked by the Masking layer
    y = rng.integers(0, 2, size=(16, 7)).astype("float32")
    model = keras.Sequential([keras.Input((7, 3)), keras.layers.Masking(0.0),
                              keras.layers.Dense(1, activation="softplus")])
    results = {}
    for loss in (ContrastiveLoss(), ReferenceContrastiveLoss()):
        model.compile(loss=loss, jit_compile=False)
        results[type(loss).__name__] = model.evaluate(x, y, batch_size=16, verbose=0)
    np.testing.assert_allclose(results["ContrastiveLoss"], results["ReferenceContrastiveLoss"],
                               rtol=1e-6)
    # And the padded steps really are excluded: changing their labels changes nothing.
    y_padded = y.copy()
    y_padded[:, 4:] = 1.0 - y_padded[:, 4:]
    model.compile(loss=ContrastiveLoss(), jit_compile=False)
    np.testing.assert_allclose(model.evaluate(x, y_padded, batch_size=16, verbose=0),
                               results["ContrastiveLoss"], rtol=1e-6)


def test_lookup_by_registered_name(rng):
    # Keras 3's compile() resolves plain strings among its built-in losses only
    # (and reads a dict as one loss per output), so the registered name goes
    # through Keras' deserialisation instead.
    x, y = pair_data(rng, n=32)
    loss = keras.losses.deserialize({"class_name": "fused_contrastive>ContrastiveLoss",
                                     "config": {"margin": 2.0}})
    assert isinstance(loss, ContrastiveLoss) and loss.margin == 2.0
    assert keras.saving.get_registered_object("fused_contrastive>ContrastiveLoss") is ContrastiveLoss
    model = distance_model()
    model.compile(loss=loss)
    expected = tf.reduce_mean(contrastive_loss_reference(y, model.predict(x, verbose=0), 2.0))
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=32, verbose=0), expected,
                               rtol=1e-6)


def test_keras_file_loads_in_a_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(6)
    x, y = pair_data(rng, n=64)
    model = distance_model()
    model.compile(optimizer="adam", loss=ContrastiveLoss(margin=1.7, reduction="sum"))
    model.fit(x, y, epochs=1, verbose=0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model.save(tmp_path / "model.keras")
    expected = model.evaluate(x, y, batch_size=64, verbose=0)
    result = run_python(f"""
        import numpy as np, keras
        import fused_contrastive
        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        assert isinstance(model.loss, fused_contrastive.ContrastiveLoss)
        assert model.loss.margin == 1.7 and model.loss.reduction == "sum"
        data = np.load({str(tmp_path / "data.npz")!r})
        print(repr(model.evaluate(data["x"], data["y"], batch_size=64, verbose=0)))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_the_loss_in_float32(rng, policy):
    keras.utils.set_random_seed(7)
    x, y = pair_data(rng)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = distance_model()
        assert model(x[:2]).dtype == ("float16" if policy == "mixed_float16" else "bfloat16")
        loss = ContrastiveLoss()
        assert loss.dtype == "float32"
        assert loss(y[:8], model(x[:8])).dtype == tf.float32
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss=loss, jit_compile=False)
        if policy == "mixed_float16":  # Keras wraps the optimizer for float16
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        losses = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_explicit_loss_scale_optimizer(rng):
    keras.utils.set_random_seed(8)
    x, y = pair_data(rng)
    model = distance_model()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.02))
    model.compile(optimizer=optimizer, loss=ContrastiveLoss(), jit_compile=False)
    losses = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < losses[0]


def test_tfa_documented_usage_runs_unchanged():
    # TF Addons' documented API, with only the import line changed.
    from fused_contrastive import ContrastiveLoss as TfaContrastiveLoss

    y_true = [0, 0, 1, 1, 0, 1]
    y_pred = [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]
    for reduction, expected in (("sum_over_batch_size", 0.621666), ("sum", 3.73),
                                ("auto", 0.621666),
                                ("none", [0.81, 0.49, 1.69, 0.49, 0.0, 0.25])):
        loss_obj = TfaContrastiveLoss(margin=1.0, reduction=reduction, name="contrastive_loss")
        np.testing.assert_allclose(loss_obj(y_true, y_pred), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            loss_obj(y_true, y_pred, sample_weight=tf.constant([1.2, 0.8, 0.5, 0.4, 1.5, 1.0])),
            0.4425 if reduction in ("sum_over_batch_size", "auto") else
            2.655 if reduction == "sum" else [0.972, 0.392, 0.845, 0.196, 0.0, 0.25],
            rtol=1e-5, atol=1e-6)
        config = loss_obj.get_config()
        restored = TfaContrastiveLoss.from_config(config)
        assert restored.get_config() == config
        assert config["margin"] == 1.0 and config["name"] == "contrastive_loss"

"""PairDistance and PairAccuracy (issue 18, "what a new user hit" 5): the
distance and the pair accuracy of a model that outputs stacked pairs."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import DISTANCES, embeddings, run_python

import fused_contrastive as fc
from fused_contrastive import reference


def numpy_distance(a, b, distance):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if distance == "euclidean":
        return np.sqrt(np.sum((a - b) ** 2, axis=-1))
    if distance == "manhattan":
        return np.sum(np.abs(a - b), axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1.0 - np.divide(np.sum(a * b, axis=-1), norms, out=np.zeros_like(norms), where=norms > 0)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-6), ("float64", 1e-13), ("float16", 2e-3)])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 2)])
def test_pair_distance_layer_is_the_package_distance(rng, distance, dtype, rtol, shape):
    a, b = embeddings(rng, shape, dtype)
    stacked = tf.stack([a, b], axis=-2)
    got = fc.PairDistance(distance, dtype=dtype)(stacked)
    assert got.shape == shape[:-1] and got.dtype == dtype
    want = numpy_distance(tf.cast(a, tf.float64), tf.cast(b, tf.float64), distance)
    np.testing.assert_allclose(tf.cast(got, tf.float64), want, rtol=rtol, atol=rtol)
    # The reference's definitions, zero vectors and a == b included.
    np.testing.assert_array_equal(
        got,
        tf.cast(
            reference.reference_distance(
                tf.cast(a, tf.float64 if dtype == "float64" else tf.float32),
                tf.cast(b, tf.float64 if dtype == "float64" else tf.float32),
                distance,
            ),
            dtype,
        ),
    )


@pytest.mark.parametrize("similar_label", [1, 0])
@pytest.mark.parametrize("distance", DISTANCES)
def test_pair_accuracy_counts_pairs_on_the_right_side_of_the_threshold(
    rng, similar_label, distance
):
    a, b = embeddings(rng, (40, 3), "float32")
    d = numpy_distance(a, b, distance)
    threshold = float(np.median(d))
    labels = rng.integers(0, 2, size=40)
    w = rng.uniform(0.2, 2.0, size=40).astype(np.float32)
    similar = labels == similar_label
    correct = ((d < threshold) == similar).astype(np.float64)
    assert 0 < correct.mean() < 1
    metric = fc.PairAccuracy(threshold, distance, similar_label)
    metric.update_state(
        labels[:25, None].astype(np.float32), tf.stack([a, b], 1)[:25], sample_weight=w[:25]
    )
    metric.update_state(labels[25:], tf.stack([a, b], 1)[25:], sample_weight=w[25:])
    np.testing.assert_allclose(metric.result(), np.sum(correct * w) / np.sum(w), rtol=1e-6)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fc.PairAccuracy(threshold=-1.0), ValueError, "threshold"),
        (lambda: fc.PairAccuracy(threshold=float("nan")), ValueError, "threshold"),
        (lambda: fc.PairAccuracy(threshold="0.5"), TypeError, "threshold"),
        (lambda: fc.PairAccuracy(distance="l2"), ValueError, "'euclidean', 'cosine', 'manhattan'"),
        (lambda: fc.PairAccuracy(similar_label=2), ValueError, "similar_label"),
        (lambda: fc.PairDistance("l2"), ValueError, "'euclidean', 'cosine', 'manhattan'"),
        (
            lambda: fc.PairDistance()(tf.zeros([4, 3, 2])),
            tf.errors.InvalidArgumentError,
            r"\[\.\.\., 2, D\]",
        ),
    ],
)
def test_bad_options_and_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_configs_round_trip():
    metric = fc.PairAccuracy(0.7, "cosine", 0, name="acc")
    config = json.loads(json.dumps(metric.get_config()))
    again = fc.PairAccuracy.from_config(config)
    assert (again.threshold, again.distance, again.similar_label, again.name) == (
        0.7,
        "cosine",
        0,
        "acc",
    )
    layer = fc.PairDistance("manhattan", name="d")
    assert fc.PairDistance.from_config(layer.get_config()).distance == "manhattan"
    for obj in (metric, layer):
        name = keras.saving.get_registered_name(type(obj))
        assert name == f"fused_contrastive>{type(obj).__name__}"


def siamese(dim=4):
    tower = keras.Sequential([keras.Input((6,)), keras.layers.Dense(dim)])
    x1, x2 = keras.Input((6,)), keras.Input((6,))
    stacked = keras.layers.Reshape((2, dim))(keras.layers.Concatenate()([tower(x1), tower(x2)]))
    return keras.Model([x1, x2], stacked)


def test_fit_reports_pair_accuracy_and_the_keras_files_round_trip(rng, tmp_path):
    x1 = rng.normal(size=(64, 6)).astype("float32")
    x2 = rng.normal(size=(64, 6)).astype("float32")
    y = (x1[:, 0] * x2[:, 0] > 0).astype("float32")
    keras.utils.set_random_seed(1)
    model = siamese()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=fc.ContrastiveLoss(margin=1.0, distance="euclidean"),
        metrics=[fc.PairAccuracy(threshold=0.5, distance="euclidean")],
    )
    history = model.fit([x1, x2], y, batch_size=16, epochs=2, verbose=0).history
    assert len(history["pair_accuracy"]) == 2
    _, accuracy = model.evaluate([x1, x2], y, batch_size=64, verbose=0)
    predicted = model.predict([x1, x2], verbose=0)
    d = np.linalg.norm(predicted[:, 0] - predicted[:, 1], axis=-1)
    assert accuracy == pytest.approx(np.mean((d < 0.5) == (y == 1)), abs=1e-6)

    inference = keras.Model(model.inputs, fc.PairDistance("euclidean")(model.output))
    np.testing.assert_allclose(inference.predict([x1, x2], verbose=0), d, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "train.keras")
    inference.save(tmp_path / "inference.keras")
    np.savez(tmp_path / "data.npz", x1=x1, x2=x2, y=y, d=d, accuracy=accuracy)
    result = run_python(f"""
        import numpy as np, keras
        import fused_contrastive as fc
        data = np.load({str(tmp_path / "data.npz")!r})
        model = keras.models.load_model({str(tmp_path / "train.keras")!r})
        _, accuracy = model.evaluate([data["x1"], data["x2"]], data["y"], batch_size=64,
                                     verbose=0)
        metric = [m for m in model.metrics[1].metrics if isinstance(m, fc.PairAccuracy)][0]
        assert (metric.threshold, metric.distance) == (0.5, "euclidean"), metric.get_config()
        assert abs(accuracy - data["accuracy"]) < 1e-6, (accuracy, data["accuracy"])
        inference = keras.models.load_model({str(tmp_path / "inference.keras")!r})
        assert isinstance(inference.layers[-1], fc.PairDistance)
        np.testing.assert_allclose(inference.predict([data["x1"], data["x2"]], verbose=0),
                                   data["d"], rtol=1e-5, atol=1e-6)
        print("pairs ok")
    """)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pairs ok" in result.stdout


def test_tf_keras_pair_distance_and_accuracy(tmp_path):
    result = run_python(
        f"""
        import numpy as np, tensorflow as tf, tf_keras
        import fused_contrastive as fc
        from fused_contrastive import keras2
        assert fc.PairDistance is keras2.PairDistance and fc.PairAccuracy is keras2.PairAccuracy
        rng = np.random.default_rng(2)
        x1 = rng.normal(size=(64, 6)).astype("float32")
        x2 = rng.normal(size=(64, 6)).astype("float32")
        y = (x1[:, 0] * x2[:, 0] > 0).astype("float32")
        tower = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(6,))])
        in1, in2 = tf_keras.Input((6,)), tf_keras.Input((6,))
        out = tf_keras.layers.Reshape((2, 4))(
            tf_keras.layers.Concatenate()([tower(in1), tower(in2)]))
        model = tf_keras.Model([in1, in2], out)
        model.compile(optimizer=tf_keras.optimizers.SGD(0.05),
                      loss=fc.ContrastiveLoss(distance="cosine"),
                      metrics=[fc.PairAccuracy(0.6, "cosine", name="pair_accuracy")])
        history = model.fit([x1, x2], y, epochs=2, batch_size=16, verbose=0).history
        assert len(history["pair_accuracy"]) == 2, history
        _, accuracy = model.evaluate([x1, x2], y, batch_size=64, verbose=0)
        p = model.predict([x1, x2], verbose=0)
        n = np.linalg.norm(p[:, 0], axis=-1) * np.linalg.norm(p[:, 1], axis=-1)
        d = 1.0 - np.sum(p[:, 0] * p[:, 1], axis=-1) / n
        assert abs(accuracy - np.mean((d < 0.6) == (y == 1))) < 1e-6
        inference = tf_keras.Model([in1, in2], fc.PairDistance("cosine")(out))
        np.testing.assert_allclose(inference.predict([x1, x2], verbose=0), d, rtol=1e-5,
                                   atol=1e-6)
        out_dir = {str(tmp_path)!r}
        model.save(out_dir + "/train.h5")
        inference.save(out_dir + "/inference.h5")
        loaded = tf_keras.models.load_model(out_dir + "/train.h5")
        _, again = loaded.evaluate([x1, x2], y, batch_size=64, verbose=0)
        assert abs(again - accuracy) < 1e-6, (again, accuracy)
        loaded = tf_keras.models.load_model(out_dir + "/inference.h5")
        assert loaded.layers[-1].distance == "cosine"
        np.testing.assert_allclose(loaded.predict([x1, x2], verbose=0), d, rtol=1e-5, atol=1e-6)
        config = fc.PairAccuracy(0.3, "manhattan", 0).get_config()
        again = fc.PairAccuracy.from_config(config)
        assert (again.threshold, again.distance, again.similar_label) == (0.3, "manhattan", 0)
        print("tf_keras pairs ok")
    """,
        TF_USE_LEGACY_KERAS="1",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras pairs ok" in result.stdout


def test_metric_and_layer_compile_with_xla(rng):
    a, b = embeddings(rng, (16, 3), "float32")
    stacked = tf.stack([a, b], axis=1)
    labels = tf.constant(rng.integers(0, 2, size=16), tf.float32)

    metric, layer = fc.PairAccuracy(0.8, "manhattan"), fc.PairDistance("manhattan")

    def both(labels, stacked):
        metric.reset_state()
        metric.update_state(labels, stacked)
        return metric.result(), layer(stacked)

    want = [t.numpy() for t in both(labels, stacked)]
    assert 0 < want[0] < 1
    for got, w in zip(tf.function(both, jit_compile=True)(labels, stacked), want):
        np.testing.assert_allclose(got, w, rtol=1e-6)

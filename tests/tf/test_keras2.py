"""fused_contrastive.keras2: the tf_keras class, which TF_USE_LEGACY_KERAS=1 makes the default."""

import pytest
from support import (
    TFA_DISTANCES,
    TFA_LABELS,
    TFA_LOSSES,
    TFA_WEIGHTS,
    load_tfa_h5_in_fresh_process,
    run_python,
)

LEGACY_SCRIPT = """
    import numpy as np, tensorflow as tf, tf_keras
    import fused_contrastive
    from fused_contrastive import ContrastiveLoss
    from fused_contrastive.keras2 import ContrastiveLoss as Keras2Loss

    assert tf.keras is tf_keras or tf.keras.__name__.startswith("tf_keras")
    assert ContrastiveLoss is Keras2Loss and issubclass(ContrastiveLoss, tf_keras.losses.Loss)

    y_true = TFA_LABELS
    y_pred = TFA_DISTANCES
    R = tf.keras.losses.Reduction
    cases = [(R.AUTO, 0.621666), (R.SUM_OVER_BATCH_SIZE, 0.621666), (R.SUM, 3.73),
             (R.NONE, TFA_LOSSES)]
    for reduction, expected in cases:
        loss = ContrastiveLoss(margin=1.0, reduction=reduction, name="c")
        np.testing.assert_allclose(loss(y_true, y_pred), expected, rtol=1e-5, atol=1e-6)
        # similar_label=0: the same numbers from the flipped labels.
        flipped = ContrastiveLoss(margin=1.0, reduction=reduction, similar_label=0)
        np.testing.assert_allclose(flipped([1 - y for y in y_true], y_pred), expected,
                                   rtol=1e-5, atol=1e-6)
        weights = [0.5, 2.0, 1.0, 0.0, 1.5, 1.0]
        np.testing.assert_allclose(
            flipped([1 - y for y in y_true], y_pred, sample_weight=weights),
            ContrastiveLoss(margin=1.0, reduction=reduction)(y_true, y_pred, sample_weight=weights),
            rtol=1e-6)
    weighted = ContrastiveLoss()(y_true, y_pred, sample_weight=TFA_WEIGHTS)
    np.testing.assert_allclose(weighted, 0.4425, rtol=1e-5)
    # [B] labels against a [B, 1] model output: B losses, not B x B.
    assert ContrastiveLoss(reduction=R.NONE)(y_true, tf.reshape(y_pred, [6, 1])).shape == (6,)

    config = ContrastiveLoss(margin=0.4, reduction=R.SUM, name="pairs").get_config()
    assert config == {"reduction": "sum", "name": "pairs", "margin": 0.4,
                      "similar_label": 1, "distance": None}, config
    again = tf_keras.losses.deserialize(tf_keras.losses.serialize(ContrastiveLoss(margin=0.4)))
    assert isinstance(again, ContrastiveLoss) and again.margin == 0.4
    flipped = ContrastiveLoss(margin=0.4, similar_label=0)
    assert flipped.get_config()["similar_label"] == 0
    for restored in (ContrastiveLoss.from_config(flipped.get_config()),
                     tf_keras.losses.deserialize(tf_keras.losses.serialize(flipped))):
        assert isinstance(restored, ContrastiveLoss) and restored.similar_label == 0
    try:
        ContrastiveLoss(margin=-1.0)
        raise AssertionError("negative margin accepted")
    except ValueError:
        pass
    for bad, error in ((2, ValueError), (-1, ValueError), (0.5, TypeError), (True, TypeError),
                       ("1", TypeError)):
        try:
            ContrastiveLoss(similar_label=bad)
            raise AssertionError(f"similar_label={bad!r} accepted")
        except error as e:
            assert "similar_label" in str(e), e

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    tf_keras.utils.set_random_seed(2)
    model = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu", input_shape=(6,)),
                                 tf_keras.layers.Dense(1, activation="softplus")])
    model.compile(optimizer=tf_keras.optimizers.Adam(0.02), loss=ContrastiveLoss(margin=1.5))
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < history[0], history
    expected = model.evaluate(x, y, batch_size=128, verbose=0)

    out = OUT
    model.save(out + "/model.h5")
    model.save(out + "/saved_model", save_format="tf")
    for path in (out + "/model.h5", out + "/saved_model"):
        loaded = tf_keras.models.load_model(path)
        assert isinstance(loaded.loss, ContrastiveLoss) and loaded.loss.margin == 1.5, path
        np.testing.assert_allclose(loaded.evaluate(x, y, batch_size=128, verbose=0), expected,
                                   rtol=1e-6)

    # similar_label survives an h5 file too.
    model.compile(optimizer="sgd", loss=ContrastiveLoss(margin=1.5, similar_label=0))
    flipped_expected = model.evaluate(x, 1 - y, batch_size=128, verbose=0)
    np.testing.assert_allclose(flipped_expected, expected, rtol=1e-6)
    model.save(out + "/flipped.h5")
    loaded = tf_keras.models.load_model(out + "/flipped.h5")
    assert loaded.loss.similar_label == 0, loaded.loss.get_config()
    np.testing.assert_allclose(loaded.evaluate(x, 1 - y, batch_size=128, verbose=0), expected,
                               rtol=1e-6)
    print("tf_keras ok")
"""


def test_legacy_keras_class(tmp_path):
    constants = dict(
        TFA_LABELS=TFA_LABELS,
        TFA_DISTANCES=TFA_DISTANCES,
        TFA_LOSSES=TFA_LOSSES,
        TFA_WEIGHTS=TFA_WEIGHTS,
        OUT=str(tmp_path),
    )
    header = "".join(f"    {name} = {value!r}\n" for name, value in constants.items())
    result = run_python(header + LEGACY_SCRIPT, TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras ok" in result.stdout


EMBEDDINGS_SCRIPT = """
    import numpy as np, tensorflow as tf, tf_keras
    import fused_contrastive as fc
    from fused_contrastive import ContrastiveLoss

    rng = np.random.default_rng(1)
    a = tf.constant(rng.normal(size=(10, 4)), tf.float32)
    b = tf.constant(rng.normal(size=(10, 4)), tf.float32)
    y = tf.constant(rng.integers(0, 2, size=10), tf.float32)
    pairs = tf.stack([a, b], axis=1)
    R = tf.keras.losses.Reduction
    for distance in ("euclidean", "cosine", "manhattan"):
        per_pair = fc.contrastive_loss_from_embeddings_reference(y, a, b, 0.7, distance)
        for reduction, expected in ((R.NONE, per_pair), (R.SUM, tf.reduce_sum(per_pair)),
                                    (R.AUTO, tf.reduce_mean(per_pair))):
            loss = ContrastiveLoss(margin=0.7, reduction=reduction, distance=distance)
            np.testing.assert_allclose(loss(y, pairs), expected, rtol=2e-6, atol=1e-6)
    try:
        ContrastiveLoss(distance="l2")
        raise AssertionError("bad distance accepted")
    except ValueError as e:
        assert "'euclidean', 'cosine', 'manhattan'" in str(e), e

    x1 = rng.normal(size=(64, 6)).astype("float32")
    x2 = rng.normal(size=(64, 6)).astype("float32")
    labels = (x1[:, 0] * x2[:, 0] > 0).astype("float32")
    tf_keras.utils.set_random_seed(2)
    tower = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(6,))])
    in1, in2 = tf_keras.Input((6,)), tf_keras.Input((6,))
    out = tf_keras.layers.Reshape((2, 4))(tf_keras.layers.Concatenate()([tower(in1), tower(in2)]))
    model = tf_keras.Model([in1, in2], out)
    model.compile(optimizer=tf_keras.optimizers.SGD(0.05),
                  loss=ContrastiveLoss(margin=1.2, distance="euclidean"))
    history = model.fit([x1, x2], labels, epochs=4, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0], history
    expected = model.evaluate([x1, x2], labels, batch_size=64, verbose=0)
    model.save(OUT + "/siamese.h5")
    loaded = tf_keras.models.load_model(OUT + "/siamese.h5")
    assert loaded.loss.distance == "euclidean" and loaded.loss.margin == 1.2
    np.testing.assert_allclose(loaded.evaluate([x1, x2], labels, batch_size=64, verbose=0),
                               expected, rtol=1e-6)
    print("tf_keras embeddings ok")
"""


def test_legacy_keras_class_with_distance(tmp_path):
    result = run_python(
        f"    OUT = {str(tmp_path)!r}\n" + EMBEDDINGS_SCRIPT, TF_USE_LEGACY_KERAS="1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras embeddings ok" in result.stdout


@pytest.mark.parametrize(
    "legacy_env, package_first",
    [(True, False), (False, False), (False, True)],
    ids=["TF_USE_LEGACY_KERAS=1", "tf_keras imported first", "tf_keras imported after"],
)
def test_tfa_h5_model_loads_in_tf_keras(legacy_env, package_first):
    # TF_USE_LEGACY_KERAS=1: the package's class is the Keras 2 one. Without
    # it, a process that imports tf_keras before or after fused_contrastive
    # gets the Keras 2 class registered too (and keeps the Keras 3 one as the
    # package's).
    measured = load_tfa_h5_in_fresh_process(
        "tf_keras", package_first, **({"TF_USE_LEGACY_KERAS": "1"} if legacy_env else {})
    )
    assert measured["loss_class"] == "fused_contrastive.keras2.ContrastiveLoss"
    assert measured["package_class"] == (
        "fused_contrastive.keras2.ContrastiveLoss"
        if legacy_env
        else "fused_contrastive.losses.ContrastiveLoss"
    )
    assert measured["config"]["reduction"] == "sum_over_batch_size"


def test_legacy_keras_without_tf_keras_says_what_to_install():
    # tf_keras made unimportable, as if it were not installed.
    result = run_python(
        """
        import sys
        sys.modules["tf_keras"] = None
        try:
            import fused_contrastive
        except ImportError as error:
            print("ImportError:", error)
        else:
            print("imported", fused_contrastive.ContrastiveLoss)
    """,
        TF_USE_LEGACY_KERAS="1",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ImportError: " in result.stdout, result.stdout
    # tf-keras is what the [keras2] extra installs: the one name that works for
    # a package built from source, which no index knows.
    assert "pip install tf-keras " in result.stdout, result.stdout
    assert 'pip install "fused-contrastive[keras2]"' in result.stdout, result.stdout
    assert "TF_USE_LEGACY_KERAS" in result.stdout


IN_BATCH_SCRIPT = """
    import numpy as np, tensorflow as tf, tf_keras
    import fused_contrastive as fc
    from fused_contrastive import InBatchContrastiveLoss
    from fused_contrastive.keras2 import InBatchContrastiveLoss as Keras2InBatch

    assert InBatchContrastiveLoss is Keras2InBatch
    assert issubclass(InBatchContrastiveLoss, tf_keras.losses.Loss)
    rng = np.random.default_rng(1)
    e = tf.constant(rng.normal(size=(12, 4)), tf.float32)
    y = rng.integers(0, 3, size=12).astype("float32")
    w = rng.uniform(size=12).astype("float32")
    per_anchor = fc.in_batch_contrastive_loss_reference(y, e, 0.8, 0.1, "cosine", "balanced")
    R = tf.keras.losses.Reduction
    for reduction, expected in ((R.NONE, per_anchor * w), (R.SUM, tf.reduce_sum(per_anchor * w)),
                                (R.AUTO, tf.reduce_sum(per_anchor * w) / 12)):
        loss = InBatchContrastiveLoss(0.8, 0.1, "cosine", "balanced", reduction=reduction)
        np.testing.assert_allclose(loss(y, e, sample_weight=w), expected, rtol=2e-6, atol=1e-7)
    # Integer class ids stay exact (no float32 cast: 2**24 + 1 would be 2**24).
    small = rng.integers(0, 3, size=12)
    for offset in (2**24, 2**40, 2**63 - 3):
        for reduction in (R.NONE, R.SUM, R.AUTO):
            loss = InBatchContrastiveLoss(reduction=reduction)
            np.testing.assert_array_equal(loss(small + offset, e), loss(small, e))
    try:
        InBatchContrastiveLoss(pair_weighting="mean")
        raise AssertionError("bad pair_weighting accepted")
    except ValueError as error:
        assert "'uniform', 'balanced'" in str(error), error

    x = rng.normal(size=(128, 6)).astype("float32")
    classes = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0)
    tf_keras.utils.set_random_seed(2)
    model = tf_keras.Sequential([tf_keras.layers.Dense(8, input_shape=(6,)),
                                 tf_keras.layers.Dense(4)])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.05),
                  loss=InBatchContrastiveLoss(margin=1.2, max_block_rows=16), jit_compile=True)
    history = model.fit(x, classes, epochs=4, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < history[0], history
    expected = model.evaluate(x, classes, batch_size=128, verbose=0)
    np.testing.assert_allclose(
        model.evaluate(x, classes.astype("int64") + 2**40, batch_size=128, verbose=0), expected,
        rtol=1e-6)
    model.save(OUT + "/embedding.h5")
    loaded = tf_keras.models.load_model(OUT + "/embedding.h5")
    assert loaded.loss.get_config() == model.loss.get_config()
    assert loaded.loss.max_block_rows == 16 and loaded.loss.margin == 1.2
    np.testing.assert_allclose(loaded.evaluate(x, classes, batch_size=128, verbose=0), expected,
                               rtol=1e-6)
    print("tf_keras in-batch ok")
"""


def test_legacy_keras_in_batch_class(tmp_path):
    result = run_python(f"    OUT = {str(tmp_path)!r}\n" + IN_BATCH_SCRIPT, TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras in-batch ok" in result.stdout

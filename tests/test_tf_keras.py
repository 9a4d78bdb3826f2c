"""Keras 2 (tf_keras) users: TF_USE_LEGACY_KERAS=1 gives a tf_keras loss class
with the same results, Keras 2 reductions, serialization, h5 and SavedModel."""

from conftest import run_python

LEGACY_SCRIPT = """
    import numpy as np, tensorflow as tf, tf_keras
    import fused_contrastive
    from fused_contrastive import ContrastiveLoss
    from fused_contrastive.keras2 import ContrastiveLoss as Keras2Loss

    assert tf.keras is tf_keras or tf.keras.__name__.startswith("tf_keras")
    assert ContrastiveLoss is Keras2Loss and issubclass(ContrastiveLoss, tf_keras.losses.Loss)

    y_true = [0, 0, 1, 1, 0, 1]
    y_pred = [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]
    R = tf.keras.losses.Reduction
    cases = [(R.AUTO, 0.621666), (R.SUM_OVER_BATCH_SIZE, 0.621666), (R.SUM, 3.73),
             (R.NONE, [0.81, 0.49, 1.69, 0.49, 0.0, 0.25])]
    for reduction, expected in cases:
        loss = ContrastiveLoss(margin=1.0, reduction=reduction, name="c")
        np.testing.assert_allclose(loss(y_true, y_pred), expected, rtol=1e-5, atol=1e-6)
    weighted = ContrastiveLoss()(y_true, y_pred, sample_weight=[1.2, 0.8, 0.5, 0.4, 1.5, 1.0])
    np.testing.assert_allclose(weighted, 0.4425, rtol=1e-5)
    # [B] labels against a [B, 1] model output: B losses, not B x B.
    assert ContrastiveLoss(reduction=R.NONE)(y_true, tf.reshape(y_pred, [6, 1])).shape == (6,)

    config = ContrastiveLoss(margin=0.4, reduction=R.SUM, name="pairs").get_config()
    assert config == {"reduction": "sum", "name": "pairs", "margin": 0.4}, config
    again = tf_keras.losses.deserialize(tf_keras.losses.serialize(ContrastiveLoss(margin=0.4)))
    assert isinstance(again, ContrastiveLoss) and again.margin == 0.4
    try:
        ContrastiveLoss(margin=-1.0)
        raise AssertionError("negative margin accepted")
    except ValueError:
        pass

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

    out = {OUT!r}
    model.save(out + "/model.h5")
    model.save(out + "/saved_model", save_format="tf")
    for path in (out + "/model.h5", out + "/saved_model"):
        loaded = tf_keras.models.load_model(path)
        assert isinstance(loaded.loss, ContrastiveLoss) and loaded.loss.margin == 1.5, path
        np.testing.assert_allclose(loaded.evaluate(x, y, batch_size=128, verbose=0), expected,
                                   rtol=1e-6)
    print("tf_keras ok")
"""


def test_legacy_keras_class(tmp_path):
    result = run_python(LEGACY_SCRIPT.replace("{OUT!r}", repr(str(tmp_path))),
                        TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras ok" in result.stdout

"""Second order through the Keras classes (issue 18, item 4): nested tapes
(Hessian-vector products, gradient penalties) through every class and
reduction, eager and in tf.function, against the same through Keras' own
reduction of the pure-TF reference."""

import numpy as np
import pytest
import tensorflow as tf
from support import DISTANCES, REDUCTIONS, embeddings, random_distances, run_python

import keras
import fused_contrastive as fc
from fused_contrastive import losses
from fused_contrastive._inputs import PAIR_WEIGHTINGS

B = 9


class KerasReference(keras.losses.Loss):
    """Keras' own reduction of a per-sample reference loss `fn(y_true, y_pred)`."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def pair_reference(distance, margin):
    return lambda y, p: fc.contrastive_loss_from_embeddings_reference(
        y, p[..., 0, :], p[..., 1, :], margin, distance
    )


# (name, the class with its options, the reference per-sample loss, y_pred's shape)
CASES = [
    (
        "distances",
        lambda **kw: losses.ContrastiveLoss(margin=0.9, **kw),
        lambda y, d: fc.contrastive_loss_reference(y, d, 0.9),
        (B,),
    ),
    *[
        (
            f"pairs-{distance}",
            lambda distance=distance, **kw: losses.ContrastiveLoss(0.9, distance=distance, **kw),
            pair_reference(distance, 0.9),
            (B, 2, 4),
        )
        for distance in DISTANCES
    ],
    *[
        (
            f"in-batch-{distance}-{weighting}",
            lambda distance=distance, weighting=weighting, **kw: losses.InBatchContrastiveLoss(
                1.3, 0.1, distance, weighting, **kw
            ),
            lambda y, e, distance=distance, weighting=weighting: (
                fc.in_batch_contrastive_loss_reference(y, e, 1.3, 0.1, distance, weighting)
            ),
            (B, 4),
        )
        for distance in ("euclidean", "cosine")
        for weighting in PAIR_WEIGHTINGS
    ],
]


def inputs(rng, name, shape):
    if name.startswith("in-batch"):
        labels = tf.constant(rng.integers(0, 3, size=B), tf.int64)
        return labels, tf.constant(rng.normal(size=shape) / 2.0, tf.float64)
    labels = tf.constant(rng.integers(0, 2, size=B), tf.float64)
    if name == "distances":
        return labels, random_distances(rng, shape, "float64")
    a, b = embeddings(rng, (B, shape[-1]), "float64", special=False)
    return labels, tf.stack([a, b], axis=1)


def hvp_and_penalty(loss_object, y, x, v, w):
    """The Hessian-vector product H·v of the (summed) loss and the gradient of
    the gradient penalty ‖∇loss‖², both through nested tapes."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            total = tf.reduce_sum(loss_object(y, x, sample_weight=w))
        grad = inner.gradient(total, x)
        penalty = tf.reduce_sum(tf.square(grad))
    return total, grad, outer.gradient(grad, x, output_gradients=v), outer.gradient(penalty, x)


@pytest.mark.parametrize("name, make, reference, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "reduction, weighted",
    [
        *((reduction, True) for reduction in REDUCTIONS),
        ("sum_over_batch_size", False),
        ("mean_with_sample_weight", False),
    ],
)
def test_nested_tapes_through_every_class_match_the_reference(
    rng, run, name, make, reference, shape, reduction, weighted
):
    y, x = inputs(rng, name, shape)
    v = tf.constant(rng.normal(size=x.shape), tf.float64)
    w = tf.constant(rng.uniform(0.5, 1.5, size=B), tf.float64) if weighted else None
    ours = make(reduction=reduction, dtype="float64")
    theirs = KerasReference(reference, reduction=reduction, dtype="float64")
    got = run(lambda x: hvp_and_penalty(ours, y, x, v, w), x)
    want = hvp_and_penalty(theirs, y, x, v, w)
    for what, g, e in zip(
        ("loss", "gradient", "Hessian-vector product", "penalty gradient"), got, want
    ):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12, err_msg=what)
    assert np.any(want[2].numpy() != 0)


def test_nested_tapes_through_the_tf_keras_classes_match_the_reference():
    script = """
        import numpy as np, tensorflow as tf, tf_keras
        import fused_contrastive as fc
        from fused_contrastive import keras2

        R = tf_keras.losses.Reduction
        rng = np.random.default_rng(4)
        pairs = tf.constant(rng.normal(size=(7, 2, 3)), tf.float64)
        y = tf.constant(rng.integers(0, 2, size=7), tf.float64)
        ids = tf.constant(rng.integers(0, 3, size=7), tf.int64)
        v = tf.constant(rng.normal(size=(7, 2, 3)), tf.float64)
        cases = [(keras2.ContrastiveLoss(0.9, distance=d), pairs, y, lambda x, d=d:
                  fc.contrastive_loss_from_embeddings_reference(y, x[:, 0], x[:, 1], 0.9, d))
                 for d in ("euclidean", "cosine", "manhattan")]
        cases.append((keras2.ContrastiveLoss(0.9), pairs[:, 0, 0], y, lambda x:
                      fc.contrastive_loss_reference(y, x, 0.9)))
        cases += [(keras2.InBatchContrastiveLoss(1.3, 0.1, d), pairs[:, 0], ids, lambda x, d=d:
                   fc.in_batch_contrastive_loss_reference(ids, x, 1.3, 0.1, d))
                  for d in ("euclidean", "cosine")]

        def hvp(total, x, u):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    t = total(x)
                grad = inner.gradient(t, x)
            return outer.gradient(grad, x, output_gradients=u)

        for reduction, reduce in ((R.SUM, tf.reduce_sum), (R.AUTO, tf.reduce_mean),
                                  (R.NONE, tf.reduce_sum)):
            for loss, x, labels, reference in cases:
                loss.reduction = reduction
                u = tf.reshape(v, [-1])[:tf.size(x)]
                u = tf.reshape(u, tf.shape(x))
                for f in (lambda x: hvp(lambda x: tf.reduce_sum(loss(labels, x)), x, u),
                          tf.function(lambda x: hvp(lambda x: tf.reduce_sum(loss(labels, x)),
                                                    x, u))):
                    got = f(x)
                    want = hvp(lambda x: reduce(reference(x)), x, u)
                    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        print("tf_keras second order ok")
    """
    result = run_python(script, TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf_keras second order ok" in result.stdout

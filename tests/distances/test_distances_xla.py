"""cc/tf/xla/distances.cc: the XLA lowering (jit_compile, Keras) against the compiled kernels."""

import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    FUSED_REDUCTIONS,
    LABEL_DTYPES,
    ODD_BOOL_AS_LABELS,
    ODD_BOOL_LOSSES,
    distance_model,
    odd_bool_labels,
    pair_data,
    random_distances,
    random_labels,
    run_python,
)

import keras
from fused_contrastive import ContrastiveLoss, _distances_ops, contrastive_loss


def _loss_and_grad(y, d, margin, similar_label=1):
    with tf.GradientTape() as tape:
        tape.watch(d)
        upstream = tf.reshape(tf.cast(tf.range(1, 1 + tf.size(d)), d.dtype), tf.shape(d))
        total = tf.reduce_sum(contrastive_loss(y, d, margin, similar_label) * upstream)
    return contrastive_loss(y, d, margin, similar_label), tape.gradient(total, d)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_jit_compile_matches_the_compiled_op(rng, label_dtype, distance_dtype):
    for shape in [(), (0,), (13,), (3, 4)]:
        y = random_labels(rng, shape, label_dtype)
        d = random_distances(rng, shape, distance_dtype)
        margin = 0.9
        want_loss, want_grad = _loss_and_grad(y, d, margin)
        loss, grad = tf.function(_loss_and_grad, jit_compile=True)(y, d, margin)
        tol = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-14}[distance_dtype]
        for got, want in ((loss, want_loss), (grad, want_grad)):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(
                tf.cast(got, tf.float64), tf.cast(want, tf.float64), rtol=tol, atol=tol
            )


def test_jit_compile_with_similar_label_0(rng):
    y = random_labels(rng, (17,), "float32")
    d = random_distances(rng, (17,), "float32")
    loss, grad = tf.function(_loss_and_grad, jit_compile=True)(y, d, 0.9, 0)
    want_loss, want_grad = _loss_and_grad(1.0 - y, d, 0.9)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_xla_runs_the_lowering_not_a_fallback():
    f = tf.function(lambda y, d: contrastive_loss(y, d, 1.0), jit_compile=True)
    hlo = f.experimental_get_compiler_ir(tf.zeros([4]), tf.zeros([4]))(stage="hlo")
    assert 'op_type="FusedContrastive>ContrastiveLoss"' in hlo
    assert "custom-call" not in hlo


def test_xla_rejects_bad_constant_margin():
    f = tf.function(
        lambda y, d: contrastive_loss(y, d, tf.constant(-1.0, tf.float64)), jit_compile=True
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
        f(tf.zeros([3]), tf.zeros([3]))


@pytest.mark.parametrize("margin", [-1.0, float("nan"), -float("inf")])
def test_xla_bad_run_time_margin_gives_nan(margin):
    # A margin known only when the computation runs (a variable) cannot raise
    # under XLA: every output is NaN instead, never a number.
    m = tf.Variable(margin, dtype=tf.float64)
    y, d = tf.constant([1.0, 0.0, 1.0, 0.0]), tf.constant([0.5, 0.2, 0.0, 3.0])

    def per_sample(d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = contrastive_loss(y, d, m)
        return loss, tape.gradient(loss, d)

    def reduced(d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss, dloss, _ = _distances_ops.reduced_loss_outputs(
                y, d, tf.constant(1.0), m, "mean", 1.0
            )
        return loss, dloss, tape.gradient(loss, d)

    for function in (per_sample, reduced):
        for output in tf.function(function, jit_compile=True)(d):
            assert np.all(np.isnan(output.numpy())), (function.__name__, output)


def test_xla_good_variable_margin_is_used():
    m = tf.Variable(2.0, dtype=tf.float64)
    f = tf.function(lambda y, d: contrastive_loss(y, d, m), jit_compile=True)
    y, d = tf.constant([0.0, 1.0]), tf.constant([0.5, 0.5])
    np.testing.assert_allclose(f(y, d), [2.25, 0.25])
    m.assign(1.0)
    np.testing.assert_allclose(f(y, d), [0.25, 0.25])


def test_xla_shape_mismatch_names_both_shapes():
    f = tf.function(
        lambda y, d: contrastive_loss(y, d),
        jit_compile=True,
        input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[3\].*\[4\]"):
        f(tf.zeros([3]), tf.zeros([4]))


def test_xla_reads_any_nonzero_bool_byte_as_true():
    d = tf.fill([4], 0.3)
    w = tf.constant([1.0, 2.0, 0.5, 1.5])
    f = tf.function(lambda y, d: contrastive_loss(y, d), jit_compile=True)
    np.testing.assert_allclose(f(odd_bool_labels(), d), ODD_BOOL_LOSSES, rtol=1e-6)
    np.testing.assert_array_equal(f(odd_bool_labels(), d), f(tf.constant(ODD_BOOL_AS_LABELS), d))
    for reduction in ("sum", "mean", "weighted_mean"):
        reduced = tf.function(
            lambda y, d: _distances_ops.reduced_loss_outputs(y, d, w, 1.0, reduction, 1.0),
            jit_compile=True,
        )
        got = reduced(odd_bool_labels(), d)
        want = reduced(tf.constant(ODD_BOOL_AS_LABELS), d)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(
            got[0], np.sum(np.array(ODD_BOOL_LOSSES) * w.numpy()) * float(got[2]), rtol=1e-6
        )


@pytest.mark.parametrize("reduction", FUSED_REDUCTIONS)
def test_keras_class_under_xla_matches(rng, reduction):
    y = random_labels(rng, (33,), "float32")
    d = random_distances(rng, (33,), "float32")
    w = tf.constant(rng.uniform(0.1, 2.0, size=33), tf.float32)

    def loss_and_grad(d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = ContrastiveLoss(reduction=reduction)(y, d, w)
        return loss, tape.gradient(loss, d)

    want = loss_and_grad(d)
    got = tf.function(loss_and_grad, jit_compile=True)(d)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("jit_compile", [True, "auto"])
def test_keras_trains_with_jit_compile(rng, jit_compile):
    keras.utils.set_random_seed(3)
    x, y = pair_data(rng)
    model = distance_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=ContrastiveLoss(margin=1.0),
        jit_compile=jit_compile,
    )
    losses = model.fit(x, y, epochs=6, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_xla_works_when_imported_after_the_first_xla_compilation():
    # TensorFlow builds its XLA kernel table at the first compilation; the
    # library registers itself late in that case.
    result = run_python("""
        import tensorflow as tf
        tf.function(lambda x: x * 2, jit_compile=True)(tf.constant(1.0))
        import fused_contrastive as fc
        f = tf.function(lambda y, d: tf.reduce_sum(fc.contrastive_loss(y, d)), jit_compile=True)
        print(float(f(tf.constant([0., 0., 1., 1., 0., 1.]),
                      tf.constant([0.1, 0.3, 1.3, 0.7, 1.1, 0.5]))))
        ops = fc._library.op_library
        one = tf.constant(1.0, tf.float64)

        @tf.function(jit_compile=True)
        def embedding_ops(y, a, b):
            loss, coef = ops.fused_contrastive_embedding_contrastive_loss(
                y, a, b, 2 * one, distance="euclidean")
            grad_a, _ = ops.fused_contrastive_embedding_contrastive_loss_grad(
                a, b, coef, loss, distance="euclidean")
            reduced = ops.fused_contrastive_embedding_contrastive_loss_reduced(
                y, a, b, tf.constant(1.0), 2 * one, one, distance="euclidean", reduction="sum")
            return tf.reduce_sum(loss), tf.reduce_sum(grad_a), reduced[0]

        print(*(float(x) for x in embedding_ops(
            tf.constant([1., 0.]), tf.constant([[0., 3.], [1., 1.]]),
            tf.constant([[4., 0.], [1., 1.]]))))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    tfa_sum, loss_sum, grad_sum, reduced = (float(x) for x in result.stdout.split()[-4:])
    assert abs(tfa_sum - 3.73) < 1e-5
    # Losses 25 and 4 (distances 5 and 0); d(25 * loss)/da of the first pair
    # is 25 * 2 * (a - b) = 50 * (-4, 3).
    assert (loss_sum, grad_sum, reduced) == (29.0, -50.0, 29.0)

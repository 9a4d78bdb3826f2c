"""XLA: the op lowers to HLO (no fallback), under tf.function and Keras."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import (DISTANCE_DTYPES, LABEL_DTYPES, distance_model, pair_data, random_distances,
                      random_labels, run_python)

import keras
from fused_contrastive import ContrastiveLoss, contrastive_loss


def _loss_and_grad(y, d, margin):
    with tf.GradientTape() as tape:
        tape.watch(d)
        upstream = tf.reshape(tf.cast(tf.range(1, 1 + tf.size(d)), d.dtype), tf.shape(d))
        total = tf.reduce_sum(contrastive_loss(y, d, margin) * upstream)
    return contrastive_loss(y, d, margin), tape.gradient(total, d)


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
            np.testing.assert_allclose(tf.cast(got, tf.float64), tf.cast(want, tf.float64),
                                       rtol=tol, atol=tol)


def test_xla_runs_the_lowering_not_a_fallback():
    f = tf.function(lambda y, d: contrastive_loss(y, d, 1.0), jit_compile=True)
    hlo = f.experimental_get_compiler_ir(tf.zeros([4]), tf.zeros([4]))(stage="hlo")
    assert 'op_type="FusedContrastive>ContrastiveLoss"' in hlo
    assert "custom-call" not in hlo


def test_xla_rejects_bad_constant_margin():
    f = tf.function(lambda y, d: contrastive_loss(y, d, tf.constant(-1.0, tf.float64)),
                    jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
        f(tf.zeros([3]), tf.zeros([3]))


def test_xla_shape_mismatch_names_both_shapes():
    f = tf.function(lambda y, d: contrastive_loss(y, d), jit_compile=True,
                    input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[3\].*\[4\]"):
        f(tf.zeros([3]), tf.zeros([4]))


@pytest.mark.parametrize("jit_compile", [True, "auto"])
def test_keras_trains_with_jit_compile(rng, jit_compile):
    keras.utils.set_random_seed(3)
    x, y = pair_data(rng)
    model = distance_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=ContrastiveLoss(margin=1.0),
                  jit_compile=jit_compile)
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
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert abs(float(result.stdout.split()[-1]) - 3.73) < 1e-5

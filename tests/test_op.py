"""The compiled op against the pure-TensorFlow reference, its gradient, and bad input."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import DISTANCE_DTYPES, LABEL_DTYPES, random_distances, random_labels

from fused_contrastive import _ops, contrastive_loss, contrastive_loss_reference
from fused_contrastive._inputs import prepare_inputs

SHAPES = [(), (0,), (1,), (7,), (4, 5), (2, 3, 4), (3, 0, 2)]


def _bits(t):
    """Raw bits, so NaN == NaN and -0 != +0 in comparisons."""
    a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32 if a.dtype.itemsize == 4
                  else np.uint64)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_matches_reference_for_every_dtype_pair(rng, run, label_dtype, distance_dtype):
    # Same formula, same grouping, same rounding: equal bit for bit.
    for shape in SHAPES:
        for margin in (0.0, 1.0, 0.37):
            y = random_labels(rng, shape, label_dtype)
            d = random_distances(rng, shape, distance_dtype)
            fused = run(lambda a, b: contrastive_loss(a, b, margin), y, d)
            expected = contrastive_loss_reference(y, d, margin)
            assert fused.dtype == d.dtype and fused.shape == d.shape
            np.testing.assert_array_equal(_bits(fused), _bits(expected),
                                          err_msg=f"shape {shape} margin {margin}")


@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_gradient_equals_autodiff_of_reference(rng, run, distance_dtype):
    y = random_labels(rng, (6, 5), "float32")
    d = random_distances(rng, (6, 5), distance_dtype)
    upstream = tf.cast(tf.constant(rng.normal(size=(6, 5))), distance_dtype)

    def grads(d):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(d)
            fused = tf.reduce_sum(contrastive_loss(y, d, 0.8) * upstream)
            ref = tf.reduce_sum(contrastive_loss_reference(y, d, 0.8) * upstream)
        return tape.gradient(fused, d), tape.gradient(ref, d)

    fused, ref = run(grads, d)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-6, "float64": 1e-14}[distance_dtype]
    np.testing.assert_allclose(tf.cast(fused, tf.float64), tf.cast(ref, tf.float64),
                               rtol=tol, atol=tol)


def test_first_order_gradient_is_the_saved_derivative(rng):
    # Backward multiplies by the forward pass's derivative output, no recomputation.
    y = random_labels(rng, (50,), "float32")
    d = random_distances(rng, (50,), "float32")
    _, dloss = _ops.loss_and_grad(*prepare_inputs(y, d), 1.0)
    with tf.GradientTape() as tape:
        tape.watch(d)
        total = tf.reduce_sum(contrastive_loss(y, d))
    np.testing.assert_array_equal(tape.gradient(total, d), dloss)


@pytest.mark.parametrize("dtype, max_error", [("float32", 1e-4), ("float64", 1e-10)])
def test_numeric_gradient_away_from_hinge(rng, dtype, max_error):
    margin = 1.0
    d = rng.uniform(0.0, 2.0, size=12)
    d = np.where(np.abs(d - margin) < 0.05, d + 0.1, d)  # keep off the kink
    y = random_labels(rng, (12,), dtype)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: contrastive_loss(y, x, margin), [tf.constant(d, dtype)])
    assert np.max(np.abs(theoretical[0] - numerical[0])) < max_error


def test_second_derivative(rng):
    y = random_labels(rng, (9,), "float64")
    d = tf.constant(rng.uniform(0.0, 2.0, size=9))
    with tf.GradientTape() as outer:
        outer.watch(d)
        with tf.GradientTape() as inner:
            inner.watch(d)
            total = tf.reduce_sum(contrastive_loss(y, d, 1.0))
        grad = inner.gradient(total, d)
    hessian = outer.jacobian(grad, d)
    expected = 2 * y + 2 * (1 - y) * tf.cast(d < 1.0, tf.float64)
    np.testing.assert_allclose(hessian, np.diag(expected), rtol=1e-12)


def test_labels_and_margin_get_no_gradient(rng):
    y = tf.Variable(random_labels(rng, (5,), "float32"))
    margin = tf.Variable(1.0, dtype=tf.float64)
    d = random_distances(rng, (5,), "float32")
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(contrastive_loss(y, d, margin))
    assert tape.gradient(total, [y, margin]) == [None, None]


def test_tensor_margin_matches_number_margin(rng):
    y = random_labels(rng, (20,), "int32")
    d = random_distances(rng, (20,), "float64")
    variable = tf.Variable(0.3, dtype=tf.float64)
    np.testing.assert_array_equal(contrastive_loss(y, d, variable), contrastive_loss(y, d, 0.3))


def test_float64_margin_is_not_rounded_to_float32():
    # 0.1 is not a float32 value; the float64 loss must use float64(0.1).
    loss = contrastive_loss(tf.constant([0.0], tf.float64), tf.constant([0.0], tf.float64), 0.1)
    assert loss.numpy()[0] == 0.1 * 0.1


def test_nan_and_inf_distances_propagate():
    d = tf.constant([np.nan, np.inf, np.nan, 0.5])
    y = tf.constant([1.0, 1.0, 0.0, 0.0])
    fused = contrastive_loss(y, d)
    np.testing.assert_array_equal(_bits(fused), _bits(contrastive_loss_reference(y, d)))
    assert np.isnan(fused.numpy()[0]) and np.isinf(fused.numpy()[1]) and np.isnan(fused.numpy()[2])


def test_model_output_column_pairs_with_flat_labels(rng):
    # [B] labels with [B, 1] distances: B losses (TF Addons gave B x B, its issue 1757).
    y = random_labels(rng, (8,), "int32")
    d = random_distances(rng, (8, 1), "float32")
    loss = contrastive_loss(y, d)
    assert loss.shape == (8,)
    np.testing.assert_array_equal(loss, contrastive_loss(y, tf.squeeze(d, -1)))
    assert contrastive_loss(tf.expand_dims(y, -1), tf.squeeze(d, -1)).shape == (8,)


def test_large_input_uses_thread_pool_and_stays_exact(rng):
    y = random_labels(rng, (1_000_003,), "float32")
    d = random_distances(rng, (1_000_003,), "float32")
    np.testing.assert_array_equal(contrastive_loss(y, d), contrastive_loss_reference(y, d))


# --- bad input ----------------------------------------------------------------

def test_mismatched_shapes_name_both_shapes(run):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\(3,\).*\(4,\)"):
        run(lambda: contrastive_loss(tf.zeros([3]), tf.zeros([4])))


def test_mismatched_shapes_known_only_at_run_time():
    f = tf.function(lambda y, d: contrastive_loss(y, d),
                    input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels \[3\] and distances \[4\]"):
        f(tf.zeros([3]), tf.zeros([4]))


def test_no_broadcasting_between_labels_and_distances():
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        contrastive_loss(tf.zeros([4, 1]), tf.zeros([1, 4]))


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64", "uint8"])
def test_unsupported_distance_dtypes(dtype):
    with pytest.raises(TypeError, match=f"y_pred.*float16.*{dtype}"):
        contrastive_loss(tf.zeros([2]), tf.zeros([2], dtype))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "complex64", "string"])
def test_unsupported_label_dtypes(dtype):
    with pytest.raises(TypeError, match=f"y_true.*{dtype}"):
        contrastive_loss(tf.zeros([2], dtype), tf.zeros([2]))


@pytest.mark.parametrize("margin", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_margins(margin):
    with pytest.raises(ValueError, match="margin must be finite and non-negative"):
        contrastive_loss([1.0], [0.5], margin)


@pytest.mark.parametrize("margin", ["1.0", None, True, [1.0]])
def test_margin_must_be_a_number(margin):
    with pytest.raises(TypeError, match="margin"):
        contrastive_loss([1.0], [0.5], margin)


def test_bad_tensor_margin_fails_in_the_op():
    with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
        contrastive_loss([1.0], [0.5], tf.Variable(-1.0))

"""fused_contrastive.jax's losses of pairs (issue 22): contrastive_loss on
distances and contrastive_loss_from_embeddings, the CPU kernels through their
typed-FFI handlers, against the TensorFlow functions (the same kernels: the
same bits), under jax.jit, jax.grad and jax.vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import fused_contrastive as fc
import fused_contrastive.jax as fcj


def _bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _tf_loss_and_grads(fn, labels, inputs, upstream, **options):
    """fn's loss, and the gradients of sum(loss * upstream) in `inputs`."""
    xs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        loss = fn(labels, *xs, **options)
        total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
    return loss.numpy(), [g.numpy() for g in tape.gradient(total, xs)]


def _jax_loss_and_grads(fn, labels, inputs, upstream, **options):
    def total(*xs):
        loss = fn(labels, *xs, **options)
        return jnp.sum(loss * upstream.astype(loss.dtype)), loss

    argnums = tuple(range(len(inputs)))
    (_, loss), grads = jax.jit(jax.value_and_grad(total, argnums, has_aux=True))(*inputs)
    return loss, grads


def _assert_same_bits(got, want):
    assert np.asarray(got).shape == np.asarray(want).shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize(
    "labels_dtype, dtype, options",
    [
        (np.int32, np.float32, dict()),
        (np.float32, np.float32, dict(margin=0.3, similar_label=0)),
        (np.bool_, np.float16, dict(margin=1.7)),
        (np.int64, jnp.bfloat16, dict(margin=2.0)),
    ],
)
def test_the_loss_on_distances_gives_the_tensorflow_functions_bits(
    rng, labels_dtype, dtype, options
):
    labels = (rng.random(50) < 0.5).astype(labels_dtype)
    if labels_dtype == np.float32:
        labels = rng.random(50).astype(np.float32)  # soft labels
    d = np.asarray(rng.random(50) * 2.5, dtype)
    upstream = rng.normal(size=50).astype(np.float32)
    want_loss, (want_grad,) = _tf_loss_and_grads(
        fc.contrastive_loss, labels, [d], upstream, **options
    )
    loss, (grad,) = _jax_loss_and_grads(fcj.contrastive_loss, labels, [d], upstream, **options)
    _assert_same_bits(loss, want_loss)
    _assert_same_bits(grad, want_grad)
    _assert_same_bits(fcj.contrastive_loss(labels, d, **options), want_loss)


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize(
    "rows, dtype",
    [((37,), np.float32), ((6, 3), np.float32), ((0,), np.float32), ((9,), np.float16)],
)
def test_the_loss_from_embeddings_gives_the_tensorflow_functions_bits(rng, distance, rows, dtype):
    labels = rng.integers(0, 2, rows)
    a, b = rng.normal(size=(2, *rows, 5)).astype(dtype)
    b[..., :1, :] = a[..., :1, :]  # a == b: the Euclidean gradient's special case
    upstream = rng.normal(size=rows).astype(np.float32)
    options = dict(margin=1.5, distance=distance)
    want_loss, want_grads = _tf_loss_and_grads(
        fc.contrastive_loss_from_embeddings, labels, [a, b], upstream, **options
    )
    loss, grads = _jax_loss_and_grads(
        fcj.contrastive_loss_from_embeddings, labels, [a, b], upstream, **options
    )
    _assert_same_bits(loss, want_loss)
    for got, want in zip(grads, want_grads):
        _assert_same_bits(got, want)


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize(
    "rows, dtype",
    [((37,), np.float32), ((6, 3), np.float32), ((0,), np.float32), ((9,), jnp.bfloat16)],
)
def test_the_loss_from_stacked_pairs_gives_the_tensorflow_functions_bits(
    rng, distance, rows, dtype
):
    # The stacked handlers read the pairs and write their gradient in place:
    # the bits of the loss from the two halves, and of their two gradients.
    labels = rng.integers(0, 2, rows)
    pairs = tf.cast(rng.normal(size=(*rows, 2, 5)), dtype).numpy()
    pairs[..., :1, 1, :] = pairs[..., :1, 0, :]
    upstream = rng.normal(size=rows).astype(np.float32)
    options = dict(margin=1.5, distance=distance)
    want_loss, (want_a, want_b) = _tf_loss_and_grads(
        fc.contrastive_loss_from_embeddings,
        labels,
        [pairs[..., 0, :], pairs[..., 1, :]],
        upstream,
        **options,
    )
    loss, (grad,) = _jax_loss_and_grads(
        fcj.contrastive_loss_from_pairs, labels, [pairs], upstream, **options
    )
    _assert_same_bits(loss, want_loss)
    _assert_same_bits(grad, np.stack([want_a, want_b], axis=-2))


def test_the_loss_from_stacked_pairs_under_vmap(rng):
    labels = rng.integers(0, 2, (3, 10))
    pairs = rng.normal(size=(3, 10, 2, 4)).astype(np.float32)
    step = jax.value_and_grad(lambda y, p: fcj.contrastive_loss_from_pairs(y, p).sum(), 1)
    losses, grads = jax.vmap(step)(labels, pairs)
    for i in range(3):
        loss, grad = step(labels[i], pairs[i])
        _assert_same_bits(losses[i], loss)
        _assert_same_bits(grads[i], grad)


def test_a_trailing_unit_axis_is_aligned_as_in_tensorflow(rng):
    labels = rng.integers(0, 2, 8)
    d = rng.random((8, 1)).astype(np.float32)
    want = fc.contrastive_loss(labels, d).numpy()
    _assert_same_bits(fcj.contrastive_loss(labels, d), want)
    _assert_same_bits(fcj.contrastive_loss(labels[:, None], d[:, 0]), want)
    a, b = rng.normal(size=(2, 8, 1, 3)).astype(np.float32)
    want = fc.contrastive_loss_from_embeddings(labels, a, b).numpy()
    _assert_same_bits(fcj.contrastive_loss_from_embeddings(labels, a, b), want)
    _assert_same_bits(
        fcj.contrastive_loss_from_embeddings(labels[:, None], a[:, 0], b[:, 0]), want[:, 0]
    )


def test_vmap_over_a_leading_axis_gives_each_slices_loss_and_gradient(rng):
    labels = rng.integers(0, 2, (4, 10))
    d = rng.random((4, 10)).astype(np.float32)
    a, b = rng.normal(size=(2, 4, 10, 3)).astype(np.float32)
    on_distances = jax.vmap(jax.value_and_grad(lambda y, x: fcj.contrastive_loss(y, x).sum(), 1))
    on_embeddings = jax.vmap(
        jax.value_and_grad(
            lambda y, x, z: fcj.contrastive_loss_from_embeddings(y, x, z).sum(), (1, 2)
        )
    )
    losses, grads = on_distances(labels, d)
    pair_losses, (grads_a, grads_b) = on_embeddings(labels, a, b)
    for i in range(4):
        loss, (grad,) = _jax_loss_and_grads(
            fcj.contrastive_loss, labels[i], [d[i]], np.ones(10, np.float32)
        )
        np.testing.assert_allclose(losses[i], np.sum(loss), rtol=1e-6)
        _assert_same_bits(grads[i], grad)
        loss, (grad_a, grad_b) = _jax_loss_and_grads(
            fcj.contrastive_loss_from_embeddings, labels[i], [a[i], b[i]], np.ones(10, np.float32)
        )
        np.testing.assert_allclose(pair_losses[i], np.sum(loss), rtol=1e-6)
        _assert_same_bits(grads_a[i], grad_a)
        _assert_same_bits(grads_b[i], grad_b)


def test_float64_with_jax_enable_x64(rng):
    labels = rng.integers(0, 2, 9)
    d = rng.random(9)
    a, b = rng.normal(size=(2, 9, 4))
    with jax.enable_x64(True):
        loss = fcj.contrastive_loss(labels, d, margin=0.7)
        pair_loss = fcj.contrastive_loss_from_embeddings(labels, a, b, distance="cosine")
        assert loss.dtype == pair_loss.dtype == jnp.float64
    _assert_same_bits(loss, fc.contrastive_loss(labels, d, margin=0.7).numpy())
    want = fc.contrastive_loss_from_embeddings(labels, a, b, distance="cosine").numpy()
    _assert_same_bits(pair_loss, want)


def test_bad_inputs_raise_the_tensorflow_functions_errors():
    d, e = np.zeros(3, np.float32), np.zeros((3, 2), np.float32)
    cases = [
        (lambda f: f.contrastive_loss([0, 1, 0], d, margin=-1.0), ValueError, "margin must be"),
        (lambda f: f.contrastive_loss([0, 1, 0], d, similar_label=2), ValueError, "similar_label"),
        (lambda f: f.contrastive_loss([0, 1, 0], d.astype(np.int32)), TypeError, "y_pred"),
        (lambda f: f.contrastive_loss(np.zeros(3, np.uint8), d), TypeError, "y_true"),
        (
            lambda f: f.contrastive_loss_from_embeddings([0, 1, 0], e, e, distance="l2"),
            ValueError,
            "distance must be one of",
        ),
        (
            lambda f: f.contrastive_loss_from_embeddings([0, 1, 0], e, e.astype(np.float16)),
            TypeError,
            "same dtype",
        ),
    ]
    for call, error, match in cases:
        for module in (fc, fcj):
            with pytest.raises(error, match=match):
                call(module)
    shape_cases = [
        (lambda f: f.contrastive_loss([0, 1], d), "labels and distances must have the same shape"),
        (lambda f: f.contrastive_loss_from_embeddings([0, 1, 0], e, e[:, :1]), "same shape"),
        (lambda f: f.contrastive_loss_from_embeddings([0, 1], e, e), "without their last axis"),
        (lambda f: f.contrastive_loss_from_embeddings([], e[:0, :0], e[:0, :0]), "D >= 1"),
    ]
    for pairs in (e, np.zeros((3, 2, 0), np.float32)):
        with pytest.raises(ValueError, match=r"stacked on axis -2, shape \[\.\.\., 2, D\]"):
            fcj.contrastive_loss_from_pairs([0, 1, 0], pairs)
    for call, match in shape_cases:
        with pytest.raises(ValueError, match=match):
            call(fcj)
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            call(fc)


@pytest.mark.parametrize("which", ["distances", "embeddings"])
def test_second_derivatives_raise_a_clear_error(rng, which):
    labels = rng.integers(0, 2, 5)
    x = rng.random((5, 3)).astype(np.float32)

    def loss(y):
        if which == "distances":
            return fcj.contrastive_loss(labels, y[:, 0]).sum()
        return fcj.contrastive_loss_from_embeddings(labels, y, y[::-1]).sum()

    with pytest.raises(ValueError, match="cannot be differentiated"):
        jax.grad(lambda y: jnp.sum(jax.grad(loss)(y) ** 2))(x)


def _edge_pairs(rng, dtype):
    """Stacked pairs [4, 3, 2, 5] with the distances' edge rows: equal
    halves, a zero vector, and rows whose squares over- or underflow."""
    pairs = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)
    pairs[0, 0, 1] = pairs[0, 0, 0]
    pairs[1, 0, 0] = 0.0
    pairs[2, 0] *= 1e30
    pairs[2, 1] *= 1e-30
    return tf.cast(pairs, dtype).numpy()


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_pair_distance_and_accuracy_give_the_tensorflow_functions_values(rng, distance, dtype):
    pairs = _edge_pairs(rng, dtype)
    labels = rng.integers(0, 2, (4, 3))
    got = jax.jit(fcj.pair_distance, static_argnums=1)(pairs, distance)
    want = fc.pairs.pair_distance(pairs, distance).numpy()
    assert got.dtype == want.dtype and got.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(got, np.float64), want.astype(np.float64), rtol=1e-6)
    for threshold, similar_label in [(0.4, 1), (1.0, 0)]:
        options = dict(threshold=threshold, distance=distance, similar_label=similar_label)
        accuracy = fcj.pair_accuracy(labels, pairs, **options)
        assert accuracy.dtype == jnp.float32
        want = fc.pairs.pair_accuracy(labels, pairs, **options).numpy()
        np.testing.assert_array_equal(accuracy, want)
        assert 0 < want.mean() < 1  # both outcomes occur


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
def test_pair_distance_gradient_is_the_tensorflow_functions(rng, distance):
    pairs = _edge_pairs(rng, np.float64)
    pairs[2, 0] = rng.normal(size=(2, 5))  # float64 needs no rescaling
    upstream = rng.random((4, 3))
    with jax.enable_x64(True):
        got = jax.grad(lambda p: jnp.sum(fcj.pair_distance(p, distance) * upstream))(pairs)
    x = tf.constant(pairs)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(fc.pairs.pair_distance(x, distance) * upstream)
    want = tape.gradient(total, x).numpy()
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_pair_distance_and_accuracy_reject_what_tensorflow_rejects():
    pairs = np.zeros((3, 2, 4), np.float32)
    for call, error, match in [
        (lambda: fcj.pair_distance(pairs[:, :1]), ValueError, r"\[\.\.\., 2, D\]"),
        (lambda: fcj.pair_distance(pairs.astype(np.int32)), TypeError, "y_pred must have dtype"),
        (lambda: fcj.pair_distance(pairs, "l2"), ValueError, "distance must be one of"),
        (lambda: fcj.pair_accuracy([0, 1], pairs), ValueError, "without their last axis"),
        (lambda: fcj.pair_accuracy([0, 1, 1], pairs, threshold=-1.0), ValueError, "threshold"),
        (lambda: fcj.pair_accuracy([0, 1, 1], pairs, similar_label=2), ValueError, "similar_label"),
    ]:
        with pytest.raises(error, match=match):
            call()

"""Issue 18 for the pair-embedding family: the Keras pair class reads the
stacked pair [..., 2, D] in place (no unstack, no Pack of the gradients),
long rows are summed in chunks, and a label weight of exactly 0 contributes
exactly 0 (no 0 * inf)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import DISTANCES, HLO_ON_CPU, embeddings, random_labels, run_tests_under_hlo

import fused_contrastive as fc
from fused_contrastive import _kernels, _library, _pairs_ops

REDUCTIONS = ["sum", "mean", "weighted_mean"]


def pair_op(y, pairs, w, reduction, distance, margin=0.8, similar_label=1):
    return _library.op_library.fused_contrastive_embedding_pair_contrastive_loss_reduced(
        y,
        pairs,
        w,
        _library.scalar(margin),
        _library.scalar(1.0),
        distance=distance,
        reduction=reduction,
        similar_label=similar_label,
    )


def two_tensor_op(y, a, b, w, reduction, distance, margin=0.8, similar_label=1):
    return _library.op_library.fused_contrastive_embedding_contrastive_loss_reduced(
        y,
        a,
        b,
        w,
        _library.scalar(margin),
        _library.scalar(1.0),
        distance=distance,
        reduction=reduction,
        similar_label=similar_label,
    )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("jit", [False, True])
def test_pair_op_has_the_bits_of_the_two_tensor_op(rng, distance, dtype, reduction, jit):
    # Rows of odd length (no vector access on GPU) and of several leading axes.
    a, b = embeddings(rng, (3, 7, 5), dtype)
    pairs = tf.stack([a, b], axis=-2)
    y = random_labels(rng, (3, 7), "float32")
    w = tf.cast(rng.random((3, 7)), dtype)

    @tf.function(jit_compile=jit)
    def both(y, a, b, pairs, w):
        return (
            two_tensor_op(y, a, b, w, reduction, distance),
            pair_op(y, pairs, w, reduction, distance),
        )

    (loss, grad_a, grad_b, scale), (pair_loss, pair_grad, pair_scale) = both(y, a, b, pairs, w)
    assert pair_grad.shape == pairs.shape and pair_grad.dtype == pairs.dtype
    np.testing.assert_array_equal(pair_loss.numpy(), loss.numpy())
    np.testing.assert_array_equal(pair_scale.numpy(), scale.numpy())
    want = tf.stack([grad_a, grad_b], -2).numpy()
    if jit and HLO_ON_CPU and distance == "cosine":
        # Two HLO programs: XLA fuses them differently, and on some CPUs its
        # code then contracts the cosine gradient's products into FMAs
        # differently, so gradients that cancel to ~0 differ by rounding
        # (measured: 2e-17 in float64 on an AVX-512 AMD EPYC); the losses
        # keep their bits.
        eps = np.finfo(np.float64 if dtype == "float64" else np.float32).eps
        atol = 4 * eps * max(1.0, float(np.abs(want.astype(np.float64)).max()))
        np.testing.assert_allclose(pair_grad.numpy(), want, rtol=0, atol=atol)
        return
    np.testing.assert_array_equal(pair_grad.numpy(), want)


@pytest.mark.parametrize(
    "shape, labels",
    [((4, 3, 2), (4, 3)), ((4, 2, 2, 0), (4, 2)), ((4, 2), (4,)), ((4, 2, 3), (5,))],
)
def test_pair_op_rejects_what_is_not_a_stacked_pair(shape, labels):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"\[\.\.\., 2, D\]"):
        pair_op(tf.zeros(labels), tf.zeros(shape), tf.constant(1.0), "mean", "euclidean")


def fwd_bwd_graph(loss_object, y, pairs):
    @tf.function
    def step(y, pairs):
        with tf.GradientTape() as tape:
            tape.watch(pairs)
            loss = loss_object(y, pairs)
        return loss, tape.gradient(loss, pairs)

    return step.get_concrete_function(y, pairs).graph


@pytest.mark.parametrize("distance", DISTANCES)
def test_keras_pair_class_reads_the_stacked_pair_in_place(rng, distance):
    a, b = embeddings(rng, (16, 8), "float32")
    pairs = tf.stack([a, b], axis=1)
    y = random_labels(rng, (16,), "float32")
    graph = fwd_bwd_graph(fc.ContrastiveLoss(distance=distance), y, pairs)
    types = {op.type for op in graph.get_operations()}
    assert _library.EMBEDDING_PAIR_REDUCED_OP_NAME in types
    # Copies of the pair before the op or of its gradients after it.
    assert not types & {"Unpack", "Pack", "StridedSlice", "ConcatV2", "AddN"}, types


# How a model makes the stacked pair [..., 2, D] from its two embeddings.
PAIR_PRODUCERS = {
    "tf.stack": lambda a, b: tf.stack([a, b], axis=1),
    "keras.ops.stack -2": lambda a, b: keras.ops.stack([a, b], axis=-2),
    "Concatenate, Reshape": lambda a, b: keras.layers.Reshape((2, a.shape[-1]))(
        keras.layers.Concatenate()([a, b])
    ),
    "concat, reshape, identity": lambda a, b: tf.identity(
        tf.reshape(tf.concat([a, b], -1), [-1, 2, a.shape[-1]])
    ),
}
# Producers whose output has the shape [..., 2, D] without being the pairs
# (a, b) row by row, or whose rows the graph cannot match statically.
NOT_PAIR_PRODUCERS = {
    "stack on axis 0": lambda a, b: tf.stack([a[:2], b[:2]], axis=0),
    "concat on axis 0, reshape": lambda a, b: tf.reshape(
        tf.concat([a, b], 0), [-1, 2, a.shape[-1]]
    ),
    "rows regrouped": lambda a, b: tf.reshape(
        tf.concat([tf.reshape(a, [4, 3, -1]), tf.reshape(b, [4, 3, -1])], -1),
        [3, 4, 2, a.shape[-1]],
    ),
}


def class_loss_and_gradients(loss_object, producer, y, a, b, tape=True):
    """The class's loss on the pair `producer` makes of a, b inside the call, as
    a model makes it, and with a tape the gradients of a and b."""

    def loss():
        pairs = producer(a, b)
        return loss_object(tf.reshape(y, tf.shape(pairs)[:-2]), pairs) * 3.0

    if not tape:
        return (loss(),)
    with tf.GradientTape() as g:
        g.watch([a, b])
        value = loss()
    return (value, *g.gradient(value, [a, b]))


def class_step(loss_object, producer, tape=True, jit=False):
    return tf.function(
        lambda y, a, b: class_loss_and_gradients(loss_object, producer, y, a, b, tape),
        jit_compile=jit,
    )


@pytest.mark.parametrize("producer", list(PAIR_PRODUCERS))
@pytest.mark.parametrize("distance", DISTANCES)
def test_keras_pair_class_reads_the_halves_of_a_stack_in_the_graph(rng, producer, distance):
    # The class reads a and b where the graph shows them: the stack then has
    # no consumer (Grappler prunes it) and its gradient (an Unpack, or a
    # ConcatV2's slices) never runs. Eager, the pair op reads the pair in
    # place, with the same bits.
    a, b = embeddings(rng, (12, 8), "float32")
    y = random_labels(rng, (12,), "float32")
    loss = fc.ContrastiveLoss(margin=0.8, distance=distance)
    step = class_step(loss, PAIR_PRODUCERS[producer])
    types = {op.type for op in step.get_concrete_function(y, a, b).graph.get_operations()}
    assert _library.EMBEDDING_REDUCED_OP_NAME in types, types
    assert not types & {_library.EMBEDDING_PAIR_REDUCED_OP_NAME, "Unpack", "ConcatOffset"}, types
    got = step(y, a, b)
    want = class_loss_and_gradients(loss, PAIR_PRODUCERS[producer], y, a, b)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for jit in (True, False):  # XLA, and evaluate's path (per-pair op, Keras' mean)
        got = class_step(loss, PAIR_PRODUCERS[producer], tape=not jit, jit=jit)(y, a, b)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7 * np.max(np.abs(w)))


def test_keras_pair_class_reads_the_halves_of_sequence_pairs_of_unknown_batch(rng):
    # [B, T, D] halves, B unknown: the row axes agree but for B, so the reshape
    # keeps the rows.
    a, b = embeddings(rng, (4, 3, 8), "float32")
    y = random_labels(rng, (4, 3), "float32")
    loss = fc.ContrastiveLoss(margin=0.8, distance="euclidean")

    def make(a, b):
        return keras.layers.Reshape((3, 2, 8))(keras.layers.Concatenate()([a, b]))

    halves = tf.TensorSpec([None, 3, 8], tf.float32)
    step = tf.function(
        lambda y, a, b: class_loss_and_gradients(loss, make, y, a, b),
        input_signature=[tf.TensorSpec([None, 3], tf.float32), halves, halves],
    )
    types = {op.type for op in step.get_concrete_function().graph.get_operations()}
    assert _library.EMBEDDING_REDUCED_OP_NAME in types and "ConcatOffset" not in types, types
    for g, w in zip(step(y, a, b), class_loss_and_gradients(loss, make, y, a, b)):
        np.testing.assert_array_equal(g, w)


def test_keras_pair_class_evaluates_a_stack_with_the_per_pair_op(rng):
    # Without a tape the reduced op would write the pair's gradient for nothing.
    a, b = embeddings(rng, (12, 8), "float32")
    y = random_labels(rng, (12,), "float32")
    step = class_step(fc.ContrastiveLoss(distance="cosine"), PAIR_PRODUCERS["tf.stack"], tape=False)
    types = {op.type for op in step.get_concrete_function(y, a, b).graph.get_operations()}
    assert _library.EMBEDDING_OP_NAME in types
    assert not types & {_library.EMBEDDING_REDUCED_OP_NAME, _library.EMBEDDING_PAIR_REDUCED_OP_NAME}


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_fit_and_evaluate_read_the_towers_outputs(rng, monkeypatch, jit_compile):
    # A model ending in Concatenate and Reshape((2, D)), as README builds it:
    # fit runs the two-tensor reduced op on the towers' outputs, evaluate the
    # per-pair op, neither the pair op on the stacked pair.
    from test_embeddings import siamese_model

    calls = []
    for name in ("reduced_embedding_loss", "embedding_loss"):
        original = getattr(_pairs_ops, name)
        monkeypatch.setattr(
            _pairs_ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    monkeypatch.setattr(
        _library.op_library, "fused_contrastive_embedding_pair_contrastive_loss_reduced", None
    )  # any call would raise
    x1, x2 = (rng.normal(size=(32, 6)).astype("float32") for _ in range(2))
    y = (x1[:, 0] > 0).astype("float32")
    model = siamese_model()
    model.compile(
        optimizer="sgd", loss=fc.ContrastiveLoss(distance="cosine"), jit_compile=jit_compile
    )
    model.fit([x1, x2], y, batch_size=16, epochs=1, verbose=0)
    assert calls and set(calls) == {"reduced_embedding_loss"}, calls
    calls.clear()
    model.evaluate([x1, x2], y, batch_size=16, verbose=0)
    assert calls and set(calls) == {"embedding_loss"}, calls


@pytest.mark.parametrize("producer", list(NOT_PAIR_PRODUCERS))
def test_keras_pair_class_reads_other_producers_as_pairs(rng, producer):
    a, b = embeddings(rng, (12, 8), "float32")
    y = random_labels(rng, (12,), "float32")
    loss = fc.ContrastiveLoss(margin=0.8, distance="euclidean")
    step = class_step(loss, NOT_PAIR_PRODUCERS[producer])
    y_rows = y[:2] if producer == "stack on axis 0" else y
    types = {op.type for op in step.get_concrete_function(y_rows, a, b).graph.get_operations()}
    assert _library.EMBEDDING_PAIR_REDUCED_OP_NAME in types, types
    got = step(y_rows, a, b)
    want = class_loss_and_gradients(loss, NOT_PAIR_PRODUCERS[producer], y_rows, a, b)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("jit", [False, True])
def test_keras_pair_class_gradient_matches_the_reference(rng, distance, jit):
    a, b = embeddings(rng, (40, 9), "float32")
    pairs = tf.stack([a, b], axis=1)
    y = random_labels(rng, (40, 1), "float32")
    w = tf.constant(rng.random(40), "float32")
    results = []
    for impl in (fc.ContrastiveLoss(margin=0.7, distance=distance), None):

        @tf.function(jit_compile=jit)
        def step(pairs, impl=impl):
            with tf.GradientTape() as tape:
                tape.watch(pairs)
                if impl is None:
                    per_pair = fc.contrastive_loss_from_embeddings_reference(
                        y, pairs[:, 0], pairs[:, 1], margin=0.7, distance=distance
                    )
                    loss = tf.reduce_sum(per_pair * w) / 40.0
                else:
                    loss = impl(y, pairs, sample_weight=w)
            return loss, tape.gradient(loss, pairs)

        results.append(step(pairs))
    (loss, grad), (want_loss, want_grad) = results
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=3e-6, atol=3e-6 * np.max(np.abs(want_grad)))


def float64_loss(y, a, b, margin, distance):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if distance == "euclidean":
        d = np.sqrt(np.sum((a - b) ** 2, axis=-1))
    else:
        d = 1.0 - np.sum(a * b, -1) / np.sqrt(np.sum(a * a, -1) * np.sum(b * b, -1))
    return y * d**2 + (1.0 - y) * np.maximum(margin - d, 0.0) ** 2


@pytest.mark.parametrize(
    "distance, dim", [("euclidean", 10**6), ("cosine", 10**6), ("cosine", 10**5)]
)
def test_long_rows_are_summed_to_float32_accuracy(distance, dim):
    # Positive elements, so that the row sums have no cancellation: the error
    # is the summation's own (5.5e-5 and 5.2e-4 with one float sum per row).
    rng = np.random.default_rng(7)
    a = rng.uniform(0.5, 1.0, size=(2, dim)).astype(np.float32)
    b = rng.uniform(0.0, 0.5, size=(2, dim)).astype(np.float32)
    y = np.array([1.0, 1.0], np.float32)
    want = float64_loss(y, a, b, 1.0, distance)
    ops = fc.contrastive_loss_from_embeddings(y, a, b, distance=distance).numpy()
    kernel = _kernels.embedding_loss_cpu(y, a, b, distance=distance)[0]
    reduced = _kernels.embedding_loss_reduced_cpu(y, a, b, distance=distance, reduction="sum")[0]
    # Cosine's d = 1 - s is about s/d = 6 times as sensitive to the float32
    # rounding of its three sums as the sums themselves: 2e-6 is that bound.
    rtol = 1e-6 if distance == "euclidean" else 2e-6
    for got in (ops, kernel):
        np.testing.assert_allclose(got, want, rtol=rtol)
    np.testing.assert_allclose(reduced, want.sum(), rtol=rtol)


LOSS_PATHS = ["kernel", "reference", "xla"]


def per_sample(path, y, d, margin):
    if path == "reference":
        return fc.contrastive_loss_reference(y, d, margin=margin)
    if path == "xla":
        return tf.function(lambda y, d: fc.contrastive_loss(y, d, margin=margin), jit_compile=True)(
            tf.constant(y), tf.constant(d)
        )
    return fc.contrastive_loss(y, d, margin=margin)


@pytest.mark.parametrize("path", LOSS_PATHS)
def test_zero_label_weight_contributes_exactly_zero(path):
    # d² overflows float32 for the dissimilar pair; (margin - d)² for the
    # similar one under margin 1e30. Their weights are 0: no 0 * inf.
    y = np.array([0.0, 1.0], np.float32)
    np.testing.assert_array_equal(
        per_sample(path, y, np.array([2e19, 1.0], np.float32), 1.0), [0.0, 1.0]
    )
    np.testing.assert_array_equal(
        per_sample(path, y, np.array([3.0, 1.0], np.float32), 1e30), [np.inf, 1.0]
    )


@pytest.mark.parametrize("path", LOSS_PATHS)
def test_nan_distance_still_gives_nan_whatever_the_label(path):
    y = np.array([0.0, 1.0], np.float32)
    assert np.all(np.isnan(per_sample(path, y, np.array([np.nan, np.nan], np.float32), 1.0)))


@pytest.mark.parametrize("jit", [False, True])
def test_far_dissimilar_embeddings_give_zero_loss_and_gradient(jit):
    a = tf.constant([[1e19, 0.0], [0.0, 1.0]])
    b = tf.constant([[-1e19, 0.0], [0.0, 0.0]])
    y = tf.constant([0.0, 1.0])

    @tf.function(jit_compile=jit)
    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = fc.ContrastiveLoss(distance="euclidean", reduction="sum")(
                y, tf.stack([a, b], axis=1)
            )
        return loss, tape.gradient(loss, a)

    loss, grad = step(a, b)
    assert float(loss) == 1.0
    np.testing.assert_array_equal(grad, [[0.0, 0.0], [0.0, 2.0]])


def cosine_loss_and_grads(path, y, a, b):
    """Per-pair loss (summed) and gradients of the cosine loss on one path."""

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            if path == "class":
                loss = fc.ContrastiveLoss(distance="cosine", reduction="sum", dtype=a.dtype)(
                    y, tf.stack([a, b], axis=1)
                )
            elif path == "reference":
                loss = tf.reduce_sum(
                    fc.contrastive_loss_from_embeddings_reference(y, a, b, distance="cosine")
                )
            else:
                loss = tf.reduce_sum(
                    fc.contrastive_loss_from_embeddings(y, a, b, distance="cosine")
                )
        return (loss, *tape.gradient(loss, [a, b]))

    if path == "xla":
        step = tf.function(step, jit_compile=True)
    return [t.numpy() for t in step(tf.constant(a), tf.constant(b))]


SCALES = {"float32": (1e19, 1e-20), "float64": (1e160, 1e-170)}


@pytest.mark.parametrize("path", ["op", "class", "xla", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cosine_is_scale_invariant_at_extreme_scales(rng, path, dtype):
    # Σa² overflows (1e19 in float32) or its squares underflow (1e-20): the
    # loss must still be the loss of the unscaled rows, and the gradient
    # scale with 1/scale. Row 2: identical rows, a similar pair: loss 0.
    a = rng.normal(size=(3, 6)).astype(dtype)
    b = rng.normal(size=(3, 6)).astype(dtype)
    b[2] = a[2]
    y = np.array([1.0, 0.0, 1.0], dtype)
    loss, grad_a, grad_b = cosine_loss_and_grads(path, y, a, b)
    for scale in SCALES[dtype]:
        got = cosine_loss_and_grads(path, y, a * scale, b * scale)
        assert np.all(np.isfinite(got[0])), (scale, got[0])
        np.testing.assert_allclose(
            got[0], loss, rtol=1e-5 if dtype == "float32" else 1e-12, err_msg=f"scale {scale}"
        )
        tolerance = 1e-5 if dtype == "float32" else 1e-12
        for g, want in zip(got[1:], (grad_a, grad_b)):
            np.testing.assert_allclose(
                g * scale,
                want,
                rtol=tolerance,
                atol=tolerance * np.max(np.abs(want)),
                err_msg=f"scale {scale}",
            )


def test_cosine_rows_in_range_are_not_rescaled(rng):
    # In range the scales are 1 (the kernels compute what they computed
    # before); out of it, powers of two.
    a = rng.normal(size=(5, 8)).astype(np.float32)
    b = rng.normal(size=(5, 8)).astype(np.float32)
    loss, coefficients = _kernels.embedding_loss_cpu(
        np.ones(5, np.float32), a, b, distance="cosine"
    )
    np.testing.assert_array_equal(coefficients[:, 3:], 1.0)
    tiny = _kernels.embedding_loss_cpu(
        np.ones(5, np.float32), a * 1e-20, b * 1e-20, distance="cosine"
    )
    scales = tiny[1][:, 3:]
    assert np.all(scales > 1e18) and np.all(np.log2(scales) == np.round(np.log2(scales)))
    np.testing.assert_allclose(tiny[0], loss, rtol=1e-6)


def test_the_hlo_lowering_of_the_pair_op_matches_too(tmp_path):
    # XLA's GPU backend lowers the pair op to HLO (slices of the pair, one
    # concatenation of the gradients), checked here against the two-tensor op's.
    run_tests_under_hlo(__file__, tmp_path, "pair_op_has_the_bits and True")


def test_the_hlo_lowering_keeps_cosine_scale_invariant(tmp_path):
    # The HLO sums cosine rows at the kernels' scales: unscaled, Σa² overflowed
    # to a NaN loss at 1e19 in float32.
    run_tests_under_hlo(__file__, tmp_path, "cosine_is_scale_invariant_at_extreme_scales and xla")

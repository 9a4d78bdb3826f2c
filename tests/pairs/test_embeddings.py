"""The loss from pair embeddings: contrastive_loss_from_embeddings, its
reference, and ContrastiveLoss(distance=...), against float64 NumPy."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import DISTANCES, LABEL_DTYPES, embeddings, random_labels, run_python

import fused_contrastive as fc
from fused_contrastive import _inputs, _library, _pairs_ops

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Relative tolerance against float64, per embedding dtype: 16-bit results are
# computed in float32 and rounded once to the 16-bit type.
RTOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-13}


def numpy_loss_and_gradients(y, a, b, margin=1.0, distance="euclidean", similar_label=1):
    """Loss and d(sum of loss * upstream 1)/da, /db in float64, with the documented
    conventions at zero distance and zero norm."""
    y = np.asarray(y, np.float64)
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if similar_label == 0:
        y = 1.0 - y
    diff = a - b
    if distance == "euclidean":
        d = np.sqrt(np.sum(diff**2, axis=-1))
    elif distance == "cosine":
        norms = np.sqrt(np.sum(a * a, axis=-1)) * np.sqrt(np.sum(b * b, axis=-1))
        similarity = np.divide(
            np.sum(a * b, axis=-1), norms, out=np.zeros_like(norms), where=norms > 0
        )
        d = 1.0 - similarity
    else:
        d = np.sum(np.abs(diff), axis=-1)
    hinge = np.maximum(margin - d, 0.0)
    loss = y * d**2 + (1.0 - y) * hinge**2
    g = 2.0 * y * d - 2.0 * (1.0 - y) * hinge
    if distance == "euclidean":
        coef = np.divide(g, d, out=np.zeros_like(d), where=d > 0)[..., None]
        grad_a = coef * diff
        grad_b = -grad_a
    elif distance == "cosine":
        ok = (norms > 0)[..., None]
        n = np.where(ok[..., 0], norms, 1.0)[..., None]
        aa = np.where(ok, np.sum(a * a, axis=-1, keepdims=True), 1.0)
        bb = np.where(ok, np.sum(b * b, axis=-1, keepdims=True), 1.0)
        s = similarity[..., None]
        grad_a = np.where(ok, g[..., None] * (-b / n + s * a / aa), 0.0)
        grad_b = np.where(ok, g[..., None] * (-a / n + s * b / bb), 0.0)
    else:
        grad_a = g[..., None] * np.sign(diff)
        grad_b = -grad_a
    return loss, grad_a, grad_b


def fused_loss_and_gradients(run, y, a, b, **kwargs):
    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = fc.contrastive_loss_from_embeddings(y, a, b, **kwargs)
        return (loss, *tape.gradient(loss, [a, b]))

    return run(step, a, b)


def assert_close_to(got, want, dtype, what):
    """Elementwise agreement relative to the largest magnitude of `want`, or to 1,
    the scale of these inputs' losses and gradients (a gradient that is 0 in
    exact arithmetic, such as the cosine's for D = 1, is rounding noise)."""
    got = np.asarray(tf.cast(got, tf.float64))
    scale = max(np.max(np.abs(want), initial=0.0), 1.0)
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=what)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 16), (3, 4, 5), (1, 1), (9, 130)])
def test_loss_and_both_gradients_match_float64(rng, run, distance, dtype, shape):
    a, b = embeddings(rng, shape, dtype)
    y = random_labels(rng, shape[:-1], "float32")
    margin = 0.9
    loss, grad_a, grad_b = fused_loss_and_gradients(run, y, a, b, margin=margin, distance=distance)
    want = numpy_loss_and_gradients(
        y, tf.cast(a, tf.float64), tf.cast(b, tf.float64), margin, distance
    )
    assert loss.dtype == a.dtype and loss.shape == shape[:-1]
    assert grad_a.dtype == a.dtype and grad_a.shape == shape and grad_b.shape == shape
    for got, expected, what in zip((loss, grad_a, grad_b), want, ("loss", "grad_a", "grad_b")):
        assert np.all(np.isfinite(tf.cast(got, tf.float64))), what
        assert_close_to(got, expected, dtype, what)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_every_label_dtype_and_similar_label(rng, distance, label_dtype):
    a, b = embeddings(rng, (12, 8), "float32")
    y = random_labels(rng, (12,), label_dtype)
    for similar_label in (0, 1):
        loss, grad_a, grad_b = fused_loss_and_gradients(
            lambda f, *args: f(*args), y, a, b, distance=distance, similar_label=similar_label
        )
        want = numpy_loss_and_gradients(tf.cast(y, tf.float64), a, b, 1.0, distance, similar_label)
        for got, expected in zip((loss, grad_a, grad_b), want):
            assert_close_to(got, expected, "float32", f"similar_label={similar_label}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", [0.0, 1.0, 0.3])
def test_zero_distance_is_finite_with_zero_gradient(run, dtype, label):
    # tf.norm's gradient is NaN here (TensorFlow issue 12071).
    a = tf.cast(tf.constant([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]), dtype)
    y = tf.constant([label, label], tf.float64)
    loss, grad_a, grad_b = fused_loss_and_gradients(run, y, a, a, margin=1.5)
    np.testing.assert_allclose(
        tf.cast(loss, tf.float64), [(1 - label) * 2.25] * 2, rtol=RTOL[dtype]
    )
    np.testing.assert_array_equal(tf.cast(grad_a, tf.float64), np.zeros((2, 3)))
    np.testing.assert_array_equal(tf.cast(grad_b, tf.float64), np.zeros((2, 3)))
    with tf.GradientTape() as tape:
        tape.watch(a)
        composite = tf.norm(a - tf.stop_gradient(a) * 1.0, axis=-1)
    assert np.isnan(tape.gradient(composite, a).numpy().astype(np.float64)).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_zero_vector_has_similarity_0_and_no_gradient(run, dtype):
    a = tf.cast(tf.constant([[0.0, 0.0], [3.0, 4.0]]), dtype)
    b = tf.cast(tf.constant([[1.0, 2.0], [0.0, 0.0]]), dtype)
    y = tf.constant([0.0, 1.0])
    loss, grad_a, grad_b = fused_loss_and_gradients(run, y, a, b, margin=2.0, distance="cosine")
    np.testing.assert_array_equal(tf.cast(loss, tf.float64), [1.0, 1.0])  # d = 1 for both
    assert not np.any(tf.cast(grad_a, tf.float64)) and not np.any(tf.cast(grad_b, tf.float64))


def test_manhattan_sign_of_zero_is_zero():
    a = tf.constant([[1.0, 2.0, 3.0]])
    b = tf.constant([[1.0, 0.0, 5.0]])
    _, grad_a, grad_b = fused_loss_and_gradients(
        lambda f, *x: f(*x), [1.0], a, b, distance="manhattan"
    )
    # d = 4, g = 2*d = 8: dL/da = 8*sign(a - b).
    np.testing.assert_array_equal(grad_a, [[0.0, 8.0, -8.0]])
    np.testing.assert_array_equal(grad_b, [[0.0, -8.0, 8.0]])


@pytest.mark.parametrize("distance", DISTANCES)
def test_reference_matches_the_fused_op_and_autodiff(rng, distance):
    a, b = embeddings(rng, (20, 6), "float64")
    y = random_labels(rng, (20,), "float64")

    def reference(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = fc.contrastive_loss_from_embeddings_reference(y, a, b, 0.8, distance)
        return (loss, *tape.gradient(loss, [a, b]))

    fused = fused_loss_and_gradients(lambda f, *x: f(*x), y, a, b, margin=0.8, distance=distance)
    for got, want in zip(reference(a, b), fused):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_labels_follow_the_trailing_unit_axis_rule(rng):
    a, b = embeddings(rng, (6, 4), "float32", special=False)
    y = random_labels(rng, (6,), "float32")
    want = fc.contrastive_loss_from_embeddings(y, a, b)
    np.testing.assert_array_equal(fc.contrastive_loss_from_embeddings(y[:, None], a, b), want)
    column = fc.contrastive_loss_from_embeddings(y, a[:, None, :], b[:, None, :])
    assert column.shape == (6, 1)
    np.testing.assert_array_equal(column[:, 0], want)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (([1.0], [[1.0]], [[1.0]], 1.0, "cosin"), ValueError, "'euclidean', 'cosine', 'manhattan'"),
        (([1.0], [[1.0]], [[1.0]], 1.0, None), ValueError, "distance must be one of"),
        (
            ([1.0, 0.0], [[1.0], [2.0]], [[1.0, 2.0]]),
            tf.errors.InvalidArgumentError,
            "same shape [..., D]",
        ),
        (([1.0], [[1.0, 2.0]], [[1.0, 2.0]]), None, None),
        (
            ([1.0, 0.0, 1.0], [[1.0, 2.0]], [[1.0, 2.0]]),
            tf.errors.InvalidArgumentError,
            "without their last axis",
        ),
        ((1.0, [1.0, 2.0], [1.0, 2.0]), None, None),
        (([1.0], 1.0, 2.0), tf.errors.InvalidArgumentError, "[..., D]"),
        (
            ([], np.zeros((0, 0), "f"), np.zeros((0, 0), "f")),
            tf.errors.InvalidArgumentError,
            "D >= 1",
        ),
        (([1.0], [[1.0]], np.ones((1, 1), "float64")), TypeError, "same dtype"),
        (([1.0], [[1]], [[1]]), TypeError, "embeddings_a must have dtype"),
        ((["x"], [[1.0]], [[1.0]]), TypeError, "y_true (labels) must have dtype"),
        (([1.0], [[1.0]], [[1.0]], -1.0), ValueError, "margin"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, error, message):
    if error is None:  # valid corner cases: one pair; a single pair of rank 1
        assert np.all(np.isfinite(fc.contrastive_loss_from_embeddings(*args)))
        return
    with pytest.raises(
        error,
        match=message.replace("[", r"\[")
        .replace("(", r"\(")
        .replace(")", r"\)")
        .replace(".", r"\."),
    ):
        fc.contrastive_loss_from_embeddings(*args)


def test_shape_mismatch_unknown_when_traced_fails_at_run_time():
    f = tf.function(
        fc.contrastive_loss_from_embeddings,
        input_signature=[tf.TensorSpec(None), tf.TensorSpec(None), tf.TensorSpec(None)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="embeddings_a and embeddings_b"):
        f(tf.ones([2]), tf.ones([2, 3]), tf.ones([2, 4]))
    np.testing.assert_allclose(f(tf.ones([2, 1]), tf.ones([2, 3]), tf.zeros([2, 3])), [3.0, 3.0])


def test_ragged_embeddings_are_rejected():
    ragged = tf.ragged.constant([[[1.0]], [[1.0], [2.0]]], ragged_rank=1)
    with pytest.raises(TypeError, match="ragged"):
        fc.contrastive_loss_from_embeddings([[1.0], [1.0, 0.0]], ragged, ragged)


def test_graph_has_the_fused_ops_and_no_distance_arithmetic(rng):
    a, b = embeddings(rng, (8, 4), "float32")
    y = random_labels(rng, (8,), "float32")

    @tf.function
    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_sum(fc.contrastive_loss_from_embeddings(y, a, b))
        return tape.gradient(loss, [a, b])

    ops = {op.type for op in step.get_concrete_function(a, b).graph.get_operations()}
    assert {_library.EMBEDDING_OP_NAME, _library.EMBEDDING_GRAD_OP_NAME} <= ops, ops
    assert not ops & {"Sub", "Square", "Sqrt", "Norm", "Abs", "SquaredDifference"}, ops


def test_distances_are_the_op_definitions(rng):
    from tensorflow.python.framework import op_def_registry

    for name in (
        _library.EMBEDDING_OP_NAME,
        _library.EMBEDDING_GRAD_OP_NAME,
        _library.EMBEDDING_REDUCED_OP_NAME,
    ):
        attr = {a.name: a for a in op_def_registry.get(name).attr}["distance"]
        assert tuple(v.decode() for v in attr.allowed_values.list.s) == _inputs.DISTANCES


def test_second_order_through_nested_tapes_equals_the_reference(rng):
    a, b = embeddings(rng, (5, 3), "float64")
    y = random_labels(rng, (5,), "float64")
    for distance in DISTANCES:
        hessians = []
        for loss_fn in (
            fc.contrastive_loss_from_embeddings,
            fc.contrastive_loss_from_embeddings_reference,
        ):
            with tf.GradientTape() as outer:
                outer.watch(a)
                with tf.GradientTape() as inner:
                    inner.watch([a, b])
                    total = tf.reduce_sum(loss_fn(y, a, b, 1.0, distance))
                grad = inner.gradient(total, a)
            hessians.append(outer.jacobian(grad, a))
        np.testing.assert_allclose(*hessians, rtol=1e-10, atol=1e-12, err_msg=distance)


def test_tf_gradients_twice_says_what_to_use():
    @tf.function
    def hessian(a, b):
        loss = tf.reduce_sum(fc.contrastive_loss_from_embeddings([1.0], a, b))
        return tf.hessians(loss, a)

    with pytest.raises(NotImplementedError, match="GradientTape"):
        hessian(tf.ones([1, 2]), tf.zeros([1, 2]))


# --- Keras ------------------------------------------------------------------------


class KerasEmbeddingReference(keras.losses.Loss):
    """Keras' own reduction of the pure-TF per-pair loss on stacked pairs."""

    def __init__(self, distance, margin=1.0, **kwargs):
        super().__init__(**kwargs)
        self.distance = distance
        self.margin = margin

    def call(self, y_true, y_pred):
        return fc.contrastive_loss_from_embeddings_reference(
            y_true, y_pred[..., 0, :], y_pred[..., 1, :], self.margin, self.distance
        )


def keras_loss_and_gradient(loss_object, y, pairs, sample_weight=None, tape=True):
    if not tape:
        return loss_object(y, pairs, sample_weight=sample_weight), None
    with tf.GradientTape() as g:
        g.watch(pairs)
        loss = loss_object(y, pairs, sample_weight=sample_weight)
        scaled = loss * 3.0  # an upstream gradient other than 1
    return loss, g.gradient(scaled, pairs)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"]
)
@pytest.mark.parametrize("weights", ["none", "scalar", "vector", "column"])
def test_keras_class_matches_keras_reduction(rng, run, distance, reduction, weights):
    a, b = embeddings(rng, (30, 5), "float32")
    pairs = tf.stack([a, b], axis=1)
    y = random_labels(rng, (30, 1), "float32")
    w = {
        "none": None,
        "scalar": tf.constant(1.7),
        "vector": tf.constant(rng.random(30), "float32"),
        "column": tf.constant(rng.random((30, 1)), "float32"),
    }[weights]
    fused = fc.ContrastiveLoss(margin=0.8, reduction=reduction, distance=distance)
    want = keras_loss_and_gradient(
        KerasEmbeddingReference(distance, 0.8, reduction=reduction), y, pairs, w
    )
    for tape in (True, False):  # training (one-pass reduced op) and evaluation
        got = run(lambda p: keras_loss_and_gradient(fused, y, p, w, tape), pairs)
        for g, e in zip(got, want[:2] if tape else want[:1]):
            assert g.shape == e.shape and g.dtype == e.dtype
            # Cosine gradients cancel (−b/‖a‖‖b‖ + s·a/‖a‖²): float32 rounding
            # is relative to the largest of them.
            np.testing.assert_allclose(g, e, rtol=3e-6, atol=3e-6 * np.max(np.abs(e)))


@pytest.mark.parametrize("tape", [False, True])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
def test_keras_class_with_unknown_rank_pairs_gives_the_eager_value(rng, tape, reduction):
    # Issue 18 (9): without a tape the class handed the per-pair losses of
    # unknown rank to Keras' reduction, which cannot iterate over their shape.
    a, b = embeddings(rng, (8, 3), "float32")
    pairs = tf.stack([a, b], axis=1)
    y = random_labels(rng, (8,), "float32")
    loss = fc.ContrastiveLoss(margin=0.8, reduction=reduction, distance="cosine")
    unknown = tf.TensorSpec(None, tf.float32)
    want = keras_loss_and_gradient(loss, y, pairs, tape=tape)
    got = tf.function(
        lambda y, p: keras_loss_and_gradient(loss, y, p, tape=tape), input_signature=[unknown] * 2
    )(y, pairs)
    for g, w in zip(got, want[:2] if tape else want[:1]):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_keras_class_uses_the_one_pass_pair_op(rng, monkeypatch):
    calls = []
    original = _pairs_ops.reduced_pair_loss
    monkeypatch.setattr(
        _pairs_ops,
        "reduced_pair_loss",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    a, b = embeddings(rng, (4, 3), "float32")
    loss = fc.ContrastiveLoss(distance="euclidean")
    keras_loss_and_gradient(loss, [1.0, 0.0, 1.0, 0.0], tf.stack([a, b], axis=1))
    assert calls
    calls.clear()
    # No tape (evaluate) too: the pair op reads the pair in place, where the
    # per-pair path would unstack it first (slower than the whole loss).
    loss([1.0, 0.0, 1.0, 0.0], tf.stack([a, b], axis=1))
    assert calls


@pytest.mark.parametrize("distance", [None] + DISTANCES)
def test_keras_config_round_trip(distance):
    loss = fc.ContrastiveLoss(margin=0.4, reduction="sum", distance=distance, similar_label=0)
    config = loss.get_config()
    assert config["distance"] == distance
    again = fc.ContrastiveLoss.from_config(json.loads(json.dumps(config)))
    assert (again.distance, again.margin, again.similar_label) == (distance, 0.4, 0)


@pytest.mark.parametrize("distance", ["", "Euclidean", 3, "l2"])
def test_keras_bad_distance_raises_at_construction(distance):
    with pytest.raises(ValueError, match="'euclidean', 'cosine', 'manhattan'"):
        fc.ContrastiveLoss(distance=distance)


def test_keras_y_pred_must_be_stacked_pairs():
    loss = fc.ContrastiveLoss(distance="cosine")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[\.\.\., 2, D\]"):
        loss([1.0, 0.0], tf.ones([2, 3, 4]))


def siamese_model(features=6, dim=4):
    """Two inputs through one shared tower; the output is the stacked pair."""
    tower = keras.Sequential([keras.Input((features,)), keras.layers.Dense(dim)])
    x1, x2 = keras.Input((features,)), keras.Input((features,))
    stacked = keras.layers.Concatenate()([tower(x1), tower(x2)])
    return keras.Model([x1, x2], keras.layers.Reshape((2, dim))(stacked))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_siamese_model_trains_and_evaluates_like_the_reference(rng, jit_compile):
    x1 = rng.normal(size=(64, 6)).astype("float32")
    x2 = rng.normal(size=(64, 6)).astype("float32")
    y = (x1[:, 0] * x2[:, 0] > 0).astype("float32")
    results = []
    for loss in (fc.ContrastiveLoss(distance="euclidean"), KerasEmbeddingReference("euclidean")):
        keras.utils.set_random_seed(3)
        model = siamese_model()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, jit_compile=jit_compile)
        history = model.fit([x1, x2], y, batch_size=16, epochs=3, verbose=0, shuffle=False)
        results.append((history.history["loss"], model.evaluate([x1, x2], y, verbose=0)))
    (fused_history, fused_eval), (ref_history, ref_eval) = results
    assert fused_history[-1] < fused_history[0]
    np.testing.assert_allclose(fused_history, ref_history, rtol=1e-5)
    np.testing.assert_allclose(fused_eval, ref_eval, rtol=1e-5)


def test_keras_file_with_distance_loads_in_a_fresh_process(rng, tmp_path):
    x1 = rng.normal(size=(32, 6)).astype("float32")
    x2 = rng.normal(size=(32, 6)).astype("float32")
    y = (x1[:, 0] > 0).astype("float32")
    model = siamese_model()
    model.compile(optimizer="adam", loss=fc.ContrastiveLoss(margin=1.5, distance="cosine"))
    model.fit([x1, x2], y, epochs=1, verbose=0)
    np.savez(tmp_path / "data.npz", x1=x1, x2=x2, y=y)
    model.save(tmp_path / "model.keras")
    expected = model.evaluate([x1, x2], y, batch_size=32, verbose=0)
    result = run_python(f"""
        import numpy as np, keras
        import fused_contrastive
        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        assert model.loss.distance == "cosine" and model.loss.margin == 1.5
        data = np.load({str(tmp_path / "data.npz")!r})
        print(repr(model.evaluate([data["x1"], data["x2"]], data["y"], batch_size=32,
                                  verbose=0)))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


def test_reference_fallback_computes_the_same_in_a_fresh_process(rng):
    result = run_python(
        """
        import numpy as np, tensorflow as tf, warnings
        warnings.simplefilter("ignore")
        import fused_contrastive as fc
        assert fc.using_reference()
        a = tf.constant([[0.0, 3.0], [1.0, 1.0]]); b = tf.constant([[4.0, 0.0], [1.0, 1.0]])
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = fc.ContrastiveLoss(margin=2.0, distance="euclidean")(
                [1.0, 0.0], tf.stack([a, b], axis=1))
        print(float(loss), tape.gradient(loss, a).numpy().ravel().tolist())
    """,
        FUSED_CONTRASTIVE_USE_REFERENCE="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loss, grad = result.stdout.split(maxsplit=1)
    assert float(loss) == 14.5  # (25 + 4) / 2
    np.testing.assert_allclose(json.loads(grad), [-4.0, 3.0, 0.0, 0.0])


class PairsPerStep(keras.layers.Layer):
    """[B, T, 2·D] -> [B, T, 2, D], passing the time steps' mask on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return keras.ops.reshape(x, (-1, x.shape[1], 2, x.shape[2] // 2))


def test_masked_time_steps_are_handled_like_any_keras_loss(rng):
    x = rng.normal(size=(16, 7, 3)).astype("float32")
    x[:, 4:, :] = 0.0  # padding: masked by the Masking layer
    y = rng.integers(0, 2, size=(16, 7)).astype("float32")
    results = {}
    for loss in (fc.ContrastiveLoss(distance="cosine"), KerasEmbeddingReference("cosine")):
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [keras.Input((7, 3)), keras.layers.Masking(0.0), keras.layers.Dense(8), PairsPerStep()]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=False)
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        results[type(loss).__name__] = (
            history.history["loss"],
            model.evaluate(x, y, batch_size=16, verbose=0),
            model,
        )
    fused, reference = results["ContrastiveLoss"], results["KerasEmbeddingReference"]
    np.testing.assert_allclose(fused[0], reference[0], rtol=1e-5)
    np.testing.assert_allclose(fused[1], reference[1], rtol=1e-5)
    # The padded steps really are excluded: changing their labels changes nothing.
    y_padded = y.copy()
    y_padded[:, 4:] = 1.0 - y_padded[:, 4:]
    np.testing.assert_allclose(
        fused[2].evaluate(x, y_padded, batch_size=16, verbose=0), fused[1], rtol=1e-6
    )

"""The fused-reduction path the Keras class takes for every reduction but
"none": values and gradients equal Keras' own reduction of the per-sample
losses, sums are accurate and deterministic."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import DISTANCE_DTYPES, random_distances, random_labels, run_python

import keras
from fused_contrastive import ContrastiveLoss, _ops, contrastive_loss_reference
from fused_contrastive._inputs import prepare_inputs

REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"]


class KerasReducedReference(keras.losses.Loss):
    """Keras' own reduction of the pure-TF per-sample loss: the yardstick."""

    def __init__(self, margin, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin

    def call(self, y_true, y_pred):
        return contrastive_loss_reference(y_true, y_pred, self.margin)


def _weights(rng, kind, shape):
    return {"none": None, "scalar": 1.7, "vector": rng.uniform(0.1, 2.0, size=shape),
            "column": rng.uniform(0.1, 2.0, size=shape + (1,))}[kind]


def _spy_on_reduced_op(monkeypatch):
    calls = []
    original = _ops.reduced_loss
    monkeypatch.setattr(_ops, "reduced_loss", lambda *a: (calls.append(a[4]), original(*a))[1])
    return calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "scalar", "vector", "column"])
def test_matches_keras_reduction_values_and_gradients(rng, run, monkeypatch, reduction, weights):
    calls = _spy_on_reduced_op(monkeypatch)
    y = random_labels(rng, (40,), "float32")
    d = random_distances(rng, (40, 1), "float32")
    w = _weights(rng, weights, (40,))
    w = None if w is None else tf.constant(w, tf.float32)

    def loss_and_grad(loss_obj, d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = loss_obj(y, d, sample_weight=w) * 3.0  # upstream != 1
        return loss, tape.gradient(loss, d)

    fused = run(loss_and_grad, ContrastiveLoss(margin=1.3, reduction=reduction), d)
    keras_way = loss_and_grad(KerasReducedReference(1.3, reduction=reduction), d)
    assert calls, "the fused-reduction op was not used"
    for got, want in zip(fused, keras_way):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean_with_sample_weight"])
def test_every_dtype_and_rank(rng, distance_dtype, reduction):
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[distance_dtype]
    for shape in [(1,), (7,), (3, 5), (2, 3, 4)]:
        y = random_labels(rng, shape, "int32")
        d = random_distances(rng, shape, distance_dtype)
        w = tf.cast(rng.uniform(0, 2, size=shape), distance_dtype)
        got = ContrastiveLoss(reduction=reduction, dtype=distance_dtype)(y, d, w)
        want = KerasReducedReference(1.0, reduction=reduction, dtype=distance_dtype)(y, d, w)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(tf.cast(got, tf.float64), tf.cast(want, tf.float64), rtol=tol)


def test_falls_back_to_keras_where_it_must(rng, monkeypatch):
    calls = _spy_on_reduced_op(monkeypatch)
    y = random_labels(rng, (4, 3), "float32")
    d = random_distances(rng, (4, 3), "float32")
    # Per-row weights broadcast over columns: Keras' divisor rules apply.
    w = tf.constant(rng.uniform(0.5, 1.5, size=(4, 1)), tf.float32)
    for reduction in REDUCTIONS:
        np.testing.assert_allclose(
            ContrastiveLoss(reduction=reduction)(y, d, w),
            KerasReducedReference(1.0, reduction=reduction)(y, d, w), rtol=1e-6)
    # Scalar losses are returned unreduced by Keras.
    assert ContrastiveLoss()(1.0, 0.5).shape == ()
    assert ContrastiveLoss(reduction="none")(y, d).shape == (4, 3)
    assert not calls


def test_zero_weights_give_zero_not_nan(rng):
    y = random_labels(rng, (5,), "float32")
    d = tf.Variable(random_distances(rng, (5,), "float32"))
    with tf.GradientTape() as tape:
        loss = ContrastiveLoss(reduction="mean_with_sample_weight")(y, d, tf.zeros([5]))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(tape.gradient(loss, d), np.zeros(5))


def test_empty_batch_with_unknown_shape_gives_zero():
    f = tf.function(lambda y, d: ContrastiveLoss()(y, d),
                    input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])])
    assert float(f(tf.zeros([0]), tf.zeros([0]))) == 0.0


def test_reduced_loss_is_accurate_at_ten_million(rng):
    n = 10_000_000
    y = (rng.random(n) < 0.5).astype(np.float32)
    d = (2.0 * rng.random(n)).astype(np.float32)
    w = rng.uniform(0, 2, n).astype(np.float32)
    for weights in (None, w):
        got = float(ContrastiveLoss()(y, d, weights))
        y64, d64 = y.astype(np.float64), d.astype(np.float64)
        per_sample = y64 * d64**2 + (1 - y64) * np.maximum(1 - d64, 0) ** 2
        exact = np.mean(per_sample * (1.0 if weights is None else w.astype(np.float64)))
        assert abs(got - exact) / exact <= 1e-6


def test_deterministic_and_independent_of_thread_count(rng, tmp_path):
    n = 3_000_017
    data = {"y": (rng.random(n) < 0.5).astype(np.float32),
            "d": (2.0 * rng.random(n)).astype(np.float32),
            "w": rng.uniform(0, 2, n).astype(np.float32)}
    np.savez(tmp_path / "data.npz", **data)
    script = f"""
        import hashlib, numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
        from fused_contrastive import ContrastiveLoss
        e = np.load({str(tmp_path / "data.npz")!r})
        d = tf.constant(e["d"])
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = ContrastiveLoss(reduction="mean_with_sample_weight")(e["y"], d, e["w"])
        grad = tape.gradient(loss, d).numpy()
        print(np.float32(loss).tobytes().hex(), hashlib.sha256(grad.tobytes()).hexdigest())
    """
    outputs = set()
    for threads in ("1", "2", "1"):
        result = run_python(script.replace("int(sys.argv[1])", threads))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.add(result.stdout.strip())
    assert len(outputs) == 1, outputs


def test_backward_passes_the_gradient_through_when_upstream_is_one(rng):
    y = random_labels(rng, (100,), "float32")
    d = random_distances(rng, (100,), "float32")
    labels, distances = prepare_inputs(y, d)
    _, grad, scale = _ops._library.fused_contrastive_contrastive_loss_reduced(
        labels, distances, tf.ones([]), tf.constant(1.0, tf.float64),
        tf.constant(1.0, tf.float64), reduction="mean")
    assert float(scale) == 1 / 100
    scale_op = _ops._library.fused_contrastive_scale_gradient
    np.testing.assert_array_equal(scale_op(grad, tf.constant(1.0)), grad)
    np.testing.assert_array_equal(scale_op(grad, tf.constant(2.5)), grad * 2.5)


def test_second_derivative_through_the_reduced_loss(rng):
    y = random_labels(rng, (6,), "float64")
    d = tf.constant(rng.uniform(0, 2, size=6))
    w = tf.constant(rng.uniform(0.5, 1.5, size=6))
    hessians = []
    for loss_obj in (ContrastiveLoss(dtype="float64"),
                     KerasReducedReference(1.0, dtype="float64")):
        with tf.GradientTape() as outer:
            outer.watch(d)
            with tf.GradientTape() as inner:
                inner.watch(d)
                loss = loss_obj(y, d, w)
            grad = inner.gradient(loss, d)
        hessians.append(outer.jacobian(grad, d))
    np.testing.assert_allclose(hessians[0], hessians[1], rtol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_xla_matches(rng, reduction):
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

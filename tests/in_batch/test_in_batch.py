"""The in-batch all-pairs loss (issue 11): in_batch_contrastive_loss, its Keras
classes and its kernels, against a float64 NumPy oracle with explicit pairs."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import bits, run_python

import fused_contrastive as fc
from fused_contrastive import _in_batch_ops, _inputs, _kernels

IN_BATCH_DISTANCES = list(_inputs.IN_BATCH_DISTANCES)
PAIR_WEIGHTINGS = list(_inputs.PAIR_WEIGHTINGS)
MARGINS = [(1.0, 0.0), (0.7, 0.2)]
# Relative tolerance against float64 (issue 11's targets for float32/float64;
# 16-bit inputs are rounded before the float32 computation, and the loss after).
RTOL = {"float16": 2e-2, "bfloat16": 1e-1, "float32": 2e-4, "float64": 1e-9}


def numpy_in_batch(
    labels,
    e,
    margin=1.0,
    positive_margin=0.0,
    distance="euclidean",
    weighting="uniform",
    upstream=None,
    miner=None,
    miner_epsilon=0.1,
):
    """Per-anchor losses and the gradient of sum(upstream * loss), in float64,
    from every ordered pair's explicit difference e_i - e_j; a miner keeps
    pairs as numpy_mined does."""
    labels = np.asarray(labels).reshape(-1)
    e = np.asarray(e, np.float64)
    b = e.shape[0]
    g = np.ones(b) if upstream is None else np.asarray(upstream, np.float64)
    diff = e[:, None, :] - e[None, :, :]
    n = np.sqrt(np.sum(e * e, axis=-1))
    if distance == "euclidean":
        d = np.sqrt(np.sum(diff**2, axis=-1))
        # dd/de_i of every pair, 0 at d = 0.
        dd = np.divide(diff, d[..., None], out=np.zeros_like(diff), where=d[..., None] > 0)
    else:
        norms = n[:, None] * n[None, :]
        s = e @ e.T
        d = 1.0 - np.divide(s, norms, out=np.zeros((b, b)), where=norms > 0)
        ok = (norms > 0)[..., None]
        safe_norms = np.where(ok, norms[..., None], 1.0)
        safe_n2 = np.where(ok, (n**2)[:, None, None], 1.0)
        dd = np.where(
            ok,
            -e[None, :, :] / safe_norms + s[..., None] * e[:, None, :] / (safe_norms * safe_n2),
            0.0,
        )
    others = ~np.eye(b, dtype=bool)
    same = labels[:, None] == labels[None, :]
    pos, neg = numpy_mined(d, same & others, ~same & others, miner, miner_epsilon)
    hp, hn = np.maximum(d - positive_margin, 0.0), np.maximum(margin - d, 0.0)
    inv = lambda c: np.divide(1.0, c, out=np.zeros(b), where=c > 0)  # noqa: E731
    # The pairs each weight counts: with "active" those whose term is not 0.
    counted = (pos & (hp > 0), neg & (hn > 0)) if weighting == "active" else (pos, neg)
    if weighting == "uniform" and miner is None:
        wp = wn = np.full(b, 1.0 / max(b - 1, 1))
    elif weighting == "uniform":  # the mean over the kept pairs
        wp = wn = inv(pos.sum(1) + neg.sum(1))
    else:
        wp, wn = inv(counted[0].sum(1)), inv(counted[1].sum(1))
    loss = wp * np.where(pos, hp**2, 0).sum(1) + wn * np.where(neg, hn**2, 0).sum(1)
    # Coefficient of dd_ij in d(sum g*loss): anchor i's own term, then the same
    # pair seen from anchor j (dd_ji = -dd_ij for e_i's part is in dd[j, i]).
    slope = np.where(pos, 2 * hp * wp[:, None], 0) - np.where(neg, 2 * hn * wn[:, None], 0)
    c = g[:, None] * slope
    grad = np.einsum("ij,ijk->ik", c, dd)
    if distance == "euclidean":
        grad -= np.einsum("ji,jik->ik", c, dd)
    else:
        # d_ji depends on e_i as -e_j/(n_i n_j) + s e_i/(n_i^3 n_j) too.
        grad += np.einsum("ji,ijk->ik", c, dd)
    return loss, grad


def numpy_mined(d, pos, neg, miner, epsilon):
    """The positive and negative pairs (row: anchor) a miner keeps: batch_hard
    the largest-d positive and smallest-d negative (first on ties),
    multi_similarity the positives with d > (smallest negative d) - epsilon and
    the negatives with d < (largest positive d) + epsilon."""
    if miner is None or d.size == 0:
        return pos, neg
    largest = np.where(pos, d, -np.inf)
    smallest = np.where(neg, d, np.inf)
    if miner == "batch_hard":
        rows = np.arange(len(d))
        keep_pos, keep_neg = np.zeros_like(pos), np.zeros_like(neg)
        keep_pos[rows, np.argmax(largest, axis=1)] = True
        keep_neg[rows, np.argmin(smallest, axis=1)] = True
        return pos & keep_pos, neg & keep_neg
    assert miner == "multi_similarity", miner
    hardest_pos = largest.max(axis=1, initial=-np.inf)[:, None]
    hardest_neg = smallest.min(axis=1, initial=np.inf)[:, None]
    return pos & ~(d <= hardest_neg - epsilon), neg & ~(d >= hardest_pos + epsilon)


def duplicates_compare(distance, weighting):
    """Whether an oracle test may hold duplicate rows: a cosine duplicate's d
    is a rounding error rather than 0, and whether "active" counts its
    positive term depends on that rounding (test_in_batch_active checks
    duplicates with a margin that makes the term 0 in every dtype)."""
    return not (weighting == "active" and distance == "cosine")


def batch(rng, b, dim=6, duplicates=True):
    """Embeddings O(1) and labels of 3 classes; with duplicates, rows 1 and 3
    copy rows 0 (same class) and 2 (another class), and row 4 is zero."""
    e = rng.normal(size=(b, dim)) / np.sqrt(dim)
    labels = rng.integers(0, 3, size=b)
    if duplicates and b >= 5:
        e[1], labels[1] = e[0], labels[0]
        e[3], labels[3] = e[2], (labels[2] + 1) % 3
        e[4] = 0.0
    return labels, e


def fused_loss_and_gradient(labels, e, dtype, upstream, **options):
    x = tf.constant(e, dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fc.in_batch_contrastive_loss(labels, x, **options)
        total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
    return loss, tape.gradient(total, x)


def assert_close(got, want, dtype, what):
    rtol = RTOL[dtype]
    scale = max(np.max(np.abs(want)), 1.0) if np.size(want) else 1.0
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * scale, err_msg=what
    )


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("b", [0, 1, 2, 9, 37])
@pytest.mark.parametrize("max_block_rows", [None, 4])
def test_matches_float64_numpy(rng, distance, weighting, margins, b, max_block_rows):
    labels, e = batch(rng, b, duplicates=duplicates_compare(distance, weighting))
    upstream = rng.uniform(0.5, 1.5, size=b)
    want_loss, want_grad = numpy_in_batch(labels, e, *margins, distance, weighting, upstream)
    for dtype in ("float64", "float32"):
        loss, grad = fused_loss_and_gradient(
            labels,
            e,
            dtype,
            upstream,
            margin=margins[0],
            positive_margin=margins[1],
            distance=distance,
            pair_weighting=weighting,
            max_block_rows=max_block_rows,
        )
        assert loss.shape == (b,) and loss.dtype == dtype and grad.shape == (b, 6)
        assert_close(loss, want_loss, dtype, f"{dtype} loss")
        assert_close(grad, want_grad, dtype, f"{dtype} gradient")


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("margin", [0.2, 3.0])
def test_sparse_and_dense_gradient_paths(rng, distance, margin):
    # Margin 0.2: almost no pair has a gradient (the kernel adds the few rows
    # one by one); 3.0: every pair has one (dense products).
    labels, e = batch(rng, 200, dim=12)
    upstream = rng.uniform(0.5, 1.5, size=200)
    want_loss, want_grad = numpy_in_batch(labels, e, margin, 0.0, distance, "balanced", upstream)
    for dtype in ("float64", "float32"):
        loss, grad = fused_loss_and_gradient(
            labels,
            e,
            dtype,
            upstream,
            margin=margin,
            distance=distance,
            pair_weighting="balanced",
            max_block_rows=32,
        )
        assert_close(loss, want_loss, dtype, f"{dtype} loss")
        assert_close(grad, want_grad, dtype, f"{dtype} gradient")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_embeddings_are_computed_in_float32(rng, dtype):
    labels, e = batch(rng, 20)
    e = tf.cast(tf.cast(e, dtype), tf.float64).numpy()  # what the op sees
    want_loss, want_grad = numpy_in_batch(labels, e, upstream=np.ones(20))
    loss, grad = fused_loss_and_gradient(labels, e, dtype, np.ones(20))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "gradient")


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
def test_equal_embeddings_give_zero_distance_and_gradient(distance):
    # A positive duplicate costs nothing; a negative one costs margin^2 with
    # gradient 0 (the norm's subgradient, never NaN). Euclidean: exactly, in
    # float32, where the Gram formula alone would leave rounding noise as a
    # distance. Cosine: 1 - cos rounds to within a few ulp of 0.
    row = [0.3, -1.7, 2.9, 0.1, 5.0]
    atol = 0 if distance == "euclidean" else 1e-6
    for labels, want in (([4, 4], 0.0), ([4, 5], 1.0)):
        loss, grad = fused_loss_and_gradient(
            labels, [row, row], "float32", np.ones(2), distance=distance
        )
        np.testing.assert_allclose(loss, [want, want], rtol=1e-6, atol=atol**2)
        np.testing.assert_allclose(grad, np.zeros((2, 5)), rtol=0, atol=atol)


def test_near_duplicates_keep_an_accurate_distance(rng):
    # 1e-4 apart on norms ~10: the Gram formula's rounding in float32 is larger
    # than the distance itself; the kernel computes such pairs directly.
    e = np.stack([np.full(100, 1.0), np.full(100, 1.0) + 1e-5]).astype(np.float32)
    want_loss, want_grad = numpy_in_batch([0, 0], e.astype(np.float64), positive_margin=0.0)
    loss, grad = fused_loss_and_gradient([0, 0], e, "float32", np.ones(2))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-3)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3)


def test_labels_as_floats_or_column_like_keras_passes_them(rng):
    labels, e = batch(rng, 12)
    want = fc.in_batch_contrastive_loss(labels.astype(np.int32), e)
    for form in (
        labels.astype(np.float32),
        labels.astype(np.float64)[:, None],
        labels.astype(np.int64),
    ):
        np.testing.assert_array_equal(bits(fc.in_batch_contrastive_loss(form, e)), bits(want))


def test_float_labels_are_compared_by_value(rng):
    # What tf.equal does in the reference: fractions are classes too, -0 == 0,
    # and a NaN label matches nothing (not even another NaN).
    labels = np.array([0.5, 0.5, -0.0, 0.0, np.nan, np.nan, 2.0], np.float32)
    _, e = batch(rng, 7, duplicates=False)
    want = fc.in_batch_contrastive_loss_reference(labels, e, pair_weighting="balanced")
    for run in (lambda f: f(), tf.function(lambda f: f(), jit_compile=True)):
        got = run(lambda: fc.in_batch_contrastive_loss(labels, e, pair_weighting="balanced"))
        np.testing.assert_allclose(got, want, rtol=1e-9)
    ids = _in_batch_ops.class_ids(tf.constant(labels)).numpy()
    assert ids[0] == ids[1] and ids[2] == ids[3] and len(set(ids[4:])) == 3


def test_deterministic_and_independent_of_threads_and_blocks(rng):
    labels, e = batch(rng, 300, dim=16)
    e = e.astype(np.float32)
    g = np.ones(300, np.float32)
    loss, grad = fused_loss_and_gradient(labels, e, "float32", g)
    again = fused_loss_and_gradient(labels, e, "float32", g)
    np.testing.assert_array_equal(bits(loss), bits(again[0]))
    np.testing.assert_array_equal(bits(grad), bits(again[1]))
    # The op runs on TF's pool, the pybind11 entry on one thread: same schedule,
    # same bits.
    serial_loss, serial_grad = _kernels.in_batch_loss_cpu(labels, e, g)
    np.testing.assert_array_equal(bits(loss), bits(serial_loss))
    np.testing.assert_array_equal(bits(grad), bits(serial_grad))
    small_blocks = fused_loss_and_gradient(labels, e, "float32", g, max_block_rows=7)
    np.testing.assert_allclose(small_blocks[0], loss, rtol=1e-5)
    np.testing.assert_allclose(small_blocks[1], grad, rtol=1e-4, atol=1e-6)


def test_the_best_cpu_build_runs_by_default():
    builds = _kernels.in_batch_cpu_builds()
    assert builds[-1] == "generic"
    assert _kernels.in_batch_cpu_isa() == builds[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_cpu_build_this_cpu_runs_matches(rng, tmp_path, dtype):
    # FUSED_CONTRASTIVE_CPU_ISA caps the build, so each one gets checked here,
    # not only the best, which every other test runs.
    labels, e = batch(rng, 70, dim=37)
    want_loss, want_grad = numpy_in_batch(labels, e, upstream=np.ones(70))
    np.save(tmp_path / "in.npy", np.concatenate([labels[:, None], e], axis=1))
    for build in _kernels.in_batch_cpu_builds():
        result = run_python(
            f"""
            import numpy as np
            from fused_contrastive import _kernels
            data = np.load({str(tmp_path / "in.npy")!r})
            loss, grad = _kernels.in_batch_loss_cpu(data[:, 0].astype(np.int64),
                                                    data[:, 1:].astype({dtype!r}),
                                                    np.ones(len(data), {dtype!r}))
            print(_kernels.in_batch_cpu_isa())
            np.save({str(tmp_path / "out.npy")!r}, np.concatenate([loss[:, None], grad], 1))
            """,
            FUSED_CONTRASTIVE_CPU_ISA=build,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-1] == build
        out = np.load(tmp_path / "out.npy")
        assert_close(out[:, 0], want_loss, dtype, f"{build} loss")
        assert_close(out[:, 1:], want_grad, dtype, f"{build} gradient")


def test_second_order_through_nested_tapes_matches_the_reference(rng):
    labels, e = batch(rng, 7, dim=3)
    x = tf.constant(e)

    def hvp(fn):
        v = tf.constant(rng.normal(size=e.shape))
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                total = tf.reduce_sum(fn(labels, x) * tf.range(1.0, 8.0, dtype=x.dtype))
            grad = inner.gradient(total, x)
        return outer.gradient(grad, x, output_gradients=v)

    rng_state = rng.bit_generator.state
    want = hvp(fc.in_batch_contrastive_loss_reference)
    rng.bit_generator.state = rng_state
    np.testing.assert_allclose(hvp(fc.in_batch_contrastive_loss), want, rtol=1e-9, atol=1e-12)


def test_graph_mode_gradients_of_gradients_say_to_use_tapes(rng):
    labels, e = batch(rng, 5)

    @tf.function
    def second_order(x):
        loss = tf.reduce_sum(fc.in_batch_contrastive_loss(labels, x))
        return tf.gradients(tf.gradients(loss, x)[0], x)

    with pytest.raises(NotImplementedError, match="GradientTape"):
        second_order(tf.constant(e))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((3, 2))),
            ValueError,
            r"labels must have shape \[B\] or \[B, 1\]",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2, 1))),
            ValueError,
            "must have rank 2",
        ),
        (lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros(2)), ValueError, "must have rank 2"),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2)), distance="manhattan"),
            ValueError,
            "distance must be one of 'euclidean', 'cosine'",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2)), pair_weighting="mean"),
            ValueError,
            "pair_weighting must be one of 'uniform', 'balanced'",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2)), positive_margin=-1.0),
            ValueError,
            "positive_margin must be finite and non-negative",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2)), margin=float("nan")),
            ValueError,
            "margin must be finite",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([True, False], np.zeros((2, 2))),
            TypeError,
            "labels must be class ids",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2), np.int32)),
            TypeError,
            "embeddings must be",
        ),
        (
            lambda: fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2)), max_block_rows=0),
            ValueError,
            "max_block_rows",
        ),
        (lambda: fc.InBatchContrastiveLoss(pair_weighting="x"), ValueError, "pair_weighting"),
        (
            lambda: fc.InBatchContrastiveLoss(positive_margin=tf.constant(1.0)),
            TypeError,
            "needs a number positive_margin",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("ragged", ["labels", "embeddings"])
@pytest.mark.parametrize(
    "loss",
    [
        fc.in_batch_contrastive_loss,
        fc.in_batch_contrastive_loss_reference,
        fc.InBatchContrastiveLoss(),
    ],
)
def test_ragged_inputs_get_the_documented_message(loss, ragged):
    # Issue 18 (11): the function and the reference said "TypeError: object of
    # type 'RaggedTensor' has no len()" inside a ValueError.
    labels, e = [0, 1], [[0.0, 1.0], [1.0, 0.0]]
    if ragged == "labels":
        labels = tf.ragged.constant([[0], [1]])
    else:
        e = tf.ragged.constant([[0.0, 1.0], [1.0]])
    with pytest.raises(TypeError, match=r"ragged y_true/y_pred are not supported") as error:
        loss(labels, e)
    assert "to_tensor()" in str(error.value)


def test_shapes_known_only_at_run_time_are_checked_by_the_op():
    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, None], tf.float32)]
    )
    def loss(labels, e):
        return fc.in_batch_contrastive_loss(labels, e)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels \[B\]"):
        loss(tf.constant([0, 1, 2], tf.int64), tf.zeros((2, 3)))


def test_tensor_margins_and_a_margin_variable(rng):
    labels, e = batch(rng, 10)
    margin = tf.Variable(0.8, dtype=tf.float64)
    want, _ = numpy_in_batch(labels, e, 0.8, 0.1)
    got = fc.in_batch_contrastive_loss(labels, e, margin, tf.constant(0.1, tf.float64))
    assert_close(got, want, "float64", "loss")
    margin.assign(-1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
        fc.in_batch_contrastive_loss(labels, e, margin)


class KerasReducedInBatch(keras.losses.Loss):
    """Keras' own reduction of the reference's per-anchor losses."""

    def call(self, y_true, y_pred):
        return fc.in_batch_contrastive_loss_reference(
            y_true, y_pred, 0.9, 0.1, "cosine", "balanced"
        )


@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"]
)
@pytest.mark.parametrize("weights", [None, "scalar", "per_anchor"])
def test_keras_class_reduces_as_keras(rng, reduction, weights):
    labels, e = batch(rng, 24)
    x = tf.constant(e, tf.float32)
    sample_weight = {
        None: None,
        "scalar": 0.5,
        "per_anchor": rng.uniform(size=24).astype(np.float32),
    }[weights]
    ours = fc.InBatchContrastiveLoss(0.9, 0.1, "cosine", "balanced", reduction=reduction)
    keras_own = KerasReducedInBatch(reduction=reduction)
    results = []
    for loss_object in (ours, keras_own):
        with tf.GradientTape() as tape:  # the fused reduction runs under a tape
            tape.watch(x)
            value = loss_object(labels.astype(np.float32), x, sample_weight=sample_weight)
        results.append((value, tape.gradient(value, x)))
        results.append(
            (loss_object(labels.astype(np.float32), x, sample_weight=sample_weight), None)
        )
    want = results[2][0].numpy()
    for value, grad in (results[0], results[1]):
        np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(results[0][1], results[2][1], rtol=1e-4, atol=1e-6)


# Class ids that float32 (what Keras 3 casts y_true to) cannot tell apart, with
# small ids of the same classes: offset + k against k for k in 0, 1, 2.
LARGE_IDS = [
    ("int64", 2**24),
    ("int64", 2**40),
    ("int64", 2**63 - 3),
    ("int64", -(2**63)),
    ("int32", 2**31 - 3),
    ("uint64", 2**64 - 3),
    ("list", 2**53 + 1),
]


def large_ids(k, dtype, offset):
    """k + offset as `dtype` ("list": Python ints), exactly."""
    ids = [offset + int(c) for c in k]
    return ids if dtype == "list" else np.array(ids, dtype)


@pytest.mark.parametrize("dtype, offset", LARGE_IDS)
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight", "none"]
)
@pytest.mark.parametrize("tape", [True, False])
def test_keras_class_keeps_integer_ids_exact(rng, run, dtype, offset, reduction, tape):
    # Issue 18 (2): Keras 3's Loss.__call__ casts y_true to float32, where ids
    # 2**24 and 2**24 + 1 are one class.
    k = np.array([0, 1, 2, 0, 1, 2, 1, 0])
    e = tf.constant(rng.normal(size=(8, 3)), tf.float32)
    w = rng.uniform(0.5, 1.5, size=8).astype(np.float32)
    loss = fc.InBatchContrastiveLoss(margin=1.5, reduction=reduction)

    def value(ids, e):
        if not tape:
            return loss(ids, e, sample_weight=w), tf.zeros_like(e)
        with tf.GradientTape() as g:
            g.watch(e)
            result = loss(ids, e, sample_weight=w)
        return result, g.gradient(result, e)

    want = run(value, k.astype(np.int32), e)
    got = run(value, large_ids(k, dtype, offset), e)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_)
    assert not np.allclose(want[0], run(value, np.zeros(8, np.int32), e)[0])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_fit_and_evaluate_keep_integer_ids_exact(rng, jit_compile):
    x = rng.normal(size=(96, 8)).astype(np.float32)
    k = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    results = []
    for y in (k, k + 2**40):
        keras.utils.set_random_seed(5)
        model = embedding_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=fc.InBatchContrastiveLoss(),
            jit_compile=jit_compile,
        )
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        results.append((history.history["loss"], model.evaluate(x, y, batch_size=32, verbose=0)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)


def test_keras_class_config_and_keras_file_round_trip(tmp_path, rng):
    loss = fc.InBatchContrastiveLoss(
        0.9, 0.2, "cosine", "balanced", reduction="sum", max_block_rows=64
    )
    config = loss.get_config()
    assert {
        k: config[k]
        for k in (
            "margin",
            "positive_margin",
            "distance",
            "pair_weighting",
            "max_block_rows",
            "reduction",
        )
    } == {
        "margin": 0.9,
        "positive_margin": 0.2,
        "distance": "cosine",
        "pair_weighting": "balanced",
        "max_block_rows": 64,
        "reduction": "sum",
    }
    json.dumps(config)
    clone = fc.InBatchContrastiveLoss.from_config(config)
    assert clone.get_config() == config
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(loss=loss)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.loss) is fc.InBatchContrastiveLoss
    assert loaded.loss.get_config() == config


def embedding_model():
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)]
    )


@pytest.mark.parametrize("jit_compile", [True, "auto"])
def test_keras_fit_compiles_the_loss_with_xla(rng, jit_compile):
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
    losses = {}
    for jit in (jit_compile, False):
        keras.utils.set_random_seed(3)
        model = embedding_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=fc.InBatchContrastiveLoss(), jit_compile=jit
        )
        history = model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
        losses[jit] = history.history["loss"]
    assert losses[False][-1] < losses[False][0]  # it learns
    np.testing.assert_allclose(losses[jit_compile], losses[False], rtol=1e-4)


def test_linear_memory_at_32768_rows():
    # One B x B float32 matrix alone would be 4.3 GB; the whole forward and
    # backward pass must stay under 1.5 GB of extra peak memory, measured as
    # the growth of the process's peak RSS over what the inputs took.
    result = run_python("""
        import resource
        import numpy as np
        import tensorflow as tf
        import fused_contrastive as fc
        rng = np.random.default_rng(0)
        b, d = 32768, 64
        x = tf.constant(rng.normal(size=(b, d)).astype(np.float32))
        labels = tf.constant(rng.integers(0, 1000, size=b))
        loss_object = fc.InBatchContrastiveLoss()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            reduced = loss_object(labels, x)  # the one-sweep Keras path
            per_anchor = tf.reduce_mean(fc.in_batch_contrastive_loss(labels, x))
        grads = [tape.gradient(reduced, x), tape.gradient(per_anchor, x)]
        np.testing.assert_allclose(float(reduced), float(per_anchor), rtol=1e-5)
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-9)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("extra_kib", extra)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    extra_kib = int(result.stdout.split()[-1])
    assert extra_kib < 1.5 * 2**20, f"extra peak RSS {extra_kib / 2**20:.2f} GiB"

"""Property-based tests (hypothesis): random label/distance dtypes, shapes
(rank 0-3, empty dims, [B] labels with [B, 1] distances and the reverse),
margins (0, tiny, large, random; numbers and scalar tensors), soft labels,
sample weights, reductions and similar_label.

* `contrastive_loss` equals `contrastive_loss_reference` bit for bit, and its
  gradient equals autodiff of the reference (per-dtype tolerance).
* `ContrastiveLoss` equals Keras' own reduction of the reference per-sample
  loss (a `keras.losses.Loss` whose `call` is the reference, built and called
  the same way), value and gradient.
* `contrastive_loss_from_embeddings` and its gradients with respect to both
  embeddings equal the reference's, finite, for every distance, with
  identical pairs and zero rows mixed in.

Each property runs eagerly and, on fewer examples, inside a tf.function. The
examples are derandomized (the same every run, so CI is deterministic) and the
whole file runs in well under 60 s on a 2-core machine.
"""

import numpy as np
import pytest
import tensorflow as tf
from support import KerasReducedReference, loss_and_gradient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras
from fused_contrastive import contrastive_loss, contrastive_loss_reference, using_reference
from fused_contrastive.losses import ContrastiveLoss  # Keras 3's, even with TF_USE_LEGACY_KERAS
from fused_contrastive._inputs import DISTANCE_DTYPES, LABEL_DTYPES

pytestmark = pytest.mark.skipif(
    using_reference(),
    reason="compares the compiled op with the pure-TF reference, which "
    "FUSED_CONTRASTIVE_USE_REFERENCE puts in its place",
)

REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]
LOSS_DTYPES = [None, "float16", "bfloat16", "float32", "float64"]  # None: floatx


def _settings(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


def _mixture(values, specials, odds=4):
    """`values` about `odds` times in `odds` + 1, else one of `specials`.

    Hypothesis favours boundary values (0 above all) and one_of favours its
    first branch: left alone, half the distances would be 0 or the margin and
    most losses 0, which hide weighting, reduction and margin mistakes."""
    n = len(specials)
    return st.tuples(st.integers(0, (odds + 1) * n - 1), values).map(
        lambda pick: specials[pick[0]] if pick[0] < n else pick[1]
    )


def _margins(high):
    """Non-negative finite margins: 0, tiny, 1, large, and anything between."""
    special = [m for m in (1.0, 0.5, 3.0, 1e-3, 1e-6, 100.0, 1000.0, 0.0) if m <= high]
    return _mixture(st.floats(1e-3, high), special, odds=1)


# Element strategies are built once: hypothesis validates a new strategy on
# first use, which would cost more than the TensorFlow ops of an example.
_HARD_LABELS = st.integers(0, 1)
_SOFT_LABELS = _mixture(st.floats(0.0, 1.0), [0.0, 1.0, 0.5], odds=2)
_TIE = -1.0  # marks a distance equal to the margin
_UNIT_DISTANCES = _mixture(st.floats(1e-3, 1.0), [0.0, _TIE])
_WEIGHTS = _mixture(st.floats(0.01, 2.0), [0.0])
_UPSTREAM = st.one_of(st.floats(0.25, 2.0), st.floats(-2.0, -0.25))


def _shapes(max_side):
    """Rank 0-3 with empty and unit dimensions. (hnp.array_shapes draws mostly
    empty or one-element shapes, on which few mistakes show.)"""
    side = st.sampled_from(list(range(1, max_side + 1)) + [0])
    return st.integers(0, 3).flatmap(lambda rank: st.tuples(*[side] * rank))


def _array(draw, dtype, shape, elements):
    # Every element drawn (hypothesis' default fills most of an array with one
    # value, and equal values hide weighting and reduction mistakes).
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=st.nothing()))


def _labels(draw, shape, dtype):
    """Hard 0/1 labels for bool/int dtypes; soft labels in [0, 1] for floats
    (0, 1 and 1/2 exactly, often)."""
    if dtype in (tf.bool, tf.int32, tf.int64):
        values = _array(draw, np.int64, shape, _HARD_LABELS)
    else:
        values = _array(draw, np.float64, shape, _SOFT_LABELS)
    return tf.cast(tf.constant(values), dtype)


def _distances(draw, shape, dtype, margin):
    """Non-negative distances up to 2 * margin + 1 in `dtype`, with exact zeros
    and exact ties with the margin (which the caller rounds to `dtype` so that
    a tie stays a tie)."""
    unit = _array(draw, np.float64, shape, _UNIT_DISTANCES)
    values = np.where(unit == _TIE, margin, unit * (2.0 * margin + 1.0))
    return tf.cast(tf.constant(values), dtype)


def _round_to(value, dtype):
    return float(np.asarray(value, np.float64).astype(dtype.as_numpy_dtype))


@st.composite
def _case(draw, max_side, max_margin):
    """Labels, distances, a margin that the distances can tie with exactly,
    similar_label, and the loss shape S: labels and distances of shape S, or
    [S] labels with [S, 1] distances (a model's column output), or the reverse."""
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    distance_dtype = draw(st.sampled_from(DISTANCE_DTYPES))
    margin = draw(_margins(max_margin))
    if draw(st.booleans()):  # representable in the distance dtype: exact ties
        margin = _round_to(margin, distance_dtype)
    loss_shape = draw(_shapes(max_side))
    column = loss_shape + (1,)
    label_shape, distance_shape = draw(
        st.sampled_from([(loss_shape, loss_shape), (loss_shape, column), (column, loss_shape)])
    )
    y = _labels(draw, label_shape, label_dtype)
    d = _distances(draw, distance_shape, distance_dtype, margin)
    similar_label = draw(st.sampled_from([0, 1]))
    return y, d, margin, similar_label, loss_shape


def _upstream(draw, shape, dtype):
    """The gradient flowing into the loss: ones (tight comparison) or random."""
    if draw(st.booleans()):
        return tf.ones(shape, dtype)
    return tf.cast(tf.constant(_array(draw, np.float64, shape, _UPSTREAM)), dtype)


def _sample_weight(draw, loss_shape, distance_shape):
    """None, a Python or tensor scalar, per-sample weights (the shape of the
    distances or of the loss, or one trailing unit axis more), or weights
    broadcast over some axes. Non-negative, with exact zeros."""
    kinds = ["none", "number", "scalar", "per_sample", "distances", "column"]
    if len(loss_shape) >= 1:
        kinds.append("broadcast")
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "number":
        return draw(_WEIGHTS)
    shape = {
        "scalar": (),
        "per_sample": loss_shape,
        "distances": distance_shape,
        "column": loss_shape + (1,),
    }.get(kind)
    if kind == "broadcast":
        units = draw(st.lists(st.booleans(), min_size=len(loss_shape), max_size=len(loss_shape)))
        shape = tuple(1 if unit else side for unit, side in zip(units, loss_shape))
    return tf.constant(_array(draw, np.float64, shape, _WEIGHTS), tf.float32)


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------

_BITS = {
    tf.float16: tf.uint16,
    tf.bfloat16: tf.uint16,
    tf.float32: tf.uint32,
    tf.float64: tf.uint64,
}
# Relative tolerance of gradients and reduced losses: a few roundings in the
# dtype (float16/bfloat16 are computed in float32 and rounded once; Keras'
# own reduction of 16-bit losses rounds at every step).
_TOLERANCE = {tf.float16: 4e-3, tf.bfloat16: 3e-2, tf.float32: 1e-5, tf.float64: 1e-12}
# Absolute slack: float16 losses and gradients go subnormal (steps of 2**-24,
# a few of them per rounding); the other dtypes' subnormals are far smaller
# than anything these inputs produce but zeros.
_SUBNORMAL_SLACK = {tf.float16: 2.0**-18}


def _assert_bitwise_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
    np.testing.assert_array_equal(
        tf.bitcast(got, _BITS[got.dtype]).numpy(),
        tf.bitcast(want, _BITS[want.dtype]).numpy(),
        err_msg=f"bits differ: got {_as_float64(got)}, want {_as_float64(want)}",
    )


def _as_float64(x):
    return tf.cast(x, tf.float64).numpy()


def _slack(*dtypes):
    return max(_SUBNORMAL_SLACK.get(tf.as_dtype(dtype), 1e-30) for dtype in dtypes)


def _assert_close(got, want, tol, scale=0.0, slack=None):
    """Same dtype and shape; non-finite values equal; finite ones within
    tol * (|want| + scale) (scale: the size of the terms that cancelled), plus
    the subnormal slack of `got`'s dtype, or `slack`."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
    got64, want64 = _as_float64(got), _as_float64(want)
    finite = np.isfinite(want64)
    np.testing.assert_array_equal(got64[~finite], want64[~finite])
    bound = tol * (np.abs(want64) + scale) + (_slack(got.dtype) if slack is None else slack)
    excess = np.abs(got64 - want64) - bound
    assert np.all(np.isfinite(got64[finite])) and not np.any(excess[finite] > 0), (
        f"got {got64}, want {want64}, tolerance {bound}"
    )


def _gradient_scale(d, margin, upstream):
    """Per-element size of the two terms of y*2d - (1-y)*2*max(m-d, 0) times
    the upstream gradient: the rounding of either grouping is relative to it."""
    d64 = _as_float64(d)
    scale = 2.0 * (d64 + np.maximum(float(margin) - d64, 0.0))
    return scale * np.abs(_as_float64(upstream)).reshape(d64.shape)


def _function_and_reference(y, d, margin, similar_label, upstream):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(d)
        fused = contrastive_loss(y, d, margin, similar_label)
        reference = contrastive_loss_reference(y, d, margin, similar_label)
    return (
        fused,
        tape.gradient(fused, d, output_gradients=upstream),
        reference,
        tape.gradient(reference, d, output_gradients=upstream),
    )


def _check_function(
    y, d, margin, similar_label, upstream, fused, fused_grad, reference, reference_grad
):
    _assert_bitwise_equal(fused, reference)
    # The gradient at an exact tie d == margin is 0 both ways: max(m-d, 0)
    # has gradient 1 or 0 there depending on TF's tie rule, but it is
    # multiplied by 2*max(m-d, 0) = 0, so ties stay in the gradient checks too.
    tol = (
        _TOLERANCE[d.dtype]
        if d.dtype in (tf.float16, tf.bfloat16)
        else 4 * np.finfo(d.dtype.as_numpy_dtype).eps
    )
    _assert_close(fused_grad, reference_grad, tol, _gradient_scale(d, margin, upstream))


# ---------------------------------------------------------------------------
# contrastive_loss vs contrastive_loss_reference
# ---------------------------------------------------------------------------


@st.composite
def _function_inputs(draw):
    y, d, margin, similar_label, loss_shape = draw(_case(max_side=5, max_margin=1000.0))
    margin_kind = draw(st.sampled_from(["number", "number", "float64", "float32"]))
    if margin_kind != "number":
        # A scalar tensor margin (a margin schedule's variable): the op casts
        # it to float64, the reference to the compute dtype.
        margin = tf.constant(margin, margin_kind)
    upstream = _upstream(draw, loss_shape, d.dtype)
    return y, d, margin, similar_label, upstream


@_settings(400)
@given(_function_inputs())
def test_function_matches_reference_eager(inputs):
    y, d, margin, similar_label, upstream = inputs
    results = _function_and_reference(y, d, margin, similar_label, upstream)
    _check_function(y, d, margin, similar_label, upstream, *results)


def _traced_per_sample(y, d, margin, upstream, similar_label):
    with tf.GradientTape() as tape:
        tape.watch(d)
        loss = contrastive_loss(y, d, margin, similar_label)
    return loss, tape.gradient(loss, d, output_gradients=upstream)


# Traced functions, reused across examples. "known": one function per pair of
# ranks, whose reduce_retracing relaxes the dimensions to unknown ones once
# other shapes of those ranks come. "unknown": labels and distances of unknown
# rank (an input_signature per dtype pair), prepare_inputs' run-time alignment.
# The margin is a float64 tensor (a Python float would retrace per value).
# Mixing one known and one unknown rank is test_known_and_unknown_rank_trace.
_TRACED_PER_SAMPLE = {}


def _traced_per_sample_function(rank_mode, y, d, similar_label):
    if rank_mode == "known":
        key = (rank_mode, y.shape.rank, d.shape.rank)
        make = lambda: tf.function(_traced_per_sample, reduce_retracing=True)  # noqa: E731
    else:
        key = (rank_mode, y.dtype, d.dtype, similar_label)
        signature = [
            tf.TensorSpec(None, y.dtype),
            tf.TensorSpec(None, d.dtype),
            tf.TensorSpec([], tf.float64),
            tf.TensorSpec(None, d.dtype),
        ]
        make = lambda: tf.function(  # noqa: E731
            lambda y, d, margin, upstream: _traced_per_sample(
                y, d, margin, upstream, similar_label
            ),
            input_signature=signature,
        )
    if key not in _TRACED_PER_SAMPLE:
        _TRACED_PER_SAMPLE[key] = make()
    function = _TRACED_PER_SAMPLE[key]
    if rank_mode == "known":
        return lambda *args: function(*args, similar_label)
    return function


@_settings(60)
@given(_function_inputs(), st.sampled_from(["known", "unknown"]))
def test_function_matches_reference_in_tf_function(inputs, rank_mode):
    y, d, margin, similar_label, upstream = inputs
    margin = tf.cast(margin, tf.float64)
    function = _traced_per_sample_function(rank_mode, y, d, similar_label)
    fused, fused_grad = function(y, d, margin, upstream)
    # The oracle is the eager reference (a graph of it could be rewritten).
    _, _, reference, reference_grad = _function_and_reference(y, d, margin, similar_label, upstream)
    _check_function(
        y, d, margin, similar_label, upstream, fused, fused_grad, reference, reference_grad
    )


# Hypothesis found this: one side of known rank and the other of unknown rank
# used to fail to trace (a squeeze built for a side that cannot lose an axis).
@pytest.mark.parametrize("function", [contrastive_loss, contrastive_loss_reference])
def test_known_and_unknown_rank_trace(function):
    traced = tf.function(
        lambda y, d: function(y, d),
        input_signature=[tf.TensorSpec([3], tf.float32), tf.TensorSpec(None, tf.float32)],
    )
    y, d = tf.constant([1.0, 0.0, 1.0]), tf.constant([0.5, 0.25, 2.0])
    _assert_bitwise_equal(traced(y, d), contrastive_loss_reference(y, d))


# ---------------------------------------------------------------------------
# ContrastiveLoss vs Keras' own reduction of the reference
# ---------------------------------------------------------------------------


@st.composite
def _class_inputs(draw, margins=None, loss_dtypes=LOSS_DTYPES):
    loss_dtype = draw(st.sampled_from(loss_dtypes))
    # A float16 loss: margins and distances small enough that Keras' float16
    # sums of <= 64 losses (weights <= 2) stay finite; the fused op sums in
    # float64 and would not overflow where Keras does.
    y, d, margin, similar_label, loss_shape = draw(
        _case(max_side=4, max_margin=8.0 if loss_dtype == "float16" else 1000.0)
    )
    if margins is not None:
        margin = draw(st.sampled_from(margins))
    reduction = draw(st.sampled_from(REDUCTIONS))
    sample_weight = _sample_weight(draw, loss_shape, tuple(d.shape))
    upstream = draw(_mixture(st.floats(-3.0, 3.0), [1.0], odds=2))
    return y, d, margin, similar_label, reduction, loss_dtype, sample_weight, upstream


def _check_class(d, loss_dtype, got, want):
    (loss, grad), (want_loss, want_grad) = got, want
    # Keras casts the inputs to the loss dtype: the value is computed in it.
    loss_dtype = tf.as_dtype(loss_dtype or keras.backend.floatx())
    _assert_close(loss, want_loss, _TOLERANCE[loss_dtype])
    # The gradient is computed in the loss dtype (by Keras: a rounding per
    # step, subnormals included) and cast to the distances' dtype at the end:
    # values a rounding apart in the loss dtype can round to neighbours there.
    # Per element it is upstream * w * dloss/dd / divisor, rounded in another
    # order by each side; relative to the largest element.
    _assert_close(
        grad,
        want_grad,
        max(_TOLERANCE[loss_dtype], _TOLERANCE[d.dtype]),
        float(np.max(np.abs(_as_float64(want_grad)), initial=0.0)),
        _slack(loss_dtype, d.dtype),
    )


def _example(
    y, d, margin, reduction, sample_weight, upstream=2.0, similar_label=1, loss_dtype=None
):
    return example(
        (
            tf.constant(y, tf.float32),
            tf.constant(d, tf.float32),
            margin,
            similar_label,
            reduction,
            loss_dtype,
            sample_weight,
            upstream,
        )
    )


# Keras' corner cases, always run: a [1] loss (here from [1] labels and a
# [1, 1] model output) with a scalar weight is returned unreduced, w * loss
# (no division by the weight); an empty [0] loss is returned unreduced, but
# reduced to 0 once a [0, 1] weight expands it; a scalar loss with a [1]
# weight is squeezed and returned unreduced.
@_example([0.0], [[0.25]], 1.0, "mean_with_sample_weight", 0.5)
@_example([0.0], [[0.25]], 1.0, "mean_with_sample_weight", tf.constant(0.5))
@_example([0.0, 1.0], [0.25, 0.5], 1.0, "mean_with_sample_weight", tf.constant([[0.5], [1.5]]))
@_example(np.zeros([0]), np.zeros([0, 1]), 1.0, "sum_over_batch_size", tf.zeros([0, 1]))
@_example(0.0, 0.25, 1.0, "mean_with_sample_weight", tf.constant([0.5]))
@_settings(300)
@given(_class_inputs())
def test_class_matches_keras_reduction_eager(inputs):
    y, d, margin, similar_label, reduction, loss_dtype, sample_weight, upstream = inputs
    kwargs = dict(margin=margin, similar_label=similar_label, reduction=reduction, dtype=loss_dtype)
    got = loss_and_gradient(ContrastiveLoss(**kwargs), y, d, sample_weight, upstream)
    want = loss_and_gradient(KerasReducedReference(**kwargs), y, d, sample_weight, upstream)
    _check_class(d, loss_dtype, got, want)


# Traced functions, reused across examples, one per loss configuration and
# argument structure. "known": reduce_retracing, static shapes first and
# relaxed dimensions when a configuration comes back. "unknown_dims": an
# input_signature with every dimension unknown (ranks stay known: Keras'
# reduction needs them). The oracle runs in the same graph: with unknown
# dimensions Keras' reduction takes other branches than with known ones (a
# [None] loss with a scalar weight is reduced, a [1] one is returned
# unreduced), and the class must follow them.
_TRACED = {}


def _unknown_dims_spec(x, loss_rank):
    """x's spec with unknown dimensions, but for the trailing unit axis of a
    [B, 1] against [B] pair: prepare_inputs (and Keras' reduction) squeeze
    it only when it is known to be 1, and reject [None, None] distances
    against [None] labels when traced (see the report of this test)."""
    dims = [None] * x.shape.rank
    if x.shape.rank > loss_rank:
        dims[-1] = x.shape[-1]
    return tf.TensorSpec(dims, x.dtype)


def _traced_class(shape_mode, margin, similar_label, reduction, loss_dtype, y, d, sample_weight):
    loss_rank = min(y.shape.rank, d.shape.rank)
    weight_spec = None if sample_weight is None else _unknown_dims_spec(sample_weight, loss_rank)
    key = (
        shape_mode,
        margin,
        similar_label,
        reduction,
        loss_dtype,
        y.dtype,
        d.dtype,
        y.shape.rank,
        d.shape.rank,
        weight_spec,
    )
    if key not in _TRACED:
        kwargs = dict(
            margin=margin, similar_label=similar_label, reduction=reduction, dtype=loss_dtype
        )
        fused, oracle = ContrastiveLoss(**kwargs), KerasReducedReference(**kwargs)

        def both(y, d, upstream, sample_weight=None):
            return (
                loss_and_gradient(fused, y, d, sample_weight, upstream),
                loss_and_gradient(oracle, y, d, sample_weight, upstream),
            )

        if shape_mode == "known":
            _TRACED[key] = tf.function(both, reduce_retracing=True)
        else:
            specs = [
                _unknown_dims_spec(y, loss_rank),
                _unknown_dims_spec(d, loss_rank),
                tf.TensorSpec([], tf.float64),
            ]
            _TRACED[key] = tf.function(
                both, input_signature=specs + ([] if weight_spec is None else [weight_spec])
            )
    return _TRACED[key]


@_settings(50)
@given(
    _class_inputs(margins=[0.0, 1.0, 2.5], loss_dtypes=[None, "float16", "float64"]),
    st.sampled_from(["known", "unknown_dims"]),
)
def test_class_matches_keras_reduction_in_tf_function(inputs, shape_mode):
    y, d, margin, similar_label, reduction, loss_dtype, sample_weight, upstream = inputs
    if isinstance(sample_weight, float):
        sample_weight = tf.constant(sample_weight)
    both = _traced_class(
        shape_mode, margin, similar_label, reduction, loss_dtype, y, d, sample_weight
    )
    args = (y, d, tf.constant(upstream, tf.float64))
    got, want = both(*args) if sample_weight is None else both(*args, sample_weight)
    _check_class(d, loss_dtype, got, want)


# ---------------------------------------------------------------------------
# Loss from pair embeddings
# ---------------------------------------------------------------------------

_EMBEDDING_VALUES = _mixture(st.floats(-2.0, 2.0), [0.0, 1.0, -1.0])


@st.composite
def _embedding_cases(draw):
    """Labels [...], embeddings a, b [..., D] with identical pairs and zero
    rows mixed in, a distance, a margin and similar_label."""
    rows = draw(
        st.integers(0, 2).flatmap(lambda rank: st.tuples(*[st.sampled_from([0, 1, 2, 5])] * rank))
    )
    dim = draw(st.sampled_from([1, 2, 3, 8, 17]))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    a = draw(hnp.arrays(np.float64, rows + (dim,), elements=_EMBEDDING_VALUES))
    b = draw(hnp.arrays(np.float64, rows + (dim,), elements=_EMBEDDING_VALUES))
    copy = draw(hnp.arrays(np.bool_, rows))  # identical pairs
    b = np.where(copy[..., None], a, b)
    labels = draw(hnp.arrays(np.float64, rows, elements=_SOFT_LABELS))
    return (
        labels,
        a.astype(dtype),
        b.astype(dtype),
        draw(st.sampled_from(["euclidean", "cosine", "manhattan"])),
        draw(_margins(10.0)),
        draw(st.integers(0, 1)),
    )


@_settings(60)
@given(_embedding_cases())
def test_embedding_loss_and_gradients_equal_the_reference(case):
    from fused_contrastive import (
        contrastive_loss_from_embeddings,
        contrastive_loss_from_embeddings_reference,
    )

    labels, a, b, distance, margin, similar_label = case
    a, b = tf.constant(a), tf.constant(b)
    results = []
    for loss_fn in (contrastive_loss_from_embeddings, contrastive_loss_from_embeddings_reference):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = loss_fn(labels, a, b, margin, distance, similar_label)
        results.append((loss, *tape.gradient(loss, [a, b])))
    rtol = 1e-12 if a.dtype == tf.float64 else 1e-5
    for got, want in zip(*results):
        got, want = np.asarray(got), np.asarray(want)
        assert np.all(np.isfinite(got))
        # Cosine gradients cancel: rounding is relative to the scale of the terms.
        scale = max(1.0, margin) ** 2 * max(1.0, np.max(np.abs(want), initial=0.0))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)

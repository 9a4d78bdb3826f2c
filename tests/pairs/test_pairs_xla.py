"""cc/tf/xla/pairs.cc and cc/ffi/pairs.cc: the XLA lowerings against the compiled kernels."""

import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    DISTANCES,
    FUSED_REDUCTIONS,
    HLO_ON_CPU,
    ODD_BOOL_AS_LABELS,
    bits,
    embeddings,
    odd_bool_labels,
    random_distances,
    random_labels,
    run_tests_under_hlo,
)

from fused_contrastive import (
    ContrastiveLoss,
    _library,
    contrastive_loss,
    contrastive_loss_from_embeddings,
)


# --- The ops of the loss from pair embeddings ----------------------------------------------

_LIBRARY = _library.op_library
# (rtol, atol) of XLA's results against the kernels', per embedding dtype.
EMBEDDING_TOL = {
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1e-2),
    "float32": (1e-6, 1e-6),
    "float64": (1e-13, 1e-14),
}


def _assert_embedding_outputs_close(got, want, dtype):
    # On XLA's GPU backend the ops are HLO, which sums each row in its own
    # order: float32 results differ from the kernel's in the last bits (16-bit
    # ones by at most one rounding). On the CPU backend they are the kernels.
    rtol, atol = EMBEDDING_TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert np.all(np.isfinite(tf.cast(g, tf.float64))), i
        np.testing.assert_allclose(
            tf.cast(g, tf.float64),
            tf.cast(w, tf.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"output {i}",
        )


def _embedding_loss_and_grads(y, a, b, upstream, margin, distance, similar_label=1):
    loss, coef = _LIBRARY.fused_contrastive_embedding_contrastive_loss(
        y, a, b, margin, distance=distance, similar_label=similar_label
    )
    grad_a, grad_b = _LIBRARY.fused_contrastive_embedding_contrastive_loss_grad(
        a, b, coef, upstream, distance=distance
    )
    return loss, coef, grad_a, grad_b


def _reduced_embedding_outputs(
    y, a, b, w, margin, loss_scale, distance, reduction, similar_label=1
):
    return _LIBRARY.fused_contrastive_embedding_contrastive_loss_reduced(
        y,
        a,
        b,
        w,
        margin,
        loss_scale,
        distance=distance,
        reduction=reduction,
        similar_label=similar_label,
    )


def _graph_and_xla(f, *args, **kwargs):
    def call(*args):
        return f(*args, **kwargs)

    return (tf.function(call, jit_compile=False)(*args), tf.function(call, jit_compile=True)(*args))


def _margin(value=1.0):
    return tf.constant(value, tf.float64)


@pytest.mark.parametrize("label_dtype", ["bool", "int32", "float32"])
@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_embedding_ops_under_xla_match_the_kernels(rng, distance, dtype, label_dtype):
    # [3, 5] pairs whose first rows are identical, a zero vector, both zero.
    a, b = embeddings(rng, (3, 5, 7), dtype)
    y = random_labels(rng, (3, 5), label_dtype)
    per_row = tf.cast(rng.uniform(0.5, 2.0, size=(3, 5)), dtype)
    for upstream, similar_label in ((per_row, 1), (tf.constant(0.5, dtype), 0)):
        want, got = _graph_and_xla(
            _embedding_loss_and_grads, y, a, b, upstream, _margin(1.2), distance, similar_label
        )
        _assert_embedding_outputs_close(got, want, dtype)
    _, coef, grad_a, grad_b = got
    assert coef.shape == [3, 5, 5 if distance == "cosine" else 1]  # cosine: 3 and 2 scales
    # Both-zero pair: zero distance (Euclidean, Manhattan) or norm (cosine).
    for grad in (grad_a, grad_b):
        np.testing.assert_array_equal(tf.cast(grad[0, 2], tf.float64), 0.0)
        if distance != "cosine":  # identical pair
            np.testing.assert_array_equal(tf.cast(grad[0, 0], tf.float64), 0.0)


@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
def test_reduced_embedding_op_under_xla_matches_the_kernel(rng, reduction, distance, dtype):
    a, b = embeddings(rng, (3, 5, 7), dtype)
    y = random_labels(rng, (3, 5), "float32")
    weight_forms = {
        "per-row": tf.cast(rng.uniform(0.1, 2.0, size=(3, 5)), dtype),
        "scalar": tf.constant(0.75, dtype),
        "zero total": tf.zeros([3, 5], dtype),
    }
    for form, w in weight_forms.items():
        want, got = _graph_and_xla(
            _reduced_embedding_outputs, y, a, b, w, _margin(1.2), _margin(0.5), distance, reduction
        )
        _assert_embedding_outputs_close(got, want, dtype)
        # The weights are added in float64 by both: only the order differs.
        np.testing.assert_allclose(got[3], want[3], rtol=1e-15, err_msg=form)


def test_reduced_embedding_op_handles_more_rows_than_a_sum_chunk(rng):
    # 100 rows: several float32 chunks of 32 and a padded last one.
    a, b = embeddings(rng, (4, 25, 16), "float32")
    y = random_labels(rng, (4, 25), "float32")
    w = tf.constant(rng.uniform(0.1, 2.0, size=(4, 25)), tf.float32)
    for distance in DISTANCES:
        want, got = _graph_and_xla(
            _reduced_embedding_outputs, y, a, b, w, _margin(), _margin(), distance, "weighted_mean"
        )
        _assert_embedding_outputs_close(got, want, "float32")


@pytest.mark.parametrize("distance", DISTANCES)
def test_contrastive_loss_from_embeddings_and_gradients_under_xla(rng, distance):
    a, b = embeddings(rng, (3, 5, 7), "float32")
    y = random_labels(rng, (3, 5), "float32")
    upstream = tf.constant(rng.uniform(0.5, 2.0, size=(3, 5)), tf.float32)

    def loss_and_grads(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = contrastive_loss_from_embeddings(y, a, b, 1.2, distance)
        return (loss, *tape.gradient(loss, [a, b], output_gradients=upstream))

    want, got = _graph_and_xla(loss_and_grads, a, b)
    _assert_embedding_outputs_close(got, want, "float32")


@pytest.mark.parametrize("reduction", FUSED_REDUCTIONS)
def test_keras_class_with_distance_under_xla_matches(rng, reduction):
    a, b = embeddings(rng, (33, 6), "float32")
    pairs = tf.stack([a, b], axis=1)
    y = random_labels(rng, (33,), "float32")
    w = tf.constant(rng.uniform(0.1, 2.0, size=33), tf.float32)
    for distance in DISTANCES:

        def loss_and_grad(pairs):
            with tf.GradientTape() as tape:
                tape.watch(pairs)
                loss = ContrastiveLoss(reduction=reduction, distance=distance)(y, pairs, w)
            return loss, tape.gradient(loss, pairs)

        want, got = _graph_and_xla(loss_and_grad, pairs)
        _assert_embedding_outputs_close(got, want, "float32")


def test_xla_runs_the_embedding_lowerings_not_a_fallback():
    def all_three(y, a, b):
        loss, coef, grad_a, _ = _embedding_loss_and_grads(
            y, a, b, tf.constant(1.0), _margin(), "cosine"
        )
        reduced = _reduced_embedding_outputs(
            y, a, b, tf.constant(1.0), _margin(), _margin(), "manhattan", "mean"
        )
        return loss, grad_a, reduced[0]

    f = tf.function(all_three, jit_compile=True)
    with tf.device("/CPU:0"):
        hlo = f.experimental_get_compiler_ir(tf.zeros([4]), tf.zeros([4, 3]), tf.ones([4, 3]))(
            stage="hlo"
        )
    calls = [line for line in hlo.splitlines() if " custom-call(" in line]
    if HLO_ON_CPU:  # the other backends' lowering: plain HLO, no call out
        assert not calls and " reduce(" in hlo, calls
        return
    # On XLA's CPU backend each op is one typed-FFI call of its fused kernel.
    targets = {
        "EmbeddingContrastiveLoss": "fused_contrastive_embedding_loss",
        "EmbeddingContrastiveLossGrad": "fused_contrastive_embedding_loss_grad",
        "EmbeddingContrastiveLossReduced": "fused_contrastive_embedding_loss_reduced",
    }
    assert len(calls) == len(targets), calls
    for op, target in targets.items():
        assert any(
            f'op_type="FusedContrastive>{op}"' in line
            and f'custom_call_target="{target}"' in line
            and "API_VERSION_TYPED_FFI" in line
            for line in calls
        ), op


@pytest.mark.skipif(HLO_ON_CPU, reason="the HLO lowering sums rows in XLA's order")
@pytest.mark.parametrize("shape", [(3, 5, 7), (0, 4), (4,)])
@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_xla_cpu_embedding_ops_are_the_cpu_kernels_bit_for_bit(rng, distance, dtype, shape):
    a, b = embeddings(rng, shape, dtype)
    y = random_labels(rng, shape[:-1], "int32")
    w = tf.cast(rng.uniform(0.1, 2.0, size=shape[:-1]), dtype)

    def all_three(y, a, b, w):
        return (
            *_embedding_loss_and_grads(y, a, b, w, _margin(1.2), distance, 0),
            *_reduced_embedding_outputs(
                y, a, b, w, _margin(1.2), _margin(0.5), distance, "weighted_mean"
            ),
        )

    with tf.device("/CPU:0"):
        want, got = _graph_and_xla(all_three, y, a, b, w)
    for i, (g, x) in enumerate(zip(got, want)):
        assert g.shape == x.shape, i
        np.testing.assert_array_equal(bits(g), bits(x), err_msg=f"output {i}")


def test_xla_embedding_ops_read_any_nonzero_bool_byte_as_true(rng):
    a, b = embeddings(rng, (4, 5), "float32", special=False)
    for distance in DISTANCES:

        def outputs(y):
            loss, coef = _LIBRARY.fused_contrastive_embedding_contrastive_loss(
                y, a, b, _margin(), distance=distance
            )
            return (
                loss,
                coef,
                *_reduced_embedding_outputs(
                    y, a, b, tf.constant(1.0), _margin(), _margin(), distance, "sum"
                ),
            )

        f = tf.function(outputs, jit_compile=True)
        for got, want in zip(f(odd_bool_labels()), f(tf.constant(ODD_BOOL_AS_LABELS))):
            np.testing.assert_array_equal(got, want)


def _compile_error(f, *args):
    """What compiling f for args raises: XLA compiles without running here."""
    with pytest.raises(ValueError, match="Failed getting HLO text") as error:
        f.experimental_get_compiler_ir(*args)(stage="hlo")
    return str(error.value)


def test_xla_embedding_ops_reject_bad_constant_margin_at_compile_time():
    def loss(y, a):
        bad = tf.constant(-1.0, tf.float64)  # a Const node of the graph XLA compiles
        return _embedding_loss_and_grads(y, a, a, tf.constant(1.0), bad, "cosine")

    def reduced(y, a):
        bad = tf.constant(-1.0, tf.float64)
        return _reduced_embedding_outputs(
            y, a, a, tf.constant(1.0), bad, _margin(), "euclidean", "sum"
        )

    for f in (loss, reduced):
        message = _compile_error(tf.function(f, jit_compile=True), tf.zeros([3]), tf.zeros([3, 4]))
        assert "margin must be finite and non-negative, got -1" in message


@pytest.mark.parametrize("margin", [-1.0, float("nan"), float("inf")])
def test_xla_embedding_ops_bad_run_time_margin_gives_nan(rng, margin):
    m = tf.Variable(margin, dtype=tf.float64)
    a, b = embeddings(rng, (4, 3), "float32", special=False)
    y = tf.constant([1.0, 0.0, 1.0, 0.0])
    for distance in DISTANCES:

        def outputs(a, b):
            loss, coef, grad_a, grad_b = _embedding_loss_and_grads(
                y, a, b, tf.constant(1.0), m, distance
            )
            reduced = _reduced_embedding_outputs(
                y, a, b, tf.constant(1.0), m, _margin(), distance, "mean"
            )
            return loss, coef, grad_a, grad_b, *reduced[:3]

        results = list(tf.function(outputs, jit_compile=True)(a, b))
        # Cosine's row scales (coefficients 3 and 4) do not depend on the margin.
        results[1] = results[1][..., :3]
        for output in results:
            assert np.all(np.isnan(output.numpy())), (distance, output)


def _relaxed(f, inputs):
    """f under XLA, traced for inputs of unknown rank: only XLA sees their shapes."""
    return tf.function(f, input_signature=[tf.TensorSpec(None)] * inputs, jit_compile=True)


@pytest.mark.parametrize(
    "labels, a, b",
    [([3], [3, 4], [3, 5]), ([2], [3, 4], [3, 4]), ([3], [3, 0], [3, 0]), ([], [], [])],
)
def test_xla_embedding_shape_mismatch_at_compile_time(labels, a, b):
    def loss(y, a, b):
        return _LIBRARY.fused_contrastive_embedding_contrastive_loss(
            y, a, b, _margin(), distance="cosine"
        )[0]

    def reduced(y, a, b):
        return _reduced_embedding_outputs(
            y, a, b, tf.constant(1.0), _margin(), _margin(), "euclidean", "sum"
        )[0]

    for f in (loss, reduced):
        message = _compile_error(_relaxed(f, 3), tf.zeros(labels), tf.zeros(a), tf.zeros(b))
        shapes = (str(shape).replace(" ", "") for shape in (labels, a, b))
        assert "embeddings_a and embeddings_b must have the same shape" in message
        assert "got labels {}, embeddings_a {} and embeddings_b {}".format(*shapes) in message


def test_xla_embedding_per_row_inputs_must_be_scalars_or_of_the_labels_shape():
    def reduced(y, a, w):
        return _reduced_embedding_outputs(
            y, a, a, w, _margin(), _margin(), "euclidean", "weighted_mean"
        )[0]

    def grads(a, coef, u):
        return _LIBRARY.fused_contrastive_embedding_contrastive_loss_grad(
            a, a, tf.cast(coef, tf.float64), u, distance="euclidean"
        )[0]

    assert "sample_weight must be a scalar or of shape [3], got [4]" in _compile_error(
        _relaxed(reduced, 3), tf.zeros([3]), tf.zeros([3, 2]), tf.zeros([4])
    )
    assert "upstream must be a scalar or of shape [3], got [3,1]" in _compile_error(
        _relaxed(grads, 3), tf.zeros([3, 2]), tf.zeros([3, 1]), tf.zeros([3, 1])
    )
    assert "row_coefficients must have shape [3,1], got [3,2]" in _compile_error(
        _relaxed(grads, 3), tf.zeros([3, 2]), tf.zeros([3, 2]), tf.zeros([])
    )


@pytest.mark.skipif(HLO_ON_CPU, reason="this is the run it starts")
def test_the_hlo_lowering_of_the_embedding_ops_passes_the_same_tests(tmp_path):
    # XLA's GPU backend lowers the embedding ops to HLO, the CPU backend to
    # calls of the CPU kernels. With FUSED_CONTRASTIVE_XLA_CPU_HLO=1 the CPU
    # backend compiles the HLO too: the embedding tests above then check it
    # against the kernels without a GPU.
    run_tests_under_hlo(__file__, tmp_path, "embedding")


@pytest.mark.parametrize(
    "label_shape, pairs_shape",
    [((6,), (6, 3)), ((6, 1), (6, 3)), ((6,), (6, 1, 3)), ((2, 3), (2, 3, 4)), ((), (5,))],
)
def test_unknown_rank_under_xla_gives_the_eager_values_embedding_and_distance(
    rng, label_shape, pairs_shape
):
    # Issue 18 (9): the run-time alignment of a trailing unit axis used to be
    # a tf.cond around tf.squeeze, whose untaken branch XLA could not compile.
    y = random_labels(rng, label_shape, "float32")
    a, b = embeddings(rng, pairs_shape, "float32")
    d = random_distances(rng, pairs_shape[:-1], "float32")

    def from_embeddings(y, a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = contrastive_loss_from_embeddings(y, a, b, 0.9, "cosine")
            total = tf.reduce_sum(loss * 3.0)
        return (loss, *tape.gradient(total, [a, b]))

    def from_distances(y, d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = contrastive_loss(y, d, 0.9)
            total = tf.reduce_sum(loss * 3.0)
        return loss, tape.gradient(total, d)

    for f, inputs in ((from_embeddings, (y, a, b)), (from_distances, (y, d))):
        want = f(*inputs)
        compiled = _relaxed(f, len(inputs))
        for _ in range(2):  # every call, not only the first
            got = compiled(*inputs)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)

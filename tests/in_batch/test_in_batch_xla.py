"""cc/tf/xla/in_batch.cc and cc/ffi/in_batch.cc: the in-batch XLA lowerings against the kernels.

On XLA's CPU backend the ops are typed-FFI calls of the CPU kernels; every
other backend (GPU) gets the HLO lowering, a While loop over blocks of anchor
rows. FUSED_CONTRASTIVE_XLA_CPU_HLO=1 puts the HLO lowering on the CPU backend
too: the last test runs this file again so, which checks it without a GPU.
"""

import re

import numpy as np
import pytest
import tensorflow as tf
from support import HLO_ON_CPU, bits, run_python, run_tests_under_hlo

from fused_contrastive import _library
from fused_contrastive._inputs import PAIR_WEIGHTINGS, all_anchors
from fused_contrastive.reference import in_batch_contrastive_loss_reference
from test_in_batch import numpy_in_batch

_LIBRARY = _library.op_library
DTYPES = ["float32", "float64"]
DISTANCES = ["euclidean", "cosine"]
WEIGHTINGS = list(PAIR_WEIGHTINGS)
REDUCTIONS = ["sum", "mean", "weighted_mean"]
TARGETS = {
    "InBatchContrastiveLoss": "fused_contrastive_in_batch_loss",
    "InBatchContrastiveLossGrad": "fused_contrastive_in_batch_loss_grad",
    "InBatchContrastiveLossReduced": "fused_contrastive_in_batch_loss_reduced",
}
# Several loop iterations and an overlapping last block at B = 37.
BLOCK = 8
# (rtol, atol) of the HLO lowering against the kernels on inputs without
# near-duplicate rows: the same formulas, sums and products in another order.
HLO_TOL = {"float32": (2e-5, 2e-6), "float64": (1e-12, 1e-13)}


def _f64(value):
    return tf.constant(value, tf.float64)


def _batch(rng, rows, dim, dtype, classes=4):
    labels = tf.constant(rng.integers(0, classes, size=rows), tf.int64)
    e = tf.constant(rng.normal(size=(rows, dim)) / np.sqrt(dim), dtype)
    return labels, e


def _per_row(rng, rows, dtype):
    return tf.constant(rng.uniform(0.5, 2.0, size=rows), dtype)


def _all_three(
    labels,
    e,
    u,
    w,
    margin,
    positive_margin,
    loss_scale,
    *,
    distance,
    pair_weighting,
    reduction="weighted_mean",
    max_block_rows=BLOCK,
    miner="none",
):
    attrs = dict(
        distance=distance,
        pair_weighting=pair_weighting,
        max_block_rows=max_block_rows,
        miner=miner,
        miner_epsilon=0.05,
    )
    anchors = all_anchors(e)
    loss = _LIBRARY.fused_contrastive_in_batch_contrastive_loss(
        labels, e, anchors, margin, positive_margin, **attrs
    )
    grad, grad_loss = _LIBRARY.fused_contrastive_in_batch_contrastive_loss_grad(
        labels, e, anchors, u, margin, positive_margin, **attrs
    )
    reduced = _LIBRARY.fused_contrastive_in_batch_contrastive_loss_reduced(
        labels, e, anchors, w, margin, positive_margin, loss_scale, reduction=reduction, **attrs
    )
    # The gradient op's loss, from its sweep, last: the others keep their places.
    return (loss, grad, *reduced, grad_loss)


def _graph_and_xla(f, *args, **kwargs):
    def call(*args):
        return f(*args, **kwargs)

    with tf.device("/CPU:0"):
        return (
            tf.function(call, jit_compile=False)(*args),
            tf.function(call, jit_compile=True)(*args),
        )


def _assert_same(got, want, dtype, tol=None):
    """The CPU backend's calls give the kernels' bits; the HLO lowering agrees
    within `tol` (HLO_TOL by default)."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        if HLO_ON_CPU:
            rtol, atol = tol or HLO_TOL[dtype]
            assert np.all(np.isfinite(g.numpy())), i
            np.testing.assert_allclose(
                g.numpy(), w.numpy(), rtol=rtol, atol=atol, err_msg=f"output {i}"
            )
        else:
            np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"output {i}")


@pytest.mark.parametrize("rows", [0, 1, 2, 37])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair_weighting", WEIGHTINGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_in_batch_ops_under_xla_match_the_kernels(rng, distance, pair_weighting, dtype, rows):
    labels, e = _batch(rng, rows, 6, dtype)
    u = _per_row(rng, rows, dtype)
    want, got = _graph_and_xla(
        _all_three,
        labels,
        e,
        u,
        u,
        _f64(1.2),
        _f64(0.1),
        _f64(0.5),
        distance=distance,
        pair_weighting=pair_weighting,
    )
    _assert_same(got, want, dtype)
    assert got[0].shape == [rows] and got[1].shape == got[3].shape == [rows, 6]
    # The gradient op's sweep gives the loss op's bits (the one-sweep training path relies on it).
    np.testing.assert_array_equal(bits(want[-1]), bits(want[0]))
    _assert_same(got[-1:], got[:1], dtype)
    if rows < 2:  # no pairs: nothing to pay, nothing to move
        for output in got[:4]:
            np.testing.assert_array_equal(output, 0.0)


@pytest.mark.parametrize("miner", ["batch_hard", "multi_similarity"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_mined_in_batch_ops_under_xla_match_the_kernels(rng, distance, dtype, miner):
    # The HLO lowering finds each row's hardest pairs in its counting loop, as
    # the kernel's statistics sweep finds them (issue 21).
    labels, e = _batch(rng, 37, 6, dtype)
    u = _per_row(rng, 37, dtype)
    for pair_weighting in WEIGHTINGS:
        want, got = _graph_and_xla(
            _all_three,
            labels,
            e,
            u,
            u,
            _f64(1.2),
            _f64(0.1),
            _f64(0.5),
            distance=distance,
            pair_weighting=pair_weighting,
            miner=miner,
        )
        _assert_same(got, want, dtype)
        _assert_same(got[-1:], got[:1], dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pair_weighting", WEIGHTINGS)
def test_reduced_in_batch_op_under_xla_matches_the_kernel(rng, pair_weighting, reduction):
    labels, e = _batch(rng, 37, 5, "float32")
    u = _per_row(rng, 37, "float32")
    weight_forms = {"per-row": u, "scalar": tf.constant(0.75), "zero total": tf.zeros([37])}
    for form, w in weight_forms.items():
        for distance in DISTANCES:
            want, got = _graph_and_xla(
                _all_three,
                labels,
                e,
                u,
                w,
                _f64(1.0),
                _f64(0.0),
                _f64(0.5),
                distance=distance,
                pair_weighting=pair_weighting,
                reduction=reduction,
            )
            _assert_same(got, want, "float32")
            np.testing.assert_allclose(got[4], want[4], rtol=1e-15, err_msg=form)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_in_batch_ops_under_xla_with_duplicate_and_zero_rows(rng, distance, dtype):
    labels, e = _batch(rng, 37, 6, dtype, classes=3)
    e = e.numpy()
    labels = labels.numpy()
    e[1] = e[0]  # a positive duplicate
    labels[1] = labels[0]
    e[3] = e[2]  # a negative duplicate
    labels[3] = (labels[2] + 1) % 3
    e[4] = 0.0
    e[5] = 0.0
    labels, e = tf.constant(labels), tf.constant(e)
    u = _per_row(rng, 37, dtype)
    # The HLO takes a duplicate pair's Euclidean distance from the Gram
    # formula (the kernels recompute it from e_i - e_j), in float64 for
    # float32 rows: d is then a few float64 ulp's square root instead of 0,
    # which the tolerance allows. "active" would count that pair's positive
    # term, which is not 0 there: a positive margin makes it 0 on both paths.
    loose = distance == "euclidean" and HLO_ON_CPU and dtype == "float64"
    tol = (1e-6, 1e-6) if loose else None
    for pair_weighting in WEIGHTINGS:
        positive_margin = 1e-3 if loose and pair_weighting == "active" else 0.0
        want, got = _graph_and_xla(
            _all_three,
            labels,
            e,
            u,
            u,
            _f64(1.0),
            _f64(positive_margin),
            _f64(1.0),
            distance=distance,
            pair_weighting=pair_weighting,
        )
        _assert_same(got, want, dtype, tol)


@pytest.mark.parametrize("pair_weighting", WEIGHTINGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_in_batch_ops_under_xla_match_the_reference(rng, distance, pair_weighting):
    labels, e = _batch(rng, 37, 6, "float64")
    u = _per_row(rng, 37, "float64")

    def reference(e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = in_batch_contrastive_loss_reference(
                labels, e, 1.2, 0.1, distance, pair_weighting
            )
        return loss, tape.gradient(loss, e, output_gradients=u)

    def fused(e):
        return _all_three(
            labels,
            e,
            u,
            u,
            _f64(1.2),
            _f64(0.1),
            _f64(1.0),
            distance=distance,
            pair_weighting=pair_weighting,
        )[:2]

    want = reference(e)
    got = tf.function(fused, jit_compile=True)(e)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def _far_batch(rng, norm, two_clusters=False, rows=40, dim=16):
    """Float32 rows (as float64: their exact values) of spread about 1 about a
    point at distance `norm` from the origin, or about two opposite such
    points, each with its own classes: the Gram formula's d² cancels in
    float32 for the pairs of close rows once norm is about 50."""
    centre = rng.normal(size=dim)
    centre *= norm / np.linalg.norm(centre)
    side = np.arange(rows) % 2 if two_clusters else np.zeros(rows, int)
    e = np.where(side[:, None] == 0, centre, -centre) + rng.normal(size=(rows, dim)) / np.sqrt(dim)
    return rng.integers(0, 3, size=rows) + 3 * side, e.astype(np.float32).astype(np.float64)


def _assert_within(got, want, rtol, what):
    """Error against float64 relative to the largest |want|."""
    error = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def _assert_matches_float64(rng, labels, e, distance, pair_weighting, loss_tol, grad_tol):
    """All three ops under XLA in float32 against the float64 oracle."""
    u = rng.uniform(0.5, 2.0, size=len(labels))
    w = rng.uniform(0.5, 2.0, size=len(labels))
    margin, positive_margin = 1.5, 0.2
    f32 = lambda x: tf.constant(x, tf.float32)  # noqa: E731
    with tf.device("/CPU:0"):
        got = tf.function(
            lambda e: _all_three(
                tf.constant(labels, tf.int64),
                e,
                f32(u),
                f32(w),
                _f64(margin),
                _f64(positive_margin),
                _f64(1.0),
                distance=distance,
                pair_weighting=pair_weighting,
            ),
            jit_compile=True,
        )(f32(e))
    loss, grad, reduced, reduced_grad, scale, _ = (np.asarray(x, np.float64) for x in got)
    want_loss, want_grad = numpy_in_batch(
        labels, e, margin, positive_margin, distance, pair_weighting, upstream=u
    )
    _, want_reduced_grad = numpy_in_batch(
        labels, e, margin, positive_margin, distance, pair_weighting, upstream=w * scale
    )
    _assert_within(loss, want_loss, loss_tol, "loss")
    _assert_within(grad, want_grad, grad_tol, "gradient")
    _assert_within(reduced, scale * np.sum(w * want_loss), loss_tol, "reduced loss")
    _assert_within(reduced_grad, want_reduced_grad, grad_tol, "reduced gradient")


@pytest.mark.parametrize("norm", [100, 272, 560])
@pytest.mark.parametrize("pair_weighting", WEIGHTINGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_in_batch_ops_under_xla_with_a_large_common_offset_match_float64(
    rng, distance, pair_weighting, norm
):
    # Issue 18: the HLO lowering's Gram formula lost the Euclidean distances
    # of close rows far from the origin (float32 losses 2.7e-3 off at norm
    # 100, 0.21 at 560, gradients up to 100%) where the CPU kernel stays at
    # 1e-7. The cosine gradient of nearly parallel rows loses about
    # ulp·norm/spread in the kernels and the HLO alike (measured 2e-5 to 1.5e-4).
    labels, e = _far_batch(rng, norm)
    grad_tol = 1e-5 if distance == "euclidean" else 5e-7 * norm
    _assert_matches_float64(rng, labels, e, distance, pair_weighting, 1e-5, grad_tol)


@pytest.mark.parametrize("norm", [100, 560])
@pytest.mark.parametrize("pair_weighting", WEIGHTINGS)
def test_in_batch_ops_under_xla_with_close_rows_far_from_the_mean_match_float64(
    rng, pair_weighting, norm
):
    # Two clusters at ±offset: the batch's mean is near 0, so centring leaves
    # the pairs within a cluster cancelling; the HLO lowering takes their
    # blocks in float64 (float32 alone: losses 2.6e-2 off at norm 560).
    labels, e = _far_batch(rng, norm, two_clusters=True)
    _assert_matches_float64(rng, labels, e, "euclidean", pair_weighting, 1e-5, 1e-5)


def _hlo(f, *args, stage="hlo"):
    with tf.device("/CPU:0"):
        return tf.function(f, jit_compile=True).experimental_get_compiler_ir(*args)(stage=stage)


def test_xla_runs_the_in_batch_lowerings_not_a_fallback(rng):
    labels, e = _batch(rng, 12, 3, "float32")
    u = _per_row(rng, 12, "float32")

    def f(labels, e, u):
        return _all_three(
            labels,
            e,
            u,
            u,
            _f64(1.0),
            _f64(0.0),
            _f64(1.0),
            distance="cosine",
            pair_weighting="balanced",
            max_block_rows=5,
        )

    hlo = _hlo(f, labels, e, u)
    calls = [line for line in hlo.splitlines() if " custom-call(" in line]
    if HLO_ON_CPU:  # the other backends' lowering: While loops over row blocks
        assert not calls and " while(" in hlo, calls
        return
    assert len(calls) == len(TARGETS), calls
    for op, target in TARGETS.items():
        assert any(
            f'op_type="FusedContrastive>{op}"' in line
            and f'custom_call_target="{target}"' in line
            and "API_VERSION_TYPED_FFI" in line
            and "max_block_rows = 5 : i32" in line
            for line in calls
        ), op


def _shapes(hlo):
    """Every array shape in HLO text, as tuples of sizes."""
    return [
        tuple(int(n) for n in dims.split(",") if n)
        for dims in re.findall(r"\b(?:pred|s\d+|u\d+|f\d+|bf16)\[([\d,]*)\]", hlo)
    ]


def test_no_b_by_b_tensor_in_either_lowering(rng):
    # The HLO lowering loops over [64, B] blocks; the CPU custom calls take and
    # return [B] and [B, D] arrays only.
    rows = 512
    labels, e = _batch(rng, rows, 16, "float32")
    u = _per_row(rng, rows, "float32")
    settings = [(weighting, "none") for weighting in WEIGHTINGS]
    settings += [("uniform", "batch_hard"), ("active", "multi_similarity")]
    for pair_weighting, miner in settings:

        def f(labels, e, u):
            return _all_three(
                labels,
                e,
                u,
                u,
                _f64(1.0),
                _f64(0.0),
                _f64(1.0),
                distance="euclidean",
                pair_weighting=pair_weighting,
                max_block_rows=64,
                miner=miner,
            )

        for stage in ("hlo", "optimized_hlo"):
            shapes = _shapes(_hlo(f, labels, e, u, stage=stage))
            assert (64, rows) in shapes or stage == "optimized_hlo" or not HLO_ON_CPU, stage
            largest = max(np.prod(shape, dtype=np.int64) for shape in shapes)
            assert largest < rows * rows, (stage, largest)


def test_xla_rejects_bad_constant_margins_at_compile_time(rng):
    labels, e = _batch(rng, 4, 3, "float32")
    for bad, message in (
        ((-1.0, 0.0), "margin must be finite and non-negative, got -1"),
        ((1.0, float("inf")), "positive_margin must be finite and non-negative"),
    ):

        def f(labels, e):
            # Const nodes of the graph XLA compiles.
            return _all_three(
                labels,
                e,
                tf.ones([4]),
                tf.ones([4]),
                _f64(bad[0]),
                _f64(bad[1]),
                _f64(1.0),
                distance="euclidean",
                pair_weighting="uniform",
            )

        with pytest.raises(ValueError, match="Failed getting HLO text") as error:
            _hlo(f, labels, e)
        assert message in str(error.value)


@pytest.mark.parametrize("which", ["margin", "positive_margin"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_xla_bad_run_time_margins_give_nan(rng, which, value):
    bad = tf.Variable(value, dtype=tf.float64)
    good = _f64(0.5)
    margins = (bad, good) if which == "margin" else (good, bad)
    labels, e = _batch(rng, 9, 3, "float32")
    u = _per_row(rng, 9, "float32")
    for distance in DISTANCES:
        out = tf.function(
            lambda e: _all_three(
                labels, e, u, u, *margins, _f64(1.0), distance=distance, pair_weighting="balanced"
            ),
            jit_compile=True,
        )(e)
        for output in out[:4]:
            assert np.all(np.isnan(output.numpy())), (distance, output)
        # The reduction scale does not depend on the margins.
        np.testing.assert_allclose(out[4], 1.0 / np.sum(u.numpy(), dtype=np.float64), rtol=1e-15)


def test_xla_in_batch_shape_mismatch_at_compile_time():
    def loss(labels, e):
        return _LIBRARY.fused_contrastive_in_batch_contrastive_loss(
            tf.cast(labels, tf.int64),
            e,
            all_anchors(e),
            _f64(1.0),
            _f64(0.0),
            distance="cosine",
            pair_weighting="uniform",
        )

    relaxed = tf.function(loss, input_signature=[tf.TensorSpec(None)] * 2, jit_compile=True)
    with pytest.raises(ValueError, match="Failed getting HLO text") as error:
        relaxed.experimental_get_compiler_ir(tf.zeros([3]), tf.zeros([4, 2]))(stage="hlo")
    assert "embeddings must have shape [B, D] and labels [B]; got labels [3]" in str(error.value)


def test_max_block_rows_beyond_int32_under_xla(rng):
    labels, e = _batch(rng, 10, 3, "float64")

    def loss(labels, e):
        return _LIBRARY.fused_contrastive_in_batch_contrastive_loss(
            labels,
            e,
            all_anchors(e),
            _f64(1.0),
            _f64(0.0),
            distance="euclidean",
            pair_weighting="uniform",
            max_block_rows=2**31,
        )

    if HLO_ON_CPU:  # only bounds the block size there
        want, got = _graph_and_xla(loss, labels, e)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        return
    # The calls take it as an int32 attr.
    with pytest.raises(ValueError, match="max_block_rows must be at most 2147483647"):
        _hlo(loss, labels, e)


def test_in_batch_xla_works_when_imported_after_the_first_xla_compilation():
    result = run_python("""
        import tensorflow as tf
        tf.function(lambda x: x * 2, jit_compile=True)(tf.constant(1.0))
        import fused_contrastive as fc
        ops = fc._library.op_library
        one = tf.constant(1.0, tf.float64)
        zero = tf.constant(0.0, tf.float64)
        attrs = dict(distance="euclidean", pair_weighting="uniform")
        rows = tf.constant([0, 3, 3, 3], tf.int64)

        @tf.function(jit_compile=True)
        def in_batch(labels, e):
            loss = ops.fused_contrastive_in_batch_contrastive_loss(
                labels, e, rows, one, zero, **attrs)
            grad = ops.fused_contrastive_in_batch_contrastive_loss_grad(
                labels, e, rows, tf.ones_like(loss), one, zero, **attrs).grad
            reduced = ops.fused_contrastive_in_batch_contrastive_loss_reduced(
                labels, e, rows, tf.constant(1.0), one, zero, one, reduction="sum", **attrs)
            return tf.reduce_sum(loss), tf.reduce_sum(tf.abs(grad)), reduced[0]

        print(*(float(x) for x in in_batch(tf.constant([0, 0, 1], tf.int64),
                                           tf.constant([[0., 0.], [0., .5], [0., 2.]]))))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    loss, grad, reduced = (float(x) for x in result.stdout.split()[-3:])
    # The reference's doctest: losses [0.125, 0.125, 0] (pairs (0, 1) and (1, 0)
    # at d = 0.5, margin 1); rows 0 and 1 get the gradients ±2·(e_0 - e_1), |(0, 1)| each.
    # The HLO lowering takes d from the rows less their mean, rounded in float32.
    rtol = HLO_TOL["float32"][0] if HLO_ON_CPU else 0
    np.testing.assert_allclose((loss, reduced), 0.25, rtol=rtol)
    assert abs(grad - 2.0) < 1e-6


@pytest.mark.skipif(HLO_ON_CPU, reason="this is the run it starts")
def test_the_hlo_lowering_of_the_in_batch_ops_passes_the_same_tests(tmp_path):
    # The GPU backend's lowering, on the CPU backend. Three of the reduced
    # op's nine (weighting, reduction) cases, each weighting and reduction
    # once (each case compiles for about 8 s), and not the import-order test,
    # whose subprocess does not depend on the lowering.
    run_tests_under_hlo(
        __file__,
        tmp_path,
        "not imported_after_the_first and not (reduced_in_batch_op and (active-sum or "
        "active-mean or balanced-weighted_mean or balanced-sum or uniform-mean or "
        "uniform-weighted_mean))",
    )

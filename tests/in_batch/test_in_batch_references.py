"""Anchors against references and anchor slices (issue 20): the batch's anchors
pair with every other batch row and every reference row, never a reference
with a reference.

The float64 oracle is numpy_in_batch (explicit pair differences) on the rows
anchors and references together, with upstream 0 on the references: a pair of
two references then carries no gradient, and the anchors' weights count every
other row, B - 1 + R, as the loss defines them."""

import numpy as np
import pytest
import tensorflow as tf
from support import HLO_ON_CPU, bits, run_python, run_tests_under_hlo
from test_in_batch import (
    IN_BATCH_DISTANCES,
    MARGINS,
    PAIR_WEIGHTINGS,
    assert_close,
    batch,
    duplicates_compare,
)
from test_in_batch import numpy_in_batch as numpy_rows

import fused_contrastive as fc
from fused_contrastive import _kernels, _library


def numpy_rows_of(labels, e, upstream, options):
    """numpy_rows with the public names of the options."""
    options = dict(options)
    if "pair_weighting" in options:
        options["weighting"] = options.pop("pair_weighting")
    return numpy_rows(labels, e, upstream=upstream, **options)


def oracle(labels, e, ref_labels, refs, upstream, begin=0, end=None, **options):
    """Loss of the anchors (rows [begin, end) of labels/e) against all rows and
    the references, and the gradients of sum(upstream * loss) to e and refs."""
    end = len(e) if end is None else end
    rows = np.concatenate([e, refs]) if len(refs) else np.asarray(e, np.float64)
    ids = np.concatenate([labels, ref_labels]) if len(refs) else labels
    g = np.zeros(len(rows))
    g[begin:end] = upstream
    loss, grad = numpy_rows_of(ids, rows, g, options)
    return loss[begin:end], grad[: len(e)], grad[len(e) :]


def fused(labels, e, ref_labels, refs, upstream, dtype, jit=None, **options):
    def run(e, refs):
        with tf.GradientTape() as tape:
            tape.watch([e, refs])
            loss = fc.in_batch_contrastive_loss(
                labels, e, reference_labels=ref_labels, reference_embeddings=refs, **options
            )
            total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
        return (loss, *tape.gradient(total, [e, refs]))

    run = run if jit is None else tf.function(run, jit_compile=jit)
    return run(tf.constant(e, dtype), tf.constant(refs, dtype))


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("b, r", [(0, 3), (1, 0), (1, 4), (2, 5), (9, 13), (37, 70)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_references_match_float64_pairs(rng, distance, weighting, margins, b, r, dtype):
    duplicates = duplicates_compare(distance, weighting)
    labels, e = batch(rng, b, duplicates=duplicates)
    ref_labels, refs = batch(rng, r, duplicates=duplicates)
    if duplicates:
        shared = min(b, r, 2)
        refs[:shared] = e[:shared]  # references equal to anchors: d = 0 pairs
    g = rng.uniform(0.5, 2.0, size=b)
    options = dict(
        margin=margins[0], positive_margin=margins[1], distance=distance, pair_weighting=weighting
    )
    want = oracle(labels, e, ref_labels, refs, g, **options)
    for jit in (None, True) if b == 9 else (None,):
        got = fused(labels, e, ref_labels, refs, g, dtype, jit, **options)
        for name, x, y in zip(("loss", "embeddings' gradient", "references' gradient"), got, want):
            assert x.shape == y.shape and x.dtype == dtype, name
            assert_close(x, y, dtype, f"{name} (jit {jit})")


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
def test_no_references_is_the_batch_loss_bit_for_bit(rng, distance, weighting):
    labels, e = batch(rng, 40, dim=8)
    e = e.astype(np.float32)
    g = np.ones(40, np.float32)
    options = dict(distance=distance, pair_weighting=weighting)
    plain = fused(labels, e, np.zeros(0, np.int64), np.zeros((0, 8)), g, "float32", **options)
    with tf.GradientTape() as tape:
        x = tf.constant(e)
        tape.watch(x)
        loss = fc.in_batch_contrastive_loss(labels, x, **options)
    np.testing.assert_array_equal(bits(plain[0]), bits(loss))
    np.testing.assert_array_equal(bits(plain[1]), bits(tape.gradient(loss, x)))
    assert plain[2].shape == (0, 8)


def test_reference_rows_never_pair_with_each_other(rng):
    # Two references of one class at distance 0 from each other, far from the
    # anchor: the anchor's loss is its terms with them only, uniform over
    # B - 1 + R = 2 partners, and their gradient comes from the anchor alone.
    e = np.array([[0.0, 0.0]])
    refs = np.array([[0.3, 0.4], [0.3, 0.4]])
    loss, grad_e, grad_refs = fused([0], e, [0, 1], refs, [1.0], "float64", margin=1.0)
    # d = 0.5 to both: positive term 0.25, negative (1 - 0.5)^2 = 0.25.
    np.testing.assert_allclose(loss, [0.25])
    np.testing.assert_allclose(grad_refs, [[0.3, 0.4], [-0.3, -0.4]])
    np.testing.assert_allclose(grad_e, [[0.0, 0.0]], atol=1e-15)


def test_stop_gradient_references_and_mixed_label_dtypes(rng):
    labels, e = batch(rng, 12)
    ref_labels, refs = batch(rng, 20)
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fc.in_batch_contrastive_loss(
            labels.astype(np.int32),
            x,
            reference_labels=ref_labels.astype(np.float32),  # compared by value
            reference_embeddings=tf.stop_gradient(tf.constant(refs)),
        )
    want = oracle(labels, e, ref_labels, refs, np.ones(12))
    assert_close(loss, want[0], "float64", "loss")
    assert_close(tape.gradient(loss, x), want[1], "float64", "gradient")


def test_references_take_the_embeddings_dtype_and_16_bit_compute_in_float32(rng):
    labels, e = batch(rng, 6)
    ref_labels, refs = batch(rng, 5)
    loss = fc.in_batch_contrastive_loss(
        labels, tf.constant(e, tf.float16), reference_labels=ref_labels, reference_embeddings=refs
    )
    assert loss.dtype == tf.float16
    want = oracle(labels, e.astype(np.float16), ref_labels, refs.astype(np.float16), np.ones(6))
    assert_close(loss, want[0], "float16", "loss")


def test_the_reference_implementation_takes_references_too(rng):
    labels, e = batch(rng, 7)
    ref_labels, refs = batch(rng, 9)
    for weighting in PAIR_WEIGHTINGS:
        got = fc.in_batch_contrastive_loss_reference(
            labels,
            e,
            pair_weighting=weighting,
            reference_labels=ref_labels,
            reference_embeddings=refs,
        )
        want = oracle(labels, e, ref_labels, refs, np.ones(7), pair_weighting=weighting)
        assert_close(got, want[0], "float64", weighting)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reference_labels=[0]), ValueError, "must be given together"),
        (dict(reference_embeddings=[[0.0, 1.0]]), ValueError, "must be given together"),
        (
            dict(reference_labels=[0], reference_embeddings=[[0.0, 1.0, 2.0]]),
            ValueError,
            "reference_embeddings \\[R, D\\] must have the embeddings' D",
        ),
        (
            dict(reference_labels=[0, 1], reference_embeddings=[[0.0, 1.0]]),
            ValueError,
            "reference_labels must have shape",
        ),
        (
            dict(reference_labels=[0], reference_embeddings=[0.0, 1.0]),
            ValueError,
            "reference_embeddings must have rank 2",
        ),
        (
            dict(reference_labels=["a"], reference_embeddings=[[0.0, 1.0]]),
            TypeError,
            "reference_labels must be class ids",
        ),
    ],
)
def test_bad_references_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fc.in_batch_contrastive_loss([0, 1], [[0.0, 1.0], [1.0, 0.0]], **kwargs)


# --- Anchor slices (the kernels' and ops' anchors) ----------------------------


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("anchors", [(0, 23), (5, 17), (0, 1), (22, 23), (9, 9), (0, 0)])
@pytest.mark.parametrize("max_block_rows", [0, 3])
def test_kernel_anchor_slices_match_float64_pairs(
    rng, distance, weighting, anchors, max_block_rows
):
    labels, e = batch(rng, 23)
    begin, end = anchors
    g = rng.uniform(0.5, 2.0, size=23)
    g[:begin] = g[end:] = np.nan  # a partner's upstream is never read
    options = dict(distance=distance, pair_weighting=weighting, margin=1.2, positive_margin=0.1)
    loss, grad = _kernels.in_batch_loss_cpu(
        labels, e, g, anchors=anchors, max_block_rows=max_block_rows, **options
    )
    # Every row's loss and, with g = 0 off the anchors, the anchors' gradient.
    want_loss, want_grad = numpy_rows_of(labels, e, np.where(np.isnan(g), 0.0, g), options)
    assert_close(loss[begin:end], want_loss[begin:end], "float64", "anchors' loss")
    assert np.all(loss[:begin] == 0) and np.all(loss[end:] == 0)
    assert_close(grad, want_grad, "float64", "gradient")


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
def test_rows_past_used_take_no_part(rng, distance, weighting):
    # A memory's unfilled rows: only the first `used` rows exist for the loss.
    labels, e = batch(rng, 20)
    g = rng.uniform(0.5, 2.0, size=20)
    options = dict(distance=distance, pair_weighting=weighting, margin=1.2)
    e_tail = e.copy()
    e_tail[14:] = np.nan  # never read
    loss, grad = _kernels.in_batch_loss_cpu(labels, e_tail, g, anchors=(3, 9, 14, 14), **options)
    upstream = np.zeros(14)
    upstream[3:9] = g[3:9]
    want_loss, want_grad = numpy_rows_of(labels[:14], e[:14], upstream, options)
    assert_close(loss[3:9], want_loss[3:9], "float64", "anchors' loss")
    assert np.all(loss[:3] == 0) and np.all(loss[9:] == 0) and np.all(grad[14:] == 0)
    assert_close(grad[:14], want_grad, "float64", "gradient")


@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
def test_partners_past_grad_get_no_gradient_and_still_count(rng, distance):
    # A memory's rows: pairs with them count for the anchors, and their own
    # gradient (unused, as they are constants) is 0, its products skipped.
    labels, e = batch(rng, 30)
    g = rng.uniform(0.5, 2.0, size=30)
    options = dict(distance=distance, pair_weighting="balanced", max_block_rows=4)
    full = _kernels.in_batch_loss_cpu(labels, e, g, anchors=(5, 12, 30, 30), **options)
    cut = _kernels.in_batch_loss_cpu(labels, e, g, anchors=(5, 12, 19, 30), **options)
    # The partner blocks split at row 19: sums grouped otherwise, to rounding.
    np.testing.assert_allclose(cut[0], full[0], rtol=1e-14)
    np.testing.assert_allclose(cut[1][:19], full[1][:19], rtol=1e-13, atol=1e-15)
    assert np.all(cut[1][19:] == 0) and np.any(full[1][19:] != 0)


def test_kernel_anchor_slices_are_deterministic_across_threads(rng):
    labels, e = batch(rng, 700, dim=16)
    e = e.astype(np.float32)
    anchors = tf.constant([150, 420, 600, 700], tf.int64)
    ops = _library.op_library
    args = (labels, e, anchors, np.ones(700, np.float32), 1.0, 0.0)
    kwargs = dict(distance="euclidean", pair_weighting="balanced")
    grad = ops.fused_contrastive_in_batch_contrastive_loss_grad(*args, **kwargs).grad
    _, serial = _kernels.in_batch_loss_cpu(
        labels, e, np.ones(700, np.float32), anchors=(150, 420, 600, 700), pair_weighting="balanced"
    )
    np.testing.assert_array_equal(bits(grad), bits(serial))


@pytest.mark.parametrize(
    "anchors, match",
    [
        (
            (3, 2, 4, 4),
            "0 <= begin <= end <= grad <= used <= 4 \\(the rows\\), got \\[3, 2, 4, 4\\]",
        ),
        ((0, 5, 5, 5), "got \\[0, 5, 5, 5\\]"),
        ((-1, 2, 4, 4), "got \\[-1, 2, 4, 4\\]"),
        ((0, 3, 2, 4), "got \\[0, 3, 2, 4\\]"),
        ((0, 2, 4, 3), "got \\[0, 2, 4, 3\\]"),
        ((0, 2, 5, 5), "got \\[0, 2, 5, 5\\]"),
    ],
)
def test_bad_anchor_ranges_raise(anchors, match):
    labels, e = [0, 1, 0, 1], np.eye(4)
    with pytest.raises(ValueError, match=match):
        _kernels.in_batch_loss_cpu(labels, e, None, anchors=anchors)
    ops = _library.op_library
    attrs = dict(distance="euclidean", pair_weighting="uniform")
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        ops.fused_contrastive_in_batch_contrastive_loss(
            labels, e, tf.constant(anchors, tf.int64), 1.0, 0.0, **attrs
        )
    shape_error = (ValueError, tf.errors.InvalidArgumentError)  # graph: the shape function's
    with pytest.raises(shape_error, match="anchors must be \\[begin, end, grad, used\\]"):
        ops.fused_contrastive_in_batch_contrastive_loss(
            labels, e, tf.constant([0, 1], tf.int64), 1.0, 0.0, **attrs
        )


def test_reduced_op_weights_one_per_anchor(rng):
    labels, e = batch(rng, 15)
    ops = _library.op_library
    anchors = tf.constant([4, 10, 15, 15], tf.int64)
    attrs = dict(distance="euclidean", pair_weighting="uniform")
    w = rng.uniform(0.5, 2.0, size=6)
    loss, grad, scale = ops.fused_contrastive_in_batch_contrastive_loss_reduced(
        labels, e, anchors, w, 1.0, 0.0, 0.5, reduction="weighted_mean", **attrs
    )
    g = np.zeros(15)
    g[4:10] = w * 0.5 / w.sum()
    want_loss, want_grad = numpy_rows(labels, e, upstream=g)
    np.testing.assert_allclose(float(scale), 0.5 / w.sum(), rtol=1e-15)
    np.testing.assert_allclose(float(loss), np.sum(g * want_loss), rtol=1e-12)
    assert_close(grad, want_grad, "float64", "gradient")
    mean = ops.fused_contrastive_in_batch_contrastive_loss_reduced(
        labels, e, anchors, 1.0, 1.0, 0.0, 1.0, reduction="mean", **attrs
    )
    np.testing.assert_allclose(float(mean[0]), want_loss[4:10].mean(), rtol=1e-12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one weight per anchor \\(6\\)"):
        ops.fused_contrastive_in_batch_contrastive_loss_reduced(
            labels, e, anchors, np.ones(15), 1.0, 0.0, 1.0, reduction="sum", **attrs
        )


def test_ops_under_xla_take_anchor_ranges_known_at_run_time(rng):
    labels, e = batch(rng, 19)
    ops = _library.op_library
    attrs = dict(distance="euclidean", pair_weighting="balanced", max_block_rows=4)

    def outputs(anchors, w):
        loss = ops.fused_contrastive_in_batch_contrastive_loss(
            labels, e, anchors, 1.0, 0.1, **attrs
        )
        grad = ops.fused_contrastive_in_batch_contrastive_loss_grad(
            labels, e, anchors, tf.range(19, dtype=tf.float64), 1.0, 0.1, **attrs
        ).grad
        reduced = ops.fused_contrastive_in_batch_contrastive_loss_reduced(
            labels, e, anchors, w, 1.0, 0.1, 0.5, reduction="weighted_mean", **attrs
        )
        return (loss, grad, *reduced)

    xla = tf.function(outputs, jit_compile=True)
    rtol = 1e-12 if HLO_ON_CPU else 0
    for anchors in [
        (0, 19, 19, 19),
        (3, 8, 19, 19),
        (7, 7, 19, 19),
        (15, 19, 19, 19),
        (2, 9, 13, 13),
        (0, 5, 5, 5),
        (2, 9, 11, 16),
    ]:
        a = tf.constant(anchors, tf.int64)
        for w in (
            tf.constant(rng.uniform(size=anchors[1] - anchors[0])),
            tf.constant(2.0, tf.float64),
        ):
            for got, want in zip(xla(a, w), outputs(a, w)):
                np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    bad = tf.constant([5, 3, 19, 19], tf.int64)
    if HLO_ON_CPU:  # the HLO cannot raise at run time: NaN, as for bad margins
        for w in (tf.constant(1.0, tf.float64), tf.ones([2], tf.float64)):
            assert all(np.all(np.isnan(x)) for x in xla(bad, w)[:4])
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="got \\[5, 3, 19, 19\\]"):
            xla(bad, tf.constant(1.0, tf.float64))


@pytest.mark.skipif(HLO_ON_CPU, reason="this is the run it starts")
def test_the_hlo_lowering_passes_the_same_tests(tmp_path):
    # The GPU backend's lowering (every row block against every row, pairs of
    # two partners masked out), on the CPU backend.
    run_tests_under_hlo(__file__, tmp_path, "xla or (match_float64_pairs and 9-13 and margins0)")


def test_linear_memory_with_65536_references():
    # Anchors B = 4096 against 65,536 references, D = 64: the B x R float32
    # matrix alone would be 1 GiB, and the plain formula holds several; the
    # forward and backward pass must stay under 1.5 GB of extra peak RSS.
    result = run_python("""
        import resource
        import numpy as np
        import tensorflow as tf
        import fused_contrastive as fc
        rng = np.random.default_rng(0)
        b, r, d = 4096, 65536, 64
        x = tf.constant(rng.normal(size=(b, d)).astype(np.float32))
        refs = tf.constant(rng.normal(size=(r, d)).astype(np.float32))
        labels = tf.constant(rng.integers(0, 1000, size=b))
        ref_labels = tf.constant(rng.integers(0, 1000, size=r))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tf.GradientTape() as tape:
            tape.watch([x, refs])
            loss = tf.reduce_mean(fc.in_batch_contrastive_loss(
                labels, x, margin=16.0, reference_labels=ref_labels, reference_embeddings=refs))
        grads = tape.gradient(loss, [x, refs])
        assert all(np.all(np.isfinite(g)) for g in grads) and float(loss) > 0
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("extra_kib", extra)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    extra_kib = int(result.stdout.split()[-1])
    assert extra_kib < 1.5 * 2**20, f"extra peak RSS {extra_kib / 2**20:.2f} GiB"

"""pair_weighting="active" (issue 21): each anchor's loss is the mean of its
nonzero positive terms plus the mean of its nonzero negative terms, the counts
carrying no gradient. The shared oracle tests (test_in_batch.py and the
references, memory, XLA and one-sweep files) run it beside the other
weightings; here it is checked against explicit pairs on rows whose distances
are exact, so that which terms are 0 is not a matter of rounding."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from support import HLO_ON_CPU, run_tests_under_hlo
from test_in_batch import numpy_in_batch

import fused_contrastive as fc
from fused_contrastive import _inputs, _kernels
from fused_contrastive.reference import in_batch_contrastive_loss_reference

MARGIN, POSITIVE_MARGIN = 1.0, 0.25
# Points on a line (1-D embeddings: exact distances in both dtypes). Anchor 0
# has a positive within the positive margin (row 1, a zero term), one beyond
# it (row 2) and a duplicate (row 6, d = 0); row 4 is a negative past the
# margin of rows 0, 1, 6, and row 5 a negative duplicate of row 0.
POINTS = np.array([0.0, 0.125, 0.75, 2.5, 4.0, 0.0, 0.0])
LABELS = np.array([0, 0, 0, 1, 2, 3, 0])


def explicit_active(labels, x, margin, positive_margin):
    """Per-anchor "active" losses from a loop over the ordered pairs."""
    losses = []
    for i in range(len(labels)):
        positive, negative = [], []
        for j in range(len(labels)):
            if j == i:
                continue
            d = abs(x[i] - x[j])
            if labels[i] == labels[j]:
                positive.append(max(d - positive_margin, 0.0) ** 2)
            else:
                negative.append(max(margin - d, 0.0) ** 2)
        mean = lambda terms: np.mean([t for t in terms if t != 0] or [0.0])  # noqa: E731
        losses.append(mean(positive) + mean(negative))
    return np.array(losses)


def loss_and_gradient(function, labels, e, jit=None):
    def run(e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = function(labels, e)
        return loss, tape.gradient(loss, e)

    run = run if jit is None else tf.function(run, jit_compile=jit)
    return [x.numpy() for x in run(e)]


def active(labels, e, **options):
    options = {"margin": MARGIN, "positive_margin": POSITIVE_MARGIN, **options}
    return fc.in_batch_contrastive_loss(labels, e, pair_weighting="active", **options)


def reference(labels, e):
    return in_batch_contrastive_loss_reference(
        labels, e, MARGIN, POSITIVE_MARGIN, pair_weighting="active"
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("jit", [None, False, True])
def test_the_loss_is_the_mean_of_the_nonzero_terms_of_explicit_pairs(dtype, jit):
    want = explicit_active(LABELS, POINTS, MARGIN, POSITIVE_MARGIN)
    # The explicit pairs differ from "balanced" here: zero terms are left out.
    balanced = numpy_in_batch(LABELS, POINTS[:, None], MARGIN, POSITIVE_MARGIN)[0]
    assert not np.allclose(want, balanced)
    e = tf.constant(POINTS[:, None], dtype)
    _, want_grad = numpy_in_batch(
        LABELS, POINTS[:, None], MARGIN, POSITIVE_MARGIN, weighting="active"
    )
    for function in (active, reference):
        loss, grad = loss_and_gradient(function, LABELS, e, jit)
        rtol = 1e-6 if dtype == "float32" else 1e-14
        np.testing.assert_allclose(loss, want, rtol=rtol, atol=rtol)
        # The counts are held fixed: the gradient is that of the kept terms.
        np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol)


def test_the_pybind_module_and_the_keras_class_agree_with_explicit_pairs():
    want = explicit_active(LABELS, POINTS, MARGIN, POSITIVE_MARGIN)
    loss, _ = _kernels.in_batch_loss_cpu(
        LABELS,
        POINTS[:, None],
        None,
        MARGIN,
        POSITIVE_MARGIN,
        pair_weighting="active",
    )
    np.testing.assert_allclose(loss, want, rtol=1e-14)
    loss_object = fc.InBatchContrastiveLoss(MARGIN, POSITIVE_MARGIN, pair_weighting="active")
    # Keras computes in its float32 default.
    np.testing.assert_allclose(loss_object(LABELS, POINTS[:, None]), want.mean(), rtol=1e-6)
    config = loss_object.get_config()
    assert config["pair_weighting"] == "active"
    assert fc.InBatchContrastiveLoss.from_config(config).get_config() == config


def test_an_anchor_without_active_pairs_of_a_kind_keeps_the_other_mean():
    # Two classes of two rows each: the positives sit within the positive
    # margin (zero terms), the classes 0.5 apart (every negative active).
    x = np.array([0.0, 0.125, 0.5, 0.625])
    labels = np.array([0, 0, 1, 1])
    loss, grad = loss_and_gradient(active, labels, tf.constant(x[:, None]))
    negatives = np.abs(x[:, None] - x[None]) * (labels[:, None] != labels[None])
    want = np.where(negatives > 0, (MARGIN - negatives) ** 2, 0).sum(1) / 2
    np.testing.assert_allclose(loss, want, rtol=1e-14)
    # Then the classes 2 apart, past the margin: every loss and gradient is 0.
    loss, grad = loss_and_gradient(active, labels, tf.constant(x[:, None] + 1.5 * labels[:, None]))
    assert not loss.any() and not grad.any(), (loss, grad)


def test_a_nan_row_makes_its_partners_losses_nan():
    e = POINTS[:, None].copy()
    e[3] = np.nan
    for jit, function in itertools.product((None, True), (active, reference)):
        loss, _ = loss_and_gradient(function, LABELS, tf.constant(e), jit)
        assert np.isnan(loss).all(), (jit, function, loss)


def test_cosine_duplicates_count_alike_in_every_dtype_with_a_positive_margin(rng):
    # A cosine duplicate's d is a rounding error: with a positive margin
    # above it, its term is 0 on every path and in every dtype.
    e = rng.normal(size=(9, 4))
    e[1] = e[0]
    e[2] = 3 * e[0]
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 0, 1])
    options = dict(margin=0.8, positive_margin=0.05, distance="cosine")
    want, want_grad = numpy_in_batch(labels, e, 0.8, 0.05, "cosine", "active")
    for dtype, jit in itertools.product(("float32", "float64"), (None, True)):
        function = lambda labels, e: active(labels, e, **options)  # noqa: E731
        loss, grad = loss_and_gradient(function, labels, tf.constant(e, dtype), jit)
        rtol = 2e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(loss, want, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(grad, want_grad, rtol=10 * rtol, atol=10 * rtol)


def test_every_layer_names_the_same_weightings():
    assert _kernels.PAIR_WEIGHTINGS == _inputs.PAIR_WEIGHTINGS
    with pytest.raises(ValueError, match="'uniform', 'balanced', 'active'; got 'nonzero'"):
        fc.in_batch_contrastive_loss([0, 1], tf.ones([2, 2]), pair_weighting="nonzero")
    with pytest.raises(ValueError, match="'uniform', 'balanced', 'active', got 'nonzero'"):
        _kernels.in_batch_loss_cpu([0, 1], np.ones((2, 2)), None, pair_weighting="nonzero")


@pytest.mark.skipif(HLO_ON_CPU, reason="this is the run under the HLO lowering")
def test_the_hlo_lowering_passes_the_same_tests(tmp_path):
    run_tests_under_hlo(__file__, tmp_path, "not hlo_lowering")

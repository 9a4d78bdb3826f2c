"""The in-batch all-pairs reference (issue 11's oracle and baseline) against a
float64 NumPy computation with explicit pair differences."""

import numpy as np
import pytest
import tensorflow as tf
from test_in_batch import duplicates_compare

from fused_contrastive._inputs import PAIR_WEIGHTINGS
from fused_contrastive.reference import in_batch_contrastive_loss_reference


def numpy_in_batch(labels, e, margin, positive_margin, distance, weighting):
    labels = np.asarray(labels).reshape(-1)
    e = np.asarray(e, np.float64)
    b = e.shape[0]
    if distance == "euclidean":
        d = np.sqrt(np.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1))
    else:
        n = np.sqrt(np.sum(e * e, axis=-1))
        norms = n[:, None] * n[None, :]
        d = 1.0 - np.divide(e @ e.T, norms, out=np.zeros((b, b)), where=norms > 0)
    others = ~np.eye(b, dtype=bool)
    same = labels[:, None] == labels[None, :]
    pos, neg = same & others, ~same & others
    pos_terms = np.where(pos, np.maximum(d - positive_margin, 0.0) ** 2, 0.0)
    neg_terms = np.where(neg, np.maximum(margin - d, 0.0) ** 2, 0.0)
    if weighting == "uniform":
        return (pos_terms.sum(1) + neg_terms.sum(1)) / max(b - 1, 1)

    def mean(terms, mask):
        if weighting == "active":  # the pairs whose term is not 0
            mask = mask & (terms > 0)
        return np.divide(terms.sum(1), mask.sum(1), out=np.zeros(b), where=mask.sum(1) > 0)

    return mean(pos_terms, pos) + mean(neg_terms, neg)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("margins", [(1.0, 0.0), (0.7, 0.2)])
@pytest.mark.parametrize("b", [0, 1, 2, 9])
def test_matches_float64_numpy(rng, distance, weighting, margins, b):
    e = rng.normal(size=(b, 5)) / np.sqrt(5)
    if b >= 4:
        if duplicates_compare(distance, weighting):
            e[1] = e[0]  # a duplicate of the same class
        e[3] = e[2]  # and of another class
    labels = np.array([0, 0, 1, 2, 1, 0, 2, 1, 0][:b])
    want = numpy_in_batch(labels, e, *margins, distance, weighting)
    for dtype, rtol in (("float64", 1e-9), ("float32", 2e-4)):
        got = in_batch_contrastive_loss_reference(
            labels.astype("float32"), tf.constant(e, dtype), *margins, distance, weighting
        )
        assert got.shape == (b,) and got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_duplicates_and_zero_vectors_have_finite_gradients(distance):
    e = tf.constant([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(e)
        loss = tf.reduce_sum(
            in_batch_contrastive_loss_reference([0, 1, 0, 1], e, distance=distance)
        )
    assert np.all(np.isfinite(tape.gradient(loss, e)))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(labels=[0, 1], embeddings=[1.0, 2.0]), ValueError, "rank 2"),
        (dict(labels=[0, 1, 2], embeddings=[[1.0], [2.0]]), ValueError, "labels must have shape"),
        (
            dict(labels=[0, 1], embeddings=[[1.0], [2.0]], distance="manhattan"),
            ValueError,
            "'euclidean', 'cosine'",
        ),
        (
            dict(labels=[0, 1], embeddings=[[1.0], [2.0]], pair_weighting="mean"),
            ValueError,
            "'uniform', 'balanced'",
        ),
        (dict(labels=[True, False], embeddings=[[1.0], [2.0]]), TypeError, "class ids"),
        (dict(labels=[0, 1], embeddings=[[1], [2]]), TypeError, "embeddings must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        in_batch_contrastive_loss_reference(**kwargs)

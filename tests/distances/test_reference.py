"""fused_contrastive.reference: the pure-TF loss against TF Addons' formula in float64 NumPy."""

import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    LABEL_DTYPES,
    ODD_BOOL_AS_LABELS,
    ODD_BOOL_LOSSES,
    TFA_DISTANCES,
    TFA_LABELS,
    TFA_LOSSES,
    numpy_contrastive_loss,
    hessian,
    odd_bool_labels,
    random_distances,
    random_labels,
)

from fused_contrastive import contrastive_loss_reference
from fused_contrastive.reference import reference_second_derivative


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_is_tfa_formula_in_every_dtype(rng, label_dtype, distance_dtype):
    y = random_labels(rng, (40,), label_dtype)
    d = random_distances(rng, (40,), distance_dtype)
    loss = contrastive_loss_reference(y, d, 0.7)
    assert loss.dtype == d.dtype and loss.shape == d.shape
    want = numpy_contrastive_loss(tf.cast(y, tf.float64), tf.cast(d, tf.float64), 0.7)
    # float16/bfloat16 are computed in float32 and rounded once.
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6, "float64": 1e-15}[distance_dtype]
    np.testing.assert_allclose(tf.cast(loss, tf.float64), want, rtol=tol, atol=1e-7)


@pytest.mark.parametrize("distance_dtype", ["float16", "bfloat16"])
def test_16_bit_distances_are_computed_in_float32(rng, distance_dtype):
    y = random_labels(rng, (50,), "float32")
    d = random_distances(rng, (50,), distance_dtype)
    in_float32 = contrastive_loss_reference(y, tf.cast(d, tf.float32), 0.3)
    np.testing.assert_array_equal(
        contrastive_loss_reference(y, d, 0.3), tf.cast(in_float32, distance_dtype)
    )


def test_float64_margin_is_not_rounded_to_float32():
    loss = contrastive_loss_reference(
        tf.constant([0.0], tf.float64), tf.constant([0.0], tf.float64), 0.1
    )
    assert loss.numpy()[0] == 0.1 * 0.1


def test_tfa_case():
    np.testing.assert_allclose(
        contrastive_loss_reference(TFA_LABELS, TFA_DISTANCES), TFA_LOSSES, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_similar_label_0_is_tfa_formula_on_flipped_labels(rng, label_dtype):
    y = random_labels(rng, (4, 6), label_dtype)
    d = random_distances(rng, (4, 6), "float64")
    flipped = 1.0 - tf.cast(y, tf.float64).numpy()
    loss = contrastive_loss_reference(y, d, 1.2, similar_label=0)
    np.testing.assert_allclose(loss, numpy_contrastive_loss(flipped, d, 1.2), rtol=1e-14)
    np.testing.assert_allclose(loss, numpy_contrastive_loss(y, d, 1.2, similar_label=0), rtol=1e-14)
    assert not np.allclose(loss, contrastive_loss_reference(y, d, 1.2))


def test_bool_labels_read_any_nonzero_byte_as_true():
    d = tf.fill([4], 0.3)
    loss = contrastive_loss_reference(odd_bool_labels(), d)
    np.testing.assert_allclose(loss, ODD_BOOL_LOSSES, rtol=1e-6)
    np.testing.assert_array_equal(loss, contrastive_loss_reference(ODD_BOOL_AS_LABELS, d))
    np.testing.assert_array_equal(
        contrastive_loss_reference(odd_bool_labels(), d, similar_label=0),
        contrastive_loss_reference(ODD_BOOL_AS_LABELS, d, similar_label=0),
    )


@pytest.mark.parametrize("similar_label", [1, 0])
def test_second_derivative_is_autodiff_of_the_loss(rng, similar_label):
    y = random_labels(rng, (12,), "float64")
    d = tf.constant(rng.uniform(0.0, 2.0, size=12))
    got = hessian(lambda d: tf.reduce_sum(contrastive_loss_reference(y, d, 1.1, similar_label)), d)
    np.testing.assert_allclose(
        np.diag(got), reference_second_derivative(y, d, 1.1, similar_label), rtol=1e-15
    )

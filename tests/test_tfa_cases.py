"""TF Addons' own reference cases for tfa.losses.ContrastiveLoss, all of them."""

import numpy as np
import pytest
import tensorflow as tf

from fused_contrastive import ContrastiveLoss, contrastive_loss

Y_TRUE = [0, 0, 1, 1, 0, 1]
Y_PRED = [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]


def _close(actual, expected, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def test_per_sample_margin_1():
    loss = ContrastiveLoss(margin=1.0, reduction="none")(Y_TRUE, Y_PRED)
    _close(loss, [0.81, 0.49, 1.69, 0.49, 0.0, 0.25])


def test_sum_over_batch_size():
    _close(ContrastiveLoss()(Y_TRUE, Y_PRED), 0.621666)


def test_sum():
    _close(ContrastiveLoss(reduction="sum")(Y_TRUE, Y_PRED), 3.73)


def test_sample_weight():
    weights = [1.2, 0.8, 0.5, 0.4, 1.5, 1.0]
    _close(ContrastiveLoss()(Y_TRUE, Y_PRED, sample_weight=weights), 0.4425)


def test_scalar_sample_weight():
    _close(ContrastiveLoss()(Y_TRUE, Y_PRED, sample_weight=6.0), 3.73)


def test_zero_weight():
    _close(ContrastiveLoss()(Y_TRUE, Y_PRED, sample_weight=0.0), 0.0)


def test_margin_2():
    _close(ContrastiveLoss(margin=2.0, reduction="none")(Y_TRUE, Y_PRED),
           [3.61, 2.89, 1.69, 0.49, 0.81, 0.25])
    _close(ContrastiveLoss(margin=2.0)(Y_TRUE, Y_PRED), 1.623333)


def test_perfect_predictions_give_zero():
    _close(ContrastiveLoss()(Y_TRUE, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), 0.0)


@pytest.mark.parametrize("margin, expected", [
    (1.0, [-1.8, -1.4, 2.6, 1.4, 0.0, 1.0]),
    (2.0, [-3.8, -3.4, 2.6, 1.4, -1.8, 1.0]),
])
def test_gradient_of_summed_loss(margin, expected):
    distances = tf.Variable(Y_PRED)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(contrastive_loss(Y_TRUE, distances, margin))
    _close(tape.gradient(total, distances), expected)

"""fused_contrastive._inputs: dtype/margin/similar_label checks, shape alignment, ragged inputs."""

import numpy as np
import pytest
import tensorflow as tf
from support import random_distances, random_labels

from fused_contrastive import _inputs, contrastive_loss, contrastive_loss_reference

LOSS_FUNCTIONS = [contrastive_loss, contrastive_loss_reference]


def test_dtype_lists_are_the_readme_ones():
    assert [d.name for d in _inputs.LABEL_DTYPES] == [
        "bool",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
    ]
    assert [d.name for d in _inputs.DISTANCE_DTYPES] == [
        "float16",
        "bfloat16",
        "float32",
        "float64",
    ]


# --- dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64", "uint8"])
def test_unsupported_distance_dtypes(dtype):
    with pytest.raises(TypeError, match=f"y_pred.*float16.*{dtype}"):
        contrastive_loss(tf.zeros([2]), tf.zeros([2], dtype))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "complex64", "string"])
def test_unsupported_label_dtypes(dtype):
    with pytest.raises(TypeError, match=f"y_true.*{dtype}"):
        contrastive_loss(tf.zeros([2], dtype), tf.zeros([2]))


# --- margin -------------------------------------------------------------------


@pytest.mark.parametrize("margin", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_margins(margin):
    with pytest.raises(ValueError, match="margin must be finite and non-negative"):
        contrastive_loss([1.0], [0.5], margin)


@pytest.mark.parametrize("margin", ["1.0", None, True, [1.0]])
def test_margin_must_be_a_number(margin):
    with pytest.raises(TypeError, match="margin"):
        contrastive_loss([1.0], [0.5], margin)


def test_tensor_margin_must_be_a_scalar():
    with pytest.raises(ValueError, match="margin must be a scalar"):
        contrastive_loss([1.0], [0.5], tf.constant([1.0, 2.0]))


# --- similar_label ------------------------------------------------------------


@pytest.mark.parametrize("function", LOSS_FUNCTIONS)
@pytest.mark.parametrize(
    "similar_label, error",
    [
        (2, ValueError),
        (-1, ValueError),
        (0.5, TypeError),
        (True, TypeError),
        ("1", TypeError),
        (1.0, TypeError),
        (None, TypeError),
    ],
)
def test_bad_similar_label(function, similar_label, error):
    with pytest.raises(error, match="similar_label must be 0 or 1"):
        function([1.0], [0.5], 1.0, similar_label)


def test_similar_label_accepts_integers_of_any_kind():
    assert _inputs.validate_similar_label(np.int64(0)) == 0
    assert type(_inputs.validate_similar_label(np.int32(1))) is int


# --- shapes -------------------------------------------------------------------


def test_model_output_column_pairs_with_flat_labels(rng):
    # [B] labels with [B, 1] distances: B losses (TF Addons gave B x B, its issue 1757).
    y = random_labels(rng, (8,), "int32")
    d = random_distances(rng, (8, 1), "float32")
    loss = contrastive_loss(y, d)
    assert loss.shape == (8,)
    np.testing.assert_array_equal(loss, contrastive_loss(y, tf.squeeze(d, -1)))
    assert contrastive_loss(tf.expand_dims(y, -1), tf.squeeze(d, -1)).shape == (8,)


def test_mismatched_shapes_name_both_shapes(run):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\(3,\).*\(4,\)"):
        run(lambda: contrastive_loss(tf.zeros([3]), tf.zeros([4])))


def test_no_broadcasting_between_labels_and_distances():
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        contrastive_loss(tf.zeros([4, 1]), tf.zeros([1, 4]))


UNKNOWN_RANK = [tf.TensorSpec(None, tf.float32)] * 2


@pytest.mark.parametrize("function", LOSS_FUNCTIONS)
@pytest.mark.parametrize(
    "label_shape, distance_shape",
    [
        ((5,), (5, 1)),
        ((5, 1), (5,)),
        ((5,), (5,)),
        ((5, 1), (5, 1)),
        ((2, 3), (2, 3, 1)),
        ((), ()),
        ((1,), (1, 1)),
    ],
)
def test_unknown_rank_aligns_a_trailing_unit_axis_at_run_time(
    rng, function, label_shape, distance_shape
):
    y = random_labels(rng, label_shape, "float32")
    d = random_distances(rng, distance_shape, "float32")
    traced = tf.function(lambda y, d: function(y, d), input_signature=UNKNOWN_RANK)
    loss = traced(y, d)
    expected = function(y, d)  # eager: shapes known
    assert loss.shape == expected.shape
    np.testing.assert_array_equal(loss, expected)


def test_unknown_rank_column_and_flat_give_one_loss_per_sample():
    y = tf.constant([1.0, 0.0, 1.0])
    d = tf.constant([[0.5], [0.25], [2.0]])
    traced = tf.function(lambda y, d: contrastive_loss(y, d), input_signature=UNKNOWN_RANK)
    want = [0.25, 0.5625, 4.0]
    np.testing.assert_allclose(traced(y, d), want)
    np.testing.assert_allclose(traced(tf.reshape(y, [3, 1]), tf.reshape(d, [3])), want)


def test_unknown_rank_mismatch_is_an_error():
    traced = tf.function(lambda y, d: contrastive_loss(y, d), input_signature=UNKNOWN_RANK)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[3\].*\[4\]"):
        traced(tf.zeros([3]), tf.zeros([4, 1]))


# --- ragged -------------------------------------------------------------------

RAGGED_LABELS = tf.ragged.constant([[1.0], [0.0, 1.0]])
RAGGED_DISTANCES = tf.ragged.constant([[0.5], [0.2, 0.3]])


@pytest.mark.parametrize("function", LOSS_FUNCTIONS)
@pytest.mark.parametrize("ragged", ["both", "labels", "distances"])
def test_ragged_inputs_are_rejected_with_the_way_out(function, ragged):
    y = RAGGED_LABELS if ragged != "distances" else RAGGED_LABELS.flat_values
    d = RAGGED_DISTANCES if ragged != "labels" else RAGGED_DISTANCES.flat_values
    with pytest.raises(TypeError, match=r"ragged.*not supported") as error:
        function(y, d)
    assert "flat_values" in str(error.value)


def test_the_suggested_flat_values_work():
    loss = contrastive_loss(RAGGED_LABELS.flat_values, RAGGED_DISTANCES.flat_values)
    rows = RAGGED_DISTANCES.with_flat_values(loss)
    np.testing.assert_allclose(rows.flat_values, [0.25, 0.64, 0.09], rtol=1e-6)

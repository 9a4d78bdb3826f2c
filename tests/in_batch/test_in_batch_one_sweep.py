"""in_batch_contrastive_loss while a tape watches the embeddings (issue 20's
function target): the loss comes from the gradient op's sweep, and an upstream
gradient equal on every anchor (a mean or a sum of the losses) scales the
gradient that sweep wrote; any other upstream takes the second sweep. Either
way the results are the separate ops' bits: the scale here is a power of two,
which rounds nothing."""

import numpy as np
import pytest
import tensorflow as tf
from support import HLO_ON_CPU, bits
from test_in_batch import IN_BATCH_DISTANCES, PAIR_WEIGHTINGS, batch

import fused_contrastive as fc
from fused_contrastive import _library
from fused_contrastive._inputs import all_anchors

ANCHORS, REFERENCES = 16, 7
OPS = _library.op_library


def rows(rng, references):
    """Labels and float32 rows: the anchors, then `references` reference rows."""
    labels, e = batch(rng, ANCHORS + references)
    return labels.astype(np.int64), tf.constant(e, tf.float32)


def separate_ops(labels, e, upstream, references, distance, weighting):
    """The forward op's loss of the anchors and the gradient op's gradient of
    sum(upstream * loss), each op on its own."""
    anchors = tf.constant([0, ANCHORS, len(labels), len(labels)], tf.int64)
    if not references:
        anchors = all_anchors(e)
    upstream = tf.pad(tf.cast(upstream, e.dtype), [[0, references]])
    attrs = dict(distance=distance, pair_weighting=weighting)
    loss = OPS.fused_contrastive_in_batch_contrastive_loss(labels, e, anchors, 1.0, 0.1, **attrs)
    grad = OPS.fused_contrastive_in_batch_contrastive_loss_grad(
        labels, e, anchors, upstream, 1.0, 0.1, **attrs
    ).grad
    return loss[:ANCHORS], grad


def public(labels, e, reduce, references, distance, weighting):
    """The function's loss and the gradient of reduce(loss) to all rows."""
    with tf.GradientTape() as tape:
        tape.watch(e)
        anchors, refs = e[:ANCHORS], e[ANCHORS:]
        loss = fc.in_batch_contrastive_loss(
            labels[:ANCHORS],
            anchors,
            margin=1.0,
            positive_margin=0.1,
            distance=distance,
            pair_weighting=weighting,
            reference_labels=labels[ANCHORS:] if references else None,
            reference_embeddings=refs if references else None,
        )
        total = reduce(loss)
    return loss, tape.gradient(total, e)


REDUCTIONS = {
    "mean": (tf.reduce_mean, lambda: np.full(ANCHORS, 1 / ANCHORS)),
    "sum": (tf.reduce_sum, lambda: np.ones(ANCHORS)),
    "weighted": (
        lambda loss: tf.reduce_sum(loss * tf.range(1.0, ANCHORS + 1.0)),
        lambda: np.arange(1.0, ANCHORS + 1.0),
    ),
    "one NaN weight": (
        lambda loss: tf.reduce_sum(
            loss * tf.tensor_scatter_nd_update(tf.ones([ANCHORS]), [[3]], [np.nan])
        ),
        lambda: np.where(np.arange(ANCHORS) == 3, np.nan, 1.0),
    ),
}
MODES = {"eager": None, "tf.function": False, "XLA": True}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("references", [0, REFERENCES])
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("distance", IN_BATCH_DISTANCES)
def test_loss_and_gradient_are_the_separate_ops_bits(
    rng, distance, weighting, references, reduction, mode
):
    labels, e = rows(rng, references)
    reduce, upstream = REDUCTIONS[reduction]
    run = lambda e: public(labels, e, reduce, references, distance, weighting)  # noqa: E731
    if MODES[mode] is not None:
        run = tf.function(run, jit_compile=MODES[mode])
    loss, grad = run(e)
    want_loss, want_grad = separate_ops(labels, e, upstream(), references, distance, weighting)
    if mode == "XLA" and HLO_ON_CPU:  # the HLO lowering: its own rounding
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
        return
    np.testing.assert_array_equal(bits(loss), bits(want_loss))
    np.testing.assert_array_equal(bits(grad), bits(want_grad))


def _op_types(graph):
    """The op types of a graph and of the functions it calls (a cond's branches)."""
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += function.node_def
    return {node.op for node in nodes}


def test_a_tape_on_the_embeddings_runs_the_gradient_op_alone(rng):
    labels, e = rows(rng, 0)

    @tf.function
    def watched(e):
        return public(labels, e, tf.reduce_mean, 0, "euclidean", "uniform")

    other = tf.Variable(1.0)

    @tf.function
    def unwatched(e):
        with tf.GradientTape() as tape:
            loss = fc.in_batch_contrastive_loss(labels, e) * other
        return loss, tape.gradient(loss, other)

    on_tape = _op_types(watched.get_concrete_function(e).graph)
    # The forward op is gone; the second sweep waits in the cond's other branch.
    assert _library.IN_BATCH_OP_NAME not in on_tape
    assert _library.IN_BATCH_GRAD_OP_NAME in on_tape
    assert {"If", "StatelessIf"} & on_tape
    off_tape = _op_types(unwatched.get_concrete_function(e).graph)
    assert _library.IN_BATCH_OP_NAME in off_tape
    assert _library.IN_BATCH_GRAD_OP_NAME not in off_tape

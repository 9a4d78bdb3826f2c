"""The cross-batch memory of InBatchContrastiveLoss (issue 20): what it holds
after each training step, the loss and gradients against it (a float64 oracle
with explicit pairs), warm-up, evaluate, checkpoints and fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_in_batch import PAIR_WEIGHTINGS, assert_close, batch
from test_in_batch_references import oracle

import fused_contrastive as fc
from fused_contrastive import keras2

SIZE = 10


def steps(rng, count, rows=4, dim=3):
    return [batch(rng, rows, dim, duplicates=False) for _ in range(count)]


def train_step(loss_object, labels, e):
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss_object(labels, x)
    return float(value), tape.gradient(value, x).numpy()


@pytest.mark.parametrize("cls", [fc.InBatchContrastiveLoss, keras2.InBatchContrastiveLoss])
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
def test_memory_over_steps_matches_float64_pairs(rng, cls, weighting):
    options = dict(memory_size=SIZE, memory_warmup_steps=1, pair_weighting=weighting)
    if cls is fc.InBatchContrastiveLoss:
        options["dtype"] = "float64"  # tf_keras' computes in the inputs' dtype
    loss_object = cls(**options)
    held_labels, held = np.zeros(0, np.int64), np.zeros((0, 3))
    for step, (labels, e) in enumerate(steps(rng, 5)):
        value, grad = train_step(loss_object, labels, e)
        # The warm-up step uses no memory; later steps every row filled so far.
        refs = (held_labels, held) if step >= 1 else (held_labels[:0], held[:0])
        want_loss, want_grad, _ = oracle(
            labels, e, *refs, np.full(4, 0.25), pair_weighting=weighting
        )
        assert_close(value, want_loss.mean(), "float32", f"loss, step {step}")
        assert_close(grad, want_grad, "float32", f"gradient, step {step}")
        # The ring: the last SIZE rows seen, written in order from row 0.
        held_labels = np.concatenate([held_labels, labels])[-SIZE:]
        held = np.concatenate([held, e])[-SIZE:]
        memory = loss_object.memory
        filled, head = int(memory.filled), int(memory.head)
        # Oldest first: from the head once full, else from row 0.
        rows = (head + np.arange(SIZE)) % SIZE if filled == SIZE else np.arange(filled)
        np.testing.assert_allclose(memory.embeddings.numpy()[rows], held, rtol=1e-6)
        np.testing.assert_array_equal(memory.labels.numpy()[rows], held_labels)
        assert int(memory.steps) == step + 1


def test_evaluation_and_plain_calls_leave_the_memory_alone(rng):
    loss_object = fc.InBatchContrastiveLoss(memory_size=SIZE)
    (labels, e), (labels2, e2) = steps(rng, 2)
    train_step(loss_object, labels, e)
    before = loss_object.memory.embeddings.numpy().copy()
    loss_object(labels2, tf.constant(e2))  # no tape: evaluate's call
    np.testing.assert_array_equal(loss_object.memory.embeddings.numpy(), before)
    assert int(loss_object.memory.steps) == 1


def test_a_checkpoint_resumes_with_the_same_memory(rng, tmp_path):
    data = steps(rng, 4)
    first = fc.InBatchContrastiveLoss(memory_size=SIZE)
    for labels, e in data[:2]:
        train_step(first, labels, e)
    path = tf.train.Checkpoint(memory=first.memory).write(str(tmp_path / "ckpt"))
    resumed = fc.InBatchContrastiveLoss(memory_size=SIZE)
    # Restored before the first call: the rows arrive as the variables are made.
    tf.train.Checkpoint(memory=resumed.memory).restore(path).expect_partial()
    for labels, e in data[2:]:
        want = train_step(first, labels, e)
        got = train_step(resumed, labels, e)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    for name in ("embeddings", "labels", "filled", "head", "steps"):
        np.testing.assert_array_equal(
            getattr(resumed.memory, name).numpy(), getattr(first.memory, name).numpy()
        )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_fills_the_memory_and_uses_it(rng, jit_compile):
    x = rng.normal(size=(24, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=24)
    keras.utils.set_random_seed(0)
    loss_object = fc.InBatchContrastiveLoss(memory_size=12)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object, jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    memory = loss_object.memory
    assert (int(memory.filled), int(memory.head), int(memory.steps)) == (12, 0, 3)
    # Rows 12..23 of the epoch, embedded by the weights of their own step.
    np.testing.assert_array_equal(np.sort(memory.labels.numpy()), np.sort(y[12:]))
    model.evaluate(x, y, verbose=0)
    assert int(memory.steps) == 3


def test_config_carries_the_memory_options():
    loss_object = fc.InBatchContrastiveLoss(memory_size=64, memory_warmup_steps=5)
    config = loss_object.get_config()
    assert (config["memory_size"], config["memory_warmup_steps"]) == (64, 5)
    again = fc.InBatchContrastiveLoss.from_config(config)
    assert (again.memory.size, again.memory.warmup_steps) == (64, 5)
    assert fc.InBatchContrastiveLoss().memory is None
    memory = again.memory
    again.margin = 2.0  # other options keep the memory
    assert again.memory is memory
    with pytest.raises(ValueError, match="memory_size must be a non-negative int"):
        fc.InBatchContrastiveLoss(memory_size=-1)
    with pytest.raises(TypeError, match="memory_warmup_steps must be a non-negative int"):
        fc.InBatchContrastiveLoss(memory_size=4, memory_warmup_steps=1.5)

"""gather_across_replicas (issue 20): each replica's anchors pair with the global
batch, and the replicas' losses and gradients add up to the single-device ones
of the global batch, equal and unequal replica batches alike.

Each strategy runs in fresh processes (the logical CPUs must be configured
before TensorFlow starts); the processes print JSON that the tests check."""

import numpy as np
import pytest
import tensorflow as tf
from support import printed_result, run_python, run_workers

import fused_contrastive as fc

# Rows, inputs and a Dense model shared by the scripts: a first batch of 8
# rows (4 per replica), then a last batch of 7 (4 and 3). Keras 3.12's fit
# reduces the first batch's per-replica values into one to build the model,
# which fails for unequal replica batches, so the unequal one comes second.
COMMON = """
import json, sys
import numpy as np
rng = np.random.default_rng(0)
X = rng.normal(size=(15, 6)).astype(np.float32)
Y = rng.integers(0, 3, size=15)
W0 = [rng.normal(size=(6, 8)).astype(np.float32) * 0.5, rng.normal(size=8).astype(np.float32)]

def relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))
"""

MIRRORED = (
    COMMON
    + """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tf_keras
import fused_contrastive as fc
from fused_contrastive import keras2

MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ONE = tf.distribute.get_strategy()
out = {}

def fit(strategy, jit, gather, reduction="sum_over_batch_size", weighted=False, **options):
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
        model.set_weights(W0)
        loss = fc.InBatchContrastiveLoss(
            reduction=reduction, gather_across_replicas=gather, pair_weighting="balanced",
            **options)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit)
    data = (X, Y, np.linspace(0.5, 2.0, 15).astype(np.float32)) if weighted else (X, Y)
    history = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(8), verbose=0)
    return history.history["loss"][0], model.get_weights(), loss

# fit with jit_compile=True cannot run under MirroredStrategy on logical CPUs
# (XLA: "Trying to access resource ... located in device CPU:1 from device
# CPU:0", with a plain Dense and "mse" too); the custom loop below compiles
# each replica's step with XLA instead.
for jit in (False,):
    for reduction, weighted in (("sum_over_batch_size", False), ("sum", False),
                                ("mean_with_sample_weight", True)):
        want = fit(ONE, jit, False, reduction, weighted)
        got = fit(MIRRORED, jit, True, reduction, weighted)
        # fit's reported loss weighs each replica's value by its batch size
        # (Keras' loss tracker), not the global mean when the last batch splits
        # 4 and 3: the weights, from the gradients, are what must agree.
        out[f"fit jit={jit} {reduction}"] = {
            "weights": max(relative(g, w) for g, w in zip(got[1], want[1])),
        }

# A memory of 6 rows: the second step pairs with the first batch's last 6
# rows, written by the first replica from the gathered batch, so both hold
# the same rows.
want = fit(ONE, False, False, memory_size=6)
got = fit(MIRRORED, False, True, memory_size=6)
held = [v.numpy() for v in MIRRORED.experimental_local_results(got[2].memory.embeddings)]
out["fit with a memory"] = {
    "weights": max(relative(g, w) for g, w in zip(got[1], want[1])),
    "memory": relative(held[0], want[2].memory.embeddings.numpy()),
    "replicas' memories": relative(held[1], held[0]),
}

# gather_across_replicas=False: each replica's loss over its own batch, Keras
# averaging the replicas' means (the first batch: two replicas of 4 rows).
with MIRRORED.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    model.set_weights(W0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=fc.InBatchContrastiveLoss())
first = model.fit(tf.data.Dataset.from_tensor_slices((X[:8], Y[:8])).batch(8), verbose=0)
e = X[:8] @ W0[0] + W0[1]
halves = [float(tf.reduce_mean(fc.in_batch_contrastive_loss(Y[s], e[s])))
          for s in (slice(0, 4), slice(4, 8))]
out["per-replica loss"] = relative(first.history["loss"][0], np.mean(halves))
out["global loss differs"] = relative(
    float(tf.reduce_mean(fc.in_batch_contrastive_loss(Y[:8], e))), np.mean(halves))

# A custom loop with the function: tf.nn.compute_average_loss over the global
# batch; unequal replica batches (5 and 3 rows).
e_all = (X[:8] @ W0[0] + W0[1]).astype(np.float32)
def rows(context):
    part = slice(0, 5) if context.replica_id_in_sync_group == 0 else slice(5, 8)
    return tf.constant(Y[part]), tf.constant(e_all[part])
def step(labels, e):
    with tf.GradientTape() as tape:
        tape.watch(e)
        loss = tf.nn.compute_average_loss(
            fc.in_batch_contrastive_loss(labels, e, gather_across_replicas=True),
            global_batch_size=8)
    return loss, tape.gradient(loss, e)
# Not with jit_compile=True: XLA inside MirroredStrategy's replicas on logical
# CPUs fails as fit does above; the ops take run-time anchor ranges under XLA
# (test_in_batch_references.py).
for jit in (False,):
    loss, grad = MIRRORED.run(tf.function(step, jit_compile=jit),
                              args=MIRRORED.experimental_distribute_values_from_function(rows))
    x = tf.constant(e_all)
    with tf.GradientTape() as tape:
        tape.watch(x)
        want = tf.reduce_mean(fc.in_batch_contrastive_loss(Y[:8], x))
    got_loss = sum(float(v) for v in MIRRORED.experimental_local_results(loss))
    got_grad = np.concatenate([g.numpy() for g in MIRRORED.experimental_local_results(grad)])
    out[f"custom loop jit={jit}"] = {
        "loss": relative(got_loss, float(want)),
        "grad": relative(got_grad, tape.gradient(want, x).numpy()),
    }

# The tf_keras class in tf_keras' fit.
def fit2(strategy, gather):
    with strategy.scope():
        model = tf_keras.Sequential([tf_keras.Input((6,)), tf_keras.layers.Dense(8)])
        model.set_weights(W0)
        model.compile(optimizer=tf_keras.optimizers.SGD(0.1),
                      loss=keras2.InBatchContrastiveLoss(gather_across_replicas=gather))
    history = model.fit(tf.data.Dataset.from_tensor_slices((X, Y)).batch(8), verbose=0)
    return history.history["loss"][0], model.get_weights()
want, got = fit2(ONE, False), fit2(MIRRORED, True)
out["tf_keras fit"] = {"weights": max(relative(g, w) for g, w in zip(got[1], want[1]))}
print("RESULT", json.dumps(out))
"""
)


def test_mirrored_strategy_equals_one_device_on_the_global_batch():
    out = printed_result(run_python(MIRRORED, timeout=900))
    for name in [k for k in out if k.startswith(("fit", "custom loop", "tf_keras"))]:
        for what, error in out[name].items():
            assert error <= 1e-5, (name, what, error)
    # False: the mean of the replicas' own in-batch means, documented as such,
    # which is not the global batch's loss.
    assert out["per-replica loss"] <= 1e-6
    assert out["global loss differs"] > 1e-3


WORKER = (
    COMMON
    + """
import os
import tensorflow as tf
# Before anything else runs TensorFlow (the strategy's rule).
strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras
import fused_contrastive as fc
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
part = slice(0, 5) if task == 0 else slice(5, 8)  # unequal: 5 and 3 rows
with strategy.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    model.set_weights(W0)
    loss_object = fc.InBatchContrastiveLoss(gather_across_replicas=True)

@tf.function
def step(x, y):
    def replica(x, y):
        with tf.GradientTape() as tape:
            loss = loss_object(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = tf.distribute.get_replica_context().all_reduce("sum", grads)
        for variable, grad in zip(model.trainable_variables, grads):
            variable.assign_sub(0.1 * grad)
        return loss
    return strategy.run(replica, args=(x, y))

loss = step(tf.constant(X[part]), tf.constant(Y[part]))
print("RESULT", json.dumps({"loss": float(loss),
                            "weights": [w.tolist() for w in model.get_weights()]}))
"""
)


def test_multi_worker_mirrored_strategy_equals_one_device_on_the_global_batch():
    out = [printed_result(result) for result in run_workers(WORKER)]
    # One device on the global batch of 8, Keras' mean over anchors.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(15, 6)).astype(np.float32)[:8]
    y = rng.integers(0, 3, size=15)[:8]
    w0 = [rng.normal(size=(6, 8)).astype(np.float32) * 0.5, rng.normal(size=8).astype(np.float32)]
    kernel, bias = (tf.Variable(w) for w in w0)
    with tf.GradientTape() as tape:
        loss = fc.InBatchContrastiveLoss()(y, x @ kernel + bias)
    grads = tape.gradient(loss, [kernel, bias])
    want = [w - 0.1 * g.numpy() for w, g in zip(w0, grads)]
    np.testing.assert_allclose(sum(o["loss"] for o in out), float(loss), rtol=1e-5)
    for o in out:  # both workers hold the same weights: the global step's
        for got, expected in zip(o["weights"], want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gather_is_off_outside_a_replica_context_and_in_the_config(rng):
    labels = rng.integers(0, 3, size=9)
    e = rng.normal(size=(9, 4))
    np.testing.assert_array_equal(
        fc.in_batch_contrastive_loss(labels, e, gather_across_replicas=True),
        fc.in_batch_contrastive_loss(labels, e),
    )
    loss = fc.InBatchContrastiveLoss(gather_across_replicas=True)
    assert loss.get_config()["gather_across_replicas"] is True
    assert fc.InBatchContrastiveLoss.from_config(loss.get_config()).gather_across_replicas
    with pytest.raises(TypeError, match="gather_across_replicas must be True or False"):
        fc.InBatchContrastiveLoss(gather_across_replicas="yes")

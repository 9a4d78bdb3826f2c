"""SavedModel export/load across processes, and tf.distribute."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf
from conftest import distance_model, pair_data, run_python

import keras
from fused_contrastive import ContrastiveLoss


class Exported(tf.Module):
    """What a user serves: the model, plus loss and gradients for fine-tuning."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.loss = ContrastiveLoss(margin=1.2)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def serve(self, x):
        return {"distance": self.model(x)}

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32),
                                  tf.TensorSpec([None], tf.float32)])
    def loss_and_gradients(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x))
        return {"loss": loss,
                "gradients": tape.gradient(loss, self.model.trainable_variables)}


def test_saved_model_round_trip_in_a_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(9)
    x, y = pair_data(rng, n=64)
    model = distance_model()
    model.compile(optimizer="adam", loss=ContrastiveLoss(margin=1.2), jit_compile=False)
    model.fit(x, y, epochs=2, verbose=0)
    exported = Exported(model)
    path = str(tmp_path / "saved")
    tf.saved_model.save(exported, path, signatures={"serving_default": exported.serve})
    expected = exported.loss_and_gradients(x, y)
    np.savez(tmp_path / "expected.npz", x=x, y=y, distance=exported.serve(x)["distance"],
             loss=expected["loss"], **{f"g{i}": g for i, g in enumerate(expected["gradients"])})

    result = run_python(f"""
        import numpy as np, tensorflow as tf
        import fused_contrastive
        loaded = tf.saved_model.load({path!r})
        e = np.load({str(tmp_path / "expected.npz")!r})
        served = loaded.signatures["serving_default"](x=tf.constant(e["x"]))["distance"]
        assert np.array_equal(served, e["distance"])
        out = loaded.loss_and_gradients(e["x"], e["y"])
        assert np.array_equal(out["loss"], e["loss"]), (out["loss"], e["loss"])
        for i, g in enumerate(out["gradients"]):
            assert np.array_equal(g, e[f"g{{i}}"])
        # The op's registered gradient works on the loaded function too.
        x = tf.constant(e["x"])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loaded.loss_and_gradients(x, e["y"])["loss"]
        assert tape.gradient(loss, x) is not None
        print("identical")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "identical"

    # Without the package the op is unknown; TensorFlow's error names it.
    result = run_python(f"""
        import tensorflow as tf
        tf.saved_model.load({path!r})
    """)
    assert result.returncode != 0
    assert "FusedContrastive>ContrastiveLoss" in result.stderr


# Shared by the scripts below: data, a model, and one custom-loop step that
# returns the globally averaged loss and gradients.
COMMON = """
    import json, os
    import numpy as np, tensorflow as tf, keras
    from fused_contrastive import ContrastiveLoss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    GLOBAL_BATCH = 16

    def make_model():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1, activation="softplus")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=ContrastiveLoss(),
                      jit_compile=False)
        return model

    def custom_loop_step(strategy):
        with strategy.scope():
            model = make_model()
            loss_fn = ContrastiveLoss(reduction="none")
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).take(1))

        @tf.function
        def step(batch):
            xb, yb = batch
            with tf.GradientTape() as tape:
                per_example = loss_fn(yb, model(xb))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("sum", loss), ctx.all_reduce("sum", grads)

        loss, grads = strategy.run(step, args=(next(iter(dataset)),))
        first = lambda v: strategy.experimental_local_results(v)[0].numpy()
        return float(first(loss)), [first(g).tolist() for g in grads]
"""

MIRRORED_SCRIPT = COMMON + """
    def fit_losses(strategy):
        with strategy.scope():
            model = make_model()
        return model.fit(x, y, epochs=3, batch_size=GLOBAL_BATCH, shuffle=False,
                         verbose=0).history["loss"]

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    np.testing.assert_allclose(fit_losses(two), fit_losses(one), rtol=1e-5)
    loss_two, grads_two = custom_loop_step(two)
    loss_one, grads_one = custom_loop_step(one)
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-6)
    for a, b in zip(grads_two, grads_one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    print("mirrored matches one device")
"""

# Logical devices must be configured before TensorFlow initialises them.
TWO_CPUS = """
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def test_mirrored_strategy_matches_one_device():
    result = run_python(TWO_CPUS + MIRRORED_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mirrored matches one device" in result.stdout


# Keras 3's fit() cannot take MultiWorkerMirroredStrategy's per-replica inputs
# (it fails converting a PerReplica value, with or without this loss), so the
# workers run the custom training loop step.
WORKER_SCRIPT = COMMON + """
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    loss, grads = custom_loop_step(strategy)
    print("RESULT", json.dumps([loss, grads]))
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _result(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_multi_worker_mirrored_strategy_on_localhost():
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WORKER_SCRIPT)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": json.dumps(config)}))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    single = run_python(WORKER_SCRIPT)
    assert single.returncode == 0, single.stderr[-3000:]
    want_loss, want_grads = _result(single.stdout)
    for out, _ in outputs:
        loss, grads = _result(out)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

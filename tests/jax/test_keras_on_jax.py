"""The Keras 3 losses under KERAS_BACKEND=jax (issue 22): models trained for
a few steps from the same weights give the TensorFlow backend's losses; every
reduction, with and without sample weights, gives its values; `.keras` files
written on one backend load and evaluate on the other; PairAccuracy and
PairDistance give the TensorFlow backend's values too. keras_backend_run.py
runs each backend in a process of its own (Keras picks its backend once per
process)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support import run_python

import keras

RUN = Path(__file__).with_name("keras_backend_run.py")


def _run(backend, directory):
    result = run_python(
        f"import runpy, sys; sys.argv = ['run', {str(directory)!r}]; "
        f"runpy.run_path({str(RUN)!r}, run_name='__main__')",
        KERAS_BACKEND=backend,
        JAX_PLATFORMS="cpu",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run_module():
    """keras_backend_run imported here (for its data)."""
    sys.path.insert(0, str(RUN.parent))
    try:
        import keras_backend_run
    finally:
        sys.path.remove(str(RUN.parent))
    return keras_backend_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keras-backends")
    # TensorFlow first: the JAX run then loads the files it saved.
    on_tf = _run("tensorflow", directory)
    on_jax = _run("jax", directory)
    return on_tf, on_jax, directory


def test_each_run_used_its_backend(runs):
    on_tf, on_jax, _ = runs
    assert (on_tf["backend"], on_jax["backend"]) == ("tensorflow", "jax")


@pytest.mark.parametrize("kind", ["distances", "pairs", "in_batch"])
def test_training_on_jax_gives_the_tensorflow_backends_losses(runs, kind):
    on_tf, on_jax, _ = runs
    want, got = on_tf["history"][kind], on_jax["history"][kind]
    assert len(got) == 3 and want[0] != want[-1]  # it trained
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pair_accuracy_and_pair_distance_on_jax_give_the_tensorflow_backends_values(runs):
    on_tf, on_jax, _ = runs
    assert len(on_jax["pair_accuracy"]) == 3 and 0 < on_tf["pair_accuracy"][0] < 1
    np.testing.assert_allclose(on_jax["pair_accuracy"], on_tf["pair_accuracy"], rtol=1e-6)
    assert len(on_jax["pair_distance"]) == 64
    np.testing.assert_allclose(on_jax["pair_distance"], on_tf["pair_distance"], rtol=1e-5)
    # The PairDistance model saved on TensorFlow predicts the same on JAX.
    np.testing.assert_allclose(on_jax["loaded_pair_distance"], on_tf["pair_distance"], rtol=1e-5)


def test_every_reduction_and_weighting_gives_the_tensorflow_backends_values(runs):
    on_tf, on_jax, _ = runs
    assert len(on_jax["reduced"]) == 3 * 6 * 4
    assert on_jax["reduced"].keys() == on_tf["reduced"].keys()
    for name, want in on_tf["reduced"].items():
        np.testing.assert_allclose(on_jax["reduced"][name], want, rtol=1e-5, err_msg=name)


def test_files_saved_on_tensorflow_load_and_evaluate_on_jax(runs):
    on_tf, on_jax, _ = runs
    assert on_jax["loaded"].keys() == {"distances", "pairs", "in_batch"}
    for kind, (config, loss) in on_jax["loaded"].items():
        assert config["name"] in ("contrastive_loss", "in_batch_contrastive_loss")
        np.testing.assert_allclose(loss, on_tf[f"evaluate-{kind}"], rtol=1e-5)
    assert on_jax["loaded"]["pairs"][0]["distance"] == "cosine"
    assert on_jax["loaded"]["in_batch"][0]["miner"] == "batch_hard"


@pytest.mark.parametrize("kind", ["distances", "pairs", "in_batch"])
def test_files_saved_on_jax_load_and_evaluate_on_tensorflow(runs, kind):
    _, on_jax, directory = runs
    run = _run_module()
    assert keras.backend.backend() == "tensorflow"
    loaded = keras.saving.load_model(directory / f"jax-{kind}.keras")
    assert type(loaded.loss).__name__ in ("ContrastiveLoss", "InBatchContrastiveLoss")
    x, y, w = run.data(kind)
    got = loaded.evaluate(x, y, sample_weight=w, verbose=0)
    np.testing.assert_allclose(got, on_jax[f"evaluate-{kind}"], rtol=1e-5)


def test_pair_distance_model_saved_on_jax_predicts_the_same_on_tensorflow(runs):
    _, on_jax, directory = runs
    loaded = keras.saving.load_model(directory / "jax-pair-distance.keras")
    assert type(loaded.layers[-1]).__name__ == "PairDistance"
    x = _run_module().data("pairs")[0]
    got = loaded.predict(x, verbose=0)
    np.testing.assert_allclose(got, on_jax["pair_distance"], rtol=1e-5)


def test_large_integer_ids_stay_distinct_on_jax(runs):
    on_tf, on_jax, _ = runs
    assert on_jax["large_ids"] == on_tf["large_ids"]
    # Row 0 is alone in its class: its pairs with rows 1 and 2 (distances 0.5
    # and 0.6) are negative, (1 - d)^2, not d^2 as they would be if 2**24
    # and 2**24 + 1 merged.
    np.testing.assert_allclose(on_jax["large_ids"][0], (0.5**2 + 0.4**2) / 3, rtol=1e-6)


def test_what_jax_cannot_do_yet_raises_a_clear_error(runs):
    on_tf, on_jax, _ = runs
    assert on_tf["gather"] == "no error"  # outside a strategy there is nothing to gather
    assert (
        "gather_across_replicas and memory_size need Keras' TensorFlow backend"
        in (on_jax["gather"])
    )


DATA_PARALLEL = """
import json

import jax
import keras
import numpy as np

import fused_contrastive as fc

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 8)).astype("float32")
y = rng.integers(0, 4, 64)


def fit(distribution):
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=fc.InBatchContrastiveLoss(margin=1.0))
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    return history.history["loss"], model.get_weights()[0], model


one_losses, one_kernel, _ = fit(None)
both_losses, both_kernel, model = fit(keras.distribution.DataParallel(devices=jax.devices()))
# Each half of the batch alone: what a loss per replica would give.
embeddings = np.asarray(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]).predict(x))
loss = fc.InBatchContrastiveLoss(margin=1.0)
halves = [float(loss(y[s], embeddings[s])) for s in (slice(0, 32), slice(32, 64))]
print(json.dumps({
    "devices": len(jax.devices()),
    "kernel_devices": len(model.layers[0].kernel.value.sharding.device_set),
    "one": one_losses, "both": both_losses,
    "kernel_gap": float(np.abs(one_kernel - both_kernel).max()),
    "global": float(loss(y, embeddings)), "halves": halves,
}))
"""


def test_data_parallel_fit_on_jax_devices_trains_on_the_global_batch():
    # keras.distribution.DataParallel shards the batch over the devices, and
    # jax.jit compiles one program for the global batch: XLA replicates the
    # kernels' custom call, so each anchor pairs with the whole global batch
    # (what gather_across_replicas=True does on TensorFlow), with no option.
    result = run_python(
        DATA_PARALLEL,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["kernel_devices"] == 2
    np.testing.assert_allclose(out["both"], out["one"], rtol=1e-5)
    assert out["one"][0] != out["one"][1] and out["kernel_gap"] < 1e-5
    # The per-half losses differ from the global one: the test tells them apart.
    assert abs(np.mean(out["halves"]) - out["global"]) > 1e-3 * abs(out["global"])

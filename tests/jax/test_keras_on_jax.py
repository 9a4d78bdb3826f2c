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

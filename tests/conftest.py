import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

LABEL_DTYPES = ["bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(params=["eager", "tf.function"])
def run(request):
    """Runs a callable eagerly or traced in a tf.function (retraced per call)."""
    if request.param == "eager":
        return lambda f, *args: f(*args)
    return lambda f, *args: tf.function(f, reduce_retracing=False)(*args)


def random_labels(rng, shape, dtype):
    """Hard 0/1 labels for integer/bool dtypes, soft labels in [0, 1] for floats."""
    if dtype in ("bool", "int32", "int64"):
        return tf.constant(rng.integers(0, 2, size=shape).astype(dtype))
    return tf.cast(tf.constant(rng.random(size=shape)), dtype)


def random_distances(rng, shape, dtype, high=2.0):
    return tf.cast(tf.constant(rng.uniform(0.0, high, size=shape)), dtype)


def pair_data(rng, n=256, features=6):
    """Inputs and 0/1 labels that a small model can learn: "similar" pairs have
    a positive first feature."""
    x = rng.normal(size=(n, features)).astype("float32")
    return x, (x[:, 0] > 0).astype("float32")


def distance_model(features=6):
    """A small Keras model whose [B, 1] output is a non-negative distance."""
    import keras

    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1, activation="softplus")])


def run_python(code, timeout=600, **env):
    """Runs `code` in a fresh Python process with extra environment variables."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=timeout)

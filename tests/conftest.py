"""pytest fixtures shared by every test folder (helpers live in support.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(params=["eager", "tf.function"])
def run(request):
    """Runs a callable eagerly or traced in a tf.function (retraced per call)."""
    if request.param == "eager":
        return lambda f, *args: f(*args)
    return lambda f, *args: tf.function(f, reduce_retracing=False)(*args)

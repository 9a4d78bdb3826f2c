"""pytest fixtures shared by every test folder (helpers live in support.py)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf


# The longest test files first (measured, longest first): README's test
# command spreads files over the cores (pytest-xdist, --dist loadfile), which
# takes them in collection order, and a long file started last would run
# alone at the end.
SLOW_FILES = [
    "packaging/test_bazel.py",
    "packaging/test_build_variants.py",
    "in_batch/test_in_batch_xla.py",
    "pairs/test_pairs_xla.py",
    "in_batch/test_in_batch_miners.py",
    "packaging/test_sanitizers.py",
    "packaging/test_gpu_check_script.py",
    "pairs/test_embedding_pairs.py",
]


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(params=["eager", "tf.function"])
def run(request):
    """Runs a callable eagerly or traced in a tf.function (retraced per call)."""
    if request.param == "eager":
        return lambda f, *args: f(*args)
    return lambda f, *args: tf.function(f, reduce_retracing=False)(*args)

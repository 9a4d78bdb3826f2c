"""Test helpers, defined once: dtype lists, data, the Keras reference reduction, runners
(conftest.py holds the fixtures; tests import this module as `support`)."""

import contextlib
import doctest
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import keras
from fused_contrastive import _inputs, _library, contrastive_loss_reference

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DATA = TESTS / "data"

# The dtypes the package supports, by name (parametrize ids, NumPy casts).
LABEL_DTYPES = [dtype.name for dtype in _inputs.LABEL_DTYPES]
DISTANCE_DTYPES = [dtype.name for dtype in _inputs.DISTANCE_DTYPES]
DISTANCES = list(_inputs.DISTANCES)

# Keras 3 reductions: those the fused-reduction op computes, then all of them.
FUSED_REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"]
REDUCTIONS = FUSED_REDUCTIONS + ["none", None]

# TF Addons' own test case for its ContrastiveLoss (margin 1): labels,
# distances, the per-sample losses and its weights.
TFA_LABELS = [0, 0, 1, 1, 0, 1]
TFA_DISTANCES = [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]
TFA_LOSSES = [0.81, 0.49, 1.69, 0.49, 0.0, 0.25]
TFA_WEIGHTS = [1.2, 0.8, 0.5, 0.4, 1.5, 1.0]

# Bool labels whose bytes are not 0/1 (what tf.io.decode_raw or a reinterpreted
# buffer can give): every nonzero byte is True. Distances of 0.3, margin 1.
ODD_BOOL_BYTES = b"\x02\x01\x00\xff"
ODD_BOOL_AS_LABELS = [True, True, False, True]
ODD_BOOL_LOSSES = [0.09, 0.09, 0.49, 0.09]


def odd_bool_labels():
    """[True, True, False, True] stored as the bytes 2, 1, 0, 255."""
    return tf.io.decode_raw(tf.constant(ODD_BOOL_BYTES), tf.bool)


def random_labels(rng, shape, dtype):
    """Hard 0/1 labels for integer/bool dtypes, soft labels in [0, 1] for floats."""
    if dtype in ("bool", "int32", "int64"):
        return tf.constant(rng.integers(0, 2, size=shape).astype(dtype))
    return tf.cast(tf.constant(rng.random(size=shape)), dtype)


def random_distances(rng, shape, dtype, high=2.0):
    return tf.cast(tf.constant(rng.uniform(0.0, high, size=shape)), dtype)


def embeddings(rng, shape, dtype, special=True):
    """a, b of `shape` ([..., D]) with distances O(1); when `special`, the first
    pairs are identical, a zero vector, and both zero."""
    dim = shape[-1]
    a = rng.normal(size=shape) / np.sqrt(dim)
    b = rng.normal(size=shape) / np.sqrt(dim)
    if special:
        flat_a, flat_b = a.reshape(-1, dim), b.reshape(-1, dim)
        rows = flat_a.shape[0]
        if rows >= 3:
            flat_a[0] = flat_b[0]
            flat_a[1] = 0.0
            flat_a[2] = flat_b[2] = 0.0
    return tf.cast(tf.constant(a), dtype), tf.cast(tf.constant(b), dtype)


def bits(t):
    """Raw bits, so NaN == NaN and -0 != +0 in comparisons."""
    a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    return a.view(
        np.uint16 if a.dtype.itemsize == 2 else np.uint32 if a.dtype.itemsize == 4 else np.uint64
    )


def numpy_contrastive_loss(y, d, margin=1.0, similar_label=1):
    """TF Addons' formula in float64 NumPy: y*d^2 + (1-y)*max(margin-d, 0)^2,
    on 1 - y when similar_label is 0."""
    y = np.asarray(y, np.float64)
    d = np.asarray(d, np.float64)
    if similar_label == 0:
        y = 1.0 - y
    return y * d**2 + (1.0 - y) * np.maximum(margin - d, 0.0) ** 2


class KerasReducedReference(keras.losses.Loss):
    """Keras' own reduction (weights, masks, divisors, corner cases) of the
    pure-TF per-sample loss: the yardstick for ContrastiveLoss."""

    def __init__(self, margin=1.0, similar_label=1, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        self.similar_label = similar_label

    def call(self, y_true, y_pred):
        return contrastive_loss_reference(y_true, y_pred, self.margin, self.similar_label)


def loss_and_gradient(loss_object, y, d, sample_weight=None, upstream=1.0):
    """A loss object's value on (y, d) and the gradient with respect to d of that
    value times `upstream` (a scalar, or per-sample for unreduced losses)."""
    with tf.GradientTape() as tape:
        tape.watch(d)
        loss = loss_object(y, d, sample_weight=sample_weight)
        scaled = loss * tf.cast(upstream, loss.dtype)
    return loss, tape.gradient(scaled, d)


def hessian(total_fn, d):
    """The Hessian of the scalar total_fn(d) with respect to d."""
    with tf.GradientTape() as outer:
        outer.watch(d)
        with tf.GradientTape() as inner:
            inner.watch(d)
            total = total_fn(d)
        grad = inner.gradient(total, d)
    return outer.jacobian(grad, d)


def pair_data(rng, n=256, features=6):
    """Inputs and 0/1 labels that a small model can learn: "similar" pairs have
    a positive first feature."""
    x = rng.normal(size=(n, features)).astype("float32")
    return x, (x[:, 0] > 0).astype("float32")


def distance_model(features=6):
    """A small Keras model whose [B, 1] output is a non-negative distance."""
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="softplus"),
        ]
    )


def run_python(code, timeout=600, **env):
    """Runs `code` in a fresh Python process with extra environment variables."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


# Read by the op library when it loads (cc/tf/xla/hlo.cc): "1" makes XLA's
# CPU backend compile the HLO lowering, what XLA's GPU backend runs, instead
# of calling the CPU kernels.
HLO_ON_CPU_ENV = "FUSED_CONTRASTIVE_XLA_CPU_HLO"
HLO_ON_CPU = os.environ.get(HLO_ON_CPU_ENV) == "1"


def run_tests_under_hlo(test_file, tmp_path, keyword=None):
    """Runs the tests of `test_file` (those `keyword` selects, pytest -k, if
    given) in a fresh pytest process with HLO_ON_CPU_ENV=1. Asserts that some
    ran and all passed."""
    select = ["-k", keyword] if keyword else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(test_file),
            *select,
            "-o",
            f"cache_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, HLO_ON_CPU_ENV: "1"},
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


# A model TF Addons compiled with tfa.losses.ContrastiveLoss(margin=0.75) and
# saved as h5, and TF Addons' own numbers for it (tests/data/make_tfa_model.py).
TFA_H5 = DATA / "tfa_contrastive_model.h5"
TFA_RECORD = DATA / "tfa_contrastive_model.json"


def load_tfa_h5_in_fresh_process(keras_module, package_first=False, **env):
    """Loads TFA_H5 with `keras_module` ("keras" or "tf_keras") in a fresh
    process: first without fused_contrastive, which must fail, then after
    `import fused_contrastive` (no custom_objects). With package_first, the
    package is imported before `keras_module` and only the second load runs.
    Checks the model against TF Addons' numbers and returns what the process saw."""
    record = json.loads(TFA_RECORD.read_text())
    assert record["saved_loss_config"]["class_name"] == "Addons>ContrastiveLoss"
    result = run_python(
        f"""
        import json
        import numpy as np
        {"import fused_contrastive" if package_first else ""}
        import {keras_module} as keras_module
        record = json.load(open({str(TFA_RECORD)!r}))
        failure = "not tried"
        if not {package_first}:
            try:
                keras_module.models.load_model({str(TFA_H5)!r})
                failure = None
            except Exception as error:
                failure = type(error).__name__ + ": " + " ".join(str(error).split())
        import fused_contrastive
        model = keras_module.models.load_model({str(TFA_H5)!r})
        x = np.array(record["x"], np.float32)
        y = np.array(record["y"], np.float32)
        predictions = model.predict(x, verbose=0)
        name = lambda cls: cls.__module__ + "." + cls.__qualname__
        print("RESULT " + json.dumps({{
            "failure_without_package": failure,
            "loss_class": name(type(model.loss)),
            "package_class": name(fused_contrastive.ContrastiveLoss),
            "config": model.loss.get_config(),
            "predictions": predictions.tolist(),
            "per_sample": fused_contrastive.contrastive_loss(
                y, predictions, model.loss.margin).numpy().tolist(),
            "evaluate": model.evaluate(x, y.reshape(record["evaluate_label_shape"]),
                                       batch_size=16, verbose=0),
            "evaluate_flat_labels": model.evaluate(x, y, batch_size=16, verbose=0),
        }}))
    """,
        **env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    measured = json.loads(line[len("RESULT ") :])
    if not package_first:
        assert measured["failure_without_package"] is not None, "loaded without the package"
        assert "contrastive" in measured["failure_without_package"].lower(), measured
    assert measured["config"]["margin"] == record["margin"] == 0.75
    assert measured["config"]["similar_label"] == 1
    np.testing.assert_allclose(measured["predictions"], record["predictions"], rtol=1e-6)
    np.testing.assert_allclose(
        measured["per_sample"], record["tfa_per_sample_loss"], rtol=1e-6, atol=1e-9
    )
    assert record["evaluate_label_shape"] == [16, 1]
    np.testing.assert_allclose(measured["evaluate"], record["tfa_evaluate_loss"], rtol=1e-6)
    # [B] labels give the same number: no [B, B] broadcast against [B, 1] outputs.
    np.testing.assert_allclose(
        measured["evaluate_flat_labels"], record["tfa_evaluate_loss"], rtol=1e-6
    )
    return measured


# What another build of the op library (CPU-only CMake, Bazel) must pass: the
# compiled ops, their Python glue and gradients, and TF Addons' numbers.
CORE_TESTS = [
    "distances/test_distances_op_library.py",
    "tf/test_library.py",
    "distances/test_losses.py::TestTfaCases",
]


def run_core_tests_against(library, tmp_path, tests=tuple(CORE_TESTS)):
    """Runs `tests` (the core tests) in a fresh pytest process that loads `library`."""
    env = {**os.environ, _library.LIBRARY_ENV: str(library)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            *(str(TESTS / test) for test in tests),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )


def run_doctests(module):
    """doctest.testmod of `module` under NumPy's default print options:
    (its TestResults, the failure report doctest printed)."""
    report = io.StringIO()
    with (
        np.printoptions(
            legacy=False,
            precision=8,
            linewidth=75,
            floatmode="maxprec",
            suppress=False,
            threshold=1000,
        ),
        contextlib.redirect_stdout(report),
    ):
        results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    return results, report.getvalue()


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(code, count=2, timeout=600):
    """Runs `code` in `count` fresh processes at once, as the workers of a
    MultiWorkerMirroredStrategy cluster on localhost (TF_CONFIG); returns
    their CompletedProcesses."""
    workers = [f"localhost:{port}" for port in _free_ports(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
                ),
            },
        )
        for index in range(count)
    ]
    outputs = [process.communicate(timeout=timeout) for process in processes]
    return [
        subprocess.CompletedProcess(process.args, process.returncode, out, err)
        for process, (out, err) in zip(processes, outputs)
    ]


def printed_result(result):
    """The JSON a script printed after "RESULT ", once it exited cleanly."""
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])

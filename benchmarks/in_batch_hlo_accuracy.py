"""Accuracy and time of the in-batch ops' HLO lowering (XLA's GPU path) on CPU.

Usage:
    FUSED_CONTRASTIVE_XLA_CPU_HLO=1 python benchmarks/in_batch_hlo_accuracy.py [--repeats N]

Accuracy: float32 batches (B = 64, D = 16) of rows of spread 1 about a point
at norm N ("offset"), or about two opposite such points with their own classes
("clusters"); per-anchor loss and gradient of the CPU kernel (graph mode) and
of the XLA lowering (the HLO with the variable above, else the CPU custom call)
against the float64 oracle of tests/in_batch/test_in_batch.py, as the largest error
relative to the largest oracle value. Time: the reduced op (loss and gradient)
under XLA at B = 4096, D = 128, median of --repeats calls, on random rows and
on rows with a duplicate pair in each of the four row blocks.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "in_batch")]  # the oracle and its test helpers
from test_in_batch import numpy_in_batch  # noqa: E402

from fused_contrastive import _library  # noqa: E402
from fused_contrastive._inputs import PAIR_WEIGHTINGS, all_anchors  # noqa: E402

OPS = _library.op_library
MARGIN, POSITIVE_MARGIN = 1.5, 0.2


def far_batch(rng, norm, clusters, rows=64, dim=16):
    centre = rng.normal(size=dim)
    centre *= norm / np.linalg.norm(centre)
    side = np.arange(rows) % 2 if clusters else np.zeros(rows, int)
    e = np.where(side[:, None] == 0, centre, -centre) + rng.normal(size=(rows, dim)) / np.sqrt(dim)
    return rng.integers(0, 3, size=rows) + 3 * side, e.astype(np.float32).astype(np.float64)


def loss_and_grad(labels, e, distance, weighting, jit):
    scalar = lambda x: tf.constant(x, tf.float64)  # noqa: E731
    attrs = dict(distance=distance, pair_weighting=weighting)

    def f(labels, e):
        args = (scalar(MARGIN), scalar(POSITIVE_MARGIN))
        anchors = all_anchors(e)
        loss = OPS.fused_contrastive_in_batch_contrastive_loss(labels, e, anchors, *args, **attrs)
        grad = OPS.fused_contrastive_in_batch_contrastive_loss_grad(
            labels, e, anchors, tf.ones_like(loss), *args, **attrs
        ).grad
        return loss, grad

    with tf.device("/CPU:0"):
        out = tf.function(f, jit_compile=jit)(
            tf.constant(labels, tf.int64), tf.constant(e, tf.float32)
        )
    return [x.numpy().astype(np.float64) for x in out]


def relative_error(got, want):
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def accuracy():
    rng = np.random.default_rng(0)
    print("case      N    distance   weighting  kernel loss/grad     XLA loss/grad")
    for clusters in (False, True):
        for norm in (100, 272, 560):
            labels, e = far_batch(rng, norm, clusters)
            for distance in ("euclidean", "cosine"):
                for weighting in PAIR_WEIGHTINGS:
                    want = numpy_in_batch(labels, e, MARGIN, POSITIVE_MARGIN, distance, weighting)
                    errors = [
                        relative_error(g, w)
                        for jit in (False, True)
                        for g, w in zip(loss_and_grad(labels, e, distance, weighting, jit), want)
                    ]
                    print(
                        f"{'clusters' if clusters else 'offset':8s} {norm:4d}  {distance:9s}  "
                        "{:9s}  {:.1e} / {:.1e}    {:.1e} / {:.1e}".format(weighting, *errors),
                        flush=True,
                    )


def timing(repeats):
    rows, dim = 4096, 128
    rng = np.random.default_rng(0)
    labels = tf.constant(rng.integers(0, 64, size=rows), tf.int64)
    e = rng.normal(size=(rows, dim)) / np.sqrt(dim)
    duplicated = e.copy()
    duplicated[1::1024] = duplicated[::1024]
    scalar = lambda x: tf.constant(x, tf.float64)  # noqa: E731
    for name, distance, x in (
        ("euclidean", "euclidean", e),
        ("euclidean, a duplicate per block", "euclidean", duplicated),
        ("cosine", "cosine", e),
    ):

        @tf.function(jit_compile=True)
        def step(labels, x, distance=distance):
            out = OPS.fused_contrastive_in_batch_contrastive_loss_reduced(
                labels,
                x,
                all_anchors(x),
                tf.constant(1.0),
                scalar(1.0),
                scalar(0.0),
                scalar(1.0),
                reduction="mean",
                distance=distance,
                pair_weighting="uniform",
            )
            return out[0], out[1]

        x = tf.constant(x, tf.float32)
        with tf.device("/CPU:0"):
            step(labels, x)[1].numpy()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step(labels, x)[1].numpy()
                times.append(time.perf_counter() - start)
        print(f"B = {rows}, D = {dim}, {name}: {np.median(times) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    options = parser.parse_args()
    print(
        "HLO lowering"
        if os.environ.get("FUSED_CONTRASTIVE_XLA_CPU_HLO") == "1"
        else "CPU custom call (set FUSED_CONTRASTIVE_XLA_CPU_HLO=1 for the HLO)"
    )
    accuracy()
    timing(options.repeats)

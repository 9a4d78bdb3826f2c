"""Run by on_jax.py in a process of its own, since Keras picks its backend once
per process: the Keras 3 classes under KERAS_BACKEND=jax, called as `fit`
calls a loss (jax.jit of the value and gradient in y_pred of
loss(y_true, y_pred), Keras' default reduction), against the same formulas
written with keras.ops in a keras.losses.Loss (what a user writes without us).
Prints one JSON line: {case: median seconds, "<case> cpu ms": [user, kernel]
per call, "errors": {case: why}}.

    KERAS_BACKEND=jax python benchmarks/keras_on_jax.py REPEATS MIN_SAMPLE_S
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from harness import error_summary, time_interleaved  # noqa: E402
from in_batch import IN_BATCH_D, make_in_batch_inputs  # noqa: E402
from on_jax import IN_BATCH_B, PAIRS_B, PAIRS_D  # noqa: E402
from pairs import MARGIN, make_embedding_inputs  # noqa: E402

import fused_contrastive as fc  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402


def plain_pairs(y_true, y_pred):
    """The loss on stacked pairs [B, 2, D] in keras.ops."""
    d = ops.sqrt(ops.maximum(ops.sum(ops.square(y_pred[:, 0] - y_pred[:, 1]), axis=-1), 1e-12))
    y = ops.cast(y_true, d.dtype)
    return y * d * d + (1.0 - y) * ops.square(ops.maximum(MARGIN - d, 0.0))


def plain_in_batch(y_true, y_pred):
    """The in-batch all-pairs loss in keras.ops: B x B matrices."""
    norms = ops.sum(y_pred * y_pred, axis=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * ops.matmul(y_pred, ops.transpose(y_pred))
    d = ops.sqrt(ops.maximum(squared, 1e-12))
    same = ops.equal(y_true[:, None], y_true[None, :])
    off_diagonal = ops.logical_not(ops.eye(y_pred.shape[0], dtype="bool"))
    terms = ops.where(same, d * d, ops.square(ops.maximum(MARGIN - d, 0.0)))
    return ops.sum(ops.where(off_diagonal, terms, 0.0), axis=1) / (y_pred.shape[0] - 1)


class Plain(keras.losses.Loss):
    """A formula as a Keras loss: Keras' default reduction of its per-sample values."""

    def __init__(self, formula):
        super().__init__()
        self.formula = formula

    def call(self, y_true, y_pred):
        return self.formula(y_true, y_pred)


def fit_step(loss):
    """What fit's jitted step computes of a loss: its value and its gradient in y_pred."""
    return jax.jit(jax.value_and_grad(lambda y_true, y_pred: loss(y_true, y_pred), argnums=1))


def main(repeats, min_sample_s):
    labels, e = make_in_batch_inputs(IN_BATCH_B, IN_BATCH_D)
    y, a, b = make_embedding_inputs(PAIRS_B, PAIRS_D)
    # Keras feeds y_true as floats; the pairs' model outputs them stacked.
    in_batch_args = (labels.astype(np.float32), e)
    pairs_args = (y.astype(np.float32), np.stack([a, b], axis=1))
    cases = {
        "keras in-batch fused": (fit_step(fc.InBatchContrastiveLoss()), in_batch_args),
        "keras in-batch plain": (fit_step(Plain(plain_in_batch)), in_batch_args),
        "keras pairs fused": (fit_step(fc.ContrastiveLoss(distance="euclidean")), pairs_args),
        "keras pairs plain": (fit_step(Plain(plain_pairs)), pairs_args),
    }
    calls, names, out = [], [], {"errors": {}}
    for name, (fn, args) in cases.items():
        args = tuple(map(jax.numpy.asarray, args))
        call = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))  # noqa: E731
        try:
            value, _ = call()
        except Exception as error:  # reported in the results, whatever it is
            out["errors"][name] = f"error: {error_summary(error)}"
            continue
        out[f"{name} loss"] = float(value)
        calls.append(call)
        names.append(name)
    cpu_ms = []
    out.update(zip(names, time_interleaved(calls, repeats, min_sample_s, cpu_ms)))
    out.update({f"{name} cpu ms": user_kernel for name, user_kernel in zip(names, cpu_ms)})
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))

"""The "miners" section of benchmark.py: the in-batch loss with a miner
(issue 21), B = 4096, D = 128, float32, euclidean, "uniform" pair weighting,
forward and backward, the mean over anchors.

What is compared
    fused    `fused_contrastive.InBatchContrastiveLoss(miner=...)` called as a
             training step calls it (under a GradientTape: the reduced
             one-sweep op), with its gradient.
    unmined  the same class without a miner.
    plain    what a user writes without the op: a Keras-style loss on the
             B x B distance matrix with boolean masks, the hardest positive
             and negative from reduce_max/reduce_min (argmax for batch_hard),
             the kept pairs' mean per anchor (plain_mined_loss below). Its
             loss is printed against the fused one's.
    In tf.function and tf.function(jit_compile=True), taking turns in the same
    repetitions (median of 5 samples of at least 20 ms; 3 with --quick).
    Inputs as the in_batch section's (about 8 rows per class, distances spread
    over about [0, 2 * margin]).

Targets (each miner)
    fused <= 1.6x unmined (tf.function), fused >= 3x plain in tf.function and
    >= 2x plain under XLA.
"""

import math

import numpy as np
import tensorflow as tf

import fused_contrastive as fc
from fused_contrastive import _inputs
from harness import MODES, Row, format_ratio, met
from in_batch import IN_BATCH_D, make_in_batch_inputs
from references import timed

SECTION = "miners"
B = 4096
EPSILON = 0.1
UNMINED_TARGET = 1.6
PLAIN_TARGETS = {"tf.function": 3.0, "tf.function+jit": 2.0}


def plain_mined_loss(labels, e, miner, margin=1.0, epsilon=EPSILON):
    """The mined in-batch loss as a user writes it with B x B masks: per
    anchor, the mean of the kept pairs' terms, averaged over anchors."""
    norms = tf.reduce_sum(e * e, axis=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * tf.matmul(e, e, transpose_b=True)
    d = tf.sqrt(tf.maximum(squared, 1e-12))
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.eye(tf.shape(e)[0], dtype=tf.bool)
    positive = tf.logical_and(same, tf.logical_not(eye))
    negative = tf.logical_not(same)
    held = tf.stop_gradient(d)
    inf = tf.fill(tf.shape(d), np.inf)
    if miner == "batch_hard":
        hardest_positive = tf.argmax(tf.where(positive, held, -inf), axis=1)
        hardest_negative = tf.argmin(tf.where(negative, held, inf), axis=1)
        n = tf.shape(e)[0]
        positive = tf.logical_and(positive, tf.one_hot(hardest_positive, n, True, False))
        negative = tf.logical_and(negative, tf.one_hot(hardest_negative, n, True, False))
    else:
        largest_positive = tf.reduce_max(tf.where(positive, held, -inf), axis=1, keepdims=True)
        smallest_negative = tf.reduce_min(tf.where(negative, held, inf), axis=1, keepdims=True)
        positive = tf.logical_and(positive, held > smallest_negative - epsilon)
        negative = tf.logical_and(negative, held < largest_positive + epsilon)
    terms = tf.where(positive, tf.square(d), 0.0) + tf.where(
        negative, tf.square(tf.nn.relu(margin - d)), 0.0
    )
    kept = tf.reduce_sum(tf.cast(tf.logical_or(positive, negative), d.dtype), axis=1)
    return tf.reduce_mean(tf.math.divide_no_nan(tf.reduce_sum(terms, axis=1), kept))


def training_step(loss, mode):
    def step(labels, e):
        with tf.GradientTape() as tape:
            tape.watch(e)
            value = loss(labels, e)
        return value, tape.gradient(value, e)

    return tf.function(step, jit_compile=MODES[mode])


def run_miners(settings):
    """The section's CSV rows and markdown lines."""
    labels, e = (tf.constant(x) for x in make_in_batch_inputs(B, IN_BATCH_D))
    labels = tf.cast(labels, tf.int64)
    losses = {"unmined": fc.InBatchContrastiveLoss()}
    for miner in _inputs.MINERS:
        losses[f"fused {miner}"] = fc.InBatchContrastiveLoss(miner=miner, miner_epsilon=EPSILON)
        losses[f"plain {miner}"] = lambda y, x, miner=miner: plain_mined_loss(y, x, miner)
    cases = {
        (name, mode): (training_step(loss, mode), (labels, e))
        for name, loss in losses.items()
        for mode in PLAIN_TARGETS
    }
    seconds, errors = timed(cases, settings)
    lines = [
        "",
        "## Miners (the in-batch loss with miner=..., Keras class, training step)",
        "",
        f"B = {B:,}, D = {IN_BATCH_D}, float32, euclidean, uniform, fwd+bwd, "
        f"multi_similarity epsilon {EPSILON}:",
        "",
        "| miner | mode | fused ms | unmined ms | fused / unmined | plain ms | plain / fused "
        "| targets | loss rel. diff. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for miner in _inputs.MINERS:
        for mode, target in PLAIN_TARGETS.items():
            names = (f"fused {miner}", "unmined", f"plain {miner}")
            fused, unmined, plain = (seconds.get((name, mode)) for name in names)
            over = fused / unmined if fused and unmined else math.nan
            speedup = plain / fused if fused and plain else math.nan
            checks = [f"plain >= {target}x: {met(speedup >= target)}"]
            if mode == "tf.function":
                checks.insert(0, f"unmined <= {UNMINED_TARGET}x: {met(over <= UNMINED_TARGET)}")
            agreement = relative_difference(cases, miner, mode)
            lines.append(
                f"| {miner} | {mode} | {ms(fused)} | {ms(unmined)} | {format_ratio(over)} | "
                f"{ms(plain)} | {format_ratio(speedup)} | {'; '.join(checks)} | {agreement} |"
            )
            for impl, s in (("fused", fused), ("plain", plain)):
                note = errors.get((f"{impl} {miner}", mode), f"miner={miner}")
                rows.append(row(impl, mode, s, note))
    for mode in PLAIN_TARGETS:
        rows.append(row("unmined", mode, seconds.get(("unmined", mode)), "miner=None"))
    lines += [f"- {name} {mode}: {why}" for (name, mode), why in errors.items()]
    for line in lines:
        print(line, flush=True)
    return rows, lines


def relative_difference(cases, miner, mode):
    """|fused - plain| / |plain| of the loss values, as text."""
    try:
        fused, plain = (
            float(cases[(f"{impl} {miner}", mode)][0](*cases[(f"{impl} {miner}", mode)][1])[0])
            for impl in ("fused", "plain")
        )
    except Exception as error:  # reported, not fatal
        return f"error: {type(error).__name__}"
    return f"{abs(fused - plain) / abs(plain):.1e}"


def ms(seconds):
    return f"{(seconds or math.nan) * 1e3:.1f}"


def row(impl, mode, seconds, note):
    """A results.csv row of this section (D = IN_BATCH_D, no bandwidth)."""
    return Row(
        impl,
        mode,
        "fwd+bwd",
        "mean",
        B,
        (seconds or math.nan) * 1e3,
        "",
        "",
        SECTION,
        IN_BATCH_D,
        note=note,
    )

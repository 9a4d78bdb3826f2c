"""The "references" section of benchmark.py: the in-batch loss of a batch's
anchors against the batch and a set of reference rows (issue 20), forward and
backward, float32, euclidean, "uniform" pair weighting, the mean over anchors.

What is compared
    fused  `fused_contrastive.in_batch_contrastive_loss(labels, embeddings,
           reference_labels=..., reference_embeddings=...)`, reduced by
           tf.reduce_mean, with the gradients to the embeddings and to the
           references from a GradientTape.
    plain  the same with
           `fused_contrastive.reference.in_batch_contrastive_loss_reference`,
           the formula in plain TF ops (B x (B + R) matrices): what a user
           writes without the op.
    Both in tf.function and tf.function(jit_compile=True), taking turns in the
    same repetitions (median of 5 samples of at least 20 ms; 3 with --quick).
    Inputs as the in_batch section's (about 8 rows per class, distances spread
    over about [0, 2 * margin]), the references drawn the same way.

    Memory: `fused_contrastive.InBatchContrastiveLoss(memory_size=R)` with a
    full memory, called as fit calls it (a training step: the reduced
    one-sweep op, no gradient to the memory's rows; each call also writes the
    batch into the memory), against a Keras-style loss calling the plain
    formula on the batch and the memory's rows under tf.stop_gradient.

Cases and targets
    A = 1024 anchors against R = 16,384 references, D = 128: fused >= 3x plain
    in tf.function and >= 2x plain under XLA, for the function with
    references and for the Keras class with a memory.
    A = 4096 against R = 65,536, D = 128, margin 1e3 (every pair active, so
    every gradient product runs), fused in tf.function only (plain would hold
    several 1.1 GB matrices): the effective rate, (2*A*P*D for the distances +
    2*A*P*D for each of the two gradient products) / time with P = A + R the
    rows each anchor meets, against TensorFlow's own MatMul rate on a
    [A, D] x [D, 8192] product in the same run: target >= 75%. Printed beside
    it: the symmetric sweep (no references, A = 4096) by the same count, which
    runs half of those products (each unordered block pair once), so its
    "effective" rate may pass the MatMul rate.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

import fused_contrastive as fc
from fused_contrastive.reference import in_batch_contrastive_loss_reference
from harness import MODES, Row, error_summary, format_ratio, met, time_interleaved
from in_batch import IN_BATCH_D, make_in_batch_inputs

SECTION = "references"
SPEEDUP_CASE = (1024, 16384)  # (A, R)
SPEEDUP_TARGETS = {"tf.function": 3.0, "tf.function+jit": 2.0}
RATE_CASE = (4096, 65536)
RATE_MARGIN = 1e3  # every negative pair inside the margin: dense gradient products
RATE_TARGET = 0.75
MATMUL_COLUMNS = 8192


@dataclass(frozen=True)
class Settings:
    repeats: int
    min_sample_s: float

    @classmethod
    def for_run(cls, quick):
        return cls(3, 0.005) if quick else cls(5, 0.020)


def inputs(a, r):
    """Anchors' labels and embeddings, then the references' (labels int64)."""
    labels, e = make_in_batch_inputs(a + r, IN_BATCH_D)
    labels = labels.astype(np.int64)
    return [tf.constant(x) for x in (labels[:a], e[:a], labels[a:], e[a:])]


def step(loss_fn, mode, margin=1.0):
    """tf.function (labels, e, ref_labels, refs) -> (loss, gradients to e and refs)."""

    def forward_backward(labels, e, ref_labels, refs):
        with tf.GradientTape() as tape:
            tape.watch([e, refs])
            loss = tf.reduce_mean(
                loss_fn(
                    labels, e, margin=margin, reference_labels=ref_labels, reference_embeddings=refs
                )
            )
        return (loss, *tape.gradient(loss, [e, refs]))

    return tf.function(forward_backward, jit_compile=MODES[mode])


IMPLS = {"fused": fc.in_batch_contrastive_loss, "plain": in_batch_contrastive_loss_reference}


def memory_steps(a, r, mode):
    """Training steps of the Keras class with a full memory of r rows, and of
    the plain formula against the same rows held as a constant."""
    labels, e, ref_labels, refs = inputs(a, r)
    fused = fc.InBatchContrastiveLoss(memory_size=r)
    fused(labels, e)  # makes the memory's variables; then fill them
    fused.memory.embeddings.assign(refs)
    fused.memory.labels.assign(ref_labels)
    fused.memory.filled.assign(r)

    def plain(labels, e):
        return tf.reduce_mean(
            in_batch_contrastive_loss_reference(
                labels, e, reference_labels=ref_labels, reference_embeddings=tf.stop_gradient(refs)
            )
        )

    def training(loss):
        def train_step(labels, e):
            with tf.GradientTape() as tape:
                tape.watch(e)
                value = loss(labels, e)
            return value, tape.gradient(value, e)

        return tf.function(train_step, jit_compile=MODES[mode])

    return {
        ("memory fused", mode): (training(fused), (labels, e)),
        ("memory plain", mode): (training(plain), (labels, e)),
    }


def timed(cases, settings):
    """{key: seconds} for cases {key: (callable, args)}, taking turns; a case
    whose first call fails is left out with its error in the second dict."""
    calls, keys, errors = [], [], {}
    for key, (fn, args) in cases.items():
        call = lambda fn=fn, args=args: tf.nest.map_structure(np.asarray, fn(*args))  # noqa: E731
        try:
            call()
        except Exception as error:  # reported in the results, whatever it is
            errors[key] = f"error: {error_summary(error)}"
            continue
        calls.append(call)
        keys.append(key)
    seconds = time_interleaved(calls, settings.repeats, settings.min_sample_s) if calls else []
    return dict(zip(keys, seconds)), errors


def csv_row(impl, mode, workload, n, seconds, note):
    """A results.csv row of this section (D = IN_BATCH_D, no bandwidth)."""
    reduction = "mean" if workload == "fwd+bwd" else ""
    ms = (seconds or math.nan) * 1e3
    return Row(impl, mode, workload, reduction, n, ms, "", "", SECTION, IN_BATCH_D, note=note)


def run_references(settings):
    """The section's CSV rows and markdown lines."""
    rows, lines = [], ["", "## References (anchors against the batch and R reference rows)", ""]
    a, r = SPEEDUP_CASE
    args = inputs(a, r)
    cases = {
        (impl, mode): (step(fn, mode), args)
        for impl, fn in IMPLS.items()
        for mode in MODES
        if mode != "eager"
    }
    for mode in SPEEDUP_TARGETS:
        cases.update(memory_steps(a, r, mode))
    seconds, errors = timed(cases, settings)
    lines += [
        f"A = {a:,} anchors, R = {r:,} references, D = {IN_BATCH_D}, fwd+bwd (gradients to both):",
        "",
        "| mode | fused ms | plain ms | plain / fused | target |",
        "|---|---|---|---|---|",
    ]
    for prefix, (mode, target) in itertools.product(("", "memory "), SPEEDUP_TARGETS.items()):
        fused, plain = (seconds.get((prefix + impl, mode)) for impl in ("fused", "plain"))
        ratio = plain / fused if fused and plain else math.nan
        lines.append(
            f"| {prefix}{mode} | {fused * 1e3 if fused else math.nan:.1f} | "
            f"{plain * 1e3 if plain else math.nan:.1f} | {format_ratio(ratio)} | "
            f">= {target}x: {met(ratio >= target)} |"
        )
        for impl, s in ((prefix + "fused", fused), (prefix + "plain", plain)):
            rows.append(csv_row(impl, mode, "fwd+bwd", a, s, errors.get((impl, mode), f"R={r}")))
    lines += [f"- {impl} {mode}: {why}" for (impl, mode), why in errors.items()]

    a, r = RATE_CASE
    args = inputs(a, r)
    symmetric = [args[0], args[1], args[2][:0], args[3][:0]]
    x = tf.constant(np.random.default_rng(2).standard_normal((a, IN_BATCH_D), np.float32))
    y = tf.constant(
        np.random.default_rng(3).standard_normal((IN_BATCH_D, MATMUL_COLUMNS), np.float32)
    )
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    fused = step(fc.in_batch_contrastive_loss, "tf.function", RATE_MARGIN)
    seconds, errors = timed(
        {"references": (fused, args), "symmetric": (fused, symmetric), "matmul": (matmul, (x, y))},
        settings,
    )
    matmul_rate = 2 * a * IN_BATCH_D * MATMUL_COLUMNS / seconds["matmul"]
    lines += [
        "",
        f"Effective rate, A = {a:,}, D = {IN_BATCH_D}, margin {RATE_MARGIN:g} (every pair "
        "active), tf.function: 6·A·P·D / time, P the rows each anchor meets; TF MatMul "
        f"[{a}, {IN_BATCH_D}] x [{IN_BATCH_D}, {MATMUL_COLUMNS}]: "
        f"{matmul_rate / 1e9:.1f} GFLOP/s ({seconds['matmul'] * 1e3:.2f} ms)",
        "",
        "| case | P | ms | GFLOP/s | of MatMul | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in (("references", a + r), ("symmetric", a)):
        s = seconds.get(name)
        rate = 6 * a * p * IN_BATCH_D / s if s else math.nan
        share = rate / matmul_rate
        target = (
            f">= {RATE_TARGET:.0%}: {met(share >= RATE_TARGET)}" if name == "references" else ""
        )
        lines.append(
            f"| {name} | {p:,} | {(s or math.nan) * 1e3:.1f} | {rate / 1e9:.1f} | {share:.0%} | "
            f"{target} |"
        )
        note = errors.get(name, f"P={p} rate {rate / 1e9:.1f} GFLOP/s")
        rows.append(csv_row("fused", "tf.function", "fwd+bwd", a, s, note))
    note = f"[{a},{IN_BATCH_D}]x[{IN_BATCH_D},{MATMUL_COLUMNS}]"
    rows.append(csv_row("matmul", "tf.function", "matmul", a, seconds["matmul"], note))
    lines += [f"- {name}: {why}" for name, why in errors.items()]
    for line in lines:
        print(line, flush=True)
    return rows, lines

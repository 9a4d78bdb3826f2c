"""The "jax" section of benchmark.py: fused_contrastive.jax (issue 22) against
the same losses in plain jax.numpy, on the CPU, float32, forward and
backward (jax.value_and_grad of the mean), everything under jax.jit.

What is compared
    in-batch  B = 4096, D = 128, euclidean, margin 1, "uniform" weighting,
              the in_batch section's inputs (about 8 rows per class):
              fused   `fused_contrastive.jax.in_batch_contrastive_loss`;
              plain   the all-pairs formula in jax.numpy (B x B distances from
                      the Gram matrix, masks from the labels; plain_in_batch);
              TF      our TF path as a Keras user runs it:
                      `InBatchContrastiveLoss()` in a tf.function training
                      step (the miners section's step), same inputs.
    pairs     B = 65,536, D = 128, euclidean, margin 1, labels 0/1, the
              embeddings section's inputs:
              fused   `fused_contrastive.jax.contrastive_loss_from_embeddings`;
              plain   the formula in jax.numpy (plain_pairs);
              floor   `(a + b, a - b)` under jax.jit: what any fwd+bwd of
                      the pairs at least costs, reading a and b and writing
                      two new [B, D] arrays (the gradients), no loss.
    Keras 3 on JAX, in a process of its own (keras_on_jax.py; Keras picks
    its backend once per process), the classes as `fit` calls a loss: the
    jitted value and gradient in y_pred of loss(y_true, y_pred):
              fused   `InBatchContrastiveLoss()` on [B, D] (B = 4096), and
                      `ContrastiveLoss(distance="euclidean")` on the stacked
                      pairs [B, 2, D] a pair model outputs (B = 65,536);
              plain   the same formulas in keras.ops, as a keras.losses.Loss.
    Timed as the references and miners sections (all cases of the section
    take turns in the same repetitions; median of 5 samples of at least
    20 ms, 3 with --quick).

Targets
    in-batch fused >= 3x plain and within 1.2x of TF (fused <= 1.2 TF time);
    pairs fused >= 1.5x plain. The Keras classes on JAX have none; their
    ratios to plain are reported.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

import jax
import jax.numpy as jnp

import fused_contrastive as fc
import fused_contrastive.jax as fcj
from harness import Row, format_ratio, met
from in_batch import IN_BATCH_D, make_in_batch_inputs
from miners import training_step
from pairs import MARGIN, make_embedding_inputs
from references import timed

SECTION = "jax"
FUSED_PLAIN = ("fused", "plain")
IN_BATCH_B = 4096
PAIRS_B = 65536
PAIRS_D = 128
TARGETS = {"in-batch plain": 3.0, "in-batch TF": 1.2, "pairs plain": 1.5}


def plain_in_batch(labels, e, margin=MARGIN):
    """The in-batch loss as a JAX user writes it: B x B matrices."""
    norms = jnp.sum(e * e, axis=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * e @ e.T
    d = jnp.sqrt(jnp.maximum(squared, 1e-12))
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~jnp.eye(e.shape[0], dtype=bool)
    terms = jnp.where(same, d * d, jnp.square(jnp.maximum(margin - d, 0.0)))
    return jnp.sum(jnp.where(off_diagonal, terms, 0.0), axis=1) / (e.shape[0] - 1)


def plain_pairs(y, a, b, margin=MARGIN):
    d = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a - b), axis=1), 1e-12))
    return y * d * d + (1.0 - y) * jnp.square(jnp.maximum(margin - d, 0.0))


def jax_step(loss, argnums):
    """jax.jit of the mean loss's value and gradients in `argnums`."""
    return jax.jit(jax.value_and_grad(lambda *args: jnp.mean(loss(*args)), argnums))


def run_jax(settings):
    """The section's CSV rows and markdown lines."""
    labels, e = make_in_batch_inputs(IN_BATCH_B, IN_BATCH_D)
    labels = labels.astype(np.int32)
    y, a, b = make_embedding_inputs(PAIRS_B, PAIRS_D)
    in_batch_args = (jnp.asarray(labels), jnp.asarray(e))
    pairs_args = tuple(map(jnp.asarray, (y, a, b)))
    cases = {
        "in-batch fused": (jax_step(fcj.in_batch_contrastive_loss, 1), in_batch_args),
        "in-batch plain": (jax_step(plain_in_batch, 1), in_batch_args),
        "in-batch TF": (
            training_step(fc.InBatchContrastiveLoss(), "tf.function"),
            (tf.constant(labels, tf.int64), tf.constant(e)),
        ),
        "pairs fused": (jax_step(fcj.contrastive_loss_from_embeddings, (1, 2)), pairs_args),
        "pairs plain": (jax_step(plain_pairs, (1, 2)), pairs_args),
        "pairs floor": (jax.jit(lambda a, b: (a + b, a - b)), pairs_args[1:]),
    }
    seconds, errors = timed(cases, settings)
    agreement = {name: relative_difference(cases, name) for name in ("in-batch", "pairs")}
    ratio = {
        "in-batch plain": speedup(seconds, "in-batch plain", "in-batch fused"),
        "in-batch TF": speedup(seconds, "in-batch fused", "in-batch TF"),
        "pairs plain": speedup(seconds, "pairs plain", "pairs fused"),
    }
    checks = {
        "in-batch plain": ratio["in-batch plain"] >= TARGETS["in-batch plain"],
        "in-batch TF": ratio["in-batch TF"] <= TARGETS["in-batch TF"],
        "pairs plain": ratio["pairs plain"] >= TARGETS["pairs plain"],
    }
    lines = [
        "",
        "## JAX (fused_contrastive.jax under jax.jit, CPU)",
        "",
        f"float32, fwd+bwd of the mean; in-batch B = {IN_BATCH_B:,}, D = {IN_BATCH_D}; "
        f"pairs B = {PAIRS_B:,}, D = {PAIRS_D}; jax {jax.__version__}:",
        "",
        "| case | ms |",
        "|---|---|",
        *(f"| {name} | {ms(seconds.get(name))} |" for name in cases),
        "",
        f"- in-batch: plain / fused {format_ratio(ratio['in-batch plain'])} "
        f"(target >= {TARGETS['in-batch plain']}x: {met(checks['in-batch plain'])}); "
        f"fused / TF {format_ratio(ratio['in-batch TF'])} "
        f"(target <= {TARGETS['in-batch TF']}x: {met(checks['in-batch TF'])}); "
        f"loss rel. diff. fused vs plain {agreement['in-batch']}",
        f"- pairs: plain / fused {format_ratio(ratio['pairs plain'])} "
        f"(target >= {TARGETS['pairs plain']}x: {met(checks['pairs plain'])}); "
        f"loss rel. diff. fused vs plain {agreement['pairs']}; fused / floor "
        f"{format_ratio(speedup(seconds, 'pairs fused', 'pairs floor'))}",
        *(f"- {name}: {why}" for name, why in errors.items()),
    ]
    keras_seconds, keras_lines = keras_on_jax(settings)
    lines += keras_lines
    for line in lines:
        print(line, flush=True)
    rows = [row(name, seconds.get(name), errors.get(name, "")) for name in cases]
    rows += [row(name, keras_seconds.get(name), "") for name in KERAS_CASES]
    return rows, lines


KERAS_CASES = [f"keras {family} {impl}" for family in ("in-batch", "pairs") for impl in FUSED_PLAIN]


def keras_on_jax(settings):
    """keras_on_jax.py's timings {case: seconds} and the section's lines on them."""
    script = Path(__file__).with_name("keras_on_jax.py")
    result = subprocess.run(
        [sys.executable, str(script), str(settings.repeats), str(settings.min_sample_s)],
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    if result.returncode != 0:
        return {}, ["", f"- Keras 3 on JAX: failed: {result.stderr.strip()[-500:]}"]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    lines = ["", "Keras 3 on JAX (`fit`'s jitted loss and gradient in y_pred):", ""]
    for family, size in (("in-batch", IN_BATCH_B), ("pairs", PAIRS_B)):
        fused, plain = (f"keras {family} {impl}" for impl in FUSED_PLAIN)
        loss_gap = abs(out[f"{fused} loss"] - out[f"{plain} loss"]) / abs(out[f"{plain} loss"])
        lines.append(
            f"- {family} (B = {size:,}): fused {ms(out.get(fused))} ms, plain keras.ops "
            f"{ms(out.get(plain))} ms, plain / fused {format_ratio(speedup(out, plain, fused))}; "
            f"loss rel. diff. {loss_gap:.1e}; CPU ms per call, user + kernel (page faults on "
            f"fresh memory are kernel time): fused {cpu(out.get(f'{fused} cpu ms'))}, "
            f"plain {cpu(out.get(f'{plain} cpu ms'))}"
        )
    lines += [f"- {name}: {why}" for name, why in out["errors"].items()]
    return out, lines


def cpu(user_kernel):
    return "n/a" if user_kernel is None else " + ".join(f"{t:.1f}" for t in user_kernel)


def speedup(seconds, slow, fast):
    return seconds[slow] / seconds[fast] if slow in seconds and fast in seconds else math.nan


def relative_difference(cases, family):
    """|fused - plain| / |plain| of the two jax cases' loss values, as text."""
    fused, plain = (
        float(cases[f"{family} {impl}"][0](*cases[f"{family} {impl}"][1])[0])
        for impl in ("fused", "plain")
    )
    return f"{abs(fused - plain) / abs(plain):.1e}"


def ms(seconds):
    return f"{(seconds or math.nan) * 1e3:.1f}"


def row(name, seconds, note):
    front_end = "keras" if name.startswith("keras ") else "jax"
    family, impl = name.removeprefix("keras ").split(" ", 1)
    in_batch = family == "in-batch"
    if impl == "floor":
        note = note or "a + b, a - b"
    return Row(
        f"{front_end} {impl}" if impl != "TF" else "fused",
        "tf.function" if impl == "TF" else "jax.jit",
        "fwd+bwd",
        "mean",
        IN_BATCH_B if in_batch else PAIRS_B,
        (seconds or math.nan) * 1e3,
        "",
        "",
        SECTION,
        IN_BATCH_D if in_batch else PAIRS_D,
        note=note or family,
    )

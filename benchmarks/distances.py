"""The "distances" section of benchmark.py: the loss of precomputed distances.

What is compared: distances
    fused      `fused_contrastive.ContrastiveLoss`, the public Keras 3 class, so
               whatever path that class takes (op, reduction, gradient) is what
               is measured.
    reference  a `keras.losses.Loss` whose `call` is
               `fused_contrastive.contrastive_loss_reference` (the same formula
               in plain TF ops), reduced and weighted by Keras as any Keras loss.

    Each in three execution modes: eager, tf.function and
    tf.function(jit_compile=True) ("tf.function+jit"). Two workloads: "forward"
    (the loss) and "fwd+bwd" (the loss and its gradient with respect to y_pred,
    from a GradientTape; with reduction "none" it is the gradient of
    tf.reduce_sum of the per-sample losses). Three reductions: "none",
    "sum_over_batch_size" (Keras' default) and "weighted" (sum_over_batch_size
    with a per-sample sample_weight vector). float32 throughout; labels are 0/1,
    distances uniform in [0, 2*margin], weights uniform in [0, 1);
    N = 1e2 ... 1e7 (--quick: 1e2, 1e4, 1e6, fewer repeats, well under a minute).

Effective bandwidth
    Bytes one pass must move at least: read labels and distances (8N), plus the
    weights (4N) for "weighted"; write the per-sample loss (4N) for "none"; write
    the gradient (4N) for "fwd+bwd". GB/s = bytes / time. memcpy is np.copyto of
    a buffer of bytes/2, which reads and writes those bytes in total, timed in
    the same repetitions; "% of memcpy" = fused GB/s / memcpy GB/s. np.copyto
    runs on one core and TensorFlow on all of them, so more than 100% is possible
    (and at small N everything sits in cache).

Accuracy
    At the largest N, the relative error of the float32 loss with the default
    reduction (fused and reference, each mode) against the same mean computed in
    float64 by NumPy from the same float32 inputs.
"""

import itertools
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

import fused_contrastive
from harness import (
    DEFAULT_REDUCTION,
    MARGIN,
    MODES,
    WORKLOADS,
    Row,
    copy_buffers,
    format_n,
    format_number,
    log_grid,
    memcpy_call,
    memcpy_percent,
    save_figure,
    speedup,
    time_interleaved,
    two_panels,
)

IMPLS = ("fused", "reference")
REDUCTIONS = ("none", DEFAULT_REDUCTION, "weighted")


@dataclass(frozen=True)
class Settings:
    ns: tuple
    min_sample_s: float
    repeats: dict  # N -> number of samples

    @classmethod
    def for_run(cls, quick):
        if quick:
            ns = (10**2, 10**4, 10**6)
            return cls(ns, 0.005, {n: 5 for n in ns})
        ns = tuple(10**e for e in range(2, 8))
        return cls(
            ns,
            0.040,
            {n: 15 if n <= 10**4 else 11 if n <= 10**5 else 9 if n <= 10**6 else 7 for n in ns},
        )


class ReferenceContrastiveLoss(keras.losses.Loss):
    """The baseline: the plain-TF per-sample loss, reduced and weighted by Keras."""

    def __init__(self, margin=1.0, reduction=DEFAULT_REDUCTION, name="reference_contrastive_loss"):
        super().__init__(name=name, reduction=reduction)
        self.margin = margin

    def call(self, y_true, y_pred):
        return fused_contrastive.contrastive_loss_reference(y_true, y_pred, self.margin)


LOSS_CLASSES = {"fused": fused_contrastive.ContrastiveLoss, "reference": ReferenceContrastiveLoss}


def make_loss(impl, reduction):
    keras_reduction = "none" if reduction == "none" else DEFAULT_REDUCTION
    return LOSS_CLASSES[impl](margin=MARGIN, reduction=keras_reduction)


def make_inputs(n):
    """float32 NumPy labels (0/1), distances and sample weights."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n).astype(np.float32)
    distances = rng.uniform(0.0, 2.0 * MARGIN, n).astype(np.float32)
    weights = rng.uniform(0.0, 1.0, n).astype(np.float32)
    return labels, distances, weights


def make_step(loss, workload, mode):
    """The function a training step would run: fn(labels, distances, weights or None)."""

    def forward(y, d, w):
        return loss(y, d, sample_weight=w)

    def forward_backward(y, d, w):
        with tf.GradientTape() as tape:
            tape.watch(d)
            value = loss(y, d, sample_weight=w)
            total = tf.reduce_sum(value)  # the value itself when reduced; the sum for "none"
        return value, tape.gradient(total, d)

    step = forward if workload == "forward" else forward_backward
    jit_compile = MODES[mode]
    # Callers make a fresh step per input size, so each is traced for exactly that shape.
    return step if jit_compile is None else tf.function(step, jit_compile=jit_compile)


def bytes_moved(n, workload, reduction):
    words = 2 + (reduction == "weighted") + (reduction == "none") + (workload == "fwd+bwd")
    return 4 * n * words


def measure(n, tensors, mode, workload, reduction, settings):
    """Times fused, reference and memcpy for one configuration; returns the two Rows."""
    labels, distances, weights = tensors
    sample_weight = weights if reduction == "weighted" else None
    calls = []
    for impl in IMPLS:
        step = make_step(make_loss(impl, reduction), workload, mode)
        calls.append(
            lambda step=step: tf.nest.map_structure(
                np.asarray, step(labels, distances, sample_weight)
            )
        )
    nbytes = bytes_moved(n, workload, reduction)
    calls.append(memcpy_call(nbytes))
    *impl_s, memcpy_s = time_interleaved(calls, settings.repeats[n], settings.min_sample_s)
    memcpy_gbps = nbytes / memcpy_s / 1e9
    return [
        Row(impl, mode, workload, reduction, n, s * 1e3, nbytes / s / 1e9, memcpy_gbps)
        for impl, s in zip(IMPLS, impl_s)
    ]


def accuracy(n):
    """The float64 loss and [(impl, mode, float32 loss, relative error)], default reduction."""
    labels, distances, _ = make_inputs(n)
    y, d = labels.astype(np.float64), distances.astype(np.float64)
    exact = np.mean(y * d**2 + (1.0 - y) * np.maximum(MARGIN - d, 0.0) ** 2)
    results = []
    for impl, mode in itertools.product(IMPLS, MODES):
        step = make_step(make_loss(impl, DEFAULT_REDUCTION), "forward", mode)
        value = float(step(tf.constant(labels), tf.constant(distances), None))
        results.append((impl, mode, value, abs(value - exact) / exact))
    return exact, results


def pairs(rows):
    """(fused, reference) Rows of each configuration, in measurement order."""
    return list(zip(rows[0::2], rows[1::2]))


def dispatch_floor_ms(tensors, settings, n):
    """Median time of a tf.function that runs one trivial op on the same inputs:
    what any tf.function call costs here, whatever it computes."""
    labels, distances, _ = tensors
    trivial = tf.function(lambda y, d: tf.identity(d))
    call = lambda: np.asarray(trivial(labels, distances))  # noqa: E731
    return time_interleaved([call], settings.repeats[n], settings.min_sample_s)[0] * 1e3


def target_lines(rows, floors):
    """The comparisons the project's speed targets name, fwd+bwd with the default
    reduction: fused in tf.function against the reference in tf.function and
    under XLA, fused under XLA against the reference under XLA (what Keras 3
    runs on a GPU by default), and fused eager against reference eager; ratios
    from this run. The floor column is a one-op tf.function: no loss can be
    faster than it."""
    find = {(r.impl, r.mode, r.workload, r.reduction, r.n): r for r in rows}
    lines = [
        "| N | fused tf.function ms | tf.function floor ms | vs reference tf.function "
        "| vs reference XLA | fused XLA vs reference XLA | fused eager vs reference eager "
        "| fused tf.function % of memcpy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted({r.n for r in rows}):
        get = lambda impl, mode: find[(impl, mode, "fwd+bwd", DEFAULT_REDUCTION, n)]  # noqa: E731
        fused = get("fused", "tf.function")
        lines.append(
            f"| {format_n(n)} | {format_number(fused.median_ms)} | {format_number(floors[n])} "
            f"| {speedup(fused, get('reference', 'tf.function'))} "
            f"| {speedup(fused, get('reference', 'tf.function+jit'))} "
            f"| {speedup(get('fused', 'tf.function+jit'), get('reference', 'tf.function+jit'))} "
            f"| {speedup(get('fused', 'eager'), get('reference', 'eager'))} "
            f"| {memcpy_percent(fused)} |"
        )
    return lines


def samples_note(settings):
    """For the runtime line of results.md: the samples per measurement."""
    return (
        "; samples per measurement: "
        + ", ".join(f"{settings.repeats[n]} at N={format_n(n)}" for n in settings.ns)
        + f"; each sample at least {settings.min_sample_s * 1e3:.0f} ms of "
        "back-to-back calls"
    )


def distance_markdown(rows, floors, accuracy_result, settings):
    exact, errors = accuracy_result
    lines = [
        "- Times are the median per call. speedup = reference ms / fused ms. GB/s counts the "
        "bytes one pass must move (read labels, distances and weights; write the per-sample "
        "loss for `none` and the gradient for `fwd+bwd`); % of memcpy compares it with "
        "single-threaded `np.copyto` moving the same bytes in the same run.",
        "- `fwd+bwd` with reduction `none` is the gradient of `tf.reduce_sum` of the "
        "per-sample losses; `weighted` is `sum_over_batch_size` with a per-sample "
        "`sample_weight`.",
        "",
        "| mode | workload | reduction | N | fused ms | reference ms | speedup "
        "| fused GB/s | % of memcpy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fused, reference in sorted(
        pairs(rows),
        key=lambda p: (
            list(MODES).index(p[0].mode),
            WORKLOADS.index(p[0].workload),
            REDUCTIONS.index(p[0].reduction),
            p[0].n,
        ),
    ):
        lines.append(
            f"| {fused.mode} | {fused.workload} | {fused.reduction} | {format_n(fused.n)} "
            f"| {format_number(fused.median_ms)} | {format_number(reference.median_ms)} "
            f"| {speedup(fused, reference)} | {format_number(fused.gbps)} "
            f"| {memcpy_percent(fused)} |"
        )
    lines += [
        "",
        f"## Targets: fwd+bwd, {DEFAULT_REDUCTION} (speedup = reference ms / fused ms)",
        "",
    ] + target_lines(rows, floors)
    lines += [
        "",
        f"## Accuracy at N={format_n(settings.ns[-1])} ({DEFAULT_REDUCTION}, float32 vs a "
        f"float64 NumPy mean of the same inputs = {exact:.10g})",
        "",
        "| impl | mode | float32 loss | relative error |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {impl} | {mode} | {value:.9g} | {error:.2e} |" for impl, mode, value, error in errors
    ]
    return lines


def plot(rows, path):
    workloads = (("fwd+bwd", "forward + backward"), ("forward", "forward"))
    fig, axes = two_panels(sharey=True)
    for ax, (workload, title) in zip(axes, workloads):
        selected = [r for r in rows if r.workload == workload and r.reduction == DEFAULT_REDUCTION]
        for (impl, linestyle, marker), (color, mode) in itertools.product(
            (("fused", "-", "o"), ("reference", "--", "s")), enumerate(MODES)
        ):
            points = sorted(
                (r.n, r.median_ms) for r in selected if r.impl == impl and r.mode == mode
            )
            ax.plot(
                *zip(*points),
                linestyle=linestyle,
                marker=marker,
                color=f"C{color}",
                label=f"{impl}, {mode}",
            )
        # memcpy of the same bytes, measured with the fused runs of one mode (any would do).
        memcpy = sorted(
            (r.n, bytes_moved(r.n, workload, DEFAULT_REDUCTION) / r.memcpy_gbps / 1e6)
            for r in selected
            if r.impl == "fused" and r.mode == "tf.function"
        )
        ax.plot(*zip(*memcpy), linestyle=":", color="gray", label="memcpy, same bytes")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="N (pairs)",
            title=f"{title}, reduction={DEFAULT_REDUCTION}",
        )
        log_grid(ax)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend(fontsize=8)
    save_figure(fig, "Contrastive loss, float32: fused op vs plain TF (lower is better)", path)


def run_distances(settings):
    """The distance section: (rows, floors, accuracy result)."""
    configs = list(itertools.product(MODES, WORKLOADS, REDUCTIONS))
    total = len(settings.ns) * len(configs)
    rows = []
    floors = {}
    for n in settings.ns:
        tensors = tuple(tf.constant(a) for a in make_inputs(n))
        floors[n] = dispatch_floor_ms(tensors, settings, n)
        for mode, workload, reduction in configs:
            fused, reference = measure(n, tensors, mode, workload, reduction, settings)
            rows += [fused, reference]
            print(
                f"[{len(rows) // 2}/{total}] {mode} {workload} {reduction} N={format_n(n)} "
                f"fused {format_number(fused.median_ms)} ms "
                f"reference {format_number(reference.median_ms)} ms "
                f"{speedup(fused, reference)} "
                f"(fused {format_number(fused.gbps)} GB/s, "
                f"{memcpy_percent(fused)} of memcpy)",
                flush=True,
            )
        copy_buffers.cache_clear()
    print("\n".join(target_lines(rows, floors)), flush=True)
    accuracy_result = accuracy(settings.ns[-1])
    for impl, mode, value, error in accuracy_result[1]:
        print(
            f"accuracy N={format_n(settings.ns[-1])} {impl} {mode}: {value:.9g}, "
            f"relative error {error:.2e}",
            flush=True,
        )
    return rows, floors, accuracy_result

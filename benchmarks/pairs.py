"""The "embeddings" section of benchmark.py: the loss from pairs of embeddings,
the distance computed inside the loss.

What is compared: embeddings
    Pairs of float32 embeddings a, b of shape [B, D] with 0/1 labels [B], the
    Euclidean distance, margin 1, the mean over the pairs (the default
    reduction), timed as the distances section times (same modes, same method):
    class             what a Keras user runs: `ContrastiveLoss(distance="euclidean")`
                      fed `tf.stack([a, b], axis=1)`, the stack (and, for
                      "fwd+bwd", its gradient, an Unpack) included. The class
                      reads the stacked pair in place (the pair op) with or
                      without a tape.
    class (pre-stacked)  the same class fed a stacked tensor and differentiated
                      with respect to it: the class's cost beyond the stack.
    fused             "fwd+bwd": `_pairs_ops.reduced_embedding_loss` (reduction
                      "mean", sample weight 1, loss scale 1), the one-pass op
                      `ContrastiveLoss(distance="euclidean")` runs while a tape
                      records (loss and both gradients written in one pass;
                      called directly, as the class does, because going through
                      the class needs y_pred = tf.stack([a, b], axis=1), a copy
                      of both embeddings). "forward":
                      `tf.reduce_mean(contrastive_loss_from_embeddings(y, a, b))`,
                      what the class runs when no tape records.
    fused (per-pair)  "fwd+bwd" only: `tf.reduce_mean` of
                      `contrastive_loss_from_embeddings`, the two-pass path (the
                      forward op writes per-row coefficients, the gradient op reads
                      a and b again). Its forward is the fused forward above, so
                      it is not timed twice.
    composite         plain TF: d2 = reduce_sum(square(a - b), axis=1),
                      d = sqrt(maximum(d2, 1e-12)), then
                      reduce_mean(y*d^2 + (1-y)*max(margin-d, 0)^2).
    "fwd+bwd" is the loss and its gradients with respect to a and b from a
    GradientTape. B = 1e3, 1e4, 65536, 2e5 and D = 64, 128, 512 (--quick: B =
    1e3, 65536 and D = 128), all combinations whose inputs and gradients
    (4*B*D*4 bytes) fit in 2 GB (all do). Inputs: labels 0/1; a and b are
    N(0, 1)/sqrt(D) rows each scaled by one per-pair factor uniform in
    [0, sqrt(2)*margin), so that the distances spread over about [0, 2*margin]
    and both branches of the loss are taken. All modes and implementations of
    one (B, D, workload) take turns within the same repetitions, memcpy
    included; to keep a full run under about 10 minutes each sample lasts at
    least 20 ms (5 ms with --quick, against 40 ms for the distances) and there
    are 9 samples for B*D <= 1e6, 7 up to 1e7, 5 up to 3e7 and 3 above (5 with
    --quick), fewer than for the distances.
    Bytes one pass must move at least: read a and b (2*B*D*4) and the labels
    (4*B); for "fwd+bwd" also write both gradients (2*B*D*4). GB/s and % of
    memcpy as above.
    Targets (CPU, float32, fwd+bwd, default reduction, B=65536, D=128): class
    >= 1.5x the composite in tf.function and >= 1.3x under XLA; class
    (pre-stacked) <= 1.3x fused in both; fused >= 3x the composite in tf.function;
    >= 2x the composite under XLA, both
    fused under XLA vs composite under XLA and fused tf.function vs composite
    under XLA; fused tf.function >= 60% of memcpy bandwidth; relative error of
    the loss <= 1e-6. Printed and written as met/missed with the numbers.
    Accuracy at B=65536, D=128 (the largest B of --quick): for each
    implementation and mode, the relative error of the float32 loss against
    float64 NumPy from the same float32 inputs, and the largest error of the
    float32 gradients of a and b against float64 NumPy ones, divided by the
    largest |gradient|.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

import fused_contrastive
from fused_contrastive import _library, _pairs_ops
from harness import (
    DEFAULT_REDUCTION,
    MARGIN,
    MODES,
    WORKLOADS,
    Row,
    copy_buffers,
    format_count,
    format_number,
    log_grid,
    memcpy_call,
    memcpy_percent,
    met,
    save_figure,
    speedup,
    time_interleaved,
    two_panels,
)

EMBEDDING_IMPLS = ("class", "class (pre-stacked)", "fused", "fused (per-pair)", "composite")
PRE_STACKED = "class (pre-stacked)"  # its step takes (labels, pairs) and differentiates the pair
EMBEDDING_DISTANCE = "euclidean"
MAX_EMBEDDING_BYTES = 2e9  # inputs and gradients of one (B, D), 4*B*D*4
TARGET_B, TARGET_D = 65536, 128  # the embedding targets and accuracy check


@dataclass(frozen=True)
class Settings:
    batch_sizes: tuple  # B
    dims: tuple  # D
    embedding_min_sample_s: float
    embedding_repeats: dict  # (B, D) -> number of samples

    @classmethod
    def for_run(cls, quick):
        if quick:
            sizes = (10**3, TARGET_B), (TARGET_D,)
            return cls(*sizes, 0.005, {shape: 5 for shape in itertools.product(*sizes)})
        sizes = (10**3, 10**4, TARGET_B, 2 * 10**5), (64, TARGET_D, 512)
        return cls(
            *sizes,
            0.020,
            {
                (b, d): 9
                if b * d <= 10**6
                else 7
                if b * d <= 10**7
                else 5
                if b * d <= 3 * 10**7
                else 3
                for b, d in itertools.product(*sizes)
            },
        )

    def embedding_shapes(self):
        """The (B, D) measured: those whose inputs and gradients fit in MAX_EMBEDDING_BYTES."""
        return [
            (b, d)
            for b, d in itertools.product(self.batch_sizes, self.dims)
            if 4 * b * d * 4 <= MAX_EMBEDDING_BYTES
        ]


def make_embedding_inputs(b, d):
    """float32 NumPy labels (0/1) [B] and embeddings a, b [B, D]: N(0, 1)/sqrt(D)
    rows, both rows of a pair scaled by one factor uniform in [0, sqrt(2)*margin),
    so that the distances spread over about [0, 2*margin]."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, b).astype(np.float32)
    scale = (rng.uniform(0.0, math.sqrt(2.0) * MARGIN, (b, 1)) / math.sqrt(d)).astype(np.float32)
    a = rng.standard_normal((b, d), dtype=np.float32)
    a *= scale
    b_ = rng.standard_normal((b, d), dtype=np.float32)
    b_ *= scale
    return labels, a, b_


def fused_reduced_loss(y, a, b):
    """The one-pass op ContrastiveLoss(distance=...) runs under a tape, called as it calls it."""
    if fused_contrastive.using_reference():
        return fused_per_pair_loss(y, a, b)
    return _pairs_ops.reduced_embedding_loss(
        y,
        a,
        b,
        sample_weight=_library.scalar(1.0, a.dtype),
        margin=MARGIN,
        reduction="mean",
        loss_scale=1.0,
        distance=EMBEDDING_DISTANCE,
    )


def fused_per_pair_loss(y, a, b):
    return tf.reduce_mean(
        fused_contrastive.contrastive_loss_from_embeddings(
            y, a, b, margin=MARGIN, distance=EMBEDDING_DISTANCE
        )
    )


def composite_loss(y, a, b):
    """The baseline: the same loss in plain TF ops."""
    d2 = tf.reduce_sum(tf.square(a - b), axis=1)
    d = tf.sqrt(tf.maximum(d2, 1e-12))
    return tf.reduce_mean(y * tf.square(d) + (1.0 - y) * tf.square(tf.maximum(MARGIN - d, 0.0)))


EMBEDDING_CLASS = fused_contrastive.ContrastiveLoss(margin=MARGIN, distance=EMBEDDING_DISTANCE)


def class_loss(y, a, b):
    """What a Keras user runs: the class fed the stacked pair, the stack included."""
    return EMBEDDING_CLASS(y, tf.stack([a, b], axis=1))


# (impl, workload) -> loss(labels, a, b) (PRE_STACKED: loss(labels, pairs)); "fused
# (per-pair)" has no forward of its own.
EMBEDDING_LOSSES = {
    ("class", "forward"): class_loss,
    ("class", "fwd+bwd"): class_loss,
    (PRE_STACKED, "forward"): EMBEDDING_CLASS,
    (PRE_STACKED, "fwd+bwd"): EMBEDDING_CLASS,
    ("fused", "forward"): fused_per_pair_loss,
    ("fused", "fwd+bwd"): fused_reduced_loss,
    ("fused (per-pair)", "fwd+bwd"): fused_per_pair_loss,
    ("composite", "forward"): composite_loss,
    ("composite", "fwd+bwd"): composite_loss,
}


def embedding_impls(workload):
    return [impl for impl in EMBEDDING_IMPLS if (impl, workload) in EMBEDDING_LOSSES]


def make_embedding_step(impl, workload, mode):
    """fn(labels, a, b): the loss, or (loss, [d/da, d/db])."""
    loss = EMBEDDING_LOSSES[(impl, workload)]

    def forward_backward(y, *embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = loss(y, *embeddings)
        return value, tape.gradient(value, embeddings)

    step = loss if workload == "forward" else forward_backward
    jit_compile = MODES[mode]
    # A fresh step per (B, D), as make_step.
    return step if jit_compile is None else tf.function(step, jit_compile=jit_compile)


def embedding_bytes_moved(b, d, workload):
    return 4 * b + 4 * b * d * (2 + 2 * (workload == "fwd+bwd"))


def measure_embeddings(tensors, workload, settings):
    """Times every implementation x mode of one workload and memcpy in the same
    repetitions; returns their Rows."""
    labels, a, b = tensors
    pairs = tf.stack([a, b], axis=1)
    rows_, cols = a.shape
    calls, keys = [], []
    for impl, mode in itertools.product(embedding_impls(workload), MODES):
        step = make_embedding_step(impl, workload, mode)
        inputs = (labels, pairs) if impl == PRE_STACKED else (labels, a, b)
        calls.append(
            lambda step=step, inputs=inputs: tf.nest.map_structure(np.asarray, step(*inputs))
        )
        keys.append((impl, mode))
    nbytes = embedding_bytes_moved(rows_, cols, workload)
    calls.append(memcpy_call(nbytes))
    cpu_ms = []
    *impl_s, memcpy_s = time_interleaved(
        calls, settings.embedding_repeats[(rows_, cols)], settings.embedding_min_sample_s, cpu_ms
    )
    memcpy_gbps = nbytes / memcpy_s / 1e9
    rows = [
        Row(
            impl,
            mode,
            workload,
            DEFAULT_REDUCTION,
            rows_,
            s * 1e3,
            nbytes / s / 1e9,
            memcpy_gbps,
            "embeddings",
            cols,
            cpu_user_ms=user,
            cpu_kernel_ms=kernel,
        )
        for (impl, mode), s, (user, kernel) in zip(keys, impl_s, cpu_ms)
    ]
    order = list(itertools.product(EMBEDDING_IMPLS, MODES))
    return sorted(rows, key=lambda r: order.index((r.impl, r.mode)))


def embedding_accuracy(b, d):
    """The float64 loss and [(impl, mode, float32 loss, its relative error, largest
    gradient error / largest |gradient|)], fwd+bwd."""
    labels, a, b_ = make_embedding_inputs(b, d)
    y, diff = labels.astype(np.float64), a.astype(np.float64) - b_.astype(np.float64)
    dist = np.sqrt(np.sum(diff**2, axis=1))
    hinge = np.maximum(MARGIN - dist, 0.0)
    exact = np.mean(y * dist**2 + (1.0 - y) * hinge**2)
    # d(loss)/da = 2/B * (y - (1-y) * hinge/d) * (a - b); d/db = -d/da.
    coefficient = (
        2.0 / b * (y - (1.0 - y) * np.divide(hinge, dist, out=np.zeros_like(dist), where=dist > 0))
    )
    exact_grad = coefficient[:, None] * diff
    grad_scale = np.max(np.abs(exact_grad))
    tensors = tuple(tf.constant(x) for x in (labels, a, b_))
    results = []
    for impl, mode in itertools.product(embedding_impls("fwd+bwd"), MODES):
        if impl == PRE_STACKED:  # the class's numbers, checked through "class"
            continue
        step = make_embedding_step(impl, "fwd+bwd", mode)
        value, (grad_a, grad_b) = step(*tensors)
        value = float(value)
        grad_error = (
            max(
                np.max(np.abs(grad_a.numpy() - exact_grad)),
                np.max(np.abs(grad_b.numpy() + exact_grad)),
            )
            / grad_scale
        )
        results.append((impl, mode, value, abs(value - exact) / exact, grad_error))
    return exact, results


def embedding_target_lines(rows, accuracy_result):
    """The embedding targets at B=TARGET_B, D=TARGET_D (fwd+bwd, default
    reduction), met or missed, with the measured numbers (ratios from the same
    repetitions)."""
    find = {
        (r.impl, r.mode): r
        for r in rows
        if (r.n, r.d, r.workload) == (TARGET_B, TARGET_D, "fwd+bwd")
    }
    if not find:
        return [f"- B={TARGET_B}, D={TARGET_D} was not measured"]

    def ratio_line(label, fused_mode, composite_mode, target):
        composite = find[("composite", composite_mode)]
        fused = find[("fused", fused_mode)]
        ratio = composite.median_ms / fused.median_ms
        per_pair = speedup(find[("fused (per-pair)", fused_mode)], composite)
        return (
            f"- {label}: {ratio:.2f}x ({format_number(fused.median_ms)} ms vs "
            f"{format_number(composite.median_ms)} ms; fused (per-pair): {per_pair}); "
            f"target >= {target}x: {met(ratio >= target)}"
        )

    def cpu(impl, mode):
        row = find[(impl, mode)]
        return f"{row.cpu_user_ms:.3g} + {row.cpu_kernel_ms:.3g} ms"

    def class_line(mode, target):
        ratio = find[("composite", mode)].median_ms / find[("class", mode)].median_ms
        return (
            f"- class (stack included) vs composite, both {mode}: {ratio:.2f}x "
            f"({format_number(find[('class', mode)].median_ms)} ms vs "
            f"{format_number(find[('composite', mode)].median_ms)} ms; CPU per call, user + "
            f"kernel: {cpu('class', mode)} vs {cpu('composite', mode)}); target >= {target}x: "
            f"{met(ratio >= target)}"
        )

    def beyond_stack_line(mode):
        ratio = find[(PRE_STACKED, mode)].median_ms / find[("fused", mode)].median_ms
        return (
            f"- class on a pre-stacked pair (its cost beyond the stack) vs the one-pass op, "
            f"{mode}: {ratio:.2f}x ({format_number(find[(PRE_STACKED, mode)].median_ms)} ms "
            f"vs {format_number(find[('fused', mode)].median_ms)} ms); target <= 1.3x: "
            f"{met(ratio <= 1.3)}"
        )

    fused = find[("fused", "tf.function")]
    percent = 100 * fused.gbps / fused.memcpy_gbps
    lines = [
        class_line("tf.function", 1.5),
        class_line("tf.function+jit", 1.3),
        beyond_stack_line("tf.function"),
        beyond_stack_line("tf.function+jit"),
        ratio_line("fused vs composite, both tf.function", "tf.function", "tf.function", 3),
        ratio_line("fused vs composite, both XLA", "tf.function+jit", "tf.function+jit", 2),
        ratio_line("fused tf.function vs composite XLA", "tf.function", "tf.function+jit", 2),
        f"- fused tf.function bandwidth: {format_number(fused.gbps)} GB/s = {percent:.0f}% of "
        f"memcpy ({format_number(fused.memcpy_gbps)} GB/s) for "
        f"{embedding_bytes_moved(TARGET_B, TARGET_D, 'fwd+bwd')} bytes; target >= 60%: "
        f"{met(percent >= 60)}",
    ]
    errors = {
        (impl, mode): (loss_error, grad_error)
        for impl, mode, _, loss_error, grad_error in accuracy_result[1]
    }
    loss_error, grad_error = errors[("fused", "tf.function")]
    lines.append(
        f"- fused tf.function relative error of the loss: {loss_error:.2e} (of its "
        f"gradients, / max |gradient|: {grad_error:.2e}); target <= 1e-6: "
        f"{met(loss_error <= 1e-6)}"
    )
    return lines


def embedding_markdown(rows, accuracy_result, settings):
    exact, errors = accuracy_result
    shapes = settings.embedding_shapes()
    lines = [
        "",
        f"## Embeddings: pairs a, b [B, D], {EMBEDDING_DISTANCE} distance, margin {MARGIN:g}, "
        "mean over pairs, float32",
        "",
        "- class: `ContrastiveLoss(distance=...)` fed `tf.stack([a, b], axis=1)`, the stack "
        "(and its gradient) included, what a Keras user runs; class (pre-stacked): the same fed "
        "a stacked tensor, differentiated with respect to it (the class's cost beyond the "
        "stack).",
        "- fused: `fwd+bwd` is the one-pass reduced op (`_pairs_ops.reduced_embedding_loss`, what "
        "`ContrastiveLoss(distance=...)` runs under a tape), `forward` is `tf.reduce_mean("
        "contrastive_loss_from_embeddings(...))`; fused (per-pair): `tf.reduce_mean("
        "contrastive_loss_from_embeddings(...))` under a tape (two passes), `fwd+bwd` only; "
        "composite: the same loss in plain TF ops.",
        "- Samples per measurement: "
        + ", ".join(
            f"{settings.embedding_repeats[s]} at B={format_count(s[0])} D={s[1]}" for s in shapes
        )
        + f"; each sample at least {settings.embedding_min_sample_s * 1e3:.0f} ms of "
        "back-to-back calls; all implementations and modes of one B, D and workload take turns "
        "in the same repetitions.",
        "- GB/s counts a and b read (2·B·D·4 bytes), the labels (4·B) and, for `fwd+bwd`, both "
        "gradients written (2·B·D·4); % of memcpy is the fused one's.",
    ]
    lines += [
        "",
        "| mode | workload | B | D | class ms | class (pre-stacked) ms | fused ms "
        "| fused (per-pair) ms | composite ms | class speedup | fused speedup "
        "| per-pair speedup | fused GB/s | % of memcpy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    find = {(r.impl, r.mode, r.workload, r.n, r.d): r for r in rows}
    for mode, workload, (b, d) in itertools.product(MODES, WORKLOADS, shapes):
        get = lambda impl: find.get((impl, mode, workload, b, d))  # noqa: E731
        fused, per_pair, composite = get("fused"), get("fused (per-pair)"), get("composite")
        keras_class, pre_stacked = get("class"), get(PRE_STACKED)
        lines.append(
            f"| {mode} | {workload} | {format_count(b)} | {d} "
            f"| {format_number(keras_class.median_ms)} | {format_number(pre_stacked.median_ms)} "
            f"| {format_number(fused.median_ms)} "
            f"| {format_number(per_pair.median_ms) if per_pair else '—'} "
            f"| {format_number(composite.median_ms)} | {speedup(keras_class, composite)} "
            f"| {speedup(fused, composite)} "
            f"| {speedup(per_pair, composite) if per_pair else '—'} "
            f"| {format_number(fused.gbps)} | {memcpy_percent(fused)} |"
        )
    lines += [
        "",
        f"### Targets: fwd+bwd, {DEFAULT_REDUCTION}, B={TARGET_B}, D={TARGET_D} "
        "(speedup = composite ms / fused ms)",
        "",
    ]
    lines += embedding_target_lines(rows, accuracy_result)
    lines += [
        "",
        f"### Accuracy at B={TARGET_B}, D={TARGET_D} (fwd+bwd; float32 vs float64 NumPy from "
        f"the same inputs: loss = {exact:.10g})",
        "",
        "| impl | mode | float32 loss | relative error | gradient error / max abs gradient |",
        "|---|---|---:|---:|---:|",
    ]
    for impl, mode, value, loss_error, grad_error in errors:
        lines.append(f"| {impl} | {mode} | {value:.9g} | {loss_error:.2e} | {grad_error:.2e} |")
    return lines


def plot_embeddings(rows, path, d=TARGET_D):
    workloads = (("fwd+bwd", "forward + backward"), ("forward", "forward"))
    fig, axes = two_panels(sharey=True)
    styles = {
        "class": (":", "D"),
        PRE_STACKED: (":", "v"),
        "fused": ("-", "o"),
        "fused (per-pair)": ("-.", "^"),
        "composite": ("--", "s"),
    }
    for ax, (workload, title) in zip(axes, workloads):
        selected = [r for r in rows if r.workload == workload and r.d == d]
        for impl, (color, mode) in itertools.product(EMBEDDING_IMPLS, enumerate(MODES)):
            points = sorted(
                (r.n, r.median_ms)
                for r in selected
                if r.impl == impl and r.mode == mode and not math.isnan(r.median_ms)
            )
            if points:
                linestyle, marker = styles[impl]
                ax.plot(
                    *zip(*points),
                    linestyle=linestyle,
                    marker=marker,
                    color=f"C{color}",
                    label=f"{impl}, {mode}",
                )
        # memcpy of the same bytes, measured with the composite in tf.function (any would do).
        memcpy = sorted(
            (r.n, embedding_bytes_moved(r.n, d, workload) / r.memcpy_gbps / 1e6)
            for r in selected
            if r.impl == "composite" and r.mode == "tf.function"
        )
        if memcpy:
            ax.plot(*zip(*memcpy), linestyle=":", color="gray", label="memcpy, same bytes")
        ax.set(xscale="log", yscale="log", xlabel="B (pairs)", title=f"{title}, D={d}")
        log_grid(ax)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend(fontsize=8)
    save_figure(
        fig,
        f"Contrastive loss from embeddings, {EMBEDDING_DISTANCE}, mean over pairs, "
        "float32: fused ops vs plain TF (lower is better)",
        path,
    )


def run_embeddings(settings):
    """The embedding section: (rows, accuracy result)."""
    embedding_rows = []
    shapes = settings.embedding_shapes()
    total = len(shapes) * len(WORKLOADS) * len(MODES)
    done = 0
    for b, d in shapes:
        tensors = tuple(tf.constant(x) for x in make_embedding_inputs(b, d))
        for workload in WORKLOADS:
            measured = measure_embeddings(tensors, workload, settings)
            embedding_rows += measured
            copy_buffers.cache_clear()
            for mode in MODES:
                done += 1
                get = {r.impl: r for r in measured if r.mode == mode}
                times = ", ".join(
                    f"{impl} {format_number(get[impl].median_ms)} ms"
                    for impl in embedding_impls(workload)
                )
                print(
                    f"[{done}/{total}] embeddings {mode} {workload} B={format_count(b)} D={d}: "
                    f"{times}; fused {speedup(get['fused'], get['composite'])} "
                    f"(fused {format_number(get['fused'].gbps)} GB/s, "
                    f"{memcpy_percent(get['fused'])} of memcpy)",
                    flush=True,
                )
        del tensors
    embedding_accuracy_result = embedding_accuracy(TARGET_B, TARGET_D)
    for impl, mode, value, loss_error, grad_error in embedding_accuracy_result[1]:
        print(
            f"accuracy embeddings B={TARGET_B} D={TARGET_D} {impl} {mode}: {value:.9g}, "
            f"relative error {loss_error:.2e}, gradients {grad_error:.2e}",
            flush=True,
        )
    print("\n".join(embedding_target_lines(embedding_rows, embedding_accuracy_result)), flush=True)
    return embedding_rows, embedding_accuracy_result

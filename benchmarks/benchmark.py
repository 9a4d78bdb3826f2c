"""Benchmark of the fused contrastive loss against the same loss in plain TF ops.

Usage:
    python benchmarks/benchmark.py [--quick] [--out benchmarks/results]

What is compared
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

How it is timed
    Each callable is called twice untimed (tracing, XLA compilation and the first
    touch of buffers stay out of the timings), then timed in samples of k
    back-to-back calls, k chosen so that a sample lasts at least 40 ms (5 ms with
    --quick); the median over the samples is reported. Within each repetition the
    fused, reference and memcpy callables take turns, in rotating order, so
    machine noise hits them alike; the speedup (reference time / fused time)
    pairs the two measurements of the same run. Every output is turned into a
    NumPy array (zero-copy on CPU), so a call ends only once its result exists.

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

Output (in --out, default benchmarks/results)
    results.csv  one row per measurement: impl, mode, workload, reduction, n,
                 median_ms, gbps, memcpy_gbps
    results.md   machine, versions, date and command; the table (fused ms,
                 reference ms, speedup, fused GB/s, % of memcpy); the accuracy check
    results.png  median time per call vs N, log-log, one line per implementation
                 x mode, for fwd+bwd and forward with the default reduction

Needs matplotlib (pip install matplotlib) besides the package itself. A full run
takes about 3 to 5 minutes on 2 cores. Rebuilding the op library in place while
a run has it loaded crashes the run; to benchmark during rebuilds, copy the .so
and its _build_info.json elsewhere and point FUSED_CONTRASTIVE_LIBRARY at the copy.
"""

import argparse
import csv
import datetime
import functools
import gc
import itertools
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_contrastive  # noqa: E402

# make_step builds a fresh tf.function per input size on purpose; silence the
# retracing warning that this triggers.
tf.get_logger().setLevel("ERROR")

MARGIN = 1.0
IMPLS = ("fused", "reference")
MODES = {"eager": None, "tf.function": False, "tf.function+jit": True}  # mode -> jit_compile
WORKLOADS = ("forward", "fwd+bwd")
DEFAULT_REDUCTION = "sum_over_batch_size"
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
        return cls(ns, 0.040, {n: 15 if n <= 10**4 else 11 if n <= 10**5 else 9 if n <= 10**6 else 7
                               for n in ns})


@dataclass
class Row:
    impl: str
    mode: str
    workload: str
    reduction: str
    n: int
    median_ms: float
    gbps: float
    memcpy_gbps: float


class ReferenceContrastiveLoss(keras.losses.Loss):
    """The baseline: the plain-TF per-sample loss, reduced and weighted by Keras."""

    def __init__(self, margin=1.0, reduction=DEFAULT_REDUCTION,
                 name="reference_contrastive_loss"):
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


@functools.lru_cache(maxsize=3)  # the three sizes one N needs
def copy_buffers(nbytes):
    return np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)


def memcpy_call(total_bytes):
    src, dst = copy_buffers(total_bytes // 2)
    return lambda: np.copyto(dst, src)


def time_interleaved(calls, repeats, min_sample_s):
    """Median seconds per call of each callable; they take turns within each repetition."""
    batch = []
    for call in calls:
        call()
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        batch.append(max(1, math.ceil(min_sample_s / max(once, 1e-9))))
    samples = [[] for _ in calls]
    order = list(range(len(calls)))
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            shift = rep % len(order)
            for i in order[shift:] + order[:shift]:
                call, k = calls[i], batch[i]
                start = time.perf_counter()
                for _ in range(k):
                    call()
                samples[i].append((time.perf_counter() - start) / k)
    finally:
        gc.enable()
    return [statistics.median(s) for s in samples]


def measure(n, tensors, mode, workload, reduction, settings):
    """Times fused, reference and memcpy for one configuration; returns the two Rows."""
    labels, distances, weights = tensors
    sample_weight = weights if reduction == "weighted" else None
    calls = []
    for impl in IMPLS:
        step = make_step(make_loss(impl, reduction), workload, mode)
        calls.append(lambda step=step: tf.nest.map_structure(
            np.asarray, step(labels, distances, sample_weight)))
    nbytes = bytes_moved(n, workload, reduction)
    calls.append(memcpy_call(nbytes))
    *impl_s, memcpy_s = time_interleaved(calls, settings.repeats[n], settings.min_sample_s)
    memcpy_gbps = nbytes / memcpy_s / 1e9
    return [Row(impl, mode, workload, reduction, n, s * 1e3, nbytes / s / 1e9, memcpy_gbps)
            for impl, s in zip(IMPLS, impl_s)]


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


def format_n(n):
    return f"1e{round(math.log10(n))}"


def format_number(x):
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def speedup(fused, reference):
    return f"{reference.median_ms / fused.median_ms:.2f}x"


def memcpy_percent(row):
    percent = 100 * row.gbps / row.memcpy_gbps
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def machine_description():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    library = fused_contrastive.build_info()["library"]
    op = f"compiled op {library}" if library else "pure-TF FALLBACK, not the compiled op"
    return [
        f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} logical)",
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, NumPy {np.__version__}, "
        f"Python {platform.python_version()}",
        f"fused_contrastive {fused_contrastive.__version__} ({op}), "
        f"repository commit {commit} (working tree may differ)",
        "Load average (1, 5, 15 min) when the run started: "
        + ", ".join(f"{load:.2f}" for load in os.getloadavg()),
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"Command: `{shlex.join(['python'] + sys.argv)}`",
    ]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(Row)])
        for row in rows:
            writer.writerow(astuple(row))


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
    lines = ["| N | fused tf.function ms | tf.function floor ms | vs reference tf.function "
             "| vs reference XLA | fused XLA vs reference XLA | fused eager vs reference eager "
             "| fused tf.function % of memcpy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r.n for r in rows}):
        get = lambda impl, mode: find[(impl, mode, "fwd+bwd", DEFAULT_REDUCTION, n)]  # noqa: E731
        fused = get("fused", "tf.function")
        lines.append(
            f"| {format_n(n)} | {format_number(fused.median_ms)} | {format_number(floors[n])} "
            f"| {speedup(fused, get('reference', 'tf.function'))} "
            f"| {speedup(fused, get('reference', 'tf.function+jit'))} "
            f"| {speedup(get('fused', 'tf.function+jit'), get('reference', 'tf.function+jit'))} "
            f"| {speedup(get('fused', 'eager'), get('reference', 'eager'))} "
            f"| {memcpy_percent(fused)} |")
    return lines


def write_markdown(header, rows, floors, accuracy_result, settings, runtime_s, path):
    exact, errors = accuracy_result
    lines = ["# fused-contrastive benchmark", ""]
    lines += [f"- {item}" for item in header]
    lines += [
        "- Load average when it ended: " + ", ".join(f"{load:.2f}" for load in os.getloadavg()),
        f"- Runtime: {runtime_s:.0f} s; samples per measurement: "
        + ", ".join(f"{settings.repeats[n]} at N={format_n(n)}" for n in settings.ns)
        + f"; each sample at least {settings.min_sample_s * 1e3:.0f} ms of back-to-back calls",
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
    for fused, reference in sorted(pairs(rows), key=lambda p: (
            list(MODES).index(p[0].mode), WORKLOADS.index(p[0].workload),
            REDUCTIONS.index(p[0].reduction), p[0].n)):
        lines.append(
            f"| {fused.mode} | {fused.workload} | {fused.reduction} | {format_n(fused.n)} "
            f"| {format_number(fused.median_ms)} | {format_number(reference.median_ms)} "
            f"| {speedup(fused, reference)} | {format_number(fused.gbps)} "
            f"| {memcpy_percent(fused)} |")
    lines += ["", f"## Targets: fwd+bwd, {DEFAULT_REDUCTION} (speedup = reference ms / fused ms)",
              ""] + target_lines(rows, floors)
    lines += [
        "",
        f"## Accuracy at N={format_n(settings.ns[-1])} ({DEFAULT_REDUCTION}, float32 vs a "
        f"float64 NumPy mean of the same inputs = {exact:.10g})",
        "",
        "| impl | mode | float32 loss | relative error |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {impl} | {mode} | {value:.9g} | {error:.2e} |"
              for impl, mode, value, error in errors]
    path.write_text("\n".join(lines) + "\n")


def plot(rows, path):
    workloads = (("fwd+bwd", "forward + backward"), ("forward", "forward"))
    fig, axes = plt.subplots(1, len(workloads), figsize=(13, 5.5), sharey=True)
    for ax, (workload, title) in zip(axes, workloads):
        selected = [r for r in rows if r.workload == workload and r.reduction == DEFAULT_REDUCTION]
        for (impl, linestyle, marker), (color, mode) in itertools.product(
                (("fused", "-", "o"), ("reference", "--", "s")), enumerate(MODES)):
            points = sorted((r.n, r.median_ms) for r in selected
                            if r.impl == impl and r.mode == mode)
            ax.plot(*zip(*points), linestyle=linestyle, marker=marker, color=f"C{color}",
                    label=f"{impl}, {mode}")
        # memcpy of the same bytes, measured with the fused runs of one mode (any would do).
        memcpy = sorted((r.n, bytes_moved(r.n, workload, DEFAULT_REDUCTION) / r.memcpy_gbps / 1e6)
                        for r in selected if r.impl == "fused" and r.mode == "tf.function")
        ax.plot(*zip(*memcpy), linestyle=":", color="gray", label="memcpy, same bytes")
        ax.set(xscale="log", yscale="log", xlabel="N (pairs)",
               title=f"{title}, reduction={DEFAULT_REDUCTION}")
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.1)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Contrastive loss, float32: fused op vs plain TF (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repeats (under a minute)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="output directory (default: benchmarks/results)")
    args = parser.parse_args()
    settings = Settings.for_run(args.quick)
    if fused_contrastive.using_reference():
        print("WARNING: fused_contrastive is using its pure-TF fallback; 'fused' is not the op",
              file=sys.stderr, flush=True)

    header = machine_description()
    started = time.perf_counter()
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
            print(f"[{len(rows) // 2}/{total}] {mode} {workload} {reduction} N={format_n(n)} "
                  f"fused {format_number(fused.median_ms)} ms "
                  f"reference {format_number(reference.median_ms)} ms "
                  f"{speedup(fused, reference)} "
                  f"(fused {format_number(fused.gbps)} GB/s, "
                  f"{memcpy_percent(fused)} of memcpy)", flush=True)
        copy_buffers.cache_clear()
    print("\n".join(target_lines(rows, floors)), flush=True)
    accuracy_result = accuracy(settings.ns[-1])
    for impl, mode, value, error in accuracy_result[1]:
        print(f"accuracy N={format_n(settings.ns[-1])} {impl} {mode}: {value:.9g}, "
              f"relative error {error:.2e}", flush=True)
    runtime_s = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv")
    write_markdown(header, rows, floors, accuracy_result, settings, runtime_s,
                   args.out / "results.md")
    plot(rows, args.out / "results.png")
    print(f"{runtime_s:.0f} s; wrote results.csv, results.md and results.png to {args.out}",
          flush=True)


if __name__ == "__main__":
    main()

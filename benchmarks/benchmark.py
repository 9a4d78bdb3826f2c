"""Benchmark of the fused contrastive loss against the same loss in plain TF ops.

Usage:
    python benchmarks/benchmark.py [--quick] [--out benchmarks/results] [--default-allocator]

Two sections: "distances" (the loss of precomputed distances) and "embeddings"
(the loss of pairs of embeddings, the distance computed inside the loss).

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

What is compared: embeddings
    Pairs of float32 embeddings a, b of shape [B, D] with 0/1 labels [B], the
    Euclidean distance, margin 1, the mean over the pairs (the default
    reduction), timed as the distances section times (same modes, same method):
    fused             "fwd+bwd": `_ops.reduced_embedding_loss` (reduction
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
    Targets (CPU, float32, fwd+bwd, default reduction, B=65536, D=128): fused
    >= 3x the composite in tf.function; >= 2x the composite under XLA, both
    fused under XLA vs composite under XLA and fused tf.function vs composite
    under XLA; fused tf.function >= 60% of memcpy bandwidth; relative error of
    the loss <= 1e-6. Printed and written as met/missed with the numbers.
    Accuracy at B=65536, D=128 (the largest B of --quick): for each
    implementation and mode, the relative error of the float32 loss against
    float64 NumPy from the same float32 inputs, and the largest error of the
    float32 gradients of a and b against float64 NumPy ones, divided by the
    largest |gradient|.

Allocator
    TensorFlow's default CPU allocator hands large buffers back to the OS when
    they are freed (glibc maps blocks of 32 MiB and more afresh), so every step
    page-faults its new outputs in: at B=65536, D=128 each gradient is 32 MiB,
    and faulting it costs more than computing it. The benchmark therefore runs
    with TensorFlow's BFC allocator (TF_CPU_ALLOCATOR_USE_BFC=true), which
    keeps and reuses buffers as TensorFlow's GPU allocator always does; every
    implementation runs in the same process with the same allocator.
    --default-allocator measures with the default one instead.

Output (in --out, default benchmarks/results)
    results.csv  one row per measurement: impl, mode, workload, reduction, n,
                 median_ms, gbps, memcpy_gbps, section ("distances" or
                 "embeddings"), d (D; empty for distances); n is B for
                 embeddings, reduction their default
    results.md   machine, versions, date and command; the distance table (fused
                 ms, reference ms, speedup, fused GB/s, % of memcpy), its targets
                 and accuracy check; the embedding table, targets and accuracy
    results.png  median time per call vs N, log-log, one line per implementation
                 x mode, for fwd+bwd and forward with the default reduction
    results_embeddings.png  the same for the embeddings, time vs B at D=128

Needs matplotlib (pip install matplotlib) besides the package itself. A full run
takes about 6 to 10 minutes on 2 cores. Rebuilding the op library in place while
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
# Read before TensorFlow loads, so not through argparse (see "Allocator").
ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
if "--default-allocator" not in sys.argv[1:]:
    os.environ.setdefault(ALLOCATOR_ENV, "true")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_contrastive  # noqa: E402
from fused_contrastive import _ops  # noqa: E402

# make_step builds a fresh tf.function per input size on purpose; silence the
# retracing warning that this triggers.
tf.get_logger().setLevel("ERROR")

MARGIN = 1.0
IMPLS = ("fused", "reference")
MODES = {"eager": None, "tf.function": False, "tf.function+jit": True}  # mode -> jit_compile
WORKLOADS = ("forward", "fwd+bwd")
DEFAULT_REDUCTION = "sum_over_batch_size"
REDUCTIONS = ("none", DEFAULT_REDUCTION, "weighted")
EMBEDDING_IMPLS = ("fused", "fused (per-pair)", "composite")
EMBEDDING_DISTANCE = "euclidean"
MAX_EMBEDDING_BYTES = 2e9  # inputs and gradients of one (B, D), 4*B*D*4
TARGET_B, TARGET_D = 65536, 128  # the embedding targets and accuracy check


@dataclass(frozen=True)
class Settings:
    ns: tuple
    min_sample_s: float
    repeats: dict  # N -> number of samples
    batch_sizes: tuple  # embeddings: B
    dims: tuple  # embeddings: D
    embedding_min_sample_s: float
    embedding_repeats: dict  # (B, D) -> number of samples

    @classmethod
    def for_run(cls, quick):
        if quick:
            ns = (10**2, 10**4, 10**6)
            sizes = (10**3, TARGET_B), (TARGET_D,)
            return cls(ns, 0.005, {n: 5 for n in ns}, *sizes, 0.005,
                       {shape: 5 for shape in itertools.product(*sizes)})
        ns = tuple(10**e for e in range(2, 8))
        sizes = (10**3, 10**4, TARGET_B, 2 * 10**5), (64, TARGET_D, 512)
        return cls(ns, 0.040, {n: 15 if n <= 10**4 else 11 if n <= 10**5 else 9 if n <= 10**6 else 7
                               for n in ns},
                   *sizes, 0.020, {(b, d): 9 if b * d <= 10**6 else 7 if b * d <= 10**7
                                   else 5 if b * d <= 3 * 10**7 else 3
                                   for b, d in itertools.product(*sizes)})

    def embedding_shapes(self):
        """The (B, D) measured: those whose inputs and gradients fit in MAX_EMBEDDING_BYTES."""
        return [(b, d) for b, d in itertools.product(self.batch_sizes, self.dims)
                if 4 * b * d * 4 <= MAX_EMBEDDING_BYTES]


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
    section: str = "distances"  # appended columns: older readers of the CSV still work
    d: object = ""  # D of the embeddings; empty for distances


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
    return _ops.reduced_embedding_loss(y, a, b, sample_weight=_ops.scalar(1.0, a.dtype),
                                       margin=MARGIN, reduction="mean", loss_scale=1.0,
                                       distance=EMBEDDING_DISTANCE)


def fused_per_pair_loss(y, a, b):
    return tf.reduce_mean(fused_contrastive.contrastive_loss_from_embeddings(
        y, a, b, margin=MARGIN, distance=EMBEDDING_DISTANCE))


def composite_loss(y, a, b):
    """The baseline: the same loss in plain TF ops."""
    d2 = tf.reduce_sum(tf.square(a - b), axis=1)
    d = tf.sqrt(tf.maximum(d2, 1e-12))
    return tf.reduce_mean(y * tf.square(d) + (1.0 - y) * tf.square(tf.maximum(MARGIN - d, 0.0)))


# (impl, workload) -> loss(labels, a, b); "fused (per-pair)" has no forward of its own.
EMBEDDING_LOSSES = {
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

    def forward_backward(y, a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            value = loss(y, a, b)
        return value, tape.gradient(value, [a, b])

    step = loss if workload == "forward" else forward_backward
    jit_compile = MODES[mode]
    # A fresh step per (B, D), as make_step.
    return step if jit_compile is None else tf.function(step, jit_compile=jit_compile)


def embedding_bytes_moved(b, d, workload):
    return 4 * b + 4 * b * d * (2 + 2 * (workload == "fwd+bwd"))


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


def measure_embeddings(tensors, workload, settings):
    """Times every implementation x mode of one workload and memcpy in the same
    repetitions; returns their Rows."""
    labels, a, b = tensors
    rows_, cols = a.shape
    calls, keys = [], []
    for impl, mode in itertools.product(embedding_impls(workload), MODES):
        step = make_embedding_step(impl, workload, mode)
        calls.append(lambda step=step: tf.nest.map_structure(np.asarray, step(labels, a, b)))
        keys.append((impl, mode))
    nbytes = embedding_bytes_moved(rows_, cols, workload)
    calls.append(memcpy_call(nbytes))
    *impl_s, memcpy_s = time_interleaved(calls, settings.embedding_repeats[(rows_, cols)],
                                         settings.embedding_min_sample_s)
    memcpy_gbps = nbytes / memcpy_s / 1e9
    rows = [Row(impl, mode, workload, DEFAULT_REDUCTION, rows_, s * 1e3, nbytes / s / 1e9,
                memcpy_gbps, "embeddings", cols) for (impl, mode), s in zip(keys, impl_s)]
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
    coefficient = 2.0 / b * (y - (1.0 - y) * np.divide(hinge, dist, out=np.zeros_like(dist),
                                                       where=dist > 0))
    exact_grad = coefficient[:, None] * diff
    grad_scale = np.max(np.abs(exact_grad))
    tensors = tuple(tf.constant(x) for x in (labels, a, b_))
    results = []
    for impl, mode in itertools.product(embedding_impls("fwd+bwd"), MODES):
        step = make_embedding_step(impl, "fwd+bwd", mode)
        value, (grad_a, grad_b) = step(*tensors)
        value = float(value)
        grad_error = max(np.max(np.abs(grad_a.numpy() - exact_grad)),
                         np.max(np.abs(grad_b.numpy() + exact_grad))) / grad_scale
        results.append((impl, mode, value, abs(value - exact) / exact, grad_error))
    return exact, results


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


def format_count(n):
    """1e3, 2e5 for one significant digit; the number itself otherwise (65536)."""
    exponent = len(str(n)) - 1
    return f"{n // 10**exponent}e{exponent}" if n % 10**exponent == 0 else str(n)


def format_number(x):
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def speedup(fused, reference):
    ratio = reference.median_ms / fused.median_ms
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def memcpy_percent(row):
    percent = 100 * row.gbps / row.memcpy_gbps
    if math.isnan(percent):
        return "n/a"
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
        f"TensorFlow CPU allocator: {ALLOCATOR_ENV}={os.environ.get(ALLOCATOR_ENV, '(unset)')}",
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


def met(ok):
    return "met" if ok else "MISSED"


def embedding_target_lines(rows, accuracy_result):
    """The embedding targets at B=TARGET_B, D=TARGET_D (fwd+bwd, default
    reduction), met or missed, with the measured numbers (ratios from the same
    repetitions)."""
    find = {(r.impl, r.mode): r for r in rows
            if (r.n, r.d, r.workload) == (TARGET_B, TARGET_D, "fwd+bwd")}
    if not find:
        return [f"- B={TARGET_B}, D={TARGET_D} was not measured"]

    def ratio_line(label, fused_mode, composite_mode, target):
        composite = find[("composite", composite_mode)]
        fused = find[("fused", fused_mode)]
        ratio = composite.median_ms / fused.median_ms
        per_pair = speedup(find[("fused (per-pair)", fused_mode)], composite)
        return (f"- {label}: {ratio:.2f}x ({format_number(fused.median_ms)} ms vs "
                f"{format_number(composite.median_ms)} ms; fused (per-pair): {per_pair}); "
                f"target >= {target}x: {met(ratio >= target)}")

    fused = find[("fused", "tf.function")]
    percent = 100 * fused.gbps / fused.memcpy_gbps
    lines = [
        ratio_line("fused vs composite, both tf.function", "tf.function", "tf.function", 3),
        ratio_line("fused vs composite, both XLA", "tf.function+jit", "tf.function+jit", 2),
        ratio_line("fused tf.function vs composite XLA", "tf.function", "tf.function+jit", 2),
        f"- fused tf.function bandwidth: {format_number(fused.gbps)} GB/s = {percent:.0f}% of "
        f"memcpy ({format_number(fused.memcpy_gbps)} GB/s) for "
        f"{embedding_bytes_moved(TARGET_B, TARGET_D, 'fwd+bwd')} bytes; target >= 60%: "
        f"{met(percent >= 60)}",
    ]
    errors = {(impl, mode): (loss_error, grad_error)
              for impl, mode, _, loss_error, grad_error in accuracy_result[1]}
    loss_error, grad_error = errors[("fused", "tf.function")]
    lines.append(f"- fused tf.function relative error of the loss: {loss_error:.2e} (of its "
                 f"gradients, / max |gradient|: {grad_error:.2e}); target <= 1e-6: "
                 f"{met(loss_error <= 1e-6)}")
    return lines


def embedding_markdown(rows, accuracy_result, settings):
    exact, errors = accuracy_result
    shapes = settings.embedding_shapes()
    lines = [
        "",
        f"## Embeddings: pairs a, b [B, D], {EMBEDDING_DISTANCE} distance, margin {MARGIN:g}, "
        "mean over pairs, float32",
        "",
        "- fused: `fwd+bwd` is the one-pass reduced op (`_ops.reduced_embedding_loss`, what "
        "`ContrastiveLoss(distance=...)` runs under a tape), `forward` is `tf.reduce_mean("
        "contrastive_loss_from_embeddings(...))`; fused (per-pair): `tf.reduce_mean("
        "contrastive_loss_from_embeddings(...))` under a tape (two passes), `fwd+bwd` only; "
        "composite: the same loss in plain TF ops.",
        "- Samples per measurement: "
        + ", ".join(f"{settings.embedding_repeats[s]} at B={format_count(s[0])} D={s[1]}"
                    for s in shapes)
        + f"; each sample at least {settings.embedding_min_sample_s * 1e3:.0f} ms of "
        "back-to-back calls; all implementations and modes of one B, D and workload take turns "
        "in the same repetitions.",
        "- GB/s counts a and b read (2·B·D·4 bytes), the labels (4·B) and, for `fwd+bwd`, both "
        "gradients written (2·B·D·4); % of memcpy is the fused one's.",
    ]
    lines += [
        "",
        "| mode | workload | B | D | fused ms | fused (per-pair) ms | composite ms "
        "| fused speedup | per-pair speedup | fused GB/s | % of memcpy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    find = {(r.impl, r.mode, r.workload, r.n, r.d): r for r in rows}
    for mode, workload, (b, d) in itertools.product(MODES, WORKLOADS, shapes):
        get = lambda impl: find.get((impl, mode, workload, b, d))  # noqa: E731
        fused, per_pair, composite = get("fused"), get("fused (per-pair)"), get("composite")
        lines.append(
            f"| {mode} | {workload} | {format_count(b)} | {d} "
            f"| {format_number(fused.median_ms)} "
            f"| {format_number(per_pair.median_ms) if per_pair else '—'} "
            f"| {format_number(composite.median_ms)} | {speedup(fused, composite)} "
            f"| {speedup(per_pair, composite) if per_pair else '—'} "
            f"| {format_number(fused.gbps)} | {memcpy_percent(fused)} |")
    lines += ["", f"### Targets: fwd+bwd, {DEFAULT_REDUCTION}, B={TARGET_B}, D={TARGET_D} "
              "(speedup = composite ms / fused ms)", ""]
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


def write_markdown(header, rows, floors, accuracy_result, settings, runtime_s, path,
                   embedding_lines):
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
    lines += embedding_lines
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


def plot_embeddings(rows, path, d=TARGET_D):
    workloads = (("fwd+bwd", "forward + backward"), ("forward", "forward"))
    fig, axes = plt.subplots(1, len(workloads), figsize=(13, 5.5), sharey=True)
    styles = {"fused": ("-", "o"), "fused (per-pair)": ("-.", "^"), "composite": ("--", "s")}
    for ax, (workload, title) in zip(axes, workloads):
        selected = [r for r in rows if r.workload == workload and r.d == d]
        for impl, (color, mode) in itertools.product(EMBEDDING_IMPLS, enumerate(MODES)):
            points = sorted((r.n, r.median_ms) for r in selected
                            if r.impl == impl and r.mode == mode and not math.isnan(r.median_ms))
            if points:
                linestyle, marker = styles[impl]
                ax.plot(*zip(*points), linestyle=linestyle, marker=marker, color=f"C{color}",
                        label=f"{impl}, {mode}")
        # memcpy of the same bytes, measured with the composite in tf.function (any would do).
        memcpy = sorted((r.n, embedding_bytes_moved(r.n, d, workload) / r.memcpy_gbps / 1e6)
                        for r in selected if r.impl == "composite" and r.mode == "tf.function")
        if memcpy:
            ax.plot(*zip(*memcpy), linestyle=":", color="gray", label="memcpy, same bytes")
        ax.set(xscale="log", yscale="log", xlabel="B (pairs)", title=f"{title}, D={d}")
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.1)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Contrastive loss from embeddings, {EMBEDDING_DISTANCE}, mean over pairs, "
                 "float32: fused ops vs plain TF (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repeats (under a minute)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="output directory (default: benchmarks/results)")
    parser.add_argument("--default-allocator", action="store_true",
                        help=f"leave {ALLOCATOR_ENV} unset (see Allocator in the docstring)")
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
                times = ", ".join(f"{impl} {format_number(get[impl].median_ms)} ms"
                                  for impl in embedding_impls(workload))
                print(f"[{done}/{total}] embeddings {mode} {workload} B={format_count(b)} D={d}: "
                      f"{times}; fused {speedup(get['fused'], get['composite'])} "
                      f"(fused {format_number(get['fused'].gbps)} GB/s, "
                      f"{memcpy_percent(get['fused'])} of memcpy)", flush=True)
        del tensors
    embedding_accuracy_result = embedding_accuracy(TARGET_B, TARGET_D)
    for impl, mode, value, loss_error, grad_error in embedding_accuracy_result[1]:
        print(f"accuracy embeddings B={TARGET_B} D={TARGET_D} {impl} {mode}: {value:.9g}, "
              f"relative error {loss_error:.2e}, gradients {grad_error:.2e}", flush=True)
    print("\n".join(embedding_target_lines(embedding_rows, embedding_accuracy_result)), flush=True)
    runtime_s = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows + embedding_rows, args.out / "results.csv")
    write_markdown(header, rows, floors, accuracy_result, settings, runtime_s,
                   args.out / "results.md",
                   embedding_markdown(embedding_rows, embedding_accuracy_result, settings))
    plot(rows, args.out / "results.png")
    plot_embeddings(embedding_rows, args.out / "results_embeddings.png")
    print(f"{runtime_s:.0f} s; wrote results.csv, results.md, results.png and "
          f"results_embeddings.png to {args.out}", flush=True)


if __name__ == "__main__":
    main()

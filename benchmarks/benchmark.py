"""Benchmark of the fused contrastive loss against the same loss in plain TF ops.

Usage:
    python benchmarks/benchmark.py [--quick] [--out benchmarks/results] [--bfc-allocator]
        [--section {distances,embeddings,in_batch,all} ...] [--memory-limit-gb GB]

Three sections: "distances" (the loss of precomputed distances), "embeddings"
(the loss of pairs of embeddings, the distance computed inside the loss) and
"in_batch" (the loss over all pairs of a batch, from class labels). --section
runs only the sections named (repeatable; default all), e.g.
    python benchmarks/benchmark.py --section in_batch [--quick]

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
    class             what a Keras user runs: `ContrastiveLoss(distance="euclidean")`
                      fed `tf.stack([a, b], axis=1)`, the stack (and, for
                      "fwd+bwd", its gradient, an Unpack) included. The class
                      reads the stacked pair in place (the pair op) with or
                      without a tape.
    class (pre-stacked)  the same class fed a stacked tensor and differentiated
                      with respect to it: the class's cost beyond the stack.
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

What is compared: in_batch
    The in-batch all-pairs contrastive loss from integer class labels [B] and
    float32 embeddings [B, D], D=128: every ordered pair (i, j), j != i, is
    positive when the labels are equal (term d^2) and negative otherwise (term
    max(margin - d, 0)^2), euclidean distance, margin 1, "uniform" pair
    weighting, Keras' default reduction (mean over the anchors):
    fused      `fused_contrastive.InBatchContrastiveLoss()`, the public Keras 3
               class with its defaults.
    plain      a `keras.losses.Loss` whose `call` is
               `fused_contrastive.reference.in_batch_contrastive_loss_reference`
               (the same formula in plain TF ops, holding B x B matrices),
               reduced by Keras.
    Workload "fwd+bwd" only (the loss and its gradient with respect to the
    embeddings from a GradientTape), in tf.function and
    tf.function(jit_compile=True) ("XLA"). Labels: B // 8 classes drawn
    uniformly (about 8 rows per class, a P x K sampler's batch); embeddings
    N(0, 1)/sqrt(D) rows each scaled by a factor uniform in [0, sqrt(2)*margin),
    so that pair distances spread over about [0, 2*margin] and about 40% of the
    negative pairs are inside the margin. B = 256, 512, ..., 16384 (--quick: 256,
    1024, 4096). Timed as the other sections (fused and plain, both modes, take
    turns in the same repetitions; samples of at least 20 ms, 5 ms with
    --quick; 9 samples up to B=1024, 7 up to 4096, 5 at 8192, 3 above). Plain
    is timed up to B=8192 only: above, one call takes seconds and the B x B
    buffers it leaves in this process's allocator pool would weigh on
    everything after; its time there is the second call of its memory run
    (marked *, one call, not a median).
    Peak memory: each (impl, mode, B) runs in a fresh subprocess
    (`benchmark.py --memory-case IMPL MODE B D`, internal) that builds the
    inputs, runs the fwd+bwd step twice and reports its peak RSS (VmHWM)
    and the two call times; the "extra peak" is that minus the peak RSS of a
    baseline subprocess of the same B, D that did the same imports and built
    the same inputs but did not run the loss. It includes the first call's
    one-time costs (tracing, XLA compilation, thread pools), which dominate at
    small B. The subprocesses inherit the allocator setting (see Allocator).
    They run before any in_batch timing, one at a time, B ascending. A memory
    limit (--memory-limit-gb; default 60% of MemTotal or 80% of MemAvailable
    when the section starts, whichever is less) guards the machine: plain is
    skipped ("skipped (est. X GB)") where its extra peak, extrapolated from its
    runs at smaller B in the same mode (B x B matrices: times (B / B')^2, or
    the line in B^2 through the two previous runs if lower), exceeds it, and
    after an OOM at a smaller B; any run whose RSS passes baseline + limit is
    killed and reported as "OOM", as are runs that raise ResourceExhaustedError
    or MemoryError or die of SIGKILL. Plus one fused-only case, B=32768, D=64,
    tf.function (plain there goes through the skip rule).
    Keras fit step: ms per `model.train_on_batch` of Dense(64 -> 256 relu ->
    128), Adam, `jit_compile=True`, B=2048, integer labels (256 classes), one
    model compiled with `InBatchContrastiveLoss()` and one, with the same
    initial weights, with the plain class; their steps take turns.
    Agreement: at B=1024, loss and gradient of fused vs plain in each mode.
    Targets (fwd+bwd, D=128): at B=4096 fused >= 3.5x plain in tf.function and
    >= 2x plain under XLA (same mode on both sides); B=32768, D=64, fused,
    tf.function: extra peak < 1.5 GB (1 GB = 1e9 bytes). Printed and written as
    met/missed. On 2 quiet cores the section takes about 2 minutes with --quick
    and, estimated, 6 to 7 minutes in full (about 4 of them in the 37 memory
    subprocesses, each paying a TensorFlow import); up to twice that on a busy
    machine.

Allocator
    TensorFlow's default CPU allocator hands large buffers back to the OS when
    they are freed (glibc maps blocks of 32 MiB and more afresh), so every step
    page-faults its new outputs in: at B=65536, D=128 each gradient is 32 MiB,
    and faulting it costs more than computing it. The benchmark measures with
    the default allocator, what a training process gets unless it sets
    TF_CPU_ALLOCATOR_USE_BFC=true; --bfc-allocator measures with TensorFlow's
    BFC allocator instead, which keeps and reuses buffers as TensorFlow's GPU
    allocator always does. Every implementation runs in the same process with
    the same allocator.

Output (in --out, default benchmarks/results)
    results.csv  one row per measurement: impl, mode, workload, reduction, n,
                 median_ms, gbps, memcpy_gbps, section ("distances",
                 "embeddings" or "in_batch"), d (D; empty for distances),
                 peak_mb, note; n is B for embeddings and in_batch, reduction
                 their default. in_batch rows: workload "fwd+bwd" (gbps and
                 memcpy_gbps empty, peak_mb the extra peak in MB = 1e6 bytes,
                 note the memory run's status and times, or why a number is
                 missing; median_ms nan where not timed) and "fit step" (mode
                 "train_on_batch, jit_compile=True", ms per step); cpu_user_ms,
                 cpu_kernel_ms (embeddings: mean CPU ms per call over all
                 threads, user and kernel; the kernel's share is mostly page
                 faults on the fresh memory of TF's default CPU allocator)
    results.md   machine, versions, date and command; the distance table (fused
                 ms, reference ms, speedup, fused GB/s, % of memcpy), its targets
                 and accuracy check; the embedding table, targets and accuracy;
                 the in_batch table (B, mode, fused ms, plain ms, speedup, fused
                 and plain extra peak MB), the fit-step line, the agreement
                 check, every memory run with its times, and the targets
    results.png  median time per call vs N, log-log, one line per implementation
                 x mode, for fwd+bwd and forward with the default reduction
    results_embeddings.png  the same for the embeddings, time vs B at D=128
    results_in_batch.png  in_batch: time per call vs B and extra peak memory vs B,
                 log-log, fused and plain in both modes
    A run of only some sections (--section) writes results_<sections>.csv and
    .md (e.g. results_in_batch.csv) instead, leaving a full run's files alone,
    and the plots of its sections.

Needs matplotlib (pip install matplotlib) besides the package itself. A full run
takes about 11 to 17 minutes on 2 cores. Rebuilding the op library in place while
a run has it loaded crashes the run; to benchmark during rebuilds, copy the .so
and its _build_info.json elsewhere and point FUSED_CONTRASTIVE_LIBRARY at the copy.
"""

import argparse
import csv
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Read before TensorFlow loads, so not through argparse (see "Allocator").
ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
if "--bfc-allocator" in sys.argv[1:]:
    os.environ[ALLOCATOR_ENV] = "true"

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_contrastive  # noqa: E402
from fused_contrastive import _ops  # noqa: E402
from fused_contrastive.reference import in_batch_contrastive_loss_reference  # noqa: E402

# make_step builds a fresh tf.function per input size on purpose; silence the
# retracing warning that this triggers.
tf.get_logger().setLevel("ERROR")

MARGIN = 1.0
IMPLS = ("fused", "reference")
MODES = {"eager": None, "tf.function": False, "tf.function+jit": True}  # mode -> jit_compile
WORKLOADS = ("forward", "fwd+bwd")
DEFAULT_REDUCTION = "sum_over_batch_size"
REDUCTIONS = ("none", DEFAULT_REDUCTION, "weighted")
EMBEDDING_IMPLS = ("class", "class (pre-stacked)", "fused", "fused (per-pair)", "composite")
PRE_STACKED = "class (pre-stacked)"  # its step takes (labels, pairs) and differentiates the pair
EMBEDDING_DISTANCE = "euclidean"
MAX_EMBEDDING_BYTES = 2e9  # inputs and gradients of one (B, D), 4*B*D*4
TARGET_B, TARGET_D = 65536, 128  # the embedding targets and accuracy check
SECTIONS = ("distances", "embeddings", "in_batch")
# in_batch: the all-pairs loss from class labels (see "What is compared: in_batch").
IN_BATCH_IMPLS = ("fused", "plain")
IN_BATCH_MODES = ("tf.function", "tf.function+jit")
IN_BATCH_WORKLOAD = "fwd+bwd"
IN_BATCH_D = 128
IN_BATCH_DISTANCE = "euclidean"
IN_BATCH_PER_CLASS = 8  # labels: B // 8 classes (at least 2), about 8 rows per class
IN_BATCH_TARGET_B = 4096  # fused >= IN_BATCH_TARGETS[mode] x plain in the same mode
IN_BATCH_TARGETS = {"tf.function": 3.5, "tf.function+jit": 2.0}
MEMORY_TARGET_B, MEMORY_TARGET_D = 32768, 64  # fused, tf.function, fwd+bwd: extra peak below
MEMORY_TARGET_MODE = "tf.function"
MEMORY_TARGET_BYTES = 1.5e9
PLAIN_TIMED_MAX_B = 8192  # larger B: plain's time is the second call of its memory run
PLAIN_BXB_FALLBACK = 12  # B x B float32 matrices assumed live when no smaller B was measured
MEMORY_CASE_TAG = "IN_BATCH_MEMORY_CASE "
FIT_B, FIT_INPUT_D, FIT_HIDDEN = 2048, 64, 256  # Dense 64 -> 256 relu -> IN_BATCH_D
FIT_MODE = "train_on_batch, jit_compile=True"


@dataclass(frozen=True)
class Settings:
    ns: tuple
    min_sample_s: float
    repeats: dict  # N -> number of samples
    batch_sizes: tuple  # embeddings: B
    dims: tuple  # embeddings: D
    embedding_min_sample_s: float
    embedding_repeats: dict  # (B, D) -> number of samples
    in_batch_sizes: tuple  # in_batch: B (D = IN_BATCH_D)
    in_batch_min_sample_s: float
    in_batch_repeats: dict  # B -> number of samples; FIT_B's is the fit step's

    @classmethod
    def for_run(cls, quick):
        if quick:
            ns = (10**2, 10**4, 10**6)
            sizes = (10**3, TARGET_B), (TARGET_D,)
            in_batch_sizes = (256, 1024, IN_BATCH_TARGET_B)
            return cls(
                ns,
                0.005,
                {n: 5 for n in ns},
                *sizes,
                0.005,
                {shape: 5 for shape in itertools.product(*sizes)},
                in_batch_sizes,
                0.005,
                {b: 5 for b in in_batch_sizes + (FIT_B,)},
            )
        ns = tuple(10**e for e in range(2, 8))
        sizes = (10**3, 10**4, TARGET_B, 2 * 10**5), (64, TARGET_D, 512)
        in_batch_sizes = tuple(2**e for e in range(8, 15))  # 256 ... 16384
        return cls(
            ns,
            0.040,
            {n: 15 if n <= 10**4 else 11 if n <= 10**5 else 9 if n <= 10**6 else 7 for n in ns},
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
            in_batch_sizes,
            0.020,
            {
                b: 9 if b <= 1024 else 7 if b <= 4096 else 5 if b <= 8192 else 3
                for b in in_batch_sizes
            },
        )

    def embedding_shapes(self):
        """The (B, D) measured: those whose inputs and gradients fit in MAX_EMBEDDING_BYTES."""
        return [
            (b, d)
            for b, d in itertools.product(self.batch_sizes, self.dims)
            if 4 * b * d * 4 <= MAX_EMBEDDING_BYTES
        ]


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
    peak_mb: object = ""  # in_batch: the loss's extra peak memory (MB = 1e6 bytes); else empty
    note: str = ""  # in_batch: memory-run status and times, or why a number is missing
    # embeddings: mean CPU ms per call, all threads: user, and kernel (page faults)
    cpu_user_ms: object = ""
    cpu_kernel_ms: object = ""


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
    return _ops.reduced_embedding_loss(
        y,
        a,
        b,
        sample_weight=_ops.scalar(1.0, a.dtype),
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


@functools.lru_cache(maxsize=3)  # the three sizes one N needs
def copy_buffers(nbytes):
    return np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)


def memcpy_call(total_bytes):
    src, dst = copy_buffers(total_bytes // 2)
    return lambda: np.copyto(dst, src)


def time_interleaved(calls, repeats, min_sample_s, cpu_ms=None):
    """Median seconds per call of each callable; they take turns within each repetition.
    A list `cpu_ms` receives each callable's mean CPU milliseconds per call, (user,
    kernel), all threads (os.times): page faults on fresh memory count as kernel time."""
    batch = []
    for call in calls:
        call()
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        batch.append(max(1, math.ceil(min_sample_s / max(once, 1e-9))))
    samples = [[] for _ in calls]
    cpu = [[0.0, 0.0] for _ in calls]
    order = list(range(len(calls)))
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            shift = rep % len(order)
            for i in order[shift:] + order[:shift]:
                call, k = calls[i], batch[i]
                before = os.times()
                start = time.perf_counter()
                for _ in range(k):
                    call()
                samples[i].append((time.perf_counter() - start) / k)
                after = os.times()
                cpu[i][0] += after.user - before.user
                cpu[i][1] += after.system - before.system
    finally:
        gc.enable()
    if cpu_ms is not None:
        cpu_ms.extend(
            (1e3 * user / (repeats * k), 1e3 * system / (repeats * k))
            for (user, system), k in zip(cpu, batch)
        )
    return [statistics.median(s) for s in samples]


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
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
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


def met(ok):
    return "met" if ok else "MISSED"


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
        "- fused: `fwd+bwd` is the one-pass reduced op (`_ops.reduced_embedding_loss`, what "
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


def write_markdown(header, runtime_s, path, section_lines, distance_settings=None):
    """results.md: the header, then each section's lines. distance_settings: the
    Settings when the distance section ran (its samples go into the runtime line)."""
    lines = ["# fused-contrastive benchmark", ""]
    lines += [f"- {item}" for item in header]
    lines.append(
        "- Load average when it ended: " + ", ".join(f"{load:.2f}" for load in os.getloadavg())
    )
    runtime = f"- Runtime: {runtime_s:.0f} s"
    if distance_settings is not None:
        runtime += (
            "; samples per measurement: "
            + ", ".join(
                f"{distance_settings.repeats[n]} at N={format_n(n)}" for n in distance_settings.ns
            )
            + f"; each sample at least {distance_settings.min_sample_s * 1e3:.0f} ms of "
            "back-to-back calls"
        )
    lines.append(runtime)
    lines += section_lines
    path.write_text("\n".join(lines) + "\n")


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
    fig, axes = plt.subplots(1, len(workloads), figsize=(13, 5.5), sharey=True)
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
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.1)
    axes[0].set_ylabel("median time per call (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Contrastive loss from embeddings, {EMBEDDING_DISTANCE}, mean over pairs, "
        "float32: fused ops vs plain TF (lower is better)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------
# in_batch: the all-pairs loss of a batch from class labels


class PlainInBatchContrastiveLoss(keras.losses.Loss):
    """The baseline: the plain-TF all-pairs formula (B x B matrices), reduced by Keras."""

    def __init__(
        self, margin=1.0, reduction=DEFAULT_REDUCTION, name="plain_in_batch_contrastive_loss"
    ):
        super().__init__(name=name, reduction=reduction)
        self.margin = margin

    def call(self, y_true, y_pred):
        return in_batch_contrastive_loss_reference(
            y_true, y_pred, margin=self.margin, distance=IN_BATCH_DISTANCE
        )


IN_BATCH_LOSSES = {
    "fused": lambda: fused_contrastive.InBatchContrastiveLoss(),
    "plain": PlainInBatchContrastiveLoss,
}


def in_batch_classes(b):
    return max(2, b // IN_BATCH_PER_CLASS)


def make_in_batch_inputs(b, d):
    """int32 class labels [B] (B // 8 classes, uniform) and float32 embeddings
    [B, D]: N(0, 1)/sqrt(D) rows, each scaled by a factor uniform in
    [0, sqrt(2)*margin), so that the pair distances spread over about
    [0, 2*margin] and about 40% of the negative pairs fall inside the margin."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, in_batch_classes(b), b).astype(np.int32)
    scale = (rng.uniform(0.0, math.sqrt(2.0) * MARGIN, (b, 1)) / math.sqrt(d)).astype(np.float32)
    embeddings = rng.standard_normal((b, d), dtype=np.float32)
    embeddings *= scale
    return labels, embeddings


def make_in_batch_step(impl, mode):
    """tf.function (labels, embeddings) -> (loss, d loss / d embeddings); a fresh one per B."""
    loss = IN_BATCH_LOSSES[impl]()

    def forward_backward(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = loss(labels, embeddings)
        return value, tape.gradient(value, embeddings)

    return tf.function(forward_backward, jit_compile=MODES[mode])


def error_summary(error):
    """One short line: the exception's type and the start of its message, without
    TensorFlow's bracketed graph attributes."""
    lines = str(error).strip().splitlines()
    message = re.sub(r"\[[^\]]*\]", "", lines[0]) if lines else ""
    message = re.sub(r" when trying to compile graph \S+", "", message)
    return f"{type(error).__name__}: {message[:160]}"


def peak_rss_bytes():
    """This process's peak RSS: VmHWM, which belongs to the process image. Not
    ru_maxrss, which Linux carries over fork and exec: a subprocess of a parent
    holding 5.8 GB (after the other sections) reported at least that."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_memory_case(impl, mode, b, d):
    """In a fresh process (--memory-case): build the inputs, then, unless impl is
    "baseline", run the fwd+bwd step twice; print the peak RSS and the call times."""
    labels, embeddings = (tf.constant(x) for x in make_in_batch_inputs(b, d))
    result = {"status": "ok", "times_s": []}
    if impl != "baseline":
        step = make_in_batch_step(impl, mode)
        try:
            for _ in range(2):
                start = time.perf_counter()
                tf.nest.map_structure(np.asarray, step(labels, embeddings))
                result["times_s"].append(time.perf_counter() - start)
        except (tf.errors.ResourceExhaustedError, MemoryError) as error:
            result["status"] = f"OOM ({type(error).__name__})"
        except Exception as error:  # reported in the results, whatever it is
            result["status"] = f"error: {error_summary(error)}"
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(MEMORY_CASE_TAG + json.dumps(result), flush=True)


@dataclass
class MemoryRun:
    impl: str  # "fused", "plain" or "baseline"
    mode: str
    b: int
    d: int
    status: str  # "ok", "OOM (...)", "skipped (est. X GB)", "timeout", "error: ..."
    extra_bytes: float = math.nan  # peak RSS over the baseline run's of the same (B, D)
    estimate_bytes: float = math.nan  # plain: the extrapolated footprint the skip rule used
    first_s: float = math.nan  # first call (tracing, XLA compilation) and second call
    second_s: float = math.nan
    wall_s: float = math.nan  # the whole subprocess, imports included
    peak_bytes: float = math.nan  # the subprocess's own peak RSS (VmHWM)

    @property
    def ok(self):
        return self.status == "ok"

    def note(self):
        if not self.ok:
            return self.status
        if self.impl == "baseline":
            return (
                f"baseline, peak RSS {self.peak_bytes / 1e6:.0f} MB, subprocess {self.wall_s:.1f} s"
            )
        return (
            f"memory run: first call {self.first_s:.2f} s, second {self.second_s:.3g} s, "
            f"subprocess {self.wall_s:.1f} s"
        )


def memory_limit_bytes(limit_gb=None):
    """The most extra memory one memory run may take: --memory-limit-gb, else
    60% of MemTotal or 80% of MemAvailable (when the section starts), whichever
    is less. Plain runs estimated above it are skipped, runs that exceed it killed."""
    if limit_gb is not None:
        return limit_gb * 1e9
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return min(0.6 * info["MemTotal"], 0.8 * info.get("MemAvailable", info["MemTotal"]))


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_subprocess(impl, mode, b, d, kill_above_bytes, timeout_s):
    """Runs one memory case in a fresh Python; returns a MemoryRun (extra_bytes not
    yet set). The child is killed if its RSS passes kill_above_bytes ("OOM") or it
    runs past timeout_s."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-case",
        impl,
        mode,
        str(b),
        str(d),
    ]
    if os.environ.get(ALLOCATOR_ENV) == "true":  # the parent ran with --bfc-allocator
        command.append("--bfc-allocator")
    killed = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        while True:
            try:
                process.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if rss_bytes(process.pid) > kill_above_bytes:
                killed = f"OOM (killed above the {kill_above_bytes / 1e9:.1f} GB RSS limit)"
            elif time.perf_counter() - start > timeout_s:
                killed = f"timeout (killed after {timeout_s:.0f} s)"
            if killed:
                process.kill()
                process.wait()
                break
        wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    run = MemoryRun(impl, mode, b, d, "ok", wall_s=wall_s)
    tagged = [
        line[len(MEMORY_CASE_TAG) :]
        for line in stdout.splitlines()
        if line.startswith(MEMORY_CASE_TAG)
    ]
    if killed:
        run.status = killed
    elif process.returncode < 0:
        signal_number = -process.returncode
        run.status = (
            f"OOM (killed by signal {signal_number})"
            if signal_number == 9
            else f"error: killed by signal {signal_number}"
        )
    elif process.returncode != 0 or not tagged:
        lines = [line for line in stderr.splitlines() if line.strip()]
        run.status = "error: " + (lines[-1][:200] if lines else f"exit {process.returncode}")
    else:
        result = json.loads(tagged[-1])
        run.status = result["status"]
        run.peak_bytes = result["peak_rss_bytes"]
        times = result["times_s"] + [math.nan, math.nan]
        run.first_s, run.second_s = times[:2]
    return run


def plain_estimate(runs, mode, b):
    """(estimated extra bytes, reason to skip or None) of plain at (mode, B), from
    plain's runs at smaller B in the same mode (its B x B matrices dominate): the
    extra peak at the largest of them times (B / that B)^2, or, if two were
    measured and that is less, the line through their extra peaks as a function
    of B^2 (which leaves out the fixed one-time costs); with none,
    PLAIN_BXB_FALLBACK float32 B x B matrices."""
    smaller = sorted(
        (r for r in runs if r.impl == "plain" and r.mode == mode and r.b < b), key=lambda r: r.b
    )
    if not smaller:
        return PLAIN_BXB_FALLBACK * 4.0 * b * b, None
    last = smaller[-1]
    if last.status.startswith("OOM"):
        return math.nan, f"skipped (OOM at B={last.b})"
    known = last.extra_bytes if last.ok else last.estimate_bytes
    if math.isnan(known):
        return math.nan, f"skipped (B={last.b}: {last.status})"
    estimate = known * (b / last.b) ** 2
    if last.ok and len(smaller) >= 2 and smaller[-2].ok:
        previous = smaller[-2]
        slope = (last.extra_bytes - previous.extra_bytes) / (last.b**2 - previous.b**2)
        if slope > 0:
            estimate = min(estimate, last.extra_bytes + slope * (b**2 - last.b**2))
    return estimate, None


def measure_in_batch_memory(settings, limit_bytes, timeout_s):
    """Every (impl, mode, B) at D = IN_BATCH_D, then the memory target case (fused,
    tf.function, B=MEMORY_TARGET_B, D=MEMORY_TARGET_D; plain there only through
    the skip rule), each in a fresh subprocess after a baseline subprocess of the
    same (B, D). Returns the MemoryRuns, baselines included."""
    cases = [
        (b, IN_BATCH_D, mode, impl)
        for b in settings.in_batch_sizes
        for mode, impl in itertools.product(IN_BATCH_MODES, IN_BATCH_IMPLS)
    ]
    cases += [
        (MEMORY_TARGET_B, MEMORY_TARGET_D, MEMORY_TARGET_MODE, impl) for impl in IN_BATCH_IMPLS
    ]
    runs, baselines = [], {}
    for index, (b, d, mode, impl) in enumerate(cases, 1):
        estimate, skip = math.nan, None
        if impl == "plain":
            estimate, skip = plain_estimate(runs, mode, b)
            if skip is None and estimate > limit_bytes:
                skip = f"skipped (est. {estimate / 1e9:.1f} GB)"
        if skip is None and (b, d) not in baselines:
            baselines[(b, d)] = memory_subprocess("baseline", "", b, d, math.inf, timeout_s)
            base = baselines[(b, d)]
            print(f"  in_batch memory B={b} D={d}: {base.note()}", flush=True)
        base = baselines.get((b, d))
        if skip is None and not base.ok:
            skip = f"skipped (baseline: {base.status})"
        if skip is not None:
            run = MemoryRun(impl, mode, b, d, skip, estimate_bytes=estimate)
        else:
            run = memory_subprocess(impl, mode, b, d, base.peak_bytes + limit_bytes, timeout_s)
            run.estimate_bytes = estimate
            if run.ok:
                run.extra_bytes = run.peak_bytes - base.peak_bytes
        runs.append(run)
        extra = f"{run.extra_bytes / 1e6:.0f} MB extra peak; " if run.ok else ""
        print(
            f"[{index}/{len(cases)}] in_batch memory {impl} {mode} B={b} D={d}: "
            f"{extra}{run.note()}",
            flush=True,
        )
    return runs + list(baselines.values())


def measure_in_batch_times(b, runs, settings):
    """Times fused and plain, tf.function and XLA, at one B, taking turns in the same
    repetitions; only where the memory run fitted, plain only up to PLAIN_TIMED_MAX_B.
    Returns ({(impl, mode): seconds}, {(impl, mode): why not timed})."""
    labels, embeddings = (tf.constant(x) for x in make_in_batch_inputs(b, IN_BATCH_D))
    memory = {(r.impl, r.mode): r for r in runs if (r.b, r.d) == (b, IN_BATCH_D)}
    calls, keys, skipped = [], [], {}
    for mode, impl in itertools.product(IN_BATCH_MODES, IN_BATCH_IMPLS):
        run = memory.get((impl, mode))
        if run is not None and not run.ok:  # not in this process either
            skipped[(impl, mode)] = run.status
            continue
        if impl == "plain" and b > PLAIN_TIMED_MAX_B:
            skipped[(impl, mode)] = f"not timed above B={PLAIN_TIMED_MAX_B}"
            continue
        step = make_in_batch_step(impl, mode)

        def call(step=step):
            return tf.nest.map_structure(np.asarray, step(labels, embeddings))

        try:
            call()  # the first call traces (and compiles): keep a failure out of the timing
        except Exception as error:  # reported in the results, whatever it is
            skipped[(impl, mode)] = f"error: {error_summary(error)}"
            continue
        calls.append(call)
        keys.append((impl, mode))
    if not calls:
        return {}, skipped
    seconds = time_interleaved(calls, settings.in_batch_repeats[b], settings.in_batch_min_sample_s)
    return dict(zip(keys, seconds)), skipped


def in_batch_agreement(b):
    """[(mode, relative loss difference, largest gradient difference / largest
    |gradient|)]: fused against plain in the same mode, at B, D = IN_BATCH_D."""
    labels, embeddings = (tf.constant(x) for x in make_in_batch_inputs(b, IN_BATCH_D))
    results = []
    for mode in IN_BATCH_MODES:
        try:
            (fused, fused_grad), (plain, plain_grad) = (
                tf.nest.map_structure(
                    np.asarray, make_in_batch_step(impl, mode)(labels, embeddings)
                )
                for impl in IN_BATCH_IMPLS
            )
        except Exception as error:  # reported, not fatal
            results.append((mode, f"error: {error_summary(error)}"))
            continue
        grad_error = np.max(np.abs(fused_grad - plain_grad)) / np.max(np.abs(plain_grad))
        results.append(
            (mode, abs(float(fused) - float(plain)) / abs(float(plain)), float(grad_error))
        )
    return results


def measure_fit_step(settings):
    """ms per train_on_batch of Dense(FIT_INPUT_D -> FIT_HIDDEN relu -> IN_BATCH_D),
    Adam, jit_compile=True, B = FIT_B, integer class labels, compiled with the fused
    loss class and with the plain one (same initial weights), taking turns.
    Returns ({impl: seconds per step}, {impl: why not timed})."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((FIT_B, FIT_INPUT_D), dtype=np.float32))
    y = tf.constant(rng.integers(0, in_batch_classes(FIT_B), FIT_B).astype(np.int32))
    calls, keys, errors = [], [], {}
    for impl in IN_BATCH_IMPLS:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FIT_INPUT_D,)),
                keras.layers.Dense(FIT_HIDDEN, activation="relu"),
                keras.layers.Dense(IN_BATCH_D),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=IN_BATCH_LOSSES[impl](), jit_compile=True
        )
        call = lambda model=model: model.train_on_batch(x, y)  # noqa: E731  (NumPy: synchronous)
        try:
            call()  # traces and compiles
        except Exception as error:  # reported in the results, whatever it is
            errors[impl] = f"error: {error_summary(error)}"
            continue
        calls.append(call)
        keys.append(impl)
    seconds = (
        time_interleaved(calls, settings.in_batch_repeats[FIT_B], settings.in_batch_min_sample_s)
        if calls
        else []
    )
    return dict(zip(keys, seconds)), errors


@dataclass
class InBatchResult:
    rows: list
    runs: list  # MemoryRuns, baselines included
    fit_s: dict  # impl -> seconds per train step
    fit_errors: dict  # impl -> why its train step was not timed
    agreement: list
    agreement_b: int
    limit_bytes: float
    runtime_s: float


def in_batch_rows(times, skipped, runs, fit_s, fit_errors):
    """CSV rows: one per (impl, mode, B) at D = IN_BATCH_D, the memory target case,
    and the two fit-step times."""
    memory = {(r.impl, r.mode, r.b, r.d): r for r in runs}
    rows = []
    shapes = sorted(
        {(r.b, r.d) for r in runs if r.impl != "baseline"}, key=lambda s: (s[1] != IN_BATCH_D, s[0])
    )
    for (b, d), mode, impl in itertools.product(shapes, IN_BATCH_MODES, IN_BATCH_IMPLS):
        run = memory.get((impl, mode, b, d))
        if run is None:
            continue
        seconds = times.get((impl, mode, b), math.nan)
        notes = [run.note() if run.ok else f"memory run: {run.status}"]
        if math.isnan(seconds) and run.ok and d == IN_BATCH_D:
            why = skipped.get((impl, mode, b), "")
            if why.startswith("not timed above"):  # plain at large B
                seconds = run.second_s  # one call, in the memory subprocess
                notes.insert(0, f"time: the memory run's second call ({why})")
            elif why:
                notes.append(f"not timed: {why}")
        rows.append(
            Row(
                impl,
                mode,
                IN_BATCH_WORKLOAD,
                DEFAULT_REDUCTION,
                b,
                seconds * 1e3,
                "",
                "",
                "in_batch",
                d,
                round(run.extra_bytes / 1e6, 1) if run.ok else "",
                "; ".join(notes),
            )
        )
    for impl in IN_BATCH_IMPLS:
        note = f"Dense {FIT_INPUT_D}-{FIT_HIDDEN} relu-{IN_BATCH_D}, Adam"
        rows.append(
            Row(
                impl,
                FIT_MODE,
                "fit step",
                DEFAULT_REDUCTION,
                FIT_B,
                fit_s.get(impl, math.nan) * 1e3,
                "",
                "",
                "in_batch",
                IN_BATCH_D,
                "",
                "; ".join([note] + ([fit_errors[impl]] if impl in fit_errors else [])),
            )
        )
    return rows


def run_in_batch(settings, limit_bytes, timeout_s):
    started = time.perf_counter()
    print(f"in_batch: memory runs (extra-memory limit {limit_bytes / 1e9:.1f} GB)", flush=True)
    runs = measure_in_batch_memory(settings, limit_bytes, timeout_s)
    agreement_b = min(settings.in_batch_sizes, key=lambda b: abs(b - 1024))
    agreement = in_batch_agreement(agreement_b)
    for mode, *errors in agreement:
        print(
            f"in_batch agreement B={agreement_b} {mode}: fused vs plain "
            + (
                f"loss {errors[0]:.2e}, gradient {errors[1]:.2e}" if len(errors) == 2 else errors[0]
            ),
            flush=True,
        )
    times, skipped = {}, {}
    for index, b in enumerate(settings.in_batch_sizes, 1):
        measured, not_timed = measure_in_batch_times(b, runs, settings)
        times.update({(impl, mode, b): s for (impl, mode), s in measured.items()})
        skipped.update({(impl, mode, b): why for (impl, mode), why in not_timed.items()})
        for mode in IN_BATCH_MODES:
            ms = {
                impl: (
                    f"{format_number(measured[(impl, mode)] * 1e3)} ms"
                    if (impl, mode) in measured
                    else not_timed.get((impl, mode), "n/a")
                )
                for impl in IN_BATCH_IMPLS
            }
            fused, plain = (measured.get((impl, mode), math.nan) for impl in IN_BATCH_IMPLS)
            print(
                f"[{index}/{len(settings.in_batch_sizes)}] in_batch {mode} {IN_BATCH_WORKLOAD} "
                f"B={b} D={IN_BATCH_D}: fused {ms['fused']}, plain {ms['plain']}, "
                f"speedup {format_ratio(plain / fused)}",
                flush=True,
            )
    fit_s, fit_errors = measure_fit_step(settings)
    print(f"in_batch fit step B={FIT_B}: " + ", ".join(fit_text(fit_s, fit_errors)), flush=True)
    rows = in_batch_rows(times, skipped, runs, fit_s, fit_errors)
    result = InBatchResult(
        rows,
        runs,
        fit_s,
        fit_errors,
        agreement,
        agreement_b,
        limit_bytes,
        time.perf_counter() - started,
    )
    print("\n".join(in_batch_target_lines(result)), flush=True)
    print(f"in_batch section: {result.runtime_s:.0f} s", flush=True)
    return result


def fit_text(fit_s, fit_errors):
    """["fused X ms/step", "plain Y ms/step", "plain/fused: Zx"], errors in place of times."""
    parts = [
        f"{impl} "
        + (
            f"{format_number(fit_s[impl] * 1e3)} ms/step"
            if impl in fit_s
            else fit_errors.get(impl, "n/a")
        )
        for impl in IN_BATCH_IMPLS
    ]
    ratio = fit_s.get("plain", math.nan) / fit_s.get("fused", math.nan)
    return parts + [f"plain/fused {format_ratio(ratio)}"]


def format_ratio(ratio):
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def format_mb(row):
    return "—" if row is None or row.peak_mb == "" else f"{row.peak_mb:.0f}"


def in_batch_target_lines(result):
    find = {(r.impl, r.mode, r.n, r.d): r for r in result.rows if r.workload == IN_BATCH_WORKLOAD}
    lines = []
    for mode, target in IN_BATCH_TARGETS.items():
        fused, plain = (
            find.get((impl, mode, IN_BATCH_TARGET_B, IN_BATCH_D)) for impl in IN_BATCH_IMPLS
        )
        label = f"- B={IN_BATCH_TARGET_B}, {'XLA' if MODES[mode] else mode}: fused vs plain"
        if fused is None or plain is None or math.isnan(fused.median_ms / plain.median_ms):
            why = "; ".join(
                f"{row.impl}: {row.note[:200]}"
                for row in (fused, plain)
                if row is not None and math.isnan(row.median_ms)
            )
            lines.append(
                f"{label}: not measured{f' ({why})' if why else ''}; target >= {target}x: MISSED"
            )
            continue
        ratio = plain.median_ms / fused.median_ms
        lines.append(
            f"{label} {ratio:.2f}x ({format_number(fused.median_ms)} ms vs "
            f"{format_number(plain.median_ms)} ms); target >= {target}x: "
            f"{met(ratio >= target)}"
        )
    target = next(
        (
            r
            for r in result.runs
            if (r.impl, r.mode, r.b, r.d)
            == ("fused", MEMORY_TARGET_MODE, MEMORY_TARGET_B, MEMORY_TARGET_D)
        ),
        None,
    )
    label = (
        f"- B={MEMORY_TARGET_B}, D={MEMORY_TARGET_D}, fused {MEMORY_TARGET_MODE} "
        f"{IN_BATCH_WORKLOAD}: extra peak"
    )
    limit = f"target < {MEMORY_TARGET_BYTES / 1e9:g} GB"
    if target is None or not target.ok:
        lines.append(f"{label}: {target.status if target else 'not measured'}; {limit}: MISSED")
    else:
        lines.append(
            f"{label} {target.extra_bytes / 1e6:.0f} MB; {limit}: "
            f"{met(target.extra_bytes < MEMORY_TARGET_BYTES)}"
        )
    return lines


def in_batch_markdown(result, settings):
    find = {(r.impl, r.mode, r.n, r.d): r for r in result.rows if r.workload == IN_BATCH_WORKLOAD}
    lines = [
        "",
        f"## In-batch all-pairs loss from class labels: embeddings [B, {IN_BATCH_D}], "
        f"{IN_BATCH_DISTANCE}, margin {MARGIN:g}, {DEFAULT_REDUCTION}, fwd+bwd, float32",
        "",
        "- fused: `fused_contrastive.InBatchContrastiveLoss()`; plain: a `keras.losses.Loss` "
        "whose `call` is `fused_contrastive.reference.in_batch_contrastive_loss_reference` "
        "(B×B matrices), reduced by Keras. fwd+bwd = the loss and its gradient with respect to "
        "the embeddings from a GradientTape. XLA = `tf.function(jit_compile=True)`.",
        f"- Labels: B // {IN_BATCH_PER_CLASS} classes drawn uniformly (about "
        f"{IN_BATCH_PER_CLASS} rows per class); embeddings N(0, 1)/sqrt(D) rows scaled by "
        "factors uniform in [0, sqrt(2)·margin).",
        "- Timing: samples per B: "
        + ", ".join(f"{settings.in_batch_repeats[b]} at B={b}" for b in settings.in_batch_sizes)
        + f"; each sample at least {settings.in_batch_min_sample_s * 1e3:.0f} ms of back-to-back "
        "calls; fused and plain in both modes take turns in the same repetitions. Plain is "
        f"timed up to B={PLAIN_TIMED_MAX_B}; above, its time (marked *) is the second call of "
        "its memory run (one call, not a median).",
        "- Peak MB (1 MB = 1e6 bytes): each (impl, mode, B) runs its step twice in a fresh "
        "subprocess; the number is that process's peak RSS (VmHWM) minus the peak RSS of "
        "a baseline subprocess that did the same imports and built the same inputs but did "
        "not run the loss. It includes one-time costs of the first call (tracing, XLA "
        "compilation, thread pools), which dominate at small B. Plain is skipped where its "
        "footprint, extrapolated as (B / previous B)² from its previous B in the same mode, "
        f"exceeds the limit of this run ({result.limit_bytes / 1e9:.1f} GB: 60% of MemTotal or "
        "80% of MemAvailable, whichever is less, unless --memory-limit-gb); a run whose RSS "
        "passes baseline + limit is killed and reported as OOM.",
        f"- Section runtime: {result.runtime_s:.0f} s.",
        "",
        "| B | mode | fused ms | plain ms | speedup | fused peak MB | plain peak MB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    memory = {(r.impl, r.mode, r.b, r.d): r for r in result.runs}
    for b, mode in itertools.product(settings.in_batch_sizes, IN_BATCH_MODES):
        fused, plain = (find.get((impl, mode, b, IN_BATCH_D)) for impl in IN_BATCH_IMPLS)

        def ms(row):
            if row is None or math.isnan(row.median_ms):
                return "—"
            star = "*" if row.note.startswith("time: the memory run") else ""
            return format_number(row.median_ms) + star

        def peak(impl, row):
            run = memory.get((impl, mode, b, IN_BATCH_D))
            if run is None or run.ok:
                return format_mb(row)
            return "error (see memory runs)" if run.status.startswith("error") else run.status

        ratio = (plain.median_ms / fused.median_ms) if fused and plain else math.nan
        lines.append(
            f"| {b} | {'XLA' if MODES[mode] else mode} | {ms(fused)} | {ms(plain)} "
            f"| {format_ratio(ratio)} | {peak('fused', fused)} | {peak('plain', plain)} |"
        )
    target_runs = [
        memory.get((impl, MEMORY_TARGET_MODE, MEMORY_TARGET_B, MEMORY_TARGET_D))
        for impl in IN_BATCH_IMPLS
    ]
    lines.append(
        f"| {MEMORY_TARGET_B} (D={MEMORY_TARGET_D}) | {MEMORY_TARGET_MODE} "
        "| — | — | — | "
        + " | ".join(
            "—" if run is None else f"{run.extra_bytes / 1e6:.0f}" if run.ok else run.status
            for run in target_runs
        )
        + " |"
    )
    lines += [
        "",
        f"- Keras train step (`model.train_on_batch`, `jit_compile=True`, Adam; Dense "
        f"{FIT_INPUT_D} → {FIT_HIDDEN} relu → {IN_BATCH_D}; B={FIT_B}, "
        f"{in_batch_classes(FIT_B)} classes; fused = `InBatchContrastiveLoss()`, plain = the "
        "plain loss class; the two models' steps take turns): "
        + ", ".join(fit_text(result.fit_s, result.fit_errors))
        + ".",
        f"- Agreement at B={result.agreement_b} (fused vs plain in the same mode): "
        + "; ".join(
            f"{'XLA' if MODES[mode] else mode}: "
            + (
                f"loss relative difference {errors[0]:.1e}, gradient max difference / max "
                f"|gradient| {errors[1]:.1e}"
                if len(errors) == 2
                else errors[0]
            )
            for mode, *errors in result.agreement
        )
        + ".",
        "",
        "### Memory runs (each in a fresh subprocess; times include the first call's tracing "
        "and compilation)",
        "",
        "| B | D | impl | mode | extra peak MB | first call s | second call s | subprocess s "
        "| status |",
        "|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for run in sorted(
        result.runs, key=lambda r: (r.d != IN_BATCH_D, r.b, r.impl != "baseline", r.mode, r.impl)
    ):
        number = lambda x, f: "—" if math.isnan(x) else format(x, f)  # noqa: E731
        status = (
            f"baseline: peak RSS {run.peak_bytes / 1e6:.0f} MB"
            if run.impl == "baseline" and run.ok
            else run.status
        )
        lines.append(
            f"| {run.b} | {run.d} | {run.impl} | {run.mode or '—'} "
            f"| {number(run.extra_bytes / 1e6, '.0f')} | {number(run.first_s, '.2f')} "
            f"| {number(run.second_s, '.3g')} | {number(run.wall_s, '.1f')} "
            f"| {status} |"
        )
    lines += ["", "### Targets (speedup = plain ms / fused ms, same mode)", ""]
    lines += in_batch_target_lines(result)
    return lines


def plot_in_batch(result, path):
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(13, 5.5))
    find = {
        (r.impl, r.mode, r.n): r
        for r in result.rows
        if r.workload == IN_BATCH_WORKLOAD and r.d == IN_BATCH_D
    }
    memory = [r for r in result.runs if r.impl != "baseline" and r.d == IN_BATCH_D]
    styles = {"fused": ("-", "o"), "plain": ("--", "s")}
    for impl, (color, mode) in itertools.product(IN_BATCH_IMPLS, enumerate(IN_BATCH_MODES)):
        linestyle, marker = styles[impl]
        label = f"{impl}, {'XLA' if MODES[mode] else mode}"
        timed = sorted(
            (b, row.median_ms)
            for (i, m, b), row in find.items()
            if (i, m) == (impl, mode) and not math.isnan(row.median_ms)
        )
        if timed:
            ax_time.plot(
                *zip(*timed), linestyle=linestyle, marker=marker, color=f"C{color}", label=label
            )
        single = [
            (b, ms)
            for b, ms in timed
            if find[(impl, mode, b)].note.startswith("time: the memory run")
        ]
        if single:
            ax_time.plot(
                *zip(*single),
                linestyle="none",
                marker=marker,
                markersize=11,
                markerfacecolor="none",
                color=f"C{color}",
                label=f"{label}: one call (memory run)",
            )
        peaks = sorted(
            (r.b, r.extra_bytes / 1e6) for r in memory if (r.impl, r.mode) == (impl, mode) and r.ok
        )
        if peaks:
            ax_memory.plot(
                *zip(*peaks), linestyle=linestyle, marker=marker, color=f"C{color}", label=label
            )
        missing = sorted(
            (r.b, r.estimate_bytes / 1e6)
            for r in memory
            if (r.impl, r.mode) == (impl, mode)
            and r.status.startswith(("OOM", "skipped"))
            and not math.isnan(r.estimate_bytes)
        )
        if missing:
            ax_memory.plot(
                *zip(*missing),
                linestyle="none",
                marker="x",
                markersize=10,
                color=f"C{color}",
                label=f"{label}: not run / OOM (estimate)",
            )
    target = [
        r
        for r in result.runs
        if (r.impl, r.b, r.d) == ("fused", MEMORY_TARGET_B, MEMORY_TARGET_D) and r.ok
    ]
    if target:
        ax_memory.plot(
            [MEMORY_TARGET_B],
            [target[0].extra_bytes / 1e6],
            linestyle="none",
            marker="*",
            markersize=13,
            color="black",
            label=f"fused, {MEMORY_TARGET_MODE}, D={MEMORY_TARGET_D}",
        )
    ax_memory.axhline(
        result.limit_bytes / 1e6, linestyle=":", color="gray", label="memory limit of this run"
    )
    ax_memory.axhline(
        MEMORY_TARGET_BYTES / 1e6,
        linestyle="-.",
        color="gray",
        alpha=0.6,
        label=f"target at B={MEMORY_TARGET_B}",
    )
    ax_time.set(
        xscale="log",
        yscale="log",
        xlabel="B",
        ylabel="median time per call (ms)",
        title=f"time, fwd+bwd, D={IN_BATCH_D}",
    )
    ax_memory.set(
        xscale="log",
        yscale="log",
        xlabel="B",
        ylabel="extra peak RSS (MB)",
        title=f"peak memory over a baseline process, D={IN_BATCH_D}",
    )
    for ax in (ax_time, ax_memory):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.1)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"In-batch all-pairs contrastive loss, {IN_BATCH_DISTANCE}, float32: fused vs "
        "plain TF (lower is better)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes and repeats (a few minutes for all sections)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="output directory (default: benchmarks/results)",
    )
    parser.add_argument(
        "--bfc-allocator",
        action="store_true",
        help=f"set {ALLOCATOR_ENV}=true (see Allocator in the docstring)",
    )
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTIONS + ("all",),
        help="run only this section (repeatable; default: all); output files "
        "of a partial run are named after its sections (see Output)",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="in_batch: the most extra memory one memory run may take (default: "
        "60%% of MemTotal or 80%% of MemAvailable, whichever is less)",
    )
    parser.add_argument(
        "--memory-case", nargs=4, metavar=("IMPL", "MODE", "B", "D"), help=argparse.SUPPRESS
    )  # internal: one in_batch memory run
    args = parser.parse_args()
    if args.memory_case:
        impl, mode, b, d = args.memory_case
        run_memory_case(impl, mode, int(b), int(d))
        return
    sections = [
        s for s in SECTIONS if not args.section or s in args.section or "all" in args.section
    ]
    settings = Settings.for_run(args.quick)
    if fused_contrastive.using_reference():
        print(
            "WARNING: fused_contrastive is using its pure-TF fallback; 'fused' is not the op",
            file=sys.stderr,
            flush=True,
        )

    header = machine_description()
    started = time.perf_counter()
    csv_rows, markdown_lines, plots = [], [], []
    if "distances" in sections:
        rows, floors, accuracy_result = run_distances(settings)
        csv_rows += rows
        markdown_lines += distance_markdown(rows, floors, accuracy_result, settings)
        plots.append(("results.png", functools.partial(plot, rows)))
    if "embeddings" in sections:
        embedding_rows, embedding_accuracy_result = run_embeddings(settings)
        csv_rows += embedding_rows
        markdown_lines += embedding_markdown(embedding_rows, embedding_accuracy_result, settings)
        plots.append(("results_embeddings.png", functools.partial(plot_embeddings, embedding_rows)))
    if "in_batch" in sections:
        limit_bytes = memory_limit_bytes(args.memory_limit_gb)
        in_batch = run_in_batch(settings, limit_bytes, timeout_s=120 if args.quick else 600)
        csv_rows += in_batch.rows
        markdown_lines += in_batch_markdown(in_batch, settings)
        plots.append(("results_in_batch.png", functools.partial(plot_in_batch, in_batch)))
    runtime_s = time.perf_counter() - started

    # A partial run writes results_<sections>.csv/.md, leaving a full run's files alone.
    stem = "results" if sections == list(SECTIONS) else "results_" + "_".join(sections)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(csv_rows, args.out / f"{stem}.csv")
    write_markdown(
        header,
        runtime_s,
        args.out / f"{stem}.md",
        markdown_lines,
        settings if "distances" in sections else None,
    )
    for name, draw in plots:
        draw(args.out / name)
    print(
        f"{runtime_s:.0f} s; wrote {stem}.csv, {stem}.md, "
        + ", ".join(name for name, _ in plots)
        + f" to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()

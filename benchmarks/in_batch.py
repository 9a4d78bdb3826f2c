"""The "in_batch" section of benchmark.py: the in-batch all-pairs loss from class
labels, its times, its peak memory (each case in a fresh subprocess that re-runs
benchmark.py with --memory-case) and a Keras fit step.

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
"""

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import fused_contrastive
from fused_contrastive.reference import in_batch_contrastive_loss_reference
from harness import (
    ALLOCATOR_ENV,
    DEFAULT_REDUCTION,
    MARGIN,
    MODES,
    Row,
    error_summary,
    format_number,
    format_ratio,
    log_grid,
    met,
    peak_rss_bytes,
    rss_bytes,
    save_figure,
    time_interleaved,
    two_panels,
)

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
# What a memory run runs, with --memory-case: the benchmark's entry point.
ENTRY_POINT = Path(__file__).resolve().with_name("benchmark.py")


@dataclass(frozen=True)
class Settings:
    in_batch_sizes: tuple  # B (D = IN_BATCH_D)
    in_batch_min_sample_s: float
    in_batch_repeats: dict  # B -> number of samples; FIT_B's is the fit step's

    @classmethod
    def for_run(cls, quick):
        if quick:
            in_batch_sizes = (256, 1024, IN_BATCH_TARGET_B)
            return cls(in_batch_sizes, 0.005, {b: 5 for b in in_batch_sizes + (FIT_B,)})
        in_batch_sizes = tuple(2**e for e in range(8, 15))  # 256 ... 16384
        return cls(
            in_batch_sizes,
            0.020,
            {
                b: 9 if b <= 1024 else 7 if b <= 4096 else 5 if b <= 8192 else 3
                for b in in_batch_sizes
            },
        )


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


def memory_subprocess(impl, mode, b, d, kill_above_bytes, timeout_s):
    """Runs one memory case in a fresh Python; returns a MemoryRun (extra_bytes not
    yet set). The child is killed if its RSS passes kill_above_bytes ("OOM") or it
    runs past timeout_s."""
    command = [sys.executable, str(ENTRY_POINT), "--memory-case", impl, mode, str(b), str(d)]
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
    fig, (ax_time, ax_memory) = two_panels()
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
        log_grid(ax)
        ax.legend(fontsize=8)
    save_figure(
        fig,
        f"In-batch all-pairs contrastive loss, {IN_BATCH_DISTANCE}, float32: fused "
        "vs plain TF (lower is better)",
        path,
    )

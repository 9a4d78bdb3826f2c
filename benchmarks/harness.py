"""The parts of benchmark.py that every section shares: the settings they have in
common, the timing (time_interleaved, see "How it is timed" in benchmark.py), the
CSV row, number formats, the machine description, the CSV and markdown files and
the frame of the plots.

Imported before anything that loads TensorFlow: it sets TensorFlow's environment
first (see "Allocator" in benchmark.py).
"""

import csv
import datetime
import functools
import gc
import math
import os
import platform
import re
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
if "--bfc-allocator" in sys.argv[1:]:
    os.environ[ALLOCATOR_ENV] = "true"

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_contrastive  # noqa: E402

# The sections' make_step functions build a fresh tf.function per input size on
# purpose; silence the retracing warning that this triggers.
tf.get_logger().setLevel("ERROR")

MARGIN = 1.0
MODES = {"eager": None, "tf.function": False, "tf.function+jit": True}  # mode -> jit_compile
WORKLOADS = ("forward", "fwd+bwd")
DEFAULT_REDUCTION = "sum_over_batch_size"


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


def format_ratio(ratio):
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def met(ok):
    return "met" if ok else "MISSED"


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


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def write_markdown(header, runtime_s, path, section_lines, runtime_note=""):
    """results.md: the header, then each section's lines. runtime_note: appended
    to the runtime line (the distance section's samples, when it ran)."""
    lines = ["# fused-contrastive benchmark", ""]
    lines += [f"- {item}" for item in header]
    lines.append(
        "- Load average when it ended: " + ", ".join(f"{load:.2f}" for load in os.getloadavg())
    )
    lines.append(f"- Runtime: {runtime_s:.0f} s{runtime_note}")
    lines += section_lines
    path.write_text("\n".join(lines) + "\n")


def two_panels(sharey=False):
    """A figure of two plots side by side: (fig, axes)."""
    return plt.subplots(1, 2, figsize=(13, 5.5), sharey=sharey)


def log_grid(ax):
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.1)


def save_figure(fig, title, path):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)

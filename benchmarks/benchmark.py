"""Benchmark of the fused contrastive loss against the same loss in plain TF ops.

Usage:
    python benchmarks/benchmark.py [--quick] [--out benchmarks/results] [--bfc-allocator]
        [--section {distances,embeddings,in_batch,references,miners,jax,all} ...]
        [--memory-limit-gb GB]

Six sections: "distances" (the loss of precomputed distances), "embeddings"
(the loss of pairs of embeddings, the distance computed inside the loss),
"in_batch" (the loss over all pairs of a batch, from class labels),
"references" (a batch's anchors against the batch and reference rows),
"miners" (the in-batch loss with a miner) and "jax" (fused_contrastive.jax
against plain jax.numpy, and against the TF path). --section
runs only the sections named (repeatable; default all), e.g.
    python benchmarks/benchmark.py --section in_batch [--quick]

What each section compares, how it is measured and the targets it checks are in
the docstrings of the section modules beside this script: distances.py
("distances", with its effective bandwidth and accuracy), pairs.py
("embeddings"), in_batch.py ("in_batch"), references.py ("references"),
miners.py ("miners") and on_jax.py ("jax").
harness.py holds what they share.

How it is timed
    Each callable is called twice untimed (tracing, XLA compilation and the first
    touch of buffers stay out of the timings), then timed in samples of k
    back-to-back calls, k chosen so that a sample lasts at least 40 ms (5 ms with
    --quick); the median over the samples is reported. Within each repetition the
    fused, reference and memcpy callables take turns, in rotating order, so
    machine noise hits them alike; the speedup (reference time / fused time)
    pairs the two measurements of the same run. Every output is turned into a
    NumPy array (zero-copy on CPU), so a call ends only once its result exists.

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
import functools
import sys
import time
from pathlib import Path

# First, before anything loads TensorFlow: harness sets TensorFlow's environment
# (see "Allocator").
import harness
# isort: split

import distances
import fused_contrastive
import in_batch
import miners
import on_jax
import pairs
import references

SECTIONS = ("distances", "embeddings", "in_batch", "references", "miners", "jax")


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
        help=f"set {harness.ALLOCATOR_ENV}=true (see Allocator in the docstring)",
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
        in_batch.run_memory_case(impl, mode, int(b), int(d))
        return
    sections = [
        s for s in SECTIONS if not args.section or s in args.section or "all" in args.section
    ]
    if fused_contrastive.using_reference():
        print(
            "WARNING: fused_contrastive is using its pure-TF fallback; 'fused' is not the op",
            file=sys.stderr,
            flush=True,
        )

    header = harness.machine_description()
    started = time.perf_counter()
    csv_rows, markdown_lines, plots, runtime_note = [], [], [], ""
    if "distances" in sections:
        settings = distances.Settings.for_run(args.quick)
        rows, floors, accuracy_result = distances.run_distances(settings)
        csv_rows += rows
        markdown_lines += distances.distance_markdown(rows, floors, accuracy_result, settings)
        plots.append(("results.png", functools.partial(distances.plot, rows)))
        runtime_note = distances.samples_note(settings)
    if "embeddings" in sections:
        settings = pairs.Settings.for_run(args.quick)
        embedding_rows, embedding_accuracy_result = pairs.run_embeddings(settings)
        csv_rows += embedding_rows
        markdown_lines += pairs.embedding_markdown(
            embedding_rows, embedding_accuracy_result, settings
        )
        plots.append(
            ("results_embeddings.png", functools.partial(pairs.plot_embeddings, embedding_rows))
        )
    if "in_batch" in sections:
        settings = in_batch.Settings.for_run(args.quick)
        limit_bytes = in_batch.memory_limit_bytes(args.memory_limit_gb)
        result = in_batch.run_in_batch(settings, limit_bytes, timeout_s=120 if args.quick else 600)
        csv_rows += result.rows
        markdown_lines += in_batch.in_batch_markdown(result, settings)
        plots.append(("results_in_batch.png", functools.partial(in_batch.plot_in_batch, result)))
    if "references" in sections:
        rows, lines = references.run_references(references.Settings.for_run(args.quick))
        csv_rows += rows
        markdown_lines += lines
    if "miners" in sections:
        # The references section's settings: the same kind of timing.
        rows, lines = miners.run_miners(references.Settings.for_run(args.quick))
        csv_rows += rows
        markdown_lines += lines
    if "jax" in sections:
        rows, lines = on_jax.run_jax(references.Settings.for_run(args.quick))
        csv_rows += rows
        markdown_lines += lines
    runtime_s = time.perf_counter() - started

    # A partial run writes results_<sections>.csv/.md, leaving a full run's files alone.
    stem = "results" if sections == list(SECTIONS) else "results_" + "_".join(sections)
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_csv(csv_rows, args.out / f"{stem}.csv")
    harness.write_markdown(header, runtime_s, args.out / f"{stem}.md", markdown_lines, runtime_note)
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

"""Steps 5-6 of the GPU check (check_gpu.py): the embedding kernels, the loss
from pair embeddings [..., D], against the CPU ones, and the bandwidth of the
fused-reduction embedding kernel."""

import itertools

import numpy as np

from common import (
    DISTANCE_DTYPES,
    DISTANCE_KINDS,
    LABEL_DTYPES,
    MARGIN,
    REDUCTIONS,
    UNROUNDED,
    compute_dtype,
    host_embeddings,
    numpy_dtype,
    rounding_scales,
    same_bits,
    tolerance_used,
    weight_form,
)

# Embedding shapes [..., D]: no rows, one row, odd row counts; D = 1 and odd D
# (scalar loads) or a multiple of every dtype's 16-byte pack (vector loads).
# check_kernels adds a larger one.
EMBEDDING_SHAPES = [
    (0, 8),
    (1, 1),
    (1, 128),
    (7, 3),
    (7, 16),
    (3, 5, 16),
    (1001, 1),
    (1001, 33),
    (1001, 128),
    (4097, 257),
]


def compare_embeddings(device, kernels, rng, cases, offsets=(0, 0, 0, 0)):
    """Embedding loss and gradient kernels against the CPU ones. Coefficients
    are compared by the gradients they give (their columns differ in scale,
    and a cancellation in one can be harmless in the gradient); the gradient
    kernels read the CPU's coefficients, so each kernel is checked alone.
    Offsets are in elements: labels and the per-row inputs (coefficients,
    upstream), a, b, outputs. Returns (failures, worst tolerance_used of the
    UNROUNDED dtypes)."""
    failures, worst = 0, 0.0
    for index, (label_dtype, dtype, distance, shape) in enumerate(cases):
        similar_label = index % 2
        compute = compute_dtype(dtype)
        labels, a, b = host_embeddings(rng, shape, label_dtype, dtype, distance)
        want = kernels.embedding_loss_cpu(labels, a, b, MARGIN, distance, similar_label)
        got = device.run_embedding(labels, a, b, distance, similar_label, offsets)
        again = device.run_embedding(labels, a, b, distance, similar_label, offsets)
        loss_scale, *grad_scales = rounding_scales(labels, a, b, distance, similar_label)
        used = [tolerance_used(got[0], want[0], compute, dtype, loss_scale)]
        if got[1].dtype == want[1].dtype and got[1].shape == want[1].shape:
            one = np.ones((), numpy_dtype(dtype))
            used += [
                tolerance_used(g, w, compute, dtype, scale)
                for g, w, scale in zip(
                    kernels.embedding_grad_cpu(a, b, got[1], one, distance),
                    kernels.embedding_grad_cpu(a, b, want[1], one, distance),
                    grad_scales,
                )
            ]
        else:
            used.append(np.inf)
        same = [same_bits(x, y) for x, y in zip(got, again)]
        per_row = np.asarray(rng.uniform(-2, 2, shape[:-1]), numpy_dtype(dtype))
        for upstream in (np.asarray(0.5, numpy_dtype(dtype)), per_row):
            want_grads = kernels.embedding_grad_cpu(a, b, want[1], upstream, distance)
            grads = device.run_embedding_grad(a, b, want[1], upstream, distance, offsets)
            grads_again = device.run_embedding_grad(a, b, want[1], upstream, distance, offsets)
            u = np.abs(upstream.astype(np.float64))[..., None]
            used += [
                tolerance_used(g, w, compute, dtype, u * scale)
                for g, w, scale in zip(grads, want_grads, grad_scales)
            ]
            same += [same_bits(x, y) for x, y in zip(grads, grads_again)]
        ok = all(same) and max(used) <= 1
        worst = max(worst, *used) if dtype in UNROUNDED else worst
        failures += not ok
        if not ok or np.prod(shape) >= 10**6:
            print(
                f"  {'ok  ' if ok else 'FAIL'} embeddings {distance:9s} {dtype:8s} "
                f"labels={label_dtype:8s} shape={shape} offsets={offsets} "
                f"similar_label={similar_label} deterministic={all(same)} "
                f"tolerance used={max(used):.0%}",
                flush=True,
            )
    return failures, worst


def compare_embedding_reduced(device, kernels, rng, cases):
    """The fused-reduction embedding kernel against the CPU one for every
    reduction and weight form; reduction_scale exact unless it divides by a
    sum of per-row weights (summed in another order). Returns (failures, worst
    tolerance_used of the UNROUNDED dtypes)."""
    failures, worst = 0, 0.0
    for label_dtype, dtype, distance, shape in cases:
        labels, a, b = host_embeddings(rng, shape, label_dtype, dtype, distance)
        loss_scale, *grad_scales = rounding_scales(labels, a, b, distance, 1)
        vector = rng.uniform(0, 2, shape[:-1]).astype(numpy_dtype(dtype))
        for weights in (None, np.asarray(0.7, numpy_dtype(dtype)), vector):
            row_weights = np.broadcast_to(np.float64(1 if weights is None else weights), shape[:-1])
            for reduction in REDUCTIONS:
                want = kernels.embedding_loss_reduced_cpu(
                    labels, a, b, weights, MARGIN, distance, reduction
                )
                got = device.run_embedding_reduced(labels, a, b, weights, distance, reduction)
                again = device.run_embedding_reduced(labels, a, b, weights, distance, reduction)
                factor = np.abs(row_weights * want[3])
                scales = [np.sum(factor * loss_scale)] + [
                    factor[..., None] * grad_scale for grad_scale in grad_scales
                ]
                used = max(
                    tolerance_used(x, y, compute_dtype(dtype), dtype, scale)
                    for x, y, scale in zip(got[:3], want[:3], scales)
                )
                summed = reduction == "weighted_mean" and weights is vector
                ok = (
                    all(same_bits(x, y) for x, y in zip(got[:3], again[:3]))
                    and got[3] == again[3]
                    and used <= 1
                    and (
                        np.isclose(got[3], want[3], rtol=1e-13, atol=0)
                        if summed
                        else got[3] == want[3]
                    )
                )
                worst = max(worst, used) if dtype in UNROUNDED else worst
                failures += not ok
                if not ok:
                    kind = weight_form(weights)
                    print(
                        f"  FAIL reduced embeddings {distance:9s} {reduction:13s} "
                        f"weights={kind:6s} labels={label_dtype:8s} {dtype:8s} shape={shape} "
                        f"tolerance used={used:.0%}",
                        flush=True,
                    )
    return failures, worst


def check_kernels(device, kernels, rng, self_test):
    """Steps 5-6: every distance, dtype and shape, aligned and misaligned, the
    fused-reduction kernel for every reduction and weight form, and its
    bandwidth at D=128. Returns the failures."""
    failures = 0
    # Many blocks of rows on the GPU; fewer where the CPU stands in.
    shapes = EMBEDDING_SHAPES + [(8191 if self_test else 65537, 64)]
    embedding_cases = [
        (LABEL_DTYPES[index % len(LABEL_DTYPES)], dtype, distance, shape)
        for index, (dtype, distance, shape) in enumerate(
            itertools.product(DISTANCE_DTYPES, DISTANCE_KINDS, shapes)
        )
    ]
    found, worst = compare_embeddings(device, kernels, rng, embedding_cases)
    failures += found
    print(
        f"{len(embedding_cases)} embedding cases compared (worst float32/float64 "
        f"difference: {worst:.0%} of the tolerance)",
        flush=True,
    )
    misaligned = [
        ("float32", dtype, distance, shape)
        for dtype, distance, shape in itertools.product(
            DISTANCE_DTYPES, DISTANCE_KINDS, [(7, 3), (1001, 128)]
        )
    ]
    worst = 0.0
    for offsets in [(0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 3, 2, 1)]:
        found, used = compare_embeddings(device, kernels, rng, misaligned, offsets)
        failures, worst = failures + found, max(worst, used)
    print(
        f"{len(misaligned) * 4} misaligned embedding cases compared (worst float32/float64 "
        f"difference: {worst:.0%} of the tolerance)",
        flush=True,
    )
    reduced_embedding_cases = [
        (labels, dtype, distance, shape)
        for distance, (labels, dtype), shape in itertools.product(
            DISTANCE_KINDS,
            [
                ("float32", "float32"),
                ("int32", "float16"),
                ("bool", "bfloat16"),
                ("float64", "float64"),
            ],
            [(0, 8), (1, 3), (1001, 33), (4097, 128)],
        )
    ]
    found, worst = compare_embedding_reduced(device, kernels, rng, reduced_embedding_cases)
    failures += found
    print(
        f"{len(reduced_embedding_cases) * 9} reduced embedding cases compared (worst "
        f"float32/float64 difference: {worst:.0%} of the tolerance)",
        flush=True,
    )

    dim = 128
    print(
        f"embedding reduced (forward+backward) at D={dim} float32 (median; "
        f"4*rows*D*4 bytes: a, b read, both gradients written; copy: the same bytes):"
    )
    for rows in (4096, 16384) if self_test else (65536, 262144, 10**6):
        fused, copy = device.embedding_bandwidth(rows, dim)
        moved = 16 * rows * dim
        print(
            f"  rows={rows:>9,d}  fused {fused * 1e3:8.3f} ms {moved / fused / 1e9:8.1f} GB/s"
            f"  copy {copy * 1e3:8.3f} ms {moved / copy / 1e9:8.1f} GB/s  "
            f"{copy / fused:5.0%} of copy",
            flush=True,
        )
    return failures

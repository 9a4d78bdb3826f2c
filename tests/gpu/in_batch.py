"""Steps 7-8 of the GPU check (check_gpu.py): the in-batch all-pairs kernels
against the CPU kernel, and their times."""

import itertools
import math

import numpy as np

from common import (
    IN_BATCH_MARGIN,
    IN_BATCH_POSITIVE_MARGIN,
    REDUCTIONS,
    in_batch_inputs,
    in_batch_reduced_reference,
    relative_error,
    same_bits,
    weight_form,
)

IN_BATCH_ROWS = (0, 1, 2, 37, 300)
IN_BATCH_BLOCK_ROWS = (0, 1, 7)
# Cosine rows whose Σe² would overflow or underflow (issue 18 item 6).
IN_BATCH_COSINE_SCALES = {"float32": (1e19, 1e-20), "float64": (1e300, 1e-300)}


def in_batch_options(distance, weighting, max_block_rows):
    return dict(
        margin=IN_BATCH_MARGIN,
        positive_margin=IN_BATCH_POSITIVE_MARGIN,
        distance=distance,
        pair_weighting=weighting,
        max_block_rows=max_block_rows,
    )


def compare_every_form(device, kernels, labels, e, upstream, options):
    """The device against in_batch_loss_cpu: loss and gradient (twice: the
    same bits), loss alone, gradient alone (the same bits as together).
    Returns (the largest share of the tolerance used, whether the bits agree)."""
    dtype = e.dtype.name
    want_loss, want_grad = kernels.in_batch_loss_cpu(labels, e, upstream, **options)
    loss, grad = device.run_in_batch(labels, e, upstream, options)
    loss_again, grad_again = device.run_in_batch(labels, e, upstream, options)
    loss_only, _ = device.run_in_batch(labels, e, None, options)
    _, grad_only = device.run_in_batch(labels, e, upstream, options, with_loss=False)
    used = max(
        relative_error(loss, want_loss, dtype),
        relative_error(grad, want_grad, dtype),
        relative_error(loss_only, want_loss, dtype),
    )
    same = (
        same_bits(loss, loss_again)
        and same_bits(grad, grad_again)
        and same_bits(grad_only, grad)
        and same_bits(loss_only, loss)
    )
    return used, same


def compare_in_batch(device, kernels, rng):
    """in_batch_loss_cuda against in_batch_loss_cpu in every form
    (compare_every_form). Returns (cases, failures, worst relative_error)."""
    cases = failures = 0
    worst = 0.0
    for index, (distance, weighting, dtype, rows, block) in enumerate(
        itertools.product(
            ("euclidean", "cosine"),
            kernels.PAIR_WEIGHTINGS,
            ("float32", "float64"),
            IN_BATCH_ROWS,
            IN_BATCH_BLOCK_ROWS,
        )
    ):
        dim = (33, 7, 3)[index % 3]
        labels, e = in_batch_inputs(rng, rows, dim, dtype)
        if index % 5 == 4 and rows >= 8:
            e[7, dim // 2] = np.nan  # every loss and gradient row NaN, as on the CPU
        upstream = rng.uniform(-2, 2, rows).astype(dtype)
        options = in_batch_options(distance, weighting, block)
        used, same = compare_every_form(device, kernels, labels, e, upstream, options)
        ok = same and used <= 1
        worst = max(worst, used)
        cases += 1
        failures += not ok
        if not ok:
            print(
                f"  FAIL in-batch {distance:9s} {weighting:8s} {dtype:7s} B={rows} D={dim} "
                f"max_block_rows={block} deterministic={same} tolerance used={used:.0%}",
                flush=True,
            )
    return cases, failures, worst


def compare_in_batch_cosine_scales(device, kernels, rng):
    """Cosine rows at IN_BATCH_COSINE_SCALES, against the CPU kernel: every
    row at the large or at the small scale, or rows at both and at 1 mixed
    (row 1, the duplicate of row 0, at another scale than row 0). The loss is
    scale-free; each gradient row, about 1/scale, is compared multiplied by
    its row's scale. Loss and gradient, loss alone, gradient alone (the same
    bits), and the "sum" reduction. Returns (cases, failures, worst)."""
    cases = failures = 0
    worst = 0.0
    for index, (weighting, dtype, rows, block, mix) in enumerate(
        itertools.product(
            kernels.PAIR_WEIGHTINGS,
            ("float32", "float64"),
            (2, 37, 300),
            (0, 7),
            ("large", "small", "mixed"),
        )
    ):
        dim = (33, 7, 3)[index % 3]
        labels, e = in_batch_inputs(rng, rows, dim, dtype)
        large, small = IN_BATCH_COSINE_SCALES[dtype]
        row_scale = {
            "large": np.full(rows, large),
            "small": np.full(rows, small),
            "mixed": np.resize([large, small, 1.0], rows),
        }[mix]
        e = (e.astype(np.float64) * row_scale[:, None]).astype(dtype)
        upstream = rng.uniform(-2, 2, rows).astype(dtype)
        options = in_batch_options("cosine", weighting, block)
        want_loss, want_grad = kernels.in_batch_loss_cpu(labels, e, upstream, **options)
        loss, grad = device.run_in_batch(labels, e, upstream, options)
        loss_only, _ = device.run_in_batch(labels, e, None, options)
        _, grad_only = device.run_in_batch(labels, e, upstream, options, with_loss=False)
        reduced = device.run_in_batch_reduced(labels, e, None, "sum", options)
        want_reduced = in_batch_reduced_reference(kernels, labels, e, None, "sum", options)

        def at_scale(g):
            return None if g is None else g.astype(np.float64) * row_scale[:, None]

        used = max(
            relative_error(loss, want_loss, dtype),
            relative_error(loss_only, want_loss, dtype),
            relative_error(at_scale(grad), at_scale(want_grad), dtype),
            relative_error(reduced[0], want_reduced[0], dtype),
            relative_error(at_scale(reduced[1]), at_scale(want_reduced[1]), dtype),
        )
        finite = (
            np.all(np.isfinite(want_loss))
            and np.all(np.isfinite(want_grad))
            and np.all(np.isfinite(loss))
            and np.all(np.isfinite(grad))
        )
        same = same_bits(grad_only, grad) and same_bits(loss_only, loss)
        ok = same and finite and used <= 1
        worst = max(worst, used)
        cases += 1
        failures += not ok
        if not ok:
            print(
                f"  FAIL in-batch cosine scaled rows ({mix}) {weighting:8s} {dtype:7s} B={rows} "
                f"D={dim} max_block_rows={block} finite={finite} deterministic={same} "
                f"tolerance used={used:.0%}",
                flush=True,
            )
    return cases, failures, worst


def compare_in_batch_reduced(device, kernels, rng):
    """in_batch_loss_reduced_cuda against in_batch_reduced_reference for every
    reduction and weight form; reduction_scale exact unless it divides by a
    sum of per-row weights (added in another order). Returns (cases,
    failures, worst relative_error)."""
    cases = failures = 0
    worst = 0.0
    for index, (distance, weighting, dtype, rows) in enumerate(
        itertools.product(
            ("euclidean", "cosine"), kernels.PAIR_WEIGHTINGS, ("float32", "float64"), IN_BATCH_ROWS
        )
    ):
        dim = (33, 7)[index % 2]
        labels, e = in_batch_inputs(rng, rows, dim, dtype)
        options = in_batch_options(distance, weighting, (0, 7)[index % 2])
        vector = rng.uniform(0, 2, rows).astype(dtype)
        # The loss's rounding scales with its terms, not with their sum.
        terms = np.abs(kernels.in_batch_loss_cpu(labels, e, None, **options)[0]).astype(np.float64)
        for weights in (None, np.asarray(0.7, dtype), vector):
            for reduction in REDUCTIONS:
                want = in_batch_reduced_reference(kernels, labels, e, weights, reduction, options)
                got = device.run_in_batch_reduced(labels, e, weights, reduction, options)
                again = device.run_in_batch_reduced(labels, e, weights, reduction, options)
                row_weights = np.broadcast_to(
                    np.abs(np.float64(1 if weights is None else weights)), (rows,)
                )
                magnitude = float(np.sum(terms * row_weights) * abs(want[2]))
                used = max(
                    relative_error(got[0], want[0], dtype, magnitude),
                    relative_error(got[1], want[1], dtype),
                )
                summed = reduction == "weighted_mean" and weights is vector
                same = (
                    same_bits(got[0], again[0])
                    and same_bits(got[1], again[1])
                    and got[2] == again[2]
                )
                ok = (
                    same
                    and used <= 1
                    and (
                        math.isclose(got[2], want[2], rel_tol=1e-13)
                        if summed
                        else got[2] == want[2]
                    )
                )
                worst = max(worst, used)
                cases += 1
                failures += not ok
                if not ok:
                    kind = weight_form(weights)
                    print(
                        f"  FAIL reduced in-batch {distance:9s} {weighting:8s} {reduction:13s} "
                        f"weights={kind:6s} {dtype:7s} B={rows} D={dim} deterministic={same} "
                        f"scale={got[2]!r} want {want[2]!r} tolerance used={used:.0%}",
                        flush=True,
                    )
    return cases, failures, worst


def compare_in_batch_anchors(device, kernels, rng):
    """Anchor slices (issue 20: the other rows are partners only, as the
    references and the other replicas' rows are; rows past `used` take no
    part) against the CPU kernel: loss
    and gradient, gradient alone (the same bits), and the weighted mean with
    one weight per anchor. Returns (cases, failures, worst)."""
    cases = failures = 0
    worst = 0.0
    for index, (distance, weighting, dtype, (rows, anchors), block) in enumerate(
        itertools.product(
            ("euclidean", "cosine"),
            kernels.PAIR_WEIGHTINGS,
            ("float32", "float64"),
            (
                (37, (0, 1)),
                (37, (30, 37)),
                (300, (110, 190)),
                (300, (0, 0)),
                (300, (0, 300)),
                (300, (110, 190, 250, 250)),  # rows from 250 on unused (a memory's empty rows)
                (300, (110, 190, 220, 250)),  # and rows 220..249 without gradient
            ),
            (0, 7),
        )
    ):
        dim = (33, 7, 3)[index % 3]
        labels, e = in_batch_inputs(rng, rows, dim, dtype)
        upstream = rng.uniform(-2, 2, rows).astype(dtype)
        upstream[: anchors[0]] = np.nan  # a partner's upstream is never read
        options = dict(in_batch_options(distance, weighting, block), anchors=anchors)
        want_loss, want_grad = kernels.in_batch_loss_cpu(labels, e, upstream, **options)
        loss, grad = device.run_in_batch(labels, e, upstream, options)
        _, grad_only = device.run_in_batch(labels, e, upstream, options, with_loss=False)
        weights = rng.uniform(0, 2, anchors[1] - anchors[0]).astype(dtype)
        want_reduced = in_batch_reduced_reference(
            kernels, labels, e, weights, "weighted_mean", options
        )
        reduced = device.run_in_batch_reduced(labels, e, weights, "weighted_mean", options)
        used = max(
            relative_error(loss, want_loss, dtype),
            relative_error(grad, want_grad, dtype),
            relative_error(reduced[0], want_reduced[0], dtype),
            relative_error(reduced[1], want_reduced[1], dtype),
        )
        same = same_bits(grad_only, grad)
        ok = same and used <= 1 and math.isclose(reduced[2], want_reduced[2], rel_tol=1e-13)
        worst = max(worst, used)
        cases += 1
        failures += not ok
        if not ok:
            print(
                f"  FAIL in-batch anchors {anchors} {distance:9s} {weighting:8s} {dtype:7s} "
                f"B={rows} D={dim} max_block_rows={block} deterministic={same} "
                f"tolerance used={used:.0%}",
                flush=True,
            )
    return cases, failures, worst


def compare_in_batch_miners(device, kernels, rng):
    """The miners (issue 21) against the CPU kernel, every weighting: loss and
    gradient twice (the same bits), loss alone and gradient alone (the same
    bits as together), the mean-reduced op, and anchor slices. Rows without
    duplicates: the devices' distances differ in their last bits, and a pair
    that ties another within them may be chosen on one and not the other, so
    float32 stays at B <= 37 (float64 also 300). Returns (cases, failures,
    worst)."""
    cases = failures = 0
    worst = 0.0
    for index, (miner, distance, weighting, dtype, rows) in enumerate(
        itertools.product(
            kernels.MINERS,
            ("euclidean", "cosine"),
            kernels.PAIR_WEIGHTINGS,
            ("float32", "float64"),
            (2, 37, 300),
        )
    ):
        if dtype == "float32" and rows > 37:
            continue
        dim = (33, 7)[index % 2]
        labels = rng.integers(0, max(1, rows // 4), rows).astype(np.int64)
        e = (rng.standard_normal((rows, dim)) / np.sqrt(dim)).astype(dtype)
        upstream = rng.uniform(-2, 2, rows).astype(dtype)
        options = dict(
            in_batch_options(distance, weighting, (0, 7)[index % 2]),
            miner=miner,
            miner_epsilon=0.05,
        )
        if index % 3 == 2:
            options["anchors"] = (rows // 4, rows - rows // 4)
        used, same = compare_every_form(device, kernels, labels, e, upstream, options)
        want_reduced = in_batch_reduced_reference(kernels, labels, e, None, "mean", options)
        reduced = device.run_in_batch_reduced(labels, e, None, "mean", options)
        used = max(
            used,
            relative_error(reduced[0], want_reduced[0], dtype),
            relative_error(reduced[1], want_reduced[1], dtype),
        )
        ok = same and used <= 1
        worst = max(worst, used)
        cases += 1
        failures += not ok
        if not ok:
            print(
                f"  FAIL in-batch miner={miner} {distance:9s} {weighting:8s} {dtype:7s} B={rows} "
                f"D={dim} anchors={options.get('anchors')} deterministic={same} "
                f"tolerance used={used:.0%}",
                flush=True,
            )
    return cases, failures, worst


def check_kernels(device, kernels, rng):
    """Steps 7-8: in_batch_loss_cuda and in_batch_loss_reduced_cuda against the
    CPU kernel, cosine rows at extreme scales, anchor slices, the miners, and
    the times at B=4096, D=128. Returns the failures."""
    failures = 0
    cases, found, worst = compare_in_batch(device, kernels, rng)
    failures += found
    print(
        f"{cases} in-batch cases compared (worst difference: {worst:.0%} of the tolerance)",
        flush=True,
    )
    cases, found, worst = compare_in_batch_cosine_scales(device, kernels, rng)
    failures += found
    print(
        f"{cases} in-batch cosine cases at extreme row scales compared (worst difference: "
        f"{worst:.0%} of the tolerance)",
        flush=True,
    )
    cases, found, worst = compare_in_batch_reduced(device, kernels, rng)
    failures += found
    print(
        f"{cases} reduced in-batch cases compared (worst difference: {worst:.0%} of the tolerance)",
        flush=True,
    )
    cases, found, worst = compare_in_batch_anchors(device, kernels, rng)
    failures += found
    print(
        f"{cases} in-batch anchor-slice cases compared (worst difference: {worst:.0%} of the "
        "tolerance)",
        flush=True,
    )
    cases, found, worst = compare_in_batch_miners(device, kernels, rng)
    failures += found
    print(
        f"{cases} in-batch miner cases compared (worst difference: {worst:.0%} of the tolerance)",
        flush=True,
    )
    rows, dim = 4096, 128
    flops = 2 * rows * rows * dim  # one B×B×D product
    print(
        f"in-batch at B={rows:,} D={dim} float32 (median; the GPU without symmetry runs "
        f"one B×B×D product for the loss, two with the gradient):"
    )
    for name, seconds in device.in_batch_seconds(rows, dim).items():
        products = 2 if name == "loss+grad" else 1
        print(
            f"  {name:10s} {seconds * 1e3:9.3f} ms  "
            f"{products * flops / seconds / 1e12:7.2f} TFLOP/s in its products",
            flush=True,
        )
    return failures

"""Steps 1-4 of the GPU check (check_gpu.py): the distance kernels, the loss of
precomputed distances, against the CPU kernel, and their bandwidth."""

import numpy as np

from common import (
    DISTANCE_DTYPES,
    LABEL_DTYPES,
    MARGIN,
    REDUCED_TOLERANCE,
    cpu_scale,
    host_inputs,
    numpy_dtype,
    same_bits,
    weight_form,
)


def compare(device, kernels, rng, cases, offsets=(0, 0, 0, 0), similar_label=1):
    failures = 0
    for label_dtype, distance_dtype, n in cases:
        labels, distances = host_inputs(rng, n, label_dtype, distance_dtype)
        want_loss, want_grad = kernels.contrastive_loss_cpu(
            labels, distances, MARGIN, similar_label=similar_label
        )
        loss, grad = device.run(labels, distances, offsets, similar_label)
        ok = same_bits(loss, want_loss) and same_bits(grad, want_grad)
        if label_dtype == "bool":  # the bytes' truth, not their values, counts
            truth = kernels.contrastive_loss_cpu(
                labels != 0, distances, MARGIN, similar_label=similar_label
            )
            ok = ok and same_bits(loss, truth[0]) and same_bits(grad, truth[1])
        failures += not ok
        if not ok or n >= 10**6:
            print(
                f"  {'ok  ' if ok else 'FAIL'} labels={label_dtype:8s} distances="
                f"{distance_dtype:8s} n={n:>11,d} offsets={offsets} "
                f"similar_label={similar_label}",
                flush=True,
            )
    return failures


def compare_reduced(device, kernels, rng, cases):
    """Fused-reduction kernel against the CPU kernel, for every reduction and
    weight form; the gradient must match bit for bit unless the divisor is a
    sum of per-element weights (its summation order differs)."""
    failures = 0
    for label_dtype, distance_dtype, n in cases:
        labels, distances = host_inputs(rng, n, label_dtype, distance_dtype)
        vector = rng.uniform(0, 2, n).astype(numpy_dtype(distance_dtype))
        for weights in (None, np.asarray(0.7, numpy_dtype(distance_dtype)), vector):
            for reduction in ("sum", "mean", "weighted_mean"):
                want = kernels.contrastive_loss_reduced_cpu(
                    labels, distances, weights, MARGIN, reduction
                )
                got = device.run_reduced(labels, distances, weights, reduction)
                again = device.run_reduced(labels, distances, weights, reduction)
                exact = not (reduction == "weighted_mean" and weights is vector)
                tol = REDUCED_TOLERANCE[distance_dtype]
                ok = (
                    same_bits(got[1], again[1])
                    and same_bits(got[0], again[0])
                    and np.allclose(np.float64(got[0]), np.float64(want[0]), rtol=tol, atol=0)
                    and (
                        same_bits(got[1], want[1])
                        if exact
                        else np.allclose(
                            got[1].astype(np.float64),
                            want[1].astype(np.float64),
                            rtol=tol,
                            atol=1e-30,
                        )
                    )
                    and np.isclose(got[2], want[2], rtol=1e-15, atol=0)
                )
                failures += not ok
                if not ok or n >= 10**6:
                    kind = weight_form(weights)
                    print(
                        f"  {'ok  ' if ok else 'FAIL'} reduced {reduction:13s} weights={kind:6s} "
                        f"labels={label_dtype:8s} distances={distance_dtype:8s} n={n:>11,d}",
                        flush=True,
                    )
        gradient = (rng.standard_normal(max(n, 1)) * 3).astype(numpy_dtype(distance_dtype))
        for factor in (1.0, 0.37):
            ok = same_bits(device.scale(gradient, factor), cpu_scale(gradient, factor))
            failures += not ok
            if not ok:
                print(f"  FAIL scale {distance_dtype} n={n} factor={factor}", flush=True)
    return failures


def check_kernels(device, kernels, rng, self_test):
    """Steps 1-4: the loss and gradient kernel bit for bit, aligned and
    misaligned, the fused-reduction and scale kernels, and the bandwidth of
    both at N=1e8 (1e6 with self_test). Returns the failures."""
    big = 10**6 if self_test else 10**8
    small = [0, 1, 3, 17, 1001, 65537, 10**6 + 3]
    cases = [(y, d, n) for y in LABEL_DTYPES for d in DISTANCE_DTYPES for n in small]
    cases += [
        ("float32", "float32", big),
        ("int32", "float16", big),
        ("float64", "float64", big),
        ("bool", "bfloat16", big),
    ]
    failures = compare(device, kernels, rng, cases)
    print(f"{len(cases)} aligned cases compared", flush=True)
    flipped = [case for case in cases if case[2] <= 1001]
    failures += compare(device, kernels, rng, flipped, similar_label=0)
    print(f"{len(flipped)} aligned cases compared with similar_label=0", flush=True)

    misaligned = [(y, d, 10**4 + 7) for y in ("bool", "float32", "int64") for d in DISTANCE_DTYPES]
    for offsets in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 3), (3, 1, 2, 1)]:
        failures += compare(device, kernels, rng, misaligned, offsets)
    print(f"{len(misaligned) * 5} misaligned cases compared", flush=True)

    reduced_cases = [
        (y, d, n)
        for y, d in [
            ("float32", "float32"),
            ("int32", "float16"),
            ("bool", "bfloat16"),
            ("float64", "float64"),
        ]
        for n in (0, 1, 17, 10**6 + 3)
    ]
    reduced_cases.append(("float32", "float32", big))
    failures += compare_reduced(device, kernels, rng, reduced_cases)
    print(f"{len(reduced_cases) * 9} reduced cases compared", flush=True)

    n = big
    times, copy = device.bandwidth(n)
    # float32 bytes each must move: labels and distances read, then loss
    # and grad written (loss+grad) or grad written (reduced).
    moved = {
        "fused loss+grad": 16 * n,
        "fused reduced": 12 * n,
        "unfused loss+grad": 16 * n,
        "unfused reduced": 12 * n,
    }
    print(f"bandwidth at N={n:,} float32 (median; copy: 16N bytes read+written):")
    print(f"  same-bytes copy      {copy * 1e3:8.3f} ms  {16 * n / copy / 1e9:8.1f} GB/s")
    for name, seconds in times.items():
        gbps = moved[name] / seconds / 1e9
        print(
            f"  {name:20s} {seconds * 1e3:8.3f} ms  {gbps:8.1f} GB/s  "
            f"{gbps / (16 * n / copy / 1e9):5.0%} of copy"
        )
    for kind in ("loss+grad", "reduced"):
        print(
            f"  unfused/fused time, {kind}: "
            f"{times['unfused ' + kind] / times['fused ' + kind]:.1f}x"
        )
    return failures

"""Step 10 of the GPU check (check_gpu.py): fused_contrastive.jax, the JAX
front end, on the GPU through the CUDA typed-FFI handlers of the module this
check built (cc/ffi/gpu.cc), against the same functions on JAX's CPU (the
host handlers), everything under jax.jit: each loss's values and gradients
(jax.grad of the loss weighted by a random upstream), float32 without
jax_enable_x64 (the labels' int32 halves) and float64 with it. The losses on
distances match bit for bit (as in step 1); the losses from pair embeddings,
a and b apart and stacked [..., 2, D], within EMBEDDING_ULPS (step 5); the
in-batch losses, every distance, weighting and miner, some with references,
within IN_BATCH_TOLERANCE (step 7). Needs only JAX (a CUDA build of jaxlib on
the GPU machine): TensorFlow plays no part.
--self-test runs the "GPU" side on JAX's CPU too."""

import contextlib
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np

from common import (
    IN_BATCH_MARGIN,
    IN_BATCH_POSITIVE_MARGIN,
    MARGIN,
    compute_dtype,
    host_embeddings,
    host_inputs,
    in_batch_inputs,
    relative_error,
    rounding_scales,
    same_bits,
    tolerance_used,
)

ROOT = Path(__file__).resolve().parents[2]
DISTANCE_SIZES = [0, 1, 1001, 1_000_000]
PAIR_SHAPES = [(0, 8), (1, 1), (37, 5), (1001, 128)]
IN_BATCH_ROWS = [0, 1, 2, 37, 300]


def front_end(kernels):
    """fused_contrastive.jax on the module `kernels` (this check's build): the
    package from this checkout where none is installed, with its _kernels
    replaced before the front end registers the handlers."""
    if importlib.util.find_spec("fused_contrastive") is None:
        sys.path.insert(0, str(ROOT / "python"))
    import fused_contrastive

    sys.modules["fused_contrastive._kernels"] = kernels
    fused_contrastive._kernels = kernels
    import fused_contrastive.jax as fcj

    return fcj


def x64(enabled):
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    return enable(enabled) if enabled else contextlib.nullcontext()


def on_both(jax, fn, args, devices):
    """fn(*args) and the gradients of sum(fn(*args) * upstream) in the float
    args, jitted on each device: {device: (loss, grads)} as NumPy arrays."""
    # Labels (the first argument, and integer ones anywhere) carry no gradient.
    floats = tuple(i for i, x in enumerate(args) if i > 0 and np.issubdtype(x.dtype, np.floating))
    upstream = np.random.default_rng(0).uniform(0.5, 2.0, fn(*args).shape)

    def weighted(*xs):
        loss = fn(*xs)
        return (loss * upstream.astype(loss.dtype)).sum(), loss

    step = jax.jit(jax.value_and_grad(weighted, floats, has_aux=True))
    out = {}
    for device in devices:
        placed = [jax.device_put(x, device) for x in args]
        (_, loss), grads = step(*placed)
        out[device.platform] = (np.asarray(loss), [np.asarray(g) for g in grads])
    return out


def compare_distances(jax, fcj, rng, devices):
    failures = cases = 0
    for index, (size, label_dtype, dtype) in enumerate(
        itertools.product(DISTANCE_SIZES, ("bool", "int32", "float32"), ("float32", "float16"))
    ):
        labels, d = host_inputs(rng, size, label_dtype, dtype)
        similar_label = index % 2

        def fn(y, x, s=similar_label):
            return fcj.contrastive_loss(y, x, MARGIN, s)

        results = on_both(jax, fn, (labels, d), devices)
        (want, (want_grad,)), (got, (grad,)) = (results[d.platform] for d in devices)
        cases += 1
        if not (same_bits(got, want) and same_bits(grad, want_grad)):
            failures += 1
            print(f"  JAX distances mismatch: n={size} labels {label_dtype} {dtype}", flush=True)
    return cases, failures, 0.0


def compare_pairs(jax, fcj, rng, devices, dtype):
    """Each case twice: a and b apart (contrastive_loss_from_embeddings), and
    stacked [..., 2, D] (contrastive_loss_from_pairs, the stacked handlers)."""
    failures = cases = 0
    worst = 0.0
    for shape, distance in itertools.product(PAIR_SHAPES, ("euclidean", "cosine", "manhattan")):
        labels, a, b = host_embeddings(rng, shape, "int32", dtype, distance)

        def apart(y, x, z, k=distance):
            return fcj.contrastive_loss_from_embeddings(y, x, z, MARGIN, k)

        def stacked(y, pairs, k=distance):
            return fcj.contrastive_loss_from_pairs(y, pairs, MARGIN, k)

        compute = compute_dtype(dtype)
        loss_scale, *grad_scales = rounding_scales(labels, a, b, distance, 1)
        upstream = np.random.default_rng(0).uniform(0.5, 2.0, shape[:-1])[..., None]
        for layout, fn, args in (
            ("apart", apart, (labels, a, b)),
            ("stacked", stacked, (labels, np.stack([a, b], axis=-2))),
        ):
            results = on_both(jax, fn, args, devices)
            (want, want_grads), (got, grads) = (results[d.platform] for d in devices)
            if layout == "stacked":
                want_grads, grads = (
                    [g[0][..., 0, :], g[0][..., 1, :]] for g in (want_grads, grads)
                )
            used = [tolerance_used(got, want, compute, dtype, loss_scale)] + [
                tolerance_used(g, w, compute, dtype, upstream * s)
                for g, w, s in zip(grads, want_grads, grad_scales)
            ]
            cases += 1
            worst = max(worst, *used)
            if max(used) > 1:
                failures += 1
                print(
                    f"  JAX pairs mismatch: {shape} {distance} {dtype} {layout}: {max(used):.3g}",
                    flush=True,
                )
    return cases, failures, worst


def compare_in_batch(jax, fcj, rng, devices, dtype):
    failures = cases = 0
    worst = 0.0
    settings = itertools.product(
        IN_BATCH_ROWS,
        ("euclidean", "cosine"),
        ("uniform", "balanced", "active"),
        (None, "batch_hard", "multi_similarity"),
    )
    for index, (rows, distance, weighting, miner) in enumerate(settings):
        labels, e = in_batch_inputs(rng, rows, (33, 7, 3)[index % 3], dtype)
        if miner is not None:  # rows without ties: the devices' last bits pick alike
            e = e + 1e-3 * np.arange(rows, dtype=e.dtype)[:, None]
        options = dict(
            margin=IN_BATCH_MARGIN,
            positive_margin=IN_BATCH_POSITIVE_MARGIN,
            distance=distance,
            pair_weighting=weighting,
            miner=miner,
        )

        if index % 4 == 3:  # the first rows anchors, the rest references
            anchors = rows // 2
            args = (labels[:anchors], e[:anchors], labels[anchors:], e[anchors:])
        else:
            args = (labels, e)

        def fn(y, x, *references, o=options):
            if references:
                references = dict(zip(("reference_labels", "reference_embeddings"), references))
            return fcj.in_batch_contrastive_loss(y, x, **(references or {}), **o)

        results = on_both(jax, fn, args, devices)
        (want, want_grads), (got, grads) = (results[d.platform] for d in devices)
        used = max(
            relative_error(got, want, dtype),
            *(relative_error(g, w, dtype) for g, w in zip(grads, want_grads)),
        )
        cases += 1
        worst = max(worst, used)
        if used > 1:
            failures += 1
            print(
                f"  JAX in-batch mismatch: B={rows} {distance} {weighting} miner={miner} "
                f"{dtype}: {used:.3g}",
                flush=True,
            )
    return cases, failures, worst


def check_jax(kernels, self_test):
    """Step 10; returns the number of mismatches (a missing CUDA handler on a
    GPU run counts as one)."""
    print("step 10: fused_contrastive.jax through the typed-FFI handlers", flush=True)
    if importlib.util.find_spec("jax") is None:
        print("  not run: JAX is not installed (pip install jax; jax[cuda13] on the GPU)")
        return 0
    if not hasattr(kernels, "FFI_TARGETS"):
        print("  not run: this module has no typed-FFI handlers (built with FC_JAX=OFF)")
        return 0
    import jax

    platform = "cpu" if self_test else "gpu"
    try:
        devices = [jax.devices("cpu")[0], jax.devices(platform)[0]]
    except RuntimeError as error:
        print(f"  FAILED: JAX has no {platform} device: {error}")
        return 1
    if not self_test and not kernels.FFI_CUDA_TARGETS:
        print("  FAILED: the module has no CUDA handlers")
        return 1
    if self_test:  # the same platform twice: still one comparison per case
        devices = [devices[0], devices[0]]
    fcj = front_end(kernels)
    rng = np.random.default_rng(10)
    failures = 0
    for name, compare, dtypes in (
        ("distances", lambda d: compare_distances(jax, fcj, rng, devices), ("float32",)),
        ("pairs", lambda d: compare_pairs(jax, fcj, rng, devices, d), ("float32", "float64")),
        ("in-batch", lambda d: compare_in_batch(jax, fcj, rng, devices, d), ("float32", "float64")),
    ):
        for dtype in dtypes:
            with x64(dtype == "float64"):
                cases, failed, worst = compare(dtype)
            failures += failed
            print(
                f"  {name} {dtype}: {cases} cases on {devices[1].platform} against the CPU, "
                f"{failed} mismatches (worst: {worst:.0%} of the tolerance)",
                flush=True,
            )
    return failures

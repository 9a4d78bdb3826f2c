"""Step 9 of the GPU check (check_gpu.py): the TF ops themselves, where
TensorFlow and fused_contrastive import. TensorFlow is imported by check_tf_ops
only, which hands it to the functions after it: steps 1-8 must run where it is
absent (the GPU machines this check borrows have none), and this module must
import there.
"""

import functools
import itertools
import math

import numpy as np

from common import (
    DISTANCE_KINDS,
    MARGIN,
    REDUCED_TOLERANCE,
    host_embeddings,
    host_inputs,
    in_batch_inputs,
    median_seconds,
    relative_error,
    rounding_scales,
    same_bits,
    tolerance_used,
)
from in_batch import in_batch_options


def check_tf_ops(self_test):
    """Step 9; returns its failures (0 where TensorFlow or fused_contrastive
    cannot be imported: the part is then not run). With self_test, /CPU:0
    stands in for the GPU at small sizes."""
    try:
        import tensorflow as tf
        import fused_contrastive as fc
    except ImportError as error:
        print(
            f"TF-op part not run (not a failure): TensorFlow or fused_contrastive is not "
            f"importable here ({error})",
            flush=True,
        )
        return 0
    from fused_contrastive import _library
    from tensorflow.python.framework import kernels

    info = fc.build_info()
    gpus = [] if self_test else tf.config.list_physical_devices("GPU")
    device = "/CPU:0" if self_test else "/GPU:0"
    if self_test:
        label = "CPU:0 (self-test stand-in for the GPU)"
    else:
        name = (
            tf.config.experimental.get_device_details(gpus[0]).get("device_name", "?")
            if gpus
            else "none seen by TensorFlow"
        )
        label = f"GPU:0 ({name})"
    print(
        f"TF ops (TensorFlow {tf.__version__}) on {label} against /CPU:0; fused_contrastive "
        f"build_info: {info}",
        flush=True,
    )
    problem = None
    if fc.using_reference():
        problem = (
            f"fused_contrastive runs its pure-TF fallback ({fc.USE_REFERENCE_ENV} is "
            "set): there are no ops to check"
        )
    elif not self_test and not info.get("cuda"):
        problem = (
            f"the installed fused_contrastive has CPU kernels only (build_info: "
            f"cuda={info.get('cuda')!r}, cuda_compiler={info.get('cuda_compiler')!r}, "
            f"library={info.get('library')!r}); reinstall it with "
            "FUSED_CONTRASTIVE_CUDA=on pip install ."
        )
    elif not gpus and not self_test:
        problem = "TensorFlow sees no GPU"
    if problem:
        print(f"TF-op summary: device={label} ops=FAIL ({problem})", flush=True)
        return 1

    device_type = tf.DeviceSpec.from_string(device).device_type
    failures = 0
    names = sorted(value for key, value in vars(_library).items() if key.endswith("OP_NAME"))
    for name in names:
        types = {
            kernel.device_type for kernel in kernels.get_registered_kernels_for_op(name).kernel
        }
        if device_type not in types:
            failures += 1
            print(
                f"  FAIL {name} has no {device_type} kernel (registered: {sorted(types)})",
                flush=True,
            )
    print(f"{len(names)} TF ops checked for a registered {device_type} kernel", flush=True)

    # An op without a kernel on the device then raises instead of running on
    # the CPU between two copies.
    tf.config.set_soft_device_placement(False)
    cases, found, worst = compare_tf_ops(tf, device, tf_op_cases(fc, np.random.default_rng(9)))
    failures += found
    print(
        f"{cases} TF-op cases compared, {device} against /CPU:0 (worst difference: "
        f"{worst:.0%} of the tolerance)",
        flush=True,
    )

    n = 10**6 if self_test else 10**8
    rows, dim = (512 if self_test else 4096), 128
    repeats = 10 if self_test else 20
    fused = functools.partial(fc.contrastive_loss, margin=MARGIN)
    reference = functools.partial(fc.contrastive_loss_reference, margin=MARGIN)
    steps = {
        "fused": (fused, False),
        "fused reduced": (fc.ContrastiveLoss(margin=MARGIN), False),
        "plain": (reference, False),
        "XLA": (reference, True),
        "fused XLA": (fused, True),
    }
    times, found = time_tf_steps(
        tf, device, steps, host_inputs(np.random.default_rng(0), n, "float32", "float32"), repeats
    )
    failures += found
    options = in_batch_options("euclidean", "uniform", None)
    in_batch = functools.partial(fc.in_batch_contrastive_loss, **options)
    del options["max_block_rows"]  # the reference has no blocks
    in_batch_reference = functools.partial(fc.in_batch_contrastive_loss_reference, **options)
    in_batch_steps = {
        "fused": (in_batch, False),
        "plain": (in_batch_reference, False),
        "XLA": (in_batch_reference, True),
    }
    in_batch_times, found = time_tf_steps(
        tf,
        device,
        in_batch_steps,
        in_batch_inputs(np.random.default_rng(0), rows, dim, "float32"),
        repeats,
    )
    failures += found
    print(
        f"TF-op summary: device={label} ops={'FAIL' if failures else 'PASS'} "
        f"N=1e{round(math.log10(n))} fwd+bwd {format_tf_times(times)}; in-batch B={rows} "
        f"D={dim} fwd+bwd {format_tf_times(in_batch_times)} (float32, median of {repeats}; "
        f"(x): time / fused time)",
        flush=True,
    )
    return failures


def tf_op_cases(fc, rng):
    """The TF-op comparisons, as (description, loss_fn, labels, inputs,
    upstream, used): loss_fn(labels, *inputs) is differentiated with respect
    to `inputs` with `upstream` as the loss's gradient, and used(got, want)
    is the fraction of its tolerance that [loss, *gradients] on the device
    use against /CPU:0's. The functions get a random upstream gradient; the
    Keras classes (their fused reductions) a scalar that is not 1, so their
    backward kernel multiplies. Labels are float32 or int64: TensorFlow keeps
    int32 tensors of a GPU in host memory."""

    def exact(got, want):
        return 0.0 if all(map(same_bits, got, want)) else np.inf

    def reduced(dtype):  # the divisor is the same: the gradient bit for bit
        return lambda got, want: (
            np.inf
            if not same_bits(got[1], want[1])
            else relative_error(got[0], want[0], dtype, tolerances=REDUCED_TOLERANCE)
        )

    def embeddings(dtype, scales):
        return lambda got, want: max(
            tolerance_used(g, w, dtype, dtype, scale) for g, w, scale in zip(got, want, scales)
        )

    def in_batch(dtype):
        return lambda got, want: max(relative_error(g, w, dtype) for g, w in zip(got, want))

    scalar_upstream = 0.37

    def in_batch_cases(case, options, labels, e):
        """The in-batch function and Keras class, with their gradients."""
        rows, dtype = len(labels), e.dtype.name
        yield (
            f"in_batch_contrastive_loss {case}",
            functools.partial(fc.in_batch_contrastive_loss, **options),
            labels,
            [e],
            rng.uniform(-2, 2, rows).astype(dtype),
            in_batch(dtype),
        )
        yield (
            f"InBatchContrastiveLoss {case}",
            fc.InBatchContrastiveLoss(**options, dtype=dtype),
            labels,
            [e],
            np.asarray(scalar_upstream, dtype),
            in_batch(dtype),
        )

    for dtype in ("float32", "float64"):
        label_dtype = "float32" if dtype == "float32" else "int64"
        labels, distances = host_inputs(rng, 10**6 + 3, label_dtype, dtype)
        yield (
            f"contrastive_loss {dtype}",
            functools.partial(fc.contrastive_loss, margin=MARGIN),
            labels,
            [distances],
            rng.standard_normal(distances.shape).astype(dtype),
            exact,
        )
        yield (
            f"ContrastiveLoss {dtype}",
            fc.ContrastiveLoss(margin=MARGIN, dtype=dtype),
            labels,
            [distances],
            np.asarray(scalar_upstream, dtype),
            reduced(dtype),
        )

        for distance, shape in itertools.product(DISTANCE_KINDS, [(37, 3), (1001, 128)]):
            rows = shape[0]
            labels, a, b = host_embeddings(rng, shape, label_dtype, dtype, distance)
            loss_scale, *grad_scales = rounding_scales(labels, a, b, distance, 1)
            upstream = rng.uniform(-2, 2, rows).astype(dtype)
            u = np.abs(upstream.astype(np.float64))[:, None]
            case = f"{distance} {dtype} shape={shape}"
            yield (
                f"contrastive_loss_from_embeddings {case}",
                functools.partial(
                    fc.contrastive_loss_from_embeddings, margin=MARGIN, distance=distance
                ),
                labels,
                [a, b],
                upstream,
                embeddings(dtype, [loss_scale] + [u * scale for scale in grad_scales]),
            )
            # Reduced to the mean: each row's share of the loss and gradients
            # (and so of their rounding) is 1/rows of it.
            yield (
                f"ContrastiveLoss(distance) {case}",
                fc.ContrastiveLoss(margin=MARGIN, distance=distance, dtype=dtype),
                labels,
                [np.stack([a, b], -2)],
                np.asarray(scalar_upstream, dtype),
                embeddings(
                    dtype,
                    [np.sum(loss_scale) / rows, scalar_upstream / rows * np.stack(grad_scales, -2)],
                ),
            )

        for distance, weighting, (rows, dim) in itertools.product(
            ("euclidean", "cosine"), fc._inputs.PAIR_WEIGHTINGS, [(300, 33), (1024, 128)]
        ):
            labels, e = in_batch_inputs(rng, rows, dim, dtype)
            options = in_batch_options(distance, weighting, None)
            case = f"{distance} {weighting} {dtype} B={rows} D={dim}"
            yield from in_batch_cases(case, options, labels, e)
        # The miners on rows without ties (see in_batch.compare_in_batch_miners).
        for miner, distance in itertools.product(fc._inputs.MINERS, ("euclidean", "cosine")):
            rows, dim = 300 if dtype == "float64" else 37, 33
            labels = rng.integers(0, rows // 4, rows)
            e = (rng.standard_normal((rows, dim)) / np.sqrt(dim)).astype(dtype)
            options = dict(in_batch_options(distance, "active", None), miner=miner)
            case = f"miner={miner} {distance} {dtype} B={rows} D={dim}"
            yield from in_batch_cases(case, options, labels, e)


def tf_loss_and_grads(tf, device, loss_fn, labels, inputs, upstream):
    """loss_fn(labels, *inputs) and its gradients with respect to `inputs`,
    every op on `device`, as NumPy arrays; and whether every output tensor
    is on `device`."""
    with tf.device(device):
        # Copied to the device first, so that the ops read only its memory.
        labels, upstream, *inputs = (tf.identity(x) for x in (labels, upstream, *inputs))
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = loss_fn(labels, *inputs)
        grads = tape.gradient(loss, inputs, output_gradients=upstream)
    outputs = [loss, *grads]
    wanted = tf.DeviceSpec.from_string(device)
    placed = all(
        (spec.device_type, spec.device_index) == (wanted.device_type, wanted.device_index)
        for spec in (tf.DeviceSpec.from_string(x.device) for x in outputs)
    )
    return [x.numpy() for x in outputs], placed


def compare_tf_ops(tf, device, cases):
    """Each of tf_op_cases on `device` against /CPU:0. Returns (cases,
    failures, worst fraction of a tolerance used)."""
    count = failures = 0
    worst = 0.0
    for description, loss_fn, labels, inputs, upstream, used in cases:
        try:
            got, placed = tf_loss_and_grads(tf, device, loss_fn, labels, inputs, upstream)
            want, _ = tf_loss_and_grads(tf, "/CPU:0", loss_fn, labels, inputs, upstream)
            fraction = used(got, want)
            result = f"outputs on {device}={placed} tolerance used={fraction:.0%}"
        except tf.errors.OpError as raised:  # no kernel on the device, among others
            placed, fraction = False, np.inf
            result = f"raised {type(raised).__name__}: {raised.message.splitlines()[0]}"
        ok = placed and fraction <= 1
        worst = max(worst, fraction)
        count += 1
        failures += not ok
        if not ok:
            print(f"  FAIL TF {description}: {result}", flush=True)
    return count, failures, worst


def time_tf_steps(tf, device, steps, host, repeats):
    """Median seconds of forward+backward (the mean loss and its gradient
    with respect to the second of the `host` arrays) for each of `steps`,
    name: (loss_fn, jit_compile), on `device`. Returns ({name: seconds, NaN
    where it raised}, failures)."""
    times, failures = {}, 0
    with tf.device(device):
        labels, x = (tf.identity(array) for array in host)
        for name, (loss_fn, jit_compile) in steps.items():
            step = tf_forward_backward(tf, loss_fn, jit_compile)
            results = []
            # The warm-up call traces (and compiles). Fetching the loss makes
            # TF's device-to-host stream wait for all the work queued on the
            # compute stream, the gradient's included.
            try:
                times[name] = median_seconds(
                    lambda: results.append(step(labels, x)),
                    lambda: results.pop()[0].numpy(),
                    repeats,
                )
            except tf.errors.OpError as raised:
                times[name] = math.nan
                failures += 1
                print(
                    f"  FAIL timing {name} raised {type(raised).__name__}: "
                    f"{raised.message.splitlines()[0]}",
                    flush=True,
                )
    return times, failures


def tf_forward_backward(tf, loss_fn, jit_compile):
    """A tf.function: the mean of loss_fn(labels, x) and its gradient with
    respect to x."""

    @tf.function(jit_compile=jit_compile)
    def step(labels, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(loss_fn(labels, x))
        return loss, tape.gradient(loss, x)

    return step


def format_tf_times(times):
    """'fused 1.23 ms | plain 4.56 ms (3.7x) | ...': each time, and after the
    first its ratio to the first."""
    (name, first), *others = times.items()
    return " | ".join(
        [f"{name} {first * 1e3:.3g} ms"]
        + [f"{other} {seconds * 1e3:.3g} ms ({seconds / first:.1f}x)" for other, seconds in others]
    )

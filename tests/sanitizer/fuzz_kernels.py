"""A bounded fuzz loop over the pybind11 kernel module's NumPy entry points.

    python fuzz_kernels.py MODULE_DIR [--seconds S] [--seed N]

MODULE_DIR holds the `_kernels` extension to test; tests/test_sanitizers.py
builds it with -fsanitize=address,undefined and runs this script with libasan
preloaded, so any out-of-bounds access or undefined behaviour aborts the run.
Valid inputs (every dtype pair, aligned and misaligned views, big-endian and
strided arrays, bool bytes other than 0/1, 0-d and empty shapes, every
reduction and kind of weight) are checked against a float64 NumPy formula;
invalid ones must raise TypeError or ValueError. Case i draws from
default_rng([seed, i]), so a failure printed with its index can be replayed.
The last line reads "fuzz: N cases, F failures"; the exit status is 1 if F > 0.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import ml_dtypes
except ImportError:  # bfloat16 is then simply not fuzzed
    ml_dtypes = None

LABEL_DTYPES = ["bool", "int32", "int64", "float16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "float32", "float64"]
if ml_dtypes is not None:
    LABEL_DTYPES.append("bfloat16")
    DISTANCE_DTYPES.append("bfloat16")
REDUCTIONS = ["sum", "mean", "weighted_mean"]
LAYOUTS = ["aligned", "misaligned", "big_endian", "misaligned_big_endian", "strided", "readonly"]

# (rtol, atol) of an output stored in each distance dtype: rounding to the
# output type, plus float32 arithmetic for every dtype below float64. atol
# covers results that land among the subnormals.
TOLERANCE = {"float16": (2e-3, 1e-7), "bfloat16": (1e-2, 1e-37), "float32": (1e-5, 1e-40),
             "float64": (1e-12, 1e-300)}


def dtype_of(name):
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


class Case:
    """One input set: native arrays, the float64 values the kernel must see
    (labels from their bytes: a bool is true for any nonzero byte), and a
    description to print when it fails."""

    def __init__(self, labels, label_values, distances, margin, similar_label):
        self.labels, self.distances = labels, distances
        self.y = label_values
        self.d = distances.astype(np.float64)
        self.margin, self.similar_label = margin, similar_label
        self.info = [f"labels {labels.dtype}{labels.shape}", f"distances {distances.dtype}",
                     f"margin={margin}", f"similar_label={similar_label}"]


def reference(case):
    """Per-sample loss and gradient in float64, with a bound on the size of
    their terms: under cancellation, rounding errors (1 - y among them) are
    relative to that, not to the result."""
    y = case.y if case.similar_label == 1 else 1 - case.y
    # The kernels compute in float32 below float64 distances, margin included:
    # margin - d cancels, so its rounding shows.
    compute = np.float64 if case.distances.dtype == np.float64 else np.float32
    margin = np.float64(compute(case.margin))
    d, hinge = case.d, np.maximum(margin - case.d, 0)
    loss = y * d * d + (1 - y) * hinge * hinge
    grad = 2 * (y * d - (1 - y) * hinge)
    weight = 1 + np.abs(y) + np.abs(1 - y)
    loss_size = weight * (d * d + hinge * hinge)
    grad_size = 2 * weight * (d + hinge)
    return loss, grad, loss_size, grad_size


def check_close(what, got, want, size, distance_dtype, slack=1.0):
    rtol, atol = TOLERANCE[distance_dtype]
    got = np.asarray(got).astype(np.float64)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape}, want {np.shape(want)}"
    # Past the dtype's largest value (float16 sums do get there) the result is
    # an infinity of the same sign; rounding decides right at the edge.
    largest = float((ml_dtypes.finfo if ml_dtypes else np.finfo)(dtype_of(distance_dtype)).max)
    overflows = np.abs(want) * (1 - slack * rtol) > largest
    borderline = np.abs(want) * (1 + slack * rtol) > largest
    with np.errstate(invalid="ignore"):
        close = np.abs(got - want) <= slack * rtol * (np.abs(want) + size) + atol
    good = np.where(overflows, got == np.copysign(np.inf, want),
                    close | (borderline & np.isinf(got)))
    assert good.all(), (f"{what}: {int((~good).sum())} of {good.size} off, e.g. got "
                        f"{got[~good][:3]} want {np.asarray(want)[~good][:3]}")


def laid_out(rng, a, layout):
    """The values of native array `a` in another memory layout."""
    # ml_dtypes' bfloat16 has no big-endian form (isbuiltin 2: user-defined).
    swappable = a.dtype.isbuiltin == 1 and a.itemsize > 1
    if layout in ("big_endian", "misaligned_big_endian") and swappable:
        a = a.astype(a.dtype.newbyteorder(">"))
    if layout in ("misaligned", "misaligned_big_endian"):
        offset = int(rng.integers(1, a.itemsize)) if a.itemsize > 1 else 1
        # Exactly as many bytes as the view needs, so AddressSanitizer sees
        # any read past its end.
        buffer = np.empty(a.nbytes + offset, np.uint8)
        view = np.ndarray(a.shape, a.dtype, buffer=buffer, offset=offset)
        view[...] = a
        return view
    if layout == "strided" and a.ndim > 0:
        wide = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
    return a


def random_shape(rng):
    kind = rng.integers(10)
    if kind == 0:
        return ()
    if kind == 1:
        return tuple(int(x) for x in rng.integers(0, 3, size=rng.integers(1, 4))) + (0,)
    if kind == 2:  # past one reduction block (32768 elements) of the CPU kernel
        return (int(rng.integers(32_000, 70_000)),)
    return tuple(int(x) for x in rng.integers(1, 9, size=rng.integers(1, 4)))


def random_labels(rng, shape, name):
    """(labels, the float64 values the kernel must read)."""
    if name == "bool":
        raw = np.asarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
        if rng.random() < 0.5:
            raw = np.asarray(np.minimum(raw, 1))
        return raw.view(np.bool_), (raw != 0).astype(np.float64)
    if name in ("int32", "int64"):
        labels = np.asarray(rng.integers(-2, 4, size=shape), name)
    else:
        labels = np.asarray(rng.uniform(-0.5, 1.5, size=shape), dtype_of(name))
    return labels, labels.astype(np.float64)


def random_case(rng):
    shape = random_shape(rng)
    label_name = str(rng.choice(LABEL_DTYPES))
    distance_name = str(rng.choice(DISTANCE_DTYPES))
    labels, values = random_labels(rng, shape, label_name)
    distances = np.asarray(rng.uniform(0, 3, size=shape))
    distances[np.asarray(rng.random(size=shape)) < 0.05] = 0
    margin = float(rng.choice([0.0, 1.0, rng.uniform(0, 3)]))
    return Case(labels, values, distances.astype(dtype_of(distance_name)), margin,
                int(rng.integers(2)))


def run_per_sample(kernels, rng, case):
    layouts = [str(layout) for layout in rng.choice(LAYOUTS, size=2)]
    case.info.append(f"layouts {layouts}")
    loss, grad = kernels.contrastive_loss_cpu(laid_out(rng, case.labels, layouts[0]),
                                              laid_out(rng, case.distances, layouts[1]),
                                              case.margin, similar_label=case.similar_label)
    want_loss, want_grad, loss_size, grad_size = reference(case)
    name = case.distances.dtype.name
    for what, got in (("loss", loss), ("grad", grad)):
        assert got.dtype == case.distances.dtype and got.dtype.isnative, f"{what} dtype {got.dtype}"
    check_close("loss", loss, want_loss, loss_size, name)
    check_close("grad", grad, want_grad, grad_size, name)


def random_weights(rng, case):
    """(sample_weight argument, its float64 values or None)."""
    kind = rng.integers(4)
    dtype = case.distances.dtype
    if kind == 0:
        return None, None
    if kind == 1:
        w = np.asarray(rng.uniform(0, 2), dtype)
        return w, w.astype(np.float64)
    if kind == 2:  # a NumPy scalar, not an array
        w = dtype.type(rng.uniform(0, 2))
        return w, np.float64(w)
    w = np.asarray(rng.uniform(0, 2, size=case.d.shape), dtype)
    if rng.random() < 0.1:
        w[...] = 0  # weighted_mean divides by zero: divide_no_nan gives 0
    return laid_out(rng, w, str(rng.choice(LAYOUTS))), w.astype(np.float64)


def run_reduced(kernels, rng, case):
    weights, w = random_weights(rng, case)
    reduction = str(rng.choice(REDUCTIONS))
    loss_scale = float(rng.choice([1.0, 0.5, rng.uniform(0.1, 2)]))
    layouts = [str(layout) for layout in rng.choice(LAYOUTS, size=2)]
    case.info += [f"layouts {layouts}", f"reduction={reduction}",
                  f"weights {None if w is None else np.shape(w)}", f"loss_scale={loss_scale}"]
    loss, grad, scale = kernels.contrastive_loss_reduced_cpu(
        laid_out(rng, case.labels, layouts[0]), laid_out(rng, case.distances, layouts[1]),
        weights, case.margin, reduction, loss_scale, similar_label=case.similar_label)
    per_sample, per_sample_grad, loss_size, grad_size = reference(case)
    w = np.float64(1) if w is None else w
    divisor = {"sum": 1.0, "mean": float(case.d.size),
               "weighted_mean": float(np.sum(w) if np.ndim(w) else w)}[reduction]
    want_scale = loss_scale / divisor if divisor != 0 else 0.0
    assert abs(scale - want_scale) <= 1e-12 * abs(want_scale), f"scale {scale}, want {want_scale}"
    name = case.distances.dtype.name
    assert loss.dtype == case.distances.dtype and loss.shape == (), f"loss {loss.dtype}{loss.shape}"
    # Sums accumulate float32 chunks: allow a few roundings per term.
    check_close("loss", loss, want_scale * np.sum(w * per_sample),
                abs(want_scale) * np.sum(np.abs(w) * loss_size), name, slack=4)
    check_close("grad", grad, per_sample_grad * w * want_scale,
                grad_size * np.abs(w * want_scale), name, slack=2)


NOT_AN_ARRAY = "incompatible function arguments"


class Unconvertible:
    """An array-like whose conversion fails."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("no array here")


def invalid_calls(kernels):
    """(description, call, exception class, text the message must hold)."""
    f4, y = np.ones(3, np.float32), np.ones(3, np.float32)
    cpu, reduced = kernels.contrastive_loss_cpu, kernels.contrastive_loss_reduced_cpu
    return [
        ("negative margin", lambda: cpu(y, f4, -1.0), ValueError, "margin"),
        ("nan margin", lambda: reduced(y, f4, None, float("nan")), ValueError, "margin"),
        ("infinite margin", lambda: cpu(y, f4, float("inf")), ValueError, "margin"),
        ("similar_label 2", lambda: cpu(y, f4, similar_label=2), ValueError, "similar_label"),
        ("similar_label -1", lambda: reduced(y, f4, similar_label=-1), ValueError,
         "similar_label"),
        ("bad reduction", lambda: reduced(y, f4, None, 1.0, "avg"), ValueError, "reduction"),
        ("shape mismatch", lambda: cpu(np.ones(4, np.float32), f4), ValueError, "same shape"),
        ("0-d vs 1-d", lambda: cpu(np.ones((), np.float32), f4), ValueError, "same shape"),
        ("weight shape", lambda: reduced(y, f4, np.ones(2, np.float32)), ValueError,
         "sample_weight"),
        ("int distances", lambda: cpu(y, np.ones(3, np.int32)), TypeError, "distances"),
        ("bool distances", lambda: reduced(y, np.ones(3, bool)), TypeError, "distances"),
        ("uint8 labels", lambda: cpu(np.ones(3, np.uint8), f4), TypeError, "labels"),
        ("complex labels", lambda: cpu(np.ones(3, np.complex64), f4), TypeError, "labels"),
        ("object distances", lambda: cpu(y, np.ones(3, object)), TypeError, "distances"),
        ("string labels", lambda: cpu(np.array(["a", "b", "c"]), f4), TypeError, "labels"),
        ("weights of another dtype", lambda: reduced(y, f4, np.ones(3)), TypeError,
         "sample_weight"),
        ("weights from a Python float", lambda: reduced(y, f4, 0.5), TypeError, "sample_weight"),
        ("unconvertible weights", lambda: reduced(y, f4, Unconvertible()), TypeError,
         "sample_weight"),
        ("ragged weights", lambda: reduced(np.ones((2, 1), np.float32),
                                           np.ones((2, 1), np.float32), [[1.0], [1.0, 2.0]]),
         TypeError, "sample_weight"),
        ("string weights", lambda: reduced(y, f4, "abc"), TypeError, "sample_weight"),
        ("object weights", lambda: reduced(y, f4, [None, 1, 2]), TypeError, "sample_weight"),
        # labels and distances must already be arrays: pybind11 refuses the rest.
        ("unconvertible labels", lambda: cpu(Unconvertible(), f4), TypeError, NOT_AN_ARRAY),
        ("ragged labels", lambda: reduced([[1.0], [1.0, 2.0]], f4), TypeError, NOT_AN_ARRAY),
        ("list distances", lambda: cpu(y, [1.0, 2.0, 3.0]), TypeError, NOT_AN_ARRAY),
    ]


def check_raises(call, error, text):
    try:
        call()
    except error as e:
        assert text in str(e), f"{type(e).__name__} without {text!r}: {e}"
        return
    except Exception as e:  # noqa: BLE001 - any other class is the failure
        raise AssertionError(f"raised {type(e).__name__} ({e}), want {error.__name__}") from e
    raise AssertionError(f"no exception, want {error.__name__}")


def reproducer_cases(kernels):
    """The inputs that once crashed or gave garbage: each must give exactly
    the result of its plain native, aligned twin."""
    cpu = kernels.contrastive_loss_cpu
    d = np.array([0.5, 0.3, 2.0, 1.5])
    f4, ones = d.astype(np.float32), np.ones(4, np.float32)

    def same_result(labels, distances, twin_labels, twin_distances):
        for got, want in zip(cpu(labels, distances), cpu(twin_labels, twin_distances)):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (
                f"got {got!r}, want {want!r}")

    def at_offset(values, dtype, offset):
        return np.frombuffer(b"\0" * offset + np.asarray(values, dtype).tobytes(), dtype,
                             offset=offset)

    return [
        ("big-endian float32 distances", lambda: same_result(ones, d.astype(">f4"), ones, f4)),
        ("big-endian int64 labels",
         lambda: same_result(np.array([1, 0, 1, 0], ">i8"), f4, np.array([1, 0, 1, 0]), f4)),
        ("float32 distances at byte offset 1",
         lambda: same_result(ones, at_offset(d, np.float32, 1), ones, f4)),
        ("float64 labels and distances at byte offset 4",
         lambda: same_result(at_offset([1, 0, 1, 0], np.float64, 4), at_offset(d, np.float64, 4),
                             np.array([1.0, 0, 1, 0]), d)),
        ("bool bytes 02 01 00 ff",
         lambda: same_result(np.frombuffer(b"\x02\x01\x00\xff", np.bool_), f4,
                             np.array([True, True, False, True]), f4)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module_dir", type=Path, help="directory holding the _kernels module")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.module_dir.resolve()))
    import _kernels as kernels

    if Path(kernels.__file__).resolve().parent != args.module_dir.resolve():
        sys.exit(f"imported {kernels.__file__}, not a module from {args.module_dir}")

    cases = failures = 0

    def attempt(describe, check):
        nonlocal cases, failures
        cases += 1
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            print(f"FAIL {describe()}: {type(e).__name__}: {e}", flush=True)

    for description, check in reproducer_cases(kernels):
        attempt(lambda: description, check)
    for description, call, error, text in invalid_calls(kernels):
        attempt(lambda: description, lambda: check_raises(call, error, text))

    deadline = time.monotonic() + args.seconds
    index = 0
    while time.monotonic() < deadline:
        rng = np.random.default_rng([args.seed, index])
        case = random_case(rng)
        run = run_reduced if rng.random() < 0.5 else run_per_sample
        attempt(lambda: f"seed {args.seed} case {index} ({run.__name__}: {', '.join(case.info)})",
                lambda: run(kernels, rng, case))
        index += 1

    print(f"fuzz: {cases} cases, {failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

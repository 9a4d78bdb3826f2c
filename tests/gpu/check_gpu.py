#!/usr/bin/env python3
"""GPU check for the fused contrastive-loss kernels, without TensorFlow.

    python tests/gpu/check_gpu.py              # on a GPU machine with CuPy
    python tests/gpu/check_gpu.py --self-test  # anywhere: the CPU kernel stands in for the GPU

Builds the pybind11 kernel module with CMake (FC_WITH_TENSORFLOW=OFF), then:
  1. compares the CUDA kernel with the CPU kernel, bit for bit, for every
     (labels, distances) dtype pair at sizes 0, 1, odd sizes and 1e6, and for a
     few pairs at 1e8;
  2. repeats with misaligned (offset) labels, distances and outputs;
  3. checks the fused-reduction kernel (every reduction, no/scalar/per-element
     weights) against the CPU kernel: gradients bit for bit where the divisor
     is the same, losses to rounding; and that it is deterministic (two runs,
     same bits); and the backward scale kernel;
  4. times both kernels at N=1e8 float32 and prints their effective bandwidth
     next to a device-to-device copy of the same bytes and an unfused CuPy
     version of the formula (one kernel per array operation).
Exits non-zero on any mismatch. Meant to finish well under 4 minutes.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LABEL_DTYPES = ["bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "bfloat16", "float32", "float64"]
MARGIN = 0.75


def build_kernel_module(build_dir, cuda):
    """Configures and builds only the pybind11 module; returns its directory."""
    out = Path(build_dir) / "out"
    configure = ["cmake", "-S", str(ROOT), "-B", str(Path(build_dir) / "build"),
                 f"-DPython3_EXECUTABLE={sys.executable}", f"-DFC_OUTPUT_DIR={out}",
                 "-DFC_WITH_TENSORFLOW=OFF", f"-DFC_CUDA={cuda}"]
    if os.environ.get("CUDA_ARCHS"):
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCHS']}")
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(Path(build_dir) / "build"), "-j",
                    str(os.cpu_count() or 2), "--target", "_kernels"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def numpy_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def host_inputs(rng, n, label_dtype, distance_dtype):
    if label_dtype == "bool":  # any byte: every nonzero one must read as true
        labels = rng.integers(0, 256, size=n, dtype=np.uint8).view(np.bool_)
    elif label_dtype in ("int32", "int64"):
        labels = rng.integers(0, 2, size=n).astype(label_dtype)
    else:  # soft labels
        labels = rng.random(n, dtype=np.float32).astype(numpy_dtype(label_dtype))
    distances = (2 * MARGIN * rng.random(n, dtype=np.float32)).astype(numpy_dtype(distance_dtype))
    return labels, distances


class CpuStandIn:
    """The CPU kernel in the GPU's place, so --self-test exercises every check."""

    name = "CPU kernel (self-test stand-in for the GPU)"

    def __init__(self, kernels):
        self.kernels = kernels

    def run(self, labels, distances, offsets=(0, 0, 0, 0), similar_label=1):
        labels = _offset_copy(np, labels, offsets[0])
        distances = _offset_copy(np, distances, offsets[1])
        return self.kernels.contrastive_loss_cpu(labels, distances, MARGIN,
                                                 similar_label=similar_label)

    def run_reduced(self, labels, distances, weights, reduction):
        return self.kernels.contrastive_loss_reduced_cpu(labels, distances, weights, MARGIN,
                                                         reduction)

    def scale(self, gradient, scale):
        return _cpu_scale(gradient, scale)

    def bandwidth(self, n):
        labels, distances = host_inputs(np.random.default_rng(0), n, "float32", "float32")
        sync = lambda: None  # noqa: E731
        times = {
            "fused loss+grad": _median_seconds(
                lambda: self.kernels.contrastive_loss_cpu(labels, distances, MARGIN), sync, 5),
            "fused reduced": _median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cpu(labels, distances, None, MARGIN),
                sync, 5),
            "unfused loss+grad": _median_seconds(
                lambda: _unfused_formula(np, labels, distances), sync, 5),
            "unfused reduced": _median_seconds(
                lambda: _unfused_reduced(np, labels, distances), sync, 5),
        }
        return times, _copy_seconds(np, n, sync, lambda t, s: np.copyto(t, s), repeats=5)


class CudaDevice:
    name = "CUDA kernel"

    def __init__(self, kernels):
        import cupy
        self.cp = cupy
        self.kernels = kernels
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"CUDA kernel on {props['name'].decode()}"

    def _device(self, host, offset):
        """A device copy of `host`, starting `offset` elements into its buffer."""
        raw = host.view(np.uint16) if host.dtype == ml_dtypes.bfloat16 else host
        return _offset_copy(self.cp, self.cp.asarray(raw), offset)

    def run(self, labels, distances, offsets=(0, 0, 0, 0), similar_label=1):
        cp = self.cp
        d_labels = self._device(labels, offsets[0])
        d_distances = self._device(distances, offsets[1])
        loss = _offset_copy(cp, cp.empty_like(d_distances), offsets[2])
        grad = _offset_copy(cp, cp.empty_like(d_distances), offsets[3])
        stream = cp.cuda.get_current_stream()
        self.kernels.contrastive_loss_cuda(
            d_labels, d_distances, loss, grad, MARGIN, stream=stream.ptr,
            labels_dtype="bfloat16" if labels.dtype == ml_dtypes.bfloat16 else None,
            distances_dtype="bfloat16" if distances.dtype == ml_dtypes.bfloat16 else None,
            similar_label=similar_label)
        stream.synchronize()
        out_dtype = distances.dtype
        return loss.get().view(out_dtype), grad.get().view(out_dtype)

    def _bf16(self, array):
        return "bfloat16" if array.dtype == ml_dtypes.bfloat16 else None

    def run_reduced(self, labels, distances, weights, reduction):
        cp = self.cp
        d_labels = self._device(labels, 0)
        d_distances = self._device(distances, 0)
        host_weights = np.ones((), distances.dtype) if weights is None else np.asarray(weights)
        d_weights = self._device(host_weights, 0)
        loss = cp.empty((), d_distances.dtype)
        grad = cp.empty_like(d_distances)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.reduced_workspace_bytes(distances.size), cp.uint8)
        stream = cp.cuda.get_current_stream()
        self.kernels.contrastive_loss_reduced_cuda(
            d_labels, d_distances, d_weights, loss, grad, scale, workspace, MARGIN, reduction,
            stream=stream.ptr, labels_dtype=self._bf16(labels), distances_dtype=self._bf16(distances))
        stream.synchronize()
        return (loss.get().view(distances.dtype), grad.get().view(distances.dtype),
                float(scale.get()))

    def scale(self, gradient, scale):
        cp = self.cp
        raw = gradient.view(np.uint16) if gradient.dtype == ml_dtypes.bfloat16 else gradient
        d_gradient = cp.asarray(raw)
        d_scale = cp.asarray(np.asarray(scale, gradient.dtype).view(raw.dtype))
        out = cp.empty_like(d_gradient)
        stream = cp.cuda.get_current_stream()
        self.kernels.scale_cuda(d_gradient, d_scale, out, stream=stream.ptr,
                                dtype=self._bf16(gradient))
        stream.synchronize()
        return out.get().view(gradient.dtype)

    def bandwidth(self, n):
        cp = self.cp
        labels = (cp.random.random(n, dtype=cp.float32) < 0.5).astype(cp.float32)
        distances = 2 * MARGIN * cp.random.random(n, dtype=cp.float32)
        loss, grad = cp.empty_like(distances), cp.empty_like(distances)
        ones = cp.ones((), cp.float32)
        reduced, scale = cp.empty((), cp.float32), cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.reduced_workspace_bytes(n), cp.uint8)
        stream = cp.cuda.get_current_stream()
        sync = stream.synchronize
        times = {
            "fused loss+grad": _median_seconds(
                lambda: self.kernels.contrastive_loss_cuda(labels, distances, loss, grad, MARGIN,
                                                           stream=stream.ptr), sync),
            "fused reduced": _median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cuda(
                    labels, distances, ones, reduced, grad, scale, workspace, MARGIN, "mean",
                    stream=stream.ptr), sync),
            "unfused loss+grad": _median_seconds(
                lambda: _unfused_formula(cp, labels, distances), sync),
            "unfused reduced": _median_seconds(
                lambda: _unfused_reduced(cp, labels, distances), sync),
        }

        def copy(target, source):
            cp.cuda.runtime.memcpyAsync(target.data.ptr, source.data.ptr, source.nbytes,
                                        cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        return times, _copy_seconds(cp, n, sync, copy)


def _offset_copy(xp, array, offset):
    """The same values in a buffer that starts `offset` elements past an allocation."""
    if offset == 0:
        return array
    padded = xp.empty(array.size + offset, array.dtype)
    padded[offset:] = array
    return padded[offset:]


def _unfused_formula(xp, labels, distances):
    """The loss and its derivative as separate array operations (the baseline)."""
    hinge = xp.maximum(MARGIN - distances, 0)
    loss = labels * distances * distances + (1 - labels) * hinge * hinge
    grad = 2 * (labels * distances - (1 - labels) * hinge)
    return loss, grad


def _unfused_reduced(xp, labels, distances):
    """Mean loss and its gradient as separate array operations (the baseline)."""
    loss, grad = _unfused_formula(xp, labels, distances)
    return loss.mean(), grad / labels.size


def _copy_seconds(xp, n, sync, copy, repeats=20):
    """Time to copy 4N float32 elements: they move the 16N bytes the loss+grad
    kernel moves (read + write), so its times compare directly."""
    source = xp.ones(2 * n, xp.float32)
    target = xp.empty_like(source)
    return _median_seconds(lambda: copy(target, source), sync, repeats)


def _median_seconds(fn, sync, repeats=20):
    fn()
    sync()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare(device, kernels, rng, cases, offsets=(0, 0, 0, 0), similar_label=1):
    failures = 0
    for label_dtype, distance_dtype, n in cases:
        labels, distances = host_inputs(rng, n, label_dtype, distance_dtype)
        want_loss, want_grad = kernels.contrastive_loss_cpu(labels, distances, MARGIN,
                                                            similar_label=similar_label)
        loss, grad = device.run(labels, distances, offsets, similar_label)
        ok = same_bits(loss, want_loss) and same_bits(grad, want_grad)
        if label_dtype == "bool":  # the bytes' truth, not their values, counts
            truth = kernels.contrastive_loss_cpu(labels != 0, distances, MARGIN,
                                                 similar_label=similar_label)
            ok = ok and same_bits(loss, truth[0]) and same_bits(grad, truth[1])
        failures += not ok
        if not ok or n >= 10**6:
            print(f"  {'ok  ' if ok else 'FAIL'} labels={label_dtype:8s} distances="
                  f"{distance_dtype:8s} n={n:>11,d} offsets={offsets} "
                  f"similar_label={similar_label}", flush=True)
    return failures


def compare_reduced(device, kernels, rng, cases):
    """Fused-reduction kernel against the CPU kernel, for every reduction and
    weight form; the gradient must match bit for bit unless the divisor is a
    sum of per-element weights (its summation order differs)."""
    failures = 0
    tolerance = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 2e-6, "float64": 1e-12}
    for label_dtype, distance_dtype, n in cases:
        labels, distances = host_inputs(rng, n, label_dtype, distance_dtype)
        vector = rng.uniform(0, 2, n).astype(numpy_dtype(distance_dtype))
        for weights in (None, np.asarray(0.7, numpy_dtype(distance_dtype)), vector):
            for reduction in ("sum", "mean", "weighted_mean"):
                want = kernels.contrastive_loss_reduced_cpu(labels, distances, weights, MARGIN,
                                                            reduction)
                got = device.run_reduced(labels, distances, weights, reduction)
                again = device.run_reduced(labels, distances, weights, reduction)
                exact = not (reduction == "weighted_mean" and weights is vector)
                tol = tolerance[distance_dtype]
                ok = (same_bits(got[1], again[1]) and same_bits(got[0], again[0])
                      and np.allclose(np.float64(got[0]), np.float64(want[0]), rtol=tol, atol=0)
                      and (same_bits(got[1], want[1]) if exact else np.allclose(
                          got[1].astype(np.float64), want[1].astype(np.float64), rtol=tol,
                          atol=1e-30))
                      and np.isclose(got[2], want[2], rtol=1e-15, atol=0))
                failures += not ok
                if not ok or n >= 10**6:
                    kind = "none" if weights is None else "scalar" if weights.ndim == 0 else "vector"
                    print(f"  {'ok  ' if ok else 'FAIL'} reduced {reduction:13s} weights={kind:6s} "
                          f"labels={label_dtype:8s} distances={distance_dtype:8s} n={n:>11,d}",
                          flush=True)
        gradient = (rng.standard_normal(max(n, 1)) * 3).astype(numpy_dtype(distance_dtype))
        for factor in (1.0, 0.37):
            ok = same_bits(device.scale(gradient, factor), _cpu_scale(gradient, factor))
            failures += not ok
            if not ok:
                print(f"  FAIL scale {distance_dtype} n={n} factor={factor}", flush=True)
    return failures


def _cpu_scale(gradient, factor):
    """What the kernels compute: the product in the compute type, rounded once."""
    compute = np.float64 if gradient.dtype == np.float64 else np.float32
    scale = compute(np.asarray(factor, gradient.dtype).astype(compute))
    return (gradient.astype(compute) * scale).astype(gradient.dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true",
                        help="no GPU: run every check with the CPU kernel standing in")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fc-gpu-check-") as build_dir:
        out = build_kernel_module(build_dir, cuda="AUTO" if args.self_test else "ON")
        sys.path.insert(0, str(out))
        import _kernels
        print(f"built {_kernels.__file__} (has_cuda={_kernels.has_cuda}) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        device = CpuStandIn(_kernels) if args.self_test else CudaDevice(_kernels)
        big = 10**6 if args.self_test else 10**8
        print(f"checking {device.name}", flush=True)

        rng = np.random.default_rng(7)
        small = [0, 1, 3, 17, 1001, 65537, 10**6 + 3]
        cases = [(l, d, n) for l in LABEL_DTYPES for d in DISTANCE_DTYPES for n in small]
        cases += [("float32", "float32", big), ("int32", "float16", big),
                  ("float64", "float64", big), ("bool", "bfloat16", big)]
        failures = compare(device, _kernels, rng, cases)
        print(f"{len(cases)} aligned cases compared", flush=True)
        flipped = [case for case in cases if case[2] <= 1001]
        failures += compare(device, _kernels, rng, flipped, similar_label=0)
        print(f"{len(flipped)} aligned cases compared with similar_label=0", flush=True)

        misaligned = [(l, d, 10**4 + 7) for l in ("bool", "float32", "int64") for d in DISTANCE_DTYPES]
        for offsets in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 3), (3, 1, 2, 1)]:
            failures += compare(device, _kernels, rng, misaligned, offsets)
        print(f"{len(misaligned) * 5} misaligned cases compared", flush=True)

        reduced_cases = [(l, d, n) for l, d in [("float32", "float32"), ("int32", "float16"),
                                                 ("bool", "bfloat16"), ("float64", "float64")]
                         for n in (0, 1, 17, 10**6 + 3)]
        reduced_cases.append(("float32", "float32", big))
        failures += compare_reduced(device, _kernels, rng, reduced_cases)
        print(f"{len(reduced_cases) * 9} reduced cases compared", flush=True)

        n = big
        times, copy = device.bandwidth(n)
        # float32 bytes each must move: labels and distances read, then loss
        # and grad written (loss+grad) or grad written (reduced).
        moved = {"fused loss+grad": 16 * n, "fused reduced": 12 * n,
                 "unfused loss+grad": 16 * n, "unfused reduced": 12 * n}
        print(f"bandwidth at N={n:,} float32 (median; copy: 16N bytes read+written):")
        print(f"  same-bytes copy      {copy * 1e3:8.3f} ms  {16 * n / copy / 1e9:8.1f} GB/s")
        for name, seconds in times.items():
            gbps = moved[name] / seconds / 1e9
            print(f"  {name:20s} {seconds * 1e3:8.3f} ms  {gbps:8.1f} GB/s  "
                  f"{gbps / (16 * n / copy / 1e9):5.0%} of copy")
        for kind in ("loss+grad", "reduced"):
            print(f"  unfused/fused time, {kind}: "
                  f"{times['unfused ' + kind] / times['fused ' + kind]:.1f}x")

    print(f"{'FAILED' if failures else 'PASSED'}: {failures} mismatches, "
          f"{time.perf_counter() - started:.0f} s total")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

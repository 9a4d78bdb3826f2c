#!/usr/bin/env python3
"""GPU check for the fused contrastive-loss kernels, without TensorFlow.

    python tests/gpu/check_gpu.py              # on a GPU machine with CuPy
    python tests/gpu/check_gpu.py --self-test  # anywhere: the CPU kernel stands in for the GPU

Builds the pybind11 kernel module with CMake (FC_WITH_TENSORFLOW=OFF), then:
  1. compares the CUDA kernel with the CPU kernel, bit for bit, for every
     (labels, distances) dtype pair at sizes 0, 1, odd sizes and 1e6, and for a
     few pairs at 1e8;
  2. repeats with misaligned (offset) labels, distances and outputs;
  3. times the kernel at N=1e8 float32 and prints its effective bandwidth next
     to a device-to-device copy of the same bytes and an unfused CuPy version of
     the formula (one kernel per array operation).
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
    if label_dtype in ("bool", "int32", "int64"):
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

    def run(self, labels, distances, offsets=(0, 0, 0, 0)):
        labels = _offset_copy(np, labels, offsets[0])
        distances = _offset_copy(np, distances, offsets[1])
        return self.kernels.contrastive_loss_cpu(labels, distances, MARGIN)

    def bandwidth(self, n):
        labels, distances = host_inputs(np.random.default_rng(0), n, "float32", "float32")
        kernel = _median_seconds(lambda: self.kernels.contrastive_loss_cpu(labels, distances, MARGIN),
                                 lambda: None, repeats=5)
        source = np.concatenate([labels, distances])
        target = np.empty_like(source)
        copy = _median_seconds(lambda: np.copyto(target, source), lambda: None, repeats=5)
        unfused = _median_seconds(lambda: _unfused_formula(np, labels, distances), lambda: None,
                                  repeats=5)
        return kernel, copy, unfused


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

    def run(self, labels, distances, offsets=(0, 0, 0, 0)):
        cp = self.cp
        d_labels = self._device(labels, offsets[0])
        d_distances = self._device(distances, offsets[1])
        loss = _offset_copy(cp, cp.empty_like(d_distances), offsets[2])
        grad = _offset_copy(cp, cp.empty_like(d_distances), offsets[3])
        stream = cp.cuda.get_current_stream()
        self.kernels.contrastive_loss_cuda(
            d_labels, d_distances, loss, grad, MARGIN, stream=stream.ptr,
            labels_dtype="bfloat16" if labels.dtype == ml_dtypes.bfloat16 else None,
            distances_dtype="bfloat16" if distances.dtype == ml_dtypes.bfloat16 else None)
        stream.synchronize()
        out_dtype = distances.dtype
        return loss.get().view(out_dtype), grad.get().view(out_dtype)

    def bandwidth(self, n):
        cp = self.cp
        labels = (cp.random.random(n, dtype=cp.float32) < 0.5).astype(cp.float32)
        distances = 2 * MARGIN * cp.random.random(n, dtype=cp.float32)
        loss, grad = cp.empty_like(distances), cp.empty_like(distances)
        stream = cp.cuda.get_current_stream()
        source = cp.empty(2 * n, cp.float32)
        target = cp.empty_like(source)

        def kernel():
            self.kernels.contrastive_loss_cuda(labels, distances, loss, grad, MARGIN,
                                               stream=stream.ptr)

        def copy():
            cp.cuda.runtime.memcpyAsync(target.data.ptr, source.data.ptr, source.nbytes,
                                        cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        sync = stream.synchronize
        return (_median_seconds(kernel, sync), _median_seconds(copy, sync),
                _median_seconds(lambda: _unfused_formula(cp, labels, distances), sync))


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


def compare(device, kernels, rng, cases, offsets=(0, 0, 0, 0)):
    failures = 0
    for label_dtype, distance_dtype, n in cases:
        labels, distances = host_inputs(rng, n, label_dtype, distance_dtype)
        want_loss, want_grad = kernels.contrastive_loss_cpu(labels, distances, MARGIN)
        loss, grad = device.run(labels, distances, offsets)
        ok = same_bits(loss, want_loss) and same_bits(grad, want_grad)
        failures += not ok
        if not ok or n >= 10**6:
            print(f"  {'ok  ' if ok else 'FAIL'} labels={label_dtype:8s} distances="
                  f"{distance_dtype:8s} n={n:>11,d} offsets={offsets}", flush=True)
    return failures


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

        misaligned = [(l, d, 10**4 + 7) for l in ("bool", "float32", "int64") for d in DISTANCE_DTYPES]
        for offsets in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 3), (3, 1, 2, 1)]:
            failures += compare(device, _kernels, rng, misaligned, offsets)
        print(f"{len(misaligned) * 5} misaligned cases compared", flush=True)

        n = big
        kernel, copy, unfused = device.bandwidth(n)
        moved = 16 * n  # float32: labels and distances read, loss and grad written
        print(f"bandwidth at N={n:,} float32 ({moved / 1e9:.2f} GB moved per call, median):")
        print(f"  fused kernel      {kernel * 1e3:8.3f} ms  {moved / kernel / 1e9:8.1f} GB/s")
        print(f"  same-bytes copy   {copy * 1e3:8.3f} ms  {moved / copy / 1e9:8.1f} GB/s")
        print(f"  unfused formula   {unfused * 1e3:8.3f} ms  ({unfused / kernel:.1f}x the fused time)")
        print(f"  fused kernel reaches {copy / kernel:.0%} of copy bandwidth")

    print(f"{'FAILED' if failures else 'PASSED'}: {failures} mismatches, "
          f"{time.perf_counter() - started:.0f} s total")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU check for the fused contrastive-loss kernels and, where TensorFlow is installed, the TF ops.

    python tests/gpu/check_gpu.py              # on a GPU machine with CuPy
    python tests/gpu/check_gpu.py --self-test  # anywhere: the CPU kernel stands in for the GPU
    python tests/gpu/check_gpu.py --installed  # the installed package's kernel module, no build

Steps 1-8 need no TensorFlow: they build the pybind11 kernel module with
CMake (FC_WITH_TENSORFLOW=OFF), or with --installed take the one installed
beside fused_contrastive's op library (a CUDA install has its CUDA kernels),
then:
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
     version of the formula (one kernel per array operation);
  5. compares the embedding kernels (loss from pair embeddings [..., D]) with
     the CPU ones for every distance and embedding dtype, labels of every
     dtype across the cases, rows 0, 1 and odd, D 1 and odd (scalar loads) or
     a multiple of the 16-byte pack (vector loads), aligned and offset
     buffers, and the fused-reduction embedding kernel for every reduction and
     weight form: within EMBEDDING_ULPS, and the same bits on a second run;
  6. times the fused-reduction embedding kernel (forward and backward in one
     pass) at D=128 float32 next to a copy of the bytes it must move;
  7. compares the in-batch all-pairs kernels (in_batch_loss_cuda: loss, loss
     and gradient, gradient alone; in_batch_loss_reduced_cuda: every
     reduction and weight form) with the CPU kernel (in_batch_loss_cpu; the
     reduced reference is built from it as InBatchLossReducedCpu builds it)
     for both distances and pair weightings, float32 and float64, B = 0, 1,
     2, 37, 300, odd D, max_block_rows 0, 1 and 7, with duplicate and
     near-duplicate rows: within IN_BATCH_TOLERANCE, and the same bits on a
     second run; and the cosine distance with rows far outside Σe²'s range
     (IN_BATCH_COSINE_SCALES: the kernels divide them by a power of 2), every
     row so scaled or a mix, each gradient row compared at its row's scale;
  8. times the in-batch kernels at B=4096, D=128 float32. The pybind11 module
     has no cuBLAS: its GEMMs are the plain tiled kernel (TiledGemmGpu), so
     these times bound the TF op's (cuBLAS) from above.
  9. checks the TF ops themselves, where TensorFlow and fused_contrastive
     import (otherwise it prints one line saying it was not run, which is no
     failure). To run it, install the package with its CUDA kernels into an
     environment with TensorFlow, `FUSED_CONTRASTIVE_CUDA=on pip install .`,
     then `python tests/gpu/check_gpu.py --installed`. It fails unless
     build_info() says cuda and every op of fused_contrastive._ops has a GPU
     kernel registered. With soft device placement off (a missing GPU kernel
     raises instead of copying to the CPU), it runs on /GPU:0 the distance
     loss, the loss from pair embeddings (every distance) and the in-batch
     loss (both distances and pair weightings), each as the function and as
     the Keras class (its fused reduction), float32 and float64, with their
     gradients; checks that the outputs are on the GPU, and compares them with
     the same ops on /CPU:0: bit for bit for the distance loss (the reduced
     loss to REDUCED_TOLERANCE), within EMBEDDING_ULPS and IN_BATCH_TOLERANCE
     for the others. Then it times forward and backward of the mean loss at
     N=1e8 float32: the fused op, ContrastiveLoss (the fused reduction), the
     reference in plain TF ops, the reference and the fused op under XLA
     (jit_compile=True); and of the in-batch loss at B=4096, D=128: fused,
     plain, XLA. It ends with one line, "TF-op summary: ...", to quote.
     --self-test runs it on /CPU:0 instead, at N=1e6 and B=512.
Exits non-zero on any mismatch. Meant to finish well under 5 minutes.

Before anything is built it checks what the run needs (NumPy, ml_dtypes,
CuPy; for the build pybind11, cmake, Eigen's headers and a CUDA compiler) and
names everything missing in one message. Eigen comes from TensorFlow's
headers, /usr/include/eigen3 or the directory in $FC_EIGEN_INCLUDE.
"""

import argparse
import functools
import importlib.util
import itertools
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="no GPU: run every check with the CPU kernel standing in",
    )
    parser.add_argument(
        "--installed",
        action="store_true",
        help="check the kernel module installed with fused_contrastive instead of building one",
    )
    return parser.parse_args(argv)


def cuda_toolchain():
    """fused_contrastive/_cuda.py, loaded by path: it imports no TensorFlow."""
    spec = importlib.util.spec_from_file_location(
        "fc_cuda", ROOT / "python" / "fused_contrastive" / "_cuda.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmake_command():
    """cmake on PATH, else the PyPI package's (a venv's, when it is not on PATH)."""
    found = shutil.which("cmake")
    if found or importlib.util.find_spec("cmake") is None:
        return found
    import cmake

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def eigen_include():
    """Where CMakeLists.txt will find Eigen/Core, in its order (FC_EIGEN_INCLUDE,
    TensorFlow's headers, /usr/include/eigen3): (directory, None), or (None, why
    not). CMake stays the authority; this only lets the check name it first."""
    if os.environ.get("FC_EIGEN_INCLUDE"):
        chosen = Path(os.environ["FC_EIGEN_INCLUDE"])
        return (
            (chosen, None)
            if (chosen / "Eigen" / "Core").exists()
            else (None, f"FC_EIGEN_INCLUDE={chosen} has no Eigen/Core")
        )
    tensorflow = importlib.util.find_spec("tensorflow")
    candidates = [Path(tensorflow.submodule_search_locations[0]) / "include"] if tensorflow else []
    for candidate in candidates + [Path("/usr/include/eigen3")]:
        if (candidate / "Eigen" / "Core").exists():
            return candidate, None
    return None, "no TensorFlow and no /usr/include/eigen3"


def missing_prerequisites(args):
    """One line for each thing this run needs and lacks, saying how to get it."""
    modules = ["numpy", "ml_dtypes"] + ([] if args.self_test else ["cupy"])
    building = not args.installed
    modules += ["pybind11"] if building else []
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    problems = []
    if absent:
        packages = " ".join("cupy-cuda12x" if name == "cupy" else name for name in absent)
        problems.append(
            f"Python modules {', '.join(absent)}: {sys.executable} -m pip install "
            f"{packages}" + (" (cupy-cuda13x for a CUDA 13 driver)" if "cupy" in absent else "")
        )
    if building and cmake_command() is None:
        problems.append(f"cmake: {sys.executable} -m pip install cmake")
    if building:
        found, why = eigen_include()
        if found is None:
            problems.append(
                f"Eigen headers ({why}): set FC_EIGEN_INCLUDE to a directory holding "
                "Eigen/Core (an unpacked Eigen 3.4 release from https://eigen.tuxfamily.org), "
                "or apt-get install libeigen3-dev, or pip install tensorflow"
            )
    return problems


def check_prerequisites(argv):
    """Exits naming everything missing, before minutes of compiling."""
    args = parse_args(argv)
    problems = missing_prerequisites(args)
    if problems:
        raise SystemExit(
            "check_gpu.py cannot run; nothing was built. Missing:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )
    if not (args.self_test or args.installed) and cuda_toolchain().system_nvcc() is None:
        print(
            "no system nvcc: the build fetches the CUDA 13 compiler from PyPI (119 MiB of "
            "wheels) into its temporary directory",
            flush=True,
        )


# Before the imports below fail one at a time.
if __name__ == "__main__":
    check_prerequisites(sys.argv[1:])

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

LABEL_DTYPES = ["bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "bfloat16", "float32", "float64"]
MARGIN = 0.75
DISTANCE_KINDS = ["euclidean", "cosine", "manhattan"]
REDUCTIONS = ["sum", "mean", "weighted_mean"]
# Embedding shapes [..., D]: no rows, one row, odd row counts; D = 1 and odd D
# (scalar loads) or a multiple of every dtype's 16-byte pack (vector loads).
# main() adds a larger one.
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
# The GPU sums a row in another order than the CPU (each fixed), so results
# differ by rounding: allowed EMBEDDING_ULPS ulps of the compute type times
# the largest magnitude in the array before cancellation (rounding_scales),
# plus one ulp of the stored dtype, subnormals included, for 16-bit outputs
# rounded on either side of a boundary.
EMBEDDING_ULPS = 16
# Outputs stored in their compute type, so the differences that remain are
# those of the sums: the worst of them is worth reporting.
UNROUNDED = ("float32", "float64")
# The fused-reduction kernels' loss, relative: their blocks are summed in
# another order on each side.
REDUCED_TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 2e-6, "float64": 1e-12}
# The in-batch kernels: margins that put many pairs of rows of norm about 1
# in their hinges, and the allowed |GPU - CPU| as a fraction of the largest
# magnitude of the output. Both sides get the distances from their own GEMMs
# (cuBLAS or the tiled kernel, Eigen's blocks) and sum each anchor's pairs in
# their own order; the gradient e_i·q_i - Σ M_ij·e_j also cancels by about
# sqrt(B). Rounding, measured in ulps of the compute type, stays well inside.
IN_BATCH_MARGIN = 1.5
IN_BATCH_POSITIVE_MARGIN = 0.25
IN_BATCH_LOSS_SCALE = 0.5
IN_BATCH_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
IN_BATCH_ROWS = (0, 1, 2, 37, 300)
IN_BATCH_BLOCK_ROWS = (0, 1, 7)
# Cosine rows whose Σe² would overflow or underflow (issue 18 item 6).
IN_BATCH_COSINE_SCALES = {"float32": (1e19, 1e-20), "float64": (1e300, 1e-300)}


def build_kernel_module(build_dir, cuda):
    """Configures and builds only the pybind11 module; returns its directory."""
    out = Path(build_dir) / "out"
    cmake = cmake_command()
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(Path(build_dir) / "build"),
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DFC_OUTPUT_DIR={out}",
        "-DFC_WITH_TENSORFLOW=OFF",
        f"-DFC_CUDA={cuda}",
    ]
    if os.environ.get("FC_EIGEN_INCLUDE"):
        configure.append(f"-DFC_EIGEN_INCLUDE={os.environ['FC_EIGEN_INCLUDE']}")
    if os.environ.get("CUDA_ARCHS"):
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCHS']}")
    if cuda == "ON":
        # Without a CUDA toolkit (a pip-only TensorFlow machine), the PyPI
        # compiler setup.py would use.
        toolchain = cuda_toolchain()
        if toolchain.system_nvcc() is None:
            configure.append(f"-DCMAKE_CUDA_COMPILER={toolchain.pypi_nvcc(build_dir)}")
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [
            cmake,
            "--build",
            str(Path(build_dir) / "build"),
            "-j",
            str(os.cpu_count() or 2),
            "--target",
            "_kernels",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def installed_kernel_module():
    """The pybind11 module installed with fused_contrastive, loaded without
    importing the package (which imports TensorFlow)."""
    package = importlib.util.find_spec("fused_contrastive")
    found = [
        path
        for directory in (package.submodule_search_locations if package else [])
        for path in sorted(Path(directory).glob("_kernels.*.so"))
    ]
    if not found:
        raise SystemExit(
            "--installed: no fused_contrastive with its _kernels module is installed "
            f"for {sys.executable}"
        )
    spec = importlib.util.spec_from_file_location("_kernels", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        return self.kernels.contrastive_loss_cpu(
            labels, distances, MARGIN, similar_label=similar_label
        )

    def run_reduced(self, labels, distances, weights, reduction):
        return self.kernels.contrastive_loss_reduced_cpu(
            labels, distances, weights, MARGIN, reduction
        )

    def scale(self, gradient, scale):
        return _cpu_scale(gradient, scale)

    # The embedding axis reversed: the same distances summed in another order,
    # as the GPU's would be, so the self-test meets the rounding it tolerates.
    def run_embedding(self, labels, a, b, distance, similar_label, offsets=(0, 0, 0, 0)):
        labels, a, b = (_offset_copy(np, x, o) for x, o in zip((labels, a, b), offsets))
        return self.kernels.embedding_loss_cpu(
            labels, a[..., ::-1], b[..., ::-1], MARGIN, distance, similar_label
        )

    def run_embedding_grad(self, a, b, coefficients, upstream, distance, offsets=(0, 0, 0, 0)):
        a, b = _offset_copy(np, a, offsets[1]), _offset_copy(np, b, offsets[2])
        coefficients = _offset_copy(np, coefficients, offsets[0])
        upstream = _offset_copy(np, upstream, offsets[0])
        grad_a, grad_b = self.kernels.embedding_grad_cpu(
            a[..., ::-1], b[..., ::-1], coefficients, upstream, distance
        )
        return grad_a[..., ::-1], grad_b[..., ::-1]

    def run_embedding_reduced(self, labels, a, b, weights, distance, reduction):
        loss, grad_a, grad_b, scale = self.kernels.embedding_loss_reduced_cpu(
            labels, a[..., ::-1], b[..., ::-1], weights, MARGIN, distance, reduction
        )
        return loss, grad_a[..., ::-1], grad_b[..., ::-1], scale

    def embedding_bandwidth(self, rows, dim):
        labels, a, b = host_embeddings(
            np.random.default_rng(0), (rows, dim), "float32", "float32", "euclidean"
        )
        sync = lambda: None  # noqa: E731
        fused = _median_seconds(
            lambda: self.kernels.embedding_loss_reduced_cpu(labels, a, b, None, MARGIN), sync, 5
        )
        return fused, _copy_seconds(np, rows * dim, sync, lambda t, s: np.copyto(t, s), 5)

    def bandwidth(self, n):
        labels, distances = host_inputs(np.random.default_rng(0), n, "float32", "float32")
        sync = lambda: None  # noqa: E731
        times = {
            "fused loss+grad": _median_seconds(
                lambda: self.kernels.contrastive_loss_cpu(labels, distances, MARGIN), sync, 5
            ),
            "fused reduced": _median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cpu(labels, distances, None, MARGIN),
                sync,
                5,
            ),
            "unfused loss+grad": _median_seconds(
                lambda: _unfused_formula(np, labels, distances), sync, 5
            ),
            "unfused reduced": _median_seconds(
                lambda: _unfused_reduced(np, labels, distances), sync, 5
            ),
        }
        return times, _copy_seconds(np, n, sync, lambda t, s: np.copyto(t, s), repeats=5)

    # As for the embeddings: the embedding axis reversed, so the Gram entries
    # are summed in another order, and a block size of its own.
    def run_in_batch(self, labels, e, upstream, options, with_loss=True):
        options = dict(options, max_block_rows=5)
        loss, grad = self.kernels.in_batch_loss_cpu(labels, e[:, ::-1], upstream, **options)
        return (loss if with_loss else None), (None if grad is None else grad[:, ::-1])

    def run_in_batch_reduced(self, labels, e, weights, reduction, options):
        loss, grad, scale = in_batch_reduced_reference(
            self.kernels,
            labels,
            e[:, ::-1],
            weights,
            reduction,
            options,
            weight_total=lambda w: np.sum(w[::-1]),
        )
        return loss, grad[:, ::-1], scale

    def in_batch_seconds(self, rows, dim):
        labels, e = in_batch_inputs(np.random.default_rng(0), rows, dim, "float32")
        upstream = np.ones(rows, np.float32)
        sync = lambda: None  # noqa: E731
        return {
            "loss": _median_seconds(lambda: self.kernels.in_batch_loss_cpu(labels, e), sync, 3),
            "loss+grad": _median_seconds(
                lambda: self.kernels.in_batch_loss_cpu(labels, e, upstream), sync, 3
            ),
        }


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
            d_labels,
            d_distances,
            loss,
            grad,
            MARGIN,
            stream=stream.ptr,
            labels_dtype="bfloat16" if labels.dtype == ml_dtypes.bfloat16 else None,
            distances_dtype="bfloat16" if distances.dtype == ml_dtypes.bfloat16 else None,
            similar_label=similar_label,
        )
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
            d_labels,
            d_distances,
            d_weights,
            loss,
            grad,
            scale,
            workspace,
            MARGIN,
            reduction,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            distances_dtype=self._bf16(distances),
        )
        stream.synchronize()
        return (
            loss.get().view(distances.dtype),
            grad.get().view(distances.dtype),
            float(scale.get()),
        )

    def scale(self, gradient, scale):
        cp = self.cp
        raw = gradient.view(np.uint16) if gradient.dtype == ml_dtypes.bfloat16 else gradient
        d_gradient = cp.asarray(raw)
        d_scale = cp.asarray(np.asarray(scale, gradient.dtype).view(raw.dtype))
        out = cp.empty_like(d_gradient)
        stream = cp.cuda.get_current_stream()
        self.kernels.scale_cuda(
            d_gradient, d_scale, out, stream=stream.ptr, dtype=self._bf16(gradient)
        )
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
                lambda: self.kernels.contrastive_loss_cuda(
                    labels, distances, loss, grad, MARGIN, stream=stream.ptr
                ),
                sync,
            ),
            "fused reduced": _median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cuda(
                    labels,
                    distances,
                    ones,
                    reduced,
                    grad,
                    scale,
                    workspace,
                    MARGIN,
                    "mean",
                    stream=stream.ptr,
                ),
                sync,
            ),
            "unfused loss+grad": _median_seconds(
                lambda: _unfused_formula(cp, labels, distances), sync
            ),
            "unfused reduced": _median_seconds(
                lambda: _unfused_reduced(cp, labels, distances), sync
            ),
        }
        return times, _copy_seconds(cp, n, sync, self._copy)

    def _copy(self, target, source):
        cp = self.cp
        cp.cuda.runtime.memcpyAsync(
            target.data.ptr,
            source.data.ptr,
            source.nbytes,
            cp.cuda.runtime.memcpyDeviceToDevice,
            cp.cuda.get_current_stream().ptr,
        )

    def _host(self, device, dtype):
        """A device array's values as a host array of `dtype` (bfloat16 travels as uint16)."""
        return device.get().view(dtype)

    def run_embedding(self, labels, a, b, distance, similar_label, offsets=(0, 0, 0, 0)):
        cp = self.cp
        d_labels, d_a, d_b = (self._device(x, o) for x, o in zip((labels, a, b), offsets))
        loss = _offset_copy(cp, cp.empty(labels.shape, d_a.dtype), offsets[3])
        per_row = self.kernels.row_coefficients[distance]
        coefficients = _offset_copy(cp, cp.empty(labels.shape + (per_row,), cp.float64), offsets[3])
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_loss_cuda(
            d_labels,
            d_a,
            d_b,
            loss,
            coefficients,
            MARGIN,
            distance,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            embeddings_dtype=self._bf16(a),
            similar_label=similar_label,
        )
        stream.synchronize()
        return self._host(loss, a.dtype), coefficients.get()

    def run_embedding_grad(self, a, b, coefficients, upstream, distance, offsets=(0, 0, 0, 0)):
        cp = self.cp
        d_a, d_b = self._device(a, offsets[1]), self._device(b, offsets[2])
        d_coefficients = self._device(coefficients, offsets[0])
        d_upstream = self._device(upstream, offsets[0])
        grad_a, grad_b = (_offset_copy(cp, cp.empty_like(d_a), offsets[3]) for _ in range(2))
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_grad_cuda(
            d_a,
            d_b,
            d_coefficients,
            d_upstream,
            grad_a,
            grad_b,
            distance,
            stream=stream.ptr,
            embeddings_dtype=self._bf16(a),
        )
        stream.synchronize()
        return self._host(grad_a, a.dtype), self._host(grad_b, a.dtype)

    def run_embedding_reduced(self, labels, a, b, weights, distance, reduction):
        cp = self.cp
        d_labels, d_a, d_b = (self._device(x, 0) for x in (labels, a, b))
        d_weights = self._device(np.ones((), a.dtype) if weights is None else weights, 0)
        loss = cp.empty((), d_a.dtype)
        grad_a, grad_b = cp.empty_like(d_a), cp.empty_like(d_b)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.embedding_reduced_workspace_bytes(labels.size), cp.uint8)
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_loss_reduced_cuda(
            d_labels,
            d_a,
            d_b,
            d_weights,
            loss,
            grad_a,
            grad_b,
            scale,
            workspace,
            MARGIN,
            distance,
            reduction,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            embeddings_dtype=self._bf16(a),
        )
        stream.synchronize()
        return (
            self._host(loss, a.dtype),
            self._host(grad_a, a.dtype),
            self._host(grad_b, a.dtype),
            float(scale.get()),
        )

    def embedding_bandwidth(self, rows, dim):
        cp = self.cp
        labels = (cp.random.random(rows, dtype=cp.float32) < 0.5).astype(cp.float32)
        a, b = (cp.random.standard_normal((rows, dim), dtype=cp.float32) for _ in range(2))
        ones, loss = cp.ones((), cp.float32), cp.empty((), cp.float32)
        grad_a, grad_b = cp.empty_like(a), cp.empty_like(b)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.embedding_reduced_workspace_bytes(rows), cp.uint8)
        stream = cp.cuda.get_current_stream()
        fused = _median_seconds(
            lambda: self.kernels.embedding_loss_reduced_cuda(
                labels,
                a,
                b,
                ones,
                loss,
                grad_a,
                grad_b,
                scale,
                workspace,
                MARGIN,
                stream=stream.ptr,
            ),
            stream.synchronize,
        )
        return fused, _copy_seconds(cp, rows * dim, stream.synchronize, self._copy)

    def _in_batch_operands(self, labels, e):
        cp = self.cp
        return cp.asarray(labels.astype(np.int64)), cp.asarray(e)

    # Outputs start as NaN: an element the kernel never writes cannot pass.
    def run_in_batch(self, labels, e, upstream, options, with_loss=True):
        cp = self.cp
        d_labels, d_e = self._in_batch_operands(labels, e)
        d_upstream = None if upstream is None else cp.asarray(upstream)
        loss = cp.full(labels.shape, np.nan, e.dtype) if with_loss else None
        grad = None if upstream is None else cp.full(e.shape, np.nan, e.dtype)
        workspace = cp.empty(
            self.kernels.in_batch_workspace_bytes(
                len(labels),
                e.dtype.name,
                options["max_block_rows"],
                e.shape[1],
                options["distance"],
            ),
            cp.uint8,
        )
        stream = cp.cuda.get_current_stream()
        self.kernels.in_batch_loss_cuda(
            d_labels, d_e, d_upstream, loss, grad, workspace, stream=stream.ptr, **options
        )
        stream.synchronize()
        return (None if loss is None else loss.get()), (None if grad is None else grad.get())

    def run_in_batch_reduced(self, labels, e, weights, reduction, options):
        cp = self.cp
        d_labels, d_e = self._in_batch_operands(labels, e)
        d_weights = cp.asarray(np.ones((), e.dtype) if weights is None else weights)
        loss = cp.full((), np.nan, e.dtype)
        grad = cp.full(e.shape, np.nan, e.dtype)
        scale = cp.full((), np.nan, cp.float64)
        workspace = cp.empty(
            self.kernels.in_batch_reduced_workspace_bytes(
                len(labels),
                e.dtype.name,
                options["max_block_rows"],
                e.shape[1],
                options["distance"],
            ),
            cp.uint8,
        )
        stream = cp.cuda.get_current_stream()
        self.kernels.in_batch_loss_reduced_cuda(
            d_labels,
            d_e,
            d_weights,
            loss,
            grad,
            scale,
            workspace,
            reduction=reduction,
            loss_scale=IN_BATCH_LOSS_SCALE,
            stream=stream.ptr,
            **options,
        )
        stream.synchronize()
        return loss.get(), grad.get(), float(scale.get())

    def in_batch_seconds(self, rows, dim):
        cp = self.cp
        labels, e = in_batch_inputs(np.random.default_rng(0), rows, dim, "float32")
        d_labels, d_e = self._in_batch_operands(labels, e)
        upstream = cp.ones(rows, cp.float32)
        loss, grad = cp.empty(rows, cp.float32), cp.empty_like(d_e)
        workspace = cp.empty(self.kernels.in_batch_workspace_bytes(rows, "float32"), cp.uint8)
        stream = cp.cuda.get_current_stream()
        run = lambda u, g: self.kernels.in_batch_loss_cuda(  # noqa: E731
            d_labels, d_e, u, loss, g, workspace, IN_BATCH_MARGIN, stream=stream.ptr
        )
        return {
            "loss": _median_seconds(lambda: run(None, None), stream.synchronize),
            "loss+grad": _median_seconds(lambda: run(upstream, grad), stream.synchronize),
        }


def _offset_copy(xp, array, offset):
    """The same values in a buffer that starts `offset` elements past an allocation."""
    if offset == 0:
        return array
    padded = xp.empty(array.size + offset, array.dtype)
    padded[offset:] = array.reshape(-1)
    return padded[offset:].reshape(array.shape)


def host_embeddings(rng, shape, label_dtype, dtype, distance):
    """Labels [...] and embeddings a, b [..., D] whose distances spread over
    their range: many dissimilar pairs are in the hinge. With more than two
    rows, the first has a == b (distance 0), the second a zero a (no cosine
    similarity); fewer would leave no row to set the scale of their rounding."""
    rows, dim = int(np.prod(shape[:-1])), shape[-1]
    labels = host_inputs(rng, rows, label_dtype, "float32")[0].reshape(shape[:-1])
    a = rng.standard_normal((rows, dim))
    if distance == "cosine":  # b's cosine with a spread over [-1, 1]
        along = rng.uniform(-1, 1, (rows, 1))
        b = along * a + np.sqrt(1 - along**2) * rng.standard_normal(a.shape)
    else:  # rows scaled so that distances spread over about [0, 2 * MARGIN]
        b = rng.standard_normal(a.shape)
        mean = np.sqrt(2 * dim) if distance == "euclidean" else dim * 2 / np.sqrt(np.pi)
        factor = rng.uniform(0, 2 * MARGIN, (rows, 1)) / mean
        a, b = a * factor, b * factor
    if rows > 2:
        b[0] = a[0]
        a[1] = 0
    cast = lambda x: x.reshape(shape).astype(numpy_dtype(dtype))  # noqa: E731
    return labels, cast(a), cast(b)


def compute_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def rounding_scales(labels, a, b, distance, similar_label):
    """What the rounding of each output scales with (float64, from the
    inputs): the magnitudes of the terms it is computed from, which cancel
    in soft labels' y*d - (1-y)*h, in the hinge h = margin - d and in the
    cosine gradient (exactly, where a == b). Returns the per-row loss's and
    the per-element scales of d(loss)/da and d(loss)/db (upstream 1)."""
    y = labels.astype(np.float64)
    y = np.abs(y if similar_label else 1 - y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    inverse = lambda x: np.divide(1, x, out=np.zeros_like(x), where=x > 0)  # noqa: E731
    if distance == "cosine":
        aa, bb = (np.sum(x * x, -1, keepdims=True) for x in (a, b))
        norms = np.sqrt(aa * bb)
        d = np.full(y.shape, 2.0)  # 1 - s, s in [-1, 1]: rounded on that scale
        terms_a = np.abs(b) * inverse(norms) + np.abs(a) * inverse(aa)
        terms_b = np.abs(a) * inverse(norms) + np.abs(b) * inverse(bb)
    elif distance == "euclidean":
        d = np.sqrt(np.sum((a - b) ** 2, -1))
        terms_a = terms_b = np.abs(a - b) * inverse(d[..., None])
    else:
        d = np.sum(np.abs(a - b), -1)
        terms_a = terms_b = np.ones_like(a)
    loss = y * d * d + (1 - y) * (MARGIN + d) ** 2
    g = (2 * (y * d + (1 - y) * (MARGIN + d)))[..., None]
    return loss, g * terms_a, g * terms_b


def tolerance_used(got, want, compute, stored=None, scale=None):
    """The largest |got - want| as a fraction of what EMBEDDING_ULPS allows
    for magnitudes `scale` (default |want|); inf for another dtype, shape or
    NaN pattern."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return np.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if np.any(np.isnan(got) != np.isnan(want)):
        return np.inf
    stored = ml_dtypes.finfo(stored or compute)
    largest = np.max(np.abs(want) if scale is None else scale, initial=0)
    limit = (
        EMBEDDING_ULPS * ml_dtypes.finfo(compute).eps * largest
        + stored.eps * np.abs(want)
        + stored.smallest_subnormal
    )
    error = np.abs(np.where(np.isnan(want), 0, got - want))
    return float(
        np.max(
            np.divide(error, limit, out=np.where(error > 0, np.inf, 0.0), where=limit > 0),
            initial=0,
        )
    )


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


def in_batch_inputs(rng, rows, dim, dtype):
    """Class labels [rows] (about four rows a class) and embeddings [rows, dim]
    of norm about 1. With enough rows: row 1 duplicates row 0 (same class,
    d = 0), row 3 is row 2 plus noise (another class: a near pair in the
    negative hinge, whose Gram distance cancels), row 5 is zero (no cosine
    similarity). The noise puts the near pair well inside the kernels'
    direct-distance range (gram_distance_cancels) in both dtypes: a pair
    just outside it has its distance from the Gram form, correct only to
    about 1e-4 (float32) or 4e-10 (float64) relative on either side, and
    would measure that, not the kernels."""
    labels = rng.integers(0, max(1, rows // 4), rows).astype(np.int64)
    e = rng.standard_normal((rows, dim)) / np.sqrt(dim)
    if rows >= 4:
        e[1], labels[1] = e[0], labels[0]
        noise = 1e-4 if dtype == "float32" else 1e-8
        e[3] = e[2] + noise * rng.standard_normal(dim) / np.sqrt(dim)
        labels[3] = labels[2] + 1
    if rows >= 6:
        e[5] = 0
    return labels, e.astype(dtype)


def in_batch_options(distance, weighting, max_block_rows):
    return dict(
        margin=IN_BATCH_MARGIN,
        positive_margin=IN_BATCH_POSITIVE_MARGIN,
        distance=distance,
        pair_weighting=weighting,
        max_block_rows=max_block_rows,
    )


def in_batch_reduced_reference(
    kernels, labels, e, weights, reduction, options, weight_total=math.fsum
):
    """InBatchLossReducedCpu from in_batch_loss_cpu: g_i = w_i·reduction_scale
    rounded to the embeddings' dtype is the upstream gradient, the loss is
    Σ g_i·l_i in float64. weight_total adds up per-row weights (float64)."""
    dtype, rows = e.dtype, len(labels)
    w = np.ones((), dtype) if weights is None else np.asarray(weights)
    if reduction == "sum":
        divisor = 1.0
    elif reduction == "mean":
        divisor = float(rows)
    else:
        divisor = float(w) if w.ndim == 0 else float(weight_total(w.astype(np.float64)))
    scale = IN_BATCH_LOSS_SCALE / divisor if divisor != 0 else 0.0
    g = (np.broadcast_to(w.astype(np.float64), (rows,)) * scale).astype(dtype)
    loss, grad = kernels.in_batch_loss_cpu(labels, e, g, **options)
    total = math.fsum(g.astype(np.float64) * loss.astype(np.float64))
    return np.asarray(total, dtype), grad, scale


def relative_error(got, want, dtype, magnitude=None, tolerances=IN_BATCH_TOLERANCE):
    """max |got - want| as a fraction of tolerances[dtype] times the largest
    |want| (or `magnitude`); inf for another dtype, shape or NaN pattern, or
    any difference where everything is 0."""
    if got is None or got.dtype != want.dtype or got.shape != want.shape:
        return np.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if np.any(np.isnan(got) != np.isnan(want)):
        return np.inf
    largest = np.max(np.abs(want), initial=0) if magnitude is None else magnitude
    error = np.max(np.abs(np.where(np.isnan(want), 0, got - want)), initial=0)
    limit = tolerances[dtype] * largest
    return float(error / limit) if limit > 0 else (np.inf if error > 0 else 0.0)


def compare_in_batch(device, kernels, rng):
    """in_batch_loss_cuda against in_batch_loss_cpu: loss alone, loss and
    gradient (twice: the same bits), gradient alone (the same bits as with
    the loss). Returns (cases, failures, worst relative_error)."""
    cases = failures = 0
    worst = 0.0
    for index, (distance, weighting, dtype, rows, block) in enumerate(
        itertools.product(
            ("euclidean", "cosine"),
            ("uniform", "balanced"),
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
            ("uniform", "balanced"),
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
            ("euclidean", "cosine"), ("uniform", "balanced"), ("float32", "float64"), IN_BATCH_ROWS
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


def weight_form(weights):
    """How a failed reduced case was weighted: none, scalar or vector."""
    return "none" if weights is None else "scalar" if weights.ndim == 0 else "vector"


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


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


# Step 9. TensorFlow is imported by check_tf_ops only, which hands it to the
# functions after it: steps 1-8 must run where it is absent (the GPU machines
# this check borrows have none).


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
    from fused_contrastive import _ops
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
    names = sorted(value for key, value in vars(_ops).items() if key.endswith("OP_NAME"))
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
            ("euclidean", "cosine"), ("uniform", "balanced"), [(300, 33), (1024, 128)]
        ):
            labels, e = in_batch_inputs(rng, rows, dim, dtype)
            options = in_batch_options(distance, weighting, None)
            case = f"{distance} {weighting} {dtype} B={rows} D={dim}"
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
                times[name] = _median_seconds(
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


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fc-gpu-check-") as build_dir:
        if args.installed:
            _kernels = installed_kernel_module()
        else:
            out = build_kernel_module(build_dir, cuda="AUTO" if args.self_test else "ON")
            sys.path.insert(0, str(out))
            import _kernels
        print(
            f"{'loaded' if args.installed else 'built'} {_kernels.__file__} "
            f"(has_cuda={_kernels.has_cuda}) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        if not args.self_test and not _kernels.has_cuda:
            raise SystemExit(
                "this kernel module has no CUDA kernels: reinstall with "
                "FUSED_CONTRASTIVE_CUDA=on, or run without --installed"
            )
        device = CpuStandIn(_kernels) if args.self_test else CudaDevice(_kernels)
        big = 10**6 if args.self_test else 10**8
        print(f"checking {device.name}", flush=True)

        rng = np.random.default_rng(7)
        small = [0, 1, 3, 17, 1001, 65537, 10**6 + 3]
        cases = [(y, d, n) for y in LABEL_DTYPES for d in DISTANCE_DTYPES for n in small]
        cases += [
            ("float32", "float32", big),
            ("int32", "float16", big),
            ("float64", "float64", big),
            ("bool", "bfloat16", big),
        ]
        failures = compare(device, _kernels, rng, cases)
        print(f"{len(cases)} aligned cases compared", flush=True)
        flipped = [case for case in cases if case[2] <= 1001]
        failures += compare(device, _kernels, rng, flipped, similar_label=0)
        print(f"{len(flipped)} aligned cases compared with similar_label=0", flush=True)

        misaligned = [
            (y, d, 10**4 + 7) for y in ("bool", "float32", "int64") for d in DISTANCE_DTYPES
        ]
        for offsets in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 3), (3, 1, 2, 1)]:
            failures += compare(device, _kernels, rng, misaligned, offsets)
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
        failures += compare_reduced(device, _kernels, rng, reduced_cases)
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

        # Many blocks of rows on the GPU; fewer where the CPU stands in.
        shapes = EMBEDDING_SHAPES + [(8191 if args.self_test else 65537, 64)]
        embedding_cases = [
            (LABEL_DTYPES[index % len(LABEL_DTYPES)], dtype, distance, shape)
            for index, (dtype, distance, shape) in enumerate(
                itertools.product(DISTANCE_DTYPES, DISTANCE_KINDS, shapes)
            )
        ]
        found, worst = compare_embeddings(device, _kernels, rng, embedding_cases)
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
            found, used = compare_embeddings(device, _kernels, rng, misaligned, offsets)
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
        found, worst = compare_embedding_reduced(device, _kernels, rng, reduced_embedding_cases)
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
        for rows in (4096, 16384) if args.self_test else (65536, 262144, 10**6):
            fused, copy = device.embedding_bandwidth(rows, dim)
            moved = 16 * rows * dim
            print(
                f"  rows={rows:>9,d}  fused {fused * 1e3:8.3f} ms {moved / fused / 1e9:8.1f} GB/s"
                f"  copy {copy * 1e3:8.3f} ms {moved / copy / 1e9:8.1f} GB/s  "
                f"{copy / fused:5.0%} of copy",
                flush=True,
            )

        cases, found, worst = compare_in_batch(device, _kernels, rng)
        failures += found
        print(
            f"{cases} in-batch cases compared (worst difference: {worst:.0%} of the tolerance)",
            flush=True,
        )
        cases, found, worst = compare_in_batch_cosine_scales(device, _kernels, rng)
        failures += found
        print(
            f"{cases} in-batch cosine cases at extreme row scales compared (worst difference: "
            f"{worst:.0%} of the tolerance)",
            flush=True,
        )
        cases, found, worst = compare_in_batch_reduced(device, _kernels, rng)
        failures += found
        print(
            f"{cases} reduced in-batch cases compared (worst difference: {worst:.0%} of the "
            f"tolerance)",
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

    failures += check_tf_ops(args.self_test)
    print(
        f"{'FAILED' if failures else 'PASSED'}: {failures} mismatches, "
        f"{time.perf_counter() - started:.0f} s total"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

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
     anchor slices; and the miners (batch_hard, multi_similarity) with every
     weighting, on rows without ties;
  8. times the in-batch kernels at B=4096, D=128 float32. The pybind11 module
     has no cuBLAS: its GEMMs are the plain tiled kernel (TiledGemmGpu), so
     these times bound the TF op's (cuBLAS) from above.
  9. checks the TF ops themselves, where TensorFlow and fused_contrastive
     import (otherwise it prints one line saying it was not run, which is no
     failure). To run it, install the package with its CUDA kernels into an
     environment with TensorFlow, `FUSED_CONTRASTIVE_CUDA=on pip install .`,
     then `python tests/gpu/check_gpu.py --installed`. It fails unless
     build_info() says cuda and every op of fused_contrastive._library has a GPU
     kernel registered. With soft device placement off (a missing GPU kernel
     raises instead of copying to the CPU), it runs on /GPU:0 the distance
     loss, the loss from pair embeddings (every distance) and the in-batch
     loss (both distances and pair weightings; each miner), each as the function and as
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
 10. runs fused_contrastive.jax, the JAX front end, on the GPU through the
     module's CUDA typed-FFI handlers, against JAX's CPU (the host handlers),
     under jax.jit: every loss, value and gradient, float32 and float64
     (jax_ffi.py). Needs JAX with CUDA (pip install "jax[cuda13]"), not
     TensorFlow; without JAX it prints one line saying it was not run.
Exits non-zero on any mismatch. Meant to finish well under 5 minutes.

Before anything is built it checks what the run needs (NumPy, ml_dtypes,
CuPy; for the build pybind11, cmake, Eigen's headers and a CUDA compiler) and
names everything missing in one message. Eigen comes from TensorFlow's
headers, /usr/include/eigen3 or the directory in $FC_EIGEN_INCLUDE.

The steps live beside this script: distances.py (1-4), pairs.py (5-6),
in_batch.py (7-8), tf_ops.py (9) and jax_ffi.py (10), with what they share in common.py (the
devices, inputs, tolerances and comparison helpers). This script checks the
prerequisites, builds or loads the kernel module and runs the steps in order.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The steps' modules, importable however this script is started (python
# tests/gpu/check_gpu.py, runpy, a copy of the folder elsewhere).
sys.path.insert(0, str(Path(__file__).resolve().parent))


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

import numpy as np  # noqa: E402

import distances  # noqa: E402
import in_batch  # noqa: E402
import jax_ffi  # noqa: E402
import pairs  # noqa: E402
import tf_ops  # noqa: E402
from common import CpuStandIn, CudaDevice  # noqa: E402


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
        print(f"checking {device.name}", flush=True)

        rng = np.random.default_rng(7)
        failures = distances.check_kernels(device, _kernels, rng, args.self_test)
        failures += pairs.check_kernels(device, _kernels, rng, args.self_test)
        failures += in_batch.check_kernels(device, _kernels, rng)
        failures += jax_ffi.check_jax(_kernels, args.self_test)

    failures += tf_ops.check_tf_ops(args.self_test)
    print(
        f"{'FAILED' if failures else 'PASSED'}: {failures} mismatches, "
        f"{time.perf_counter() - started:.0f} s total"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds the op library and the pybind11 kernel module with CMake.

`pip install .` and `pip install -e .` both run CMake against the TensorFlow of
the Python doing the build; the wheel then requires exactly that TensorFlow.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"$', (ROOT / "python/fused_contrastive/__init__.py").read_text(), re.M
).group(1)


def installed_version(distribution):
    """The version of `distribution` where this build runs, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tensorflow_requirement():
    version = installed_version("tensorflow")
    return f"tensorflow=={version}" if version else "tensorflow>=2.16"


def cmake_executable():
    found = shutil.which("cmake")
    if found:
        return found
    import cmake  # the PyPI package, when its script is not on PATH

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


# What CMake writes beside the pybind11 module (see CMakeLists.txt).
CMAKE_OUTPUTS = ("_fused_contrastive_ops.so", "_build_info.json")


# The toolchain and driver facts the package itself uses, loaded by path:
# importing the package would import TensorFlow.
_spec = importlib.util.spec_from_file_location(
    "fc_cuda", ROOT / "python/fused_contrastive/_cuda.py"
)
cuda_toolchain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_toolchain)


def tensorflow_cuda_packages_present():
    """True when TensorFlow's and-cuda extra (its CUDA 12 runtime) is installed
    where this build runs: without build isolation, the user's environment."""
    return installed_version("nvidia-cuda-runtime-cu12") is not None


def switch_from_environment(name):
    """An auto|on|off setting (1 and 0 too) of the environment, as AUTO, ON or OFF."""
    value = os.environ.get(name, "auto").strip().upper()
    if value not in ("AUTO", "ON", "OFF", "1", "0"):
        raise SystemExit(f"{name} must be auto, on or off, got {value!r}")
    return {"1": "ON", "0": "OFF"}.get(value, value)


def cmake_args_from_environment(build_temp):
    """FUSED_CONTRASTIVE_CUDA=auto|on|off, FUSED_CONTRASTIVE_CUDA_ARCHS=<CMake list>,
    FUSED_CONTRASTIVE_JAX=auto|on|off (the typed-FFI handlers JAX calls; CMake's
    default is auto), FUSED_CONTRASTIVE_CMAKE_ARGS=<anything else for CMake> (see
    README).

    CUDA kernels are built with "on", and with "auto" when an NVIDIA driver is
    present or TensorFlow's CUDA packages are (a system nvcc alone does not
    make a machine run them); without a system nvcc they are compiled by the
    PyPI toolchain."""
    args = []
    cuda = switch_from_environment("FUSED_CONTRASTIVE_CUDA")
    wanted = cuda == "ON" or (
        cuda == "AUTO"
        and (cuda_toolchain.nvidia_driver_present() or tensorflow_cuda_packages_present())
    )
    args.append(f"-DFC_CUDA={'ON' if wanted else 'OFF'}")
    if wanted and cuda_toolchain.system_nvcc() is None:
        args.append(f"-DCMAKE_CUDA_COMPILER={cuda_toolchain.pypi_nvcc(build_temp)}")
    if os.environ.get("FUSED_CONTRASTIVE_CUDA_ARCHS"):
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['FUSED_CONTRASTIVE_CUDA_ARCHS']}")
    if "FUSED_CONTRASTIVE_JAX" in os.environ:
        args.append(f"-DFC_JAX={switch_from_environment('FUSED_CONTRASTIVE_JAX')}")
    return args + os.environ.get("FUSED_CONTRASTIVE_CMAKE_ARGS", "").split()


def cmake_build_dir(build_temp, cmake_args):
    """One CMake build directory per TensorFlow version, pybind11 version and
    set of CMake options: a second install of an unchanged tree recompiles
    nothing, and different options never overwrite each other's objects."""
    key = json.dumps([installed_version("tensorflow"), installed_version("pybind11"), cmake_args])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(build_temp).resolve() / f"cmake-tf{installed_version('tensorflow')}-{digest}"


def progress(message):
    """To stderr, which `pip install -v` shows as the build runs."""
    print(f"fused-contrastive: {message}", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # Everything CMake builds lands next to the pybind11 module; for an
        # editable install that is python/fused_contrastive itself.
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cmake_args = ["-DCMAKE_BUILD_TYPE=Release", *cmake_args_from_environment(self.build_temp)]
        build_dir = cmake_build_dir(self.build_temp, cmake_args)
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = "-DFC_CUDA=ON" in cmake_args
        progress(
            f"building the op library and kernel module for TensorFlow "
            f"{installed_version('tensorflow')}, {'with' if cuda else 'without'} CUDA "
            f"kernels, in {build_dir}: a first build takes minutes"
            f"{' (the CUDA kernels most of them)' if cuda else ''}; a second with the same "
            "TensorFlow and options compiles only what changed"
        )
        started = time.monotonic()
        subprocess.run(
            [
                cmake_executable(),
                "-S",
                str(ROOT),
                "-B",
                str(build_dir),
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DFC_OUTPUT_DIR={out_dir}",
                *cmake_args,
            ],
            check=True,
        )
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake_executable(), "--build", str(build_dir), "-j", jobs], check=True)
        progress(f"built in {time.monotonic() - started:.0f} s")
        if self.inplace or getattr(self, "editable_mode", False):
            # setuptools copies only the declared extension into the source
            # tree; the op library and build info must sit beside it.
            for name in CMAKE_OUTPUTS:
                shutil.copy2(out_dir / name, ROOT / "python/fused_contrastive" / name)


# setuptools runs this file as __main__; tests import it for its functions.
if __name__ == "__main__":
    setup(
        version=VERSION,
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=[Extension("fused_contrastive._kernels", sources=[])],
        cmdclass={"build_ext": CMakeBuild},
        install_requires=[tensorflow_requirement(), "numpy"],
        zip_safe=False,
    )

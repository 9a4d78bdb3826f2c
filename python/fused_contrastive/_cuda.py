"""The CUDA toolchain a build uses and the NVIDIA driver a CUDA build needs.

No TensorFlow here: setup.py loads this file by path at build time (to find
or fetch nvcc), the tests use it to build with the same toolchain, and the
package uses it at import time (driver check, build_info).
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The CUDA 13 toolchain on PyPI: nvcc (with cudafe++, fatbinary, nvlink,
# ptxas), cicc, the crt headers and the runtime, all under nvidia/cu13/.
# (PyPI's CUDA 12 nvcc package has ptxas only, no nvcc.)
PYPI_CUDA_TOOLCHAIN = (
    "nvidia-cuda-nvcc>=13,<14",
    "nvidia-nvvm>=13,<14",
    "nvidia-cuda-crt>=13,<14",
    "nvidia-cuda-runtime>=13,<14",
)
PYPI_NVCC = Path("nvidia", "cu13", "bin", "nvcc")

# NVIDIA's minimum Linux driver for code built by each CUDA major version
# (CUDA release notes, "minor version compatibility": any 12.x toolkit runs
# on >= 525.60.13, any 13.x on >= 580.65.06).
MIN_LINUX_DRIVER = {12: "525.60.13", 13: "580.65.06"}

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# What messages say when a build does not record its source directory.
UNKNOWN_SOURCE = "<the fused-contrastive source directory>"


def system_nvcc():
    """The nvcc CMake would find ($CUDACXX, PATH, /usr/local/cuda), if it runs."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if not candidate:
            continue
        try:
            subprocess.run([candidate, "--version"], check=True, capture_output=True)
            return candidate
        except (OSError, subprocess.CalledProcessError):
            continue
    return None


def pypi_nvcc(directory):
    """nvcc from PYPI_CUDA_TOOLCHAIN, pip-installed into `directory` (a build's
    temporary directory: never the environment the package goes into).

    pip reads its index settings from the environment and pip.conf
    (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX), so an offline local index
    serves this install too."""
    target = Path(directory).resolve() / "pypi-cuda"
    nvcc = target / PYPI_NVCC
    if not nvcc.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--target",
                str(target),
                *PYPI_CUDA_TOOLCHAIN,
            ],
            check=True,
        )
    return nvcc


def rebuild_command(source_dir):
    """The command that rebuilds the package from `source_dir` in place, against
    the installed TensorFlow."""
    return f"pip install --force-reinstall --no-deps --no-build-isolation {source_dir}"


def nvidia_driver_present():
    return DRIVER_VERSION_FILE.exists()


def cuda_major(version):
    """13 for "13.5" or "13.5.37"; None for "" (no CUDA)."""
    match = re.match(r"(\d+)\.", version or "")
    return int(match.group(1)) if match else None


def required_driver(info):
    """(CUDA driver API version, minimum Linux driver) that the build described
    by `info` (its _build_info.json) needs, or None without CUDA kernels."""
    major = cuda_major(info.get("cuda_version")) if info.get("cuda") else None
    if major is None:
        return None
    return major * 1000, MIN_LINUX_DRIVER.get(major, "?")


def api_version_name(version):
    """12020 -> "12.2", as cuDriverGetVersion encodes it."""
    return f"{version // 1000}.{version % 1000 // 10}"


def installed_driver():
    """(CUDA version the driver supports, as cuDriverGetVersion gives it; the
    kernel module's version or None), or None where libcuda.so.1 cannot be
    loaded (no NVIDIA driver)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        get_version = libcuda.cuDriverGetVersion
    except (OSError, AttributeError):
        return None
    version = ctypes.c_int(0)
    if get_version(ctypes.byref(version)) != 0:  # works without cuInit
        return None
    module = None
    if DRIVER_VERSION_FILE.exists():
        module = kernel_module_version(DRIVER_VERSION_FILE.read_text())
    return version.value, module


def kernel_module_version(text):
    """ "580.65.06" from /proc/driver/nvidia/version ("... Kernel Module  580.65.06 ..."
    or, for the open modules, "... Open Kernel Module for x86_64  580.65.06 ..."), or None."""
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def driver_too_old_message(info, driver):
    """Why the CUDA kernels of the build `info` cannot run with the driver
    `driver` (an installed_driver() value), or None when they can (or when
    there are no CUDA kernels, or no driver: then nothing runs on a GPU)."""
    needed = required_driver(info)
    if needed is None or driver is None or driver[0] >= needed[0]:
        return None
    api, module = driver
    supported = api_version_name(api)
    rebuild = rebuild_command(info.get("source_dir") or UNKNOWN_SOURCE)
    return (
        f"fused_contrastive's CUDA kernels were compiled by CUDA {info['cuda_version']} "
        f"({info.get('cuda_compiler_source') or 'system'} nvcc) and need a driver for CUDA "
        f"{api_version_name(needed[0])} or newer (Linux driver >= {needed[1]}), but this machine "
        f"has NVIDIA driver {module or '(version unknown)'}, which supports CUDA {supported}. "
        f"Update the driver, or rebuild with a CUDA toolkit it supports "
        f"(CUDACXX=/path/to/cuda-{supported}/bin/nvcc FUSED_CONTRASTIVE_CUDA=on {rebuild}) "
        f"or with CPU kernels only (FUSED_CONTRASTIVE_CUDA=off {rebuild})"
    )

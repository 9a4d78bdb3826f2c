"""CUDA builds: how setup.py chooses the CUDA compiler, what build_info() says
about CUDA, and the driver check at import (fused_contrastive/_cuda.py): a
CUDA build refuses to load, naming both drivers, where the NVIDIA driver is
older than its CUDA kernels need."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tensorflow as tf
from support import ROOT, run_python

import fused_contrastive
from fused_contrastive import _cuda, _library


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module (setup() runs only as __main__), with no CUDA
    setting in the environment and a recorder in place of the PyPI download."""
    spec = importlib.util.spec_from_file_location("fc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in (
        "FUSED_CONTRASTIVE_CUDA",
        "FUSED_CONTRASTIVE_CUDA_ARCHS",
        "FUSED_CONTRASTIVE_CMAKE_ARGS",
        "FUSED_CONTRASTIVE_JAX",
    ):
        monkeypatch.delenv(name, raising=False)
    module.fetched = []
    monkeypatch.setattr(
        module.cuda_toolchain,
        "pypi_nvcc",
        lambda temp: module.fetched.append(temp) or f"{temp}/pypi-cuda/nvcc",
    )
    return module


def _machine(monkeypatch, setup_py, nvcc=None, driver=False, tf_cuda_packages=False):
    monkeypatch.setattr(setup_py.cuda_toolchain, "system_nvcc", lambda: nvcc)
    monkeypatch.setattr(setup_py.cuda_toolchain, "nvidia_driver_present", lambda: driver)
    monkeypatch.setattr(setup_py, "tensorflow_cuda_packages_present", lambda: tf_cuda_packages)


@pytest.mark.parametrize(
    "setting, machine, expected",
    [
        ("off", {"driver": True}, ["-DFC_CUDA=OFF"]),
        ("on", {"nvcc": "/usr/bin/nvcc"}, ["-DFC_CUDA=ON"]),
        ("on", {}, ["-DFC_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/tmp/b/pypi-cuda/nvcc"]),
        ("1", {}, ["-DFC_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/tmp/b/pypi-cuda/nvcc"]),
        ("auto", {}, ["-DFC_CUDA=OFF"]),  # a CPU machine downloads nothing
        # An nvcc alone makes no machine run CUDA kernels: no minutes compiling them.
        ("auto", {"nvcc": "/usr/bin/nvcc"}, ["-DFC_CUDA=OFF"]),
        ("auto", {"nvcc": "/usr/bin/nvcc", "driver": True}, ["-DFC_CUDA=ON"]),
        ("auto", {"nvcc": "/usr/bin/nvcc", "tf_cuda_packages": True}, ["-DFC_CUDA=ON"]),
        ("auto", {"driver": True}, ["-DFC_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/tmp/b/pypi-cuda/nvcc"]),
        (
            "auto",
            {"tf_cuda_packages": True},
            ["-DFC_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/tmp/b/pypi-cuda/nvcc"],
        ),
        (None, {"driver": True}, ["-DFC_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/tmp/b/pypi-cuda/nvcc"]),
    ],
)
def test_setup_fetches_the_pypi_compiler_exactly_when_cuda_is_wanted_without_nvcc(
    monkeypatch, setup_py, setting, machine, expected
):
    _machine(monkeypatch, setup_py, **machine)
    if setting is not None:
        monkeypatch.setenv("FUSED_CONTRASTIVE_CUDA", setting)
    assert setup_py.cmake_args_from_environment("/tmp/b") == expected
    assert setup_py.fetched == (["/tmp/b"] if len(expected) == 2 else [])


def test_setup_keeps_one_build_directory_per_tensorflow_version_and_options(monkeypatch, setup_py):
    # pip builds in a new temporary environment each time; the CMake build
    # directory under build/ survives it, so a second install with the same
    # TensorFlow and options reuses its objects, and other options get their own.
    versions = {"tensorflow": "2.21.0", "pybind11": "3.1.0"}
    monkeypatch.setattr(setup_py, "installed_version", lambda name: versions.get(name))
    first = setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=OFF"])
    assert first == setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=OFF"])
    assert first.parent == Path("build/temp").resolve()
    assert first.name.startswith("cmake-tf2.21.0-")
    others = {
        setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=ON"]),
        setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=OFF", "-DFC_SANITIZE=ON"]),
    }
    versions["tensorflow"] = "2.22.0"
    others.add(setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=OFF"]))
    versions["tensorflow"], versions["pybind11"] = "2.21.0", "3.2.0"
    others.add(setup_py.cmake_build_dir("build/temp", ["-DFC_CUDA=OFF"]))
    assert len(others) == 4 and first not in others


def test_setup_passes_chosen_architectures_and_rejects_a_bad_setting(monkeypatch, setup_py):
    _machine(monkeypatch, setup_py, nvcc="/usr/bin/nvcc")
    monkeypatch.setenv("FUSED_CONTRASTIVE_CUDA", "on")
    monkeypatch.setenv("FUSED_CONTRASTIVE_CUDA_ARCHS", "89-real;90")
    assert setup_py.cmake_args_from_environment("/tmp/b") == [
        "-DFC_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=89-real;90",
    ]
    monkeypatch.setenv("FUSED_CONTRASTIVE_JAX", "0")  # the JAX handlers, as the CUDA switch
    assert setup_py.cmake_args_from_environment("/tmp/b")[-1] == "-DFC_JAX=OFF"
    monkeypatch.setenv("FUSED_CONTRASTIVE_JAX", "maybe")
    with pytest.raises(SystemExit, match="FUSED_CONTRASTIVE_JAX must be auto, on or off"):
        setup_py.cmake_args_from_environment("/tmp/b")
    monkeypatch.setenv("FUSED_CONTRASTIVE_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be auto, on or off, got 'YES'"):
        setup_py.cmake_args_from_environment("/tmp/b")


CUDA_13_BUILD = {
    "cuda": True,
    "cuda_version": "13.5",
    "cuda_compiler_source": "pypi",
    "source_dir": "/src/fc",
}


def test_build_info_reports_the_cuda_of_the_build_and_of_tensorflow():
    info = fused_contrastive.build_info()
    assert info["tensorflow_cuda_version"] == tf.sysconfig.get_build_info().get("cuda_version", "")
    if info["cuda"]:
        version = re.fullmatch(r"NVIDIA (\d+\.\d+)\.\d+", info["cuda_compiler"]).group(1)
        assert info["cuda_version"] == version
        assert info["cuda_compiler_source"] in ("system", "pypi")
        assert info["cuda_architectures"]
        major = int(version.split(".")[0])
        assert info["cuda_driver_required"] == (
            f"CUDA {major}.0 (Linux driver >= {_cuda.MIN_LINUX_DRIVER[major]})"
        )
    else:
        assert info["cuda_compiler"] == info["cuda_compiler_source"] == ""
        assert info["cuda_version"] == info["cuda_architectures"] == ""
        assert info["cuda_driver_required"] == ""
    # No NVIDIA driver on these machines (a GPU machine has one).
    found = _cuda.installed_driver()
    assert (info["cuda_driver_found"] == "") == (found is None)


def test_driver_older_than_the_kernels_need_is_named_with_the_one_needed():
    message = _cuda.driver_too_old_message(CUDA_13_BUILD, (12020, "535.104.05"))
    assert "compiled by CUDA 13.5 (pypi nvcc)" in message
    assert "need a driver for CUDA 13.0 or newer (Linux driver >= 580.65.06)" in message
    assert "has NVIDIA driver 535.104.05, which supports CUDA 12.2" in message
    assert (
        "CUDACXX=/path/to/cuda-12.2/bin/nvcc FUSED_CONTRASTIVE_CUDA=on pip install "
        "--force-reinstall --no-deps --no-build-isolation /src/fc"
    ) in message
    assert "FUSED_CONTRASTIVE_CUDA=off pip install" in message


def test_kernel_module_version_from_both_driver_flavours():
    proprietary = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 "
        "01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    open_modules = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
        "Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Jul 22 2025\n"
    )
    assert _cuda.kernel_module_version(proprietary) == "535.104.05"
    assert _cuda.kernel_module_version(open_modules) == "580.65.06"
    assert _cuda.kernel_module_version("") is None


@pytest.mark.parametrize(
    "info, driver",
    [
        (CUDA_13_BUILD, (13000, "580.65.06")),  # minor-version compatible: 13.0 runs 13.5 code
        (CUDA_13_BUILD, (13020, None)),
        (CUDA_13_BUILD, None),  # no driver: nothing runs on a GPU, the CPU kernels work
        ({**CUDA_13_BUILD, "cuda_version": "12.5"}, (12020, "535.104.05")),
        ({"cuda": False, "cuda_version": ""}, (11080, "520.61.05")),
    ],
)
def test_drivers_that_run_the_kernels_pass(info, driver):
    assert _cuda.driver_too_old_message(info, driver) is None


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory):
    """A libcuda.so.1 whose cuDriverGetVersion reports $FAKE_CUDA_DRIVER_VERSION,
    for the import path on machines without an NVIDIA driver."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    directory = tmp_path_factory.mktemp("fake_libcuda")
    source = directory / "libcuda.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "int cuDriverGetVersion(int *version) {\n"
        '  *version = atoi(getenv("FAKE_CUDA_DRIVER_VERSION")); return 0;\n}\n'
    )
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"), str(source)],
        check=True,
    )
    return directory


@pytest.fixture(scope="module")
def library_claiming_cuda_13(tmp_path_factory):
    """The installed op library beside a build info that says its CUDA kernels
    were compiled by CUDA 13.5 (the check reads only the build info)."""
    directory = tmp_path_factory.mktemp("cuda13_build")
    library = directory / "_fused_contrastive_ops.so"
    shutil.copy(fused_contrastive.build_info()["library"], library)
    info = json.loads((_library._library_path().parent / "_build_info.json").read_text())
    info.update(
        cuda=True, cuda_version="13.5", cuda_compiler="NVIDIA 13.5.37", cuda_compiler_source="pypi"
    )
    (directory / "_build_info.json").write_text(json.dumps(info))
    return library


def _import_with_driver(fake_libcuda, library, version):
    return run_python(
        "import fused_contrastive as fc; i = fc.build_info(); "
        "print(i['cuda_driver_found'], '|', i['cuda_driver_required'])",
        LD_LIBRARY_PATH=str(fake_libcuda),
        FAKE_CUDA_DRIVER_VERSION=str(version),
        **{_library.LIBRARY_ENV: str(library)},
    )


def test_import_refuses_a_cuda_13_build_on_a_cuda_12_driver(fake_libcuda, library_claiming_cuda_13):
    result = _import_with_driver(fake_libcuda, library_claiming_cuda_13, 12040)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "ImportError: fused_contrastive's CUDA kernels were compiled by CUDA 13.5 (pypi nvcc)"
    )
    assert "supports CUDA 12.4" in error and "Linux driver >= 580.65.06" in error
    assert error.endswith(
        f"or set {_library.USE_REFERENCE_ENV}=1 to use the slower pure-TensorFlow implementation"
    )


def test_import_accepts_a_cuda_13_build_on_a_cuda_13_driver(fake_libcuda, library_claiming_cuda_13):
    result = _import_with_driver(fake_libcuda, library_claiming_cuda_13, 13000)
    assert result.returncode == 0, result.stderr[-3000:]
    # Without /proc/driver/nvidia (no NVIDIA kernel module) its version is unknown.
    module = (_cuda.installed_driver() or (0, None))[1] or "unknown"
    assert result.stdout.strip().splitlines()[-1] == (
        f"{module} (CUDA 13.0) | CUDA 13.0 (Linux driver >= 580.65.06)"
    )

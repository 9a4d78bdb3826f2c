"""The CMake build (CMakeLists.txt): CUDA kernels, device code, a CPU-only build's library tests."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tensorflow as tf
from support import ROOT, run_core_tests_against
from tensorflow.core.framework import types_pb2
from tensorflow.python.framework import kernels

import fused_contrastive
from fused_contrastive import _inputs, _library


def _enum_name(dtype):
    return types_pb2.DataType.Name(dtype.as_datatype_enum)


ALL_PAIRS = {
    (_enum_name(label), _enum_name(distance))
    for label in _inputs.LABEL_DTYPES
    for distance in _inputs.DISTANCE_DTYPES
}


def registered_pairs(device_type):
    """(labels dtype, distances dtype) of every kernel TensorFlow has for the op."""
    pairs = set()
    for kernel in kernels.get_registered_kernels_for_op(_library.OP_NAME).kernel:
        if kernel.device_type == device_type:
            assert list(kernel.host_memory_arg) == ["margin"]
            types = {
                c.name: types_pb2.DataType.Name(c.allowed_values.list.type[0])
                for c in kernel.constraint
            }
            pairs.add((types["Tlabels"], types["T"]))
    return pairs


def test_cpu_kernels_for_every_dtype_pair():
    assert registered_pairs("CPU") == ALL_PAIRS


def test_gpu_kernels_exactly_when_built_with_cuda():
    expected = ALL_PAIRS if fused_contrastive.build_info()["cuda"] else set()
    assert registered_pairs("GPU") == expected


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    import nvidia  # PyPI's nvidia-cuda-cuobjdump, a test dependency

    return str(Path(list(nvidia.__path__)[0]) / "cu13" / "bin" / "cuobjdump")


def test_device_code_matches_the_recorded_architectures():
    info = fused_contrastive.build_info()
    library = info["library"]
    if not info["cuda"]:
        sections = subprocess.run(
            ["readelf", "-S", library], capture_output=True, text=True, check=True
        ).stdout
        assert ".nv_fatbin" not in sections
        return
    assert info["cuda_architectures"] == "80-real,90"
    elf = subprocess.run(
        [_cuobjdump(), "--list-elf", library], capture_output=True, text=True, check=True
    ).stdout
    ptx = subprocess.run(
        [_cuobjdump(), "--list-ptx", library], capture_output=True, text=True, check=True
    ).stdout
    assert "sm_80.cubin" in elf and "sm_90.cubin" in elf
    assert "sm_90.ptx" in ptx  # compute_90 PTX for GPUs newer than sm_90


def test_cpu_only_build_loads_and_passes_the_library_tests(tmp_path):
    out = tmp_path / "out"
    # Debug (-O0, no LTO) builds in half the time of Release (129 s against
    # 261 s on two cores) and ran the core tests as fast: what this checks
    # is the CPU-only configuration. The install builds Release.
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path / "build"),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFC_OUTPUT_DIR={out}",
            "-DFC_CUDA=OFF",
            "-DCMAKE_BUILD_TYPE=Debug",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "cmake",
            "--build",
            str(tmp_path / "build"),
            "-j",
            "2",
            "--target",
            "_fused_contrastive_ops",
        ],
        check=True,
        capture_output=True,
    )
    info = json.loads((out / "_build_info.json").read_text())
    assert info["cuda"] is False and info["tensorflow_version"] == tf.__version__
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fused_contrastive as fc; "
            "from tensorflow.python.framework import kernels; "
            "op = 'FusedContrastive>ContrastiveLoss'; "
            "ks = kernels.get_registered_kernels_for_op(op).kernel; "
            "assert not any(k.device_type == 'GPU' for k in ks); print(fc.build_info()['library'])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, _library.LIBRARY_ENV: str(out / "_fused_contrastive_ops.so")},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().endswith(str(out / "_fused_contrastive_ops.so"))
    # Bazel's CPU-only library runs every core test, built from the sources
    # and with the flags of this configuration (test_bazel checks both), so
    # here the library's own tests suffice: what CMake alone can break is
    # whether this configuration builds, loads and computes.
    result = run_core_tests_against(
        out / "_fused_contrastive_ops.so", tmp_path, ["tf/test_library.py"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_configure_takes_a_relative_python_and_survives_pips_deleted_environments(tmp_path):
    """Two configures of one build directory, each finding TensorFlow and
    pybind11 in its own environment that is deleted afterwards, as pip's
    isolated builds do: the second configure must not read the first one's
    paths (it failed with "Eigen not found"), and the compile commands must be
    equal, so that make recompiles nothing. The first names its Python by a
    relative path, as README's CMake line does (CMake took another Python)."""
    import pybind11

    build, commands = tmp_path / "build", []
    for name, python in (
        ("env-a", os.path.relpath(sys.executable, tmp_path)),
        ("env-b", sys.executable),
    ):
        environment = tmp_path / name
        environment.mkdir()
        for package in (tf, pybind11):
            source = Path(package.__file__).parent
            (environment / source.name).symlink_to(source, target_is_directory=True)
        result = subprocess.run(
            [
                "cmake",
                "-S",
                str(ROOT),
                "-B",
                str(build),
                f"-DPython3_EXECUTABLE={python}",
                f"-DFC_OUTPUT_DIR={tmp_path / 'out'}",
                "-DFC_CUDA=OFF",
                "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(environment), os.environ.get("PYTHONPATH", "")]),
            },
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"TensorFlow {tf.__version__}: {environment}/tensorflow" in result.stdout
        commands.append((build / "compile_commands.json").read_text())
        cache = (build / "CMakeCache.txt").read_text()
        assert re.search(r"^Python3_EXECUTABLE:\w+=(.*)$", cache, re.M).group(1) == sys.executable
        shutil.rmtree(environment)
    assert commands[0] == commands[1]
    assert "env-a" not in commands[0] and "-isystem" in commands[0]
    # Headers found through -isystem are no dependencies (-MMD): pip unpacks
    # them afresh, with new timestamps, for every build.
    rules = (build / "CMakeFiles" / "_kernels.dir" / "build.make").read_text()
    assert " -MMD " in rules and " -MD " not in rules

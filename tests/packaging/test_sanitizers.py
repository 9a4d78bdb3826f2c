"""The pybind11 kernel module built with -fsanitize=address,undefined (no
TensorFlow) and fuzzed by tests/sanitizer/fuzz_kernels.py: any out-of-bounds
access, misaligned load or other undefined behaviour fails the test."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tests" / "sanitizer" / "fuzz_kernels.py"


def cmake():
    beside = Path(sys.executable).parent / "cmake"
    return str(beside) if beside.exists() else "cmake"


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def compiler_runtime(build, name):
    """Path of a runtime library of the compiler CMake chose (GCC's names)."""
    cache = (build / "CMakeCache.txt").read_text()
    compiler = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", cache, re.M).group(1)
    path = Path(run([compiler, f"-print-file-name={name}"]).stdout.strip())
    # Without the library the compiler echoes the bare name back.
    assert path.is_absolute() and path.exists(), f"{compiler} has no {name}"
    return path


def test_fuzzing_the_sanitized_kernel_module_reports_nothing(tmp_path):
    build, module_dir = tmp_path / "build", tmp_path / "module"
    # Debug (-O0) compiles in about a quarter of the time Release (-O3, LTO)
    # takes on two cores; the sanitizers check the same accesses.
    run(
        [
            cmake(),
            "-S",
            ROOT,
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Debug",
            "-DFC_WITH_TENSORFLOW=OFF",
            "-DFC_CUDA=OFF",
            "-DFC_SANITIZE=ON",
            # The fuzzer calls the kernels' pybind11 entries, not the FFI
            # handlers: leaving those out saves their compile.
            "-DFC_JAX=OFF",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFC_OUTPUT_DIR={module_dir}",
        ],
        timeout=300,
    )
    run([cmake(), "--build", build, "-j", os.cpu_count() or 2, "--target", "_kernels"], timeout=600)
    (module,) = module_dir.glob("_kernels*.so")
    binary = module.read_bytes()
    assert b"__asan_report" in binary and b"__ubsan_handle" in binary, "module not instrumented"

    env = {
        **os.environ,
        # ASan's runtime must be loaded first. libstdc++ must be there when
        # it starts, too: Python links none, and ASan's __cxa_throw
        # interceptor would otherwise abort on the first C++ exception.
        "LD_PRELOAD": f"{compiler_runtime(build, 'libasan.so')}:"
        f"{compiler_runtime(build, 'libstdc++.so')}",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    result = subprocess.run(
        [sys.executable, str(FUZZ), str(module_dir), "--seconds", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    report = f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, report
    assert "runtime error" not in result.stderr, report
    assert "AddressSanitizer" not in result.stderr, report
    summary = re.fullmatch(r"fuzz: (\d+) cases, 0 failures", result.stdout.splitlines()[-1])
    assert summary and int(summary.group(1)) >= 100, report

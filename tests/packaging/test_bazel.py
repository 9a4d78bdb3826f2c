"""The Bazel build (BUILD, WORKSPACE, .bazelrc, bazel/), run offline as README documents it."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from support import ROOT, run_core_tests_against

import fused_contrastive
from fused_contrastive import _cuda, _library

# Bazel builds the op library from the sources and with the flags CMake uses,
# and that library passes the core tests (support.CORE_TESTS).
TARGET = "//:fused_contrastive_ops"
LIBRARY = "_fused_contrastive_ops.so"
APT_COMMAND = "apt-get install -y bazel-bootstrap bazel-rules-java bazel-platforms"
# Where .bazelrc points rules_java and platforms (Debian's packages).
DEBIAN_RULES = [Path("/usr/share/bazel/rules/java"), Path("/usr/share/bazel/tools/platforms")]

pytestmark = pytest.mark.skipif(
    shutil.which("bazel") is None or not all(p.is_dir() for p in DEBIAN_RULES),
    reason=f"Debian's offline Bazel (bazel and its rules_java, platforms) is not installed: "
    f"{APT_COMMAND}",
)


class Bazel:
    """The documented `bazel ...` commands, with their own output root (so the
    test neither reuses nor disturbs a developer's Bazel state) and without
    the bazel-* convenience links in the source tree."""

    def __init__(self, output_root):
        self.startup = ["bazel", f"--output_user_root={output_root}", "--max_idle_secs=600"]
        self.env = {**os.environ, "PYTHON_BIN_PATH": sys.executable}

    def __call__(self, command, *args, check=True, env=None):
        extra = ["--symlink_prefix=/"] if command == "build" else []
        result = subprocess.run(
            self.startup + [command, *extra, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if check and result.returncode != 0:
            pytest.fail(f"bazel {command} {' '.join(args)} failed:\n{result.stderr[-6000:]}")
        return result.stdout

    def build(self, dest, *flags, env=None):
        """Builds the op library and copies it with its _build_info.json to `dest`
        (the next build in another configuration overwrites bazel-bin)."""
        self("build", *flags, TARGET, env=env)
        bin_dir = Path(self("info", *flags, "bazel-bin", env=env).strip())
        dest.mkdir()
        for name in (LIBRARY, "_build_info.json"):
            shutil.copy(bin_dir / name, dest / name)
        return dest / LIBRARY


@pytest.fixture(scope="module")
def bazel(tmp_path_factory):
    runner = Bazel(tmp_path_factory.mktemp("bazel_root"))
    yield runner
    runner("shutdown", check=False)


@pytest.fixture(scope="module")
def cpu_library(bazel, tmp_path_factory):
    return bazel.build(tmp_path_factory.mktemp("bazel_cpu") / "out")


def loaded_build_info(library):
    """fused_contrastive.build_info() in a fresh process that loads `library`."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, fused_contrastive as fc; print(json.dumps(fc.build_info()))",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, _library.LIBRARY_ENV: str(library)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bazel_library_reports_how_it_was_built(cpu_library):
    info = loaded_build_info(cpu_library)
    assert info["library"] == str(cpu_library) and not info["using_reference"]
    assert info["build_system"].startswith("bazel ")
    assert info["version"] == fused_contrastive.__version__
    assert info["tensorflow_version"] == tf.__version__
    assert info["source_dir"] == str(ROOT)
    assert info["cuda"] is False and info["cuda_architectures"] == ""
    assert info["build_type"] == "opt" and info["cxx_compiler"]
    # What CMake's build reports, the same keys.
    assert set(info) == set(fused_contrastive.build_info())
    assert info["tensorflow_cuda_version"] == tf.sysconfig.get_build_info().get("cuda_version", "")


def test_bazel_library_links_tensorflow_after_its_objects(cpu_library):
    dynamic = subprocess.run(
        ["readelf", "-d", str(cpu_library)], capture_output=True, text=True, check=True
    ).stdout
    assert "[libtensorflow_framework.so.2]" in dynamic
    assert "[libtensorflow_cc.so.2]" in dynamic


def test_bazel_library_passes_core_tests(cpu_library, tmp_path):
    result = run_core_tests_against(cpu_library, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def _compile_flags(args):
    """(source, flags) of one compile command line, without the compiler, the
    input and output files and include directories (whose paths differ between
    the build systems). Of -O and -std only the last one counts."""
    flags, last, source = set(), {}, None
    args = iter(args[1:])
    for arg in args:
        if arg in ("-o", "-MF", "-isystem", "-iquote", "-I"):
            next(args)
        elif arg == "-c":
            source = next(args)
        # Joined include directories (CMake's -isystem<dir> for Eigen too), and
        # CMake's -D<target>_EXPORTS.
        elif arg.startswith(("-I", "-isystem")) or arg.endswith("_EXPORTS"):
            continue
        elif arg.startswith(("-O", "-std=")):
            last[arg[:2] if arg.startswith("-O") else "-std"] = arg
        else:
            flags.add(arg)
    return source, flags | set(last.values())


def _unity_sources(source):
    """The sources a CMake compile command compiles: those a unity source
    (CMake's generated Unity/*.cxx, which CMake writes at configure time)
    includes, else the source itself."""
    if source.parent.name != "Unity":
        return [source]
    lines = source.read_text().splitlines()
    return [Path(line.split('"')[1]) for line in lines if line.startswith("#include")]


def test_bazel_compiles_the_sources_cmake_compiles_with_its_flags(bazel, cpu_library, tmp_path):
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path),
            "-DFC_CUDA=OFF",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        ],
        check=True,
        capture_output=True,
    )
    cmake = {}
    for entry in json.loads((tmp_path / "compile_commands.json").read_text()):
        if "_fused_contrastive_ops.dir" in entry["command"]:
            source, flags = _compile_flags(shlex.split(entry["command"]))
            for compiled_source in _unity_sources(Path(source)):
                cmake[str(compiled_source.relative_to(ROOT))] = flags
    actions = json.loads(
        bazel("aquery", f"mnemonic('CppCompile', deps(//:{LIBRARY}))", "--output=jsonproto")
    )["actions"]
    compiled = {}
    for action in actions:
        if "-fPIC" in action["arguments"]:  # the objects a shared library links
            source, flags = _compile_flags(action["arguments"])
            compiled[source] = flags
    assert cmake and set(compiled) == set(cmake)
    for source, flags in cmake.items():
        missing = flags - compiled[source]
        assert not missing, f"{source}: Bazel does not compile it with CMake's {sorted(missing)}"


def test_bazel_cuda_build_registers_gpu_kernels_with_the_recorded_device_code(
    bazel, cpu_library, tmp_path_factory, tmp_path
):
    # The system nvcc where there is one, else the PyPI toolchain setup.py uses.
    nvcc = _cuda.system_nvcc()
    source = "system" if nvcc else "pypi"
    nvcc = nvcc or str(_cuda.pypi_nvcc(tmp_path_factory.mktemp("pypi_cuda")))
    library = bazel.build(
        tmp_path_factory.mktemp("bazel_cuda") / "out", "--config=cuda", env={"NVCC": nvcc}
    )
    info = loaded_build_info(library)
    version = (
        subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
        .stdout.split(", V")[-1]
        .split()[0]
    )
    assert info["cuda"] is True and info["cuda_compiler"] == f"NVIDIA {version}"
    assert info["cuda_version"] == ".".join(version.split(".")[:2])
    assert info["cuda_compiler_source"] == source
    assert info["build_system"].startswith("bazel ")
    # The registry and device-code checks of the CMake builds, on this library.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(ROOT / "tests/packaging/test_build_variants.py"),
            "-k",
            "every_dtype_pair or exactly_when_built_with_cuda or device_code",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, _library.LIBRARY_ENV: str(library)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout

"""Writes _build_info.json for the Bazel-built op library, with the keys that
CMake writes from cc/build_info.json.in. Run by the //:build_info genrule."""

import argparse
import json
import re
import subprocess


def version_of_package(init_py):
    """__version__ from the package's __init__.py, the single place it is written."""
    with open(init_py, encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if not match:
        raise SystemExit(f"no __version__ line in {init_py}")
    return match.group(1)


def compiler_name(cc):
    """'GNU 12.2.0' or 'Clang 16.0.6', as CMake names C++ compilers."""
    banner = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    version = subprocess.run(
        [cc, "-dumpversion"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if "clang" in banner.lower():
        return f"Clang {version}"
    full = subprocess.run([cc, "-dumpfullversion"], capture_output=True, text=True).stdout
    return f"GNU {full.strip() or version}"


def cuda_version(compiler):
    """'13.0' for 'NVIDIA 13.0.88': the toolkit's major.minor, as CMake records it."""
    match = re.search(r"(\d+\.\d+)", compiler)
    if not match:
        raise SystemExit(f"no CUDA version in the compiler name {compiler!r}")
    return match.group(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    for arg in (
        "out",
        "init-py",
        "cc",
        "tensorflow-version",
        "tensorflow-cuda-version",
        "bazel-version",
        "build-type",
        "cuda",
        "cuda-compiler",
        "cuda-compiler-source",
        "cuda-architectures",
        "source-dir",
    ):
        parser.add_argument(f"--{arg}", required=True)
    args = parser.parse_args()
    cuda = args.cuda == "1"
    info = {
        "version": version_of_package(args.init_py),
        "tensorflow_version": args.tensorflow_version,
        "tensorflow_cuda_version": args.tensorflow_cuda_version,
        "build_system": f"bazel {args.bazel_version}",
        "cxx_compiler": compiler_name(args.cc),
        "build_type": args.build_type,
        "cuda": cuda,
        "cuda_compiler": args.cuda_compiler if cuda else "",
        "cuda_compiler_source": args.cuda_compiler_source if cuda else "",
        "cuda_version": cuda_version(args.cuda_compiler) if cuda else "",
        "cuda_architectures": args.cuda_architectures if cuda else "",
        "source_dir": args.source_dir,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()

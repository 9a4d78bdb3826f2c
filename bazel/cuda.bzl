"""nvcc under Bazel 4 without a CUDA toolchain: one genrule per .cu.cc file.

The object needs no TensorFlow headers and no cudart of its own: the op
library resolves the CUDA runtime calls against the cudart that
libtensorflow_framework exports (see the CUDA section of CMakeLists.txt).
"""

load("@local_cuda//:config.bzl", "NVCC")

def gencode_flags(archs):
    """nvcc -gencode flags for CMake-style architectures: "80-real" is sm_80
    machine code only, "90" is sm_90 machine code plus compute_90 PTX,
    "90-virtual" is the PTX only."""
    flags = []
    for arch in archs:
        number = arch.split("-")[0]
        if arch.endswith("-real"):
            code = "sm_" + number
        elif arch.endswith("-virtual"):
            code = "compute_" + number
        else:
            code = "[sm_%s,compute_%s]" % (number, number)
        flags.append("-gencode arch=compute_%s,code=%s" % (number, code))
    return flags

def _nvcc_object(name, src, hdrs, archs, nvcc_flags):
    """A genrule `<name>_nvcc` compiling `src` into `<name>.pic.o`; returns the
    object's name."""
    if NVCC:
        cmd = " ".join([
            NVCC,
            "-c -x cu -std=c++17 -O3 -DNDEBUG -Xcompiler -fPIC",
        ] + nvcc_flags + gencode_flags(archs) + [
            "-Icc",  # sources include "core/<family>/..."
            "$(location %s) -o $@" % src,
        ])
    else:
        cmd = ("echo 'No nvcc found for --config=cuda: put nvcc on PATH or set " +
               "NVCC=/path/to/nvcc (or build without --config=cuda).' >&2; exit 1")
    native.genrule(
        name = name + "_nvcc",
        srcs = [src] + hdrs,
        outs = [name + ".pic.o"],
        cmd = cmd,
        message = "Compiling %s with nvcc" % src,
        tags = ["manual"],
    )
    return name + ".pic.o"

def cuda_library(name, srcs, hdrs, archs, nvcc_flags = []):
    """A cc_library `name` holding `srcs` compiled by nvcc (per source a
    genrule writing `<name>_<dir>_<stem>.pic.o`, linkable into a shared library).
    All are tagged manual: only targets that select them (--config=cuda)
    build them."""
    objects = []
    for src in srcs:
        # cc/core/<family>/gpu.cu.cc -> <family>_gpu: every family has a gpu.cu.cc
        stem = "_".join(src.split("/")[-2:]).split(".")[0]
        objects.append(_nvcc_object(name + "_" + stem, src, hdrs, archs, nvcc_flags))
    native.cc_library(
        name = name,
        srcs = objects,
        alwayslink = True,
        tags = ["manual"],
    )

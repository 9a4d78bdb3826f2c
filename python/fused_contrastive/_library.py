"""Loads the compiled op library (or, when asked, the pure-TensorFlow fallback)
and holds what the op modules of the three loss families share."""

import functools
import json
import os
import warnings
from pathlib import Path

import tensorflow as tf

from fused_contrastive import _cuda

# As registered in cc/tf_shared.h (tests check that they name the library's ops).
OP_NAME = "FusedContrastive>ContrastiveLoss"
REDUCED_OP_NAME = "FusedContrastive>ContrastiveLossReduced"
SCALE_OP_NAME = "FusedContrastive>ScaleGradient"
EMBEDDING_OP_NAME = "FusedContrastive>EmbeddingContrastiveLoss"
EMBEDDING_GRAD_OP_NAME = "FusedContrastive>EmbeddingContrastiveLossGrad"
EMBEDDING_REDUCED_OP_NAME = "FusedContrastive>EmbeddingContrastiveLossReduced"
EMBEDDING_PAIR_REDUCED_OP_NAME = "FusedContrastive>EmbeddingPairContrastiveLossReduced"
IN_BATCH_OP_NAME = "FusedContrastive>InBatchContrastiveLoss"
IN_BATCH_GRAD_OP_NAME = "FusedContrastive>InBatchContrastiveLossGrad"
IN_BATCH_REDUCED_OP_NAME = "FusedContrastive>InBatchContrastiveLossReduced"
USE_REFERENCE_ENV = "FUSED_CONTRASTIVE_USE_REFERENCE"
# Another build of the op library to load instead of the packaged one (a CMake
# build directory's copy, the Bazel-built one); its _build_info.json sits beside it.
LIBRARY_ENV = "FUSED_CONTRASTIVE_LIBRARY"


def _library_path():
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parent / "_fused_contrastive_ops.so"


def _read_build_info():
    path = _library_path().parent / "_build_info.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_tensorflow_version(built, installed, source_dir):
    """Raises ImportError when the library was built against another TensorFlow:
    custom-op libraries have no stable ABI across TensorFlow releases."""
    if built != installed:
        raise ImportError(
            f"fused_contrastive was built against TensorFlow {built}, but TensorFlow "
            f"{installed} is installed. Rebuild it with: {_cuda.rebuild_command(source_dir)}  "
            f"(or set {USE_REFERENCE_ENV}=1 to use the slower pure-TensorFlow implementation)"
        )


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _load():
    if _env_flag(USE_REFERENCE_ENV):
        warnings.warn(
            f"{USE_REFERENCE_ENV} is set: fused_contrastive uses its pure-TensorFlow "
            "implementation instead of the compiled op (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    path = _library_path()
    info = _read_build_info()
    if info is None or not path.exists():
        raise ImportError(
            f"fused_contrastive's compiled op library or its _build_info.json is missing: {path}. "
            "Install the package with 'pip install .' from its source tree (or set "
            f"{USE_REFERENCE_ENV}=1 to use the pure-TensorFlow implementation)"
        )
    check_tensorflow_version(info["tensorflow_version"], tf.__version__, info["source_dir"])
    # Before loading: loading registers the CUDA kernels' fatbinary with the
    # driver. A CPU-only build needs no driver, so none is looked up.
    too_old = _cuda.required_driver(info) and _cuda.driver_too_old_message(
        info, _cuda.installed_driver()
    )
    if too_old:
        raise ImportError(
            f"{too_old}; or set {USE_REFERENCE_ENV}=1 to use the slower "
            "pure-TensorFlow implementation"
        )
    return tf.load_op_library(str(path))


# The loaded library, whose fused_contrastive_* functions run the ops; None
# under the fallback. The op modules read its attributes at call time.
op_library = _load()


def gpu_without_cuda_message(info, gpus):
    """What the import warns when TensorFlow sees GPUs (`gpus`) but the loaded
    library (build info `info`) has no CUDA kernels, else None: the losses then
    run on the CPU, and every step copies their inputs off the GPU and back."""
    if not gpus or info is None or info.get("cuda"):
        return None
    source = info.get("source_dir") or _cuda.UNKNOWN_SOURCE
    return (
        f"fused_contrastive: TensorFlow sees {len(gpus)} GPU(s), but this build of "
        f"fused_contrastive has CPU kernels only (built by {info.get('build_system', '?')} "
        f"from {source} without a CUDA compiler: nvcc was not found, or "
        "FUSED_CONTRASTIVE_CUDA=off), so its losses run on the CPU and copy their inputs from "
        "the GPU every step. Rebuild with CUDA kernels (without a CUDA toolkit, the build "
        "fetches the CUDA 13 compiler from PyPI into its temporary directory): "
        f"FUSED_CONTRASTIVE_CUDA=on {_cuda.rebuild_command(source)}"
    )


def _warn_if_gpu_without_cuda():
    if using_reference():
        return
    message = gpu_without_cuda_message(_read_build_info(), tf.config.list_physical_devices("GPU"))
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def using_reference():
    """True when the pure-TensorFlow fallback is in use instead of the compiled op."""
    return op_library is None


_warn_if_gpu_without_cuda()


def build_info():
    """How the compiled library was built (TensorFlow and its CUDA version,
    compilers, CUDA version, architectures and compiler source), the driver its
    CUDA kernels need and the one found, where it was loaded from, and whether
    the fallback is in use."""
    info = dict(_read_build_info() or {})
    needed = _cuda.required_driver(info)
    info["cuda_driver_required"] = (
        f"CUDA {_cuda.api_version_name(needed[0])} (Linux driver >= {needed[1]})" if needed else ""
    )
    driver = _cuda.installed_driver()
    info["cuda_driver_found"] = (
        f"{driver[1] or 'unknown'} (CUDA {_cuda.api_version_name(driver[0])})" if driver else ""
    )
    info["library"] = None if using_reference() else str(_library_path())
    info["using_reference"] = using_reference()
    return info


@functools.lru_cache(maxsize=256)
def _eager_scalar(value, dtype):
    with tf.device("/cpu:0"):
        return tf.constant(value, dtype)


def scalar(value, dtype=tf.float64):
    """A scalar constant: margin and loss_scale (float64, host memory), or a
    sample weight of 1."""
    if not isinstance(value, (int, float)):  # a tensor already (tf.is_tensor is slow)
        return value
    if not tf.executing_eagerly():
        return tf.constant(value, dtype)  # a Const node in the graph
    # Eager calls reuse one tensor per value instead of building one per step
    # (which costs more than the op itself on small inputs). The cache is
    # bounded: a margin schedule passed as Python floats would otherwise keep
    # one tensor per value forever.
    return _eager_scalar(value, dtype)


def reference_gradients(loss_fn, tensors, upstream):
    """Gradients of loss_fn(*tensors) (the reference) by autodiff.

    Used while a tape records the backward pass itself (a Hessian, a gradient
    penalty, or gradient() called inside a persistent tape's block): the fused
    kernels' gradients are first-order only, the reference's can be
    differentiated again.
    """
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = loss_fn(*tensors)
    return tape.gradient(loss, tensors, output_gradients=upstream)


def constant_scale(scale, dtype):
    """A fused-reduction op's reduction_scale output, cast to dtype, as the
    constant it is to autodiff: it depends on the weights and the batch size
    only, and the op has no registered gradient, so an outer tape recording a
    second-order backward pass must not trace it back to the op."""
    return tf.cast(tf.stop_gradient(scale), dtype)


def no_second_order(op, loss, reference_name):
    """The error for tf.gradients of a fused gradient op. Only graph-mode
    gradients of gradients (tf.hessians) get there: backward passes that a
    tape records use the reference instead."""
    return NotImplementedError(
        f"{op.name}: tf.gradients cannot differentiate the fused {loss} loss twice; use "
        "tf.GradientTape (nested tapes differentiate it to any order) or "
        f"fused_contrastive.{reference_name}"
    )

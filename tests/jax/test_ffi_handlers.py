"""cc/ffi: the typed-FFI handlers TensorFlow's XLA CPU backend calls serve JAX
too (issue 22, its first step). The pybind11 module exports each target's
handler as a capsule (FFI_TARGETS) and the int32 value of each attr name
(FFI_ATTRS); registered with JAX, jax.ffi.ffi_call runs the CPU kernels under
jax.jit, in a process where importing TensorFlow fails, and gives the
kernels' own bits."""

import json
import textwrap

import numpy as np
import pytest
from support import run_python

import fused_contrastive
from fused_contrastive import _inputs, _kernels, _library

# Loads _kernels by its path (the package's __init__ imports TensorFlow) with
# TensorFlow made unimportable, and registers the handlers with JAX.
_JAX_PRELUDE = """
import importlib.abc, importlib.util, json, sys
import numpy as np

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("TensorFlow is not installed here")

sys.meta_path.insert(0, NoTensorFlow())
spec = importlib.util.spec_from_file_location("_kernels", {path!r})
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
import jax
jax.config.update("jax_enable_x64", True)  # the handlers take int64 labels, float64 margins
for name, capsule in kernels.FFI_TARGETS.items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
attrs = kernels.FFI_ATTRS
"""


def _jax(code):
    code = _JAX_PRELUDE.format(path=_kernels.__file__) + textwrap.dedent(code)
    result = run_python(code, JAX_PLATFORMS="cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_target_has_a_handler_capsule():
    targets = _kernels.FFI_TARGETS
    assert sorted(targets) == sorted(
        "fused_contrastive_" + name
        for name in (
            "loss",
            "embedding_loss",
            "embedding_loss_jax",
            "embedding_loss_grad",
            "embedding_pair_loss_jax",
            "embedding_pair_loss_grad",
            "embedding_loss_reduced",
            "embedding_pair_loss_reduced",
            "in_batch_loss",
            "in_batch_loss_grad",
            "in_batch_loss_reduced",
            "in_batch_loss_jax",
            "in_batch_loss_grad_jax",
        )
    )
    # JAX's targets on CUDA, where the build has CUDA kernels (ffi/gpu.cc).
    cuda = fused_contrastive.build_info()["cuda"]
    assert sorted(_kernels.FFI_CUDA_TARGETS) == sorted(
        "fused_contrastive_" + name
        for name in (
            "loss",
            "embedding_loss_jax",
            "embedding_loss_grad",
            "embedding_pair_loss_jax",
            "embedding_pair_loss_grad",
            "in_batch_loss_jax",
            "in_batch_loss_grad_jax",
        )
        if cuda
    )
    assert all(type(capsule).__name__ == "PyCapsule" for capsule in targets.values())
    # The targets the TF lowerings emit are these very names (cc/ffi/targets.h).
    assert _library.op_library is not None


def test_the_attr_values_name_what_python_names():
    attrs = _kernels.FFI_ATTRS
    assert tuple(attrs["distance"]) == _inputs.DISTANCES
    assert tuple(attrs["pair_weighting"]) == _inputs.PAIR_WEIGHTINGS
    assert tuple(attrs["miner"]) == ("none", *_inputs.MINERS)
    assert tuple(attrs["reduction"]) == ("sum", "mean", "weighted_mean")
    for values in attrs.values():
        assert sorted(values.values()) == list(range(len(values)))


@pytest.mark.parametrize("miner", ["none", *_inputs.MINERS])
def test_jax_runs_the_in_batch_handlers_with_the_kernels_bits(rng, miner):
    labels = rng.integers(0, 4, 37)
    e = rng.normal(size=(37, 6))
    upstream = rng.normal(size=37)
    got = _jax(f"""
        import jax.numpy as jnp
        inputs = {[labels.tolist(), e.tolist(), upstream.tolist()]}
        labels, e, upstream = (np.array(x) for x in inputs)
        margins = np.float64(1.25), np.float64(0.25)
        options = dict(
            distance=np.int32(attrs["distance"]["cosine"]),
            pair_weighting=np.int32(attrs["pair_weighting"]["active"]),
            max_block_rows=np.int32(5),
            miner=np.int32(attrs["miner"][{miner!r}]),
            miner_epsilon_bits=np.float32(0.25).view(np.int32),
        )
        rows = np.full(4, 37, np.int64)
        rows[0] = 0
        grad_and_loss = jax.ffi.ffi_call(
            "fused_contrastive_in_batch_loss_grad",
            (jax.ShapeDtypeStruct((37, 6), np.float64), jax.ShapeDtypeStruct((37,), np.float64)),
        )
        step = jax.jit(lambda e, u: grad_and_loss(labels, e, rows, u, *margins, **options))
        grad, loss = step(jnp.asarray(e), jnp.asarray(upstream))
        bad = rows.copy()
        bad[:2] = 5, 2  # begin past end
        try:
            grad_and_loss(labels, e, bad, upstream, *margins, **options)[0].block_until_ready()
            error = ""
        except Exception as exception:
            error = str(exception)
        loss, grad = (np.asarray(x).view(np.int64).tolist() for x in (loss, grad))
        print(json.dumps([loss, grad, error]))
    """)
    want_loss, want_grad = _kernels.in_batch_loss_cpu(
        labels,
        e,
        upstream,
        1.25,
        0.25,
        "cosine",
        "active",
        5,
        miner=None if miner == "none" else miner,
        miner_epsilon=0.25,
    )
    # The kernel's results do not depend on the thread count: the same bits.
    assert got[0] == want_loss.view(np.int64).tolist()
    assert got[1] == want_grad.view(np.int64).tolist()
    assert "anchors must be [begin, end, grad, used]" in got[2], got[2]


def test_jax_runs_the_embedding_handler_with_the_kernels_bits(rng):
    labels = rng.integers(0, 2, 50)
    a, b = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    got = _jax(f"""
        labels, a, b = (np.array(x) for x in {[labels.tolist(), a.tolist(), b.tolist()]})
        loss_and_coefficients = jax.ffi.ffi_call(
            "fused_contrastive_embedding_loss",
            (jax.ShapeDtypeStruct((50,), np.float64), jax.ShapeDtypeStruct((50, 1), np.float64)),
        )
        euclidean = np.int32(attrs["distance"]["euclidean"])
        loss, coefficients = jax.jit(
            lambda a, b: loss_and_coefficients(
                labels, a, b, np.float64(1.5), distance=euclidean, similar_label=np.int32(1)
            )
        )(a, b)
        print(json.dumps([np.asarray(loss).view(np.int64).tolist(),
                          np.asarray(coefficients).view(np.int64).tolist()]))
    """)
    want_loss, want_coefficients = _kernels.embedding_loss_cpu(labels, a, b, 1.5, "euclidean", 1)
    assert got[0] == want_loss.view(np.int64).tolist()
    assert got[1] == want_coefficients.view(np.int64).tolist()

"""tests/gpu/check_gpu.py: its --self-test runs every check with the CPU kernel as the GPU
(and, TensorFlow being installed here, the TF-op part with /CPU:0 as the GPU). It takes the
installed kernel module (--installed): building another one would only repeat setup.py's build."""

import os
import subprocess
import sys
from pathlib import Path

import fused_contrastive
from fused_contrastive import _inputs, _library

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "check_gpu.py"


def test_gpu_check_script_self_test():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--self-test", "--installed"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    weightings = len(_inputs.PAIR_WEIGHTINGS)  # the in-batch checks run each one
    installed = Path(fused_contrastive.__file__).parent
    assert f"loaded {installed}/_kernels." in out.splitlines()[0], out.splitlines()[0]
    assert "200 aligned cases compared" in out and "60 misaligned cases compared" in out
    assert "140 aligned cases compared with similar_label=0" in out
    assert "153 reduced cases compared" in out
    assert "fused reduced" in out and "of copy" in out
    assert "132 embedding cases compared" in out
    assert "96 misaligned embedding cases compared" in out
    assert "432 reduced embedding cases compared" in out
    assert "embedding reduced (forward+backward)" in out and "rows=   16,384" in out
    assert f"{60 * weightings} in-batch cases compared" in out
    assert f"{180 * weightings} reduced in-batch cases compared" in out
    assert "in-batch at B=4,096 D=128" in out and "loss+grad" in out
    assert f"{56 * weightings} in-batch anchor-slice cases compared" in out
    assert f"{36 * weightings} in-batch cosine cases at extreme row scales compared" in out
    miners = len(_inputs.MINERS)  # 2 distances, 2 float32 sizes and 3 float64 sizes each
    assert f"{10 * miners * weightings} in-batch miner cases compared" in out
    # Step 10: fused_contrastive.jax, JAX's CPU standing in for the GPU.
    for cases in (
        "distances float32: 24 cases",
        "pairs float32: 24 cases",
        "pairs float64: 24 cases",
        "in-batch float32: 90 cases",
        "in-batch float64: 90 cases",
    ):
        assert f"  {cases} on cpu against the CPU, 0 mismatches" in out, out
    ops = [key for key in vars(_library) if key.endswith("OP_NAME")]
    assert f"{len(ops)} TF ops checked for a registered CPU kernel" in out
    cases = 28 + 16 * weightings + 8 * miners
    assert f"{cases} TF-op cases compared, /CPU:0 against /CPU:0" in out
    summary = [line for line in out.splitlines() if line.startswith("TF-op summary: ")]
    assert len(summary) == 1, out
    assert (
        "device=CPU:0 (self-test stand-in for the GPU) ops=PASS N=1e6 fwd+bwd fused " in summary[0]
    ), summary[0]
    for timed in ("fused reduced", "plain", "XLA", "fused XLA", "in-batch B=512 D=128"):
        assert f" {timed} " in summary[0], summary[0]
    assert " nan " not in summary[0]
    assert "FAIL" not in out
    assert "PASSED: 0 mismatches" in out


def test_missing_prerequisites_are_named_at_once_before_building(tmp_path):
    # ml_dtypes and cupy made unimportable, and an FC_EIGEN_INCLUDE without
    # Eigen: the script failed on the first import, or after minutes of
    # compiling on the next; now one message names all three, and the cure.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; sys.modules['ml_dtypes'] = None; "
            "sys.modules['cupy'] = None; sys.argv = [sys.argv[0]]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FC_EIGEN_INCLUDE": str(tmp_path)},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "check_gpu.py cannot run; nothing was built. Missing:", lines
    assert lines[1] == (
        f"  - Python modules ml_dtypes, cupy: {sys.executable} -m pip install "
        "ml_dtypes cupy-cuda12x (cupy-cuda13x for a CUDA 13 driver)"
    ), lines
    assert lines[2].startswith(
        f"  - Eigen headers (FC_EIGEN_INCLUDE={tmp_path} has no "
        "Eigen/Core): set FC_EIGEN_INCLUDE to a directory holding "
    ), lines
    assert len(lines) == 3, lines
    assert not list(tmp_path.iterdir())  # and nothing was built there


def test_self_test_needs_no_cupy():
    # --self-test --installed (what CI runs) needs only NumPy and ml_dtypes.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['cupy'] = None; "
            f"sys.path.insert(0, {str(SCRIPT.parent)!r}); import check_gpu; "
            "print(check_gpu.missing_prerequisites(check_gpu.parse_args(['--self-test', "
            "'--installed'])))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

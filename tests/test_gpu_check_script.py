"""tests/gpu/check_gpu.py: its --self-test runs every check with the CPU kernel as the GPU
(and, TensorFlow being installed here, the TF-op part with /CPU:0 as the GPU). It takes the
installed kernel module (--installed): building another one would only repeat setup.py's build."""

import subprocess
import sys
from pathlib import Path

import fused_contrastive

SCRIPT = Path(__file__).resolve().parent / "gpu" / "check_gpu.py"


def test_gpu_check_script_self_test():
    result = subprocess.run([sys.executable, str(SCRIPT), "--self-test", "--installed"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
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
    assert "120 in-batch cases compared" in out
    assert "360 reduced in-batch cases compared" in out
    assert "in-batch at B=4,096 D=128" in out and "loss+grad" in out
    assert "9 TF ops checked for a registered CPU kernel" in out
    assert "60 TF-op cases compared, /CPU:0 against /CPU:0" in out
    summary = [line for line in out.splitlines() if line.startswith("TF-op summary: ")]
    assert len(summary) == 1, out
    assert ("device=CPU:0 (self-test stand-in for the GPU) ops=PASS N=1e6 fwd+bwd fused "
            in summary[0]), summary[0]
    for timed in ("fused reduced", "plain", "XLA", "fused XLA", "in-batch B=512 D=128"):
        assert f" {timed} " in summary[0], summary[0]
    assert " nan " not in summary[0]
    assert "FAIL" not in out
    assert "PASSED: 0 mismatches" in out

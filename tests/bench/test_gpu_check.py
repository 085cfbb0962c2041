"""scripts/gpu_check.py fails where CUDA was asked for and the model runs elsewhere, and skips
only where there is no NVIDIA GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gru_serve.bench import gpu

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_cuda_silently_on_the_cpu_fails_the_check():
    """onnxruntime falls back to the CPU provider when CUDA does not initialise: here because
    no CUDA device is visible (and, on a machine without a GPU, none exists)."""
    r = run_check("--assume-gpu", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "runs on CPUExecutionProvider" in r.stdout
    assert "SKIPPED" not in r.stdout


@pytest.mark.skipif(gpu.nvidia_gpu_present(), reason="this machine has an NVIDIA GPU")
def test_without_an_nvidia_gpu_the_check_skips():
    r = run_check()
    assert r.returncode == 0 and "gpu check: SKIPPED: no NVIDIA GPU" in r.stdout, r.stdout + r.stderr


def test_no_gpu_means_skipped_and_0_on_any_machine(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "nvidia_gpu_present", lambda: False)
    assert gpu.gpu_check() == 0 and capsys.readouterr().out.startswith("gpu check: SKIPPED")


def test_a_working_nvidia_smi_counts_as_a_gpu(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu.nvidia_gpu_present()

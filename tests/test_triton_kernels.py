"""Triton kernels of the `triton` back end, checked on the CPU in the Triton interpreter.

The interpreter is chosen when the kernels are decorated (import time), from TRITON_INTERPRET.
Setting it in this process would flip every later triton import of the test session, so the
kernel tests (`tests/triton_cases.py`) run in a fresh pytest subprocess with the variable set;
their report is shown here on failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(args: list[str], env_changes: dict[str, str | None], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_kernels_match_torch_in_the_interpreter(tiny_model_dirs):
    # No plugins: the cases need none, and loading (and assertion-rewriting) them costs 3-4 s.
    proc = _run(["-m", "pytest", "tests/triton_cases.py", "-q", "-p", "no:cacheprovider"],
                {"TRITON_INTERPRET": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                 "LIGHTSERVE_TEST_TINY_LLAMA": str(tiny_model_dirs["llama"])}, timeout=900)
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_clear_error_without_gpu_or_interpreter():
    """Asking for the triton back end where kernels cannot launch fails at once, saying why."""
    script = textwrap.dedent("""
        import torch
        from lightserve.backend.attention import make_attention
        from lightserve.backend.kernels.ops import TritonOps
        from lightserve.backend.kernels.runtime import TritonUnavailableError

        assert not torch.cuda.is_available()
        calls = (lambda: make_attention("triton", 4, 2, 64),
                 lambda: TritonOps.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6))
        for call in calls:
            try:
                call()
            except TritonUnavailableError as exc:
                assert "CUDA GPU" in str(exc) and "TRITON_INTERPRET=1" in str(exc), exc
            else:
                raise AssertionError("no error")
        print("ok")
    """)
    proc = _run(["-c", script], {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-5000:]

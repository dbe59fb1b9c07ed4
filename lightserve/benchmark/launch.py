"""`--launch`: start `python -m lightserve.api_server` for the benchmark and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """The server as a subprocess on a free local port; a context manager that waits for `/health`
    on entry and stops the server (SIGTERM, then SIGKILL of its process group) on exit.

    The server's output goes to a log file, whose tail is shown if the server fails to start."""

    def __init__(self, model_dir: str, dtype: Optional[str], extra_args: Sequence[str] = (),
                 start_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dtype_args = ["--data_type", dtype] if dtype else []
        self.cmd = [sys.executable, "-m", "lightserve.api_server", "--model_dir", str(model_dir),
                    "--port", str(self.port), *dtype_args, *extra_args]
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(tempfile.mkstemp(prefix="lightserve-bench-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LaunchedServer":
        with open(self.log_path, "wb") as log:
            # Own session: the whole process tree can be stopped together.
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {self.start_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

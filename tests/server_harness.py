"""The real server (`python -m lightserve.api_server`) as a subprocess, for end-to-end tests.

Built on the benchmark's `LaunchedServer`; adds what tests inspect: the child processes, the
private run directory, the log and the exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import psutil

from lightserve.benchmark.launch import LaunchedServer, free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess(LaunchedServer):
    """Started (and healthy) on construction; `stop()` or leaving a `with` block stops it."""

    def __init__(self, model_dir: str | Path, *extra_args: str, start_timeout_s: float = 240.0):
        super().__init__(str(model_dir), None, ["--device", "cpu", *extra_args], start_timeout_s)
        super().__enter__()
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run_dir(self) -> Optional[str]:
        """The private run directory of this instance (found through the children's socket files)."""
        for child in self.children:
            try:
                for conn in child.net_connections(kind="unix"):
                    if conn.laddr and "lightserve-" in conn.laddr:
                        return os.path.dirname(conn.laddr)
            except psutil.Error:
                continue
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        for child in self.children:
            if child.is_running():
                child.kill()

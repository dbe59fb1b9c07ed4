"""Start the real server (`python -m lightserve.api_server`) as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str | Path, *extra_args: str, start_timeout_s: float = 240.0, env: Optional[dict] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lightserve-test-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "lightserve.api_server", "--model_dir", str(model_dir), "--port", str(self.port),
               "--device", "cpu", *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self._wait_healthy(start_timeout_s)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.read_log()}")

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def run_dir(self) -> Optional[str]:
        """The private run directory of this instance (found through the router's open socket files)."""
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
        for child in getattr(self, "children", []):
            if child.is_running():
                child.kill()

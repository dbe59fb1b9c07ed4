"""The real server (`python -m lightserve.api_server`) as a subprocess, for end-to-end tests.

Built on the benchmark's `LaunchedServer`; adds what tests inspect: the child processes, the
private run directory, the log and the exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

from lightserve.benchmark.launch import LaunchedServer, free_port
from lightserve.cache_manager import shm

__all__ = ["SMOL_SERVER_FLAGS", "TINY_SERVER_FLAGS", "ServerProcess", "assert_stopped_after_child_death", "child_owning", "free_port",
           "kill_child_mid_stream", "shm_of"]

# The flags of the two servers the whole session shares (conftest.py: `tiny_server`, `smol_server`);
# a test that needs other flags starts a server of its own.
TINY_SERVER_FLAGS = ("--data_type", "float32", "--max_total_token_num", "6000", "--max_req_total_len", "1024",
                     "--log_level", "info", "--log_stats_interval", "0.2")
SMOL_SERVER_FLAGS = ("--data_type", "float32", "--max_total_token_num", "2048", "--max_req_total_len", "512",
                     "--log_level", "warning")


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


def shm_of(run_dir: str) -> list[str]:
    """The shared-memory segments of the instance with this run directory (other instances on the
    host, e.g. other test runs, have their own)."""
    return list(shm.list_segments(shm.segment_prefix(run_dir)))


def child_owning(server: ServerProcess, socket_name: str) -> psutil.Process:
    """The child process that bound `socket_name` in the run directory."""
    return next(c for c in server.children
                if any(conn.laddr.endswith(socket_name) for conn in c.net_connections(kind="unix") if conn.laddr))


def kill_child_mid_stream(server: ServerProcess, socket_name: str, body: dict) -> tuple[list[dict], float]:
    """Stream `body` from /generate_stream and SIGKILL the child owning `socket_name` after the
    third event; returns every event the stream delivered and the time of the kill."""
    victim = child_owning(server, socket_name)
    events: list[dict] = []
    killed_at = 0.0
    with httpx.stream("POST", server.url + "/generate_stream", timeout=60, json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 3:
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
    return events, killed_at


def assert_stopped_after_child_death(server: ServerProcess, run_dir: str, child: str, events: list[dict],
                                     killed_at: float) -> None:
    """The stream ended with an error naming the child; the server exited with code 1 within
    10 s, leaving no child process, run directory or shared memory, and logged the death once."""
    assert "error" in events[-1] and f"{child} died" in events[-1]["error"], events[-1]
    assert all("token" in e for e in events[:-1])
    assert server.proc.wait(10) == 1
    assert time.monotonic() - killed_at < 10
    _, alive = psutil.wait_procs(server.children, timeout=5)
    assert not alive
    assert not os.path.exists(run_dir)
    assert shm_of(run_dir) == []
    log = server.read_log()
    assert log.count("child process") == 1, log[-2000:]
    assert f"child process {child} died (exit code -9)" in log, log[-2000:]

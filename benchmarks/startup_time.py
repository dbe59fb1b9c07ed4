"""Server start-up: seconds from `python -m lightserve.api_server` to the first healthy `/health`,
and the CPU seconds each process spent getting there.

    python benchmarks/startup_time.py                        # the embedded model, default flags
    python benchmarks/startup_time.py --server-args="--data_type float32" --runs 7
    python benchmarks/startup_time.py --source /path/to/older/checkout   # the same, from other code

`--source` puts another checkout's `lightserve` first on the server's PYTHONPATH, so two versions
are measured by one script on one machine. On two cores the processes start in parallel and share
them: a process's CPU seconds are what it adds to everyone's wait.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

import httpx
import psutil

from lightserve.benchmark.launch import free_port
from lightserve.benchmark.report import cpu_name


def start_once(model_dir: str, server_args: list[str], source: Optional[str]) -> tuple[float, dict[str, float]]:
    """One start: seconds until /health answers 200, and CPU seconds by process role."""
    port = free_port()
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "lightserve.api_server", "--model_dir", model_dir, "--port", str(port),
           "--log_level", "warning", *server_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=source or None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        ready = time.monotonic() - t0
        launcher = psutil.Process(proc.pid)
        cpu = {"launcher + httpserver": _cpu(launcher)}
        for child in launcher.children(recursive=True):
            role = _role(child)
            cpu[role] = cpu.get(role, 0.0) + _cpu(child)
        return ready, cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _role(p: psutil.Process) -> str:
    """The child's role, from the socket it listens on in the run directory."""
    try:
        for conn in p.net_connections(kind="unix"):
            name = os.path.basename(conn.laddr or "")
            for sock, role in (("worker", "backend rank"), ("router", "router"), ("detok", "detokenizer"),
                               ("visual", "visual"), ("cache", "cache manager")):
                if name.startswith(sock):
                    return role
    except psutil.Error:
        pass
    return "other (resource tracker)"


def main() -> None:
    from lightserve.utils.embedded_model import embedded_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--server-args", default="", help="extra server flags, one string")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--source", default=None, help="another checkout whose lightserve the server runs")
    args = ap.parse_args()
    model_dir = args.model or str(embedded_model_dir())
    extra = shlex.split(args.server_args)
    start_once(model_dir, extra, args.source)  # warm the page cache and the kernel build cache
    runs = [start_once(model_dir, extra, args.source) for _ in range(args.runs)]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; code: {args.source or 'this checkout'}")
    print(f"model: {model_dir} {' '.join(extra)}")
    print(f"ready: median {statistics.median(r for r, _ in runs):.2f} s "
          f"(runs: {', '.join(f'{r:.2f}' for r, _ in runs)})")
    for role in runs[0][1]:
        print(f"  CPU s, {role}: median {statistics.median(c.get(role, 0.0) for _, c in runs):.2f}")


if __name__ == "__main__":
    main()

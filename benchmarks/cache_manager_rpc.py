"""Round-trip cost of the cache manager's calls: rpyc (what the server uses) beside zmq REQ/REP.

Both sides carry the same msgpack frames (`cache_manager/protocol.py`) to the same
`ImageCache` running `manager.handle` in its own process; only the transport differs. The
rpyc side is the real cache manager process and `CacheClient`'s call path; the zmq side is a
REP socket on an ipc address in the same private run directory, served in a spawned process.

Timed, per call: the request encoded, sent, handled, answered and the reply decoded. The calls
are those one image request makes: the httpserver's `Alloc`, `SetData` (new image) and
`Release`, and the visual server's `Status`, `AllocEmbeds` and `SetEmbeds`; `GetStats` (what
/metrics asks) is the smallest call. Shared-memory writes are the same on both sides and not
timed. CPU time per call (client and server process together) is printed too: it grows far
less than wall time when other work shares the cores.

    python -m benchmarks.cache_manager_rpc                 # 2000 rounds
    python -m benchmarks.cache_manager_rpc --rounds 5000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from multiprocessing.connection import Connection
from typing import Callable

import psutil
import zmq

from lightserve.cache_manager import shm
from lightserve.cache_manager.client import CacheClient
from lightserve.cache_manager.image_cache import ImageCache
from lightserve.cache_manager.manager import handle, start_cache_manager_process
from lightserve.cache_manager.protocol import (
    CACHE_IN, Alloc, AllocEmbeds, EmbedSlot, GetStats, ImageSpec, Payload, Release, Request, SetData, SetEmbeds,
    Status, reply_decoder,
)
from lightserve.launcher import ChildGroup
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths

Call = Callable[[Request], Payload]

WARM_UP = 200  # rounds before the clock starts: connections, caches, allocator
CALLS_PER_ROUND = 7


def serve_zmq(address: str, prefix: str, capacity: int, requests: int, ready: Connection) -> None:
    """The zmq contender: the same cache and handler behind a REP socket, for `requests` calls."""
    cache = ImageCache(prefix, capacity)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(address)
    ready.send(True)
    try:
        for _ in range(requests):
            sock.send(serde.dumps(handle(cache, CACHE_IN.decode(sock.recv()))))
    finally:
        cache.close()
        ctx.destroy(linger=0)


def zmq_caller(sock: zmq.Socket) -> Call:
    def call(req: Request) -> Payload:
        sock.send(serde.dumps(req))
        return reply_decoder(req.reply).decode(sock.recv())
    return call


def one_image_request(call: Call, i: int, timings: dict[str, list[float]]) -> None:
    """The calls of one request with one new image, in the order the server makes them."""
    def timed(name: str, req: Request) -> Payload:
        t0 = time.perf_counter()
        reply = call(req)
        timings.setdefault(name, []).append(time.perf_counter() - t0)
        return reply

    rid = timed("Alloc", Alloc([ImageSpec(f"{i:032x}", 1024, 576)])).records[0].record_id
    timed("SetData", SetData([rid]))
    timed("Status", Status([rid]))
    timed("AllocEmbeds", AllocEmbeds([EmbedSlot(rid, 4096)]))
    timed("SetEmbeds", SetEmbeds([rid]))
    timed("Release", Release([rid]))
    timed("GetStats", GetStats())


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(call: Call, rounds: int, server_pid: int) -> tuple[dict[str, list[float]], float]:
    """Wall time per call by kind, and the CPU time per call of client and server together
    (which grows far less than wall time when other work shares the cores)."""
    timings: dict[str, list[float]] = {}
    for i in range(WARM_UP):
        one_image_request(call, i, {})
    cpu0 = cpu_s(os.getpid()) + cpu_s(server_pid)
    for i in range(rounds):
        one_image_request(call, 1000 + i, timings)
    cpu = cpu_s(os.getpid()) + cpu_s(server_pid) - cpu0
    return timings, cpu / (rounds * CALLS_PER_ROUND)


def report(results: dict[str, dict[str, list[float]]], cpu_per_call: dict[str, float]) -> None:
    names = list(next(iter(results.values())))
    print(f"{'call':<14}" + "".join(f"{t + ' p50 µs':>14}{t + ' p90 µs':>14}" for t in results))
    for name in names:
        row = ""
        for timings in results.values():
            xs = sorted(timings[name])
            row += f"{statistics.median(xs) * 1e6:>14.1f}{xs[int(len(xs) * 0.9)] * 1e6:>14.1f}"
        print(f"{name:<14}{row}")
    for transport, timings in results.items():
        per_request = sum(statistics.median(timings[n]) for n in names if n != "GetStats")
        print(f"{transport}: one image request's 6 calls = {per_request * 1e6:.0f} µs (sum of medians); "
              f"CPU per call, both processes: {cpu_per_call[transport] * 1e6:.0f} µs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2000)
    a = p.parse_args()
    capacity = 64
    paths = RunPaths.create()
    results: dict[str, dict[str, list[float]]] = {}
    cpu_per_call: dict[str, float] = {}
    try:
        children = ChildGroup()
        try:
            children.start([("cache_manager", start_cache_manager_process,
                             (ServerArgs(cache_capacity=capacity, log_level="warning"), paths))])
            client = CacheClient(paths)
            results["rpyc"], cpu_per_call["rpyc"] = measure(client._call, a.rounds, children.children[0].process.pid)
            client.close()
        finally:
            children.stop_all()  # the cache manager unlinks its segments

        spawn = mp.get_context("spawn")
        ready_r, ready_w = spawn.Pipe(duplex=False)
        address = f"ipc://{paths.run_dir}/cache-zmq.sock"
        requests = (WARM_UP + a.rounds) * CALLS_PER_ROUND
        server = spawn.Process(target=serve_zmq, daemon=True,
                               args=(address, shm.segment_prefix(paths.run_dir), capacity, requests, ready_w))
        server.start()
        ready_r.recv()
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.REQ)
            sock.connect(address)
            results["zmq"], cpu_per_call["zmq"] = measure(zmq_caller(sock), a.rounds, server.pid)
        finally:
            ctx.destroy(linger=0)
        server.join(10)
    finally:
        paths.remove()
    report(results, cpu_per_call)


if __name__ == "__main__":
    main()

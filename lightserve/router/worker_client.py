"""The router's handle on the backend ranks of this node: one StepPlan per step over rpyc.

Each step is sent to every rank at once (rpyc async calls) and awaited together; rank 0's
reply is the answer (all ranks compute the same tokens). Ranks on other nodes get the call
from rank 0 (see `backend/worker.py`).
"""

from __future__ import annotations

import time

import rpyc

from lightserve.io_struct import RankCall, Shutdown, StepPlan, StepResult
from lightserve.utils import serde
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.utils.run_paths import RunPaths


class WorkerGroup:
    def __init__(self, paths: RunPaths, ranks: range, connect_timeout_s: float = 60.0):
        self.conns = [self._connect(paths.worker_socket(rank), connect_timeout_s) for rank in ranks]
        # Fetched once: `conn.root.call(...)` would cost a round trip to look the method up on
        # every call before the call itself.
        self._calls = [c.root.call for c in self.conns]
        self._async_calls = [rpyc.async_(call) for call in self._calls]

    @staticmethod
    def _connect(socket_path: str, timeout_s: float) -> rpyc.Connection:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return rpyc.utils.factory.unix_connect(socket_path, config=RPYC_CONFIG)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _call_all(self, call: RankCall) -> bytes:
        payload = serde.dumps(call)
        if len(self._calls) == 1:
            return self._calls[0](payload)
        pending = [call_async(payload) for call_async in self._async_calls]
        return [p.value for p in pending][0]  # .value waits and re-raises a rank's error

    def step(self, plan: StepPlan) -> StepResult:
        return serde.RANK_REPLY.decode(self._call_all(plan))

    def close(self) -> None:
        """Tell the ranks (and through rank 0 the other nodes) to stop, then hang up."""
        try:
            self._call_all(Shutdown())
        finally:
            for c in self.conns:
                c.close()

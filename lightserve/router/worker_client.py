"""The router's handle on the backend ranks of this node: the `Backend` operations over rpyc.

Each operation is sent to every rank at once (rpyc async calls) and awaited together; rank 0's
result is the answer (all ranks compute the same tokens). Ranks on other nodes get the call
from rank 0 (see `backend/worker.py`).
"""

from __future__ import annotations

import time
from typing import Any

import rpyc

from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.io_struct import BackendCall, GenerateReq, TokenOut
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths


class WorkerGroup:
    def __init__(self, paths: RunPaths, ranks: range, connect_timeout_s: float = 60.0):
        self.conns = [self._connect(paths.worker_socket(rank), connect_timeout_s) for rank in ranks]

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

    def _call_all(self, method: str, *args: Any) -> Any:
        payload = serde.dumps(BackendCall(method, list(args)))
        if len(self.conns) == 1:
            return serde.loads(self.conns[0].root.call(payload))
        pending = [rpyc.async_(c.root.call)(payload) for c in self.conns]
        results = [p.value for p in pending]  # .value waits and re-raises a rank's error
        return serde.loads(results[0])

    # ---- the Backend protocol ----------------------------------------------------------------
    def prefill(self, batch_id: int, reqs: list[GenerateReq]) -> list[TokenOut]:
        return self._call_all("prefill", batch_id, reqs)

    def decode(self, batch_id: int) -> list[TokenOut]:
        return self._call_all("decode", batch_id)

    def filter(self, batch_id: int, keep_req_ids: list[int]) -> None:
        self._call_all("filter", batch_id, keep_req_ids)

    def merge(self, batch_id: int, other_id: int) -> None:
        self._call_all("merge", batch_id, other_id)

    def pause(self, batch_id: int, req_ids: list[int]) -> list[GenerateReq]:
        return self._call_all("pause", batch_id, req_ids)

    def remove(self, batch_id: int) -> None:
        self._call_all("remove", batch_id)

    def stats(self) -> dict:
        """Rank 0's pool and timing figures (every rank answers; the call stays in lock-step)."""
        return self._call_all("stats")

    def close(self) -> None:
        """Tell the ranks (and through rank 0 the other nodes) to stop, then hang up."""
        try:
            self._call_all("shutdown")
        finally:
            for c in self.conns:
                c.close()

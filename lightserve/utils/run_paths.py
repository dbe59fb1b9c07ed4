"""Where one server instance's sockets live: a private 0700 directory per instance."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class RunPaths:
    run_dir: str

    @classmethod
    def create(cls) -> "RunPaths":
        # mkdtemp creates the directory with mode 0700: only this user can reach the sockets.
        return cls(tempfile.mkdtemp(prefix="lightserve-"))

    def remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _ipc(self, name: str) -> str:
        return f"ipc://{os.path.join(self.run_dir, name)}.sock"

    @property
    def router_in(self) -> str:
        """httpserver / visual -> router: GenerateReq, AbortReq, FlushCache; detokenization -> router:
        AbortReq of a request that met a stop string (`serde.ROUTER_IN`)."""
        return self._ipc("router")

    @property
    def visual_in(self) -> str:
        """httpserver -> visual: GenerateReq with images, AbortReq (`serde.VISUAL_IN`)."""
        return self._ipc("visual")

    @property
    def detok_in(self) -> str:
        """router (and visual) -> detokenization: GenerateReq (registration), AbortReq,
        BatchTokenOut (`serde.DETOK_IN`)."""
        return self._ipc("detok")

    @property
    def http_in(self) -> str:
        """detokenization -> httpserver: BatchTextOut; router -> httpserver: RouterStats
        (`serde.HTTP_IN`)."""
        return self._ipc("http")

    def worker_socket(self, rank: int) -> str:
        """rpyc unix socket of backend rank `rank` (router -> worker)."""
        return os.path.join(self.run_dir, f"worker{rank}.rpyc")

    @property
    def cache_socket(self) -> str:
        """rpyc unix socket of the cache manager."""
        return os.path.join(self.run_dir, "cache.rpyc")

"""A process's connection to the cache manager (rpyc over the run directory's unix socket)."""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import rpyc

from lightserve.cache_manager import shm
from lightserve.cache_manager.image_cache import NeverFits
from lightserve.cache_manager.protocol import (
    Alloc, AllocEmbeds, CacheStats, EmbedSlot, GetStats, ImageSpec, Payload, RecordRef, RecordStatus, Release,
    Request, SetData, SetEmbeds, Status, reply_decoder,
)
from lightserve.utils import serde
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.utils.run_paths import RunPaths


class CacheClient:
    """The cache manager's operations, plus reading and writing the segments they name.

    Safe to share between threads: calls are serialised on one connection (each takes well
    under a millisecond).
    """

    def __init__(self, paths: RunPaths, connect_timeout_s: float = 60.0):
        self.prefix = shm.segment_prefix(paths.run_dir)
        self._lock = threading.Lock()
        self._conn = self._connect(paths.cache_socket, connect_timeout_s)
        # Every attribute read on an rpyc proxy is a round trip of its own: look the remote
        # method up once, so that a call is one round trip, not two.
        self._remote_call = self._conn.root.call

    @staticmethod
    def _connect(socket_path: str, timeout_s: float) -> rpyc.Connection:
        # The cache manager reports ready once its socket is bound; it may start listening a
        # moment later.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return rpyc.utils.factory.unix_connect(socket_path, config=dict(RPYC_CONFIG))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _call(self, req: Request) -> Payload:
        payload = serde.dumps(req)
        with self._lock:
            reply = self._remote_call(payload)
        return reply_decoder(req.reply).decode(reply)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- records ---------------------------------------------------------------------------
    def alloc(self, images: Sequence[ImageSpec]) -> Optional[list[RecordRef]]:
        """References to the records of these images, in order, or None if they do not fit now.
        Raises `NeverFits` if they never can."""
        reply = self._call(Alloc(list(images)))
        if reply.status == "too_many":
            raise NeverFits(reply.why)
        return None if reply.status == "full" else reply.records

    def put_data(self, record_id: int, data: bytes) -> bool:
        """Write the image bytes into the record's segment and mark them present; False if the
        record is gone."""
        try:
            shm.write(shm.data_name(self.prefix, record_id), data)
        except FileNotFoundError:
            return False
        return self._call(SetData([record_id])).ok[0]

    def release(self, record_ids: Sequence[int]) -> None:
        self._call(Release(list(record_ids)))

    def status(self, record_ids: Sequence[int]) -> list[RecordStatus]:
        return self._call(Status(list(record_ids))).records

    def read_data(self, record_id: int) -> bytes:
        return shm.read(shm.data_name(self.prefix, record_id))

    # ---- embeddings (the visual server) ----------------------------------------------------
    def store_embeds(self, items: Sequence[tuple[int, memoryview]]) -> list[bool]:
        """Write one encoded batch: (record_id, embedding bytes) each. Per item, whether it was
        stored (False: the record was evicted meanwhile, its request having been aborted)."""
        created = self._call(AllocEmbeds([EmbedSlot(rid, data.nbytes) for rid, data in items])).ok
        written = []
        for (rid, data), ok in zip(items, created):
            if ok:
                try:
                    shm.write(shm.embed_name(self.prefix, rid), data)
                except FileNotFoundError:  # evicted between the two calls
                    ok = False
            if ok:
                written.append(rid)
        stored = set(rid for rid, ok in zip(written, self._call(SetEmbeds(written)).ok) if ok)
        return [rid in stored for rid, _ in items]

    def stats(self) -> CacheStats:
        return self._call(GetStats())

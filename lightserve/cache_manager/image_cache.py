"""The image records of one server instance, keyed by the md5 of the image bytes.

A record holds one image's raw bytes and, once the visual server has encoded it, its
embedding, each in a shared-memory segment named from the record id (see `shm.py`). Requests
hold references to records: the httpserver takes them when a request arrives (`alloc`) and
drops them when the request ends (`release`), so a record's embedding stays while any request
that may still prefill (or be recomputed after a pause) needs it.

Capacity (`--cache_capacity`, in records) is enforced by evicting the least recently released
record that no request references. When every record is referenced, `alloc` answers "no space
now" and the caller waits or refuses the request (429); nothing here blocks or crashes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from lightserve.cache_manager import shm
from lightserve.cache_manager.protocol import CacheStats, EmbedSlot, ImageSpec, RecordRef, RecordStatus

logger = logging.getLogger(__name__)


class NeverFits(ValueError):
    """The request names more distinct images than the cache can ever hold at once."""


@dataclass
class Record:
    record_id: int
    md5: str
    data_nbytes: int
    token_num: int
    refs: int = 0
    data_ready: bool = False
    embed_ready: bool = False
    embed_nbytes: int = 0  # 0 until the embedding segment exists


class ImageCache:
    """The records and their segments. Thread-safe: the service serves each client in its own thread."""

    def __init__(self, prefix: str, capacity: int):
        if capacity < 1:
            raise ValueError(f"--cache_capacity must be at least 1, got {capacity}")
        self.prefix = prefix
        self.capacity = capacity
        self._lock = threading.Lock()
        self._records: dict[int, Record] = {}
        self._by_md5: dict[str, int] = {}
        # Records no request references, least recently released first: the eviction order.
        self._idle: OrderedDict[int, None] = OrderedDict()
        # Ids are never reused, so a stale id can never name another image's segments.
        self._ids = itertools.count(1)
        self._closed = False  # after close(), nothing creates segments any more
        self.evictions = 0
        self.images_encoded = 0  # embeddings stored by the visual server
        self.encode_batches = 0  # batches they came in

    # ---- references ----------------------------------------------------------------------
    def alloc(self, items: Sequence[ImageSpec]) -> Optional[list[RecordRef]]:
        """Take one reference per item, all or none: one `RecordRef` per item in order, or None
        when the new records do not fit now (every record is referenced, or shared memory is
        exhausted). Raises `NeverFits` if they could not fit even in an empty cache."""
        with self._lock:
            if self._closed:
                return None
            sizes: dict[str, tuple[int, int]] = {}
            for md5, nbytes, token_num in ((i.md5, i.nbytes, i.token_num) for i in items):
                if nbytes < 1 or token_num < 1:
                    raise ValueError(f"image {md5}: {nbytes} bytes, {token_num} tokens")
                rid = self._by_md5.get(md5)
                known = sizes.setdefault(md5, (nbytes, token_num) if rid is None else
                                         (self._records[rid].data_nbytes, self._records[rid].token_num))
                if known != (nbytes, token_num):
                    raise ValueError(f"image {md5} announced as {nbytes} bytes / {token_num} tokens, known as {known}")
            if len(sizes) > self.capacity:
                raise NeverFits(f"{len(sizes)} distinct images in one request; the image cache holds {self.capacity}")
            new_md5s = [md5 for md5 in sizes if md5 not in self._by_md5]
            hits = {self._by_md5[md5] for md5 in sizes if md5 in self._by_md5}
            # Records this request asks for are not evictable, even if nobody references them yet.
            evictable = [rid for rid in self._idle if rid not in hits]
            shortfall = len(self._records) + len(new_md5s) - self.capacity
            if shortfall > len(evictable):
                return None
            for rid in evictable[: max(0, shortfall)]:
                self._drop(rid)
                self.evictions += 1
            created: list[Record] = []
            try:
                for md5 in new_md5s:
                    created.append(self._create(md5, *sizes[md5]))
            except OSError:
                logger.exception("cache manager: cannot create a shared-memory segment")
                for rec in created:
                    self._drop(rec.record_id)
                return None
            out = []
            for item in items:
                rec = self._records[self._by_md5[item.md5]]
                rec.refs += 1
                self._idle.pop(rec.record_id, None)
                out.append(RecordRef(rec.record_id, rec.data_ready))
            return out

    def release(self, record_ids: Sequence[int]) -> None:
        """Drop one reference per id; a record nobody references becomes evictable (most
        recently used last)."""
        with self._lock:
            for rid in record_ids:
                rec = self._records.get(rid)
                if rec is None or rec.refs == 0:
                    # A referenced record is never evicted, so this is a caller's bug: say so,
                    # but keep serving everyone else.
                    logger.error("cache manager: release of unreferenced record %s", rid)
                    continue
                rec.refs -= 1
                if rec.refs == 0:
                    self._idle[rid] = None

    # ---- data and embeddings ---------------------------------------------------------------
    def set_data(self, record_ids: Sequence[int]) -> list[bool]:
        """The image bytes are in these records' data segments. Per id, False if the record is
        gone."""
        with self._lock:
            out = []
            for rid in record_ids:
                rec = self._records.get(rid)
                if rec is not None:
                    rec.data_ready = True
                out.append(rec is not None)
            return out

    def status(self, record_ids: Sequence[int]) -> list[RecordStatus]:
        with self._lock:
            out = []
            for rid in record_ids:
                rec = self._records.get(rid)
                out.append(RecordStatus(False, False, False, 0) if rec is None else
                           RecordStatus(True, rec.data_ready, rec.embed_ready, rec.refs))
            return out

    def alloc_embeds(self, slots: Sequence[EmbedSlot]) -> list[bool]:
        """Create the embedding segment of each record that lacks one; per slot, whether the
        segment is there to be written (False: record gone or no memory)."""
        with self._lock:
            out = []
            for rid, nbytes in ((slot.record_id, slot.nbytes) for slot in slots):
                rec = self._records.get(rid)
                if rec is None or self._closed:
                    out.append(False)
                    continue
                if rec.embed_nbytes and rec.embed_nbytes != nbytes:
                    raise ValueError(f"record {rid}: embedding of {nbytes} bytes, segment has {rec.embed_nbytes}")
                if not rec.embed_nbytes:
                    try:
                        shm.create(shm.embed_name(self.prefix, rid), nbytes)
                    except OSError:
                        logger.exception("cache manager: cannot create the embedding segment of record %d", rid)
                        out.append(False)
                        continue
                    rec.embed_nbytes = nbytes
                out.append(True)
            return out

    def set_embeds(self, record_ids: Sequence[int]) -> list[bool]:
        """One encoded batch: these embeddings are written. Per id, False if the record is gone
        (its request was aborted and the record evicted meanwhile)."""
        with self._lock:
            out = []
            for rid in record_ids:
                rec = self._records.get(rid)
                ok = rec is not None and rec.embed_nbytes > 0
                if ok:
                    rec.embed_ready = True
                    self.images_encoded += 1
                out.append(ok)
            self.encode_batches += 1
            return out

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                capacity=self.capacity, records=len(self._records), referenced=len(self._records) - len(self._idle),
                evictions=self.evictions, images_encoded=self.images_encoded, encode_batches=self.encode_batches,
            )

    def close(self) -> int:
        """Unlink every segment of this instance (also any a crash left unregistered)."""
        with self._lock:
            self._closed = True
            self._records.clear()
            self._by_md5.clear()
            self._idle.clear()
            return shm.unlink_all(self.prefix)

    # ---- internals -------------------------------------------------------------------------
    def _create(self, md5: str, nbytes: int, token_num: int) -> Record:
        rec = Record(next(self._ids), md5, nbytes, token_num)
        shm.create(shm.data_name(self.prefix, rec.record_id), nbytes)
        self._records[rec.record_id] = rec
        self._by_md5[md5] = rec.record_id
        return rec

    def _drop(self, record_id: int) -> None:
        rec = self._records.pop(record_id)
        self._idle.pop(record_id, None)
        del self._by_md5[rec.md5]
        shm.unlink(shm.data_name(self.prefix, record_id))
        shm.unlink(shm.embed_name(self.prefix, record_id))

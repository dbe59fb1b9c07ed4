"""The cache manager process: serves the instance's `ImageCache` (image records keyed by the md5
of the image bytes; see `image_cache.py`) to the httpserver and the visual server.

This process alone creates and unlinks segments, so their lifetime has one owner: every
segment of the instance is unlinked when it stops, on SIGTERM too, and on the launcher's death
(this process asks for SIGTERM, not SIGKILL, when its parent dies).
"""

from __future__ import annotations

import ctypes
import logging
import signal
from multiprocessing.connection import Connection

import rpyc
from rpyc.utils.server import ThreadedServer

from lightserve.cache_manager import shm
from lightserve.cache_manager.image_cache import ImageCache, NeverFits
from lightserve.cache_manager.protocol import (
    CACHE_IN, Alloc, AllocEmbeds, AllocReply, CacheRequest, Done, Flags, GetStats, Payload, Release, SetData,
    SetEmbeds, Status, Statuses,
)
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.process import run_child
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.utils.run_paths import RunPaths

logger = logging.getLogger(__name__)


def handle(cache: ImageCache, req: CacheRequest) -> Payload:
    """Run one request on the cache; the reply is of type `type(req).reply`. Expected outcomes
    (no room now, too many images) are replies; a caller's bug (inconsistent sizes) raises."""
    match req:
        case Alloc(images=images):
            try:
                refs = cache.alloc(images)
            except NeverFits as exc:
                return AllocReply("too_many", why=str(exc))
            return AllocReply("full") if refs is None else AllocReply("ok", refs)
        case Release(record_ids=ids):
            cache.release(ids)
            return Done()
        case SetData(record_ids=ids):
            return Flags(cache.set_data(ids))
        case Status(record_ids=ids):
            return Statuses(cache.status(ids))
        case AllocEmbeds(slots=slots):
            return Flags(cache.alloc_embeds(slots))
        case SetEmbeds(record_ids=ids):
            return Flags(cache.set_embeds(ids))
        case GetStats():
            return cache.stats()
    raise TypeError(f"the cache manager has no handler for {type(req).__name__}")


class CacheManagerService(rpyc.Service):
    """`ImageCache` over rpyc: one exposed method, taking an encoded `CacheRequest` and returning
    the encoded reply. Only bytes cross (brine copies them: no netrefs, no pickle), and the
    request is decoded against the protocol's union before anything runs."""

    def __init__(self, cache: ImageCache):
        super().__init__()
        self.cache = cache

    def exposed_call(self, payload: bytes) -> bytes:
        return serde.dumps(handle(self.cache, CACHE_IN.decode(payload)))


def _sigterm_when_parent_dies() -> None:
    """Replace run_child's SIGKILL-on-parent-death with SIGTERM, which this process handles:
    if the launcher is killed outright, the segments are still unlinked."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    # Once: a second SIGTERM (the parent-death signal after the launcher's own) must not
    # interrupt the clean-up this one starts, or segments are left behind.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop()


def start_cache_manager_process(args: ServerArgs, paths: RunPaths, pipe: Connection) -> None:
    def setup():
        _sigterm_when_parent_dies()
        cache = ImageCache(shm.segment_prefix(paths.run_dir), args.cache_capacity)
        server = ThreadedServer(CacheManagerService(cache), socket_path=paths.cache_socket,
                                protocol_config=dict(RPYC_CONFIG))
        signal.signal(signal.SIGTERM, _raise_stop)

        def loop() -> None:
            try:
                server.start()
            except _Stop:
                logger.info("cache manager: stopping")
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing may cut the clean-up short
                server.close()
                removed = cache.close()
                logger.info("cache manager: unlinked %d shared-memory segments", removed)

        return loop, {"capacity": cache.capacity, "shm_prefix": cache.prefix}

    run_child("cache_manager", pipe, args.log_level, setup)

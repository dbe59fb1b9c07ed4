"""The image cache: records, references, LRU eviction, shared-memory lifetime, the real process."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightserve.cache_manager import shm
from lightserve.cache_manager.client import CacheClient
from lightserve.cache_manager.image_cache import ImageCache, NeverFits
from lightserve.cache_manager.manager import handle, start_cache_manager_process
from lightserve.cache_manager.protocol import (
    CACHE_IN, Alloc, AllocEmbeds, AllocReply, EmbedSlot, GetStats, ImageSpec, RecordRef, RecordStatus, Release,
    SetData, SetEmbeds, Status,
)
from lightserve.io_struct import AbortReq
from lightserve.launcher import ChildGroup
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths


def md5(i: int) -> str:
    return f"{i:032x}"


def image(i: int, nbytes: int, token_num: int) -> ImageSpec:
    return ImageSpec(md5(i), nbytes, token_num)


@pytest.fixture
def prefix():
    run_dir = tempfile.mkdtemp(prefix="lightserve-")
    p = shm.segment_prefix(run_dir)
    yield p
    left = shm.unlink_all(p)
    os.rmdir(run_dir)
    assert left == 0, "the test left segments behind"


def segments(prefix: str) -> set[str]:
    return set(shm.list_segments(prefix))


# ---- ImageCache in process ----------------------------------------------------------------------

def test_same_md5_shares_one_record_and_counts_references(prefix):
    cache = ImageCache(prefix, capacity=4)
    (ref,) = cache.alloc([image(1, 10, 5)])
    a = ref.record_id
    assert not ref.data_ready
    assert segments(prefix) == {shm.data_name(prefix, a)}
    shm.write(shm.data_name(prefix, a), b"0123456789")
    assert cache.set_data([a, 12345]) == [True, False]
    # Twice in one request and once more: one record, three references, data already there.
    again = cache.alloc([image(1, 10, 5), image(1, 10, 5)])
    assert again == [RecordRef(a, True), RecordRef(a, True)]
    assert cache.status([a]) == [RecordStatus(True, True, False, 3)]
    cache.release([a, a, a])
    assert cache.status([a]) == [RecordStatus(True, True, False, 0)]
    assert cache.stats().referenced == 0
    assert cache.close() == 1 and not segments(prefix)
    assert cache.alloc([image(2, 10, 5)]) is None and not segments(prefix)  # closed: creates nothing


def test_lru_eviction_of_unreferenced_records_only(prefix):
    cache = ImageCache(prefix, capacity=3)
    ids = [cache.alloc([image(i, 4, 2)])[0].record_id for i in range(3)]
    assert cache.alloc([image(9, 4, 2)]) is None  # all referenced: no space now
    cache.release([ids[1]])
    cache.release([ids[0]])
    # ids[1] was released first: least recently used, evicted first.
    new = cache.alloc([image(3, 4, 2)])[0].record_id
    assert cache.status(ids) == [RecordStatus(True, False, False, 0), RecordStatus(False, False, False, 0),
                                 RecordStatus(True, False, False, 1)]
    assert not shm.exists(shm.data_name(prefix, ids[1]))
    assert new not in ids  # ids are never reused
    # Re-referencing a record takes it out of the eviction order.
    cache.alloc([image(0, 4, 2)])
    assert cache.alloc([image(4, 4, 2)]) is None
    assert cache.stats().evictions == 1
    cache.close()


def test_a_record_asked_for_again_is_not_evicted_for_its_neighbour(prefix):
    cache = ImageCache(prefix, capacity=2)
    a, b = (ref.record_id for ref in cache.alloc([image(0, 4, 1), image(1, 4, 1)]))
    cache.release([a])
    # Full, and `a` is the only unreferenced record, but this request wants `a` itself.
    assert cache.alloc([image(0, 4, 1), image(2, 4, 1)]) is None
    assert cache.status([a, b]) == [RecordStatus(True, False, False, 0), RecordStatus(True, False, False, 1)]
    cache.close()


def test_embeddings_and_their_segments(prefix):
    cache = ImageCache(prefix, capacity=2)
    a = cache.alloc([image(1, 3, 2)])[0].record_id
    assert cache.alloc_embeds([EmbedSlot(a, 16), EmbedSlot(12345, 16)]) == [True, False]
    assert shm.exists(shm.embed_name(prefix, a))
    assert cache.alloc_embeds([EmbedSlot(a, 16)]) == [True]  # idempotent
    with pytest.raises(ValueError, match="segment has 16"):
        cache.alloc_embeds([EmbedSlot(a, 32)])
    assert cache.set_embeds([a, 12345]) == [True, False]
    assert cache.status([a])[0].embed_ready is True
    assert (cache.stats().images_encoded, cache.stats().encode_batches) == (1, 1)
    cache.release([a])
    cache.alloc([image(2, 3, 2)])
    cache.alloc([image(3, 3, 2)])  # evicts a: both of its segments go
    assert not shm.exists(shm.embed_name(prefix, a)) and not shm.exists(shm.data_name(prefix, a))
    cache.close()


def test_requests_that_never_fit_and_inconsistent_items(prefix):
    cache = ImageCache(prefix, capacity=2)
    with pytest.raises(NeverFits, match="3 distinct images"):
        cache.alloc([image(i, 1, 1) for i in range(3)])
    assert cache.alloc([image(1, 1, 1)] * 5) is not None  # duplicates count once
    with pytest.raises(ValueError, match="known as"):
        cache.alloc([image(1, 2, 1)])
    with pytest.raises(ValueError):
        cache.alloc([image(7, 0, 1)])
    assert cache.status([1]) == [RecordStatus(True, False, False, 5)]  # failed calls took nothing
    cache.release([1, 99])  # an unknown id is logged, not fatal
    with pytest.raises(ValueError, match="at least 1"):
        ImageCache(prefix, capacity=0)
    cache.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release"]), st.lists(st.integers(0, 5), min_size=1, max_size=3)),
                max_size=30))
def test_random_alloc_release_keeps_the_invariants(ops):
    run_dir = tempfile.mkdtemp(prefix="lightserve-")
    prefix = shm.segment_prefix(run_dir)
    cache = ImageCache(prefix, capacity=3)
    held: list[int] = []  # one entry per reference the "requests" hold
    content: dict[int, str] = {}  # record id -> md5, as first allocated
    try:
        for op, images in ops:
            if op == "alloc":
                before = cache.stats()
                out = cache.alloc([image(i, 8, 2) for i in images]) if len(set(images)) <= 3 else None
                if out is None:
                    assert cache.stats() == before  # all or nothing
                    continue
                for i, ref in zip(images, out):
                    assert content.setdefault(ref.record_id, md5(i)) == md5(i)  # an id always names one image
                    held.append(ref.record_id)
            elif held:
                n = min(len(images), len(held))
                cache.release(held[:n])
                del held[:n]
            stats = cache.stats()
            assert stats.records <= 3
            # Every referenced record exists with its exact reference count; files match records.
            statuses = dict(zip(set(held), cache.status(list(set(held)))))
            for rid, status in statuses.items():
                assert status.exists and status.refs == held.count(rid)
            assert stats.referenced == len(statuses)
            assert len(segments(prefix)) == stats.records
    finally:
        cache.close()
        os.rmdir(run_dir)
    assert not segments(prefix)


# ---- the protocol -------------------------------------------------------------------------------

REQUESTS = [Alloc([image(1, 10, 5), image(2, 3, 1)]), Release([1, 2]), SetData([3]), Status([4, 5]),
            AllocEmbeds([EmbedSlot(1, 64)]), SetEmbeds([1]), GetStats()]


@pytest.mark.parametrize("req", REQUESTS, ids=[type(r).__name__ for r in REQUESTS])
def test_every_request_and_its_reply_round_trip(prefix, req):
    assert CACHE_IN.decode(serde.dumps(req)) == req
    cache = ImageCache(prefix, capacity=4)
    cache.alloc([image(1, 10, 5)])
    reply = handle(cache, req)
    assert type(reply) is req.reply
    assert serde.SocketDecoder("reply", req.reply).decode(serde.dumps(reply)) == reply
    cache.close()


def test_alloc_outcomes_are_replies(prefix):
    cache = ImageCache(prefix, capacity=1)
    ok = handle(cache, Alloc([image(1, 4, 1)]))
    assert ok == AllocReply("ok", [RecordRef(ok.records[0].record_id, False)])
    assert handle(cache, Alloc([image(2, 4, 1)])) == AllocReply("full")
    too_many = handle(cache, Alloc([image(2, 4, 1), image(3, 4, 1)]))
    assert too_many.status == "too_many" and "2 distinct images" in too_many.why
    cache.close()


# ---- the process ------------------------------------------------------------------------------

@pytest.fixture
def cache_process():
    paths = RunPaths.create()
    children = ChildGroup()
    (status,) = children.start([("cache_manager", start_cache_manager_process,
                                 (ServerArgs(cache_capacity=8, log_level="warning"), paths))])
    client = CacheClient(paths)
    yield paths, children, client, status.info["shm_prefix"]
    client.close()
    children.stop_all()
    paths.remove()


def test_process_serves_concurrent_clients_and_unlinks_on_sigterm(cache_process):
    paths, children, client, prefix = cache_process
    assert prefix == client.prefix == shm.segment_prefix(paths.run_dir)
    payload = os.urandom(1000)
    (ref,) = client.alloc([image(1, len(payload), 4)])
    rid = ref.record_id
    assert not ref.data_ready and client.put_data(rid, payload)
    assert client.read_data(rid) == payload
    embed = memoryview(os.urandom(64))
    assert client.store_embeds([(rid, embed)]) == [True]
    assert shm.read(shm.embed_name(prefix, rid)) == embed.tobytes()

    def worker(i: int) -> None:
        other = CacheClient(paths)
        for j in range(20):
            (ref,) = other.alloc([image(100 + (i * 20 + j) % 6, 10, 1)])
            other.release([ref.record_id])
        other.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = client.stats()
    assert (stats.records, stats.referenced) == (7, 1)
    # The socket takes the protocol's requests only: anything else is refused with the reason,
    # and the cache serves on.
    for bad, why in [(b"\xc1", "malformed"), (serde.dumps(AbortReq(rid)), "Invalid value 'AbortReq'"),
                     (msgspec.msgpack.encode({"type": "Release", "record_ids": ["x"]}), "`$.record_ids[0]`")]:
        with pytest.raises(Exception, match="cache manager: not a Alloc | Release") as exc:
            client._conn.root.call(bad)
        assert why in str(exc.value)
    assert client.stats() == stats
    # Hardened rpyc: only exposed_ methods.
    with pytest.raises(AttributeError):
        client._conn.root.cache
    assert segments(prefix)
    proc = children.children[0].process
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert proc.exitcode is not None
    assert not segments(prefix)


def _launcher_stand_in(run_dir: str, ready) -> None:
    """A parent that starts the cache manager, fills it, then waits to be killed."""
    paths = RunPaths(run_dir)
    ChildGroup().start([("cache_manager", start_cache_manager_process, (ServerArgs(log_level="warning"), paths))])
    client = CacheClient(paths)
    ready.put(client.alloc([image(1, 100, 1)])[0].record_id)
    time.sleep(600)


def test_segments_unlinked_when_the_launcher_is_killed():
    paths = RunPaths.create()
    prefix = shm.segment_prefix(paths.run_dir)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    parent = ctx.Process(target=_launcher_stand_in, args=(paths.run_dir, ready))
    parent.start()
    try:
        try:
            rid = ready.get(timeout=180)
        except queue.Empty:
            pytest.fail(f"the stand-in launcher did not start the cache manager (exit code {parent.exitcode})")
        assert shm.exists(shm.data_name(prefix, rid))
        os.kill(parent.pid, signal.SIGKILL)  # no clean-up code of the parent runs
        deadline = time.monotonic() + 30
        while segments(prefix) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not segments(prefix), f"still there 30 s after the launcher died: {segments(prefix)}"
    finally:
        parent.kill()
        parent.join()
        paths.remove()

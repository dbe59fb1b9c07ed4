"""What crosses the cache manager's socket: one tagged request struct per operation, each
naming the struct its reply decodes to.

Every call is one `CacheRequest` encoded with msgpack and one reply (`Request.reply`), so the
transport carries bytes only: the service decodes the request against this union (nothing
else can be constructed), the client decodes the reply against the type it asked for.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Literal, Union

import msgspec

from lightserve.utils.serde import SocketDecoder


class Payload(msgspec.Struct, forbid_unknown_fields=True):
    """Base of everything on the cache manager's socket: a field the receiver does not know is
    an error, not silently dropped."""


# ---- values -----------------------------------------------------------------------------------

class ImageSpec(Payload):
    """One image as the httpserver announces it."""

    md5: str  # hex digest of the image bytes: the record's key
    nbytes: int
    token_num: int  # placeholder tokens (= embedding rows)


class RecordRef(Payload):
    """A reference taken on a record, and whether its image bytes are already there."""

    record_id: int
    data_ready: bool


class RecordStatus(Payload):
    exists: bool
    data_ready: bool
    embed_ready: bool
    refs: int


class EmbedSlot(Payload):
    """Room for one record's embedding, `nbytes` long."""

    record_id: int
    nbytes: int


class CacheStats(Payload):
    capacity: int
    records: int
    referenced: int  # records some request holds
    evictions: int
    images_encoded: int  # embeddings stored by the visual server
    encode_batches: int  # batches they came in


# ---- replies ----------------------------------------------------------------------------------

class AllocReply(Payload):
    """`ok` with one reference per image in order; `full`: no room now (retry later);
    `too_many`: the images could never fit at once (`why` says so). Expected outcomes are
    values, not remote exceptions."""

    status: Literal["ok", "full", "too_many"]
    records: list[RecordRef] = msgspec.field(default_factory=list)
    why: str = ""


class Flags(Payload):
    """Per item of the request, whether the operation succeeded for it."""

    ok: list[bool]


class Statuses(Payload):
    records: list[RecordStatus]


class Done(Payload):
    """The reply of an operation that returns nothing."""


# ---- requests ---------------------------------------------------------------------------------

class Request(Payload, tag=True):
    reply: ClassVar[type[Payload]]


class Alloc(Request):
    """Take one reference per image, all or none (creating the records that are missing)."""

    reply = AllocReply
    images: list[ImageSpec]


class Release(Request):
    reply = Done
    record_ids: list[int]


class SetData(Request):
    """The image bytes are in these records' data segments."""

    reply = Flags
    record_ids: list[int]


class Status(Request):
    reply = Statuses
    record_ids: list[int]


class AllocEmbeds(Request):
    """Create the embedding segments that are missing."""

    reply = Flags
    slots: list[EmbedSlot]


class SetEmbeds(Request):
    """One encoded batch: these embeddings are written."""

    reply = Flags
    record_ids: list[int]


class GetStats(Request):
    reply = CacheStats


CacheRequest = Union[Alloc, Release, SetData, Status, AllocEmbeds, SetEmbeds, GetStats]

CACHE_IN: SocketDecoder[CacheRequest] = SocketDecoder("cache manager", *CacheRequest.__args__)


@functools.cache
def reply_decoder(kind: type[Payload]) -> SocketDecoder:
    """The decoder of one reply kind (`Request.reply`), built once."""
    return SocketDecoder("cache manager reply", kind)

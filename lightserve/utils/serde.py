"""Encoding of `io_struct` messages for the sockets between processes.

Messages travel as msgpack (`msgspec`). Each zmq inbox has one `SocketDecoder` that accepts
exactly the kinds that socket carries, told apart by their tag: anything else (another kind,
a missing or mistyped field, bytes that are not msgpack) raises `MessageError` naming the
socket, and nothing received can construct any object but those messages (no pickle).

The backend link (router -> ranks, rank 0 -> other nodes) still carries untyped `BackendCall`
arguments and results; `loads` decodes those, reviving tagged messages by their tag.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, Union

import msgspec

from lightserve.io_struct import (
    AbortReq, BackendCall, BatchTextOut, BatchTokenOut, GenerateReq, RouterStats, TokenOut,
)

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()


class MessageError(ValueError):
    """Bytes received on a socket that are not one of the messages it carries."""


def dumps(msg: Any) -> bytes:
    return _encoder.encode(msg)


class SocketDecoder(Generic[M]):
    """Decodes what one socket carries: one of `kinds`, chosen by tag, checked field by field."""

    def __init__(self, socket: str, *kinds: type) -> None:
        self.socket = socket
        self.kinds = kinds
        self._expected = " | ".join(k.__name__ for k in kinds)
        self._decoder = msgspec.msgpack.Decoder(Union[kinds])  # a one-kind Union is that kind

    def decode(self, data: bytes) -> M:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:  # ValidationError too
            raise MessageError(f"{self.socket}: not a {self._expected} message: {exc}") from None


# One decoder per inbox (addresses in `utils/run_paths.py`).
ROUTER_IN: SocketDecoder[Union[GenerateReq, AbortReq]] = SocketDecoder("router inbox", GenerateReq, AbortReq)
VISUAL_IN: SocketDecoder[Union[GenerateReq, AbortReq]] = SocketDecoder("visual inbox", GenerateReq, AbortReq)
DETOK_IN: SocketDecoder[Union[GenerateReq, AbortReq, BatchTokenOut]] = SocketDecoder(
    "detokenizer inbox", GenerateReq, AbortReq, BatchTokenOut)
HTTP_IN: SocketDecoder[Union[BatchTextOut, RouterStats]] = SocketDecoder("httpserver inbox", BatchTextOut, RouterStats)


# ---- the backend link (until it carries a typed step plan) ------------------------------------

_BY_TAG: dict[str, type] = {cls.__name__: cls for cls in (BackendCall, GenerateReq, TokenOut, AbortReq)}


def _revive(obj: Any) -> Any:
    """Innermost first, so that a tagged struct holding untyped values (BackendCall.args) gets
    them revived too; typed fields are converted (and checked) by msgspec."""
    if isinstance(obj, list):
        return [_revive(x) for x in obj]
    if isinstance(obj, dict):
        obj = {k: _revive(v) for k, v in obj.items()}
        tag = obj.get("type")
        cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
        return obj if cls is None else msgspec.convert(obj, cls)
    return obj


def loads(data: bytes) -> Any:
    """A `BackendCall` or a backend result: plain values, with tagged messages revived."""
    try:
        return _revive(msgspec.msgpack.decode(data))
    except msgspec.DecodeError as exc:
        raise MessageError(f"backend link: {exc}") from None

"""Encoding of `io_struct` messages for the sockets between processes.

Messages travel as msgpack (`msgspec`). Each zmq inbox has one `SocketDecoder` that accepts
exactly the kinds that socket carries, told apart by their tag: anything else (another kind,
a missing or mistyped field, bytes that are not msgpack) raises `MessageError` naming the
socket, and nothing received can construct any object but those messages (no pickle).

The backend link (one `StepPlan` or `Shutdown` per call, one `StepResult` back) is decoded the
same way.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, Union

import msgspec

from lightserve.io_struct import (
    AbortReq, BatchTextOut, BatchTokenOut, FlushCache, GenerateReq, RouterStats, Shutdown, StepPlan, StepResult,
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
ROUTER_IN: SocketDecoder[Union[GenerateReq, AbortReq, FlushCache]] = SocketDecoder(
    "router inbox", GenerateReq, AbortReq, FlushCache)
VISUAL_IN: SocketDecoder[Union[GenerateReq, AbortReq]] = SocketDecoder("visual inbox", GenerateReq, AbortReq)
DETOK_IN: SocketDecoder[Union[GenerateReq, AbortReq, BatchTokenOut]] = SocketDecoder(
    "detokenizer inbox", GenerateReq, AbortReq, BatchTokenOut)
HTTP_IN: SocketDecoder[Union[BatchTextOut, RouterStats]] = SocketDecoder("httpserver inbox", BatchTextOut, RouterStats)


# The backend link (router -> ranks, rank 0 -> other nodes' ranks, and the ranks' replies).
RANK_IN: SocketDecoder[Union[StepPlan, Shutdown]] = SocketDecoder("backend rank", StepPlan, Shutdown)
RANK_REPLY: SocketDecoder[StepResult] = SocketDecoder("backend rank reply", StepResult)

"""Reading a process's zmq inbox in bursts."""

from __future__ import annotations

import logging
from typing import Iterator, TypeVar

import zmq

from lightserve.utils.serde import MessageError, SocketDecoder

logger = logging.getLogger(__name__)

M = TypeVar("M")


def drain(sock: zmq.Socket, decoder: SocketDecoder[M], block: bool) -> Iterator[M]:
    """Every message waiting on `sock`, decoded; with `block`, first wait for one.

    A loop takes all waiting requests and aborts before its next step, so that one step sees
    them together (one admission, one batch) rather than one message per step. A message the
    socket does not carry is logged and dropped: one bad sender must not stop the process that
    serves every other request.
    """
    flags = 0 if block else zmq.NOBLOCK
    while True:
        try:
            data = sock.recv(flags)
        except zmq.Again:
            return
        flags = zmq.NOBLOCK
        try:
            msg = decoder.decode(data)
        except MessageError as exc:
            logger.error("dropping a message: %s", exc)
            continue
        yield msg

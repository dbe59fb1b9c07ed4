"""Reading a process's zmq inbox in bursts."""

from __future__ import annotations

from typing import Any, Iterator

import zmq

from lightserve.utils import serde


def drain(sock: zmq.Socket, block: bool) -> Iterator[Any]:
    """Every message waiting on `sock`, decoded; with `block`, first wait for one.

    A loop takes all waiting requests and aborts before its next step, so that one step sees
    them together (one admission, one batch) rather than one message per step.
    """
    flags = 0 if block else zmq.NOBLOCK
    while True:
        try:
            data = sock.recv(flags)
        except zmq.Again:
            return
        flags = zmq.NOBLOCK
        yield serde.loads(data)

"""Encoding of `io_struct` messages for the sockets between processes.

JSON with a type tag per dataclass, decoded only into the known message classes: nothing
received can construct arbitrary objects (no pickle), so the same encoding is safe on the
rpyc links that may cross machines in multi-node runs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from lightserve import io_struct

_DATACLASSES = {
    cls.__name__: cls
    for cls in vars(io_struct).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == io_struct.__name__
}
_ENUMS = {
    cls.__name__: cls
    for cls in vars(io_struct).values()
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__module__ == io_struct.__name__
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return {"__e": type(obj).__name__, "v": obj.value}
    if dataclasses.is_dataclass(obj):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        out["__t"] = type(obj).__name__
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _revive(d: dict) -> Any:
    if "__t" in d:
        name = d.pop("__t")
        if name not in _DATACLASSES:
            raise ValueError(f"unknown message type {name!r}")
        return _DATACLASSES[name](**d)
    if "__e" in d:
        if d["__e"] not in _ENUMS:
            raise ValueError(f"unknown enum {d['__e']!r}")
        return _ENUMS[d["__e"]](d["v"])
    return d


def dumps(msg: Any) -> bytes:
    return json.dumps(_plain(msg), separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return json.loads(data, object_hook=_revive)

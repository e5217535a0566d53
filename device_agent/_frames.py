"""Length-prefixed pickle frames over pipes, shared by the supervisor and the worker (both ours).

Kept apart from :mod:`device_agent.worker` so the supervisor process never imports numpy.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

_LEN = struct.Struct(">I")


def read_frame(fd: int) -> Any:
    """One frame from ``fd``; raises EOFError when the other end is gone."""
    head = _read_exact(fd, 4)
    return pickle.loads(_read_exact(fd, _LEN.unpack(head)[0]))


def write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)

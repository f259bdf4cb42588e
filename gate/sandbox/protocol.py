"""The wire format between gate and its model child: framed JSON plus raw array bytes.

Never pickle: the child runs the attacker's model, so whatever it sends back is untrusted
input to the parent. A message is an 8-byte little-endian header length, a JSON header,
then the bytes of each array the header declares, in order. Arrays are replaced in the
JSON by ``{"__array__": i}`` and described in ``header["arrays"]`` by dtype and shape; the
reader checks both against an allow-list and a size cap before it allocates anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import sys
import time
from typing import Any

import numpy as np

MAX_HEADER = 64 * 2**20
# Bytes of arrays in one message. A forward batch is bounded far below this by
# gate.activations.batch_memory(); the cap only stops a hostile child from making the
# parent allocate without limit.
MAX_PAYLOAD = 16 * 2**30
_DTYPES = frozenset({"float32", "float64", "int64", "int32", "uint8", "bool"})
_CHUNK = 1 << 22
# Pipe buffer asked for (Linux F_SETPIPE_SZ; unprivileged processes may get up to
# /proc/sys/fs/pipe-max-size, 1 MiB by default). With the default 64 KiB, every 64 KiB of
# activations costs a wake-up of each side: 1.2 s of a 200k-row extraction (bench/README).
PIPE_BYTES = 1 << 20


def pipe() -> tuple[int, int]:
    """``os.pipe()`` with a buffer of up to :data:`PIPE_BYTES` where the OS allows it."""
    r, w = os.pipe()
    if sys.platform.startswith("linux"):
        import fcntl

        # Above pipe-max-size the call fails and the default buffer still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return r, w


class ProtocolError(Exception):
    """The peer broke the protocol (or closed the pipe)."""


class Timeout(Exception):
    """The deadline passed while waiting for the peer."""


def encode(message: dict[str, Any]) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes and the arrays to send after it."""
    arrays: list[np.ndarray] = []
    body = _walk(message, arrays)
    header = {
        "body": body,
        "arrays": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays],
    }
    return json.dumps(header, allow_nan=False).encode("utf-8"), arrays


def _walk(value: Any, arrays: list[np.ndarray]) -> Any:
    # A module-level function, not a closure: a recursive closure is a reference cycle
    # (the function and its own cell) that kept ``arrays`` -- every batch's activations --
    # alive until the cyclic garbage collector ran, growing the child by hundreds of MiB.
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if arr.dtype.name not in _DTYPES:
            raise TypeError(f"cannot send arrays of dtype {arr.dtype}")
        arrays.append(arr)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _walk(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, arrays) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def send(fd: int, message: dict[str, Any]) -> None:
    header, arrays = encode(message)
    _write_all(fd, len(header).to_bytes(8, "little") + header)
    for arr in arrays:
        if arr.nbytes:
            _write_all(fd, memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]


def receive(fd: int, deadline: float | None = None) -> dict[str, Any]:
    """One message from ``fd``; :class:`Timeout` when ``deadline`` (monotonic) passes."""
    size = int.from_bytes(_read_exact(fd, 8, deadline), "little")
    if size > MAX_HEADER:
        raise ProtocolError(f"header of {size} bytes")
    try:
        header = json.loads(_read_exact(fd, size, deadline))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"bad header ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ProtocolError("bad header")
    arrays: list[np.ndarray] = []
    total = 0
    for spec in header["arrays"]:
        dtype, shape = _array_spec(spec)
        count = math.prod(shape)
        total += count * dtype.itemsize
        if total > MAX_PAYLOAD:
            raise ProtocolError("arrays larger than the payload limit")
        arr = np.empty(count, dtype=dtype)
        if arr.nbytes:
            _read_into(fd, memoryview(arr.view(np.uint8)), deadline)  # type: ignore[arg-type]
        arrays.append(arr.reshape(shape))
    body = _restore(header.get("body"), arrays)
    if not isinstance(body, dict):
        raise ProtocolError("message is not an object")
    return body


def _array_spec(spec: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
        raise ProtocolError("bad array description")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > 16
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError("bad array shape")
    return np.dtype(spec["dtype"]), tuple(shape)


def _restore(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            index = value["__array__"]
            if not isinstance(index, int) or not 0 <= index < len(arrays):
                raise ProtocolError("bad array reference")
            return arrays[index]
        if set(value) == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        return {k: _restore(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, arrays) for v in value]
    return value


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:_CHUNK])
        except BrokenPipeError:
            raise ProtocolError("peer closed the pipe") from None
        view = view[n:]


def _wait_readable(fd: int, deadline: float | None) -> None:
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Timeout
    ready, _, _ = select.select([fd], [], [], remaining)
    if not ready:
        raise Timeout


def _read_into(fd: int, view: memoryview, deadline: float | None) -> None:
    while view:
        _wait_readable(fd, deadline)
        n = os.readv(fd, [view[:_CHUNK]])  # straight into the array: no second copy
        if not n:
            raise ProtocolError("peer closed the pipe")
        view = view[n:]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    buf = bytearray(size)
    _read_into(fd, memoryview(buf), deadline)
    return bytes(buf)

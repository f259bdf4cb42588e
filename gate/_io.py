"""Byte-reproducible file writing: same arrays in, same bytes out."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: Path, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Like ``np.savez`` but with fixed timestamps and order (np.savez stamps the time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            # np.require, unlike ascontiguousarray, keeps 0-d arrays 0-d.
            array = np.require(arrays[name], requirements="C")
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    write_bytes_atomic(path, buf.getvalue())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with open_atomic(path) as fh:
        fh.write(data)


def write_npy_atomic(path: Path, array: npt.NDArray[np.generic]) -> None:
    """One ``.npy`` file, written straight from ``array`` (a memmap is not copied to RAM)."""
    with open_atomic(path) as fh:
        np.lib.format.write_array(fh, np.require(array, requirements="C"), allow_pickle=False)


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` only once fully written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))

"""Byte-reproducible file writing (same arrays in, same bytes out), and the checks that
make reading an untrusted ``.npz`` safe."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

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


def _umask() -> int:
    """The process umask. Linux reports it in /proc (no race); elsewhere it is set and put
    back, which is safe here because gate writes its files from one thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` only once fully written, with the mode a plain
    ``open`` would give it (0666 & ~umask).

    mkstemp creates the file O_EXCL with mode 0600 (never through a planted symlink); the
    mode is widened on the descriptor, before the file is renamed into place, so that a
    host user can read reports a container user wrote under the usual umask 022.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


# --- reading untrusted .npz files -------------------------------------------------------------

# Deflate cannot inflate more than ~1032:1; a member claiming more is forged.
_MAX_DEFLATE_RATIO = 1100


class NpzError(ValueError):
    """An ``.npz`` whose members cannot hold what their ``.npy`` headers declare."""


def check_npz(path: Path) -> None:
    """Check every ``.npy`` member's header against the member's size before numpy reads it.

    ``np.load`` allocates what a member's header declares before reading its data, so a
    200-byte file declaring 2**42 elements would ask for 16 TiB. Here each header's shape
    and dtype must account for exactly the member's uncompressed size, and that size must
    be one deflate could produce from the compressed bytes; otherwise :class:`NpzError`.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise NpzError(f"member {info.filename!r} uses an unsupported compression")
                limit = info.compress_size * (
                    1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
                )
                if info.file_size > limit + 1024:
                    raise NpzError(
                        f"member {info.filename!r} claims {info.file_size} bytes from "
                        f"{info.compress_size} (forged or a zip bomb)"
                    )
                if info.filename.endswith(".npy"):
                    with zf.open(info) as fh:
                        _check_npy_header(fh, info)
    except NpzError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise NpzError(f"corrupt zip archive ({exc})") from None


def _check_npy_header(fh: BinaryIO | IO[bytes], info: zipfile.ZipInfo) -> None:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise NpzError(f"member {info.filename!r} has unsupported .npy version {version}")
    except NpzError:
        raise
    except Exception as exc:  # numpy's header parser raises ValueError, TokenError, ...
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise NpzError(f"member {info.filename!r} has a malformed .npy header ({msg})") from None
    if dtype.hasobject:
        raise NpzError(f"member {info.filename!r} holds Python objects (pickles); refusing")
    count = 1
    for dim in shape:
        count *= int(dim)
    declared = count * dtype.itemsize
    header = fh.tell()
    if header + declared != info.file_size:
        raise NpzError(
            f"member {info.filename!r} declares shape {tuple(int(d) for d in shape)} of "
            f"{dtype} ({declared} bytes) but holds {max(info.file_size - header, 0)} bytes"
        )

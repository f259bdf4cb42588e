"""Streaming a layer's activations to a memory-mapped file, batch by batch (and the cache)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.activations import ActivationCache, forward_batches
from gate.errors import ModelLoadError
from gate.models.base import Array, ForwardResult, LoadedModel

BATCH = 1024  # rows per forward batch at most; forward_batches also bounds them by memory
HASH_CHUNK = 1 << 24  # bytes of input hashed at a time
WINDOW = 16 << 20  # bytes of the file mapped at a time by a RowFile row gather
# Sees each batch of extracted rows: (first row's position, rows); see stream_layers.
RowsHook = Callable[[int, npt.NDArray[np.float32]], None]


@dataclass
class Streamed:
    activations: npt.NDArray[np.float32]  # a read-only RowFile (N x D)
    predictions: npt.NDArray[np.int64]
    path: Path | None
    cached: bool = False


class RowFile(np.memmap):
    """A read-only memmap of a row-major matrix file whose row gathers stay small in RAM.

    Mapped file pages count in the process's resident memory, and the kernel maps the
    neighbours of every page touched (fault-around), so gathering one class's rows
    (``a[rows]``) from a plain memmap makes the whole matrix resident. Here a gather with a
    1-D integer or boolean array maps the file :data:`WINDOW` bytes at a time and unmaps
    each window before the next, so only the gathered copy stays. The values are the
    same. Anything else (slices, reductions, ``np.asarray``) uses the full mapping as any
    memmap does. ``tofile`` (how the activation cache writes an entry) copies the file.
    """

    _rows_at: tuple[str, int] | None = None  # (path, byte offset); None on views

    def __getitem__(self, key: Any) -> Any:
        at = self._rows_at
        rows = isinstance(key, np.ndarray) and key.ndim == 1
        if at is not None and rows and key.dtype.kind in "iu":
            return self._gather(key, at)
        if at is not None and rows and key.dtype.kind == "b" and key.shape == self.shape[:1]:
            return self._gather(np.flatnonzero(key), at)
        res = super().__getitem__(key)
        copied = isinstance(res, RowFile) and getattr(res, "_mmap", None) is None
        return res.view(np.ndarray) if copied else res

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        arr = super().__array_wrap__(arr, context, return_scalar)
        return arr if arr is self or not isinstance(arr, RowFile) else arr.view(np.ndarray)

    def _gather(self, key: npt.NDArray[Any], at: tuple[str, int]) -> npt.NDArray[Any]:
        n = self.shape[0]
        rows = key.astype(np.int64, copy=False)
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of bounds for {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(rows), int(np.prod(self.shape[1:], dtype=np.int64)))
        row_bytes = flat.shape[1] * self.itemsize
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            # A run of consecutive rows (one class of class-ordered activations): one read.
            self._read(at[0], at[1] + int(rows[0]) * row_bytes, flat)
            return out
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        per = max(1, WINDOW // max(row_bytes, 1))
        win = srt // per
        cuts = (np.flatnonzero(np.diff(win)) + 1).tolist()
        path, offset = at
        for s, e in zip([0, *cuts], [*cuts, len(srt)], strict=True):
            if s == e:
                continue
            first = int(win[s]) * per
            part = np.memmap(
                path,
                dtype=self.dtype,
                mode="r",
                offset=offset + first * row_bytes,
                shape=(min(per, n - first), flat.shape[1]),
            )
            flat[order[s:e]] = part[srt[s:e] - first]
            del part  # unmapped before the next window
        return out

    @staticmethod
    def _read(path: str, offset: int, into: npt.NDArray[Any]) -> None:
        view = into.data.cast("B")
        with open(path, "rb") as src:
            src.seek(offset)
            done = 0
            while done < len(view):
                got = src.readinto(view[done:])
                if not got:
                    raise OSError(f"{path}: shorter than its {into.shape} rows")
                done += got

    def tofile(self, fid: Any, sep: str = "", format: str = "%s") -> None:
        at = self._rows_at
        if at is None or sep or not hasattr(fid, "write"):
            super().tofile(fid, sep, format)
            return
        path, offset = at
        left = self.nbytes
        with open(path, "rb") as src:
            src.seek(offset)
            while left > 0:
                chunk = src.read(min(left, WINDOW))
                if not chunk:
                    raise OSError(f"{path}: shorter than its {self.shape} matrix")
                fid.write(chunk)
                left -= len(chunk)


def open_rows(
    path: str | Path, shape: tuple[int, ...], offset: int = 0, dtype: Any = np.float32
) -> RowFile:
    """``path`` (C order, from byte ``offset``) as a read-only :class:`RowFile`."""
    arr = RowFile(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
    arr._rows_at = (str(path), offset)
    return arr


def rows_of(arr: Array) -> Array:
    """A C-ordered memmap (an ``np.load(mmap_mode="r")`` cache hit) as a :class:`RowFile`."""
    if (
        isinstance(arr, np.memmap)
        and not isinstance(arr, RowFile)
        and isinstance(arr.filename, str | Path)
        and isinstance(arr.offset, int)
        and arr.flags.c_contiguous
        and arr.ndim >= 1
    ):
        return open_rows(arr.filename, arr.shape, arr.offset, arr.dtype)
    return arr


@dataclass(frozen=True)
class LayerRequest:
    """A layer to stream, and how its 4-D conv maps (N, C, H, W) become rows: flattened,
    global-average-pooled to (N, C) (``pool``), or pooled only when one sample has more than
    ``pool_wider_than`` values."""

    name: str
    pool: bool = False
    pool_wider_than: int | None = None

    def rows(self, a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        wide = self.pool_wider_than is not None and int(np.prod(a.shape[1:])) > self.pool_wider_than
        if a.ndim == 4 and (self.pool or wide):
            a = a.mean(axis=(2, 3))
        return np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)

    @property
    def cache_tag(self) -> str:
        if self.pool:
            return "ac-pool"
        return "ac-flat" if self.pool_wider_than is None else f"ac-pool>{self.pool_wider_than}"


def stream_layers(
    model: LoadedModel,
    x: Array,
    requests: list[LayerRequest],
    directory: str | Path | None = None,
    batch_size: int = BATCH,
    progress: str | None = None,
    quiet: bool = True,
    order: npt.NDArray[np.int64] | None = None,
    on_rows: RowsHook | None = None,
) -> list[Streamed]:
    """Forward ``x`` once in bounded batches (:func:`gate.activations.forward_batches`); each
    batch's activations of every requested layer are written straight to a file per layer,
    read back as a :class:`RowFile`. With ``order``, row ``i`` of the files (and of the
    predictions) is sample ``order[i]``.

    ``on_rows(first, rows)`` sees each batch of the first request's rows once written (rows
    ``first..`` in ``order``; the array is the hook's to keep).

    The caller owns the files (put them in a temporary ``directory`` that it removes). With
    ``progress`` (a label) and enough batches, progress goes to stderr unless ``quiet``.
    """
    directory = (
        Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="gate-ac-"))
    )
    paths = [
        directory / f"activations-{hashlib.sha256(repr(r).encode()).hexdigest()[:16]}.f32"
        for r in requests
    ]
    n = len(x)
    preds = np.empty(n, dtype=np.int64)
    widths: list[int | None] = [None] * len(requests)
    names = list(dict.fromkeys(r.name for r in requests))
    # Plain writes, not a writable memmap: a mapping's dirty pages count in this process's
    # resident memory until it is unmapped, i.e. the whole matrix at the end of extraction.
    with ExitStack() as stack:
        files = [stack.enter_context(open(p, "wb")) for p in paths]
        batches = forward_batches(model, x, names, batch_size, None, progress, quiet, order)
        for start, res in batches:
            for i, (req, fh) in enumerate(zip(requests, files, strict=True)):
                a = req.rows(np.asarray(res.activations[req.name]))
                if widths[i] is None:
                    widths[i] = a.shape[1]
                elif a.shape[1] != widths[i]:
                    raise ModelLoadError(
                        f"{model.path}: layer {req.name!r} gave {a.shape[1]} values per sample "
                        f"in one batch and {widths[i]} in another"
                    )
                fh.write(a.data)
                if i == 0 and on_rows is not None:
                    on_rows(start, a.copy())
            logits = np.asarray(res.outputs).reshape(len(a), -1)
            preds[start : start + len(a)] = logits.argmax(axis=1)
    return [
        Streamed(activations=open_rows(p, (n, int(w or 0))), predictions=preds, path=p)
        for p, w in zip(paths, widths, strict=True)
    ]


def stream_activations(
    model: LoadedModel,
    x: Array,
    layer: str,
    directory: str | Path | None = None,
    pool: bool = False,
    batch_size: int = BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> Streamed:
    """One layer through :func:`stream_layers`."""
    req = [LayerRequest(layer, pool)]
    return stream_layers(model, x, req, directory, batch_size, progress, quiet)[0]


def input_digest(x: Array) -> str:
    """sha256 of ``x``'s dtype, shape and bytes (hashed in chunks)."""
    h = hashlib.sha256(f"{x.dtype.str}{tuple(x.shape)}".encode())
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    for s in range(0, len(flat), HASH_CHUNK):
        h.update(flat[s : s + HASH_CHUNK].tobytes())
    return h.hexdigest()


def cached_activations(
    model: LoadedModel,
    x: Array,
    requests: list[LayerRequest],
    directory: str | Path,
    cache: ActivationCache | None,
    input_hash: str | None = None,
    progress: str | None = None,
    quiet: bool = True,
    order: npt.NDArray[np.int64] | None = None,
    on_rows: RowsHook | None = None,
) -> list[Streamed]:
    """:func:`stream_layers` through ``cache``: keyed by the model's sha256, the data's hash,
    the layer, the pooling and ``order``. Hits are memory-mapped, not read into memory; the
    misses are streamed together in one pass."""
    if cache is None:
        return stream_layers(
            model, x, requests, directory, BATCH, progress, quiet, order, on_rows
        )
    digest = input_hash or input_digest(x)
    tags: tuple[str, ...] = ()
    if order is not None:
        tags = ("order-" + hashlib.sha256(np.asarray(order, np.int64).tobytes()).hexdigest(),)
    # Models built from the user's code (--arch) also key on that code, not only the file.
    identity = str(getattr(model, "cache_identity", model.sha256))
    keys = [cache.key(identity, digest, (r.name, r.cache_tag, *tags)) for r in requests]
    out: list[Streamed | None] = []
    for key, req in zip(keys, requests, strict=True):
        hit = cache.get(key, len(x), [req.name])
        if hit is None:
            out.append(None)
            continue
        preds = np.asarray(hit.outputs, dtype=np.float32)[:, 0].astype(np.int64)
        out.append(Streamed(rows_of(hit.activations[req.name]), preds, None, cached=True))
    missing = [i for i, s in enumerate(out) if s is None]
    if missing:
        todo = [requests[i] for i in missing]
        # The hook is about the first request's rows: only when those are streamed.
        hook = on_rows if missing[0] == 0 else None
        fresh = stream_layers(model, x, todo, directory, BATCH, progress, quiet, order, hook)
        for i, streamed in zip(missing, fresh, strict=True):
            # The entry's "outputs" hold the predicted class (a float32 column), all AC needs.
            outputs = streamed.predictions.astype(np.float32)[:, None]
            name = requests[i].name
            result = ForwardResult(outputs=outputs, activations={name: streamed.activations})
            cache.put(keys[i], result, [name])
            out[i] = streamed
    return [s for s in out if s is not None]

"""Running inputs through a model in bounded batches and collecting layer activations."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gate.models.base import Array, ForwardResult, LoadedModel

DEFAULT_BATCH = 256
PROGRESS_MIN_BATCHES = 8
# Bytes of outputs plus captured activations per batch; GATE_BATCH_MEMORY_MB overrides.
DEFAULT_BATCH_MEMORY = 256 * 2**20
_MEASURE_ROWS = 4


def batch_memory() -> int:
    try:
        return max(1, int(float(os.environ.get("GATE_BATCH_MEMORY_MB", "")) * 2**20))
    except ValueError:
        return DEFAULT_BATCH_MEMORY


def forward_batches(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str],
    batch_size: int = DEFAULT_BATCH,
    memory: int | None = None,
    progress: str | None = None,
    quiet: bool = True,
    order: np.ndarray | None = None,
) -> Iterator[tuple[int, ForwardResult]]:
    """Forward ``x`` in batches, yielding ``(first row, result)``; with ``order`` (a
    permutation of the rows) the rows ``x[order]`` in that order, one batch gathered at a
    time, and ``first row`` counts positions in ``order``.

    The first few rows run alone to measure what one row's outputs and activations take;
    later batches hold at most ``memory`` bytes of them (and at most ``batch_size`` rows),
    so a wide layer or a long sequence cannot exhaust memory. The schedule depends only on
    shapes, so results are deterministic. With ``progress`` (a label) and more than
    :data:`PROGRESS_MIN_BATCHES` batches, progress goes to stderr unless ``quiet``.
    """
    from gate.progress import Progress

    n = len(x)

    def rows(start: int, stop: int) -> Array:
        return x[start:stop] if order is None else x[order[start:stop]]

    first = min(_MEASURE_ROWS, batch_size, n)
    res = model.forward(rows(0, first), layers)
    row_bytes = (
        np.asarray(res.outputs).nbytes + sum(np.asarray(a).nbytes for a in res.activations.values())
    ) / max(first, 1)
    budget = batch_memory() if memory is None else memory
    size = max(1, min(batch_size, int(budget // max(row_bytes, 1.0))))
    n_batches = 1 + -(-(n - first) // size)
    show = progress is not None and not quiet and n_batches >= PROGRESS_MIN_BATCHES
    with Progress(n_batches, progress or "extract", unit="batches", quiet=not show) as bar:
        yield 0, res
        bar.update()
        for start in range(first, n, size):
            yield start, model.forward(rows(start, start + size), layers)
            bar.update()


def extract(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> ForwardResult:
    """Forward ``x`` in bounded batches (:func:`forward_batches`); returns the outputs and
    each layer flattened per sample."""
    outputs: list[Array] = []
    acts: dict[str, list[Array]] = {name: [] for name in layers}
    for _, res in forward_batches(model, x, layers, batch_size, progress=progress, quiet=quiet):
        outputs.append(res.outputs)
        for name in layers:
            acts[name].append(res.activations[name].reshape(len(res.outputs), -1))
    return ForwardResult(
        outputs=np.concatenate(outputs),
        activations={name: np.concatenate(parts) for name, parts in acts.items()},
    )


_CACHE_VERSION = "4"  # 2: bounded batches; 3: AC batches of 1024; 4: keyed and MACed entries
SECRET_FILE = "cache.key"
SECRET_ENV = "GATE_CACHE_SECRET"
_SECRET_BYTES = 32
_MAC_CHUNK = 1 << 22


def default_cache_root() -> Path | None:
    """gate's cache root, never the working directory (in CI the checked-out repository,
    which whoever proposes the model controls): ``$RUNNER_TEMP/gate-cache`` under GitHub
    Actions (when that directory exists: it is emptied for every job), else
    ``$XDG_CACHE_HOME/gate`` (an absolute path), else ``~/.cache/gate``. None without a home."""
    runner_temp = os.environ.get("RUNNER_TEMP", "")
    actions = os.environ.get("GITHUB_ACTIONS") == "true"
    if actions and os.path.isabs(runner_temp) and os.path.isdir(runner_temp):
        return Path(runner_temp) / "gate-cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "gate"
    try:
        return Path.home() / ".cache" / "gate"
    except (RuntimeError, KeyError):
        return None


def default_cache_dir() -> Path | None:
    root = default_cache_root()
    return None if root is None else root / "activations"


def cache_secret() -> bytes | None:
    """The secret that keys and authenticates cache entries, or None (no usable cache).

    ``$GATE_CACHE_SECRET`` when set (to share a cache between machines or jobs: pass it from
    a CI secret), else ``cache.key`` in :func:`default_cache_root` — never in ``--cache-dir``,
    which may be inside the repository. The file is made on first use from ``os.urandom``
    with mode 0600, and used only while it is a regular file of this user that no one else
    can read or write: a checked-out or planted file (mode 0644) is refused.
    """
    env = os.environ.get(SECRET_ENV, "")
    if env:
        return hashlib.sha256(b"gate-cache-secret\0" + env.encode("utf-8", "replace")).digest()
    root = default_cache_root()
    if root is None:
        return None
    path = root / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _create_secret(path)
        return _read_secret(path)
    except OSError:  # no writable home: run without a cache
        return None


def _read_secret(path: Path) -> bytes | None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        private = os.name != "posix" or st.st_mode & 0o077 == 0
        if not (stat.S_ISREG(st.st_mode) and mine and private) or st.st_size != _SECRET_BYTES:
            return None
        data = os.read(fd, _SECRET_BYTES + 1)
    finally:
        os.close(fd)
    return data if len(data) == _SECRET_BYTES else None


def _create_secret(path: Path) -> None:
    # Written to a private temporary file, then linked into place: a concurrent gate either
    # sees the whole key or none, and an existing key is never replaced.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cache.key.")
    try:
        os.write(fd, os.urandom(_SECRET_BYTES))
        os.fsync(fd)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class ActivationCache:
    """Extraction results on disk, keyed by model sha256 + input hash + layers.

    Each entry is a directory of ``.npy`` files (``outputs.npy`` and one ``layer-K.npy``
    per requested layer) and ``mac``, written atomically and read with
    ``allow_pickle=False``. The entry's name is an HMAC of its key under the machine's
    secret (:func:`cache_secret`), and ``mac`` an HMAC over the name and every file's bytes:
    without the secret no one can name an entry for a model or forge its content, so an
    entry committed to a repository, or edited, is never used. An entry that is
    unreadable, fails its MAC or has the wrong shape is ignored and recomputed.
    """

    def __init__(self, root: str | Path, secret: bytes) -> None:
        self.root = Path(root)
        self.secret = secret
        self.hits = 0
        self.misses = 0

    @classmethod
    def open(cls, root: str | Path | None = None) -> ActivationCache | None:
        """The cache at ``root`` (default :func:`default_cache_dir`), or None when there is
        no usable secret or default location."""
        secret = cache_secret()
        where = root if root is not None else default_cache_dir()
        if secret is None or where is None:
            return None
        return cls(where, secret)

    def key(self, model_sha256: str, input_hash: str, layers: Sequence[str]) -> str:
        h = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in (_CACHE_VERSION, model_sha256, input_hash, *layers):
            h.update(part.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()

    def get(self, key: str, n_rows: int, layers: Sequence[str]) -> ForwardResult | None:
        entry = self.root / key[:2] / key
        try:
            files = self._files(entry, layers)
            stored = (entry / "mac").read_text(encoding="ascii").strip()
            if not hmac.compare_digest(stored, self._mac(key, files)):
                raise ValueError(f"{entry}: MAC mismatch")
            outputs = _load_npy(files[-1], n_rows)
            acts = {name: _load_npy(files[i], n_rows) for i, name in enumerate(layers)}
        except (OSError, ValueError, EOFError, UnicodeDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return ForwardResult(outputs=outputs, activations=acts)

    def put(self, key: str, result: ForwardResult, layers: Sequence[str]) -> None:
        from gate._io import write_bytes_atomic, write_npy_atomic

        entry = self.root / key[:2] / key
        files = self._files(entry, layers)
        arrays = [*(result.activations[name] for name in layers), result.outputs]
        try:
            (entry / "mac").unlink(missing_ok=True)  # a half-rewritten entry never verifies
            for path, arr in zip(files, arrays, strict=True):
                write_npy_atomic(path, arr)
            # The MAC covers the bytes as they are on disk (read back: cheap, in page cache).
            write_bytes_atomic(entry / "mac", self._mac(key, files).encode("ascii") + b"\n")
        except OSError:  # a read-only or full disk only costs the cache
            pass

    @staticmethod
    def _files(entry: Path, layers: Sequence[str]) -> list[Path]:
        return [*(entry / f"layer-{i}.npy" for i in range(len(layers))), entry / "outputs.npy"]

    def _mac(self, key: str, files: Sequence[Path]) -> str:
        h = hmac.new(self.secret, key.encode("ascii"), hashlib.sha256)
        buf = bytearray(_MAC_CHUNK)
        view = memoryview(buf)
        for path in files:
            h.update(b"\0" + path.name.encode("ascii") + b"\0")
            with open(path, "rb") as fh:
                h.update(str(os.fstat(fh.fileno()).st_size).encode("ascii") + b"\0")
                while got := fh.readinto(buf):
                    h.update(view[:got])
        return h.hexdigest()


def _load_npy(path: Path, n_rows: int) -> Array:
    # Memory-mapped: a hit on a large AC matrix costs page cache, not a second copy in RAM.
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2:
        raise ValueError(f"{path}: not a float32 matrix")
    if arr.shape[0] != n_rows:
        raise ValueError(f"{path}: {arr.shape[0]} rows, expected {n_rows}")
    return arr


def extract_cached(
    model: LoadedModel,
    x: Array,
    layers: Sequence[str],
    input_hash: str,
    cache: ActivationCache | None,
    batch_size: int = DEFAULT_BATCH,
    progress: str | None = None,
    quiet: bool = True,
) -> ForwardResult:
    """:func:`extract`, through ``cache`` when given (``input_hash`` identifies ``x``)."""
    layers = tuple(layers)
    # Models built from the user's code (--arch) also key on that code, not only the file.
    identity = str(getattr(model, "cache_identity", model.sha256))
    key = cache.key(identity, input_hash, layers) if cache is not None else ""
    if cache is not None:
        hit = cache.get(key, len(x), layers)
        if hit is not None:
            return hit
    res = extract(model, x, layers, batch_size, progress=progress, quiet=quiet)
    if cache is not None:
        cache.put(key, res, layers)
    return res

"""Loading and validating labelled data sets: ``.npz`` with ``x`` and ``y`` (tensors), or
JSONL with ``text`` and ``label`` per line (for text models), told apart by content."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gate._io import check_npz
from gate.errors import DataError, MismatchError, first_line
from gate.models.base import LoadedModel, TextInput

MAX_JSONL_BYTES = 4 << 30


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, N x ...) and integer labels ``y`` (N,)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    path: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_npz(path: str | Path) -> Dataset:
    """Read and validate a data file; every problem is a one-line :class:`DataError`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        check_npz(p)  # headers against sizes, before numpy allocates what they declare
        # allow_pickle=False: object arrays would mean unpickling untrusted bytes.
        with np.load(p, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = {"x", "y"} - keys
            if missing:
                raise DataError(
                    f"{p}: npz must contain arrays 'x' and 'y'; missing {sorted(missing)} "
                    f"(found {sorted(keys) or 'none'})"
                )
            x = npz["x"]
            y = npz["y"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({first_line(exc)})") from None
    except MemoryError:
        raise DataError(f"{p}: the arrays are too large to load into memory") from None
    return validate_arrays(x, y, str(p))


def validate_arrays(x: npt.NDArray[Any], y: npt.NDArray[Any], where: str) -> Dataset:
    if x.dtype.kind not in "fiu":
        raise DataError(f"{where}: 'x' must be numeric (float32 preferred), got dtype {x.dtype}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: 'y' must hold integer class labels, got dtype {y.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{where}: 'x' must be N x features (or N x C x H x W), got shape {x.shape}"
        )
    if y.ndim != 1:
        raise DataError(f"{where}: 'y' must be one-dimensional, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: 'x' has {x.shape[0]} rows but 'y' has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"{where}: data set is empty")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(xf)):
        bad = int(np.flatnonzero((~np.isfinite(xf.reshape(len(xf), -1))).any(axis=1))[0])
        raise DataError(f"{where}: 'x' contains NaN or infinite values (first at row {bad})")
    if np.any(y < 0):
        raise DataError(f"{where}: 'y' contains negative labels")
    return Dataset(x=xf, y=np.asarray(y, dtype=np.int64), path=where)


@dataclass(frozen=True)
class TextData:
    """Texts and integer labels from a JSONL file; a text model's tokenizer makes them inputs."""

    texts: tuple[str, ...]
    y: npt.NDArray[np.int64]
    path: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def digest(self) -> str:
        """sha256 of the texts and labels (identifies the data in a baseline's probe source)."""
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.y.tolist(), strict=True):
            h.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8") + b"\n")
        return h.hexdigest()


def load_data(path: str | Path) -> Dataset | TextData:
    """``--data``: JSONL when the file starts with ``{`` (after whitespace), else ``.npz``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise DataError(f"{p}: cannot read data file ({exc.strerror or exc})") from None
    if not head and p.stat().st_size <= 4096:
        raise DataError(f"{p}: data file is empty")
    return load_jsonl(p) if head.startswith(b"{") else load_npz(p)


def json_value_problem(exc: ValueError) -> str:
    """What json.loads's non-syntax ValueError means, without Python's advice to set limits."""
    if "digits" in str(exc):
        return "a number has too many digits (over 4300)"
    return f"unusable JSON value ({first_line(exc)})"


def load_jsonl(path: str | Path) -> TextData:
    """One JSON object per line with a string ``text`` and an integer ``label`` >= 0."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_JSONL_BYTES:
            raise DataError(f"{p}: JSONL data is larger than {MAX_JSONL_BYTES >> 30} GiB")
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot read data file ({exc.strerror or exc})") from None
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: JSONL data is not UTF-8 (byte {exc.start})") from None
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: line {number} is not JSON ({exc.msg})") from None
        except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
            raise DataError(f"{p}: line {number}: {json_value_problem(exc)}") from None
        except RecursionError:
            raise DataError(f"{p}: line {number} is nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(f"{p}: line {number} is not a JSON object with text and label")
        missing = [k for k in ("text", "label") if k not in record]
        if missing:
            raise DataError(f"{p}: line {number} has no {' or '.join(repr(k) for k in missing)}")
        text, label = record["text"], record["label"]
        if not isinstance(text, str):
            raise DataError(f"{p}: line {number}: 'text' must be a string")
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(
                f"{p}: line {number}: 'label' must be an integer class label, got {label!r}"
            )
        if label < 0:
            raise DataError(f"{p}: line {number}: 'label' must not be negative")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(f"{p}: data set is empty (no JSONL records)")
    return TextData(tuple(texts), np.asarray(labels, dtype=np.int64), str(p))


def model_input(model: LoadedModel, data: Dataset | TextData) -> Dataset:
    """``data`` as ``model`` takes it: texts through a text model's tokenizer."""
    if isinstance(data, TextData):
        if not isinstance(model, TextInput):
            raise MismatchError(
                f"{data.path}: text data (JSONL), but {model.path} is not a text model"
            )
        return Dataset(x=model.tokenize(data.texts), y=data.y, path=data.path)
    if isinstance(model, TextInput):
        raise MismatchError(
            f"{data.path}: {model.path} is a text model; give --data as JSONL lines with "
            '"text" and "label"'
        )
    return data

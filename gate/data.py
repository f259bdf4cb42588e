"""Loading and validating labelled data sets (``.npz`` with ``x`` and ``y``)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.errors import DataError, first_line


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
        bad = int(np.flatnonzero(~np.isfinite(xf.reshape(len(xf), -1)).any(axis=1))[0])
        raise DataError(f"{where}: 'x' contains NaN or infinite values (first at row {bad})")
    if np.any(y < 0):
        raise DataError(f"{where}: 'y' contains negative labels")
    return Dataset(x=xf, y=np.asarray(y, dtype=np.int64), path=where)

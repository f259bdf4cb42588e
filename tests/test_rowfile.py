"""gate.ac.extract.RowFile: row gathers read the file in windows and equal a memmap's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from gate.ac import extract
from gate.ac.extract import RowFile, open_rows, rows_of


@pytest.fixture
def matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray]:
    monkeypatch.setattr(extract, "WINDOW", 3 * 7 * 4)  # 3 rows per window: many windows
    a = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    path = tmp_path / "acts.f32"
    a.tofile(path)
    return path, a


def test_gathers_equal_memmap_indexing(matrix: tuple[Path, np.ndarray]) -> None:
    path, a = matrix
    r = open_rows(path, a.shape)
    for key in (
        np.array([5, 1, 49, 1, 0, 17], dtype=np.int64),
        np.array([-1, -50, 3], dtype=np.int32),
        np.arange(50)[::-3],
        np.array([], dtype=np.int64),
        a[:, 0] > 0,
        np.arange(10, 31),  # a run of consecutive rows: read in one go, not gathered
        np.arange(49, 50),
        np.array([-3, -2, -1]),
    ):
        got = r[key]
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, a[key])
    np.testing.assert_array_equal(r[10:20], a[10:20])
    np.testing.assert_array_equal(r[3], a[3])
    np.testing.assert_allclose(r.std(axis=0), a.std(axis=0))
    assert type(r.std(axis=0)) is np.ndarray
    np.testing.assert_array_equal(np.asarray(r), a)
    with pytest.raises(IndexError):
        r[np.array([50])]
    with pytest.raises(IndexError):
        r[np.array([-51])]


def test_tofile_copies_the_file_and_npy_hits_become_rowfiles(
    matrix: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, a = matrix
    buf = io.BytesIO()
    open_rows(path, a.shape).tofile(buf)
    assert buf.getvalue() == a.tobytes()
    npy = tmp_path / "acts.npy"
    with open(npy, "wb") as fh:
        np.lib.format.write_array(fh, open_rows(path, a.shape))  # how the cache writes
    hit = rows_of(np.load(npy, mmap_mode="r"))
    assert isinstance(hit, RowFile)
    np.testing.assert_array_equal(hit[np.array([4, 2, 40])], a[[4, 2, 40]])
    np.testing.assert_array_equal(np.asarray(hit), a)


def test_a_run_of_rows_reads_from_the_offset_and_fails_on_a_short_file(
    matrix: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    _, a = matrix
    npy = tmp_path / "acts.npy"
    np.save(npy, a)
    hit = rows_of(np.load(npy, mmap_mode="r"))  # data after the .npy header
    np.testing.assert_array_equal(hit[np.arange(7, 40)], a[7:40])
    short = tmp_path / "short.f32"
    a[:45].tofile(short)
    r = open_rows(short, (45, 7))
    r._rows_at = (str(short), 4 * 7 * 4)  # rows 41-44 now lie past the end of the file
    with pytest.raises(OSError, match="shorter"):
        r[np.arange(40, 45)]

"""Tiny PNG pictures for trigger investigation, with zlib + struct only (no matplotlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.typing as npt

MAX_TILES = 64


def png_gray(img: npt.NDArray[np.uint8]) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit greyscale PNG."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _to_u8(a: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.asarray(np.round(scaled * 255), dtype=np.uint8)


def suspicious_mosaic(x: npt.NDArray[np.float32], rows: list[int], scale: int = 4) -> bytes | None:
    """Up to 64 suspicious images, then their mean and per-pixel variance (a trigger shows up
    as a bright, low-variance spot in the mean). ``None`` unless ``x`` holds images."""
    if x.ndim != 4 or not rows:
        return None
    imgs = np.asarray(x[rows[:MAX_TILES]], dtype=np.float64).mean(axis=1)  # N x H x W
    allimgs = np.asarray(x[rows], dtype=np.float64).mean(axis=1)
    tiles = [_to_u8(i) for i in imgs]
    summary = [_to_u8(allimgs.mean(axis=0)), _to_u8(allimgs.var(axis=0))]
    h, w = tiles[0].shape
    cols, pad = 10, 1
    nrows = -(-len(tiles) // cols) + 1  # the last row: mean and per-pixel variance
    canvas = np.full((nrows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    places = [divmod(i, cols) for i in range(len(tiles))] + [(nrows - 1, 0), (nrows - 1, 1)]
    for t, (r, c) in zip(tiles + summary, places, strict=True):
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = t
    big = np.kron(canvas, np.ones((scale, scale), dtype=np.uint8)).astype(np.uint8)
    return png_gray(big)

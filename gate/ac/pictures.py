"""Tiny PNG pictures for trigger investigation, with zlib + struct only (no matplotlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.typing as npt

MAX_TILES = 64


def png_gray(img: npt.NDArray[np.uint8]) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit greyscale PNG."""
    return _png(img, colour_type=0)


def png_rgb(img: npt.NDArray[np.uint8]) -> bytes:
    """Encode an H x W x 3 uint8 array as an 8-bit RGB PNG."""
    return _png(img, colour_type=2)


def _png(img: npt.NDArray[np.uint8], colour_type: int) -> bytes:
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + np.ascontiguousarray(img[r]).tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
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


# Cluster colours (RGB): two muted cluster colours, the suspicious cluster in red on top.
CLUSTER_COLOURS = ((70, 110, 200), (90, 170, 90), (150, 150, 150))
SUSPICIOUS = (220, 30, 30)
AXIS = (60, 60, 60)


def cluster_picture(
    points: npt.NDArray[np.floating],
    clusters: npt.NDArray[np.integer],
    suspicious: npt.NDArray[np.bool_],
    size: int = 400,
    dot: int = 3,
) -> bytes:
    """A 2-D scatter as an RGB PNG: ``points`` (N x 2) as small squares on white, coloured by
    ``clusters``; ``suspicious`` rows drawn last, larger and in red. A thin axis box frames
    the plot; the axes are scaled to the points' range (equal per axis, no labels)."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    margin = 16
    canvas[margin - 6, margin - 6 : size - margin + 6] = AXIS
    canvas[size - margin + 5, margin - 6 : size - margin + 6] = AXIS
    canvas[margin - 6 : size - margin + 6, margin - 6] = AXIS
    canvas[margin - 6 : size - margin + 6, size - margin + 5] = AXIS
    pts = np.asarray(points, dtype=np.float64)[:, :2]
    if len(pts) == 0:
        return png_rgb(canvas)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    inner = size - 2 * margin - dot - 1
    col = margin + np.round((pts[:, 0] - lo[0]) / span[0] * inner).astype(np.int64)
    row = margin + np.round((hi[1] - pts[:, 1]) / span[1] * inner).astype(np.int64)
    order = [np.flatnonzero(~suspicious & (clusters == c)) for c in np.unique(clusters)]
    for i, rows in enumerate(order):
        _squares(canvas, row[rows], col[rows], dot, CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)])
    bad = np.flatnonzero(suspicious)
    _squares(canvas, row[bad] - 1, col[bad] - 1, dot + 2, SUSPICIOUS)
    return png_rgb(canvas)


def _squares(
    canvas: npt.NDArray[np.uint8],
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    side: int,
    colour: tuple[int, int, int],
) -> None:
    h, w = canvas.shape[:2]
    for dr in range(side):
        for dc in range(side):
            canvas[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)] = colour

"""The parent's side of the trigger search: inputs to search on, the report, the picture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.errors import MismatchError, UsageError
from gate.report.schema import TriggerClassReport, TriggerSearchReport
from gate.trigger import stats

# Inputs handed to the search (it draws its own few per class): enough for every class of a
# 100-class model to have some, small enough to cross the sandbox's pipe quickly.
MAX_INPUTS = 512
SYNTHETIC_INPUTS = 256


@dataclass
class TriggerRequest:
    """What the CLI asks of the trigger stage; ``pictures`` receives the PNG files."""

    mode: str = "auto"  # "auto": without a baseline, or with one built with it; "on"; "off"
    budget: str | int | None = None  # bounds the optimisation steps of each search stage
    input_shape: tuple[int, ...] | None = None
    pictures: dict[str, bytes] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        return budget_options(self.budget)


def budget_options(budget: str | int | None) -> dict[str, Any]:
    """``--trigger-budget N``: the mask search runs N steps, the max-margin search 2N/3."""
    if budget is None:
        return {}
    try:
        steps = int(budget)
    except ValueError:
        raise UsageError(f"--trigger-budget: expected a positive integer, got {budget!r}") from None
    if steps < 1 or steps > 100_000:
        raise UsageError(
            f"--trigger-budget must be at least 1 (and at most 100000), got {budget!r}"
        )
    return {"steps": steps, "mm_steps": max(1, round(steps * 2 / 3))}


def search_inputs(
    x: npt.NDArray[np.float32] | None,
    y: npt.NDArray[np.int64] | None,
    input_shape: Sequence[int] | None,
    seed: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None, str]:
    """A seeded, class-stratified subset of the data, or uniform [0, 1] inputs of the shape."""
    rng = np.random.default_rng(seed + 14)
    if x is not None:
        if input_shape is not None and tuple(input_shape) != tuple(x.shape[1:]):
            raise UsageError(
                f"--input-shape {','.join(map(str, input_shape))} contradicts --data's shape "
                f"{','.join(map(str, x.shape[1:]))}"
            )
        if len(x) <= MAX_INPUTS:
            rows = np.arange(len(x))
        else:
            assert y is not None
            order = rng.permutation(len(x))
            # Round-robin over classes so that every class keeps some rows.
            rank = np.empty(len(x), dtype=np.int64)
            for c in np.unique(y):
                members = order[y[order] == c]
                rank[members] = np.arange(len(members))
            rows = np.sort(np.lexsort((order.argsort(), rank))[:MAX_INPUTS])
        return np.asarray(x[rows], dtype=np.float32), None if y is None else y[rows], "data"
    if input_shape is None:
        raise UsageError("the trigger search needs --data DATA.npz or --input-shape C,H,W")
    shape = (SYNTHETIC_INPUTS, *(int(d) for d in input_shape))
    return rng.uniform(0.0, 1.0, size=shape).astype(np.float32), None, "synthetic"


def input_range(x: npt.NDArray[np.float32] | None) -> list[float]:
    """The valid input box: the data's own range, or [0, 1] for synthetic inputs."""
    if x is None or not len(x):
        return [0.0, 1.0]
    lo, hi = float(np.min(x)), float(np.max(x))
    return [lo, hi] if hi > lo else [lo, lo + 1.0]


def build_report(
    result: Mapping[str, Any],
    warn_alpha: float,
    references: Sequence[Mapping[str, Sequence[float]]] | None,
    inputs: str,
) -> TriggerSearchReport:
    if result.get("status") != "ok":
        return TriggerSearchReport(
            status="not_run", reason=str(result.get("reason") or "the search did not run")
        )
    w = stats.within_model(result)
    ref = None
    if references and len(references) >= stats.MIN_REFERENCES:
        try:
            ref = stats.against_references(result, references)
        except ValueError as exc:
            raise MismatchError(f"trigger search: {exc}") from None
    if ref is not None:
        p, null, suspect = float(ref["p_value"]), "baseline", int(ref["suspect"])
    else:
        p, null, suspect = float(w["p_value"]), "within_model", int(w["suspect"])
    p = _r(p)
    flips = result.get("flip_mask_l1")
    classes = [
        TriggerClassReport(
            label=c,
            max_margin=_r(result["max_margin"][c]),
            mask_l1=_r(result["target_mask_l1"][c]),
            mask_asr=_r(result["target_asr"][c]),
            z_margin=_r(w["z"]["max_margin"][i]),
            z_mask=_r(w["z"]["mask_l1"][i]),
            p_value=_r(w["class_p"][i]),
            flip_l1=None if flips is None else _r(flips[c]),
            z_reference=None if ref is None else _r(ref["z"][c]),
            p_reference=None if ref is None else _r(ref["class_p"][c]),
        )
        for i, c in enumerate(w["classes"])
    ]
    steps = result.get("steps_run") or {}
    return TriggerSearchReport(
        status="ok",
        p_value=p,
        anomaly_score=_r(1.0 - p),
        null=null,
        within_model_p_value=_r(w["p_value"]),
        reference_shift_z=None if ref is None else _r(ref["z_shift"]),
        reference_shift_p_value=None if ref is None else _r(ref["tests"]["shift"]),
        suspected_target=suspect if p < warn_alpha else None,
        most_suspicious_class=suspect,
        classes=classes,
        input_range=[float(v) for v in result["input_range"]],
        inputs=inputs,
        steps={str(k): int(v) for k, v in steps.items()},
        n_references=len(references) if ref is not None and references else None,
    )


def picture(
    result: Mapping[str, Any], label: int, x: npt.NDArray[np.float32], n: int = 8
) -> bytes | None:
    """``trigger-search-class-N.png``: the mask, the pattern, then clean inputs and the same
    inputs with the found trigger applied (top row clean, bottom row stamped)."""
    from gate.ac.pictures import _to_u8, png_gray

    masks, patterns = result.get("masks"), result.get("patterns")
    if masks is None or patterns is None or x.ndim != 4:
        return None
    mask = np.asarray(masks[label], dtype=np.float64)  # 1 x H x W
    pat = np.asarray(patterns[label], dtype=np.float64)  # C x H x W
    clean = np.asarray(x[:n], dtype=np.float64)
    stamped = (1 - mask) * clean + mask * pat
    lo, hi = float(result["input_range"][0]), float(result["input_range"][1])

    def grey(a: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
        img = np.clip((a.mean(axis=0) - lo) / max(hi - lo, 1e-12), 0, 1)
        return np.asarray(np.round(img * 255), dtype=np.uint8)

    h, w = mask.shape[-2:]
    scale = max(1, 64 // max(h, w))
    tiles_top = [_to_u8(mask.mean(axis=0)), grey(pat), *[grey(c) for c in clean]]
    tiles_bottom = [np.zeros((h, w), np.uint8), grey(mask * pat), *[grey(s) for s in stamped]]
    pad = 1
    cols = len(tiles_top)
    canvas = np.full((2 * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for row, tiles in enumerate((tiles_top, tiles_bottom)):
        for col, tile in enumerate(tiles):
            r0, c0 = pad + row * (h + pad), pad + col * (w + pad)
            canvas[r0 : r0 + h, c0 : c0 + w] = tile
    big = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    return png_gray(np.ascontiguousarray(big))


def _r(v: float) -> float:
    return float(f"{float(v):.6g}")

"""Device benchmark (`make bench-device`): another device against the CPU, the reference.

Skips (exit 0, saying why) where torch sees no CUDA or MPS device; nothing else requires
one. Where one is present, in one run:

* **agreement**: a baseline of the demo's clean digit CNNs built with the trigger search,
  then a held-out clean and a BadNets candidate scanned with ``--data`` (fingerprint, AC,
  trigger search), all once with ``--device cpu`` and once on the accelerator: the verdicts
  and check statuses must be equal, and the largest differences of the p-values and of the
  search's per-class statistics are reported against gate.device.SCORE_TOLERANCE;
* **speed**: the median wall time of ``gate scan`` (trigger search included) on both
  devices, for the small digits CNN and for a 28x28 CNN with ~1M parameters.

The table is printed as markdown and written to ``bench/results/device.md`` (``--out``).
Models are cached under ``bench/.device/``. ``--repeats N`` sets the timed runs per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".device"
sys.path.insert(0, str(REPO))


def _accelerator() -> str | None:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


def _gate(*args: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gate", *args], capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"gate {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.returncode, took, proc.stderr


def _zoo() -> tuple[list[str], dict[str, str], str]:
    from gate.demo.run import BACKDOORED, HELD_OUT_CLEAN, REFERENCES
    from gate.demo.zoo import materialise, save_digits_npz

    models = WORK / "models"
    refs = [str(materialise(spec, models)) for spec in REFERENCES[:6]]
    cands = {
        "clean": str(materialise(HELD_OUT_CLEAN, models)),
        "badnets": str(materialise(BACKDOORED, models)),
    }
    data = WORK / "digits-train.npz"
    if not data.is_file():
        save_digits_npz(data, "train")
    return refs, cands, str(data)


def _big_cnn() -> tuple[str, str]:
    """A 28x28, 10-class CNN (random init, ~1M parameters) and probes for it."""
    import numpy as np
    import torch

    path, data = WORK / "cnn28.pt", WORK / "cnn28.npz"
    if not path.is_file():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 49, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        ).eval()  # fmt: skip
        torch.jit.save(torch.jit.script(net), str(path))
        rng = np.random.default_rng(0)
        x = rng.random((400, 1, 28, 28), dtype=np.float32)
        y = net(torch.from_numpy(x)).argmax(1).numpy()
        np.savez(data, x=x, y=y)
    return str(path), str(data)


def _max_diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Largest absolute p-value differences, and largest relative statistic differences."""
    out = {
        "fingerprint p": abs(a["fingerprint"]["p_value"] - b["fingerprint"]["p_value"]),
        "trigger p": abs(a["trigger_search"]["p_value"] - b["trigger_search"]["p_value"]),
    }
    rel = 0.0
    for ca, cb in zip(a["trigger_search"]["classes"], b["trigger_search"]["classes"], strict=True):
        for key in ("max_margin", "mask_l1", "flip_l1"):
            if ca.get(key) is not None and cb.get(key) is not None:
                rel = max(rel, abs(ca[key] - cb[key]) / max(1.0, abs(ca[key])))
    out["trigger statistic (relative)"] = rel
    return out


def _scan_seconds(model: str, probes: str, device: str, repeats: int) -> float:
    out = str(WORK / f"speed-{device}")
    args = ("scan", model, "--data", probes, "--report-dir", out, "--format", "json")
    flags = ("--quiet", "--no-cache", "--device", device)
    return statistics.median(_gate(*args, *flags)[1] for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "device.md"))
    args = ap.parse_args(argv)
    device = _accelerator()
    if device is None:
        print("bench-device skipped: torch sees no CUDA or MPS device on this machine")
        return 0
    import torch

    from gate.device import SCORE_TOLERANCE

    name = torch.cuda.get_device_name(0) if device == "cuda" else "Apple MPS"
    refs, cands, data = _zoo()
    lines = [
        "# Device benchmark (`make bench-device`)",
        "",
        f"Accelerator: {name} ({device}); torch {torch.__version__}. The CPU is the reference.",
        "",
        "## Agreement (demo zoo: 6 references built with --trigger-search, two candidates)",
        "",
        "| candidate | verdict cpu | verdict " + device + " | checks equal | "
        "max diff fingerprint p | max diff trigger p | max rel. diff trigger statistic |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    ok = True
    reports: dict[tuple[str, str], dict[str, Any]] = {}
    for dev in ("cpu", device):
        base = WORK / f"baseline-{dev}"
        _gate("baseline", "build", *refs, "--out", str(base), "--data", data,
              "--trigger-search", "--quiet", "--device", dev)  # fmt: skip
        for cand, path in cands.items():
            out = WORK / f"report-{cand}-{dev}"
            _gate("scan", path, "--baseline", str(base), "--data", data, "--report-dir",
                  str(out), "--format", "json", "--quiet", "--device", dev)  # fmt: skip
            reports[(cand, dev)] = json.loads((out / "report.json").read_text())
    for cand in cands:
        a, b = reports[(cand, "cpu")], reports[(cand, device)]
        same = [c["status"] for c in a["checks"]] == [c["status"] for c in b["checks"]]
        diffs = _max_diffs(a, b)
        ok &= same and a["verdict"] == b["verdict"]
        ok &= diffs["fingerprint p"] <= SCORE_TOLERANCE["p_value"]
        ok &= diffs["trigger statistic (relative)"] <= SCORE_TOLERANCE["trigger_statistic"]
        lines.append(
            f"| {cand} | {a['verdict']} | {b['verdict']} | {'yes' if same else '**no**'} | "
            + " | ".join(f"{v:.2g}" for v in diffs.values())
            + " |"
        )
    lines += [
        "",
        f"Tolerance (gate.device.SCORE_TOLERANCE): {SCORE_TOLERANCE}. Within it: "
        + ("**yes**" if ok else "**no**"),
        "",
        f"## Speed (median of {args.repeats} `gate scan` processes, trigger search included)",
        "",
        f"| model | cpu s | {device} s | cpu / {device} |",
        "|---|---:|---:|---:|",
    ]
    big, big_data = _big_cnn()
    for label, path, probes in (("digits CNN", cands["badnets"], data),
                                ("28x28 CNN, ~1M parameters", big, big_data)):  # fmt: skip
        medians = [_scan_seconds(path, probes, dev, args.repeats) for dev in ("cpu", device)]
        lines.append(
            f"| {label} | {medians[0]:.1f} | {medians[1]:.1f} | {medians[0] / medians[1]:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

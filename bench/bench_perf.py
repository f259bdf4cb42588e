"""Performance benchmark (`make bench-perf`): start-up time and scan cost vs bare forward passes.

Everything is measured in one run and printed as markdown tables of medians:

* start-up: ``gate --help`` / ``gate --version`` against ``python -c pass``, plus a check that
  neither imports torch or scikit-learn;
* scan cost: ``gate scan`` (a subprocess, process start included, and the in-process
  pipeline) against the bare forward passes of the same probes through the same model
  (``torch.jit.load`` + forward), for the demo's small CNN and for a ~10M-parameter
  ResNet-like CNN built here (random init; the references are copies with other seeds).

Models, baselines and probes are cached under ``bench/.perf/``. ``--repeats N`` sets the
number of timed runs per cell (default 5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PERF = REPO / "bench" / ".perf"
sys.path.insert(0, str(REPO))


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(cmd: list[str], check: bool = True) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if check and proc.returncode not in (0, 1):
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def _gate() -> list[str]:
    return [sys.executable, "-m", "gate"]


def startup(repeats: int) -> list[tuple[str, float]]:
    rows = [
        ("python -c pass", _median_time(lambda: _run([sys.executable, "-c", "pass"]), repeats)),
        ("gate --help", _median_time(lambda: _run([*_gate(), "--help"]), repeats)),
        ("gate --version", _median_time(lambda: _run([*_gate(), "--version"]), repeats)),
    ]
    return rows


def heavy_imports() -> dict[str, list[str]]:
    code = (
        "import sys, io, contextlib\n"
        "from gate.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main([sys.argv[1]])\n"
        "heavy = ('torch', 'sklearn', 'scipy', 'numpy', 'pydantic')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = {}
    for flag in ("--help", "--version"):
        proc = subprocess.run(
            [sys.executable, "-c", code, flag], capture_output=True, text=True, cwd=REPO
        )
        out[flag] = [m for m in proc.stdout.strip().split(",") if m]
    return out


def small_family() -> tuple[list[str], str, dict[str, Any]]:
    from gate.demo.run import HELD_OUT_CLEAN, REFERENCES
    from gate.demo.zoo import materialise, save_digits_npz

    models = PERF / "small" / "models"
    demo_cache = REPO / ".gate-cache" / "demo" / "models"
    for spec in (*REFERENCES, HELD_OUT_CLEAN):  # reuse `make demo`'s models when present
        src = demo_cache / f"{spec.key}.pt"
        if src.is_file() and not (models / src.name).is_file():
            models.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, models / src.name)
    refs = [str(materialise(spec, models)) for spec in REFERENCES]
    cand = str(materialise(HELD_OUT_CLEAN, models))
    data = PERF / "small" / "digits-train.npz"
    if not data.is_file():
        save_digits_npz(data, "train")
    return refs, cand, {"data": str(data)}


def _resnet(seed: int) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.short(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
            self.layer1 = nn.Sequential(Block(64, 64, 1), Block(64, 64, 1))
            self.layer2 = nn.Sequential(Block(64, 128, 2), Block(128, 128, 1))
            self.layer3 = nn.Sequential(Block(128, 256, 2), Block(256, 256, 1))
            self.layer4 = nn.Sequential(Block(256, 448, 2), Block(448, 448, 1))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(448, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(x))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    torch.manual_seed(seed)
    return ResNet().eval()


def large_family() -> tuple[list[str], str, dict[str, Any]]:
    import torch

    models = PERF / "large" / "models"
    models.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(6):
        path = models / f"resnet-s{seed}.pt"
        if not path.is_file():
            net = _resnet(seed)
            torch.jit.save(torch.jit.script(net), str(path))
        paths.append(str(path))
    n_params = sum(p.numel() for p in _resnet(0).parameters())
    return paths[:5], paths[5], {"input_shape": (3, 32, 32), "params": n_params}


def _bare_forward(model_path: str, probes: Any) -> None:
    import torch

    module = torch.jit.load(model_path, map_location="cpu")
    module.eval()
    x = torch.from_numpy(probes)
    with torch.inference_mode():
        for start in range(0, len(x), 256):
            module(x[start : start + 256])


def scan_cost(name: str, family: tuple[list[str], str, dict[str, Any]], repeats: int) -> dict:
    from gate.data import load_npz
    from gate.fingerprint.baseline import load_baseline
    from gate.fingerprint.build import build_baseline
    from gate.policy import load_policy
    from gate.scan import scan

    refs, cand, info = family
    base_dir = PERF / name / "baseline"
    data = load_npz(info["data"]) if "data" in info else None
    if not (base_dir / "baseline.json").is_file():
        built = build_baseline(refs, data=data, input_shape=info.get("input_shape"), seed=0)
        built.save(base_dir)
    baseline = load_baseline(base_dir)
    policy = load_policy("default")
    probes = baseline.probes.x
    probes_file = PERF / name / "probes.npy"
    import numpy as np

    np.save(probes_file, probes)

    _bare_forward(cand, probes)  # warm the OS file cache once
    bare_in = _median_time(lambda: _bare_forward(cand, probes), repeats)
    scan_in = _median_time(lambda: scan(cand, baseline, None, policy), repeats)
    bare_code = (
        "import sys, numpy as np, torch\n"
        "m = torch.jit.load(sys.argv[1], map_location='cpu').eval()\n"
        "x = torch.from_numpy(np.load(sys.argv[2], allow_pickle=False))\n"
        "with torch.inference_mode():\n"
        "    [m(x[i:i+256]) for i in range(0, len(x), 256)]\n"
    )
    bare_sub = _median_time(
        lambda: _run([sys.executable, "-c", bare_code, cand, str(probes_file)]), repeats
    )
    report_dir = PERF / name / "report"
    extra = ["--no-cache"] if _supports("--no-cache") else []
    scan_cmd = [
        *_gate(),
        "scan",
        cand,
        "--baseline",
        str(base_dir),
        "--quiet",
        "--report-dir",
        str(report_dir),
        *extra,
    ]
    scan_sub = _median_time(lambda: _run(scan_cmd), repeats)
    row = {
        "family": name,
        "params": info.get("params") or _count_params(cand),
        "probes": len(probes),
        "bare_in": bare_in,
        "scan_in": scan_in,
        "bare_sub": bare_sub,
        "scan_sub": scan_sub,
    }
    timing = report_dir / "timing.json"
    if timing.is_file():
        row["timing"] = json.loads(timing.read_text())
    if extra:  # a second scan of the same model hits the activation cache
        cache_dir = PERF / name / "cache"
        cached_cmd = [*scan_cmd[:-1], "--cache-dir", str(cache_dir)]
        _run(cached_cmd)
        row["scan_sub_cached"] = _median_time(lambda: _run(cached_cmd), repeats)
    return row


def _supports(flag: str) -> bool:
    proc = subprocess.run([*_gate(), "scan", "--help"], capture_output=True, text=True, cwd=REPO)
    return flag in proc.stdout


def _count_params(path: str) -> int:
    import torch

    return sum(p.numel() for p in torch.jit.load(path, map_location="cpu").parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    PERF.mkdir(parents=True, exist_ok=True)

    rows = startup(args.repeats)
    base = rows[0][1]
    print("## Start-up (median wall time, subprocess)\n")
    print("| command | seconds | vs `python -c pass` |")
    print("|---|---:|---:|")
    for label, secs in rows:
        print(f"| `{label}` | {secs:.3f} | {secs / base:.2f}x |")
    heavy = heavy_imports()
    for flag, mods in heavy.items():
        print(f"\n`gate {flag}` imports: {', '.join(mods) or 'no torch/sklearn/scipy/numpy'}")

    families = [("small", small_family())]
    if not args.skip_large:
        families.append(("large", large_family()))
    results = [scan_cost(name, fam, args.repeats) for name, fam in families]
    print("\n## Scan cost vs bare forward passes (median wall time, seconds)\n")
    print(
        "| model | params | probes | bare fwd (in-proc) | scan (in-proc) | ratio "
        "| bare fwd (process) | `gate scan` (process) | ratio | `gate scan` cached |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cached = f"{r['scan_sub_cached']:.3f}" if "scan_sub_cached" in r else "n/a"
        print(
            f"| {r['family']} | {r['params']:,} | {r['probes']} | {r['bare_in']:.3f} "
            f"| {r['scan_in']:.3f} | {r['scan_in'] / r['bare_in']:.2f}x "
            f"| {r['bare_sub']:.3f} | {r['scan_sub']:.3f} | {r['scan_sub'] / r['bare_sub']:.2f}x "
            f"| {cached} |"
        )
    timed = [r for r in results if "timing" in r]
    if timed:
        keys = list(timed[0]["timing"]["seconds"])
        print("\n## `gate scan` timing.json breakdown (last run, seconds)\n")
        print("| model | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for r in timed:
            secs = r["timing"]["seconds"]
            print(f"| {r['family']} | " + " | ".join(f"{secs[k]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

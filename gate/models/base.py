"""What every model loader returns: a model that runs batches and exposes named layers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose output can be recorded: its name, what produced it, per-sample shape."""

    name: str
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ForwardResult:
    """Model outputs for a batch of inputs, plus the requested layers' activations."""

    outputs: Array
    activations: dict[str, Array]


class LoadedModel(Protocol):
    """A model ready to be probed. Implementations never execute code from the model file."""

    path: str
    sha256: str
    format: str

    def layer_names(self) -> list[str]:
        """Every layer name ``forward(layers=...)`` accepts, in execution order."""
        ...

    def default_layer(self) -> str:
        """The last hidden layer before the classifier head (see README, "Layer selection")."""
        ...

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        """Run one batch; ``outputs`` are the model's first output (logits), as float32."""
        ...


@runtime_checkable
class TextInput(Protocol):
    """A model that takes text (a Hugging Face checkpoint): its tokenizer makes its inputs."""

    seq_len: int

    def tokenize(self, texts: Sequence[str]) -> Array:
        """The model's input array for ``texts`` (same texts, same bytes)."""
        ...

    def vocabulary(self) -> list[str]:
        """The tokenizer's tokens in id order, without special tokens (for text probes)."""
        ...


class OnDevice:
    """``to_device`` for loaders whose model is a torch module held in ``_module``
    (``--device``, gate.device: the sandboxed child moves it once, after loading)."""

    device: str = "cpu"
    _module: Any

    def to_device(self, device: str) -> None:
        self._module.to(device)
        self.device = device


def to_input(x: Array, device: str) -> Any:
    """A batch as a torch tensor on ``device`` (on the CPU, a view of ``x``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if device == "cpu" else t.to(device)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def first_tensor(value: Any) -> Any:
    """The first tensor in a model's output (a tensor, or nested tuples, lists, dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    if isinstance(value, dict) and value:
        return first_tensor(next(iter(value.values())))
    return None


def tensor_to_numpy(t: Any) -> Array:
    return np.asarray(t.detach().to("cpu").float().numpy(), dtype=np.float32)

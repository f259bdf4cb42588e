"""Model loaders, chosen by file content rather than extension.

To add a format: write a module with ``sniff(path, head) -> bool`` and
``load(path) -> LoadedModel``, then add one line to :data:`LOADERS`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gate.errors import ModelLoadError, UnsafeModelError
from gate.models import safety, torchscript
from gate.models.base import ForwardResult, LayerInfo, LoadedModel

__all__ = ["LOADERS", "ForwardResult", "LayerInfo", "LoadedModel", "load_model"]


@dataclass(frozen=True)
class Loader:
    name: str
    sniff: Callable[[Path, bytes], bool]
    load: Callable[[Path], LoadedModel]


LOADERS: tuple[Loader, ...] = (Loader(torchscript.FORMAT, torchscript.sniff, torchscript.load),)

_HEAD_BYTES = 64


def load_model(path: str | Path) -> LoadedModel:
    """Load ``path`` with the first loader that recognises its content; never unpickle code."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: model file is empty (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    for loader in LOADERS:
        if loader.sniff(p, head):
            return loader.load(p)
    raise _explain_unsupported(p, head)


def _explain_unsupported(path: Path, head: bytes) -> ModelLoadError:
    """Say what the file is and why it is refused, naming any code it would run."""
    if safety.looks_like_pickle(head):
        return _refuse_pickle(path, path.read_bytes(), "a raw pickle")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                safety.check_zip_bounds(path, zf)
                pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if pickles:
                    return _refuse_pickle(path, zf.read(pickles[0]), "a torch.save() checkpoint")
        except zipfile.BadZipFile:
            return ModelLoadError(f"{path}: corrupt or truncated zip archive")
        except ModelLoadError as exc:
            return exc
        return ModelLoadError(f"{path}: zip archive is not a TorchScript model")
    return ModelLoadError(
        f"{path}: unrecognised model format (expected a TorchScript archive from torch.jit.save)"
    )


def _refuse_pickle(path: Path, data: bytes, what: str) -> ModelLoadError:
    try:
        dangerous = safety.dangerous_globals(safety.pickle_globals(data))
    except ModelLoadError as exc:
        return ModelLoadError(f"{path}: {what} with a {exc}")
    export_hint = "export the model with torch.jit.save(torch.jit.script(model), path)"
    if dangerous:
        shown = ", ".join(dangerous[:3]) + (" ..." if len(dangerous) > 3 else "")
        return UnsafeModelError(
            f"{path}: refusing {what} that would import {shown} when unpickled "
            f"(possible code execution); {export_hint}"
        )
    return ModelLoadError(f"{path}: {what} of bare tensors is not a full model; {export_hint}")

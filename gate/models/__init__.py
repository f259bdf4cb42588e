"""Model loaders, chosen by file content rather than extension.

To add a format: write a module with ``sniff(path, head) -> bool`` and
``load(path) -> LoadedModel``, then add one line to :data:`LOADERS`. A loader for
directories (a Hugging Face checkpoint) is marked ``directory=True`` and sniffed with an
empty ``head``: it recognises the directory by the files in it.

Whatever the file is called, it is recognised by its bytes: a TorchScript archive named
``.onnx`` loads, and a pickle or ``.npz`` named ``.pt`` is refused with what it really is.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gate.errors import ModelLoadError, UnsafeModelError
from gate.models import hf, onnx_model, safety, statedict, torchscript
from gate.models.base import ForwardResult, LayerInfo, LoadedModel

__all__ = ["LOADERS", "ForwardResult", "LayerInfo", "LoadedModel", "load_in_process", "load_model"]


@dataclass(frozen=True)
class Loader:
    name: str
    sniff: Callable[[Path, bytes], bool]
    load: Callable[[Path], LoadedModel]
    directory: bool = False


LOADERS: tuple[Loader, ...] = (
    Loader(torchscript.FORMAT, torchscript.sniff, torchscript.load),
    Loader(statedict.FORMAT, statedict.sniff, statedict.load),
    Loader(statedict.SAFETENSORS_FORMAT, statedict.sniff_safetensors, statedict.load_safetensors),
    Loader(onnx_model.FORMAT, onnx_model.sniff, onnx_model.load),
    Loader(hf.FORMAT, hf.sniff, hf.load, directory=True),
)

_HEAD_BYTES = 64
_EXPORT_HINT = (
    "export the model as TorchScript with torch.jit.save(torch.jit.script(model), path) "
    "(or torch.jit.trace); gate never unpickles model files"
)
_ARCH_HINT = (
    "load it from a torch.save(model.state_dict(), path) file or safetensors with "
    "--arch package.module:ClassName naming the model class from your own code, or "
)


def load_model(path: str | Path, more: bool = False) -> LoadedModel:
    """Load ``path`` in a sandboxed child process (gate.sandbox) and return its proxy.

    A missing file is reported here, without starting a child for it. ``more``: another
    model follows (its child starts now).
    """
    if not Path(path).exists():
        raise ModelLoadError(f"model file not found: {path}")
    from gate.sandbox import open_model

    return open_model(path, more=more)


def load_in_process(path: str | Path) -> LoadedModel:
    """Load ``path`` with the first loader that recognises its content; never unpickle code.

    This runs the model in the calling process: gate calls it only inside the sandbox's
    child (gate.sandbox.child). Tests and benches that train their own models may use it.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        for loader in LOADERS:
            if loader.directory and loader.sniff(p, b""):
                return loader.load(p)
        raise ModelLoadError(
            f"{p}: a directory, but not a Hugging Face checkpoint (no config.json); "
            "give a model file or a save_pretrained() directory"
        )
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: model file is empty (0 bytes)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read model file ({exc.strerror or exc})") from None
    for loader in LOADERS:
        if not loader.directory and loader.sniff(p, head):
            return loader.load(p)
    raise _explain_unsupported(p, head)


def _explain_unsupported(path: Path, head: bytes) -> ModelLoadError:
    """Say what the file is and why it is refused, naming any code it would run."""
    if safety.looks_like_pickle(head) or safety.is_old_protocol_pickle(path):
        with open(path, "rb") as fh:
            return refuse_pickle(path, fh, "a raw pickle")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                safety.check_zip_bounds(path, zf)
                names = zf.namelist()
                pickle_member = safety.torch_record(path, zf, "data.pkl")  # what torch reads
                if pickle_member is not None:
                    with zf.open(pickle_member) as member:
                        return refuse_pickle(path, member, "a torch.save() checkpoint")
                if names and all(n.endswith(".npy") for n in names):
                    return ModelLoadError(
                        f"{path}: this is a NumPy .npz data file, not a model "
                        "(were the model and --data arguments swapped?)"
                    )
        except ModelLoadError as exc:
            return exc
        except Exception:  # zipfile raises BadZipFile, EOFError, zlib.error, ... on damage
            return ModelLoadError(f"{path}: corrupt or truncated zip archive")
        return ModelLoadError(f"{path}: zip archive is not a TorchScript model")
    if head.startswith(b"\x93NUMPY"):
        return ModelLoadError(f"{path}: this is a NumPy .npy array, not a model")
    return ModelLoadError(
        f"{path}: unrecognised model format (expected a TorchScript archive from torch.jit.save, "
        "a state_dict or safetensors file with --arch, or an ONNX model)"
    )


def refuse_pickle(path: Path, data: bytes | IO[bytes], what: str) -> ModelLoadError:
    """Why a pickle is refused: the globals it would import, or that it holds no model."""
    try:
        names = safety.pickle_globals(data)
    except ModelLoadError as exc:
        return ModelLoadError(f"{path}: {what} with a {exc}")
    dangerous = safety.dangerous_globals(names)
    shown = ", ".join(dangerous[:3]) + (" ..." if len(dangerous) > 3 else "")
    if any(n.startswith("torch.nn.") for n in dangerous) and not any(
        safety.is_blatant(n) for n in dangerous
    ):
        return UnsafeModelError(
            f"{path}: {what} of a whole pickled nn.Module (torch.save(model)), which would "
            f"import {shown} when unpickled and so could run code; {_EXPORT_HINT}"
        )
    if dangerous:
        return UnsafeModelError(
            f"{path}: refusing {what} that would import {shown} when unpickled "
            f"(possible code execution); {_EXPORT_HINT}"
        )
    return ModelLoadError(
        f"{path}: {what} of bare tensors (a state_dict or weights file) is not a full model: "
        f"it has no architecture; {_ARCH_HINT}{_EXPORT_HINT}"
    )

"""Weights-only files (``torch.save(model.state_dict())`` checkpoints and safetensors).

They hold tensors and no architecture, so they load only with ``--arch`` (see
:mod:`gate.models.arch`). A checkpoint's pickle is scanned statically first and refused if
it would import anything beyond tensor rebuilders; only then is it read, and only through
``torch.load(weights_only=True)``. Safetensors files are a JSON header plus raw bytes and
are read with the ``safetensors`` package, which runs no code.

Intermediate activations come from forward hooks on named submodules (the architecture is
the user's trusted code). Layer names are module paths, as for TorchScript; ``@penultimate``
is the input of the last ``nn.Linear`` the forward pass runs, the default layer.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gate.errors import GateError, LayerError, ModelLoadError, UsageError, first_line
from gate.models import safety
from gate.models.arch import ArchSpec, build_module, code_identity, current_arch
from gate.models.base import (
    Array,
    ForwardResult,
    OnDevice,
    first_tensor,
    sha256_file,
    tensor_to_numpy,
    to_input,
)
from gate.models.safety import check_zip_bounds, dangerous_globals, pickle_globals

FORMAT = "state_dict"
SAFETENSORS_FORMAT = "safetensors"
PENULTIMATE = "@penultimate"
MAX_SAFETENSORS_HEADER = 100 << 20

_ARCH_HINT = (
    "pass --arch package.module:ClassName (and --arch-kwargs JSON) naming the model class "
    "from your own code, or export the model as TorchScript with torch.jit.save"
)


# --- sniffing -------------------------------------------------------------------------------


def sniff(path: Path, head: bytes) -> bool:
    """A torch.save() zip checkpoint: a ``data.pkl`` and no TorchScript ``code/``."""
    names = safety.zip_member_names(path, head)
    if names is None:
        return False
    lower = [n.lower() for n in names]  # torch finds records ignoring case
    has_pickle = any(n.endswith("/data.pkl") for n in lower)
    return has_pickle and not any("/code/" in n for n in lower)


def sniff_safetensors(path: Path, head: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 10:
        return False
    n = int(struct.unpack("<Q", head[:8])[0])
    if not 2 <= n <= MAX_SAFETENSORS_HEADER or head[8:9] != b"{":
        return False
    try:
        return n + 8 <= path.stat().st_size
    except OSError:
        return False


# --- loading --------------------------------------------------------------------------------


def load(path: Path) -> EagerModel:
    from gate.models import refuse_pickle

    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_bounds(path, zf)
            pkl = safety.torch_record(path, zf, "data.pkl")
            if pkl is None:
                raise ModelLoadError(
                    f"{path}: torch.save() checkpoint has no data.pkl in its root folder"
                )
            with zf.open(pkl) as member:
                globals_ = pickle_globals(member)
            if dangerous_globals(globals_):
                with zf.open(pkl) as member:
                    raise refuse_pickle(path, member, "a torch.save() checkpoint")
    except GateError:
        raise
    except Exception as exc:  # zipfile raises BadZipFile, EOFError, zlib.error, ...
        raise ModelLoadError(
            f"{path}: corrupt torch.save() checkpoint ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    spec = _require_arch(path, "a torch.save() checkpoint of bare tensors (a state_dict)")
    import torch

    try:
        with open(path, "rb") as f:  # not str(path): see gate.models.torchscript
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: torch.load(weights_only=True) refused the checkpoint ({first_line(exc)})"
        ) from None
    return _build(path, FORMAT, spec, _as_state_dict(path, obj))


def load_safetensors(path: Path) -> EagerModel:
    _check_safetensors_header(path)
    spec = _require_arch(path, "a safetensors weights file")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ModelLoadError(f"{path}: corrupt safetensors file ({first_line(exc)})") from None
    return _build(path, SAFETENSORS_FORMAT, spec, tensors)


def _check_safetensors_header(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")


def _require_arch(path: Path, what: str) -> ArchSpec:
    spec = current_arch()
    if spec is None:
        if (path.parent / "config.json").is_file():  # a file of a save_pretrained() directory
            raise ModelLoadError(
                f"{path}: {what} of a Hugging Face checkpoint; give the directory "
                f"{path.parent} instead of the file"
            )
        raise ModelLoadError(
            f"{path}: {what} is not a full model: it has no architecture; {_ARCH_HINT}"
        )
    return spec


def _as_state_dict(path: Path, obj: Any) -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    raise ModelLoadError(
        f"{path}: expected a state_dict (a mapping of names to tensors, from "
        f"torch.save(model.state_dict())), got a {type(obj).__name__}"
    )


def _build(path: Path, fmt: str, spec: ArchSpec, state: dict[str, Any]) -> EagerModel:
    module = build_module(spec)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        if wrong:
            parts.append(f"shape mismatch {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise UsageError(
            f"{path}: the weights do not fit --arch {spec.describe()}: {'; '.join(parts)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise UsageError(
            f"{path}: the weights do not fit --arch {spec.describe()} ({first_line(exc)})"
        ) from None
    module.eval()
    model = EagerModel(str(path), sha256_file(path), fmt, module)
    model.cache_identity = f"{model.sha256}:{code_identity(spec, module)}"
    return model


# --- the model ------------------------------------------------------------------------------


class EagerModel(OnDevice):
    """An eager ``nn.Module`` built from the user's ``--arch`` with weights from the file."""

    def __init__(self, path: str, sha256: str, fmt: str, module: Any) -> None:
        import torch

        self.path = path
        self.sha256 = sha256
        self.format = fmt
        self.cache_identity = sha256
        self._module = module
        self._modules: dict[str, Any] = {name: sub for name, sub in module.named_modules() if name}
        self._has_linear = any(isinstance(m, torch.nn.Linear) for m in module.modules())

    def layer_names(self) -> list[str]:
        names = list(self._modules)
        return [*names, PENULTIMATE] if self._has_linear else names

    def layer_kinds(self) -> dict[str, str]:
        kinds = {name: type(m).__name__ for name, m in self._modules.items()}
        if self._has_linear:
            kinds[PENULTIMATE] = "input of last Linear"
        return kinds

    def default_layer(self) -> str:
        if not self._has_linear:
            raise LayerError(
                f"{self.path}: the model has no nn.Linear head to find the last hidden layer "
                "before; pass --layer (see `gate inspect`)"
            )
        return PENULTIMATE

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        import torch

        layers = tuple(layers)
        known = set(self.layer_names())
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise LayerError(
                f"{self.path}: no layer named {unknown[0]!r}; available: "
                + ", ".join(self.layer_names()[:30])
            )
        captured: dict[str, Any] = {}
        linear_inputs: list[Any] = []
        handles = []

        def keep(name: str) -> Any:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                captured[name] = first_tensor(output)

            return hook

        def keep_input(_module: Any, inputs: Any) -> None:
            linear_inputs.append(first_tensor(inputs))

        try:
            for name in layers:
                if name != PENULTIMATE:
                    handles.append(self._modules[name].register_forward_hook(keep(name)))
            if PENULTIMATE in layers:
                for m in self._module.modules():
                    if isinstance(m, torch.nn.Linear):
                        handles.append(m.register_forward_pre_hook(keep_input))
            try:
                with torch.inference_mode():
                    out = self._run(x)
            except GateError:
                raise
            except Exception as exc:  # the user's forward may raise anything
                raise ModelLoadError(
                    f"{self.path}: forward pass failed on inputs of shape {tuple(x.shape)}: "
                    f"{type(exc).__name__}: {first_line(exc)}"
                ) from None
        finally:
            for h in handles:
                h.remove()
        logits = first_tensor(out)
        if logits is None:
            raise ModelLoadError(f"{self.path}: the model's output is not a tensor")
        if PENULTIMATE in layers and linear_inputs and linear_inputs[-1] is not None:
            captured[PENULTIMATE] = linear_inputs[-1]
        acts: dict[str, Array] = {}
        for name in layers:
            value = captured.get(name)
            if value is None:
                raise LayerError(
                    f"{self.path}: layer {name!r} did not produce a tensor in the forward pass"
                )
            acts[name] = self._activation(name, value)
        return ForwardResult(outputs=tensor_to_numpy(logits).reshape(len(x), -1), activations=acts)

    def _run(self, x: Array) -> Any:
        """Call the module on one batch (inside ``torch.inference_mode``)."""
        return self._module(to_input(x, self.device))

    def _activation(self, name: str, value: Any) -> Array:
        """A captured layer output as the activations recorded for it."""
        return tensor_to_numpy(value)

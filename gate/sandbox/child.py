"""The model child: ``python -m gate.sandbox.child REQ_FD RESP_FD CPU_S MEMORY_B DEVICE``.

It confines itself (gate.sandbox.limits), imports torch and gate's loaders, readies the
``--device`` (gate.device), installs the syscall filter, and only then serves requests from
the parent: load one model, run forward batches, tokenize texts, run the trigger search.
Everything the model could print goes to this process's stdout/stderr, which the parent
captures and never relays.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str]) -> int:
    import os
    import tempfile

    from gate.sandbox import limits

    req_fd, resp_fd, cpu_s, memory = (int(a) for a in argv[:4])
    spec = argv[4] if len(argv) > 4 else "cpu"
    # The address-space cap waits for the device to be known unless it is the CPU.
    limits.apply_rlimits(cpu_s, memory if memory > 0 and spec == "cpu" else None)

    # Imported before the filter, like every loader: afterwards files only open to read.
    import numpy as np  # noqa: F401
    import torch  # noqa: F401

    import gate.models  # noqa: F401
    from gate.sandbox import protocol

    # Libraries probe for a writable temp dir by writing a file (transformers through
    # tempfile.gettempdir(), torch.optim through dynamo), which the limits forbid: name the
    # private temp directory up front so the probe is skipped; real writes still fail.
    tempfile.tempdir = os.environ.get("TMPDIR") or os.getcwd()
    for var in limits.CACHE_DIRS:  # makedirs(exist_ok=True) then finds them there
        if os.environ.get(var):
            os.makedirs(os.environ[var], exist_ok=True)
    ready: dict[str, Any] = {"ready": True}
    device = "cpu"
    try:
        device = _ready_device(spec)
    except BaseException as exc:  # reported on the first request, as a one-line error
        ready["device_error"] = _describe(exc)
    if device == "cpu" and spec != "cpu" and memory > 0:
        limits.cap_memory(memory)
    seccomp_off = limits.install_seccomp()
    ready.update({"seccomp": seccomp_off is None, "why": seccomp_off, "device": device})
    protocol.send(resp_fd, ready)
    server = _Server(device)
    while True:
        try:
            request = protocol.receive(req_fd)
        except protocol.ProtocolError:  # the parent went away
            return 0
        op = request.get("op")
        if op == "close":
            return 0
        try:
            reply: dict[str, Any] = {"ok": server.handle(str(op), request)}
        except BaseException as exc:  # every failure is reported, in one line
            reply = {"error": _describe(exc)}
        protocol.send(resp_fd, reply)


def _ready_device(spec: str) -> str:
    from gate import device

    resolved = device.resolve(spec)
    device.prepare(resolved)
    return resolved


class _Server:
    def __init__(self, device: str) -> None:
        self.model: Any = None
        self.device = device

    def handle(self, op: str, request: dict[str, Any]) -> Any:
        if op == "load":
            return self._load(request)
        if self.model is None:
            raise RuntimeError("no model loaded")
        if op == "forward":
            res = self.model.forward(request["x"], tuple(request["layers"]))
            return {"outputs": res.outputs, "activations": dict(res.activations)}
        if op == "tokenize":
            return self.model.tokenize(list(request["texts"]))
        if op == "trigger_search":
            from gate.trigger.search import run

            return run(
                self.model, request["x"], request.get("y"), request["options"], request["seed"]
            )
        raise RuntimeError(f"unknown request {op!r}")

    def _load(self, request: dict[str, Any]) -> dict[str, Any]:
        import contextlib

        from gate.errors import GateError
        from gate.models import load_in_process
        from gate.models.base import TextInput

        arch = request.get("arch")
        context: Any = contextlib.nullcontext()
        if arch is not None:
            import json

            from gate.models.arch import use_arch

            context = use_arch(arch["target"], json.dumps(arch["kwargs"]))
            # A spare child started before the parent's import path grew (a test's
            # syspath_prepend, a library caller's sys.path edit): take the parent's as of now.
            for entry in request.get("python_path") or ():
                if isinstance(entry, str) and entry not in sys.path:
                    sys.path.append(entry)
        with context:
            model = load_in_process(request["path"])
        self.model = model
        # Formats that run outside torch (ONNX: onnxruntime's CPU provider) stay on the CPU.
        device = "cpu"
        move = getattr(model, "to_device", None)
        if self.device != "cpu" and callable(move):
            move(self.device)
            device = self.device
        identity = getattr(model, "cache_identity", None)
        if device != "cpu":  # another device's float noise never mixes with the CPU's cache
            identity = f"{identity or model.sha256}@{device}"
        info: dict[str, Any] = {
            "sha256": model.sha256,
            "format": model.format,
            "device": device,
            "layers": list(model.layer_names()),
            "kinds": dict(getattr(model, "layer_kinds", dict)()),
            "cache_identity": identity,
            "default": None,
            "default_error": None,
            "text": None,
        }
        try:
            info["default"] = model.default_layer()
        except GateError as exc:
            info["default_error"] = _describe(exc)
        if isinstance(model, TextInput):
            info["text"] = {"seq_len": int(model.seq_len), "vocabulary": model.vocabulary()}
        return info


def _describe(exc: BaseException) -> dict[str, str]:
    from gate.errors import GateError, first_line

    if isinstance(exc, GateError):
        return {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        return {"type": "MemoryError", "message": first_line(exc)}
    return {"type": "Exception", "message": f"{type(exc).__name__}: {first_line(exc)}"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

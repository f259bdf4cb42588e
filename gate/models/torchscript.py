"""TorchScript models, with intermediate activations exposed by graph surgery.

Loaded ScriptModules refuse ``register_forward_hook``. Instead we inline the forward
graph, name every value a submodule returns (from each node's module hierarchy) and
compile a copy of the graph that also returns the requested values. This works on any
TorchScript model, whatever its submodules are called.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gate.errors import GateError, LayerError, ModelLoadError, UnsafeModelError, first_line
from gate.models import safety
from gate.models.base import (
    Array,
    ForwardResult,
    OnDevice,
    first_tensor,
    sha256_file,
    tensor_to_numpy,
    to_input,
)
from gate.models.safety import (
    TORCHSCRIPT_SAFE_PREFIXES,
    check_zip_bounds,
    check_zip_integrity,
    dangerous_globals,
    pickle_globals,
)
from gate.models.torchscript_ops import check_ops

FORMAT = "torchscript"


_HEAD_OPS = {"aten::linear": 0, "aten::matmul": 0, "aten::mm": 0, "aten::addmm": 1}
_PASSTHROUGH_OPS = {
    "aten::log_softmax",
    "aten::softmax",
    "aten::sigmoid",
    "aten::squeeze",
    "aten::view",
    "aten::reshape",
    "aten::flatten",
    "aten::contiguous",
    "aten::mul",
    "aten::div",
    "aten::add",
    "aten::sub",
    "aten::dropout",
    "aten::clone",
}


def sniff(path: Path, head: bytes) -> bool:
    """A zip whose records sit under one root with ``code/`` sources and ``constants.pkl``."""
    names = safety.zip_member_names(path, head)
    if names is None:
        return False
    lower = [n.lower() for n in names]  # torch finds records ignoring case
    return any("/code/" in n for n in lower) and any(n.endswith("constants.pkl") for n in lower)


# TorchScript runs a class's ``__setstate__`` while torch.jit.load unpickles the archive,
# i.e. before any graph can be inspected, so archives that define one are refused outright.
# Any mention of the name is refused: standard nn modules never need it.
_LOAD_TIME_HOOK = re.compile(rb"__setstate__")
_CUSTOM_OP_CALL = re.compile(rb"\bops\.(?!aten\.|prim\.)(\w+)\.(\w+)")


# torch.jit.load's parser and compiler recurse per nesting level and per operator: a 12 KB
# archive with 10,000 nested parentheses (or 5,000 unary minuses, or a 20,000-term sum)
# overflows the C stack and kills the process with SIGSEGV. Sources are bounded first, far
# below those depths, and torch.jit.load runs on a thread with a large stack for headroom.
MAX_NESTING = 100
MAX_STATEMENT_BYTES = 64 << 10
MAX_INDENT = 400
_LOAD_STACK_BYTES = 256 << 20


def _check_source_shape(path: Path, name: str, source: bytes) -> None:
    """Refuse code nested or chained deeply enough to overflow torch's recursive parser."""
    depth = max_depth = statement = max_statement = unary_run = max_unary = 0
    quote = 0
    escaped = False
    for byte in source:
        if quote:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == quote:
                quote = 0
            continue
        statement += 1
        if byte in b"\"'":
            quote = byte
        elif byte in b"([{":
            depth += 1
            max_depth = max(max_depth, depth)
        elif byte in b")]}":
            depth = max(depth - 1, 0)
        elif byte == 0x0A and depth == 0:
            max_statement = max(max_statement, statement)
            statement = 0
        if byte in b"-+~":
            unary_run += 1
            max_unary = max(max_unary, unary_run)
        elif byte not in b" \t\n":
            unary_run = 0
    max_statement = max(max_statement, statement)
    indent = max((len(line) - len(line.lstrip(b" \t")) for line in source.splitlines()), default=0)
    words = source.split()
    max_not = max_run = 0
    for word in words:
        max_run = max_run + 1 if word == b"not" else 0
        max_not = max(max_not, max_run)
    if (
        max_depth > MAX_NESTING
        or max_unary > MAX_NESTING
        or max_not > MAX_NESTING
        or max_statement > MAX_STATEMENT_BYTES
        or indent > MAX_INDENT
    ):
        raise ModelLoadError(
            f"{path}: {name!r} is nested or chained too deeply for TorchScript to parse safely "
            f"(nesting {max(max_depth, max_unary, max_not)}, longest statement "
            f"{max_statement} bytes, indent {indent}); refusing to load"
        )


def _load_on_big_stack(path: Path) -> Any:
    """``torch.jit.load`` on a thread with a large C stack; exceptions are re-raised here."""
    import threading

    import torch

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            # An open file, not str(path): torch encodes a name as strict UTF-8, which a
            # file name holding undecodable bytes (Python's surrogate escapes) is not.
            with open(path, "rb") as f:
                result["module"] = torch.jit.load(  # type: ignore[no-untyped-call]
                    f, map_location="cpu"
                )
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    previous = threading.stack_size()
    try:
        threading.stack_size(_LOAD_STACK_BYTES)
        thread = threading.Thread(target=work, name="gate-torchscript-load", daemon=True)
        thread.start()
    except (RuntimeError, ValueError, MemoryError):  # cannot get a big stack: load here
        work()
    else:
        thread.join()
    finally:
        threading.stack_size(previous)
    if "error" in result:
        raise result["error"]
    return result["module"]


def _check_archive(path: Path) -> None:
    """Everything that can be checked before torch parses the archive (see module docstring)."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_bounds(path, zf)
            check_zip_integrity(path, zf)
            safety.torch_record(path, zf, "data.pkl")  # refuses names torch could confuse
            for info in zf.infolist():
                name = info.filename
                # torch finds records ignoring case: classify members the same way.
                lower = name.lower()
                if lower.endswith(".pkl"):
                    with zf.open(info) as member:
                        globals_ = pickle_globals(member)
                    bad = dangerous_globals(globals_, TORCHSCRIPT_SAFE_PREFIXES)
                    if bad:
                        raise UnsafeModelError(
                            f"{path}: archive member {name!r} would import "
                            f"{', '.join(bad[:3])} when unpickled (possible code execution); "
                            "refusing to load"
                        )
                elif "/code/" in lower and lower.endswith(".py"):
                    source = zf.read(info)
                    _check_source_shape(path, name, source)
                    if _LOAD_TIME_HOOK.search(source):
                        raise UnsafeModelError(
                            f"{path}: {name!r} defines __setstate__, code that TorchScript "
                            "would run while loading the file; refusing to load"
                        )
                    custom = _CUSTOM_OP_CALL.search(source)
                    if custom:
                        op = f"{custom[1].decode()}::{custom[2].decode()}"
                        raise UnsafeModelError(
                            f"{path}: the model calls custom operator {op!r}; gate only runs "
                            "standard aten/prim operators"
                        )
    except GateError:
        raise
    except Exception as exc:  # zipfile raises BadZipFile, EOFError, zlib.error, ...
        raise ModelLoadError(
            f"{path}: corrupt TorchScript archive ({type(exc).__name__}: {first_line(exc)})"
        ) from None


@dataclass(frozen=True)
class _Candidate:
    name: str
    kind: str
    index: int  # position in the list of tensor values of the inlined graph


class TorchScriptModel(OnDevice):
    """A loaded TorchScript module (see module docstring for how layers are exposed)."""

    format = FORMAT

    def __init__(self, path: str, sha256: str, module: Any) -> None:
        self.path = path
        self.sha256 = sha256
        self._module = module
        self._candidates, self._default = _analyse(self._inlined_graph())
        self._runners: dict[tuple[str, ...], Any] = {}

    def layer_names(self) -> list[str]:
        return [c.name for c in self._candidates]

    def layer_kinds(self) -> dict[str, str]:
        return {c.name: c.kind for c in self._candidates}

    def default_layer(self) -> str:
        if self._default is None:
            raise LayerError(
                f"{self.path}: cannot find a hidden layer before the classifier head; "
                "pass --layer (see `gate inspect`)"
            )
        return self._default

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        import torch

        layers = tuple(layers)
        runner = self._runners.get(layers)
        if runner is None:
            runner = self._runners[layers] = self._compile(layers)
        try:
            with torch.inference_mode():
                out = runner(self._module._c, to_input(x, self.device))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{self.path}: forward pass failed on inputs of shape {tuple(x.shape)}: "
                f"{first_line(exc)}"
            ) from None
        values = list(out) if isinstance(out, tuple) else [out]
        logits = first_tensor(values[0])
        if logits is None:
            raise ModelLoadError(f"{self.path}: the model's output is not a tensor")
        acts = {name: tensor_to_numpy(v) for name, v in zip(layers, values[1:], strict=True)}
        return ForwardResult(outputs=tensor_to_numpy(logits).reshape(len(x), -1), activations=acts)

    def _inlined_graph(self) -> Any:
        import torch

        graph = self._module.forward.graph.copy()
        torch._C._jit_pass_inline(graph)
        return graph

    def _compile(self, layers: tuple[str, ...]) -> Any:
        import torch

        by_name = {c.name: c for c in self._candidates}
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            raise LayerError(
                f"{self.path}: no layer named {unknown[0]!r}; available: "
                + ", ".join(self.layer_names()[:30])
            )
        graph = self._inlined_graph()
        values = _tensor_values(graph)
        for name in layers:
            graph.registerOutput(values[by_name[name].index])
        if layers:
            graph.makeMultiOutputIntoTuple()
        return torch._C._create_function_from_graph(f"gate_forward_{len(layers)}", graph)


def load(path: Path) -> TorchScriptModel:
    _check_archive(path)  # before torch is even imported: it must never see a bad archive

    try:
        module = _load_on_big_stack(path)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... on bad archives
        raise ModelLoadError(
            f"{path}: not a loadable TorchScript archive ({first_line(exc)})"
        ) from None
    module.eval()
    check_ops(path, module)
    return TorchScriptModel(str(path), sha256_file(path), module)


def _tensor_values(graph: Any) -> list[Any]:
    """Tensor outputs of top-level nodes, in order: stable across copies of one graph."""
    return [
        out for node in graph.nodes() for out in node.outputs() if out.type().kind() == "TensorType"
    ]


_SCOPE_PART = re.compile(r"^(?P<attr>[^()]+)\((?P<type>[^()]*)\)$")


def _scope(node: Any) -> list[tuple[str, str]]:
    """Parse a node's module hierarchy into (attribute, type) pairs.

    ``features(Sequential).0(Conv2d).SELF(Conv2d)`` gives
    ``[("features", "Sequential"), ("0", "Conv2d")]``.
    """
    hierarchy = node.getModuleHierarchy() or ""
    parts: list[tuple[str, str]] = []
    for raw in re.split(r"\.(?![^(]*\))", hierarchy) if hierarchy else []:
        match = _SCOPE_PART.match(raw)
        if not match or match["attr"] in {"SELF", "UNKNOWN_INSTANCE"}:
            break
        parts.append((match["attr"], match["type"]))
    return parts


def _analyse(graph: Any) -> tuple[list[_Candidate], str | None]:
    """Name the recordable tensor values and find the penultimate (pre-head) one."""
    nodes = list(graph.nodes())
    values = _tensor_values(graph)
    index_of = {v.unique(): i for i, v in enumerate(values)}
    scopes = {n: tuple(a for a, _ in _scope(n)) for n in nodes}
    types = {
        n: dict(
            ((".".join(a for a, _ in _scope(n)[: i + 1])), t) for i, (_, t) in enumerate(_scope(n))
        )
        for n in nodes
    }
    return_node = graph.return_node()

    def user_scope(use_node: Any) -> tuple[str, ...] | None:
        while use_node.owningBlock() is not graph.block():
            use_node = use_node.owningBlock().owningNode()
        if use_node == return_node:
            return None
        return scopes.get(use_node, ())

    names: dict[int, list[tuple[str, str]]] = {}
    module_out: dict[str, tuple[int, str]] = {}
    op_counts: dict[str, int] = {}
    for node in nodes:
        scope = scopes[node]
        for out in node.outputs():
            if out.unique() not in index_of:
                continue
            idx = index_of[out.unique()]
            users = [user_scope(u.user) for u in out.uses()]
            for depth in range(1, len(scope) + 1):
                prefix = scope[:depth]
                if any(us is None or us[:depth] != prefix for us in users):
                    path = ".".join(prefix)
                    module_out[path] = (idx, types[node].get(path, "Module"))
            if not scope:
                op = node.kind().split("::", 1)[1]
                k = op_counts.get(op, 0)
                op_counts[op] = k + 1
                names.setdefault(idx, []).append((f"@{op}_{k}", node.kind()))
    for path, (idx, typ) in module_out.items():
        names.setdefault(idx, []).append((path, typ))
    candidates = [
        _Candidate(name=name, kind=kind, index=idx)
        for idx in sorted(names)
        for name, kind in sorted(names[idx], key=lambda nk: (nk[0].startswith("@"), nk[0]))
    ]
    penultimate = _penultimate_index(graph, index_of)
    default = None
    if penultimate is not None:
        named = [c for c in candidates if c.index == penultimate]
        if not named:
            named = [_Candidate("@penultimate", "hidden", penultimate)]
            candidates.append(named[0])
            candidates.sort(key=lambda c: c.index)
        default = named[0].name
    return candidates, default


def _penultimate_index(graph: Any, index_of: dict[int, int]) -> int | None:
    """Index of the input to the final linear op, walking back from the first output."""
    output = next(iter(graph.outputs()))
    node = output.node()
    if node.kind() == "prim::TupleConstruct":
        node = next(iter(node.inputs())).node()
    for _ in range(32):
        kind = node.kind()
        if kind in _HEAD_OPS:
            value = list(node.inputs())[_HEAD_OPS[kind]]
            return index_of.get(value.unique())
        if kind not in _PASSTHROUGH_OPS:
            return None
        node = next(iter(node.inputs())).node()
    return None

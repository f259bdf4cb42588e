"""ONNX models run by onnxruntime, with intermediate activations as added graph outputs.

Only the standard operator domains run: a model whose nodes (or functions, or opset
imports) use any other domain is refused, and gate never registers custom-op libraries.
Tensors stored outside the file (external data) are refused too, so a model cannot make
gate read other files. Layer names are node output names; the default layer is the input
of the last Gemm/MatMul feeding the first output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gate.errors import GateError, LayerError, ModelLoadError, UnsafeModelError, first_line
from gate.models.base import Array, ForwardResult, sha256_file

FORMAT = "onnx"
MAX_BYTES = 2 << 30  # protobuf's own limit for one message
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_HEAD_OPS = {"Gemm", "MatMul"}
_PASSTHROUGH = {
    "Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Flatten", "Squeeze", "Identity",
    "Add", "Sub", "Mul", "Div", "Dropout", "Cast",
}  # fmt: skip
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_INSTALL_HINT = "ONNX models need the onnx extra: pip install 'backdoor-gate[onnx]'"


def sniff(path: Path, head: bytes) -> bool:
    """A protobuf starting with ModelProto.ir_version that ``onnx`` parses into a graph."""
    if len(head) < 2 or head[0] != 0x08 or not 1 <= head[1] <= 64:
        return False
    try:
        if path.stat().st_size > MAX_BYTES:
            return False
    except OSError:
        return False
    try:
        import onnx
    except ImportError:
        return True  # load() says to install the extra
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # DecodeError and friends: not ONNX
        return False
    return bool(model.ir_version > 0 and model.graph.node)


def load(path: Path) -> OnnxModel:
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{path}: {_INSTALL_HINT}") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
    _check_model(path, model)
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    return OnnxModel(str(path), sha256_file(path), model, inferred)


def _check_model(path: Path, model: Any) -> None:
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise UnsafeModelError(
                f"{path}: the model imports custom operator domain {opset.domain!r}; "
                "gate only runs standard ONNX operators (no custom ops)"
            )
    if model.functions:
        raise UnsafeModelError(
            f"{path}: the model defines local functions ({model.functions[0].name!r}); gate "
            "only runs standard ONNX operators"
        )
    for node in _all_nodes(model.graph):
        if node.domain not in ALLOWED_DOMAINS:
            raise UnsafeModelError(
                f"{path}: node {node.name or node.op_type!r} uses custom operator "
                f"{node.domain}::{node.op_type}; gate only runs standard ONNX operators"
            )
    graphs = [model.graph, *(g for info in model.training_info for g in _training_graphs(info))]
    for graph in graphs:
        for tensor in _all_tensors(graph):
            if tensor.data_location == 1 or tensor.external_data:  # TensorProto.EXTERNAL
                raise UnsafeModelError(
                    f"{path}: tensor {tensor.name!r} is stored in an external file; gate only "
                    "loads self-contained ONNX models"
                )


def _subgraphs(graph: Any) -> list[Any]:
    """``graph`` and every graph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found.extend(_subgraphs(sub))
    return found


def _training_graphs(info: Any) -> list[Any]:
    return [g for g in (info.initialization, info.algorithm) if g.ByteSize()]


def _all_nodes(graph: Any) -> list[Any]:
    return [node for g in _subgraphs(graph) for node in g.node]


def _all_tensors(graph: Any) -> list[Any]:
    """Every TensorProto in ``graph`` and its subgraphs: initializers, sparse initializers'
    values and indices, and Constant-style tensor and sparse-tensor attributes. Any of them
    may point at external data, which onnxruntime would read from beside the model."""
    tensors: list[Any] = []
    for g in _subgraphs(graph):
        tensors.extend(g.initializer)
        for sparse in g.sparse_initializer:
            tensors.extend((sparse.values, sparse.indices))
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    tensors.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
                for sparse in attr.sparse_tensors:
                    tensors.extend((sparse.values, sparse.indices))
    return tensors


class OnnxModel:
    """A checked ONNX model; one onnxruntime session per set of requested layers."""

    format = FORMAT

    def __init__(self, path: str, sha256: str, model: Any, inferred: Any) -> None:
        self.path = path
        self.sha256 = sha256
        self._model = model
        graph = model.graph
        init = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in init]
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{path}: gate runs models with one input tensor; this one has {len(inputs)}"
            )
        self._input = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self._fixed_batch_one = (
            bool(dims) and dims[0].HasField("dim_value") and (dims[0].dim_value == 1)
        )
        self._output = graph.output[0].name
        elem = {
            v.name: v.type.tensor_type.elem_type
            for v in (*inferred.graph.value_info, *inferred.graph.output)
        }
        self._kinds: dict[str, str] = {}
        for node in graph.node:
            for out in node.output:
                if out and out != self._output and elem.get(out, 1) in _FLOAT_TYPES:
                    self._kinds[out] = node.op_type
        self._default = _penultimate(graph, self._output, init)
        self._sessions: dict[tuple[str, ...], Any] = {}

    def layer_names(self) -> list[str]:
        return list(self._kinds)

    def layer_kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def default_layer(self) -> str:
        if self._default is None or self._default not in self._kinds:
            raise LayerError(
                f"{self.path}: cannot find a hidden layer before the classifier head; "
                "pass --layer (see `gate inspect`)"
            )
        return self._default

    def forward(self, x: Array, layers: Sequence[str] = ()) -> ForwardResult:
        layers = tuple(layers)
        unknown = [name for name in layers if name not in self._kinds]
        if unknown:
            raise LayerError(
                f"{self.path}: no layer named {unknown[0]!r}; available: "
                + ", ".join(self.layer_names()[:30])
            )
        session = self._sessions.get(layers)
        if session is None:
            session = self._sessions[layers] = self._session(layers)
        x = np.ascontiguousarray(x, dtype=np.float32)
        batches = [x[i : i + 1] for i in range(len(x))] if self._fixed_batch_one else [x]
        names = [self._output, *layers]
        try:
            runs = [session.run(names, {self._input: b}) for b in batches]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(
                f"{self.path}: forward pass failed on inputs of shape {tuple(x.shape)}: "
                f"{first_line(exc)}"
            ) from None
        cols = [np.concatenate([np.asarray(r[i]) for r in runs]) for i in range(len(names))]
        outputs = cols[0].astype(np.float32).reshape(len(x), -1)
        acts = {name: col.astype(np.float32) for name, col in zip(layers, cols[1:], strict=True)}
        return ForwardResult(outputs=outputs, activations=acts)

    def _session(self, layers: tuple[str, ...]) -> Any:
        import onnx
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        present = {o.name for o in model.graph.output}
        for name in layers:
            if name not in present:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = os.environ.get("OMP_NUM_THREADS", "")  # set by --threads
        if threads.isdigit() and int(threads) > 0:
            options.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except GateError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path}: onnxruntime cannot run the model ({first_line(exc)})"
            ) from None


def _penultimate(graph: Any, output: str, initializers: set[str]) -> str | None:
    """The input of the last Gemm/MatMul, walking back from ``output``."""
    producer = {out: node for node in graph.node for out in node.output}
    name = output
    for _ in range(32):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in _HEAD_OPS:
            first = node.input[0]
            return first if first in producer else None
        if node.op_type not in _PASSTHROUGH:
            return None
        fed = [i for i in node.input if i in producer and i not in initializers]
        if not fed:
            return None
        name = fed[0]
    return None

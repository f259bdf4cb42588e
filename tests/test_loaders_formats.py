"""Formats beyond TorchScript: state_dict / safetensors with --arch, and ONNX."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gate.cli import main
from gate.errors import GateError, ModelLoadError, UnsafeModelError, UsageError
from gate.models import load_model
from gate.models.arch import use_arch
from tests.conftest import assert_one_line_error, run_gate

ARCH_MODULE = "gate_test_arch_mod"
ARCH = f"{ARCH_MODULE}:SmallNet"
ARCH_SOURCE = """
import torch


class SmallNet(torch.nn.Module):
    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.hidden = torch.nn.Linear(4 * 6 * 6, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        h = torch.tanh(self.hidden(h))
        return self.head(h)
"""


@pytest.fixture()
def arch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The user's model code, importable in this process and (via PYTHONPATH) in gate's."""
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{ARCH_MODULE}.py").write_text(ARCH_SOURCE)
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop(ARCH_MODULE, None)
    yield code
    sys.modules.pop(ARCH_MODULE, None)


def _env(code: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}


def _net(seed: int, width: int = 8) -> torch.nn.Module:
    import importlib

    torch.manual_seed(seed)
    net: torch.nn.Module = importlib.import_module(ARCH_MODULE).SmallNet(width=width)
    return net.eval()


def _save_state_dict(net: torch.nn.Module, path: Path) -> Path:
    torch.save(net.state_dict(), path)
    return path


def _save_safetensors(net: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _eager(net: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Outputs, each submodule's output, and the input of the last Linear, by plain hooks."""
    acts: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, o, name=name: acts.__setitem__(name, o.detach().numpy().copy())
        )
        for name, m in net.named_modules()
        if name
    ]
    handles.append(
        net.head.register_forward_pre_hook(  # type: ignore[union-attr]
            lambda _m, i: acts.__setitem__("@penultimate", i[0].detach().numpy().copy())
        )
    )
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    for h in handles:
        h.remove()
    return out, acts


X = np.random.default_rng(0).normal(size=(5, 1, 6, 6)).astype(np.float32)


# --- state_dict and safetensors -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_weights_with_arch_match_eager(arch_dir: Path, tmp_path: Path, fmt: str) -> None:
    net = _net(1)
    # Named against type: the format is chosen by content.
    path = tmp_path / "weights.bin"
    (_save_state_dict if fmt == "state_dict" else _save_safetensors)(net, path)
    with use_arch(ARCH, '{"width": 8}'):
        model = load_model(path)
    assert model.format == fmt
    names = model.layer_names()
    assert names == ["conv", "act", "hidden", "head", "@penultimate"]
    assert model.default_layer() == "@penultimate"
    res = model.forward(X, names)
    out, acts = _eager(net, X)
    np.testing.assert_allclose(res.outputs, out, rtol=1e-5, atol=1e-6)
    for name in names:
        np.testing.assert_allclose(res.activations[name], acts[name], rtol=1e-5, atol=1e-6)
    # The default layer is the input of the last Linear run: tanh(hidden(...)), 8 wide.
    assert res.activations["@penultimate"].shape == (5, 8)


def test_state_dict_without_arch_says_pass_arch(tmp_path: Path) -> None:
    path = _save_state_dict(torch.nn.Linear(4, 2), tmp_path / "weights.pt")
    assert_one_line_error(run_gate("inspect", str(path)), "no architecture", "pass --arch")


def test_safetensors_without_arch_says_pass_arch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="pass --arch"):
        load_model(path)


def test_malicious_checkpoint_is_refused_even_with_arch(arch_dir: Path, tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Evil(), 2))
        zf.writestr("archive/version", "3\n")
    with use_arch(ARCH, None), pytest.raises(UnsafeModelError, match="code execution"):
        load_model(path)


def test_cli_baseline_scan_inspect_with_arch(arch_dir: Path, tmp_path: Path) -> None:
    refs = [_save_state_dict(_net(seed), tmp_path / f"ref{seed}.pt") for seed in range(3)]
    cand = _save_safetensors(_net(7), tmp_path / "cand.safetensors")
    arch = ["--arch", ARCH, "--arch-kwargs", '{"width": 8}']
    env = _env(arch_dir)
    baseline = tmp_path / "baseline"
    proc = run_gate(
        "baseline", "build", *map(str, refs), "--out", str(baseline), "--input-shape", "1,6,6",
        "--quiet", "--no-cache", *arch, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report_dir = tmp_path / "report"
    proc = run_gate(
        "scan", str(cand), "--baseline", str(baseline), "--report-dir", str(report_dir),
        "--no-cache", "--quiet", *arch, env=env,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["model"]["format"] == "safetensors"
    assert report["fingerprint"] is not None
    proc = run_gate("inspect", str(refs[0]), "--input-shape", "1,6,6", *arch, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "format=state_dict" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "@penultimate" in ln)
    assert "  8  <- default" in line, proc.stdout


def test_cli_bad_arch_is_one_line(arch_dir: Path, tmp_path: Path) -> None:
    path = _save_state_dict(_net(1), tmp_path / "w.pt")
    proc = run_gate("inspect", str(path), "--arch", "no_such_module_xyz:Net", env=_env(arch_dir))
    assert_one_line_error(proc, "--arch", "cannot import")


@pytest.mark.parametrize(
    ("arch", "kwargs", "needle"),
    [
        ("not-an-import-path", None, "package.module:ClassName"),
        ("gate_test_arch_mod", None, "package.module:ClassName"),
        (f"{ARCH_MODULE}:Missing", None, "no attribute"),
        ("no_such_module_xyz:Net", None, "cannot import"),
        (ARCH, "{not json", "not valid JSON"),
        (ARCH, "[1, 2]", "JSON object"),
        (ARCH, '{"depth": 3}', "check --arch-kwargs"),
        (ARCH, '{"width": 5}', "shape mismatch"),
        (f"{ARCH_MODULE}:torch", None, "not a class"),
        (None, '{"width": 8}', "needs --arch"),
    ],
)
def test_bad_arch_exits_2_one_line(
    arch_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arch: str | None,
    kwargs: str | None,
    needle: str,
) -> None:
    path = _save_state_dict(_net(1), tmp_path / "w.pt")
    argv = ["inspect", str(path)]
    argv += ["--arch", arch] if arch is not None else []
    argv += ["--arch-kwargs", kwargs] if kwargs is not None else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gate: error:"), err
    assert needle.lower() in err.lower(), err


def test_arch_that_is_not_a_module(arch_dir: Path, tmp_path: Path) -> None:
    (arch_dir / "gate_test_notmod.py").write_text("def Net():\n    return 3\n")
    path = _save_state_dict(_net(1), tmp_path / "w.pt")
    with use_arch("gate_test_notmod:Net", None), pytest.raises(UsageError, match=r"nn\.Module"):
        load_model(path)


def test_arch_is_ignored_for_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))  # type: ignore[no-untyped-call]
    with use_arch("whatever_module:Net", None):
        assert load_model(path).format == "torchscript"


# --- ONNX -----------------------------------------------------------------------------------


class OnnxNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.hidden = torch.nn.Linear(3 * 6 * 6, 10)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.act(self.hidden(self.features(x)))), dim=1)


def _export_onnx(net: torch.nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 6, 6),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OnnxNet]:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(3)
    net = OnnxNet().eval()
    # Named .pt: the format is chosen by content.
    return _export_onnx(net, tmp_path_factory.mktemp("onnx") / "model.pt"), net


def test_onnx_forward_matches_torch(onnx_file: tuple[Path, OnnxNet]) -> None:
    path, net = onnx_file
    model = load_model(path)
    assert model.format == "onnx"
    names = model.layer_names()
    assert "logits" not in names and names
    default = model.default_layer()
    res = model.forward(X, [default, *names])
    with torch.no_grad():
        t = torch.from_numpy(X)
        hidden_in = net.act(net.hidden(net.features(t)))
        out = net(t)
    np.testing.assert_allclose(res.outputs, out.numpy(), rtol=1e-4, atol=1e-5)
    # Default: the input of the last Gemm, i.e. relu(hidden(...)).
    np.testing.assert_allclose(res.activations[default], hidden_in.numpy(), rtol=1e-4, atol=1e-5)
    kinds = model.layer_kinds()  # type: ignore[attr-defined]
    assert kinds[default] == "Relu"
    gemm_out = next(n for n in names if kinds[n] == "Gemm")
    np.testing.assert_allclose(
        res.activations[gemm_out], net.hidden(net.features(t)).detach().numpy(), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip


def test_onnx_inspect_cli(onnx_file: tuple[Path, OnnxNet]) -> None:
    path, _ = onnx_file
    proc = run_gate("inspect", str(path), "--input-shape", "1,6,6")
    assert proc.returncode == 0, proc.stderr
    assert "format=onnx" in proc.stdout
    assert "<- default" in proc.stdout
    assert any("Relu" in ln and "10" in ln and "default" in ln for ln in proc.stdout.splitlines())


def _tiny_onnx(path: Path, domain: str = "", external: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32).tolist())
    if external:
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2])
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value="../../etc/passwd")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [w],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    path.write_bytes(model.SerializeToString())
    assert onnx.load(str(path), load_external_data=False).graph.node
    return path


def test_onnx_built_by_hand_runs(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = load_model(_tiny_onnx(tmp_path / "m.onnx"))
    res = model.forward(np.ones((3, 4), np.float32))
    np.testing.assert_allclose(res.outputs, np.full((3, 2), 4.0))


@pytest.mark.parametrize(
    ("domain", "external", "needle"),
    [("com.example.evil", False, "custom operator"), ("", True, "external file")],
)
def test_onnx_custom_ops_and_external_data_refused(
    tmp_path: Path, domain: str, external: bool, needle: str
) -> None:
    pytest.importorskip("onnxruntime")
    path = _tiny_onnx(tmp_path / "m.onnx", domain, external)
    with pytest.raises(UnsafeModelError, match=needle):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [b"\x08\x07" + os.urandom(200), b"\x08" + b"\xff" * 300, b"\x08\x09\x12\x07pyto"],
)
def test_onnx_lookalike_bytes_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(GateError):
        load_model(path)


def test_cache_identity_follows_arch_code(arch_dir: Path, tmp_path: Path) -> None:
    """The activation cache keys on the --arch code and kwargs as well as the weights file."""
    path = _save_state_dict(_net(1), tmp_path / "w.pt")
    with use_arch(ARCH, '{"width": 8}'):
        first = load_model(path)
    with use_arch(ARCH, '{"width": 8, "classes": 3}'):
        other_kwargs = load_model(path)
    (arch_dir / f"{ARCH_MODULE}.py").write_text(ARCH_SOURCE + "\n# edited\n")
    with use_arch(ARCH, '{"width": 8}'):
        edited = load_model(path)
    ids = {getattr(m, "cache_identity") for m in (first, other_kwargs, edited)}  # noqa: B009
    assert len(ids) == 3
    assert first.sha256 == other_kwargs.sha256 == edited.sha256

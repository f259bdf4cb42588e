"""Red-team reproductions for gate's static defences (issue #13), through the real CLI.

One section per class of finding: TorchScript ops that escaped the check through calls
that are not inlined, pickles that torch reads but gate did not scan, ONNX tensors stored
outside the file, Hugging Face directories that link out, bad input that gave "internal
error", and baselines whose NaN or 1e308 made every model pass. Models are tiny and built
in a fresh interpreter (scripting in this one may mangle later scripted names).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate

# --- 1. TorchScript: default-deny ops, interface calls included --------------------------

_EVIL_SOURCES = """
import sys
import torch
from torch import nn


@torch.jit.interface
class Iface(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pass


class Writes(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=64, dtype=torch.uint8)
        t.fill_(65)
        return x + t.sum().float() * 0


class Benign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class ViaInterface(nn.Module):
    sub: Iface

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.sub.forward(x))


class Sparse(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([[0, 1 << 40], [0, 1 << 40]])
        s = torch.sparse_coo_tensor(idx, torch.ones(2), [2, 2])
        return x + s.to_dense().sum()


class Prints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("::set-output name=verdict::pass")
        return self.fc(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(y + x.mean(1, keepdim=True)), 1))


class Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.enc(self.emb(x.long())))
        return self.fc(torch.nn.functional.gelu(self.ln(h.mean(1))))


out, victim = sys.argv[1], sys.argv[2]
models = {
    "interface_from_file": ViaInterface(Writes(victim)),
    "interface_benign": ViaInterface(Benign()),
    "sparse": Sparse(),
    "print": Prints(),
    "resnet_block": Block(),
    "transformer_lstm": Text(),
}
for name, module in models.items():
    torch.jit.save(torch.jit.script(module.eval()), f"{out}/{name}.pt")
"""


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The hostile and benign TorchScript models, and the file the hostile one would write."""
    d = tmp_path_factory.mktemp("redteam-ts")
    (d / "build.py").write_text(_EVIL_SOURCES)
    victim = d / "victim.bin"
    subprocess.run(
        [sys.executable, str(d / "build.py"), str(d), str(victim)], check=True, timeout=300
    )
    assert not victim.exists()
    return d, victim


def test_interface_call_to_from_file_is_refused(scripted: tuple[Path, Path]) -> None:
    """The callee of an interface-typed submodule is checked: from_file never runs."""
    d, victim = scripted
    proc = run_gate("inspect", str(d / "interface_from_file.pt"), "--input-shape", "4", cwd=d)
    assert_one_line_error(proc, "aten::from_file")
    assert not victim.exists()


_UNCHECKED_SPARSE = (
    b"ops.aten._sparse_coo_tensor_with_dims_and_tensors(2, 0, [2, 2], idx, torch.ones([2]), "
    b'dtype=6, layout=1, device=torch.device("cpu"), pin_memory=False)'
)


@pytest.mark.parametrize("unchecked", [False, True])
def test_sparse_constructor_and_to_dense_are_refused(
    scripted: tuple[Path, Path], tmp_path: Path, unchecked: bool
) -> None:
    """Out-of-range sparse indices + to_dense() was a heap write (SIGSEGV); never run.

    ``unchecked``: the archive's code edited to call the constructor that skips the index
    check, as an attacker would write it (TorchScript will not script it from Python).
    """
    d, _ = scripted
    model = d / "sparse.pt"
    if unchecked:
        edited = tmp_path / "sparse-unchecked.pt"
        with zipfile.ZipFile(model) as zin, zipfile.ZipFile(edited, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename.endswith("code/__torch__.py"):
                    old = b"torch.sparse_coo_tensor(idx, torch.ones([2]), [2, 2])"
                    assert old in data
                    data = data.replace(old, _UNCHECKED_SPARSE)
                zout.writestr(info, data)
        model = edited
    proc = run_gate("inspect", str(model), "--input-shape", "4", cwd=tmp_path)
    needle = "_sparse_coo_tensor_with_dims_and_tensors" if unchecked else "sparse_coo_tensor"
    assert_one_line_error(proc, needle)


def test_print_in_forward_is_refused(scripted: tuple[Path, Path]) -> None:
    d, _ = scripted
    proc = run_gate("inspect", str(d / "print.pt"), "--input-shape", "4", cwd=d)
    assert_one_line_error(proc, "prim::Print")
    assert "::set-output" not in proc.stdout


@pytest.mark.parametrize(
    ("name", "shape"),
    [("interface_benign", "4"), ("resnet_block", "3,8,8"), ("transformer_lstm", "5")],
)
def test_standard_layers_and_benign_interfaces_still_load(
    scripted: tuple[Path, Path], name: str, shape: str
) -> None:
    d, _ = scripted
    proc = run_gate("inspect", str(d / f"{name}.pt"), "--input-shape", shape, cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert "(output)" in proc.stdout


# --- 2. Pickles: the member torch reads, and no torch.load inside the allow-list ----------


def _evil_pickle(marker: Path) -> bytes:
    return b"\x80\x02" + f"cposix\nsystem\n(Vtouch {marker}\ntR.".encode()


def _tensor_pickle() -> bytes:
    return pickle.dumps({}, protocol=2)


@pytest.mark.parametrize(
    "members",
    [
        # torch's root is the first entry's folder, not the first */data.pkl found
        [("root/version", b"3\n"), ("other/data.pkl", None), ("root/data.pkl", "evil")],
        # exact duplicates: zipfile and torch's miniz may each pick a different one
        [("archive/data.pkl", None), ("archive/data.pkl", "evil"), ("archive/version", b"3")],
        # miniz matches names ignoring case
        [("archive/version", b"3"), ("archive/data.pkl", None), ("archive/DATA.pkl", "evil")],
    ],
    ids=["other-root", "duplicate", "case"],
)
def test_the_pickle_torch_reads_is_the_one_scanned(
    tmp_path: Path, members: list[tuple[str, object]]
) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(model, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for name, content in members:
            data = _evil_pickle(marker) if content == "evil" else content or _tensor_pickle()
            assert isinstance(data, bytes)
            zf.writestr(name, data)
    proc = run_gate("inspect", str(model), cwd=tmp_path)
    assert_one_line_error(proc)
    assert ("posix.system" in proc.stderr) or ("duplicate" in proc.stderr), proc.stderr
    assert not marker.exists()


def test_load_from_bytes_is_not_allowed(tmp_path: Path) -> None:
    """torch.storage._load_from_bytes calls torch.load(weights_only=False): arbitrary code."""
    model = tmp_path / "ckpt.pt"
    payload = b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x04abcd\x85R."
    with zipfile.ZipFile(model, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    proc = run_gate("inspect", str(model), cwd=tmp_path)
    assert_one_line_error(proc, "_load_from_bytes", "code execution")


# --- 3. ONNX: every tensor embedded, sparse and nested ones included -----------------------


def _onnx_with(tmp_path: Path, where: str) -> Path:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(b"\x01" * 64)

    def external(name: str, dtype: int, dims: list[int]) -> object:
        t = TensorProto(name=name, data_type=dtype, dims=dims)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="secret.bin")
        return t

    values = external("w_values", TensorProto.FLOAT, [2])
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [2], [0, 3])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    if where == "sparse_initializer":
        nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
        sparse = helper.make_sparse_tensor(values, indices, [4])
        sparse.values.name = "w"
        graph = helper.make_graph(nodes, "g", [x], [y], sparse_initializer=[sparse])
    else:  # a Constant's sparse_value, inside an If branch
        const = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
        branch_out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])
        body = helper.make_graph([const], "then", [], [branch_out])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        nodes = [
            helper.make_node("If", ["cond"], ["w"], then_branch=body, else_branch=body),
            helper.make_node("Add", ["x", "w"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y], [cond])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert onnx.load(str(path), load_external_data=False).graph.node
    return path


@pytest.mark.parametrize("where", ["sparse_initializer", "nested_sparse_constant"])
def test_onnx_sparse_tensor_with_external_data_is_refused(tmp_path: Path, where: str) -> None:
    path = _onnx_with(tmp_path, where)
    proc = run_gate("inspect", str(path), "--input-shape", "4", cwd=tmp_path)
    assert_one_line_error(proc, "external file")


# --- 4. Hugging Face directories: only the directory's own regular files -------------------


@pytest.mark.parametrize(
    "link",
    ["/proc/self/pagemap", "outside", "fifo"],
)
def test_hf_directory_that_links_out_is_refused_quickly(tmp_path: Path, link: str) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    if link == "fifo":
        os.mkfifo(ckpt / "vocab.txt")
    else:
        target = Path(link) if link.startswith("/") else tmp_path / "secret.txt"
        if not target.is_absolute() or link == "outside":
            target.write_text("token\n")
        (ckpt / "vocab.txt").symlink_to(target)
    proc = run_gate("inspect", str(ckpt), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "vocab.txt")


# --- 5. Bad input: specific one-line messages, never "internal error" ----------------------

_BIG = "9" * 5000
_DEEP = "[" * 20000 + "]" * 20000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    script = (
        "import sys, torch; torch.manual_seed(0); m = torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)); "
        "torch.jit.save(torch.jit.script(m), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, str(d / "m.pt")], check=True, timeout=300)
    return d / "m.pt"


@pytest.mark.parametrize(
    ("text", "needle"),
    [(f"fingerprint:\n  fail_alpha: {_BIG}\n", "digits"), (f"fingerprint: {_DEEP}\n", "deep")],
    ids=["big-int", "deep"],
)
def test_policy_big_int_and_deep_nesting(tmp_path: Path, text: str, needle: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    assert_one_line_error(run_gate("policy", "validate", str(policy), cwd=tmp_path), needle)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (f'{{"text": "a", "label": {_BIG}}}', "digits"),
        (f'{{"text": "a", "label": {_DEEP}}}', "deep"),
    ],
    ids=["big-int", "deep"],
)
def test_jsonl_big_int_and_deep_nesting(
    tiny_model: Path, tmp_path: Path, line: str, needle: str
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    proc = run_gate("inspect", str(tiny_model), "--data", str(data), cwd=tmp_path)
    assert_one_line_error(proc, needle)


def test_nan_in_data_names_the_row(tiny_model: Path, tmp_path: Path) -> None:
    """A NaN among finite values in a row (the case the bracket bug missed)."""
    x = np.ones((6, 16), np.float32)
    x[4, 3] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 3)
    proc = run_gate("inspect", str(tiny_model), "--data", str(tmp_path / "d.npz"), cwd=tmp_path)
    assert_one_line_error(proc, "NaN", "row 4")


def test_npz_header_declaring_2_42_elements(tiny_model: Path, tmp_path: Path) -> None:
    """Refused from the header, before numpy tries to allocate 16 TiB."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 21, 1 << 21)}
    x = io.BytesIO()
    np.lib.format.write_array_header_1_0(x, header)
    y = io.BytesIO()
    np.lib.format.write_array(y, np.zeros(2, np.int64))
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", x.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", y.getvalue())
    proc = run_gate("inspect", str(tiny_model), "--data", str(path), cwd=tmp_path)
    assert_one_line_error(proc, "declares shape")


def test_one_class_data_is_not_an_internal_error(tiny_model: Path, tmp_path: Path) -> None:
    """gate ac on data with one class is a clear error: ExRe cannot decide anything with no
    other class, and a check that decided nothing is never a pass."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 16)).astype(np.float32), y=np.zeros(40))
    proc = run_gate("ac", str(tiny_model), "--data", str(tmp_path / "d.npz"), cwd=tmp_path)
    assert_one_line_error(proc, "at least two classes")


# --- 6. Baselines: non-finite or absurd values are refused at load time --------------------


@pytest.fixture(scope="module")
def baseline_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real baseline of three tiny references (seeds 1-3; the candidate is seed 0)."""
    d = tmp_path_factory.mktemp("baseline")
    script = (
        "import sys, torch\nfor s in (1, 2, 3):\n    torch.manual_seed(s)\n"
        "    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), "
        "torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "    torch.jit.save(torch.jit.script(m), f'{sys.argv[1]}/r{s}.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(d)], check=True, timeout=300)
    refs = [str(d / f"r{s}.pt") for s in (1, 2, 3)]
    out = d / "baseline"
    proc = run_gate("baseline", "build", *refs, "--out", str(out), "--input-shape", "16", cwd=d)
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_baseline(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e308"])
def test_baseline_calibration_scores_must_be_finite(
    tiny_model: Path, baseline_dir: Path, tmp_path: Path, value: str
) -> None:
    bad = _copy_baseline(baseline_dir, tmp_path / "b")
    manifest = json.loads((bad / "baseline.json").read_text())
    manifest["detectors"][0]["calibration_scores"][0] = "__X__"
    (bad / "baseline.json").write_text(json.dumps(manifest).replace('"__X__"', value))
    proc = run_gate("scan", str(tiny_model), "--baseline", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "calibration scores")


@pytest.mark.parametrize(
    ("key", "value"), [("fingerprints", np.nan), ("fingerprints", 1e38), ("detector", np.inf)]
)
def test_baseline_arrays_must_be_finite(
    tiny_model: Path, baseline_dir: Path, tmp_path: Path, key: str, value: float
) -> None:
    bad = _copy_baseline(baseline_dir, tmp_path / "b")
    with np.load(bad / "fingerprints.npz", allow_pickle=False) as npz:
        arrays = {k: np.array(npz[k]) for k in npz.files}
    name = (
        "fingerprints"
        if key == "fingerprints"
        else next(
            k
            for k, v in sorted(arrays.items())
            if k.startswith("detector.") and v.dtype.kind == "f"
        )
    )
    arrays[name].reshape(-1)[0] = value
    np.savez(bad / "fingerprints.npz", **arrays)
    proc = run_gate("scan", str(tiny_model), "--baseline", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "corrupt or tampered")


@pytest.mark.parametrize("text", [_BIG, _DEEP], ids=["big-int", "deep"])
def test_baseline_manifest_big_int_and_deep_nesting(
    tiny_model: Path, tmp_path: Path, text: str
) -> None:
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "baseline.json").write_text('{"seed": ' + text + "}")
    proc = run_gate("scan", str(tiny_model), "--baseline", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "baseline.json")


def test_baseline_manifest_too_large_is_refused_before_reading(
    tiny_model: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "b"
    bad.mkdir()
    with open(bad / "baseline.json", "wb") as f:  # sparse: no disk, but st_size says 65 MiB
        f.truncate(65 << 20)
    proc = run_gate("scan", str(tiny_model), "--baseline", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "larger than")


@pytest.mark.parametrize(
    ("value", "classes", "needle"),
    [("NaN", 3, "NaN or infinite"), ("1e308", 3, "beyond"), ("1.0", 2, "has 2 classes")],
)
def test_baseline_trigger_statistics_must_be_sane(
    tiny_model: Path, baseline_dir: Path, tmp_path: Path, value: str, classes: int, needle: str
) -> None:
    """A planted trigger-search calibration (NaN, huge, or the wrong class count) is refused
    at load time: it would otherwise decide every candidate's trigger-search p-value."""
    bad = _copy_baseline(baseline_dir, tmp_path / "b")
    manifest = json.loads((bad / "baseline.json").read_text())
    stats = {"max_margin": ["__X__"] * classes, "mask_l1": [0.0] * classes}
    manifest["trigger_search"] = {
        "options": {},
        "inputs": "synthetic",
        "reference_classes": [stats] * len(manifest["references"]),
    }
    (bad / "baseline.json").write_text(json.dumps(manifest).replace('"__X__"', value))
    proc = run_gate("scan", str(tiny_model), "--baseline", str(bad), cwd=tmp_path)
    assert_one_line_error(proc, "trigger statistic", needle)

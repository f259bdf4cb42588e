"""Intermediate activations from any TorchScript model, without forward hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gate.models import load_model


class Functional(torch.nn.Module):
    """No submodules at all: layers must still be exposed (named by op)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(12, 6))
        self.w2 = torch.nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w1)
        return torch.log_softmax(h @ self.w2, dim=1)


class Nested(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(10, 8),
            torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.Linear(8, 7), torch.nn.ReLU()),
        )
        self.classifier = torch.nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def test_nested_modules_are_named_and_match_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = Nested().eval()
    model = load_model(_save(eager, tmp_path / "nested.pt"))
    names = model.layer_names()
    for expected in ("body", "body.0", "body.2", "body.2.0", "body.2.1", "classifier"):
        assert expected in names
    assert model.default_layer() in {"body", "body.2", "body.2.1"}
    x = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
    res = model.forward(x, ["body.2.0", model.default_layer()])
    with torch.no_grad():
        t = torch.from_numpy(x)
        inner = eager.body[2][0](eager.body[1](eager.body[0](t)))
        hidden = eager.body(t)
        out = eager(t)
    np.testing.assert_allclose(res.activations["body.2.0"], inner.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.activations[model.default_layer()], hidden.numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.outputs, out.numpy(), rtol=1e-5, atol=1e-6)


def test_functional_model_without_submodules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = Functional().eval()
    model = load_model(_save(eager, tmp_path / "functional.pt"))
    default = model.default_layer()
    x = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)
    res = model.forward(x, [default])
    with torch.no_grad():
        hidden = torch.tanh(torch.from_numpy(x) @ eager.w1)
    np.testing.assert_allclose(res.activations[default], hidden.numpy(), rtol=1e-5, atol=1e-6)

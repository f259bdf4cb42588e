"""``--device``: where a model's forward passes and the trigger search run.

The CLI only checks the spelling (:func:`check_spec`); the sandboxed child, which has torch,
resolves it (:func:`resolve`) and readies the device before its syscall filter goes on
(:func:`prepare`). CPU is the reference: on another device the verdicts must agree with
CPU's and the scores agree within :data:`SCORE_TOLERANCE` (``make bench-device`` measures
it where a GPU is present).
"""

from __future__ import annotations

import re
from typing import Any

from gate.errors import UsageError

DEFAULT = "cpu"
CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"(auto|cpu|mps|cuda(:[0-9]{1,3})?)")
# How far a score computed on an accelerator may stand from CPU's: p-values and anomaly
# scores in absolute terms, the trigger search's per-class statistics relative to their
# size. float32 kernels differ in summation order (TF32 is switched off, see prepare()).
SCORE_TOLERANCE = {"p_value": 1e-3, "trigger_statistic": 0.05}


def check_spec(spec: str) -> str:
    """``spec`` as given, or a UsageError naming the accepted spellings."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise UsageError(f"--device: expected {CHOICES}, got {spec!r}")
    return spec


def resolve(spec: str) -> str:
    """The torch device ``spec`` names on this machine (``auto``: the first GPU, else CPU).

    A device that is asked for by name and absent is a UsageError, never a quiet fallback
    to the CPU."""
    import torch

    check_spec(spec)
    if spec == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if spec == "auto":
        return "cuda:0" if cuda else "mps" if mps else "cpu"
    if spec == "mps":
        if not mps:
            raise UsageError("--device mps: no Apple GPU (MPS) is available to this torch")
        return "mps"
    if not cuda:
        build = torch.version.cuda
        why = f"torch {torch.__version__} is a CPU-only build" if not build else "no GPU found"
        raise UsageError(f"--device {spec}: no CUDA device is available ({why})")
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {spec}: only {count} CUDA device(s) are visible")
    return f"cuda:{index}"


def prepare(device: str) -> None:
    """Ready ``device`` for repeatable work, before the sandbox's filter is installed.

    CUDA opens its device files read-write and creates the cuBLAS and cuDNN handles on first
    use; the filter forbids opening files for writing afterwards, so one small convolution,
    matrix product and backward pass run here. TF32 is off and cuDNN deterministic, so that
    results stay within :data:`SCORE_TOLERANCE` of the CPU's."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.cuda.set_device(torch.device(device))
    _warm_up(torch, device)


def _warm_up(torch: Any, device: str) -> None:
    x = torch.randn(2, 1, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, device=device)
    y = torch.nn.functional.conv2d(x, w).reshape(2, -1)
    (y @ y.T).sum().backward()
    float(x.grad.sum())  # waits for the device: every lazy initialisation has happened

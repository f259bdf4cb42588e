"""Model-adaptive trigger search: let the model show its shortcut (runs where the model is).

This module runs in the process that holds the model (in-process today, the sandbox child
later): it needs gradients through the model. It returns per-class statistics only; the
parent turns them into p-values (:mod:`gate.trigger.stats`). It writes no files, prints
nothing and touches no network.

Three searches, all batched so one forward/backward pass serves every class at once:

* **Max margin (MM-BD, Wang et al.)**: per class t, the largest logit margin
  ``f_t(x) - max_{j != t} f_j(x)`` reachable anywhere in the input box, from ``restarts``
  random starts. A backdoor target class reaches abnormally large margins: the trigger is
  a shortcut the optimiser finds.
* **Neural Cleanse (Wang et al., S&P 2019)**: per target t, the smallest mask m and a
  pattern p such that ``(1 - m) * x + m * p`` sends at least ``ASR_GOAL`` of clean inputs of
  the other classes to t. All-to-one backdoors have an abnormally small mask for their
  target.
* **Pairs (K-Arm-like, Shen et al.)**: the same for every source -> target pair, on the
  source class's inputs only. All-to-all and source-specific backdoors have no single
  target, but their (source, target) pairs need abnormally small masks.

The mask weight (lambda) of every task adapts as in Neural Cleanse (up while the mask
succeeds, down while it does not), so a fixed number of steps finds each task's smallest
successful mask without a per-task search.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from gate.errors import UsageError

# A mask "succeeds" when it flips this fraction of its inputs (Neural Cleanse uses 0.99 on
# large sets; a few samples per pair make 0.9 the stabler choice).
ASR_GOAL = 0.9
# The "target" of a flip task: any class but the inputs' own.
FLIP = -2

DEFAULTS: dict[str, Any] = {
    "steps": 150,  # optimisation steps of the mask search (target and pair tasks together)
    "mm_steps": 100,  # steps of the max-margin search
    "restarts": 4,  # random starts per class of the max-margin search
    "samples": 12,  # clean inputs per target task (drawn from the other classes)
    "pair_samples": 6,  # clean inputs of the source class per (source, target) pair
    # The pair search costs K - 1 times the target search; off unless asked for.
    "pairs": False,  # run the pair search (all-to-all / source-specific backdoors)
    "max_classes": 100,  # above this, pairs are skipped (K * (K - 1) tasks)
    "input_range": None,  # [low, high] of valid inputs; None: the inputs' own min and max
}

NOT_RUN_FORMATS = {
    "onnx": "ONNX models run in onnxruntime, which gives no input gradients; "
    "export the model as TorchScript to run the trigger search",
    "huggingface": "text model: a trigger search over token embeddings is not implemented; "
    "the check did not run (this is not a pass)",
}


def options_checked(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` over :data:`DEFAULTS`, with every value checked (bad: UsageError)."""
    out = dict(DEFAULTS)
    for key, value in (options or {}).items():
        if key not in DEFAULTS:
            raise UsageError(f"trigger search: unknown option {key!r}")
        out[key] = value
    for key in ("steps", "mm_steps", "restarts", "samples", "pair_samples", "max_classes"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"trigger search: {key} must be a positive integer, got {v!r}")
    if out["steps"] > 100_000 or out["mm_steps"] > 100_000 or out["restarts"] > 1_000:
        raise UsageError("trigger search: budget too large (steps <= 100000, restarts <= 1000)")
    out["pairs"] = bool(out["pairs"])
    rng = out.get("input_range")
    if rng is not None:
        ok = isinstance(rng, (list, tuple)) and len(rng) == 2
        lo, hi = (float(rng[0]), float(rng[1])) if ok else (0.0, 0.0)
        if not (ok and math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UsageError(f"trigger search: input_range must be [low, high], got {rng!r}")
        out["input_range"] = [lo, hi]
    return out


def not_run(reason: str) -> dict[str, Any]:
    return {"status": "not_run", "reason": reason}


def run(
    model: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64] | None,
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Search ``model`` for class shortcuts on clean inputs ``x`` (labels ``y`` or None:
    the model's own predictions). Returns JSON-compatible values plus numpy masks/patterns.
    """
    opts = options_checked(options)
    fmt = str(getattr(model, "format", ""))
    if fmt in NOT_RUN_FORMATS:
        return not_run(NOT_RUN_FORMATS[fmt])
    module = getattr(model, "_module", None)
    if module is None or not callable(module):
        return not_run(f"{fmt or type(model).__name__} models expose no differentiable module")
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim < 2 or len(x) < 2:
        raise UsageError(f"trigger search: need a batch of at least 2 inputs, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise UsageError("trigger search: inputs hold NaN or infinite values")
    import torch

    # On another device (--device) the model's module is there already; every random
    # draw is still made on the CPU, so the starts are the same as on the reference.
    device = str(getattr(model, "device", "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _search(module, x, y, opts, seed, device)


def _search(
    module: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64] | None,
    opts: dict[str, Any],
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    import torch

    if opts["input_range"] is not None:
        lo, hi = opts["input_range"]
    else:
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1.0
    xt = torch.from_numpy(x).to(device)
    try:
        with torch.no_grad():
            logits = _logits(module, xt)
    except UsageError:
        raise
    except Exception as exc:  # the model's own code may raise anything on a wrong shape
        from gate.errors import first_line

        shape = ",".join(map(str, x.shape[1:]))
        raise UsageError(
            f"trigger search: the model fails on inputs of shape {shape} (is --input-shape "
            f"right?): {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if logits.ndim != 2 or logits.shape[1] < 2:
        return not_run(f"the model's output has shape {tuple(logits.shape)}, not class logits")
    k = int(logits.shape[1])
    pred = logits.argmax(1).cpu().numpy()
    labels = pred if y is None else np.asarray(y, dtype=np.int64)
    if len(labels) != len(x):
        raise UsageError(f"trigger search: {len(x)} inputs but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    by_class = [_class_rows(labels, pred, c, rng) for c in range(k)]
    present = [c for c in range(k) if len(by_class[c])]
    if len(present) < 2:
        return not_run("the clean inputs cover fewer than two classes")
    gen = torch.Generator().manual_seed(seed)
    margin = _max_margin(module, x.shape[1:], k, lo, hi, opts, gen, device)
    # Target tasks: every class t, clean inputs of the other classes. Pair tasks: (s, t).
    tasks: list[tuple[int, int]] = [(-1, t) for t in range(k)]
    rows = [_other_rows(by_class, t, opts["samples"], rng) for t in range(k)]
    # Flip tasks (s, FLIP): the smallest mask that sends class s's inputs to *any* other
    # class. All-to-all and source-specific backdoors have no single easy target, but their
    # sources are abnormally easy to flip.
    flips = list(present)
    for s in flips:
        tasks.append((s, FLIP))
        rows.append(_take(by_class[s], opts["samples"], rng))
    do_pairs = opts["pairs"] and k <= opts["max_classes"]
    if do_pairs:
        for s in present:
            for t in range(k):
                if t != s:
                    tasks.append((s, t))
                    rows.append(_take(by_class[s], opts["pair_samples"], rng))
    l1, asr, masks, patterns, steps = _mask_search(
        module, x, rows, tasks, lo, hi, opts, gen, device
    )
    area = float(np.prod(masks.shape[1:]))
    flip_l1 = [area] * k  # an absent class is not suspicious
    for i, s in enumerate(flips):
        flip_l1[s] = float(l1[k + i])
    out: dict[str, Any] = {
        "status": "ok",
        "reason": None,
        "n_classes": k,
        "classes_present": present,
        "input_range": [_r(lo), _r(hi)],
        "mask_area": int(area),
        "options": opts,
        "steps_run": {"max_margin": int(opts["mm_steps"]), "mask": steps},
        "max_margin": [_r(v) for v in margin],
        "target_mask_l1": [_r(v) for v in l1[:k]],
        "target_asr": [_r(v) for v in asr[:k]],
        "flip_mask_l1": [_r(v) for v in flip_l1],
        "pair_mask_l1": None,
        "masks": masks[:k],
        "patterns": patterns[:k],
    }
    if do_pairs:
        pair: list[list[float | None]] = [[None] * k for _ in range(k)]
        first = k + len(flips)
        for (s, t), v in zip(tasks[first:], l1[first:], strict=True):
            pair[s][t] = _r(v)
        out["pair_mask_l1"] = pair
    return out


def _logits(module: Any, xt: Any) -> Any:
    from gate.models.base import first_tensor

    out = first_tensor(module(xt))
    if out is None:
        raise UsageError("trigger search: the model's output is not a tensor")
    return out.reshape(len(xt), -1).float()


def _class_rows(
    labels: npt.NDArray[np.int64], pred: npt.NDArray[np.int64], c: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Rows of class ``c`` the model gets right (all rows of c if it gets none right)."""
    rows = np.flatnonzero((labels == c) & (pred == c))
    if not len(rows):
        rows = np.flatnonzero(labels == c)
    return rng.permutation(rows)


def _take(rows: npt.NDArray[np.int64], n: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``n`` rows, cycling through ``rows`` when it has fewer (every task has ``n`` rows)."""
    if len(rows) >= n:
        return rows[:n]
    return np.resize(rng.permutation(rows), n)


def _other_rows(
    by_class: list[npt.NDArray[np.int64]], t: int, n: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """``n`` rows round-robin over the classes other than ``t``."""
    pools = [r for c, r in enumerate(by_class) if c != t and len(r)]
    picked = [
        int(pools[i % len(pools)][i // len(pools) % len(pools[i % len(pools)])]) for i in range(n)
    ]
    return rng.permutation(np.asarray(picked, dtype=np.int64))


def _max_margin(
    module: Any,
    shape: tuple[int, ...],
    k: int,
    lo: float,
    hi: float,
    opts: dict[str, Any],
    gen: Any,
    device: str = "cpu",
) -> list[float]:
    """MM-BD: per class, the largest margin found over ``restarts`` starts, all in one batch."""
    import torch

    r = int(opts["restarts"])
    z = torch.randn((k * r, *shape), generator=gen).to(device).requires_grad_(True)
    target = torch.arange(k, device=device).repeat_interleave(r)
    opt = _Adam([z], lr=0.1)
    best = torch.full((k * r,), -math.inf, device=device)
    onehot = torch.nn.functional.one_hot(target, k).bool()
    for _ in range(int(opts["mm_steps"])):
        inp = lo + (hi - lo) * torch.sigmoid(z)
        out = _logits(module, inp)
        own = out[torch.arange(k * r, device=device), target]
        other = out.masked_fill(onehot, -math.inf).max(1).values
        m = own - other
        best = torch.maximum(best, m.detach())
        opt.step(torch.autograd.grad(-m.sum(), [z]))
    return [float(v) for v in best.reshape(k, r).max(1).values.cpu()]


def _mask_search(
    module: Any,
    x: npt.NDArray[np.float32],
    rows: list[npt.NDArray[np.int64]],
    tasks: list[tuple[int, int]],
    lo: float,
    hi: float,
    opts: dict[str, Any],
    gen: Any,
    device: str = "cpu",
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Any, Any, int]:
    """Neural-Cleanse masks for every task at once; the smallest successful L1 per task."""
    import torch

    n_tasks = len(tasks)
    sizes = [len(r) for r in rows]
    inputs = torch.from_numpy(x[np.concatenate(rows)]).to(device)
    owner_np = np.repeat(np.arange(n_tasks), sizes)
    owner = torch.from_numpy(owner_np).to(device)
    row_tasks = [tasks[i] for i in owner_np.tolist()]
    flip = torch.tensor([t == FLIP for _s, t in row_tasks], device=device)
    # A flip row's "target" is its own class, which it must leave.
    target = torch.tensor([s if t == FLIP else t for s, t in row_tasks], device=device)
    shape = x.shape[1:]
    mshape = (1, *shape[1:]) if len(shape) >= 3 else tuple(shape)
    area = float(np.prod(mshape))
    m_logit = torch.empty((n_tasks, *mshape))
    p_logit = torch.empty((n_tasks, *shape))
    # Flip tasks' starts are drawn after the others', so that adding them left every other
    # task's start (and so its result) as it was.
    flips = [i for i, (_s, t) in enumerate(tasks) if t == FLIP]
    for group in ([i for i in range(n_tasks) if i not in set(flips)], flips):
        if group:
            m_logit[group] = torch.randn((len(group), *mshape), generator=gen) * 0.1 - 2.0
            p_logit[group] = torch.randn((len(group), *shape), generator=gen)
    m_logit = m_logit.to(device).requires_grad_(True)
    p_logit = p_logit.to(device).requires_grad_(True)
    opt = _Adam([m_logit, p_logit], lr=0.1)
    lam = torch.full((n_tasks,), 1e-2, device=device)
    best = torch.full((n_tasks,), area, device=device)
    best_asr = torch.zeros(n_tasks, device=device)
    best_mask = torch.sigmoid(m_logit.detach()).clone()
    best_pat = (lo + (hi - lo) * torch.sigmoid(p_logit.detach())).clone()
    counts = torch.bincount(owner, minlength=n_tasks).float()
    steps = int(opts["steps"])
    for step in range(steps):
        mask = torch.sigmoid(m_logit)
        pat = lo + (hi - lo) * torch.sigmoid(p_logit)
        stamped = (1 - mask[owner]) * inputs + mask[owner] * pat[owner]
        out = _logits(module, stamped)
        ce = torch.nn.functional.cross_entropy(out, target, reduction="none")
        # Flip rows: -log P(not own class), i.e. log-sum-exp of the others minus of all.
        others = out.scatter(1, target[:, None], -math.inf).logsumexp(1)
        ce = torch.where(flip, out.logsumexp(1) - others, ce)
        ce_task = torch.zeros(n_tasks, device=device).index_add_(0, owner, ce) / counts
        l1 = mask.reshape(n_tasks, -1).sum(1)
        loss = (ce_task + lam * l1 / area * 10.0).sum()
        hit = ((out.argmax(1) == target) != flip).float().detach()
        asr = torch.zeros(n_tasks, device=device).index_add_(0, owner, hit) / counts
        ok = (asr >= ASR_GOAL) & (l1.detach() < best)
        if bool(ok.any()):
            best = torch.where(ok, l1.detach(), best)
            best_asr = torch.where(ok, asr, best_asr)
            best_mask[ok] = mask.detach()[ok]
            best_pat[ok] = pat.detach()[ok]
        if step % 5 == 4:
            # Neural Cleanse's cost schedule: tighten the mask while it works, relax it
            # while it does not; bounded so a task can always recover.
            lam = torch.where(asr >= ASR_GOAL, lam * 1.5, lam / 1.5).clamp(1e-4, 1e3)
        opt.step(torch.autograd.grad(loss, [m_logit, p_logit]))
    return (
        best.double().cpu().numpy(),
        best_asr.double().cpu().numpy(),
        best_mask.cpu().numpy().astype(np.float32),
        best_pat.cpu().numpy().astype(np.float32),
        steps,
    )


class _Adam:
    """Adam (Kingma & Ba) on a few tensors. Not torch.optim: importing it pulls in
    torch._dynamo, which needs a writable temporary directory the sandbox does not give."""

    def __init__(self, params: list[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        import torch

        self.params, self.lr, self.betas, self.t = params, lr, betas, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads: Any) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1**self.t)
                v_hat = v / (1 - b2**self.t)
                p.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))


def _r(v: float) -> float:
    # Rounded so that report.json does not carry float noise from thread-count-dependent sums.
    return float(f"{float(v):.6g}")

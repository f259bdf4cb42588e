"""Fingerprinting one model on a probe set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gate.activations import ActivationCache, extract_cached
from gate.errors import LayerError, MismatchError, ModelLoadError
from gate.fingerprint.probes import ProbeSet
from gate.fingerprint.representations import fingerprint_blocks
from gate.fingerprint.text_probes import check_text_probes
from gate.models.base import Array, LoadedModel


@dataclass(frozen=True)
class Fingerprint:
    vector: Array
    blocks: tuple[tuple[int, int], ...]
    layer: str
    output_size: int
    outputs: Array  # raw model outputs on the probes, kept for the report


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    if layer is None:
        return model.default_layer()
    if layer not in model.layer_names():
        raise LayerError(f"{model.path}: no layer named {layer!r}; see `gate inspect {model.path}`")
    return layer


def fingerprint(
    model: LoadedModel,
    probes: ProbeSet,
    layer: str,
    representation: tuple[str, ...],
    cache: ActivationCache | None = None,
) -> Fingerprint:
    """The fingerprint of ``model`` on ``probes``; activations go through ``cache`` if given."""
    check_text_probes(model, probes)  # text probes: the model's tokenizer must give the ids
    res = extract_cached(model, probes.x, [layer], probes.sha256, cache)
    acts = res.activations[layer]
    if not np.all(np.isfinite(acts)) or not np.all(np.isfinite(res.outputs)):
        raise LayerError(f"{model.path}: layer {layer!r} produced NaN or infinite activations")
    blocks = fingerprint_blocks(representation, acts, res.outputs)
    return Fingerprint(
        vector=np.concatenate([b.ravel() for b in blocks]).astype(np.float32),
        blocks=tuple((int(b.shape[0]), int(b.shape[1])) for b in blocks),
        layer=layer,
        output_size=int(res.outputs.shape[1]),
        outputs=res.outputs,
    )


def fingerprint_checked(
    model: LoadedModel,
    probes: ProbeSet,
    layer: str,
    rep: tuple[str, ...],
    what: str,
    cache: ActivationCache | None = None,
) -> Fingerprint:
    try:
        return fingerprint(model, probes, layer, rep, cache=cache)
    except ModelLoadError as exc:
        raise MismatchError(
            f"{exc}; the {what} does not accept the probes' input shape "
            f"{list(probes.x.shape[1:])} (another model family?)"
        ) from None

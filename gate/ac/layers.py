"""Which earlier layer the fast ExRe classifier uses by default (rule ``"exre"``).

The rule: **the input of the learned (affine) layer that produces the clustered layer**, i.e.
the representation one learned layer earlier. For the usual ``features -> flatten -> fc ->
relu -> head`` classifier, with the clustered layer being the default (the input of
``head``), that is the flattened ``features`` output; for an MLP it is the previous hidden
layer. Why one learned layer earlier: poison is a source-class input with a trigger, and the
backdoor maps it to its target class late in the network. In the clustered (last hidden)
layer it already sits with its target; one layer earlier it still looks like its source class,
which is what ExRe asks (bench/README.md). Any earlier layer would do that; the nearest one
keeps the most class information, so natural sub-populations of a class are still
recognised as that class.

How it is found: walking back from the clustered layer through the model's layer list
(execution order, as ``gate inspect`` lists it) past activations, normalisation, dropout,
pooling and reshapes to the first affine layer (``Linear``, ``Conv*``, ``aten::linear``,
``addmm``, ``Gemm`` ...), and taking the layer listed just before it. When the clustered
layer is a loader's virtual "input of the last Linear" (state-dict and Hugging Face models),
the walk starts at that Linear. When no affine layer is found within a few steps the answer
is ``None`` and ExRe runs in the clustered layer (weaker; see bench/README.md); ``gate ac
--exre-layer NAME`` always overrides the choice.
"""

from __future__ import annotations

from gate.models import LoadedModel

_AFFINE = (
    "linear",
    "conv",
    "addmm",
    "matmul",
    "gemm",
    "bilinear",
    "einsum",
    "aten::mm",
    "aten::bmm",
)
MAX_WALK = 12  # layers walked back before giving up


def is_affine(kind: str) -> bool:
    k = kind.lower()
    if "input of" in k:  # the virtual penultimate entry ("input of last Linear")
        return False
    return any(a in k for a in _AFFINE)


def default_exre_layer(model: LoadedModel, layer: str) -> str | None:
    """The input of the affine layer that produces ``layer``, or None (see module doc)."""
    names = list(model.layer_names())
    kinds_of = getattr(model, "layer_kinds", None)
    kinds: dict[str, str] = dict(kinds_of()) if callable(kinds_of) else {}
    if layer not in names or not kinds:
        return None
    start = names.index(layer)
    if "input of" in kinds.get(layer, "").lower():
        heads = [i for i, name in enumerate(names) if is_affine(kinds.get(name, ""))]
        if not heads:
            return None
        start = heads[-1]
    for j in range(start - 1, max(start - 1 - MAX_WALK, 0), -1):
        if is_affine(kinds.get(names[j], "")):
            return names[j - 1]
    return None

"""`gate inspect`, `gate demo`, `gate policy show|validate|schema` and `gate completion`:
the commands that print, and write no report."""

from __future__ import annotations

import argparse
from pathlib import Path

from gate.cli.common import h, load_data_arg


def inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from gate.data import TextData, model_input
    from gate.errors import UsageError
    from gate.models import load_model
    from gate.models.base import TextInput

    model = load_model(args.model)
    data = load_data_arg(args.data)
    text = isinstance(model, TextInput)
    if data is not None:
        data = model_input(model, data)  # texts: tokenised by the model's tokenizer
    shape = data.input_shape if data is not None else args.input_shape
    if text and data is None:  # a text model's tokenizer makes its inputs: no shape needed
        if args.input_shape is not None:
            raise UsageError("--input-shape does not apply to a text model; use --data TEXTS.jsonl")
        data = model_input(model, TextData(("gate inspect",), np.zeros(1, np.int64), "(text)"))
        shape = data.input_shape
    print(f"{h(model.path)}  format={model.format}  sha256={model.sha256}")
    if text:
        print(f"  text model: inputs are token ids and attention mask, {shape[-1]} tokens at most")
    names = model.layer_names()
    default = model.default_layer() if _has_default(model) else None
    if shape is None:
        for name in names:
            print(f"  {h(name)}{'  <- default' if name == default else ''}")
        print("(pass --input-shape C,H,W or --data to see output shapes)")
        return 0
    probe = np.zeros((1, *shape), dtype=np.float32) if data is None else data.x[:1]
    from gate.errors import ModelLoadError

    try:
        res = model.forward(probe, names)
    except ModelLoadError as exc:
        hint = "" if text else " (is --input-shape right?)"
        raise UsageError(f"{exc}{hint}") from None
    raw_kinds: dict[str, str] = getattr(model, "layer_kinds", dict)()
    kinds = {h(n): h(k) for n, k in raw_kinds.items()}
    shapes = {h(n): res.activations[n].shape[1:] for n in names}
    default = None if default is None else h(default)
    names = [h(n) for n in names]  # ONNX value names are the model author's text
    width = max((len(n) for n in names), default=10)
    kw = max([24, *(len(kinds.get(n, "")) for n in names)])
    print(f"  {'layer'.ljust(width)}  {'kind'.ljust(kw)}  output shape")
    for name in names:
        shp = "x".join(str(d) for d in shapes[name])
        mark = "  <- default (last hidden layer)" if name == default else ""
        print(f"  {name.ljust(width)}  {kinds.get(name, '').ljust(kw)}  {shp}{mark}")
    out_shape = "x".join(str(d) for d in res.outputs.shape[1:])
    print(f"  {'(output)'.ljust(width)}  {''.ljust(kw)}  {out_shape}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from gate.demo.run import run_demo

    return run_demo(Path(args.workdir))


def policy_show(args: argparse.Namespace) -> int:
    import yaml

    from gate.policy import load_policy

    policy = load_policy(args.name)
    print(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def policy_validate(args: argparse.Namespace) -> int:
    from gate.errors import PolicyError
    from gate.policy import load_policy

    if not Path(args.file).is_file():
        raise PolicyError(f"policy file not found: {args.file}")
    policy = load_policy(args.file)
    print(f"{h(args.file)}: valid policy {h(repr(policy.name))}")
    return 0


def policy_schema(args: argparse.Namespace) -> int:
    from gate.schemas import policy_schema as make_schema
    from gate.schemas import render

    print(render(make_schema()), end="")
    return 0


def _has_default(model: object) -> bool:
    from gate.errors import LayerError

    try:
        model.default_layer()  # type: ignore[attr-defined]
    except LayerError:
        return False
    return True


def completion(args: argparse.Namespace) -> int:
    """A static completion script from the parser itself (shtab): imported only here, so
    that it costs `gate --help` nothing."""
    import shtab

    from gate.cli.parser import build_parser

    parser = build_parser()
    script = shtab.complete(parser, shell=args.shell)
    print(script, end="" if script.endswith("\n") else "\n")
    return 0

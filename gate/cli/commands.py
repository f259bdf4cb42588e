"""Subcommand handlers. Each returns an exit code; only this layer writes files or prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# GitHub's workflow commands and step files (gate.cli.github), re-exported for callers.
from gate.cli.github import STEP_SUMMARY_LIMIT as STEP_SUMMARY_LIMIT
from gate.cli.github import _append_outputs as _append_outputs
from gate.cli.github import _append_step_summary as _append_step_summary
from gate.cli.github import _escape_data as _escape_data
from gate.cli.github import _escape_property as _escape_property
from gate.cli.github import github_annotations, github_outputs
from gate.cli.reportdir import ReportWrite as _ReportWrite
from gate.cli.reportdir import check_report_dir

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from gate.ac.options import ACOptions
    from gate.activations import ActivationCache
    from gate.data import Dataset
    from gate.fingerprint.baseline import Baseline, BaselineManifest
    from gate.policy.model import Policy
    from gate.report.schema import Report


def _h(text: object) -> str:
    """Untrusted text (paths, layer names) for a printed line: see gate.report.escape."""
    from gate.report.escape import human

    return human(text)


def baseline_build(args: argparse.Namespace) -> int:
    from gate.fingerprint.baseline import check_output_dir, save_shard
    from gate.fingerprint.build import (
        DEFAULT_REPRESENTATION,
        build_baseline,
        build_baseline_shard,
    )

    check_output_dir(Path(args.out), shard=args.shard is not None)  # before the slow part
    data = _load_data(args.data)
    options = {
        "data": data,
        "input_shape": args.input_shape,
        "layer": args.layer,
        "seed": args.seed,
        "representation": args.representation or DEFAULT_REPRESENTATION,
        "cache": _cache(args),
        "quiet": args.quiet,
    }
    if getattr(args, "trigger_search", False):
        from gate.trigger.report import budget_options

        options["trigger_options"] = budget_options(args.trigger_budget)
    out = Path(args.out)
    if args.shard is not None:
        shard = build_baseline_shard(args.models, args.shard, **options)
        save_shard(out, shard.manifest, shard.fingerprints, shard.probes)
        sm = shard.manifest
        print(
            f"baseline shard {sm.shard}/{sm.shard_count} written to {_h(out)}: "
            f"{len(sm.references)} of {sm.total_references} references; "
            "combine the shards with `gate baseline merge`"
        )
        return 0
    built = build_baseline(args.models, **options)
    built.save(out)
    _report_baseline(out, built.manifest)
    return 0


def baseline_merge(args: argparse.Namespace) -> int:
    from gate.fingerprint.baseline import check_output_dir, load_shard
    from gate.fingerprint.build import merge_baseline_shards

    check_output_dir(Path(args.out))
    built = merge_baseline_shards([load_shard(d) for d in args.shards])
    out = Path(args.out)
    built.save(out)
    _report_baseline(out, built.manifest)
    return 0


def _report_baseline(out: Path, m: BaselineManifest) -> None:
    print(
        f"baseline written to {_h(out)}: {len(m.references)} references, "
        f"layer {_h(repr(m.layer))}, representation {m.representation}, {m.probes.count} probes"
    )
    if len(m.references) < 10:
        print(
            f"gate: warning: only {len(m.references)} references; 10 or more give sharper p-values",
            file=sys.stderr,
        )


def _cache(args: argparse.Namespace) -> ActivationCache | None:
    if getattr(args, "no_cache", False):
        return None
    from gate.activations import ActivationCache

    # The default lives in the user's cache directory, not the working directory; entries
    # are keyed and authenticated with a secret kept there (README, "Threat model").
    return ActivationCache.open(getattr(args, "cache_dir", None))


def baseline_show(args: argparse.Namespace) -> int:
    from gate.fingerprint.baseline import load_baseline

    baseline = load_baseline(args.dir)
    print(json.dumps(baseline.manifest.model_dump(mode="json"), indent=2, sort_keys=True))
    return 0


def scan(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from gate.fingerprint.baseline import load_baseline
    from gate.policy import load_policy
    from gate.report.formats import parse_formats

    policy = load_policy(args.policy)
    if args.fail_alpha is not None:
        policy = _with_fail_alpha(policy, args.fail_alpha)
    formats = parse_formats(args.format)
    check_report_dir(Path(args.report_dir))  # before the slow part
    if args.baseline is None and args.data is None and args.input_shape is None:
        from gate.errors import UsageError

        raise UsageError(
            "give --baseline DIR, or --data DATA.npz / --input-shape C,H,W for the trigger "
            "search without a baseline"
        )
    if args.baseline is None and args.trigger_search == "off":
        from gate.errors import UsageError

        raise UsageError("--trigger-search off needs --baseline: nothing else would run")
    baseline = load_baseline(args.baseline) if args.baseline is not None else None
    data = _load_data(args.data)
    shape = getattr(data, "input_shape", None)
    if args.input_shape is not None and shape is not None and tuple(args.input_shape) != shape:
        from gate.errors import UsageError

        raise UsageError(
            f"--input-shape {','.join(map(str, args.input_shape))} contradicts --data's shape "
            f"{','.join(map(str, shape))}"
        )
    from gate.trigger.report import TriggerRequest, budget_options

    budget_options(args.trigger_budget)  # a bad budget fails before the slow part
    args.trigger_request = TriggerRequest(
        mode=args.trigger_search, budget=args.trigger_budget, input_shape=args.input_shape
    )
    from gate.ac.options import ACOptions

    pictures: dict[int, bytes] = {}
    ac_options = ACOptions(threads=_threads(args), quiet=args.quiet, pictures=pictures)
    report, timings, cache, report_dir = _run_and_report(
        args, baseline, data, policy, formats, ac_options, pictures, started
    )
    _write_timing(report_dir, timings, started, cache)
    return 1 if report.verdict == "fail" else 0


def _write_timing(
    report_dir: Path,
    timings: dict[str, float],
    started: float,
    cache: ActivationCache | None,
    order: tuple[str, ...] = (
        "setup", "load", "extract", "detect", "ac", "trigger_search", "report"
    ),
) -> None:
    """timing.json: wall seconds per stage. Kept out of report.json, which is deterministic."""
    from gate._io import write_text_atomic

    seconds = {k: round(timings.get(k, 0.0), 4) for k in order}
    doc = {
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 4)},
        "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        "threads": _torch_threads(),
    }
    with _ReportWrite(report_dir):
        write_text_atomic(report_dir / "timing.json", json.dumps(doc, indent=2) + "\n")


def _threads(args: argparse.Namespace) -> int | None:
    value = getattr(args, "threads", None) or getattr(args, "global_threads", None)
    return int(value) if value else None


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def ac(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from gate.policy import load_policy
    from gate.report.formats import parse_formats

    policy = load_policy(args.policy)
    formats = parse_formats(args.format)
    # `gate ac` is a scan with activation clustering only: fingerprinting is not asked for.
    policy = policy.model_copy(update={"required_checks": ("activation_clustering",)})
    check_report_dir(Path(args.report_dir))  # before the slow part
    data = _load_data(args.data)
    from gate.ac.options import ACOptions, load_hook, parse_class_selection

    pictures: dict[int, bytes] = {}
    relabels: dict[int, int] = {}
    options = ACOptions(
        relabels=relabels,
        reduction=args.reduction,
        segment_by=args.segment_by,
        pool=args.pool,
        detector=args.detector,
        exre_threshold=args.exre_threshold,
        exre_layer=args.exre_layer,
        exre_hook=load_hook(args.exre_hook) if args.exre_hook else None,
        threads=_threads(args),
        quiet=args.quiet,
        pictures=pictures,
        classes=parse_class_selection(args.classes) if args.classes else None,
    )
    report, timings, cache, report_dir = _run_and_report(
        args, None, data, policy, formats, options, pictures, started
    )
    with _ReportWrite(report_dir):
        _write_repaired(report, report_dir, data, relabels, args.repair)
    timings["extract"], timings["cluster"] = timings["ac_extract"], timings["ac_cluster"]
    order = ("setup", "load", "extract", "cluster", "report")
    _write_timing(report_dir, timings, started, cache, order)
    return 1 if report.verdict == "fail" else 0


def _write_repaired(
    report: Report, report_dir: Path, data: object, relabels: dict[int, int], mode: str
) -> None:
    """repaired.npz (or repaired.jsonl for text data): the training set with the suspicious
    rows relabelled as ExRe decides, or dropped (``--repair``)."""
    from gate._io import write_bytes_atomic, write_text_atomic
    from gate.ac.outputs import repaired_jsonl, repaired_npz
    from gate.data import Dataset, TextData

    ac = report.activation_clustering
    if ac is None or mode == "none":
        return
    if isinstance(data, Dataset):
        npz = repaired_npz(data.x, data.y, ac, relabels, mode)
        write_bytes_atomic(report_dir / "repaired.npz", npz)
    elif isinstance(data, TextData):
        text = repaired_jsonl(data.texts, data.y, ac, relabels, mode)
        write_text_atomic(report_dir / "repaired.jsonl", text)


def ac_merge(args: argparse.Namespace) -> int:
    import shutil

    from gate.ac.merge import merge_parts, read_part
    from gate.errors import UsageError
    from gate.policy import load_policy
    from gate.report.formats import parse_formats

    policy = load_policy(args.policy)
    policy = policy.model_copy(update={"required_checks": ("activation_clustering",)})
    formats = parse_formats(args.format)
    report_dir = Path(args.report_dir)
    if any(Path(p).resolve() == report_dir.resolve() for p in args.parts):
        raise UsageError(f"--report-dir {report_dir} is one of the parts; pick a new directory")
    check_report_dir(report_dir)
    report = merge_parts([(p, read_part(p)) for p in args.parts], policy)
    with _ReportWrite(report_dir):
        _emit(report, formats, report_dir, quiet=args.quiet)
        write_ac_files(report, report_dir)
        # Pictures were drawn by the job that clustered the class: carry them over.
        for part in args.parts:
            for png in sorted(Path(part).glob("ac-class-*.png")):
                shutil.copyfile(png, report_dir / png.name)
    return 1 if report.verdict == "fail" else 0


def _policy_timeout(args: argparse.Namespace, policy: Policy) -> AbstractContextManager[object]:
    """The policy's ``timeout_seconds`` for the model's sandbox, unless --timeout was given."""
    import contextlib

    if getattr(args, "timeout", None) is not None:
        return contextlib.nullcontext()
    from gate.sandbox import current_options, use_sandbox

    return use_sandbox(dataclasses.replace(current_options(), timeout=policy.timeout_seconds))


def _run_and_report(
    args: argparse.Namespace,
    baseline: Baseline | None,
    data: Dataset | None,
    policy: Policy,
    formats: list,  # type: ignore[type-arg]
    ac_options: ACOptions,
    pictures: dict[int, bytes],
    started: float,
) -> tuple[Report, dict[str, float], ActivationCache | None, Path]:
    """The part `gate scan` and `gate ac` share: run, then write every report file."""
    from gate.scan import scan as run_scan

    timings: dict[str, float] = {"setup": time.perf_counter() - started}
    cache = _cache(args)
    with _policy_timeout(args, policy):
        report = run_scan(
            args.model,
            baseline,
            data,
            policy,
            layer=args.layer,
            seed=args.seed,
            cache=cache,
            timings=timings,
            ac_options=ac_options,
            trigger=getattr(args, "trigger_request", None),
        )
    t_report = time.perf_counter()
    report_dir = Path(args.report_dir)
    with _ReportWrite(report_dir):
        _emit(report, formats, report_dir, quiet=args.quiet)
        write_ac_files(report, report_dir, data, pictures)
        request = getattr(args, "trigger_request", None)
        if request is not None:
            from gate._io import write_bytes_atomic

            for name, png in sorted(request.pictures.items()):
                write_bytes_atomic(report_dir / name, png)
    timings["report"] = time.perf_counter() - t_report
    return report, timings, cache, report_dir


def write_ac_files(
    report: Report, report_dir: Path, data: object = None, pictures: dict[int, bytes] | None = None
) -> None:
    """suspicious.csv, clean_indices.npy and per flagged class a cluster picture and (image
    inputs) a mosaic of its suspicious samples, or (text data) a list of its suspicious texts."""
    from gate._io import write_bytes_atomic, write_text_atomic
    from gate.ac.outputs import clean_indices_npy, suspicious_csv, suspicious_texts
    from gate.data import TextData

    if report.activation_clustering is None:
        return
    write_text_atomic(report_dir / "suspicious.csv", suspicious_csv(report.activation_clustering))
    npy = clean_indices_npy(report.activation_clustering)
    write_bytes_atomic(report_dir / "clean_indices.npy", npy)
    import numpy as np

    from gate.ac.pictures import suspicious_mosaic

    x = getattr(data, "x", None)
    for c in report.activation_clustering.classes:
        if c.flagged and isinstance(data, TextData):
            text = suspicious_texts(data.texts, c.suspicious_indices, c.label)
            write_text_atomic(report_dir / f"ac-class-{c.label}-suspicious.txt", text)
        if c.flagged and pictures and c.label in pictures:
            write_bytes_atomic(report_dir / f"ac-class-{c.label}-clusters.png", pictures[c.label])
        png = (
            suspicious_mosaic(x, c.suspicious_indices)
            if c.flagged and isinstance(x, np.ndarray)
            else None
        )
        if png is not None:
            write_bytes_atomic(report_dir / f"ac-class-{c.label}-suspicious.png", png)


def inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from gate.data import TextData, model_input
    from gate.errors import UsageError
    from gate.models import load_model
    from gate.models.base import TextInput

    model = load_model(args.model)
    data = _load_data(args.data)
    text = isinstance(model, TextInput)
    if data is not None:
        data = model_input(model, data)  # texts: tokenised by the model's tokenizer
    shape = data.input_shape if data is not None else args.input_shape
    if text and data is None:  # a text model's tokenizer makes its inputs: no shape needed
        if args.input_shape is not None:
            raise UsageError("--input-shape does not apply to a text model; use --data TEXTS.jsonl")
        data = model_input(model, TextData(("gate inspect",), np.zeros(1, np.int64), "(text)"))
        shape = data.input_shape
    print(f"{_h(model.path)}  format={model.format}  sha256={model.sha256}")
    if text:
        print(f"  text model: inputs are token ids and attention mask, {shape[-1]} tokens at most")
    names = model.layer_names()
    default = model.default_layer() if _has_default(model) else None
    if shape is None:
        for name in names:
            print(f"  {_h(name)}{'  <- default' if name == default else ''}")
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
    kinds = {_h(n): _h(k) for n, k in raw_kinds.items()}
    shapes = {_h(n): res.activations[n].shape[1:] for n in names}
    default = None if default is None else _h(default)
    names = [_h(n) for n in names]  # ONNX value names are the model author's text
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
    print(f"{_h(args.file)}: valid policy {_h(repr(policy.name))}")
    return 0


def policy_schema(args: argparse.Namespace) -> int:
    from gate.schemas import policy_schema as make_schema
    from gate.schemas import render

    print(render(make_schema()), end="")
    return 0


def _with_fail_alpha(policy: Policy, fail_alpha: float) -> Policy:
    """The policy with fingerprint.fail_alpha replaced (warn_alpha raised to it if lower)."""
    from gate.policy.model import FingerprintPolicy

    fp = policy.fingerprint
    updated = FingerprintPolicy.model_validate(
        {
            **fp.model_dump(),
            "fail_alpha": fail_alpha,
            "warn_alpha": max(fp.warn_alpha, fail_alpha),
        }
    )
    return policy.model_copy(update={"fingerprint": updated})


def _has_default(model: object) -> bool:
    from gate.errors import LayerError

    try:
        model.default_layer()  # type: ignore[attr-defined]
    except LayerError:
        return False
    return True


def _load_data(path: str | None):  # type: ignore[no-untyped-def]
    if not path:  # None, or an empty CI input
        return None
    from gate.data import load_data

    return load_data(path)


def write_reports(report: Report, formats: list, report_dir: Path) -> list[Path]:  # type: ignore[type-arg]
    from gate._io import write_text_atomic

    written = []
    for fmt in formats:
        path = report_dir / fmt.filename
        write_text_atomic(path, fmt.render(report))
        written.append(path)
    return written


def _emit(report: Report, formats: list, report_dir: Path, quiet: bool) -> None:  # type: ignore[type-arg]
    from gate.report.escape import emit_workflow_commands
    from gate.report.formats import FORMATS

    written = write_reports(report, formats, report_dir)
    summary = FORMATS["markdown"].render(report)  # names in it are escaped
    if not quiet:
        print(summary)
        print(f"reports: {', '.join(_h(p) for p in written)}")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        # Outside the run's ::stop-commands:: wrap, so that GitHub acts on them.
        emit_workflow_commands(github_annotations(report))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    try:
        if step_summary:
            _append_step_summary(Path(step_summary), summary)
        output = os.environ.get("GITHUB_OUTPUT")
        if output:
            _append_outputs(Path(output), github_outputs(report, report_dir))
    except OSError as exc:
        from gate.errors import UsageError

        raise UsageError(f"cannot append to GitHub's step files: {exc.strerror or exc}") from None

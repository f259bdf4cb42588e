"""`gate scan`, `gate ac` and `gate ac-merge`: the commands that write a report. Each
returns an exit code; the report reaches the disk and the CI through gate.cli.publish."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gate.cli.common import cache_from_args, load_data_arg, threads_from_args
from gate.cli.publish import Destination, emit, resolve_formats, write_files
from gate.cli.reportdir import check_report_dir

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from gate.ac.options import ACOptions
    from gate.activations import ActivationCache
    from gate.data import Dataset, TextData
    from gate.fingerprint.baseline import Baseline
    from gate.policy.model import Policy
    from gate.report.formats import Format
    from gate.report.schema import Report


def scan(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from gate.errors import UsageError
    from gate.fingerprint.baseline import load_baseline
    from gate.policy import load_policy

    policy = load_policy(args.policy)
    if args.fail_alpha is not None:
        policy = _with_fail_alpha(policy, args.fail_alpha)
    formats = resolve_formats(args.format, args.output)
    check_report_dir(Path(args.report_dir))  # before the slow part
    if args.baseline is None and args.data is None and args.input_shape is None:
        raise UsageError(
            "give --baseline DIR, or --data DATA.npz / --input-shape C,H,W for the trigger "
            "search without a baseline"
        )
    if args.baseline is None and args.trigger_search == "off":
        raise UsageError("--trigger-search off needs --baseline: nothing else would run")
    baseline = load_baseline(args.baseline) if args.baseline is not None else None
    data = load_data_arg(args.data)
    shape = getattr(data, "input_shape", None)
    if args.input_shape is not None and shape is not None and tuple(args.input_shape) != shape:
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
    ac_options = ACOptions(threads=threads_from_args(args), quiet=args.quiet, pictures=pictures)
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
    seconds = {k: round(timings.get(k, 0.0), 4) for k in order}
    doc = {
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 4)},
        "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        "threads": _torch_threads(),
    }
    write_files(report_dir, {"timing.json": (json.dumps(doc, indent=2) + "\n").encode()})


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def ac(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from gate.policy import load_policy

    policy = load_policy(args.policy)
    formats = resolve_formats(args.format, args.output)
    # `gate ac` is a scan with activation clustering only: fingerprinting is not asked for.
    policy = policy.model_copy(update={"required_checks": ("activation_clustering",)})
    check_report_dir(Path(args.report_dir))  # before the slow part
    data = load_data_arg(args.data)
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
        threads=threads_from_args(args),
        quiet=args.quiet,
        pictures=pictures,
        classes=parse_class_selection(args.classes) if args.classes else None,
    )
    report, timings, cache, report_dir = _run_and_report(
        args, None, data, policy, formats, options, pictures, started
    )
    from gate.report.files import repaired_files

    write_files(report_dir, repaired_files(report, data, relabels, args.repair))
    timings["extract"], timings["cluster"] = timings["ac_extract"], timings["ac_cluster"]
    order = ("setup", "load", "extract", "cluster", "report")
    _write_timing(report_dir, timings, started, cache, order)
    return 1 if report.verdict == "fail" else 0


def ac_merge(args: argparse.Namespace) -> int:
    from gate.ac.merge import merge_parts, read_part
    from gate.errors import UsageError
    from gate.policy import load_policy
    from gate.report.files import ac_files

    policy = load_policy(args.policy)
    policy = policy.model_copy(update={"required_checks": ("activation_clustering",)})
    formats = resolve_formats(args.format, args.output)
    report_dir = Path(args.report_dir)
    if any(Path(p).resolve() == report_dir.resolve() for p in args.parts):
        raise UsageError(f"--report-dir {report_dir} is one of the parts; pick a new directory")
    check_report_dir(report_dir)
    report = merge_parts([(p, read_part(p)) for p in args.parts], policy)
    files = ac_files(report)
    # Pictures were drawn by the job that clustered the class: carry them over.
    for part in args.parts:
        for png in sorted(Path(part).glob("ac-class-*.png")):
            files[png.name] = png.read_bytes()
    emit(report, formats, Destination(report_dir, args.output), files, quiet=args.quiet)
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
    data: Dataset | TextData | None,
    policy: Policy,
    formats: list[Format],
    ac_options: ACOptions,
    pictures: dict[int, bytes],
    started: float,
) -> tuple[Report, dict[str, float], ActivationCache | None, Path]:
    """The part `gate scan` and `gate ac` share: run, then write every report file."""
    from gate.report.files import ac_files
    from gate.scan import scan as run_scan

    timings: dict[str, float] = {"setup": time.perf_counter() - started}
    cache = cache_from_args(args)
    request = getattr(args, "trigger_request", None)
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
            trigger=request,
        )
    t_report = time.perf_counter()
    report_dir = Path(args.report_dir)
    files = ac_files(report, data, pictures)
    if request is not None:
        files.update(sorted(request.pictures.items()))
    emit(report, formats, Destination(report_dir, args.output), files, quiet=args.quiet)
    timings["report"] = time.perf_counter() - t_report
    return report, timings, cache, report_dir


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

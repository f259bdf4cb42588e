"""`gate baseline build|merge|show`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.cli.common import cache_from_args, h, load_data_arg

if TYPE_CHECKING:
    from gate.fingerprint.baseline import BaselineManifest


def baseline_build(args: argparse.Namespace) -> int:
    from gate.fingerprint.baseline import check_output_dir, save_shard
    from gate.fingerprint.build import (
        DEFAULT_REPRESENTATION,
        build_baseline,
        build_baseline_shard,
    )

    check_output_dir(Path(args.out), shard=args.shard is not None)  # before the slow part
    data = load_data_arg(args.data)
    options: dict[str, Any] = {
        "data": data,
        "input_shape": args.input_shape,
        "layer": args.layer,
        "seed": args.seed,
        "representation": args.representation or DEFAULT_REPRESENTATION,
        "cache": cache_from_args(args),
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
            f"baseline shard {sm.shard}/{sm.shard_count} written to {h(out)}: "
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
        f"baseline written to {h(out)}: {len(m.references)} references, "
        f"layer {h(repr(m.layer))}, representation {m.representation}, {m.probes.count} probes"
    )
    if len(m.references) < 10:
        print(
            f"gate: warning: only {len(m.references)} references; 10 or more give sharper p-values",
            file=sys.stderr,
        )


def baseline_show(args: argparse.Namespace) -> int:
    from gate.fingerprint.baseline import load_baseline

    baseline = load_baseline(args.dir)
    print(json.dumps(baseline.manifest.model_dump(mode="json"), indent=2, sort_keys=True))
    return 0

"""The argument parser. Only argparse here: handlers import the heavy modules lazily."""

from __future__ import annotations

import argparse

from gate._version import __version__
from gate.cli import baseline_commands, commands, info_commands

DEFAULT_REPORT_DIR = "gate-report"


def _shape(text: str) -> tuple[int, ...] | None:
    if not text.strip():
        return None  # empty counts as not given (CI templates pass '--input-shape=')
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,8,8, got {text!r}"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return dims


def _optional(text: str) -> str | None:
    """An option given as an empty string counts as not given (CI templates pass '--data=')."""
    return text.strip() or None


def _report_dir(text: str) -> str:
    return text.strip() or DEFAULT_REPORT_DIR


def _alpha(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text!r}")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N like 2/4, got {text!r}") from None
    if count < 1 or not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return index, count


def _threads(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _add_perf_options(p: argparse.ArgumentParser) -> None:
    """--threads, --cache-dir and --no-cache, shared by scan and baseline build."""
    p.add_argument(
        "--threads",
        type=_threads,
        metavar="N",
        help="CPU threads for torch and BLAS/OpenMP (default: their own default)",
    )
    p.add_argument(
        "--cache-dir",
        type=_optional,
        default=None,
        metavar="DIR",
        help="activation cache (default: ~/.cache/gate/activations; README: Threat model)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 604800 seconds, got {text!r}")
    return value


def _megabytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, got {text!r}") from None
    if value < 0 or (0 < value < 256):
        raise argparse.ArgumentTypeError(f"must be 0 (no cap) or at least 256 MiB, got {text!r}")
    return value


def _add_sandbox_options(p: argparse.ArgumentParser) -> None:
    """--timeout, --memory-limit and --device: the sandboxed process that runs the model."""
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wall-clock limit for each model's sandboxed process (default: the policy's "
        "timeout_seconds, 900)",
    )
    p.add_argument(
        "--memory-limit",
        type=_megabytes,
        default=None,
        metavar="MIB",
        help="address-space cap of the model's process (default: physical memory; 0: none)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where forward passes and the trigger search run: cpu (default, the reference), "
        "auto (a GPU when one is present), cuda, cuda:N or mps",
    )


def _add_trigger_options(p: argparse.ArgumentParser, build: bool = False) -> None:
    """The trigger search's options (gate/trigger): scan and baseline build."""
    if build:
        p.add_argument(
            "--trigger-search",
            action="store_true",
            help="also run the trigger search on every reference and store its scores, so "
            "that scans against this baseline compare each class with the references' same class",
        )
    else:
        p.add_argument(
            "--trigger-search",
            choices=("auto", "on", "off"),
            default="auto",
            help="auto (default): run it without --baseline, or with a baseline built with "
            "--trigger-search; on: always; off: never",
        )
    p.add_argument(
        "--trigger-budget",
        type=_optional,  # checked by the command: a bad value is a one-line error
        metavar="STEPS",
        help="bound the trigger search: STEPS mask-search steps, 2/3 of that for the "
        "max-margin search (default 150)",
    )


def _add_arch_options(p: argparse.ArgumentParser) -> None:
    """--arch and --arch-kwargs: the architecture for weights-only model files."""
    p.add_argument(
        "--arch",
        type=_optional,
        metavar="MODULE:CLASS",
        help="model class (a trusted import path from your code) for state_dict and "
        "safetensors files",
    )
    p.add_argument(
        "--arch-kwargs",
        type=_optional,
        metavar="JSON",
        help="keyword arguments for the --arch class, as a JSON object",
    )


_MODEL_HELP = "the model: a TorchScript, state_dict, safetensors or ONNX file, or a HF directory"
_SEED_HELP = "random seed (default: 0); the same inputs and seed give the same report"


def _add_report_options(p: argparse.ArgumentParser) -> None:
    """--report-dir, --format, -o/--output and --quiet: scan, ac and ac-merge."""
    p.add_argument(
        "--report-dir",
        type=_report_dir,
        default=DEFAULT_REPORT_DIR,
        metavar="DIR",
        help=f"directory for the reports and their side files (default: {DEFAULT_REPORT_DIR})",
    )
    p.add_argument(
        "--format",
        type=_optional,
        default=None,
        metavar="FMT[,FMT]",
        help="report formats: markdown, json, sarif, junit, codequality (default: "
        "markdown,json; with -o: json)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=_optional,
        default=None,
        metavar="FILE",
        help="write the one --format to FILE instead of --report-dir ('-': stdout, the "
        "summary then goes to stderr); other files still go to --report-dir",
    )
    p.add_argument("--quiet", action="store_true", help="print neither the summary nor progress")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gate",
        description="Block backdoored ML models in CI by inspecting their activations.",
        epilog="Exit codes: 0 pass or warn, 1 policy failure, 2 usage or tool error.",
    )
    p.add_argument("--version", action="version", version=f"gate {__version__}")
    p.add_argument(
        "--threads",
        dest="global_threads",
        type=_threads,
        metavar="N",
        help="CPU threads for torch and BLAS/OpenMP, for any command",
    )
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    bl = sub.add_parser("baseline", help="build or show a baseline of known-clean models")
    blsub = bl.add_subparsers(title="baseline commands", metavar="COMMAND")
    build = blsub.add_parser(
        "build", help="fingerprint known-clean models into a baseline directory"
    )
    build.add_argument("models", nargs="+", metavar="MODEL", help="known-clean model files")
    build.add_argument("--out", required=True, metavar="DIR", help="baseline directory to write")
    build.add_argument(
        "--data",
        metavar="DATA",
        help="take real probes from this data set (.npz; JSONL text/label lines for text models)",
    )
    build.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="per-sample input shape for synthetic probes (when no --data)",
    )
    build.add_argument(
        "--layer", metavar="NAME", help="layer to fingerprint (default: last hidden)"
    )
    build.add_argument(
        "--representation",
        default=None,
        metavar="REP",
        help="raw, logits, gram, or a '+' combination (default: logits)",
    )
    build.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    build.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="fingerprint only slice I (1-based) of N of the models, in order, into a shard "
        "directory; combine the N shards with `gate baseline merge`",
    )
    build.add_argument("--quiet", action="store_true", help="no progress output")
    _add_trigger_options(build, build=True)
    _add_perf_options(build)
    _add_arch_options(build)
    _add_sandbox_options(build)
    build.set_defaults(handler=baseline_commands.baseline_build)
    merge = blsub.add_parser(
        "merge", help="combine the shards of `baseline build --shard` into one baseline"
    )
    merge.add_argument(
        "shards", nargs="+", metavar="SHARD_DIR", help="shard directories, all N of them"
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="baseline directory to write")
    merge.set_defaults(handler=baseline_commands.baseline_merge)
    show = blsub.add_parser("show", help="print a baseline's manifest")
    show.add_argument("dir", metavar="DIR", help="baseline directory")
    show.set_defaults(handler=baseline_commands.baseline_show)

    scan = sub.add_parser(
        "scan", help="scan a candidate model against a baseline and apply a policy"
    )
    scan.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    scan.add_argument(
        "--baseline",
        type=_optional,
        metavar="DIR",
        help="baseline of known-clean models; without it the trigger search (a within-model "
        "null) decides, on --data or --input-shape inputs",
    )
    scan.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="per-sample input shape for the trigger search without --data (inputs in [0, 1])",
    )
    scan.add_argument(
        "--data",
        type=_optional,
        metavar="DATA",
        help="training data (.npz, or JSONL for text models): also run activation clustering "
        "(an empty value means none)",
    )
    scan.add_argument(
        "--policy",
        type=_optional,
        metavar="NAME_OR_FILE",
        help="shipped policy name or YAML file (default: default)",
    )
    scan.add_argument(
        "--fail-alpha",
        type=_alpha,
        metavar="ALPHA",
        help="override the policy's fingerprint.fail_alpha (in (0, 1); warn_alpha is raised "
        "to it if lower)",
    )
    _add_report_options(scan)
    scan.add_argument(
        "--layer", type=_optional, metavar="NAME", help="layer for activation clustering"
    )
    scan.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    _add_trigger_options(scan)
    _add_perf_options(scan)
    _add_arch_options(scan)
    _add_sandbox_options(scan)
    scan.set_defaults(handler=commands.scan)

    ac = sub.add_parser("ac", help="per-class activation clustering on a training set")
    ac.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    ac.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help=".npz with x and y, or JSONL lines with text and label (text models)",
    )
    ac.add_argument(
        "--policy",
        metavar="NAME_OR_FILE",
        help="shipped policy name or YAML file for the activation_clustering rule "
        "(default: default)",
    )
    _add_report_options(ac)
    ac.add_argument(
        "--layer", metavar="NAME", help="layer to cluster (default: the last hidden layer)"
    )
    ac.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    ac.add_argument(
        "--reduction",
        choices=("ica", "pca"),
        default="pca",
        help="dimension reduction before k-means (default: pca)",
    )
    ac.add_argument(
        "--segment-by",
        choices=("label", "predicted"),
        default="label",
        help="split the data by its labels (default) or by the model's predictions",
    )
    ac.add_argument("--pool", action="store_true", help="global-average-pool conv maps")
    ac.add_argument(
        "--detector",
        choices=("ac", "spectral", "either"),
        default="ac",
        help="which opinion flags a class (both are always reported)",
    )
    ac.add_argument(
        "--exre-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="also require ExRe l/p < T to flag (0: report only)",
    )
    ac.add_argument("--exre-layer", metavar="NAME", help="layer the fast ExRe classifier uses")
    ac.add_argument(
        "--exre-hook",
        metavar="MODULE:FUNCTION",
        help="full ExRe: f(x_train, y_train, x_cluster) -> labels (a trusted import path)",
    )
    ac.add_argument(
        "--repair",
        choices=("relabel", "drop", "none"),
        default="relabel",
        help="repaired.npz: suspicious rows relabelled to the class ExRe puts them in "
        "(default), dropped, or no repaired.npz",
    )
    ac.add_argument(
        "--classes",
        metavar="LABELS|I/N",
        help="cluster only these classes (0,3,7) or shard I of N of the labels present; "
        "combine the parts with `gate ac-merge`",
    )
    _add_perf_options(ac)
    _add_arch_options(ac)
    _add_sandbox_options(ac)
    ac.set_defaults(handler=commands.ac)

    ac_merge = sub.add_parser(
        "ac-merge", help="combine the report dirs of `gate ac --classes` jobs into one report"
    )
    ac_merge.add_argument(
        "parts", nargs="+", metavar="PART_DIR", help="report dirs of `gate ac --classes` jobs"
    )
    ac_merge.add_argument("--policy", metavar="NAME_OR_FILE", help="the parts' policy")
    _add_report_options(ac_merge)
    ac_merge.set_defaults(handler=commands.ac_merge)

    inspect = sub.add_parser("inspect", help="list a model's layers and their output shapes")
    inspect.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    inspect.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="per-sample input shape, to run the model once and show output shapes",
    )
    inspect.add_argument(
        "--data", metavar="DATA", help="take the input shape (text models: a text) from this data"
    )
    _add_arch_options(inspect)
    _add_sandbox_options(inspect)
    inspect.set_defaults(handler=info_commands.inspect)

    demo = sub.add_parser(
        "demo", help="train a digits model family, build a baseline, scan two candidates"
    )
    demo.add_argument(
        "--workdir",
        default=".gate-cache/demo",
        metavar="DIR",
        help="where trained models and reports are cached",
    )
    demo.set_defaults(handler=info_commands.demo)

    pol = sub.add_parser("policy", help="show or validate policies")
    polsub = pol.add_subparsers(title="policy commands", metavar="COMMAND")
    pshow = polsub.add_parser("show", help="print a policy with every default filled in")
    pshow.add_argument(
        "name",
        nargs="?",
        default="default",
        metavar="NAME_OR_FILE",
        help="shipped policy name or YAML file (default: default)",
    )
    pshow.set_defaults(handler=info_commands.policy_show)
    pval = polsub.add_parser("validate", help="check a policy file")
    pval.add_argument("file", metavar="FILE", help="policy YAML file")
    pval.set_defaults(handler=info_commands.policy_validate)
    pschema = polsub.add_parser("schema", help="print the policy JSON Schema")
    pschema.set_defaults(handler=info_commands.policy_schema)

    comp = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh or tcsh)"
    )
    comp.add_argument(
        "shell",
        choices=("bash", "zsh", "tcsh"),
        help="the shell; e.g. `gate completion bash > /etc/bash_completion.d/gate`",
    )
    comp.set_defaults(handler=info_commands.completion)
    return p

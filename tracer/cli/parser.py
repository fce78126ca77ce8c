"""The `tracer` command line's arguments. Importing this loads no torch: `tracer --help` is fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from tracer.interventions.modes import MODES
from tracer.zoo.config import KINDS

DTYPES = ("float32", "bfloat16", "float64")
ADJACENCY_DTYPES = ("float32", "float16", "bfloat16")


def _checked(name: str, cast: type, valid, what: str):
    """An argparse type: `cast` the text, then require `valid(value)`; errors say what is valid."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {value}")
        return value

    return parse


def fraction(name: str):
    return _checked(name, float, lambda value: 0 <= value <= 1, "in [0, 1]")


def positive(name: str):
    return _checked(name, int, lambda value: value >= 1, "an integer >= 1")


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def _model_options(prompt_required: bool = True) -> argparse.ArgumentParser:
    """--model, --transcoders, --prompt: what a replacement model and a prompt need."""
    parent = _parent()
    parent.add_argument("--model", required=True, help="model folder or hub id")
    parent.add_argument("--transcoders", required=True, help="transcoder folder or hf:// URI")
    if prompt_required:
        parent.add_argument("--prompt", required=True)
    else:
        parent.add_argument("--prompt", help="the graph's prompt (default: its input_string)")
    return parent


def _thresholds() -> argparse.ArgumentParser:
    parent = _parent()
    parent.add_argument("--node-threshold", type=fraction("--node-threshold"), default=0.8)
    parent.add_argument("--edge-threshold", type=fraction("--edge-threshold"), default=0.98)
    return parent


def _graph_size() -> argparse.ArgumentParser:
    """Options that decide a graph's size, shared by `attribute` and `estimate`."""
    parent = _parent()
    parent.add_argument("--max-feature-nodes", type=positive("--max-feature-nodes"))
    parent.add_argument("--batch-size", type=positive("--batch-size"), default=256)
    parent.add_argument("--max-n-logits", type=positive("--max-n-logits"), default=10)
    parent.add_argument(
        "--adjacency-dtype",
        choices=ADJACENCY_DTYPES,
        default="float32",
        help="storage of the graph's adjacency (half precision halves memory and file)",
    )
    return parent


def graph_size(args: argparse.Namespace) -> dict:
    """The `_graph_size` options as keyword arguments of `attribute` and `estimate_prompt`."""
    names = ("max_feature_nodes", "batch_size", "max_n_logits", "adjacency_dtype")
    return {name: getattr(args, name) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracer",
        description="Attribution graphs over transcoders: attribute, estimate, prune, score, "
        "intervene, validate.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model, thresholds, size = _model_options(), _thresholds(), _graph_size()

    att = sub.add_parser("attribute", parents=[model, size], help="compute an attribution graph")
    att.add_argument("--out", required=True, type=Path, help="graph file (.safetensors)")
    att.add_argument("--desired-logit-prob", type=fraction("--desired-logit-prob"), default=0.95)
    att.add_argument("--target", action="append", help="custom logit target token (repeatable)")
    att.add_argument("--dtype", choices=DTYPES, default="float32")
    att.add_argument("--revision", help="model revision (hub)")
    att.add_argument("--offload", action="store_true", help="drop transcoder weights when done")
    att.add_argument("--quiet", action="store_true", help="no progress bar")

    est = sub.add_parser(
        "estimate",
        parents=[model, size],
        help="predict graph size, memory and file size before attributing",
    )
    est.add_argument(
        "--sample-tokens",
        type=positive("--sample-tokens"),
        help="count active features on the first N tokens only (default: the whole prompt)",
    )
    est.add_argument(
        "--no-weights",
        action="store_true",
        help="load no weights: active features from a bound (the default for TopK sets, where "
        "the bound is exact up to zero activations); hub repos are not downloaded, only their "
        "configs, tokenizer and file headers are read",
    )
    est.add_argument("--revision", help="model revision (hub)")
    est.add_argument("--transcoder-revision", help="transcoder set revision (hf:// URIs)")
    est.add_argument("--json", action="store_true", help="print JSON instead of text")

    prune = sub.add_parser(
        "prune", parents=[thresholds], help="prune a graph and write the viewer JSON"
    )
    prune.add_argument("graph", type=Path)
    prune.add_argument("--json", type=Path, required=True, help="output viewer JSON")
    prune.add_argument("--tokenizer", help="model folder whose tokenizer labels the tokens")

    score = sub.add_parser(
        "score", parents=[thresholds], help="print replacement/completeness scores as JSON"
    )
    score.add_argument("graph", type=Path)

    fixture = sub.add_parser("fixture", help="write a small random model + transcoder set")
    fixture.add_argument(
        "--family",
        default="gpt2",
        choices=["gpt2", "llama", "gemma2", "qwen3", "gemma3", "gemma3_multimodal", "gpt_oss"],
    )
    fixture.add_argument("--kind", default="clt", choices=KINDS)
    fixture.add_argument(
        "--out", type=Path, required=True, help="folder for model/ and transcoders/"
    )

    inter = sub.add_parser(
        "intervene",
        parents=[model],
        help="set or scale features and print the top tokens before/after",
    )
    inter.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="L:POS:FEAT=VALUE",
        help="set a feature's activation (POS * = every position, generated ones too); repeatable",
    )
    inter.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="L:POS:FEAT=FACTOR",
        help="multiply a feature's activation (0 ablates, -2 flips and doubles); repeatable",
    )
    inter.add_argument("--mode", choices=MODES, default="full")
    inter.add_argument(
        "--generate", type=positive("--generate"), metavar="N", help="also generate N tokens"
    )
    inter.add_argument("--top-k", type=positive("--top-k"), default=5)
    inter.add_argument("--dtype", choices=DTYPES, default="float32")

    val = sub.add_parser(
        "validate",
        parents=[_model_options(prompt_required=False), thresholds],
        help="ablate a graph's top feature nodes and compare with its predictions",
    )
    val.add_argument("graph", type=Path)
    val.add_argument("--top-n", type=positive("--top-n"), default=20)
    val.add_argument(
        "--no-prune", action="store_true", help="pick nodes of the full graph, not the pruned one"
    )
    val.add_argument(
        "--mode", action="append", choices=MODES, help="intervention mode (repeatable; default all)"
    )
    val.add_argument("--batch-size", type=positive("--batch-size"), default=32)
    val.add_argument("--dtype", choices=DTYPES, help="model dtype (default: the graph's)")
    val.add_argument(
        "--out-dir", type=Path, help="where validation.csv/.json go (default: the graph's folder)"
    )
    _add_sweep(sub, size)
    _add_features(sub)
    return parser


def _add_sweep(sub, size: argparse.ArgumentParser) -> None:
    sweep = sub.add_parser(
        "sweep",
        parents=[size],
        help="attribute a prompts file under one or more profiles, here or on Ray (resumable)",
    )
    sweep.add_argument("prompts", type=Path, help="text, one prompt a line; or JSON lines")
    sweep.add_argument("--out", type=Path, required=True, help="folder: PROFILE/PROMPT.safetensors")
    sweep.add_argument("--profile", action="append", help="a profile of --params (repeatable)")
    sweep.add_argument("--params", type=Path, default=Path("params.yaml"))
    sweep.add_argument("--model", help="model folder or hub id (instead of --profile)")
    sweep.add_argument("--transcoders", help="transcoder folder or hf:// URI (with --model)")
    sweep.add_argument("--revision", help="model revision (hub)")
    sweep.add_argument("--transcoder-revision", help="transcoder revision (hub)")
    sweep.add_argument("--dtype", choices=DTYPES, default="float32")
    sweep.add_argument("--name", default="custom", help="profile name for --model (folder name)")
    sweep.add_argument("--desired-logit-prob", type=fraction("--desired-logit-prob"), default=0.95)
    sweep.add_argument("--engine", choices=("local", "ray"), default="local")
    sweep.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    sweep.add_argument("--num-cpus", type=float, help="CPUs per Ray worker (default 1)")
    sweep.add_argument("--num-gpus", type=float, help="GPUs per Ray worker (default 0)")
    sweep.add_argument("--memory", help="memory per Ray worker, bytes or e.g. 8GiB")
    sweep.add_argument("--workers", type=positive("--workers"), help="model copies per profile")
    sweep.add_argument("--threads", type=positive("--threads"), help="torch threads per worker")
    sweep.add_argument("--retries", type=int, help="tries after the first, per prompt (default 2)")
    sweep.add_argument("--experiment", default="tracer", help="MLflow experiment")
    sweep.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_features(sub) -> None:
    def labels_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--labels", type=Path, help="labels file (default: labels/NAME.tsv, NAME the pages')"
        )

    features = sub.add_parser("features", help="read and export feature pages")
    what = features.add_subparsers(dest="features_command", required=True)
    show = what.add_parser("show", help="print one feature's page")
    show.add_argument("set", help="page set name (outputs/features/NAME) or pages folder")
    show.add_argument("layer", type=int)
    show.add_argument("feature", type=int)
    show.add_argument("--examples", type=positive("--examples"), default=5, help="per section")
    labels_option(show)
    export = what.add_parser("export", help="write every page in another tool's format")
    export.add_argument("set", help="page set name (outputs/features/NAME) or pages folder")
    export.add_argument("--format", choices=("circuit-tracer",), default="circuit-tracer")
    export.add_argument("--out", type=Path, required=True, help="folder; files go to OUT/ID/")
    export.add_argument("--transcoder-id", help="transcoder_id / folder name (default: NAME)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    labels_option(export)

    label = sub.add_parser("label", help="set a feature's human label (empty text removes it)")
    label.add_argument("set", help="page set name (outputs/features/NAME) or pages folder")
    label.add_argument("feature", help="LAYER:FEATURE")
    label.add_argument("text")
    labels_option(label)

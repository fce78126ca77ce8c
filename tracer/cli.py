"""Command line: `tracer attribute | prune | score | fixture | intervene | validate`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tracer.atomic import write_json
from tracer.graph.graph import Graph
from tracer.graph.storage import describe


def _fraction(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {text!r}") from None
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {value}")
        return value

    return parse


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    att = sub.add_parser("attribute", help="compute an attribution graph")
    att.add_argument("--model", required=True, help="model folder or hub id")
    att.add_argument("--transcoders", required=True, help="transcoder folder or hf:// URI")
    att.add_argument("--prompt", required=True)
    att.add_argument("--out", required=True, type=Path, help="graph file (.safetensors)")
    att.add_argument("--max-feature-nodes", type=_positive("--max-feature-nodes"))
    att.add_argument("--batch-size", type=_positive("--batch-size"), default=256)
    att.add_argument("--max-n-logits", type=_positive("--max-n-logits"), default=10)
    att.add_argument("--desired-logit-prob", type=_fraction("--desired-logit-prob"), default=0.95)
    att.add_argument("--target", action="append", help="custom logit target token (repeatable)")
    att.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    att.add_argument(
        "--adjacency-dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="storage of the graph's adjacency (half precision halves memory and file)",
    )
    att.add_argument("--revision", help="model revision (hub)")
    att.add_argument("--offload", action="store_true", help="drop transcoder weights when done")
    att.add_argument("--quiet", action="store_true", help="no progress bar")

    est = sub.add_parser(
        "estimate", help="predict graph size, memory and file size before attributing"
    )
    est.add_argument("--model", required=True, help="model folder or hub id")
    est.add_argument("--transcoders", required=True, help="transcoder folder or hf:// URI")
    est.add_argument("--prompt", required=True)
    est.add_argument("--max-feature-nodes", type=_positive("--max-feature-nodes"))
    est.add_argument("--batch-size", type=_positive("--batch-size"), default=256)
    est.add_argument("--max-n-logits", type=_positive("--max-n-logits"), default=10)
    est.add_argument(
        "--sample-tokens",
        type=_positive("--sample-tokens"),
        help="count active features on the first N tokens only (default: the whole prompt)",
    )
    est.add_argument(
        "--no-weights",
        action="store_true",
        help="load no weights: active features from a bound (the default for TopK sets, where "
        "the bound is exact up to zero activations)",
    )
    est.add_argument(
        "--adjacency-dtype", choices=["float32", "float16", "bfloat16"], default="float32"
    )
    est.add_argument("--json", action="store_true", help="print JSON instead of text")

    prune = sub.add_parser("prune", help="prune a graph and write the viewer JSON")
    prune.add_argument("graph", type=Path)
    prune.add_argument("--node-threshold", type=_fraction("--node-threshold"), default=0.8)
    prune.add_argument("--edge-threshold", type=_fraction("--edge-threshold"), default=0.98)
    prune.add_argument("--json", type=Path, required=True, help="output viewer JSON")
    prune.add_argument("--tokenizer", help="model folder whose tokenizer labels the tokens")

    score = sub.add_parser("score", help="print replacement/completeness scores as JSON")
    score.add_argument("graph", type=Path)
    score.add_argument("--node-threshold", type=_fraction("--node-threshold"), default=0.8)
    score.add_argument("--edge-threshold", type=_fraction("--edge-threshold"), default=0.98)

    fixture = sub.add_parser("fixture", help="write a small random model + transcoder set")
    fixture.add_argument("--family", default="gpt2", choices=["gpt2", "llama", "gemma2", "qwen3"])
    fixture.add_argument(
        "--kind", default="clt", choices=["plt-jumprelu", "plt-relu", "plt-topk", "plt-skip", "clt"]
    )
    fixture.add_argument(
        "--out", type=Path, required=True, help="folder for model/ and transcoders/"
    )
    _add_intervene_parser(sub)
    _add_validate_parser(sub)
    return parser


# tracer.interventions.intervene.MODES, without importing torch for `--help`
MODES = ("full", "frozen_attention", "direct")
VALIDATION_MODES = ("direct", "frozen_attention", "full")


def _add_intervene_parser(sub) -> None:
    inter = sub.add_parser(
        "intervene", help="set or scale features and print the top tokens before/after"
    )
    inter.add_argument("--model", required=True, help="model folder or hub id")
    inter.add_argument("--transcoders", required=True, help="transcoder folder or hf:// URI")
    inter.add_argument("--prompt", required=True)
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
        "--generate", type=_positive("--generate"), metavar="N", help="also generate N tokens"
    )
    inter.add_argument("--top-k", type=_positive("--top-k"), default=5)
    inter.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")


def _add_validate_parser(sub) -> None:
    val = sub.add_parser(
        "validate", help="ablate a graph's top feature nodes and compare with its predictions"
    )
    val.add_argument("graph", type=Path)
    val.add_argument("--model", required=True, help="model folder or hub id")
    val.add_argument("--transcoders", required=True, help="transcoder folder or hf:// URI")
    val.add_argument("--prompt", help="the graph's prompt (default: its input_string)")
    val.add_argument("--top-n", type=_positive("--top-n"), default=20)
    val.add_argument("--node-threshold", type=_fraction("--node-threshold"), default=0.8)
    val.add_argument("--edge-threshold", type=_fraction("--edge-threshold"), default=0.98)
    val.add_argument(
        "--no-prune", action="store_true", help="pick nodes of the full graph, not the pruned one"
    )
    val.add_argument(
        "--mode", action="append", choices=MODES, help="intervention mode (repeatable; default all)"
    )
    val.add_argument("--batch-size", type=_positive("--batch-size"), default=32)
    val.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float64"],
        help="model dtype (default: the graph's)",
    )
    val.add_argument(
        "--out-dir", type=Path, help="where validation.csv/.json go (default: the graph's folder)"
    )


def _attribute(args: argparse.Namespace) -> None:
    from tracer.attribution.attribute import attribute
    from tracer.model.replacement import ReplacementModel

    model = ReplacementModel.from_pretrained(
        args.model, args.transcoders, dtype=args.dtype, revision=args.revision
    )
    graph = attribute(
        args.prompt,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        targets=args.target,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        offload=args.offload,
        progress=not args.quiet,
        adjacency_dtype=args.adjacency_dtype,
    )
    storage = describe(graph.save(args.out))
    summary = {
        "graph": str(args.out),
        "tokens": graph.n_pos,
        "active_features": int(graph.active_features.shape[0]),
        "feature_nodes": graph.layout.n_features,
        "logits": [t.label for t in graph.logit_targets],
        "timings": graph.metadata["timings"],
        "file": {k: storage[k] for k in ("encoding", "file_bytes", "dense_bytes", "ratio")},
    }
    print(json.dumps(summary, indent=2))


def _tokenizer(explicit: str | None, graph: Graph):
    """The tokenizer that labels the viewer's tokens, or None to label them by id.

    An explicit `--tokenizer` must load. Otherwise the graph's model is tried from local files
    only (its folder, or the hub cache): a graph outlives the folder it was computed from, and
    its model id may be no hub id at all (a model built in memory), so labels by id are the
    fallback, announced on stderr.
    """
    from transformers import AutoTokenizer

    if explicit is not None:
        try:
            return AutoTokenizer.from_pretrained(explicit)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the tokenizer {explicit!r}: {err}") from err
    model_id = graph.metadata.get("model_id")
    try:
        if not model_id:
            raise ValueError("the graph names no model")
        return AutoTokenizer.from_pretrained(
            model_id, revision=graph.metadata.get("model_revision"), local_files_only=True
        )
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(
            f"tracer prune: note: no local tokenizer for the graph's model {model_id!r} "
            f"({reason}); tokens are labelled by id (pass --tokenizer to name one)",
            file=sys.stderr,
        )
        return None


def _prune(args: argparse.Namespace) -> None:
    from tracer.graph.summary import prune_graph

    graph = Graph.load(args.graph)
    pruned = prune_graph(
        graph,
        args.node_threshold,
        args.edge_threshold,
        slug=args.graph.stem,
        tokenizer=_tokenizer(args.tokenizer, graph),
        full_scores=False,
    )
    document = pruned.document
    write_json(args.json, document, indent=None)
    print(
        json.dumps(
            {
                "json": str(args.json),
                "nodes": len(document["nodes"]),
                "links": len(document["links"]),
            }
        )
    )


def _score(args: argparse.Namespace) -> None:
    from tracer.graph.summary import score_summary

    graph = Graph.load(args.graph)
    result = graph.prune(args.node_threshold, args.edge_threshold)
    print(
        json.dumps(score_summary(graph, result, args.node_threshold, args.edge_threshold), indent=2)
    )


def _fixture(args: argparse.Namespace) -> None:
    from tracer.testing import write_fixture

    paths = write_fixture(args.out, family=args.family, kind=args.kind)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def _change_form(option: str) -> str:
    number = "VALUE" if option == "--set" else "FACTOR"
    return f"{option} LAYER:POS:FEATURE={number} (integers; POS may be *), e.g. {option} 1:3:42=0"


def _parse_change(text: str, option: str) -> tuple[int, int | None, int, float]:
    """`L:POS:FEAT=NUMBER` -> (layer, pos or None for `*`, feature, number)."""
    location, sep, number = text.partition("=")
    parts = location.split(":")
    if not sep or len(parts) != 3:
        raise ValueError(f"bad {option} {text!r}; valid form: {_change_form(option)}")
    try:
        layer, feature = int(parts[0]), int(parts[2])
        pos = None if parts[1].strip() == "*" else int(parts[1])
        value = float(number)
    except ValueError:
        raise ValueError(
            f"bad {option} {text!r}: not a number; valid form: {_change_form(option)}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(
            f"bad {option} {text!r}: {number} is not a finite number; "
            f"valid form: {_change_form(option)}"
        )
    return layer, pos, feature, value


def _check_change_range(
    text: str, option: str, spec: tuple[int, int | None, int, float], limits: dict[str, int]
) -> None:
    """Layer, position (of the tokenized prompt) and feature must exist."""
    layer, pos, feature, _ = spec
    for name, value in (("layer", layer), ("position", pos), ("feature", feature)):
        limit = limits[name]
        if value is not None and not 0 <= value < limit:
            raise ValueError(
                f"bad {option} {text!r}: {name} {value} is out of range [0, {limit}) "
                f"(the prompt has {limits['position']} tokens with the start token); "
                f"valid form: {_change_form(option)}"
            )


def _top_tokens(model, logits, k: int) -> list[dict]:
    import torch

    probs = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]))
    ids = probs.indices.tolist()
    return [
        {
            "token": model.tokenizer.decode([t]) if model.tokenizer is not None else str(t),
            "id": t,
            "probability": p,
        }
        for t, p in zip(ids, probs.values.tolist(), strict=True)
    ]


def _intervene(args: argparse.Namespace) -> None:
    from tracer.interventions.intervene import FeatureChange, generate, run_with_changes
    from tracer.model.replacement import ReplacementModel

    specs = [(text, "--set") for text in args.set] + [(text, "--scale") for text in args.scale]
    if not specs:
        raise ValueError("no intervention given; add --set L:POS:FEAT=VALUE or --scale ...")
    parsed = [(text, option, _parse_change(text, option)) for text, option in specs]
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, dtype=args.dtype)
    ids = model.tokenize(args.prompt)
    limits = {
        "layer": model.n_layers,
        "position": ids.shape[0],
        "feature": model.transcoders.d_transcoder,
    }
    changes = []
    for text, option, spec in parsed:
        _check_change_range(text, option, spec, limits)
        layer, pos, feature, number = spec
        kind = "value" if option == "--set" else "scale"
        changes.append(FeatureChange(layer, pos, feature, **{kind: number}))
    state = model.run_prompt(ids, zero_bos=False)
    result = run_with_changes(model, state, ids[None], [changes], args.mode, with_activations=False)
    report = {
        "prompt": args.prompt,
        "mode": args.mode,
        "changes": [text for text, _ in specs],
        "before": _top_tokens(model, state.logits[-1], args.top_k),
        "after": _top_tokens(model, result.logits[0, -1], args.top_k),
    }
    if args.generate:
        every_position = any(c.pos is None for c in changes)
        clean = generate(model, args.prompt, None, max_new_tokens=args.generate)
        changed = generate(
            model,
            args.prompt,
            changes,
            max_new_tokens=args.generate,
            mode=args.mode,
            on_new_tokens=every_position,
        )
        report["generated"] = {
            "clean": _continuation(clean),
            "intervened": _continuation(changed),
        }
    print(json.dumps(report, indent=2))


def _continuation(generation) -> dict:
    new = generation.tokens[0, generation.n_prompt :].tolist()
    return {"text": generation.texts[0] if generation.texts else None, "ids": new}


def _validate(args: argparse.Namespace) -> None:
    from tracer.interventions.validation import json_safe, validate_graph
    from tracer.model.replacement import ReplacementModel

    graph = Graph.load(args.graph)
    dtype = args.dtype or graph.metadata.get("dtype", "float32")
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, dtype=dtype)
    pruned = None if args.no_prune else graph.prune(args.node_threshold, args.edge_threshold)
    report = validate_graph(
        graph,
        model,
        prompt=args.prompt,
        top_n=args.top_n,
        modes=tuple(dict.fromkeys(args.mode or VALIDATION_MODES)),
        pruned=pruned,
        batch_size=args.batch_size,
    )
    report.metadata["node_threshold"] = None if args.no_prune else args.node_threshold
    report.metadata["edge_threshold"] = None if args.no_prune else args.edge_threshold
    out_dir = args.out_dir if args.out_dir is not None else args.graph.parent
    csv_path = report.to_csv(out_dir / "validation.csv")
    json_path = report.to_json(out_dir / "validation.json")
    summary = {
        "csv": str(csv_path),
        "json": str(json_path),
        "nodes": report.metadata["n_nodes"],
        "rows": len(report.rows),
        "summary": report.summary,
    }
    print(json.dumps(json_safe(summary), indent=2))


def _estimate(args: argparse.Namespace) -> None:
    from tracer.attribution.estimate import estimate_prompt, human

    found = estimate_prompt(
        args.model,
        args.transcoders,
        args.prompt,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        n_logits=args.max_n_logits,
        sample_tokens=args.sample_tokens,
        use_weights=False if args.no_weights else None,
        adjacency_dtype=args.adjacency_dtype,
    )
    print(json.dumps(found.to_dict(), indent=2) if args.json else human(found))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "attribute": _attribute,
        "estimate": _estimate,
        "prune": _prune,
        "score": _score,
        "fixture": _fixture,
        "intervene": _intervene,
        "validate": _validate,
    }
    try:
        handlers[args.command](args)
    except (ValueError, OSError, IndexError) as err:  # OSError: missing files, also of transformers
        print(f"tracer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `tracer attribute | prune | score | fixture`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tracer.graph import Graph


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
    att.add_argument("--revision", help="model revision (hub)")
    att.add_argument("--offload", action="store_true", help="drop transcoder weights when done")
    att.add_argument("--quiet", action="store_true", help="no progress bar")

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
    return parser


def _attribute(args: argparse.Namespace) -> None:
    from tracer.attribute import attribute
    from tracer.replacement import ReplacementModel

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
    )
    graph.save(args.out)
    summary = {
        "graph": str(args.out),
        "tokens": graph.n_pos,
        "active_features": int(graph.active_features.shape[0]),
        "feature_nodes": graph.layout.n_features,
        "logits": [t.label for t in graph.logit_targets],
        "timings": graph.metadata["timings"],
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
    from tracer.viewer import to_viewer_json, write_json

    graph = Graph.load(args.graph)
    result = graph.prune(args.node_threshold, args.edge_threshold)
    document = to_viewer_json(
        graph,
        result,
        slug=args.graph.stem,
        tokenizer=_tokenizer(args.tokenizer, graph),
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
    )
    write_json(document, args.json)
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
    graph = Graph.load(args.graph)
    result = graph.prune(args.node_threshold, args.edge_threshold)
    full, pruned = graph.scores(), graph.scores(result)
    print(
        json.dumps(
            {
                "replacement": full.replacement,
                "completeness": full.completeness,
                "pruned_replacement": pruned.replacement,
                "pruned_completeness": pruned.completeness,
                "node_threshold": args.node_threshold,
                "edge_threshold": args.edge_threshold,
                "pruned_nodes": int(result.node_mask.sum()),
                "pruned_edges": int(result.edge_mask.sum()),
            },
            indent=2,
        )
    )


def _fixture(args: argparse.Namespace) -> None:
    from tracer.fixtures import write_fixture

    paths = write_fixture(args.out, family=args.family, kind=args.kind)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "attribute": _attribute,
        "prune": _prune,
        "score": _score,
        "fixture": _fixture,
    }
    try:
        handlers[args.command](args)
    except (ValueError, OSError, IndexError) as err:  # OSError: missing files, also of transformers
        print(f"tracer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

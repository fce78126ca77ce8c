"""`tracer attribute | estimate | prune | score | fixture`: graphs from prompts, and what they show."""

from __future__ import annotations

import argparse
import json
import sys

from tracer.atomic import write_json
from tracer.cli.parser import graph_size


def attribute(args: argparse.Namespace) -> None:
    from tracer.attribution.attribute import attribute
    from tracer.graph.storage import describe
    from tracer.model.replacement import ReplacementModel

    model = ReplacementModel.from_pretrained(
        args.model, args.transcoders, dtype=args.dtype, revision=args.revision
    )
    graph = attribute(
        args.prompt,
        model,
        desired_logit_prob=args.desired_logit_prob,
        targets=args.target,
        offload=args.offload,
        progress=not args.quiet,
        **graph_size(args),
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


def _tokenizer(explicit: str | None, graph):
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


def prune(args: argparse.Namespace) -> None:
    from tracer.graph.graph import Graph
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


def score(args: argparse.Namespace) -> None:
    from tracer.graph.graph import Graph
    from tracer.graph.summary import score_summary

    graph = Graph.load(args.graph)
    result = graph.prune(args.node_threshold, args.edge_threshold)
    print(
        json.dumps(score_summary(graph, result, args.node_threshold, args.edge_threshold), indent=2)
    )


def fixture(args: argparse.Namespace) -> None:
    from tracer.testing import write_fixture

    paths = write_fixture(args.out, family=args.family, kind=args.kind)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def estimate(args: argparse.Namespace) -> None:
    from tracer.attribution.estimate import estimate_prompt, human

    found = estimate_prompt(
        args.model,
        args.transcoders,
        args.prompt,
        sample_tokens=args.sample_tokens,
        use_weights=False if args.no_weights else None,
        revision=args.revision,
        transcoder_revision=args.transcoder_revision,
        **graph_size(args),
    )
    print(json.dumps(found.to_dict(), indent=2) if args.json else human(found))

"""`tracer intervene | validate`: change features and compare with what a graph predicts."""

from __future__ import annotations

import argparse
import json
import math

from tracer.interventions.modes import MODES


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


def intervene(args: argparse.Namespace) -> None:
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


def validate(args: argparse.Namespace) -> None:
    from tracer.graph.graph import Graph
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
        modes=tuple(dict.fromkeys(args.mode or MODES)),
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

"""`tracer features show | export` and `tracer label`: read, export and label feature pages."""

from __future__ import annotations

import argparse
from pathlib import Path

PAGES_ROOT = Path("outputs/features")
LABELS_ROOT = Path("labels")


def pages_folder(spec: str) -> Path:
    """A page set's name (outputs/features/NAME) or a pages folder."""
    named = PAGES_ROOT / spec
    if "/" not in spec and named.is_dir():
        return named
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(
            f"no feature pages {spec!r}: neither {named} nor a folder; run `dvc repro` "
            "(features@SET stages) or give a pages folder"
        )
    return folder


def labels_file(args: argparse.Namespace) -> Path:
    """--labels, else labels/NAME.tsv with NAME the pages folder's name."""
    return args.labels or LABELS_ROOT / f"{pages_folder(args.set).name}.tsv"


def _context_line(context, text, width: int = 8) -> str:
    """The tokens around the chosen one; active tokens carry their activation, the chosen one «»."""
    begin = max(0, context.position - width)
    parts = []
    for i in range(begin, min(len(context.tokens), context.position + width + 1)):
        word = text(context.tokens[i]).strip() or repr(text(context.tokens[i]))
        act = context.acts[i]
        word = f"«{word}»" if i == context.position else word
        parts.append(f"{word}({act:.2f})" if act > 0 else word)
    return " ".join(parts)


def show(args: argparse.Namespace) -> None:
    from tracer.features.labels import Labels

    labels = Labels.open(pages_folder(args.set), labels_file(args))
    pages = labels.pages
    page = pages.page(args.layer, args.feature)
    human = labels.human.get((args.layer, args.feature))
    print(f"feature {args.layer}:{args.feature} of {pages.folder}")
    print(f"  label: {human or labels.auto(args.layer, args.feature) or '(never active)'}")
    print(f"         ({'human' if human else 'automatic'})")
    print(
        f"  active on {page.active} of {page.n_tokens} tokens ({page.frequency:.3%}), "
        f"max activation {page.act_max:.4g}"
    )
    edges = ", ".join(
        f"q{q:g}={v:.3g}" for q, v in zip(page.quantiles, page.quantile_values, strict=True)
    )
    print(f"  activation quantiles (active tokens): {edges}")
    peak = max(page.histogram) or 1
    width = page.histogram_top / len(page.histogram)
    print("  histogram of positive activations:")
    for i, count in enumerate(page.histogram):
        if count:
            print(
                f"    [{i * width:7.3g}, {(i + 1) * width:7.3g})  {'#' * max(1, 40 * count // peak)} {count}"
            )
    top = ", ".join(f"{pages.text(t).strip()} {v:+.3g}" for t, v in page.top_logits)
    bottom = ", ".join(f"{pages.text(t).strip()} {v:+.3g}" for t, v in page.bottom_logits)
    print(f"  top logits:    {top}")
    print(f"  bottom logits: {bottom}")
    print("  top activations:")
    for context in page.top[: args.examples]:
        print(f"    {context.value:7.3f}  {_context_line(context, pages.text)}")
    for band in reversed(range(len(page.bands))):
        low = page.quantiles[band - 1] if band else 0.0
        high = page.quantiles[band] if band < len(page.quantiles) else 1.0
        print(f"  quantile band {low:g}-{high:g}:")
        for context in page.bands[band][: args.examples]:
            print(f"    {context.value:7.3f}  {_context_line(context, pages.text)}")


def export(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from tracer.features.export import export_circuit_tracer
    from tracer.features.labels import Labels

    labels = Labels.open(pages_folder(args.set), labels_file(args))
    pages = labels.pages
    transcoder_id = args.transcoder_id or pages.folder.name
    total = pages.n_layers * pages.d_transcoder
    with tqdm(total=total, unit="feature", disable=args.quiet) as bar:
        out = export_circuit_tracer(pages, args.out, transcoder_id, labels, progress=bar.update)
    print(f"wrote {total} feature files to {out}")


def label(args: argparse.Namespace) -> None:
    from tracer.features.labels import parse_feature, set_label
    from tracer.features.storage import FeaturePages

    layer, feature = parse_feature(args.feature)
    pages = FeaturePages(pages_folder(args.set))
    path = labels_file(args)
    set_label(path, pages, layer, feature, args.text)
    print(
        f"{path}: {args.feature} "
        + (f"= {args.text.strip()!r}" if args.text.strip() else "unlabelled")
    )

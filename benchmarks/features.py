"""Feature-pages benchmark: the streaming pass against a straightforward one, on the same data.

Data: the zoo corpus's training sentences through a zoo model and transcoder set (default: GPT-2
with its cross-layer transcoder), `--tokens` data tokens, examples of `--context` tokens. Both
paths run the same batched forward passes; they differ in what they keep:

- straightforward: every activation of every token is kept (a (tokens, features) table per
  layer), then counts, maxima, top-k and histograms are computed from the tables at the end;
- streaming (`tracer.features.pages.collect_pages`): per batch, running statistics only.

Prints tokens per second of each and their ratio, the peak RSS growth of each (the straightforward
one grows with the data, the streaming one with batch x features), checks that both agree on
counts, maxima and top values, and writes the pages to report bytes per feature on disk.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/features.py [--tokens 50000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tracer.features.pages import PageSettings, _batches, _reads, collect_pages, examples_from_texts
from tracer.features.storage import save_pages
from tracer.memory import peak_growth, return_freed_memory
from tracer.model.replacement import ReplacementModel

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def straightforward(model: ReplacementModel, examples: list[list[int]], settings: PageSettings):
    """All activations materialised, statistics at the end: (active, act_max, top values)."""
    ts = model.transcoders
    special = model._special_token_ids()
    tables: list[list[torch.Tensor]] = [[] for _ in range(ts.n_layers)]
    for batch in _batches(examples, settings.batch_size, special, "cpu"):
        valid = batch.valid
        for layer, read in enumerate(_reads(model, batch.ids.clamp(min=0))):
            acts = ts.encode(layer, read).float() * valid[..., None]
            tables[layer].append(acts[valid])  # (data tokens of the batch, d)
    results = []
    for per_batch in tables:
        table = torch.cat(per_batch)
        # the streaming histogram's edges: from 0 to the smallest power of two above the max
        top_edge = torch.ldexp(torch.ones(table.shape[1]), torch.frexp(table.amax(0))[1])
        bins = (table / top_edge * settings.histogram_bins).floor().long()
        bins = bins.clamp(max=settings.histogram_bins - 1)
        feature = torch.arange(table.shape[1]).expand_as(table)
        active = table > 0
        flat = feature[active] * settings.histogram_bins + bins[active]
        histogram = torch.bincount(flat, minlength=table.shape[1] * settings.histogram_bins)
        histogram = histogram.view(table.shape[1], settings.histogram_bins)
        results.append(
            (
                (table > 0).sum(0),
                table.amax(0),
                table.topk(settings.top_k, dim=0).values.T,
                histogram,
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "zoo/models/gpt2"))
    parser.add_argument("--transcoders", default=str(REPO / "zoo/transcoders/gpt2/clt"))
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    return_freed_memory()
    model = ReplacementModel.from_pretrained(args.model, args.transcoders)
    settings = PageSettings(n_tokens=args.tokens, context=args.context, batch_size=args.batch_size)
    texts = (REPO / "zoo/corpus/train.txt").read_text().splitlines()
    examples = examples_from_texts(model, texts, settings)
    n = sum(len(e) - 1 for e in examples)
    ts = model.transcoders
    print(
        f"{n} data tokens, {ts.n_layers} layers x {ts.d_transcoder} features, batch {args.batch_size}"
    )

    timings, outputs = {}, {}
    for name, run in (
        ("straightforward", lambda: straightforward(model, examples, settings)),
        ("streaming", lambda: collect_pages(model, examples, settings)),
    ):
        start = time.perf_counter()
        kept: list = []
        growth = peak_growth(lambda run=run, kept=kept: kept.append(run()))
        timings[name] = (time.perf_counter() - start, growth)
        outputs[name] = kept[0]
        print(
            f"{name:16s} {n / timings[name][0]:9.0f} tokens/s  peak growth {growth / 2**20:8.1f} MiB"
        )
    ratio = timings["straightforward"][0] / timings["streaming"][0]
    print(f"streaming / straightforward: {ratio:.2f}x the throughput")

    for layer, (active, act_max, top, histogram) in enumerate(outputs["straightforward"]):
        page = outputs["streaming"][layer]
        assert torch.equal(page.active, active), f"layer {layer}: counts differ"
        assert torch.allclose(page.act_max, act_max.clamp(min=0)), f"layer {layer}: maxima differ"
        filled = page.top.example >= 0
        assert torch.allclose(page.top.values[filled], top[filled]), f"layer {layer}: top differs"
        assert torch.equal(page.hist_counts, histogram), f"layer {layer}: histograms differ"
    print("counts, maxima, top-k values and histograms agree")

    tokenizer = model.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pages(
            Path(tmp) / "pages",
            outputs["streaming"],
            settings,
            lambda ids: [tokenizer.decode([i]) for i in ids],
            {},
        )
        size = sum(p.stat().st_size for p in folder.iterdir())
    features = ts.n_layers * ts.d_transcoder
    print(f"pages on disk: {size / 2**20:.2f} MiB, {size / features:.0f} bytes per feature")


if __name__ == "__main__":
    main()

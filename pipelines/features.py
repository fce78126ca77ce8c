"""DVC stage features@SET: the feature pages of one transcoder set (params.yaml `features:`).

Runs the model of the set's profile (`features.sets.SET`, loaded from what the fetch stage
recorded) over the dataset the dataset stage fetched (`outputs/dataset/`) and writes
`outputs/features/SET/` (tracer.features.storage), atomically. Its index names the model, the
transcoder set and the dataset with its revision and sha256.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from tracer.experiments import outputs
from tracer.experiments.datasets import dataset_record, fetched_texts
from tracer.experiments.fetched import load_model, read_record
from tracer.experiments.params import FeaturesParams, load_params
from tracer.features.pages import PageSettings, collect_pages, examples_from_texts
from tracer.features.storage import save_pages
from tracer.memory import return_freed_memory

ROOT = Path("outputs")
DATASET = ROOT / "dataset"  # the dataset stage's output


def page_settings(params: FeaturesParams) -> PageSettings:
    fields = PageSettings.__dataclass_fields__
    values = params.model_dump(include=set(fields))
    return PageSettings(**(values | {"quantiles": tuple(params.quantiles)}))


def build_pages(name: str, params, out: Path, progress: bool = True) -> Path:
    features = params.features
    profile = features.sets[name]
    fetched = read_record(ROOT, profile)
    settings = page_settings(features)
    dataset = dataset_record(DATASET)
    with load_model(fetched) as model:
        texts = fetched_texts(DATASET, features.text_field)
        examples = examples_from_texts(model, texts, settings)
        n_tokens = sum(len(e) - 1 for e in examples)
        with tqdm(total=n_tokens, unit="tok", desc=f"features@{name}", disable=not progress) as bar:
            pages = collect_pages(model, examples, settings, progress=bar.update)
        tokenizer = model.tokenizer
        identity = {
            "name": name,
            "profile": profile,
            "model": fetched["model"]["source"],
            "model_revision": fetched["model"]["revision"],
            "transcoders": fetched["transcoders"]["source"],
            "transcoder_revision": fetched["transcoders"]["revision"],
            "dataset": dataset["source"],
            "dataset_revision": dataset["revision"],
            "dataset_sha256": dataset["sha256"],
        }
        return save_pages(
            out,
            pages,
            settings,
            lambda ids: [tokenizer.decode([i]) for i in ids],
            identity,
        )


def main(name: str) -> None:
    return_freed_memory()
    params = load_params()
    if name not in params.features.sets:
        raise SystemExit(
            f"unknown feature set {name!r}; params.yaml features.sets: {sorted(params.features.sets)}"
        )
    try:
        folder = build_pages(name, params, outputs.features_dir(ROOT, name))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"features@{name}: {error}") from None
    print(f"features@{name}: wrote {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:])

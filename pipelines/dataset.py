"""DVC stage dataset: the feature pages' dataset, copied or downloaded into `outputs/dataset/`.

`features.dataset` (a file in zoo/corpus/ or datasets/, or hf://datasets/ORG/NAME/FILE) at
`features.dataset_revision`; see `tracer.experiments.datasets`. The folder is replaced atomically:
a failure (a checksum mismatch, a revision that does not exist) leaves the previous one in place.
"""

from __future__ import annotations

from pathlib import Path

from tracer.atomic import write_folder
from tracer.experiments.datasets import fetch_dataset
from tracer.experiments.params import load_params

OUT = Path("outputs/dataset")


def main() -> None:
    features = load_params().features
    records: list[dict] = []
    try:
        write_folder(
            OUT,
            lambda folder: records.append(
                fetch_dataset(features.dataset, features.dataset_revision, folder)
            ),
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dataset: {error}") from None
    record = records[0]
    print(
        f"dataset: {record['source']} ({record['revision'] or 'local'}) -> {OUT / record['file']}"
    )


if __name__ == "__main__":
    main()

"""Feature labels: an automatic one from each page, human ones from a plain file that wins.

The labels file (one per transcoder set, kept in git) is text, one feature per line, sorted:

    LAYER:FEATURE<TAB>label text

Blank lines and lines starting with `#` are comments. A label is one line without tabs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tracer.atomic import write_text
from tracer.features.storage import FeaturePage, FeaturePages, PagesError

HEADER = (
    "# feature labels: LAYER:FEATURE<TAB>text, one per line (`tracer label` writes this file)\n"
)


def auto_label(page: FeaturePage, text, n_tokens: int = 2) -> str:
    """ "tok · tok → logit": the most frequent tokens where the top examples peak (ties: by rank),
    and the top output logit. `text(token_id) -> str`. Empty for a feature never active."""
    peaks = [c.tokens[c.position] for c in page.top]
    if not peaks:
        return ""
    counts = Counter(peaks)
    order = sorted(dict.fromkeys(peaks), key=lambda t: -counts[t])  # stable: rank breaks ties
    words = [text(t).strip() or repr(text(t)) for t in order[:n_tokens]]
    label = " · ".join(words)
    if page.top_logits:
        label += f" → {text(page.top_logits[0][0]).strip()}"
    return label


def parse_feature(spec: str) -> tuple[int, int]:
    """ "L:F" -> (layer, feature)."""
    layer, sep, feature = spec.partition(":")
    if not sep or not layer.strip().isdigit() or not feature.strip().isdigit():
        raise ValueError(
            f"feature must be LAYER:FEATURE with two non-negative integers, got {spec!r}"
        )
    return int(layer), int(feature)


def read_labels(path: str | Path) -> dict[tuple[int, int], str]:
    """The human labels of a labels file (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    labels: dict[tuple[int, int], str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        spec, sep, text = line.partition("\t")
        try:
            key = parse_feature(spec)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        if not sep or not text.strip():
            raise ValueError(f"{path}:{number}: expected LAYER:FEATURE<TAB>label, got {line!r}")
        labels[key] = text.strip()
    return labels


def write_labels(path: str | Path, labels: dict[tuple[int, int], str]) -> Path:
    """Write a labels file atomically, sorted by layer then feature."""

    def write(handle) -> None:
        handle.write(HEADER)
        for (layer, feature), text in sorted(labels.items()):
            handle.write(f"{layer}:{feature}\t{text}\n")

    return write_text(path, write)


def set_label(path: str | Path, pages: FeaturePages, layer: int, feature: int, text: str) -> None:
    """Set (or, with empty text, remove) the human label of one feature of `pages`."""
    pages.check(layer, feature)
    text = text.strip()
    if "\t" in text or "\n" in text or "\r" in text:
        raise ValueError("a label is one line of text without tabs")
    labels = read_labels(path)
    if text:
        labels[(layer, feature)] = text
    else:
        labels.pop((layer, feature), None)
    write_labels(path, labels)


class Labels:
    """Label lookup for a pages folder: the human label if any, else the automatic one."""

    def __init__(self, pages: FeaturePages, human: dict[tuple[int, int], str] | None = None):
        self.pages = pages
        self.human = dict(human or {})
        for layer, feature in self.human:
            try:
                pages.check(layer, feature)
            except PagesError as error:
                raise ValueError(
                    f"a human label names a feature that does not exist: {error}"
                ) from None
        self._auto: dict[tuple[int, int], str] = {}

    @classmethod
    def open(cls, pages_folder: str | Path, labels_file: str | Path | None) -> Labels:
        pages = FeaturePages(pages_folder)
        return cls(pages, read_labels(labels_file) if labels_file else {})

    def auto(self, layer: int, feature: int) -> str:
        key = (layer, feature)
        if key not in self._auto:
            self._auto[key] = auto_label(self.pages.page(layer, feature), self.pages.text)
        return self._auto[key]

    def __call__(self, layer: int, feature: int) -> str:
        return self.human.get((layer, feature)) or self.auto(layer, feature)

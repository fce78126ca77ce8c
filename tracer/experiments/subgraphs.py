"""Subgraphs a researcher saves from the explorer: pinned nodes and named supernodes of one graph.

A subgraph file is `subgraphs/PROFILE/PROMPT/NAME.json` beside the outputs folder (the repository's
`subgraphs/` for `outputs/`), in the viewer document's conventions:

    {"name": NAME, "profile": PROFILE, "prompt": PROMPT,
     "qParams": {"pinnedIds": [node_id, ...], "supernodes": [[name, node_id, ...], ...]}}

Node ids are the viewer document's (`tracer.graph.viewer.node_ids`). Every supernode member is
pinned. The track stage logs the files with the prompt's MLflow run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from tracer.atomic import write_json
from tracer.graph.graph import Graph
from tracer.graph.pruning import GraphScores
from tracer.graph.viewer import node_ids

SUBGRAPHS_DIR = "subgraphs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,79}$")


@dataclass(frozen=True)
class Subgraph:
    """Pinned node ids (in pinning order) and supernodes `(name, member ids)` of one graph."""

    name: str = "subgraph"
    pinned: tuple[str, ...] = ()
    supernodes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name, "subgraph name")
        if len(set(self.pinned)) != len(self.pinned):
            raise ValueError(f"subgraph {self.name!r} pins a node twice")
        names = [name for name, _ in self.supernodes]
        if len(set(names)) != len(names):
            raise ValueError(f"subgraph {self.name!r} has two supernodes of one name")
        pinned = set(self.pinned)
        for name, members in self.supernodes:
            if not name.strip():
                raise ValueError(f"subgraph {self.name!r} has a supernode without a name")
            if not members:
                raise ValueError(f"supernode {name!r} has no members")
            loose = [m for m in members if m not in pinned]
            if loose:
                raise ValueError(f"supernode {name!r} groups nodes that are not pinned: {loose}")

    # ---- editing (each returns a new Subgraph) --------------------------------------------------
    def pin(self, node_ids: Iterable[str]) -> Subgraph:
        added = [n for n in dict.fromkeys(node_ids) if n not in self.pinned]
        return Subgraph(self.name, self.pinned + tuple(added), self.supernodes)

    def unpin(self, node_ids: Iterable[str]) -> Subgraph:
        """Unpinned nodes leave their supernodes too; a supernode left empty goes."""
        gone = set(node_ids)
        supernodes = tuple(
            (name, kept)
            for name, members in self.supernodes
            if (kept := tuple(m for m in members if m not in gone))
        )
        return Subgraph(self.name, tuple(n for n in self.pinned if n not in gone), supernodes)

    def group(self, name: str, members: Iterable[str]) -> Subgraph:
        """A supernode `name` of `members` (pinned here if they were not); replaces one of that
        name; a node belongs to one supernode at a time."""
        name = name.strip()
        members = tuple(dict.fromkeys(members))
        moved = set(members)
        others = tuple(
            (other, kept)
            for other, old in self.supernodes
            if other != name and (kept := tuple(m for m in old if m not in moved))
        )
        return Subgraph(self.name, self.pin(members).pinned, (*others, (name, members)))

    def ungroup(self, name: str) -> Subgraph:
        kept = tuple(s for s in self.supernodes if s[0] != name)
        return Subgraph(self.name, self.pinned, kept)

    def renamed(self, name: str) -> Subgraph:
        return Subgraph(name, self.pinned, self.supernodes)

    # ---- the file's document --------------------------------------------------------------------
    def document(self, profile: str, prompt: str) -> dict:
        supernodes = [[name, *members] for name, members in self.supernodes]
        return {
            "name": self.name,
            "profile": profile,
            "prompt": prompt,
            "qParams": {"pinnedIds": list(self.pinned), "supernodes": supernodes},
        }

    @classmethod
    def from_document(cls, document: object, known_ids: Collection[str] | None = None) -> Subgraph:
        """The subgraph of a file's document; ValueError naming what is wrong (a missing or
        mistyped field, node ids not in `known_ids` when given)."""
        if not isinstance(document, dict):
            raise ValueError(f"a subgraph is a JSON object, got {type(document).__name__}")
        params = document.get("qParams")
        if not isinstance(params, dict):
            raise ValueError(
                'a subgraph needs "qParams": {"pinnedIds": [...], "supernodes": [...]}'
            )
        pinned = params.get("pinnedIds", [])
        if isinstance(pinned, str):  # the web viewer's URL form: ids joined by commas
            pinned = [p for p in pinned.split(",") if p]
        if not isinstance(pinned, list) or not all(isinstance(p, str) for p in pinned):
            raise ValueError('"qParams.pinnedIds" must be a list of node id strings')
        supernodes = []
        for entry in params.get("supernodes", []):
            if not (
                isinstance(entry, list)
                and len(entry) >= 2
                and all(isinstance(e, str) for e in entry)
            ):
                raise ValueError(
                    '"qParams.supernodes" entries must be [name, node_id, node_id, ...], '
                    f"got {entry!r}"
                )
            supernodes.append((entry[0], tuple(entry[1:])))
        grouped = [m for _, members in supernodes for m in members]
        pinned = list(dict.fromkeys([*pinned, *grouped]))
        if known_ids is not None:
            unknown = [n for n in pinned if n not in known_ids]
            if unknown:
                shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
                raise ValueError(
                    f"{len(unknown)} node id(s) are not nodes of this graph: {shown} (node ids "
                    "look like 3_517_4 for features, 3_-1_4 for errors, E_262_0 for tokens)"
                )
        name = document.get("name", "subgraph")
        if not isinstance(name, str):
            raise ValueError(f'"name" must be a string, got {name!r}')
        return cls(name, tuple(pinned), tuple(supernodes))


def check_name(name: str, what: str) -> None:
    """A name usable as a file name: letters, digits, `.`, `_`, `-`, spaces; at most 80."""
    if not isinstance(name, str) or not _NAME.match(name) or name.strip() != name:
        raise ValueError(
            f"{what} must be 1-80 letters, digits, '.', '_', '-' or spaces, starting with a "
            f"letter or digit, got {name!r}"
        )


# ---- scores -------------------------------------------------------------------------------------
def node_indices(graph: Graph, ids: Iterable[str]) -> list[int]:
    """Node indices of the full graph for viewer node ids; ValueError naming unknown ones."""
    index = {node_id: i for i, node_id in enumerate(node_ids(graph))}
    ids = list(ids)
    unknown = [n for n in ids if n not in index]
    if unknown:
        raise ValueError(f"node ids not in the graph: {', '.join(unknown[:8])}")
    return [index[n] for n in ids]


def subgraph_scores(graph: Graph, subgraph: Subgraph) -> GraphScores:
    """Replacement and completeness of the pinned nodes (tokens and logits always kept, every
    edge between kept nodes kept, everything else counted as error), as `Graph.subgraph_scores`."""
    return graph.subgraph_scores(node_indices(graph, subgraph.pinned))


# ---- files --------------------------------------------------------------------------------------
def subgraphs_dir(project: Path, profile: str, prompt: str) -> Path:
    """Where a graph's subgraphs are saved: `project/subgraphs/PROFILE/PROMPT`."""
    return Path(project) / SUBGRAPHS_DIR / profile / prompt


def subgraph_files(project: Path, profile: str, prompt: str) -> list[Path]:
    """The saved subgraph files of a graph, sorted by name; [] when there are none."""
    folder = subgraphs_dir(project, profile, prompt)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def save_subgraph(project: Path, profile: str, prompt: str, subgraph: Subgraph) -> Path:
    """Write `subgraph` to `NAME.json` of the graph's subgraph folder (atomically)."""
    path = subgraphs_dir(project, profile, prompt) / f"{subgraph.name}.json"
    return write_json(path, subgraph.document(profile, prompt))


def load_subgraph(path: Path, known_ids: Collection[str] | None = None) -> Subgraph:
    """A saved subgraph; ValueError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON subgraph file ({err})") from err
    try:
        return Subgraph.from_document(document, known_ids)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

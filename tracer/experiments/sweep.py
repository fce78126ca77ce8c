"""Attribution over many prompts: the per-prompt work of the attribute stage, and `tracer sweep`.

`attribute_files` is one job of either: a prompt's graph file, as bytes, and its run record. The
attribute stage writes these into `outputs/graphs/PROFILE/`; a sweep writes them into its own
folder, for prompt sets too big for params.yaml:

    OUT/PROFILE/PROMPT.safetensors   the full graph (the same bytes as `tracer attribute` writes)
    OUT/PROFILE/PROMPT.json          what it was computed from: `inputs` (a hash), the prompt,
                                     the resolved profile, the settings; and its run record
    OUT/sweep.json                   the last run: counts, failed prompts with their errors, and
                                     the MLflow parent run, which a resumed sweep logs into again

A prompt whose graph and record exist with the same inputs hash is skipped, so a sweep that was
interrupted, or that had failures, finishes only what is missing when run again. The hash covers
the prompt's text and targets, the model and transcoders (source, commit, content hash), dtype,
the attribution settings and the library version.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from tracer.atomic import atomic_path, write_json
from tracer.experiments.execution import Job, Outcome, files_of, run_jobs
from tracer.experiments.fetched import load_model
from tracer.experiments.outputs import GRAPH_SUFFIX
from tracer.experiments.params import AttributionParams, ExecutionParams, PromptSpec
from tracer.graph.graph import Graph, library_version

SWEEP_FILE = "sweep.json"
RECORD_SUFFIX = ".json"


# ---- one prompt's attribution (also the attribute stage's) -------------------------------------
def attribute_prompt(model, spec: PromptSpec, settings: AttributionParams) -> tuple[Graph, dict]:
    """One prompt's graph and its run record: seconds per phase and, in bytes, the growth of the
    process's peak RSS during this attribution (as the benchmarks measure it)."""
    from tracer.attribution.attribute import attribute
    from tracer.memory import peak_growth

    start = time.perf_counter()
    graphs: list[Graph] = []
    growth = peak_growth(
        lambda: graphs.append(
            # params.yaml's `attribution:` keys are `attribute`'s own keyword arguments
            attribute(
                spec.text, model, targets=spec.targets, progress=False, **settings.model_dump()
            )
        )
    )
    (graph,) = graphs
    timings = graph.metadata.pop("timings")
    record = {
        "seconds": timings | {"total": time.perf_counter() - start},
        "attribution_peak_growth_bytes": growth,
    }
    return graph, record


def attribute_files(model, spec: PromptSpec, *, settings: AttributionParams) -> dict:
    """A job: {"files": {"PROMPT.safetensors": bytes}, "record": run record, "summary": sizes
    and scores of the full graph}."""
    graph, record = attribute_prompt(model, spec, settings)
    files = files_of(lambda folder: graph.save(folder / f"{spec.id}{GRAPH_SUFFIX}"))
    scores = graph.scores()
    summary = {
        "nodes": int(graph.adjacency_matrix.shape[0]),
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": int(graph.selected_features.shape[0]),
        "replacement": float(scores.replacement),
        "completeness": float(scores.completeness),
    }
    return {"files": files, "record": record, "summary": summary}


# ---- a sweep's inputs --------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[PromptSpec]:
    """Prompts from a text file (one per line, id `line-N` for line N; blank lines skipped) or
    JSON lines (`{"id", "text", "targets"?}` per line; `.jsonl`, or a first line starting `{`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = path.read_text().splitlines()
    first = next((line for line in lines if line.strip()), "")
    as_json = path.suffix == ".jsonl" or first.lstrip().startswith("{")
    prompts: list[PromptSpec] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line) if as_json else {"id": f"line-{number}", "text": line.strip()}
            prompts.append(PromptSpec.model_validate(raw))
        except (ValueError, ValidationError) as err:
            reason = str(err).splitlines()[-1].strip() if isinstance(err, ValidationError) else err
            form = '{"id": "...", "text": "...", "targets": [...]}' if as_json else "text"
            raise ValueError(
                f"{path}:{number}: not a valid prompt ({reason}); expected {form}"
            ) from None
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt")
    ids = [p.id for p in prompts]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate prompt id(s) {duplicates}; each id must be unique")
    return prompts


def with_absolute_paths(fetched: dict) -> dict:
    """`fetched` with its model and transcoder folders absolute: workers on other nodes, in other
    directories, find them at the same path."""
    parts = ("model", "transcoders")
    return fetched | {
        p: {**fetched[p], "path": str(Path(fetched[p]["path"]).resolve())} for p in parts
    }


def inputs_hash(fetched: dict, spec: PromptSpec, settings: AttributionParams) -> str:
    """What decides a prompt's graph: identical hashes, identical graphs."""
    identity = {
        part: {k: fetched[part][k] for k in ("source", "revision", "sha256")}
        for part in ("model", "transcoders")
    }
    document = {
        "profile": identity | {"dtype": fetched["dtype"]},
        "prompt": {"text": spec.text, "targets": spec.targets},
        "attribution": settings.model_dump(),
        "library_version": library_version(),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ---- the sweep ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptRecord:
    """A finished prompt of a sweep: where its files are and what its record says."""

    profile: str
    prompt_id: str
    graph: Path
    record_path: Path
    record: dict

    @property
    def name(self) -> str:
        return f"{self.profile}/{self.prompt_id}"


@dataclass
class SweepReport:
    finished: list[PromptRecord] = field(default_factory=list)  # computed now
    skipped: list[PromptRecord] = field(default_factory=list)  # found with the same inputs
    failed: list[Outcome] = field(default_factory=list)


def prompt_paths(out: Path, profile: str, prompt_id: str) -> tuple[Path, Path]:
    folder = Path(out) / profile
    return folder / f"{prompt_id}{GRAPH_SUFFIX}", folder / f"{prompt_id}{RECORD_SUFFIX}"


def existing(out: Path, profile: str, spec: PromptSpec, key: str) -> PromptRecord | None:
    """The prompt's finished result when its graph and record exist with inputs hash `key`."""
    graph, record_path = prompt_paths(out, profile, spec.id)
    if not (graph.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None  # unreadable: computed again
    if not isinstance(record, dict) or record.get("inputs") != key:
        return None
    return PromptRecord(profile, spec.id, graph, record_path, record)


def run_sweep(
    profiles: dict[str, dict],
    prompts: list[PromptSpec],
    out: str | Path,
    settings: AttributionParams,
    execution: ExecutionParams,
    *,
    on_result: Callable[[PromptRecord | Outcome], None] | None = None,
) -> SweepReport:
    """Attribute every prompt under every resolved profile (what the fetch stage records, with
    absolute paths: `tracer.cli.sweep_commands.resolve_profile`) into `out`,
    skipping those already there with the same inputs. Each result is written (atomically) as it
    arrives and passed to `on_result` (a skipped one too), as is each failure (an Outcome)."""
    out = Path(out)
    report = SweepReport()
    keys: dict[str, str] = {}
    jobs: list[Job] = []
    for name, fetched in profiles.items():
        for spec in prompts:
            key = inputs_hash(fetched, spec, settings)
            found = existing(out, name, spec, key)
            if found is not None:
                report.skipped.append(found)
                if on_result is not None:
                    on_result(found)
                continue
            job = Job(name, f"{name}/{spec.id}", spec)
            keys[job.key] = key
            jobs.append(job)

    def arrived(outcome: Outcome) -> None:
        if not outcome.ok:
            report.failed.append(outcome)
            if on_result is not None:
                on_result(outcome)
            return
        name, spec = outcome.job.group, outcome.job.payload
        graph, record_path = prompt_paths(out, name, spec.id)
        ((_, data),) = outcome.result["files"].items()
        with atomic_path(graph) as tmp:
            tmp.write_bytes(data)
        record = {
            "inputs": keys[outcome.job.key],
            "profile": name,
            "fetched": profiles[name],
            "prompt": spec.model_dump(),
            "attribution": settings.model_dump(),
            "attempts": outcome.attempts,
            **outcome.result["summary"],
            **outcome.result["record"],
        }
        write_json(record_path, record)  # after the graph: a record vouches for its graph
        result = PromptRecord(name, spec.id, graph, record_path, record)
        report.finished.append(result)
        if on_result is not None:
            on_result(result)

    work = partial(attribute_files, settings=settings)
    run_jobs(profiles, jobs, load_model, work, execution, on_outcome=arrived)
    return report


def write_summary(out: str | Path, report: SweepReport, extra: dict) -> Path:
    """`OUT/sweep.json`: what the last run did, its failures with their errors, and `extra`."""
    return write_json(
        Path(out) / SWEEP_FILE,
        {
            "finished": len(report.finished),
            "skipped": len(report.skipped),
            "failed": {
                o.job.key: {"error": o.error, "attempts": o.attempts} for o in report.failed
            },
            **extra,
        },
    )


def read_summary(out: str | Path) -> dict:
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}

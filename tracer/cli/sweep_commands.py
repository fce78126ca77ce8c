"""`tracer sweep`: attribute a prompts file under one or more profiles, here or on a Ray cluster.

Resumable (prompts already attributed with the same inputs are skipped), one MLflow parent run
with a nested run per prompt; see `tracer.experiments.sweep` for the folder's layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tracer.cli.parser import graph_size


def execution_settings(args: argparse.Namespace):
    from tracer.experiments.params import ExecutionParams

    names = ("address", "num_cpus", "num_gpus", "memory", "workers", "threads", "retries")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return ExecutionParams(engine=args.engine, **given)


def sweep_profiles(args: argparse.Namespace) -> dict:
    """{name: Profile}: `--profile` names from the params file, or `--model` + `--transcoders`."""
    from tracer.experiments.params import Profile, load_params

    if args.profile and args.model:
        raise ValueError("give --profile NAME (repeatable) or --model and --transcoders, not both")
    if args.model or args.transcoders:
        if not (args.model and args.transcoders):
            raise ValueError("--model and --transcoders go together")
        return {
            args.name: Profile(
                model=args.model,
                transcoders=args.transcoders,
                revision=args.revision,
                transcoder_revision=args.transcoder_revision,
                dtype=args.dtype,
            )
        }
    if not args.profile:
        raise ValueError("name the profile(s): --profile NAME, or --model and --transcoders")
    profiles = load_params(args.params).profiles
    unknown = [name for name in args.profile if name not in profiles]
    if unknown:
        raise ValueError(f"unknown profile(s) {unknown}; {args.params} defines {sorted(profiles)}")
    return {name: profiles[name] for name in dict.fromkeys(args.profile)}


def resolve_profile(profile) -> dict:
    """What the fetch stage records for a profile (sources pinned, content hashed), with local
    folders made absolute so that workers in other directories find them."""
    from tracer.experiments.fetch import fetch_profile
    from tracer.experiments.sweep import with_absolute_paths

    fetched = fetch_profile(
        profile.model,
        profile.transcoders,
        revision=profile.revision,
        transcoder_revision=profile.transcoder_revision,
    )
    return with_absolute_paths({"dtype": profile.dtype, **fetched})


def sweep(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from tracer.experiments.params import AttributionParams
    from tracer.experiments.sweep import (
        Outcome,
        read_prompts,
        read_summary,
        run_sweep,
        write_summary,
    )

    prompts = read_prompts(args.prompts)
    settings = AttributionParams(desired_logit_prob=args.desired_logit_prob, **graph_size(args))
    execution = execution_settings(args)
    profiles = {name: resolve_profile(p) for name, p in sweep_profiles(args).items()}
    out = Path(args.out)
    tracker = None
    if not args.no_mlflow:  # the store exists before any worker starts
        tracker = _tracker(args, out, read_summary(out).get("parent_run_id"))
    bar = tqdm(total=len(prompts) * len(profiles), unit="prompt", disable=args.quiet)

    def arrived(result) -> None:
        bar.update(1)
        if isinstance(result, Outcome):
            bar.write(f"failed: {result.job.key} ({result.attempts} tries): {result.error}")
        elif tracker is not None:
            _log(tracker, result)

    report = None
    try:
        report = run_sweep(profiles, prompts, out, settings, execution, on_result=arrived)
    finally:
        bar.close()
        if tracker is not None:
            tracker.close(failed=report is None or bool(report.failed))
    extra = {
        "prompts_file": str(Path(args.prompts).resolve()),
        "profiles": sorted(profiles),
        "engine": execution.engine,
        "parent_run_id": tracker.parent_id if tracker is not None else None,
    }
    write_summary(out, report, extra)
    print(
        f"tracer sweep: {len(report.finished)} attributed, {len(report.skipped)} already there, "
        f"{len(report.failed)} failed ({out / 'sweep.json'})"
    )
    if report.failed:
        for outcome in report.failed:
            print(f"  {outcome.job.key}: {outcome.error}", file=sys.stderr)
        raise SystemExit(1)


def _tracker(args: argparse.Namespace, out: Path, parent_run_id: str | None):
    from tracer.experiments.tracking import SweepTracker, git_tags, tracking_uri
    from tracer.graph.graph import library_version

    tags = git_tags(os.getcwd()) | {
        "tracer.version": library_version(),
        "tracer.sweep": str(out.resolve()),
    }
    uri = tracking_uri("mlflow.db")
    return SweepTracker(uri, args.experiment, f"sweep {out.name}", parent_run_id, tags)


def _log(tracker, result) -> None:
    record = result.record
    params = {"profile": result.profile, "prompt_id": result.prompt_id}
    for part, field in (("model", "model"), ("transcoders", "transcoders")):
        params[field] = record["fetched"][part]["source"]
    params["revision"] = record["fetched"]["model"]["revision"]
    params["transcoder_revision"] = record["fetched"]["transcoders"]["revision"]
    params["dtype"] = record["fetched"]["dtype"]
    params |= record["attribution"]
    names = ("nodes", "active_features", "selected_features", "replacement", "completeness")
    metrics = {name: record.get(name) for name in names}
    seconds = dict(record.get("seconds") or {})
    metrics["total_seconds"] = seconds.pop("total", None)
    metrics |= {f"seconds_{phase}": s for phase, s in seconds.items()}
    metrics["attribution_peak_growth_bytes"] = record.get("attribution_peak_growth_bytes")
    tracker.log(result.name, record["inputs"], params, metrics, [result.record_path])

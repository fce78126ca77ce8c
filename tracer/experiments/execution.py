"""Where per-(profile, prompt) work runs: in this process, or fanned out over a Ray cluster.

A caller describes its work as `Job`s (one per profile and prompt), a `load` function (what a
worker loads once per profile: a model, a tokenizer) and a `work` function (one job's result),
and `run_jobs` returns one `Outcome` per job, calling back as each finishes:

- `engine: local` loads each profile once and runs its jobs one after the other, here.
- `engine: ray` starts, per profile, up to `workers` Ray actors (`num_cpus`, `num_gpus` and
  `memory` reserved each); an actor loads the profile once and then runs one job at a time, the
  driver handing the next job to whichever actor is free. An actor whose profile has no jobs left
  is released, so the next profile's actors get its resources.

Results travel back to the driver, which writes every file: no shared output storage is needed
and the stage's folder has a single writer, swapped in atomically. `work` returns files as bytes
(`files_of` writes them with the same code as the local engine), so the outputs are byte-identical
whatever the engine. Inputs are read by path: every node needs the model and transcoder folders
at the same path (the checkout, `dvc pull`, or a shared file system); stage outputs a job reads
(graphs) travel with the job. On CPU, torch's sums depend on its thread count, so workers use the
driver's thread count unless `threads` says otherwise.

Faults: a job that raises, or whose worker dies (killed, out of memory), is tried again up to
`retries` times; a dead worker is replaced (the replacement loads its profile again). A job that
fails every try becomes an Outcome with its error; the other jobs' results are unaffected.

Fault injection for tests (real failures, in the worker): `TRACER_FAULT=MODE:JOB_KEY[:MARKER]`
(several joined by commas) makes the job `JOB_KEY` raise (`raise`), raise only while the file
MARKER does not exist yet (`raise-once`: the failing try creates it) or kill its own worker
process with SIGKILL (`kill-once`, likewise once).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer.experiments.params import ExecutionParams

FAULT_VARIABLE = "TRACER_FAULT"
FAULT_MODES = ("raise", "raise-once", "kill-once")
_JOB_ENVIRONMENT = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray Jobs for a submitted driver


@dataclass(frozen=True)
class Job:
    """One unit of work: `payload` handed to `work` with what `load` returned for `group`."""

    group: str  # jobs of one group share a loaded model (a profile)
    key: str  # unique, e.g. "PROFILE/PROMPT"
    payload: Any = None


@dataclass(frozen=True)
class Outcome:
    job: Job
    result: Any = None
    error: str | None = None  # the last try's error when every try failed
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


class JobsFailed(RuntimeError):
    """Some jobs failed every try; the message lists each with its error."""

    def __init__(self, failed: list[Outcome]):
        self.failed = failed
        lines = [f"{o.job.key} ({o.attempts} tries): {o.error}" for o in failed]
        super().__init__(f"{len(failed)} task(s) failed:\n  " + "\n  ".join(lines))


def run_jobs(
    groups: dict[str, Any],
    jobs: Iterable[Job],
    load: Callable[[Any], Any],
    work: Callable[[Any, Any], Any],
    execution: ExecutionParams,
    *,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run every job: `work(load(groups[job.group]), job.payload)`; outcomes in the jobs' order.

    `load` and `work` must be importable module-level functions (or partials of them) for Ray.
    """
    jobs = list(jobs)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"job keys must be unique, got duplicates in {keys}")
    unknown = sorted({j.group for j in jobs} - set(groups))
    if unknown:
        raise ValueError(f"jobs name groups {unknown} that are not among {sorted(groups)}")
    faults = _fault_from_environment()
    done: dict[str, Outcome] = {}

    def finish(outcome: Outcome) -> None:
        done[outcome.job.key] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    if execution.engine == "local":
        _run_here(groups, jobs, load, work, execution.retries, faults, finish)
    else:
        _run_on_ray(groups, jobs, load, work, execution, faults, finish)
    return [done[key] for key in keys]


def raise_failures(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise JobsFailed(failed)


# ---- files as bytes ----------------------------------------------------------------------------
def files_of(fill: Callable[[Path], None]) -> dict[str, bytes]:
    """Run `fill(folder)` on an empty temporary folder; its files as {relative path: bytes}."""
    folder = Path(tempfile.mkdtemp(prefix="tracer-job-"))
    try:
        fill(folder)
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_bytes_as_file(data: bytes, read: Callable[[Path], Any], suffix: str = "") -> Any:
    """`read(path)` of a temporary file holding `data`: an input file that travelled with a job."""
    with tempfile.TemporaryDirectory(prefix="tracer-job-") as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        return read(path)


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write what `files_of` returned under `folder` (a stage's temporary output folder)."""
    for name, data in files.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ---- one try of one job, in whichever process runs it ------------------------------------------
@dataclass(frozen=True)
class Fault:
    mode: str
    key: str
    marker: str | None = None


def _fault_from_environment() -> tuple[Fault, ...]:
    faults = []
    for spec in filter(None, os.environ.get(FAULT_VARIABLE, "").split(",")):
        mode, _, rest = spec.partition(":")
        key, _, marker = rest.partition(":")
        if mode not in FAULT_MODES or not key or (mode != "raise" and not marker):
            raise ValueError(
                f"{FAULT_VARIABLE} must be MODE:JOB_KEY[:MARKER_FILE][,...] with MODE among "
                f"{', '.join(FAULT_MODES)} (the -once modes need a marker file), got {spec!r}"
            )
        faults.append(Fault(mode, key, marker or None))
    return tuple(faults)


def _inject(faults: tuple[Fault, ...], key: str) -> None:
    for fault in faults:
        if fault.key != key:
            continue
        if fault.mode == "raise":
            raise RuntimeError(f"injected fault: {key} always fails")
        try:  # the first try creates the marker (atomically) and fails; later tries pass
            os.close(os.open(fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if fault.mode == "kill-once":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault: {key} fails once")


def _try(work: Callable, state: Any, job: Job, faults: tuple[Fault, ...]) -> Any:
    _inject(faults, job.key)
    return work(state, job.payload)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# ---- engine: local -----------------------------------------------------------------------------
def _run_here(groups, jobs, load, work, retries, faults, finish) -> None:
    for group in dict.fromkeys(j.group for j in jobs):
        state = load(groups[group])
        for job in (j for j in jobs if j.group == group):
            for attempt in range(1, retries + 2):
                try:
                    finish(Outcome(job, _try(work, state, job, faults), attempts=attempt))
                    break
                except Exception as err:  # noqa: BLE001 - reported with the job, others go on
                    if attempt == retries + 1:
                        finish(Outcome(job, error=_describe(err), attempts=attempt))
        del state  # the next profile's model replaces this one


# ---- engine: ray -------------------------------------------------------------------------------
class _Worker:
    """A Ray actor: loads one group once, then runs its jobs one at a time."""

    def __init__(self, load: Callable, spec: Any, threads: int) -> None:
        self.state = load(spec)
        torch = sys.modules.get("torch")  # loaded by `load` for real work; toy jobs need none
        if torch is not None:
            torch.set_num_threads(threads)  # the same float sums as the driver's process

    def run(self, work: Callable, job: Job, faults: tuple[Fault, ...]) -> Any:
        return _try(work, self.state, job, faults)


@dataclass
class _Group:
    spec: Any
    queue: deque = field(default_factory=deque)  # jobs waiting
    idle: list = field(default_factory=list)  # actors without a job


def _run_on_ray(groups, jobs, load, work, execution, faults, finish) -> None:
    import ray
    import torch
    from ray.exceptions import RayActorError, RayError, RayTaskError

    state = {name: _Group(spec) for name, spec in groups.items()}
    for job in jobs:
        state[job.group].queue.append(job)
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Any, Job]] = {}  # result ref -> (actor, job)
    started = connect(execution.address)
    try:
        actor_class = ray.remote(_Worker).options(
            num_cpus=execution.num_cpus,
            num_gpus=execution.num_gpus,
            memory=execution.memory,
            max_restarts=0,  # the driver replaces a dead worker and re-queues its job
            max_concurrency=1,
        )
        threads = execution.threads or torch.get_num_threads()
        size = execution.workers or _capacity(ray.cluster_resources(), execution)
        for group in state.values():
            for _ in range(min(size, len(group.queue))):
                group.idle.append(actor_class.remote(load, group.spec, threads))
        while running or any(g.queue for g in state.values()):
            for group in state.values():
                while group.queue and group.idle:
                    actor, job = group.idle.pop(), group.queue.popleft()
                    attempts[job.key] = attempts.get(job.key, 0) + 1
                    running[actor.run.remote(work, job, faults)] = (actor, job)
                _release_idle(ray, group)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            group = state[job.group]
            retry = attempts[job.key] <= execution.retries
            try:
                result = ray.get(ref)
            except RayError as err:
                if isinstance(err, RayTaskError) and not isinstance(err, RayActorError):
                    group.idle.append(actor)  # the job raised; its worker is fine
                    cause = err.cause if err.cause is not None else err
                else:  # the worker died (killed, out of memory): replace it if still needed
                    ray.kill(actor, no_restart=True)
                    cause = err
                    if group.queue or retry:
                        group.idle.append(actor_class.remote(load, group.spec, threads))
                if retry:
                    group.queue.appendleft(job)
                else:
                    finish(Outcome(job, error=_describe(cause), attempts=attempts[job.key]))
            else:
                group.idle.append(actor)
                finish(Outcome(job, result, attempts=attempts[job.key]))
            _release_idle(ray, group)
    finally:
        for actor in [a for g in state.values() for a in g.idle] + [a for a, _ in running.values()]:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _release_idle(ray, group: _Group) -> None:
    """Free the resources of actors whose group has no job left for them."""
    while group.idle and len(group.idle) > len(group.queue):
        ray.kill(group.idle.pop(), no_restart=True)


def _capacity(resources: dict, execution: ExecutionParams) -> int:
    """How many workers of this size the cluster holds now (at least one: an autoscaler may add
    nodes for pending ones)."""
    wanted = {"CPU": execution.num_cpus, "GPU": execution.num_gpus, "memory": execution.memory}
    fits = [resources.get(name, 0) / need for name, need in wanted.items() if need]
    short = [name for name, need in wanted.items() if need and resources.get(name, 0) < need]
    if short:  # not an error: an autoscaler may still add such nodes
        print(
            f"ray: the cluster has no room for one worker yet ({', '.join(short)} short of "
            f"num_cpus={execution.num_cpus}, num_gpus={execution.num_gpus}, "
            f"memory={execution.memory}); waiting for the cluster to grow",
            file=sys.stderr,
        )
    return max(1, int(min(fits, default=1)))


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address`, or start a local instance (None); True when this call
    started or joined it (and the caller should shut it down), False when already connected."""
    import ray

    if ray.is_initialized():
        return False
    start = time.perf_counter()
    # the job's own code (the checkout: `pipelines`) must import on the workers, from the same
    # path; a Ray Job brings its own (`--working-dir`), which wins
    runtime_env = None
    if _JOB_ENVIRONMENT not in os.environ:
        runtime_env = {"env_vars": {"PYTHONPATH": _python_path()}}
    if address is None:
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    print(f"ray: connected in {time.perf_counter() - start:.1f} s ({address or 'local instance'})")
    return True


def _python_path() -> str:
    entries = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(e for e in entries if e))

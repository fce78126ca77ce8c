"""tracer/experiments/execution.py: jobs here and on a local Ray instance (2 CPUs, 127.0.0.1).

The jobs are tiny (an offset added to a number, `ray_cluster.add_offset`), so these tests time the
engine, not attribution: results equal the local engine's and the direct computation, each
worker loads its group once, and faults are real — a job that raises, a worker process that kills
itself (SIGKILL) mid-job, a job that always fails. Budget: ~25 s, most of it starting Ray and
its worker processes.
"""

from __future__ import annotations

import pytest
import ray_cluster

from tracer.experiments.execution import FAULT_VARIABLE, Job, JobsFailed, raise_failures, run_jobs
from tracer.experiments.params import ExecutionParams

GROUPS = {"a": {"offset": 100}, "b": {"offset": 1000}}
JOBS = [Job(group, f"{group}/{n}", n) for group in GROUPS for n in range(4)]


def expected(job: Job) -> int:
    return job.payload + GROUPS[job.group]["offset"]


def ray_settings(workers: int = 1, **extra) -> ExecutionParams:
    return ExecutionParams(engine="ray", num_cpus=1, workers=workers, **extra)


def run(execution: ExecutionParams, **kwargs) -> dict:
    outcomes = run_jobs(
        GROUPS, JOBS, ray_cluster.load_offset, ray_cluster.add_offset, execution, **kwargs
    )
    assert [o.job for o in outcomes] == JOBS  # in the jobs' order, whatever finished first
    return {o.job.key: o for o in outcomes}


@pytest.fixture(scope="module")
def local_ray():
    with ray_cluster.local_ray(num_cpus=2) as temp_dir:
        yield temp_dir


def test_local_engine_runs_every_job_once_per_loaded_group() -> None:
    seen = []
    outcomes = run(ExecutionParams(), on_outcome=seen.append)
    assert [o.job.key for o in seen] == [j.key for j in JOBS]
    for job in JOBS:
        assert outcomes[job.key].result["value"] == expected(job)
        assert outcomes[job.key].attempts == 1


def test_ray_engine_equals_local_and_loads_each_group_once_per_worker(local_ray) -> None:
    import os

    seen = []
    outcomes = run(ray_settings(workers=2), on_outcome=seen.append)
    assert sorted(o.job.key for o in seen) == sorted(j.key for j in JOBS)
    for group in GROUPS:
        results = [outcomes[j.key].result for j in JOBS if j.group == group]
        assert [r["value"] for r in results] == [expected(j) for j in JOBS if j.group == group]
        # the state a job used was loaded by the worker that ran it, in another process
        assert all(r["loaded_by"] == r["pid"] != os.getpid() for r in results)
        assert len({r["pid"] for r in results}) <= 2  # at most `workers` loads per group


def test_faults_are_retried_or_reported_and_the_other_jobs_complete(
    local_ray, tmp_path, monkeypatch
) -> None:
    """One run, three real faults: a job raises once; a worker process is killed (SIGKILL) in the
    middle of a job; a job raises every time."""
    raised, killed = tmp_path / "raised", tmp_path / "killed"
    monkeypatch.setenv(FAULT_VARIABLE, f"raise-once:a/2:{raised},kill-once:b/1:{killed},raise:a/0")
    outcomes = run(ray_settings(retries=2))
    assert raised.is_file() and killed.is_file()  # both faults fired, in the workers
    for key in ("a/2", "b/1"):  # each failed once, then succeeded
        assert outcomes[key].ok and outcomes[key].attempts == 2
    # the killed job's retry ran in a process that loaded its group itself
    assert outcomes["b/1"].result["loaded_by"] == outcomes["b/1"].result["pid"]
    failed = outcomes.pop("a/0")
    assert not failed.ok and failed.attempts == 3  # 1 + retries
    assert "injected fault: a/0 always fails" in failed.error
    assert all(o.ok and o.result["value"] == expected(o.job) for o in outcomes.values())
    with pytest.raises(JobsFailed, match=r"a/0 \(3 tries\): RuntimeError: injected fault"):
        raise_failures([failed, *outcomes.values()])


def test_local_engine_retries_and_reports_too(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "raised"
    monkeypatch.setenv(FAULT_VARIABLE, f"raise-once:b/3:{marker}")
    outcomes = run(ExecutionParams(retries=1))
    assert outcomes["b/3"].ok and outcomes["b/3"].attempts == 2
    monkeypatch.setenv(FAULT_VARIABLE, "raise:b/3")
    outcomes = run(ExecutionParams(retries=0))
    assert outcomes["b/3"].error and outcomes["b/3"].attempts == 1
    assert all(o.ok for key, o in outcomes.items() if key != "b/3")


@pytest.mark.parametrize(
    "spec", ["explode:a/0", "raise-once:a/0", "raise", "kill-once:a/0"], ids=str
)
def test_a_malformed_fault_spec_is_refused(spec: str, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_VARIABLE, spec)
    with pytest.raises(ValueError, match=f"{FAULT_VARIABLE} must be MODE:JOB_KEY"):
        run(ExecutionParams())


def test_bad_jobs_are_refused() -> None:
    with pytest.raises(ValueError, match="job keys must be unique"):
        run_jobs(
            GROUPS,
            [JOBS[0], JOBS[0]],
            ray_cluster.load_offset,
            ray_cluster.add_offset,
            ExecutionParams(),
        )
    with pytest.raises(ValueError, match=r"groups \['c'\]"):
        run_jobs(
            GROUPS,
            [Job("c", "c/0", 0)],
            ray_cluster.load_offset,
            ray_cluster.add_offset,
            ExecutionParams(),
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("engine", "dask", "Input should be 'local' or 'ray'"),
        ("address", "http://head:8265", "address must be `auto`"),
        ("memory", "8 bananas", "memory must be bytes or a size"),
        ("retries", -1, "greater than or equal to 0"),
        ("num_cpus", 0, "greater than 0"),
    ],
)
def test_execution_settings_are_validated(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExecutionParams(**{field: value})
    assert ExecutionParams(memory="1.5GiB").memory == int(1.5 * 2**30)
    assert ExecutionParams(memory="500MB").memory == 500 * 10**6

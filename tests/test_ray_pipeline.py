"""`dvc repro` with `execution.engine: ray`: the attribute, prune and validate stages fan out over a
Ray head started on 127.0.0.1 and write the same bytes as the local engine, so dvc.lock records
the same output hashes.

Works in a clone (as tests/test_pipeline.py, whose helpers it uses) carrying the working tree's
changes, cut down to one zoo profile and two prompts. The local run goes first; then params.yaml
points the stages at the head (`execution.address`) and the three stages are forced to run
again. Switching engines is no stage dependency (it changes no result), hence `--force`. Stages
run one by one (`--single-item`): the stages upstream (the zoo, the feature pages), committed
with their outputs, are not this test's business (a working tree with changes to their code
would rebuild them).
Budget: ~2.5 minutes on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import ray_cluster
import yaml
from test_pipeline import PROFILE, REPO, clone_env, cut_down, edit_params, run

STAGES = [f"{stage}@{PROFILE}" for stage in ("attribute", "prune", "validate")]

pytestmark = pytest.mark.slow


def working_tree_clone(tmp_path: Path) -> Path:
    """A clone of the repository with the working tree's uncommitted changes applied and
    committed, cut down to one profile and two prompts."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)

    def listed(*args: str) -> list[str]:
        found = run(REPO, "git", "ls-files", "-z", *args)
        return [name for name in found.split("\0") if name]

    for name in listed("--modified", "--others", "--exclude-standard"):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    for name in listed("--deleted"):
        (clone / name).unlink(missing_ok=True)
    run(clone, "git", "config", "user.name", "tracer tests")
    run(clone, "git", "config", "user.email", "tests@tracer.invalid")
    edit_params(clone, cut_down)
    run(clone, "git", "add", "-A")
    run(clone, "git", "commit", "--quiet", "-m", "test: the working tree, one profile")
    return clone


def stage_outs(clone: Path) -> dict[str, list]:
    stages = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    return {name: stages[name]["outs"] for name in STAGES}


def test_repro_on_ray_records_the_local_output_hashes(tmp_path: Path) -> None:
    clone = working_tree_clone(tmp_path)
    env = clone_env(clone)
    for stage in [f"fetch@{PROFILE}", *STAGES]:
        output = run(clone, "dvc", "repro", "--single-item", stage, env=env)
        assert f"Running stage '{stage}'" in output and "ray:" not in output
    local = stage_outs(clone)
    assert all(local.values())

    with ray_cluster.ray_head(env) as (address, ray_env):

        def on_ray(params: dict) -> None:
            params["execution"] = {"engine": "ray", "address": address, "workers": 2}

        edit_params(clone, on_ray)
        for stage in STAGES:
            output = run(clone, "dvc", "repro", "--force", "--single-item", stage, env=ray_env)
            assert f"Running stage '{stage}'" in output
            assert "ray: connected" in output and address in output
    assert stage_outs(clone) == local

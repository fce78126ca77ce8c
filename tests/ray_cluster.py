"""Ray for tests: a local instance in this process or a head started with `ray start`, both on
127.0.0.1 with their temp dir in a short folder the test owns, stopped and removed at the end.

Ray's unix sockets live under its temp dir and their paths must stay under ~107 characters, so the
folder is a short one under /tmp (pytest's tmp paths are too long), removed when the test ends.
Also the jobs the engine tests run: importable module-level functions, as Ray needs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RAY = Path(sys.executable).parent / "ray"

# offline, no usage report, no token written under $HOME
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def worker_path() -> str:
    """PYTHONPATH for workers: the checkout (`pipelines`, `tracer`) and this folder (jobs below)."""
    return os.pathsep.join([str(REPO), str(TESTS)])


@contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A short temp dir for one Ray instance, held with an exclusive lock: test processes
    running side by side (pytest-xdist) start one Ray instance at a time on this machine."""
    with open(Path(tempfile.gettempdir()) / "tracer-tests-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Live processes of the Ray instance whose temp dir is `temp_dir` (never anyone else's)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(temp_dir) in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_gone(temp_dir: Path, timeout: float = 30) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := ray_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[Path]:
    """`ray.init` in this process (2 CPUs, no dashboard); yields its temp dir. On exit: shutdown
    and the check that none of its processes is left."""
    import ray

    with short_temp_dir() as temp_dir:
        saved = {k: os.environ.get(k) for k in QUIET}
        os.environ.update(QUIET)
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _temp_dir=str(temp_dir),
                _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": {"PYTHONPATH": worker_path()}},
                log_to_driver=False,
            )
            yield temp_dir
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        left = wait_gone(temp_dir)
        assert not left, f"Ray processes left after shutdown: {[p.pid for p in left]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` on 127.0.0.1 (its own temp dir and ports); yields its address and the
    environment for drivers joining it. On exit: exactly this instance's processes are ended
    (`ray stop` would end every Ray of this user), and none may be left."""
    with short_temp_dir() as temp_dir:
        port = free_port()
        env = env | QUIET | {"RAY_TMPDIR": str(temp_dir)}
        start = [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        try:
            done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"ray start failed:\n{done.stdout}\n{done.stderr}"
            yield f"127.0.0.1:{port}", env
        finally:
            for proc in ray_processes(temp_dir):
                try:
                    proc.terminate()
                except psutil.NoSuchProcess:
                    pass
            left = wait_gone(temp_dir, timeout=15)
            for proc in left:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            left = wait_gone(temp_dir)
        assert not left, f"Ray processes left after stopping the head: {[p.pid for p in left]}"


# ---- jobs for the engine tests (run in Ray workers: importable, module level) ------------------
def load_offset(spec: dict) -> dict:
    """A job group's state: an offset and the pid of the worker that loaded it."""
    return {"offset": spec["offset"], "pid": os.getpid()}


def add_offset(state: dict, payload: int) -> dict:
    return {"value": payload + state["offset"], "pid": os.getpid(), "loaded_by": state["pid"]}

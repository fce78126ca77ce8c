"""Shared tiny models and graphs, built once per test session (a few seconds on 2 cores)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.cli import main
from tracer.graph.graph import Graph
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders

TINY_PROMPT = "the capital of the state containing Dallas is"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny matrices: one intra-op thread is far faster than two fighting over a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_replacement_model(kind: str) -> ReplacementModel:
    """GPT-2 family, 2 layers, d_model 32, word-level tokenizer; `kind` from TRANSCODER_KINDS."""
    tokenizer = build_tokenizer()
    model = build_model("gpt2", vocab=len(tokenizer))
    transcoders = build_transcoders(kind, n_layers=2, d_model=32)
    return ReplacementModel(model, transcoders, tokenizer=tokenizer, model_id=f"tiny-gpt2-{kind}")


@pytest.fixture(scope="session")
def tiny_prompt() -> str:
    return TINY_PROMPT


@pytest.fixture(scope="session")
def plt_model() -> ReplacementModel:
    return tiny_replacement_model("plt-relu")


@pytest.fixture(scope="session")
def plt_graph(plt_model: ReplacementModel) -> Graph:
    """The full (unpruned) graph of TINY_PROMPT under a per-layer ReLU transcoder set."""
    return attribute(TINY_PROMPT, plt_model, progress=False)


@pytest.fixture(scope="session")
def clt_graph() -> Graph:
    """The full graph of TINY_PROMPT under a cross-layer transcoder."""
    return attribute(TINY_PROMPT, tiny_replacement_model("clt"), progress=False)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """main(args) with stdout and stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server started in its own session (`start_new_session=True`) and its children."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)

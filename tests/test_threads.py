"""One ReplacementModel used by two threads at once (a Streamlit server runs sessions in threads).

Each thread computes a graph and interventions in every mode for its own prompt; the results must
be bit-for-bit those of running the same jobs one after the other. The sequential reference runs
each job in its own thread too, so that both see the same per-thread torch settings (one intra-op
thread here, see conftest). Two prompts of the same length: the case in which replaying another
prompt's patterns would raise nothing. `lockstep` forces the interleaving that matters: after each
traced pass a thread waits for the other's, so each thread's prompt is recorded between the other's
record and its replays.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.interventions.intervene import (
    ErrorChange,
    FeatureChange,
    TokenChange,
    generate,
    intervene,
)
from tracer.interventions.modes import MODES
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders

PROMPTS = ([0, 5, 9, 17, 3, 22, 41, 8, 30, 11], [0, 12, 40, 6, 33, 2, 19, 27, 50, 14])
CHANGES = [FeatureChange(0, 3, 5, value=1.5), ErrorChange(1, 6, 0.0), TokenChange(2, 0.5)]
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def rm() -> ReplacementModel:
    model = build_model("llama", n_layers=3)
    with ReplacementModel(model, build_transcoders("clt", n_layers=3, d_model=32)) as rm:
        yield rm


def job(rm: ReplacementModel, prompt: list[int]) -> dict[str, torch.Tensor]:
    """A session's work: a graph, interventions in every mode, a generation in every mode."""
    out = {"adjacency": attribute(prompt, rm, progress=False, batch_size=16).adjacency_matrix}
    for mode in MODES:
        out[f"logits {mode}"] = intervene(rm, prompt, CHANGES, mode=mode).logits
        out[f"generated {mode}"] = generate(
            rm, prompt, CHANGES, max_new_tokens=NEW_TOKENS, mode=mode, do_sample=True
        ).tokens
    return out


def run_threads(jobs: list[Callable[[], dict]], at_once: bool) -> list[dict]:
    results: list[dict | BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # reported below, in the test's thread
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
        if not at_once:
            thread.join()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@contextlib.contextmanager
def in_lockstep(rm: ReplacementModel, n_threads: int):
    """After each traced pass, a thread waits (up to 10 s) until every other thread finished one;
    a thread done with its job stops the waiting."""
    barrier = threading.Barrier(n_threads, timeout=10)
    barrier.met = 0  # waits that ended with every thread there
    traced_pass = rm.traced_pass

    @contextlib.contextmanager
    def paced(*args, **kwargs):
        with traced_pass(*args, **kwargs):
            yield
        with contextlib.suppress(threading.BrokenBarrierError):
            if barrier.wait() == 0:
                barrier.met += 1

    rm.traced_pass = paced
    try:
        yield barrier
    finally:
        del rm.traced_pass


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "free"])
def test_two_threads_give_the_sequential_results(rm: ReplacementModel, lockstep: bool):
    sequential = run_threads([lambda p=p: job(rm, p) for p in PROMPTS], at_once=False)
    assert not torch.equal(sequential[0]["logits full"], sequential[1]["logits full"])
    if lockstep:
        with in_lockstep(rm, len(PROMPTS)) as barrier:

            def paced_job(prompt: list[int]) -> dict:
                try:
                    return job(rm, prompt)
                finally:
                    barrier.abort()  # the other thread runs on alone

            concurrent = run_threads([lambda p=p: paced_job(p) for p in PROMPTS], at_once=True)
        # the threads took turns pass by pass, all but the last: a graph is a record and a
        # replay pass, an intervention two passes, a generation one more per new token
        passes = 2 + len(MODES) * (2 + 1 + NEW_TOKENS)
        assert barrier.met >= passes - 1
    else:
        concurrent = run_threads([lambda p=p: job(rm, p) for p in PROMPTS], at_once=True)
    for alone, together in zip(sequential, concurrent, strict=True):
        assert alone.keys() == together.keys()
        for key in alone:
            assert torch.equal(alone[key], together[key]), key

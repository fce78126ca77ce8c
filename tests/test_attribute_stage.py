"""pipelines/attribute.py: the memory figure of a prompt's run record belongs to that prompt.

Measured in a fresh process, as the stage runs (allocator setting first): a short prompt after a
long one must report less than the long one — the process's cumulative peak (`ru_maxrss`, what the
stage logged before) never goes down, and it would also count model loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROWTH = "attribution_peak_growth_bytes"

PROBE = """
import json

import torch

from pipelines.attribute import attribute_prompt
from tracer.experiments.params import AttributionParams, PromptSpec
from tracer.memory import return_freed_memory
from tracer.model.replacement import ReplacementModel
from tracer.testing import FIXTURE_WORDS, build_model, build_tokenizer, build_transcoders

torch.set_num_threads(1)
return_freed_memory()
tokenizer = build_tokenizer()
model = ReplacementModel(
    build_model("gpt2", vocab=len(tokenizer)),
    build_transcoders("clt", n_layers=2, d_model=32),
    tokenizer=tokenizer,
    model_id="tiny",
)
long = " ".join((list(FIXTURE_WORDS) * 2)[:60])
records = {}
for prompt_id, text in [("long", long), ("short", "the capital of Texas is"), ("again", long)]:
    graph, record = attribute_prompt(model, PromptSpec(id=prompt_id, text=text), AttributionParams())
    adjacency = graph.adjacency_matrix
    records[prompt_id] = record | {"adjacency_bytes": adjacency.numel() * adjacency.element_size()}
    del graph, adjacency
print(json.dumps(records))
"""


def test_peak_memory_is_the_growth_during_each_prompt() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout.splitlines()[-1])
    long, short, again = records["long"], records["short"], records["again"]
    assert set(long) == {"seconds", GROWTH, "adjacency_bytes"}
    # the graph's adjacency is allocated during the prompt's attribution and alive at its end
    assert long[GROWTH] >= long["adjacency_bytes"] > 50 * short["adjacency_bytes"]
    assert again[GROWTH] >= again["adjacency_bytes"]
    # a cumulative peak would report at least the long prompt's for the short one
    assert short[GROWTH] < long[GROWTH] / 4

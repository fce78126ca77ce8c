"""DVC stage zoo_transcoders@MODEL: train every transcoder set of params.yaml on one zoo model.

Writes each set in the upstream layout (fp16 weights) and a report per set: fraction of variance
explained per layer, mean L0, dead features, and next-token loss with the set spliced in.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tracer.atomic import write_folder, write_json
from tracer.transcoders.files import load_transcoders, save_transcoders
from tracer.zoo.config import load_zoo_params
from tracer.zoo.layout import load_tokenizer, model_dir, read_corpus, report_path, transcoder_dir
from tracer.zoo.transcoder_training import (
    collect_activations,
    evaluate_transcoders,
    spliced_loss,
    train_transcoders,
)

EVAL_SENTENCES = 2000


def main(name: str) -> None:
    params = load_zoo_params()
    if name not in params.models:
        raise SystemExit(f"unknown zoo model {name!r}; params.yaml defines {sorted(params.models)}")
    zoo = Path(params.out_dir)
    train, _ = read_corpus(zoo)
    tokenizer = load_tokenizer(zoo)
    model = AutoModelForCausalLM.from_pretrained(model_dir(zoo, name), dtype=torch.float32).eval()
    # fit on the first sentences, report on held-back ones
    fit, held = train[:-EVAL_SENTENCES], train[-EVAL_SENTENCES:]
    activations = collect_activations(model, tokenizer, fit, params.activation_tokens)
    eval_activations = collect_activations(model, tokenizer, held, params.activation_tokens // 4)
    reports = {}
    for kind_name, config in params.transcoders.items():
        start = time.perf_counter()
        ts, history = train_transcoders(activations, config, model_name=f"zoo/{name}")
        seconds = time.perf_counter() - start
        target = transcoder_dir(zoo, name, kind_name)
        write_folder(
            target,
            lambda folder, ts=ts: save_transcoders(ts, folder, dtype=torch.float16, overwrite=True),
        )
        shipped = load_transcoders(target)  # report on what ships: fp16 weights read back
        reports[kind_name] = {
            "kind": config.kind,
            "train_seconds": round(seconds, 1),
            "final_loss": history["loss"][-1] if history["loss"] else None,
            **evaluate_transcoders(shipped, eval_activations),
            "next_token_loss": spliced_loss(model, tokenizer, held[:500], shipped),
        }
        print(f"{name}/{kind_name}: {reports[kind_name]}")
    write_json(report_path(zoo, name, "transcoders"), reports)


if __name__ == "__main__":
    main(sys.argv[1])

"""DVC stage zoo_model@NAME: train one zoo language model, save it (fp16) and its accuracy."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tracer.atomic import write_folder, write_json
from tracer.zoo.config import load_zoo_params
from tracer.zoo.layout import load_tokenizer, model_dir, read_corpus, report_path
from tracer.zoo.train import accuracy, build_lm, train_lm


def main(name: str) -> None:
    params = load_zoo_params()
    if name not in params.models:
        raise SystemExit(f"unknown zoo model {name!r}; params.yaml defines {sorted(params.models)}")
    config = params.models[name]
    zoo = Path(params.out_dir)
    train, prompts = read_corpus(zoo)
    tokenizer = load_tokenizer(zoo)
    torch.manual_seed(config.seed)
    model = build_lm(config, tokenizer)
    start = time.perf_counter()
    losses = train_lm(model, tokenizer, train, config)
    seconds = time.perf_counter() - start

    def fill(folder: Path) -> None:
        model.to(torch.float16).save_pretrained(folder)  # shipped in fp16: the zoo stays small
        tokenizer.save_pretrained(folder)

    out = write_folder(model_dir(zoo, name), fill)
    # accuracy of what ships: the fp16 weights, loaded back as float32 the way tracer loads them
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    report = {
        "architecture": config.architecture,
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "train_seconds": round(seconds, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "accuracy": accuracy(shipped, tokenizer, prompts),
    }
    write_json(report_path(zoo, name, "lm"), report)
    print(f"{name}: loss {report['final_loss']:.3f}, accuracy {report['accuracy']}")


if __name__ == "__main__":
    main(sys.argv[1])

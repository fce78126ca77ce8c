"""DVC stage zoo_showcase: the two-hop graph and state swap on the zoo's GPT-2 with its CLT."""

from __future__ import annotations

from pathlib import Path

from tracer.atomic import write_json
from tracer.model.replacement import ReplacementModel
from tracer.zoo.config import load_zoo_params
from tracer.zoo.layout import model_dir, report_path, transcoder_dir
from tracer.zoo.showcase import run_showcase

MODEL, TRANSCODERS = "gpt2", "clt"
CITY, SWAP_CITY = "tampa", "dallas"  # tampa's two-hop sentence is held out of training


def main() -> None:
    zoo = Path(load_zoo_params().out_dir)
    model = ReplacementModel.from_pretrained(
        str(model_dir(zoo, MODEL)), str(transcoder_dir(zoo, MODEL, TRANSCODERS))
    )
    report = run_showcase(model, CITY, SWAP_CITY)
    report |= {"model": MODEL, "transcoders": TRANSCODERS}
    write_json(report_path(zoo, MODEL, "showcase"), report)
    print(report["scores"], report["intervention"])


if __name__ == "__main__":
    main()

"""`params.yaml`, validated: the single source of truth for the pipeline.

Every section is a pydantic model that forbids unknown keys, so a typo fails before any stage runs,
with the offending key's dotted path in the message.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracer.zoo.corpus import CorpusConfig
from tracer.zoo.train import LMConfig
from tracer.zoo.transcoder_training import TranscoderTrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZooParams(_Strict):
    """The embedded model zoo: corpus, models and transcoder sets, built under `out_dir`."""

    out_dir: str = "zoo"
    activation_tokens: int = Field(40000, ge=1000, description="tokens of activations per model")
    corpus: CorpusConfig = CorpusConfig()
    models: dict[str, LMConfig]
    transcoders: dict[str, TranscoderTrainConfig]

    @model_validator(mode="after")
    def _names(self) -> ZooParams:
        for group in (self.models, self.transcoders):
            for name in group:
                if not name.replace("-", "").replace("_", "").isalnum():
                    raise ValueError(f"name {name!r} must be letters, digits, '-' or '_'")
        return self


class Params(_Strict):
    zoo: ZooParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the bad key and what is valid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"{path}: {problems}") from None

"""The zoo's settings (the `zoo:` section of params.yaml): corpus, models and transcoder sets.

Plain pydantic schemas, no torch: the experiment layer's params schema embeds `ZooParams`, and the
zoo stages read their section with `load_zoo_params` without importing anything else of tracer.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASKS = ("single_hop", "two_hop", "ioi", "successor", "antonym")
DEFAULT_MIX = {"single_hop": 0.25, "two_hop": 0.15, "ioi": 0.2, "successor": 0.2, "antonym": 0.2}
ARCHITECTURES = ("gpt2", "llama", "gemma2")
# Transcoder kinds the zoo trains and tests build: per-layer (ReLU, JumpReLU, TopK, with a skip
# term) and cross-layer. Engine code does not use these names: a set says its activation and shape.
KINDS = ("plt-jumprelu", "plt-relu", "plt-topk", "plt-skip", "clt")
_ACTIVATION = {"plt-relu": "relu", "plt-topk": "topk"}  # the other kinds are jumprelu


class CorpusConfig(BaseModel):
    """What `build_corpus` generates: size, task mixture, held-out fractions, seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    n_train: int = Field(20_000, gt=0)  # training sentences, all tasks together
    mix: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX))  # relative weights
    two_hop_held_out: float = Field(0.25, ge=0.0, lt=1.0)  # fraction of cities
    ioi_held_out: float = Field(0.2, ge=0.0, lt=1.0)  # fraction of unordered name pairs
    antonym_held_out: float = Field(0.3, ge=0.0, lt=1.0)  # fraction of pairs without template B
    n_eval_ioi: int = Field(64, gt=0)  # eval prompts per split (held-out pairs, trained pairs)

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        if set(mix) != set(TASKS) or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix must give a weight >= 0 to each of {TASKS}, got {mix}")
        return mix



class LMConfig(BaseModel):
    """Architecture and training settings of one zoo model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = Field("gpt2", description="gpt2 | llama | gemma2")
    n_layers: int = Field(4, ge=1, le=12)
    d_model: int = Field(128, ge=16)
    n_heads: int = Field(4, ge=1)
    d_mlp: int = Field(512, ge=16)
    context: int = Field(64, ge=8)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(100, ge=0)
    seed: int = 0

    def model_post_init(self, _context) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")



class TranscoderTrainConfig(BaseModel):
    """Kind, size and optimisation settings of one transcoder set.

    Sparsity and thresholds live in the normalised space (per-dimension unit variance of x and y).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field("plt-jumprelu", description=" | ".join(KINDS))
    d_transcoder: int = Field(512, ge=1)
    steps: int = Field(2000, ge=0, description="0 returns the initialisation")
    batch_size: int = Field(1024, ge=1, description="tokens per step")
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(100, ge=0, description="steps of linear learning-rate warmup")
    l0_coefficient: float = Field(
        1e-2, ge=0, description="JumpReLU kinds: weight of the mean L0 per layer"
    )
    l1_coefficient: float = Field(
        3e-2, ge=0, description="plt-relu: weight of sum_f a_f |W_dec_f| / sqrt(d_model)"
    )
    top_k: int = Field(16, ge=1, description="plt-topk: active features per token")
    initial_threshold: float = Field(0.5, gt=0, description="JumpReLU threshold at the start")
    bandwidth: float = Field(0.05, gt=0, description="JumpReLU pseudo-derivative kernel width")
    decoder_init_norm: float = Field(0.1, gt=0, description="norm of each initial decoder row")
    seed: int = 0

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return kind

    @property
    def activation(self) -> str:
        return _ACTIVATION.get(self.kind, "jumprelu")



class ZooParams(BaseModel):
    """The embedded model zoo: corpus, models and transcoder sets, built under `out_dir`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


def load_zoo_params(path: str | Path = "params.yaml") -> ZooParams:
    """The `zoo:` section of params.yaml, validated (the whole file is checked by the params stage)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = (yaml.safe_load(path.read_text()) or {}).get("zoo")
    if raw is None:
        raise ValueError(f"{path}: no `zoo:` section")
    try:
        return ZooParams.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{path}: zoo: {err}") from None

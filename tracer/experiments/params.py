"""`params.yaml`, validated: the single source of truth for the pipeline.

Every section is a pydantic model that forbids unknown keys, so a typo fails before any stage runs,
with the offending key's dotted path in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracer.hub import looks_local
from tracer.interventions.modes import MODES
from tracer.zoo.config import ZooParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Profile(_Strict):
    """A model and a transcoder set to attribute with: local folders (the zoo) or hub ids."""

    model: str = Field(min_length=1, description="model folder or hub id")
    transcoders: str = Field(min_length=1, description="transcoder folder or hf:// URI")
    revision: str | None = None
    transcoder_revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    enabled: bool = True


class PromptSpec(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="letters, digits, '-' or '_'")
    text: str = Field(min_length=1)
    targets: list[str] | None = Field(None, min_length=1, description="custom logit tokens")


class AttributionParams(_Strict):
    """Keyword arguments of `tracer.attribute`, by the same names (the attribute stage passes them
    through)."""

    max_feature_nodes: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    max_n_logits: int = Field(10, ge=1)
    desired_logit_prob: float = Field(0.95, gt=0, le=1)
    adjacency_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class PruningParams(_Strict):
    node_threshold: float = Field(0.8, ge=0, le=1)
    edge_threshold: float = Field(0.98, ge=0, le=1)
    sweep: list[tuple[float, float]] = Field(
        default_factory=list, description="(node, edge) threshold pairs for the pruning curve"
    )

    @model_validator(mode="after")
    def _sweep_in_range(self) -> PruningParams:
        for node, edge in self.sweep:
            if not (0 <= node <= 1 and 0 <= edge <= 1):
                raise ValueError(f"sweep thresholds must be in [0, 1], got ({node}, {edge})")
        return self


class ValidationParams(_Strict):
    """Graph validation: ablate the top-N feature nodes and compare with the graph's predictions."""

    top_n: int = Field(10, ge=1, description="feature nodes ablated per graph, by influence")
    modes: list[str] = Field(default_factory=lambda: list(MODES), min_length=1)
    batch_size: int = Field(32, ge=2, description="intervention rows per forward (one baseline)")

    @model_validator(mode="after")
    def _known_distinct_modes(self) -> ValidationParams:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"modes must be among {', '.join(MODES)}, got {unknown}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct, got {self.modes}")
        return self


class TrackingParams(_Strict):
    experiment: str = Field("tracer", min_length=1)


class Params(_Strict):
    zoo: ZooParams
    profiles: dict[str, Profile]
    prompts: list[PromptSpec] = Field(min_length=1)
    attribution: AttributionParams = AttributionParams()
    pruning: PruningParams = PruningParams()
    validation: ValidationParams = ValidationParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        ids = [p.id for p in self.prompts]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(
                f"prompts: duplicate id(s) {duplicates}; each prompt id must be unique"
            )
        if not any(p.enabled for p in self.profiles.values()):
            raise ValueError("profiles: every profile is disabled; enable at least one")
        for name, profile in self.profiles.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"profiles: name {name!r} must be letters, digits, '-' or '_'")
            if profile.enabled:
                for key in ("model", "transcoders"):
                    value = getattr(profile, key)
                    if looks_local(value) and not Path(value).expanduser().exists():
                        raise ValueError(
                            f"profiles.{name}.{key}: local path {value!r} does not exist "
                            "(give an existing folder, a hub id or an hf:// URI)"
                        )
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the bad key and what is valid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None


def _describe(error: dict) -> str:
    """`key.path: message, got VALUE` (model-level messages already name their key)."""
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not where:
        return message
    return f"{where}: {message}, got {error.get('input')!r}"


def main(argv: list[str] | None = None) -> int:
    """`python -m tracer.experiments.params [params.yaml]`: validate, print the error naming the key."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path("params.yaml")
    try:
        load_params(path)
    except (ValueError, FileNotFoundError) as err:
        print(f"invalid parameters: {err}", file=sys.stderr)
        return 2
    print(f"{path}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

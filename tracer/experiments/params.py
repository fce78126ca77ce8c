"""`params.yaml`, validated: the single source of truth for the pipeline.

Every section is a pydantic model that forbids unknown keys, so a typo fails before any stage runs,
with the offending key's dotted path in the message.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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


SUFFIXES = (".txt", ".jsonl")  # a feature-pages dataset file
LOCAL_FOLDERS = ("zoo/corpus", "datasets")  # where local datasets live (the dataset stage's deps)
HUB_PREFIX = "hf://datasets/"


def check_dataset_spec(spec: str) -> str:
    """A valid `features.dataset` value, or ValueError saying what would be valid."""
    if PurePosixPath(spec.partition("@")[0]).suffix not in SUFFIXES:
        raise ValueError(f"dataset must be a .txt or .jsonl file, got {spec!r}")
    if spec.startswith("hf://"):
        parse_dataset_uri(spec)
        return spec
    parts = PurePosixPath(spec).parts
    inside = any(parts[: len(f.split("/"))] == tuple(f.split("/")) for f in LOCAL_FOLDERS)
    if PurePosixPath(spec).is_absolute() or ".." in parts or not inside:
        raise ValueError(
            f"a local dataset must be a file inside {' or '.join(LOCAL_FOLDERS)}/ (the dataset "
            f"stage depends on those folders), or hf://datasets/ORG/NAME/FILE; got {spec!r}"
        )
    return spec


def parse_dataset_uri(uri: str) -> tuple[str, str]:
    """`hf://datasets/ORG/NAME/PATH` -> (repo id, path in repo)."""
    from huggingface_hub import utils as hf_utils

    if not uri.startswith(HUB_PREFIX):
        raise ValueError(f"a hub dataset is hf://datasets/ORG/NAME/FILE, got {uri!r}")
    try:
        parsed = hf_utils.parse_hf_uri(uri)
        hf_utils.validate_repo_id(parsed.id)
    except ValueError as error:
        raise ValueError(f"invalid hub dataset URI {uri!r}: {error}") from None
    if parsed.revision is not None or "@" in parsed.path_in_repo:
        raise ValueError(f"{uri!r}: give the revision as features.dataset_revision, not in the URI")
    if not parsed.path_in_repo:
        raise ValueError(f"{uri!r} names no file of the dataset repo")
    return parsed.id, parsed.path_in_repo


class FeaturesParams(_Strict):
    """Feature pages (`features@SET` stages): the dataset and how pages are built.

    `sets` maps each page set's name to the enabled profile whose model and transcoders build it;
    a transcoder set has at most one entry (profiles sharing it share its pages).
    """

    dataset: str = Field(
        "zoo/corpus/train.txt",
        min_length=1,
        description="a .txt (a text per line) or .jsonl file (a `text_field` per record) in "
        "zoo/corpus/ or datasets/, or hf://datasets/ORG/NAME/FILE",
    )
    dataset_revision: str | None = Field(None, description="hub dataset revision (pin a commit)")
    text_field: str = Field("text", min_length=1, description="the JSONL records' text key")
    n_tokens: int = Field(100_000, ge=1, description="data tokens read from the dataset")
    context: int = Field(16, ge=2, description="tokens per example, start token included")
    top_k: int = Field(16, ge=1, description="top-activating examples per feature")
    quantiles: list[float] = Field([0.5, 0.9], description="band edges, increasing in (0, 1)")
    examples_per_band: int = Field(4, ge=1)
    histogram_bins: int = Field(32, ge=2, description="a power of two")
    batch_size: int = Field(64, ge=1, description="examples per forward pass")
    n_logits: int = Field(10, ge=1, description="top and bottom output logits per feature")
    seed: int = Field(0, ge=0, description="the sample behind the quantile bands")
    sets: dict[str, str] = Field(default_factory=dict, description="page set name -> profile")

    @model_validator(mode="after")
    def _valid_settings(self) -> FeaturesParams:
        q = self.quantiles
        if any(not 0 < x < 1 for x in q) or q != sorted(set(q)):
            raise ValueError(f"features.quantiles must be increasing inside (0, 1), got {q}")
        if self.histogram_bins & (self.histogram_bins - 1):
            raise ValueError(
                f"features.histogram_bins must be a power of two, got {self.histogram_bins}"
            )
        try:
            check_dataset_spec(self.dataset)
        except ValueError as error:
            raise ValueError(f"features.dataset: {error}") from None
        return self


_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_MEMORY_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_ADDRESS = re.compile(r"^(auto|(ray://)?[^\s:/]+:[0-9]+)$")
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


class ExecutionParams(_Strict):
    """Where the attribute, prune and validate stages run their per-(profile, prompt) tasks:
    `local` (this process, one after the other) or `ray` (fanned out over a Ray cluster; see
    `tracer/experiments/execution.py`). The outputs are the same bytes either way."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None,
        description="None: start a local Ray instance; `auto`, `HOST:PORT` or `ray://HOST:PORT`",
    )
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per worker")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per worker")
    memory: int | None = Field(None, ge=1, description="bytes reserved per worker, or '8GiB'")
    workers: int | None = Field(None, ge=1, description="model copies per profile (None: fill)")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (None: ours)")
    retries: int = Field(2, ge=0, description="tries after the first, per task")

    @field_validator("address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        if value is not None and not _ADDRESS.match(value):
            raise ValueError(
                "address must be `auto` (the cluster this machine belongs to), HOST:PORT "
                f"(a head's GCS) or ray://HOST:PORT (Ray Client), got {value!r}"
            )
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_bytes(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        found = _MEMORY.match(value)
        unit = found and found.group(2).upper()
        if not found or unit not in _MEMORY_UNITS:
            raise ValueError(
                f"memory must be bytes or a size such as '8GiB' or '500MB' "
                f"(units {', '.join(u for u in _MEMORY_UNITS if u)}), got {value!r}"
            )
        return int(float(found.group(1)) * _MEMORY_UNITS[unit])


class Params(_Strict):
    zoo: ZooParams
    profiles: dict[str, Profile]
    prompts: list[PromptSpec] = Field(min_length=1)
    attribution: AttributionParams = AttributionParams()
    pruning: PruningParams = PruningParams()
    validation: ValidationParams = ValidationParams()
    tracking: TrackingParams = TrackingParams()
    execution: ExecutionParams = ExecutionParams()
    features: FeaturesParams = FeaturesParams()

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
        self._check_feature_sets()
        return self

    def _check_feature_sets(self) -> None:
        """features.sets: enabled profiles, at most one entry per transcoder set. A profile whose
        set has no entry gets no pages (its feature nodes stay unlabelled)."""
        covered: dict[tuple, str] = {}
        for name, profile_name in self.features.sets.items():
            if not re.match(r"^[A-Za-z0-9_-]+$", name):
                raise ValueError(
                    f"features.sets: name {name!r} must be letters, digits, '-' or '_'"
                )
            profile = self.profiles.get(profile_name)
            if profile is None or not profile.enabled:
                raise ValueError(
                    f"features.sets.{name}: {profile_name!r} is not an enabled profile; "
                    f"enabled: {sorted(n for n, p in self.profiles.items() if p.enabled)}"
                )
            key = _set_key(profile)
            if key in covered:
                raise ValueError(
                    f"features.sets: {covered[key]!r} and {name!r} build pages of the same "
                    f"transcoder set {profile.transcoders!r}; keep one"
                )
            covered[key] = name

    def feature_set(self, profile_name: str) -> str | None:
        """The name of the page set of a profile's transcoders (None: no pages for it)."""
        key = _set_key(self.profiles[profile_name])
        for name, owner in self.features.sets.items():
            if _set_key(self.profiles[owner]) == key:
                return name
        return None


def _set_key(profile: Profile) -> tuple[str, str | None]:
    return (profile.transcoders, profile.transcoder_revision)


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

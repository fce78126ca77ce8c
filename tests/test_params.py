"""params.yaml validation: the shipped file is valid, bad ones fail naming the key."""

from pathlib import Path

import pytest
import yaml

from tracer.experiments.params import load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, document) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def shipped() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert set(params.zoo.models) == {"gpt2", "llama", "gemma2"}
    assert {s.kind for s in params.zoo.transcoders.values()} >= {"plt-jumprelu", "clt"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(typo=1), "typo"),
        (lambda d: d["zoo"].update(colour="red"), "zoo.colour"),
        (lambda d: d["zoo"]["models"]["gpt2"].update(n_layers=0), "zoo.models.gpt2.n_layers"),
        (lambda d: d["zoo"]["models"]["gpt2"].update(architecture="rnn"), "architecture"),
        (lambda d: d["zoo"]["corpus"].update(seed="x"), "zoo.corpus.seed"),
        (lambda d: d["zoo"]["models"].update({"bad name": d["zoo"]["models"]["gpt2"]}), "bad name"),
        (lambda d: d["pruning"].update(node_threshold=1.5), "pruning.node_threshold"),
        (lambda d: d["pruning"].update(sweep=[[0.5, 1.5]]), "sweep thresholds"),
        (lambda d: d["profiles"]["gpt2-clt"].update(model="zoo/models/nope"), "gpt2-clt.model"),
        (lambda d: d["prompts"].append(dict(d["prompts"][0])), "duplicate id"),
        (
            lambda d: [p.update(enabled=False) for p in d["profiles"].values()],
            "every profile is disabled",
        ),
        (lambda d: d["attribution"].update(max_feature_nodes=0), "attribution.max_feature_nodes"),
        (lambda d: d["profiles"]["gpt2-clt"].update(dtype="float16"), "gpt2-clt.dtype"),
        (lambda d: d.update(prompts=[]), "prompts"),
        (lambda d: d["features"]["sets"].update(x="nope"), "features.sets.x: 'nope' is not"),
        (
            lambda d: d["features"]["sets"].update(again="gpt2-clt"),
            "build pages of the same transcoder set",
        ),
        (lambda d: d["features"].update(quantiles=[0.9, 0.5]), "features.quantiles"),
        (lambda d: d["features"].update(histogram_bins=30), "power of two"),
        (lambda d: d["features"].update(dataset="data.csv"), ".txt or .jsonl"),
        (lambda d: d["features"].update(context=1), "features.context"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    document = shipped()
    edit(document)
    with pytest.raises(ValueError, match=message):
        load_params(write(tmp_path, document))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.yaml"):
        load_params(tmp_path / "params.yaml")


def test_attribution_keys_are_attribute_keyword_arguments():
    """The attribute stage passes `attribution:` through as keyword arguments."""
    import inspect

    from tracer.attribution.attribute import attribute
    from tracer.experiments.params import AttributionParams

    keywords = {
        name
        for name, p in inspect.signature(attribute).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(AttributionParams.model_fields) <= keywords


def test_profiles_sharing_a_set_share_its_pages():
    from tracer.experiments.params import Params

    assert load_params(REPO / "params.yaml").feature_set("gpt2-clt") == "gpt2-clt"
    document = shipped()
    document["profiles"]["gpt2-clt-64"] = dict(document["profiles"]["gpt2-clt"], dtype="float64")
    assert Params.model_validate(document).feature_set("gpt2-clt-64") == "gpt2-clt"

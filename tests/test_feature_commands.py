"""`tracer features show | export` and `tracer label` on a pages folder built in the test."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_features import SETTINGS, make_model, random_examples

from tracer.features.labels import read_labels
from tracer.features.pages import collect_pages
from tracer.features.storage import FeaturePages, save_pages


@pytest.fixture(scope="module")
def pages_folder(tmp_path_factory):
    model = make_model("plt-jumprelu")
    pages = collect_pages(model, random_examples(30, model.vocab_size), SETTINGS)
    tokenizer = model.tokenizer
    folder = tmp_path_factory.mktemp("pages") / "tiny"
    save_pages(folder, pages, SETTINGS, lambda ids: [tokenizer.decode([i]) for i in ids], {})
    return folder


def test_show_prints_the_page(pages_folder, tmp_path):
    reader = FeaturePages(pages_folder)
    feature = max(range(reader.d_transcoder), key=lambda f: reader.page(1, f).active)
    page = reader.page(1, feature)
    labels = tmp_path / "labels.tsv"
    code, out, err = run_cli(
        ["features", "show", str(pages_folder), "1", str(feature), "--labels", str(labels)]
    )
    assert code == 0, err
    assert f"active on {page.active} of {page.n_tokens} tokens" in out
    assert "(automatic)" in out
    top = page.top[0]
    assert f"«{reader.text(top.tokens[top.position]).strip()}»" in out
    assert reader.text(page.top_logits[0][0]).strip() in out.split("top logits:")[1]


def test_label_then_show_and_export(pages_folder, tmp_path):
    labels = tmp_path / "labels.tsv"
    code, out, err = run_cli(
        ["label", str(pages_folder), "1:3", "state capital", "--labels", str(labels)]
    )
    assert code == 0, err
    assert read_labels(labels) == {(1, 3): "state capital"}
    code, out, _ = run_cli(
        ["features", "show", str(pages_folder), "1", "3", "--labels", str(labels)]
    )
    assert "label: state capital" in out and "(human)" in out
    code, out, err = run_cli(
        ["features", "export", str(pages_folder), "--out", str(tmp_path / "x"), "--quiet"]
        + ["--labels", str(labels), "--transcoder-id", "tiny-set"]
    )
    assert code == 0, err
    files = list((tmp_path / "x" / "tiny-set").iterdir())
    reader = FeaturePages(pages_folder)
    assert len(files) == reader.n_layers * reader.d_transcoder
    from tracer.graph.viewer import cantor_pairing

    document = json.loads((tmp_path / "x/tiny-set" / f"{cantor_pairing(1, 3)}.json").read_text())
    assert document["description"] == "state capital"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["label", "{pages}", "7:0", "x"], "no feature 7:0"),
        (["label", "{pages}", "1-3", "x"], "LAYER:FEATURE"),
        (["features", "show", "no-such-set", "0", "0"], "no feature pages 'no-such-set'"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(pages_folder, tmp_path, args, message):
    labels = tmp_path / "labels.tsv"
    args = [a.replace("{pages}", str(pages_folder)) for a in args] + ["--labels", str(labels)]
    code, _, err = run_cli(args)
    assert code == 2 and message in err
    assert not labels.exists()

"""Feature pages against brute force: every activation materialised, one prompt at a time.

The pages stream batches through `collect_pages`; the reference here runs each example alone
through `ReplacementModel.run_prompt` (the attribution's own clean pass) and computes every
statistic from the full activation table.
"""

from __future__ import annotations

import json

import pytest
import torch

from tracer.features.export import export_circuit_tracer, feature_document
from tracer.features.labels import Labels, auto_label, read_labels, set_label
from tracer.features.pages import PageSettings, collect_pages, logit_effects
from tracer.features.storage import FeaturePages, PagesError, save_pages
from tracer.graph.viewer import cantor_pairing
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders

KINDS = ("plt-jumprelu", "plt-skip", "plt-topk", "clt")
SETTINGS = PageSettings(
    n_tokens=10_000,
    context=9,
    top_k=5,
    quantiles=(0.5, 0.8),
    examples_per_band=3,
    histogram_bins=16,
    batch_size=7,
    n_logits=4,
)


def make_model(kind: str) -> ReplacementModel:
    tokenizer = build_tokenizer()
    model = build_model("gpt2", vocab=len(tokenizer), seed=3)
    transcoders = build_transcoders(kind, n_layers=2, d_model=32, d_transcoder=24, seed=5)
    return ReplacementModel(model, transcoders, tokenizer=tokenizer)


def random_examples(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Start token (0) + 3..8 ordinary tokens (ids >= 4), varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=gen)
    return [[0, *torch.randint(4, vocab, (int(k),), generator=gen).tolist()] for k in lengths]


def brute_force(model: ReplacementModel, examples: list[list[int]]) -> list[list[torch.Tensor]]:
    """acts[layer][example] (n_pos, d): every activation, start token zeroed (not data)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]
    for example in examples:
        state = model.run_prompt(torch.tensor(example), zero_bos=True)
        for layer, acts in enumerate(state.activations):
            per_layer[layer].append(acts.float())
    return per_layer


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    model = make_model(request.param)
    examples = random_examples(30, model.vocab_size)
    pages = collect_pages(model, examples, SETTINGS)
    return model, examples, pages, brute_force(model, examples)


def test_counts_max_and_histogram_equal_brute_force(case):
    model, examples, pages, truth = case
    n_data = sum(len(e) - 1 for e in examples)
    for layer, page in enumerate(pages):
        table = torch.cat(truth[layer])  # (all positions, d)
        assert page.n_tokens == n_data
        assert torch.equal(page.active, (table > 0).sum(0))
        assert torch.allclose(page.act_max, table.amax(0).clamp(min=0), rtol=1e-6, atol=1e-7)
        for feature in range(table.shape[1]):
            values = table[:, feature][table[:, feature] > 0].double()
            top = float(page.hist_top[feature])
            if values.numel():  # the top edge is the smallest power of two above the maximum
                assert top / 2 <= values.max() < top
            bins = (values / top * SETTINGS.histogram_bins).floor().long()
            expected = torch.bincount(bins, minlength=SETTINGS.histogram_bins)
            assert torch.equal(page.hist_counts[feature], expected)


def test_top_examples_equal_brute_force(case):
    model, examples, pages, truth = case
    for layer, page in enumerate(pages):
        for feature in range(page.active.shape[0]):
            column = [acts[:, feature] for acts in truth[layer]]
            everything = torch.cat(column)
            positive = everything[everything > 0]
            k = min(SETTINGS.top_k, positive.numel())
            expected = positive.sort(descending=True).values[:k]
            filled = page.top.example[feature] >= 0
            assert int(filled.sum()) == k
            assert torch.allclose(page.top.values[feature][:k], expected, rtol=1e-6, atol=1e-7)
            for slot in range(k):
                ex, pos = (
                    int(page.top.example[feature, slot]),
                    int(page.top.position[feature, slot]),
                )
                n = len(examples[ex])
                assert page.top.tokens[feature, slot, :n].tolist() == examples[ex]
                assert torch.allclose(page.top.acts[feature, slot, :n], column[ex], atol=1e-6)
                assert torch.isclose(column[ex][pos], page.top.values[feature, slot], atol=1e-6)


def test_band_examples_are_real_tokens_inside_their_band(case):
    model, examples, pages, truth = case
    e = SETTINGS.examples_per_band
    for layer, page in enumerate(pages):
        for feature in range(page.active.shape[0]):
            edges = [0.0, *page.quantile_values[feature].tolist(), float("inf")]
            for slot in range(SETTINGS.n_bands * e):
                ex = int(page.bands.example[feature, slot])
                if ex < 0:
                    continue
                band = slot // e
                pos = int(page.bands.position[feature, slot])
                value = float(truth[layer][ex][pos, feature])
                assert value > 0
                assert value == pytest.approx(float(page.bands.values[feature, slot]), abs=1e-6)
                assert edges[band] <= value + 1e-6 and value < edges[band + 1] + 1e-6
            if int(page.active[feature]) >= 4 * SETTINGS.sample_size:
                # a uniform sample of plenty of tokens fills every band
                assert (page.bands.example[feature] >= 0).sum() >= SETTINGS.n_bands


def test_pages_do_not_depend_on_batching():
    model = make_model("plt-jumprelu")
    examples = random_examples(25, model.vocab_size, seed=1)
    one = collect_pages(model, examples, SETTINGS)
    other = collect_pages(model, examples, PageSettings(**{**SETTINGS.__dict__, "batch_size": 25}))
    for a, b in zip(one, other, strict=True):
        assert torch.equal(a.active, b.active)
        assert torch.equal(a.hist_counts, b.hist_counts)
        assert torch.equal(a.bands.example, b.bands.example)  # the sample is keyed, not drawn
        assert torch.allclose(a.top.values, b.top.values, atol=1e-6)


@pytest.mark.parametrize("kind", ["plt-jumprelu", "clt"])
def test_logits_equal_an_explicit_matmul(kind):
    model = make_model(kind)
    ts = model.transcoders
    final_norm = model.model.transformer.ln_f
    for layer in range(ts.n_layers):
        if ts.cross_layer:
            direction = ts.layer(layer).W_dec.sum(1)  # every write of the feature
        else:
            direction = ts.layer(layer).W_dec
        centred = direction - direction.mean(-1, keepdim=True)  # LayerNorm, scale left out
        logits = (centred * final_norm.weight) @ model.model.lm_head.weight.T
        expected = logits - logits.mean(-1, keepdim=True)
        assert torch.allclose(logit_effects(model, layer), expected, atol=1e-5)
    pages = collect_pages(model, random_examples(10, model.vocab_size), SETTINGS)
    effects = logit_effects(model, 0).index_fill(1, torch.tensor([0, 1, 2, 3]), -torch.inf)
    assert torch.equal(pages[0].top_logits, effects.topk(SETTINGS.n_logits, dim=1).indices)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    model = make_model("clt")
    examples = random_examples(30, model.vocab_size)
    pages = collect_pages(model, examples, SETTINGS)
    folder = tmp_path_factory.mktemp("pages") / "set"
    tokenizer = model.tokenizer
    save_pages(
        folder, pages, SETTINGS, lambda ids: [tokenizer.decode([i]) for i in ids], {"model": "m"}
    )
    return folder, pages, tokenizer


def test_one_feature_reads_back_what_was_computed(stored):
    folder, pages, _ = stored
    reader = FeaturePages(folder)
    layer, feature = 1, int(pages[1].active.argmax())
    page = reader.page(layer, feature)
    assert page.active == int(pages[1].active[feature])
    assert page.act_max == pytest.approx(float(pages[1].act_max[feature]))
    assert [c.value for c in page.top] == pytest.approx(
        pages[1].top.values[feature][pages[1].top.example[feature] >= 0].tolist()
    )
    first = page.top[0]
    assert first.tokens[first.position] == int(
        pages[1].top.tokens[feature, 0, int(pages[1].top.position[feature, 0])]
    )
    assert first.acts[first.position] == pytest.approx(first.value, rel=1e-3)  # float16 context
    assert page.top_logits[0][0] == int(pages[1].top_logits[feature, 0])


def test_export_has_the_reference_fields(stored, tmp_path):
    folder, _, _ = stored
    reader = FeaturePages(folder)
    out = export_circuit_tracer(reader, tmp_path / "export", "tiny-clt")
    files = sorted(out.iterdir())
    assert len(files) == reader.n_layers * reader.d_transcoder
    document = json.loads((out / f"{cantor_pairing(1, 3)}.json").read_text())
    for key in (
        "transcoder_id",
        "index",
        "examples_quantiles",
        "top_logits",
        "bottom_logits",
        "act_min",
        "act_max",
        "quantile_values",
        "histogram",
        "activation_frequency",
    ):
        assert key in document, key
    assert document["index"] == cantor_pairing(1, 3)
    assert document["examples_quantiles"][0]["quantile_name"] == "Top activations"
    for band in document["examples_quantiles"]:
        for example in band["examples"]:
            assert set(example) == {
                "tokens",
                "tokens_acts_list",
                "train_token_ind",
                "is_repeated_datapoint",
            }
            assert len(example["tokens"]) == len(example["tokens_acts_list"])
            assert all(isinstance(t, str) for t in example["tokens"])
    page = reader.page(1, 3)
    assert document["activation_frequency"] == pytest.approx(page.frequency)
    assert feature_document(page, "x", reader.text)["top_logits"] == [
        reader.text(t) for t, _ in page.top_logits
    ]


def test_labels_round_trip_and_human_labels_win(stored, tmp_path):
    folder, _, _ = stored
    reader = FeaturePages(folder)
    path = tmp_path / "labels.tsv"
    set_label(path, reader, 1, 3, "my feature")
    set_label(path, reader, 0, 2, "another one")
    assert read_labels(path) == {(1, 3): "my feature", (0, 2): "another one"}
    assert path.read_text().splitlines()[1:] == ["0:2\tanother one", "1:3\tmy feature"]
    labels = Labels.open(folder, path)
    assert labels(1, 3) == "my feature"
    assert labels(1, 4) == auto_label(reader.page(1, 4), reader.text)
    set_label(path, reader, 1, 3, "")
    assert read_labels(path) == {(0, 2): "another one"}


def test_automatic_label_names_peak_tokens_and_top_logit(stored):
    folder, pages, _ = stored
    reader = FeaturePages(folder)
    feature = int(pages[0].active.argmax())
    page = reader.page(0, feature)
    peaks = [c.tokens[c.position] for c in page.top]
    most = max(set(peaks), key=lambda t: (peaks.count(t), -peaks.index(t)))
    label = auto_label(page, reader.text)
    assert label.startswith(reader.text(most).strip())
    assert label.endswith("→ " + reader.text(page.top_logits[0][0]).strip())


def test_bad_label_and_corrupt_pages_are_clear_errors(stored, tmp_path):
    folder, _, _ = stored
    reader = FeaturePages(folder)
    path = tmp_path / "labels.tsv"
    with pytest.raises(PagesError, match="no feature 9:0"):
        set_label(path, reader, 9, 0, "x")
    with pytest.raises(PagesError, match="features 0..23"):
        set_label(path, reader, 0, 24, "x")
    assert not path.exists()  # nothing written
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "layer_1.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(PagesError, match="layer_1.safetensors is missing or corrupt"):
        FeaturePages(broken).page(1, 0)
    (broken / "index.json").write_text("{not json")
    with pytest.raises(PagesError, match="index.json is missing or corrupt"):
        FeaturePages(broken)


def test_human_label_overrides_the_automatic_one_in_the_viewer_document(tmp_path):
    from tracer.attribution.attribute import attribute
    from tracer.graph.summary import prune_graph

    model = make_model("plt-jumprelu")
    pages = collect_pages(model, random_examples(30, model.vocab_size), SETTINGS)
    tokenizer = model.tokenizer
    folder = tmp_path / "set"
    save_pages(folder, pages, SETTINGS, lambda ids: [tokenizer.decode([i]) for i in ids], {})
    graph = attribute("the capital of the state containing Dallas is", model, progress=False)
    document = prune_graph(graph, 0.99, 0.99, tokenizer=tokenizer).document
    feature_nodes = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feature_nodes and all(n["clerp"] == "" for n in feature_nodes)  # no labels given
    layer, feature, _ = map(int, feature_nodes[0]["node_id"].split("_"))
    set_label(tmp_path / "labels.tsv", FeaturePages(folder), layer, feature, "state capital")
    labels = Labels.open(folder, tmp_path / "labels.tsv")
    document = prune_graph(graph, 0.99, 0.99, tokenizer=tokenizer, labels=labels).document
    reader = FeaturePages(folder)
    for node in document["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        l, f, _ = map(int, node["node_id"].split("_"))
        if (l, f) == (layer, feature):
            assert node["clerp"] == "state capital"
        else:
            assert node["clerp"] == auto_label(reader.page(l, f), reader.text)


def test_dataset_files_bad_input(tmp_path):
    from tracer.experiments.datasets import read_texts
    from tracer.features.pages import examples_from_texts

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        list(read_texts(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt is not UTF-8"):
        list(read_texts(latin))
    records = tmp_path / "data.jsonl"
    records.write_text('{"text": "the city"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected an object with a string 'text'"):
        list(read_texts(records))
    with pytest.raises(ValueError, match="must be a .txt or .jsonl"):
        list(read_texts(tmp_path / "data.csv"))
    short = tmp_path / "short.txt"
    short.write_text("the city\n")
    model = make_model("clt")
    with pytest.raises(ValueError, match="2 tokens, fewer than one example's context"):
        examples_from_texts(model, read_texts(short), SETTINGS)
    # long texts are split into examples of `context` tokens, start token first
    text = " ".join(["the capital of the state"] * 5)
    examples = examples_from_texts(model, [text], SETTINGS)
    assert [len(e) for e in examples] == [9, 9, 9, 2]  # 25 tokens in pieces of 8
    assert all(e[0] == 0 for e in examples)
    assert sum(examples, [])[1:9] == model.tokenizer(text)["input_ids"][:8]

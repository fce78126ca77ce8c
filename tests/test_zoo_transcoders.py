"""Zoo transcoder training: activations are the model's, training learns, sets splice and attribute."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.model.families import family_for, get_module
from tracer.model.replacement import ReplacementModel
from tracer.transcoders.files import load_transcoders, save_transcoders
from tracer.zoo.config import KINDS, CorpusConfig, LMConfig, TranscoderTrainConfig
from tracer.zoo.corpus import build_corpus, vocabulary
from tracer.zoo.tokenizer import build_tokenizer
from tracer.zoo.train import build_lm, encode_sentences, train_lm
from tracer.zoo.transcoder_training import (
    collect_activations,
    evaluate_transcoders,
    jumprelu,
    spliced_loss,
    train_transcoders,
)

TINY = dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64)
QUICK = dict(d_transcoder=64, steps=150, batch_size=256, warmup=10, lr=3e-3)
QUICK_CONFIG = TranscoderTrainConfig(**QUICK)


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = build_corpus(CorpusConfig(n_train=1000))
    return corpus, build_tokenizer(vocabulary(corpus))


@pytest.fixture(scope="module")
def models(corpus_and_tokenizer):
    """Tiny LMs: GPT-2 (its MLP writes itself), briefly trained so that its MLPs matter to the
    loss, and an untrained Gemma-2 (its MLP block writes through a post-MLP norm)."""
    corpus, tokenizer = corpus_and_tokenizer
    config = LMConfig(architecture="gpt2", steps=40, batch_size=16, lr=1e-2, warmup=5, **TINY)
    gpt2 = build_lm(config, tokenizer)
    train_lm(gpt2, tokenizer, corpus.train, config, progress=False)
    gemma2 = build_lm(LMConfig(architecture="gemma2", **TINY), tokenizer)
    return {"gpt2": gpt2.eval(), "gemma2": gemma2.eval()}


@pytest.fixture(scope="module")
def gpt2_activations(models, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    return collect_activations(models["gpt2"], tokenizer, corpus.train, max_tokens=3000)


@pytest.fixture(scope="module")
def trained_sets(gpt2_activations):
    """kind -> (initial set, trained set, training history), one short run per kind."""
    out = {}
    for kind in KINDS:
        config = TranscoderTrainConfig(kind=kind, **QUICK)
        initial, _ = train_transcoders(
            gpt2_activations, config.model_copy(update={"steps": 0}), progress=False
        )
        trained, history = train_transcoders(gpt2_activations, config, progress=False)
        out[kind] = (initial, trained, history)
    return out


def _block_output(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What layer's MLP block writes for MLP input x, computed without module hooks."""
    family = family_for(model.config.model_type)
    block = get_module(get_module(model, family.base), family.layers)[layer]
    out = get_module(block, family.mlp).forward(x)
    if family.mlp_write != family.mlp:
        out = get_module(block, family.mlp_write).forward(out)
    return out


# ---- activations --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_collected_activations_are_the_mlp_input_and_output(arch, models, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    model = models[arch]
    family = family_for(model.config.model_type)
    layers = get_module(get_module(model, family.base), family.layers)
    sentences = corpus.train[:20]
    lengths = [len(s) - 1 for s in encode_sentences(tokenizer, sentences, 64)]  # no BOS
    acts = collect_activations(model, tokenizer, sentences, max_tokens=10**6, batch_size=7)
    assert len(acts) == 2
    for x, y in acts:
        assert x.shape == y.shape == (sum(lengths), 32) and x.dtype == y.dtype == torch.float32

    # One sentence alone, against the residual stream of a plain forward: the residual after
    # layer i minus y is the stream entering the MLP block, whose pre-MLP norm must give x.
    ids = encode_sentences(tokenizer, sentences[:1], 64)[0]
    alone = collect_activations(model, tokenizer, sentences[:1], max_tokens=10**6)
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states
        for i, (x, y) in enumerate(alone):
            assert x.shape[0] == lengths[0]
            torch.testing.assert_close(y, _block_output(model, i, x), rtol=1e-5, atol=1e-6)
            if i + 1 < len(layers):  # the last hidden state is after the final norm
                resid_mid = hidden[i + 1][0, 1:] - y
                norm = get_module(layers[i], family.pre_mlp_norm)
                torch.testing.assert_close(norm(resid_mid), x, rtol=1e-4, atol=1e-5)
            # padding in the batched run changes nothing for the first sentence
            torch.testing.assert_close(acts[i][0][: lengths[0]], x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(acts[i][1][: lengths[0]], y, rtol=1e-4, atol=1e-5)

    few = collect_activations(model, tokenizer, sentences, max_tokens=25)
    assert few[0][0].shape[0] == 25
    torch.testing.assert_close(few[1][1], acts[1][1][:25], rtol=1e-4, atol=1e-5)


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_training_improves_on_the_initialisation(kind, trained_sets, gpt2_activations):
    initial, trained, history = trained_sets[kind]
    before = evaluate_transcoders(initial, gpt2_activations)
    after = evaluate_transcoders(trained, gpt2_activations)
    assert after["mean_variance_explained"] > before["mean_variance_explained"] + 0.2
    assert after["mean_variance_explained"] > 0.5
    # folding the normalisation into the weights keeps what training saw: 1 - VE ~ batch NMSE
    final_nmse = sum(history["nmse"][-10:]) / 10
    assert abs((1 - after["mean_variance_explained"]) - final_nmse) < 0.05

    assert trained.feature_input_hook == "mlp.hook_in"
    assert trained.feature_output_hook == "mlp.hook_out"
    assert trained.cross_layer == (kind == "clt")
    assert trained.has_skip == (kind == "plt-skip")
    expected_activation = {"plt-relu": "relu", "plt-topk": "topk"}.get(kind, "jumprelu")
    assert trained.activation == expected_activation
    if expected_activation == "jumprelu":
        for i in range(trained.n_layers):
            start, end = initial.layer(i).threshold, trained.layer(i).threshold
            torch.testing.assert_close(
                start, torch.full_like(start, QUICK_CONFIG.initial_threshold)
            )
            assert (end > 0).all()
            assert (end - start).abs().max() > 1e-2

    # L0, dead features and variance explained, recomputed directly from encode / reconstruct
    for i, (x, y) in enumerate(gpt2_activations):
        acts = [trained.encode(j, gpt2_activations[j][0]) for j in range(trained.n_layers)]
        active = acts[i] != 0
        assert after["l0"][i] == pytest.approx(active.sum(-1).float().mean().item(), rel=1e-6)
        assert after["dead_features"][i] == int((~active.any(0)).sum())
        sse = (trained.reconstruct(i, acts, x) - y).pow(2).sum()
        sst = (y - y.mean(0)).pow(2).sum()
        assert after["variance_explained"][i] == pytest.approx(1 - (sse / sst).item(), abs=1e-4)
    if kind == "plt-topk":
        assert max(after["l0"]) <= trained.top_k == TranscoderTrainConfig().top_k


@pytest.mark.parametrize("kind", ["plt-skip", "clt"])
def test_training_is_equivariant_to_the_activation_scales(kind, gpt2_activations):
    """The normalisation is folded back into the weights: scaling x and y of each layer by powers
    of two (exact in floating point) gives the same run, so encode is unchanged and reconstruct
    scales with y. Layers get different y scales, so a CLT's slots must use their target's."""
    x_scales, y_scales = (4.0, 0.5), (2.0, 8.0)
    scaled = [
        (x * sx, y * sy)
        for (x, y), sx, sy in zip(gpt2_activations, x_scales, y_scales, strict=True)
    ]
    config = TranscoderTrainConfig(kind=kind, **{**QUICK, "steps": 30})
    ts, _ = train_transcoders(gpt2_activations, config, progress=False)
    ts_scaled, _ = train_transcoders(scaled, config, progress=False)
    x = [x[:200] for x, _ in gpt2_activations]
    acts = [ts.encode(i, x[i]) for i in range(2)]
    acts_scaled = [ts_scaled.encode(i, x[i] * x_scales[i]) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(acts_scaled[i], acts[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            ts_scaled.reconstruct(i, acts_scaled, x[i] * x_scales[i]),
            ts.reconstruct(i, acts, x[i]) * y_scales[i],
            rtol=1e-5,
            atol=1e-6 * y_scales[i],
        )


def test_jumprelu_gradients_match_the_rectangle_kernel():
    eps = 0.1
    pre = torch.tensor(
        [[0.10, 0.46, 0.54, 0.90], [0.53, 0.44, 0.49, 0.22], [0.58, 0.52, 0.70, 0.55]],
        requires_grad=True,
    )  # (batch 3, features 4)
    threshold = torch.tensor([0.5, 0.5, 0.5, 0.25], requires_grad=True)
    grad_acts = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.5, -1.0, 4.0], [0.7, -0.3, 2.0, 1.0]])
    grad_active = torch.tensor([[0.2, 1.0, -0.5, 2.0], [1.0, 3.0, 0.4, -0.5], [0.1, 0.6, 1.0, 2.0]])
    acts, active = jumprelu(pre, threshold, eps)
    ((acts * grad_acts).sum() + (active * grad_active).sum()).backward()

    expected_threshold_grad = torch.zeros(4)
    for b in range(3):
        for f in range(4):
            p, t = pre[b, f].item(), threshold[f].item()
            assert acts[b, f].item() == (p if p > t else 0.0)
            assert active[b, f].item() == (1.0 if p > t else 0.0)
            if abs(p - t) < eps / 2:  # rectangle kernel K((p - t) / eps) = 1
                expected_threshold_grad[f] += -(t / eps) * grad_acts[b, f]
                expected_threshold_grad[f] += -(1 / eps) * grad_active[b, f]
    torch.testing.assert_close(threshold.grad, expected_threshold_grad)
    # pre: the activation passes the gradient where the feature is on; the indicator passes none
    torch.testing.assert_close(pre.grad, grad_acts * (pre.detach() > threshold.detach()))
    assert expected_threshold_grad.abs().min() > 0  # every feature had a point near its threshold


def test_config_refuses_unknown_kinds_and_fields():
    with pytest.raises(ValueError, match="kind must be one of"):
        TranscoderTrainConfig(kind="sae")
    with pytest.raises(ValueError, match="extra"):
        TranscoderTrainConfig(l0=0.1)
    with pytest.raises(ValueError, match="one shape"):
        train_transcoders([(torch.zeros(5, 4), torch.zeros(5, 4)), (torch.zeros(6, 4),) * 2],
                          TranscoderTrainConfig(), progress=False)  # fmt: skip


# ---- files and attribution -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plt-skip", "clt"])
def test_trained_set_reloads_and_attributes(kind, trained_sets, gpt2_activations, models, tmp_path):
    _, trained, _ = trained_sets[kind]
    folder = save_transcoders(trained, tmp_path / kind)
    loaded = load_transcoders(folder)
    assert loaded.cross_layer == trained.cross_layer and loaded.activation == trained.activation
    x = torch.stack([x[:50] for x, _ in gpt2_activations])  # (n_layers, 50, d_model)
    acts = [trained.encode(i, x[i]) for i in range(2)]
    acts_loaded = [loaded.encode(i, x[i]) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(acts_loaded[i], acts[i])
        torch.testing.assert_close(
            loaded.reconstruct(i, acts_loaded, x[i]), trained.reconstruct(i, acts, x[i])
        )

    model = copy.deepcopy(models["gpt2"])  # the replacement model installs its freezer on it
    graph = attribute([5, 6, 7], ReplacementModel(model, loaded), progress=False)
    assert graph.active_features.shape[0] > 0 and graph.selected_features.shape[0] > 0
    assert torch.isfinite(graph.adjacency_matrix).all()


# ---- splicing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_splicing_the_true_mlp_output_gives_the_original_loss(
    arch, models, corpus_and_tokenizer, trained_sets, monkeypatch
):
    corpus, tokenizer = corpus_and_tokenizer
    model = models[arch]
    _, ts, _ = trained_sets["clt"]
    seen = []

    def true_output(target, acts, x):
        seen.append([a is not None for a in acts])  # a CLT layer needs all earlier features
        return _block_output(model, target, x)

    monkeypatch.setattr(ts, "reconstruct", true_output)
    sentences = corpus.train[:40]
    for replace_bos in (False, True):
        seen.clear()
        result = spliced_loss(
            model, tokenizer, sentences, ts, batch_size=16, replace_bos=replace_bos
        )
        assert result["loss_spliced"] == pytest.approx(result["loss_original"], abs=1e-6)
        assert seen == [[True, False], [True, True]] * 3  # per batch (of 3): layer 0, layer 1


def test_spliced_loss_untrained_set_is_worse_than_a_trained_one(
    models, corpus_and_tokenizer, trained_sets
):
    corpus, tokenizer = corpus_and_tokenizer
    sentences = corpus.train[:60]
    for kind in ("plt-jumprelu", "clt"):
        initial, trained, _ = trained_sets[kind]
        untrained = spliced_loss(models["gpt2"], tokenizer, sentences, initial)
        fitted = spliced_loss(models["gpt2"], tokenizer, sentences, trained)
        for result in (untrained, fitted):
            assert math.isfinite(result["loss_spliced"])
            assert result["loss_increase"] == pytest.approx(
                result["loss_spliced"] - result["loss_original"]
            )
        assert untrained["loss_original"] == fitted["loss_original"]
        assert untrained["loss_increase"] > -0.01
        assert fitted["loss_increase"] < untrained["loss_increase"]

"""Transcoder maths against references written out here: activations, encoder, decoders, skips.

Orientation conventions (DESIGN.md section 4): `W_enc` (d_transcoder, d_model) used as
`x @ W_enc.T`; PLT `W_dec` (d_transcoder, d_model); CLT `W_dec` of source i is
(d_transcoder, n_layers - i, d_model), slot k writing to layer i + k; PLT skip `x @ W_skip.T`,
CLT skip `x @ W_skip`. Every W_skip here is non-symmetric, so a transposed use fails.
"""

from __future__ import annotations

import pytest
import torch

from tracer.transcoders.sets import LayerWeights, TranscoderSet, activate

N_LAYERS, D_MODEL, D_TC = 3, 6, 10


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def make_layers(*, cross_layer: bool, skip: bool, threshold: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(N_LAYERS):
        dec = (D_TC, N_LAYERS - i, D_MODEL) if cross_layer else (D_TC, D_MODEL)
        layers.append(
            LayerWeights(
                W_enc=randn(gen, D_TC, D_MODEL),
                b_enc=randn(gen, D_TC),
                W_dec=randn(gen, *dec),
                b_dec=randn(gen, D_MODEL),
                threshold=randn(gen, D_TC).abs() * 0.5 if threshold else None,
                W_skip=randn(gen, D_MODEL, D_MODEL) if skip else None,
            )
        )
    return layers


def make_set(*, cross_layer: bool, skip: bool = False, activation: str = "relu", **kwargs):
    layers = make_layers(cross_layer=cross_layer, skip=skip, threshold=activation == "jumprelu")
    return TranscoderSet.from_layers(
        layers, activation=activation, cross_layer=cross_layer, dtype=torch.float64, **kwargs
    )


# ---- activations -------------------------------------------------------------------------------


def reference_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of the last dimension: keep the k largest values among the positive ones."""
    flat = pre.reshape(-1, pre.shape[-1])
    out = torch.zeros_like(flat)
    for r, row in enumerate(flat.tolist()):
        order = sorted(range(len(row)), key=lambda j: row[j], reverse=True)
        for j in order[:k]:
            if row[j] > 0:
                out[r, j] = row[j]
    return out.reshape(pre.shape)


def test_relu_keeps_positive_values():
    pre = randn(torch.Generator().manual_seed(1), 4, 5, D_TC)
    expected = torch.where(pre > 0, pre, torch.zeros_like(pre))
    assert torch.equal(activate(pre, "relu", None, None), expected)


def test_jumprelu_keeps_values_above_their_feature_threshold():
    gen = torch.Generator().manual_seed(2)
    pre = randn(gen, 4, 5, D_TC)
    threshold = randn(gen, D_TC).abs()
    expected = torch.zeros_like(pre)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in pre.shape)).tolist():
        value = pre[tuple(idx)]
        if value > threshold[idx[-1]]:
            expected[tuple(idx)] = value
    got = activate(pre, "jumprelu", threshold, None)
    assert torch.equal(got, expected)
    # some values are positive yet below threshold: jumprelu is not relu here
    assert not torch.equal(got, torch.relu(pre))


@pytest.mark.parametrize("k", [1, 3, D_TC, D_TC + 5])
def test_topk_keeps_k_largest_positive_values_per_row(k: int):
    pre = randn(torch.Generator().manual_seed(3), 4, 5, D_TC)
    got = activate(pre, "topk", None, k)
    assert torch.equal(got, reference_topk(pre, k))
    assert ((got != 0).sum(-1) <= k).all()


def test_topk_with_few_positive_values_keeps_only_positive_ones():
    pre = -torch.arange(1.0, D_TC + 1, dtype=torch.float64)
    pre[4] = 0.5
    got = activate(pre, "topk", None, 3)
    expected = torch.zeros_like(pre)
    expected[4] = 0.5
    assert torch.equal(got, expected)


def test_activate_rejects_bad_arguments():
    pre = torch.zeros(2, D_TC)
    with pytest.raises(ValueError, match="threshold"):
        activate(pre, "jumprelu", None, None)
    for bad_k in (None, 0):
        with pytest.raises(ValueError, match="top_k"):
            activate(pre, "topk", None, bad_k)
    with pytest.raises(ValueError, match="'gelu'.*relu.*jumprelu.*topk"):
        activate(pre, "gelu", None, None)


# ---- encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_encode_is_activation_of_encoder_affine_map(activation: str, cross_layer: bool):
    top_k = 4 if activation == "topk" else None
    ts = make_set(cross_layer=cross_layer, activation=activation, top_k=top_k)
    x = randn(torch.Generator().manual_seed(4), 7, D_MODEL)
    for i in range(N_LAYERS):
        w = ts.layer(i)
        pre = torch.einsum("nd,fd->nf", x, w.W_enc) + w.b_enc  # W_enc is (d_transcoder, d_model)
        if activation == "relu":
            expected = pre.clamp(min=0)
        elif activation == "jumprelu":
            expected = torch.where(pre > w.threshold, pre, torch.zeros_like(pre))
        else:
            expected = reference_topk(pre, top_k)
        torch.testing.assert_close(ts.pre_activations(i, x), pre, rtol=0, atol=1e-12)
        torch.testing.assert_close(ts.encode(i, x), expected, rtol=0, atol=1e-12)


# ---- decoder and reconstruction -----------------------------------------------------------------


def test_plt_reconstruct_is_decoder_plus_bias_plus_transposed_skip():
    ts = make_set(cross_layer=False, skip=True)
    gen = torch.Generator().manual_seed(5)
    x = randn(gen, 7, D_MODEL)
    acts = [randn(gen, 7, D_TC) for _ in range(N_LAYERS)]
    for i in range(N_LAYERS):
        w = ts.layer(i)
        skip = torch.einsum("ni,oi->no", x, w.W_skip)  # PLT W_skip is (d_model_out, d_model_in)
        expected = torch.einsum("nf,fd->nd", acts[i], w.W_dec) + w.b_dec + skip
        torch.testing.assert_close(ts.reconstruct(i, acts, x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(ts.skip(i, x), skip, rtol=0, atol=1e-12)


def test_plt_without_skip_has_zero_skip_term():
    ts = make_set(cross_layer=False)
    x = randn(torch.Generator().manual_seed(6), 7, D_MODEL)
    assert not ts.has_skip
    assert torch.equal(ts.skip(0, x), torch.zeros_like(x))


@pytest.mark.parametrize("skip", [False, True])
def test_clt_reconstruct_sums_decoders_of_all_earlier_layers(skip: bool):
    ts = make_set(cross_layer=True, skip=skip)
    gen = torch.Generator().manual_seed(7)
    x = randn(gen, 7, D_MODEL)
    acts = [randn(gen, 7, D_TC) for _ in range(N_LAYERS)]
    for target in range(N_LAYERS):
        expected = ts.layer(target).b_dec.expand(7, D_MODEL).clone()
        for source in range(target + 1):
            w_dec = ts.layer(source).W_dec  # (d_transcoder, n_layers - source, d_model)
            for n in range(7):
                for f in range(D_TC):
                    expected[n] += acts[source][n, f] * w_dec[f, target - source]
        if skip:
            expected += torch.einsum("ni,io->no", x, ts.layer(target).W_skip)  # CLT: x @ W_skip
        torch.testing.assert_close(ts.reconstruct(target, acts, x), expected, rtol=0, atol=1e-12)
        assert list(ts.source_layers(target)) == list(range(target + 1))


def test_decoder_directions_and_their_refusals():
    clt = make_set(cross_layer=True)
    assert torch.equal(clt.decoder(0, 2), clt.layer(0).W_dec[:, 2])
    assert torch.equal(clt.decoder(1, 1), clt.layer(1).W_dec[:, 0])
    with pytest.raises(ValueError, match="layer 2 cannot write to layer 1"):
        clt.decoder(2, 1)
    plt = make_set(cross_layer=False)
    assert torch.equal(plt.decoder(1, 1), plt.layer(1).W_dec)
    for target in (0, 2):
        with pytest.raises(ValueError, match="layer 1 write only to layer 1"):
            plt.decoder(1, target)


# ---- validation --------------------------------------------------------------------------------


def test_wrong_encoder_shape_names_layer_and_expected_shape():
    layers = make_layers(cross_layer=False, skip=False, threshold=False)
    layers[1].W_enc = layers[1].W_enc[:, :-1]
    with pytest.raises(ValueError, match=rf"layer 1: W_enc .*\({D_TC}, {D_MODEL}\)"):
        TranscoderSet.from_layers(layers, activation="relu", cross_layer=False)


def test_wrong_clt_decoder_slot_count_names_layer_and_expected_shape():
    layers = make_layers(cross_layer=True, skip=False, threshold=False)
    layers[1].W_dec = layers[1].W_dec[:, :1]  # layer 1 of 3 needs 2 slots
    with pytest.raises(ValueError, match=rf"layer 1: W_dec .*\({D_TC}, 2, {D_MODEL}\)"):
        TranscoderSet.from_layers(layers, activation="relu", cross_layer=True)
    # a PLT-shaped decoder in a CLT is refused too
    layers = make_layers(cross_layer=False, skip=False, threshold=False)
    with pytest.raises(ValueError, match=rf"layer 0: W_dec .*\({D_TC}, {N_LAYERS}, {D_MODEL}\)"):
        TranscoderSet.from_layers(layers, activation="relu", cross_layer=True)


def test_wrong_skip_shape_is_refused():
    layers = make_layers(cross_layer=False, skip=True, threshold=False)
    layers[2].W_skip = layers[2].W_skip[:, :-1]
    with pytest.raises(ValueError, match=rf"layer 2: W_skip .*\({D_MODEL}, {D_MODEL}\)"):
        TranscoderSet.from_layers(layers, activation="relu", cross_layer=False)


def test_jumprelu_without_threshold_is_refused():
    layers = make_layers(cross_layer=False, skip=False, threshold=False)
    with pytest.raises(ValueError, match="layer 0: jumprelu .*threshold"):
        TranscoderSet.from_layers(layers, activation="jumprelu", cross_layer=False)


def test_set_level_activation_checks():
    layers = make_layers(cross_layer=False, skip=False, threshold=False)
    with pytest.raises(ValueError, match="top_k"):
        TranscoderSet.from_layers(layers, activation="topk", cross_layer=False)
    with pytest.raises(ValueError, match="'softplus'.*relu.*jumprelu.*topk"):
        TranscoderSet.from_layers(layers, activation="softplus", cross_layer=False)


# ---- lazy loading ------------------------------------------------------------------------------


def test_loader_called_once_per_layer_and_again_after_offload():
    weights = make_layers(cross_layer=False, skip=False, threshold=False)
    calls: list[int] = []

    def loader(i: int) -> LayerWeights:
        calls.append(i)
        return weights[i]

    ts = TranscoderSet(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TC,
        activation="relu",
        cross_layer=False,
        loader=loader,
        dtype=torch.float32,
    )
    assert calls == []
    x = torch.zeros(2, D_MODEL)
    ts.encode(1, x)
    ts.encode(1, x)
    ts.layer(1)
    assert calls == [1]
    assert ts.layer(1).W_enc.dtype == torch.float32  # cast to the set's dtype on load
    ts.layer(0)
    assert calls == [1, 0]
    ts.offload(keep=(0,))
    ts.layer(0)
    assert calls == [1, 0]
    ts.layer(1)
    assert calls == [1, 0, 1]
    ts.offload()
    ts.layer(0)
    ts.layer(1)
    assert calls == [1, 0, 1, 0, 1]
    with pytest.raises(IndexError, match=rf"layer {N_LAYERS} out of range"):
        ts.layer(N_LAYERS)


def test_loaded_layers_are_validated():
    weights = make_layers(cross_layer=False, skip=False, threshold=False)
    ts = TranscoderSet(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TC + 1,
        activation="relu",
        cross_layer=False,
        loader=lambda i: weights[i],
    )
    with pytest.raises(ValueError, match=rf"layer 2: W_enc .*\({D_TC + 1}, {D_MODEL}\)"):
        ts.layer(2)

"""GPT-OSS's mixture-of-experts block in a live intervention: the block returns (output, router
scores), a feature's change is added to its output, and the routers downstream run live on the
changed residual stream (the router is part of the MLP, not of the linear model).

The reference is an untouched copy of the model with plain torch hooks: the feature's activation is
computed by hand from the block's input, and its decoded change is added to the first element of
the block's output.
"""

from __future__ import annotations

import copy

import torch

from tracer.interventions.intervene import FeatureChange, intervene
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders

IDS = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11, 12])
POS = 3


def test_full_mode_feature_change_equals_a_hooked_moe_forward():
    model = build_model("gpt_oss").to(torch.float64)
    plain = copy.deepcopy(model)
    ts = build_transcoders("plt-relu", n_layers=2, d_model=32).to(torch.float64)
    rm = ReplacementModel(model, ts)
    state = rm.run_prompt(IDS, zero_bos=False)
    feature = int(state.activations[0][POS].argmax())
    assert state.activations[0][POS, feature] > 0.1
    result = intervene(rm, IDS, [FeatureChange(0, POS, feature, value=0.0)], mode="full")

    weights = ts.layer(0)

    def ablate(_module, args, output):
        x = args[0][0, POS]  # the block's input: the pre-MLP norm's output (mlp.hook_in)
        activation = torch.relu(x @ weights.W_enc[feature] + weights.b_enc[feature])
        written = output[0].clone()
        written[0, POS] -= activation * weights.W_dec[feature]
        return (written, *output[1:])

    scores: list[torch.Tensor] = []
    router = plain.model.layers[1].mlp.router
    handles = [router.register_forward_hook(lambda _m, _a, out: scores.append(out[1]))]
    with torch.no_grad():
        clean = plain(IDS[None]).logits
        handles.append(plain.model.layers[0].mlp.register_forward_hook(ablate))
        expected = plain(IDS[None]).logits
    for handle in handles:
        handle.remove()

    scale = expected.abs().max().item()
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-10 * scale)
    assert (expected - clean).abs().max() > 1e-3 * scale  # the ablation changes the output
    # the next block's router saw the change: its scores moved from the ablated position on
    moved = (scores[1] - scores[0]).abs().view(1, IDS.shape[0], -1).amax(-1)[0]
    assert moved[POS:].max() > 1e-6 and moved[:POS].max() == 0

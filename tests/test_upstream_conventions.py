"""The same graph as the reference tool (circuit-tracer): what token nodes write, what hooks read.

- A token node writes its token's embedding only; GPT-2's learned position embedding is a constant
  of the replacement model, like a bias (DESIGN.md section 5).
- `ln2.hook_normalized` reads the pre-MLP norm's input normalised *before* its weight and bias, as
  TransformerLens computes it (DESIGN.md section 4); in the linear pass that read is linear in
  resid_mid through the prompt's frozen norm scale.

Every expected number is computed here by hand from the weights of an untouched copy of the
model (plain torch forward hooks capture the activations), or measured by a real intervention.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.interventions.intervene import TokenChange
from tracer.model.families import family_for, get_module
from tracer.model.replacement import ReplacementModel
from tracer.testing import ALL_FIXTURE_FAMILIES, build_model, build_transcoders, direct_run

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
IDS = torch.tensor([0, *PROMPT])  # the start token the replacement model prepends


def model_with_random_norms(family: str, n_layers: int = 2, seed: int = 0):
    """A float64 fixture model whose pre-MLP norms have clearly non-trivial weights (and biases):
    a read before the weight then differs from the MLP input by a lot."""
    model = build_model(family, n_layers=n_layers, seed=seed).to(torch.float64)
    fam = family_for(model.config.model_type)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in get_module(get_module(model, fam.base), fam.layers):
            norm = get_module(layer, fam.pre_mlp_norm)
            centre = 0.0 if fam.norm_style == "rms_one_plus" else 1.0  # Gemma scales by 1 + w
            shape = norm.weight.shape
            norm.weight.copy_(centre + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
    return model


class Capture:
    """Inputs and outputs of named modules of an untouched model, by plain torch hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args, output):
            self.inputs[name] = args[0][0].detach().clone()
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[name] = out[0].detach().clone()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hand_normalized(style: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """TransformerLens's `hook_normalized`: (x - mean) / sqrt(var + eps) for LayerNorm,
    x / sqrt(mean(x^2) + eps) for RMSNorm; the norm's weight (Gemma: 1 + w) is not applied."""
    if style == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def eps_of(norm: torch.nn.Module) -> float:
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


# ---- ln2.hook_normalized -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_activations_read_at_hook_normalized_are_the_pre_weight_normalised_input(family):
    """Activations of a ReLU set declaring `ln2.hook_normalized` are relu(x_hat @ W_enc.T + b_enc)
    with x_hat the pre-MLP norm's input normalised by hand; the MLP input gives others."""
    model = model_with_random_norms(family)
    fam = family_for(model.config.model_type)
    ts = build_transcoders(
        "plt-relu", n_layers=2, d_model=32, feature_input_hook="ln2.hook_normalized"
    ).to(torch.float64)
    rm = ReplacementModel(model, ts)
    # the norms' real inputs and outputs in this very forward (an untouched copy would differ by
    # float32 rounding: transformers' RMSNorms compute in float32, the recording pass does not)
    layers = get_module(get_module(model, fam.base), fam.layers)
    norms = {f"{i}": get_module(layer, fam.pre_mlp_norm) for i, layer in enumerate(layers)}
    capture = Capture(norms)
    try:
        state = rm.run_prompt(IDS, zero_bos=False)
    finally:
        capture.remove()
    for i, norm in enumerate(norms.values()):
        x_hat = hand_normalized(fam.norm_style, capture.inputs[f"{i}"], eps_of(norm))
        weights = ts.layer(i)
        expected = torch.relu(x_hat @ weights.W_enc.T + weights.b_enc)
        torch.testing.assert_close(state.activations[i], expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(state.reads[i], x_hat, rtol=0, atol=1e-10)
        # the norm's output (the MLP input, mlp.hook_in) is not what this set reads
        at_mlp_input = torch.relu(capture.outputs[f"{i}"] @ weights.W_enc.T + weights.b_enc)
        assert (at_mlp_input > 0).ne(expected > 0).sum() > 10


@pytest.mark.parametrize("family", ALL_FIXTURE_FAMILIES)
def test_frozen_hook_normalized_read_times_the_weight_is_the_frozen_norm_output(family):
    """In the direct-effect model, with a source removed so resid_mid moves, the read at
    `ln2.hook_normalized` times the norm's weight (plus bias) is what the frozen norm outputs:
    the read uses the prompt's frozen scale, the same as the norm's own freezing."""
    model = model_with_random_norms(family)
    fam = family_for(model.config.model_type)
    ts = build_transcoders("clt", n_layers=2, d_model=32, feature_input_hook="ln2.hook_normalized")
    rm = ReplacementModel(model, ts)
    state = rm.run_prompt(IDS)
    layers = get_module(get_module(model, fam.base), fam.layers)
    norms = {f"{i}": get_module(layer, fam.pre_mlp_norm) for i, layer in enumerate(layers)}
    capture = Capture(norms)
    try:
        run = direct_run(rm, state, [[TokenChange(3, 0.0)]])
    finally:
        capture.remove()
    for i, norm in enumerate(norms.values()):
        weight = 1 + norm.weight if fam.norm_style == "rms_one_plus" else norm.weight
        bias = norm.bias if fam.norm_style == "layernorm" else 0
        read = run.reads[0, i]
        torch.testing.assert_close(read * weight + bias, capture.outputs[f"{i}"], rtol=0, atol=1e-9)
        moved = (read - state.reads[i]).abs().amax(-1)  # from the removed token's position on
        assert moved[3] > 1e-6 and moved[:3].max() < 1e-12


# ---- token nodes: GPT-2 by hand ----------------------------------------------------------------
def hand_token_edges(plain, ts, graph, read_hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct effects of each token embedding in a 1-layer GPT-2, written out (float64).

    With the attention pattern P and the norm scales s1 (ln_1), s2 (ln_2), sf (ln_f) of the prompt
    frozen, a vector e added at position p of the residual stream entering layer 0 reaches
    resid_mid[q] as [q == p] e + sum_h P[h, q, p] (s1[p] centre(e) * w1) W_v,h W_o,h, the MLP output
    is a constant, and
    - the layer-0 feature (q, f) moves by read(resid_mid[q]) . W_enc[f], read being the identity
      (hook_resid_mid), s2 centre(.) (ln2.hook_normalized) or s2 centre(.) * w2 (mlp.hook_in);
    - logit target t moves by sf[L] centre(resid_mid[L]) * wf . (u_t - mean_v u_v), L the last
      position.
    Returns (feature rows (n_features, n_pos), logit rows (k, n_pos)), column p for e = wte[id_p].
    """
    block, wte = plain.transformer.h[0], plain.transformer.wte.weight
    ids = graph.input_tokens
    n_pos, d = ids.shape[0], wte.shape[1]
    n_head = plain.config.n_head
    capture = Capture({"ln_1": block.ln_1, "ln_2": block.ln_2, "ln_f": plain.transformer.ln_f})
    with torch.no_grad():
        plain(ids[None])
    capture.remove()

    def scale(name: str) -> torch.Tensor:  # (n_pos, 1): 1 / sqrt(var + eps)
        x = capture.inputs[name]
        return 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    def centre(x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)

    # the pattern, from ln_1's output and the Conv1D weights (x @ W + b)
    qkv = capture.outputs["ln_1"] @ block.attn.c_attn.weight + block.attn.c_attn.bias
    q, k, _ = (t.reshape(n_pos, n_head, -1).transpose(0, 1) for t in qkv.split(d, dim=-1))
    scores = q @ k.transpose(1, 2) / (d // n_head) ** 0.5
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (heads, q, p)
    w_v = block.attn.c_attn.weight[:, 2 * d :]
    w_o = block.attn.c_proj.weight

    e = wte[ids]  # (n_pos, d): token embeddings only, no wpe
    values = ((scale("ln_1") * centre(e) * block.ln_1.weight) @ w_v).reshape(n_pos, n_head, -1)
    # resid_mid change at q from the token at p: (q, p, d)
    moved = torch.einsum("hqp,phc->qphc", pattern, values).reshape(n_pos, n_pos, d) @ w_o
    moved = moved + torch.diag_embed(torch.ones(n_pos, dtype=e.dtype))[..., None] * e[None]

    features = graph.active_features[graph.selected_features]
    rows = []
    for layer, pos, feat in features.tolist():
        assert layer == 0
        x = moved[pos]  # (p, d)
        if read_hook != "hook_resid_mid":
            x = scale("ln_2")[pos] * centre(x)
        if read_hook == "mlp.hook_in":
            x = x * block.ln_2.weight
        rows.append(x @ ts.layer(0).W_enc[feat])
    unembed = plain.lm_head.weight
    directions = torch.stack(
        [unembed[t.token_ids[0]] - unembed.mean(0) for t in graph.logit_targets]
    )
    final = scale("ln_f")[-1] * centre(moved[-1]) * plain.transformer.ln_f.weight  # (p, d)
    return torch.stack(rows), directions @ final.T


@pytest.mark.parametrize("read_hook", ["mlp.hook_in", "ln2.hook_normalized", "hook_resid_mid"])
def test_gpt2_token_edges_are_the_token_embedding_alone(read_hook):
    """Token -> feature and token -> logit edges of a 1-layer GPT-2 equal the hand computation
    with wte alone, and a real intervention removing the token embedding (direct-effect model)
    measures them; the same computation with wte + wpe gives clearly different edges."""
    model = model_with_random_norms("gpt2", n_layers=1)
    plain = copy.deepcopy(model)
    ts = build_transcoders("plt-relu", n_layers=1, d_model=32, feature_input_hook=read_hook)
    rm = ReplacementModel(model, ts.to(torch.float64))
    graph = attribute(PROMPT, rm, batch_size=64, progress=False)
    layout = graph.layout
    assert layout.n_features > 20
    token_cols = graph.adjacency_matrix[:, layout.token_slice]  # (N, n_pos)
    feature_edges, logit_edges = token_cols[layout.feature_slice], token_cols[layout.logit_slice]

    hand_features, hand_logits = hand_token_edges(plain, ts, graph, read_hook)
    for got, want in ((feature_edges, hand_features), (logit_edges, hand_logits)):
        scale = want.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * scale)

    # with the position embedding counted in, the edges would differ
    with torch.no_grad():
        plain.transformer.wte.weight[graph.input_tokens] += plain.transformer.wpe.weight[
            : graph.n_pos
        ]
    with_positions, _ = hand_token_edges(plain, ts, graph, read_hook)
    assert (with_positions - feature_edges).abs().max() > 0.1 * feature_edges.abs().max()

    # a real intervention: remove each token's embedding in the frozen direct-effect model
    state = rm.run_prompt(graph.input_tokens)
    clean = direct_run(rm, state, [[]])
    run = direct_run(rm, state, [[TokenChange(p, 0.0)] for p in range(graph.n_pos)])
    features = graph.active_features[graph.selected_features]

    def targets(r, b):
        pre = [r.reads[b, 0, pos] @ ts.layer(0).W_enc[f] for _, pos, f in features.tolist()]
        unembed = rm.unembedding
        logits = [
            r.final_hidden[b, -1] @ (unembed[t.token_ids[0]] - unembed.mean(0))
            for t in graph.logit_targets
        ]
        return torch.stack(pre), torch.stack(logits)

    base_features, base_logits = targets(clean, 0)
    for p in range(graph.n_pos):
        after_features, after_logits = targets(run, p)
        for measured, want in (
            (base_features - after_features, hand_features[:, p]),
            (base_logits - after_logits, hand_logits[:, p]),
        ):
            scale = max(want.abs().max().item(), 1e-6)
            torch.testing.assert_close(measured, want, rtol=0, atol=1e-9 * scale)

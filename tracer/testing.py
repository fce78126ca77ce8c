"""Small seeded random models and transcoders for tests, benchmarks and the quick-start job.

They are untrained: good for exactness checks and timings, not for looking at circuits. Every
family of `tracer.model.families` can be built, with every transcoder variant.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracer.transcoders.sets import LayerWeights, TranscoderSet
from tracer.zoo.config import KINDS as TRANSCODER_KINDS

# every family of tracer.model.families, by its fixture name (the family's name)
ALL_FIXTURE_FAMILIES = (
    "gpt2",
    "llama",
    "gemma2",
    "qwen3",
    "gemma3",
    "gemma3_multimodal",
    "gpt_oss",
)
# the families whose hand-built references in the freezing and intervention tests exist (those
# hook an MLP block returning a tensor, on a model with one flat config); every family is covered
# by the family-table, exactness, wrapping and upstream-convention tests
FIXTURE_FAMILIES = ALL_FIXTURE_FAMILIES[:4]


def build_model(
    family: str,
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    vocab: int = 64,
    context: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny random causal LM of `family`; the RoPE families use grouped-query attention.

    Gemma-3 alternates sliding-window and global layers; `gemma3_multimodal` is a
    `Gemma3ForConditionalGeneration` with a one-layer vision tower (unused by text prompts).
    GPT-OSS has four experts, two per token, and attention sinks of a size that matters.
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        config = GPT2Config(
            n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=context, **common
        )
        model = GPT2LMHeadModel(config)
    else:
        llama_like = dict(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=context,
            **common,
        )
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(**llama_like))
        elif family == "qwen3":
            model = Qwen3ForCausalLM(Qwen3Config(head_dim=d_model // n_heads, **llama_like))
        elif family in ("gemma3", "gemma3_multimodal"):
            text = Gemma3TextConfig(
                head_dim=d_model // n_heads,
                query_pre_attn_scalar=d_model // n_heads,
                sliding_window=4,
                layer_types=[
                    "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
                ],
                final_logit_softcapping=30.0,
                **llama_like,
            )
            if family == "gemma3":
                model = Gemma3ForCausalLM(text)
            else:
                vision = dict(
                    model_type="siglip_vision_model",
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=16,
                    patch_size=8,
                )
                config = Gemma3Config(
                    text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4
                )
                model = Gemma3ForConditionalGeneration(config)
        elif family == "gpt_oss":
            rope = dict(
                rope_type="yarn",  # as the released models, scaled to this context
                rope_theta=150000.0,
                factor=32.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=max(1, context // 32),
            )
            config = GptOssConfig(
                head_dim=d_model // n_heads,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=4,
                rope_parameters=rope,
                experts_implementation="eager",  # grouped_mm has no float64 kernel
                **llama_like,
            )
            model = GptOssForCausalLM(config)
            with torch.no_grad():  # sinks that take a real share of each attention row
                for layer in model.model.layers:
                    layer.self_attn.sinks.normal_(0.0, 1.0)
        elif family == "gemma2":
            config = Gemma2Config(
                head_dim=d_model // n_heads,
                sliding_window=4,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                attn_implementation="eager",
                **llama_like,
            )
            model = Gemma2ForCausalLM(config)
        else:
            raise ValueError(f"unknown fixture family {family!r}; valid: {ALL_FIXTURE_FAMILIES}")
    _perturb_norms(model, seed)
    return model.eval()


def _perturb_norms(model: PreTrainedModel, seed: int) -> None:
    """Random norm weights/biases, so tests do not pass by the accident of unit weights."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def build_transcoders(
    kind: str,
    *,
    n_layers: int,
    d_model: int,
    d_transcoder: int = 48,
    feature_input_hook: str = "mlp.hook_in",
    seed: int = 0,
    top_k: int = 8,
) -> TranscoderSet:
    """A random transcoder set of `kind` (see TRANSCODER_KINDS) with many active features."""
    if kind not in TRANSCODER_KINDS:
        raise ValueError(f"unknown transcoder kind {kind!r}; valid: {TRANSCODER_KINDS}")
    gen = torch.Generator().manual_seed(seed)
    cross_layer = kind == "clt"
    activation = {"plt-relu": "relu", "plt-topk": "topk"}.get(kind, "jumprelu")

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    layers = []
    for i in range(n_layers):
        dec_shape = (
            (d_transcoder, n_layers - i, d_model) if cross_layer else (d_transcoder, d_model)
        )
        layers.append(
            LayerWeights(
                W_enc=randn(d_transcoder, d_model, scale=d_model**-0.5),
                b_enc=randn(d_transcoder, scale=0.1),
                W_dec=randn(*dec_shape, scale=0.3 * d_transcoder**-0.5),
                b_dec=randn(d_model, scale=0.05),
                threshold=torch.rand(d_transcoder, generator=gen) * 0.3
                if activation == "jumprelu"
                else None,
                W_skip=randn(d_model, d_model, scale=0.3 * d_model**-0.5)
                if kind == "plt-skip"
                else None,
            )
        )
    return TranscoderSet.from_layers(
        layers,
        activation=activation,
        cross_layer=cross_layer,
        top_k=top_k if activation == "topk" else None,
        feature_input_hook=feature_input_hook,
        feature_output_hook="mlp.hook_out",
        model_name="fixture",
        source=f"fixture:{kind}",
    )


FIXTURE_WORDS = (
    "the capital of state containing city is a an and in on to was were it that this he she they "
    "Dallas Austin Texas Houston Chicago Illinois Springfield Denver Colorado Miami Florida "
    "Tallahassee when went gave store school book ball John Mary one two three four five six"
).split()


def build_tokenizer(words: tuple[str, ...] = FIXTURE_WORDS):
    """A word-level fast tokenizer with BOS/EOS/PAD/UNK at ids 0-3."""
    from tracer.zoo.tokenizer import build_tokenizer as build_word_tokenizer

    return build_word_tokenizer(list(dict.fromkeys(words)))


def write_fixture(out, *, family: str = "gpt2", kind: str = "clt", seed: int = 0) -> dict:
    """Write `out/model` (save_pretrained + tokenizer) and `out/transcoders` (upstream layout)."""
    from pathlib import Path

    from tracer.transcoders.files import save_transcoders

    out = Path(out)
    tokenizer = build_tokenizer()
    model = build_model(family, n_layers=4, d_model=64, vocab=len(tokenizer), seed=seed)
    model_dir, ts_dir = out / "model", out / "transcoders"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ts = build_transcoders(kind, n_layers=4, d_model=64, d_transcoder=128, seed=seed)
    save_transcoders(ts, ts_dir, overwrite=True)
    return {"model": model_dir, "transcoders": ts_dir}


@torch.no_grad()
def calibrate_sparsity(model, transcoders: TranscoderSet, sample_ids: torch.Tensor, density: float):
    """Turn a random set into a sparse JumpReLU set: per-feature thresholds at the (1 - density)
    quantile of its pre-activations on `sample_ids` (batch, n_pos), as trained sets are sparse.

    `model` is a `tracer.model.replacement.ReplacementModel` wrapping the set.
    """
    if transcoders.activation != "jumprelu":
        raise ValueError("calibrate_sparsity needs a jumprelu set")
    reads: dict[int, list[torch.Tensor]] = {i: [] for i in range(transcoders.n_layers)}
    for ids in sample_ids:
        state = model.run_prompt(ids, zero_bos=False)
        for i, read in enumerate(state.reads):
            reads[i].append(read[1:])
    for i in range(transcoders.n_layers):
        pre = transcoders.pre_activations(i, torch.cat(reads[i]))
        transcoders.layer(i).threshold = pre.float().quantile(1 - density, dim=0).to(pre.dtype)


def direct_run(model, state, batch):
    """Direct-effect interventions (`run_with_changes` in "direct" mode) of each change set on
    the prompt of `state`, with every layer's reads and the final hidden state: what the
    exactness tests compare attribution's adjacency with."""
    from tracer.interventions.intervene import run_with_changes

    ids = state.input_ids[None].expand(len(batch), -1)
    return run_with_changes(
        model, state, ids, batch, mode="direct", with_activations=False, with_reads=True
    )

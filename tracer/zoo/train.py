"""Training the zoo's small causal LMs on the synthetic corpus, and measuring their accuracy.

Each sentence is one training sequence: `<bos> words... <eos>`, padded per batch; the loss is the
next-token cross-entropy over real tokens. Models are plain transformers models (GPT-2, Llama,
Gemma-2 architectures) saved with `save_pretrained`, so `AutoModelForCausalLM` loads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from tracer.zoo.config import LMConfig
from tracer.zoo.corpus import EvalPrompt



def build_lm(config: LMConfig, tokenizer) -> PreTrainedModel:
    """A freshly initialised model of `config.architecture` for `tokenizer`'s vocabulary."""
    torch.manual_seed(config.seed)
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.architecture == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                n_layer=config.n_layers,
                n_embd=config.d_model,
                n_head=config.n_heads,
                n_inner=config.d_mlp,
                n_positions=config.context,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **special,
            )
        )
    llama_like = dict(
        num_hidden_layers=config.n_layers,
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_attention_heads=config.n_heads,
        num_key_value_heads=max(1, config.n_heads // 2),
        max_position_embeddings=config.context,
        tie_word_embeddings=True,
        **special,
    )
    if config.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**llama_like))
    return Gemma2ForCausalLM(
        Gemma2Config(
            head_dim=config.d_model // config.n_heads,
            sliding_window=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            attn_implementation="eager",
            **llama_like,
        )
    )


def encode_sentences(tokenizer, sentences: Sequence[str], context: int) -> list[torch.Tensor]:
    """`<bos> words <eos>` id sequences, each at most `context` long."""
    out = []
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        seq = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        if len(seq) > context:
            raise ValueError(f"sentence of {len(seq)} tokens exceeds the context {context}")
        out.append(torch.tensor(seq))
    return out


def _batch(sequences: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(s) for s in sequences], batch_first=True, padding_value=0
    )
    return ids, mask


def train_lm(
    model: PreTrainedModel,
    tokenizer,
    sentences: Sequence[str],
    config: LMConfig,
    *,
    progress: bool = True,
) -> list[float]:
    """Train in place with AdamW and a warmup + cosine schedule; returns the loss per step."""
    sequences = encode_sentences(tokenizer, sentences, config.context)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc=f"train {config.architecture}", disable=not progress)
    for _ in bar:
        pick = torch.randint(len(sequences), (config.batch_size,), generator=generator)
        ids, mask = _batch([sequences[i] for i in pick], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: PreTrainedModel, tokenizer, prompts: Sequence[EvalPrompt]) -> dict[str, float]:
    """Top-1 next-word accuracy per (task, held-out split): keys like `two_hop/held_out`."""
    hits: dict[str, list[bool]] = {}
    for prompt in prompts:
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(prompt.prompt, add_special_tokens=False)["input_ids"],
        ]
        answer = tokenizer(prompt.answer, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        key = f"{prompt.task}/{'held_out' if prompt.held_out else 'trained'}"
        hits.setdefault(key, []).append(int(logits.argmax()) == answer[0])
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}

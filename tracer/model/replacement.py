"""The local replacement model: a transformers model traced with NNSight, transcoders in the loop.

For one prompt (DESIGN.md section 2): attention patterns and norm scales are frozen, each MLP output
is `transcoder output + error` with the error a constant, feature activations are constants. A
transcoder's skip term is linear in the MLP input, so it stays differentiable (it is part of the
linear model, not a source). `ReplacementModel` owns the model's wrapping (undone by `close`), its
transcoders and the two traced passes the rest of the library needs:
- `run_prompt`: one clean forward that records everything of the prompt (`PromptState`, its
  attention patterns and norm scales included);
- `linear_forward`: the prompt repeated `batch` times with gradients frozen (the state's patterns
  and scales replayed), returning the tensors that attribution differentiates.
Every traced pass runs inside `traced_pass`, which sets its freezing for the calling thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tracer.hub import resolve_model
from tracer.model.families import (
    Family,
    family_for,
    get_module,
    hook_point,
    norm_eps,
    normalize,
    text_config,
)
from tracer.model.freezing import Recording
from tracer.model.wrapping import Wrapping
from tracer.transcoders.sets import TranscoderSet

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(
    name_or_path: str, *, dtype: str | torch.dtype = "float32", revision: str | None = None
) -> PreTrainedModel:
    """Load a causal LM from a local folder or hub id, in eval mode, on CPU."""
    name_or_path = resolve_model(name_or_path, revision)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    family = family_for(config.model_type)
    kwargs = (
        {"attn_implementation": family.attn_implementation} if family.attn_implementation else {}
    )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=parse_dtype(dtype), **kwargs
    )
    return model.eval()


@dataclass
class PromptState:
    """Everything recorded on one clean pass over a prompt. Shapes per layer: (n_pos, ...)."""

    input_ids: torch.Tensor  # (n_pos,)
    embeddings: torch.Tensor  # (n_pos, d_model): residual stream entering layer 0
    token_embeddings: torch.Tensor  # (n_pos, d_model): what token nodes write (no position emb.)
    reads: list[torch.Tensor]  # per layer (n_pos, d_model): what the transcoder reads
    mlp_outputs: list[torch.Tensor]  # per layer (n_pos, d_model): what the MLP writes
    activations: list[torch.Tensor]  # per layer (n_pos, d_transcoder): feature activations
    errors: list[torch.Tensor]  # per layer (n_pos, d_model): mlp_output - transcoder output
    final_hidden: torch.Tensor  # (n_pos, d_model): after the final norm
    logits: torch.Tensor  # (n_pos, vocab): the model's own logits (after any soft-cap)
    recording: Recording  # attention patterns and norm scales, replayed by frozen passes
    # per layer (n_pos, 1): the read norm's scale on this prompt, for reads that normalise
    # (`ln2.hook_normalized`); frozen wherever the norms are
    read_scales: list[torch.Tensor] | None = None

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]

    def prefix(self, n: int) -> PromptState:
        """The state of the prompt's first `n` positions (views, no copies). With attention and
        norms frozen, a position depends only on those before it, so the linear pass of a prefix
        is exactly the prompt's restricted to it."""
        if not 1 <= n <= self.n_pos:
            raise ValueError(f"prefix length must be in [1, {self.n_pos}], got {n}")

        def cut(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if tensors is None else [t[:n] for t in tensors]

        return PromptState(
            input_ids=self.input_ids[:n],
            embeddings=self.embeddings[:n],
            token_embeddings=self.token_embeddings[:n],
            reads=cut(self.reads),
            mlp_outputs=cut(self.mlp_outputs),
            activations=cut(self.activations),
            errors=cut(self.errors),
            final_hidden=self.final_hidden[:n],
            logits=self.logits[:n],
            recording=self.recording.prefix(n),
            read_scales=cut(self.read_scales),
        )


class ReplacementModel:
    """A causal LM with a transcoder set, ready for attribution and interventions.

    Wrapping changes the model in place (tracer.model.wrapping): its attention implementation
    and norm forwards are routed through tracer's freezing, it is put in eval mode with
    `requires_grad=False` on every parameter, and NNSight instruments its modules. `close()`
    (or leaving `with ReplacementModel(...) as rm:`) restores all of it exactly; several
    ReplacementModels of one model share the wrapping, and the last to close restores the model.
    A closed ReplacementModel refuses to run. The transcoder set is used as given when it is in
    the model's dtype, else as a cast copy (the caller's set is not changed).

    Thread-safe: a prompt's attention patterns and norm scales live in its `PromptState`, and the
    freezing of a pass is set for the calling thread only (`traced_pass`); traced passes of one
    model take turns (NNSight cannot run two traces of one model at once), while the backward
    passes of attribution run concurrently. Plain calls of `rm.model` from another thread while
    a traced pass runs are not safe (NNSight would route them into that trace).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        transcoders: TranscoderSet,
        *,
        tokenizer=None,
        model_id: str | None = None,
        model_revision: str | None = None,
    ) -> None:
        self.family: Family = family_for(model.config.model_type)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id or getattr(model.config, "_name_or_path", None) or "unknown"
        self.model_revision = model_revision
        self.transcoders = transcoders
        self.base = get_module(model, self.family.base)
        self.layers = get_module(self.base, self.family.layers)
        self.n_layers = len(self.layers)
        self.text_config = text_config(model.config)  # a multimodal wrapper's text model's
        self.d_model = self.text_config.hidden_size
        self._check_transcoders()
        self.read_point = hook_point(self.family, transcoders.feature_input_hook, write=False)
        self.write_module = hook_point(
            self.family, transcoders.feature_output_hook, write=True
        ).module
        self.dtype = next(model.parameters()).dtype
        self.transcoders = _in_dtype(transcoders, self.dtype)
        self._wrapping: Wrapping | None = Wrapping.acquire(model, self.family)
        self.freezer = self._wrapping.freezer
        self.softcap = (
            getattr(self.text_config, self.family.final_softcap_attr, None)
            if self.family.final_softcap_attr
            else None
        )

    def close(self) -> None:
        """Stop using the model; the last ReplacementModel of a model restores it. Idempotent."""
        if self._wrapping is not None:
            self._wrapping.release()
            self._wrapping = None

    def __enter__(self) -> ReplacementModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._wrapping is None

    def _open_wrapping(self) -> Wrapping:
        if self._wrapping is None:
            raise RuntimeError(
                "this ReplacementModel is closed (close() gave the model back as it was); "
                "make a new ReplacementModel to trace it again"
            )
        return self._wrapping

    @property
    def envoy(self):
        """The NNSight envoy of the decoder stack (use it inside `traced_pass`)."""
        return self._open_wrapping().envoy

    @contextlib.contextmanager
    def traced_pass(
        self,
        attention: str = "off",
        norms: str | None = None,
        recording: Recording | None = None,
    ) -> Iterator[None]:
        """Hold around every `envoy.trace`: one pass at a time per model, frozen per the modes.

        Modes as `Freezer.frozen` (tracer.model.freezing), for this thread only; "record" writes
        the pass's patterns and scales into `recording`, "replay" reads them from it.
        """
        wrapping = self._open_wrapping()
        with wrapping.lock, self.freezer.frozen(attention, norms, recording):
            yield

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        transcoders: str,
        *,
        dtype: str | torch.dtype = "float32",
        revision: str | None = None,
        transcoder_revision: str | None = None,
    ) -> ReplacementModel:
        """Load a model (folder or hub id) and a transcoder set (folder or hf:// URI)."""
        from tracer.transcoders.files import load_transcoders

        lm = load_model(model, dtype=dtype, revision=revision)
        ts = load_transcoders(transcoders, revision=transcoder_revision)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        except (OSError, ValueError):
            tokenizer = None
        return cls(lm, ts, tokenizer=tokenizer, model_id=model, model_revision=revision)

    def _check_transcoders(self) -> None:
        ts = self.transcoders
        if ts.d_model != self.d_model:
            raise ValueError(
                f"transcoder d_model {ts.d_model} does not match the model's hidden size "
                f"{self.d_model} ({self.model_id})"
            )
        if ts.n_layers != self.n_layers:
            raise ValueError(
                f"transcoder set has {ts.n_layers} layers but the model has {self.n_layers}"
            )

    # ---- prompts -------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        config = self.text_config
        return getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    def tokenize(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Token ids (n_pos,) with a special token first (BOS, else EOS/PAD), as DESIGN.md asks."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty; give some text or token ids")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass the prompt as token ids")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = torch.as_tensor(prompt).flatten().tolist()
            if not ids:
                raise ValueError("prompt is empty; give some text or token ids")
        special = self._special_token_ids()
        if ids[0] not in special:
            start = self._start_token_id()
            ids = [start, *ids] if start is not None else ids
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        limit = self.context_length
        if limit is not None and len(ids) > limit:
            raise ValueError(
                f"prompt has {len(ids)} tokens (with the start token) but the model's context "
                f"is {limit} tokens"
            )
        return torch.tensor(ids, dtype=torch.long)

    def _special_token_ids(self) -> set[int]:
        config = self.text_config
        ids = {getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.all_special_ids)
        return {i for i in ids if isinstance(i, int)}

    def _start_token_id(self) -> int | None:
        for source in (self.tokenizer, self.text_config):
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(source, key, None) if source is not None else None
                if isinstance(value, int):
                    return value
        return None

    # ---- weights -------------------------------------------------------------------------------
    @property
    def unembedding(self) -> torch.Tensor:
        """(vocab, d_model)."""
        return self.model.get_output_embeddings().weight

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from final-normed hidden states (soft-cap applied)."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layer_module(self, layer: int, name: str):
        envoy = get_module(get_module(self.envoy, self.family.layers)[layer], name)
        if name == self.family.mlp and self.family.mlp_returns_tuple:
            return _TupleHead(envoy)
        return envoy

    def _read_envoy(self, layer: int, scale: torch.Tensor | None = None):
        """Inside a trace: what layer's transcoder reads. A normalising read point uses the norm
        scale `scale` (n_prompt, 1) at the prompt's positions (frozen norms), else the live one."""
        value = self._read_point_envoy(layer)
        if self.read_point.normalized:
            value, _ = self._normalize(layer, value, scale)
        return value

    def _read_point_envoy(self, layer: int):
        """Inside a trace: the read point's module input or output, before any normalisation."""
        module = self._layer_module(layer, self.read_point.module)
        return module.input if self.read_point.side == "input" else module.output

    def _normalize(self, layer: int, x: torch.Tensor, scale: torch.Tensor | None = None):
        norm = get_module(self.layers[layer], self.read_point.module)
        return normalize(x, self.family.norm_style, norm_eps(norm), scale)

    def _read_scale(self, state: PromptState, layer: int) -> torch.Tensor | None:
        """The recorded scale of layer's normalising read (None for other read points)."""
        return state.read_scales[layer] if state.read_scales is not None else None

    def _embed_envoy(self):
        return get_module(self.envoy, self.family.embed_out)

    def _token_envoy(self):
        return get_module(self.envoy, self.family.embed_tokens)

    def _embed_with_token_scale(self, token_scale: torch.Tensor) -> None:
        """Inside a trace: scale the token embedding at each position by token_scale (B, n_pos, 1),
        the rest of the residual stream entering layer 0 (GPT-2's position embedding) unchanged."""
        if bool((token_scale == 1).all()):
            return
        embed = self._embed_envoy()
        if self.family.embed_tokens == self.family.embed_out:
            embed.output = embed.output * token_scale
        else:
            tokens = self._token_envoy().output  # runs before embed_out
            embed.output = embed.output + (token_scale - 1) * tokens

    def _replace_mlp(self, layer: int, value) -> None:
        """Inside a trace: the MLP block of `layer` writes `value` and is not computed at all."""
        mlp = self._layer_module(layer, self.family.mlp)
        if self.write_module == self.family.mlp:
            mlp.skip(value)
        else:  # the block writes through a module after the MLP (Gemma-2's post-MLP norm)
            mlp.skip(mlp.input)
            self._layer_module(layer, self.write_module).skip(value)

    # ---- passes --------------------------------------------------------------------------------
    @torch.no_grad()
    def run_prompt(self, input_ids: torch.Tensor, *, zero_bos: bool = True) -> PromptState:
        """Clean forward of one prompt; records patterns and norm scales for later replay."""
        ts = self.transcoders
        recording = Recording()
        with self.traced_pass("record", recording=recording):
            reads, outputs = [], []
            with self.envoy.trace(input_ids[None]):
                tokens = self._token_envoy().output.save()
                embeddings = self._embed_envoy().output.save()
                for layer in range(self.n_layers):  # normalised reads: below, with their scale
                    reads.append(self._read_point_envoy(layer).save())
                    outputs.append(self._layer_module(layer, self.write_module).output.save())
                final = self.envoy.output[0].save()
        reads = [r[0] for r in reads]
        scales = None
        if self.read_point.normalized:
            normalized = [self._normalize(layer, read) for layer, read in enumerate(reads)]
            reads, scales = [n[0] for n in normalized], [n[1] for n in normalized]
        outputs = [o[0] for o in outputs]
        activations = [ts.encode(layer, reads[layer]) for layer in range(self.n_layers)]
        errors = [
            outputs[layer] - ts.reconstruct(layer, activations, reads[layer])
            for layer in range(self.n_layers)
        ]
        if zero_bos and input_ids[0].item() in self._special_token_ids():
            # The start token's residual is huge and its features uninformative: neither its
            # features nor its errors are sources; its MLP output stays in as a constant.
            for t in (*activations, *errors):
                t[0] = 0
        return PromptState(
            input_ids=input_ids,
            embeddings=embeddings[0],
            token_embeddings=tokens[0],
            reads=reads,
            mlp_outputs=outputs,
            activations=activations,
            errors=errors,
            final_hidden=final[0],
            logits=self.logits_from_hidden(final[0]),
            read_scales=scales,
            recording=recording,
        )

    def linear_forward(
        self, state: PromptState, batch: int, keep_values: bool = True
    ) -> LinearPass:
        """Forward of the prompt repeated `batch` times, linear in its sources.

        Attention patterns and norm scales are frozen, MLP outputs are constants (plus the
        transcoder's skip term, which is linear), so gradients at the returned write points are
        exact direct effects. With `keep_values=False` the outputs' values are dropped (a backward
        needs only their place in the graph, since no op of the pass saved a batch-sized
        activation): MLP inputs as the forward goes, which lowers its peak, the rest at its end.
        """
        ts = self.transcoders
        ids = state.input_ids[None].expand(batch, -1)
        shape = (batch, state.n_pos, self.d_model)
        # same prompt as the recorded one: replaying its patterns and scales gives the same values
        # with no gradient through them, and saves no batch-sized buffers for the backward
        with self.traced_pass("replay", recording=state.recording):
            reads, writes = [], []
            with self.envoy.trace(ids):
                # expanded views of single-copy leaves: gradients w.r.t. them are per batch
                # element, and no batch-sized copy is kept
                embed = state.embeddings.detach().requires_grad_(True).expand(shape).save()
                self._embed_envoy().output = embed
                for layer in range(self.n_layers):
                    read = self._read_envoy(layer, self._read_scale(state, layer)).save()
                    skip_clean = ts.skip(layer, state.reads[layer]) if ts.has_skip else 0
                    constant = state.mlp_outputs[layer] - skip_clean
                    write = constant.detach().requires_grad_(True).expand(shape).save()
                    self._replace_mlp(layer, write + ts.skip(layer, read) if ts.has_skip else write)
                    if not keep_values and (
                        self.read_point.normalized or self.read_point.module == self.family.mlp
                    ):
                        # the MLP's input (or a normalised read, computed here for the
                        # transcoder alone) feeds nothing now that the MLP is skipped: only its
                        # place in the graph is needed, so its memory goes at once
                        read.untyped_storage().resize_(0)
                    reads.append(read)
                    writes.append(write)
                final = self.envoy.output[0].save()
        if not keep_values:  # the rest of the read points and the final state, all at once
            for output in (*reads, final):
                output.untyped_storage().resize_(0)
        return LinearPass(
            embed=embed,
            reads=reads,
            writes=writes,
            final_hidden=final,
            leaves=[t._base for t in (embed, *writes)],
        )


class _TupleHead:
    """The envoy of an MLP block that returns (write, extras...) (GPT-OSS's router scores), seen
    as a block returning its write alone: `output` reads and replaces the first element, `skip`
    returns the value with no extras."""

    def __init__(self, envoy) -> None:
        self._envoy = envoy

    @property
    def input(self):
        return self._envoy.input

    @property
    def output(self):
        return self._envoy.output[0]

    @output.setter
    def output(self, value) -> None:
        self._envoy.output = (value, *self._envoy.output[1:])

    def skip(self, value) -> None:
        self._envoy.skip((value, None))


def _in_dtype(transcoders: TranscoderSet, dtype: torch.dtype) -> TranscoderSet:
    """The set itself when it is in `dtype`, else a copy cast to it (the given set is unchanged)."""
    if transcoders.dtype == dtype:
        return transcoders
    # a new dict of layers: `to` replaces its entries, and the caller's dict keeps its own
    return dataclasses.replace(transcoders, _layers=dict(transcoders._layers)).to(dtype)


@dataclass
class LinearPass:
    """Tensors of one linear forward (batch, n_pos, d_model); gradients w.r.t. `embed` and
    `writes` are the per-target gradients at the sources' write points."""

    embed: torch.Tensor
    reads: list[torch.Tensor]
    writes: list[torch.Tensor]
    final_hidden: torch.Tensor
    leaves: list[torch.Tensor]  # the single (n_pos, d_model) copies `embed` and `writes` expand

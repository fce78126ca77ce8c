"""Transcoders in memory: per-layer sets (PLT), cross-layer transcoders (CLT), activations, skip terms.

Conventions (upstream, checked by tests/test_transcoders.py):
- `W_enc` is (d_transcoder, d_model) and is used as `x @ W_enc.T + b_enc`.
- `W_dec` is (d_transcoder, d_model) for a PLT; for a CLT source layer i it is
  (d_transcoder, n_layers - i, d_model), slot k writing to layer i + k.
- A PLT's `W_skip` is (d_model_out, d_model_in), used as `x @ W_skip.T`; a CLT's per-layer skip is
  stored (d_model_in, d_model_out) and used as `x @ W_skip`.

Weights of a layer are materialised on first use through a loader callback, so a large set never has
to sit in memory at once (`offload()` drops them again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class LayerWeights:
    """Weights of one transcoder layer. For a CLT, `W_dec` is (d_transcoder, n_targets, d_model)."""

    W_enc: torch.Tensor  # (d_transcoder, d_model)
    b_enc: torch.Tensor  # (d_transcoder,)
    W_dec: (
        torch.Tensor
    )  # PLT: (d_transcoder, d_model); CLT: (d_transcoder, n_layers - layer, d_model)
    b_dec: torch.Tensor  # (d_model,)
    threshold: torch.Tensor | None = None  # (d_transcoder,) for JumpReLU
    W_skip: torch.Tensor | None = None  # (d_model, d_model), see module docstring for orientation

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> LayerWeights:
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LayerWeights(*(cast(getattr(self, f)) for f in self.__dataclass_fields__))


def activate(
    pre: torch.Tensor, activation: str, threshold: torch.Tensor | None, top_k: int | None
) -> torch.Tensor:
    """Apply the transcoder non-linearity to pre-activations (..., d_transcoder)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("jumprelu activation needs a per-feature threshold, got none")
        return pre * (pre > threshold)
    if activation == "topk":
        if top_k is None or top_k < 1:
            raise ValueError(f"topk activation needs top_k >= 1, got {top_k}")
        values, indices = torch.relu(pre).topk(min(top_k, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


@dataclass
class TranscoderSet:
    """A per-layer transcoder set or a cross-layer transcoder over all layers of a model.

    `cross_layer=True`: features of layer i write to every layer j >= i. The TransformerLens-style hook
    names say where features read and write; `tracer.model.families` maps them to model modules.
    """

    n_layers: int
    d_model: int
    d_transcoder: int
    activation: str
    cross_layer: bool
    feature_input_hook: str = "mlp.hook_in"
    feature_output_hook: str = "mlp.hook_out"
    top_k: int | None = None
    model_name: str | None = None
    scan: str | list[str] | None = None  # upstream config's free-form `scan` identifier
    source: str | None = None  # where it was loaded from (path or hf:// URI)
    revision: str | None = None
    dtype: torch.dtype = torch.float32
    loader: Callable[[int], LayerWeights] | None = None
    _layers: dict[int, LayerWeights] = field(default_factory=dict, repr=False)
    _has_skip: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        if self.activation == "topk" and (self.top_k is None or self.top_k < 1):
            raise ValueError(f"topk transcoders need top_k >= 1, got {self.top_k}")

    @classmethod
    def from_layers(cls, layers: list[LayerWeights], **kwargs) -> TranscoderSet:
        """Build a set whose weights are all in memory."""
        d_transcoder, d_model = layers[0].W_enc.shape
        ts = cls(n_layers=len(layers), d_model=d_model, d_transcoder=d_transcoder, **kwargs)
        for i, w in enumerate(layers):
            ts._check_layer(i, w)
            ts._layers[i] = w.to(ts.dtype)
        return ts

    # ---- weights -------------------------------------------------------------------------------
    def layer(self, i: int) -> LayerWeights:
        """Weights of layer i, loading them on first use."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"transcoder layer {i} out of range [0, {self.n_layers})")
        if i not in self._layers:
            if self.loader is None:
                raise RuntimeError(f"transcoder layer {i} is not in memory and there is no loader")
            w = self.loader(i)
            self._check_layer(i, w)
            self._layers[i] = w.to(self.dtype)
        return self._layers[i]

    def offload(self, keep: tuple[int, ...] = ()) -> None:
        """Drop layers from memory (they reload on next use); needs a loader."""
        if self.loader is None:
            return
        if self._has_skip is None and self._layers:  # settle it while a layer is still here
            self._has_skip = next(iter(self._layers.values())).W_skip is not None
        for i in list(self._layers):
            if i not in keep:
                del self._layers[i]

    def to(self, dtype: torch.dtype) -> TranscoderSet:
        self.dtype = dtype
        for i, w in self._layers.items():
            self._layers[i] = w.to(dtype)
        return self

    @property
    def has_skip(self) -> bool:
        if self._has_skip is None:  # cached: asking must not reload an offloaded layer
            self._has_skip = self.layer(0).W_skip is not None
        return self._has_skip

    def _check_layer(self, i: int, w: LayerWeights) -> None:
        where = f"transcoder layer {i}"
        if tuple(w.W_enc.shape) != (self.d_transcoder, self.d_model):
            raise ValueError(
                f"{where}: W_enc has shape {tuple(w.W_enc.shape)}, expected "
                f"(d_transcoder, d_model) = ({self.d_transcoder}, {self.d_model})"
            )
        if self.cross_layer:
            expected_dec = (self.d_transcoder, self.n_layers - i, self.d_model)
        else:
            expected_dec = (self.d_transcoder, self.d_model)
        if tuple(w.W_dec.shape) != expected_dec:
            raise ValueError(
                f"{where}: W_dec has shape {tuple(w.W_dec.shape)}, expected {expected_dec}"
            )
        if tuple(w.b_enc.shape) != (self.d_transcoder,) or tuple(w.b_dec.shape) != (self.d_model,):
            raise ValueError(
                f"{where}: b_enc/b_dec have shapes {tuple(w.b_enc.shape)}/{tuple(w.b_dec.shape)},"
                f" expected ({self.d_transcoder},)/({self.d_model},)"
            )
        if self.activation == "jumprelu" and w.threshold is None:
            raise ValueError(f"{where}: jumprelu set without a threshold")
        if w.W_skip is not None and tuple(w.W_skip.shape) != (self.d_model, self.d_model):
            raise ValueError(
                f"{where}: W_skip has shape {tuple(w.W_skip.shape)}, expected "
                f"({self.d_model}, {self.d_model})"
            )

    # ---- maths ---------------------------------------------------------------------------------
    def pre_activations(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) read at layer i -> (..., d_transcoder)."""
        w = self.layer(i)
        return x @ w.W_enc.T + w.b_enc

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (..., d_transcoder) of layer i."""
        w = self.layer(i)
        return activate(self.pre_activations(i, x), self.activation, w.threshold, self.top_k)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """Decoder of source-layer features into target layer: (d_transcoder, d_model)."""
        if self.cross_layer:
            if target < source:
                raise ValueError(f"CLT features of layer {source} cannot write to layer {target}")
            return self.layer(source).W_dec[:, target - source]
        if target != source:
            raise ValueError(f"per-layer features of layer {source} write only to layer {source}")
        return self.layer(source).W_dec

    def source_layers(self, target: int) -> range:
        """Layers whose features write into `target`."""
        return range(target + 1) if self.cross_layer else range(target, target + 1)

    def skip(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Linear skip term of layer i (zeros when the set has none)."""
        w = self.layer(i)
        if w.W_skip is None:
            return torch.zeros_like(x)
        return x @ (w.W_skip if self.cross_layer else w.W_skip.T)

    def reconstruct(self, target: int, acts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Transcoder output at layer `target` from activations of every source layer.

        acts[i] is (..., d_transcoder) for layer i; x is the input read at `target` (for the skip).
        """
        out = self.layer(target).b_dec + self.skip(target, x)
        for s in self.source_layers(target):
            out = out + acts[s] @ self.decoder(s, target)
        return out

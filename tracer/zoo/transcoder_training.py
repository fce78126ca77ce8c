"""Training transcoders for the zoo's models: collect MLP activations, fit, evaluate, splice.

Kinds (`TranscoderTrainConfig.kind`): per-layer sets with JumpReLU, ReLU or TopK features
(`plt-jumprelu`, `plt-relu`, `plt-topk`), a per-layer JumpReLU set with a linear skip
(`plt-skip`), and a JumpReLU cross-layer transcoder (`clt`, trained jointly: y_j is rebuilt from
the features of every layer i <= j).

Training runs in a normalised space per layer: x / s_x and (y - mean_y) / s_y, with s the RMS
(centred for y) of each layer's activations, so one set of hyper-parameters fits every layer and
model; the scales are folded into the weights of the returned set, which reads and writes the
model's own units. The loss per layer is the normalised MSE (SSE / SST, SST around the mean of y)
plus a sparsity penalty, summed over layers. JumpReLU thresholds learn through straight-through
estimators with a rectangle kernel (Rajamanoharan et al. 2024, "Jumping Ahead"), written here as
autograd Functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tracer.model.families import Family, family_for, get_module
from tracer.transcoders.sets import LayerWeights, TranscoderSet, activate
from tracer.zoo.config import TranscoderTrainConfig
from tracer.zoo.train import _batch, encode_sentences


Activations = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: x, y, each (n_tokens, d_model)


# ---- activations ---------------------------------------------------------------------------------
def _decoder_layers(model: PreTrainedModel) -> tuple[Family, torch.nn.ModuleList]:
    family = family_for(model.config.model_type)
    return family, get_module(get_module(model, family.base), family.layers)


def _context(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def collect_activations(
    model: PreTrainedModel,
    tokenizer,
    sentences: Sequence[str],
    max_tokens: int,
    *,
    batch_size: int = 64,
) -> Activations:
    """Per layer, (x, y): the MLP input and what the MLP block adds to the residual stream.

    Each sentence runs as `<bos> words <eos>`; BOS and padding positions are skipped. Sentences are
    taken in order until `max_tokens` tokens are collected (fewer if the sentences run out). Rows are
    ordered by sentence, then position, identically in every layer. Returns float32 tensors
    (n_tokens, d_model).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    family, layers = _decoder_layers(model)
    sequences, n_tokens = [], 0
    for seq in encode_sentences(tokenizer, sentences, _context(model)):
        if n_tokens >= max_tokens:
            break
        sequences.append(seq)
        n_tokens += len(seq) - 1
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    ys: list[list[torch.Tensor]] = [[] for _ in layers]
    keep = torch.empty(0, dtype=torch.bool)  # (batch, n_pos - 1) real tokens after BOS

    def read_hook(i: int):
        def hook(module, args, kwargs):
            xs[i].append(_first_tensor(args, kwargs)[:, 1:][keep].float())

        return hook

    def write_hook(i: int):
        def hook(module, args, output):
            ys[i].append(output[:, 1:][keep].float())

        return hook

    handles = []
    for i, layer in enumerate(layers):
        mlp, write = get_module(layer, family.mlp), get_module(layer, family.mlp_write)
        handles.append(mlp.register_forward_pre_hook(read_hook(i), with_kwargs=True))
        handles.append(write.register_forward_hook(write_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = _batch(sequences[start : start + batch_size], tokenizer.pad_token_id)
            keep = mask[:, 1:].bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [
        (torch.cat(x)[:max_tokens], torch.cat(y)[:max_tokens]) for x, y in zip(xs, ys, strict=True)
    ]


# ---- JumpReLU with straight-through threshold gradients -----------------------------------------
class _JumpReLU(torch.autograd.Function):
    """One pass for both outputs: the element-wise work dominates training time on CPU."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        above = pre > threshold
        ctx.save_for_backward(pre, threshold, above)
        ctx.bandwidth = bandwidth
        return torch.where(above, pre, 0.0), above.to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_acts: torch.Tensor, grad_active: torch.Tensor):
        pre, threshold, above = ctx.saved_tensors
        eps = ctx.bandwidth
        # Rectangle kernel K((pre - threshold) / eps): 1 where |pre - threshold| < eps / 2.
        near = (pre - threshold).abs_() < eps / 2
        # d acts / d threshold = -(threshold / eps) K;  d active / d threshold = -(1 / eps) K.
        through = torch.where(near, threshold * grad_acts + grad_active, 0.0)
        grad_threshold = -through.sum_to_size(threshold.shape) / eps
        return torch.where(above, grad_acts, 0.0), grad_threshold, None


def jumprelu(
    pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU activations `pre * H(pre - threshold)` and the active indicator `H(pre - threshold)`.

    Both are (..., d_transcoder); `threshold` broadcasts against `pre` and its gradient is summed to
    its own shape. Gradients (straight-through, rectangle kernel K of width eps = `bandwidth`):
    activations: d/dpre = H(pre - threshold), d/dthreshold = -(threshold / eps) K;
    indicator (the L0 count): d/dpre = 0, d/dthreshold = -(1 / eps) K.
    """
    return _JumpReLU.apply(pre, threshold, bandwidth)


# ---- the model being trained ----------------------------------------------------------------------
@dataclass
class _Scales:
    """Per-layer normalisation: x' = x / x_scale, y' = (y - y_mean) / y_scale."""

    x_scale: torch.Tensor  # (n_layers,)
    y_mean: torch.Tensor  # (n_layers, d_model)
    y_scale: torch.Tensor  # (n_layers,)

    @classmethod
    def of(cls, activations: Activations) -> _Scales:
        x_scale = torch.stack([x.pow(2).mean().sqrt() for x, _ in activations])
        y_mean = torch.stack([y.mean(0) for _, y in activations])
        y_scale = torch.stack(
            [(y - m).pow(2).mean().sqrt() for (_, y), m in zip(activations, y_mean, strict=True)]
        )
        return cls(x_scale.clamp_min(1e-8), y_mean, y_scale.clamp_min(1e-8))


class _Trainable(torch.nn.Module):
    """All layers' weights in the normalised space, stacked on a leading layer axis.

    A PLT's decoder is (n_layers, d_transcoder, d_model); a CLT's is one tensor per source layer i,
    (d_transcoder, n_layers - i, d_model) as upstream stores it, so no compute goes to the
    (source > target) blocks that do not exist.
    """

    def __init__(self, config: TranscoderTrainConfig, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.config = config
        self.cross_layer = config.kind == "clt"
        gen = torch.Generator().manual_seed(config.seed)
        n, f, d = n_layers, config.d_transcoder, d_model

        def unit_rows(*shape: int) -> torch.Tensor:
            rows = torch.randn(*shape, d, generator=gen)
            return rows / rows.norm(dim=-1, keepdim=True)

        directions = unit_rows(n, f)  # (n, f, d)
        # Encoder rows are the decoder directions at unit norm: pre-activations start at the
        # scale of the normalised input, where the initial threshold is meaningful.
        self.W_enc = torch.nn.Parameter(directions.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n, f))
        scale = config.decoder_init_norm
        if self.cross_layer:  # slot 0 (same layer) shares the encoder direction
            self.W_dec = torch.nn.ParameterList(
                torch.nn.Parameter(
                    scale * torch.cat([directions[i, :, None], unit_rows(f, n - i - 1)], 1)
                )
                for i in range(n)
            )
        else:
            self.W_dec = torch.nn.Parameter(scale * directions)
        self.b_dec = torch.nn.Parameter(torch.zeros(n, d))  # y is centred: b_dec starts at mean y
        self.log_threshold = torch.nn.Parameter(
            torch.full((n, f), math.log(config.initial_threshold))
        )
        self.W_skip = (
            torch.nn.Parameter(torch.zeros(n, d, d)) if config.kind == "plt-skip" else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n_layers, batch, d_model) -> y_hat (n_layers, batch, d_model), feature activations
        (n_layers, batch, d_transcoder), sparsity penalty per layer (n_layers,)."""
        config = self.config
        pre = torch.baddbmm(self.b_enc[:, None], x, self.W_enc.transpose(1, 2))  # (n, b, f)
        if config.activation == "jumprelu":
            threshold = self.log_threshold.exp()[:, None]  # (n, 1, f)
            acts, active = jumprelu(pre, threshold, config.bandwidth)
            penalty = config.l0_coefficient * active.sum(-1).mean(-1)
        elif config.activation == "relu":
            acts = torch.relu(pre)
            # L1 weighted by decoder norms, or shrinking acts while growing W_dec would pay nothing
            l1 = (acts * self.W_dec.norm(dim=-1)[:, None]).sum(-1).mean(-1)
            penalty = config.l1_coefficient * l1 / math.sqrt(x.shape[-1])
        else:  # topk: sparse by construction
            acts = activate(pre, "topk", None, config.top_k)
            penalty = torch.zeros(pre.shape[0])
        if self.cross_layer:
            n, b, d = x.shape
            outs = list(self.b_dec[:, None].expand(n, b, d).unbind())  # per target (b, d)
            for i, W_dec in enumerate(self.W_dec):
                written = (acts[i] @ W_dec.flatten(1)).unflatten(1, (n - i, d))  # (b, n - i, d)
                for k in range(n - i):
                    outs[i + k] = outs[i + k] + written[:, k]
            y_hat = torch.stack(outs)
        else:
            y_hat = torch.baddbmm(self.b_dec[:, None], acts, self.W_dec)
        if self.W_skip is not None:
            y_hat = y_hat + torch.bmm(x, self.W_skip.transpose(1, 2))
        return y_hat, acts, penalty

    @torch.no_grad()
    def to_transcoders(self, scales: _Scales, model_name: str | None) -> TranscoderSet:
        """Fold the normalisation into the weights: a set in the model's own units."""
        n = self.W_enc.shape[0]
        config = self.config
        layers = []
        for i in range(n):
            if self.cross_layer:  # slot k of source i writes layer i + k, in that layer's units
                W_dec = self.W_dec[i] * scales.y_scale[i:, None]
            else:
                W_dec = self.W_dec[i] * scales.y_scale[i]
            W_skip = None
            if self.W_skip is not None:
                W_skip = self.W_skip[i] * (scales.y_scale[i] / scales.x_scale[i])
            threshold = self.log_threshold[i].exp() if config.activation == "jumprelu" else None
            layers.append(
                LayerWeights(
                    W_enc=self.W_enc[i] / scales.x_scale[i],
                    b_enc=self.b_enc[i].clone(),
                    W_dec=W_dec,
                    b_dec=self.b_dec[i] * scales.y_scale[i] + scales.y_mean[i],
                    threshold=threshold,
                    W_skip=W_skip,
                )
            )
        return TranscoderSet.from_layers(
            layers,
            activation=config.activation,
            cross_layer=self.cross_layer,
            top_k=config.top_k if config.activation == "topk" else None,
            feature_input_hook="mlp.hook_in",
            feature_output_hook="mlp.hook_out",
            model_name=model_name,
        )


def _stack(activations: Activations) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_layers, n_tokens, d_model) x and y; every layer must hold the same tokens."""
    if not activations:
        raise ValueError("activations are empty; expected one (x, y) pair per layer")
    shapes = {(tuple(x.shape), tuple(y.shape)) for x, y in activations}
    if len(shapes) != 1 or len(next(iter(shapes))[0]) != 2:
        raise ValueError(
            f"every layer's x and y must be (n_tokens, d_model) of one shape, got {sorted(shapes)}"
        )
    x = torch.stack([x.float() for x, _ in activations])
    y = torch.stack([y.float() for _, y in activations])
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} shapes differ")
    return x, y


def _lr_factor(step_index: int, config: TranscoderTrainConfig) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step_index < config.warmup:
        return (step_index + 1) / config.warmup
    done = (step_index - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def train_transcoders(
    activations: Activations,
    config: TranscoderTrainConfig,
    *,
    progress: bool = True,
    model_name: str | None = None,
) -> tuple[TranscoderSet, dict]:
    """Train a transcoder set of `config.kind` on per-layer (x, y) activations (n_tokens, d_model).

    Returns the set (hooks `mlp.hook_in` / `mlp.hook_out`, float32) and a history: per step the
    total `loss`, the mean over layers of `nmse` (normalised MSE of the batch) and of `l0`
    (active features per token), and `seconds` of training.
    """
    x_all, y_all = _stack(activations)  # (n_layers, n_tokens, d_model)
    n_layers, n_tokens, d_model = x_all.shape
    scales = _Scales.of(activations)
    x_all = x_all / scales.x_scale[:, None, None]
    y_all = (y_all - scales.y_mean[:, None]) / scales.y_scale[:, None, None]
    trainable = _Trainable(config, n_layers, d_model)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=config.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    history: dict = {"loss": [], "nmse": [], "l0": []}
    order, cursor = torch.randperm(n_tokens, generator=generator), 0
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train {config.kind}", disable=not progress)
    for _ in bar:
        if cursor + config.batch_size > n_tokens:  # a new epoch, reshuffled
            order, cursor = torch.randperm(n_tokens, generator=generator), 0
        batch = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        x, y = x_all[:, batch], y_all[:, batch]  # (n_layers, batch, d_model)
        y_hat, acts, penalty = trainable(x)
        # y' has unit variance per dimension, so this is SSE / SST of the batch, per layer.
        nmse = (y_hat - y).pow(2).mean(dim=(1, 2))  # (n_layers,)
        loss = (nmse + penalty).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history["loss"].append(loss.item())
        history["nmse"].append(nmse.mean().item())
        history["l0"].append((acts != 0).sum(-1).float().mean().item())
        bar.set_postfix(
            nmse=f"{history['nmse'][-1]:.3f}", l0=f"{history['l0'][-1]:.1f}", refresh=False
        )
    history["seconds"] = time.perf_counter() - start
    return trainable.to_transcoders(scales, model_name), history


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_transcoders(ts: TranscoderSet, activations: Activations, *, chunk: int = 4096) -> dict:
    """Per layer, through `ts.encode` / `ts.reconstruct` as attribution uses them:

    `variance_explained` (1 - SSE/SST of y, SST around y's per-dimension mean), `l0` (mean number
    of active features per token), `dead_features` (never active on these tokens); each a list over
    layers, with `mean_variance_explained` and `mean_l0` over layers.
    """
    x_all, y_all = _stack(activations)
    n_layers, n_tokens, _ = x_all.shape
    if n_layers != ts.n_layers:
        raise ValueError(f"activations have {n_layers} layers but the set has {ts.n_layers}")
    sse = torch.zeros(n_layers, dtype=torch.float64)
    active_count = torch.zeros(n_layers, dtype=torch.float64)
    ever_active = torch.zeros(n_layers, ts.d_transcoder, dtype=torch.bool)
    for start in range(0, n_tokens, chunk):
        x = x_all[:, start : start + chunk].to(ts.dtype)
        acts = [ts.encode(i, x[i]) for i in range(n_layers)]  # each (chunk, d_transcoder)
        for i in range(n_layers):
            active = acts[i] != 0
            active_count[i] += active.sum()
            ever_active[i] |= active.any(0)
            y_hat = ts.reconstruct(i, acts, x[i]).float()
            sse[i] += (y_hat - y_all[i, start : start + chunk]).double().pow(2).sum()
    sst = (y_all.double() - y_all.double().mean(1, keepdim=True)).pow(2).sum(dim=(1, 2))
    variance_explained = (1 - sse / sst).tolist()
    l0 = (active_count / n_tokens).tolist()
    return {
        "variance_explained": variance_explained,
        "l0": l0,
        "dead_features": (~ever_active).sum(1).tolist(),
        "mean_variance_explained": sum(variance_explained) / n_layers,
        "mean_l0": sum(l0) / n_layers,
    }


@torch.no_grad()
def spliced_loss(
    model: PreTrainedModel,
    tokenizer,
    sentences: Sequence[str],
    ts: TranscoderSet,
    *,
    batch_size: int = 64,
    replace_bos: bool = False,
) -> dict[str, float]:
    """Next-token loss (nats per predicted token) of the model, and with every MLP output replaced.

    Spliced: each layer's MLP block writes `ts.reconstruct` of its MLP input (a CLT's layer uses the
    features of all earlier layers, kept as the forward proceeds). The BOS position keeps its true
    MLP output unless `replace_bos` (transcoders are trained without it, and attribution zeroes its
    error). Returns `loss_original`, `loss_spliced` and `loss_increase` (spliced - original).
    """
    family, layers = _decoder_layers(model)
    if ts.n_layers != len(layers):
        raise ValueError(f"transcoder set has {ts.n_layers} layers but the model has {len(layers)}")
    sequences = encode_sentences(tokenizer, sentences, _context(model))
    if not sequences:
        raise ValueError("sentences are empty; give at least one")
    acts: list[torch.Tensor | None] = [None] * ts.n_layers
    reads: list[torch.Tensor | None] = [None] * ts.n_layers

    def read_hook(i: int):
        def hook(module, args, kwargs):
            reads[i] = _first_tensor(args, kwargs)
            acts[i] = ts.encode(i, reads[i].to(ts.dtype))

        return hook

    def write_hook(i: int):
        def hook(module, args, output):
            spliced = ts.reconstruct(i, acts, reads[i].to(ts.dtype)).to(output.dtype)
            if not replace_bos:
                spliced = torch.cat([output[:, :1], spliced[:, 1:]], dim=1)
            return spliced

        return hook

    def mean_loss() -> float:
        total, count = 0.0, 0
        for start in range(0, len(sequences), batch_size):
            ids, mask = _batch(sequences[start : start + batch_size], tokenizer.pad_token_id)
            acts[:] = [None] * ts.n_layers  # nothing carried over from the last batch
            reads[:] = [None] * ts.n_layers
            logits = (
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            )
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((target != -100).sum())
        return total / count

    was_training = model.training
    model.eval()
    handles = []
    try:
        original = mean_loss()
        for i, layer in enumerate(layers):
            mlp, write = get_module(layer, family.mlp), get_module(layer, family.mlp_write)
            handles.append(mlp.register_forward_pre_hook(read_hook(i), with_kwargs=True))
            handles.append(write.register_forward_hook(write_hook(i)))
        spliced = mean_loss()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"loss_original": original, "loss_spliced": spliced, "loss_increase": spliced - original}

"""The benchmark fixture shared by the benchmark scripts.

A random Llama-architecture model with a per-layer JumpReLU set made sparse by per-feature
thresholds at a high quantile of random-token pre-activations, and a random prompt.
"""

from __future__ import annotations

import argparse
import copy

import torch

from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders, calibrate_sparsity


def add_fixture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument(
        "--density", type=float, default=0.0005, help="calibration quantile: 1 - density"
    )
    parser.add_argument(
        "--calibration-tokens", type=int, default=None, help="sample length (default: --tokens)"
    )


def build_fixture(
    args: argparse.Namespace,
) -> tuple[ReplacementModel, torch.nn.Module, torch.Tensor]:
    """(replacement model, an untouched copy of its model, prompt without start token)."""
    torch.manual_seed(0)
    model = build_model(
        "llama",
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=8,
        vocab=args.vocab,
        context=1024,
    )
    ts = build_transcoders(
        "plt-jumprelu", n_layers=args.layers, d_model=args.d_model, d_transcoder=args.features
    )
    plain = copy.deepcopy(model)
    rm = ReplacementModel(model, ts)
    sample = torch.randint(4, args.vocab, (32, args.calibration_tokens or args.tokens))
    calibrate_sparsity(rm, ts, sample, args.density)
    prompt = torch.randint(
        4, args.vocab, (args.tokens - 1,), generator=torch.Generator().manual_seed(1)
    )
    return rm, plain, prompt

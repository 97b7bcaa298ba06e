"""Choosing the next token from logits: greedy, or temperature + top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_p < 1 keeps the smallest nucleus with that mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T), cut to the top-p nucleus.

    logits `[..., V]` -> probs `[..., V]` in fp32, renormalised.
    """
    probs = torch.softmax(logits.float() / max(params.temperature, 1e-6), dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_token(
    logits: torch.Tensor,  # [B, V]
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B] int64
    """Pick one token per row."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator when the params ask for reproducible sampling."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen

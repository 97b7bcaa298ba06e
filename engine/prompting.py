"""Prompt token layouts for a model: left-to-right and fill-in-the-middle.

Both layouts start with a *document start* token: the model's FIM prefix marker when it has
FIM tokens (so the same cached document serves both layouts), else its BOS token if any.
FIM is prefix-suffix-middle: `<PRE> prefix <SUF> suffix <MID>`, generation follows.
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.healing import healer_for
from engine.tokenizer import Tokenizer


def doc_start_ids(tokenizer: Tokenizer, config: ModelConfig) -> list[int]:
    """Ids that precede a document's own tokens in every layout."""
    if tokenizer.fim is not None:
        return [tokenizer.fim.prefix]
    if config.bos_token_id is not None:
        return [config.bos_token_id]
    return []


def left_to_right_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str) -> list[int]:
    """`<start> prefix` — generation continues the prefix."""
    return doc_start_ids(tokenizer, config) + tokenizer.encode(prefix)


def fim_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str, suffix: str) -> list[int]:
    """`<PRE> prefix <SUF> suffix <MID>`; raises ValueError for a model without FIM tokens."""
    fim = tokenizer.fim
    if fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens; use the left-to-right view")
    return (
        doc_start_ids(tokenizer, config)
        + tokenizer.encode(prefix)
        + [fim.suffix]
        + tokenizer.encode(suffix)
        + [fim.middle]
    )


def healed_left_to_right_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str) -> tuple[list[int], bytes]:
    """`left_to_right_ids` with the cursor's token healed: (ids, bytes to spell out again)."""
    head = doc_start_ids(tokenizer, config)
    ids, heal = healer_for(tokenizer).split(tokenizer.encode(prefix))
    return head + ids, heal


def healed_fim_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str, suffix: str) -> tuple[list[int], bytes]:
    """`fim_ids` with the cursor's token healed: (ids, bytes to spell out again)."""
    fim = tokenizer.fim
    if fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens; use the left-to-right view")
    ids, heal = healer_for(tokenizer).split(tokenizer.encode(prefix))
    return (doc_start_ids(tokenizer, config) + ids + [fim.suffix] + tokenizer.encode(suffix) + [fim.middle],
            heal)

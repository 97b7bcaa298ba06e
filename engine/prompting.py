"""Prompt token layouts for a model: left-to-right and fill-in-the-middle.

Both layouts start with a *document start* token: the model's FIM prefix marker when it has
FIM tokens (so the same cached document serves both layouts), else its BOS token if any.
FIM is prefix-suffix-middle: `<PRE> prefix <SUF> suffix <MID>`, generation follows (a model
may ask for its prefix's last tokens again after `<MID>`: `FimTokens.tail`). This is the
file-level layout of Qwen2.5-Coder, StarCoder and DeepSeek-Coder token for token; their
repo-level header (`<|repo_name|>R\n<|file_sep|>P\n` before `<PRE>`, which llama.cpp's
`/infill` always adds) is not used (bench/fim_prompts.py compares the layouts with exact prefills; its run's table
was never kept in BENCHMARKS.md, so rerun it before relying on the choice).

Token healing (engine/healing.py) applies to prompts whose last tokens generation continues:
left-to-right, and FIM layouts with a tail. A FIM model learned prefix and middle tokenized
apart, so its middle starts at a token boundary wherever the prefix's text ends, and its FIM
prompt is not healed (`fim_heals`): healing the indentation before the cursor made
Qwen2.5-Coder write whitespace to the end of the line.
"""

from __future__ import annotations

from editkv.engine.config import ModelConfig
from editkv.engine.healing import healer_for
from editkv.engine.tokenizer import Tokenizer


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


def fim_layout(tokenizer: Tokenizer, config: ModelConfig, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """`<PRE> prefix <SUF> suffix <MID> prefix[-tail:]` of token ids (see `FimTokens.tail`)."""
    fim = tokenizer.fim
    if fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens; use the left-to-right view")
    return (
        doc_start_ids(tokenizer, config)
        + prefix_ids
        + [fim.suffix]
        + suffix_ids
        + [fim.middle]
        + fim_tail(tokenizer, prefix_ids)
    )


def fim_heals(tokenizer: Tokenizer) -> bool:
    """Whether a FIM prompt heals the prefix's last token: only when the layout repeats the prefix's
    last tokens after `<MID>` (`FimTokens.tail`), so that generation continues them as in left-to-right."""
    return tokenizer.fim is not None and tokenizer.fim.tail > 0


def split_fim_prefix(tokenizer: Tokenizer, prefix_ids: list[int]) -> tuple[list[int], bytes]:
    """A FIM prompt's prefix ids and the bytes generation must spell first (healed only if `fim_heals`)."""
    if fim_heals(tokenizer):
        return healer_for(tokenizer).split(prefix_ids)
    return list(prefix_ids), b""


def fim_suffix_budget(context_size: int) -> int:
    """Suffix tokens a FIM prompt keeps when prefix + suffix exceed the model's context."""
    return context_size // 4


def fim_tail(tokenizer: Tokenizer, prefix_ids: list[int]) -> list[int]:
    """The prefix tokens the model expects again after the middle marker (none for most models)."""
    tail = tokenizer.fim.tail if tokenizer.fim is not None else 0
    return list(prefix_ids[-tail:]) if tail else []


def fim_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str, suffix: str) -> list[int]:
    """The FIM prompt of two texts; raises ValueError for a model without FIM tokens."""
    return fim_layout(tokenizer, config, tokenizer.encode(prefix), tokenizer.encode(suffix))


def healed_left_to_right_ids(tokenizer: Tokenizer, config: ModelConfig, prefix: str) -> tuple[list[int], bytes]:
    """`left_to_right_ids` with the cursor's token healed: (ids, bytes to spell out again)."""
    head = doc_start_ids(tokenizer, config)
    ids, heal = healer_for(tokenizer).split(tokenizer.encode(prefix))
    return head + ids, heal


def healed_fim_ids(
    tokenizer: Tokenizer, config: ModelConfig, prefix: str, suffix: str, *, room: int | None = None
) -> tuple[list[int], bytes]:
    """`fim_ids`, the cursor's token healed where the layout wants it (`fim_heals`): (ids, bytes to
    spell out again, b"" when not healed).

    `room`: tokens to keep free for generation; when the prompt and that room exceed the
    model's context, the suffix is cut to `fim_suffix_budget` tokens, as the FIM view cuts it.
    """
    if tokenizer.fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens; use the left-to-right view")
    ids, heal = split_fim_prefix(tokenizer, tokenizer.encode(prefix))
    suffix_ids = tokenizer.encode(suffix)
    prompt = fim_layout(tokenizer, config, ids, suffix_ids)
    if room is not None and len(prompt) + room > config.max_position_embeddings:
        prompt = fim_layout(tokenizer, config, ids, suffix_ids[: fim_suffix_budget(config.max_position_embeddings)])
    return prompt, heal

"""Tokenizer wrapper: text -> ids with character offsets, ids -> text, FIM/stop token lookup.

Wraps a `tokenizers.Tokenizer` (from tokenizer.json, or the fast backend of a transformers
tokenizer loaded from GGUF). Offsets are Python `str` indices, start-sorted and
non-overlapping: when a byte-level token splits a character, the character belongs to the
first token that touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer as _HFTokenizer

# The FIM conventions of the code models we know: (prefix, suffix, middle) token texts.
FIM_CONVENTIONS: dict[str, tuple[str, str, str]] = {
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, editkv's own
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>"),
}
# Tokens after which a completion is over, whichever model emits them.
STOP_TEXTS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|fim_pad|>",
    "<|file_sep|>",
    "<|repo_name|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<fim_pad>",
    "<file_sep>",
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<｜end▁of▁sentence｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁hole｜>",
    "<｜fim▁end｜>",
    "▁<EOT>",
    "<EOT>",
    "</s>",
)


@dataclass(frozen=True)
class FimTokens:
    """Ids of a model's fill-in-the-middle markers, and how its FIM prompt ends.

    `tail`: how many of the prefix's last tokens the model expects repeated after the middle
    marker (`<PRE> prefix <SUF> suffix <MID> prefix[-tail:]`, generation follows). 0 is the
    usual layout; editkv's default model is trained with a tail (its editkv.json says so):
    the repeat puts the cursor's context right before the generated tokens, which a small
    model cannot find reliably across a long suffix.
    """

    convention: str
    prefix: int
    suffix: int
    middle: int
    tail: int = 0


@dataclass(frozen=True)
class Encoded:
    """Token ids of a text and the `[start, end)` str offsets each token covers."""

    ids: list[int]
    offsets: list[tuple[int, int]] = field(repr=False)


class Tokenizer:
    """Text <-> ids for one model; knows its FIM markers and stop tokens."""

    def __init__(self, backend: _HFTokenizer, eos_ids: tuple[int, ...] = ()) -> None:
        # Document text that contains "<|endoftext|>" & co. is text, never control ids.
        backend.encode_special_tokens = True
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.fim = _find_fim(backend)
        # A stop text counts only as a control token (an added token): Qwen's vocabulary also
        # spells "</s>" as an ordinary BPE token, which is text (HTML in a string), not an end.
        added = backend.get_added_tokens_decoder()
        stop = {backend.token_to_id(t) for t in STOP_TEXTS}
        self.stop_ids: frozenset[int] = frozenset({i for i in stop if i in added} | set(eos_ids))
        self.eos_ids = tuple(eos_ids) or tuple(
            i for i in (backend.token_to_id("<|endoftext|>"),) if i is not None
        )
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_file(cls, path: str, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        """Load a tokenizer.json."""
        return cls(_HFTokenizer.from_file(str(path)), eos_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Encoded:
        """Ids and non-overlapping, start-sorted str offsets covering `text`."""
        enc = self.backend.encode(text, add_special_tokens=False)
        offsets = []
        prev_end = 0
        for start, end in enc.offsets:
            start = max(start, prev_end)
            end = max(end, start)
            offsets.append((start, end))
            prev_end = end
        return Encoded(list(enc.ids), offsets)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts at once (multithreaded in the backend)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens dropped."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_bytes_len(self, ids: list[int]) -> int:
        """UTF-8 length of the decoded text (for bits-per-byte)."""
        return len(self.decode(ids).encode("utf-8"))

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a control token (FIM markers, EOS...)."""
        return token_id in self._special_ids

    def token_id(self, text: str) -> int | None:
        """Id of an exact token text, if the vocabulary has it."""
        return self.backend.token_to_id(text)


def _find_fim(backend: _HFTokenizer) -> FimTokens | None:
    for name, texts in FIM_CONVENTIONS.items():
        ids = [backend.token_to_id(t) for t in texts]
        if all(i is not None for i in ids):
            return FimTokens(name, *ids)
    return None

"""Token healing: let the model re-choose the token the cursor cut in half.

A prompt that ends at the cursor often ends with a token the model rarely saw at that place:
after a line's indentation, `"        "` is one token, but in training the indentation
before a word is `"       " + " item"`, so the 8-space token is followed by a newline or
the end of the file, and the model predicts exactly that. Healing drops the prompt's last
token and constrains the first generated tokens to spell its bytes out again, so the model
picks the tokenization it knows; the healed bytes are then cut from the completion.
"""

from __future__ import annotations

import bisect
import weakref

import torch
from editkv.engine.identity_cache import IdentityCache
from editkv.engine.tokenizer import Tokenizer

_HORIZONTAL_SPACE = b" \t"
_KEPT_MASKS = 256  # allowed-id tensors a healer keeps, oldest dropped first


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenHealer:
    """Byte strings of a vocabulary, indexed for "which tokens agree with these bytes"."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = weakref.ref(tokenizer)  # weak: the healer is cached per tokenizer (healer_for)
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        byte_level = "ByteLevel" in str(tokenizer.backend.decoder)
        decoder = _byte_decoder()
        self.token_bytes: dict[int, bytes] = {}
        for text, token_id in vocab.items():
            if tokenizer.is_special(token_id):
                continue
            if byte_level and all(ch in decoder for ch in text):
                data = bytes(decoder[ch] for ch in text)
            else:
                data = tokenizer.decode([token_id]).encode("utf-8")
            if data:
                self.token_bytes[token_id] = data
        self._sorted = sorted((b, i) for i, b in self.token_bytes.items())
        self._keys = [b for b, _ in self._sorted]
        self._by_bytes: dict[bytes, list[int]] = {}
        for i, b in self.token_bytes.items():
            self._by_bytes.setdefault(b, []).append(i)
        self._kept: dict[tuple[bytes, torch.device], torch.Tensor] = {}  # mask's allowed ids [n] int64

    def split(self, ids: list[int], *, min_keep: int = 0) -> tuple[list[int], bytes]:
        """Drop the last token if healing it makes sense: (ids, bytes to spell out again).

        Healed: a last token of horizontal whitespace (indentation, spaces) or one ending in
        a word character, beyond the first `min_keep` ids. Never a token ending a line.
        """
        if len(ids) <= min_keep:
            return ids, b""
        data = self.token_bytes.get(ids[-1])
        if not data or data.endswith((b"\n", b"\r")):
            return ids, b""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return ids, b""
        if data.strip(_HORIZONTAL_SPACE) == b"" or data[-1:].isalnum() or data.endswith(b"_"):
            return ids[:-1], data
        return ids, b""

    def allowed(self, remaining: bytes) -> list[int]:
        """Tokens whose bytes start with `remaining`, or are a non-empty prefix of it."""
        out = []
        lo = bisect.bisect_left(self._keys, remaining)
        for b, i in self._sorted[lo:]:
            if not b.startswith(remaining):
                break
            out.append(i)
        for k in range(1, len(remaining)):
            out.extend(self._by_bytes.get(remaining[:k], ()))
        return out

    def allowed_ids(self, remaining: bytes, device: torch.device) -> torch.Tensor:
        """`allowed(remaining)` as an int64 tensor on `device`, kept for the next request."""
        key = (remaining, device)
        keep = self._kept.get(key)
        if keep is None:  # a few ms on a large vocabulary: the same indentation heals again and again
            if len(self._kept) >= _KEPT_MASKS:
                self._kept.pop(next(iter(self._kept)), None)
            keep = self._kept[key] = torch.tensor(self.allowed(remaining), dtype=torch.long, device=device)
        return keep

    def mask(self, logits: torch.Tensor, remaining: bytes) -> torch.Tensor:
        """`logits` [B, V] with every token that disagrees with `remaining` at -inf."""
        keep = self.allowed_ids(remaining, logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[:, keep] = logits[:, keep]
        return out

    def advance(self, remaining: bytes, token_id: int) -> bytes:
        """Bytes still to spell out after generating `token_id`."""
        data = self.token_bytes.get(token_id, b"")
        return b"" if len(data) >= len(remaining) else remaining[len(data):]


_HEALERS = IdentityCache()  # tokenizer -> TokenHealer, freed with the tokenizer (a model reload)


def healer_for(tokenizer: Tokenizer) -> TokenHealer:
    """One healer per tokenizer (building the index takes a moment on large vocabularies)."""
    healer = _HEALERS.get(tokenizer)
    if healer is None:
        healer = _HEALERS.put(tokenizer, TokenHealer(tokenizer))
    return healer

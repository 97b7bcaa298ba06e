"""Byte-level BPE tokenizer of the default model, trained so that no token crosses a line.

Locality contract: the pre-tokenizer never lets a piece run past a line terminator (any
separator `str.splitlines` knows, `\\r\\n` counted as one), so the ids of a file are the ids
of its lines, concatenated. edit_cache relies on this to re-tokenize only the lines an edit
touched; `check_locality` measures it on real files.

Data flow: document texts -> `train_tokenizer` -> `tokenizers.Tokenizer` -> `save_tokenizer`
(tokenizer.json + the transformers config files that make AutoTokenizer load it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FILE_SEP = "<|file_sep|>"
# The position in this tuple is the token id; the trainer adds them first, in this order.
SPECIAL_TOKENS = (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FILE_SEP)
EOT_ID, FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, FILE_SEP_ID = range(len(SPECIAL_TOKENS))

# Every character `str.splitlines` breaks after (`\r\n` is matched as one terminator first).
_NL = "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_TERMINATOR = f"(?:\\r\\n|[{_NL}])"
_HSPACE = f"[^\\S{_NL}]"  # whitespace that does not end a line
# Qwen2's pattern, changed for Python source and for locality:
# - identifiers (letters, digits, underscores) are one piece, with one optional leading
#   non-letter character such as a space or a dot (" self", ".append", "(x1");
#   Qwen2's English contractions are gone (they cut `'s` off `'self'`);
# - numbers go in pieces of up to three digits;
# - a piece holds at most one line terminator, always as its last character: Qwen2's
#   `[\r\n]*` and `\s*[\r\n]+` would swallow blank lines, and merge across them;
# - `\s+(?!\S)` leaves the last space of an indentation to the next word, so a
#   four-space indent is "   " + " def" and the three-space piece is one token.
PRETOKENIZE_PATTERN = "|".join(
    [
        f"[^{_NL}\\p{{L}}\\p{{N}}_]?[\\p{{L}}_][\\p{{L}}\\p{{N}}_]*",
        "\\p{N}{1,3}",
        f" ?[^\\s\\p{{L}}\\p{{N}}_{_NL}]+{_TERMINATOR}?",
        f"{_HSPACE}*{_TERMINATOR}",
        f"{_HSPACE}+(?!\\S)",
        f"{_HSPACE}+",
    ]
)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the line-local pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """Train on `texts`; the vocabulary (special tokens included) has at most `vocab_size`."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    for token_id, text in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(text) != token_id:
            raise RuntimeError(f"trainer gave {text} id {tok.token_to_id(text)}, not {token_id}")
    return tok


@contextmanager
def text_mode(tok: Tokenizer) -> Iterator[Tokenizer]:
    """Encode special-token strings found in text as plain text, not as control ids.

    Source files do contain "<|endoftext|>" (tokenizer code, tests); training data must
    get control ids only where the pipeline puts them.
    """
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = before


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of many texts (multithreaded in `tokenizers`), special strings kept as text."""
    with text_mode(tok):
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens); for bits per byte."""  # [V]
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    special = set(SPECIAL_TOKENS)
    for text, token_id in tok.get_vocab().items():
        # Byte-level tokens spell one printable character per byte.
        lengths[token_id] = 0 if text in special else len(text)
    return lengths


def save_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json and the files `AutoTokenizer.from_pretrained(folder)` reads.

    The config is written by hand, not by transformers' save_pretrained, so the files do
    not depend on the installed version: PreTrainedTokenizerFast with
    additional_special_tokens loads in transformers 4 and 5 (5 maps both names).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    extra = [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FILE_SEP]
    special = {"bos_token": None, "eos_token": EOT, "pad_token": EOT, "unk_token": None,
               "additional_special_tokens": extra}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json",
                      {k: v for k, v in special.items() if v is not None})):
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` saved in `folder`."""
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@dataclass
class LocalityStats:
    """How often encoding a whole file differs from encoding its lines one by one."""

    files: int
    files_differing: int
    lines: int
    lines_differing: int

    @property
    def file_fraction(self) -> float:
        return self.files_differing / max(self.files, 1)

    @property
    def line_fraction(self) -> float:
        return self.lines_differing / max(self.lines, 1)

    def to_json(self) -> dict:
        """Counts and fractions, for training_stats.json."""
        return {
            **asdict(self),
            "file_fraction": self.file_fraction,
            "line_fraction": self.line_fraction,
        }

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"locality: {self.files_differing}/{self.files} files and "
            f"{self.lines_differing}/{self.lines} lines tokenize differently line by line"
        )


def check_locality(tok: Tokenizer, texts: Sequence[str]) -> LocalityStats:
    """Compare each file's ids with the concatenated ids of its `splitlines(keepends=True)`.

    A line differs when the whole-file tokens that start inside it are not the ids of the
    line encoded alone (a token that crosses a line end makes both lines differ).
    """
    with text_mode(tok):
        whole = tok.encode_batch(list(texts), add_special_tokens=False)
        lines_of = [text.splitlines(keepends=True) for text in texts]
        alone = tok.encode_batch([line for lines in lines_of for line in lines],
                                 add_special_tokens=False)
    stats = LocalityStats(len(texts), 0, 0, 0)
    k = 0
    for enc, lines in zip(whole, lines_of, strict=True):
        starts = np.array([start for start, _ in enc.offsets], dtype=np.int64)
        ids = enc.ids
        line_start = 0
        file_differs = False
        for line in lines:
            line_end = line_start + len(line)
            lo, hi = np.searchsorted(starts, [line_start, line_end])
            if ids[lo:hi] != alone[k].ids:
                stats.lines_differing += 1
                file_differs = True
            k += 1
            line_start = line_end
        stats.lines += len(lines)
        stats.files_differing += file_differs
    return stats


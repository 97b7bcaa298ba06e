"""Decoding strategies that start from an engine.generate.DecodeState.

speculative: lossless n-gram speculation (prompt lookup + a STAND-style model table),
    optionally gated by AdaDec.
adadec: entropy-gated lookahead reranking (a token chooser for engine.generate.decode).
superposed: k drafts from one forward per step, scored with workspace/corpus n-grams.
beam: beam search, the baseline the benchmarks compare against.
"""

from editkv.engine.decoding.drafters import ModelTable, PromptLookup, Reference
from editkv.engine.decoding.speculative import SpecCounters, SpeculationConfig, Speculator, speculative_decode

__all__ = [
    "ModelTable",
    "PromptLookup",
    "Reference",
    "SpecCounters",
    "SpeculationConfig",
    "Speculator",
    "speculative_decode",
]

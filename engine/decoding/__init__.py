"""Decoding strategies that start from an engine.generate.DecodeState.

speculative: lossless n-gram speculation (prompt lookup + a STAND-style model table).
"""

from engine.decoding.drafters import ModelTable, PromptLookup, Reference
from engine.decoding.speculative import SpecCounters, SpeculationConfig, Speculator, speculative_decode

__all__ = [
    "ModelTable",
    "PromptLookup",
    "Reference",
    "SpecCounters",
    "SpeculationConfig",
    "Speculator",
    "speculative_decode",
]

"""Lossless speculative decoding with model-free drafters: draft, verify in one forward, accept.

Data flow of one step: DecodeState + emitted ids -> drafters (drafters.py) propose candidate
chains -> `Speculator.plan` cuts each chain by SpecDec++'s rule (stop before the token that
makes the estimated chance of some rejection exceed `threshold`), keeps the prefix and the
chain with the most expected tokens per unit of forward cost (`StepCost`: measured time per
batch rows x width; no draft at all when a plain step wins), and with `max_rows > 1` adds other
chains as batch rows (a token tree verified by rows that share the context) while that raises
it -> one forward of [last emitted token + drafts] per row, logits at every
position -> `verify` walks the rows: greedy accepts drafts equal to the argmax; sampling
accepts point-mass drafts equal to a sample of the target and stochastic drafts (drawn from q)
with probability min(1, p/q), resampling from norm(max(p - q, 0)) on rejection -> the accepted
drafts and the target's own next token (the bonus) go through the same stop rules, healing and
line cut as engine.generate.decode, so greedy output is token-for-token the same.

AdaDec (greedy): the kept row's positions are gated in order; drafts are accepted up to the
first position whose entropy reaches tau, where the lookahead rerank chooses the token in place
of the argmax, and the winner's rollout is a draft candidate for the next step (`Speculator.plan`
takes it as an `extra` chain). The output is then adadec_decode's.

On graphed forwards (CUDA), greedy decoding without AdaDec drafts and verifies on the device
instead (`config.device_lookup`): `StaticForward.lookup_chain` runs up to `device_steps`
iterations of prompt lookup over the references and the history, a `device_width`-token
verification and the verdict as one replayed graph each, and the host reads the kept tokens
once per chain. On a small model a host-driven step (drafting, the verdict, the wait for it)
costs several times a chained plain step; on the device an 8-token verification costs ~1.2x
one in bf16 and ~1.5x in fp32 (H100, default model). Where a chain's drafts do not pay for
that, the next chain is plain steps.

KV: row tokens are written at the scratch slots that follow the emitted ones; the next write
position only advances by the tokens kept, so rejected drafts' K/V is overwritten later. With
several rows they go to a batch-B side buffer and the kept row's slots are copied over.

The decoder sees only a DecodeState: both edit_cache views work. It refuses to know text
beyond the tokenizer's stop ids, token bytes and the line rule.
"""

from editkv.engine.decoding.speculative.config import DRAFTERS, SpecCounters, SpeculationConfig
from editkv.engine.decoding.speculative.loop import Speculator, speculative_decode
from editkv.engine.decoding.speculative.planning import Plan, StepCost, expected_accepted
from editkv.engine.decoding.speculative.verify import Verdict, verify

__all__ = [
    "DRAFTERS",
    "Plan",
    "SpecCounters",
    "SpeculationConfig",
    "Speculator",
    "StepCost",
    "Verdict",
    "expected_accepted",
    "speculative_decode",
    "verify",
]
